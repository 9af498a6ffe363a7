"""scripts/export.py: safetensors that timm loads, ONNX that onnxruntime runs on real images; the authors'
release layout through timm."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import timm
import torch
from PIL import Image
from torch import nn
from torchvision import transforms
from train_utils import make_dataset, run

from data.geometry import MEAN, STD
from models import LIPPool, create_model
from scripts.export import build
from training.errors import UserError


def trained_looking(name: str, num_classes: int = 1000, seed: int = 0) -> nn.Module:
    """A model whose BN statistics and LIP logit modules are not at their init, so every part matters."""
    torch.manual_seed(seed)
    model = create_model(name, num_classes=num_classes)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
        elif isinstance(m, LIPPool):
            for conv in m.logit_module():
                if isinstance(conv, nn.Conv2d):
                    nn.init.normal_(conv.weight, 0, 0.1)
    return model.eval()


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
                               transforms.Normalize(MEAN, STD)])
    return torch.stack([prep(Image.open(f).convert("RGB")) for f in sorted(data.glob("val/*/*.JPEG"))])


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

    proto = onnx.load(str(out))
    assert {node.domain for node in proto.graph.node} <= {"", "ai.onnx"}  # plain ONNX, no custom LIP op
    assert {"ReduceMax", "Sub", "Exp"} <= {node.op_type for node in proto.graph.node}  # window-max shift
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
