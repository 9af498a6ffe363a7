"""The torchvision backend: DataLoader worker processes decode and crop, the main process normalises.

Train: PIL decodes and crops; the crop is resized with torch's antialiased bilinear uint8 kernel on
a channels-last tensor (the same filter as PIL's bilinear, within one grey level, ~3x faster). Large
JPEGs whose crop still shrinks by 2x or more are decoded at 1/2..1/8 scale (PIL's draft mode). Val uses PIL exactly like
Resize(256) + CenterCrop(224), so evaluation is bit-identical to the usual torchvision transform.

Workers return uint8 NHWC batches (4x less inter-process traffic than float), pinned when the device
is a GPU; normalisation happens on `device`. Geometry comes from `geometry`, so the output is a pure
function of (seed, epoch, dataset index): the same on every run, any worker count, any restart.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .checks import DECODE_ERRORS, FORMATS
from .errors import DataError
from .geometry import Crop, center_crop_origin, train_crop, val_resize_size
from .index import SplitIndex
from .loader import Loader, normalizer

# Decode a JPEG at 1/2, 1/4 or 1/8 scale (libjpeg DCT scaling, PIL's draft mode) only while the crop
# then still shrinks by at least this factor to the output size: the final antialiased resize then
# dominates and the result differs from a full decode by < 0.5/255 on average (docs/data.md).
DRAFT_MARGIN = 2.0
MAX_SUBSTITUTES = 100


def draft_scale(c: Crop, size: int) -> int:
    """Largest JPEG DCT scale (1, 2, 4, 8) that keeps the crop at least DRAFT_MARGIN x the output."""
    scale = 1
    while scale < 8 and min(c.w, c.h) / (2 * scale) >= DRAFT_MARGIN * size:
        scale *= 2
    return scale


class Decoder(torch.utils.data.Dataset):
    """Turns a batch of (dataset index, epoch, output size) keys into uint8 images; runs inside workers.

    The size travels with each key (not as state set on the loader) because persistent workers hold their
    own copy of this object: that is how progressive resizing reaches them."""

    def __init__(self, index: SplitIndex, train: bool, seed: int, val_resize: int) -> None:
        self.index = index
        self.train = train
        self.seed = seed
        self.val_resize = val_resize

    def __len__(self) -> int:
        return len(self.index)

    def load(self, item: int, epoch: int, key: int, size: int) -> torch.Tensor:
        """One size x size image (HWC uint8) of dataset item `item`, augmented with the stream of index `key`."""
        path = self.index.path(item)
        if not self.train:
            with Image.open(path, formats=FORMATS) as im:
                return torch.from_numpy(self._val(im, size))
        width, height = int(self.index.widths[item]), int(self.index.heights[item])
        c = train_crop(self.seed, epoch, key, width, height)
        with Image.open(path, formats=FORMATS) as im:
            if im.size != (width, height):  # the file changed since it was indexed
                c = train_crop(self.seed, epoch, key, *im.size)
            scale = draft_scale(c, size) if im.format == "JPEG" else 1
            if scale > 1:
                return torch.from_numpy(self._draft(im, c, scale, size))
            region = (im if im.mode == "RGB" else im.convert("RGB")).crop((c.x, c.y, c.x + c.w, c.y + c.h))
            pixels = torch.from_numpy(np.array(region))
        # NHWC memory seen as NCHW (channels-last): torch's uint8 antialias kernel is fastest on it, and
        # its output is channels-last too, so the copy into the NHWC batch below is a plain memcpy
        nchw = pixels.unsqueeze(0).permute(0, 3, 1, 2)
        out = F.interpolate(nchw, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        hwc = out[0].permute(1, 2, 0)
        return hwc.flip(1) if c.flip else hwc

    def _draft(self, im: Image.Image, c: Crop, scale: int, size: int) -> np.ndarray:
        """PIL decode at 1/scale, then resize the (now fractional) crop box."""
        full_width = im.width
        _, box = im.draft("RGB", (im.width // scale, im.height // scale))
        s = full_width / box[2] if box else 1.0  # box: the full image in decoded pixels
        im = im.convert("RGB")
        left, top = math.floor(c.x / s), math.floor(c.y / s)
        region = im.crop((left, top, math.ceil((c.x + c.w) / s), math.ceil((c.y + c.h) / s)))
        box = (c.x / s - left, c.y / s - top, (c.x + c.w) / s - left, (c.y + c.h) / s - top)
        out = region.resize((size, size), Image.Resampling.BILINEAR, box=box)
        if c.flip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.array(out)

    def _val(self, im: Image.Image, size: int) -> np.ndarray:
        w, h = val_resize_size(*im.size, self.val_resize)
        left, top = center_crop_origin(w, h, size)
        out = im.convert("RGB").resize((w, h), Image.Resampling.BILINEAR)
        return np.array(out.crop((left, top, left + size, top + size)))

    def __getitems__(self, keys: list[tuple[int, int, int]]):
        """(uint8 NHWC batch, int64 labels, [(path, reason) of files that failed to decode])."""
        size = keys[0][2]
        out = torch.empty((len(keys), size, size, 3), dtype=torch.uint8)
        if torch.utils.data.get_worker_info() is not None:
            out.share_memory_()
        labels = torch.empty(len(keys), dtype=torch.int64)
        failed = []
        for k, (item, epoch, _) in enumerate(keys):
            sub = item
            for _ in range(MAX_SUBSTITUTES):
                try:
                    out[k] = self.load(sub, epoch, key=item, size=size)
                    break
                except DECODE_ERRORS as e:
                    failed.append((self.index.path(sub), f"{type(e).__name__}: {' '.join(str(e).split())}"))
                    sub = (sub + 1) % len(self.index)
            else:
                raise DataError(f"{self.index.split_dir}: {MAX_SUBSTITUTES} files in a row failed to decode "
                                f"(e.g. {failed[-1][0]}); run scripts/verify_dataset.py on it")
            labels[k] = int(self.index.labels[sub])
        return out, labels, failed


def _as_batch(batch):
    return batch


class _Plan:
    """batch_sampler for DataLoader: the loader's current batches as (index, epoch, size) keys."""

    def __init__(self, loader: Loader) -> None:
        self.loader = loader

    def __iter__(self):
        epoch, size = self.loader.epoch, self.loader.image_size
        for batch in self.loader._batches:
            yield [(int(i), epoch, size) for i in batch]

    def __len__(self) -> int:
        return len(self.loader)


class TorchvisionLoader(Loader):
    backend = "torchvision"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.decoder = Decoder(self.index, self.train, self.seed, self.val_resize)
        self._normalize = normalizer(self.device, self.channels_last)
        self._dataloader = torch.utils.data.DataLoader(
            self.decoder, batch_sampler=_Plan(self), collate_fn=_as_batch, num_workers=self.workers,
            pin_memory=self.device.type == "cuda", persistent_workers=self.train and self.workers > 0,
            prefetch_factor=2 if self.workers > 0 else None,
            generator=torch.Generator().manual_seed(self.seed))  # leaves torch's global RNG alone

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, failed in self._dataloader:
            for path, reason in failed:
                self._note_bad(path, reason)
            images = images.to(self.device, non_blocking=True)
            yield self._normalize(images), labels.to(self.device, non_blocking=True)

    def close(self) -> None:
        """Stop the persistent worker processes now rather than at garbage collection."""
        self._dataloader = None
