"""Model rewrites that return a new model and only replace what changed.

Every rewrite goes through `rewrite_layers`: the model (Sequential, Functional,
nested) is cloned with `keras.models.clone_model(recursive=True)`; layers the
rewrite does not touch are reused as they are (shared, with their weights), and
each replaced layer gets its weights from the layer it replaces.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
from keras.src.models.functional import Functional

from tfbn.layers.batch_norm import COUNTER_NAMES, BatchNormalization

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

