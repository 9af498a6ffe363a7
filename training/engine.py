"""The training and evaluation loops.

`train_one_epoch` runs the rest of an epoch from `state.step` (0, or where a checkpoint left off) and
`evaluate` scores a model on the validation split, each image counted once over all ranks. Every step ends
at a boundary where the ranks agree, through one summed all_reduce, on the mean loss, whether any loss was
non-finite and whether any rank was signalled to stop; that is where checkpoints are written.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from data import Loader

from .distributed import Dist, all_reduce_sum
from .errors import NonFiniteLossError
from .logger import RunLog
from .metrics import Metrics
from .recipe import Recipe
from .signals import StopRequest


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


@dataclass
class StepResult:
    loss: float  # mean over ranks
    non_finite: bool  # on any rank
    stop: bool  # any rank signalled
    epoch: int
    step: int  # 0-based index of the step in its epoch
    global_step: int  # 0-based index of the step in the run
    lr: float


class StepAgreement:
    """The per-step all_reduce, read one step late: while step t's numbers travel, the CPU already queues
    step t+1, so the check never makes the GPU wait. A non-finite loss at step t is thus seen after step
    t+1 ran; the weights are then never saved, so the last good checkpoint stays."""

    def __init__(self, world_size: int, stop: StopRequest) -> None:
        self.world_size, self.stop = world_size, stop
        self._pending: tuple[torch.Tensor, Any, tuple[int, int, int, float]] | None = None

    def push(self, loss: torch.Tensor, where: tuple[int, int, int, float]) -> StepResult | None:
        """Start reducing this step's numbers; returns the previous step's result."""
        loss = loss.detach().float()
        flags = torch.stack([loss, (~torch.isfinite(loss)).float(), loss.new_full((), float(self.stop.pending))])
        handle = all_reduce_sum(flags, async_op=True)
        previous, self._pending = self._pending, (flags, handle, where)
        return self._resolve(previous)

    def flush(self) -> StepResult | None:
        """The result of the last pushed step (waits for it)."""
        previous, self._pending = self._pending, None
        return self._resolve(previous)

    def _resolve(self, item: tuple[torch.Tensor, Any, tuple[int, int, int, float]] | None) -> StepResult | None:
        if item is None:
            return None
        flags, handle, where = item
        if handle is not None:
            handle.wait()
        loss_sum, non_finite, stop = flags.tolist()
        return StepResult(loss_sum / self.world_size, non_finite > 0, stop > 0, *where)


def train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, recipe: Recipe,
               make_nan: bool = False) -> torch.Tensor:
    """Forward, backward and update on one batch; returns this rank's loss (not yet checked)."""
    targets = labels
    if recipe.mixup is not None:
        images, targets = recipe.mixup(images, labels)
    with recipe.autocast():
        loss = recipe.criterion(model(images), targets)
    if make_nan:  # debug.nan_at_step: exercises the non-finite guard end to end
        loss = loss * float("nan")
    recipe.optimizer.zero_grad(set_to_none=True)
    if recipe.scaler is not None:  # fp16: skipped steps on overflow are normal, not errors
        recipe.scaler.scale(loss).backward()
        recipe.scaler.step(recipe.optimizer)
        recipe.scaler.update()
    else:
        loss.backward()
        recipe.optimizer.step()
    if recipe.ema is not None:
        recipe.ema.update(getattr(model, "module", model))
    return loss


@dataclass
class EpochContext:
    """What the loop needs besides the model and recipe."""

    cfg: dict[str, Any]
    dist: Dist
    stop: StopRequest
    log: RunLog
    metrics: Metrics | None  # rank 0 only
    save_checkpoint: Callable[[TrainState], None]
    steps_per_epoch: int


class Progress:
    """Rank 0's view of training: a tqdm bar on a terminal, and every `train.log_every` steps a train.log
    line and TensorBoard scalars, each for the step whose loss the ranks just agreed on."""

    def __init__(self, ctx: EpochContext, state: TrainState) -> None:
        self.ctx, self.log_every = ctx, ctx.cfg["train"]["log_every"]
        # disable=None: only on a terminal; in batch logs (SLURM) the periodic lines take its place.
        self.bar = tqdm(total=ctx.steps_per_epoch, initial=state.step, desc=f"epoch {state.epoch}", unit="step",
                        disable=None if ctx.dist.is_main else True, dynamic_ncols=True, leave=False)
        self.window_start, self.window_images, self.images_per_sec = time.perf_counter(), 0, math.nan

    def advance(self, images: int) -> None:
        self.bar.update(1)
        self.window_images += images

    def report(self, r: StepResult) -> None:
        done = r.global_step + 1
        if done % self.log_every == 0:
            now = time.perf_counter()
            self.images_per_sec = self.window_images / max(now - self.window_start, 1e-9)
            self.window_start, self.window_images = now, 0
            self.ctx.log.info(f"epoch {r.epoch} step {r.step + 1}/{self.ctx.steps_per_epoch} loss {r.loss:.4f} "
                              f"lr {r.lr:.4g} {self.images_per_sec:.1f} img/s", console=self.bar.disable)
            if self.ctx.metrics is not None:
                self.ctx.metrics.train_scalars(done, r.loss, r.lr, self.images_per_sec)
        self.bar.set_postfix(loss=f"{r.loss:.4f}", lr=f"{r.lr:.4g}", img_s=f"{self.images_per_sec:.0f}",
                             refresh=False)

    def close(self) -> None:
        self.bar.close()


def train_one_epoch(model: nn.Module, loader: Loader, recipe: Recipe, state: TrainState, ctx: EpochContext) -> bool:
    """Train the rest of `state.epoch`; returns True when a stop signal ended it (checkpoint written)."""
    cfg, d = ctx.cfg, ctx.dist
    every, nan_at = cfg["checkpoint"]["every_steps"], cfg["debug"]["nan_at_step"]
    channels_last = cfg["train"]["channels_last"] and d.device.type == "cuda"
    agreement = StepAgreement(d.world_size, ctx.stop)
    progress = Progress(ctx, state)
    lap = time.perf_counter()

    def absorb(result: StepResult | None) -> bool:
        """Account a step's agreed result; True when the ranks agreed to stop."""
        if result is None:
            return False
        if result.non_finite:
            raise NonFiniteLossError(
                f"non-finite loss ({result.loss}) at epoch {result.epoch}, step {result.step} (global step "
                f"{result.global_step}); stopped without writing a checkpoint, the last good one is kept")
        state.loss_sum += result.loss
        progress.report(result)
        return result.stop

    def save() -> None:
        nonlocal lap
        state.seconds += time.perf_counter() - lap
        ctx.save_checkpoint(state)
        lap = time.perf_counter()

    model.train()
    loader.set_epoch(state.epoch, state.step)
    # The loader's iterator may draw from the global RNG; keep that out of the training RNG stream, whose
    # state the checkpoints carry, so a resumed epoch draws the same numbers as an uninterrupted one.
    with torch.random.fork_rng(devices=[]):
        batches: Iterable[tuple[torch.Tensor, torch.Tensor]] = iter(loader)
    stop = False
    for images, labels in batches:
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        recipe.scheduler.step_update(state.global_step)
        where = (state.epoch, state.step, state.global_step, recipe.optimizer.param_groups[0]["lr"])
        loss = train_step(model, images, labels, recipe, make_nan=state.global_step == nan_at)
        state.step, state.global_step = state.step + 1, state.global_step + 1
        state.images += images.shape[0] * d.world_size
        progress.advance(images.shape[0] * d.world_size)

        stop = absorb(agreement.push(loss, where))
        if stop or (every and state.global_step % every == 0):
            stop = absorb(agreement.flush()) or stop
            save()
            if stop:
                break
    else:
        stop = absorb(agreement.flush())
        if stop:
            save()
    state.seconds += time.perf_counter() - lap
    progress.close()
    return stop


@dataclass
class EvalResult:
    images: int
    loss: float
    top1: float  # percent
    top5: float  # percent
    seconds: float
    samples: torch.Tensor | None  # this rank's first images, for the importance maps


@torch.no_grad()
def evaluate(model: nn.Module, loader: Loader, d: Dist,
             autocast: Callable[[], Any], channels_last: bool = False, keep: int = 0) -> EvalResult:
    """Top-1/top-5/loss over the whole split: each rank sums its shard, one all_reduce adds them up.

    Pass the bare model, not the DDP wrapper: ranks may see different numbers of batches, and DDP's
    forward would wait for the others.
    """
    start = time.perf_counter()
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=d.device)  # loss sum, top-1 hits, top-5 hits
    count = 0
    # `keep` images spread over this rank's batches (the same ones every epoch), for the importance maps
    stride = max(1, len(loader) // keep) if keep else 0
    per_batch = math.ceil(keep * stride / max(len(loader), 1)) if keep else 0
    kept: list[torch.Tensor] = []
    for i, (images, labels) in enumerate(loader):
        have = sum(k.shape[0] for k in kept)
        if have < keep and i % stride == 0:
            kept.append(images[: min(per_batch, keep - have)])
        count += labels.shape[0]
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices == labels[:, None]
        totals += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(),
                               hits[:, 0].sum().double(), hits.any(dim=1).sum().double()])
    totals = torch.cat([totals, totals.new_tensor([count])])
    all_reduce_sum(totals)
    loss_sum, top1, top5, n = totals.tolist()
    images = int(n)
    n = max(n, 1.0)
    return EvalResult(images, loss_sum / n, 100.0 * top1 / n, 100.0 * top5 / n, time.perf_counter() - start,
                      torch.cat(kept) if kept else None)


def epoch_row(state: TrainState, lr: float, val: EvalResult, ema_val: EvalResult | None,
              image_size: int) -> dict[str, Any]:
    """The epoch's line of metrics.jsonl (top-1/top-5 in percent, times in seconds, the epoch's train size)."""
    row = {"epoch": state.epoch, "step": state.global_step, "lr": lr, "image_size": image_size,
           "train_loss": state.loss_sum / max(state.step, 1),
           "val_loss": val.loss, "val_top1": val.top1, "val_top5": val.top5,
           "images_per_sec": state.images / max(state.seconds, 1e-9), "epoch_time": state.seconds + val.seconds}
    if ema_val is not None:
        row.update(val_loss_ema=ema_val.loss, val_top1_ema=ema_val.top1, val_top5_ema=ema_val.top5)
    return row


def describe_row(row: dict[str, Any]) -> str:
    ema = f", EMA top-1 {row['val_top1_ema']:.2f}%" if "val_top1_ema" in row else ""
    return (f"epoch {row['epoch']} done: train loss {row['train_loss']:.4f}, val loss {row['val_loss']:.4f}, "
            f"top-1 {row['val_top1']:.2f}%, top-5 {row['val_top5']:.2f}%{ema}, {row['images_per_sec']:.1f} img/s, "
            f"{row['epoch_time']:.1f} s, trained at {row['image_size']} px")
