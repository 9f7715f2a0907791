"""tfbn's Keras layers."""

from tfbn.layers.batch_norm import BatchNormalization, SyncBatchNormalization
from tfbn.layers.frozen_batch_norm import FrozenBatchNormalization

__all__ = ["BatchNormalization", "SyncBatchNormalization", "FrozenBatchNormalization"]
