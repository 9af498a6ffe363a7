"""The fast recipe: cosine schedule, progressive resizing, a separate val size, and configs/fast/.

Unit checks of the size rule and the schedule, the fast configs against the table in docs/reproduce.md,
and train.py end to end on a tiny dataset: sizes and lr in metrics.jsonl and TensorBoard, val at
data.val_image_size, and an exact resume after kill -9 in the middle of a resized epoch.
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from train_utils import (
    ROOT,
    kill9_tree,
    load_weights,
    max_weight_diff,
    metrics_rows,
    run,
    start,
    tiny_run,
    train_cmd,
    wait_for,
)

from data.build import train_sizes
from data.sizes import TrainSizes
from training.config import load_config
from training.recipe import build_scheduler, scaled_lr

FAST = sorted((ROOT / "configs" / "fast").glob("*.yaml"))
STEPS = 12  # 48 train images / batch 4
# Tiny run: sizes 32, 36, 40 over epochs 0..2 (linear, multiples of 4); val crop 48 of a 52 px resize.
FAST_RUN = ("sched.name=cosine", "sched.min_lr=0.001", "data.image_size=40", "data.progressive.start_size=32",
            "data.progressive.start_epoch=0", "data.progressive.end_epoch=2", "data.progressive.multiple=4",
            "data.val_image_size=48", "data.val_resize=52")
SIZES = [32, 36, 40]
GRID = (8 * 50 + 2, 4 * 50 + 2)  # 4 val images in rows, 8 columns (image + 7 LIP maps), 48 px + 2 px pads,
# under a header naming the columns


def test_size_rule_is_linear_rounded_half_up_and_constant_outside() -> None:
    sizes = TrainSizes(final_size=192, start_size=160, start_epoch=2, end_epoch=6, multiple=16)
    # epoch 3: 168 = 10.5 x 16 rounds up to 176; epoch 5: 184 = 11.5 x 16 rounds up to 192
    assert [sizes(e) for e in range(9)] == [160, 160, 160, 176, 176, 192, 192, 192, 192]
    assert [TrainSizes(224)(e) for e in (0, 50)] == [224, 224]
    shrink = TrainSizes(final_size=128, start_size=224, start_epoch=0, end_epoch=3, multiple=32)
    assert [shrink(e) for e in range(4)] == [224, 192, 160, 128]
    # endpoints that are not multiples are rounded too, never below one multiple
    odd = TrainSizes(final_size=100, start_size=8, start_epoch=1, end_epoch=3, multiple=32)
    assert [odd(e) for e in range(5)] == [32, 32, 64, 96, 96]


def cosine_lr(peak: float, floor: float, t: int, warmup: int, total: int) -> float:
    """The schedule written out: linear warmup from 0, then half a cosine from peak to floor."""
    if t < warmup:
        return peak * t / warmup
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))


def lrs(cfg: dict, steps_per_epoch: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=scaled_lr(cfg))
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    out = []
    for t in range(cfg["train"]["epochs"] * steps_per_epoch + 1):
        scheduler.step_update(t)
        out.append(optimizer.param_groups[0]["lr"])
    return out


@pytest.mark.parametrize("path", FAST, ids=lambda p: p.stem)
def test_fast_configs_produce_the_documented_schedule_and_sizes(path: Path) -> None:
    cfg = load_config(path, ["data.root=/data/imagenet"])
    epochs, warmup = cfg["train"]["epochs"], cfg["sched"]["warmup_epochs"]
    sizes = train_sizes(cfg["data"])
    phases: list[list[int]] = []
    for e in range(epochs):
        if phases and sizes(e) == phases[-1][0]:
            phases[-1][2] = e
        else:
            phases.append([sizes(e), e, e])
    described = ", ".join(f"{s} ({a}–{b})" if a != b else f"{s} ({a})" for s, a, b in phases)
    ema = cfg["train"]["ema_decay"]
    val = f"{cfg['data']['val_image_size']} (resize {cfg['data']['val_resize']})"
    expected = [f"`configs/fast/{path.name}`", cfg["model"], str(epochs), str(cfg["train"]["batch_size"]),
                f"{scaled_lr(cfg):g}", str(warmup), cfg["sched"]["name"], described, val, f"{ema:g}" if ema else "off"]
    doc = (ROOT / "docs" / "reproduce.md").read_text()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in doc.splitlines()
            if line.startswith(f"| `configs/fast/{path.name}`")]
    assert rows and rows[0][: len(expected)] == expected

    steps = 10
    got = lrs(cfg, steps)
    peak, floor = scaled_lr(cfg), cfg["sched"]["min_lr"]
    for t in range(0, len(got), 7):
        assert got[t] == pytest.approx(cosine_lr(peak, floor, t, warmup * steps, epochs * steps), abs=1e-9)
    after = got[warmup * steps :]
    assert all(a >= b for a, b in zip(after, after[1:], strict=False)) and got[-1] == pytest.approx(floor)


@pytest.fixture(scope="module")
def reference(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = run(train_cmd(1, tiny_run(demo_data, out, *FAST_RUN)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_cosine_and_progressive_run_logs_sizes_a_falling_lr_and_evaluates_at_val_size(reference: Path) -> None:
    rows = metrics_rows(reference)
    assert [r["image_size"] for r in rows] == SIZES
    peak = 0.8 * 4 / 256
    for row in rows:  # the lr of each epoch's last step
        assert row["lr"] == pytest.approx(cosine_lr(peak, 0.001, row["step"] - 1, STEPS, 3 * STEPS))
    assert rows[1]["lr"] > rows[2]["lr"]  # falling after the warmup epoch
    log = (reference / "train.log").read_text()
    assert all(f"trained at {s} px" in log for s in SIZES)

    events = EventAccumulator(str(reference / "tb"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    assert [e.value for e in events.Scalars("epoch/image_size")] == SIZES
    assert [e.value for e in events.Scalars("epoch/lr")] == pytest.approx([r["lr"] for r in rows])
    train_lr = [e.value for e in events.Scalars("train/lr")]
    assert train_lr[STEPS:] == sorted(train_lr[STEPS:], reverse=True) and train_lr[STEPS] > train_lr[-1]
    grid = Image.open(io.BytesIO(events.Images("lip/importance_maps")[-1].encoded_image_string))
    assert grid.size[0] == GRID[0] and grid.size[1] > GRID[1]  # the val images are data.val_image_size; a header


@pytest.mark.slow
def test_kill9_mid_resized_epoch_resumes_exactly(demo_data: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = train_cmd(1, tiny_run(demo_data, out, *FAST_RUN))
    proc = start(cmd, tmp_path / "first.log")
    wait_for(out / "train.log", f"epoch 1 step 5/{STEPS}", proc)  # checkpointed at step 4 of the 36 px epoch
    kill9_tree(proc)
    ckpt = torch.load(out / "checkpoints" / "last.pth", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["step"] > 0
    proc = run(cmd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert max_weight_diff(load_weights(out), load_weights(reference)) <= 1e-6
    rows, ref_rows = metrics_rows(out), metrics_rows(reference)
    assert [r["image_size"] for r in rows] == SIZES
    for row, ref in zip(rows, ref_rows, strict=True):
        for key in ("step", "lr", "train_loss", "val_loss", "val_top1"):
            assert row[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-9), key


@pytest.mark.slow
def test_dali_cpu_run_follows_the_same_sizes(demo_data: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run(train_cmd(1, tiny_run(demo_data, out, *FAST_RUN, "data.backend=dali_cpu", "data.workers=1")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = metrics_rows(out)
    assert [r["image_size"] for r in rows] == SIZES
    assert [r["lr"] for r in rows] == pytest.approx([r["lr"] for r in metrics_rows(reference)])
    events = EventAccumulator(str(out / "tb"), size_guidance={"images": 0})
    events.Reload()
    grid = Image.open(io.BytesIO(events.Images("lip/importance_maps")[-1].encoded_image_string))
    assert grid.size[0] == GRID[0] and grid.size[1] > GRID[1]


@pytest.mark.slow
def test_bad_progressive_settings_are_one_line_errors(demo_data: Path, tmp_path: Path) -> None:
    proc = run(train_cmd(1, tiny_run(demo_data, tmp_path / "run", *FAST_RUN, "data.progressive.end_epoch=0")))
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert re.search(r"data\.progressive\.end_epoch \(0\) must be after data\.progressive\.start_epoch \(0\)",
                     proc.stderr)
