"""scripts/prepare_imagenet.py on a small synthetic flat val folder, with both ground-truth formats."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "prepare_imagenet.py"
# ILSVRC2012_ID -> wnid (the devkit numbers classes 1..1000; its meta.mat also lists non-leaf synsets)
SYNSETS = {1: "n02119789", 2: "n02100735", 3: "n02110185", 1001: "n00001740"}
GROUND_TRUTH = [2, 1, 3, 3, 1, 2, 2]  # images 1..7


def prepare(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=60)


@pytest.fixture
def flat(tmp_path) -> Path:
    val = tmp_path / "val"
    val.mkdir()
    for k in range(1, len(GROUND_TRUTH) + 1):
        Image.new("RGB", (50, 40), (k * 30, 0, 0)).save(val / f"ILSVRC2012_val_{k:08d}.JPEG", quality=90)
    return val


def write_devkit(root: Path) -> Path:
    from scipy.io import savemat

    data = root / "devkit" / "data"
    data.mkdir(parents=True)
    rows = np.zeros(len(SYNSETS), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")])
    for k, (sid, wnid) in enumerate(SYNSETS.items()):
        rows[k] = (sid, wnid, f"class {sid}", 0 if sid <= 1000 else 3)
    savemat(data / "meta.mat", {"synsets": rows})
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{g}\n" for g in GROUND_TRUTH))
    return root / "devkit"


def write_loc_csv(root: Path) -> Path:
    path = root / "LOC_val_solution.csv"
    lines = ["ImageId,PredictionString"] + [
        f"ILSVRC2012_val_{k:08d},{SYNSETS[g]} 10 20 30 40 {SYNSETS[g]} 1 2 3 4" for k, g in enumerate(GROUND_TRUTH, 1)]
    path.write_text("\n".join(lines[:1] + lines[:0:-1]) + "\n")  # shuffled row order, as in the real file
    return path


def expected(root: Path) -> dict[str, str]:
    return {f"{SYNSETS[g]}/ILSVRC2012_val_{k:08d}.JPEG": "" for k, g in enumerate(GROUND_TRUTH, 1)}


def layout(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): "" for p in root.glob("*/*.JPEG")}


@pytest.mark.parametrize("source", ["devkit", "ground-truth", "loc-csv"])
def test_moves_into_wnid_folders_and_is_idempotent(tmp_path, flat, source):
    if source == "loc-csv":
        args = ["--loc-csv", write_loc_csv(tmp_path)]
    else:
        devkit = write_devkit(tmp_path)
        args = ["--devkit", devkit] if source == "devkit" else [
            "--ground-truth", devkit / "data" / "ILSVRC2012_validation_ground_truth.txt",
            "--meta", devkit / "data" / "meta.mat"]
    inodes = {p.name: p.stat().st_ino for p in flat.iterdir()}
    first = prepare(flat, *args)
    assert first.returncode == 0, first.stderr
    assert "moved 7 files" in first.stdout and "3 class folders" in first.stdout
    assert layout(flat) == expected(flat)
    assert not list(flat.glob("*.JPEG"))  # moved, not copied: same inodes
    assert all(p.stat().st_ino == inodes[p.name] for p in flat.glob("*/*.JPEG"))
    second = prepare(flat, *args)
    assert second.returncode == 0, second.stderr
    assert "moved 0 files" in second.stdout and "7 were already in place" in second.stdout
    assert layout(flat) == expected(flat)


def test_symlink_mode_leaves_the_flat_folder_alone(tmp_path, flat):
    csv = write_loc_csv(tmp_path)
    out = tmp_path / "imagenet" / "val"
    for _ in range(2):
        result = prepare(flat, "--loc-csv", csv, "--out", out, "--symlink")
        assert result.returncode == 0, result.stderr
    assert "linked 0 files" in result.stdout
    assert len(list(flat.glob("*.JPEG"))) == 7
    assert layout(out) == expected(out)
    for link in out.glob("*/*.JPEG"):
        assert link.is_symlink() and link.resolve() == (flat / link.name).resolve()

    from data.index import load_index

    index = load_index(out.parent, "val", tmp_path / "cache", lambda _: None)
    assert len(index) == 7 and index.classes == sorted(set(SYNSETS[g] for g in GROUND_TRUTH))


def test_bad_inputs_change_nothing(tmp_path, flat):
    csv = write_loc_csv(tmp_path)
    Image.new("RGB", (8, 8)).save(flat / "ILSVRC2012_val_00000099.JPEG")  # not in the ground truth
    before = sorted(p.name for p in flat.iterdir())
    result = prepare(flat, "--loc-csv", csv)
    assert result.returncode == 2 and "ILSVRC2012_val_00000099.JPEG: no label" in result.stderr
    assert sorted(p.name for p in flat.iterdir()) == before
    (flat / "ILSVRC2012_val_00000099.JPEG").unlink()
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("id,label\nx,y\n")
    result = prepare(flat, "--loc-csv", bad_csv)
    assert result.returncode == 2 and "ImageId,PredictionString" in result.stderr
    assert prepare(flat, "--ground-truth", csv).returncode == 2
    result = prepare(tmp_path / "missing", "--loc-csv", csv)
    assert result.returncode == 2 and "is not a folder" in result.stderr and "Traceback" not in result.stderr
    assert len(list(flat.glob("*.JPEG"))) == 7 and not any(p.is_dir() for p in flat.iterdir())
