"""Time forward+backward of the LIP operator against F.avg_pool2d, side by side in one run.

    python scripts/bench_lip.py [--shape 8 64 112 112] [--threads 1] [--repeats 9] [--channels-last]
    python scripts/bench_lip.py --device cuda [--shape 32 256 56 56] [--repeats 15]

Cases run interleaved, repeat by repeat, so machine load hits all of them alike; the tables show the median
per case and its ratio to avg_pool2d, and the last line is JSON.

CPU: wall clock and process CPU time (steadier on a shared machine: time spent waiting for a core is not
counted), one layout per run (`--channels-last`); the lip2d rows use `lip_backend("cpu")` (LIP_BACKEND=torch
forces the pure-PyTorch path).

CUDA: bf16 channels_last and fp32 NCHW, each with avg_pool2d, our lip2d and gated_lip2d (the form the LIP
layers use), the authors' formula avg_pool(x * exp(s)) / avg_pool(exp(s)) and torch.compile of that formula
(Inductor fuses it). Time by CUDA events over --iters calls; peak memory = the most allocated during one
forward+backward beyond the inputs; "saved" = what autograd keeps for backward beyond x and the logit.
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
MB = 2**20


def naive_lip(x: torch.Tensor, logit: torch.Tensor) -> torch.Tensor:
    """The authors' formula."""
    w = logit.exp()
    return F.avg_pool2d(x * w, K, S, P) / F.avg_pool2d(w, K, S, P)


def naive_gated(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The authors' formula with the soft gate of their LIP layers."""
    return naive_lip(x, 12.0 * torch.sigmoid(z))


def make_cases(shape: tuple[int, ...], channels_last: bool, dtype: torch.dtype = torch.float32,
               device: str = "cpu", compiled: bool = False) -> tuple[dict[str, Callable[[], None]], tuple]:
    """The cases, each one forward+backward, and the tensors they read (x, z, logit, grad)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(0)

    def tensor(*size: int) -> torch.Tensor:
        return torch.randn(size, generator=gen).to(device=device, dtype=dtype).contiguous(memory_format=fmt)

    x = tensor(*shape).requires_grad_()
    z = tensor(*shape).requires_grad_()
    logit = (12 * torch.sigmoid(z.detach())).requires_grad_()  # the range LIP layers produce: [0, 12]
    grad = tensor(*F.avg_pool2d(x.detach(), K, S, P).shape)

    def avg_pool() -> None:
        torch.autograd.grad(F.avg_pool2d(x, K, S, P), (x,), grad)

    def ours() -> None:
        torch.autograd.grad(lip2d(x, logit, K, S, P), (x, logit), grad)

    def gated() -> None:
        torch.autograd.grad(gated_lip2d(x, z, 12.0, K, S, P), (x, z), grad)

    def naive() -> None:
        torch.autograd.grad(naive_lip(x, logit), (x, logit), grad)

    cases = {"avg_pool2d": avg_pool, "lip2d": ours, "gated_lip2d": gated, "naive": naive}
    if compiled:
        fused = torch.compile(naive_lip)

        def naive_compiled() -> None:
            torch.autograd.grad(fused(x, logit), (x, logit), grad)

        cases["naive_compiled"] = naive_compiled
    return cases, (x, z, logit, grad)


def saved_bytes(name: str, tensors: tuple) -> int:
    """Bytes autograd keeps for backward beyond the inputs x, z and the logit."""
    x, z, logit, _grad = tensors
    inputs = {v.untyped_storage().data_ptr() for v in (x, z, logit)}
    storages: dict[int, int] = {}

    def pack(v: torch.Tensor) -> torch.Tensor:
        if v.untyped_storage().data_ptr() not in inputs:
            storages[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
        return v

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda v: v):
        if name == "avg_pool2d":
            F.avg_pool2d(x, K, S, P)
        elif name == "lip2d":
            lip2d(x, logit, K, S, P)
        elif name == "gated_lip2d":
            gated_lip2d(x, z, 12.0, K, S, P)
        else:
            naive_lip(x, logit)
    return sum(storages.values())


def bench_cpu(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    cases, _ = make_cases(tuple(args.shape), args.channels_last)
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
          f"thread(s), backend {lip_backend('cpu')}, median of {args.repeats}")
    print(f"{'case':<12} {'wall ms':>9} {'ratio':>7} {'cpu ms':>9} {'ratio':>7}")
    for name in cases:
        print(f"{name:<12} {ms[name]:9.2f} {ms[name] / ms['avg_pool2d']:7.2f} "
              f"{cpu_ms[name]:9.2f} {cpu_ms[name] / cpu_ms['avg_pool2d']:7.2f}")
    return {
        "device": "cpu", "shape": args.shape, "channels_last": args.channels_last, "threads": args.threads,
        "backend": lip_backend("cpu"), "repeats": args.repeats,
        **{f"{name}_ms": round(value, 3) for name, value in ms.items()},
        **{f"ratio_{name}": round(ms[name] / ms["avg_pool2d"], 3) for name in cases if name != "avg_pool2d"},
        "cpu": {f"ratio_{name}": round(cpu_ms[name] / cpu_ms["avg_pool2d"], 3)
                for name in cases if name != "avg_pool2d"},
    }


def bench_cuda_config(shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool, repeats: int,
                      iters: int) -> dict:
    cases, tensors = make_cases(shape, channels_last, dtype, "cuda", compiled=True)
    for fn in cases.values():  # warm-up: kernel compilation (Triton, Inductor), allocator
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    peak = {}
    for name, fn in cases.items():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak[name] = (torch.cuda.max_memory_allocated() - base) / MB
    saved = {name: saved_bytes(name, tensors) / MB for name in cases if name != "naive_compiled"}
    times: dict[str, list[float]] = {name: [] for name in cases}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(repeats):
        for name, fn in cases.items():
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end) / iters)
    ms = {name: statistics.median(t) for name, t in times.items()}
    split = split_times(tensors, repeats, iters)
    dname = str(dtype).removeprefix("torch.")
    layout = "channels_last" if channels_last else "NCHW"
    print(f"\nLIP forward+backward on {torch.cuda.get_device_name()}, shape {shape} {dname} {layout}, k{K} s{S} p{P}, "
          f"backend {lip_backend('cuda')}, median of {repeats} x {iters} calls")
    print(f"{'case':<15} {'ms':>8} {'/avg_pool':>10} {'naive/this':>11} {'peak MB':>9} {'saved MB':>9}")
    for name in cases:
        saved_mb = f"{saved[name]:9.1f}" if name in saved else f"{'-':>9}"
        print(f"{name:<15} {ms[name]:8.3f} {ms[name] / ms['avg_pool2d']:10.2f} {ms['naive'] / ms[name]:11.2f} "
              f"{peak[name]:9.1f} {saved_mb}")
    print(f"{'direction':<21} {'ms':>8} {'MB moved':>9} {'GB/s':>7}   (MB: each tensor read or written once)")
    for name, (fwd_ms, bwd_ms, fwd_mb, bwd_mb) in split.items():
        print(f"{name + ' forward':<21} {fwd_ms:8.3f} {fwd_mb:9.1f} {fwd_mb * MB / fwd_ms / 1e6:7.0f}")
        print(f"{name + ' backward':<21} {bwd_ms:8.3f} {bwd_mb:9.1f} {bwd_mb * MB / bwd_ms / 1e6:7.0f}")
    return {
        "dtype": dname, "channels_last": channels_last,
        **{f"{name}_ms": round(value, 4) for name, value in ms.items()},
        **{f"ratio_{name}": round(ms[name] / ms["avg_pool2d"], 3) for name in cases if name != "avg_pool2d"},
        **{f"speedup_vs_naive_{name}": round(ms["naive"] / ms[name], 3) for name in ("lip2d", "gated_lip2d")},
        **{f"{name}_forward_ms": round(v[0], 4) for name, v in split.items()},
        **{f"{name}_backward_ms": round(v[1], 4) for name, v in split.items()},
        **{f"{name}_forward_gbps": round(v[2] * MB / v[0] / 1e6) for name, v in split.items()},
        **{f"{name}_backward_gbps": round(v[3] * MB / v[1] / 1e6) for name, v in split.items()},
        "peak_mb": {name: round(v, 1) for name, v in peak.items()},
        "saved_mb": {name: round(v, 1) for name, v in saved.items()},
    }


def split_times(tensors: tuple, repeats: int, iters: int) -> dict[str, tuple[float, float, float, float]]:
    """Per op: median forward ms, backward ms, and the MB each direction must read and write at least.

    Forward = the op with autograd recording; backward = torch.autograd.grad on a kept graph. Forward moves
    x, the logit and the op's outputs (the result and the state saved for backward); backward reads x, the
    logit, the incoming gradient and the saved state and writes both gradients.
    """
    x, z, logit, grad = tensors
    ops = {"avg_pool2d": (lambda: F.avg_pool2d(x, K, S, P), (x,)),
           "lip2d": (lambda: lip2d(x, logit, K, S, P), (x, logit)),
           "gated_lip2d": (lambda: gated_lip2d(x, z, 12.0, K, S, P), (x, z))}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def timed(fn: Callable[[], object]) -> float:
        samples = []
        for _ in range(repeats):
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / iters)
        return statistics.median(samples)

    result = {}
    for name, (op, inputs) in ops.items():
        y = op()
        fwd_ms = timed(op)
        bwd_ms = timed(lambda y=y, inputs=inputs: torch.autograd.grad(y, inputs, grad, retain_graph=True))
        in_bytes = sum(v.nbytes for v in inputs)
        if name == "avg_pool2d":
            fwd, bwd = x.nbytes + y.nbytes, grad.nbytes + x.nbytes
        else:
            gated = name == "gated_lip2d"
            outs = torch.ops.lip.forward(x, z if gated else logit, 12.0 if gated else 0.0, gated, K, S, P)
            state = sum(v.nbytes for v in outs)
            fwd = in_bytes + state
            bwd = 2 * in_bytes + grad.nbytes + state - (outs[0].nbytes if outs[1].numel() else 0)
        result[name] = (fwd_ms, bwd_ms, fwd / MB, bwd / MB)
    return result


def bench_cuda(args: argparse.Namespace) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("bench_lip.py: --device cuda but torch sees no CUDA device")
    shape = tuple(args.shape)
    results = [bench_cuda_config(shape, dtype, cl, args.repeats, args.iters)
               for dtype, cl in ((torch.bfloat16, True), (torch.float32, False))]
    summary = {"device": "cuda", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "shape": args.shape, "backend": lip_backend("cuda"), "repeats": args.repeats, "iters": args.iters,
               "configs": results}
    if lip_backend("cuda") == "triton":  # the tiles triton.autotune picked, per problem key
        from models import lip_triton

        summary["tiles"] = {kind: {str(key): str(config) for key, config in tuned.cache.items()}
                            for kind, tuned in (("forward", lip_triton._forward_tuned),
                                                ("backward", lip_triton._backward_tuned))}
        print("\nautotuned tiles:", json.dumps(summary["tiles"], indent=1))
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--shape", type=int, nargs=4, default=None, metavar=("N", "C", "H", "W"),
                        help="default 8 64 112 112 on the CPU, 32 256 56 56 on CUDA")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU only, default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per case, median reported "
                        "(default 9 on the CPU, 15 on CUDA)")
    parser.add_argument("--iters", type=int, default=10, help="calls per timed repeat (CUDA only)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last inputs (CPU only; CUDA "
                        "runs bf16 channels_last and fp32 NCHW)")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    args.shape = args.shape or ([32, 256, 56, 56] if cuda else [8, 64, 112, 112])
    args.repeats = args.repeats or (15 if cuda else 9)
    if args.threads < 1 or args.repeats < 1 or args.iters < 1 or min(args.shape) < 1:
        parser.error("--threads, --repeats, --iters and every --shape entry must be positive")
    print(json.dumps(bench_cuda(args) if cuda else bench_cpu(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
