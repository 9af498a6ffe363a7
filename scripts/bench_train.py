"""Training speed and memory of a model against its baseline, side by side in one invocation.

    python scripts/bench_train.py --model lip_resnet50 --baseline resnet50 --device cuda --batch-size 256 \\
        --image-size 224 --steps 50 --amp bf16 --channels-last [--compile]
    python scripts/bench_train.py --device cpu --batch-size 8 --image-size 112 --steps 3 --amp off

Each step is a forward, backward and SGD update (momentum 0.9, weight decay 1e-4) on synthetic data already
on the device; warm-up steps (and with --compile, compilation) are not timed. On a GPU both models live in
one process and their timed steps alternate in rounds, so clock and thermal drift hit both alike; peak
memory is what `torch.cuda.max_memory_allocated` sees while the model steps, less the other model's
tensors, i.e. the model's weights, gradients, momentum, batch and activations. On the CPU each model runs
in its own child process (as scripts/bench_step.py does) and memory is the peak RSS during the timed steps
minus the RSS right before them (the activations). Prints a line per model and a final JSON line; with
--profile N, before them, each model's N operators with the most self time over a few more steps.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_step import MALLOC_ENV, rss_before_steps_kib, status_kib  # noqa: E402

from models import create_model, list_models  # noqa: E402
from training.backends import compile_model  # noqa: E402
from training.recipe import AMP_DTYPES  # noqa: E402

ROUNDS = 5  # GPU: the timed steps of each model are split into this many alternating rounds
PROFILED_STEPS = 3  # --profile: steps recorded by torch.profiler after the timed ones


class Bench:
    """One model with its optimizer and a synthetic batch on the device; `step()` is one training step."""

    def __init__(self, name: str, args: argparse.Namespace, device: torch.device) -> None:
        torch.manual_seed(0)
        self.name, self.batch = name, args.batch_size
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        model = create_model(name).to(device, memory_format=fmt).train()
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        self.model = compile_model(model, {"compile": args.compile, "compile_mode": None})
        self.images = torch.randn(args.batch_size, 3, args.image_size, args.image_size,
                                  device=device).contiguous(memory_format=fmt)
        self.labels = torch.randint(0, 1000, (args.batch_size,), device=device)
        dtype = AMP_DTYPES[args.amp]
        self.autocast: Callable[[], contextlib.AbstractContextManager] = (
            contextlib.nullcontext if dtype is None else lambda: torch.autocast(device.type, dtype=dtype))
        self.scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss = F.cross_entropy(self.model(self.images), self.labels)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()


def profile(bench: Bench, rows: int, device: torch.device) -> str:
    """The `rows` operators with the most self time (on the GPU when there is one) over a few steps: where a
    model's step goes, e.g. how much of it the LIP kernels and the logit modules' instance norms take."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(PROFILED_STEPS):
            bench.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=rows)
    return f"--- {bench.name}: {PROFILED_STEPS} steps, the {rows} operators with the most self time ---\n{table}"


def bench_cuda(args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    """{name: (images/s, peak MB)} for both models, in one process, their timed steps interleaved."""
    device = torch.device("cuda", torch.cuda.current_device())
    torch.backends.cudnn.benchmark = True
    benches, resident = [], {}
    for name in (args.model, args.baseline):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        bench = Bench(name, args, device)
        for _ in range(args.warmup):  # cuDNN autotuning, compilation, gradient and momentum buffers
            bench.step()
        torch.cuda.synchronize()
        resident[name] = torch.cuda.memory_allocated() - before  # weights, grads, momentum, batch
        benches.append(bench)
    seconds = dict.fromkeys(resident, 0.0)
    peak = dict.fromkeys(resident, 0)
    done = dict.fromkeys(resident, 0)
    for r in range(ROUNDS):
        for bench in benches:
            steps = args.steps * (r + 1) // ROUNDS - args.steps * r // ROUNDS
            if not steps:
                continue
            torch.cuda.synchronize()
            start_alloc = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            for _ in range(steps):
                bench.step()
            torch.cuda.synchronize()
            seconds[bench.name] += time.perf_counter() - start
            done[bench.name] += steps
            other = start_alloc - resident[bench.name]  # the other model's tensors
            peak[bench.name] = max(peak[bench.name], torch.cuda.max_memory_allocated() - other)
    if args.profile:
        for bench in benches:
            print(profile(bench, args.profile, device), flush=True)
    return {n: (done[n] * args.batch_size / seconds[n], peak[n] / 2**20) for n in resident}


def cpu_worker(name: str, args: argparse.Namespace) -> dict[str, float]:
    """One model in this process: warm-up, then the timed steps; images/s and the steps' peak RSS (MB)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    bench = Bench(name, args, torch.device("cpu"))
    for _ in range(args.warmup):
        bench.step()
    before = rss_before_steps_kib()
    start = time.perf_counter()
    for _ in range(args.steps):
        bench.step()
    seconds = time.perf_counter() - start
    if args.profile:
        print(profile(bench, args.profile, torch.device("cpu")))
    return {"img_s": args.steps * args.batch_size / seconds, "peak_mb": (status_kib("VmHWM") - before) / 1024}


def bench_cpu(args: argparse.Namespace, argv: list[str]) -> dict[str, tuple[float, float]]:
    """{name: (images/s, peak MB)}, each model measured in its own child process."""
    env = {**os.environ, **MALLOC_ENV}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    out = {}
    for name in (args.model, args.baseline):
        proc = subprocess.run([sys.executable, __file__, *argv, "--worker", name], env=env, capture_output=True,
                              text=True)
        if proc.returncode:
            raise SystemExit(f"error: the {name} child process failed:\n{proc.stderr[-3000:]}")
        *table, last = proc.stdout.strip().splitlines()
        if table:
            print("\n".join(table), flush=True)
        result = json.loads(last)
        out[name] = (result["img_s"], result["peak_mb"])
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lip_resnet50", choices=list_models())
    parser.add_argument("--baseline", default="resnet50", choices=list_models())
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=50, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    parser.add_argument("--amp", default="bf16", choices=tuple(AMP_DTYPES))
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models, as train.compile")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after timing, profile a few steps of each model and print its N costliest operators")
    parser.add_argument("--threads", type=int, default=None, help="CPU: torch threads per child (default: torch's)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for flag in ("batch_size", "image_size", "steps"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.profile < 0:
        parser.error("--profile must be >= 0")
    if args.model == args.baseline:
        parser.error("--model and --baseline name the same model")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here (use --device cpu)")
    return args


def main() -> None:
    argv = sys.argv[1:]
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(cpu_worker(args.worker, args)))
        return
    results = bench_cuda(args) if args.device == "cuda" else bench_cpu(args, argv)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    for name, (img_s, peak_mb) in results.items():
        print(f"{name:18s} {img_s:10.1f} img/s   peak {peak_mb:9.1f} MB   ({where}, batch {args.batch_size}, "
              f"{args.image_size} px, amp {args.amp}{', channels_last' if args.channels_last else ''}"
              f"{', compiled' if args.compile else ''})", flush=True)
    (model_img_s, model_mb), (base_img_s, base_mb) = results[args.model], results[args.baseline]
    print(json.dumps({"model": args.model, "baseline": args.baseline, "device": args.device,
                      "model_img_s": round(model_img_s, 2), "baseline_img_s": round(base_img_s, 2),
                      "model_peak_mb": round(model_mb, 1), "baseline_peak_mb": round(base_mb, 1),
                      "speed_ratio": round(model_img_s / base_img_s, 4),
                      "memory_ratio": round(model_mb / base_mb, 4)}))


if __name__ == "__main__":
    main()
