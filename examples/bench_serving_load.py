"""Load benchmark: many simultaneous single-row requests against `tfbn serve`, every answer checked.

Starts `tfbn serve` in a subprocess (REST and gRPC on 127.0.0.1) on a small frozen
Dense-BatchNorm-Dense export (or --model), then:

1. sends --concurrent single-row REST requests at once (one connection each), and as many
   gRPC requests at once (one channel, all in flight together); every answer is compared
   with the in-process prediction for its row; reports p50/p99 latency, wall time and the
   server's peak resident set size (VmHWM);
2. sends --soak single-row requests per transport, --soak_concurrency at a time, and
   reports the server's RSS after every 1,000 (flat = no leak).

    .venv/bin/python examples/bench_serving_load.py                       # 1,000 + 10,000
    .venv/bin/python examples/bench_serving_load.py --concurrent 100 --soak 500 --json out.json

Loopback only; every loop is bounded and the server is stopped at the end. Latencies
depend on the machine (2 cores here, shared): compare transports within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import tempfile
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

# Run as a script, so its folder is on sys.path: the model, the server start and
# the /proc reader are bench_serving.py's.
from bench_serving import NAME, export_model, proc_status, start_server  # noqa: E402


def percentiles(latencies: list[float]) -> dict:
    arr = np.asarray(latencies) * 1000
    return {
        "p50_ms": float(np.percentile(arr, 50)),
        "p99_ms": float(np.percentile(arr, 99)),
        "max_ms": float(arr.max()),
    }


# --- REST: one aiohttp client session, N simultaneous connections ------------------------


async def _rest_burst(
    url: str, rows: np.ndarray, expected: np.ndarray, in_flight: int, timeout: float
) -> list[float]:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=in_flight, force_close=False)
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    latencies = [0.0] * len(rows)
    sem = asyncio.Semaphore(in_flight)
    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:

        async def one(i: int):
            body = json.dumps({"instances": [{"features": rows[i].tolist()}]})
            async with sem:
                t0 = time.perf_counter()
                async with session.post(
                    f"{url}/v1/models/{NAME}:predict",
                    data=body,
                    headers={"Content-Type": "application/json"},
                ) as resp:
                    text = await resp.text()
                latencies[i] = time.perf_counter() - t0
            if resp.status != 200:
                raise AssertionError(f"REST request {i}: HTTP {resp.status}: {text[:200]}")
            got = np.asarray(json.loads(text)["predictions"][0], np.float32)
            np.testing.assert_allclose(
                got, expected[i], rtol=1e-5, atol=1e-5, err_msg=f"REST request {i}"
            )

        await asyncio.gather(*(one(i) for i in range(len(rows))))
    return latencies


def rest_burst(url, rows, expected, in_flight, timeout=300.0) -> list[float]:
    return asyncio.run(_rest_burst(url, rows, expected, in_flight, timeout))


# --- gRPC: one channel, all requests in flight together -----------------------------------


def grpc_burst(
    target: str, rows: np.ndarray, expected: np.ndarray, in_flight: int, timeout: float = 300.0
) -> list[float]:
    import grpc
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
    from tfbn.serving import _tensor

    latencies = [0.0] * len(rows)
    errors: list[str] = []
    sem = threading.BoundedSemaphore(in_flight)
    done = threading.Semaphore(0)
    with grpc.insecure_channel(target, options=[("grpc.max_concurrent_streams", 0)]) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for i in range(len(rows)):
            req = predict_pb2.PredictRequest()
            req.model_spec.name = NAME
            req.inputs["features"].CopyFrom(_tensor.to_tensor_proto(rows[i : i + 1]))
            sem.acquire()
            t0 = time.perf_counter()
            fut = stub.Predict.future(req, timeout=timeout)

            def finished(f, i=i, t0=t0):
                try:
                    latencies[i] = time.perf_counter() - t0
                    out = _tensor.from_tensor_proto(f.result().outputs["output_0"])[0]
                    if not np.allclose(out, expected[i], rtol=1e-5, atol=1e-5):
                        errors.append(f"gRPC request {i}: {out} != {expected[i]}")
                except Exception as err:  # noqa: BLE001 - reported below
                    errors.append(f"gRPC request {i}: {err!r}")
                finally:
                    sem.release()
                    done.release()

            fut.add_done_callback(finished)
        for _ in range(len(rows)):
            if not done.acquire(timeout=timeout):
                raise TimeoutError("gRPC answers did not all arrive")
    if errors:
        raise AssertionError(f"{len(errors)} wrong gRPC answers, first: {errors[0]}")
    return latencies


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        help="a SavedModel base path with a `features` [None,16] input "
        "(default: export a small BN model)",
    )
    p.add_argument(
        "--concurrent", type=int, default=1000, help="simultaneous requests per transport"
    )
    p.add_argument(
        "--soak", type=int, default=10_000, help="requests per transport for the RSS soak"
    )
    p.add_argument("--soak_concurrency", type=int, default=50)
    p.add_argument("--json", dest="json_path")
    args = p.parse_args(argv)

    from tfbn.serving.invariance import saved_model_predictor

    results: dict = {"concurrent": args.concurrent, "soak": args.soak, "bursts": [], "soak_rss": []}
    with tempfile.TemporaryDirectory() as tmp:
        base = args.model or export_model(tmp)
        local, _ = saved_model_predictor(base)
        rng = np.random.default_rng(0)
        n = max(args.concurrent, args.soak)
        rows = rng.standard_normal((n, 16)).astype(np.float32)
        expected = np.concatenate(
            [local({"features": rows[i : i + 256]})["output_0"] for i in range(0, n, 256)]
        )

        proc, grpc_target, rest_url = start_server(base)
        try:
            rest_burst(rest_url, rows[:50], expected[:50], 50)  # warm-up
            grpc_burst(grpc_target, rows[:50], expected[:50], 50)
            results["server_rss_after_warmup_mib"] = proc_status(proc.pid, "VmRSS")
            print(f"server RSS after warm-up: {results['server_rss_after_warmup_mib']:.0f} MiB")
            print(
                f"\n{args.concurrent} simultaneous single-row requests per transport, all checked:\n"
            )
            print(
                "| transport | wall s | requests/s | p50 ms | p99 ms | max ms | server peak RSS MiB |"
            )
            print("|---|---:|---:|---:|---:|---:|---:|")
            for transport, burst, target in (
                ("rest", rest_burst, rest_url),
                ("grpc", grpc_burst, grpc_target),
            ):
                t0 = time.perf_counter()
                lat = burst(
                    target, rows[: args.concurrent], expected[: args.concurrent], args.concurrent
                )
                wall = time.perf_counter() - t0
                row = {
                    "transport": transport,
                    "wall_s": wall,
                    "requests_per_s": args.concurrent / wall,
                    **percentiles(lat),
                    "server_peak_rss_mib": proc_status(proc.pid, "VmHWM"),
                }
                results["bursts"].append(row)
                print(
                    f"| {transport} | {wall:.1f} | {row['requests_per_s']:.0f} | {row['p50_ms']:.0f} | "
                    f"{row['p99_ms']:.0f} | {row['max_ms']:.0f} | {row['server_peak_rss_mib']:.0f} |"
                )

            print(
                f"\nserver RSS (MiB) over {args.soak} requests per transport, "
                f"{args.soak_concurrency} in flight:\n"
            )
            print(
                "| transport | "
                + " | ".join(f"after {k}" for k in range(0, args.soak + 1, 1000) if k)
                + " |"
            )
            print("|---|" + "---:|" * len(range(0, args.soak, 1000)))
            for transport, burst, target in (
                ("rest", rest_burst, rest_url),
                ("grpc", grpc_burst, grpc_target),
            ):
                samples = []
                for start in range(0, args.soak, 1000):
                    stop = min(start + 1000, args.soak)
                    burst(target, rows[start:stop], expected[start:stop], args.soak_concurrency)
                    samples.append(proc_status(proc.pid, "VmRSS"))
                results["soak_rss"].append({"transport": transport, "rss_mib": samples})
                print(f"| {transport} | " + " | ".join(f"{s:.0f}" for s in samples) + " |")
            results["server_peak_rss_mib"] = proc_status(proc.pid, "VmHWM")
            print(f"\nserver peak RSS (VmHWM): {results['server_peak_rss_mib']:.0f} MiB")
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
