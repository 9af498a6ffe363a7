"""Time the LIP operator forward, backward and forward+backward against F.avg_pool2d, side by side in one run.

    python scripts/bench_lip.py [--shape 8 64 112 112] [--threads 1] [--repeats 9] [--channels-last]
    python scripts/bench_lip.py --device cuda [--shape 32 256 56 56] [--repeats 15] [--iters 20]

Cases: avg_pool2d, our lip2d and gated_lip2d (the form the LIP layers use), the authors' formula
avg_pool(x * exp(s)) / avg_pool(exp(s)) and, on CUDA (on the CPU with --compile), torch.compile of that
formula. Each case is timed three ways from the same tensors: forward (the op with autograd recording),
backward (torch.autograd.grad on one kept graph, retain_graph=True) and forward+backward. Cases and
directions run interleaved, repeat by repeat, so machine load hits all of them alike; each sample times
--iters back-to-back calls, and the tables show the median sample per call.

CUDA: bf16 channels_last and fp32 NCHW; time by CUDA events recorded around the --iters calls of a sample
(no host sync inside a sample); peak memory = the most allocated during one forward+backward beyond the
inputs. CPU: time.perf_counter (wall) and process CPU time (steadier on a shared machine: time spent waiting
for a core is not counted), one layout per run (`--channels-last`); the lip2d rows use `lip_backend("cpu")`
(LIP_BACKEND=torch forces the pure-PyTorch path).

Effective bandwidth = the bytes a direction must move / its time. avg_pool2d: forward reads x and writes
the output, backward reads the output gradient and writes x's. lip2d and gated_lip2d: what the LIP custom
ops declare they read and write (inputs, result, the state kept for backward, gradients), counted by
scripts/step_traffic.py's counter on fake tensors of the same shapes; the formula and its compiled form are
rated by lip2d's bytes (the same work). "saved" = what autograd keeps for backward beyond x, z and the logit.
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
from torch._subclasses.fake_tensor import FakeTensorMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from step_traffic import TrafficCounter  # noqa: E402

from models.lip import gated_lip2d, lip2d, lip_backend  # noqa: E402

K, S, P = 3, 2, 1
MB = 2**20
DIRECTIONS = ("forward", "backward", "fwd+bwd")


def naive_lip(x: torch.Tensor, logit: torch.Tensor) -> torch.Tensor:
    """The authors' formula."""
    w = logit.exp()
    return F.avg_pool2d(x * w, K, S, P) / F.avg_pool2d(w, K, S, P)


def make_tensors(shape: tuple[int, ...], channels_last: bool, dtype: torch.dtype = torch.float32,
                 device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """x, z, the logit 12 * sigmoid(z) (the range LIP layers produce: [0, 12]) and an output gradient."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(0)

    def tensor(*size: int) -> torch.Tensor:
        return torch.randn(size, generator=gen).to(device=device, dtype=dtype).contiguous(memory_format=fmt)

    x = tensor(*shape).requires_grad_()
    z = tensor(*shape).requires_grad_()
    logit = (12 * torch.sigmoid(z.detach())).requires_grad_()
    grad = tensor(*F.avg_pool2d(x.detach(), K, S, P).shape)
    return x, z, logit, grad


def case_ops(tensors: tuple[torch.Tensor, ...], compiled: bool) -> dict[str, tuple[Callable, tuple]]:
    """{case: (forward callable, the inputs it differentiates)}."""
    x, z, logit, _grad = tensors
    ops = {"avg_pool2d": (lambda: F.avg_pool2d(x, K, S, P), (x,)),
           "lip2d": (lambda: lip2d(x, logit, K, S, P), (x, logit)),
           "gated_lip2d": (lambda: gated_lip2d(x, z, 12.0, K, S, P), (x, z)),
           "naive": (lambda: naive_lip(x, logit), (x, logit))}
    if compiled:
        fused = torch.compile(naive_lip)
        ops["naive_compiled"] = (lambda: fused(x, logit), (x, logit))
    return ops


def directions(op: Callable, inputs: tuple, grad: torch.Tensor) -> dict[str, Callable[[], object]]:
    """Forward, backward (on one kept graph) and forward+backward of `op`, all from the same tensors."""
    kept = op()
    return {"forward": op,
            "backward": lambda: torch.autograd.grad(kept, inputs, grad, retain_graph=True),
            "fwd+bwd": lambda: torch.autograd.grad(op(), inputs, grad)}


def bytes_moved(shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool, device: str) -> dict:
    """{case: (forward bytes, backward bytes)} a direction must move (see the module docstring)."""
    with FakeTensorMode():
        tensors = make_tensors(shape, channels_last, dtype, device)
        x, _z, _logit, grad = tensors
        out = {"avg_pool2d": (x.nbytes + grad.nbytes, grad.nbytes + x.nbytes)}
        for name, (op, inputs) in case_ops(tensors, compiled=False).items():
            if name == "avg_pool2d":
                continue
            forward, backward = TrafficCounter(), TrafficCounter()
            with forward:
                y = op()
            with backward:
                torch.autograd.grad(y, inputs, grad)
            out[name] = (forward.traffic.bytes, backward.traffic.bytes)
    out["naive"] = out["naive_compiled"] = out["lip2d"]
    return out


def saved_bytes(op: Callable, tensors: tuple) -> int:
    """Bytes autograd keeps for backward beyond the inputs x, z and the logit."""
    inputs = {v.untyped_storage().data_ptr() for v in tensors[:3]}
    storages: dict[int, int] = {}

    def pack(v: torch.Tensor) -> torch.Tensor:
        if v.untyped_storage().data_ptr() not in inputs:
            storages[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
        return v

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda v: v):
        op()
    return sum(storages.values())


class Timer:
    """Milliseconds per call of `iters` back-to-back calls: CUDA events on CUDA, else wall and CPU clocks."""

    def __init__(self, cuda: bool, iters: int) -> None:
        self.cuda, self.iters = cuda, iters
        if cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    @property
    def method(self) -> str:
        if self.cuda:
            return f"CUDA events around {self.iters} back-to-back calls per sample"
        return f"time.perf_counter and process CPU time around {self.iters} call(s) per sample"

    def __call__(self, fn: Callable[[], object]) -> tuple[float, float]:
        """(ms per call, CPU ms per call; the latter NaN on CUDA)."""
        if self.cuda:
            self.start.record()
            for _ in range(self.iters):
                fn()
            self.end.record()
            self.end.synchronize()
            return self.start.elapsed_time(self.end) / self.iters, float("nan")
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(self.iters):
            fn()
        return (time.perf_counter() - wall) * 1e3 / self.iters, (time.process_time() - cpu) * 1e3 / self.iters


def _cell(value: float | None, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:{width}.1f}"


def run_config(shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool, device: str, repeats: int,
               iters: int, compiled: bool) -> dict:
    """Time every case in every direction, interleaved; print the tables and return the figures."""
    cuda = device == "cuda"
    tensors = make_tensors(shape, channels_last, dtype, device)
    grad = tensors[3]
    ops = case_ops(tensors, compiled)
    fns = {name: directions(op, inputs, grad) for name, (op, inputs) in ops.items()}
    for cases in fns.values():  # warm-up: kernel compilation (Triton, Inductor), allocator, extension load
        for fn in cases.values():
            for _ in range(3 if cuda else 1):
                fn()
    peak = {}
    if cuda:
        torch.cuda.synchronize()
        for name, cases in fns.items():
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            cases["fwd+bwd"]()
            torch.cuda.synchronize()
            peak[name] = (torch.cuda.max_memory_allocated() - base) / MB
    saved = {name: saved_bytes(op, tensors) / MB for name, (op, _) in ops.items() if name != "naive_compiled"}
    moved = bytes_moved(shape, dtype, channels_last, device)
    timer = Timer(cuda, iters)
    wall = {(n, d): [] for n in fns for d in DIRECTIONS}
    cpu = {(n, d): [] for n in fns for d in DIRECTIONS}
    for _ in range(repeats):
        for name, cases in fns.items():
            for d, fn in cases.items():
                ms, cpu_ms = timer(fn)
                wall[name, d].append(ms)
                cpu[name, d].append(cpu_ms)
    ms = {key: statistics.median(v) for key, v in wall.items()}
    cpu_ms = {key: statistics.median(v) for key, v in cpu.items()}
    gbps = {}
    for name in fns:
        fwd, bwd = moved[name]
        gbps[name] = (fwd / ms[name, "forward"] / 1e6, bwd / ms[name, "backward"] / 1e6,
                      (fwd + bwd) / ms[name, "fwd+bwd"] / 1e6)
    dname = str(dtype).removeprefix("torch.")
    layout = "channels_last" if channels_last else "NCHW"
    where = torch.cuda.get_device_name() if cuda else f"cpu, {torch.get_num_threads()} thread(s)"
    print(f"\nLIP on {where}, shape {shape} {dname} {layout}, k{K} s{S} p{P}, backend {lip_backend(device)}; "
          f"{timer.method}, median of {repeats} samples, cases and directions interleaved")
    base = ms["avg_pool2d", "fwd+bwd"]
    print(f"{'case':<15} {'fwd ms':>8} {'bwd ms':>8} {'f+b ms':>8} {'f+b/avg':>8} {'fwd GB/s':>9} {'bwd GB/s':>9} "
          f"{'f+b GB/s':>9} {'peak MB':>8} {'saved MB':>9}" + ("" if cuda else f" {'f+b cpu ms':>10} {'cpu/avg':>8}"))
    for name in fns:
        extra = "" if cuda else (f" {cpu_ms[name, 'fwd+bwd']:10.2f} "
                                 f"{cpu_ms[name, 'fwd+bwd'] / cpu_ms['avg_pool2d', 'fwd+bwd']:8.2f}")
        print(f"{name:<15} {ms[name, 'forward']:8.3f} {ms[name, 'backward']:8.3f} {ms[name, 'fwd+bwd']:8.3f} "
              f"{ms[name, 'fwd+bwd'] / base:8.2f} {gbps[name][0]:9.0f} {gbps[name][1]:9.0f} {gbps[name][2]:9.0f} "
              f"{_cell(peak.get(name), 8)} {_cell(saved.get(name), 9)}{extra}")
    print("MB each direction must move: " + ", ".join(f"{name} {moved[name][0] / MB:.1f} + {moved[name][1] / MB:.1f}"
                                                       for name in ("avg_pool2d", "lip2d", "gated_lip2d")))
    result = {"dtype": dname, "channels_last": channels_last, "method": timer.method}
    for name in fns:
        for d, key in zip(DIRECTIONS, ("forward", "backward", "fwdbwd"), strict=True):
            result[f"{name}_{key}_ms"] = round(ms[name, d], 4)
        result[f"{name}_forward_gbps"], result[f"{name}_backward_gbps"] = round(gbps[name][0]), round(gbps[name][1])
        if name != "avg_pool2d":
            result[f"ratio_{name}"] = round(ms[name, "fwd+bwd"] / base, 3)
    for name in ("lip2d", "gated_lip2d"):
        result[f"speedup_vs_naive_{name}"] = round(ms["naive", "fwd+bwd"] / ms[name, "fwd+bwd"], 3)
        if "naive_compiled" in fns:
            result[f"speedup_vs_compiled_{name}"] = round(ms["naive_compiled", "fwd+bwd"] / ms[name, "fwd+bwd"], 3)
    if cuda:
        result["peak_mb"] = {name: round(v, 1) for name, v in peak.items()}
    else:
        result["cpu"] = {f"ratio_{name}": round(cpu_ms[name, "fwd+bwd"] / cpu_ms["avg_pool2d", "fwd+bwd"], 3)
                         for name in fns if name != "avg_pool2d"}
    result["saved_mb"] = {name: round(v, 1) for name, v in saved.items()}
    result["moved_bytes"] = {name: list(moved[name]) for name in fns}
    return result


def bench_cpu(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    result = run_config(tuple(args.shape), torch.float32, args.channels_last, "cpu", args.repeats, args.iters,
                        args.compile)
    return {"device": "cpu", "shape": args.shape, "threads": args.threads, "backend": lip_backend("cpu"),
            "repeats": args.repeats, "iters": args.iters, **result}


def _autotuners() -> dict[str, object]:
    """models.lip_triton's triton.autotune wrappers, by name."""
    from triton.runtime.autotuner import Autotuner

    from models import lip_triton

    return {name: obj for name, obj in vars(lip_triton).items() if isinstance(obj, Autotuner)}


def sweep_tiles(shape: tuple[int, ...], repeats: int, iters: int) -> dict:
    """Forward and backward of lip2d and gated_lip2d with each of the Triton kernels' tile configurations in
    turn (every autotuner held to that one), configurations interleaved repeat by repeat; the fastest per row."""
    tuners = _autotuners()
    if not tuners:
        raise SystemExit("error: bench_lip.py --tiles: models.lip_triton has no triton.autotune kernels")
    configs = list(next(iter(tuners.values())).configs)
    original = {name: list(t.configs) for name, t in tuners.items()}
    rows = {}
    for dtype, cl in ((torch.bfloat16, True), (torch.float32, False)):
        tensors = make_tensors(shape, cl, dtype, "cuda")
        ops = case_ops(tensors, compiled=False)
        for name in ("lip2d", "gated_lip2d"):
            fns = directions(*ops[name], tensors[3])
            for d in ("forward", "backward"):
                rows[f"{name} {str(dtype).removeprefix('torch.')} {'channels_last' if cl else 'NCHW'} {d}"] = fns[d]
    timer = Timer(True, iters)
    samples: dict[tuple[str, int], list[float]] = {(row, i): [] for row in rows for i in range(len(configs))}
    try:
        for r in range(repeats + 1):  # the first round compiles each configuration: not recorded
            for i, config in enumerate(configs):
                for tuner in tuners.values():
                    tuner.configs = [config]
                    tuner.cache.clear()
                for row, fn in rows.items():
                    ms = timer(fn)[0]
                    if r:
                        samples[row, i].append(ms)
    finally:
        for name, tuner in tuners.items():
            tuner.configs = original[name]
            tuner.cache.clear()
    ms = {key: statistics.median(v) for key, v in samples.items()}
    print(f"\nTriton tile sweep, shape {shape}; {timer.method}, median of {repeats} samples; ms per call")
    print(f"{'row':<40} " + " ".join(f"{str(c):>22}" for c in configs) + "  fastest")
    best = {}
    for row in rows:
        times = [ms[row, i] for i in range(len(configs))]
        best[row] = str(configs[times.index(min(times))])
        print(f"{row:<40} " + " ".join(f"{t:22.4f}" for t in times) + f"  {best[row]}")
    return {"configs": [str(c) for c in configs], "best": best,
            "ms": {row: [round(ms[row, i], 4) for i in range(len(configs))] for row in rows}}


def bench_cuda(args: argparse.Namespace) -> dict:
    shape = tuple(args.shape)
    results = [run_config(shape, dtype, cl, "cuda", args.repeats, args.iters, compiled=True)
               for dtype, cl in ((torch.bfloat16, True), (torch.float32, False))]
    summary = {"device": "cuda", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "shape": args.shape, "backend": lip_backend("cuda"), "repeats": args.repeats, "iters": args.iters,
               "configs": results}
    if lip_backend("cuda") == "triton":  # the tiles triton.autotune picked, per problem key
        summary["tiles"] = {name: {str(key): str(config) for key, config in tuner.cache.items()}
                            for name, tuner in _autotuners().items()}
        print("\nautotuned tiles:", json.dumps(summary["tiles"], indent=1))
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--shape", type=int, nargs=4, default=None, metavar=("N", "C", "H", "W"),
                        help="default 8 64 112 112 on the CPU, 32 256 56 56 on CUDA")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU only, default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed samples per case and direction, "
                        "median reported (default 9 on the CPU, 15 on CUDA)")
    parser.add_argument("--iters", type=int, default=None, help="back-to-back calls per sample (default 1 on the "
                        "CPU, 20 on CUDA)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last inputs (CPU only; CUDA "
                        "runs bf16 channels_last and fp32 NCHW)")
    parser.add_argument("--compile", action="store_true", help="CPU: also time torch.compile of the formula "
                        "(always on CUDA)")
    parser.add_argument("--tiles", action="store_true", help="CUDA: instead of the cases, time each of the Triton "
                        "kernels' tile configurations (models/lip_triton.py) in turn, forward and backward")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if args.tiles and not cuda:
        parser.error("--tiles needs --device cuda (the Triton kernels' tiles are timed on the GPU)")
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    args.shape = args.shape or ([32, 256, 56, 56] if cuda else [8, 64, 112, 112])
    args.repeats = args.repeats or (15 if cuda else 9)
    args.iters = args.iters or (20 if cuda else 1)
    if args.threads < 1 or args.repeats < 1 or args.iters < 1 or min(args.shape) < 1:
        parser.error("--threads, --repeats, --iters and every --shape entry must be positive")
    if args.tiles:
        if lip_backend("cuda") != "triton":
            parser.error(f"--tiles: the CUDA LIP backend is {lip_backend('cuda')}, not triton")
        result = {"device": "cuda", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                  "shape": args.shape, **sweep_tiles(tuple(args.shape), args.repeats, args.iters)}
    else:
        result = bench_cuda(args) if cuda else bench_cpu(args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
