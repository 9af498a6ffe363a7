"""The DALI backends: `dali` decodes on the GPU ("mixed"), `dali_cpu` does everything on CPU threads.

One pipeline per loader serves every epoch and every evaluation. Its input is an fn.external_source
callback (data.dali_source) that reads each file of this rank's order and computes its crop window, flip
and output size (progressive resizing) from (seed, epoch, dataset index), with the epoch taken from
DALI's own sample info: DALI makes no random decision, broken files never reach it, sharding stays ours,
the augmentation equals the torchvision backend's and a restart at (epoch, step) is exact. Train decodes
only the crop window (fn.decoders.image_slice, a fused crop+decode); val decodes whole images.

With data.workers >= 1 the callback runs in DALI's Python worker processes (spawned, so a CUDA context in
the parent is no obstacle); they hold a copy of it made at build time, which is why everything they need
comes in through the sample info or is fixed at build. The pipeline is rebuilt only when the caller jumps
to an epoch or step other than the next one (a resume), when an iteration is abandoned, or after a decode
failure: DALI cannot skip a sample inside a running pipeline, so the loader finds the file with a full PIL
decode, logs it, substitutes the next decodable image and rebuilds from the current batch, so the run goes
on as with the torchvision backend.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from .checks import decode_check
from .dali_source import SampleSource
from .errors import DataError
from .geometry import MEAN, STD
from .loader import Loader

PREFETCH = 2
MAX_SUBSTITUTES = 100
DALI_PACKAGE = "nvidia-dali-cuda130"


def import_dali(backend: str):
    """nvidia.dali's modules, or one DataError line that names the way out."""
    try:
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator
    except ImportError as e:
        raise DataError(f"data.backend {backend!r} needs NVIDIA DALI, which cannot be imported ({e}); "
                        f"pip install {DALI_PACKAGE}==2.4.0, or set data.backend: torchvision") from None
    return fn, pipeline_def, types, DALIGenericIterator


class DaliLoader(Loader):
    def __init__(self, *args, gpu: bool, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.backend = "dali" if gpu else "dali_cpu"
        self.gpu = gpu
        self._dali = import_dali(self.backend)
        self._substitutes: dict[int, int] = {}  # item that failed at run time -> its replacement
        self.builds = 0  # pipelines built so far (one, unless resumed elsewhere or a file failed to decode)
        self._pipe = None
        self._iterator = None
        self._fresh = False  # the iterator has not yet been read since it was built
        self._next: tuple[int, int] | None = None  # (epoch, start_step) the pipeline will produce next

    def _build(self, epoch: int, step: int) -> None:
        """A pipeline whose DALI epoch 0 is (epoch, from batch `step`) and whose epoch j is epoch + j."""
        self.close()
        fn, pipeline_def, types, DALIGenericIterator = self._dali
        decoder = "mixed" if self.gpu else "cpu"
        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) \
            if self.gpu else None
        mean = [m * 255 for m in MEAN]
        std = [s * 255 for s in STD]
        layout = "HWC" if self.channels_last else "CHW"
        size = self.image_size
        source = SampleSource(self.index, self.train, self.batch_size, self.rank, self.world_size, self.seed,
                              self.sizes, self.val_resize, epoch, step, dict(self._substitutes))
        parallel = self.workers > 0
        extra = dict(py_num_workers=max(1, self.workers // 2), py_start_method="spawn") if parallel else {}

        @pipeline_def(batch_size=self.batch_size, num_threads=max(1, self.workers), device_id=device_id,
                      prefetch_queue_depth=PREFETCH, exec_dynamic=True, **extra)
        def pipe():
            common = dict(device=decoder, output_type=types.RGB, adjust_orientation=False)
            if self.gpu:
                common["jpeg_fancy_upsampling"] = True  # the CPU/PIL chroma upsampling
            if self.train:
                jpegs, label, anchor, shape, mirror, out_size = fn.external_source(
                    source=source, num_outputs=6, batch=False, parallel=parallel)
                images = fn.decoders.image_slice(jpegs, anchor, shape, axis_names="WH", **common)
                images = fn.resize(images, size=out_size, interp_type=types.INTERP_LINEAR, antialias=True)
                images = fn.crop_mirror_normalize(images, mirror=mirror, mean=mean, std=std, dtype=types.FLOAT,
                                                  output_layout=layout)
            else:
                jpegs, label, resize, pos_x, pos_y = fn.external_source(source=source, num_outputs=5, batch=False,
                                                                        parallel=parallel)
                images = fn.decoders.image(jpegs, **common)
                images = fn.resize(images, size=resize, interp_type=types.INTERP_LINEAR, antialias=True)
                images = fn.crop_mirror_normalize(images, crop=(size, size), crop_pos_x=pos_x, crop_pos_y=pos_y,
                                                  mean=mean, std=std, dtype=types.FLOAT, output_layout=layout)
            return images, label

        self._pipe = pipe()
        self.builds += 1
        self._pipe.build()
        self._iterator = DALIGenericIterator([self._pipe], ["images", "labels"], auto_reset=False)
        self._fresh = True
        self._next = (epoch, step)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not self._batches:
            return
        epoch = self.epoch if self.train else 0  # val batches are the same every epoch
        keys = np.concatenate(self._batches)
        items = keys.copy()
        for pos in np.flatnonzero(np.isin(items, list(self._substitutes))):
            items[pos] = self._substitutes[int(items[pos])]
        done = 0
        complete = False
        try:
            while done < len(self._batches):
                try:
                    if self._iterator is None or self._next != (epoch, self.start_step + done):
                        self._build(epoch, self.start_step + done)
                    elif not self._fresh:
                        self._iterator.reset()
                    self._fresh = False
                    for out in self._iterator:
                        images, labels = out[0]["images"], out[0]["labels"]
                        n = len(self._batches[done])  # the rest of the last batch is padding
                        done += 1
                        if self.channels_last:
                            images = images.permute(0, 3, 1, 2)  # NCHW view of NHWC memory: no copy
                        yield (images[:n].to(self.device, non_blocking=True),
                               labels[:n].view(-1).to(self.device, dtype=torch.int64, non_blocking=True))
                except RuntimeError as e:
                    self.close()
                    if not self._substitute_broken(items, done * self.batch_size):
                        raise DataError(f"DALI failed on {self.index.split_dir} (epoch {self.epoch}): {_gist(e)} "
                                        f"-- run scripts/verify_dataset.py --quarantine DIR on the data, or use "
                                        f"data.backend: torchvision") from None
            complete = True
        finally:
            # After a whole epoch the pipeline goes on with the next one; after an abandoned one it is rebuilt.
            self._next = (epoch + 1 if self.train else 0, 0) if complete else None

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

    def close(self) -> None:
        """Release the pipeline (its threads, worker processes and device memory)."""
        self._iterator = self._pipe = None
        self._next = None


def _gist(e: BaseException) -> str:
    """The informative line of a multi-line DALI error (the failing sample and path, when present)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for line in lines:
        if "Failed to decode" in line:
            return line
    return lines[-1] if lines else type(e).__name__
