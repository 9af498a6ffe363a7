"""The backend-independent part of a loader: which batches this rank yields this epoch."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator

import numpy as np
import torch

from .errors import DataError
from .geometry import MEAN, STD
from .index import SplitIndex
from .sampling import train_batches, val_batches


class Loader(ABC):
    """Iterable of (images float32 NCHW normalised, labels int64), both on `device`, for one rank.

    Subclasses decode; this class decides the batches. Call `set_epoch(epoch, start_step)` before
    each epoch: train order comes from (seed, epoch), and start_step skips batches without reading them.
    """

    backend = ""

    def __init__(self, index: SplitIndex, *, train: bool, batch_size: int, rank: int, world_size: int,
                 seed: int, device: torch.device, sizes: Callable[[int], int], val_resize: int, workers: int,
                 channels_last: bool, log: Callable[[str], None]) -> None:
        self.index = index
        self.train = train
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.device = device
        self.sizes = sizes  # epoch -> output size (train: progressive resizing; val: constant)
        self.image_size = sizes(0)
        self.val_resize = val_resize
        self.workers = workers
        self.channels_last = channels_last
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
        self.image_size = self.sizes(epoch)
        self._batches = batches[start_step:]

    def __len__(self) -> int:
        return len(self._batches)

    def indices(self) -> list[np.ndarray]:
        """Dataset indices (into self.index) of the batches this rank yields this epoch, in order."""
        return [b.copy() for b in self._batches]

    @abstractmethod
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Decode and yield this epoch's batches (each backend's own pipeline)."""

    @abstractmethod
    def close(self) -> None:
        """Release what the backend holds (worker processes, DALI pipelines); the loader is unusable after."""

    def _note_bad(self, path: str, reason: str) -> None:
        """Record a file that failed at run time (after passing the pre-scan)."""
        if all(path != p for p, _ in self.bad_files):
            self.bad_files.append((path, reason))
            self.log(f"data: {path} failed to decode ({reason}); substituted deterministically")


def normalizer(device: torch.device, channels_last: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 NHWC batch -> float32 NCHW (x/255 - mean) / std, computed on `device`; with channels_last the
    result is an NCHW view of NHWC memory (what a channels_last model wants, without another copy)."""
    scale = torch.tensor([1.0 / (255.0 * s) for s in STD], device=device).view(1, 3, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(MEAN, STD, strict=True)], device=device).view(1, 3, 1, 1)

    def run(x: torch.Tensor) -> torch.Tensor:
        if channels_last:
            out = torch.empty(x.shape, dtype=torch.float32, device=device).permute(0, 3, 1, 2)
        else:
            out = torch.empty((x.shape[0], 3, x.shape[1], x.shape[2]), dtype=torch.float32, device=device)
        out.copy_(x.permute(0, 3, 1, 2))
        return out.mul_(scale).sub_(shift)

    return run
