"""tfbn's Keras layers."""

from tfbn.layers.batch_norm import BatchNormalization, SyncBatchNormalization

__all__ = ["BatchNormalization", "SyncBatchNormalization"]
