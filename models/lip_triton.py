"""Triton kernels of the LIP operator: one launch per direction, any strides, fp32 (or fp64) accumulation.

Forward: every output element computes its window's maximum logit m (unless the logit is
statically within a safe range, as for the soft gate: then m = 0), then out = sum(x * e) / D with
e = exp(s - m), D = sum(e), and stores out (in the output dtype, plus an accumulation-dtype copy when that is
narrower), log D and m (only when shifting; m and log D apart, as their sum would round at the scale of m).
Backward needs only these output-sized tensors besides x and the logit: every input position gathers, from
the at most ceil(k/s)^2 windows that contain it, p = exp(s - m - log D) (its weight in that window), and
forms dx = sum(g * p) and ds = sum(g * p * (x - out)), each window's x - out taken before the sum. Where one
weight dominates a window (large logits, float32 with the shift), x - out lies far below the float32
rounding of out, so forward keeps out in float64 too (from float64 window sums) and backward subtracts in
float64; nothing input-sized but the results.

An optional per-(n, c) affine map comes first: the logit is t * scale + shift (an instance norm's apply), and
backward returns dt = scale * dz with the per-plane sums of dz * t and dz (float atomics into (N, C) buffers,
the only atomics).

Every tensor is addressed through its own strides, so NCHW, channels_last and an incoming gradient in either
layout are read in place; a program owns a tile of rows x lanes, the lanes along x's fastest dimension so
loads coalesce. Importing
this module needs triton; with TRITON_INTERPRET=1 set before the import the kernels run on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["forward", "backward"]

# Programs own a tile of rows x lanes. The lanes run along the layout's fastest output (forward) or input
# (backward) dimension -- the width in NCHW, the channels in channels_last -- so loads and stores along them
# are contiguous (vectorised in channels_last), and only the rows' indices are decoded with integer division.
_MAX_LANES = 64
# Tiles (elements per program, warps) tried on large problems: the fastest is picked per shape and layout on
# the device itself, once (triton.autotune); small problems take the first without timing anything. 1 to 4
# elements per thread: on sm_90 that is about 40 to 130 registers (8 elements spill).
_TILES = ((512, 8), (256, 8), (512, 4), (1024, 8))
_TUNE_NUMEL = 2**20


@triton.jit
def _gate(v, coeff):
    """coeff * sigmoid(v) and its slope, from exp(-|v|): no overflow for any v."""
    e = tl.exp(-tl.abs(v))
    inv = 1.0 / (1.0 + e)
    sig = tl.where(v >= 0, inv, e * inv)
    return coeff * sig, coeff * e * inv * inv


@triton.jit
def _tap_logit(t_base, h, w, sth, stw, H, W, mask, coeff, sa, sb, GATED: tl.constexpr, AFFINE: tl.constexpr,
               ACC: tl.constexpr):
    """(logit, inside) of one window tap at input (h, w): t * sa + sb if AFFINE, then gated if GATED."""
    ok = mask & (h >= 0) & (h < H) & (w >= 0) & (w < W)
    s = tl.load(t_base + h * sth + w * stw, mask=ok, other=0.0).to(ACC)
    if AFFINE:
        s = s * sa + sb
    if GATED:
        s, _slope = _gate(s, coeff)
    return s, ok


@triton.jit
def _tile(rows, lanes, C, A, B, CL: tl.constexpr, TILE: tl.constexpr, LANES: tl.constexpr):
    """(n, c, i, j, mask) of this program's tile, broadcastable to (TILE // LANES, LANES).

    NCHW: rows are (n, c, i) with i < A, lanes are j < B; channels_last: rows are (n, i, j) with i < A,
    j < B, lanes are c < C.
    """
    r = tl.program_id(0) * (TILE // LANES) + tl.arange(0, TILE // LANES)
    q = tl.program_id(1) * LANES + tl.arange(0, LANES)
    mask = (r < rows)[:, None] & (q < lanes)[None, :]
    if CL:
        j = (r % B)[:, None]
        r = r // B
        i = (r % A)[:, None]
        n = (r // A)[:, None]
        c = q[None, :]
    else:
        i = (r % A)[:, None]
        r = r // A
        c = (r % C)[:, None]
        n = (r // C)[:, None]
        j = q[None, :]
    return n, c, i, j, mask


@triton.jit
def _forward_kernel(x_ptr, t_ptr, out_ptr, acc_ptr, ld_ptr, m_ptr, sa_ptr, sb_ptr, rows, lanes, C, H, W, Ho, Wo,
                    sxn, sxc, sxh, sxw, stn, stc, sth, stw, son, soc, soh, sow, coeff,
                    K: tl.constexpr, S: tl.constexpr, P: tl.constexpr, GATED: tl.constexpr,
                    SHIFT: tl.constexpr, CL: tl.constexpr, ACC: tl.constexpr, KEEP: tl.constexpr,
                    AFFINE: tl.constexpr, SUM: tl.constexpr, TILE: tl.constexpr, LANES: tl.constexpr):
    n, c, oh, ow, mask = _tile(rows, lanes, C, Ho, Wo, CL, TILE, LANES)
    sa = 1.0
    sb = 0.0
    if AFFINE:
        pl = n * C + c + tl.zeros([TILE // LANES, LANES], dtype=tl.int32)  # the tile's shape, for the mask
        sa = tl.load(sa_ptr + pl, mask=mask, other=1.0).to(ACC)
        sb = tl.load(sb_ptr + pl, mask=mask, other=0.0).to(ACC)
    xb = n * sxn + c * sxc
    tb = n * stn + c * stc
    h0 = oh * S - P
    w0 = ow * S - P
    m = tl.zeros([TILE // LANES, LANES], dtype=ACC)
    if SHIFT:
        m = tl.full([TILE // LANES, LANES], float("-inf"), dtype=ACC)
        for kh in tl.static_range(K):
            for kw in tl.static_range(K):
                s, ok = _tap_logit(t_ptr + tb, h0 + kh, w0 + kw, sth, stw, H, W, mask, coeff, sa, sb, GATED, AFFINE,
                                   ACC)
                m = tl.maximum(m, tl.where(ok, s, float("-inf")))
        m = tl.where(m == float("-inf"), 0.0, m)  # lanes past the end only
    den = tl.zeros([TILE // LANES, LANES], dtype=SUM)
    num = tl.zeros([TILE // LANES, LANES], dtype=SUM)
    for kh in tl.static_range(K):
        for kw in tl.static_range(K):
            h = h0 + kh
            w = w0 + kw
            s, ok = _tap_logit(t_ptr + tb, h, w, sth, stw, H, W, mask, coeff, sa, sb, GATED, AFFINE,
                                   ACC)
            xv = tl.load(x_ptr + xb + h * sxh + w * sxw, mask=ok, other=0.0).to(ACC)
            e = tl.exp(tl.where(ok, s - m, float("-inf"))).to(SUM)
            den += e
            num += xv.to(SUM) * e
    ob = n * son + c * soc + oh * soh + ow * sow
    den = tl.where(mask, den, 1.0)  # lanes past the end
    res = num / den
    tl.store(out_ptr + ob, res.to(ACC).to(out_ptr.dtype.element_ty), mask=mask)
    if KEEP:
        tl.store(acc_ptr + ob, res.to(acc_ptr.dtype.element_ty), mask=mask)
    tl.store(ld_ptr + ob, tl.log(den.to(ACC)).to(ld_ptr.dtype.element_ty), mask=mask)
    if SHIFT:
        tl.store(m_ptr + ob, m.to(m_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(x_ptr, t_ptr, g_ptr, out_ptr, ld_ptr, m_ptr, dx_ptr, dt_ptr, sa_ptr, sb_ptr, s1_ptr, s2_ptr,
                     rows, lanes, C, H, W, Ho, Wo,
                     sxn, sxc, sxh, sxw, stn, stc, sth, stw, sgn, sgc, sgh, sgw, son, soc, soh, sow,
                     sdxn, sdxc, sdxh, sdxw, sdtn, sdtc, sdth, sdtw, coeff,
                     K: tl.constexpr, S: tl.constexpr, P: tl.constexpr, GATED: tl.constexpr,
                     SHIFT: tl.constexpr, CL: tl.constexpr, ACC: tl.constexpr, AFFINE: tl.constexpr,
                     TILE: tl.constexpr, LANES: tl.constexpr):
    n, c, h, w, mask = _tile(rows, lanes, C, H, W, CL, TILE, LANES)
    xv = tl.load(x_ptr + n * sxn + c * sxc + h * sxh + w * sxw, mask=mask, other=0.0).to(ACC)
    tv = tl.load(t_ptr + n * stn + c * stc + h * sth + w * stw, mask=mask, other=0.0).to(ACC)
    s = tv
    sa = 1.0
    pl = n * C + c + tl.zeros([TILE // LANES, LANES], dtype=tl.int32)  # the tile's shape, for the mask
    if AFFINE:
        sa = tl.load(sa_ptr + pl, mask=mask, other=1.0).to(ACC)
        s = tv * sa + tl.load(sb_ptr + pl, mask=mask, other=0.0).to(ACC)
    slope = tl.zeros([TILE // LANES, LANES], dtype=ACC)
    if GATED:
        s, slope = _gate(s, coeff)
    gsum = tl.zeros([TILE // LANES, LANES], dtype=ACC)  # sum over windows of g * p
    dsum = tl.zeros([TILE // LANES, LANES], dtype=ACC)  # sum over windows of g * p * (x - out)
    oh_last = (h + P) // S
    ow_last = (w + P) // S
    for jh in tl.static_range((K + S - 1) // S):
        oh = oh_last - jh
        okh = (oh >= 0) & (oh < Ho) & (h + P - oh * S < K)
        for jw in tl.static_range((K + S - 1) // S):
            ow = ow_last - jw
            ok = mask & okh & (ow >= 0) & (ow < Wo) & (w + P - ow * S < K)
            o = n * son + c * soc + oh * soh + ow * sow
            g = tl.load(g_ptr + n * sgn + c * sgc + oh * sgh + ow * sgw, mask=ok, other=0.0).to(ACC)
            ov = tl.load(out_ptr + o, mask=ok, other=0.0)  # float64 where x - out needs it
            d = s
            if SHIFT:  # (s - m) - log D: m + log D would round at the scale of m
                d = s - tl.load(m_ptr + o, mask=ok, other=0.0).to(ACC)
            d = d - tl.load(ld_ptr + o, mask=ok, other=0.0).to(ACC)
            gp = g * tl.exp(tl.where(ok, d, float("-inf")))
            gsum += gp
            dsum += gp * (xv.to(ov.dtype) - ov).to(ACC)
    ds = dsum
    if GATED:
        ds = ds * slope
    if AFFINE:
        tl.atomic_add(s1_ptr + pl, ds * tv, mask=mask)
        tl.atomic_add(s2_ptr + pl, ds, mask=mask)
        ds = ds * sa
    tl.store(dx_ptr + n * sdxn + c * sdxc + h * sdxh + w * sdxw, gsum.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dt_ptr + n * sdtn + c * sdtc + h * sdth + w * sdtw, ds.to(dt_ptr.dtype.element_ty), mask=mask)


_CONFIGS = [triton.Config({"TILE": tile}, num_warps=warps) for tile, warps in _TILES]
_KEY = ["rows", "lanes", "K", "S", "GATED", "SHIFT", "CL", "AFFINE"]
_forward_tuned = triton.autotune(_CONFIGS, key=_KEY)(_forward_kernel)
_backward_tuned = triton.autotune(_CONFIGS, key=_KEY)(_backward_kernel)


def _launch(kernel, tuned, numel: int, rows: int, lanes: int, interpret: bool):
    """The kernel with its grid and tile: timed configurations on large problems on a GPU, else the first."""
    width = min(_MAX_LANES, triton.next_power_of_2(lanes))
    if numel >= _TUNE_NUMEL and not interpret:
        return tuned[lambda meta: (triton.cdiv(rows, meta["TILE"] // width), triton.cdiv(lanes, width))], width, {}
    tile, warps = _TILES[0]
    tile = max(tile, width)
    return kernel[(triton.cdiv(rows, tile // width), triton.cdiv(lanes, width))], width, dict(TILE=tile,
                                                                                             num_warps=warps)


def _acc(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


def forward(x: torch.Tensor, t: torch.Tensor, coeff: float, gated: bool, shift: bool, k: int, s: int, p: int,
            out_dtype: torch.dtype, acc_dtype: torch.dtype, channels_last: bool,
            plane_scale: torch.Tensor | None = None, plane_shift: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """(out, out in acc_dtype or None, log D, window maxima or None), all in x's memory format.

    The full-precision copy of out is made when out_dtype is narrower than acc_dtype, and in float64 (with
    float64 window sums) for float32 with shift: there one weight can dominate a window, and backward's
    x - out is then far below the float32 rounding of out. The window maxima exist only with shift (else the
    shift is 0). plane_scale and plane_shift: contiguous (N, C) in acc_dtype.
    """
    n, c, h, w = x.shape
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty((n, c, ho, wo), dtype=out_dtype, device=x.device, memory_format=fmt)
    log_den = torch.empty((n, c, ho, wo), dtype=acc_dtype, device=x.device, memory_format=fmt)
    precise = shift and acc_dtype == torch.float32  # see the module docstring
    keep = out_dtype != acc_dtype or precise
    out_acc = torch.empty_like(log_den, dtype=torch.float64 if precise else acc_dtype) if keep else None
    wmax = torch.empty_like(log_den) if shift else None
    if out.numel():
        rows, lanes = (n * ho * wo, c) if channels_last else (n * c * ho, wo)
        launch, width, cfg = _launch(_forward_kernel, _forward_tuned, out.numel(), rows, lanes, x.device.type != "cuda")
        affine = plane_scale is not None
        launch(x, t, out, out_acc if keep else log_den, log_den, wmax if shift else log_den,
               plane_scale if affine else log_den, plane_shift if affine else log_den, rows, lanes, c, h, w,
               ho, wo, *x.stride(), *t.stride(), *out.stride(), float(coeff), K=k, S=s, P=p, GATED=gated,
               SHIFT=shift, CL=channels_last, ACC=_acc(acc_dtype), KEEP=keep, AFFINE=affine,
               SUM=tl.float64 if precise else _acc(acc_dtype), LANES=width, **cfg)
    return out, out_acc, log_den, wmax


def backward(grad: torch.Tensor, x: torch.Tensor, t: torch.Tensor, out: torch.Tensor, log_den: torch.Tensor,
             wmax: torch.Tensor | None, coeff: float, gated: bool, k: int, s: int, p: int,
             dx_format: torch.memory_format, dt_format: torch.memory_format, channels_last: bool,
             plane_scale: torch.Tensor | None = None, plane_shift: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(dL/dx in x's dtype, dL/dt in t's dtype, sum(dz * t), sum(dz)) in the given memory formats.

    out is in the accumulation dtype; the two per-plane sums of the pre-gate logit's gradient dz exist only
    with plane_scale and plane_shift (then dL/dt = dz * plane_scale).
    """
    n, c, h, w = x.shape
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=dx_format)
    dt = torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=dt_format)
    affine = plane_scale is not None
    s1, s2 = (torch.zeros((n, c), dtype=log_den.dtype, device=x.device) if affine else None for _ in range(2))
    if x.numel():
        rows, lanes = (n * h * w, c) if channels_last else (n * c * h, w)
        launch, width, cfg = _launch(_backward_kernel, _backward_tuned, x.numel(), rows, lanes, x.device.type != "cuda")
        launch(x, t, grad, out, log_den, log_den if wmax is None else wmax, dx, dt,
               plane_scale if affine else log_den, plane_shift if affine else log_den,
               s1 if affine else log_den, s2 if affine else log_den, rows, lanes, c, h, w,
               out.shape[2], out.shape[3], *x.stride(), *t.stride(), *grad.stride(), *out.stride(), *dx.stride(),
               *dt.stride(), float(coeff), K=k, S=s, P=p, GATED=gated, SHIFT=wmax is not None, CL=channels_last,
               ACC=_acc(log_den.dtype), AFFINE=affine, LANES=width, **cfg)
    return dx, dt, s1, s2
