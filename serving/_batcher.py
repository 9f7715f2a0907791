"""Server-side batching, emulating TF Serving's shared batch scheduler."""

from __future__ import annotations

import collections
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np
from tfbn.serving._config import BatchingParameters
from tfbn.serving._status import ServingError, error

if TYPE_CHECKING:
    from tfbn.serving._servable import Servable


class _Task:
    __slots__ = ("key", "inputs", "outputs", "size", "enqueued", "event", "result", "error")

    def __init__(self, key, inputs, outputs, size):
        self.key, self.inputs, self.outputs, self.size = key, inputs, outputs, size
        self.enqueued = time.monotonic()
        self.event = threading.Event()
        self.result = None
        self.error = None


class Batcher:
    """TF Serving's shared batch scheduler, emulated for one servable.

    Tasks with the same signature, input/output names and per-row shapes share a queue.
    A batch is closed when it reaches `max_batch_size` or when its oldest task has
    waited `batch_timeout_micros`; `num_batch_threads` workers run batches.
    """

    def __init__(self, params: BatchingParameters):
        self.params = params
        self._queues: dict[Any, collections.deque] = collections.OrderedDict()
        self._cv = threading.Condition()
        self._closing = False
        self.batch_sizes: collections.Counter = collections.Counter()
        self._threads = [
            threading.Thread(target=self._loop, name=f"tfbn-batch-{i}", daemon=True)
            for i in range(min(params.num_batch_threads, 8))
        ]
        for t in self._threads:
            t.start()

    def submit(
        self,
        servable: Servable,
        key: str,
        inputs: dict[str, np.ndarray],
        outputs: list[str],
        timeout: float | None,
    ) -> dict[str, np.ndarray]:
        sizes = {a.shape[0] if a.ndim else None for a in inputs.values()}
        if len(sizes) != 1 or None in sizes:
            raise error(
                "INVALID_ARGUMENT",
                "Batching Run() input tensors must have equal 0th-dimension size",
            )
        size = sizes.pop()
        max_b = self.params.max_batch_size
        if size > max_b and not self.params.enable_large_batch_splitting:
            raise error(
                "INVALID_ARGUMENT",
                f"Task size {size} is larger than maximum input batch size {max_b}",
            )
        if size == 0:
            return servable.call(key, inputs, outputs)
        chunks = [(s, min(s + max_b, size)) for s in range(0, size, max_b)]
        qkey = (
            servable.version,
            key,
            tuple(sorted((n, a.dtype.str, a.shape[1:]) for n, a in inputs.items())),
            tuple(outputs),
        )
        tasks = [
            _Task(qkey, {n: a[s:e] for n, a in inputs.items()}, outputs, e - s) for s, e in chunks
        ]
        with self._cv:
            if self._closing:
                raise error("UNAVAILABLE", "the servable is being unloaded")
            queue = self._queues.setdefault(qkey, collections.deque())
            queued = sum(t.size for t in queue)
            if -(-(queued + size) // max_b) > self.params.max_enqueued_batches:
                raise error(
                    "UNAVAILABLE",
                    "The batch scheduling queue to which this task was submitted is full",
                )
            queue.extend(tasks)
            self._servable = servable
            self._cv.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for task in tasks:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not task.event.wait(remaining):
                raise error("DEADLINE_EXCEEDED", "Deadline exceeded while waiting for the batch")
            if task.error is not None:
                raise task.error
        if len(tasks) == 1:
            return tasks[0].result
        return {n: np.concatenate([t.result[n] for t in tasks]) for n in outputs}

    def _take_batch(self):
        """Under the lock: the tasks of the next ready batch, or the seconds to wait."""
        max_b = self.params.max_batch_size
        timeout = self.params.batch_timeout_micros / 1e6
        now = time.monotonic()
        wait = None
        for qkey, queue in list(self._queues.items()):
            if not queue:
                del self._queues[qkey]
                continue
            total = sum(t.size for t in queue)
            ready_at = queue[0].enqueued + timeout
            if total >= max_b or now >= ready_at or self._closing:
                batch, n = [], 0
                while queue and n + queue[0].size <= max_b:
                    task = queue.popleft()
                    batch.append(task)
                    n += task.size
                return batch
            wait = ready_at - now if wait is None else min(wait, ready_at - now)
        return wait

    def _loop(self):
        while True:
            with self._cv:
                while True:
                    got = self._take_batch()
                    if isinstance(got, list):
                        break
                    if self._closing and not self._queues:
                        return
                    self._cv.wait(got)
                servable = self._servable
            self._run(servable, got)

    def _run(self, servable: Servable, batch: list[_Task]):
        first = batch[0]
        n = sum(t.size for t in batch)
        padded = self.params.padded_size(n)
        try:
            merged = {}
            for name in first.inputs:
                parts = [t.inputs[name] for t in batch]
                if padded > n:  # pad with copies of a real row (the first row of the batch)
                    parts.append(np.repeat(parts[0][:1], padded - n, axis=0))
                merged[name] = np.concatenate(parts) if len(parts) > 1 else parts[0]
            out = servable.call(first.key[1], merged, first.outputs)
            for name, arr in out.items():
                if arr.ndim == 0 or arr.shape[0] != padded:
                    raise error(
                        "INTERNAL",
                        "Batched output tensor's 0th dimension does not equal "
                        "the sum of the 0th dimension sizes of the input tensors "
                        f"(output {name!r} has shape {list(arr.shape)}, batch {padded})",
                    )
            start = 0
            for t in batch:
                t.result = {k: v[start : start + t.size] for k, v in out.items()}
                start += t.size
        except ServingError as err:
            for t in batch:
                t.error = err
        except Exception as err:  # noqa: BLE001 - reported to every waiting request
            for t in batch:
                t.error = error("INTERNAL", f"{type(err).__name__}: {err}")
        with self._cv:
            self.batch_sizes[padded] += 1
        for t in batch:
            t.event.set()

    def close(self):
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout=30)
