"""scripts/bench_train.py on the CPU with tiny settings: a line per model and the final JSON's exact keys,
with ratios that follow from the figures; bad arguments are one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from train_utils import ENV, ROOT

pytestmark = pytest.mark.slow

KEYS = {"model", "baseline", "device", "model_img_s", "baseline_img_s", "model_peak_mb", "baseline_peak_mb",
        "speed_ratio", "memory_ratio"}


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "scripts/bench_train.py", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)


def test_cpu_figures_and_ratios() -> None:
    proc = bench("--model", "lip_resnet_tiny", "--baseline", "resnet50", "--device", "cpu", "--batch-size", "2",
                 "--image-size", "32", "--steps", "2", "--warmup", "1", "--amp", "off")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("lip_resnet_tiny") and lines[1].startswith("resnet50") and "img/s" in lines[0]
    result = json.loads(lines[-1])
    assert set(result) == KEYS
    assert (result["model"], result["baseline"], result["device"]) == ("lip_resnet_tiny", "resnet50", "cpu")
    for key in ("model_img_s", "baseline_img_s", "model_peak_mb", "baseline_peak_mb"):
        assert result[key] > 0, key
    assert result["speed_ratio"] == pytest.approx(result["model_img_s"] / result["baseline_img_s"], rel=1e-2)
    assert result["memory_ratio"] == pytest.approx(result["model_peak_mb"] / result["baseline_peak_mb"], rel=5e-2)
    # resnet50 (25.6M parameters, 4x wider at every stage) needs more activation memory than the tiny model
    assert result["memory_ratio"] < 1


def test_profile_shows_each_models_costliest_operators() -> None:
    proc = bench("--model", "lip_resnet_tiny", "--baseline", "resnet50", "--device", "cpu", "--batch-size", "2",
                 "--image-size", "32", "--steps", "1", "--warmup", "1", "--amp", "off", "--profile", "40")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    lip, base = out.index("--- lip_resnet_tiny: 3 steps"), out.index("--- resnet50: 3 steps")
    assert lip < base < out.index("\nlip_resnet_tiny ") and set(json.loads(out.splitlines()[-1])) == KEYS
    assert "aten::convolution_backward" in out[lip:base] and "aten::convolution_backward" in out[base:]
    assert "lip::" in out[lip:base] and "lip::" not in out[base:]  # the LIP model's own operators


@pytest.mark.parametrize("args, said", [
    (["--model", "resnet50", "--baseline", "resnet50", "--device", "cpu"], "name the same model"),
    (["--device", "cpu", "--steps", "0"], "--steps must be >= 1"),
    (["--device", "cpu", "--profile", "-1"], "--profile must be >= 0"),
    (["--model", "nope", "--device", "cpu"], "invalid choice"),
])
def test_bad_arguments_are_one_line(args: list[str], said: str) -> None:
    proc = bench(*args)
    assert proc.returncode == 2 and said in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_cuda_without_a_gpu_is_one_line() -> None:
    proc = bench("--device", "cuda")
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr and "Traceback" not in proc.stderr
