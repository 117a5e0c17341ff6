"""Images to batches: data sets and splits, transforms, sampling, and the loaders that run them.

The names below are the ones the tasks, the benchmarks and the YAML `_target_`s use; each lives in the module of
its concern (`datasets`, `transforms`, `sampling`, `on_device`, `loading`).
"""

from vitexp.data.datasets import Splits, TransformSubset, digits_splits, image_splits, make_splits, split_indices
from vitexp.data.loading import loaders, make_loader, set_epoch
from vitexp.data.on_device import CropFlip, DeviceLoader, to_device
from vitexp.data.sampling import ShardedSampler, uniform_draws
from vitexp.data.transforms import eval_transform, train_transform

__all__ = [
    "CropFlip",
    "DeviceLoader",
    "ShardedSampler",
    "Splits",
    "TransformSubset",
    "digits_splits",
    "eval_transform",
    "image_splits",
    "loaders",
    "make_loader",
    "make_splits",
    "set_epoch",
    "split_indices",
    "to_device",
    "train_transform",
    "uniform_draws",
]
