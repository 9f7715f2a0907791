"""`tfbn gpu-check` on this CPU-only machine: every check skipped with its reason, the
table printed, exit code 0; and the checks' own code run against the CPU (hidden
`--device`), so the script a GPU user runs is known to work."""

import json
import os
import subprocess
import sys

import pytest

from tfbn import gpu_check


@pytest.mark.slow
def test_without_a_gpu_every_check_is_skipped_with_a_reason(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "tfbn.cli", "gpu-check", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "No GPU is visible to TensorFlow" in proc.stdout
    report = json.loads(out.read_text())
    names = [name for name, _ in gpu_check.checks([], bench_repeats=1)]
    assert [c["name"] for c in report["checks"]] == names
    assert len(names) >= 15
    for check in report["checks"]:
        assert check["status"] == "SKIP"
        assert "no GPU visible to TensorFlow" in check["detail"]
        assert f"| {check['name']} | SKIP |" in proc.stdout
    assert report["environment"]["gpus"] == []
    assert f"0 PASS, 0 FAIL, {len(names)} SKIP" in proc.stdout


CPU_CHECKS = [
    "fused_NHWC_float32",
    "fused_NHWC_bfloat16",
    "epsilon_floor_NHWC_float32",
    "raw_fused_epsilon_1e-7",
    "one_value_per_channel",
    "xla_fit",
    "mixed_float16_fit",
]


def test_the_checks_themselves_run_on_the_cpu():
    report = gpu_check.run_checks("/CPU:0", bench_repeats=0, only=CPU_CHECKS)
    results = {c["name"]: c for c in report["checks"]}
    assert sorted(results) == sorted(CPU_CHECKS)
    for name, check in results.items():
        assert check["status"] == "PASS", (name, check["detail"], check["data"].get("traceback"))
    # The table lists every check with its result.
    table = gpu_check.format_table(report)
    assert all(f"| {name} | PASS |" in table for name in CPU_CHECKS)
    # On a single device the multi-GPU check says why it cannot run.
    mirrored = gpu_check.check_mirrored(["/GPU:0"])("/CPU:0")
    assert mirrored.status == "SKIP" and "needs 2 or more GPUs; 1 visible" in mirrored.detail


def test_a_crashing_check_is_reported_as_failed_not_raised(monkeypatch):
    def broken(device):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(gpu_check, "checks", lambda gpus, repeats: [("broken", broken)])
    report = gpu_check.run_checks("/CPU:0", bench_repeats=0)
    (check,) = report["checks"]
    assert check["status"] == "FAIL" and "RuntimeError: kernel exploded" in check["detail"]
    assert "Traceback" in check["data"]["traceback"]
