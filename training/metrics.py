"""Per-epoch metrics (`metrics.jsonl`) and TensorBoard (`tb/`): scalars and LIP importance maps. Rank 0 only.

Exactly-once across crashes: the epoch rows also live in the checkpoint (`history`), which is written
before the row is appended. On start, metrics.jsonl is rewritten from the checkpoint's rows, dropping a
row of an epoch that will be redone and adding one lost between the checkpoint and the append. TensorBoard
events past the checkpoint's step are hidden with SummaryWriter's `purge_step`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid

from data.geometry import MEAN, STD


def _hot(gray: torch.Tensor) -> torch.Tensor:
    """(N,1,H,W) in [0,1] -> (N,3,H,W) 'hot' colormap: black, red, yellow, white."""
    return torch.cat([(3 * gray).clamp(0, 1), (3 * gray - 1).clamp(0, 1), (3 * gray - 2).clamp(0, 1)], dim=1)


def importance_grid(images: torch.Tensor, maps: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One row per image: the image (denormalised), then each LIP layer's importance map at image size.

    Maps are averaged over channels and scaled to [0,1] per image, so each shows where that layer weighs
    its pooling windows most, not the absolute magnitude.
    """
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    images = images.detach().float().cpu()
    columns = [(images * std + mean).clamp(0, 1)]
    for m in maps.values():
        m = m.detach().float().cpu().mean(dim=1, keepdim=True)
        lo = m.amin(dim=(2, 3), keepdim=True)
        hi = m.amax(dim=(2, 3), keepdim=True)
        m = (m - lo) / (hi - lo).clamp_min(1e-12)
        columns.append(_hot(F.interpolate(m, size=images.shape[-2:], mode="nearest")))
    tiles = torch.stack(columns, dim=1).flatten(0, 1)  # image0, maps of image0, image1, ...
    return make_grid(tiles, nrow=len(columns), padding=2, pad_value=1.0)


class Metrics:
    def __init__(self, output_dir: Path, history: Sequence[dict[str, Any]], global_step: int) -> None:
        self.path = output_dir / "metrics.jsonl"
        tmp = self.path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in history))
        os.replace(tmp, self.path)
        # Events written after the checkpoint (at steps > global_step) belong to steps that will be redone.
        self.tb = SummaryWriter(str(output_dir / "tb"), purge_step=global_step + 1)

    def train_scalars(self, global_step: int, loss: float, lr: float, images_per_sec: float) -> None:
        self.tb.add_scalar("train/loss", loss, global_step)
        self.tb.add_scalar("train/lr", lr, global_step)
        self.tb.add_scalar("train/images_per_sec", images_per_sec, global_step)

    def epoch_row(self, row: dict[str, Any]) -> None:
        """Append the epoch's row to metrics.jsonl and its validation scalars to TensorBoard."""
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        for key in ("val_loss", "val_top1", "val_top5", "val_top1_ema"):
            if key in row:
                self.tb.add_scalar(key.replace("val_", "val/", 1), row[key], row["step"])
        self.tb.add_scalar("epoch/train_loss", row["train_loss"], row["step"])
        self.tb.add_scalar("epoch/lr", row["lr"], row["step"])
        self.tb.add_scalar("epoch/image_size", row["image_size"], row["step"])
        self.tb.add_scalar("epoch/images_per_sec", row["images_per_sec"], row["step"])
        self.tb.flush()

    def importance_maps(self, global_step: int, images: torch.Tensor, maps: Mapping[str, torch.Tensor]) -> None:
        """The fixed val images beside each LIP layer's importance map (nothing for baseline models)."""
        if not maps:
            return
        self.tb.add_image("lip/importance_maps", importance_grid(images, maps), global_step)
        self.tb.add_text("lip/importance_maps_columns", "image | " + " | ".join(maps), global_step)
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()
