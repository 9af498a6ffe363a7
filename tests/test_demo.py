"""The `make demo` sequence, in a temp folder: write the JPEG dataset, train the tiny LIP-ResNet on the CPU,
evaluate it; the eval JSON line comes last and reaches at least 80% top-1. The one slow test (~1-2 min)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from train_utils import run

pytestmark = pytest.mark.slow


def test_demo_trains_a_lip_network_to_80_percent(tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "run"
    paths = [f"data.root={data}", f"output_dir={out}", f"data.cache_dir={tmp_path / 'cache'}"]

    made = run([sys.executable, "scripts/make_demo_data.py", "--out", str(data), "--classes", "6",
                "--train-per-class", "100", "--val-per-class", "40", "--seed", "0"])
    assert made.returncode == 0, made.stderr
    assert len(list(data.glob("train/*/*.JPEG"))) == 600 and len(list(data.glob("val/*/*.JPEG"))) == 240

    trained = run([sys.executable, "train.py", "--config", "configs/demo.yaml", *paths], timeout=420)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    assert "lip_resnet_tiny" in trained.stdout and "finished 6 epochs" in trained.stdout

    evaluated = run([sys.executable, "eval.py", "--config", "configs/demo.yaml", "--checkpoint",
                     str(out / "checkpoints" / "last.pth"), *paths], timeout=180)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    result = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert result["images"] == 240
    assert result["top1"] >= 80.0, result

    events = EventAccumulator(str(out / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert len(events.Images("lip/importance_maps")) == 6  # the LIP maps, one picture per epoch
