"""Benchmark: decoding REST predict bodies into tensors, time and peak memory per choice.

Builds bodies of about --mb megabytes in three layouts (columnar matrix, row matrix, one
number per row) and decodes each with:

- `stdlib+numpy`: the standard library's C JSON decoder, then one NumPy call per tensor
  (what the development server does: `tfbn.serving._json_tensor.parse_predict_json`);
- `orjson+numpy`: the same with orjson's decoder, when orjson is installed;
- `per-element`: the standard library decoder, then TF Serving's element-by-element walk
  (the server's path for values NumPy cannot take as they are, and its only path before).

Peak memory is the tracemalloc peak (Python objects and NumPy buffers) over the body
size. Times are the best of --repeat runs; on a shared machine compare the rows of one
run with each other, not with another machine.

    .venv/bin/python examples/bench_json_decode.py            # ~10 MB bodies
    .venv/bin/python examples/bench_json_decode.py --mb 2 --repeat 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
import tracemalloc

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402


def bodies(mb: float) -> dict[str, bytes]:
    """Bodies of about `mb` MB: (layout name -> JSON bytes)."""
    rng = np.random.default_rng(0)
    target = int(mb * 1e6)
    out = {}
    rows = max(1, target // (32 * 21))  # a full-precision float32 is ~21 characters with ", "
    matrix = rng.standard_normal((rows, 32)).astype(np.float32)
    out["columnar [N,32]"] = json.dumps({"inputs": matrix.tolist()}).encode()
    out["row [N,32]"] = json.dumps({"instances": matrix.tolist()}).encode()
    scalars = rng.standard_normal(max(1, target // 8)).round(3)  # short numbers: "-0.123, "
    out["row [N] (one number per row)"] = json.dumps({"instances": scalars.tolist()}).encode()
    return out


def _infos():
    from tensorflow.core.framework import types_pb2
    from tensorflow.core.protobuf import meta_graph_pb2

    return {"x": meta_graph_pb2.TensorInfo(dtype=types_pb2.DT_FLOAT)}


def decoders() -> dict:
    from tfbn.serving import _json_tensor

    infos = _infos()

    def server(body):
        return _json_tensor.parse_predict_json(body, lambda sig: infos)[1]["x"]

    def per_element(body):
        from tensorflow.core.framework import types_pb2

        doc = json.loads(body)
        value = doc.get("inputs", doc.get("instances"))
        if "instances" in doc:
            return np.stack(
                [_json_tensor.json_tensor(v, types_pb2.DT_FLOAT, fast=False) for v in value]
            )
        return _json_tensor.json_tensor(value, types_pb2.DT_FLOAT, fast=False)

    out = {"stdlib+numpy (server)": server}
    try:
        import orjson

        def with_orjson(body):
            doc = orjson.loads(body)
            return np.asarray(doc.get("inputs", doc.get("instances")), dtype=np.float32)

        out["orjson+numpy"] = with_orjson
    except ImportError:
        print("orjson is not installed: its row is left out (pip install orjson to compare)")
    out["per-element walk"] = per_element
    return out


def measure(fn, body: bytes, repeat: int) -> tuple[float, float, np.ndarray]:
    tracemalloc.start()
    result = fn(body)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(body)
        best = min(best, time.perf_counter() - t0)
    return best, peak / len(body), result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=10.0, help="body size in MB (default 10)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per row (best is kept)")
    p.add_argument("--json", dest="json_path", help="also write the rows as JSON here")
    args = p.parse_args(argv)

    rows = []
    print("| layout | body MB | decoder | seconds | peak memory / body |")
    print("|---|---:|---|---:|---:|")
    for layout, body in bodies(args.mb).items():
        expected = None
        for name, fn in decoders().items():
            seconds, ratio, result = measure(fn, body, args.repeat)
            if expected is None:
                expected = result
            np.testing.assert_array_equal(result, expected)  # every decoder agrees
            rows.append(
                {
                    "layout": layout,
                    "body_bytes": len(body),
                    "decoder": name,
                    "seconds": seconds,
                    "peak_over_body": ratio,
                }
            )
            print(f"| {layout} | {len(body) / 1e6:.1f} | {name} | {seconds:.2f} | {ratio:.1f}x |")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
