"""tfbn.graph: one graph walker, one channel-axis resolver, one table of the layers BN folds into."""

import keras
import numpy as np
import pytest

import tfbn
from tfbn import graph


def test_channel_and_reduction_axes():
    assert graph.channel_axes(-1, 4) == [3]
    assert graph.channel_axes([1, -1], 4) == [1, 3]
    assert graph.reduction_axes(-1, 4) == [0, 1, 2]
    assert graph.reduction_axes([1, 2], 4) == [0, 3]
    conv_first = keras.layers.Conv2D(2, 1, data_format="channels_first")
    assert graph.producer_channel_axis(conv_first, 4) == 1
    assert graph.producer_channel_axis(keras.layers.Dense(2), 3) == 2


def test_table_covers_every_producer_and_says_how_to_fold():
    for layer_type in (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D,
                       keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose,
                       keras.layers.Conv3DTranspose, keras.layers.DepthwiseConv1D,
                       keras.layers.DepthwiseConv2D, keras.layers.SeparableConv1D,
                       keras.layers.SeparableConv2D, keras.layers.Dense):  # fmt: skip
        assert layer_type in graph.FOLDABLE_TYPES
    assert graph.PRODUCERS[keras.layers.EinsumDense] is None
    # A transposed convolution is a Conv subclass: its own rule must win.
    transpose = keras.layers.Conv2DTranspose(3, 3)
    assert graph.fold_rule(transpose) is graph.PRODUCERS[keras.layers.Conv2DTranspose]
    kernel = np.ones((3, 3, 4, 2))  # (..., out=4, in=2)
    scale = np.arange(1.0, 5.0)
    scaled = graph.fold_rule(transpose).scale_kernel(kernel, scale)
    np.testing.assert_array_equal(scaled[0, 0], np.repeat(scale[:, None], 2, axis=1))


@pytest.mark.parametrize("make", [
    lambda: keras.layers.Conv2D(3, 3),
    lambda: keras.layers.Conv2DTranspose(3, 3),
    lambda: keras.layers.SeparableConv2D(3, 3),
    lambda: keras.layers.DepthwiseConv2D(3),
])  # fmt: skip
def test_lint_and_fold_read_the_same_table(make):
    """A producer with a bias feeding BN: the lint reports the useless bias and the
    fold folds it, for every type in the table."""
    inputs = keras.Input((8, 8, 3))
    producer = make()
    model = keras.Model(inputs, keras.layers.BatchNormalization()(producer(inputs)))
    rules = {f.rule for f in tfbn.lint_model(model).findings}
    assert "bias-before-bn" in rules
    _, report = tfbn.fold_batch_norm(model, return_report=True)
    assert report.folded and report.folded[0][1] == producer.name


def test_walker_sees_nested_models_and_counts_shared_calls():
    inner = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(4, name="inner_dense")], name="inner"
    )
    inputs = keras.Input((4,))
    shared = keras.layers.Dense(4, name="shared")
    x = inner(shared(shared(inputs)))
    model = keras.Model(inputs, keras.layers.BatchNormalization(name="bn")(x))
    assert len(graph.graphs(model)) == 2
    calls = graph.call_counts(model)
    assert calls[id(shared)] == 2 and calls[id(inner)] == 1
    edges = {(a.name, b.name) for a, b in graph.layer_edges(model)}
    assert ("shared", "shared") in edges and ("shared", "inner_dense") in edges
    assert ("inner_dense", "bn") in edges
    bn_calls = [c for c in graph.single_input_calls(model) if c.layer.name == "bn"]
    assert bn_calls[0].producer is inner and bn_calls[0].rank == 2


def test_graph_of_subclassed_model_is_none():
    class Sub(keras.Model):
        def call(self, x):
            return x

    assert graph.graph_of(Sub()) is None and not graph.is_graph_model(Sub())
    assert graph.graph_of(keras.Sequential([keras.layers.Dense(2)])) is None  # no input yet


def test_a_sequential_without_a_graph_flattens_nested_models_on_both_sides():
    """Before its first call a Sequential has no graph and its edges are its consecutive
    layers; a nested model there is flattened as in a graph: its inner output layer
    produces, its inner input layers consume. The same edges (and lint) before and after."""
    inputs = keras.Input((4,))
    inner = keras.Model(inputs, keras.layers.Dense(3, name="inner_dense")(inputs), name="inner")
    model = keras.Sequential(
        [keras.layers.Dense(4, name="first"), inner, keras.layers.BatchNormalization(name="bn")]
    )
    assert graph.graph_of(model) is None
    unbuilt = {(a.name, b.name) for a, b in graph.layer_edges(model)}
    assert unbuilt == {("first", "inner_dense"), ("inner_dense", "bn")}
    assert [f.layer for f in tfbn.lint_model(model).findings if f.rule == "bias-before-bn"] == [
        "inner_dense"
    ]
    model.build((None, 4))
    assert graph.graph_of(model) is not None
    assert {(a.name, b.name) for a, b in graph.layer_edges(model)} == unbuilt
