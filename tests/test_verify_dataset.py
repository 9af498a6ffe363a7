"""scripts/verify_dataset.py: full-decode detection, exit codes and quarantine."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "verify_dataset.py"


def verify(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=120)


def jpeg_bytes(seed: int, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(out, fmt, quality=90)
    return out.getvalue()


def bad_huffman(data: bytes) -> bytes:
    """A JPEG of full length with good header and end marker whose scan uses undefined Huffman tables:
    only a full decode finds it."""
    raw = bytearray(data)
    sos = raw.index(b"\xff\xda")
    for k in range(raw[sos + 4]):
        raw[sos + 6 + 2 * k] = 0x33
    return bytes(raw)


def make(root: Path) -> dict[str, str]:
    """A dataset with good, odd-but-valid and broken files; returns broken rel path -> expected reason."""
    good = {"train/n1/a.JPEG": jpeg_bytes(0), "train/n1/cmyk.JPEG": jpeg_bytes(1, "CMYK"),
            "train/n2/gray.JPEG": jpeg_bytes(2, "L"), "train/n2/png.JPEG": jpeg_bytes(3, fmt="PNG"),
            "val/n1/v.JPEG": jpeg_bytes(4), "val/n2/w.JPEG": jpeg_bytes(5)}
    broken = {"train/n1/zero.JPEG": (b"", "empty file"),
              "train/n2/trunc.JPEG": (jpeg_bytes(6)[:3000], "truncated JPEG"),
              "val/n1/notes.txt": (b"hello\n", "not a JPEG or PNG"),
              "val/n2/huff.JPEG": (bad_huffman(jpeg_bytes(7)), "decode failed")}
    for rel, data in list(good.items()) + [(r, d) for r, (d, _) in broken.items()]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "LOC_val_solution.csv").write_text("not checked: outside train/ and val/\n")
    return {rel: reason for rel, (_, reason) in broken.items()}


def test_reports_every_broken_file_and_exits_1(tmp_path):
    broken = make(tmp_path / "d")
    result = verify(tmp_path / "d", "--workers", "2")
    assert result.returncode == 1, result.stdout + result.stderr
    reported = [line for line in result.stdout.splitlines() if line.startswith("BROKEN ")]
    assert len(reported) == len(broken)
    for rel, reason in broken.items():
        assert any(str(tmp_path / "d" / rel) in line and reason in line for line in reported), (rel, reported)
    assert "checked 10 files" in result.stdout and "4 broken" in result.stdout
    assert "verifying" in result.stderr  # the tqdm progress bar


def test_quarantine_moves_exactly_the_broken_files(tmp_path):
    broken = make(tmp_path / "d")
    before = {p.relative_to(tmp_path / "d"): p.read_bytes() for p in (tmp_path / "d").rglob("*") if p.is_file()}
    result = verify(tmp_path / "d", "--quarantine", tmp_path / "q", "--workers", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    moved = {p.relative_to(tmp_path / "q"): p.read_bytes() for p in (tmp_path / "q").rglob("*") if p.is_file()}
    assert {str(p) for p in moved} == set(broken)
    assert all(before[p] == data for p, data in moved.items())  # moved intact, nothing deleted
    kept = {p.relative_to(tmp_path / "d") for p in (tmp_path / "d").rglob("*") if p.is_file()}
    assert kept | set(moved) == set(before) and not kept & set(moved)
    again = verify(tmp_path / "d")
    assert again.returncode == 0 and "0 broken" in again.stdout


def test_bad_arguments_are_one_line(tmp_path):
    result = verify(tmp_path / "missing")
    assert result.returncode == 2 and "is not a folder" in result.stderr and "Traceback" not in result.stderr
    make(tmp_path / "d")
    result = verify(tmp_path / "d", "--quarantine", tmp_path / "d" / "train" / "q")
    assert result.returncode == 2 and "inside" in result.stderr
