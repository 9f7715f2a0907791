"""tfbn demo: from synchronised training to a batch-size-invariant TF Serving deployment.

Run with `make demo` (about 1-2 minutes on 2 CPU cores). Steps:

1. Train a CNN on scikit-learn's 8x8 digits with tfbn's synchronised BatchNorm under
   MirroredStrategy: 4 replicas (logical CPU devices here; GPUs where present), so
   every replica normalises with the statistics of the global batch.
2. Export it for TF Serving with `tfbn.export_saved_model`: BN folded into the
   convolutions, gated (parity, batch-size invariance, training-mode lint), with a
   golden file. Export the same model a second time the way the classic bug does it,
   with BN left in training mode (`keras.export.ExportArchive`, `training=True`).
3. Serve both with tfbn's TF-Serving-protocol development server on 127.0.0.1 with
   server-side batching on, and run the batch-size invariance check over REST and
   gRPC, sending concurrent single-row requests that the server batches together.
4. Print the verdicts: the frozen export PASSES, the training-mode export FAILS (and
   `tfbn.lint_saved_model` flags it). Plots and JSON go to `reports/demo/`.

Exit code 0 when all of that came out as it should.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

REPLICAS = 4


def use_replicas(n: int = REPLICAS) -> list[str]:
    """GPUs when there are at least `n`; otherwise split the CPU into `n` logical devices."""
    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) >= n:
        return [f"/gpu:{i}" for i in range(n)]
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * n
        )
    except RuntimeError:  # already initialised (e.g. inside the test suite)
        pass
    logical = tf.config.list_logical_devices("CPU")
    if len(logical) < n:
        raise RuntimeError(f"need {n} devices for {n} replicas, found {len(logical)} logical CPUs")
    return [f"/cpu:{i}" for i in range(n)]


import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from tfbn.serving._config import BatchingParameters, ModelConfig  # noqa: E402
from tfbn.serving.invariance import run_check  # noqa: E402
from tfbn.serving.server import DevServer  # noqa: E402

import tfbn  # noqa: E402

# TF Serving batching parameters for the dev server: up to 64 rows per batch (the
# check's largest request), waiting up to 20 ms for requests to join, padded to
# 8, 16, 32 or 64 rows with copies of a real row, as TF Serving pads.
BATCHING = BatchingParameters(
    max_batch_size=64, batch_timeout_micros=20_000, allowed_batch_sizes=(8, 16, 32, 64)
)


def load_data(seed: int = 0):
    """Digits as (N, 8, 8, 1) float32 in [0, 1], split 80/20, stratified."""
    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    return train_test_split(
        x, digits.target, test_size=0.2, random_state=seed, stratify=digits.target
    )


def build_cnn(**bn_kwargs) -> keras.Model:
    """Conv-BN-ReLU x2 (bias-free convolutions: BN's beta is the bias), pooling, softmax.

    BN uses momentum 0.9 unless told otherwise: the demo trains for a few hundred
    steps, and with Keras's default 0.99 the moving statistics would still hold
    ~10% of their initial values, for Keras's own layer alike.
    """
    bn_kwargs.setdefault("momentum", 0.9)

    def block(x, filters, name):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
        x = tfbn.BatchNormalization(name=f"{name}_bn", **bn_kwargs)(x)
        return keras.layers.ReLU(name=f"{name}_relu")(x)

    inputs = keras.Input((8, 8, 1), name="image")
    x = block(inputs, 32, "block1")
    x = keras.layers.MaxPooling2D()(x)
    x = block(x, 64, "block2")
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(10, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="digits_cnn")


def train(strategy, data, epochs: int, per_replica_batch: int, seed: int, verbose: int):
    x_train, x_test, y_train, y_test = data
    keras.utils.set_random_seed(seed)
    with strategy.scope():
        model = build_cnn(synchronized=True)
        model.compile(
            optimizer=keras.optimizers.Adam(3e-3),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
    global_batch = per_replica_batch * strategy.num_replicas_in_sync
    history = model.fit(
        x_train,
        y_train,
        epochs=epochs,
        batch_size=global_batch,
        validation_data=(x_test, y_test),
        verbose=verbose,
    )
    return model, history.history


def export_training_mode(model: keras.Model, path: Path) -> None:
    """The bug tfbn exists to kill: a served graph whose BN uses batch statistics."""
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serving_default",
        lambda image: {"probabilities": model(image, training=True)},
        input_signature=[tf.TensorSpec([None, 8, 8, 1], tf.float32, name="image")],
    )
    archive.write_out(str(path), verbose=False)


def check_all(server: DevServer, golden_dir: Path) -> dict:
    """The invariance check for both models over both transports; reports by name."""
    reports = {}
    for model_name in ("digits", "digits_training_mode"):
        for transport in ("rest", "grpc"):
            address = server.rest_url if transport == "rest" else server.grpc_target
            reports[f"{model_name} {transport}"] = run_check(
                **{transport: address},
                model_name=model_name,
                golden=str(golden_dir),
                concurrent=True,
                timeout=30.0,
            )
    return reports


FLOOR = 1e-9  # deviations of exactly 0 are drawn here on the log axis


SHIFT_CONTRAST = 0.4  # a new camera: every pixel at 40% of its contrast


def drift_loop(server: DevServer, keras_path: str, base_path: Path, x_shifted, y) -> dict:
    """Shifted traffic against the served model: accuracy and `tfbn drift` over REST and
    gRPC; then the loop closes (`redeploy_if_drifted`: recalibrate on the unlabelled
    traffic, export the next version, wait until it serves) and the same is measured again."""
    from tfbn.serving.client import GrpcClient, RestClient
    from tfbn.serving.drift import ClientProbe, measure_drift, redeploy_if_drifted

    traffic = {"image": x_shifted}

    def served(version=None) -> dict:
        result = {}
        for kind, client in (
            ("rest", RestClient(server.rest_url, "digits", version=version)),
            ("grpc", GrpcClient(server.grpc_target, "digits", version=version)),
        ):
            with client:
                report = measure_drift(ClientProbe(client), traffic)
                result[kind] = {"drift": bool(report.drift), "score": float(report.score)}
                if kind == "grpc":
                    probs = np.concatenate(
                        [  # requests within the batching limit
                            next(iter(client.predict({"image": x_shifted[i : i + 64]}).values()))
                            for i in range(0, len(x_shifted), 64)
                        ]
                    )
                    result["accuracy"] = float(np.mean(np.argmax(probs, -1) == y))
                    result["version"] = client.metadata().version
        return result

    before = served()
    redeployed = redeploy_if_drifted(
        keras_path, str(base_path), traffic, address=server.rest_url, model_name="digits"
    )
    after = served(redeployed.new_version)
    return {"before": before, "after": after, "recalibrated_model": redeployed.recalibrated_model}


def plot(history: dict, reports: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    paths = []
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, ax, ylabel in (
        ("loss", ax1, "cross-entropy loss (nats per example)"),
        ("accuracy", ax2, "accuracy (fraction of examples correct)"),
    ):
        epochs = range(1, len(history[key]) + 1)
        ax.plot(epochs, history[key], "o-", label=f"training {key}")
        ax.plot(epochs, history[f"val_{key}"], "s--", label=f"test {key}")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    ax2.set_ylim(top=1.0)
    fig.suptitle(f"digits CNN, synchronised BN over {REPLICAS} replicas")
    fig.tight_layout()
    paths.append(out / "training.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # One point per run of the check; REST and gRPC side by side (they often coincide).
    fig, ax = plt.subplots(figsize=(11, 4.8))
    styles = {"rest": ("o", "-", -0.12), "grpc": ("x", ":", 0.12)}
    rows = next(iter(reports.values())).rows
    rtol = next(iter(reports.values())).rtol
    for name, report in reports.items():
        model_name, transport = name.rsplit(" ", 1)
        marker, line, shift = styles[transport]
        color = "tab:green" if model_name == "digits" else "tab:red"
        label = "frozen + folded export" if model_name == "digits" else "BN in training mode"
        ax.plot(
            [i + shift for i in range(len(report.rows))],
            [max(r.max_rel, FLOOR) for r in report.rows],
            marker=marker,
            linestyle=line,
            color=color,
            label=f"{label}, {dict(rest='REST', grpc='gRPC')[transport]}",
        )
    ax.axhline(
        rtol, color="black", linewidth=1, linestyle="--", label=f"tolerance (rtol {rtol:.0e})"
    )
    ticks = [
        (
            "concurrent\n1-row"
            if r.mode == "concurrent"
            else f"batch {r.batch_size}" + (f"\norder {r.order}" if r.order else "")
        )
        for r in rows
    ]
    ax.set_xticks(range(len(ticks)), ticks, fontsize=7)
    ax.set_xlabel(
        "run of the check: rows per request, and the order (0 = natural, "
        "k = k-th shuffle) or concurrent single-row requests"
    )
    ax.set_yscale("log")
    ax.set_ylim(FLOOR / 3, 10)
    ax.set_ylabel("max |prediction - golden| / max |golden|\n(exact match drawn at 1e-9)")
    ax.set_title("Does the answer depend on the batch? Frozen export vs BN left in training mode")
    ax.grid(alpha=0.3, which="major")
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    paths.append(out / "invariance.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--per-replica-batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="reports/demo", help="folder for models, plots, JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    out = Path(args.out)
    shutil.rmtree(out / "models", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    devices = use_replicas()
    strategy = tf.distribute.MirroredStrategy(devices)
    data = load_data(args.seed)
    print(
        f"[1/5] training on {strategy.num_replicas_in_sync} replicas ({', '.join(devices)}), "
        f"synchronised BN, global batch {args.per_replica_batch * strategy.num_replicas_in_sync}"
    )
    model, history = train(
        strategy,
        data,
        args.epochs,
        args.per_replica_batch,
        args.seed,
        verbose=0 if args.quiet else 1,
    )
    x_test, y_test = data[1], data[3]
    accuracy = float(np.mean(np.argmax(model.predict(x_test, verbose=0), -1) == y_test))

    keras_path = out / "models" / "digits.keras"
    keras_path.parent.mkdir(parents=True, exist_ok=True)
    model.save(keras_path)
    print("[2/5] exporting: frozen + folded (gated), and a training-mode export for contrast")
    frozen = tfbn.export_saved_model(model, out / "models" / "digits", sample_inputs=x_test[:64])
    leaky_dir = out / "models" / "digits_training_mode" / "1"
    export_training_mode(model, leaky_dir)
    lint_frozen = tfbn.lint_saved_model(str(frozen.path))
    lint_leaky = tfbn.lint_saved_model(str(leaky_dir))

    print(
        "[3/5] serving both on 127.0.0.1 with server-side batching "
        f"(max_batch_size={BATCHING.max_batch_size}, allowed {list(BATCHING.allowed_batch_sizes)})"
    )
    models = [
        ModelConfig(name, str(out / "models" / name)) for name in ("digits", "digits_training_mode")
    ]
    # Polled every 0.5 s, so the recalibrated version of step 5 is picked up as TF Serving would.
    with DevServer(models, batching=BATCHING, file_system_poll_wait_seconds=0.5) as server:
        print(f"      REST {server.rest_url}   gRPC {server.grpc_target}")
        print(
            "[4/5] batch-size invariance check (batches of 1, 2, 3, 7, all; concurrent single rows)"
        )
        reports = check_all(server, frozen.path)
        print(
            f"[5/5] drift: traffic shifts (contrast x{SHIFT_CONTRAST}); tfbn drift over REST and "
            "gRPC -> recalibrate -> new version -> drift again"
        )
        drift = drift_loop(
            server, str(keras_path), out / "models" / "digits", x_test * SHIFT_CONTRAST, y_test
        )

    seconds = time.perf_counter() - started
    plots = plot(history, reports, out)
    frozen_ok = all(r.passed for k, r in reports.items() if k.startswith("digits "))
    leaky_caught = not any(r.passed for k, r in reports.items() if "training_mode" in k)
    drift_ok = (
        drift["before"]["rest"]["drift"]
        and drift["before"]["grpc"]["drift"]
        and not drift["after"]["rest"]["drift"]
        and not drift["after"]["grpc"]["drift"]
        and drift["after"]["accuracy"] > drift["before"]["accuracy"]
    )
    ok = (
        frozen_ok
        and leaky_caught
        and lint_frozen.ok
        and not lint_leaky.ok
        and accuracy > 0.9
        and drift_ok
    )

    rows = [
        ("replicas in sync", strategy.num_replicas_in_sync),
        ("test accuracy", f"{accuracy:.4f}"),
        ("export", str(frozen.path)),
        ("lint, frozen export", f"{len(lint_frozen.findings)} findings"),
        ("lint, training-mode export", f"{len(lint_leaky.findings)} findings"),
    ]
    for name, report in reports.items():
        worst = max(r.max_abs for r in report.rows)
        rows.append(
            (f"check {name}", f"{'PASS' if report.passed else 'FAIL'} (max dev {worst:.2g})")
        )
    for when in ("before", "after"):
        d = drift[when]
        rows.append(
            (
                f"shifted traffic, {when} recalibration",
                f"version {d['version']}: accuracy {d['accuracy']:.4f}, drift "
                f"{'DRIFT' if d['rest']['drift'] else 'OK'} (REST score {d['rest']['score']:.2f}), "
                f"{'DRIFT' if d['grpc']['drift'] else 'OK'} (gRPC score {d['grpc']['score']:.2f})",
            )
        )
    rows += [
        ("plots", ", ".join(str(p) for p in plots)),
        ("total time", f"{seconds:.0f} s"),
        ("demo verdict", "OK" if ok else "UNEXPECTED"),
    ]
    width = max(len(k) for k, _ in rows) + 2
    print()
    print("\n".join(f"{k:<{width}}{v}" for k, v in rows))
    (out / "demo.json").write_text(
        json.dumps(
            {
                "accuracy": accuracy,
                "ok": ok,
                "seconds": seconds,
                "checks": {k: r.to_dict() for k, r in reports.items()},
                "drift": drift,
                "lint": {"frozen": lint_frozen.to_dict(), "training_mode": lint_leaky.to_dict()},
            },
            indent=2,
        )
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
