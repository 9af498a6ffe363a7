"""train.py end to end with real processes: outputs, TensorBoard, exact resume after kill -9 and signals
(1 process and 2 torchrun gloo ranks), the non-finite loss stop, corrupt files, errors under torchrun."""

from __future__ import annotations

import io
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from train_utils import (
    command,
    kill9_tree,
    load_weights,
    make_dataset,
    max_weight_diff,
    metrics_rows,
    run,
    start,
    tiny_run,
    train_cmd,
    wait_for,
    worker_pids,
)

STEPS = 12  # 48 good train images / global batch 4
EPOCHS = 3
ROW_KEYS = {"epoch", "step", "lr", "image_size", "train_loss", "val_loss", "val_top1", "val_top5", "images_per_sec",
            "epoch_time"}
# The resume scenarios switch on the recipe extras, so exactness covers the GradScaler, the EMA weights and
# the RNG streams they draw from (mixup/cutmix use numpy's, per rank).
EXTRAS_1 = ("train.amp=fp16", "train.mixup_alpha=0.2", "train.cutmix_alpha=1.0", "train.label_smoothing=0.1",
            "train.ema_decay=0.9")
EXTRAS_2 = ("train.mixup_alpha=0.2", "train.ema_decay=0.9")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_dataset(tmp_path_factory.mktemp("data") / "shapes")
    broken = root / "train" / "00_circle" / "broken.JPEG"
    good = next((root / "train" / "00_circle").glob("*.JPEG")).read_bytes()
    broken.write_bytes(good[: len(good) // 3])  # truncated JPEG: named and skipped, the run goes on
    return root


def train(data: Path, out: Path, nproc: int = 1, *extra: str, timeout: float = 240):
    proc = run(train_cmd(nproc, tiny_run(data, out, *extra)), timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def reference_1(data: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("ref1") / "run"
    return out, train(data, out, 1, *EXTRAS_1)


@pytest.fixture(scope="module")
def reference_2(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref2") / "run"
    train(data, out, 2, *EXTRAS_2)
    return out


def assert_same_run(out: Path, reference: Path) -> None:
    """Final weights within 1e-6 of the uninterrupted run and every epoch logged exactly once, with the same
    losses and accuracies (so the partly done epochs' accumulators were restored too)."""
    assert max_weight_diff(load_weights(out), load_weights(reference)) <= 1e-6
    rows, ref_rows = metrics_rows(out), metrics_rows(reference)
    assert [r["epoch"] for r in rows] == list(range(EPOCHS))
    for row, ref in zip(rows, ref_rows, strict=True):
        for key in ("step", "lr", "train_loss", "val_loss", "val_top1", "val_top5", "val_top1_ema"):
            assert row[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-9), key


def test_outputs_metrics_and_corrupt_file(reference_1) -> None:
    out, proc = reference_1
    rows = metrics_rows(out)
    assert [r["epoch"] for r in rows] == list(range(EPOCHS))
    assert [r["step"] for r in rows] == [STEPS, 2 * STEPS, 3 * STEPS]
    for row in rows:
        assert set(row) == ROW_KEYS | {"val_loss_ema", "val_top1_ema", "val_top5_ema"}
        assert row["images_per_sec"] > 0 and row["epoch_time"] > 0 and 0 <= row["val_top1"] <= 100
    assert rows[0]["lr"] == pytest.approx(0.8 * 4 / 256 * 11 / 12)  # warmup: last step of epoch 0
    assert rows[1]["lr"] == pytest.approx(0.8 * 4 / 256)
    assert rows[2]["lr"] == pytest.approx(0.8 * 4 / 256 * 0.1)  # milestone 2

    ckpt = torch.load(out / "checkpoints" / "last.pth", map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "epoch", "step", "rng", "config"} <= set(ckpt)
    assert ckpt["scaler"] is not None and ckpt["model_ema"] is not None
    assert (ckpt["epoch"], ckpt["step"], ckpt["global_step"]) == (EPOCHS, 0, EPOCHS * STEPS)
    assert not any(k.startswith("module.") for k in ckpt["model"])
    best = torch.load(out / "checkpoints" / "best.pth", map_location="cpu", weights_only=True)
    assert best["val_top1"] == max(r["val_top1"] for r in rows)
    assert yaml.safe_load((out / "config.yaml").read_text())["model"] == "lip_resnet_tiny"

    log = (out / "train.log").read_text()
    assert "broken.JPEG" in log and "broken.JPEG" in proc.stdout  # named, skipped, run completed
    assert "epoch 2 done" in log and "finished 3 epochs" in log


def test_tensorboard_scalars_and_importance_maps(reference_1) -> None:
    out, _ = reference_1
    events = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr", "train/images_per_sec", "val/loss", "val/top1", "val/top5"} <= set(
        tags["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, EPOCHS * STEPS + 1))
    top1 = [e.value for e in events.Scalars("val/top1")]
    assert top1 == pytest.approx([r["val_top1"] for r in metrics_rows(out)])

    images = events.Images("lip/importance_maps")
    assert [e.step for e in images] == [STEPS, 2 * STEPS, 3 * STEPS]  # every epoch
    grid = Image.open(io.BytesIO(images[-1].encoded_image_string))
    # 4 val images in rows; columns: the image, then the stem LIP and 6 stride-2 LIP maps, 32 px + 2 px pads
    assert grid.size == (8 * 34 + 2, 4 * 34 + 2)
    assert np.asarray(grid.convert("L"), dtype=np.float32).std() > 10  # real pictures, not a blank canvas


def test_kill9_and_sigterm_resume_exactly_one_process(data: Path, reference_1, tmp_path: Path) -> None:
    reference, _ = reference_1
    out = tmp_path / "run"
    cmd = train_cmd(1, tiny_run(data, out, *EXTRAS_1))

    proc = start(cmd, tmp_path / "first.log")
    wait_for(out / "train.log", f"epoch 0 step 5/{STEPS}", proc)
    kill9_tree(proc)
    assert proc.returncode == -signal.SIGKILL
    ckpt = torch.load(out / "checkpoints" / "last.pth", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["step"] > 0  # killed mid-epoch, resumes mid-epoch

    proc = start(cmd, tmp_path / "second.log")
    wait_for(out / "train.log", f"epoch 1 step 3/{STEPS}", proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    said = (tmp_path / "second.log").read_text()
    assert "resuming from" in said
    assert any("checkpoint saved" in line and "resume" in line for line in said.splitlines())

    train(data, out, 1, *EXTRAS_1)
    assert_same_run(out, reference)
    events = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    events.Reload()  # steps redone after the kill are not shown twice
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, EPOCHS * STEPS + 1))


def test_sigusr1_to_one_rank_and_kill9_resume_exactly_two_ranks(data: Path, reference_2: Path,
                                                               tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = train_cmd(2, tiny_run(data, out, *EXTRAS_2))

    proc = start(cmd, tmp_path / "first.log")
    wait_for(out / "train.log", f"epoch 0 step 3/{STEPS}", proc)
    workers = worker_pids(proc)
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGUSR1)  # one rank only: the all_reduce makes the other follow
    assert proc.wait(timeout=120) == 0
    said = (tmp_path / "first.log").read_text().splitlines()
    stopped = [line for line in said if "checkpoint saved" in line and "resume" in line]
    assert len(stopped) == 2, said[-20:]  # every rank agreed and says so
    ckpt = torch.load(out / "checkpoints" / "last.pth", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 0 and 0 < ckpt["step"] < STEPS and len(ckpt["rng"]) == 2

    proc = start(cmd, tmp_path / "second.log")
    wait_for(out / "train.log", f"epoch 1 step 5/{STEPS}", proc)
    kill9_tree(proc)

    train(data, out, 2, *EXTRAS_2)
    assert_same_run(out, reference_2)


@pytest.mark.parametrize("ema", [False, True], ids=["model", "ema"])
def test_two_rank_figures_are_those_of_the_saved_weights(data: Path, reference_2: Path, ema: bool) -> None:
    """Each rank trains with its own BatchNorm statistics; what a 2-rank run reports must still be what
    eval.py measures on its last.pth on 1 rank (the model, and the EMA copy with --ema)."""
    args = ["--config", "configs/demo.yaml", "--checkpoint", str(reference_2 / "checkpoints" / "last.pth"),
            *tiny_run(data, reference_2, *EXTRAS_2), *(["--ema"] if ema else [])]
    proc = run(command("eval.py", 1, args), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    row, suffix = metrics_rows(reference_2)[-1], "_ema" if ema else ""
    assert got["top1"] == round(row["val_top1" + suffix], 4)
    assert got["top5"] == round(row["val_top5" + suffix], 4)
    assert got["loss"] == pytest.approx(row["val_loss" + suffix], rel=1e-4)


def test_non_finite_loss_stops_with_exit_3_and_keeps_last_good_checkpoint(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run(train_cmd(1, tiny_run(data, out, "debug.nan_at_step=5", "train.epochs=1")))
    assert proc.returncode == 3
    error = proc.stderr.strip().splitlines()[-1]
    assert "non-finite loss" in error and "epoch 0, step 5" in error
    assert "Traceback" not in proc.stderr
    assert "non-finite loss" in (out / "train.log").read_text()
    ckpt = torch.load(out / "checkpoints" / "last.pth", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4  # saved at step 4; the save due at 6 was refused
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())
    assert not (out / "metrics.jsonl").read_text()


def test_dali_cpu_backend_completes_with_a_corrupt_file(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = train(data, out, 1, "data.backend=dali_cpu", "train.epochs=1", "data.workers=1")
    assert "broken.JPEG" in proc.stdout and "broken.JPEG" in (out / "train.log").read_text()
    assert [r["epoch"] for r in metrics_rows(out)] == [0]


def test_user_error_on_every_rank_under_torchrun(data: Path, tmp_path: Path) -> None:
    """An uneven batch split: each rank prints one line and exits 2; nobody hangs waiting for the others."""
    proc = run(train_cmd(2, tiny_run(data, tmp_path / "run", "train.batch_size=5")), timeout=120)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "does not split evenly across 2 ranks" in line]
    assert len(lines) == 2
    assert all(line.startswith("[rank ") and "error: train.batch_size=5" in line for line in lines)


def test_missing_data_root_is_one_line(tmp_path: Path) -> None:
    proc = run(train_cmd(1, tiny_run(tmp_path / "nowhere", tmp_path / "run")))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "nowhere" in proc.stderr
    assert "Traceback" not in proc.stderr
