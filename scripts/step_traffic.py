"""Bytes and FLOPs one training step must move and compute, model against baseline, counted on the CPU.

    python scripts/step_traffic.py --model lip_resnet50 --baseline resnet50 --batch-size 256 \\
        --image-size 224 --amp bf16 --channels-last

A GPU step is bound by what its ops must read, write and compute, whatever kernels run them. This counts
that for one step (forward, cross-entropy on random labels, backward, SGD with momentum 0.9 and weight
decay 1e-4, as scripts/bench_train.py) without running it: the models are built and stepped on fake tensors
(torch's FakeTensorMode, meta storage: shapes, dtypes and strides only), so full-size batches take seconds.
One untimed step first creates the momentum buffers; the second step is counted.

A TorchDispatchMode sees every op below autograd, once per call:
- bytes: every tensor input and every output (or argument the op writes) of each non-view op counted once,
  a broadcast (stride 0) dimension once; views and aliases (view, t, transpose, expand, detach,
  _unsafe_view, ...) and bare allocations (empty, new_empty_strided) move nothing; an argument an in-place
  op writes counts as read and written, except where the op only overwrites it (copy_, fill_, zero_, out=);
- FLOPs: convolutions (forward and backward) and matmuls by torch.utils.flop_counter's formulas;
- custom ops (lip::forward, lip::backward, any non-aten namespace) by their declared inputs and outputs: the
  mode sees the op as one call and its fake implementation runs below the mode, unseen;
- time: the roofline of each op, max(FLOPs / --tflops, bytes / --bandwidth), summed over the step;
- each op also by pass (forward, backward with the checkpoints' recompute, optimizer): `--diff N` lists the
  N (pass, op) pairs whose bytes differ most between the two models.

Mixed precision: the fake tensors are labelled cpu and the forward runs under torch.autocast("cpu"). CUDA's
autocast cannot run without a CUDA device (and the autograd engine needs one for cuda tensors); the CPU
rules give the LIP ResNets and DenseNets and their baselines the dtypes a GPU run has: convolutions, linear
and matmuls in bf16/fp16 (fp32 weights cast once per forward), batch and instance norms, ReLU, adds and
pooling in their input's dtype, log_softmax and nll_loss in fp32. The two lists differ elsewhere: CUDA runs
layer_norm, group_norm, softmax, sum, exp and log in fp32 where the CPU keeps bf16, so for a model that uses
them in its forward (e.g. a lipified ConvNeXt's layer norms) those ops are counted at half the bytes a GPU
moves. --amp fp16 runs without a GradScaler (its unscale pass is not counted).
The LIP ops count the outputs their fake implementation declares for the CPU kernels (for the gated logits
of the LIP layers the same output-sized state as the Triton kernels', plus an (N, C) flag per plane).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.errors import UserError  # noqa: E402
from training.recipe import AMP_DTYPES  # noqa: E402

TFLOPS = 400.0  # dense bf16 tensor-core rate, round and conservative for an H100/H200 (spec-sheet peak ~990)
BANDWIDTH_GBS = 3000.0  # HBM bandwidth, round figure for an H100/H200-class GPU (spec sheets: 3.35-4.8 TB/s)

aten = torch.ops.aten
# No data moves: the result is a new allocation (written by a later op, which is counted) or metadata.
_FREE = {aten.empty.memory_format, aten.empty_like.default, aten.empty_strided.default,
         aten.new_empty.default, aten.new_empty_strided.default, aten._unsafe_view.default,
         aten.lift_fresh.default}
# In-place ops that overwrite their first argument without reading it.
_OVERWRITE = {aten.copy_.default, aten.fill_.Scalar, aten.fill_.Tensor, aten.zero_.default}


def is_view(func: torch._ops.OpOverload) -> bool:
    """Whether the op returns an alias of an input (view, transpose, expand, detach, ...): no data moves."""
    schema = func._schema
    return not schema.is_mutable and any(r.alias_info is not None for r in schema.returns)


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of t's elements, a broadcast (stride 0) dimension counted once."""
    n = 1
    for size, stride in zip(t.shape, t.stride(), strict=True):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _unique_tensors(tree: object) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for leaf in tree_flatten(tree)[0]:
        if isinstance(leaf, torch.Tensor):
            seen.setdefault(id(leaf), leaf)
    return list(seen.values())


@dataclass
class OpTotal:
    """One op's totals over a step."""

    calls: int = 0
    bytes: int = 0
    flops: int = 0
    seconds: float = 0.0


@dataclass
class Traffic:
    """What a step moves and computes, in total and per op (keyed like `aten.convolution`); `passes` splits
    each op by the pass that ran it: forward, backward (with the checkpoints' recompute) or optimizer."""

    ops: dict[str, OpTotal] = field(default_factory=dict)
    passes: dict[tuple[str, str], OpTotal] = field(default_factory=dict)

    @property
    def calls(self) -> int:
        return sum(op.calls for op in self.ops.values())

    @property
    def bytes(self) -> int:
        return sum(op.bytes for op in self.ops.values())

    @property
    def flops(self) -> int:
        return sum(op.flops for op in self.ops.values())

    @property
    def seconds(self) -> float:
        return sum(op.seconds for op in self.ops.values())


class TrafficCounter(TorchDispatchMode):
    """Counts bytes, FLOPs and roofline time of every op run under it (see the module docstring)."""

    def __init__(self, tflops: float = TFLOPS, bandwidth_gbs: float = BANDWIDTH_GBS,
                 key: Callable[[torch._ops.OpOverload, list[torch.Tensor], list[torch.Tensor]], str] | None = None
                 ) -> None:
        super().__init__()
        self.flop_rate, self.byte_rate = tflops * 1e12, bandwidth_gbs * 1e9
        self.key = key or (lambda func, _inputs, _outputs: str(func.overloadpacket))
        self.traffic = Traffic()
        self.phase = "forward"  # outside autograd's backward; count_step sets "optimizer" for the SGD step

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _FREE or is_view(func):
            return out
        inputs = _unique_tensors((args, kwargs))
        written = [(i, a.name) for i, a in enumerate(func._schema.arguments)
                   if a.alias_info is not None and a.alias_info.is_write]
        mutated = [kwargs[name] if name in kwargs else args[i] for i, name in written
                   if name in kwargs or i < len(args)]
        outputs = _unique_tensors((out, mutated))
        if not outputs:  # metadata queries (prim.device, sym_size, ...): nothing written
            return out
        if func in _OVERWRITE or any(name == "out" for _, name in written):
            overwritten = {id(t) for t in _unique_tensors(mutated)}
            inputs = [t for t in inputs if id(t) not in overwritten]
        nbytes = sum(map(tensor_bytes, inputs)) + sum(map(tensor_bytes, outputs))
        formula = flop_registry.get(func.overloadpacket)
        flops = int(formula(*args, **kwargs, out_val=out)) if formula is not None else 0
        name = self.key(func, inputs, outputs)
        phase = "backward" if torch._C._current_graph_task_id() != -1 else self.phase
        for total in (self.traffic.ops.setdefault(name, OpTotal()),
                      self.traffic.passes.setdefault((phase, name), OpTotal())):
            total.calls += 1
            total.bytes += nbytes
            total.flops += flops
            total.seconds += max(flops / self.flop_rate, nbytes / self.byte_rate)
        return out


def build_model(name: str) -> nn.Module:
    """A model `models.create_model` knows, else a timm model; an unknown name is a UserError."""
    import timm

    from models import create_model, list_models

    if name in list_models():
        return create_model(name)
    if timm.is_model(name):
        return timm.create_model(name)
    raise UserError(f"unknown model '{name}': neither models.create_model ({', '.join(list_models())}) "
                    "nor timm knows it")


def _to_channels_last(model: nn.Module) -> None:
    """model.to(memory_format=channels_last) for fake parameters (nn.Module.to cannot swap fake tensors)."""
    for module in model.modules():
        for key, p in module._parameters.items():
            if p is not None and p.dim() == 4:
                module._parameters[key] = nn.Parameter(p.detach().contiguous(memory_format=torch.channels_last),
                                                       requires_grad=p.requires_grad)


def count_step(model: str | Callable[[], nn.Module], batch_size: int, image_size: int, amp: str = "off",
               channels_last: bool = False, tflops: float = TFLOPS, bandwidth_gbs: float = BANDWIDTH_GBS,
               key: Callable | None = None) -> Traffic:
    """What one SGD training step of `model` (a name, or a factory) moves and computes, on fake tensors."""
    if amp not in AMP_DTYPES:
        raise UserError(f"--amp {amp}: must be one of {', '.join(AMP_DTYPES)}")
    dtype = AMP_DTYPES[amp]
    counter = TrafficCounter(tflops, bandwidth_gbs, key)
    with FakeTensorMode(), torch.device("cpu"):
        net = (build_model(model) if isinstance(model, str) else model()).train()
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            _to_channels_last(net)
        images = torch.randn(batch_size, 3, image_size, image_size).contiguous(memory_format=fmt)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, foreach=True)
        labels = None
        for counted in (False, True):
            with counter if counted else contextlib.nullcontext():
                counter.phase = "forward"
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext():
                    logits = net(images)
                    if labels is None:
                        labels = torch.randint(0, logits.shape[1], (batch_size,))
                    loss = F.cross_entropy(logits, labels)
                loss.backward()
                counter.phase = "optimizer"
                optimizer.step()
    return counter.traffic


def describe(name: str, traffic: Traffic, top: int) -> str:
    """Totals of one model's step and its `top` ops by roofline time."""
    lines = [f"{name}: {traffic.calls} ATen calls, {traffic.flops / 1e12:.2f} TFLOP, {traffic.bytes / 1e9:.1f} GB "
             f"per step, roofline {traffic.seconds * 1e3:.1f} ms"]
    if top:
        lines.append(f"  {'op':<40} {'calls':>6} {'GB':>8} {'TFLOP':>7} {'ms':>7}")
    ranked = sorted(traffic.ops.items(), key=lambda kv: kv[1].seconds, reverse=True)
    for op, t in ranked[:top]:
        lines.append(f"  {op:<40} {t.calls:6d} {t.bytes / 1e9:8.2f} {t.flops / 1e12:7.3f} {t.seconds * 1e3:7.2f}")
    return "\n".join(lines)


def differences(model: Traffic, baseline: Traffic, top: int) -> str:
    """The `top` (pass, op) pairs by how many more bytes the model moves than the baseline."""
    keys = set(model.passes) | set(baseline.passes)
    empty = OpTotal()

    def extra(key: tuple[str, str]) -> int:
        return model.passes.get(key, empty).bytes - baseline.passes.get(key, empty).bytes

    lines = [f"  {'pass':<9} {'op':<40} {'calls':>13} {'GB':>15} {'extra GB':>9}"]
    for key in sorted(keys, key=lambda k: abs(extra(k)), reverse=True)[:top]:
        m, b = model.passes.get(key, empty), baseline.passes.get(key, empty)
        lines.append(f"  {key[0]:<9} {key[1]:<40} {m.calls:6d} /{b.calls:6d} {m.bytes / 1e9:7.2f} /"
                     f"{b.bytes / 1e9:7.2f} {extra(key) / 1e9:9.2f}")
    return "\n".join(lines)


def _figure(value: float) -> float:
    """Four significant digits: 150.9 GB for a full-size step, still exact enough for a tiny model's."""
    return float(f"{value:.4g}")


def compare(model: str, baseline: str, batch_size: int = 256, image_size: int = 224, amp: str = "bf16",
            channels_last: bool = True, tflops: float = TFLOPS, bandwidth_gbs: float = BANDWIDTH_GBS,
            top: int | None = None, diff: int = 0) -> dict:
    """Both models' step counts (printed, with `top` ops each, unless `top` is None) and the summary JSON."""
    counts = {}
    for name in (model, baseline):
        counts[name] = count_step(name, batch_size, image_size, amp, channels_last, tflops, bandwidth_gbs)
        if top is not None:
            print(describe(name, counts[name], top), flush=True)
    m, b = counts[model], counts[baseline]
    if diff:
        print(f"{model} against {baseline}: the {diff} (pass, op) pairs whose bytes differ most "
              "(model / baseline)", flush=True)
        print(differences(m, b, diff), flush=True)
    return {"model": model, "baseline": baseline,
            "model_gb": _figure(m.bytes / 1e9), "baseline_gb": _figure(b.bytes / 1e9),
            "model_tflop": _figure(m.flops / 1e12), "baseline_tflop": _figure(b.flops / 1e12),
            "traffic_ratio": round(m.bytes / b.bytes, 4), "roofline_ratio": round(b.seconds / m.seconds, 4)}


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are a UserError: one line and exit 2 through training.cli.run_main."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see {self.prog} --help)")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = _Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lip_resnet50", help="a models.create_model or timm model name")
    parser.add_argument("--baseline", default="resnet50", help="the model to compare against")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--amp", default="bf16", choices=tuple(AMP_DTYPES),
                        help="autocast dtype of the forward (default bf16)")
    layout = parser.add_mutually_exclusive_group()
    layout.add_argument("--channels-last", dest="channels_last", action="store_true", default=True,
                        help="channels_last weights and batch (the default)")
    layout.add_argument("--nchw", dest="channels_last", action="store_false", help="contiguous NCHW instead")
    parser.add_argument("--tflops", type=float, default=TFLOPS,
                        help=f"FLOP rate in TFLOP/s (default {TFLOPS:g}: a round, conservative figure for an "
                        "H100/H200-class GPU's dense bf16 tensor cores, whose spec-sheet peak is ~990)")
    parser.add_argument("--bandwidth", type=float, default=BANDWIDTH_GBS,
                        help=f"memory bandwidth in GB/s (default {BANDWIDTH_GBS:g}: a round figure for an "
                        "H100/H200-class GPU's HBM, 3.35 TB/s on an H100 SXM, 4.8 on an H200)")
    parser.add_argument("--top", type=int, default=12, help="ops to list per model, by roofline time")
    parser.add_argument("--diff", type=int, default=0, metavar="N", help="also list the N (pass, op) pairs whose "
                        "bytes differ most between the two models")
    args = parser.parse_args(argv)
    for flag in ("batch_size", "image_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.tflops <= 0 or args.bandwidth <= 0:
        parser.error("--tflops and --bandwidth must be > 0")
    if args.top < 0 or args.diff < 0:
        parser.error("--top and --diff must be >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    print(f"one training step, batch {args.batch_size} at {args.image_size} px, amp {args.amp}, "
          f"{'channels_last' if args.channels_last else 'NCHW'}; roofline at {args.tflops:g} TFLOP/s and "
          f"{args.bandwidth:g} GB/s (counted on fake tensors on the CPU)", flush=True)
    summary = compare(args.model, args.baseline, args.batch_size, args.image_size, args.amp, args.channels_last,
                      args.tflops, args.bandwidth, args.top, args.diff)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    from training.cli import run_main
    from training.logger import RunLog

    log = RunLog(0, 1)
    run_main(lambda: main(), log)
