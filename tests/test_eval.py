"""eval.py with real processes: each image counted once on 2 torchrun ranks, the authors' checkpoint layout,
and bad checkpoints (missing, malicious pickle, wrong model, no EMA weights) refused in one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from train_utils import command, make_dataset, metrics_rows, run, tiny_run, train_cmd

VAL_IMAGES = 3 * 7  # odd: the two ranks get 11 and 10 images


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("eval")
    data = make_dataset(base / "data", train=8, val=7)
    out = base / "run"
    proc = run(train_cmd(1, tiny_run(data, out, "train.epochs=1")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return data, out


def evaluate(data: Path, checkpoint: Path, nproc: int = 1, *extra: str):
    args = ["--config", "configs/demo.yaml", "--checkpoint", str(checkpoint), f"data.root={data}",
            f"data.cache_dir={data.parent / 'cache'}", "data.image_size=32", "data.val_resize=36", "data.workers=0",
            "train.batch_size=4", *extra]
    return run(command("eval.py", nproc, args), timeout=180)


def result(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_each_image_once_on_two_ranks_same_as_one(trained: tuple[Path, Path]) -> None:
    data, out = trained
    one = result(evaluate(data, out / "checkpoints" / "last.pth"))
    two = result(evaluate(data, out / "checkpoints" / "last.pth", 2))
    assert set(one) == {"images", "top1", "top5", "loss"}
    assert one["images"] == two["images"] == VAL_IMAGES
    assert (one["top1"], one["top5"]) == (two["top1"], two["top5"])
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-4)
    row = metrics_rows(out)[-1]  # the trainer's own evaluation of the same weights
    assert one["top1"] == pytest.approx(row["val_top1"], abs=1e-3)
    assert one["loss"] == pytest.approx(row["val_loss"], rel=1e-4)


def test_authors_checkpoint_layout(trained: tuple[Path, Path], tmp_path: Path) -> None:
    """The authors release {'state_dict': {'module.' + key: tensor}}; it scores the same as our file."""
    data, out = trained
    ours = torch.load(out / "checkpoints" / "last.pth", map_location="cpu", weights_only=True)["model"]
    theirs = tmp_path / "lip_resnet_tiny.pth.tar"
    torch.save({"state_dict": {"module." + k: v for k, v in ours.items()}}, theirs)
    got = result(evaluate(data, theirs))
    row = metrics_rows(out)[-1]
    assert got["images"] == VAL_IMAGES and got["top1"] == pytest.approx(row["val_top1"], abs=1e-3)


class Payload:
    """Unpickling this would run a shell command (creating the marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("case", ["missing", "malicious", "wrong_model", "no_ema"])
def test_bad_checkpoint_is_one_line(trained: tuple[Path, Path], tmp_path: Path, case: str) -> None:
    data, out = trained
    checkpoint, extra, expected = out / "checkpoints" / "last.pth", [], ""
    marker = tmp_path / "pwned"
    if case == "missing":
        checkpoint, expected = tmp_path / "nope.pth", "checkpoint file not found"
    elif case == "malicious":
        checkpoint, expected = tmp_path / "evil.pth", "refused"
        torch.save({"model": Payload(marker)}, checkpoint)
    elif case == "no_ema":  # trained without train.ema_decay: there are no EMA weights to score
        extra, expected = ["--ema"], "has no 'model_ema' weights"
    else:
        extra, expected = ["model=resnet50"], "does not match"
    proc = evaluate(data, checkpoint, 1, *extra)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(checkpoint) in lines[0] and expected in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not marker.exists()
