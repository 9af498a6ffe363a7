"""The LIP custom ops under torch.library.opcheck, torch.compile (fullgraph) and torch.export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import models
from models import create_model
from models.lip import export_decompositions, gated_lip2d, lip2d

LIP_MODELS = ["lip_resnet50", "lip_resnet101", "lip_densenet121"]


@pytest.fixture(autouse=True, scope="module")
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, before))
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=["cpp", "torch"])
def backend(request, monkeypatch) -> str:
    monkeypatch.setenv("LIP_BACKEND", request.param)
    return request.param


def randn(*shape, seed: int, scale: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def lip_model(name: str, seed: int = 0) -> nn.Module:
    """A LIP model whose logit heads are active (the reference init zeroes some), so the pooling matters."""
    torch.manual_seed(seed)
    model = create_model(name, num_classes=10)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, models.LIPPool):
                head = [m for m in module.logit_module() if isinstance(m, nn.Conv2d)][-1]
                head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 2 / head.weight[0].numel() ** 0.5)
    return model


def lip_ops_in(graph: torch.fx.Graph) -> list[str]:
    return [str(n.target) for n in graph.nodes if n.op == "call_function" and str(n.target).startswith("lip.")]


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_opcheck(backend, gated, layout):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = randn(2, 3, 7, 6, seed=0).contiguous(memory_format=fmt).requires_grad_()
    t = randn(2, 3, 7, 6, seed=1, scale=3.0).contiguous(memory_format=fmt).requires_grad_()
    for k, s, p in [(3, 2, 1), (2, 2, 0)]:
        args = (x, t, 12.0 if gated else 0.0, gated, k, s, p)
        torch.library.opcheck(torch.ops.lip.forward.default, args)
        out, out_exact, state, flags = torch.ops.lip.forward(*args)
        grad = randn(*out.shape, seed=2).contiguous(memory_format=fmt)
        torch.library.opcheck(torch.ops.lip.backward.default,
                              (grad, x.detach(), t.detach(), out.detach(), out_exact, state, flags, *args[2:]))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_opcheck_folded_norm(backend, layout):
    """lip::forward / lip::backward with the per-plane scale and shift, and the plane statistics ops."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = randn(2, 3, 7, 6, seed=5).contiguous(memory_format=fmt).requires_grad_()
    f = randn(2, 3, 7, 6, seed=6, scale=3.0).contiguous(memory_format=fmt).requires_grad_()
    torch.library.opcheck(torch.ops.lip.plane_stats.default, (f, 1e-5))
    mean, rstd = torch.ops.lip.plane_stats(f, 1e-5)
    scale, shift = rstd.requires_grad_(), (-mean * rstd).requires_grad_()
    args = (x, f, 12.0, True, 3, 2, 1, scale, shift)
    torch.library.opcheck(torch.ops.lip.forward.default, args)
    out, out_exact, state, flags = torch.ops.lip.forward(*args)
    grad = randn(*out.shape, seed=7).contiguous(memory_format=fmt)
    torch.library.opcheck(torch.ops.lip.backward.default,
                          (grad, x.detach(), f.detach(), out.detach(), out_exact, state, flags, 12.0, True, 3, 2, 1,
                           scale.detach(), shift.detach()))
    torch.library.opcheck(torch.ops.lip.plane_stats_backward.default,
                          (f.detach(), mean.detach(), rstd.detach(), randn(2, 3, seed=8), randn(2, 3, seed=9)))


def test_opcheck_half_output(backend):
    """bf16 in, bf16 out: the op also returns the float32 result backward uses."""
    x = randn(1, 2, 6, 6, seed=3).bfloat16().requires_grad_()
    t = randn(1, 2, 6, 6, seed=4).bfloat16().requires_grad_()
    torch.library.opcheck(torch.ops.lip.forward.default, (x, t, 12.0, True, 3, 2, 1))


@pytest.mark.slow
@pytest.mark.parametrize("name", LIP_MODELS)
def test_compile_fullgraph_forward_backward_equals_eager(name):
    """Training mode, so LIPPool's checkpoint recompute is traced too; no graph break anywhere."""
    model = lip_model(name).train()
    x = randn(2, 3, 64, 64, seed=5)
    eager = model(x)
    eager.square().mean().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    out.square().mean().backward()
    assert eager.abs().max() > 0.1
    torch.testing.assert_close(out, eager)
    for p, g in zip(model.parameters(), eager_grads, strict=True):
        torch.testing.assert_close(p.grad, g)
    lip_grads = [p.grad for n, p in model.named_parameters() if "postprocessing.conv" in n or "logit.conv3" in n]
    assert any(g.abs().sum() > 0 for g in lip_grads)  # gradients reach the logit heads


def check_decomposed(ep: torch.export.ExportedProgram, model: nn.Module, x: torch.Tensor) -> None:
    ep = ep.run_decompositions(export_decompositions())
    assert lip_ops_in(ep.graph) == []
    assert not any("unfold" in str(n.target) or "im2col" in str(n.target) for n in ep.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", LIP_MODELS)
def test_export_eval_equals_eager(name):
    """Strict export in eval mode keeps lip::forward; for one big model the decomposed program is checked too."""
    model = lip_model(name).eval()
    x = randn(2, 3, 64, 64, seed=6)
    ep = torch.export.export(model, (x,), strict=True)
    assert "lip.forward.default" in lip_ops_in(ep.graph)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), model(x))
    if name == "lip_densenet121":
        check_decomposed(ep, model, x)


@pytest.mark.slow
def test_export_decompositions_leave_plain_aten():
    model = lip_model("lip_resnet_tiny").eval()
    x = randn(2, 3, 64, 64, seed=7)
    check_decomposed(torch.export.export(model, (x,)), model, x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_export_decomposition_is_exact_and_half_safe(dtype):
    """The decomposed operator against the float64 formula, logits up to 12 (exp(12) > fp16 max) and 100 x."""
    decomp = export_decompositions()[torch.ops.lip.forward.default]
    x = randn(2, 3, 9, 8, seed=8).to(dtype)
    z = randn(2, 3, 9, 8, seed=9, scale=6.0).to(dtype)
    for t, coeff, gated in ((z, 12.0, True), (100 * x, 0.0, False)):
        for k, s, p in [(3, 2, 1), (2, 2, 0)]:
            out = decomp(x, t, coeff, gated, k, s, p)[0]
            ref = (gated_lip2d if gated else lambda a, b, *g: lip2d(a, b, *g[1:]))(
                x.double(), t.double(), coeff, k, s, p)
            assert out.dtype == dtype and torch.isfinite(out).all()
            tol = 1e-2 if dtype == torch.float16 else 1e-5
            assert (out.double() - ref).abs().max() <= tol * ref.abs().max()
