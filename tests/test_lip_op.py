"""The LIP operator (models/lip.py): exactness, half precision, large logits, memory, both CPU backends."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import models.lip as lip
from models.lip import gated_lip2d, lip2d, lip_backend
from models.lip_extension import extension_spec

REPO = Path(__file__).resolve().parents[1]
GEOMETRIES = [(3, 2, 1), (2, 2, 0), (3, 1, 1)]
HAVE_COMPILER = shutil.which(os.environ.get("CXX", "c++")) is not None


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add barrier waits on a busy machine (threads are tested below)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=["cpp", "torch"])
def backend(request, monkeypatch) -> str:
    """Run a test once per CPU backend; LIP_BACKEND=cpp fails loudly if the kernel is not built."""
    if request.param == "cpp" and not HAVE_COMPILER:
        pytest.skip("no C++ compiler on this machine, so no C++ kernel to test")
    monkeypatch.setenv("LIP_BACKEND", request.param)
    return request.param


def naive(x: torch.Tensor, logit: torch.Tensor, k: int = 3, s: int = 2, p: int = 1) -> torch.Tensor:
    """The authors' formula."""
    w = logit.exp()
    return F.avg_pool2d(x * w, k, s, p) / F.avg_pool2d(w, k, s, p)


def value_and_grads(fn, x: torch.Tensor, t: torch.Tensor, g: torch.Tensor | None = None, seed: int = 0):
    x, t = x.detach().requires_grad_(), t.detach().requires_grad_()
    y = fn(x, t)
    if g is None:
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    dx, dt = torch.autograd.grad(y, (x, t), g.to(y.dtype))
    return y, dx, dt


def rel_err(actual: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest error relative to the tensor's scale."""
    return ((actual.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def randn(*shape, seed=0, dtype=torch.float64, scale=1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_extension_is_built_and_loaded(monkeypatch):
    """`make test` runs `make setup` first, which builds the kernel; only a missing compiler excuses it."""
    if not HAVE_COMPILER:
        pytest.skip("no C++ compiler on this machine; the pure-PyTorch path is in use")
    monkeypatch.delenv("LIP_BACKEND", raising=False)
    assert lip_backend() == "cpp", lip._extension()[1]
    monkeypatch.setenv("LIP_BACKEND", "torch")
    assert lip_backend() == "torch"


@pytest.mark.slow
def test_build_script_is_a_quick_noop_when_up_to_date():
    if not HAVE_COMPILER:
        pytest.skip("no C++ compiler on this machine")
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "build_ext.py")], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines() == [f"lip extension: up to date "
                                                f"({extension_spec().library.relative_to(REPO)})"]


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    monkeypatch.delenv("LIP_BACKEND", raising=False)
    monkeypatch.setattr(lip, "_extension", lambda: (None, "no build at build/lip_ext/x"))
    monkeypatch.setattr(lip, "_warned", set())
    with pytest.warns(UserWarning, match="pure-PyTorch path.*build_ext.py"):
        assert lip_backend() == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = randn(1, 2, 5, 5)
        assert torch.allclose(lip2d(x, x), naive(x, x))
    monkeypatch.setenv("LIP_BACKEND", "cpp")
    with pytest.raises(RuntimeError, match="LIP_BACKEND=cpp"):
        lip_backend()
    monkeypatch.setenv("LIP_BACKEND", "fast")
    with pytest.raises(ValueError, match="LIP_BACKEND"):
        lip_backend()


def test_backend_choice_per_device(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("LIP_BACKEND", "torch")
    assert lip_backend("cpu") == lip_backend("cuda") == lip_backend("meta") == "torch"
    monkeypatch.setenv("LIP_BACKEND", "auto")
    assert lip_backend("meta") == "torch"  # no kernel for other devices: the exact pure-PyTorch path
    monkeypatch.setenv("LIP_BACKEND", "cpp")
    with pytest.raises(RuntimeError, match="CPU only"):
        lip_backend("cuda")
    monkeypatch.setenv("LIP_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        lip_backend("cpu")


@pytest.mark.parametrize("coeff", [12.0, -12.0])
def test_gated_logit_range_is_not_checked(monkeypatch, coeff):
    """coeff * sigmoid(z) lies between 0 and coeff: the pure-PyTorch path skips its range check (a host sync)."""
    monkeypatch.setenv("LIP_BACKEND", "torch")

    def no_check(_s):
        raise AssertionError("range checked")

    monkeypatch.setattr(lip, "_outside_planes", no_check)
    x, z = randn(1, 2, 6, 6, seed=29), randn(1, 2, 6, 6, seed=30, scale=5.0)
    y, dx, dz = value_and_grads(lambda a, b: gated_lip2d(a, b, coeff), x, z)
    ref = value_and_grads(lambda a, b: naive(a, coeff * torch.sigmoid(b)), x, z)
    for a, b in zip((y, dx, dz), ref, strict=True):
        assert (a - b).abs().max().item() < 1e-9
    with pytest.raises(AssertionError, match="range checked"):
        lip2d(x, z)


@pytest.mark.parametrize("gated", [False, True])
def test_gradcheck_float64(backend, gated):
    x = randn(2, 2, 5, 6, seed=1).requires_grad_()
    t = randn(2, 2, 5, 6, seed=2, scale=2.0).requires_grad_()
    for k, s, p in GEOMETRIES:
        if gated:
            assert torch.autograd.gradcheck(lambda a, b, k=k, s=s, p=p: gated_lip2d(a, b, 12.0, k, s, p), (x, t))
        else:
            assert torch.autograd.gradcheck(lambda a, b, k=k, s=s, p=p: lip2d(a, b, k, s, p), (x, t))


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("size", [(7, 9), (8, 8), (13, 6)])
def test_float64_matches_formula(backend, geometry, size):
    k, s, p = geometry
    x, t = randn(2, 3, *size, seed=3), randn(2, 3, *size, seed=4, scale=4.0)
    ours = value_and_grads(lambda a, b: lip2d(a, b, k, s, p), x, t)
    ref = value_and_grads(lambda a, b: naive(a, b, k, s, p), x, t)
    for a, b in zip(ours, ref, strict=True):
        assert a.dtype == torch.float64 and a.shape == b.shape
        assert (a - b).abs().max().item() < 1e-9
    gated = value_and_grads(lambda a, b: gated_lip2d(a, b, 12.0, k, s, p), x, t)
    ref = value_and_grads(lambda a, b: naive(a, 12.0 * torch.sigmoid(b), k, s, p), x, t)
    for a, b in zip(gated, ref, strict=True):
        assert (a - b).abs().max().item() < 1e-9


def test_zero_logit_is_average_pooling_over_valid_elements(backend):
    x = randn(2, 3, 7, 8, seed=5)
    for k, s, p in GEOMETRIES:
        expected = F.avg_pool2d(x, k, s, p, count_include_pad=False)
        assert (lip2d(x, torch.zeros_like(x), k, s, p) - expected).abs().max().item() < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_logits_approach_max_pooling(backend, dtype):
    """logit = 5000 x (|logit| up to 13500) overflows the plain formula; we tend to max pooling instead."""
    gen = torch.Generator().manual_seed(6)
    x = ((torch.randperm(2 * 3 * 9 * 10, generator=gen).to(dtype) - 270) / 100).view(2, 3, 9, 10)
    logit = 5000 * x  # distinct x differ by >= 0.01, so logits by >= 50: runner-up weights < exp(-50)
    assert not torch.isfinite(naive(x, logit)).all()
    y, dx, dt = value_and_grads(lambda a, b: lip2d(a, b), x, logit, torch.ones(2, 3, 5, 5))
    assert torch.equal(y, F.max_pool2d(x, 3, 2, 1))
    assert torch.isfinite(dt).all() and dt.abs().max().item() < 1e-12
    # The gradient flows to each window's maximum, as for max pooling.
    x_req = x.clone().requires_grad_()
    F.max_pool2d(x_req, 3, 2, 1).backward(torch.ones(y.shape, dtype=dtype))
    assert (dx - x_req.grad).abs().max().item() < 1e-12


def test_mixed_ranges_within_one_tensor_stay_exact(backend):
    """Planes needing the max-shifted path and ordinary planes in one call both match float64."""
    x = randn(2, 4, 9, 8, seed=7)
    t = randn(2, 4, 9, 8, seed=8, scale=3.0)
    t[0, 1] *= 60  # this plane spans about +-500
    t[1, 3] += 80  # exp(80) alone would overflow a float32 window sum
    x, t = x.float(), t.float()
    ref = value_and_grads(lip2d, x.double(), t.double())
    ours = value_and_grads(lip2d, x, t)
    for a, b in zip(ours, ref, strict=True):
        assert torch.isfinite(a).all()
        assert rel_err(a, b) < 1e-4  # logits ~500 amplify their own float32 rounding (ulp 3e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_with_large_logits(backend, dtype):
    x = randn(2, 4, 11, 10, seed=9).to(dtype)
    z = randn(2, 4, 11, 10, seed=10, scale=8.0).to(dtype)  # gate saturates: logits reach 12
    logit = (12 * torch.sigmoid(z.double())).to(dtype)
    assert logit.max().item() == 12
    if dtype == torch.float16:
        assert not torch.isfinite(naive(x, logit)).all()  # exp(12) = 162755 > fp16 max
    g = randn(2, 4, 6, 5, seed=11).to(dtype)  # the same rounded inputs for both
    for fn, t in ((lip2d, logit), (lambda a, b: gated_lip2d(a, b, 12.0), z)):
        y, dx, dt = value_and_grads(fn, x, t, g)
        ref = value_and_grads(fn, x.double(), t.double(), g.double())
        assert y.dtype == dx.dtype == dt.dtype == dtype
        for a, b in zip((y, dx, dt), ref, strict=True):
            assert torch.isfinite(a).all()
            assert rel_err(a, b) < 1e-2


def test_cpu_bf16_autocast_mixed_dtypes(backend):
    """Under autocast a conv gives bf16 x and an instance norm fp32 logits; result follows the formula."""
    torch.manual_seed(11)
    conv, norm = nn.Conv2d(3, 4, 3, padding=1), nn.InstanceNorm2d(4, affine=True)
    inp = randn(2, 3, 12, 12, seed=12, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = conv(inp)
        z = norm(conv(inp).float()) * 4
        assert x.dtype == torch.bfloat16 and z.dtype == torch.float32
        y, dx, dz = value_and_grads(lambda a, b: gated_lip2d(a, b, 12.0), x, z)
    assert y.dtype == torch.float32 and dx.dtype == torch.bfloat16 and dz.dtype == torch.float32
    ref = value_and_grads(lambda a, b: gated_lip2d(a, b, 12.0), x.double(), z.double())
    for a, b in zip((y, dx, dz), ref, strict=True):
        assert torch.isfinite(a).all() and rel_err(a, b) < 1e-2


def test_mixed_dtypes_promote():
    x, t = randn(1, 2, 6, 6, seed=13), randn(1, 2, 6, 6, seed=14)
    assert lip2d(x.float(), t).dtype == torch.float64
    assert lip2d(x.bfloat16(), t.float()).dtype == torch.float32
    assert lip2d(x.half(), t.half()).dtype == torch.float16
    y, dx, dt = value_and_grads(lip2d, x.half(), t.float())
    assert (y.dtype, dx.dtype, dt.dtype) == (torch.float32, torch.float16, torch.float32)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_channels_last(backend, geometry):
    """channels_last in, channels_last out (and grads), exact in float64, a max-shifted plane included."""
    k, s, p = geometry
    cl = torch.channels_last
    x, t = randn(2, 5, 9, 10, seed=15), randn(2, 5, 9, 10, seed=16, scale=3.0)
    t[1, 2] *= 50  # logits up to ~500: this plane takes the max-shifted path
    for fn in (lambda a, b: lip2d(a, b, k, s, p), lambda a, b: gated_lip2d(a, b, 12.0, k, s, p)):
        ref = value_and_grads(fn, x, t)
        ours = value_and_grads(fn, x.contiguous(memory_format=cl), t.contiguous(memory_format=cl))
        for a, b in zip(ours, ref, strict=True):
            assert a.is_contiguous(memory_format=cl) and not a.is_contiguous()
            assert rel_err(a, b) < 1e-12
    ref = value_and_grads(lambda a, b: naive(a, b, k, s, p), x, t)
    ours = value_and_grads(lambda a, b: lip2d(a, b, k, s, p), x.contiguous(memory_format=cl),
                           t.contiguous(memory_format=cl))
    for a, b in zip(ours, ref, strict=True):
        assert (a - b).abs().max().item() < 1e-9 * b.abs().max().item()
    x32, t32 = (v.float().contiguous(memory_format=cl) for v in (x, t))
    ours = value_and_grads(lambda a, b: gated_lip2d(a, b, 12.0, k, s, p), x32, t32)
    ref = value_and_grads(lambda a, b: gated_lip2d(a, b, 12.0, k, s, p), x32.contiguous(), t32.contiguous())
    for a, b in zip(ours, ref, strict=True):
        assert rel_err(a, b) < 1e-6


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_channels_last_with_many_channels(backend, geometry):
    """Wide channel vectors (37 channels, not a multiple of any vector width) with max-shifted planes in two
    images: the same values and gradients as NCHW, in float64."""
    k, s, p = geometry
    cl = torch.channels_last
    x, t = randn(3, 37, 11, 12, seed=19), randn(3, 37, 11, 12, seed=20, scale=3.0)
    t[1, 20] *= 50
    t[2, 35] *= 50
    for fn in (lambda a, b: lip2d(a, b, k, s, p), lambda a, b: gated_lip2d(a, b, 12.0, k, s, p)):
        ref = value_and_grads(fn, x, t)
        ours = value_and_grads(fn, x.contiguous(memory_format=cl), t.contiguous(memory_format=cl))
        for a, b in zip(ours, ref, strict=True):
            assert a.is_contiguous(memory_format=cl) and rel_err(a, b) < 1e-12


def test_backends_agree_in_float32(monkeypatch):
    if not HAVE_COMPILER:
        pytest.skip("no C++ compiler on this machine, so only one backend")
    x = randn(3, 4, 23, 18, seed=17, dtype=torch.float32)
    z = randn(3, 4, 23, 18, seed=18, dtype=torch.float32, scale=2.0)
    results = {}
    for name in ("cpp", "torch"):
        monkeypatch.setenv("LIP_BACKEND", name)
        results[name] = (value_and_grads(lambda a, b: lip2d(a, 12 * torch.sigmoid(b)), x, z)
                         + value_and_grads(lambda a, b: gated_lip2d(a, b), x, z))
    for a, b in zip(results["cpp"], results["torch"], strict=True):
        assert rel_err(a, b) < 2e-6


def test_thread_count_does_not_change_results(backend):
    x = randn(4, 6, 30, 31, seed=27, dtype=torch.float32)
    z = randn(4, 6, 30, 31, seed=28, dtype=torch.float32, scale=3.0)
    z[1, 2] *= 40  # a max-shifted plane too
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            for fmt in (torch.contiguous_format, torch.channels_last):
                results.append(value_and_grads(gated_lip2d, x.contiguous(memory_format=fmt),
                                               z.contiguous(memory_format=fmt)))
        finally:
            torch.set_num_threads(1)
    for a, b in zip(results[:2], results[2:], strict=True):
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def test_float32_error_is_that_of_the_formula(backend):
    """Per element, our float32 result is as close to float64 as the authors' float32 formula is."""
    x = randn(4, 8, 30, 30, seed=19, dtype=torch.float32)
    logit = 12 * torch.sigmoid(randn(4, 8, 30, 30, seed=20, dtype=torch.float32, scale=2.0))
    ref = value_and_grads(naive, x.double(), logit.double())
    ours = value_and_grads(lip2d, x, logit)
    theirs = value_and_grads(naive, x, logit)
    for a, b, r in zip(ours, theirs, ref, strict=True):
        scale = r.abs().max().item()
        ours_err = (a.double() - r).abs().max().item() / scale
        their_err = (b.double() - r).abs().max().item() / scale
        assert ours_err < max(2 * their_err, 5e-7), (ours_err, their_err)


def test_nan_propagates(backend):
    x, t = randn(1, 2, 6, 6, seed=21, dtype=torch.float32), randn(1, 2, 6, 6, seed=22, dtype=torch.float32)
    x[0, 0, 2, 2] = float("nan")
    t[0, 1, 0, 0] = float("nan")
    y = lip2d(x, t)
    assert torch.isnan(y[0, 0, 1, 1]) and torch.isnan(y[0, 1, 0, 0])
    assert torch.isfinite(y[0, 0, 0, 0]) and torch.isfinite(y[0, 1, 2, 2])


@pytest.mark.parametrize("gated", [False, True])
def test_backward_saves_only_inputs_and_output_sized_tensors(backend, gated):
    x = randn(2, 8, 32, 32, seed=23, dtype=torch.float32).requires_grad_()
    t = randn(2, 8, 32, 32, seed=24, dtype=torch.float32).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda v: saved.append(v) or v, lambda v: v):
        y = gated_lip2d(x, t) if gated else lip2d(x, t)
    inputs = {x.untyped_storage().data_ptr(), t.untyped_storage().data_ptr()}
    others = [v for v in saved if v.untyped_storage().data_ptr() not in inputs]
    assert len(saved) - len(others) == 2
    assert all(v.numel() <= y.numel() for v in others)
    assert sum(v.untyped_storage().nbytes() for v in others) <= 3 * y.untyped_storage().nbytes()
    y.sum().backward()
    assert x.grad.shape == x.shape and t.grad.shape == t.shape


def test_backward_allocates_no_gradients_for_the_state_outputs(backend):
    """Autograd must not materialise zero gradients for out_exact, the state and aux (output-sized each)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    x = randn(1, 2, 8, 8, seed=25, dtype=torch.bfloat16).requires_grad_()
    t = randn(1, 2, 8, 8, seed=26, dtype=torch.bfloat16).requires_grad_()
    y = gated_lip2d(x, t)
    with Calls() as calls:
        torch.autograd.grad(y, (x, t), torch.ones_like(y))
    assert not [name for name in calls.names if "zeros" in name], calls.names


def test_invalid_arguments_are_one_line_errors():
    x = torch.zeros(1, 2, 5, 5)
    with pytest.raises(ValueError, match="one shape"):
        lip2d(x, torch.zeros(1, 2, 5, 4))
    with pytest.raises(ValueError, match="padding"):
        lip2d(x, x, 3, 2, 2)
    with pytest.raises(ValueError, match="smaller than kernel_size"):
        lip2d(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), 5, 1, 1)
    with pytest.raises(TypeError, match="floating point"):
        lip2d(x.long(), x)


def test_inside_ddp(backend, tmp_path):
    """A DistributedDataParallel module (gloo, one process) trains through gated_lip2d."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.logit = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, v: torch.Tensor) -> torch.Tensor:
            return gated_lip2d(self.conv(v), self.logit(v)).mean((1, 2, 3))

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(25)
        model = nn.parallel.DistributedDataParallel(Net())
        loss = model(randn(2, 3, 10, 10, seed=26, dtype=torch.float32)).sum()
        loss.backward()
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("gated", [False, True])
def test_scale_and_shift_gradcheck_float64(backend, layout, gated):
    """The per-plane affine logit t * scale + shift, large scales (shifted planes) included."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = randn(2, 3, 7, 6, seed=40, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
    t = randn(2, 3, 7, 6, seed=41, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
    scale = (torch.tensor([[0.5, 80.0, 2.0], [3.0, 0.1, 150.0]], dtype=torch.float64)).requires_grad_()
    shift = randn(2, 3, seed=42, dtype=torch.float64).requires_grad_()
    coeff = 12.0 if gated else 0.0

    def op(a, b, c, d):
        return torch.ops.lip.forward(a, b, coeff, gated, 3, 2, 1, c, d)[0]

    assert torch.autograd.gradcheck(op, (x, t, scale, shift), fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_norm_gated_lip2d_is_the_instance_norm_then_the_gate(backend, dtype, layout):
    """The folded norm against float64 instance_norm + gate + formula: value and the x, f, weight, bias grads."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = randn(2, 5, 9, 7, seed=43).to(dtype).contiguous(memory_format=fmt).requires_grad_()
    f = (3 * randn(2, 5, 9, 7, seed=44) + 2).to(dtype).contiguous(memory_format=fmt).requires_grad_()
    w, b = randn(5, seed=45).float().requires_grad_(), randn(5, seed=46).float().requires_grad_()
    y = lip.norm_gated_lip2d(x, f, w, b, 1e-5)
    g = randn(*y.shape, seed=47).to(y.dtype)
    ours = (y, *torch.autograd.grad(y, (x, f, w, b), g))
    xd, fd, wd, bd = (v.detach().double().requires_grad_() for v in (x, f, w, b))
    ref = naive(xd, 12 * torch.sigmoid(F.instance_norm(fd, weight=wd, bias=bd, eps=1e-5)))
    truth = (ref, *torch.autograd.grad(ref, (xd, fd, wd, bd), g.double()))
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    for name, a, r in zip(("out", "dx", "df", "dw", "db"), ours, truth, strict=True):
        assert a.dtype == (dtype if name in ("out", "dx", "df") else torch.float32), name
        assert rel_err(a, r) <= tol, (name, rel_err(a, r))
    assert ours[1].is_contiguous(memory_format=fmt) and ours[2].is_contiguous(memory_format=fmt)


def test_lip_layers_script_in_eval_mode():
    """TorchScript of the LIP layers (the folded norm included) in eval mode gives eager's output."""
    from models.layers import ProjectionLIP, SharedLIP, SimplifiedLIP

    torch.manual_seed(0)
    x = randn(2, 8, 9, 9, seed=48, dtype=torch.float32)
    for layer, args in ((SimplifiedLIP(8), (x,)), (ProjectionLIP(8, width=4), (x,)),
                        (SharedLIP(8, width=4), (x, randn(2, 4, 9, 9, seed=49, dtype=torch.float32)))):
        layer.eval()
        scripted = torch.jit.script(layer)
        torch.testing.assert_close(scripted(*args), layer(*args))
