"""The LIP operator on a CUDA device: the Triton kernels against float64, memory formats, no host sync,
torch.compile with Inductor and a training step captured in a CUDA graph. Skipped without CUDA."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models
from models import create_model
from models.lip import gated_lip2d, lip2d, lip_backend

pytestmark = pytest.mark.cuda
DEV = "cuda"
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def auto_backend(monkeypatch):
    monkeypatch.delenv("LIP_BACKEND", raising=False)


@pytest.fixture()
def no_tf32():
    """Exact float32 convolutions, so eager and compiled or captured runs compare tightly."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def naive(x: torch.Tensor, logit: torch.Tensor, k: int, s: int, p: int) -> torch.Tensor:
    w = logit.exp()
    return F.avg_pool2d(x * w, k, s, p) / F.avg_pool2d(w, k, s, p)


def cpu_reference(x: torch.Tensor, t: torch.Tensor, g: torch.Tensor, gated: bool, k: int, s: int,
                  p: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, dx, dlogit) of the float64 formula on the CPU, NCHW: CUDA's channels_last avg_pool2d backward
    ignores the padding in some torch versions (https://github.com/pytorch/pytorch/issues/188344)."""
    xd, td = (v.detach().cpu().double().contiguous().requires_grad_() for v in (x, t))
    ref = naive(xd, 12 * torch.sigmoid(td) if gated else td, k, s, p)
    return (ref.detach(), *torch.autograd.grad(ref, (xd, td), g.detach().cpu().double().contiguous()))


def active_lip_model(name: str) -> nn.Module:
    """A LIP model whose logit heads are non-zero (the reference init zeroes some)."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=5)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, models.LIPPool):
                head = [m for m in module.logit_module() if isinstance(m, nn.Conv2d)][-1]
                head.weight.normal_(0.0, 2 / head.weight[0].numel() ** 0.5)
    return model.to(DEV)


def test_auto_backend_is_triton():
    assert lip_backend(DEV) == "triton"
    assert lip_backend(torch.device(DEV, 0)) == "triton"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("geometry", [(3, 2, 1), (2, 2, 0)], ids=lambda g: "k{}s{}p{}".format(*g))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("form", ["plain", "gated"])
@pytest.mark.parametrize("logits", ["upto12", "100x"])
def test_matches_float64_formula(dtype, geometry, layout, form, logits):
    """Value and both gradients against float64 on the same rounded inputs; the gradient arrives in NCHW."""
    k, s, p = geometry
    gen = torch.Generator(device=DEV).manual_seed(k + 7 * len(layout))
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    size = (33, 30) if layout == "nchw" else (30, 33)
    x = torch.randn(4, 16, *size, generator=gen, device=DEV).to(dtype)
    if logits == "100x":
        t = (100 * x.float()).to(dtype)
    elif form == "gated":
        t = (8 * torch.randn(x.shape, generator=gen, device=DEV)).to(dtype)
    else:
        t = (12 * torch.rand(x.shape, generator=gen, device=DEV)).to(dtype)
    x, t = (v.contiguous(memory_format=fmt).requires_grad_() for v in (x, t))
    y = gated_lip2d(x, t, 12.0, k, s, p) if form == "gated" else lip2d(x, t, k, s, p)
    g = torch.randn(y.shape, generator=gen, device=DEV).to(dtype)
    dx, dt = torch.autograd.grad(y, (x, t), g)
    ref, ref_dx, ref_dt = cpu_reference(x, t, g, form == "gated", k, s, p)
    for name, ours, truth in (("out", y, ref), ("dx", dx, ref_dx), ("dlogit", dt, ref_dt)):
        assert ours.dtype == dtype and ours.is_contiguous(memory_format=fmt), name
        assert torch.isfinite(ours).all(), name
        scale = truth.abs().max().item()
        if name == "dlogit" and logits == "100x" and form == "plain":
            scale = max(scale, g.abs().max().item() * x.detach().abs().max().item())  # see lip_triton_cases.py
        err = (ours.cpu().double() - truth).abs().max().item()
        assert err <= TOL[dtype] * scale, (name, err, scale)


@pytest.mark.parametrize("case", ["bf16-channels_last-gated", "fp32-nchw-plain"])
def test_autotuned_kernels_on_a_large_input(case):
    """Inputs large enough that both directions run the autotuned tiles, against the float64 formula."""
    dtype = torch.bfloat16 if case.startswith("bf16") else torch.float32
    fmt = torch.channels_last if "channels_last" in case else torch.contiguous_format
    gen = torch.Generator(device=DEV).manual_seed(6)
    x = torch.randn(4, 64, 128, 128, generator=gen, device=DEV).to(dtype).contiguous(memory_format=fmt)
    t = (3 * torch.randn(x.shape, generator=gen, device=DEV)).to(dtype).contiguous(memory_format=fmt)
    x.requires_grad_()
    t.requires_grad_()
    gated = case.endswith("gated")
    y = gated_lip2d(x, t) if gated else lip2d(x, t)
    g = torch.randn(y.shape, generator=gen, device=DEV).to(dtype)
    for name, ours, truth in zip(("out", "dx", "dlogit"), (y, *torch.autograd.grad(y, (x, t), g)),
                                 cpu_reference(x, t, g, gated, 3, 2, 1), strict=True):
        assert ours.is_contiguous(memory_format=fmt), name
        err = (ours.cpu().double() - truth).abs().max().item()
        assert err <= TOL[dtype] * truth.abs().max().item(), (name, err)


@pytest.mark.parametrize("form", ["plain", "gated"])
def test_torch_backend_channels_last_padded(monkeypatch, form):
    """The pure-PyTorch path on CUDA, channels_last with padding: CUDA's channels_last avg_pool2d backward
    ignores the padding in some torch versions, which that path must not inherit."""
    monkeypatch.setenv("LIP_BACKEND", "torch")
    gen = torch.Generator(device=DEV).manual_seed(5)
    cl = torch.channels_last
    x = torch.randn(2, 8, 13, 10, generator=gen, device=DEV).contiguous(memory_format=cl).requires_grad_()
    t = (4 * torch.randn(2, 8, 13, 10, generator=gen, device=DEV)).contiguous(memory_format=cl).requires_grad_()
    y = gated_lip2d(x, t, 12.0, 3, 2, 1) if form == "gated" else lip2d(x, t, 3, 2, 1)
    g = torch.randn(y.shape, generator=gen, device=DEV)
    dx, dt = torch.autograd.grad(y, (x, t), g)
    for name, ours, truth in zip(("out", "dx", "dlogit"), (y, dx, dt),
                                 cpu_reference(x, t, g, form == "gated", 3, 2, 1), strict=True):
        assert ours.is_contiguous(memory_format=cl), name
        err = (ours.cpu().double() - truth).abs().max().item()
        assert err <= 1e-5 * truth.abs().max().item(), (name, err)


def test_no_host_sync_in_forward_and_backward():
    x = torch.randn(8, 32, 28, 28, device=DEV).to(memory_format=torch.channels_last).requires_grad_()
    z = torch.randn(8, 32, 28, 28, device=DEV).to(memory_format=torch.channels_last).requires_grad_()
    g = torch.randn(8, 32, 14, 14, device=DEV)
    for op in (lip2d, gated_lip2d):  # compiles the kernels first
        torch.autograd.grad(op(x, z), (x, z), g)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for op in (lip2d, gated_lip2d):
            torch.autograd.grad(op(x, z), (x, z), g)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_backward_memory_is_inputs_and_output_sized():
    """Peak memory of forward+backward: the two gradients and output-sized tensors only."""
    shape, out_shape = (32, 64, 56, 56), (32, 64, 28, 28)
    x = torch.randn(shape, device=DEV, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    z = torch.randn(shape, device=DEV, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    x.requires_grad_()
    z.requires_grad_()
    g = torch.ones(out_shape, device=DEV, dtype=torch.bfloat16)
    torch.autograd.grad(gated_lip2d(x, z), (x, z), g)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    y = gated_lip2d(x, z)
    dx, dz = torch.autograd.grad(y, (x, z), g)
    extra = torch.cuda.max_memory_allocated() - base
    # dx, dz (input-sized bf16), y, its fp32 copy and log D (5 y), and the allocator's rounding (< 1 MiB each).
    assert extra <= 2 * x.nbytes + 5 * y.nbytes + 6 * 2**20, (extra, x.nbytes, y.nbytes)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_compile_inductor_fullgraph(no_tf32, layout):
    model = active_lip_model("lip_resnet_tiny").train()
    x = torch.randn(2, 3, 64, 64, device=DEV)
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    eager = model(x)
    eager.square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    out = torch.compile(model, fullgraph=True)(x)
    out.square().mean().backward()
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
    for p, g in zip(model.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-3, atol=1e-4)


def test_cuda_graph_captures_a_training_step(no_tf32):
    model = active_lip_model("lip_resnet_tiny").train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator(device=DEV).manual_seed(1)
    static_x = torch.randn(4, 3, 64, 64, device=DEV, generator=gen)
    static_y = torch.randint(0, 5, (4,), device=DEV, generator=gen)

    def step() -> torch.Tensor:
        loss = F.cross_entropy(model(static_x), static_y)
        loss.backward()
        opt.step()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: kernels compiled, optimizer state allocated
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = step()

    for seed in (2, 3):
        gen.manual_seed(seed)
        static_x.copy_(torch.randn(static_x.shape, device=DEV, generator=gen))
        static_y.copy_(torch.randint(0, 5, static_y.shape, device=DEV, generator=gen))
        reference = copy.deepcopy(model)
        reference.zero_grad(set_to_none=True)
        ref_loss = F.cross_entropy(reference(static_x), static_y)
        ref_loss.backward()
        before = [p.detach().clone() for p in model.parameters()]
        graph.replay()
        torch.testing.assert_close(static_loss, ref_loss, rtol=1e-4, atol=1e-5)
        for p, r in zip(model.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(p.grad, r.grad, rtol=1e-3, atol=1e-5)
        assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
        assert all(torch.isfinite(p).all() for p in model.parameters())
