"""Train-pipeline throughput (images/s) of the standard torchvision loader and of our backends.

    python scripts/bench_loader.py --data ROOT [--threads N] [--batch-size B] [--seconds S] [--rounds R]
    python scripts/bench_loader.py --make-data DIR --images N [--classes C]

`standard` is the loader a user would write: ImageFolder + PIL + RandomResizedCrop/flip/ToTensor/
Normalize in N DataLoader worker processes. `torchvision` and `dali_cpu` are data.build_loader backends
with data.workers = N (and `dali` when a GPU is present); all use the same batch size and read ROOT/train.
Loaders run one after another for S seconds each, R rounds interleaved (the machine may be shared);
each loader's figure is its median over the rounds, each round after 2*N+2 warm-up batches.
Each measurement also reports the CPU time (all processes and threads of the loader) per image, which
depends little on other load on a shared machine. Prints one line per measurement, the medians, and a
final JSON line of images/s, e.g. {"standard": 310.2, "torchvision": 330.5, "dali_cpu": 560.2}.

--make-data writes N photo-like JPEGs (smooth colour fields, shapes, texture and sensor-like noise;
~500x375, quality 90, ~110 KB, like full-size ImageNet files) into DIR/train/<class>/, for machines
without ImageNet.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data.cpus import available_cpus  # noqa: E402 - after the path set-up; torch-free

SIZES = ((500, 375), (375, 500), (500, 333), (500, 400), (450, 350))


def photo_like_jpeg(rng: np.random.Generator, width: int = 500, height: int = 375, quality: int = 90) -> bytes:
    """A JPEG whose size and decode cost resemble a full-size ImageNet photo."""
    field = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
    img = Image.fromarray(field).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 10))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = [x0, y0, x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(20, 200))]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    pixels = np.asarray(img.filter(ImageFilter.GaussianBlur(1.2)), dtype=np.float32)
    texture = rng.integers(0, 256, (height // 4, width // 4), dtype=np.uint8)
    texture = np.asarray(Image.fromarray(texture).resize((width, height), Image.Resampling.BILINEAR), np.float32)
    pixels += (texture[..., None] - 128.0) * (40.0 / 128.0) + rng.normal(0.0, 26.0, pixels.shape)
    out = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(out, "JPEG", quality=quality)
    return out.getvalue()


def make_data(out: Path, images: int, classes: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    total = 0
    for k in range(images):
        folder = out / "train" / f"n{k % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        data = photo_like_jpeg(rng, *SIZES[int(rng.integers(len(SIZES)))])
        (folder / f"img_{k:06d}.JPEG").write_bytes(data)
        total += len(data)
    print(f"wrote {images} JPEGs in {classes} classes to {out / 'train'} (mean {total / images / 1024:.0f} KiB)")


def standard_loader(root: Path, threads: int, batch_size: int, device):
    """The loader a user would write with torchvision alone."""
    import torch
    from torchvision import datasets, transforms

    tf = transforms.Compose([
        transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    loader = torch.utils.data.DataLoader(
        datasets.ImageFolder(str(root / "train"), tf), batch_size=batch_size, shuffle=True, drop_last=True,
        num_workers=threads, persistent_workers=threads > 0, pin_memory=device.type == "cuda")

    def epochs():
        while True:
            for images, labels in loader:
                yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)

    return epochs()


def our_loader(root: Path, backend: str, threads: int, batch_size: int, device, cache_dir: str):
    from data import build_loader

    cfg = {"root": str(root), "backend": backend, "workers": threads, "image_size": 224, "val_resize": 256}
    loader = build_loader(cfg, "train", batch_size=batch_size, rank=0, world_size=1, seed=0, device=device,
                          cache_dir=cache_dir, log=lambda _: None)

    def epochs():
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            yield from loader
            epoch += 1

    return epochs()


def cpu_seconds(pid: int | None = None) -> float:
    """user+sys CPU time of this process and all its live descendants (DataLoader workers, DALI threads)."""
    total, stack = 0, [pid or os.getpid()]
    while stack:
        p = stack.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
            for task in os.listdir(f"/proc/{p}/task"):
                stack += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
        except (OSError, ValueError, IndexError):
            continue
    return total / os.sysconf("SC_CLK_TCK")


def measure(batches, seconds: float, sync, warmup: int) -> tuple[float, float]:
    """(images/s, CPU ms per image) over `seconds`, after `warmup` batches (start-up, and what was
    prefetched while the loader sat idle). CPU time per image hardly depends on what else the machine
    runs; images/s does."""
    for _ in range(warmup):
        next(batches)
    sync()
    count, cpu, start = 0, cpu_seconds(), time.perf_counter()
    while time.perf_counter() - start < seconds:
        images, _ = next(batches)
        count += images.shape[0]
    sync()
    return count / (time.perf_counter() - start), (cpu_seconds() - cpu) * 1000 / count


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="dataset root holding train/<class>/*")
    p.add_argument("--threads", type=int, default=available_cpus(), help="workers/threads for every loader")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seconds", type=float, default=15.0, help="measured seconds per loader and round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    p.add_argument("--backends", default=None,
                   help="comma list from standard,torchvision,dali_cpu,dali (default: all that can run)")
    p.add_argument("--make-data", type=Path, metavar="DIR", help="write a synthetic dataset to DIR and exit")
    p.add_argument("--images", type=int, default=2000, help="with --make-data: number of JPEGs")
    p.add_argument("--classes", type=int, default=10, help="with --make-data: number of class folders")
    args = p.parse_args()
    if args.make_data:
        make_data(args.make_data, args.images, args.classes)
        return 0
    if args.data is None or not (args.data / "train").is_dir():
        print(f"error: --data must be a dataset root holding train/<class>/ (got {args.data})", file=sys.stderr)
        return 2

    import torch

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    names = args.backends.split(",") if args.backends else ["standard", "torchvision", "dali_cpu"] + (
        ["dali"] if gpu else [])
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    torch.set_num_threads(max(1, args.threads))
    print(f"data {args.data}, threads {args.threads}, batch {args.batch_size}, device {device}, "
          f"{args.seconds:g}s x {args.rounds} rounds, cpus {available_cpus()}")
    with tempfile.TemporaryDirectory() as cache_dir:
        loaders = {n: standard_loader(args.data, args.threads, args.batch_size, device) if n == "standard"
                   else our_loader(args.data, n, args.threads, args.batch_size, device, cache_dir) for n in names}
        results: dict[str, list[float]] = {n: [] for n in names}
        cpu: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.rounds):
            for name, batches in loaders.items():
                rate, ms = measure(batches, args.seconds, sync, 2 * args.threads + 2)
                results[name].append(rate)
                cpu[name].append(ms)
                print(f"round {r + 1}: {name:12s} {rate:8.1f} img/s {ms:6.2f} CPU ms/img "
                      f"(load average {os.getloadavg()[0]:.1f})", flush=True)
        for batches in loaders.values():
            batches.close()
    medians = {n: round(statistics.median(v), 1) for n, v in results.items()}
    cpu_ms = {n: statistics.median(v) for n, v in cpu.items()}
    for n in names:
        versus = f", {medians[n] / medians['standard']:.2f}x standard" if "standard" in medians else ""
        print(f"median {n:12s} {medians[n]:8.1f} img/s, {cpu_ms[n]:.2f} CPU ms/img{versus}")
    print(json.dumps(medians))
    return 0


if __name__ == "__main__":
    sys.exit(main())
