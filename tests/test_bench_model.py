"""`tfbn bench --model` (whole-model training steps) and the fused="auto" size rule
the layer benchmark motivated."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfbn
from tfbn import bench
from tfbn.layers import batch_norm


def _ops(layer, shape, training):
    x = tf.zeros(shape)
    layer.build(shape)
    fn = tf.function(lambda x: layer(x, training=training))
    return {node.op for node in fn.get_concrete_function(x).graph.as_graph_def().node}


@pytest.mark.parametrize("shape", [(256, 64), (32, 128), (32, 8, 8, 32)])
def test_auto_trains_small_inputs_on_the_unfused_path(shape):
    assert np.prod(shape) < batch_norm.FUSED_AUTO_MIN_ELEMENTS
    assert "FusedBatchNormV3" not in _ops(tfbn.BatchNormalization(), shape, True)
    assert "FusedBatchNormV3" in _ops(tfbn.BatchNormalization(fused=True), shape, True)


def test_auto_trains_large_inputs_on_the_fused_path_and_infers_with_one_affine():
    shape = (16, 14, 14, 128)
    assert "FusedBatchNormV3" in _ops(tfbn.BatchNormalization(), shape, True)
    assert "FusedBatchNormV3" not in _ops(tfbn.BatchNormalization(), shape, False)
    assert "FusedBatchNormV3" in _ops(tfbn.BatchNormalization(fused=True), shape, False)


def test_small_inputs_give_the_same_numbers_on_both_paths():
    rng = np.random.default_rng(0)
    x = rng.normal(3, 2, (256, 64)).astype("float32")
    auto, fused = tfbn.BatchNormalization(), tfbn.BatchNormalization(fused=True)
    np.testing.assert_allclose(auto(x, training=True), fused(x, training=True), atol=2e-5)
    np.testing.assert_allclose(auto.moving_variance, fused.moving_variance, atol=1e-6)
    np.testing.assert_allclose(auto(x, training=False), fused(x, training=False), atol=2e-5)


def test_default_grid_has_small_2d_and_4d_shapes():
    assert {(256, 64), (32, 128), (32, 8, 8, 64)} <= set(bench.DEFAULT_SHAPES)


def test_model_variants_replace_every_batch_norm():
    build, _ = bench._model_spec("mobilenetv2")
    model = build()
    n_bn = sum(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)
    assert n_bn > 20
    for variant, kind in (("tfbn", tfbn.BatchNormalization), ("passthrough", bench._PassThrough)):
        new = bench._variant(model, variant)
        assert sum(isinstance(layer, kind) for layer in new.layers) == n_bn
        assert not any(type(layer) is keras.layers.BatchNormalization for layer in new.layers)
    with pytest.raises(ValueError, match="Unknown bench model 'vgg'; accepted: resnet"):
        bench._model_spec("vgg")


@pytest.mark.slow
def test_model_bench_single_device_reports_bn_cost():
    result = bench.run_model_benchmark(("resnet",), batch=4, repeats=1, mirrored=False)
    (row,) = result["single"]
    assert row["model"] == "resnet"
    for key in ("keras_ms", "tfbn_ms", "passthrough_ms"):
        assert isinstance(row[key], float) and row[key] > 0, row
    assert {"step_keras_over_tfbn", "bn_cost_keras_over_tfbn", "bn_share_tfbn"} <= set(row)
    table = bench.format_model_tables(result)
    assert "| resnet |" in table and "BN cost Keras/tfbn" in table


def test_bench_shows_progress_on_stderr_when_asked(capsys, monkeypatch):
    """Issue 13.11: `tfbn bench` shows the shapes done on stderr (terminal only, --quiet off)."""
    from tfbn import bench, progress

    monkeypatch.setattr(progress, "DELAY", 0.0)
    bench.run_benchmark(shapes=[(8, 4)], repeats=1, progress=True)
    assert "tfbn bench" in capsys.readouterr().err
    bench.run_benchmark(shapes=[(8, 4)], repeats=1, progress=False)
    assert "tfbn bench" not in capsys.readouterr().err


@pytest.mark.slow
def test_profile_attributes_op_time_to_the_batch_norm_layers(tmp_path):
    """`tfbn bench --model NAME --profile`: per-op-type time of the BN layers' ops,
    from TensorFlow's profiler; tfbn's large BN inputs run the fused kernel, Keras's none."""
    result = bench.profile_model("resnet", batch=16, steps=1)  # 262k-element inputs
    keras_ops, tfbn_ops = (result["variants"][v] for v in ("keras", "tfbn"))
    for profile in (keras_ops, tfbn_ops):
        assert 0 < profile["bn_us"] < profile["all_us"]
        assert profile["bn_us"] == pytest.approx(sum(profile["ops"].values()))
    assert any("FusedBatchNorm" in kind for kind in tfbn_ops["ops"])
    assert not any("FusedBatchNorm" in kind for kind in keras_ops["ops"])
    table = bench.format_profile_table(result)
    assert "| all BN ops |" in table and "keras us/step | tfbn us/step" in table


def test_profile_needs_a_model():
    from tfbn import cli

    assert cli.main(["bench", "--profile"]) == 2


def test_timing_nothing_gives_nothing_and_fast_calls_get_more_rounds():
    """A model bench where every variant failed (all n/a) times nothing instead of
    crashing; sub-millisecond calls are repeated until timed long enough."""
    assert bench._interleaved_medians({}, repeats=5) == {}
    assert bench._fmt("n/a (InvalidArgumentError: Trying to access ...)", ".1f") == (
        "n/a (InvalidArgumentError)"  # the table names the error; the JSON keeps it whole
    )
    calls = {"a": 0, "b": 0}

    def count(name):
        calls[name] += 1

    medians = bench._interleaved_medians(
        {"a": lambda: count("a"), "b": lambda: count("b")}, repeats=3, warmup=0
    )
    assert set(medians) == {"a", "b"} and calls["a"] == calls["b"] > 3


def test_small_inputs_example_times_every_variant(capsys):
    """examples/bench_small_inputs.py: the README's breakdown of a small training step."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "bench_small_inputs.py"
    spec = importlib.util.spec_from_file_location("bench_small_inputs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    variant = module.NoUpdate()
    variant(np.ones((4, 3), "float32"), training=True)
    np.testing.assert_array_equal(variant.moving_mean, 0)  # the update really is off
    assert module.main(["--shape", "8,4", "--repeats", "2"]) == 0
    table = capsys.readouterr().out
    for name in module.VARIANTS:
        assert f"| (8, 4) | {name} |" in table


def test_xla_variants_example_computes_batch_norm_and_times_every_design(capsys):
    """examples/bench_xla_variants.py times designs the README compares with tfbn's:
    they must compute what tfbn computes for the comparison to mean anything."""
    import importlib.util
    from pathlib import Path

    from tfbn import stats

    path = Path(__file__).resolve().parent.parent / "examples" / "bench_xla_variants.py"
    spec = importlib.util.spec_from_file_location("bench_xla_variants", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    x = tf.random.stateless_normal((6, 3, 5), seed=(3, 4)) * 2.0 + 1.0
    upstream = tf.random.stateless_normal(x.shape, seed=(5, 6))
    results = []
    for layer in (module.XlaUnfused(), tfbn.BatchNormalization()):
        layer.build(x.shape)
        layer.gamma.assign(tf.linspace(0.5, 1.5, 5))
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x, training=True) * upstream)
        grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
        results.append([loss, *grads, layer.moving_mean, layer.moving_variance])
    for got, want in zip(*results):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    x4 = tf.random.stateless_normal((2, 3, 4, 5), seed=(7, 8)) + 3.0
    for got, want in zip(
        module._xla_moments(tf.reshape(x4, [-1, 5])), stats.fused_moments(x4, "NHWC")
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    fns = module._grad_sum_fns(x4)
    for got, want in zip(fns["xla one pass"](), fns["tfbn (fused grad kernel)"]()):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    shipped, tried = (
        tf.nest.flatten(step(), expand_composites=True)
        for step in module._sync_step_fns(x4).values()
    )
    for got, want in zip(tried, shipped):  # the step's input, gamma and beta gradients
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    args = ["--shape", "8,4", "--moment-shape", "2,3,3,4", "--repeats", "2"]
    assert module.main(args) == 0
    out = capsys.readouterr().out
    for row in ("| (8, 4) | keras |", "| (8, 4) | tfbn |", "| (8, 4) | xla unfused |"):
        assert row in out
    for row in ("tfbn (fused kernel)", "xla one pass", "tfbn (fused grad kernel)"):
        assert f"| (2, 3, 3, 4) | {row} |" in out
    assert out.count("| (2, 3, 3, 4) | xla one pass |") == 3  # moments, sums, sync step
