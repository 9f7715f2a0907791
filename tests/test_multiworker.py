"""MultiWorkerMirroredStrategy with worker processes on 127.0.0.1 (tests/mw_worker.py).

- Parity: synchronised tfbn BN over 2 workers x 1 replica and 2 workers x 2 replicas
  (4 replicas over 2 processes: the hierarchical local + cross-worker path) equals
  single-device BN on the whole global batch, and every replica's copy of the moving
  statistics is identical.
- Failing fast: a worker whose peer died before connecting exits within a bounded
  time with an error naming that peer (TensorFlow alone waits forever); a worker
  whose peer dies mid-training fails its next all-reduce and names the peer too.

Every process binds 127.0.0.1 on free ports, has a bounded timeout and is killed
(SIGKILL: a worker blocked in the strategy's constructor ignores SIGTERM) at the end.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

TIMEOUT_S = 240
WORKER_SCRIPT = Path(__file__).with_name("mw_worker.py")


def _free_ports(n):
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class Cluster:
    """Worker processes of one TF_CONFIG cluster; `start(i)` starts worker i."""

    def __init__(self, tmp_path, workers=2):
        self.tmp_path = tmp_path
        self.addresses = [f"127.0.0.1:{port}" for port in _free_ports(workers)]
        self.procs, self.logs = {}, []

    def start(self, index, *args):
        env = dict(os.environ)
        env["TF_CONFIG"] = json.dumps(
            {"cluster": {"worker": self.addresses}, "task": {"type": "worker", "index": index}}
        )
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["PYTHONPATH"] = os.pathsep.join(
            [str(WORKER_SCRIPT.parent.parent), env.get("PYTHONPATH", "")]
        )
        log = open(self.log_path(index), "w")  # noqa: SIM115
        self.logs.append(log)
        self.procs[index] = subprocess.Popen(
            [sys.executable, str(WORKER_SCRIPT), str(self.result_path(index)), *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        return self.procs[index]

    def result_path(self, index):
        return self.tmp_path / f"worker{index}.json"

    def log_path(self, index):
        return self.tmp_path / f"worker{index}.log"

    def log(self, index):
        return self.log_path(index).read_text()

    def wait(self, index, timeout):
        try:
            return self.procs[index].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"worker {index} still running after {timeout} s:\n{self.log(index)[-3000:]}"
            )

    def close(self):
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        for log in self.logs:
            log.close()


@pytest.fixture
def cluster(tmp_path):
    cluster = Cluster(tmp_path)
    yield cluster
    cluster.close()


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 2], ids=["2x1", "2x2"])
def test_multiworker_sync_batch_norm_parity(cluster, devices):
    for index in range(2):
        cluster.start(index, "--devices", str(devices))
    for index in range(2):
        code = cluster.wait(index, TIMEOUT_S)
        assert code == 0, f"worker {index} exited with {code}:\n{cluster.log(index)[-3000:]}"

    results = [json.loads(cluster.result_path(i).read_text()) for i in range(2)]
    for index, result in enumerate(results):
        assert result["task"] == index
        assert result["replicas"] == 2 * devices  # every replica of both workers in sync
        assert all(result["copies_identical"].values()), result["copies_identical"]
        for path_name in ("fused", "unfused"):
            diffs = result["max_diff"][path_name]
            assert set(diffs) == {"y", "dx", "dgamma", "dbeta", "moving_mean", "moving_variance"}
            for name, diff in diffs.items():
                assert diff <= 1e-5, (index, path_name, name, diff)
    assert results[0]["moving_mean"] == results[1]["moving_mean"]  # across processes too


@pytest.mark.slow
def test_peer_dead_before_connecting_is_named_within_the_connect_timeout(cluster):
    """Worker 1 never comes up: worker 0 must not hang in the strategy's constructor."""
    connect_timeout = 20
    start = time.monotonic()
    cluster.start(0, "--connect-timeout", str(connect_timeout))
    code = cluster.wait(0, connect_timeout + 90)  # + the worker's own start-up
    elapsed = time.monotonic() - start
    log = cluster.log(0)
    assert code == -signal.SIGKILL, (code, log[-3000:])  # by tfbn's watchdog process
    assert f"within {connect_timeout} s" in log, log[-3000:]
    assert f"worker 1 at {cluster.addresses[1]} is not reachable" in log, log[-3000:]
    assert elapsed < connect_timeout + 90
    assert not cluster.result_path(0).exists()


@pytest.mark.slow
def test_peer_dying_mid_training_is_named(cluster):
    """Worker 1 vanishes after its second step. Worker 0 fails in step 2 (its next
    all-reduce) or already in step 1: a ring all-reduce can end on worker 1 before
    worker 0 has pulled worker 1's last chunk, so which of the two is a race (CI saw
    step 1 once). Either way the step and the dead peer are named, quickly."""
    start = time.monotonic()
    cluster.start(0, "--steps", "6")
    cluster.start(1, "--steps", "6", "--die-after-steps", "2")
    assert cluster.wait(1, TIMEOUT_S) == 9, cluster.log(1)[-3000:]
    died = time.monotonic()
    code = cluster.wait(0, 120)
    log = cluster.log(0)
    assert code == 1, (code, log[-3000:])
    assert re.search(r"worker 0: training step [12] failed", log), log[-3000:]
    assert f"worker 1 at {cluster.addresses[1]} is not reachable" in log, log[-3000:]
    assert time.monotonic() - died < 90, time.monotonic() - start


@pytest.mark.slow
def test_example_launcher_blames_the_worker_that_died(tmp_path):
    """examples/multiworker_sync_bn.py: worker 1 dies before the cluster forms. The
    launcher names worker 1 as soon as it exits (it used to wait its whole --timeout
    on worker 0, then blame worker 0)."""
    import importlib.util

    path = Path(__file__).parent.parent / "examples" / "multiworker_sync_bn.py"
    spec = importlib.util.spec_from_file_location("multiworker_sync_bn_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    start = time.monotonic()
    with pytest.raises(
        RuntimeError, match=r"worker 1 \(127\.0\.0\.1:\d+\) failed first, exit code 3"
    ):
        example.main(["--out", str(tmp_path), "--timeout", "200", "--crash-worker", "1"])
    assert time.monotonic() - start < 60
