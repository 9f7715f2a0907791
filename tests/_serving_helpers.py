"""Shared by the serving tests: TF Serving's fixtures and two small Keras BN exports."""

from __future__ import annotations

import os
import shutil

import numpy as np

TESTDATA = os.environ.get(
    "TFS_TESTDATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "tfs_testdata")
)
TESTDATA = os.path.abspath(TESTDATA)
HALF_PLUS_TWO = os.path.join(TESTDATA, "saved_model_half_plus_two_cpu")
HALF_PLUS_TWO_TF2 = os.path.join(TESTDATA, "saved_model_half_plus_two_tf2_cpu")
HALF_PLUS_THREE = os.path.join(TESTDATA, "saved_model_half_plus_three")
TWO_VERSIONS = os.path.join(TESTDATA, "saved_model_half_plus_two_2_versions")
BAD = os.path.join(TESTDATA, "bad_half_plus_two")
MATRIX = os.path.join(TESTDATA, "_batching_testdata", "matrix_half_plus_two")

INPUT, OUTPUT = "features", "output_0"


def export_bn_models(root: str) -> dict[str, str]:
    """Export one small Dense-BN-Dense model twice, as TF Serving base paths:
    `frozen` (model.export(): inference mode) and `training` (ExportArchive endpoint calling
    the model with training=True: BN uses the statistics of whatever batch it gets)."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    inp = keras.Input((4,), name=INPUT)
    x = keras.layers.Dense(8)(inp)
    x = keras.layers.BatchNormalization()(x)
    model = keras.Model(inp, keras.layers.Dense(2)(x))
    # Non-trivial running statistics, so inference mode is not the identity.
    bn = model.layers[2]
    bn.moving_mean.assign(np.linspace(-0.5, 0.5, 8).astype("float32"))
    bn.moving_variance.assign(np.linspace(0.5, 2.0, 8).astype("float32"))

    paths = {"frozen": os.path.join(root, "frozen"), "training": os.path.join(root, "training")}
    model.export(os.path.join(paths["frozen"], "1"), verbose=False)
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serving_default",
        lambda x: model(x, training=True),
        input_signature=[tf.TensorSpec((None, 4), tf.float32, name=INPUT)],
    )
    archive.write_out(os.path.join(paths["training"], "1"), verbose=False)
    paths["model"] = model
    return paths


def examples(n: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    return {INPUT: np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32)}


def copy_version(src_version_dir: str, base_path: str, version: int) -> str:
    """Copy a version directory in atomically (copy aside, then rename), as exporters should."""
    os.makedirs(base_path, exist_ok=True)
    tmp = os.path.join(base_path, f".tmp-{version}")
    shutil.copytree(src_version_dir, tmp)
    final = os.path.join(base_path, str(version))
    os.rename(tmp, final)
    return final
