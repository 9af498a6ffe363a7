"""train.compile=true on the CPU (Inductor), end to end: it trains and evaluates the compiled model, resumes,
keeps the EMA copy, saves plain keys and still draws the importance maps, and learns as well as eager mode."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from train_utils import make_dataset, metrics_rows, run, tiny_run, train_cmd

pytestmark = pytest.mark.slow

STEPS = 12  # 48 train images / batch 4
VAL = 3 * 8  # a multiple of the batch: one validation shape to compile


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "shapes", train=16, val=8)


def train(data: Path, out: Path, *extra: str) -> str:
    proc = run(train_cmd(1, tiny_run(data, out, "train.ema_decay=0.9", *extra)), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_compiled_training_resumes_saves_plain_keys_and_matches_eager(data: Path, tmp_path: Path) -> None:
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    train(data, eager)
    assert "compile on" in train(data, compiled, "train.compile=true", "train.epochs=2")
    said = train(data, compiled, "train.compile=true")  # the third epoch, resumed from last.pth
    assert "resuming from" in said and "compile on" in said

    rows = metrics_rows(compiled)
    assert [r["epoch"] for r in rows] == [0, 1, 2] and [r["step"] for r in rows] == [STEPS, 2 * STEPS, 3 * STEPS]
    # Inductor's rounding differs from eager's, and on 48 images three epochs amplify it into a different
    # trajectory: both must learn (above chance on 3 classes), not reach the same accuracy.
    assert min(rows[-1]["val_top1"], metrics_rows(eager)[-1]["val_top1"]) > 100 / 3
    assert "val_top1_ema" in rows[-1]

    ckpt = torch.load(compiled / "checkpoints" / "last.pth", map_location="cpu", weights_only=True)
    reference = torch.load(eager / "checkpoints" / "last.pth", map_location="cpu", weights_only=True)
    assert ckpt["model"].keys() == ckpt["model_ema"].keys() == reference["model"].keys()
    assert not any("_orig_mod" in k for k in ckpt["model"])

    events = EventAccumulator(str(compiled / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("lip/importance_maps")] == [STEPS, 2 * STEPS, 3 * STEPS]
