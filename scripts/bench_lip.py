"""Time forward+backward of the LIP operator against F.avg_pool2d, side by side in one run.

    python scripts/bench_lip.py [--shape 8 64 112 112] [--threads 1] [--repeats 9]

Cases run interleaved, repeat by repeat, so machine load hits all of them alike; the table shows the median
per case and its ratio to avg_pool2d, by wall clock and by process CPU time (steadier on a shared machine:
time spent waiting for a core is not counted), and the last line is JSON (wall-clock figures, CPU-time
ratios under "cpu"). The lip2d rows use the active CPU backend (`lip_backend()`; LIP_BACKEND=torch forces
the pure-PyTorch path).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.lip import gated_lip2d, lip2d, lip_backend  # noqa: E402

K, S, P = 3, 2, 1


def naive_lip(x: torch.Tensor, logit: torch.Tensor) -> torch.Tensor:
    """The authors' formula."""
    w = logit.exp()
    return F.avg_pool2d(x * w, K, S, P) / F.avg_pool2d(w, K, S, P)


def make_cases(shape: tuple[int, ...], channels_last: bool) -> dict[str, Callable[[], None]]:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).contiguous(memory_format=fmt).requires_grad_()
    z = torch.randn(shape, generator=gen).contiguous(memory_format=fmt).requires_grad_()
    logit = (12 * torch.sigmoid(z.detach())).requires_grad_()  # the range LIP layers produce: [0, 12]
    grad = torch.randn(F.avg_pool2d(x.detach(), K, S, P).shape, generator=gen).contiguous(memory_format=fmt)

    def avg_pool() -> None:
        torch.autograd.grad(F.avg_pool2d(x, K, S, P), (x,), grad)

    def ours() -> None:
        torch.autograd.grad(lip2d(x, logit, K, S, P), (x, logit), grad)

    def naive() -> None:
        torch.autograd.grad(naive_lip(x, logit), (x, logit), grad)

    def gated() -> None:
        torch.autograd.grad(gated_lip2d(x, z, 12.0, K, S, P), (x, z), grad)

    return {"avg_pool2d": avg_pool, "lip2d": ours, "naive": naive, "gated_lip2d": gated}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[8, 64, 112, 112], metavar=("N", "C", "H", "W"))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--repeats", type=int, default=9, help="timed repeats per case (median reported)")
    parser.add_argument("--channels-last", action="store_true", help="inputs in channels_last memory format")
    args = parser.parse_args()
    if args.threads < 1 or args.repeats < 1 or min(args.shape) < 1:
        parser.error("--threads, --repeats and every --shape entry must be positive")
    torch.set_num_threads(args.threads)
    cases = make_cases(tuple(args.shape), args.channels_last)
    for fn in cases.values():  # warm-up: allocator, lazy init, extension load
        fn()
    wall: dict[str, list[float]] = {name: [] for name in cases}
    cpu: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[name].append((time.perf_counter() - start_wall) * 1e3)
            cpu[name].append((time.process_time() - start_cpu) * 1e3)
    ms = {name: statistics.median(t) for name, t in wall.items()}
    cpu_ms = {name: statistics.median(t) for name, t in cpu.items()}
    layout = "channels_last" if args.channels_last else "NCHW"
    print(f"LIP forward+backward, shape {tuple(args.shape)} fp32 {layout}, k{K} s{S} p{P}, {args.threads} "
          f"thread(s), backend {lip_backend()}, median of {args.repeats}")
    print(f"{'case':<12} {'wall ms':>9} {'ratio':>7} {'cpu ms':>9} {'ratio':>7}")
    for name in cases:
        print(f"{name:<12} {ms[name]:9.2f} {ms[name] / ms['avg_pool2d']:7.2f} "
              f"{cpu_ms[name]:9.2f} {cpu_ms[name] / cpu_ms['avg_pool2d']:7.2f}")
    ratios = {name: round(ms[name] / ms["avg_pool2d"], 3) for name in cases if name != "avg_pool2d"}
    cpu_ratios = {name: round(cpu_ms[name] / cpu_ms["avg_pool2d"], 3) for name in cases if name != "avg_pool2d"}
    print(json.dumps({
        "shape": args.shape, "channels_last": args.channels_last, "threads": args.threads,
        "backend": lip_backend(), "repeats": args.repeats,
        **{f"{name}_ms": round(value, 3) for name, value in ms.items()},
        **{f"ratio_{name}": value for name, value in ratios.items()},
        "cpu": {f"ratio_{name}": value for name, value in cpu_ratios.items()},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
