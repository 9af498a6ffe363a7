"""The LIP pooling operator: a softmax-weighted average of x over each pooling window.

    out = avg_pool(x * exp(logit)) / avg_pool(exp(logit))      (zero padding adds no weight)

`lip2d` and `gated_lip2d` (logit = coeff * sigmoid(z), fused) call the custom ops `torch.ops.lip.forward` and
`torch.ops.lip.backward`, which have fake (meta) implementations and registered autograd: torch.compile
traces a LIP network forward and backward without a graph break, torch.export keeps the op in its graph
(`export_decompositions()` turns it into plain ATen ops, e.g. for ONNX), and a CUDA step can be captured in a
CUDA graph. Backward keeps only x, the logit (or z) and output-sized tensors and recomputes exp, so a LIP
layer costs no more activation memory than its inputs.

Implementations (`lip_backend(device)`, chosen by LIP_BACKEND = auto | cpp | triton | torch):
- cpp: a fused C++ kernel (models/csrc/lip_cpu.cpp, built by `make setup` / `python scripts/build_ext.py`),
  one pass per direction; the default on the CPU.
- triton: fused Triton kernels (models/lip_triton.py), one launch per direction, NCHW or channels_last read
  in place; the default on CUDA. With TRITON_INTERPRET=1 set before import they run on CPU tensors.
- torch: the exact pure-PyTorch path; any device, and the fallback when a kernel is unavailable.

Dtypes: the math runs in float32 (float64 when an input is float64) whatever the inputs, so fp16/bf16 and
autocast are safe: logits up to 12 give exp(12) > fp16 max only in the internal float32. The output has
dtype `torch.promote_types(x.dtype, logit.dtype)`, what the plain formula gives in eager mode (bf16 x and
fp32 logit under autocast give fp32), and x's memory format; the gradients have their input's dtype and
memory format.

Large logits: a window whose logits could overflow exp or underflow as a whole is computed with its maximum
logit subtracted before exp, so e.g. logit = 100 * x stays finite and tends to max pooling. The kernels decide
this on the device (triton: every window of lip2d; cpp: per (n, c) plane, outside [-60, 40] in float32), never
on the host. The gated logit lies in [0, coeff] by construction, so for it the choice is static. Only the
pure-PyTorch path checks the range of lip2d's logits with a host sync.

Not supported: double backward (the backward is itself a fused kernel).
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any

import torch
import torch.nn.functional as F

from .lip_extension import load_ops

__all__ = ["lip2d", "gated_lip2d", "norm_gated_lip2d", "plane_affine", "lip_backend", "export_decompositions"]

Tensor = torch.Tensor
_BACKENDS = ("auto", "cpp", "triton", "torch")
# Logit range (per plane) in which unshifted exp(logit) can neither overflow a window sum nor underflow a
# whole window; the C++ kernel uses the same bounds.
_SAFE_RANGE = {torch.float32: (-60.0, 40.0), torch.float64: (-500.0, 300.0)}
_MAX_TRITON_NUMEL = 2**31 - 1  # the kernels index with int32


@functools.cache
def _extension() -> tuple[Any, str]:
    """The prebuilt C++ kernel's op namespace if built for this CPU and source; never compiles."""
    return load_ops()


@functools.cache
def _triton() -> tuple[Any, str]:
    """models.lip_triton if triton imports; TRITON_INTERPRET is read by triton at this import."""
    try:
        from . import lip_triton
    except ImportError as exc:
        return None, f"cannot import triton ({exc})"
    return lip_triton, "loaded"


_warned: set[str] = set()


def _fallback(kernel: str, reason: str, hint: str) -> str:
    if kernel not in _warned:
        _warned.add(kernel)
        warnings.warn(f"models.lip: {kernel} LIP kernel unavailable ({reason}); using the slower pure-PyTorch "
                      f"path. {hint}", stacklevel=4)
    return "torch"


def lip_backend(device: str | torch.device = "cpu") -> str:
    """Which implementation runs on `device`: "cpp", "triton" or "torch" (LIP_BACKEND, default "auto").

    auto: cpp on the CPU and triton on CUDA when available (else torch, with one warning); torch elsewhere.
    A forced cpp or triton that cannot run on `device` is an error, not a silent fallback.
    """
    kind = torch.device(device).type
    choice = os.environ.get("LIP_BACKEND", "auto")
    if choice not in _BACKENDS:
        raise ValueError(f"LIP_BACKEND must be one of {', '.join(_BACKENDS)}, got {choice!r}")
    if choice == "torch" or (choice == "auto" and kind not in ("cpu", "cuda")):
        return "torch"
    if choice == "cpp" or (choice == "auto" and kind == "cpu"):
        if kind != "cpu":
            raise RuntimeError(f"LIP_BACKEND=cpp but the C++ LIP kernel runs on the CPU only, not on {kind}")
        module, reason = _extension()
        if module is not None:
            return "cpp"
        if choice == "cpp":
            raise RuntimeError(f"LIP_BACKEND=cpp but the C++ LIP kernel is unavailable: {reason}; "
                               "build it with `python scripts/build_ext.py`")
        return _fallback("C++", reason, "Build it with `make setup` or `python scripts/build_ext.py`.")
    if kind == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("LIP_BACKEND=triton on the CPU needs TRITON_INTERPRET=1, set before models.lip_triton "
                           "is imported (Triton's interpreter)")
    if kind not in ("cpu", "cuda"):
        raise RuntimeError(f"LIP_BACKEND=triton but the Triton LIP kernels run on CUDA only, not on {kind}")
    module, reason = _triton()
    if module is not None:
        return "triton"
    if choice == "triton":
        raise RuntimeError(f"LIP_BACKEND=triton but the Triton LIP kernels are unavailable: {reason}")
    return _fallback("Triton", reason, "Install triton for the fused CUDA kernels.")


def _kernel_for(x: Tensor) -> str:
    backend = lip_backend(x.device)
    if backend == "triton" and x.numel() > _MAX_TRITON_NUMEL:
        return "torch"
    return backend


# ----------------------------------------------------------------------------------------------------------
# Pure-PyTorch path: any device, exact, memory-light (exp recomputed in backward).


def _window_sums(v: torch.Tensor, k: int, s: int, p: int) -> torch.Tensor:
    return F.avg_pool2d(v, k, s, p, ceil_mode=False, count_include_pad=True, divisor_override=1)


def _spread(v: torch.Tensor, like: torch.Tensor, k: int, s: int, p: int) -> torch.Tensor:
    """Adjoint of _window_sums: every input gathers the values of the windows it lies in.

    CUDA's channels_last avg_pool2d backward ignores the padding in some torch versions (silently wrong,
    https://github.com/pytorch/pytorch/issues/188344), so on CUDA with padding it runs on NCHW tensors.
    """
    if v.is_cuda and p > 0:
        v, like = v.contiguous(), like.contiguous()
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


def _torch_forward(x: torch.Tensor, s: torch.Tensor, k: int, st: int, p: int, check: bool):
    """(out, D, robust planes); D is relative to the window max there. Without check no plane is robust."""
    w = torch.exp(s)
    den = _window_sums(w, k, st, p)
    out = _window_sums(x * w, k, st, p) / den
    if not check:
        return out, den, torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
    robust = _outside_planes(s)
    if bool(robust.any()):  # a host sync: the pure-PyTorch path only
        planes = robust.flatten().nonzero().squeeze(1)
        xs, ss = (v.flatten(0, 1).index_select(0, planes) for v in (x, s))
        xu, wu = _unfold_planes(xs, ss, k, st, p)
        den_r = wu.sum(1)
        out_r = (xu * wu).sum(1) / den_r
        shape = (-1, *out.shape[2:])
        out = out.flatten(0, 1).index_copy(0, planes, out_r.view(shape)).view_as(out)
        den = den.flatten(0, 1).index_copy(0, planes, den_r.view(shape)).view_as(den)
    return out, den, robust


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



def _is_channels_last(t: Tensor) -> bool:
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _format(t: Tensor) -> torch.memory_format:
    return torch.channels_last if _is_channels_last(t) else torch.contiguous_format


def _like(v: Tensor, ref: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """v in ref's memory format (NCHW or channels_last) and dtype (unless given); no copy if it is already."""
    return v.to(dtype=dtype or ref.dtype).contiguous(memory_format=_format(ref))


def _dtypes(x: Tensor, t: Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(compute dtype, output dtype)."""
    compute = torch.float64 if torch.float64 in (x.dtype, t.dtype) else torch.float32
    return compute, torch.promote_types(x.dtype, t.dtype)


def _gate_in_range(coeff: float, compute: torch.dtype) -> bool:
    """Whether coeff * sigmoid(z), which lies between 0 and coeff, is always within the safe range."""
    lo, hi = _SAFE_RANGE[compute]
    return lo <= min(coeff, 0.0) and max(coeff, 0.0) <= hi


def _out_shape(x: Tensor, k: int, s: int, p: int) -> tuple[int, int, int, int]:
    n, c, h, w = x.shape
    return n, c, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1


# ----------------------------------------------------------------------------------------------------------
# The custom ops. forward returns (out, out_exact, state, aux), all but aux in x's memory format:
#   out        the result, in the output dtype;
#   out_exact  out in the compute dtype when the output dtype is narrower (backward needs x - out without
#              the output's rounding), else an empty tensor (backward reads out); triton with the window
#              shift in float32: out in float64 (where one weight dominates a window x - out is far below
#              out's float32 rounding);
#   state      output-sized, compute dtype: the window's sum D of exp(logit - shift) (triton: log D);
#   aux        cpp/torch: (N, C) bool, the planes shifted by their window maxima (else unshifted);
#              triton: the window maxima (compute dtype), or an empty tensor where the shift is statically 0.
#              Its dtype is how backward tells the two kinds of state apart.


def _affine(t: Tensor, scale: Tensor | None, shift: Tensor | None) -> Tensor:
    """t * scale + shift per (n, c) plane, or t itself."""
    if scale is None or shift is None:
        return t
    return torch.addcmul(shift[:, :, None, None], t, scale[:, :, None, None])


def _planes(v: Tensor | None, x: Tensor, compute: torch.dtype) -> Tensor | None:
    """A per-(N, C) tensor contiguous in the compute dtype (what the kernels read)."""
    return None if v is None else v.to(compute).reshape(x.shape[:2]).contiguous()


@torch.library.custom_op("lip::forward", mutates_args=())
def _forward_op(x: Tensor, t: Tensor, coeff: float, gated: bool, kernel_size: int, stride: int,
                padding: int, scale: Tensor | None = None,
                shift: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    k, s, p = kernel_size, stride, padding
    compute, out_dtype = _dtypes(x, t)
    nhwc = _is_channels_last(x)
    static = gated and _gate_in_range(coeff, compute)  # no window can need the shift
    kernel = _kernel_for(x)
    scale, shift = _planes(scale, x, compute), _planes(shift, x, compute)
    with torch.autocast(x.device.type, enabled=False):
        if kernel == "triton":
            out, out_exact, log_den, wmax = _triton()[0].forward(x, t, coeff, gated, not static, k, s, p, out_dtype,
                                                                 compute, nhwc, scale, shift)
            empty = x.new_empty((0,), dtype=compute)
            return out, empty if out_exact is None else out_exact, log_den, empty.clone() if wmax is None else wmax
        xc, tc = x.to(compute), t.to(compute)
        if kernel == "cpp":
            fmt = _format(x)
            out, den, aux = _extension()[0].forward(xc.contiguous(memory_format=fmt),
                                                    tc.contiguous(memory_format=fmt), coeff, gated, k, s, p, nhwc,
                                                    scale, shift)
        else:
            logit = _affine(tc, scale, shift)
            logit = coeff * torch.sigmoid(logit) if gated else logit
            out, den, aux = _torch_forward(xc, logit, k, s, p, check=not static)
    out_exact = x.new_empty((0,), dtype=compute) if out_dtype == compute else _like(out, x, compute)
    return _like(out, x, out_dtype), out_exact, _like(den, x, compute), aux


@_forward_op.register_fake
def _forward_fake(x, t, coeff, gated, kernel_size, stride, padding, scale=None, shift=None):
    compute, out_dtype = _dtypes(x, t)
    shape, fmt = _out_shape(x, kernel_size, stride, padding), _format(x)
    out = torch.empty(shape, dtype=out_dtype, device=x.device, memory_format=fmt)
    static = gated and _gate_in_range(coeff, compute)
    triton = _kernel_for(x) == "triton"
    precise = triton and not static and compute == torch.float32  # Triton keeps out in float64 there
    exact = (0,) if out_dtype == compute and not precise else shape
    out_exact = torch.empty(exact, dtype=torch.float64 if precise else compute, device=x.device,
                            memory_format=fmt if len(exact) == 4 else torch.contiguous_format)
    state = torch.empty(shape, dtype=compute, device=x.device, memory_format=fmt)
    if triton:
        aux = x.new_empty((0,), dtype=compute) if static else torch.empty_like(state)
    else:
        aux = x.new_empty(shape[:2], dtype=torch.bool)
    return out, out_exact, state, aux


@torch.library.custom_op("lip::backward", mutates_args=())
def _backward_op(grad: Tensor, x: Tensor, t: Tensor, out: Tensor, out_exact: Tensor, state: Tensor, aux: Tensor,
                 coeff: float, gated: bool, kernel_size: int, stride: int, padding: int,
                 scale: Tensor | None = None,
                 shift: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dL/dx, dL/dt, dL/dscale, dL/dshift); the last two are empty without scale and shift.

    With them, dL/dt = dz * scale for the pre-gate logit z = t * scale + shift, and the per-plane sums
    dL/dscale = sum(dz * t), dL/dshift = sum(dz) come from the same pass: dz is never a tensor.
    """
    k, s, p = kernel_size, stride, padding
    compute = state.dtype
    out = out_exact if out_exact.numel() else out
    scale, shift = _planes(scale, x, compute), _planes(shift, x, compute)
    empty = x.new_empty((0,), dtype=compute)
    with torch.autocast(x.device.type, enabled=False):
        if aux.dtype != torch.bool:
            module, reason = _triton()
            if module is None:
                raise RuntimeError(f"lip: backward of a Triton forward needs triton: {reason}")
            dx, dt, dscale, dshift = module.backward(grad, x, t, out, state, aux if aux.numel() else None, coeff,
                                                     gated, k, s, p, _format(x), _format(t), _is_channels_last(x),
                                                     scale, shift)
            return dx, dt, empty if dscale is None else dscale, empty.clone() if dshift is None else dshift
        xc, tc, g, out = x.to(compute), t.to(compute), grad.to(compute), out.to(compute)
        if _kernel_for(x) == "cpp":
            fmt = _format(x)
            xc, tc, g, out, state = (v.contiguous(memory_format=fmt) for v in (xc, tc, g, out, state))
            dx, dt, *sums = _extension()[0].backward(xc, tc, g, out, state, aux, coeff, gated, k, s, p,
                                                     fmt == torch.channels_last, scale, shift)
            dscale, dshift = sums if scale is not None else (empty, empty.clone())
        else:
            logit = _affine(tc, scale, shift)
            logit, slope = _gate(logit, coeff) if gated else (logit, None)
            static = gated and _gate_in_range(coeff, compute)
            robust = None if static or not bool(aux.any()) else aux
            dx, dt = _torch_backward(xc, logit, g, out, state, robust, k, s, p)
            if slope is not None:
                dt = dt * slope
            dscale, dshift = empty, empty.clone()
            if scale is not None:
                dscale, dshift = (dt * tc).sum((2, 3)), dt.sum((2, 3))
                dt = dt * scale[:, :, None, None]
    return _like(dx, x), _like(dt, t), dscale, dshift


@_backward_op.register_fake
def _backward_fake(grad, x, t, out, out_exact, state, aux, coeff, gated, kernel_size, stride, padding, scale=None,
                   shift=None):
    sums = x.shape[:2] if scale is not None else (0,)
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_format(x)),
            torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=_format(t)),
            x.new_empty(sums, dtype=state.dtype), x.new_empty(sums, dtype=state.dtype))


def _setup_context(ctx, inputs, output) -> None:
    x, t, coeff, gated, k, s, p, scale, shift = inputs
    out, out_exact, state, aux = output
    ctx.mark_non_differentiable(out_exact, state, aux)
    ctx.set_materialize_grads(False)  # else autograd allocates zero gradients for the three state outputs
    ctx.save_for_backward(x, t, out, out_exact, state, aux, scale, shift)
    ctx.params = (coeff, gated, k, s, p)
    ctx.plane_dtypes = (None if scale is None else scale.dtype, None if shift is None else shift.dtype)


def _grad(ctx, grad, *_unused):
    if grad is None:  # only the state outputs received gradients: they are constants
        return None, None, None, None, None, None, None, None, None
    x, t, out, out_exact, state, aux, scale, shift = ctx.saved_tensors
    dx, dt, dscale, dshift = torch.ops.lip.backward(grad, x, t, out, out_exact, state, aux, *ctx.params, scale,
                                                    shift)
    if scale is None:
        return dx, dt, None, None, None, None, None, None, None
    dscale, dshift = dscale.to(ctx.plane_dtypes[0]), dshift.to(ctx.plane_dtypes[1])
    return dx, dt, None, None, None, None, None, dscale.view(scale.shape), dshift.view(shift.shape)


_forward_op.register_autograd(_grad, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------
# The instance norm folded into the op: per-plane statistics, then lip::forward's scale and shift.


@torch.library.custom_op("lip::plane_stats", mutates_args=())
def _plane_stats_op(f: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(mean, 1 / sqrt(var + eps)) of every (n, c) plane of f over (H, W), biased var, in float32 (float64)."""
    compute = torch.float64 if f.dtype == torch.float64 else torch.float32
    with torch.autocast(f.device.type, enabled=False):
        if f.dtype == compute:
            var, mean = torch.var_mean(f, (2, 3), unbiased=False)
        else:  # fp16/bf16: float32 sums read f in place (the inputs' rounding far exceeds the cancellation)
            mean = f.mean((2, 3), dtype=compute)
            rms = torch.linalg.vector_norm(f, 2, (2, 3), dtype=compute) / (f.shape[2] * f.shape[3]) ** 0.5
            var = (rms * rms - mean * mean).clamp_min(0)
        return mean, torch.rsqrt(var + eps)


@_plane_stats_op.register_fake
def _plane_stats_fake(f, eps):
    compute = torch.float64 if f.dtype == torch.float64 else torch.float32
    return f.new_empty(f.shape[:2], dtype=compute), f.new_empty(f.shape[:2], dtype=compute)


@torch.library.custom_op("lip::plane_stats_backward", mutates_args=())
def _plane_stats_backward_op(f: Tensor, mean: Tensor, rstd: Tensor, dmean: Tensor, drstd: Tensor) -> Tensor:
    """dL/df = b * f + c per plane: one pass over f, from d mean / df = 1 / HW and d rstd / df."""
    hw = f.shape[2] * f.shape[3]
    with torch.autocast(f.device.type, enabled=False):
        b = -drstd * rstd.pow(3) / hw
        c = dmean / hw - b * mean
        df = torch.addcmul(c[:, :, None, None], f, b[:, :, None, None])
    return _like(df, f)


@_plane_stats_backward_op.register_fake
def _plane_stats_backward_fake(f, mean, rstd, dmean, drstd):
    return torch.empty(f.shape, dtype=f.dtype, device=f.device, memory_format=_format(f))


def _stats_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0], *output)


def _stats_grad(ctx, dmean, drstd):
    f, mean, rstd = ctx.saved_tensors
    dmean = torch.zeros_like(mean) if dmean is None else dmean
    drstd = torch.zeros_like(rstd) if drstd is None else drstd
    return torch.ops.lip.plane_stats_backward(f, mean, rstd, dmean, drstd), None


_plane_stats_op.register_autograd(_stats_grad, setup_context=_stats_setup)


def plane_affine(f: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    """(scale, shift) per (n, c) such that f * scale + shift is the affine instance norm of f."""
    mean, rstd = torch.ops.lip.plane_stats(f, eps)
    scale = rstd if weight is None else rstd * weight.to(rstd.dtype)
    shift = -mean * scale if bias is None else bias.to(rstd.dtype) - mean * scale
    return scale, shift


# ----------------------------------------------------------------------------------------------------------


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



def lip2d(x: Tensor, logit: Tensor, kernel_size: int = 3, stride: int = 2, padding: int = 1) -> Tensor:
    """LIP pooling of x weighted by exp(logit); output size as F.avg_pool2d (ceil_mode=False)."""
    _check("lip2d", x, logit, kernel_size, stride, padding)
    return torch.ops.lip.forward(x, logit, 0.0, False, kernel_size, stride, padding)[0]


def gated_lip2d(x: Tensor, z: Tensor, coeff: float = 12.0, kernel_size: int = 3, stride: int = 2,
                padding: int = 1) -> Tensor:
    """lip2d(x, coeff * sigmoid(z)) with the gate fused: backward keeps z, not the gated logit."""
    _check("gated_lip2d", x, z, kernel_size, stride, padding)
    return torch.ops.lip.forward(x, z, float(coeff), True, kernel_size, stride, padding)[0]


def norm_gated_lip2d(x: Tensor, f: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5,
                     coeff: float = 12.0, kernel_size: int = 3, stride: int = 2, padding: int = 1) -> Tensor:
    """gated_lip2d(x, instance_norm(f, weight, bias, eps), coeff, ...) with the norm's apply in the op.

    The per-plane statistics come from one reduction of f; the normalised logit is never a tensor, forward
    or backward (the op returns dL/df through the affine and the sums that give the statistics' gradients).
    """
    if not torch.jit.is_scripting():  # TorchScript: the op's own checks
        _check("norm_gated_lip2d", x, f, kernel_size, stride, padding)
    scale, shift = plane_affine(f, weight, bias, eps)
    return torch.ops.lip.forward(x, f, float(coeff), True, kernel_size, stride, padding, scale, shift)[0]


# ----------------------------------------------------------------------------------------------------------
# Export: the same formula in plain ATen ops that ONNX runtimes run fast (pooling and elementwise ops).


def _export_affine(t: Tensor, scale: Tensor | None, shift: Tensor | None) -> Tensor:
    """t * scale + shift with per-(N, C) scale and shift (either may be absent)."""
    if scale is not None:
        t = t * scale[:, :, None, None].to(t.dtype)
    if shift is not None:
        t = t + shift[:, :, None, None].to(t.dtype)
    return t


def _shifted_window_ratio(x: Tensor, logit: Tensor, k: int, s: int, p: int) -> tuple[Tensor, Tensor]:
    """(out, D) with every window shifted by its own maximum logit (MaxPool), for logits of any range.

    A per-window shift is not constant on the input (windows overlap), so the sums run over the k*k taps as
    strided slices, accumulated one at a time: output-sized temporaries only, no stack of taps.
    """
    ho, wo = (logit.shape[2] + 2 * p - k) // s + 1, (logit.shape[3] + 2 * p - k) // s + 1
    peak = F.max_pool2d(logit, k, s, p)
    xp = F.pad(x, (p, p, p, p))
    lp = F.pad(logit, (p, p, p, p), value=float("-inf"))
    num = den = None
    for i in range(k):
        for j in range(k):
            rows, cols = slice(i, i + s * (ho - 1) + 1, s), slice(j, j + s * (wo - 1) + 1, s)
            e = torch.exp(lp[:, :, rows, cols] - peak)
            xe = xp[:, :, rows, cols] * e
            num, den = (xe, e) if den is None else (num + xe, den + e)
    return num / den, den


def _exact_forward(x: Tensor, t: Tensor, coeff: float, gated: bool, kernel_size: int, stride: int, padding: int,
                   scale: Tensor | None = None, shift: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """lip::forward in plain ops for export; only `out` is meaningful (eval graphs use nothing else).

    Gated logits lie in [min(coeff, 0), max(coeff, 0)], so one constant shift (the upper end) is exact for every
    window: e = exp(logit - shift) lies in [exp(-|coeff|), 1] (for coeff 12: 6.1e-6 to 1, never above 1, so
    x * e and the window sums cannot overflow even in fp16, and no window's weights all vanish) and LIP is
    AveragePool(x * e) / AveragePool(e): both averages count the zero padding alike and the padding adds no
    weight, so the ratio is the padded-weight-free formula. A plain logit (any range) is shifted by the
    maximum of each window instead (`_shifted_window_ratio`).
    """
    k, s, p = kernel_size, stride, padding
    compute, out_dtype = _dtypes(x, t)
    n, c = x.shape[:2]
    xc, tc = x.to(compute), t.to(compute)
    if gated and _gate_in_range(coeff, compute):
        if coeff > 0 and scale is not None and shift is not None:
            # coeff * sigmoid(z) - coeff = -coeff * sigmoid(-z): the negation folds into the per-plane affine
            e = torch.exp(torch.sigmoid(_export_affine(tc, -scale, -shift)) * -coeff)
        else:
            logit = coeff * torch.sigmoid(_export_affine(tc, scale, shift))
            e = torch.exp(logit - coeff) if coeff > 0 else torch.exp(logit)
        den = F.avg_pool2d(e, k, s, p, count_include_pad=True)
        out = F.avg_pool2d(xc * e, k, s, p, count_include_pad=True) / den
        den = den * (k * k)
        flags = torch.zeros((n, c), dtype=torch.bool, device=x.device)
    else:
        logit = _export_affine(tc, scale, shift)
        if gated:
            logit = torch.sigmoid(logit) * coeff
        out, den = _shifted_window_ratio(xc, logit, k, s, p)
        flags = torch.ones((n, c), dtype=torch.bool, device=x.device)  # every plane relative to its window max
    return out.to(out_dtype), out.new_empty((0,)), den, flags


def _exact_plane_stats(f: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """lip::plane_stats in plain ops (ReduceMean-style reductions in ONNX)."""
    compute = torch.float64 if f.dtype == torch.float64 else torch.float32
    var, mean = torch.var_mean(f.to(compute), (2, 3), correction=0)
    return mean, torch.rsqrt(var + eps)


def export_decompositions() -> dict:
    """Decompositions of the LIP ops that an eval-mode torch.export graph holds, for `ep.run_decompositions`.

        ep = torch.export.export(model.eval(), (x,)).run_decompositions(export_decompositions())

    leaves no lip:: op: the soft-gated LIP of the LIP networks becomes sigmoid, exp, two average pools and a
    division (a folded instance norm's statistics become mean and variance reductions); a plain lip2d becomes
    a max pool and k*k strided slices. ONNX export maps them to AveragePool, MaxPool, Slice, ReduceMean and
    elementwise operators.
    """
    return {torch.ops.lip.forward.default: _exact_forward, torch.ops.lip.plane_stats.default: _exact_plane_stats}
