"""Training checkpoints: written atomically, never with non-finite weights, and complete enough to resume
mid-epoch with bit-identical results (optimizer, scheduler, scaler, EMA, every rank's RNG states and the
partly done epoch's accumulators).

A kill -9 at any instant leaves either the previous file or the new one: torch.save goes to a temporary
file in the same folder, which is fsynced and renamed over the target (rename is atomic on POSIX).
"""

from __future__ import annotations

import os
import random
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models import CheckpointError
from models.checkpoint import read_checkpoint

from .distributed import Dist, all_gather_objects, barrier
from .errors import NonFiniteLossError
from .recipe import Recipe
from .state import TrainState


def atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def remove_stale_temporaries(folder: Path) -> None:
    """Temporary files left by a save that was killed half-way."""
    for tmp in folder.glob(".*.tmp*"):
        tmp.unlink(missing_ok=True)


def ensure_finite(model: nn.Module, where: str) -> None:
    """Refuse to save NaN/inf weights: the last good checkpoint must stay the one a rerun resumes from."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise NonFiniteLossError(f"non-finite weights in '{name}' at {where}; no checkpoint written, "
                                     "the last good checkpoint is kept")


def rng_state() -> dict[str, Any]:
    """This process's RNG states in plain types, so the checkpoint loads with weights_only=True."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        # this rank's own GPU only: a resume may run on another layout of GPUs (other node, other count)
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore `rng_state()`'s output on this rank; the CUDA state goes to this rank's own device."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if isinstance(state["cuda"], torch.Tensor) and torch.cuda.is_available():  # none when written on a CPU
        torch.cuda.set_rng_state(state["cuda"])


def load_for_resume(path: Path) -> dict[str, Any] | None:
    """Our last.pth, read safely (weights_only), or None when there is nothing to resume.

    Anything else at that path (a directory, a file that is not a checkpoint) is a `CheckpointError`:
    the run must not silently start over and then overwrite it.
    """
    if not path.exists():
        return None
    return read_checkpoint(path)


class Checkpointer:
    """Writes and restores `output_dir/checkpoints/{last,best}.pth` for one run.

    Every rank takes part in a save (each contributes its RNG state and checks its weights are finite);
    rank 0 writes. `best.pth` (weights only) is written before `last.pth`, so a crash between the two
    redoes the epoch and rewrites both, never leaving a stale best.
    """

    def __init__(self, folder: Path, model: nn.Module, recipe: Recipe, cfg: dict[str, Any], d: Dist) -> None:
        self.folder, self.model, self.recipe, self.cfg, self.dist = folder, model, recipe, cfg, d
        self.last, self.best = folder / "last.pth", folder / "best.pth"

    def save(self, state: TrainState, best: bool = False) -> None:
        ensure_finite(self.model, f"epoch {state.epoch}, step {state.step} (global step {state.global_step})")
        rng = all_gather_objects(rng_state())
        if self.dist.is_main:
            r = self.recipe
            ckpt = {
                "model": self.model.state_dict(),
                "optimizer": r.optimizer.state_dict(),
                "scheduler": r.scheduler.state_dict(),
                "scaler": r.scaler.state_dict() if r.scaler is not None else None,
                "model_ema": r.ema.module.state_dict() if r.ema is not None else None,
                **asdict(state),
                "rng": rng,
                "world_size": self.dist.world_size,
                "config": self.cfg,
            }
            if best:
                atomic_save({"model": ckpt["model"], "epoch": state.epoch, "val_top1": state.best_top1,
                             "config": self.cfg}, self.best)
            atomic_save(ckpt, self.last)
        barrier()

    def restore(self, ckpt: dict[str, Any]) -> tuple[TrainState, list[str]]:
        """Load everything a resume needs; returns the state and warnings (config changes, RNG not reused)."""
        saved_cfg = ckpt.get("config")
        if not isinstance(saved_cfg, dict) or not isinstance(ckpt.get("rng"), list):
            raise CheckpointError(f"{self.last}: not a checkpoint written by train.py (no config and RNG states "
                                  "to resume from); give this run another output_dir")
        if saved_cfg.get("model") != self.cfg["model"]:
            raise CheckpointError(f"{self.last}: written by a {saved_cfg.get('model')} run, not "
                                  f"{self.cfg['model']}; give this run another output_dir")
        r = self.recipe
        try:
            self.model.load_state_dict(ckpt["model"])
            r.optimizer.load_state_dict(ckpt["optimizer"])
            r.scheduler.load_state_dict(ckpt["scheduler"])
            if r.scaler is not None and ckpt["scaler"] is not None:
                r.scaler.load_state_dict(ckpt["scaler"])
            if r.ema is not None and ckpt["model_ema"] is not None:
                r.ema.module.load_state_dict(ckpt["model_ema"])
            state = TrainState(**{f.name: ckpt[f.name] for f in fields(TrainState)})
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{self.last}: cannot resume from it ({first}); give this run another "
                                  "output_dir") from None
        warnings = []
        changed = [f"{k} {v!r} -> {now!r}" for k, v in _flat(saved_cfg).items()
                   if k != "output_dir" and (now := _flat(self.cfg).get(k, v)) != v]
        if changed:
            warnings.append("resuming with a changed config: " + ", ".join(changed))
        if len(ckpt["rng"]) == self.dist.world_size:
            set_rng_state(ckpt["rng"][self.dist.rank])
        else:
            warnings.append(f"checkpoint written by {len(ckpt['rng'])} ranks, resuming on {self.dist.world_size}: "
                            "RNG states are not restored, so the run will not match an uninterrupted one exactly")
        return state, warnings


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
