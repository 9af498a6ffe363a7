"""The backend-independent part of a loader: which batches this rank yields this epoch."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .errors import DataError
from .index import SplitIndex
from .sampling import train_batches, val_batches


class Loader(ABC):
    """Iterable of (images float32 NCHW normalised, labels int64), both on `device`, for one rank.

    Subclasses decode; this class decides the batches. Call `set_epoch(epoch, start_step)` before
    each epoch: train order comes from (seed, epoch), and start_step skips batches without reading them.
    """

    backend = ""

    def __init__(self, index: SplitIndex, *, train: bool, batch_size: int, rank: int, world_size: int,
                 seed: int, device: torch.device, image_size: int, val_resize: int, workers: int,
                 log: Callable[[str], None]) -> None:
        self.index = index
        self.train = train
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.device = device
        self.image_size = image_size
        self.val_resize = val_resize
        self.workers = workers
        self.log = log
        self.num_images = len(index)
        self.classes = list(index.classes)
        self.bad_files = list(index.bad_files)
        self.epoch = 0
        self.start_step = 0
        self._batches: list[np.ndarray] = []
        self.set_epoch(0)

    @property
    def batches_per_epoch(self) -> int:
        """Batches this rank yields in a whole epoch (len(self) is that minus start_step)."""
        return len(self._batches) + self.start_step

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch (train order and augmentation) and skip its first `start_step` batches."""
        if self.train:
            batches = train_batches(self.num_images, self.batch_size, self.rank, self.world_size, self.seed,
                                    epoch)
        else:
            batches = val_batches(self.num_images, self.batch_size, self.rank, self.world_size)
        if not 0 <= start_step <= len(batches):
            raise DataError(f"start_step {start_step} is outside this epoch's 0..{len(batches)} batches")
        self.epoch = epoch
        self.start_step = start_step
        self._batches = batches[start_step:]

    def __len__(self) -> int:
        return len(self._batches)

    def indices(self) -> list[np.ndarray]:
        """Dataset indices (into self.index) of the batches this rank yields this epoch, in order."""
        return [b.copy() for b in self._batches]

    @abstractmethod
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Decode and yield this epoch's batches (each backend's own pipeline)."""

    def _note_bad(self, path: str, reason: str) -> None:
        """Record a file that failed at run time (after passing the pre-scan)."""
        if all(path != p for p, _ in self.bad_files):
            self.bad_files.append((path, reason))
            self.log(f"data: {path} failed to decode ({reason}); substituted deterministically")


def normalizer(device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 NHWC batch -> float32 NCHW (x/255 - mean) / std, computed on `device`."""
    mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=device).view(1, 3, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std, strict=True)], device=device).view(1, 3, 1, 1)

    def run(x: torch.Tensor) -> torch.Tensor:
        out = torch.empty((x.shape[0], 3, x.shape[1], x.shape[2]), dtype=torch.float32, device=device)
        out.copy_(x.permute(0, 3, 1, 2))
        return out.mul_(scale).sub_(shift)

    return run
