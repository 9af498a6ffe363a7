"""build_loader: check the config, index the split once, and hand it to the chosen backend."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from .cpus import available_cpus, default_workers, local_ranks
from .errors import DataError
from .index import load_index
from .loader import Loader
from .sizes import TrainSizes

BACKENDS = ("dali", "dali_cpu", "torchvision")


def _int(cfg: dict, key: str, default: int | None, minimum: int) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DataError(f"data.{key} must be an integer >= {minimum}, got {value!r}")
    return value


def _optional_int(cfg: dict, key: str, minimum: int) -> int | None:
    return None if cfg.get(key) is None else _int(cfg, key, None, minimum)


def train_sizes(cfg: dict) -> TrainSizes:
    """The train crop size of every epoch from the `data` section (progressive resizing), checked."""
    image_size = _int(cfg, "image_size", 224, 1)
    progressive = cfg.get("progressive") or {}
    if progressive.get("start_size") is None:
        return TrainSizes(image_size)
    start = _optional_int(progressive, "start_size", 1)
    first, last = _int(progressive, "start_epoch", 0, 0), _int(progressive, "end_epoch", 0, 0)
    multiple = _int(progressive, "multiple", 32, 1)
    if last <= first:
        raise DataError(f"data.progressive.end_epoch ({last}) must be after data.progressive.start_epoch ({first})")
    return TrainSizes(image_size, start, first, last, multiple)


def build_loader(cfg: dict, split: str, *, batch_size: int, rank: int, world_size: int, seed: int,
                 device: str | torch.device, cache_dir: str | os.PathLike[str] | None = None,
                 channels_last: bool = False, log: Callable[[str], None] = print) -> Loader:
    """A loader over `split` ('train' or 'val') of cfg['root'] for one rank; see the package docstring."""
    root = cfg.get("root")
    if not root:
        raise DataError("data.root is not set (expected a folder holding train/<wnid>/ and val/<wnid>/)")
    backend = cfg.get("backend", "torchvision")
    if backend not in BACKENDS:
        raise DataError(f"data.backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    workers = _int(cfg, "workers", None, 0) if cfg.get("workers") is not None else default_workers()
    sizes = train_sizes(cfg)
    val_size = _optional_int(cfg, "val_image_size", 1) or sizes.final_size
    val_resize = _int(cfg, "val_resize", 256, 1)
    if val_resize < val_size:
        raise DataError(f"data.val_resize ({val_resize}) must be >= the val crop ({val_size}, data.val_image_size "
                        "or data.image_size)")
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"bad sharding: batch_size={batch_size}, rank={rank}, world_size={world_size}")
    if seed < 0:
        raise DataError(f"seed must be >= 0, got {seed}")
    device = torch.device(device)
    if backend.startswith("dali"):
        from .dali_loader import import_dali

        import_dali(backend)
        if backend == "dali" and (device.type != "cuda" or not torch.cuda.is_available()):
            raise DataError(f"data.backend 'dali' decodes on the GPU, but the device is {device} "
                            f"(CUDA available: {torch.cuda.is_available()}); use dali_cpu or torchvision")

    cache_dir = cfg.get("cache_dir") or cache_dir  # an explicit data.cache_dir wins over the caller's default
    if cfg.get("workers") is None and split == "train":
        log(f"data.workers: {workers} per rank ({available_cpus()} CPUs for this process, {local_ranks()} "
            f"rank(s) on this node)")
    index = load_index(Path(root), split, cache_dir, log)
    train = split == "train"
    if train and len(index) < batch_size * world_size:
        raise DataError(f"{index.split_dir}: {len(index)} usable images is less than one global batch "
                        f"({batch_size} per rank x {world_size} ranks)")
    kwargs = dict(train=train, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed, device=device,
                  sizes=sizes if train else TrainSizes(val_size), val_resize=val_resize, workers=workers,
                  channels_last=channels_last, log=log)
    if backend == "torchvision":
        from .torchvision_loader import TorchvisionLoader

        return TorchvisionLoader(index, **kwargs)
    from .dali_loader import DaliLoader

    return DaliLoader(index, gpu=backend == "dali", **kwargs)
