"""Fully decode every image of a dataset and report (and optionally quarantine) the broken ones.

    python scripts/verify_dataset.py ROOT [--quarantine DIR] [--workers N]

Checks the files below ROOT/train and ROOT/val (or below ROOT itself when it has neither, e.g. a single
split folder); hidden files are skipped. A file is broken when it is empty, is not a JPEG or PNG, is
truncated, or PIL cannot decode it to RGB -- the loaders' pre-scan only does the cheap part of this.
Each broken file is printed with the reason, then a summary.

--quarantine DIR moves exactly the broken files to DIR, keeping their paths relative to ROOT
(DIR/train/<wnid>/x.JPEG); nothing is ever deleted, and a file already present in DIR is not
overwritten. Exit status: 0 when no broken file is left in ROOT, 1 while any is, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.checks import decode_check  # noqa: E402


def checked_folders(root: Path) -> list[Path]:
    return [root / s for s in ("train", "val") if (root / s).is_dir()] or [root]


def files_to_check(root: Path) -> list[Path]:
    """Non-hidden files below ROOT/train and ROOT/val, or below ROOT when it has neither; sorted."""
    tops = checked_folders(root)
    found = []
    for top in tops:
        for folder, dirs, names in os.walk(top, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found += [Path(folder) / n for n in names if not n.startswith(".")]
    return sorted(found)


def quarantine(root: Path, broken: list[Path], dest: Path) -> list[Path]:
    """Move broken files under dest keeping their relative paths; return those still in root."""
    left = []
    for path in broken:
        target = dest / path.relative_to(root)
        if target.exists() or target.is_symlink():
            print(f"not moved (already in quarantine): {path} -> {target}")
            left.append(path)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(path), str(target))
    return left


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path, help="dataset root holding train/<wnid>/ and/or val/<wnid>/")
    p.add_argument("--quarantine", type=Path, metavar="DIR", help="move the broken files here")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decoding processes (default: all CPUs)")
    args = p.parse_args()
    root = args.root.resolve()
    if not root.is_dir():
        print(f"error: {args.root} is not a folder", file=sys.stderr)
        return 2
    if args.workers < 1:
        print(f"error: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return 2
    if args.quarantine is not None:
        dest = args.quarantine.resolve()
        if any(dest == top or top in dest.parents for top in checked_folders(root)):
            print(f"error: --quarantine {args.quarantine} is inside the checked folders of {root}; "
                  f"choose a folder outside them", file=sys.stderr)
            return 2
    files = files_to_check(root)

    broken: list[tuple[Path, str]] = []
    with ProcessPoolExecutor(args.workers) as pool:
        results = pool.map(decode_check, files, chunksize=32)
        for path, reason in tqdm(zip(files, results, strict=True), total=len(files), unit="img", desc="verifying"):
            if reason:
                broken.append((path, reason))
                tqdm.write(f"BROKEN {path}: {reason}")

    kinds = collections.Counter(reason.split(":")[0].split(" (")[0] for _, reason in broken)
    detail = "; ".join(f"{k}: {n}" for k, n in sorted(kinds.items()))
    print(f"checked {len(files)} files under {root}: {len(broken)} broken" + (f" ({detail})" if broken else ""))
    left = [path for path, _ in broken]
    if broken and args.quarantine is not None:
        left = quarantine(root, left, args.quarantine.resolve())
        print(f"moved {len(broken) - len(left)} broken files to {args.quarantine.resolve()}")
    if left:
        print(f"{len(left)} broken files remain in {root}; rerun with --quarantine DIR to move them out")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
