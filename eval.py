"""Evaluate a checkpoint (ours, the authors' release or timm train.py's) on data.root/val: single 224 center crop.

    python eval.py --config configs/lip_resnet50.yaml --checkpoint lip_resnet-50.pth.tar data.root=/data/imagenet
    torchrun --nproc_per_node=8 eval.py --config ... --checkpoint ...

`--ema` scores a training checkpoint's EMA weights instead (`model_ema`, written when train.ema_decay > 0, or
timm's `state_dict_ema`).
Each image is counted exactly once whatever the number of ranks. The last line printed is JSON:
{"images": 50000, "top1": ..., "top5": ..., "loss": ...} (top-1/top-5 in percent).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from data import build_loader
from models import create_model, load_checkpoint
from models.checkpoint import check_checkpoint_file
from training import backends, distributed
from training.cli import ArgumentParser, run_main
from training.config import load_config, use_channels_last
from training.distributed import Dist
from training.engine import evaluate
from training.logger import RunLog
from training.recipe import autocast_for


def main(args: argparse.Namespace, d: Dist, log: RunLog) -> None:
    cfg = load_config(args.config, args.overrides)
    checkpoint = Path(args.checkpoint)
    check_checkpoint_file(checkpoint)  # before any data is read: a wrong path fails at once
    backends.configure(cfg["train"], d.device)  # the arithmetic training used (train.tf32, train.deterministic)
    distributed.init(d, cfg["train"]["cpu_threads"])

    batch_per_rank = max(1, cfg["train"]["batch_size"] // d.world_size)
    channels_last = use_channels_last(cfg, d.device)
    loader = build_loader(cfg["data"], "val", batch_size=batch_per_rank, rank=d.rank, world_size=d.world_size,
                          seed=cfg["seed"], device=d.device, cache_dir=cfg["data"]["cache_dir"],
                          channels_last=channels_last, log=log.info if d.is_main else (lambda _msg: None))
    model = create_model(cfg["model"], num_classes=cfg["num_classes"] or len(loader.classes))
    # weights_only: refuses pickles that would run code
    load_checkpoint(model, checkpoint, entry="model_ema" if args.ema else None)
    model = model.to(d.device, memory_format=torch.channels_last if channels_last else torch.preserve_format)

    result = evaluate(model, loader, d, autocast_for(cfg["train"]["amp"], d.device), channels_last)
    weights = " (EMA weights)" if args.ema else ""
    log.info(f"{cfg['model']}{weights} from {checkpoint}: {result.images} images on {d.world_size} rank(s), "
             f"top-1 {result.top1:.2f}%, top-5 {result.top5:.2f}%, loss {result.loss:.4f}, {result.seconds:.1f} s")
    if d.is_main:
        print(json.dumps({"images": result.images, "top1": round(result.top1, 4), "top5": round(result.top5, 4),
                          "loss": round(result.loss, 6)}), flush=True)


if __name__ == "__main__":
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="our .pth or the authors' release")
    parser.add_argument("--ema", action="store_true", help="evaluate the checkpoint's EMA weights (model_ema)")
    parser.add_overrides()
    world = distributed.world_from_env()
    run_log = RunLog(world.rank, world.world_size)
    run_main(lambda: main(parser.parse_args(), world, run_log), run_log)
