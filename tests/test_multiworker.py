"""MultiWorkerMirroredStrategy: 2 worker processes on 127.0.0.1 reproduce sync BN parity.

Each worker (tests/mw_worker.py) runs synchronised tfbn BN on its shard of a
global batch and compares against single-device BN on the whole batch; this test
only starts the workers (free ports, TF_CONFIG, bounded timeouts, killed on any
failure) and asserts on the JSON results they write.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKERS = 2
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


@pytest.mark.slow
def test_multiworker_sync_batch_norm_parity(tmp_path):
    cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(WORKERS)]}
    procs, results, logs = [], [], []
    try:
        for index in range(WORKERS):
            env = dict(os.environ)
            env["TF_CONFIG"] = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
            env["CUDA_VISIBLE_DEVICES"] = ""
            env["PYTHONPATH"] = os.pathsep.join(
                [str(WORKER_SCRIPT.parent.parent), env.get("PYTHONPATH", "")]
            )
            results.append(tmp_path / f"worker{index}.json")
            logs.append(open(tmp_path / f"worker{index}.log", "w"))  # noqa: SIM115
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(WORKER_SCRIPT), str(results[-1])],
                    env=env, stdout=logs[-1], stderr=subprocess.STDOUT,
                )
            )
        for index, proc in enumerate(procs):
            try:
                code = proc.wait(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"worker {index} did not finish within {TIMEOUT_S}s")
            if code != 0:
                log = (tmp_path / f"worker{index}.log").read_text()[-3000:]
                pytest.fail(f"worker {index} exited with {code}:\n{log}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        for log in logs:
            log.close()

    for index, path in enumerate(results):
        result = json.loads(path.read_text())
        assert result["task"] == index
        assert result["replicas"] == WORKERS  # one replica per worker, all in sync
        for path_name in ("fused", "unfused"):
            diffs = result["max_abs_diff"][path_name]
            assert set(diffs) == {"y", "dx", "dgamma", "dbeta", "moving_mean", "moving_variance"}
            for name, diff in diffs.items():
                assert diff <= 1e-5, (
                    index, path_name, name, diff,
                )
