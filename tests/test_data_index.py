"""Layout checks, the cheap pre-scan, the index cache, sharding arithmetic and crop geometry."""

from __future__ import annotations

import math
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from data import DataError
from data.checks import cheap_check
from data.geometry import random_resized_crop, sample_rng, train_crop
from data.index import default_cache_dir, load_index
from data.sampling import train_batches, val_batches


def jpeg(path, width=500, height=375, mode="RGB", fmt="JPEG", seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)).resize((width, height))
    img.convert(mode).save(path, fmt, quality=90)
    return open(path, "rb").read()


def tree(root, spec: dict[str, dict[str, list[str]]]) -> None:
    """spec: split -> class -> file names (written as small real JPEGs)."""
    for split, classes in spec.items():
        for wnid, names in classes.items():
            (root / split / wnid).mkdir(parents=True, exist_ok=True)
            for k, name in enumerate(names):
                jpeg(root / split / wnid / name, 64, 48, seed=k)


def snapshot(root) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_cheap_check_reasons(tmp_path):
    good = jpeg(tmp_path / "good.JPEG")
    assert cheap_check(tmp_path / "good.JPEG") == (500, 375, "")
    cases = {
        "zero.JPEG": (b"", "empty file (0 bytes)"),
        "text.JPEG": (b"hello world\n", "not a JPEG or PNG image"),
        "trunc.JPEG": (good[: len(good) // 2], "truncated JPEG"),
        "gif.JPEG": (b"GIF89a" + bytes(100), "not a JPEG or PNG image"),
        "header.JPEG": (b"\xff\xd8\xff" + bytes(100) + b"\xff\xd9", "unreadable header"),
    }
    for name, (data, reason) in cases.items():
        (tmp_path / name).write_bytes(data)
        assert reason in cheap_check(tmp_path / name).reason, name
    png = jpeg(tmp_path / "p.png", fmt="PNG")
    (tmp_path / "trunc.png").write_bytes(png[:-30])
    assert "truncated PNG" in cheap_check(tmp_path / "trunc.png").reason
    # valid oddities pass: PNG data in a .JPEG name, CMYK, grayscale, a few bytes of padding after EOI
    jpeg(tmp_path / "png.JPEG", fmt="PNG")
    jpeg(tmp_path / "cmyk.JPEG", mode="CMYK")
    jpeg(tmp_path / "gray.JPEG", mode="L")
    (tmp_path / "padded.JPEG").write_bytes(good + b"\x00" * 100)
    for name in ("png.JPEG", "cmyk.JPEG", "gray.JPEG", "padded.JPEG"):
        assert cheap_check(tmp_path / name) == (500, 375, ""), name


def test_layout_errors_name_the_path_before_scanning(tmp_path):
    lines = []
    with pytest.raises(DataError, match=f"{tmp_path / 'nope'} does not exist"):
        load_index(tmp_path / "nope", "train", tmp_path / "cache", lines.append)
    tree(tmp_path / "r", {"val": {"n1": ["a.JPEG"], "n2": ["b.JPEG"]}})
    with pytest.raises(DataError, match=f"{tmp_path / 'r' / 'train'}: missing 'train' folder"):
        load_index(tmp_path / "r", "train", tmp_path / "cache", lines.append)
    (tmp_path / "r" / "val" / "n3").mkdir()
    with pytest.raises(DataError, match=f"{tmp_path / 'r' / 'val' / 'n3'}: empty class folder"):
        load_index(tmp_path / "r", "val", tmp_path / "cache", lines.append)
    tree(tmp_path / "r", {"val": {"n3": ["c.JPEG"]}, "train": {"n1": ["a.JPEG"], "n2": ["b.JPEG"], "n4": ["d.JPEG"]}})
    for split in ("train", "val"):
        with pytest.raises(DataError, match="class folders differ") as e:
            load_index(tmp_path / "r", split, tmp_path / "cache", lines.append)
        assert "\n" not in str(e.value) and str(tmp_path / "r" / split) in str(e.value)
    assert not any("pre-scanning" in line for line in lines)
    with pytest.raises(DataError, match="no readable image left"):
        (tmp_path / "s" / "val" / "n1").mkdir(parents=True)
        (tmp_path / "s" / "val" / "n1" / "x.JPEG").write_bytes(b"")
        load_index(tmp_path / "s", "val", tmp_path / "cache", lines.append)


def test_labels_follow_sorted_wnids_and_val_only_root_works(tmp_path):
    wnids = ["n04", "n01", "n10", "n02"]
    tree(tmp_path, {"val": {w: [f"{w}_{k}.JPEG" for k in range(2)] for w in wnids}})
    (tmp_path / "val" / ".hidden").mkdir()
    (tmp_path / "val" / "n01" / ".DS_Store").write_bytes(b"junk")
    index = load_index(tmp_path, "val", tmp_path / "cache", lambda _: None)
    assert index.classes == sorted(wnids) and len(index) == 8 and not index.bad_files
    for i in range(len(index)):
        assert index.classes[index.labels[i]] == index.relpath(i).split("/")[0]
    assert (index.widths == 64).all() and (index.heights == 48).all()


def test_cache_hit_on_second_start_and_nothing_written_in_root(tmp_path, monkeypatch):
    root = tmp_path / "data"
    tree(root, {"train": {"n1": [f"{k}.JPEG" for k in range(5)], "n2": [f"{k}.JPEG" for k in range(4)]}})
    (root / "train" / "n2" / "broken.JPEG").write_bytes(b"")
    before = snapshot(root)
    scanned = []
    real_check = cheap_check

    def counting_check(path):
        scanned.append(os.fsdecode(path))
        return real_check(path)

    monkeypatch.setattr("data.index.cheap_check", counting_check)
    lines = []
    first = load_index(root, "train", tmp_path / "out", lines.append)
    assert first.checked == 10 and len(scanned) == 10 and len(first) == 9
    assert any("broken.JPEG" in line and "empty file" in line for line in lines)
    scanned.clear()
    lines.clear()
    second = load_index(root, "train", tmp_path / "out", lines.append)
    assert second.checked == 0 and scanned == []  # nothing re-scanned
    assert any("10 of 10 files known from the index cache" in line for line in lines)
    assert any("broken.JPEG" in line for line in lines)  # still reported, from the cache
    assert np.array_equal(first.paths, second.paths) and first.bad_files == second.bad_files
    assert snapshot(root) == before  # the cache lives in the output dir, never in the data root
    assert list((tmp_path / "out").rglob("*.npz"))
    # a changed file (size/mtime) and a new one are re-checked; the rest still come from the cache
    jpeg(root / "train" / "n1" / "0.JPEG", 80, 60)
    jpeg(root / "train" / "n1" / "new.JPEG", 64, 48)
    third = load_index(root, "train", tmp_path / "out", lambda _: None)
    assert sorted(scanned) == sorted(str(root / "train" / "n1" / n) for n in ("0.JPEG", "new.JPEG"))
    assert third.checked == 2 and len(third) == 10 and 80 in third.widths
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "lip"
    load_index(root, "train", None, lambda _: None)
    assert list((tmp_path / "xdg" / "lip").rglob("*.npz"))


@pytest.mark.parametrize("num_items", [1, 7, 10, 11, 64, 101])
def test_sharding_arithmetic(num_items):
    for world in (1, 2, 3, 4):
        parts = [np.concatenate(val_batches(num_items, 4, r, world) or [np.array([], int)]) for r in range(world)]
        assert sorted(np.concatenate(parts).tolist()) == list(range(num_items))  # each exactly once
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        per_rank = num_items // (4 * world)
        train = [train_batches(num_items, 4, r, world, seed=3, epoch=2) for r in range(world)]
        assert all(len(t) == per_rank and all(len(b) == 4 for b in t) for t in train)
        flat = [int(i) for t in train for b in t for i in b]
        assert len(flat) == len(set(flat)) == per_rank * 4 * world
    a = train_batches(101, 4, 0, 1, seed=3, epoch=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, train_batches(101, 4, 0, 1, seed=3, epoch=2), strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, train_batches(101, 4, 0, 1, seed=3, epoch=3), strict=True))


def test_crop_geometry_is_deterministic_and_matches_torchvision_distribution():
    assert train_crop(1, 2, 3, 500, 375) == train_crop(1, 2, 3, 500, 375)
    assert train_crop(1, 2, 3, 500, 375) != train_crop(1, 2, 4, 500, 375)
    ours = [random_resized_crop(sample_rng(0, 0, i), 500, 375) for i in range(4000)]
    torch.manual_seed(0)
    img = torch.empty(3, 375, 500)
    theirs = [RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(4000)]
    for c in ours:
        assert c.x >= 0 and c.x + c.w <= 500 and c.y >= 0 and c.y + c.h <= 375
    area = (np.mean([c.w * c.h for c in ours]), np.mean([h * w for _, _, h, w in theirs]))
    logr = (np.mean([math.log(c.w / c.h) for c in ours]), np.mean([math.log(w / h) for _, _, h, w in theirs]))
    cx = (np.mean([c.x + c.w / 2 for c in ours]), np.mean([j + w / 2 for _, j, _, w in theirs]))
    assert abs(area[0] - area[1]) / area[1] < 0.05, area
    assert abs(logr[0] - logr[1]) < 0.02, logr
    assert abs(cx[0] - cx[1]) < 5, cx
    assert abs(np.mean([c.flip for c in ours]) - 0.5) < 0.03
    # an extreme aspect ratio falls back to torchvision's clamped central crop
    assert random_resized_crop(sample_rng(0, 0, 0), 4000, 100)[:4] == (1933, 0, 133, 100)


def test_rank_processes_share_one_scan(tmp_path):
    """Concurrent starts (torchrun ranks) serialise on the cache lock: exactly one of them scans."""
    import multiprocessing as mp

    tree(tmp_path / "d", {"val": {"n1": [f"{k}.JPEG" for k in range(30)]}})
    ctx = mp.get_context("fork")
    with ctx.Pool(3) as pool:
        checked = pool.starmap(_checked, [(str(tmp_path / "d"), str(tmp_path / "c"))] * 3)
    assert sorted(checked) == [0, 0, 30]


def _checked(root: str, cache: str) -> int:
    return load_index(root, "val", cache, lambda _: None).checked


def test_big_scans_in_processes_agree_with_in_process_scans(tmp_path, monkeypatch):
    tree(tmp_path / "d", {"val": {"n1": [f"{k}.JPEG" for k in range(12)], "n2": [f"{k}.JPEG" for k in range(9)]}})
    (tmp_path / "d" / "val" / "n2" / "bad.JPEG").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    small = load_index(tmp_path / "d", "val", tmp_path / "c1", lambda _: None)
    monkeypatch.setattr("data.index.PROCESS_MIN_FILES", 1)
    monkeypatch.setattr("data.index.PROCESS_MIN_CLASSES", 1)
    monkeypatch.setattr("data.index.CLASS_CHUNK", 1)
    monkeypatch.setattr("data.index.SCAN_CHUNK", 5)
    big = load_index(tmp_path / "d", "val", tmp_path / "c2", lambda _: None)
    assert big.checked == small.checked == 22
    for field in ("paths", "labels", "widths", "heights"):
        assert np.array_equal(getattr(big, field), getattr(small, field)), field
    assert big.bad_files == small.bad_files and len(big.bad_files) == 1


def test_workers_and_scan_pool_follow_the_cpus_the_job_has(tmp_path, monkeypatch):
    """data.workers null: the CPUs this process may use (affinity, SLURM's per-task count) shared among the
    node's ranks, one kept for each rank; the index scan's pool uses the same count, never os.cpu_count()."""
    from data import build_loader
    from data.cpus import available_cpus, default_workers

    monkeypatch.setattr(os, "cpu_count", lambda: 256)  # the whole machine: must not matter
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(16)))
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert (available_cpus(), default_workers()) == (16, 3)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "8")
    assert (available_cpus(), default_workers()) == (8, 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert default_workers() == 1  # at least one

    tree(tmp_path / "d", {"val": {"n1": ["a.JPEG", "b.JPEG"], "n2": ["c.JPEG"]}})
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    cfg = {"root": str(tmp_path / "d"), "backend": "torchvision", "workers": None}
    ld = build_loader(cfg, "val", batch_size=1, rank=0, world_size=1, seed=0, device="cpu",
                      cache_dir=tmp_path / "c0", log=lambda _: None)
    assert ld.workers == 3  # 8 CPUs / 2 ranks - 1
    assert build_loader({**cfg, "workers": 5}, "val", batch_size=1, rank=0, world_size=1, seed=0, device="cpu",
                        cache_dir=tmp_path / "c0", log=lambda _: None).workers == 5

    pools = []

    def recording_pool(processes, **kwargs):
        pools.append(processes)
        return ProcessPoolExecutor(processes, **kwargs)

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 2})
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    monkeypatch.setattr("data.index.ProcessPoolExecutor", recording_pool)
    monkeypatch.setattr("data.index.PROCESS_MIN_FILES", 1)
    monkeypatch.setattr("data.index.PROCESS_MIN_CLASSES", 1)
    monkeypatch.setattr("data.index.CLASS_CHUNK", 1)
    monkeypatch.setattr("data.index.SCAN_CHUNK", 1)
    load_index(tmp_path / "d", "val", tmp_path / "c1", lambda _: None)
    assert pools and set(pools) == {3}
