"""The DALI backends: `dali` decodes on the GPU ("mixed"), `dali_cpu` does everything on CPU threads.

Each epoch builds a pipeline over this rank's file list, in the order `sampling` chose, via
fn.readers.file(files=..., labels=...): broken files never reach DALI and sharding stays ours. The crop
windows, flips, resize sizes and center-crop positions come from `geometry` through an
fn.external_source callback, so DALI makes no random decision of its own: the augmentation equals the
torchvision backend's and a restart at (epoch, step) is exact. Train decodes only the crop window
(fn.decoders.image_slice, a fused crop+decode); val decodes whole images.

DALI cannot skip a sample inside a running pipeline; when a file that passed the pre-scan fails to
decode, the loader finds it with a full PIL decode, logs it, substitutes the next decodable image and
rebuilds the pipeline from the current batch, so the run goes on as with the torchvision backend.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .checks import decode_check
from .errors import DataError
from .geometry import center_crop_origin, train_crop, val_resize_size
from .loader import Loader

PREFETCH = 2
MAX_SUBSTITUTES = 100


def import_dali(backend: str):
    """nvidia.dali's modules, or one DataError line that names the way out."""
    try:
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator
    except ImportError as e:
        raise DataError(f"data.backend {backend!r} needs NVIDIA DALI, which cannot be imported ({e}); "
                        f"pip install nvidia-dali-cuda120, or set data.backend: torchvision") from None
    return fn, pipeline_def, types, LastBatchPolicy, DALIGenericIterator


class DaliLoader(Loader):
    def __init__(self, *args, gpu: bool, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.backend = "dali" if gpu else "dali_cpu"
        self.gpu = gpu
        self._dali = import_dali(self.backend)
        self._substitutes: dict[int, int] = {}  # item that failed at run time -> its replacement

    def _params(self, items: np.ndarray, keys: np.ndarray):
        """external_source callback: per-sample geometry of batch `info.iteration`.

        items[k] is the image read at position k, keys[k] the dataset index whose augmentation stream
        is used (they differ only where a file that failed at run time was substituted).
        """
        batch, size, seed, epoch = self.batch_size, self.image_size, self.seed, self.epoch
        widths, heights = self.index.widths, self.index.heights
        num_batches = -(-len(items) // batch)

        def train(info):
            b = info.iteration % num_batches
            anchor = np.empty((batch, 2), np.int32)
            shape = np.empty((batch, 2), np.int32)
            mirror = np.empty(batch, np.int32)
            for k, (i, key) in enumerate(zip(_padded(items, b, batch), _padded(keys, b, batch), strict=True)):
                c = train_crop(seed, epoch, int(key), int(widths[i]), int(heights[i]))
                anchor[k], shape[k], mirror[k] = (c.x, c.y), (c.w, c.h), c.flip
            return anchor, shape, mirror

        def val(info):
            resize = np.empty((batch, 2), np.float32)
            pos = np.empty((batch, 2), np.float32)
            for k, i in enumerate(_padded(items, info.iteration % num_batches, batch)):
                w, h = val_resize_size(int(widths[i]), int(heights[i]), self.val_resize)
                left, top = center_crop_origin(w, h, size)
                resize[k] = (h, w)
                pos[k] = (left / (w - size) if w > size else 0.0, top / (h - size) if h > size else 0.0)
            return resize, pos[:, 0].copy(), pos[:, 1].copy()

        return train if self.train else val

    def _pipeline(self, items: np.ndarray, keys: np.ndarray):
        fn, pipeline_def, types, _, _ = self._dali
        size = self.image_size
        decoder = "mixed" if self.gpu else "cpu"
        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) \
            if self.gpu else None
        mean = [m * 255 for m in IMAGENET_DEFAULT_MEAN]
        std = [s * 255 for s in IMAGENET_DEFAULT_STD]
        files = [self.index.relpath(int(i)) for i in items]
        labels = self.index.labels[items].tolist()
        source = self._params(items, keys)

        @pipeline_def(batch_size=self.batch_size, num_threads=max(1, self.workers), device_id=device_id,
                      prefetch_queue_depth=PREFETCH, exec_dynamic=True)
        def pipe():
            jpegs, label = fn.readers.file(file_root=str(self.index.split_dir), files=files, labels=labels,
                                           random_shuffle=False, pad_last_batch=True, name="reader")
            common = dict(device=decoder, output_type=types.RGB, adjust_orientation=False)
            if self.gpu:
                common["jpeg_fancy_upsampling"] = True  # the CPU/PIL chroma upsampling
            if self.train:
                anchor, shape, mirror = fn.external_source(source=source, num_outputs=3, batch=True,
                                                           batch_info=True)
                images = fn.decoders.image_slice(jpegs, anchor, shape, axis_names="WH", **common)
                images = fn.resize(images, size=[size, size], interp_type=types.INTERP_LINEAR, antialias=True)
                images = fn.crop_mirror_normalize(images, mirror=mirror, mean=mean, std=std,
                                                  dtype=types.FLOAT, output_layout="CHW")
            else:
                resize, pos_x, pos_y = fn.external_source(source=source, num_outputs=3, batch=True,
                                                          batch_info=True)
                images = fn.decoders.image(jpegs, **common)
                images = fn.resize(images, size=resize, interp_type=types.INTERP_LINEAR, antialias=True)
                images = fn.crop_mirror_normalize(images, crop=(size, size), crop_pos_x=pos_x, crop_pos_y=pos_y,
                                                  mean=mean, std=std, dtype=types.FLOAT, output_layout="CHW")
            return images, label

        return pipe()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not self._batches:
            return
        _, _, _, LastBatchPolicy, DALIGenericIterator = self._dali
        keys = np.concatenate(self._batches)
        items = keys.copy()
        for pos in np.flatnonzero(np.isin(items, list(self._substitutes))):
            items[pos] = self._substitutes[int(items[pos])]
        done = 0
        while done < len(self._batches):
            start = done * self.batch_size
            pipe = self._pipeline(items[start:], keys[start:])
            try:
                pipe.build()
                it = DALIGenericIterator([pipe], ["images", "labels"], reader_name="reader",
                                         last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False)
                for out in it:
                    images, labels = out[0]["images"], out[0]["labels"]
                    done += 1
                    yield (images.to(self.device, non_blocking=True),
                           labels.view(-1).to(self.device, dtype=torch.int64, non_blocking=True))
            except RuntimeError as e:
                if not self._substitute_broken(items, done * self.batch_size):
                    raise DataError(f"DALI failed on {self.index.split_dir} (epoch {self.epoch}): {_gist(e)} "
                                    f"-- run scripts/verify_dataset.py --quarantine DIR on the data, or use "
                                    f"data.backend: torchvision") from None
            finally:
                del pipe

    def _substitute_broken(self, items: np.ndarray, start: int) -> bool:
        """After a DALI failure at item position `start`: find files that do not decode among the
        batches DALI may have been working on (the current one and those prefetched), log them and
        replace each by the next decodable image (the torchvision backend's rule), in place.
        False when no culprit is found."""
        window = range(start, min(len(items), start + (PREFETCH + 2) * self.batch_size))
        found = False
        for pos in window:
            reason = decode_check(self.index.path(int(items[pos])))
            if not reason:
                continue
            found = True
            self._note_bad(self.index.path(int(items[pos])), reason)
            broken = sub = int(items[pos])
            for _ in range(MAX_SUBSTITUTES):
                sub = (sub + 1) % len(self.index)
                if not decode_check(self.index.path(sub)):
                    break
            else:
                return False
            items[pos] = self._substitutes[broken] = sub
        return found


def _gist(e: BaseException) -> str:
    """The informative line of a multi-line DALI error (the failing sample and path, when present)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for line in lines:
        if "Failed to decode" in line:
            return line
    return lines[-1] if lines else type(e).__name__


def _padded(items: np.ndarray, b: int, batch: int) -> np.ndarray:
    """Batch b of items, padded with its last element like readers.file(pad_last_batch=True)."""
    chunk = items[b * batch : (b + 1) * batch]
    if len(chunk) < batch:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk))])
    return chunk
