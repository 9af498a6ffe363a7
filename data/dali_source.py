"""The DALI pipelines' input: one external_source callback that reads each sample and decides its geometry.

It is a pure function of DALI's SampleInfo (epoch_idx, idx_in_epoch) and constants fixed when the pipeline
is built: the pipeline's first epoch and step, the rank's sharding and the size schedule. So it gives the
same answers in the main process or in DALI's worker processes (which hold a copy made at start-up and
never see the loader's later state), and one pipeline serves every epoch. Kept free of torch so spawned
workers start quickly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .geometry import center_crop_origin, train_crop, val_resize_size
from .index import SplitIndex
from .sampling import train_batches, val_batches


@dataclass
class SampleSource:
    """Sample k of DALI epoch j is sample k (after `first_step` batches when j == 0) of this rank's epoch
    `first_epoch + j`; the last batch of an epoch is padded with its last sample (the loader drops the pad).

    Returns (encoded file, label, ...). Train: crop anchor (x, y), crop shape (w, h), flip, output size
    (h, w) of the epoch. Val: resize (h, w), center-crop position x and y (fractions).
    """

    index: SplitIndex
    train: bool
    batch_size: int
    rank: int
    world_size: int
    seed: int
    sizes: Callable[[int], int]
    val_resize: int
    first_epoch: int
    first_step: int
    substitutes: dict[int, int]  # dataset index that failed at run time -> the image read in its place
    _plans: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def keys(self, epoch: int) -> np.ndarray:
        """This rank's dataset indices of `epoch`, in order (one permutation per epoch, then cached)."""
        if epoch not in self._plans:
            n = len(self.index)
            if self.train:
                batches = train_batches(n, self.batch_size, self.rank, self.world_size, self.seed, epoch)
            else:
                batches = val_batches(n, self.batch_size, self.rank, self.world_size)
            self._plans = {epoch: np.concatenate(batches) if batches else np.empty(0, np.int64)}
        return self._plans[epoch]

    def __call__(self, info) -> tuple[np.ndarray, ...]:
        epoch = self.first_epoch + info.epoch_idx if self.train else 0
        keys = self.keys(epoch)
        pos = info.idx_in_epoch + (self.first_step * self.batch_size if info.epoch_idx == 0 else 0)
        if pos >= -(-len(keys) // self.batch_size) * self.batch_size:
            raise StopIteration
        key = int(keys[min(pos, len(keys) - 1)])
        item = key
        while item in self.substitutes:  # a substitute may itself have failed later
            item = self.substitutes[item]
        encoded = np.fromfile(self.index.path(item), dtype=np.uint8)
        label = np.array([self.index.labels[item]], dtype=np.int64)
        width, height = int(self.index.widths[item]), int(self.index.heights[item])
        size = self.sizes(epoch)
        if self.train:
            c = train_crop(self.seed, epoch, key, width, height)
            return (encoded, label, np.array([c.x, c.y], np.int32), np.array([c.w, c.h], np.int32),
                    np.array(c.flip, np.int32), np.array([size, size], np.float32))
        w, h = val_resize_size(width, height, self.val_resize)
        left, top = center_crop_origin(w, h, size)
        return (encoded, label, np.array([h, w], np.float32),
                np.array(left / (w - size) if w > size else 0.0, np.float32),
                np.array(top / (h - size) if h > size else 0.0, np.float32))
