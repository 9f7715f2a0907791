"""Model rewrites return what they promise (issue 15, issue 19 items 6-8).

Every rewrite returns a model whose variables are all new (created in the current
strategy scope) with every value copied; training it leaves the original alone;
nested, shared, multi-input/output and custom layers survive; subclassed models
are cloned or swapped in place; dtype policies are kept.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from _keras_helpers import randomize_statistics

import tfbn
from tfbn.convert import CloneError, is_batch_norm, rewrite_layers
from tfbn.layers import FrozenBatchNormalization
from tfbn.layers.frozen_batch_norm import FoldedBatchNormalization

REPLICAS = 4
RNG = np.random.default_rng(0)


def randomize(model, seed=0):
    """Non-trivial statistics, gamma and beta in every BN (as after training)."""
    return randomize_statistics(model, seed, variance=(0.5, 2.0))


def conv_net(bn=keras.layers.BatchNormalization, name="net"):
    inputs = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="conv1")(inputs)
    x = bn(name="bn1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Dropout(0.1, name="drop")(x)
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv2")(x)
    x = bn(name="bn2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return randomize(keras.Model(inputs, keras.layers.Dense(2, name="head")(x), name=name))


def sync_net():
    return tfbn.convert_sync_batch_norm(conv_net())


def frozen_net():
    return tfbn.freeze_batch_norm(conv_net())


# name -> (build the input model, the rewrite)
REWRITES = {
    "convert_batch_norm": (conv_net, tfbn.convert_batch_norm),
    "convert_sync_batch_norm": (conv_net, tfbn.convert_sync_batch_norm),
    "revert_sync_batch_norm": (sync_net, tfbn.revert_sync_batch_norm),
    "freeze_batch_norm": (conv_net, tfbn.freeze_batch_norm),
    "unfreeze_batch_norm": (frozen_net, tfbn.unfreeze_batch_norm),
    "fold_batch_norm": (conv_net, tfbn.fold_batch_norm),
    "reset_running_stats": (conv_net, tfbn.reset_running_stats),
}


def values(model):
    return {v.path: np.array(keras.ops.convert_to_numpy(v.value)) for v in model.variables}


def tf_variables(model):
    """The underlying tf.Variables (one per replica under a strategy)."""
    found = []
    for v in model.variables:
        value = v.value
        found += list(getattr(value, "values", [value]))
    return found


def data(n=16, shape=(8, 8, 3), outputs=2, seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, *shape)).astype("float32"), rng.normal(size=(n, outputs)).astype(
        "float32"
    )


def assert_unchanged(model, before):
    after = values(model)
    assert after.keys() == before.keys()
    for path, value in before.items():
        np.testing.assert_array_equal(after[path], value, err_msg=path)


# ------------------------------------------------- item 1: new, copied, independent --


@pytest.mark.parametrize("name", list(REWRITES))
def test_rewrite_returns_independent_model(name):
    build, rewrite = REWRITES[name]
    model = build()
    model.compile("sgd", "mse")
    before = values(model)
    new = rewrite(model)

    # Every variable is a new object ...
    old_ids = {id(v) for v in tf_variables(model)}
    assert not old_ids & {id(v) for v in tf_variables(new)}
    # ... and every layer the rewrite does not replace has the original's values.
    new_layers = {layer.name: layer for layer in new._flatten_layers(include_self=False)}
    compared = 0
    for layer in model._flatten_layers(include_self=False):
        twin = new_layers[layer.name]
        if type(twin) is type(layer) and name not in ("fold_batch_norm", "reset_running_stats"):
            for a, b in zip(layer.variables, twin.variables, strict=True):
                assert a is not b
                np.testing.assert_array_equal(a.numpy(), b.numpy())
                compared += 1
    if name not in ("fold_batch_norm", "reset_running_stats"):
        assert compared >= 3  # conv1, conv2, head (and the dropout's seed state)

    # Training the new model leaves the original untouched.
    x, y = data()
    new.compile(keras.optimizers.SGD(0.5), "mse")
    new.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert_unchanged(model, before)
    # The rewrite did change something in the new model (it really trained).
    assert (
        any(not np.array_equal(v, before.get(p, v)) for p, v in values(new).items())
        or name != "convert_batch_norm"
    )


@pytest.mark.parametrize("name", ["convert_batch_norm", "freeze_batch_norm", "fold_batch_norm"])
def test_inference_output_is_kept(name):
    build, rewrite = REWRITES[name]
    model = build()
    x, _ = data(4)
    np.testing.assert_allclose(rewrite(model)(x, training=False), model(x, training=False),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


@pytest.mark.parametrize(
    "name", ["convert_batch_norm", "convert_sync_batch_norm", "freeze_batch_norm"]
)
def test_inplace_true_shares_the_untouched_layers(name):
    build, rewrite = REWRITES[name]
    model = build()
    new = rewrite(model, inplace=True)
    assert new.get_layer("conv1") is model.get_layer("conv1")
    assert new.get_layer("conv1").kernel is model.get_layer("conv1").kernel
    assert new.get_layer("bn1") is not model.get_layer("bn1")
    with pytest.raises(ValueError, match="inplace"):
        rewrite(model, inplace="yes")


def test_optimizer_state_is_not_carried():
    model = conv_net()
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    x, y = data()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert int(model.optimizer.iterations) == 2
    new = tfbn.convert_batch_norm(model)
    assert new.compiled and isinstance(new.optimizer, keras.optimizers.Adam)
    assert new.optimizer is not model.optimizer
    assert int(new.optimizer.iterations) == 0
    assert new.optimizer.get_config()["learning_rate"] == pytest.approx(1e-3)


# ------------------------------------- item 1: the strategy pattern, 4 replicas --


@pytest.fixture(scope="module")
def strategy():
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:REPLICAS]
    return tf.distribute.MirroredStrategy(devices)


@pytest.mark.parametrize("name", ["convert_sync_batch_norm", "convert_batch_norm", "freeze_batch_norm",
                                  "reset_running_stats"])  # fmt: skip
def test_build_outside_rewrite_inside_scope_then_fit(strategy, name):
    """`model = build(); with strategy.scope(): model = rewrite(model); compile; fit`."""
    assert strategy.num_replicas_in_sync == REPLICAS
    _, rewrite = REWRITES[name]
    original = conv_net()  # outside the strategy
    before = values(original)
    with strategy.scope():
        model = rewrite(original)
        model.compile(keras.optimizers.SGD(0.1), "mse")
    assert all(isinstance(v.value, tf.distribute.DistributedValues) for v in model.variables)
    x, y = data(32)
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])
    assert_unchanged(original, before)
    if name == "convert_sync_batch_norm":
        bn = model.get_layer("bn1")
        assert bn.synchronized and int(bn.num_batches_tracked.numpy()) == 2


# ------------------------- item 2: nested, shared, multi-io, custom layers --


@keras.saving.register_keras_serializable(package="tfbn_tests")
class Scale(keras.layers.Layer):
    """A custom layer with a weight and a config."""

    def __init__(self, factor=2.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="w")

    def call(self, x):
        return x * self.w * self.factor

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


class ConvBlock(keras.layers.Layer):
    """A custom block holding a BN as an attribute and two more in a list."""

    def __init__(self, filters=4, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.conv = keras.layers.Conv2D(filters, 1, use_bias=False)
        self.bn = keras.layers.BatchNormalization()
        self.extra = [keras.layers.BatchNormalization(), keras.layers.BatchNormalization()]

    def call(self, x, training=None):
        x = self.bn(self.conv(x), training=training)
        for bn in self.extra:
            x = bn(x, training=training)
        return x

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


class NoConfig(keras.layers.Layer):
    """A custom layer whose constructor argument is not in its config."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.dense = keras.layers.Dense(units)

    def call(self, x):
        return self.dense(x)

    def get_config(self):
        return super().get_config()  # forgets `units`


def complex_model():
    """Functional backbone and Sequential inside a Functional model, a layer called
    twice, two inputs and two outputs, custom layers (one holding BNs)."""
    b_in = keras.Input((8, 8, 3))
    b = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)(b_in)
    b = keras.layers.BatchNormalization()(b)
    backbone = keras.Model(b_in, keras.layers.ReLU()(b), name="backbone")
    head = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.BatchNormalization()],
                            name="head")  # fmt: skip
    image, extra = keras.Input((8, 8, 3), name="image"), keras.Input((4,), name="extra")
    features = ConvBlock(4, name="block")(backbone(image))
    pooled = keras.layers.GlobalAveragePooling2D()(features)
    shared = keras.layers.Dense(4, name="shared")
    e = Scale(3.0, name="scale")(shared(shared(extra)))  # called twice
    out_a = head(keras.layers.Add()([pooled, e]))
    out_b = keras.layers.BatchNormalization(name="bn_b")(
        keras.layers.Dense(2, name="dense_b")(pooled)
    )
    model = keras.Model({"image": image, "extra": extra}, {"a": out_a, "b": out_b}, name="complex")
    model(complex_inputs(2))
    return randomize(model)


def complex_inputs(n, seed=2):
    rng = np.random.default_rng(seed)
    return {"image": rng.normal(size=(n, 8, 8, 3)).astype("float32"),
            "extra": rng.normal(size=(n, 4)).astype("float32")}  # fmt: skip


@pytest.mark.parametrize("name", ["convert_batch_norm", "convert_sync_batch_norm", "freeze_batch_norm",
                                  "fold_batch_norm"])  # fmt: skip
def test_nested_shared_multi_io_and_custom_layers_survive(name):
    rewrite = REWRITES[name][1]
    model = complex_model()
    before = values(model)
    new = rewrite(model)
    assert isinstance(new.get_layer("backbone"), keras.Model)
    assert isinstance(new.get_layer("head"), keras.Sequential)
    assert new.get_layer("backbone") is not model.get_layer("backbone")
    shared = new.get_layer("shared")
    assert shared is not model.get_layer("shared") and len(shared._inbound_nodes) == 2
    assert isinstance(new.get_layer("scale"), Scale) and new.get_layer("scale").factor == 3.0
    block = new.get_layer("block")
    assert isinstance(block, ConvBlock) and block is not model.get_layer("block")
    # The BNs the custom block holds (attribute and list) were swapped too.
    inner = [block.bn, *block.extra]
    assert all(isinstance(bn, (tfbn.BatchNormalization, tfbn.FrozenBatchNormalization))
               for bn in inner)  # fmt: skip
    assert len({id(w) for w in block.weights}) == len(block.weights) == 1 + 3 * 4  # no stale BN
    assert set(new.output) == {"a", "b"} and set(new.input) == {"image", "extra"}
    x = complex_inputs(4)
    want, got = model(x, training=False), new(x, training=False)
    for key in ("a", "b"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5)
    # Training the new model leaves the original alone.
    if name != "fold_batch_norm":
        new.compile(keras.optimizers.SGD(0.5), "mse")
        y = {"a": np.ones((4, 3), "float32"), "b": np.ones((4, 2), "float32")}
        new.fit(x, y, batch_size=4, epochs=1, verbose=0)
        assert_unchanged(model, before)


def test_custom_layer_without_config_is_refused_by_name_unless_inplace():
    inputs = keras.Input((5,))
    x = NoConfig(3, name="no_config")(inputs)
    model = keras.Model(inputs, keras.layers.BatchNormalization()(x))
    with pytest.raises(
        CloneError, match="(?s)'no_config' \\(NoConfig\\).*get_config.*inplace=True"
    ):
        tfbn.convert_batch_norm(model)
    shared = tfbn.convert_batch_norm(model, inplace=True)
    assert shared.get_layer("no_config") is model.get_layer("no_config")


def test_stateless_layer_that_cannot_be_cloned_is_shared():
    """A Lambda of a Python lambda cannot be deserialised safely; it holds no state,
    so the new model calls the same layer object (no variable is shared)."""
    inputs = keras.Input((4,))
    x = keras.layers.Lambda(lambda t: t * 2, name="double")(inputs)
    model = keras.Model(inputs, keras.layers.BatchNormalization()(keras.layers.Dense(3)(x)))
    new = tfbn.convert_batch_norm(model)
    layer = model.get_layer("double")
    try:  # Keras 3.10 rebuilds a Python lambda from its config; newer Keras refuses (safe mode)
        type(layer).from_config(layer.get_config())
        clonable = True
    except Exception:  # noqa: BLE001
        clonable = False
    assert (new.get_layer("double") is layer) is not clonable
    assert not {id(v) for v in tf_variables(model)} & {id(v) for v in tf_variables(new)}
    x = np.ones((2, 4), "float32")
    np.testing.assert_allclose(new(x), model(x), rtol=1e-6)


def test_keras_ops_in_the_graph_are_kept():
    """Functional graphs may call keras.ops directly (MobileNetV3's hard-swish)."""
    inputs = keras.Input((4,))
    x = keras.layers.Dense(3)(inputs)
    x = x * keras.ops.relu6(x + 3.0) / 6.0
    model = randomize(keras.Model(inputs, keras.layers.BatchNormalization()(x)))
    x = np.linspace(-2, 2, 8, dtype="float32").reshape(2, 4)
    for rewrite in (tfbn.convert_batch_norm, tfbn.fold_batch_norm):
        np.testing.assert_allclose(rewrite(model)(x, training=False), model(x, training=False),
                                   rtol=1e-5, atol=1e-6)  # fmt: skip


def test_clone_whose_variables_differ_is_refused_by_name():
    @keras.saving.register_keras_serializable(package="tfbn_tests")
    class Wrong(keras.layers.Layer):
        def __init__(self, units=2, **kwargs):
            super().__init__(**kwargs)
            self.units = units

        def build(self, shape):
            self.w = self.add_weight(shape=(shape[-1], self.units), name="w")

        def call(self, x):
            return x @ self.w

        def get_config(self):
            return super().get_config()  # forgets units: the clone has 2, not 5

    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.BatchNormalization()(Wrong(5, name="wrong")(inputs)))
    with pytest.raises(
        CloneError, match="'wrong' \\(Wrong\\).*does not have the original's variables"
    ):
        tfbn.freeze_batch_norm(model)


# ------------------------------------------------------- item 3: subclassed --


class SubNet(keras.Model):
    """Layers as attributes, in a list, in a dict, and a Sequential attribute."""

    def __init__(self, width=4, **kwargs):
        super().__init__(**kwargs)
        self.width = width
        self.conv = keras.layers.Conv2D(width, 3, padding="same", use_bias=False)
        self.bn = keras.layers.BatchNormalization()
        self.blocks = [keras.layers.Conv2D(width, 1), keras.layers.BatchNormalization()]
        self.named = {"norm": keras.layers.BatchNormalization()}
        self.tail = keras.Sequential([keras.layers.Dense(width), keras.layers.BatchNormalization()])
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.out = keras.layers.Dense(2)

    def call(self, x, training=None):
        x = keras.ops.relu(self.bn(self.conv(x), training=training))
        for layer in self.blocks:
            x = layer(x, training=training) if is_batch_norm(layer) else layer(x)
        x = self.named["norm"](x, training=training)
        return self.out(self.tail(self.pool(x), training=training))

    def get_config(self):
        return {**super().get_config(), "width": self.width}


def subnet():
    model = SubNet(name="subnet")
    model(np.zeros((2, 8, 8, 3), "float32"))
    return randomize(model)


def bn_types(model):
    return [type(layer) for layer in model._flatten_layers(include_self=False, recursive=True)
            if is_batch_norm(layer) or isinstance(layer, FrozenBatchNormalization)]  # fmt: skip


@pytest.mark.parametrize("inplace", [False, True], ids=["clone", "inplace"])
def test_subclassed_model_bn_swapped_where_held(inplace):
    model = subnet()
    x, y = data(8)
    want = model(x, training=False).numpy()
    before = values(model)
    new = tfbn.convert_sync_batch_norm(model, inplace=inplace)
    assert (new is model) == inplace
    types = bn_types(new)
    assert len(types) == 4 and all(t is tfbn.BatchNormalization for t in types)
    assert all(layer.synchronized for layer in new._flatten_layers() if is_batch_norm(layer))
    assert isinstance(new.bn, tfbn.BatchNormalization)
    assert isinstance(new.blocks[1], tfbn.BatchNormalization)
    assert isinstance(new.named["norm"], tfbn.BatchNormalization)
    assert isinstance(new.tail.layers[1], tfbn.BatchNormalization)
    # Weight order and count are the original's (no stale BN left tracked).
    assert [v.path.split("/")[-1] for v in new.weights] == [v.split("/")[-1] for v in before]
    np.testing.assert_allclose(new(x, training=False), want, rtol=1e-5, atol=1e-5)
    new.compile(keras.optimizers.SGD(0.5), "mse")
    new.fit(x, y, batch_size=4, epochs=1, verbose=0)
    if not inplace:
        assert_unchanged(model, before)
        assert not {id(v) for v in tf_variables(model)} & {id(v) for v in tf_variables(new)}


def test_subclassed_model_fold_freezes_and_round_trips():
    model = subnet()
    x, _ = data(4)
    folded, report = tfbn.fold_batch_norm(model, return_report=True)
    assert report.folded == [] and len(report.frozen) == 4
    assert all(t is FrozenBatchNormalization for t in bn_types(folded))
    np.testing.assert_allclose(
        folded(x, training=True), model(x, training=False), rtol=1e-5, atol=1e-5
    )
    frozen = tfbn.freeze_batch_norm(model)
    # Its config rebuilds the original layers: a rewritten subclassed model is
    # rewritten again in place (its variables are already its own).
    with pytest.raises(CloneError, match="(?s)swapped after construction.*inplace=True"):
        tfbn.unfreeze_batch_norm(frozen)
    back = tfbn.unfreeze_batch_norm(frozen, inplace=True)
    assert back is frozen
    assert all(t is tfbn.BatchNormalization for t in bn_types(back))
    np.testing.assert_allclose(
        back(x, training=False), model(x, training=False), rtol=1e-5, atol=1e-5
    )


def test_subclassed_model_in_scope_trains_on_four_replicas(strategy):
    original = subnet()
    before = values(original)
    with strategy.scope():
        model = tfbn.convert_sync_batch_norm(original)
        model.compile(keras.optimizers.SGD(0.1), "mse")
    assert all(isinstance(v.value, tf.distribute.DistributedValues) for v in model.variables)
    x, y = data(32)
    assert np.isfinite(model.fit(x, y, batch_size=16, epochs=1, verbose=0).history["loss"][-1])
    assert_unchanged(original, before)


def test_subclassed_model_exports_with_frozen_batch_norm(tmp_path):
    model = subnet()
    x, _ = data(6)
    result = tfbn.export_saved_model(model, tmp_path / "sub", sample_inputs=x)
    assert result.gate.ok and result.fold_report.folded == []
    assert len(result.fold_report.frozen) == 4
    loaded = tf.saved_model.load(result.path).signatures["serving_default"]
    (got,) = loaded(input=tf.constant(x)).values()
    np.testing.assert_allclose(got, model(x, training=False), rtol=1e-4, atol=1e-5)

    class TwoInputs(keras.Model):
        def call(self, a, b):
            return a + b

    two = TwoInputs()
    two(np.zeros((2, 3), "float32"), np.zeros((2, 3), "float32"))
    with pytest.raises(ValueError, match="(?s)no single recorded input shape.*keras.Input"):
        tfbn.export_saved_model(two, tmp_path / "two")


def test_subclassed_model_that_cannot_be_cloned_says_what_to_do():
    class Opaque(keras.Model):
        def __init__(self, layers_to_use):  # not serialisable, no get_config
            super().__init__()
            self.inner = layers_to_use

        def call(self, x):
            return self.inner[1](self.inner[0](x))

    model = Opaque([keras.layers.Dense(3), keras.layers.BatchNormalization()])
    model(np.zeros((2, 4), "float32"))
    with pytest.raises(CloneError, match="(?s)cannot be rebuilt from its config.*inplace=True"):
        tfbn.freeze_batch_norm(model)
    frozen = tfbn.freeze_batch_norm(model, inplace=True)
    assert frozen is model and isinstance(model.inner[1], FrozenBatchNormalization)


def test_bn_held_where_it_cannot_be_reassigned_is_refused():
    class InTuple(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.pair = (keras.layers.Dense(3), keras.layers.BatchNormalization(name="tupled"))

        def call(self, x):
            return self.pair[1](self.pair[0](x))

    model = InTuple()
    model(np.zeros((2, 4), "float32"))
    with pytest.raises(CloneError, match="'tupled'.*not held in an attribute, a list or a dict"):
        tfbn.convert_batch_norm(model, inplace=True)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="built keras.Model"):
        tfbn.convert_batch_norm(keras.layers.Dense(2))
    with pytest.raises(ValueError, match="not built"):
        tfbn.freeze_batch_norm(keras.Sequential([keras.layers.Dense(2)]))


def test_rewrite_layers_returns_the_replaced_pairs():
    model = conv_net()
    new, pairs = rewrite_layers(model, lambda layer: None)
    assert pairs == [] and new is not model
    assert [type(a) for a in new.layers] == [type(a) for a in model.layers]


# --------------------------------------------- issue 19 item 6: dtype policies --


@pytest.fixture
def global_policy():
    yield keras.config.set_dtype_policy
    keras.config.set_dtype_policy("float32")


@pytest.mark.parametrize("name", list(REWRITES))
@pytest.mark.parametrize("built_under,then", [("mixed_float16", "float32"), ("float32", "mixed_bfloat16"),
                                              ("mixed_bfloat16", "mixed_float16")])  # fmt: skip
def test_policies_are_kept_when_the_global_policy_changed(global_policy, name, built_under, then):
    build, rewrite = REWRITES[name]
    global_policy(built_under)
    model = build()
    global_policy(then)
    new = rewrite(model)
    assert new.dtype_policy.name == built_under
    old_layers = {layer.name: layer for layer in model._flatten_layers(include_self=False)}
    for layer in new._flatten_layers(include_self=False):
        if layer.name in old_layers:
            assert layer.dtype_policy.name == old_layers[layer.name].dtype_policy.name, layer.name
    new.compile(keras.optimizers.SGD(0.1), "mse")
    loss_scaled = isinstance(new.optimizer, keras.optimizers.LossScaleOptimizer)
    assert loss_scaled == (built_under == "mixed_float16")


def test_subclassed_policy_kept(global_policy):
    global_policy("mixed_float16")
    model = subnet()
    global_policy("float32")
    new = tfbn.convert_batch_norm(model)
    assert new.dtype_policy.name == "mixed_float16"
    assert all(layer.dtype_policy.name == "mixed_float16" for layer in new._flatten_layers())
    x, _ = data(2)
    assert new(x).dtype == model(x).dtype


# ------------------------------------------ issue 19 items 7-8: convert_batch_norm --


def test_convert_batch_norm_is_revert_of_convert_in_one_call():
    model = conv_net()
    new = tfbn.convert_batch_norm(model)
    via_sync = tfbn.revert_sync_batch_norm(tfbn.convert_sync_batch_norm(model))
    for a, b in zip(new.layers, via_sync.layers, strict=True):
        assert type(a) is type(b) and a.name == b.name
        if isinstance(a, tfbn.BatchNormalization):
            assert not a.synchronized and a.get_config() == b.get_config()
    x, y = data(8)
    np.testing.assert_allclose(new(x, training=True), model(x, training=True), rtol=1e-4, atol=1e-4)
    # A Keras BN that asked for synchronisation keeps asking.
    inputs = keras.Input((4,))
    synced = keras.Model(inputs, keras.layers.BatchNormalization(synchronized=True)(inputs))
    assert tfbn.convert_batch_norm(synced).layers[-1].synchronized


@pytest.mark.parametrize("policy", ["float16", "bfloat16", "mixed_float16"])
def test_pure_low_precision_statistics_load_both_ways(global_policy, policy, tmp_path):
    """Keras keeps float16/bfloat16 statistics under the pure policies, tfbn float32:
    weights move between them both ways (set_weights, a Keras weights file, the
    one-call conversion) and the outputs agree."""
    global_policy(policy)
    keras_model = conv_net()
    tfbn_model = conv_net(tfbn.BatchNormalization)
    kbn, tbn = keras_model.get_layer("bn1"), tfbn_model.get_layer("bn1")
    low = policy.replace("mixed_", "") if policy.startswith("mixed") else policy
    assert kbn.moving_mean.dtype == (low if not policy.startswith("mixed") else "float32")
    assert tbn.moving_mean.dtype == "float32"
    x, _ = data(4)
    tol = 2e-2 if "bfloat16" in policy else 2e-3
    for src, dst in ((keras_model, tfbn_model), (tfbn_model, keras_model)):
        randomize(src, seed=7)
        dst.set_weights(src.get_weights())
        np.testing.assert_allclose(np.asarray(dst(x), "float32"), np.asarray(src(x), "float32"),
                                   rtol=tol, atol=tol)  # fmt: skip
    randomize(keras_model, seed=8)
    keras_model.save_weights(tmp_path / "k.weights.h5")
    tfbn_model.load_weights(tmp_path / "k.weights.h5")
    np.testing.assert_array_equal(
        tbn.moving_mean.numpy(), kbn.moving_mean.numpy().astype("float32")
    )
    converted = tfbn.convert_batch_norm(keras_model)
    assert converted.get_layer("bn1").moving_mean.dtype == "float32"
    np.testing.assert_allclose(np.asarray(converted(x), "float32"), np.asarray(keras_model(x), "float32"),
                               rtol=tol, atol=tol)  # fmt: skip


def test_folded_and_frozen_layers_are_the_expected_types():
    model = conv_net()
    folded = tfbn.fold_batch_norm(model)
    assert isinstance(folded.get_layer("bn1"), FoldedBatchNormalization)
    assert isinstance(folded.get_layer("bn2"), FoldedBatchNormalization)


def test_convert_batch_norm_leaves_tfbn_layers_as_they_are():
    """tfbn's layer is a keras.layers.BatchNormalization too (isinstance): conversion must
    still touch only Keras's own layers, or tfbn-only settings would be lost."""
    inp = keras.Input((4,))
    x = keras.layers.BatchNormalization(name="keras_bn")(keras.layers.Dense(3)(inp))
    x = tfbn.BatchNormalization(momentum=None, momentum_convention="pytorch", name="ours")(x)
    new = tfbn.convert_batch_norm(keras.Model(inp, x))
    assert type(new.get_layer("keras_bn")) is tfbn.BatchNormalization
    ours = new.get_layer("ours")
    assert ours.momentum is None and ours.momentum_convention == "pytorch"
