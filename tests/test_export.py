"""scripts/export.py: safetensors that timm loads, ONNX that onnxruntime runs on real images; the authors'
release layout through timm."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torchvision import transforms
from train_utils import make_dataset, run

from models import LIPPool, create_model
from models.lip import _exact_forward, export_decompositions, gated_lip2d, lip2d, norm_gated_lip2d
from scripts.export import FP16_TOLERANCE, TOLERANCE, build, export_onnx
from scripts.export import trained_looking as randomised
from training.errors import UserError


def trained_looking(name: str, num_classes: int = 1000, seed: int = 0) -> nn.Module:
    """A model whose BN statistics and LIP logit modules are not at their init, so every part matters."""
    torch.manual_seed(seed)
    return randomised(create_model(name, num_classes=num_classes), seed)


def export(*args: str) -> str:
    done = run([sys.executable, "scripts/export.py", *args], timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    """A LIP-ResNet-50 in the authors' release layout: {'state_dict': {'module.' + key: tensor}}."""
    model = trained_looking("lip_resnet50")
    path = tmp_path_factory.mktemp("release") / "lip_resnet-50.pth.tar"
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}, "epoch": 90}, path)
    return path, model


def test_the_release_loads_through_timm(release: tuple[Path, nn.Module]) -> None:
    path, reference = release
    model = timm.create_model("lip_resnet50", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


@pytest.mark.slow
def test_safetensors_loads_in_timm_to_the_same_logits(release: tuple[Path, nn.Module], tmp_path: Path) -> None:
    path, reference = release
    out = tmp_path / "lip_resnet50.safetensors"
    # configs/lip_resnet50.yaml leaves data.root unset: export needs no dataset
    printed = export("--config", "configs/lip_resnet50.yaml", "--checkpoint", str(path), "--format", "safetensors",
                     "--out", str(out))
    assert "timm.create_model('lip_resnet50', pretrained=True" in printed
    model = timm.create_model("lip_resnet50", pretrained=True, pretrained_cfg_overlay=dict(file=str(out))).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


@pytest.mark.slow
def test_safetensors_of_a_lipified_model_with_its_own_classes(tmp_path: Path) -> None:
    reference = trained_looking("lip_resnet18", num_classes=6)
    ckpt = tmp_path / "last.pth"
    torch.save({"model": reference.state_dict(), "epoch": 1}, ckpt)
    out = tmp_path / "lip_resnet18.safetensors"
    export("--config", "configs/demo.yaml", "--checkpoint", str(ckpt), "--format", "safetensors", "--out", str(out),
           "model=lip_resnet18")
    model = timm.create_model("lip_resnet18", pretrained=True, num_classes=6,
                              pretrained_cfg_overlay=dict(file=str(out), num_classes=6)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


def real_images(data: Path, size: int, resize: int) -> torch.Tensor:
    """The val JPEGs preprocessed as the ONNX metadata says: resize, center crop, ImageNet mean/std."""
    prep = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(size), transforms.ToTensor(),
                               transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
    return torch.stack([prep(Image.open(f).convert("RGB")) for f in sorted(data.glob("val/*/*.JPEG"))])


@pytest.mark.slow
def test_onnx_matches_pytorch_on_real_images_with_any_batch(tmp_path: Path) -> None:
    name = "lip_resnet_tiny"  # every LIP layer kind of LIP-ResNet (lip_resnet18 also passes; it takes 2x longer)
    data = make_dataset(tmp_path / "data", classes=3, train=1, val=2, size=80)
    reference = trained_looking(name, num_classes=3)
    ckpt = tmp_path / "last.pth"
    torch.save({"model": reference.state_dict(), "epoch": 1}, ckpt)
    out = tmp_path / f"{name}.onnx"
    printed = export("--config", "configs/demo.yaml", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(out),
                     f"model={name}", f"data.root={data}")
    assert "onnxruntime matches PyTorch" in printed
    assert re.search(r"latency at batch 1 \(\d+ threads, median of \d+\): onnxruntime [\d.]+ ms, PyTorch eager "
                     r"[\d.]+ ms", printed)

    proto = onnx.load(str(out))
    assert {node.domain for node in proto.graph.node} <= {"", "ai.onnx"}  # plain ONNX, no custom LIP op
    ops = [node.op_type for node in proto.graph.node]
    assert {"AveragePool", "Sigmoid", "Exp"} <= set(ops) and not {"Concat", "ReduceMax", "Slice"} & set(ops)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch dimension
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["image_size"] == "64" and meta["resize_shorter"] == "73" and meta["num_classes"] == "3"

    images = real_images(data, 64, 73)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (images, images[:1]):
        got = session.run(["logits"], {"image": batch.numpy()})[0]
        with torch.no_grad():
            want = reference(batch).numpy()
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.slow
def test_bad_inputs_are_one_line_errors(tmp_path: Path) -> None:
    ckpt = tmp_path / "tiny.pth"
    torch.save({"model": create_model("lip_resnet_tiny", num_classes=6).state_dict()}, ckpt)
    onnx_out = ["--format", "onnx", "--out", str(tmp_path / "m.onnx")]
    cases = [
        (["--checkpoint", str(tmp_path / "nope.pth"), *onnx_out], "checkpoint file not found"),
        (["--checkpoint", str(ckpt), "--format", "safetensors", "--out", str(tmp_path / "m.bin")],
         "must end in .safetensors"),
        (["--checkpoint", str(ckpt), *onnx_out, "num_classes=10"], "num_classes=10 in the config, but the classifier"),
    ]
    for args, message in cases:
        done = run([sys.executable, "scripts/export.py", "--config", "configs/demo.yaml", *args])
        assert done.returncode == 2, (args, done.stderr[-2000:])
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, done.stderr)
        assert not (tmp_path / "m.onnx").exists()
    with pytest.raises(UserError, match="no classifier weight 'classifier.weight' in it; is it a lip_densenet121"):
        build("lip_densenet121", ckpt, None)


GEOMETRIES = [(3, 2, 1), (2, 2, 0)]  # ResNet's and DenseNet's LIP windows


def lip_layers(model: nn.Module) -> int:
    return sum(isinstance(m, LIPPool) for m in model.modules())


def formula64(x: torch.Tensor, logit: torch.Tensor, k: int, s: int, p: int) -> torch.Tensor:
    """The authors' formula in float64 (exp(+-450) is finite there, so no shift is needed)."""
    w = logit.double().exp()
    return F.avg_pool2d(x.double() * w, k, s, p) / F.avg_pool2d(w, k, s, p)


class Pool(nn.Module):
    """One LIP layer of either form: soft-gated, or plain lip2d with logit = gain * t."""

    def __init__(self, form: str, k: int, s: int, p: int) -> None:
        super().__init__()
        self.form, self.geometry = form, (k, s, p)

        gen = torch.Generator().manual_seed(3)
        self.weight, self.bias = torch.rand(5, generator=gen) + 0.5, torch.randn(5, generator=gen)

    def logit(self, t: torch.Tensor) -> torch.Tensor:
        if self.form == "norm_gated":
            t = F.instance_norm(t, weight=self.weight.to(t.dtype), bias=self.bias.to(t.dtype))
        if self.form in ("gated", "norm_gated"):
            return 12 * torch.sigmoid(t)
        return t * (100.0 if self.form == "plain100" else 1.0)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.form == "gated":
            return gated_lip2d(x, t, 12.0, *self.geometry)
        if self.form == "norm_gated":
            return norm_gated_lip2d(x, t, self.weight, self.bias, 1e-5, 12.0, *self.geometry)
        return lip2d(x, self.logit(t), *self.geometry)


def to_onnx(module: nn.Module, example: tuple[torch.Tensor, ...], path: Path) -> onnx.ModelProto:
    batch = torch.export.Dim("batch", min=1, max=64)
    with torch.no_grad():
        program = torch.export.export(module.eval(), example, dynamic_shapes=tuple({0: batch} for _ in example))
        program = program.run_decompositions(export_decompositions())
        torch.onnx.export(program, example, str(path), external_data=False, verbose=False)
    return onnx.load(str(path))


def ort_run(path: Path, *inputs: torch.Tensor) -> torch.Tensor:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return torch.from_numpy(session.run(None, {n: v.numpy() for n, v in zip(names, inputs, strict=True)})[0])


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "k{}s{}p{}".format(*g))
@pytest.mark.parametrize("form", ["gated", "norm_gated", "plain", "plain100"])
def test_lip_layer_in_onnxruntime_equals_the_formula_and_pytorch(form: str, geometry: tuple[int, int, int],
                                                                 tmp_path: Path, monkeypatch) -> None:
    """Odd sizes, another batch than the export's. norm_gated folds an instance norm into the op; plain100
    (logit = 100 x) spans ~900 within a plane, where unshifted exp overflows and a per-plane shift would
    underflow whole windows."""
    module = Pool(form, *geometry)
    gen = torch.Generator().manual_seed(0)
    x, t = (torch.randn(3, 5, 13, 11, generator=gen) for _ in range(2))
    if form == "plain100":
        t = x.clone()
    proto = to_onnx(module, (x[:2], t[:2]), tmp_path / "lip.onnx")
    ops = [node.op_type for node in proto.graph.node]
    assert "Concat" not in ops and "ReduceMax" not in ops  # no stack of window taps, no reduction over it
    k = geometry[0]
    if form.endswith("gated"):
        assert ops.count("AveragePool") == 2 and "Slice" not in ops and "MaxPool" not in ops
    else:  # each window shifted by its own maximum: one MaxPool, then the k*k taps one at a time
        assert ops.count("MaxPool") == 1 and ops.count("Exp") == k * k
    got = ort_run(tmp_path / "lip.onnx", x, t)
    want = formula64(x, module.logit(t.double()), *geometry)
    assert torch.isfinite(got).all()
    scale = x.abs().max().item()
    assert (got.double() - want).abs().max().item() <= 1e-5 * scale
    for backend in ("cpp", "torch"):
        monkeypatch.setenv("LIP_BACKEND", backend)
        with torch.no_grad():
            assert (got - module(x, t)).abs().max().item() <= 1e-5 * scale, backend


@pytest.mark.parametrize("gated", [True, False])
def test_the_decomposition_applies_a_per_plane_affine_before_the_gate(gated: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    x, t = (torch.randn(2, 4, 9, 8, generator=gen) for _ in range(2))
    scale, shift = torch.rand(2, 4, generator=gen) + 0.5, torch.randn(2, 4, generator=gen)
    z = t * scale[:, :, None, None] + shift[:, :, None, None]
    for k, s, p in GEOMETRIES:
        out = _exact_forward(x, t, 12.0 if gated else 0.0, gated, k, s, p, scale, shift)[0]
        want = formula64(x, 12 * torch.sigmoid(z.double()) if gated else z, k, s, p)
        torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-5)
        plain = _exact_forward(x, z, 12.0 if gated else 0.0, gated, k, s, p)[0]
        torch.testing.assert_close(plain, out, rtol=0, atol=1e-6)


def test_gated_weights_stay_in_float16_range() -> None:
    """exp(12 sigmoid(z) - 12) lies in [exp(-12), 1]: no window sum can overflow in fp16, none vanishes."""
    z = torch.linspace(-40, 40, 2001).view(1, 1, 1, -1).expand(1, 1, 3, -1).contiguous()
    out = _exact_forward(z.half(), z.half(), 12.0, True, 3, 2, 1)[0]
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    e = torch.exp(12 * torch.sigmoid(z) - 12)
    assert e.max() <= 1 and e.min() >= np.exp(-12) * (1 - 1e-6) and e.min() > torch.finfo(torch.float16).tiny / 16


def test_tiny_lip_model_in_onnxruntime_equals_pytorch_for_any_batch(tmp_path: Path, monkeypatch) -> None:
    model = trained_looking("lip_resnet_tiny", num_classes=7)
    size = 45  # odd: every LIP window geometry meets the border
    error = export_onnx(model, tmp_path / "tiny.onnx", size, {})
    assert error <= TOLERANCE
    ops = [node.op_type for node in onnx.load(str(tmp_path / "tiny.onnx")).graph.node]
    layers = lip_layers(model)
    assert ops.count("AveragePool") == 2 * layers and ops.count("Exp") == layers
    assert not {"Concat", "Slice", "ReduceMax"} & set(ops)
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(2))
    for backend in ("cpp", "torch"):
        monkeypatch.setenv("LIP_BACKEND", backend)
        for batch in (images, images[:1]):
            got = ort_run(tmp_path / "tiny.onnx", batch)
            with torch.no_grad():
                want = model(batch)
            assert (got - want).abs().max() <= TOLERANCE * want.abs().max(), backend


def every_tensor_finite(path: Path, image: torch.Tensor) -> tuple[int, list[str]]:
    """(number of intermediate tensors, names of the non-finite ones) of the graph at `path` on `image`."""
    proto = onnx.load(str(path))
    proto = onnx.shape_inference.infer_shapes(proto)
    known = {v.name for v in proto.graph.output}
    extra = [v for v in proto.graph.value_info if v.name not in known
             and v.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    proto.graph.output.extend(extra)
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, {"image": image.numpy()})
    return len(values), [n for n, v in zip(names, values, strict=True) if not np.isfinite(v).all()]


def test_fp16_graph_is_finite_and_close(tmp_path: Path) -> None:
    """onnxruntime's CPU provider runs the float16 graph: every tensor in it stays finite."""
    model = trained_looking("lip_resnet_tiny", num_classes=7)
    path = tmp_path / "tiny16.onnx"
    assert export_onnx(model, path, 33, {}, fp16=True) <= FP16_TOLERANCE
    proto = onnx.load(str(path))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in proto.graph.initializer)
    count, bad = every_tensor_finite(path, 4 * torch.randn(2, 3, 33, 33))
    assert count > 50 and not bad


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lip_resnet50", "lip_densenet121"])
def test_full_lip_models_in_onnxruntime_equal_pytorch(name: str, tmp_path: Path) -> None:
    model = trained_looking(name, num_classes=10)
    path = tmp_path / f"{name}.onnx"
    assert export_onnx(model, path, 65, {}) <= TOLERANCE  # checked at batch 3, exported at batch 2
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert ops.count("Exp") == lip_layers(model) and "ReduceMax" not in ops and "Slice" not in ops
