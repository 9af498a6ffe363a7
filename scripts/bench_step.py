"""Cost of one SGD training step of LIP-ResNet-50 relative to ResNet-50, each in its own process.

    python scripts/bench_step.py [--batch-size 16] [--resolution 224] [--threads 1] [--steps 3] [--rounds 1]

Time is the median step time; activation memory is the peak RSS during one step minus the RSS right
before it (weights, gradients and momentum buffers already allocated). `lip_resnet50_naive` is the same
network with the authors' exp/avg_pool formula in place of the fused operator, for comparison.
Prints one line per run, the ratios, and a final JSON line.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["resnet50", "lip_resnet50", "lip_resnet50_naive"]
# Allocations above 64 KiB are mmapped and return to the OS when freed, so RSS follows the live tensors.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def status_kib(field: str) -> int:
    """A /proc/self/status figure in KiB: VmRSS (resident now) or VmHWM (peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_before_steps_kib() -> int:
    """Return freed heap to the OS, reset the peak-RSS counter (VmHWM) and return the RSS now; the peak
    RSS after some steps minus this is the memory those steps added (their activations)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    return before


def worker(variant: str, batch_size: int, resolution: int, threads: int, steps: int) -> dict:
    """One process, one model: a warm-up step, then `steps` timed steps; memory of the last one."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT))
    import models
    import models.layers

    torch.set_num_threads(threads)
    if variant.endswith("_naive"):
        def naive_pool(self, x, features):  # the authors' formula, every intermediate kept for backward
            w = torch.sigmoid(self.logit_module()(features)).mul(models.layers.COEFF).exp()
            k, s, p = self.kernel_size, self.stride, self.padding
            return F.avg_pool2d(x * w, k, s, p) / F.avg_pool2d(w, k, s, p)
        models.layers.LIPPool.pool = naive_pool
    torch.manual_seed(0)
    model = models.create_model(variant.removesuffix("_naive")).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    images = torch.randn(batch_size, 3, resolution, resolution)
    labels = torch.randint(0, 1000, (batch_size,))

    def step() -> None:
        opt.zero_grad(set_to_none=False)
        F.cross_entropy(model(images), labels).backward()
        opt.step()

    step()  # allocates gradients and momentum buffers
    times = []
    for _ in range(steps):
        before = rss_before_steps_kib()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        peak = status_kib("VmHWM")
    return {"variant": variant, "step_s": statistics.median(times), "activation_mib": (peak - before) / 1024}


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    env = {**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, __file__, "--worker", variant, "--batch-size", str(args.batch_size),
           "--resolution", str(args.resolution), "--threads", str(args.threads), "--steps", str(args.steps)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="alternate the processes this many times")
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch_size, args.resolution, args.threads, args.steps)))
        return

    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    for _ in range(args.rounds):
        for variant in args.variants:
            result = run_variant(variant, args)
            runs[variant].append(result)
            print(f"{variant:20s} step {result['step_s']:.3f} s   activations {result['activation_mib']:.0f} MiB",
                  flush=True)
    summary: dict[str, float] = {}
    for variant, results in runs.items():
        summary[f"{variant}_step_s"] = round(statistics.median(r["step_s"] for r in results), 4)
        summary[f"{variant}_activation_mib"] = round(statistics.median(r["activation_mib"] for r in results), 1)
    if "resnet50" in runs:
        for variant in runs:
            if variant != "resnet50":
                for key in ("step_s", "activation_mib"):
                    ratio = summary[f"{variant}_{key}"] / summary[f"resnet50_{key}"]
                    summary[f"{variant}_{key}_ratio"] = round(ratio, 3)
                print(f"{variant}: time {summary[f'{variant}_step_s_ratio']:.3f}x, "
                      f"activation memory {summary[f'{variant}_activation_mib_ratio']:.3f}x of resnet50")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
