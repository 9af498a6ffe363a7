"""The run's progress counters, in their own module: the training loop advances them, checkpoints save them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainState:
    """Where training stands. Saved in every checkpoint, so a rerun continues exactly where it was."""

    epoch: int = 0  # epoch in progress, 0-based
    step: int = 0  # batches done in that epoch
    global_step: int = 0  # optimizer steps done in the run
    loss_sum: float = 0.0  # sum of this epoch's per-step losses (mean over ranks)
    images: int = 0  # images trained on this epoch, all ranks
    seconds: float = 0.0  # training time spent on this epoch, across restarts
    best_top1: float = -1.0
    history: list[dict[str, Any]] = field(default_factory=list)  # one metrics row per finished epoch

    def finish_epoch(self, row: dict[str, Any]) -> bool:
        """Record the epoch's row and move to the next epoch; True when it is the best top-1 so far."""
        self.history.append(row)
        best = row["val_top1"] > self.best_top1
        self.best_top1 = max(self.best_top1, row["val_top1"])
        self.epoch, self.step, self.loss_sum, self.images, self.seconds = self.epoch + 1, 0, 0.0, 0, 0.0
        return best
