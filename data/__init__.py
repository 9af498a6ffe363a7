"""ImageNet input pipelines with one interface and three backends (docs/data.md).

    from data import build_loader, DataError
    loader = build_loader(cfg["data"], "train", batch_size=64, rank=rank, world_size=world,
                          seed=cfg["seed"], device=device, cache_dir=output_dir, log=log)
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch, start_step if epoch == start_epoch else 0)
        for images, labels in loader:  # float32 NCHW normalised, int64; both on `device`
            ...

cfg is the config's `data` section: root (holding train/<wnid>/ and val/<wnid>/; class index = sorted
wnid order), backend ('dali' GPU decode | 'dali_cpu' | 'torchvision'), workers (threads/processes per
rank), image_size (224), val_resize (256), and optionally cache_dir (the file-index cache folder; when
set it wins over the cache_dir argument, e.g. a run's output directory; with neither, ~/.cache/lip).
batch_size is per rank.

A Loader has:
- set_epoch(epoch, start_step=0): train order and augmentation are derived from (seed, epoch) and each
  sample's dataset index; start_step skips that many batches without reading them (mid-epoch resume).
- __len__(): batches this rank yields this epoch (after start_step). Train: floor(num_images /
  (batch_size * world_size)) per epoch on every rank, the tail dropped. Val: each image exactly once
  over all ranks, no padding; ranks may differ by a batch and the last batch may be short.
- num_images (usable images of the split), classes (sorted wnids), bad_files ([(path, reason)], files
  excluded by the pre-scan plus any that failed at run time).
Extras: batches_per_epoch (len without start_step), indices() (the dataset indices of each batch this
epoch), backend, epoch, start_step, index (data.index.SplitIndex: paths, labels, image sizes).

load_val_images(paths, image_size, val_resize, device) puts a few chosen files through the validation
transform (for pictures of single images, whatever the backend).

User errors raise DataError (a ValueError) with a one-line message naming the path or setting.
"""

from .errors import DataError

__all__ = ["BACKENDS", "DataError", "Loader", "build_loader", "load_val_images"]


def __getattr__(name: str):
    """Import torch-dependent parts on first use, so the scripts that only check files start fast."""
    if name in ("BACKENDS", "build_loader"):
        from . import build

        return getattr(build, name)
    if name == "Loader":
        from .loader import Loader

        return Loader
    if name == "load_val_images":
        from .torchvision_loader import load_val_images

        return load_val_images
    raise AttributeError(f"module 'data' has no attribute {name!r}")
