"""ImageNet input pipelines with one interface and three backends (docs/data.md).

    from data import build_loader, DataError
    loader = build_loader(cfg["data"], "train", batch_size=64, rank=rank, world_size=world,
                          seed=cfg["seed"], device=device, cache_dir=output_dir, channels_last=False, log=log)
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch, start_step if epoch == start_epoch else 0)
        for images, labels in loader:  # float32 NCHW normalised, int64; both on `device`
            ...
    loader.close()

cfg is the config's `data` section: root (holding train/<wnid>/ and val/<wnid>/; class index = sorted
wnid order), backend ('dali' GPU decode | 'dali_cpu' | 'torchvision'), workers (threads/processes per
rank; None = the job's CPUs on this node shared among its ranks, data.cpus), image_size (224, the final
train size), progressive ({start_size, start_epoch, end_epoch, multiple}: smaller train sizes early,
data.sizes), val_image_size (None = image_size), val_resize (256), and optionally cache_dir (the
file-index cache folder; when set it wins over the cache_dir argument, e.g. a run's output directory;
with neither, ~/.cache/lip).
batch_size is per rank. channels_last=True hands out NCHW views of NHWC memory (same values).

A Loader has:
- set_epoch(epoch, start_step=0): train order and augmentation are derived from (seed, epoch) and each
  sample's dataset index; start_step skips that many batches without reading them (mid-epoch resume).
- __len__(): batches this rank yields this epoch (after start_step). Train: floor(num_images /
  (batch_size * world_size)) per epoch on every rank, the tail dropped. Val: each image exactly once
  over all ranks, no padding; ranks may differ by a batch and the last batch may be short.
- num_images (usable images of the split), classes (sorted wnids), bad_files ([(path, reason)], files
  excluded by the pre-scan plus any that failed at run time).
- image_size (this epoch's output size), sizes(epoch) (the size of any epoch), close() (releases
  worker processes and DALI pipelines).
Extras: batches_per_epoch (len without start_step), indices() (the dataset indices of each batch this
epoch), backend, epoch, start_step, index (data.index.SplitIndex: paths, labels, image sizes).

User errors raise DataError (a ValueError) with a one-line message naming the path or setting.
"""

from .errors import DataError

__all__ = ["BACKENDS", "DataError", "Loader", "build_loader"]


def __getattr__(name: str):
    """Import torch-dependent parts on first use, so the scripts that only check files start fast."""
    if name in ("BACKENDS", "build_loader"):
        from . import build

        return getattr(build, name)
    if name == "Loader":
        from .loader import Loader

        return Loader
    raise AttributeError(f"module 'data' has no attribute {name!r}")
