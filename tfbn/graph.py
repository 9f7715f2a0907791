"""Walking a Keras model's layer graph, channel axes, and the table of layers BN folds into.

One home for three facts the rest of tfbn needs:

- the graph behind a Sequential or Functional model (nested ones included):
  `graph_of`, `graphs`, `graph_nodes`, `call_counts`, `bn_inputs`, `layer_edges`;
- channel axes: `channel_axes` (a layer's `axis` resolved for a rank),
  `reduction_axes` (the others) and `producer_channel_axis` (the axis a
  Conv/Dense adds its bias on);
- `PRODUCERS`: every layer type that adds a per-channel bias, and for those
  BatchNorm can fold into, how the fold scales its kernel (`FoldRule`). Folding
  (`tfbn.convert.fold_batch_norm`) and the wiring lint (`tfbn.inspect.lint_model`)
  both read it, so a type added here is folded and linted alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import keras
import numpy as np
from keras.src.models.functional import Functional
from keras.src.ops.function import make_node_key

# ----------------------------------------------------------------- axes --


def channel_axes(axis, rank: int) -> list[int]:
    """`axis` (an int or a list of ints, negative allowed) as sorted non-negative axes of `rank`."""
    axes = list(axis) if isinstance(axis, (list, tuple)) else [axis]
    return sorted({a % rank for a in axes})


def reduction_axes(axis, rank: int) -> list[int]:
    """The axes BatchNorm reduces over: every axis of `rank` but the channel axes."""
    channels = set(channel_axes(axis, rank))
    return [a for a in range(rank) if a not in channels]


def producer_channel_axis(layer: keras.layers.Layer, rank: int) -> int:
    """The axis a Conv/Dense-like layer writes its output channels (and adds its bias) on."""
    channels_first = getattr(layer, "data_format", "channels_last") == "channels_first"
    return 1 if channels_first else rank - 1


# ------------------------------------------------------------ fold table --


def _scale_last(kernel: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return kernel * scale  # (..., in, out)


def _scale_second_last(kernel: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return kernel * scale[:, None]  # transposed convolutions: (..., out, in)


def _scale_depthwise(kernel: np.ndarray, scale: np.ndarray) -> np.ndarray:
    # (..., in, depth_multiplier): output channel c * depth_multiplier + m
    return kernel * scale.reshape(kernel.shape[-2:])


@dataclass(frozen=True)
class FoldRule:
    """How BatchNorm folds into one producer type.

    `kernel` names the weight whose output channels are scaled, `scale_kernel`
    scales it (float64 arrays: kernel, per-output-channel scale); `copy` names
    weights taken over unchanged. The bias always becomes `bias * scale + offset`.
    """

    kernel: str
    scale_kernel: Callable[[np.ndarray, np.ndarray], np.ndarray]
    copy: tuple[str, ...] = ()


_OUT_LAST = FoldRule("kernel", _scale_last)
_OUT_SECOND_LAST = FoldRule("kernel", _scale_second_last)
_DEPTHWISE = FoldRule("kernel", _scale_depthwise)
_SEPARABLE = FoldRule("pointwise_kernel", _scale_last, copy=("depthwise_kernel",))

# Every layer type that adds a bias per output channel, in the order they are
# matched (subclasses first), and its FoldRule, or None where BN does not fold
# into it (EinsumDense: its bias axes are arbitrary).
PRODUCERS: dict[type, FoldRule | None] = {
    keras.layers.Conv1DTranspose: _OUT_SECOND_LAST,
    keras.layers.Conv2DTranspose: _OUT_SECOND_LAST,
    keras.layers.Conv3DTranspose: _OUT_SECOND_LAST,
    keras.layers.DepthwiseConv1D: _DEPTHWISE,
    keras.layers.DepthwiseConv2D: _DEPTHWISE,
    keras.layers.SeparableConv1D: _SEPARABLE,
    keras.layers.SeparableConv2D: _SEPARABLE,
    keras.layers.Conv1D: _OUT_LAST,
    keras.layers.Conv2D: _OUT_LAST,
    keras.layers.Conv3D: _OUT_LAST,
    keras.layers.Dense: _OUT_LAST,
    keras.layers.EinsumDense: None,
}
PRODUCER_TYPES = tuple(PRODUCERS)
FOLDABLE_TYPES = tuple(t for t, rule in PRODUCERS.items() if rule is not None)


def fold_rule(layer: keras.layers.Layer) -> FoldRule | None:
    """The `FoldRule` for `layer`'s type (the first matching entry of `PRODUCERS`), or None."""
    for layer_type, rule in PRODUCERS.items():
        if isinstance(layer, layer_type):
            return rule
    return None


# ----------------------------------------------------------------- graph --


def graph_of(model) -> Functional | None:
    """The Functional graph behind a Sequential or Functional model; None otherwise
    (subclassed models, layers, a Sequential without an input)."""
    if isinstance(model, keras.Sequential):
        return getattr(model, "_functional", None)
    return model if isinstance(model, Functional) else None


def pack_inputs(model, names, tensors: list):
    """`tensors` (one per input, in the order of `names`) in the structure `model` is
    called with: a dict by name for dict inputs, else one tensor or a list."""
    if isinstance(graph_of(model)._inputs_struct, dict):
        return dict(zip(names, tensors, strict=True))
    return tensors[0] if len(tensors) == 1 else list(tensors)


def is_graph_model(model) -> bool:
    """True for a Sequential or Functional model whose graph is known."""
    return graph_of(model) is not None


def graph_nodes(graph: Functional) -> Iterator:
    """The nodes (layer calls) that belong to `graph`, input layers included."""
    for op in graph.operations:
        for i, node in enumerate(op._inbound_nodes):
            if make_node_key(op, i) in graph._nodes:
                yield node


def graphs(model) -> list[Functional]:
    """The graph of `model` and of every Sequential/Functional model nested in it, each once."""
    found, stack, seen = [], [model], set()
    while stack:
        graph = graph_of(stack.pop())
        if graph is None or id(graph) in seen:
            continue
        seen.add(id(graph))
        found.append(graph)
        stack.extend(op for op in graph.operations if isinstance(op, keras.Model))
    return found


def call_counts(model) -> dict[int, int]:
    """`{id(layer): number of calls}` over the graphs of `model` and its nested models."""
    calls: dict[int, int] = {}
    for graph in graphs(model):
        for node in graph_nodes(graph):
            calls[id(node.operation)] = calls.get(id(node.operation), 0) + 1
    return calls


@dataclass
class LayerInput:
    """One call of a single-input layer: who produced its input and who else reads it."""

    layer: keras.layers.Layer
    producer: keras.layers.Layer
    rank: int
    shape: tuple
    consumers: int  # how many calls (and graph outputs) read the same tensor


def single_input_calls(model) -> list[LayerInput]:
    """Every call of a single-input layer in `model`'s graphs (nested graphs too), with the
    layer that produced the input tensor in the same graph (a nested model, an input
    layer or a plain layer)."""
    found = []
    for graph in graphs(model):
        nodes = list(graph_nodes(graph))
        consumers: dict[int, int] = {}
        for node in nodes:
            for kt in node.input_tensors:
                consumers[id(kt)] = consumers.get(id(kt), 0) + 1
        for kt in graph.outputs:
            consumers[id(kt)] = consumers.get(id(kt), 0) + 1
        for node in nodes:
            if len(node.input_tensors) != 1:
                continue
            kt = node.input_tensors[0]
            found.append(LayerInput(node.operation, kt._keras_history.operation,
                                    len(kt.shape), tuple(kt.shape), consumers.get(id(kt), 0)))  # fmt: skip
    return found


def layer_edges(model) -> list[tuple]:
    """(producer, consumer) pairs of layers connected by a tensor, nested models
    flattened (a nested model's output is produced by its inner layer, its input
    consumed by its inner layers). Sequential, Functional and nested models; a
    Sequential without a graph falls back to consecutive layers."""
    edges, stack, visited = [], [model], set()
    while stack:
        current = stack.pop()
        if id(current) in visited:
            continue
        visited.add(id(current))
        graph = graph_of(current)
        if graph is None:
            layers = getattr(current, "layers", [])
            stack.extend(layer for layer in layers if isinstance(layer, keras.Model))
            edges.extend(_consecutive_edges(current))
        else:
            stack.extend(op for op in graph.operations if isinstance(op, keras.Model))
            edges.extend(_graph_edges(graph))
    return edges


def _graph_edges(graph: Functional) -> list[tuple]:
    """The edges of one graph: each node's input tensors, producer to consumer."""
    edges = []
    for node in graph_nodes(graph):
        for tensor in node.input_tensors:
            for p in _producers(tensor._keras_history.operation, tensor):
                edges.extend((p, c) for c in _consumers(node.operation))
    return edges


def _consecutive_edges(model) -> list[tuple]:
    """The edges of a Sequential without a graph: each layer feeds the next one."""
    if not isinstance(model, keras.Sequential):
        return []
    layers = list(model.layers)
    edges = []
    for a, b in zip(layers, layers[1:], strict=False):
        for p in _producers(a, None):
            edges.extend((p, c) for c in _consumers(b))
    return edges


def _producers(op, tensor) -> list:
    """The layers that produce `tensor`, the output of `op`: `op` itself, or inside a nested
    graph model the layer behind the matching output; none for an input layer."""
    graph = graph_of(op) if isinstance(op, keras.Model) else None
    if graph is None:
        return [] if isinstance(op, keras.layers.InputLayer) or op is None else [op]
    index = tensor._keras_history.tensor_index if hasattr(tensor, "_keras_history") else 0
    outputs = graph.outputs
    inner = outputs[min(index, len(outputs) - 1)]
    return _producers(inner._keras_history.operation, inner)


def _consumers(op) -> list:
    """The layers that read what is fed to `op`: `op` itself, or inside a nested graph
    model every layer that reads one of its inputs."""
    graph = graph_of(op) if isinstance(op, keras.Model) else None
    if graph is None:
        return [op]
    inputs = {id(t) for t in graph.inputs}
    found = []
    for node in graph_nodes(graph):
        if any(id(t) in inputs for t in node.input_tensors):
            found.extend(_consumers(node.operation))
    return found
