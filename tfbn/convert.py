"""Model rewrites that return a new model and only replace what changed.

Every rewrite goes through `rewrite_layers`: the model (Sequential, Functional,
nested) is cloned with `keras.models.clone_model(recursive=True)`; layers the
rewrite does not touch are reused as they are (shared, with their weights), and
each replaced layer gets its weights from the layer it replaces.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import keras
import numpy as np
from keras.src.models.functional import Functional
from keras.src.ops.function import make_node_key

from tfbn import _compat, stats
from tfbn.layers.batch_norm import COUNTER_NAMES, BatchNormalization
from tfbn.layers.frozen_batch_norm import FoldedBatchNormalization, FrozenBatchNormalization

BN_TYPES = (keras.layers.BatchNormalization, BatchNormalization)
# Constructor arguments both BN layers share, so a conversion carries them over.
KERAS_BN_ARGS = (
    "axis", "momentum", "epsilon", "center", "scale",
    "beta_initializer", "gamma_initializer", "moving_mean_initializer",
    "moving_variance_initializer", "beta_regularizer", "gamma_regularizer",
    "beta_constraint", "gamma_constraint", "name", "dtype", "trainable",
)  # fmt: skip


def is_batch_norm(layer: keras.layers.Layer) -> bool:
    """True for `keras.layers.BatchNormalization` and tfbn's BatchNormalization."""
    return isinstance(layer, BN_TYPES)


def rewrite_layers(
    model: keras.Model,
    replace: Callable[[keras.layers.Layer], keras.layers.Layer | None],
    transfer: Callable[[keras.layers.Layer, keras.layers.Layer], None] | None = None,
) -> tuple[keras.Model, list[tuple[keras.layers.Layer, keras.layers.Layer]]]:
    """Clones `model`, swapping each layer for which `replace(layer)` is not None.

    Args:
        model: A built Sequential or Functional model (nested ones included).
        replace: Returns the new (unbuilt) layer for a layer, or None to keep it.
        transfer: Called as `transfer(old, new)` once the new model is built, to
            give each new layer its weights; default `copy_weights`.

    Returns:
        `(new_model, [(old_layer, new_layer), ...])`.
    """
    _compat.check_not_legacy_keras(model)
    if not isinstance(model, keras.Model) or not model.built:
        raise ValueError(
            "Expected a built keras.Model (Sequential or Functional). Received: "
            f"{type(model).__name__}{'' if getattr(model, 'built', False) else ' (not built)'}"
        )
    if not isinstance(model, (keras.Sequential, Functional)):
        raise ValueError(
            "Model rewrites need a Sequential or Functional model (subclassed models "
            f"cannot be cloned). Received: {type(model).__name__}"
        )
    replaced: list[tuple[keras.layers.Layer, keras.layers.Layer]] = []

    def clone_function(layer):
        new = replace(layer)
        if new is None:
            return layer
        replaced.append((layer, new))
        return new

    new_model = keras.models.clone_model(model, clone_function=clone_function, recursive=True)
    for old, new in replaced:
        (transfer or copy_weights)(old, new)
    return new_model, replaced


def copy_weights(old: keras.layers.Layer, new: keras.layers.Layer) -> None:
    """Copies weights (and tfbn counters, where both layers have them) from old to new."""
    new.set_weights(old.get_weights())
    for name in COUNTER_NAMES:
        src, dst = getattr(old, name, None), getattr(new, name, None)
        if src is not None and dst is not None:
            dst.assign(np.asarray(src))


def batch_norm_config(layer: keras.layers.Layer) -> dict:
    """The constructor arguments of a BN layer that tfbn's BatchNormalization accepts."""
    config = layer.get_config()
    if isinstance(layer, BatchNormalization):
        return config
    if config.get("renorm"):
        raise ValueError(
            f"Layer '{layer.name}' uses batch renormalization (renorm=True), which tfbn "
            "does not implement; it cannot be converted."
        )
    return {k: config[k] for k in KERAS_BN_ARGS if k in config}


def convert_sync_batch_norm(model: keras.Model, sync_group_size: int | None = None) -> keras.Model:
    """A new model where every BN layer is a synchronised tfbn BatchNormalization.

    Keras and tfbn BN layers alike become `tfbn.BatchNormalization(synchronized=True)`
    with the same arguments, weights and counters. Call it inside `strategy.scope()`
    so the new variables are mirrored.
    """

    def replace(layer):
        if not is_batch_norm(layer):
            return None
        config = {**batch_norm_config(layer), "synchronized": True}
        config["sync_group_size"] = sync_group_size
        return BatchNormalization.from_config(config)

    return rewrite_layers(model, replace)[0]


def revert_sync_batch_norm(model: keras.Model) -> keras.Model:
    """The reverse of `convert_sync_batch_norm`: synchronised BN becomes local tfbn BN."""

    def replace(layer):
        if not (isinstance(layer, BatchNormalization) and layer.synchronized):
            return None
        config = {**layer.get_config(), "synchronized": False, "sync_group_size": None}
        return BatchNormalization.from_config(config)

    return rewrite_layers(model, replace)[0]


# ------------------------------------------------------- freeze, unfreeze, fold --


def _bn_params(layer: keras.layers.Layer) -> dict:
    """Axis, epsilon and float64 statistics of a BN or FrozenBN layer (for freezing/folding)."""
    if not is_batch_norm(layer) and not isinstance(layer, FrozenBatchNormalization):
        raise ValueError(f"Expected a BatchNormalization layer. Received: {type(layer).__name__}")
    if layer.moving_mean is None:
        raise ValueError(
            f"BatchNormalization layer '{layer.name}' is not built (unknown channel "
            "dimension); build the model on inputs with a known channel dimension first."
        )
    if isinstance(layer, BatchNormalization) and not layer.track_running_stats:
        raise ValueError(
            f"Layer '{layer.name}' has track_running_stats=False: it normalises with batch "
            "statistics even at inference, so it has no statistics to freeze or fold. "
            "Train it with track_running_stats=True (or calibrate its statistics) first."
        )
    axis = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]

    def value(v):
        return None if v is None else np.asarray(keras.ops.convert_to_numpy(v), np.float64)

    return {
        "axis": list(axis),
        "epsilon": float(layer.epsilon),
        "gamma": value(layer.gamma) if layer.scale else None,
        "beta": value(layer.beta) if layer.center else None,
        "moving_mean": value(layer.moving_mean),
        "moving_variance": value(layer.moving_variance),
    }


def _scale_offset64(params: dict) -> tuple[np.ndarray, np.ndarray]:
    """`stats.fold_scale_offset` of a BN's statistics, computed in float64."""
    scale, offset = stats.fold_scale_offset(
        params["gamma"], params["beta"], params["moving_mean"], params["moving_variance"],
        params["epsilon"],
    )  # fmt: skip
    return np.asarray(scale, np.float64), np.asarray(offset, np.float64)


def _restore_config(layer: keras.layers.Layer) -> dict | None:
    """What `unfreeze_batch_norm` needs to rebuild `layer` as a tfbn BatchNormalization."""
    if isinstance(layer, FrozenBatchNormalization):
        return layer.restore_config
    try:
        config = batch_norm_config(layer)
    except ValueError:  # renorm: restore a plain BN with the same arguments otherwise
        config = {k: v for k, v in layer.get_config().items() if k in KERAS_BN_ARGS}
    return keras.saving.serialize_keras_object(
        {k: v for k, v in config.items() if k not in ("name", "dtype", "trainable")}
    )


def _frozen_from(layer: keras.layers.Layer, trainable_affine: bool) -> FrozenBatchNormalization:
    params = _bn_params(layer)
    return FrozenBatchNormalization(
        axis=params["axis"] if len(params["axis"]) > 1 else params["axis"][0],
        epsilon=params["epsilon"],
        center=layer.center,
        scale=layer.scale,
        trainable_affine=trainable_affine,
        restore_config=_restore_config(layer),
        name=layer.name,
        dtype=layer.dtype_policy,
    )


def freeze_batch_norm(model: keras.Model, trainable_affine: bool = False) -> keras.Model:
    """A new model where every BN layer is a `FrozenBatchNormalization`.

    Keras and tfbn BN layers alike become frozen layers with the same statistics,
    gamma and beta (and counters); everything else is reused. The frozen layers
    normalise with their statistics whatever `training` says, which is what
    fine-tuning a pretrained backbone on small batches needs.

    Args:
        model: A built Sequential or Functional model (nested ones included).
        trainable_affine: If True, gamma and beta stay trainable.

    Returns:
        The new model; `unfreeze_batch_norm` reverses it.
    """

    def replace(layer):
        if not is_batch_norm(layer):
            return None
        return _frozen_from(layer, trainable_affine)

    return rewrite_layers(model, replace)[0]


def unfreeze_batch_norm(model: keras.Model) -> keras.Model:
    """The reverse of `freeze_batch_norm`: each FrozenBatchNormalization becomes a
    trainable tfbn `BatchNormalization` with the same statistics, gamma, beta and
    counters, and the arguments (momentum, synchronisation, ...) of the BN it froze."""

    def replace(layer):
        if not isinstance(layer, FrozenBatchNormalization):
            return None
        config = keras.saving.deserialize_keras_object(layer.restore_config) or {}
        config = {
            **config,
            "axis": layer.axis if len(layer.axis) > 1 else layer.axis[0],
            "epsilon": layer.epsilon,
            "center": layer.center,
            "scale": layer.scale,
            "name": layer.name,
            "dtype": layer.dtype_policy,
            "trainable": True,
        }
        return BatchNormalization.from_config(config)

    return rewrite_layers(model, replace)[0]


FOLD_TARGETS = (
    keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D,
    keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D,
    keras.layers.SeparableConv1D, keras.layers.SeparableConv2D,
    keras.layers.Dense,
)  # fmt: skip


@dataclass
class FoldReport:
    """What `fold_batch_norm` did: `folded` as (bn, into) layer-name pairs, and the
    BN layers that could not be folded and became FrozenBatchNormalization."""

    folded: list[tuple[str, str]] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)

    @property
    def nothing_folded(self) -> bool:
        return not self.folded

    def __str__(self) -> str:
        if not self.folded and not self.frozen:
            return "nothing folded: the model has no BatchNormalization layer"
        lines = [f"folded {len(self.folded)} BatchNormalization layer(s)"
                 + (f", froze {len(self.frozen)}" if self.frozen else "")]  # fmt: skip
        lines += [f"  {bn} -> folded into {into}" for bn, into in self.folded]
        lines += [f"  {bn} -> FrozenBatchNormalization" for bn in self.frozen]
        return "\n".join(lines)


def _graph_of(model: keras.Model):
    """The Functional graph behind a Sequential or Functional model, or None."""
    if isinstance(model, keras.Sequential):
        return getattr(model, "_functional", None)
    return model if isinstance(model, Functional) else None


def _foldable_into(producer, bn, channel_dim: int | None, rank: int) -> bool:
    """Whether `bn` (BN over `rank`-D outputs of `producer`) can fold into `producer`."""
    if not isinstance(producer, FOLD_TARGETS) or getattr(producer, "lora_enabled", False):
        return False
    if producer.dtype_policy.quantization_mode is not None:
        return False
    if producer.get_config().get("activation") not in ("linear", None):
        return False
    axis = bn.axis if isinstance(bn.axis, (list, tuple)) else [bn.axis]
    if len(axis) != 1 or channel_dim is None:
        return False
    channels_first = getattr(producer, "data_format", "channels_last") == "channels_first"
    return axis[0] % rank == (1 if channels_first else rank - 1)


def find_fold_pairs(model: keras.Model) -> list[tuple[keras.layers.Layer, keras.layers.Layer]]:
    """(producer, bn) pairs `fold_batch_norm` folds, in Sequential, Functional and nested models.

    A pair is a Conv1D/2D/3D, DepthwiseConv1D/2D, SeparableConv1D/2D or Dense layer
    with a linear activation whose output is consumed only by a BN layer normalising
    its channel axis; each layer of a pair is called exactly once in the whole model
    (folding changes the producer's kernel for every call).
    """
    graphs, stack = [], [model]
    while stack:
        graph = _graph_of(stack.pop())
        if graph is None:
            continue
        graphs.append(graph)
        stack.extend(op for op in graph.operations if isinstance(op, keras.Model))
    calls: dict[int, int] = {}
    candidates = []
    for graph in graphs:
        consumers: dict[int, int] = {}
        nodes = [
            node
            for op in graph.operations
            for i, node in enumerate(op._inbound_nodes)
            if make_node_key(op, i) in graph._nodes
        ]
        for node in nodes:
            calls[id(node.operation)] = calls.get(id(node.operation), 0) + 1
            for kt in node.input_tensors:
                consumers[id(kt)] = consumers.get(id(kt), 0) + 1
        for kt in graph.outputs:
            consumers[id(kt)] = consumers.get(id(kt), 0) + 1
        for node in nodes:
            bn = node.operation
            if not (is_batch_norm(bn) or isinstance(bn, FrozenBatchNormalization)):
                continue
            if len(node.input_tensors) != 1:
                continue
            kt = node.input_tensors[0]
            producer = kt._keras_history.operation
            rank = len(kt.shape)
            axis = bn.axis if isinstance(bn.axis, (list, tuple)) else [bn.axis]
            channel_dim = kt.shape[axis[0] % rank] if len(axis) == 1 else None
            if consumers.get(id(kt)) == 1 and _foldable_into(producer, bn, channel_dim, rank):
                candidates.append((producer, bn))
    return [(p, bn) for p, bn in candidates if calls[id(p)] == 1 and calls[id(bn)] == 1]


def _folded_producer(producer: keras.layers.Layer) -> keras.layers.Layer:
    """An unbuilt copy of `producer` with a bias (the fold needs one)."""
    config = {**producer.get_config(), "use_bias": True}
    return type(producer).from_config(config)


def _fold_weights(producer, bn, new: keras.layers.Layer) -> None:
    """Sets `new`'s weights to `producer`'s with `bn` folded in (float64 arithmetic)."""
    scale, offset = _scale_offset64(_bn_params(bn))
    to64 = lambda v: np.asarray(keras.ops.convert_to_numpy(v), np.float64)  # noqa: E731
    bias = to64(producer.bias) if producer.use_bias else np.zeros_like(offset)
    if isinstance(producer, (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)):
        new.depthwise_kernel.assign(keras.ops.convert_to_numpy(producer.depthwise_kernel))
        kernel, target = to64(producer.pointwise_kernel) * scale, new.pointwise_kernel
    elif isinstance(producer, (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)):
        kernel = to64(producer.kernel)  # (..., in, depth_multiplier): out = in * dm + m
        kernel, target = kernel * scale.reshape(kernel.shape[-2:]), new.kernel
    else:  # Conv*, Dense: (..., in, out)
        kernel, target = to64(producer.kernel) * scale, new.kernel
    target.assign(kernel.astype(target.dtype))
    new.bias.assign((bias * scale + offset).astype(new.bias.dtype))


def fold_batch_norm(
    model: keras.Model, return_report: bool = False
) -> keras.Model | tuple[keras.Model, FoldReport]:
    """An inference model with BatchNorm folded into the preceding kernels.

    Every BN (Keras's, tfbn's or frozen) found by `find_fold_pairs` is folded into
    its producer: with `scale, offset = stats.fold_scale_offset(gamma, beta,
    moving_mean, moving_variance, epsilon)`, the producer's kernel is multiplied by
    `scale` along its output channels and its bias becomes `bias * scale + offset`
    (a bias is added where `use_bias=False`); the BN layer becomes a
    `FoldedBatchNormalization` (the identity) of the same name, so input and
    output names stay. Any other BN becomes (or stays) a
    `FrozenBatchNormalization`. The result equals `model(x, training=False)` to
    float32 rounding and never uses batch statistics.

    Args:
        model: A built Sequential or Functional model (nested ones included).
        return_report: Also return a `FoldReport` (what was folded into what,
            what was frozen; `report.nothing_folded` for models without a pair).

    Returns:
        The new model, or `(model, report)` with `return_report=True`.
    """
    if not isinstance(model, keras.Model) or not model.built:
        rewrite_layers(model, lambda layer: None)  # raises the usual error
    pairs = find_fold_pairs(model)
    bn_of = {id(p): bn for p, bn in pairs}
    folded_bns = {id(bn): p for p, bn in pairs}
    report = FoldReport()

    def replace(layer):
        if id(layer) in bn_of:
            return _folded_producer(layer)
        if id(layer) in folded_bns:
            _bn_params(layer)  # same validation as a frozen layer gets
            report.folded.append((layer.name, folded_bns[id(layer)].name))
            return FoldedBatchNormalization(
                folded_into=folded_bns[id(layer)].name, name=layer.name, dtype=layer.dtype_policy
            )
        if is_batch_norm(layer):
            report.frozen.append(layer.name)
            return _frozen_from(layer, trainable_affine=False)
        return None

    def transfer(old, new):
        if id(old) in bn_of:
            _fold_weights(old, bn_of[id(old)], new)
        elif isinstance(new, FrozenBatchNormalization):
            copy_weights(old, new)

    new_model = rewrite_layers(model, replace, transfer)[0]
    return (new_model, report) if return_report else new_model


def batch_norm_layers(model: keras.layers.Layer) -> list[keras.layers.Layer]:
    """Every Keras and tfbn BN layer in `model`, nested models and layers included,
    each once, in the order the model tracks them."""
    _compat.check_not_legacy_keras(model)
    if is_batch_norm(model):
        return [model]
    flatten = getattr(model, "_flatten_layers", None)
    layers = flatten(include_self=False, recursive=True) if flatten else getattr(model, "layers", [])
    return [layer for layer in layers if is_batch_norm(layer)]


def reset_running_stats(model: keras.Model, inplace: bool = False) -> keras.Model:
    """Running statistics back to their initial values (PyTorch's `reset_running_stats`).

    Every BN layer's `moving_mean`/`moving_variance` are set from its
    `moving_mean_initializer`/`moving_variance_initializer` (zeros/ones by
    default) and tfbn's counters to 0; gamma, beta and every other weight are kept.
    Use it before `tfbn.recalibrate` or before training on a new domain.

    Args:
        model: A built model with at least one BN layer.
        inplace: False (default) returns a new model like the other rewrites here
            (Sequential/Functional only; untouched layers are shared). True resets
            the layers of `model` itself (any model, subclassed ones too) and
            returns `model`.

    Returns:
        The model with reset running statistics.
    """
    _compat.check_not_legacy_keras(model)
    if not isinstance(model, keras.layers.Layer) or not model.built:
        raise ValueError(
            "reset_running_stats needs a built keras.Model. Received: "
            f"{type(model).__name__}{'' if getattr(model, 'built', False) else ' (not built)'}"
        )
    layers = batch_norm_layers(model)
    if not layers:
        raise ValueError(
            f"Model '{model.name}' has no BatchNormalization layer (Keras or tfbn): "
            "there are no running statistics to reset."
        )
    if inplace:
        for layer in layers:
            _reset_layer_stats(layer)
        return model

    def replace(layer):
        return type(layer).from_config(layer.get_config()) if is_batch_norm(layer) else None

    def transfer(old, new):
        copy_weights(old, new)
        _reset_layer_stats(new)

    return rewrite_layers(model, replace, transfer)[0]


def _reset_layer_stats(layer: keras.layers.Layer) -> None:
    for name in ("moving_mean", "moving_variance"):
        variable = getattr(layer, name)
        initializer = getattr(layer, f"{name}_initializer")
        variable.assign(initializer(variable.shape, variable.dtype))
    for name in COUNTER_NAMES:
        counter = getattr(layer, name, None)
        if counter is not None:
            counter.assign(0)
