"""The file index of one split: layout checks, a parallel cheap pre-scan, and its on-disk cache.

`load_index` validates the ImageFolder layout (root/split/<wnid>/...), lists every file with its size
and mtime, and runs `checks.cheap_check` only on files the cache does not already know under the same
(path, size, mtime); so the first start over ImageNet reads ~1.3M headers once (in parallel processes)
and later starts only list and stat the tree, comparing with the cache as numpy arrays. The cache lives
under `cache_dir` (the trainer passes its output directory) or ~/.cache/lip, never inside the data root,
which may be read-only. Ranks that start together serialise on a lock file, so one of them scans and the
others read its result.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checks import cheap_check
from .cpus import available_cpus
from .errors import DataError

SPLITS = ("train", "val")
CACHE_VERSION = 2
THREADS_PER_WORKER = 8
MAX_PROCESSES = 32
CLASS_CHUNK = 25  # classes listed per task
SCAN_CHUNK = 2048  # files checked per task
PROCESS_MIN_CLASSES = 100  # smaller datasets are listed ...
PROCESS_MIN_FILES = 20_000  # ... and checked in this process
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


def _list_class(split_dir: bytes, wnid: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(relative paths, sizes, mtimes_ns) of every non-hidden file below one class folder, sorted.

    Bytes paths all the way: no decoding of 1.3M names, and numpy compares them in C.
    """
    rels, sizes, mtimes = [], [], []
    stack = [wnid]
    while stack:
        rel_dir = stack.pop()
        with os.scandir(split_dir + b"/" + rel_dir) as it:
            for e in it:
                if e.name.startswith(b"."):
                    continue
                rel = rel_dir + b"/" + e.name
                if e.is_dir():
                    stack.append(rel)
                    continue
                try:
                    st = e.stat()
                    size, mtime = st.st_size, st.st_mtime_ns
                except OSError:  # dangling symlink: reported as a bad file
                    size = mtime = -1
                rels.append(rel)
                sizes.append(size)
                mtimes.append(mtime)
    paths = np.array(rels, dtype=bytes)
    order = np.argsort(paths, kind="stable")
    return paths[order], np.array(sizes, dtype=np.int64)[order], np.array(mtimes, dtype=np.int64)[order]


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


CACHE_FIELDS = ("paths", "sizes", "mtimes", "widths", "heights", "bad_rows", "bad_reasons")


def _read_cache(path: Path, split_dir: Path) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when absent, stale or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["version"]) != CACHE_VERSION or str(z["split_dir"]) != str(split_dir.resolve()):
                return None
            return {k: z[k] for k in CACHE_FIELDS}
    except (OSError, KeyError, ValueError):
        return None


def _write_cache(path: Path, split_dir: Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npz")
    np.savez(tmp, version=CACHE_VERSION, split_dir=str(split_dir.resolve()), **arrays)
    os.replace(tmp, path)


def _reuse(cache: dict[str, np.ndarray] | None, paths: np.ndarray, sizes: np.ndarray, mtimes: np.ndarray,
           widths: np.ndarray, heights: np.ndarray, reasons: dict[int, str]) -> np.ndarray:
    """Fill in what the cache knows about files with unchanged (path, size, mtime); return that mask."""
    if cache is None or len(cache["paths"]) == 0:
        return np.zeros(len(paths), dtype=bool)
    cached = cache["paths"]
    if len(cached) == len(paths) and np.array_equal(cached, paths):  # the usual case: nothing added/removed
        rows, same = np.arange(len(paths)), np.ones(len(paths), dtype=bool)
    else:
        order = np.argsort(cached, kind="stable")
        pos = np.minimum(np.searchsorted(cached[order], paths), len(cached) - 1)
        rows = order[pos]
        same = cached[rows] == paths
    known = same & (cache["sizes"][rows] == sizes) & (cache["mtimes"][rows] == mtimes)
    widths[known] = cache["widths"][rows[known]]
    heights[known] = cache["heights"][rows[known]]
    bad_reason = dict(zip(cache["bad_rows"].tolist(), cache["bad_reasons"].tolist(), strict=True))
    if bad_reason:
        was_bad = np.zeros(len(cached), dtype=bool)
        was_bad[cache["bad_rows"]] = True
        for i in np.flatnonzero(known & was_bad[rows]).tolist():
            reasons[i] = bad_reason[int(rows[i])]
    return known


def _list_classes(split_dir: bytes, wnids: list[str]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    with ThreadPoolExecutor(THREADS_PER_WORKER) as pool:
        return list(pool.map(lambda c: _list_class(split_dir, os.fsencode(c)), wnids))


def _check_files(split_dir: bytes, rels: list[bytes]) -> list[tuple[int, int, str]]:
    with ThreadPoolExecutor(THREADS_PER_WORKER) as pool:
        return [tuple(info) for info in pool.map(lambda r: cheap_check(split_dir + b"/" + r), rels)]


def _run_chunks(fn, split_dir: bytes, chunks: list[list], in_processes: bool) -> list:
    """fn(split_dir, chunk) for every chunk, concatenated. Listing and header parsing hold the GIL, so
    big jobs (ImageNet: 1000 classes, 1.3M files) go to forked processes, one per CPU this job may use;
    each overlaps file-system latency (NFS, Lustre) with a few threads."""
    processes = min(available_cpus(), MAX_PROCESSES)
    if not in_processes or processes < 2 or len(chunks) < 2:
        return [x for chunk in chunks for x in fn(split_dir, chunk)]
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork")) as pool:
        return [x for part in pool.map(fn, [split_dir] * len(chunks), chunks) for x in part]


def load_index(root: str | os.PathLike[str], split: str, cache_dir: str | os.PathLike[str] | None = None,
               log: Callable[[str], None] = print) -> SplitIndex:
    """Validate the layout, pre-scan new or changed files, cache the result and return the index."""
    split_dir, classes = check_layout(root, split)
    t0 = time.time()
    root_b = os.fsencode(split_dir)
    groups = [classes[i : i + CLASS_CHUNK] for i in range(0, len(classes), CLASS_CHUNK)]
    listed = _run_chunks(_list_classes, root_b, groups, len(classes) >= PROCESS_MIN_CLASSES)
    for wnid, (rels, _, _) in zip(classes, listed, strict=True):
        if len(rels) == 0:
            raise DataError(f"{split_dir / wnid}: empty class folder")
    paths = np.concatenate([part[0] for part in listed])
    sizes = np.concatenate([part[1] for part in listed])
    mtimes = np.concatenate([part[2] for part in listed])
    labels = np.repeat(np.arange(len(classes), dtype=np.int64), [len(part[0]) for part in listed])
    widths = np.zeros(len(paths), dtype=np.int32)
    heights = np.zeros(len(paths), dtype=np.int32)
    reasons: dict[int, str] = {}  # position -> why the file is unusable

    cache_file: Path | None = _cache_path(Path(cache_dir) if cache_dir else default_cache_dir(), split_dir)
    with contextlib.ExitStack() as stack:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(_locked(cache_file, log))
        except OSError as e:
            log(f"data: cannot use the index cache in {cache_file.parent} ({e}); scanning without it")
            cache_file = None
        cache = _read_cache(cache_file, split_dir) if cache_file else None
        known = _reuse(cache, paths, sizes, mtimes, widths, heights, reasons)
        for i in np.flatnonzero(~known & (sizes < 0)).tolist():
            reasons[i] = "cannot stat the file (dangling link?)"
        todo = np.flatnonzero(~known & (sizes >= 0)).tolist()
        if todo:
            log(f"data: {split}: pre-scanning {len(todo)} of {len(paths)} files (not in the index cache)")
            rels = paths[todo].tolist()
            chunks = [rels[i : i + SCAN_CHUNK] for i in range(0, len(rels), SCAN_CHUNK)]
            results = _run_chunks(_check_files, root_b, chunks, len(rels) >= PROCESS_MIN_FILES)
            for i, (w, h, reason) in zip(todo, results, strict=True):
                widths[i], heights[i] = w, h
                if reason:
                    reasons[i] = reason
        if cache_file is not None and not (known.all() and len(cache["paths"]) == len(paths)):
            bad_rows = np.array(sorted(reasons), dtype=np.int64)
            arrays = dict(paths=paths, sizes=sizes, mtimes=mtimes, widths=widths, heights=heights,
                          bad_rows=bad_rows, bad_reasons=np.array([reasons[i] for i in bad_rows.tolist()], dtype=str))
            try:
                _write_cache(cache_file, split_dir, arrays)
            except OSError as e:
                log(f"data: could not write the index cache {cache_file} ({e})")

    good = np.ones(len(paths), dtype=bool)
    good[list(reasons)] = False
    counts = np.bincount(labels[good], minlength=len(classes))
    for wnid, count in zip(classes, counts.tolist(), strict=True):
        if count == 0:
            raise DataError(f"{split_dir / wnid}: no readable image left (every file in it is broken)")
    bad_files = [(os.path.join(split_dir, os.fsdecode(paths[i])), reasons[i]) for i in sorted(reasons)]
    index = SplitIndex(split_dir=split_dir, classes=classes, paths=paths[good], labels=labels[good],
                       widths=widths[good], heights=heights[good], bad_files=bad_files, checked=len(todo))
    _log_summary(index, split, len(paths), time.time() - t0, log)
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
