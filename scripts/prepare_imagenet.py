"""Sort the official flat ImageNet validation folder into val/<wnid>/ class folders.

    python scripts/prepare_imagenet.py VAL_DIR --devkit ILSVRC2012_devkit_t12 [--out DIR] [--symlink]
    python scripts/prepare_imagenet.py VAL_DIR --ground-truth GT.txt --meta meta.mat [--out DIR] [--symlink]
    python scripts/prepare_imagenet.py VAL_DIR --loc-csv LOC_val_solution.csv [--out DIR] [--symlink]

VAL_DIR holds the 50,000 ILSVRC2012_val_########.JPEG files. The labels come either from the devkit
(data/ILSVRC2012_validation_ground_truth.txt: one ILSVRC2012_ID per image, in file-number order, mapped
to wnids by data/meta.mat) or from Kaggle's LOC_val_solution.csv (ImageId,PredictionString whose first
token is the wnid). Each image goes to OUT/<wnid>/ (OUT defaults to VAL_DIR itself), by a rename
(default; OUT must be on the same file system) or, with --symlink, by a relative symbolic link that
leaves VAL_DIR untouched. Nothing is ever copied or deleted. Running it again is safe: files already
in place are left alone. Every label is checked before the first file is touched.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys
from pathlib import Path

NAME = re.compile(r"^ILSVRC2012_val_(\d{8})\.JPEG$")
WNID = re.compile(r"^n\d{8}$")


class PrepareError(Exception):
    """A one-line problem with the inputs; nothing has been moved when it is raised."""


def labels_from_devkit(ground_truth: Path, meta: Path) -> dict[str, str]:
    """file name -> wnid from the devkit's ground-truth list and meta.mat."""
    try:
        from scipy.io import loadmat
    except ImportError as e:
        raise PrepareError(f"reading {meta} needs scipy ({e}); pip install scipy, or use --loc-csv") from None
    try:
        synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
        id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PrepareError(f"{meta}: not a devkit meta.mat with a 'synsets' table ({e})") from None
    labels = {}
    for k, line in enumerate(_read_lines(ground_truth), start=1):
        try:
            labels[f"ILSVRC2012_val_{k:08d}.JPEG"] = id_to_wnid[int(line)]
        except (ValueError, KeyError):
            raise PrepareError(f"{ground_truth}:{k}: {line!r} is not an ILSVRC2012_ID listed in {meta}") from None
    return labels


def labels_from_loc_csv(path: Path) -> dict[str, str]:
    """file name -> wnid from LOC_val_solution.csv (first token of PredictionString)."""
    labels = {}
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise PrepareError(f"cannot read {path}: {e}") from None
    if not rows or [c.strip() for c in rows[0][:2]] != ["ImageId", "PredictionString"]:
        raise PrepareError(f"{path}: expected the header 'ImageId,PredictionString'")
    for k, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        tokens = row[1].split() if len(row) > 1 else []
        if not tokens:
            raise PrepareError(f"{path}:{k}: no label in {row!r}")
        labels[f"{row[0].strip()}.JPEG"] = tokens[0]
    return labels


def _read_lines(path: Path) -> list[str]:
    try:
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise PrepareError(f"cannot read {path}: {e}") from None


def plan(val_dir: Path, out: Path, labels: dict[str, str], symlink: bool) -> tuple[list[tuple[Path, Path]], int]:
    """(source, destination) pairs still to do, and how many files are already in place."""
    for name, wnid in labels.items():
        if not WNID.match(wnid) or not NAME.match(name):
            raise PrepareError(f"bad ground-truth entry {name} -> {wnid!r} (expected ILSVRC2012_val_########.JPEG "
                               f"-> n########)")
    flat = sorted(e.name for e in os.scandir(val_dir) if e.is_file(follow_symlinks=False) and NAME.match(e.name))
    unlabelled = [n for n in flat if n not in labels]
    if unlabelled:
        raise PrepareError(f"{val_dir / unlabelled[0]}: no label in the ground truth "
                           f"({len(unlabelled)} such files); is it the right ground-truth file?")
    todo, done = [], 0
    for name in sorted(labels):
        src, dst = val_dir / name, out / labels[name] / name
        if dst.is_symlink() or dst.exists():
            if symlink and not (dst.is_symlink() and dst.resolve() == src.resolve()):
                raise PrepareError(f"{dst} exists and is not a link to {src}")
            done += 1
        elif src.is_file():
            todo.append((src, dst))
    return todo, done


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("val_dir", type=Path, help="folder holding the flat ILSVRC2012_val_########.JPEG files")
    gt = p.add_mutually_exclusive_group(required=True)
    gt.add_argument("--devkit", type=Path, help="ILSVRC2012_devkit_t12 folder (uses data/ILSVRC2012_validation_"
                                                "ground_truth.txt and data/meta.mat)")
    gt.add_argument("--ground-truth", type=Path, help="ILSVRC2012_validation_ground_truth.txt (needs --meta)")
    gt.add_argument("--loc-csv", type=Path, help="LOC_val_solution.csv")
    p.add_argument("--meta", type=Path, help="the devkit's meta.mat, with --ground-truth")
    p.add_argument("--out", type=Path, help="folder that receives the <wnid>/ folders (default: VAL_DIR)")
    p.add_argument("--symlink", action="store_true", help="link instead of moving; VAL_DIR stays as it is")
    p.add_argument("--dry-run", action="store_true", help="check everything and report, change nothing")
    args = p.parse_args()
    try:
        return run(args)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    val_dir = args.val_dir.resolve()
    out = (args.out or args.val_dir).resolve()
    if not val_dir.is_dir():
        raise PrepareError(f"{args.val_dir} is not a folder")
    if args.devkit:
        gt, meta = args.devkit / "data" / "ILSVRC2012_validation_ground_truth.txt", args.devkit / "data" / "meta.mat"
    else:
        gt, meta = args.ground_truth, args.meta
    if gt is not None and meta is None:
        raise PrepareError("--ground-truth needs --meta (the devkit's meta.mat)")
    for path in (gt, meta, args.loc_csv):
        if path is not None and not path.is_file():
            raise PrepareError(f"{path} does not exist")
    labels = labels_from_loc_csv(args.loc_csv) if args.loc_csv else labels_from_devkit(gt, meta)
    todo, done = plan(val_dir, out, labels, args.symlink)
    out.mkdir(parents=True, exist_ok=True)
    if todo and not args.symlink and out.stat().st_dev != val_dir.stat().st_dev:
        raise PrepareError(f"{out} is on another file system than {val_dir}: moving would copy; use --symlink")
    missing = len(labels) - len(todo) - done
    verb, past = ("link", "linked") if args.symlink else ("move", "moved")
    if args.dry_run:
        print(f"would {verb} {len(todo)} files into {out}/<wnid>/ ({done} already in place, {missing} missing)")
        return 0
    for src, dst in todo:
        dst.parent.mkdir(exist_ok=True)
        if args.symlink:
            dst.symlink_to(os.path.relpath(src, dst.parent))
        else:
            os.rename(src, dst)
    classes = sorted({w for n, w in labels.items() if (out / w / n).is_symlink() or (out / w / n).exists()})
    print(f"{past} {len(todo)} files into {out}/<wnid>/ ({done} were already in place); "
          f"{len(todo) + done} images in {len(classes)} class folders")
    if missing:
        print(f"warning: {missing} images of the ground truth are in neither {val_dir} nor {out}/<wnid>/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
