"""scripts/bench_infer.py: the ratios come from the unrounded medians, and the JSON line has its keys."""

from __future__ import annotations

import json
import statistics
import sys

import pytest
from train_utils import run

from scripts.bench_infer import RUNTIMES, ratios, table

KEYS = ["model", "baseline", "batch_size", "torch_ratio", "onnx_ratio"]


def test_ratios_use_each_models_faster_torch_layout_and_unrounded_medians() -> None:
    times = {("a", "eager"): [0.30, 0.10, 0.2004], ("a", "channels_last"): [0.25, 0.2501, 0.9],
             ("a", "onnxruntime"): [0.1234567, 0.5, 0.1],
             ("b", "eager"): [0.15, 0.1501, 0.2], ("b", "channels_last"): [0.3, 0.31, 0.32],
             ("b", "onnxruntime"): [0.0987654, 0.01, 0.2]}
    got = ratios(times, "a", "b")
    assert got["torch_ratio"] == 0.2004 / 0.1501  # a: eager (0.2004 < 0.2501); b: eager (0.1501 < 0.31)
    assert got["onnx_ratio"] == 0.1234567 / 0.0987654
    printed = table(times, "a", "b", 8).splitlines()
    assert [line.split()[0] for line in printed[2:]] == list(RUNTIMES)
    assert printed[4].endswith(f"{statistics.median(times[('a', 'onnxruntime')]) / 0.0987654:.2f}x")


@pytest.mark.slow
def test_tiny_pair_prints_a_table_and_a_json_line_per_batch_size() -> None:
    done = run([sys.executable, "scripts/bench_infer.py", "--model", "lip_resnet_tiny", "--baseline", "lip_resnet18",
                "--batch-size", "1", "2", "--image-size", "32", "--repeats", "2", "--warmup", "1"], timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert [r["batch_size"] for r in records] == [1, 2]
    for record in records:
        assert list(record) == KEYS and record["model"] == "lip_resnet_tiny"
        assert record["torch_ratio"] > 0 and record["onnx_ratio"] > 0
        onnx_row = next(line for line in lines[lines.index(f"batch {record['batch_size']}: ms per batch, median "
                                                           "(min-max) over 2 rounds"):] if line.startswith("onnx"))
        assert onnx_row.endswith(f"{record['onnx_ratio']:.2f}x")


@pytest.mark.slow
def test_bad_arguments_are_one_line_errors() -> None:
    for args, message in [(["--model", "nope"], "--model nope: not a model"),
                          (["--baseline", "lip_resnet50"], "both lip_resnet50"),
                          (["--batch-size", "0"], "must be >= 1"), (["--threads", "x"], "invalid int value")]:
        done = run([sys.executable, "scripts/bench_infer.py", *args])
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and message in lines[0], (args, done.stderr)
