"""Export, serve, check: a trained model behind a TF-Serving-protocol server answers independently of the batch.

1. Train a small CNN on scikit-learn's digits for a few epochs.
2. `tfbn.export_saved_model`: BN folded into the convolutions, written as
   `<out>/models/digits/1/` (TF Serving's layout) only after the gate (parity with
   Keras, batch-size invariance, training-mode lint) passed, with a golden file.
3. Serve it with `serving.server.DevServer` on 127.0.0.1 (free ports, gRPC and
   REST) with server-side batching on, exactly as tensorflow_model_server would.
4. `serving.invariance.run_check` over REST and over gRPC: the golden examples in
   batches of 1, 2, 3, 7 and all, in several orders, and as concurrent single-row
   requests the server batches together; every answer must match the golden one.

It also writes `digits.keras`, `samples.npy` and `batching.config` and prints the
`tfbn export` / `tfbn serve` / `tfbn check` command lines that do the same from a
shell (examples/tf_serving_docker.md runs the check against TF Serving itself).

    python examples/export_serve_check.py [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from tfbn.serving._config import BatchingParameters, ModelConfig, load_batching_parameters  # noqa: E402
from tfbn.serving.invariance import run_check  # noqa: E402
from tfbn.serving.server import DevServer  # noqa: E402

import tfbn  # noqa: E402

# Server-side batching: up to 64 rows per batch, waiting up to 20 ms for requests to
# join, padded to one of the allowed sizes. The same as a TF Serving batching file:
BATCHING_CONFIG = """\
max_batch_size { value: 64 }
batch_timeout_micros { value: 20000 }
max_enqueued_batches { value: 100 }
num_batch_threads { value: 2 }
allowed_batch_sizes: [8, 16, 32, 64]
"""
BATCHING = BatchingParameters(
    max_batch_size=64,
    batch_timeout_micros=20_000,
    max_enqueued_batches=100,
    num_batch_threads=2,
    allowed_batch_sizes=(8, 16, 32, 64),
)


def build_cnn() -> keras.Model:
    inputs = keras.Input((8, 8, 1), name="image")
    x = inputs
    for i, filters in enumerate((16, 32), start=1):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = tfbn.BatchNormalization(momentum=0.9, name=f"bn{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(10, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="digits_cnn")


def cli_commands(out: Path) -> list[str]:
    """The shell equivalent of steps 2-4, exporting to `<out>/cli/digits` (run from any directory)."""
    q = lambda p: shlex.quote(str(p))  # noqa: E731
    base = out / "cli" / "digits"
    golden = f"--golden {q(base / '1')}"
    return [
        f"tfbn export {q(out / 'digits.keras')} {q(base)} --samples {q(out / 'samples.npy')}",
        f"tfbn serve --port 8500 --rest_api_port 8501 --model_name digits --model_base_path {q(base)} "
        f"--enable_batching --batching_parameters_file {q(out / 'batching.config')}",
        f"tfbn check --rest http://127.0.0.1:8501 --model_name digits {golden} --concurrent",
        f"tfbn check --grpc 127.0.0.1:8500 --model_name digits {golden} --concurrent",
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="folder for the model files (default: a temp dir)")
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="tfbn-export-"))
    for old in ("models", "cli"):
        shutil.rmtree(out / old, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)

    # 1. Train.
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    x = (digits.images[order] / 16.0).astype("float32")[..., None]
    y = digits.target[order]
    keras.utils.set_random_seed(0)
    model = build_cnn()
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    model.fit(x[:1500], y[:1500], batch_size=64, epochs=args.epochs, verbose=0)
    accuracy = float(np.mean(np.argmax(model.predict(x[1500:], verbose=0), -1) == y[1500:]))
    print(f"trained {args.epochs} epochs: held-out accuracy {accuracy:.3f}")
    assert accuracy > 0.8, accuracy

    # 2. Export (real digits as the gate's samples and the golden examples).
    samples = x[1500:1564]
    result = tfbn.export_saved_model(model, out / "models" / "digits", sample_inputs=samples)
    print(result.format())
    assert result.version == 1 and result.gate.ok and len(result.fold_report.folded) == 2
    model.save(out / "digits.keras")  # for the command lines below
    np.save(out / "samples.npy", samples)
    (out / "batching.config").write_text(BATCHING_CONFIG)
    assert load_batching_parameters(out / "batching.config") == BATCHING

    # 3. Serve, 4. check over both transports; the server stops when the block ends.
    with DevServer(
        [ModelConfig("digits", str(out / "models" / "digits"))],
        port=0,
        rest_api_port=0,
        batching=BATCHING,
        file_system_poll_wait_seconds=0,
    ) as server:
        print(f"serving on REST {server.rest_url} and gRPC {server.grpc_target}, batching on")
        reports = {
            "REST": run_check(
                rest=server.rest_url,
                model_name="digits",
                golden=result.path,
                concurrent=True,
                timeout=30.0,
            ),
            "gRPC": run_check(
                grpc=server.grpc_target,
                model_name="digits",
                golden=result.path,
                concurrent=True,
                timeout=30.0,
            ),
        }
    for transport, report in reports.items():
        print(f"\nbatch-size invariance over {transport}: {'PASS' if report.passed else 'FAIL'}")
        print(report.format())
        assert report.passed and report.reference == "golden", transport
        assert any(r.mode == "concurrent" for r in report.rows)

    print("\nThe same from a shell:")
    for command in cli_commands(out):
        print(f"  {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
