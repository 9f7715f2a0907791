"""Model rewrites: each returns a new, independent model with the original's dtype policy.

Every rewrite here (`convert_batch_norm`, `convert_sync_batch_norm` /
`revert_sync_batch_norm`, `freeze_batch_norm` / `unfreeze_batch_norm`,
`fold_batch_norm`, `reset_running_stats`) goes through `rewrite_layers`:

- **New.** The result is a new model whose every layer and every variable is new,
  created when the rewrite runs, so inside `strategy.scope()` they are the
  strategy's (mirrored) variables. Layers the rewrite does not replace are cloned
  from their config (`type(layer).from_config(layer.get_config())`), layers it
  replaces are built from the old layer's arguments.
- **Copied.** Every variable's value (weights, BN statistics, tfbn's counters,
  random-seed state) is copied; each layer's and each model's dtype policy,
  `trainable` flag, name and the model's compile configuration are kept.
  Optimizer state (e.g. Adam's moments, the iteration count) is NOT carried: a
  compiled model comes back compiled with a fresh optimizer of the same config.
- **Shared.** Nothing, unless `inplace=True`: then the layers the rewrite does not
  replace, and their variables, are shared with the original (for subclassed
  models, the original itself is changed and returned).

Models: Sequential and Functional (nested models, layers called twice, several
inputs/outputs, custom layers with a working `get_config`). BN layers inside a
custom layer or a subclassed model are swapped where they are held: as an
attribute, or in a list or dict attribute, as PyTorch's and timm's converters do.
A subclassed model is cloned with `type(model).from_config(model.get_config())`
(so its constructor arguments must be serialisable) or, with `inplace=True`,
changed in place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import keras
import numpy as np

from tfbn import _compat, graph, stats
from tfbn.layers.batch_norm import COUNTER_NAMES, BatchNormalization
from tfbn.layers.frozen_batch_norm import FoldedBatchNormalization, FrozenBatchNormalization
from tfbn.report import Report, json_safe

BN_TYPES = (keras.layers.BatchNormalization, BatchNormalization)
# Constructor arguments both BN layers share, so a conversion carries them over.
KERAS_BN_ARGS = (
    "axis", "momentum", "epsilon", "center", "scale",
    "beta_initializer", "gamma_initializer", "moving_mean_initializer",
    "moving_variance_initializer", "beta_regularizer", "gamma_regularizer",
    "beta_constraint", "gamma_constraint", "name", "dtype", "trainable",
    "renorm", "renorm_clipping", "renorm_momentum",
)  # fmt: skip
# Kept for callers of the old name: the types BN folds into (see tfbn.graph.PRODUCERS).
FOLD_TARGETS = graph.FOLDABLE_TYPES


def is_keras_batch_norm(layer: keras.layers.Layer) -> bool:
    """True for Keras's own BatchNormalization only (tfbn's layer subclasses it, so
    `isinstance(layer, keras.layers.BatchNormalization)` is True for both)."""
    return isinstance(layer, keras.layers.BatchNormalization) and not isinstance(
        layer, BatchNormalization
    )


def is_batch_norm(layer: keras.layers.Layer) -> bool:
    """True for `keras.layers.BatchNormalization` and tfbn's BatchNormalization."""
    return isinstance(layer, BN_TYPES)


class CloneError(ValueError):
    """A layer or model could not be rebuilt for a rewrite; the message says which and why."""


# ------------------------------------------------------------------ engine --

Replace = Callable[[keras.layers.Layer], "keras.layers.Layer | None"]
Transfer = Callable[[keras.layers.Layer, keras.layers.Layer], None]


@dataclass
class _Rewrite:
    replace: Replace
    transfer: Transfer
    match: Callable[[keras.layers.Layer], bool]
    cache: dict = field(default_factory=dict)  # id(old layer) -> its counterpart
    replaced: list = field(default_factory=list)  # (old, new): built by `replace`
    pending: list = field(default_factory=list)  # replaced pairs still waiting for weights
    cloned: list = field(default_factory=list)  # (old, new): rebuilt from the config
    kept: list = field(default_factory=list)  # layers shared with the original (inplace)


def rewrite_layers(
    model: keras.Model,
    replace: Replace,
    transfer: Transfer | None = None,
    inplace: bool = False,
    match: Callable[[keras.layers.Layer], bool] | None = None,
) -> tuple[keras.Model, list[tuple[keras.layers.Layer, keras.layers.Layer]]]:
    """Rebuilds `model`, swapping each layer for which `replace(layer)` is not None.

    Sequential and Functional models (nested ones too) are rebuilt along their
    graph; a layer called twice is rebuilt once and called twice. Every layer not
    replaced is cloned from its config and gets a copy of all its variables
    (`inplace=True`: reused as it is). Layers held inside a custom layer or a
    subclassed model are swapped where they are held (an attribute, or an item of
    a list or dict attribute). A subclassed model is cloned through
    `type(model).from_config(model.get_config())` and built with its build config
    (`inplace=True`: changed in place and returned). Layer and model dtype
    policies, `trainable`, names and the compile configuration are kept (a fresh
    optimizer: its state is not carried).

    Args:
        model: A built keras.Model.
        replace: Returns the new (unbuilt) layer for a layer, or None to keep it.
        transfer: Called as `transfer(old, new)` once `new` is built, to give it
            its weights; default `copy_weights`.
        inplace: Share (do not clone) the layers `replace` keeps; a subclassed
            model is changed in place.
        match: Which layers `replace` is meant to replace. It decides which
            custom layers of a graph are searched for layers to swap, and a
            matching layer left where it cannot be reassigned (a tuple, a
            closure) raises CloneError. Default: none (custom layers of a graph
            are cloned without looking inside; a subclassed model's attributes
            are still searched).

    Returns:
        `(new_model, [(old_layer, new_layer), ...])` for the replaced layers.

    Raises:
        ValueError: the model is not a built keras.Model.
        CloneError: a layer or subclassed model cannot be rebuilt from its config,
            or a layer to replace is held where it cannot be reassigned; the
            message names it and says what to do.
    """
    _check_model(model)
    if not isinstance(inplace, bool):
        raise ValueError(f"`inplace` must be True or False. Received: inplace={inplace!r}")
    rw = _Rewrite(replace, transfer or copy_weights, match or (lambda layer: False))
    if graph.is_graph_model(model):
        new_model = _rewrite_graph(model, rw, inplace)
        _finish_graph(rw)
    else:
        target = model if inplace else _clone_subclassed(model)
        _swap_in(target, rw, set())
        _check_nothing_left(target, rw)
        new_model = target
    return new_model, rw.replaced


def _check_model(model) -> None:
    _compat.check_not_legacy_keras(model)
    if not isinstance(model, keras.Model) or not model.built:
        raise ValueError(
            "Expected a built keras.Model (Sequential, Functional or subclassed). Received: "
            f"{type(model).__name__}{'' if getattr(model, 'built', False) else ' (not built)'}"
        )


def _rewrite_graph(model: keras.Model, rw: _Rewrite, inplace: bool) -> keras.Model:
    """Rebuilds a Sequential/Functional model along its graph (new model object)."""

    def clone_function(layer):
        key = id(layer)
        if key in rw.cache:
            return rw.cache[key]
        if not isinstance(layer, keras.layers.Layer):
            return layer  # a keras.ops operation in the graph (`x + 3`): no state, reused
        if graph.is_graph_model(layer):
            new = _rewrite_graph(layer, rw, inplace)
        else:
            new = rw.replace(layer)
            if new is not None:
                rw.replaced.append((layer, new))
                rw.pending.append((layer, new))
            elif inplace:
                new = layer
                rw.kept.append(layer)
            else:
                new = _clone_layer(layer)
                if new is layer:  # stateless and not clonable (a Lambda): shared, no state
                    rw.kept.append(layer)
                else:
                    rw.cloned.append((layer, new))
        rw.cache[key] = new
        return new

    with _global_policy(model.dtype_policy):
        new_model = keras.models.clone_model(model, clone_function=clone_function)
    _keep_model_attributes(model, new_model)
    return new_model


def _finish_graph(rw: _Rewrite) -> None:
    """Copies weights into the built graph clone and swaps layers held inside layers."""
    cloned, pending, kept = rw.cloned, rw.pending, rw.kept
    rw.cloned, rw.pending, rw.kept = [], [], []
    for old, new in cloned:
        _copy_variables(old, new)
    for old, new in pending:
        rw.transfer(old, new)
    visited: set = set()
    for layer in [new for _, new in cloned] + kept:
        if _holds_match(layer, rw):
            _swap_in(layer, rw, visited)
            _check_nothing_left(layer, rw)


def _keep_model_attributes(model: keras.Model, new_model: keras.Model) -> None:
    """The model-level facts `clone_model` drops: dtype policy and `trainable`."""
    new_model.dtype_policy = model.dtype_policy
    if new_model.trainable != model.trainable:
        new_model.trainable = model.trainable
    if model.compiled:  # compile again: loss scaling depends on the model's policy
        new_model.compile_from_config(model.get_compile_config())


class _global_policy:
    """Temporarily makes `policy` the global dtype policy (what a clone is built under)."""

    def __init__(self, policy):
        self.policy = policy

    def __enter__(self):
        self.previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy(self.policy)

    def __exit__(self, *exc):
        keras.config.set_dtype_policy(self.previous)


def _clone_layer(layer: keras.layers.Layer) -> keras.layers.Layer:
    """A new layer from `layer`'s config; `layer` itself if that fails and it holds no
    state at all (a `Lambda` of a Python lambda: sharing it shares no variable)."""
    try:
        return type(layer).from_config(layer.get_config())
    except Exception as err:  # noqa: BLE001 - any failure of user code is reported the same way
        if not layer.variables and not layer._flatten_layers(include_self=False):
            return layer
        raise CloneError(
            f"Layer '{layer.name}' ({type(layer).__name__}) cannot be rebuilt from its config: "
            f"{type(err).__name__}: {err}. Give {type(layer).__name__} a get_config() that "
            "returns all its constructor arguments (and a from_config() if they need "
            "deserialising), or pass inplace=True to share this layer with the original model."
        ) from err


def _describe_variables(layer) -> str:
    return ", ".join(f"{v.path} {tuple(v.shape)}" for v in layer.variables) or "none"


def _copy_variables(old: keras.layers.Layer, new: keras.layers.Layer) -> None:
    """Assigns every variable of `old` (weights, counters, seed state) to `new`."""
    src, dst = old.variables, new.variables
    if len(src) != len(dst) or any(tuple(a.shape) != tuple(b.shape) for a, b in zip(src, dst)):
        raise CloneError(
            f"Layer '{old.name}' ({type(old).__name__}) rebuilt from its config does not have "
            f"the original's variables (original: {_describe_variables(old)}; rebuilt: "
            f"{_describe_variables(new)}): its get_config() misses an argument that shapes "
            "them. Fix get_config(), or pass inplace=True to share the layer."
        )
    for a, b in zip(src, dst):
        b.assign(keras.ops.convert_to_numpy(a.value))


def _build_like(old: keras.layers.Layer, new: keras.layers.Layer) -> None:
    config = old.get_build_config() if old.built else None
    if not config:
        raise CloneError(
            f"Layer '{old.name}' ({type(old).__name__}) is not built or did not record the "
            "shape it was built with; call the model on data (or build it) first."
        )
    new.build_from_config(config)


def _holds_match(layer, rw: _Rewrite) -> bool:
    flatten = getattr(layer, "_flatten_layers", None)
    return bool(flatten) and any(rw.match(inner) for inner in flatten(include_self=False))


# -------------------------------------------------- subclassed models, inner layers --

_INTERNAL = frozenset({"_layers", "_tracker", "_inbound_nodes", "_outbound_nodes"})


def _clone_subclassed(model: keras.Model) -> keras.Model:
    """A new instance of a subclassed model, built and with all variables copied."""
    cls = type(model).__name__
    advice = (
        f"or pass inplace=True to swap the layers of '{model.name}' itself (its other "
        "variables stay shared; create it inside strategy.scope() if you train it under a "
        "strategy), or build the model as a Functional model."
    )
    with _global_policy(model.dtype_policy):
        try:
            clone = _from_config(model)
        except Exception as err:  # noqa: BLE001 - user code
            raise CloneError(
                f"Subclassed model '{model.name}' ({cls}) cannot be rebuilt from its config "
                f"({type(err).__name__}: {err}). Give {cls} a get_config() returning its "
                f"constructor arguments, {advice}"
            ) from err
        old_layers, new_layers = (
            [x for x in m._flatten_layers(include_self=False, recursive=True)
             if not isinstance(x, keras.layers.InputLayer)]  # a Sequential adds it when built
            for m in (model, clone)
        )  # fmt: skip
        if [type(x) for x in old_layers] != [type(x) for x in new_layers]:
            raise CloneError(
                f"Subclassed model '{model.name}' ({cls}) rebuilt from its config has different "
                "layers than the original (its get_config() misses an argument, or layers "
                "were added or swapped after construction, e.g. by an earlier rewrite: a "
                "rewritten subclassed model already has its own variables, so rewrite it "
                f"again with inplace=True); fix get_config(), {advice}"
            )
        for old, new in zip(old_layers, new_layers):
            new.name = old.name  # auto-generated names differ; variables are named at build
            if not new.built and new.dtype_policy.name != old.dtype_policy.name:
                new.dtype_policy = old.dtype_policy
        build_config = model.get_build_config()
        try:
            if not build_config:
                raise ValueError("no build config (the model was never called or built)")
            clone.build_from_config(build_config)  # runs the model on symbolic inputs
            unbuilt = [x.name for x in clone._flatten_layers(include_self=False) if not x.built]
            if unbuilt:
                raise ValueError(f"layers {unbuilt} were not built")
            clone.built = True  # Keras leaves that to its loader
        except Exception as err:  # noqa: BLE001 - user code
            raise CloneError(
                f"Subclassed model '{model.name}' ({cls}) rebuilt from its config cannot be "
                f"built like the original ({type(err).__name__}: {err}); call the original on "
                f"data first, {advice}"
            ) from err
    clone.dtype_policy = model.dtype_policy
    _copy_variables(model, clone)
    if model.compiled:
        clone.compile_from_config(model.get_compile_config())
    return clone


def _from_config(model: keras.Model) -> keras.Model:
    """`type(model).from_config(model.get_config())`; a subclass whose constructor takes
    no base arguments (`name`, `trainable`, `dtype`) is built without them."""
    config = model.get_config()
    try:
        clone = type(model).from_config(config)
    except TypeError:
        own = {k: v for k, v in config.items() if k not in ("name", "trainable", "dtype")}
        try:
            clone = type(model)(**own)
        except TypeError:
            pass
        else:
            clone.name = model.name
            return clone
        raise
    return clone


def _swap_in(parent, rw: _Rewrite, visited: set) -> None:
    """Swaps the layers `rw` replaces where `parent` holds them (attributes, lists, dicts)."""
    if id(parent) in visited:
        return
    visited.add(id(parent))
    for name, value in list(vars(parent).items()):
        if name in _INTERNAL:
            continue
        if isinstance(value, keras.layers.Layer):
            new = _swapped(value, rw, visited)
            if new is not value:
                _retrack(parent, value, new)
                object.__setattr__(parent, name, new)
        elif isinstance(value, (list, dict)):
            keys = range(len(value)) if isinstance(value, list) else list(value)
            for key in keys:
                item = value[key]
                if isinstance(item, keras.layers.Layer):
                    new = _swapped(item, rw, visited)
                    if new is not item:
                        _retrack(parent, item, new)
                        value[key] = new


def _swapped(layer, rw: _Rewrite, visited: set):
    """The layer to hold instead of `layer` (itself, with its inner layers swapped, if kept)."""
    if id(layer) in rw.cache:
        return rw.cache[id(layer)]
    if graph.is_graph_model(layer):
        new = _rewrite_graph(layer, rw, inplace=True) if _holds_match(layer, rw) else layer
        _finish_graph(rw)  # the inner graph's replaced layers get their weights
    else:
        new = rw.replace(layer)
        if new is not None:
            _build_like(layer, new)
            rw.transfer(layer, new)
            rw.replaced.append((layer, new))
        else:
            _swap_in(layer, rw, visited)
            new = layer
    rw.cache[id(layer)] = new
    return new


def _retrack(parent, old, new) -> None:
    """Makes `parent` track `new` where it tracked `old` (same position: same weight order)."""
    tracker = getattr(parent, "_tracker", None)
    if tracker is None or not tracker.is_in_store("layers", old):
        return
    if tracker.is_in_store("layers", new):
        tracker.untrack(old)
    else:
        tracker.replace_tracked_value("layers", old, new)


def _check_nothing_left(root, rw: _Rewrite) -> None:
    new = {id(layer) for _, layer in rw.replaced}
    for parent in [root, *root._flatten_layers(include_self=False, recursive=True)]:
        for inner in getattr(parent, "_layers", []):
            if rw.match(inner) and id(inner) not in new:
                raise CloneError(
                    f"Layer '{inner.name}' ({type(inner).__name__}) in '{parent.name}' "
                    f"({type(parent).__name__}) is not held in an attribute, a list or a dict "
                    "attribute, so it cannot be replaced. Hold it in one (e.g. self.bn = ..., "
                    "self.blocks = [...]), or build the model with the layer you want directly."
                )


# ----------------------------------------------------------------- weights --


def copy_weights(old: keras.layers.Layer, new: keras.layers.Layer) -> None:
    """Copies weights (and tfbn counters, where both layers have them) from old to new.

    Same weight count: in order. Otherwise (a batch-renorm BN frozen into the four
    weights of a FrozenBatchNormalization, or unfrozen back) by weight name; a
    renorm layer that receives no renorm state gets the consistent one derived
    from its moving statistics (`moving_stddev = renorm_stddev =
    sqrt(moving_variance + epsilon)`, `renorm_mean = moving_mean`).
    """
    if len(old.weights) == len(new.weights):
        new.set_weights(old.get_weights())
    else:
        source = {w.name: w for w in old.weights}
        for w in new.weights:
            if w.name in source:
                w.assign(np.asarray(source[w.name]))
        if getattr(new, "renorm", False) and "moving_stddev" not in source:
            stddev = np.sqrt(np.asarray(new.moving_variance) + new.epsilon)
            new.moving_stddev.assign(stddev)
            new.renorm_stddev.assign(stddev)
            new.renorm_mean.assign(np.asarray(new.moving_mean))
    for name in COUNTER_NAMES:
        src, dst = getattr(old, name, None), getattr(new, name, None)
        if src is not None and dst is not None:
            dst.assign(np.asarray(src))


def batch_norm_config(layer: keras.layers.Layer) -> dict:
    """The constructor arguments of a BN layer that tfbn's BatchNormalization accepts."""
    config = layer.get_config()
    if isinstance(layer, BatchNormalization):
        return config
    # Renorm layers convert too: tfbn's has Keras's renorm arguments and variables.
    return {k: config[k] for k in KERAS_BN_ARGS if k in config}


_WHAT_HAPPENS = """
    The result is a new model: every layer and variable is new (created in the
    current `tf.distribute` scope), every variable's value is copied, and each
    layer's and the model's dtype policy, names and compile configuration are kept;
    the original is not changed by training the result. Optimizer state is not
    carried (a compiled model is compiled again with a fresh optimizer). With
    `inplace=True` the layers this rewrite does not replace (and their variables)
    are shared with the original instead, and a subclassed model is changed in
    place and returned. See `rewrite_layers` for the models supported.
"""


def convert_batch_norm(model: keras.Model, inplace: bool = False) -> keras.Model:
    """A new model where every `keras.layers.BatchNormalization` is a tfbn BatchNormalization.

    The one-call way to make an existing model (a Keras Application, a loaded
    `.keras` file, a subclassed model) use tfbn's fused layer: each Keras BN
    becomes `tfbn.BatchNormalization` with the same arguments (axis, momentum,
    epsilon, initializers, regularizers, constraints, `synchronized`), name, dtype
    policy, `trainable` flag and weights; layers that already are tfbn's are cloned
    as they are. Outputs are unchanged (inference, and training up to rounding).
    """
    _check_model(model)

    def replace(layer):
        if not is_keras_batch_norm(layer):
            return None
        config = batch_norm_config(layer)
        config["synchronized"] = bool(layer.get_config().get("synchronized", False))
        return BatchNormalization.from_config(config)

    return rewrite_layers(model, replace, inplace=inplace, match=is_keras_batch_norm)[0]


def convert_sync_batch_norm(
    model: keras.Model, sync_group_size: int | None = None, inplace: bool = False
) -> keras.Model:
    """A new model where every BN layer is a synchronised tfbn BatchNormalization.

    Keras and tfbn BN layers alike become `tfbn.BatchNormalization(synchronized=True)`
    with the same arguments, weights and counters (a layer with `virtual_batch_size`
    is a ValueError: ghost batches are per replica). Call it inside `strategy.scope()`
    (the model may have been built outside it): the new model's variables are then
    the strategy's.
    """
    _check_model(model)

    def replace(layer):
        if not is_batch_norm(layer):
            return None
        config = {**batch_norm_config(layer), "synchronized": True}
        if config.get("virtual_batch_size") is not None:
            raise ValueError(
                f"Layer '{layer.name}' has virtual_batch_size="
                f"{config['virtual_batch_size']}: ghost batches are per replica and "
                "cannot be synchronised. Accepted: BN layers without virtual_batch_size "
                "(set it to None first, or leave this model unsynchronised)."
            )
        config["sync_group_size"] = sync_group_size
        return BatchNormalization.from_config(config)

    return rewrite_layers(model, replace, inplace=inplace, match=is_batch_norm)[0]


def revert_sync_batch_norm(model: keras.Model, inplace: bool = False) -> keras.Model:
    """The reverse of `convert_sync_batch_norm`: synchronised BN becomes local tfbn BN."""

    def is_synced(layer):
        return isinstance(layer, BatchNormalization) and layer.synchronized

    def replace(layer):
        if not is_synced(layer):
            return None
        config = {**layer.get_config(), "synchronized": False, "sync_group_size": None}
        return BatchNormalization.from_config(config)

    return rewrite_layers(model, replace, inplace=inplace, match=is_synced)[0]


for _fn in (convert_batch_norm, convert_sync_batch_norm, revert_sync_batch_norm):
    if _fn.__doc__:  # None under python -OO
        _fn.__doc__ += _WHAT_HAPPENS


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
    config = batch_norm_config(layer)
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


def freeze_batch_norm(
    model: keras.Model, trainable_affine: bool = False, inplace: bool = False
) -> keras.Model:
    """A new model where every BN layer is a `FrozenBatchNormalization`.

    Keras and tfbn BN layers alike become frozen layers with the same statistics,
    gamma and beta (and counters). The frozen layers normalise with their
    statistics whatever `training` says, which is what fine-tuning a pretrained
    backbone on small batches needs.

    Args:
        model: A built keras.Model (see `rewrite_layers`).
        trainable_affine: If True, gamma and beta stay trainable.
        inplace: Share the other layers with `model` (see below).

    Returns:
        The new model; `unfreeze_batch_norm` reverses it.
    """

    def replace(layer):
        return _frozen_from(layer, trainable_affine) if is_batch_norm(layer) else None

    return rewrite_layers(model, replace, inplace=inplace, match=is_batch_norm)[0]


def unfreeze_batch_norm(model: keras.Model, inplace: bool = False) -> keras.Model:
    """The reverse of `freeze_batch_norm`: each FrozenBatchNormalization becomes a
    trainable tfbn `BatchNormalization` with the same statistics, gamma, beta and
    counters, and the arguments (momentum, synchronisation, ...) of the BN it froze."""

    def is_frozen(layer):
        return isinstance(layer, FrozenBatchNormalization)

    def replace(layer):
        if not is_frozen(layer):
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

    return rewrite_layers(model, replace, inplace=inplace, match=is_frozen)[0]


for _fn in (freeze_batch_norm, unfreeze_batch_norm):
    if _fn.__doc__:
        _fn.__doc__ += _WHAT_HAPPENS


@dataclass
class FoldReport(Report):
    """What `fold_batch_norm` did: `folded` as (bn, into) layer-name pairs, and the
    BN layers that could not be folded and became FrozenBatchNormalization.

    `ok` is always True: folding has no failure mode of its own (a BN layer that
    cannot be folded is frozen, which computes the same thing; errors raise).
    """

    folded: list[tuple[str, str]] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)

    @property
    def nothing_folded(self) -> bool:
        return not self.folded

    @property
    def ok(self) -> bool:
        return True

    def format(self) -> str:
        if not self.folded and not self.frozen:
            return "nothing folded: the model has no BatchNormalization layer"
        lines = [f"folded {len(self.folded)} BatchNormalization layer(s)"
                 + (f", froze {len(self.frozen)}" if self.frozen else "")]  # fmt: skip
        lines += [f"  {bn} -> folded into {into}" for bn, into in self.folded]
        lines += [f"  {bn} -> FrozenBatchNormalization" for bn in self.frozen]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return json_safe(
            {
                "ok": self.ok,
                "folded": [{"batch_norm": bn, "into": into} for bn, into in self.folded],
                "frozen": self.frozen,
            }
        )


def _foldable_into(producer, bn, shape: tuple) -> bool:
    """Whether `bn` (BN over outputs of `producer` of `shape`) can fold into `producer`."""
    if graph.fold_rule(producer) is None or getattr(producer, "lora_enabled", False):
        return False
    if producer.dtype_policy.quantization_mode is not None:
        return False
    if producer.get_config().get("activation") not in ("linear", None):
        return False
    rank = len(shape)
    axes = graph.channel_axes(bn.axis, rank)
    channel = graph.producer_channel_axis(producer, rank)
    return axes == [channel] and shape[channel] is not None


def find_fold_pairs(model: keras.Model) -> list[tuple[keras.layers.Layer, keras.layers.Layer]]:
    """(producer, bn) pairs `fold_batch_norm` folds, in Sequential, Functional and nested models.

    A pair is a layer of a foldable type of `tfbn.graph.PRODUCERS` (Conv1D/2D/3D,
    their transposes, DepthwiseConv1D/2D, SeparableConv1D/2D, Dense) with a linear
    activation whose output is consumed only by a BN layer normalising its channel
    axis; each layer of a pair is called exactly once in the whole model (folding
    changes the producer's kernel for every call). Subclassed models have no
    known graph: no pairs.
    """
    calls = graph.call_counts(model)
    pairs = []
    for call in graph.single_input_calls(model):
        bn, producer = call.layer, call.producer
        if not (is_batch_norm(bn) or isinstance(bn, FrozenBatchNormalization)):
            continue
        if (call.consumers == 1 and calls.get(id(producer)) == 1 and calls.get(id(bn)) == 1
                and _foldable_into(producer, bn, call.shape)):  # fmt: skip
            pairs.append((producer, bn))
    return pairs


def _folded_producer(producer: keras.layers.Layer) -> keras.layers.Layer:
    """An unbuilt copy of `producer` with a bias (the fold needs one)."""
    config = {**producer.get_config(), "use_bias": True}
    return type(producer).from_config(config)


def _fold_weights(producer, bn, new: keras.layers.Layer) -> None:
    """Sets `new`'s weights to `producer`'s with `bn` folded in (float64 arithmetic),
    scaling the kernel as `tfbn.graph.PRODUCERS` says for the producer's type."""
    rule = graph.fold_rule(producer)
    scale, offset = _scale_offset64(_bn_params(bn))
    to64 = lambda v: np.asarray(keras.ops.convert_to_numpy(v), np.float64)  # noqa: E731
    for name in rule.copy:
        getattr(new, name).assign(keras.ops.convert_to_numpy(getattr(producer, name)))
    target = getattr(new, rule.kernel)
    kernel = rule.scale_kernel(to64(getattr(producer, rule.kernel)), scale)
    target.assign(kernel.astype(target.dtype))
    bias = to64(producer.bias) if producer.use_bias else np.zeros_like(offset)
    new.bias.assign((bias * scale + offset).astype(new.bias.dtype))


def fold_batch_norm(
    model: keras.Model, return_report: bool = False
) -> keras.Model | tuple[keras.Model, FoldReport]:
    """An inference model with BatchNorm folded into the preceding kernels.

    Every BN (Keras's, tfbn's or frozen) found by `find_fold_pairs` is folded into
    its producer: with `scale, offset = stats.fold_scale_offset(gamma, beta,
    moving_mean, moving_variance, epsilon)` in float64, the producer's kernel is
    multiplied by `scale` along its output channels (where that axis is depends
    on the type: `tfbn.graph.PRODUCERS`) and its bias becomes
    `bias * scale + offset` (a bias is added where `use_bias=False`); the BN layer
    becomes a `FoldedBatchNormalization` (the identity) of the same name, so input
    and output names stay. Any other BN becomes (or stays) a
    `FrozenBatchNormalization`: in a subclassed model, whose graph is unknown,
    every BN is frozen (swapped where it is held), none folded. The result equals
    `model(x, training=False)` to float32 rounding and never uses batch statistics.
    It is a new model like every rewrite here (all variables new and copied,
    dtype policies kept); the original is unchanged.

    Args:
        model: A built keras.Model (see `rewrite_layers`).
        return_report: Also return a `FoldReport` (what was folded into what,
            what was frozen; `report.nothing_folded` for models without a pair).

    Returns:
        The new model, or `(model, report)` with `return_report=True`.
    """
    _check_model(model)
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

    new_model = rewrite_layers(model, replace, transfer, match=is_batch_norm)[0]
    return (new_model, report) if return_report else new_model


def as_graph_model(model: keras.Model) -> keras.Model:
    """`model` itself if it is Sequential or Functional; a subclassed model wrapped in a
    Functional model (one input of the shape it was built with, one call of it).

    What `tfbn.export_saved_model` needs from a subclassed model: a signature to
    export (the wrapper's input and output) and a graph to rewrite, in which the
    subclassed model is one layer, so `fold_batch_norm` freezes its BN layers
    (folding needs the graph inside it, which is unknown).

    Raises:
        ValueError: the subclassed model did not record a single input shape (it was
            never built or called, or it takes several inputs): says what to do.
    """
    if not isinstance(model, keras.Model) or graph.is_graph_model(model) or not model.built:
        return model
    shape = (model.get_build_config() or {}).get("input_shape")
    if not (isinstance(shape, (list, tuple)) and len(shape) >= 1
            and all(d is None or isinstance(d, int) for d in shape)):  # fmt: skip
        raise ValueError(
            f"Subclassed model '{model.name}' ({type(model).__name__}) has no single recorded "
            f"input shape (build config: {model.get_build_config()!r}). Call it on a batch "
            "(or model.build(input_shape)) first, or wrap it yourself: inputs = keras.Input(...); "
            "keras.Model(inputs, model(inputs))."
        )
    inputs = keras.Input(batch_shape=(None, *tuple(shape)[1:]), name="input")
    try:
        outputs = model(inputs)
    except Exception as err:  # noqa: BLE001 - user code (e.g. a call taking two inputs)
        raise ValueError(
            f"Subclassed model '{model.name}' ({type(model).__name__}) cannot be called on one "
            f"input of shape {inputs.shape} ({type(err).__name__}: {err}); it has no single "
            "recorded input shape to export. Wrap it yourself: inputs = keras.Input(...); "
            "keras.Model(inputs, model(inputs)), and export that."
        ) from err
    return keras.Model(inputs, outputs, name=model.name)


def batch_norm_layers(model: keras.layers.Layer) -> list[keras.layers.Layer]:
    """Every Keras and tfbn BN layer in `model`, nested models and layers included,
    each once, in the order the model tracks them."""
    _compat.check_not_legacy_keras(model)
    if is_batch_norm(model):
        return [model]
    flatten = getattr(model, "_flatten_layers", None)
    layers = (
        flatten(include_self=False, recursive=True) if flatten else getattr(model, "layers", [])
    )
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
            (every variable new and copied, then the statistics reset). True resets
            the layers of `model` itself (any model) and returns `model`.

    Returns:
        The model with reset running statistics.
    """
    _compat.check_not_legacy_keras(model)
    if not isinstance(model, keras.layers.Layer) or not model.built:
        raise ValueError(
            "reset_running_stats needs a built keras.Model. Received: "
            f"{type(model).__name__}{'' if getattr(model, 'built', False) else ' (not built)'}"
        )
    if not batch_norm_layers(model):
        raise ValueError(
            f"Model '{model.name}' has no BatchNormalization layer (Keras or tfbn): "
            "there are no running statistics to reset."
        )
    if not inplace:
        model = rewrite_layers(model, lambda layer: None)[0]
    for layer in batch_norm_layers(model):
        _reset_layer_stats(layer)
    return model


def _reset_layer_stats(layer: keras.layers.Layer) -> None:
    for name in ("moving_mean", "moving_variance"):
        variable = getattr(layer, name)
        initializer = getattr(layer, f"{name}_initializer")
        variable.assign(initializer(variable.shape, variable.dtype))
    for name in COUNTER_NAMES:
        counter = getattr(layer, name, None)
        if counter is not None:
            counter.assign(0)
