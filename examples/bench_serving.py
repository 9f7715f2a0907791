"""Benchmark: the batch-invariance check over REST and gRPC against the development server.

Starts `tfbn serve` in a subprocess (as a deployment would run it) on a small frozen
Dense-BatchNorm-Dense export (or --model), then measures:

1. examples/second of `check_batch_invariance` over REST and gRPC, at batch 1 and 64,
   against the same check in process (the baseline the ratios are computed from);
2. memory over a long run: the server's and this client's resident set size (RSS)
   after a warm-up and after every 1,000 of --requests single-row requests per transport.

    .venv/bin/python examples/bench_serving.py                 # defaults: 10,000 requests
    .venv/bin/python examples/bench_serving.py --requests 2000 --examples 256 --json out.json

Timings depend on the machine; compare the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


NAME = "bench"  # the served model's name


def proc_status(pid: int | str = "self", field: str = "VmRSS") -> float:
    """A /proc/<pid>/status memory field (VmRSS, VmHWM) in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def export_model(root: str) -> str:
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((16,), name="features")
    x = keras.layers.Dense(64, activation="relu")(inp)
    x = keras.layers.BatchNormalization()(x)
    model = keras.Model(inp, keras.layers.Dense(4)(x))
    base = os.path.join(root, "model")
    model.export(os.path.join(base, "1"), verbose=False)
    return base


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(base: str) -> tuple[subprocess.Popen, str, str]:
    rest_port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tfbn.cli",
            "serve",
            "--port=0",
            f"--rest_api_port={rest_port}",
            f"--model_name={NAME}",
            f"--model_base_path={base}",
            "--file_system_poll_wait_seconds=0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if "ready" in line and "gRPC on " in line:
            grpc_target = line.split("gRPC on ")[1].split(",")[0].strip()
            # Keep reading its log, so a full pipe never blocks the server.
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, grpc_target, f"http://127.0.0.1:{rest_port}"
    proc.kill()
    proc.wait()
    raise RuntimeError("the development server did not start")


def timed_check(predict, inputs, reference, batch: int) -> float:
    from tfbn.serving.invariance import check_batch_invariance

    t0 = time.perf_counter()
    report = check_batch_invariance(predict, inputs, reference, batch_sizes=(batch,), orders=1)
    elapsed = time.perf_counter() - t0
    assert report.passed, report.format()
    return len(next(iter(inputs.values()))) / elapsed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a SavedModel base path (default: export a small BN model)")
    p.add_argument("--examples", type=int, default=1024, help="examples per throughput run")
    p.add_argument("--requests", type=int, default=10_000, help="requests per transport for memory")
    p.add_argument("--json", dest="json_path")
    args = p.parse_args(argv)

    from tfbn.serving.client import GrpcClient, RestClient
    from tfbn.serving.invariance import saved_model_predictor, synthetic_inputs

    with tempfile.TemporaryDirectory() as tmp:
        base = args.model or export_model(tmp)
        local, version_dir = saved_model_predictor(base)
        sig = local.servable.signature_defs["serving_default"]
        from tfbn.serving import _tensor

        spec = {
            k: (_tensor.numpy_dtype(v.dtype), [d.size for d in v.tensor_shape.dim])
            for k, v in sig.inputs.items()
        }
        inputs = synthetic_inputs(spec, args.examples, seed=0)
        reference = local(inputs)

        proc, grpc_target, rest_url = start_server(base)
        results = {
            "examples": args.examples,
            "requests": args.requests,
            "throughput": [],
            "memory": [],
        }
        try:
            clients = {
                "rest": RestClient(rest_url, NAME, timeout=30),
                "grpc": GrpcClient(grpc_target, NAME, timeout=30),
            }
            for batch in (1, 64):
                base_rate = timed_check(local, inputs, reference, batch)
                results["throughput"].append(
                    {
                        "backend": "in-process",
                        "batch": batch,
                        "examples_per_s": base_rate,
                        "ratio": 1.0,
                    }
                )
                for name, client in clients.items():
                    timed_check(
                        client.predict_fn(),
                        {k: v[:64] for k, v in inputs.items()},
                        {k: v[:64] for k, v in reference.items()},
                        batch,
                    )  # warm-up
                    rate = timed_check(client.predict_fn(), inputs, reference, batch)
                    results["throughput"].append(
                        {
                            "backend": name,
                            "batch": batch,
                            "examples_per_s": rate,
                            "ratio": rate / base_rate,
                        }
                    )

            row = {k: v[:1] for k, v in inputs.items()}
            for name, client in clients.items():
                for _ in range(200):  # warm-up
                    client.predict(row)
                samples = [(0, proc_status(proc.pid), proc_status())]
                t0 = time.perf_counter()
                for i in range(1, args.requests + 1):
                    client.predict(row)
                    if i % 1000 == 0 or i == args.requests:
                        samples.append((i, proc_status(proc.pid), proc_status()))
                elapsed = time.perf_counter() - t0
                results["memory"].append(
                    {
                        "transport": name,
                        "requests_per_s": args.requests / elapsed,
                        "server_rss_mib": [s[1] for s in samples],
                        "client_rss_mib": [s[2] for s in samples],
                        "at": [s[0] for s in samples],
                    }
                )
            for c in clients.values():
                c.close()
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    print(f"\nCheck throughput, {args.examples} examples, one order, vs the in-process check:\n")
    print("| backend | batch | examples/s | ratio vs in-process |")
    print("|---|---|---|---|")
    for r in results["throughput"]:
        print(f"| {r['backend']} | {r['batch']} | {r['examples_per_s']:.0f} | {r['ratio']:.2f} |")
    print(f"\nMemory over {args.requests} single-row requests per transport (RSS, MiB):\n")
    print(
        "| transport | requests/s | server RSS after warm-up | server RSS at end | growth "
        "| client RSS growth |"
    )
    print("|---|---|---|---|---|---|")
    for m in results["memory"]:
        s, c = m["server_rss_mib"], m["client_rss_mib"]
        print(
            f"| {m['transport']} | {m['requests_per_s']:.0f} | {s[0]:.1f} | {s[-1]:.1f} "
            f"| {s[-1] - s[0]:+.1f} | {c[-1] - c[0]:+.1f} |"
        )
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
