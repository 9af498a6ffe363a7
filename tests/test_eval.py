"""eval.py with real processes: each image counted once on 2 torchrun ranks, the authors' and timm train.py's
checkpoint layouts, and bad checkpoints (missing, not a checkpoint, malicious pickle, wrong model,
no EMA weights) refused in one line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from timm.utils import CheckpointSaver, ModelEmaV3
from train_utils import command, metrics_rows, run, tiny_run, train_cmd

from models import create_model

pytestmark = pytest.mark.slow

VAL_IMAGES = 3 * 7  # odd: the two ranks get 11 and 10 images


@pytest.fixture(scope="module")
def trained(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    data, out = demo_data, tmp_path_factory.mktemp("eval") / "run"
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


def test_timm_train_checkpoint_with_its_ema_weights(trained: tuple[Path, Path], tmp_path: Path, randomise) -> None:
    """timm train.py's last.pth.tar (argparse.Namespace args, state_dict and state_dict_ema): --ema scores
    the EMA copy, which here holds our trained weights while the model's own are random."""
    data, out = trained
    ours = torch.load(out / "checkpoints" / "last.pth", map_location="cpu", weights_only=True)["model"]
    model = randomise(create_model("lip_resnet_tiny", num_classes=3), seed=4)
    ema = ModelEmaV3(create_model("lip_resnet_tiny", num_classes=3))
    ema.module.load_state_dict(ours)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    CheckpointSaver(model, optimizer, args=argparse.Namespace(model="lip_resnet_tiny", lr=0.1), model_ema=ema,
                    checkpoint_dir=str(tmp_path)).save_checkpoint(0, metric=1.0)
    got = result(evaluate(data, tmp_path / "last.pth.tar", 1, "--ema"))
    assert got["images"] == VAL_IMAGES and got["top1"] == pytest.approx(metrics_rows(out)[-1]["val_top1"], abs=1e-3)


@pytest.mark.parametrize("case", ["missing", "not_a_checkpoint", "malicious", "wrong_model", "no_ema"])
def test_bad_checkpoint_is_one_line(trained: tuple[Path, Path], tmp_path: Path, payload, case: str) -> None:
    data, out = trained
    checkpoint, extra, expected = out / "checkpoints" / "last.pth", [], ""
    if case == "missing":
        checkpoint, expected = tmp_path / "nope.pth", "checkpoint file not found"
    elif case == "not_a_checkpoint":
        checkpoint, expected = tmp_path / "notes.pth", "not a PyTorch checkpoint"
        checkpoint.write_text("this is not a checkpoint")
    elif case == "malicious":
        checkpoint, expected = tmp_path / "evil.pth", "refused"
        torch.save({"model": payload}, checkpoint)
    elif case == "no_ema":  # trained without train.ema_decay: there are no EMA weights to score
        extra, expected = ["--ema"], "has no 'model_ema' weights"
    else:
        extra, expected = ["model=resnet50"], "does not match ResNet"
    proc = evaluate(data, checkpoint, 1, *extra)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(checkpoint) in lines[0] and expected in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not payload.marker.exists()
