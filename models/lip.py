"""The LIP pooling operator: a softmax-weighted average of x over each pooling window.

    out = avg_pool(x * exp(logit)) / avg_pool(exp(logit))      (zero padding adds no weight)

`lip2d` and `gated_lip2d` (logit = coeff * sigmoid(z), fused) are autograd Functions that keep only x, the
logit (or z) and output-sized tensors for backward and recompute exp there, so a LIP layer costs no more
activation memory than its inputs. On the CPU a fused C++ kernel (models/csrc/lip_cpu.cpp, built by
`make setup` / `python scripts/build_ext.py`) does one pass per direction; elsewhere, or when it is not
built, an exact pure-PyTorch path runs. `LIP_BACKEND=torch` forces that path on the CPU.

Dtypes: the math runs in float32 (float64 when an input is float64) whatever the inputs, so fp16/bf16 and
autocast are safe: logits up to 12 give exp(12) > fp16 max only in the internal float32. The output has
dtype `torch.promote_types(x.dtype, logit.dtype)`, what the plain formula gives in eager mode (bf16 x and
fp32 logit under autocast give fp32), and x's memory format.

Large logits: logits are used unshifted while every logit of an (n, c) plane lies in a safe range
(float32: [-60, 40]); such planes round like the plain formula. A plane outside it is computed with each
window's maximum logit subtracted before exp, so e.g. logit = 100 * x stays finite and tends to max
pooling instead of overflowing. (The pure-PyTorch path checks for such planes with one host sync per forward.)

Not supported: double backward (the backward is itself a fused kernel). Under torch.compile both functions
run eagerly (a graph break), as the kernel is opaque and the range check is data-dependent.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["lip2d", "gated_lip2d", "lip_backend", "extension_spec", "ExtensionSpec"]

_REPO = Path(__file__).resolve().parents[1]
_SOURCES = (Path(__file__).resolve().parent / "csrc" / "lip_cpu.cpp",)
_CFLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno")
_LDFLAGS = ("-fopenmp",)
# Logit range (per plane) in which unshifted exp(logit) can neither overflow a window sum nor underflow a
# whole window; the C++ kernel uses the same bounds.
_SAFE_RANGE = {torch.float32: (-60.0, 40.0), torch.float64: (-500.0, 300.0)}


@dataclass(frozen=True)
class ExtensionSpec:
    """Where the C++ kernel for this CPU, source, torch and Python is built and how."""

    name: str
    build_dir: Path
    sources: tuple[Path, ...]
    cflags: tuple[str, ...]
    ldflags: tuple[str, ...]

    @property
    def library(self) -> Path:
        return self.build_dir / f"{self.name}.so"

    def stale_builds(self) -> list[Path]:
        """Older builds for this CPU type (builds for other CPUs sharing the checkout are kept)."""
        prefix = self.name.rsplit("_", 1)[0] + "_"
        return [d for d in self.build_dir.parent.glob(prefix + "*") if d.is_dir() and d != self.build_dir]


def _cpu_flags() -> str:
    """The CPU feature flags: a build with -march=native is only valid on a CPU with the same ones."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def extension_spec() -> ExtensionSpec:
    """Named lip_cpu_<cpu key>_<build key>: the CPU's flags, then sources, flags, torch and Python versions."""
    cpu = hashlib.sha256(f"{platform.machine()}\0{_cpu_flags()}".encode()).hexdigest()[:8]
    digest = hashlib.sha256()
    for src in _SOURCES:
        digest.update(src.read_bytes())
    for part in (*_CFLAGS, *_LDFLAGS, torch.__version__, sys.version):
        digest.update(part.encode() + b"\0")
    name = f"lip_cpu_{cpu}_{digest.hexdigest()[:12]}"
    return ExtensionSpec(name, _REPO / "build" / "lip_ext" / name, _SOURCES, _CFLAGS, _LDFLAGS)


@functools.cache
def _extension() -> tuple[Any, str]:
    """The prebuilt kernel's op namespace (torch.ops.<name>) if built for this CPU and source; never compiles."""
    try:
        spec = extension_spec()
    except OSError as exc:
        return None, f"cannot read the C++ sources ({exc})"
    if not spec.library.is_file():
        return None, f"no build at {spec.library.relative_to(_REPO)}"
    try:
        torch.ops.load_library(str(spec.library))
        ops = getattr(torch.ops, spec.name)
        ops.forward, ops.backward  # noqa: B018 (resolve both now, so a broken build falls back here)
    except (OSError, RuntimeError, AttributeError) as exc:
        return None, f"cannot load {spec.library} ({exc})"
    return ops, "loaded"


_warned_fallback = False


def _cpp_module() -> Any:
    """The C++ kernel ops to use on the CPU, or None for the pure-PyTorch path."""
    global _warned_fallback
    choice = os.environ.get("LIP_BACKEND", "auto")
    if choice not in ("auto", "cpp", "torch"):
        raise ValueError(f"LIP_BACKEND must be 'auto', 'cpp' or 'torch', got {choice!r}")
    if choice == "torch":
        return None
    module, reason = _extension()
    if module is None:
        if choice == "cpp":
            raise RuntimeError(f"LIP_BACKEND=cpp but the C++ LIP kernel is unavailable: {reason}; "
                               "build it with `python scripts/build_ext.py`")
        if not _warned_fallback:
            _warned_fallback = True
            warnings.warn(f"models.lip: C++ LIP kernel unavailable ({reason}); using the slower pure-PyTorch "
                          "path. Build it with `make setup` or `python scripts/build_ext.py`.", stacklevel=3)
    return module


def lip_backend() -> str:
    """Which implementation runs on the CPU: "cpp" (fused kernel) or "torch" (pure PyTorch)."""
    return "cpp" if _cpp_module() is not None else "torch"


# ----------------------------------------------------------------------------------------------------------
# Pure-PyTorch path: any device, exact, memory-light (exp recomputed in backward).


def _window_sums(v: torch.Tensor, k: int, s: int, p: int) -> torch.Tensor:
    return F.avg_pool2d(v, k, s, p, ceil_mode=False, count_include_pad=True, divisor_override=1)


def _spread(v: torch.Tensor, like: torch.Tensor, k: int, s: int, p: int) -> torch.Tensor:
    """Adjoint of _window_sums: every input gathers the values of the windows it lies in."""
    return torch.ops.aten.avg_pool2d_backward(v, like, [k, k], [s, s], [p, p], False, True, 1)


def _gate(z: torch.Tensor, coeff: float) -> tuple[torch.Tensor, torch.Tensor]:
    """s = coeff * sigmoid(z) and ds/dz."""
    sig = torch.sigmoid(z)
    return coeff * sig, coeff * sig * (1 - sig)


def _outside_planes(s: torch.Tensor) -> torch.Tensor:
    """(N, C) flags: planes with a logit outside the safe range (NaN logits just propagate)."""
    lo, hi = _SAFE_RANGE[s.dtype]
    planes = s.flatten(2)
    return (planes.amin(2) < lo) | (planes.amax(2) > hi)


def _unfold_planes(x: torch.Tensor, s: torch.Tensor, k: int, st: int, p: int):
    """Windows of the selected planes as columns; padding gets logit -inf (weight 0)."""
    xu = F.unfold(x.unsqueeze(1), k, padding=p, stride=st)
    su = F.unfold(F.pad(s.unsqueeze(1), (p, p, p, p), value=float("-inf")), k, stride=st)
    m = su.amax(1, keepdim=True)
    return xu, torch.exp(su - m)


def _torch_forward(x: torch.Tensor, s: torch.Tensor, k: int, st: int, p: int):
    """(out, D, robust planes, whether any plane is robust); D is relative to the window max there."""
    w = torch.exp(s)
    den = _window_sums(w, k, st, p)
    out = _window_sums(x * w, k, st, p) / den
    robust = _outside_planes(s)
    any_robust = bool(robust.any())
    if any_robust:
        planes = robust.flatten().nonzero().squeeze(1)
        xs, ss = (v.flatten(0, 1).index_select(0, planes) for v in (x, s))
        xu, wu = _unfold_planes(xs, ss, k, st, p)
        den_r = wu.sum(1)
        out_r = (xu * wu).sum(1) / den_r
        shape = (-1, *out.shape[2:])
        out = out.flatten(0, 1).index_copy(0, planes, out_r.view(shape)).view_as(out)
        den = den.flatten(0, 1).index_copy(0, planes, den_r.view(shape)).view_as(den)
    return out, den, robust, any_robust


def _torch_backward(x: torch.Tensor, s: torch.Tensor, g: torch.Tensor, out: torch.Tensor, den: torch.Tensor,
                    robust: torch.Tensor | None, k: int, st: int, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dx, dL/ds); robust is None when no plane needs the max-shifted path."""
    a = g / den
    b = a * out
    w = torch.exp(s)
    big_a = _spread(a, x, k, st, p)
    dx = w * big_a
    ds = w * (x * big_a - _spread(b, x, k, st, p))
    if robust is not None:
        planes = robust.flatten().nonzero().squeeze(1)
        xs, ss = (v.flatten(0, 1).index_select(0, planes) for v in (x, s))
        ar, br = (v.flatten(0, 1).index_select(0, planes).flatten(1).unsqueeze(1) for v in (a, b))
        xu, wu = _unfold_planes(xs, ss, k, st, p)
        size = tuple(x.shape[2:])
        dx_r = F.fold(wu * ar, size, k, padding=p, stride=st).squeeze(1)
        ds_r = F.fold(wu * (xu * ar - br), size, k, padding=p, stride=st).squeeze(1)
        dx = dx.flatten(0, 1).index_copy(0, planes, dx_r).view_as(x)
        ds = ds.flatten(0, 1).index_copy(0, planes, ds_r).view_as(x)
    return dx, ds


# ----------------------------------------------------------------------------------------------------------


def _is_channels_last(t: torch.Tensor) -> bool:
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _like(v: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """v in ref's memory format (NCHW or channels_last) and dtype (unless given); no copy if it is already."""
    fmt = torch.channels_last if _is_channels_last(ref) else torch.contiguous_format
    return v.to(dtype=dtype or ref.dtype).contiguous(memory_format=fmt)


class _LIPFunction(torch.autograd.Function):
    """LIP forward/backward; saves x, the logit (or z), out, the window sums D and a per-plane flag."""

    @staticmethod
    def forward(ctx, x, t, coeff, gated, k, st, p):
        compute = torch.float64 if torch.float64 in (x.dtype, t.dtype) else torch.float32
        out_dtype = torch.promote_types(x.dtype, t.dtype)
        cpp = _cpp_module() if x.device.type == "cpu" else None
        nhwc = _is_channels_last(x)
        with torch.autocast(x.device.type, enabled=False):
            xc, tc = x.to(compute), t.to(compute)
            if cpp is not None:
                fmt = torch.channels_last if nhwc else torch.contiguous_format
                out, den, robust = cpp.forward(xc.contiguous(memory_format=fmt), tc.contiguous(memory_format=fmt),
                                               coeff, gated, k, st, p, nhwc)
                any_robust = True  # unused: the kernel reads the flags itself
            else:
                s = coeff * torch.sigmoid(tc) if gated else tc
                out, den, robust, any_robust = _torch_forward(xc, s, k, st, p)
        ctx.params = (coeff, gated, k, st, p, nhwc, any_robust)
        ctx.use_cpp = cpp is not None
        ctx.save_for_backward(x, t, out, den, robust)
        return _like(out, x, out_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, t, out, den, robust = ctx.saved_tensors
        coeff, gated, k, st, p, nhwc, any_robust = ctx.params
        with torch.autocast(x.device.type, enabled=False):
            xc, tc, g = x.to(out.dtype), t.to(out.dtype), grad.to(out.dtype)
            if ctx.use_cpp:
                fmt = torch.channels_last if nhwc else torch.contiguous_format
                xc, tc, g = (v.contiguous(memory_format=fmt) for v in (xc, tc, g))
                dx, dt = _extension()[0].backward(xc, tc, g, out, den, robust, coeff, gated, k, st, p, nhwc)
            else:
                s, slope = _gate(tc, coeff) if gated else (tc, None)
                dx, dt = _torch_backward(xc, s, g, out, den, robust if any_robust else None, k, st, p)
                if slope is not None:
                    dt = dt * slope
        grad_x = _like(dx, x) if ctx.needs_input_grad[0] else None
        grad_t = _like(dt, t) if ctx.needs_input_grad[1] else None
        return grad_x, grad_t, None, None, None, None, None


def _check(name: str, x: torch.Tensor, t: torch.Tensor, k: int, st: int, p: int) -> None:
    if x.dim() != 4 or x.shape != t.shape:
        raise ValueError(f"{name}: x and logit must be 4-D (N, C, H, W) of one shape, got "
                         f"{tuple(x.shape)} and {tuple(t.shape)}")
    if x.device != t.device:
        raise ValueError(f"{name}: x and logit must be on one device, got {x.device} and {t.device}")
    if not (x.is_floating_point() and t.is_floating_point()):
        raise TypeError(f"{name}: x and logit must be floating point, got {x.dtype} and {t.dtype}")
    if not all(isinstance(v, int) for v in (k, st, p)) or k < 1 or st < 1 or p < 0 or 2 * p > k:
        raise ValueError(f"{name}: need integers kernel_size >= 1, stride >= 1 and "
                         f"0 <= padding <= kernel_size / 2, got {k}, {st}, {p}")
    if min(x.shape[2:]) + 2 * p < k:
        raise ValueError(f"{name}: input {tuple(x.shape[2:])} is smaller than kernel_size {k} "
                         f"with padding {p}")


@torch.compiler.disable  # opaque kernel and a data-dependent branch: torch.compile runs it eagerly
def lip2d(x: torch.Tensor, logit: torch.Tensor, kernel_size: int = 3, stride: int = 2,
          padding: int = 1) -> torch.Tensor:
    """LIP pooling of x weighted by exp(logit); output size as F.avg_pool2d (ceil_mode=False)."""
    _check("lip2d", x, logit, kernel_size, stride, padding)
    return _LIPFunction.apply(x, logit, 0.0, False, kernel_size, stride, padding)


@torch.compiler.disable
def gated_lip2d(x: torch.Tensor, z: torch.Tensor, coeff: float = 12.0, kernel_size: int = 3, stride: int = 2,
                padding: int = 1) -> torch.Tensor:
    """lip2d(x, coeff * sigmoid(z)) with the gate fused: backward keeps z, not the gated logit."""
    _check("gated_lip2d", x, z, kernel_size, stride, padding)
    return _LIPFunction.apply(x, z, float(coeff), True, kernel_size, stride, padding)
