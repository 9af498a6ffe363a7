"""The file index of one split: layout checks, a parallel cheap pre-scan, and its on-disk cache.

`load_index` validates the ImageFolder layout (root/split/<wnid>/...), lists every file with its size
and mtime, and runs `checks.cheap_check` only on files the cache does not already know under the same
(path, size, mtime); so the first start over ImageNet reads ~1.3M headers once and later starts only
list and stat the tree. The cache lives under `cache_dir` (the trainer passes its output directory) or
~/.cache/lip, never inside the data root, which may be read-only. Ranks that start together serialise
on a lock file, so one of them scans and the others read its result.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checks import cheap_check
from .errors import DataError

SPLITS = ("train", "val")
CACHE_VERSION = 1
SCAN_THREADS = 16
MAX_LOGGED_BAD = 20


@dataclass
class SplitIndex:
    """The usable images of one split. Arrays (not lists of str) so forked workers share pages."""

    split_dir: Path
    classes: list[str]
    paths: np.ndarray  # bytes, relative to split_dir
    labels: np.ndarray  # int64 class index (sorted wnid order)
    widths: np.ndarray  # int32, from the file header
    heights: np.ndarray  # int32
    bad_files: list[tuple[str, str]]  # (absolute path, reason), excluded from every backend
    checked: int  # files whose header was read on this start (0 = everything came from the cache)

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, i: int) -> str:
        """Absolute path of item i."""
        return os.path.join(self.split_dir, os.fsdecode(self.paths[i]))

    def relpath(self, i: int) -> str:
        return os.fsdecode(self.paths[i])


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/lip or ~/.cache/lip."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lip"


def class_folders(split_dir: Path) -> list[str]:
    """Sorted names of the non-hidden sub-folders (torchvision ImageFolder's class order)."""
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def check_layout(root: str | os.PathLike[str], split: str) -> tuple[Path, list[str]]:
    """Validate root/split and return (split_dir, classes); raise DataError naming the path otherwise.

    Classes come from train/ when it exists, and any other split must have exactly the same set, so
    label indices agree between splits (and with released checkpoints).
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root {root} does not exist or is not a folder")
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: missing '{split}' folder (expected {split_dir}/<wnid>/<images>)")
    classes = class_folders(split_dir)
    if not classes:
        raise DataError(f"{split_dir}: no class folders (expected {split_dir}/<wnid>/<images>)")
    for other in SPLITS:
        other_dir = root / other
        if other == split or not other_dir.is_dir():
            continue
        other_classes = class_folders(other_dir)
        if set(other_classes) != set(classes):
            only_here = sorted(set(classes) - set(other_classes))
            only_there = sorted(set(other_classes) - set(classes))
            detail = f"{len(only_here)} only in {split}/ (e.g. {only_here[:1]}), " \
                     f"{len(only_there)} only in {other}/ (e.g. {only_there[:1]})"
            raise DataError(f"{split_dir}: class folders differ from {other_dir}: {detail}")
    return split_dir, classes


def _list_class(split_dir: Path, wnid: str) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime_ns) of every non-hidden file below one class folder, sorted."""
    out = []
    stack = [wnid]
    while stack:
        rel_dir = stack.pop()
        with os.scandir(split_dir / rel_dir) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                rel = f"{rel_dir}/{e.name}"
                if e.is_dir():
                    stack.append(rel)
                    continue
                try:
                    st = e.stat()
                except OSError:  # dangling symlink: report it as a bad file
                    out.append((rel, -1, -1))
                    continue
                out.append((rel, st.st_size, st.st_mtime_ns))
    out.sort()
    return out


def _cache_path(cache_dir: Path, split_dir: Path) -> Path:
    key = hashlib.sha1(str(split_dir.resolve()).encode()).hexdigest()[:16]
    return cache_dir / "data-index" / f"{split_dir.name}-{key}.npz"


@contextlib.contextmanager
def _locked(path: Path, log: Callable[[str], None]) -> Iterator[None]:
    """Hold an exclusive lock next to the cache file, so concurrent ranks scan only once."""
    with open(path.with_suffix(".lock"), "w") as fd:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"data: waiting for another process that is indexing ({path.with_suffix('.lock')})")
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)


def _read_cache(path: Path, split_dir: Path) -> dict[str, tuple[int, int, int, int, str]]:
    """rel path -> (size, mtime_ns, width, height, reason); empty when absent, stale or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["version"]) != CACHE_VERSION or str(z["split_dir"]) != str(split_dir.resolve()):
                return {}
            rows = zip(z["paths"].tolist(), z["sizes"].tolist(), z["mtimes"].tolist(), z["widths"].tolist(),
                       z["heights"].tolist(), z["reasons"].tolist(), strict=True)
            return {os.fsdecode(p): (s, m, w, h, r) for p, s, m, w, h, r in rows}
    except (OSError, KeyError, ValueError):
        return {}


def _write_cache(path: Path, split_dir: Path, entries: dict[str, tuple[int, int, int, int, str]]) -> None:
    rels = sorted(entries)
    cols = list(zip(*(entries[r] for r in rels), strict=True)) if rels else [[]] * 5
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npz")
    np.savez(tmp, version=CACHE_VERSION, split_dir=str(split_dir.resolve()),
             paths=np.array([os.fsencode(r) for r in rels], dtype=bytes),
             sizes=np.array(cols[0], dtype=np.int64), mtimes=np.array(cols[1], dtype=np.int64),
             widths=np.array(cols[2], dtype=np.int32), heights=np.array(cols[3], dtype=np.int32),
             reasons=np.array(cols[4], dtype=str))
    os.replace(tmp, path)


def _scan(split_dir: Path, rels: list[str]) -> list[tuple[int, int, str]]:
    """cheap_check over many files, in threads (the work is mostly waiting on the file system)."""
    chunks = [rels[i : i + 256] for i in range(0, len(rels), 256)]

    def run(chunk: list[str]) -> list[tuple[int, int, str]]:
        return [tuple(cheap_check(split_dir / r)) for r in chunk]

    with ThreadPoolExecutor(SCAN_THREADS) as pool:
        return [info for part in pool.map(run, chunks) for info in part]


def load_index(root: str | os.PathLike[str], split: str, cache_dir: str | os.PathLike[str] | None = None,
               log: Callable[[str], None] = print) -> SplitIndex:
    """Validate the layout, pre-scan new or changed files, cache the result and return the index."""
    split_dir, classes = check_layout(root, split)
    t0 = time.time()
    with ThreadPoolExecutor(SCAN_THREADS) as pool:
        listing = dict(zip(classes, pool.map(lambda c: _list_class(split_dir, c), classes), strict=True))
    for wnid in classes:
        if not listing[wnid]:
            raise DataError(f"{split_dir / wnid}: empty class folder")
    files = [f for wnid in classes for f in listing[wnid]]

    entries: dict[str, tuple[int, int, int, int, str]] = {}
    todo: list[tuple[str, int, int]] = []
    cache_file: Path | None = _cache_path(Path(cache_dir) if cache_dir else default_cache_dir(), split_dir)
    with contextlib.ExitStack() as stack:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(_locked(cache_file, log))
        except OSError as e:
            log(f"data: cannot use the index cache in {cache_file.parent} ({e}); scanning without it")
            cache_file = None
        cached = _read_cache(cache_file, split_dir) if cache_file else {}
        for rel, size, mtime in files:
            hit = cached.get(rel)
            if hit is not None and hit[0] == size and hit[1] == mtime:
                entries[rel] = hit
            elif size < 0:
                entries[rel] = (size, mtime, 0, 0, "cannot stat the file (dangling link?)")
            else:
                todo.append((rel, size, mtime))
        if todo:
            log(f"data: {split}: pre-scanning {len(todo)} of {len(files)} files (not in the index cache)")
            results = _scan(split_dir, [t[0] for t in todo])
            for (rel, size, mtime), (w, h, reason) in zip(todo, results, strict=True):
                entries[rel] = (size, mtime, w, h, reason)
        if cache_file is not None and entries != cached:
            try:
                _write_cache(cache_file, split_dir, entries)
            except OSError as e:
                log(f"data: could not write the index cache {cache_file} ({e})")

    label_of = {c: i for i, c in enumerate(classes)}
    good = sorted((label_of[rel.split("/", 1)[0]], rel, e[2], e[3]) for rel, e in entries.items() if not e[4])
    bad = sorted((str(split_dir / rel), e[4]) for rel, e in entries.items() if e[4])
    counts = np.bincount([g[0] for g in good], minlength=len(classes))
    for wnid in classes:
        if counts[label_of[wnid]] == 0:
            raise DataError(f"{split_dir / wnid}: no readable image left (every file in it is broken)")
    index = SplitIndex(
        split_dir=split_dir, classes=classes,
        paths=np.array([os.fsencode(g[1]) for g in good], dtype=bytes),
        labels=np.array([g[0] for g in good], dtype=np.int64),
        widths=np.array([g[2] for g in good], dtype=np.int32),
        heights=np.array([g[3] for g in good], dtype=np.int32),
        bad_files=bad, checked=len(todo))
    _log_summary(index, split, len(files), time.time() - t0, log)
    return index


def _log_summary(index: SplitIndex, split: str, num_files: int, seconds: float,
                 log: Callable[[str], None]) -> None:
    log(f"data: {split}: {len(index)} images in {len(index.classes)} classes from {index.split_dir} "
        f"({num_files - index.checked} of {num_files} files known from the index cache, {seconds:.1f}s)")
    for path, reason in index.bad_files[:MAX_LOGGED_BAD]:
        log(f"data: skipping broken file {path}: {reason}")
    if len(index.bad_files) > MAX_LOGGED_BAD:
        log(f"data: ... and {len(index.bad_files) - MAX_LOGGED_BAD} more broken files skipped "
            f"(scripts/verify_dataset.py lists them all)")
    if index.bad_files:
        log(f"data: {split}: {len(index.bad_files)} broken files excluded from training and evaluation")
