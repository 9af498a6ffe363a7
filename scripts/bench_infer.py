"""Inference latency of a model against its baseline on the CPU: PyTorch eager, PyTorch channels_last and
onnxruntime, side by side in one process.

    python scripts/bench_infer.py --model lip_resnet50 --baseline resnet50 --batch-size 1 8 --threads 2

No dataset: both models get random weights that look trained (random BN statistics, non-zero LIP logit
heads; the reference init zeroes them, which would leave the logit paths unused), or --checkpoint's weights
for --model. The ONNX files are written by scripts/export.py's own export (and checked against PyTorch the
same way). For each batch size every runtime of both models is timed once per round, the rounds
interleaved, so drift and other load hit all alike; the table gives the median and the min-max over the
rounds, in ms per batch.

torch_ratio compares each model at its faster PyTorch layout (eager NCHW or channels_last, by median), what a
deployment would pick; onnx_ratio compares the onnxruntime sessions. Both are model / baseline median
latency from the unrounded figures. A final JSON line per batch size holds model, baseline, batch_size,
torch_ratio and onnx_ratio.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import create_model, list_models  # noqa: E402
from scripts.export import build, export_onnx, onnx_session, trained_looking  # noqa: E402
from training.cli import ArgumentParser as OneLineErrors  # noqa: E402
from training.cli import run_main  # noqa: E402
from training.errors import UserError  # noqa: E402
from training.logger import RunLog  # noqa: E402

RUNTIMES = ("eager", "channels_last", "onnxruntime")


def runners(model: nn.Module, onnx_path: Path, batch: torch.Tensor, threads: int) -> dict[str, Callable[[], None]]:
    """One zero-argument call per runtime, each on its own copy of the batch in the layout it wants."""
    session = onnx_session(onnx_path, threads)
    feed = {"image": batch.numpy()}
    nhwc_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    nhwc_batch = batch.contiguous(memory_format=torch.channels_last)
    return {"eager": lambda: model(batch), "channels_last": lambda: nhwc_model(nhwc_batch),
            "onnxruntime": lambda: session.run(["logits"], feed)}


def measure(calls: dict[str, Callable[[], None]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of every call over `repeats` rounds; each round runs every call once, in turn."""
    with torch.inference_mode():
        for call in calls.values():
            for _ in range(warmup):
                call()
        times: dict[str, list[float]] = {key: [] for key in calls}
        for _ in range(repeats):
            for key, call in calls.items():
                start = time.perf_counter()
                call()
                times[key].append(time.perf_counter() - start)
    return times


def ratios(times: dict[tuple[str, str], list[float]], model: str, baseline: str) -> dict[str, float]:
    """torch_ratio (each model at its faster PyTorch layout) and onnx_ratio, from the unrounded medians."""
    med = {key: statistics.median(v) for key, v in times.items()}
    best = {name: min(med[(name, "eager")], med[(name, "channels_last")]) for name in (model, baseline)}
    return {"torch_ratio": best[model] / best[baseline],
            "onnx_ratio": med[(model, "onnxruntime")] / med[(baseline, "onnxruntime")]}


def table(times: dict[tuple[str, str], list[float]], model: str, baseline: str, batch: int) -> str:
    lines = [f"batch {batch}: ms per batch, median (min-max) over {len(next(iter(times.values())))} rounds",
             f"{'runtime':<14} {model:>26} {baseline:>26} {'ratio':>7}"]
    for runtime in RUNTIMES:
        cells = []
        for name in (model, baseline):
            v = times[(name, runtime)]
            cells.append(f"{statistics.median(v) * 1e3:.1f} ({min(v) * 1e3:.1f}-{max(v) * 1e3:.1f})")
        ratio = statistics.median(times[(model, runtime)]) / statistics.median(times[(baseline, runtime)])
        lines.append(f"{runtime:<14} {cells[0]:>26} {cells[1]:>26} {ratio:>6.2f}x")
    return "\n".join(lines)


def main(args: argparse.Namespace, log: RunLog) -> None:
    known = list_models()
    for flag, name in (("--model", args.model), ("--baseline", args.baseline)):
        if name not in known:
            raise UserError(f"{flag} {name}: not a model create_model knows (e.g. lip_resnet50, resnet50)")
    if args.model == args.baseline:
        raise UserError(f"--model and --baseline are both {args.model}: compare two different models")
    if min(args.batch_size) < 1 or args.threads < 1 or args.repeats < 1 or args.image_size < 32:
        raise UserError("--batch-size, --threads and --repeats must be >= 1 and --image-size >= 32")
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        raise UserError(f"--checkpoint {args.checkpoint}: file not found")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.checkpoint is None:
        model = trained_looking(create_model(args.model))
    else:
        model = build(args.model, Path(args.checkpoint), None)
    models = {args.model: model, args.baseline: trained_looking(create_model(args.baseline), seed=1)}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, net in models.items():
            paths[name] = Path(tmp) / f"{name}.onnx"
            error = export_onnx(net, paths[name], args.image_size, {})
            log.info(f"{name}: exported; onnxruntime matches PyTorch within {error:.1e} of the largest logit")
        for batch_size in args.batch_size:
            batch = torch.randn(batch_size, 3, args.image_size, args.image_size)
            calls = {}
            for name, net in models.items():
                for runtime, call in runners(net, paths[name], batch, args.threads).items():
                    calls[(name, runtime)] = call
            times = measure(calls, args.repeats, args.warmup)
            log.info(table(times, args.model, args.baseline, batch_size))
            log.info(json.dumps({"model": args.model, "baseline": args.baseline, "batch_size": batch_size,
                                 **ratios(times, args.model, args.baseline)}))


class Parser(argparse.ArgumentParser):
    """argparse with the one-line usage errors of the other scripts (no --config: no config is read)."""

    error = OneLineErrors.error


if __name__ == "__main__":
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lip_resnet50")
    parser.add_argument("--baseline", default="resnet50")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=2, help="torch threads and onnxruntime intra-op threads")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timed rounds per batch size")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per runtime first")
    parser.add_argument("--checkpoint", default=None, help="weights for --model (ours or the authors' release)")
    run_log = RunLog(0, 1)
    run_main(lambda: main(parser.parse_args(), run_log), run_log)
