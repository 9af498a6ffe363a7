"""The optimisation recipe from the config, built from timm's parts: optimizer, lr schedule, loss,
mixup/cutmix, EMA, and the mixed-precision settings. The paper recipe is SGD (momentum 0.9, no Nesterov),
lr 0.1 per 256 images, weight decay 1e-4 on every parameter, x0.1 at epochs 30/60/80; the extras are off.
The fast recipes (configs/fast/) use a cosine schedule with warmup instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3
from torch import nn

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


@dataclass
class Recipe:
    optimizer: torch.optim.Optimizer
    scheduler: Scheduler
    criterion: nn.Module
    mixup: Mixup | None
    ema: ModelEmaV3 | None
    scaler: torch.amp.GradScaler | None
    autocast: Callable[[], contextlib.AbstractContextManager[Any]]


def scaled_lr(cfg: dict[str, Any]) -> float:
    """optim.lr is given for a global batch of 256 and scaled linearly (Goyal et al.)."""
    return cfg["optim"]["lr"] * cfg["train"]["batch_size"] / 256


def autocast_for(amp: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def build_scheduler(cfg: dict[str, Any], optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> Scheduler:
    """The lr schedule, stepped with `step_update(global_step)` before every step: the lr is a function of the
    global step alone, so a resumed run gets the same lr at every step. Warmup goes linearly from 0."""
    sched = cfg["sched"]
    warmup = sched["warmup_epochs"] * steps_per_epoch
    if sched["name"] == "cosine":
        # The cosine starts after the warmup and reaches min_lr at the run's last step.
        total = cfg["train"]["epochs"] * steps_per_epoch
        return CosineLRScheduler(optimizer, t_initial=max(1, total - warmup), lr_min=sched["min_lr"], warmup_t=warmup,
                                 warmup_prefix=True, t_in_epochs=False)
    # timm applies a milestone m at t == m - 1 (its historical convention); +1 makes the decay start exactly
    # at the first step of the milestone epoch, as in the paper and torch's MultiStepLR.
    return MultiStepLRScheduler(
        optimizer, decay_t=[m * steps_per_epoch + 1 for m in sched["milestones"]], decay_rate=sched["gamma"],
        warmup_t=warmup, warmup_prefix=False, t_in_epochs=False)


def build_recipe(cfg: dict[str, Any], model: nn.Module, steps_per_epoch: int, num_classes: int,
                 device: torch.device) -> Recipe:
    train, optim = cfg["train"], cfg["optim"]
    optimizer = create_optimizer_v2(model, opt=optim["name"], lr=scaled_lr(cfg), momentum=optim["momentum"],
                                    weight_decay=optim["weight_decay"],
                                    filter_bias_and_bn=optim["filter_bias_and_bn"])
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)

    mixup = None
    if train["mixup_alpha"] > 0 or train["cutmix_alpha"] > 0:
        mixup = Mixup(mixup_alpha=train["mixup_alpha"], cutmix_alpha=train["cutmix_alpha"],
                      label_smoothing=train["label_smoothing"], num_classes=num_classes)
        criterion: nn.Module = SoftTargetCrossEntropy()
    elif train["label_smoothing"] > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=train["label_smoothing"])
    else:
        criterion = nn.CrossEntropyLoss()

    ema = ModelEmaV3(model, decay=train["ema_decay"]) if train["ema_decay"] > 0 else None
    scaler = torch.amp.GradScaler(device.type) if train["amp"] == "fp16" else None
    return Recipe(optimizer, scheduler, criterion, mixup, ema, scaler, autocast_for(train["amp"], device))
