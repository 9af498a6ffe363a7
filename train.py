"""Train a LIP network (or its baseline) on ImageNet with the paper's recipe.

    python train.py --config configs/demo.yaml
    torchrun --nproc_per_node=8 train.py --config configs/lip_resnet50.yaml data.root=/data/imagenet

Rerunning the same command with the same output_dir resumes from checkpoints/last.pth, mid-epoch and
exactly. SIGUSR1/SIGTERM checkpoint at the next step and exit 0. Exit 2: bad input; exit 3: non-finite loss.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from data import build_loader
from models import create_model, importance_maps
from training import distributed
from training.checkpoint import Checkpointer, load_for_resume, remove_stale_temporaries, seed_all
from training.cli import ArgumentParser, run_main
from training.config import check_world_size, load_config, save_config
from training.distributed import Dist, any_rank
from training.engine import EpochContext, TrainState, describe_row, epoch_row, evaluate, train_one_epoch
from training.errors import UserError
from training.logger import RunLog
from training.metrics import Metrics
from training.recipe import build_recipe, scaled_lr
from training.signals import StopRequest


def main(args: argparse.Namespace, d: Dist, log: RunLog) -> None:
    cfg = load_config(args.config, args.overrides)
    batch_per_rank = check_world_size(cfg, d.world_size)
    out = Path(cfg["output_dir"])
    try:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"output_dir {out}: cannot create it ({e.strerror})") from None
    stop = StopRequest().install()  # before loader workers fork, so they inherit it
    distributed.init(d, cfg["train"]["cpu_threads"])
    seed_all(cfg["seed"])  # the same initial weights on every rank (the EMA copy is taken before DDP syncs)
    if d.device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    log.open(out / "train.log")
    quiet = log.info if d.is_main else (lambda _msg: None)
    loader_args = {"rank": d.rank, "world_size": d.world_size, "seed": cfg["seed"], "device": d.device,
                   "cache_dir": cfg["data"]["cache_dir"], "log": quiet,
                   "channels_last": cfg["train"]["channels_last"] and d.device.type == "cuda"}
    train_loader = build_loader(cfg["data"], "train", batch_size=batch_per_rank, **loader_args)
    val_loader = build_loader(cfg["data"], "val", batch_size=batch_per_rank, **loader_args)
    steps_per_epoch = len(train_loader)
    num_classes = cfg["num_classes"] or len(train_loader.classes)

    channels_last = cfg["train"]["channels_last"] and d.device.type == "cuda"
    model = create_model(cfg["model"], num_classes=num_classes).to(d.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    recipe = build_recipe(cfg, model, steps_per_epoch, num_classes, d.device)
    seed_all(cfg["seed"] + d.rank)  # per-rank streams for mixup/cutmix; a resume restores them instead

    ckpt = Checkpointer(out / "checkpoints", model, recipe, cfg, d)
    state = TrainState()
    previous = load_for_resume(ckpt.last)
    if previous is not None:
        state, warnings = ckpt.restore(previous)
        log.info(f"resuming from {ckpt.last}: epoch {state.epoch}, step {state.step} "
                 f"(global step {state.global_step})")
        for warning in warnings:
            log.info(f"warning: {warning}")
    metrics = None
    if d.is_main:
        remove_stale_temporaries(ckpt.folder)
        save_config(cfg, out / "config.yaml")
        metrics = Metrics(out, state.history, state.global_step)

    params = sum(p.numel() for p in model.parameters())
    log.info(f"{cfg['model']}: {params:,} parameters, {num_classes} classes; {train_loader.num_images} train / "
             f"{val_loader.num_images} val images; {d.world_size} rank(s) on {d.device.type}, batch "
             f"{cfg['train']['batch_size']} ({batch_per_rank}/rank), lr {scaled_lr(cfg):.4g}, amp "
             f"{cfg['train']['amp']}; output in {out}")
    ctx = EpochContext(cfg, d, stop, log, metrics, ckpt.save, steps_per_epoch)
    ddp_model = distributed.wrap_ddp(model, d)

    keep = cfg["tb"]["num_images"] if d.is_main else 0
    while state.epoch < cfg["train"]["epochs"]:
        if train_one_epoch(ddp_model, train_loader, recipe, state, ctx):
            break
        # Evaluate exactly what the checkpoint saves: rank 0's buffers, in the model and the EMA copy.
        distributed.broadcast_buffers(model)
        if recipe.ema is not None:
            distributed.broadcast_buffers(recipe.ema.module)
        val = evaluate(model, val_loader, d, recipe.autocast, channels_last, keep=keep)
        ema_val = None
        if recipe.ema is not None:
            ema_val = evaluate(recipe.ema.module, val_loader, d, recipe.autocast, channels_last)
        row = epoch_row(state, recipe.optimizer.param_groups[0]["lr"], val, ema_val, train_loader.sizes(state.epoch))
        log.info(describe_row(row))
        is_best = state.finish_epoch(row)
        ckpt.save(state, best=is_best)  # holds the row: metrics.jsonl is rebuilt from it after a crash
        if metrics is not None:
            metrics.epoch_row(row)
            if val.samples is not None:
                metrics.importance_maps(state.global_step, val.samples, importance_maps(model, val.samples))
        if any_rank(stop.pending, d.device):
            break
    else:
        log.info(f"finished {state.epoch} epochs; best val top-1 {state.best_top1:.2f}%; weights in {ckpt.last}")
        return

    who = f"received {stop.signal_name}" if stop.signal_name else "another rank received a stop signal"
    log.every_rank(f"{who}: checkpoint saved to {ckpt.last} at epoch {state.epoch}, step {state.step}; "
                   "rerun the same command to resume")


if __name__ == "__main__":
    parser = ArgumentParser(description=__doc__)
    parser.add_overrides()
    world = distributed.world_from_env()
    run_log = RunLog(world.rank, world.world_size)
    run_main(lambda: main(parser.parse_args(), world, run_log), run_log)
