"""The Triton LIP kernels run by Triton's interpreter on CPU tensors.

Not collected on its own (the name does not start with test_): tests/test_lip_triton.py runs this file in a
child pytest with TRITON_INTERPRET=1 and LIP_BACKEND=triton, because triton reads TRITON_INTERPRET when the
kernels are defined, at import, and it must not leak into other tests.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from models.lip import gated_lip2d, lip2d, lip_backend

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get("LIP_BACKEND") !=
                                "triton", reason="needs TRITON_INTERPRET=1 LIP_BACKEND=triton (see the docstring)")

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def naive(x: torch.Tensor, logit: torch.Tensor, k: int, s: int, p: int) -> torch.Tensor:
    w = logit.exp()
    return F.avg_pool2d(x * w, k, s, p) / F.avg_pool2d(w, k, s, p)


def test_backend_is_triton():
    assert lip_backend("cpu") == "triton"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("geometry", [(3, 2, 1), (2, 2, 0)], ids=lambda g: "k{}s{}p{}".format(*g))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("form", ["plain", "gated"])
@pytest.mark.parametrize("logits", ["upto12", "100x"])
def test_matches_float64_formula(dtype, geometry, layout, form, logits):
    """Value and both gradients against the float64 formula on the same rounded inputs.

    Odd and even heights and widths in both layouts: (7, 8) NCHW, (8, 7) channels_last.
    """
    k, s, p = geometry
    size = (7, 8) if layout == "nchw" else (8, 7)
    gen = torch.Generator().manual_seed(10 * k + len(layout))
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(2, 3, *size, generator=gen).to(dtype)
    if form == "gated":  # z: the gate saturates, so logits reach 0 and 12
        t = (100 * x.float() if logits == "100x" else 8 * torch.randn(x.shape, generator=gen)).to(dtype)
    else:
        t = (100 * x.float() if logits == "100x" else 12 * torch.rand(x.shape, generator=gen)).to(dtype)
    if logits == "upto12" and form == "plain":
        t.view(-1)[0] = 12.0
    x, t = (v.contiguous(memory_format=fmt).requires_grad_() for v in (x, t))

    def op(a, b):
        return gated_lip2d(a, b, 12.0, k, s, p) if form == "gated" else lip2d(a, b, k, s, p)

    y = op(x, t)
    g = torch.randn(y.shape, generator=gen).to(dtype)
    dx, dt = torch.autograd.grad(y, (x, t), g)
    xd, td = (v.detach().double().requires_grad_() for v in (x, t))
    ref = naive(xd, 12 * torch.sigmoid(td) if form == "gated" else td, k, s, p)
    ref_dx, ref_dt = torch.autograd.grad(ref, (xd, td), g.double())
    for name, ours, truth in (("out", y, ref), ("dx", dx, ref_dx), ("dlogit", dt, ref_dt)):
        assert ours.dtype == dtype and ours.shape == truth.shape, name
        assert torch.isfinite(ours).all(), name
        scale = truth.abs().max().item()
        err = (ours.double() - truth).abs().max().item()
        assert err <= TOL[dtype] * scale, (name, err, scale)
        assert ours.is_contiguous(memory_format=fmt), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("geometry", [(3, 2, 1), (2, 2, 0)], ids=lambda g: "k{}s{}p{}".format(*g))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("form", ["plain", "gated"])
@pytest.mark.parametrize("logits", ["small", "large"])
def test_scale_and_shift_match_float64_formula(dtype, geometry, layout, form, logits):
    """The per-plane affine logit t * scale + shift (the folded instance norm): value and the gradients of
    x, t, scale and shift against float64, odd sizes, large scales (shifted windows) included."""
    k, s, p = geometry
    size = (9, 7) if layout == "nchw" else (7, 9)
    gen = torch.Generator().manual_seed(20 * k + len(layout) + len(logits))
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(2, 3, *size, generator=gen).to(dtype).contiguous(memory_format=fmt).requires_grad_()
    t = torch.randn(2, 3, *size, generator=gen).to(dtype).contiguous(memory_format=fmt).requires_grad_()
    big = 60.0 if logits == "large" else 3.0
    scale = (big * torch.rand(2, 3, generator=gen) + 0.1).requires_grad_()
    shift = torch.randn(2, 3, generator=gen).requires_grad_()
    coeff, gated = (12.0, True) if form == "gated" else (0.0, False)
    y = torch.ops.lip.forward(x, t, coeff, gated, k, s, p, scale, shift)[0]
    g = torch.randn(y.shape, generator=gen).to(y.dtype)
    ours = (y, *torch.autograd.grad(y, (x, t, scale, shift), g))
    xd, td, ad, bd = (v.detach().double().requires_grad_() for v in (x, t, scale, shift))
    z = td * ad[:, :, None, None] + bd[:, :, None, None]
    ref = naive(xd, 12 * torch.sigmoid(z) if gated else z, k, s, p)
    *grads, dz = torch.autograd.grad(ref, (xd, td, ad, bd, z), g.double())
    truth = (ref, *grads)
    # the per-plane sums cancel (plain: sum(dz) is exactly 0, a constant logit shift changes nothing), so they
    # are measured against the sums of their terms' magnitudes
    bounds = {"dscale": (dz * td).abs().sum((2, 3)).max().item(), "dshift": dz.abs().sum((2, 3)).max().item()}
    for name, a, b in zip(("out", "dx", "dt", "dscale", "dshift"), ours, truth, strict=True):
        assert torch.isfinite(a).all(), name
        scale_ = bounds.get(name, b.abs().max().item())
        err = (a.double() - b).abs().max().item()
        assert err <= TOL[dtype] * scale_, (name, err, scale_)
    assert ours[2].is_contiguous(memory_format=fmt) and ours[3].shape == scale.shape


@pytest.mark.parametrize("z_layout", ["channels_last", "nchw"])
def test_mixed_layouts_and_dtypes(z_layout):
    """channels_last x, z in either layout, an NCHW incoming gradient: all read in place, each gradient in its
    input's layout; bf16 x with an fp32 logit gives fp32, as the formula does."""
    cl = torch.channels_last
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 7, 7, generator=gen).bfloat16().contiguous(memory_format=cl)
    z = 3 * torch.randn(2, 4, 7, 7, generator=gen)
    if z_layout == "channels_last":
        z = z.contiguous(memory_format=cl)
    x.requires_grad_()
    z.requires_grad_()
    y = gated_lip2d(x, z)
    assert y.dtype == torch.float32 and y.is_contiguous(memory_format=cl)
    g = torch.randn(y.shape, generator=gen)  # NCHW
    dx, dz = torch.autograd.grad(y, (x, z), g)
    assert dx.dtype == torch.bfloat16 and dz.dtype == torch.float32
    assert dx.is_contiguous(memory_format=cl) and dz.stride() == z.stride()
    xd, zd = (v.detach().double().requires_grad_() for v in (x, z))
    ref = naive(xd, 12 * torch.sigmoid(zd), 3, 2, 1)
    for ours, truth in zip((y, dx, dz), (ref, *torch.autograd.grad(ref, (xd, zd), g.double())), strict=True):
        assert (ours.double() - truth).abs().max() <= 1e-2 * truth.abs().max()


def test_float64_gradcheck():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 1, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    t = (3 * torch.randn(1, 1, 4, 5, generator=gen, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: lip2d(a, b), (x, t), fast_mode=True)
    assert torch.autograd.gradcheck(lambda a, b: gated_lip2d(a, b, 12.0, 2, 2, 0), (x, t), fast_mode=True)


def test_opcheck():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 5, 6, generator=gen, requires_grad=True)
    t = torch.randn(1, 2, 5, 6, generator=gen, requires_grad=True)
    for coeff, gated in ((0.0, False), (12.0, True)):
        args = (x, t, coeff, gated, 3, 2, 1)
        torch.library.opcheck(torch.ops.lip.forward.default, args)
        out, out_exact, state, aux = torch.ops.lip.forward(*args)
        torch.library.opcheck(torch.ops.lip.backward.default,
                              (torch.ones_like(out), x.detach(), t.detach(), out.detach(), out_exact, state, aux,
                               *args[2:]))


@pytest.mark.parametrize("op", [lip2d, gated_lip2d], ids=["plain", "gated"])
def test_saves_only_inputs_and_output_sized_tensors(op):
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    t = torch.randn(2, 4, 16, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda v: saved.append(v) or v, lambda v: v):
        y = op(x, t)
    inputs = {x.untyped_storage().data_ptr(), t.untyped_storage().data_ptr()}
    others = [v for v in saved if v.untyped_storage().data_ptr() not in inputs]
    assert len(saved) - len(others) == 2
    assert all(v.numel() <= y.numel() for v in others)
    # plain float32 (shifted windows) also keeps out in float64 for backward's x - out: 4 + 8 + 4 + 4 bytes
    limit = 5 if op is lip2d else 3
    assert sum(v.untyped_storage().nbytes() for v in others) <= limit * y.untyped_storage().nbytes()


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_several_lane_blocks(layout):
    """More channels (channels_last) or output columns (NCHW) than one program's lanes: the last block masked."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    size = (1, 70, 5, 6) if layout == "channels_last" else (1, 2, 3, 133)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(size, generator=gen).contiguous(memory_format=fmt).requires_grad_()
    t = (4 * torch.randn(size, generator=gen)).contiguous(memory_format=fmt).requires_grad_()
    y = lip2d(x, t)
    g = torch.randn(y.shape, generator=gen)
    xd, td = (v.detach().double().requires_grad_() for v in (x, t))
    ref = naive(xd, td, 3, 2, 1)
    for ours, truth in zip((y, *torch.autograd.grad(y, (x, t), g)),
                           (ref, *torch.autograd.grad(ref, (xd, td), g.double())), strict=True):
        assert (ours.double() - truth).abs().max() <= 1e-5 * truth.abs().max()
