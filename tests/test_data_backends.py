"""The loaders on real JPEG/PNG files: semantics, labels, sharding, odd and broken files, exact resume.

Every backend that can run here (torchvision, dali_cpu) gets the same checks; the GPU `dali` backend
can only be checked for failing clearly without a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from data import DataError, build_loader
from data.geometry import train_crop
from data.torchvision_loader import Decoder, draft_scale

MEAN, STD = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
BACKENDS = ["torchvision", "dali_cpu"]
CLASSES = ["n01440764", "n01443537", "n01484850"]
# (class, name, width, height, kind): ImageNet-like sizes; 11 train and 7 val images are usable.
TRAIN = [(0, "a", 500, 375, "rgb"), (0, "b", 375, 500, "cmyk"), (0, "c", 500, 333, "rgb"), (0, "d", 2000, 1500, "rgb"),
         (1, "a", 500, 375, "gray"), (1, "b", 450, 350, "rgb"), (1, "c", 500, 400, "rgb"),
         (2, "a", 500, 375, "png"), (2, "b", 333, 500, "rgb"), (2, "c", 500, 375, "rgb"), (2, "d", 480, 360, "rgb")]
VAL = [(0, "v1", 500, 375, "cmyk"), (0, "v2", 375, 500, "rgb"), (0, "v3", 501, 333, "rgb"),
       (1, "v4", 500, 375, "gray"), (1, "v5", 450, 351, "rgb"),
       (2, "v6", 500, 375, "png"), (2, "v7", 333, 500, "rgb")]
BROKEN = {"train": [(0, "zero.JPEG", "empty file"), (1, "trunc.JPEG", "truncated JPEG"),
                    (2, "notes.txt", "not a JPEG or PNG")],
          "val": [(1, "trunc.JPEG", "truncated PNG"), (2, "zero.JPEG", "empty file")]}
# How far DALI's pixels may be from PIL's, in normalised units (one grey level ~ 0.017; measured:
# mean ~0.003, max 0.018 for val and 0.035 for train).
MEAN_BOUND, MAX_BOUND = 0.006, 0.06
# PIL draft mode (JPEG decoded at 1/2..1/8 scale, crop still shrunk >= 2x): measured mean 0.39/255
DRAFT_BOUNDS = (0.015, 0.25)


def photo(seed: int, width: int, height: int) -> Image.Image:
    """Smooth colour field plus noise: crops of it differ, like crops of a photo."""
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height),
                                                                                    Image.Resampling.BICUBIC)
    pixels = np.asarray(field, np.float32) + rng.normal(0, 8, (height, width, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def write_image(path, seed: int, width: int, height: int, kind: str) -> None:
    img = photo(seed, width, height)
    if kind == "png":  # PNG data in a .JPEG file, like one real ImageNet train file
        img.save(path, format="PNG")
    else:
        {"rgb": img, "cmyk": img.convert("CMYK"), "gray": img.convert("L")}[kind].save(path, "JPEG", quality=90)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    for split, items in (("train", TRAIN), ("val", VAL)):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True)
        for k, (c, name, w, h, kind) in enumerate(items):
            write_image(root / split / CLASSES[c] / f"{name}.JPEG", 100 * (split == "val") + k, w, h, kind)
        for c, name, _ in BROKEN[split]:
            path = root / split / CLASSES[c] / name
            if name.startswith("zero"):
                path.write_bytes(b"")
            elif name.endswith(".txt"):
                path.write_text("not an image\n")
            elif split == "train":
                path.write_bytes((root / "train" / CLASSES[0] / "a.JPEG").read_bytes()[:20000])
            else:
                raw = (root / "val" / CLASSES[2] / "v6.JPEG").read_bytes()
                path.write_bytes(raw[: len(raw) // 2])
    return root


def loader(root, tmp_path, backend, split, batch_size=2, rank=0, world_size=1, workers=0, seed=7, log=None,
           channels_last=False, **extra):
    cfg = {"root": str(root), "backend": backend, "workers": workers, "image_size": 224, "val_resize": 256, **extra}
    return build_loader(cfg, split, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                        device="cpu", cache_dir=tmp_path / "cache", channels_last=channels_last,
                        log=log or (lambda _: None))


def run(ld, epoch=0, start_step=0):
    ld.set_epoch(epoch, start_step)
    out = [(x.clone(), y.clone()) for x, y in ld]
    assert len(out) == len(ld)
    return out


def to_tensor(img: Image.Image) -> torch.Tensor:
    return F.normalize(F.to_dtype(F.to_image(img), torch.float32, scale=True), MEAN, STD)


def val_reference(path) -> torch.Tensor:
    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(MEAN, STD)])
    return tf(Image.open(path).convert("RGB"))


def train_reference(path, seed, epoch, item, pil=False, size=224) -> torch.Tensor:
    """torchvision's resized_crop + hflip with our window, on a uint8 tensor image (or on the PIL image)."""
    img = Image.open(path).convert("RGB")
    c = train_crop(seed, epoch, item, *img.size)
    img = img if pil else F.to_image(img)
    out = F.resized_crop(img, c.y, c.x, c.h, c.w, [size, size], T.InterpolationMode.BILINEAR, antialias=True)
    out = F.horizontal_flip(out) if c.flip else out
    return to_tensor(out) if pil else F.normalize(out.float() / 255, MEAN, STD)


def drafted(path, seed, epoch, item, size=224) -> bool:
    """Whether the torchvision backend decodes this sample with PIL's draft mode."""
    with Image.open(path) as im:
        return draft_scale(train_crop(seed, epoch, item, *im.size), size) > 1


def assert_close_to(x: torch.Tensor, ref: torch.Tensor, exact: bool, what: str, bounds=None) -> None:
    d = (x - ref).abs()
    mean_bound, max_bound = bounds or (MEAN_BOUND, MAX_BOUND)
    if exact:
        assert d.max() < 1e-5, f"{what}: max diff {d.max():.2e}"
    else:
        assert d.mean() < mean_bound and d.max() < max_bound, f"{what}: mean {d.mean():.4f} max {d.max():.3f}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_val_semantics_labels_and_bad_files(root, tmp_path, backend):
    lines = []
    ld = loader(root, tmp_path, backend, "val", batch_size=3, log=lines.append)
    assert ld.classes == CLASSES and ld.num_images == len(VAL)
    assert sorted(p for p, _ in ld.bad_files) == sorted(str(root / "val" / CLASSES[c] / n) for c, n, _ in BROKEN["val"])
    for c, name, reason in BROKEN["val"]:
        path = str(root / "val" / CLASSES[c] / name)
        assert any(path in line and reason in line for line in lines), (path, lines)
        assert reason in dict(ld.bad_files)[path]
    batches = run(ld)
    assert [len(y) for _, y in batches] == [3, 3, 1]
    items = np.concatenate(ld.indices())
    images = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    assert images.shape == (7, 3, 224, 224) and images.dtype == torch.float32 and images.is_contiguous()
    assert labels.dtype == torch.int64
    for k, item in enumerate(items):
        path = ld.index.path(int(item))
        assert labels[k] == CLASSES.index(path.split("/")[-2])
        assert_close_to(images[k], val_reference(path), backend == "torchvision", f"{backend} val {path}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_semantics_odd_files_and_labels(root, tmp_path, backend):
    ld = loader(root, tmp_path, backend, "train", batch_size=3)
    assert ld.num_images == len(TRAIN) and len(ld.bad_files) == len(BROKEN["train"])
    assert len(ld) == len(TRAIN) // 3
    ld.set_epoch(0)
    items = np.concatenate(ld.indices())
    seen_kinds = set()
    kinds = {f"{CLASSES[c]}/{n}.JPEG": kind for c, n, _, _, kind in TRAIN}
    for epoch in (0, 1):
        batches = run(ld, epoch)
        items = np.concatenate(ld.indices())
        images = torch.cat([x for x, _ in batches])
        labels = torch.cat([y for _, y in batches])
        for k, item in enumerate(items):
            path = ld.index.path(int(item))
            seen_kinds.add(kinds[ld.index.relpath(int(item))])
            assert labels[k] == CLASSES.index(path.split("/")[-2])
            if drafted(path, 7, epoch, int(item)):
                ref = train_reference(path, 7, epoch, int(item), pil=True)
                bounds = DRAFT_BOUNDS if backend == "torchvision" else None
                assert_close_to(images[k], ref, False, f"{backend} {path} (drafted)", bounds)
                continue
            ref = train_reference(path, 7, epoch, int(item))
            assert_close_to(images[k], ref, backend == "torchvision", f"{backend} {path}")
            # the tensor resampler is PIL's bilinear filter within one grey level
            pil = train_reference(path, 7, epoch, int(item), pil=True)
            assert_close_to(images[k], pil, False, f"{backend} {path} vs PIL", (MEAN_BOUND, MAX_BOUND))
    assert {"cmyk", "gray", "png"} <= seen_kinds


@pytest.mark.slow
def test_train_backends_agree(root, tmp_path):
    """Same (seed, epoch) -> the same crops and flips in both backends, up to decoder/resampler rounding."""
    tv = run(loader(root, tmp_path, "torchvision", "train", batch_size=5, workers=2), epoch=3)
    dali = run(loader(root, tmp_path, "dali_cpu", "train", batch_size=5, workers=2), epoch=3)
    ld = loader(root, tmp_path, "torchvision", "train", batch_size=5)
    ld.set_epoch(3)
    items = np.concatenate(ld.indices())
    images = (torch.cat([x for x, _ in tv]), torch.cat([x for x, _ in dali]))
    assert torch.equal(torch.cat([y for _, y in tv]), torch.cat([y for _, y in dali]))
    for k, item in enumerate(items):
        bounds = DRAFT_BOUNDS if drafted(ld.index.path(int(item)), 7, 3, int(item)) else None
        assert_close_to(images[1][k], images[0][k], False, f"dali_cpu vs torchvision, item {item}", bounds)


PROGRESSIVE = {"image_size": 224, "progressive": {"start_size": 160, "start_epoch": 0, "end_epoch": 2, "multiple": 32}}
SIZES = [160, 192, 224, 224]  # epochs 0..3: linear 160 -> 224 over epochs 0..2, rounded to multiples of 32


@pytest.mark.slow
def test_dali_pipeline_built_once_follows_epochs_sizes_and_the_torchvision_order(root, tmp_path):
    """One dali_cpu pipeline (its external_source in 2 worker processes) serves four train epochs of three
    sizes and four evaluations; every epoch's order, labels and crops equal the torchvision backend's."""
    dali = loader(root, tmp_path, "dali_cpu", "train", batch_size=3, workers=4, **PROGRESSIVE)
    tv = loader(root, tmp_path, "torchvision", "train", batch_size=3, workers=0, **PROGRESSIVE)
    val = loader(root, tmp_path, "dali_cpu", "val", batch_size=3, workers=2)
    val_once = torch.cat([x for x, _ in run(val)])
    for epoch, size in enumerate(SIZES):
        got, ref = run(dali, epoch), run(tv, epoch)
        assert dali.image_size == tv.image_size == size
        assert [x.shape for x, _ in got] == [x.shape for x, _ in ref] == [(3, 3, size, size)] * len(ref)
        assert torch.equal(torch.cat([y for _, y in got]), torch.cat([y for _, y in ref]))
        for k, item in enumerate(np.concatenate(tv.indices())):
            x, r = torch.cat([x for x, _ in got])[k], torch.cat([x for x, _ in ref])[k]
            path = tv.index.path(int(item))
            bounds = DRAFT_BOUNDS if drafted(path, 7, epoch, int(item), size) else None
            assert_close_to(x, r, False, f"epoch {epoch} size {size} item {item}", bounds)
        assert torch.equal(torch.cat([x for x, _ in run(val)]), val_once)
    assert dali.builds == 1 and val.builds == 1
    run(dali, 1, start_step=2)  # a jump (a resume elsewhere) rebuilds; the next epoch reuses that pipeline
    run(dali, 2)
    assert dali.builds == 2
    dali.close()
    val.close()
    assert dali._pipe is None and val._pipe is None


@pytest.mark.cuda
def test_gpu_dali_pipeline_built_once_with_sizes_order_and_channels_last(root, tmp_path):
    """The `dali` backend (GPU decode): one pipeline over epochs of changing size, the torchvision order and
    labels, NHWC channels_last float batches on the device, pixels near the CPU decode."""
    pytest.importorskip("nvidia.dali")
    cfg = {"root": str(root), "backend": "dali", "workers": 2, "image_size": 224, "val_resize": 256, **PROGRESSIVE}
    gpu = build_loader(cfg, "train", batch_size=3, rank=0, world_size=1, seed=7, device="cuda",
                       cache_dir=tmp_path / "cache", channels_last=True, log=lambda _: None)
    tv = loader(root, tmp_path, "torchvision", "train", batch_size=3, **PROGRESSIVE)
    for epoch, size in enumerate(SIZES):
        got, ref = run(gpu, epoch), run(tv, epoch)
        assert all(x.is_cuda and x.dtype == torch.float32 and x.shape == (3, 3, size, size)
                   and x.is_contiguous(memory_format=torch.channels_last) for x, _ in got)
        assert torch.equal(torch.cat([y for _, y in got]).cpu(), torch.cat([y for _, y in ref]))
        diff = (torch.cat([x for x, _ in got]).cpu() - torch.cat([x for x, _ in ref])).abs()
        assert diff.mean() < 0.02, f"epoch {epoch}: mean {diff.mean():.4f}"
    assert gpu.builds == 1
    gpu.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_is_a_view_of_the_same_values(root, tmp_path, backend):
    plain = torch.cat([x for x, _ in run(loader(root, tmp_path, backend, "val", batch_size=4))])
    nhwc = run(loader(root, tmp_path, backend, "val", batch_size=4, channels_last=True))
    assert all(x.is_contiguous(memory_format=torch.channels_last) and x.dtype == torch.float32 for x, _ in nhwc)
    assert torch.equal(torch.cat([x for x, _ in nhwc]), plain)


@pytest.mark.parametrize("backend", BACKENDS)
def test_val_image_size_is_used(root, tmp_path, backend):
    ld = loader(root, tmp_path, backend, "val", batch_size=4, val_image_size=288, val_resize=320, **PROGRESSIVE)
    images = torch.cat([x for x, _ in run(ld)])
    assert images.shape == (len(VAL), 3, 288, 288)
    for k, item in enumerate(np.concatenate(ld.indices())):
        path = ld.index.path(int(item))
        tf = T.Compose([T.Resize(320), T.CenterCrop(288), T.ToTensor(), T.Normalize(MEAN, STD)])
        assert_close_to(images[k], tf(Image.open(path).convert("RGB")), backend == "torchvision", path)


def test_progressive_sizes_are_rounded_and_bad_settings_refused(root, tmp_path):
    odd = {"image_size": 200, "progressive": {"start_size": 150, "start_epoch": 0, "end_epoch": 2, "multiple": 32}}
    ld = loader(root, tmp_path, "torchvision", "train", **odd)
    assert [ld.sizes(e) for e in range(4)] == [160, 160, 192, 192]  # 150, 175, 200, 200 to multiples of 32
    backwards = {"progressive": {"start_size": 160, "start_epoch": 2, "end_epoch": 2}}
    with pytest.raises(DataError, match="end_epoch.*after"):
        loader(root, tmp_path, "torchvision", "train", **backwards)
    with pytest.raises(DataError, match="val_resize"):
        loader(root, tmp_path, "torchvision", "val", val_image_size=288)


def test_draft_mode_for_large_jpegs_keeps_semantics(root, tmp_path):
    """A crop that shrinks >= 4x is decoded at 1/2 scale; the result stays near a full decode."""
    ld = loader(root, tmp_path, "torchvision", "train")
    item = next(i for i in range(ld.num_images) if ld.index.relpath(i).endswith("/d.JPEG"))
    path = ld.index.path(item)
    key = next(k for k in range(1000) if drafted(path, 7, 0, k))
    decoder = Decoder(ld.index, True, 7, 256)
    image = F.normalize(decoder.load(item, 0, key, 224).permute(2, 0, 1).float() / 255, MEAN, STD)
    assert_close_to(image, train_reference(path, 7, 0, key, pil=True), False, "drafted", DRAFT_BOUNDS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_val_exactly_once_on_1_2_3_ranks(root, tmp_path, backend):
    single = run(loader(root, tmp_path, backend, "val"))
    ref_images = torch.cat([x for x, _ in single])
    ref_labels = torch.cat([y for _, y in single])
    classifier = torch.nn.Linear(3, len(CLASSES))
    torch.nn.init.normal_(classifier.weight, generator=torch.Generator().manual_seed(0))
    torch.nn.init.zeros_(classifier.bias)

    def correct(images, labels):  # what the trainer all-reduces: a sum over this rank's images
        logits = classifier(images.mean(dim=(2, 3)))
        return int((logits.argmax(1) == labels).sum())

    for world in (2, 3):
        parts = [run(loader(root, tmp_path, backend, "val", rank=r, world_size=world)) for r in range(world)]
        images = torch.cat([x for part in parts for x, _ in part])
        labels = torch.cat([y for part in parts for _, y in part])
        assert len(labels) == len(VAL)  # 7 images: no padding duplicates, no dropped tail
        assert torch.equal(labels, ref_labels) and torch.equal(images, ref_images)
        summed = sum(correct(x, y) for part in parts for x, y in part)
        assert summed == correct(ref_images, ref_labels)


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_equal_batches_on_1_2_3_ranks(root, tmp_path, backend):
    for world in (1, 2, 3):
        loaders = [loader(root, tmp_path, backend, "train", rank=r, world_size=world) for r in range(world)]
        expected = len(TRAIN) // (2 * world)
        seen = []
        for ld in loaders:
            batches = run(ld, epoch=2)
            assert len(ld) == len(batches) == expected and all(len(y) == 2 for _, y in batches)
            seen += [int(i) for b in ld.indices() for i in b]
        assert len(seen) == len(set(seen)) == expected * 2 * world


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_mid_epoch_is_exact(root, tmp_path, backend):
    ld = loader(root, tmp_path, backend, "train", batch_size=2, workers=2)
    rng = torch.get_rng_state()
    full = run(ld, epoch=4)
    assert len(full) == 5
    assert torch.equal(rng, torch.get_rng_state())  # the trainer's RNG stream is left alone
    resumed = run(ld, epoch=4, start_step=3)
    assert len(resumed) == 2 and ld.batches_per_epoch == 5
    for (x1, y1), (x2, y2) in zip(full[3:], resumed, strict=True):
        assert torch.equal(y1, y2) and torch.equal(x1, x2)
    other = run(ld, epoch=5)
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(full, other, strict=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_file_that_fails_at_run_time_is_logged_and_substituted(root, tmp_path, backend):
    """A file that passed the pre-scan but no longer decodes: logged, replaced by the next image."""
    lines = []
    ld = loader(root, tmp_path, backend, "val", batch_size=1, workers=1, log=lines.append)
    victim = ld.index.path(5)  # late in the epoch: DALI has already yielded and prefetched batches
    original = Path(victim).read_bytes()
    try:  # right magic bytes and end marker, garbage in between
        Path(victim).write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 40 + b"\xff\xd9")
        batches = run(ld)
        again = run(ld)  # the next epoch substitutes the same way, without logging the file again
    finally:
        Path(victim).write_bytes(original)
    labels = torch.cat([y for _, y in batches])
    assert len(labels) == len(VAL)
    assert sum(victim in line and "failed to decode" in line for line in lines) == 1, lines
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(batches, again, strict=True))
    assert victim in dict(ld.bad_files)
    assert labels[5] == ld.index.labels[6]  # deterministic substitute: the next image in the index
    image = torch.cat([x for x, _ in batches])[5]
    assert_close_to(image, val_reference(ld.index.path(6)), backend == "torchvision", "substitute")


def test_dali_backends_fail_clearly_without_dali_or_gpu(root, tmp_path, monkeypatch):
    lines = []
    if not torch.cuda.is_available():
        with pytest.raises(DataError, match="GPU.*dali_cpu or torchvision"):
            loader(root, tmp_path, "dali", "val", log=lines.append)
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    for backend in ("dali", "dali_cpu"):
        with pytest.raises(DataError, match="cannot be imported.*torchvision") as e:
            loader(root, tmp_path, backend, "val", log=lines.append)
        assert "\n" not in str(e.value)
    assert not lines  # refused before indexing anything


def test_config_errors_are_one_line(root, tmp_path):
    with pytest.raises(DataError, match="data.backend"):
        loader(root, tmp_path, "pillow", "val")
    with pytest.raises(DataError, match="global batch"):
        loader(root, tmp_path, "torchvision", "train", batch_size=4, world_size=3)
    with pytest.raises(DataError, match="start_step"):
        loader(root, tmp_path, "torchvision", "train").set_epoch(0, start_step=99)


RANK_SCRIPT = """
import json, sys, torch, torch.distributed as dist
from data import build_loader


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    root, cache, out = sys.argv[1:4]
    classifier = torch.nn.Linear(3, 3)
    torch.nn.init.normal_(classifier.weight, generator=torch.Generator().manual_seed(0))
    torch.nn.init.zeros_(classifier.bias)
    result = {}
    for backend in ("torchvision", "dali_cpu"):
        cfg = {"root": root, "backend": backend, "workers": 1, "image_size": 224, "val_resize": 256}
        kw = dict(batch_size=2, rank=rank, world_size=world, seed=7, device="cpu", cache_dir=cache, log=lambda _: None)
        val = build_loader(cfg, "val", **kw)
        sums = torch.zeros(3)  # top-1 hits, top-2 hits, images: what the trainer all-reduces
        for images, labels in val:
            top = classifier(images.mean(dim=(2, 3))).topk(2, dim=1).indices
            sums += torch.tensor([(top[:, 0] == labels).sum(), (top == labels[:, None]).any(1).sum(), len(labels)])
        dist.all_reduce(sums)
        train = build_loader(cfg, "train", **kw)
        lengths = [None] * world
        dist.all_gather_object(lengths, len(train))
        result[backend] = {"sums": sums.tolist(), "train_lengths": lengths}
    if rank == 0:
        json.dump(result, open(out, "w"))
    dist.destroy_process_group()


if __name__ == "__main__":  # the DALI loaders spawn worker processes, which import this file
    main()
"""


@pytest.mark.slow
def test_torchrun_ranks_count_each_val_image_once(root, tmp_path):
    """Real rank processes (torchrun, gloo): all-reduced top-1/top-2 sums equal the 1-process ones."""
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    out = tmp_path / "result.json"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "3",
                           "--standalone", str(script), str(root), str(tmp_path / "cache"), str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    classifier = torch.nn.Linear(3, 3)
    torch.nn.init.normal_(classifier.weight, generator=torch.Generator().manual_seed(0))
    torch.nn.init.zeros_(classifier.bias)
    for backend in BACKENDS:
        images = torch.cat([x for x, _ in run(loader(root, tmp_path, backend, "val"))])
        labels = torch.cat([y for _, y in run(loader(root, tmp_path, backend, "val"))])
        with torch.no_grad():
            top = classifier(images.mean(dim=(2, 3))).topk(2, dim=1).indices
        expected = [float((top[:, 0] == labels).sum()), float((top == labels[:, None]).any(1).sum()), 7.0]
        assert result[backend]["sums"] == expected, backend
        assert result[backend]["train_lengths"] == [len(TRAIN) // 6] * 3


def test_config_cache_dir_wins_over_the_callers_default(root, tmp_path):
    cfg = {"root": str(root), "backend": "torchvision", "workers": 0, "cache_dir": str(tmp_path / "shared")}
    build_loader(cfg, "val", batch_size=2, rank=0, world_size=1, seed=0, device="cpu",
                 cache_dir=tmp_path / "run_output", log=lambda _: None)
    assert list((tmp_path / "shared").rglob("*.npz")) and not (tmp_path / "run_output").exists()
