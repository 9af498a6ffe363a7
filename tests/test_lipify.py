"""lipify on four timm families: shapes, kept weights, LIP classes, a training step, errors, train.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from train_utils import make_dataset, run, tiny_run

from models import LIPPool, create_model, importance_maps, lipify
from models.lipify import LIP2d, LIPConv2d, logit_module

FAMILIES = {  # timm model: (strided layers converted, the first of them)
    "resnet18": (7, "maxpool"),
    "efficientnet_b0": (4, "blocks.1.0.conv_dw"),
    "convnext_atto": (3, "stages.1.downsample.1"),
    "vgg11_bn": (5, "features.3"),
}

# VGG's 4096-wide 7x7 pre-logits conv (103M parameters) only slows the tests down; it has no stride.
SMALL = {"vgg11_bn": {"mlp_ratio": 1 / 64}}


def stages(model: nn.Module, x: torch.Tensor) -> list[torch.Size]:
    feats = model.forward_intermediates(x, intermediates_only=True)
    return [f.shape for f in feats] + [model(x).shape]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_shapes_keys_and_weights_are_kept(name: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **SMALL.get(name, {})).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 64, 64)
    shapes = stages(model, x)

    assert lipify(model) is model
    assert stages(model, x) == shapes
    after = model.state_dict()
    for key, value in before.items():
        assert key in after and torch.equal(after[key], value), key
    new = [k for k in after if k not in before]
    assert new and all(".logit." in k for k in new)

    count, first = FAMILIES[name]
    inserted = [(n, m) for n, m in model.named_modules() if isinstance(m, LIPPool)]
    assert len(inserted) == count
    assert all("LIP" in type(m).__name__ for _, m in inserted)
    assert inserted[0][0].removesuffix(".lip") == first
    stem = model.pretrained_cfg["first_conv"]
    assert type(model.get_submodule(stem)) is nn.Conv2d  # the stem is left as it is


@pytest.mark.parametrize("name", list(FAMILIES))
def test_one_training_step_is_finite_and_reaches_the_logit_modules(name: str) -> None:
    torch.manual_seed(0)
    # timm zero-inits ResNet's last BN of each residual branch, which would cut the branch LIPs' gradient.
    extra = {"zero_init_last": False} if name == "resnet18" else SMALL.get(name, {})
    model = lipify(timm.create_model(name, num_classes=10, **extra),
                   logit="bottleneck" if name == "vgg11_bn" else "depthwise")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss = F.cross_entropy(model(torch.randn(2, 3, 64, 64)), torch.tensor([1, 7]))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    for _, lip in ((n, m) for n, m in model.named_modules() if isinstance(m, LIP2d)):
        last_conv = [m for m in lip.logit if isinstance(m, nn.Conv2d)][-1]
        assert last_conv.weight.grad is not None and last_conv.weight.grad.abs().sum() > 0
    optimizer.step()
    assert torch.isfinite(model(torch.randn(2, 3, 64, 64))).all()
    maps = importance_maps(model, torch.randn(1, 3, 64, 64))
    assert len(maps) == FAMILIES[name][0]


def test_a_fresh_lip_is_average_pooling() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 16, 12, 12)
    for kind in ("depthwise", "simplified", "bottleneck"):
        lip = LIP2d(16, 3, 2, 1, logit=kind).eval()
        expected = F.avg_pool2d(x, 3, 2, 1, count_include_pad=False)
        torch.testing.assert_close(lip(x), expected, rtol=1e-5, atol=1e-5)
    conv = nn.Conv2d(16, 8, 3, stride=2, padding=1)
    model = lipify(nn.Sequential(nn.Conv2d(3, 16, 3), conv), convert_stem=False)
    assert isinstance(model[1], LIPConv2d) and model[1].stride == (1, 1) and model[1].weight is conv.weight
    expected = F.avg_pool2d(F.conv2d(x, conv.weight, conv.bias, padding=1), 3, 2, 1, count_include_pad=False)
    torch.testing.assert_close(model[1](x), expected, rtol=1e-5, atol=1e-5)


def test_logit_module_costs() -> None:
    c, w = 64, 128
    counts = {kind: sum(p.numel() for p in logit_module(kind, c, w).parameters()) for kind in
              ("depthwise", "simplified", "bottleneck")}
    assert counts == {"depthwise": 11 * c, "simplified": 9 * c * c + 2 * c,
                      "bottleneck": 2 * c * w + 9 * w * w + 4 * w + 2 * c}


def test_stem_flag_and_exclude() -> None:
    model = lipify(timm.create_model("resnet18"), convert_stem=True, exclude=["layer4", "layer3.*.downsample*"])
    assert isinstance(model.conv1, LIPConv2d)
    assert type(model.layer4[0].conv1) is nn.Conv2d and model.layer4[0].conv1.stride == (2, 2)
    assert isinstance(model.layer3[0].conv1, LIPConv2d)
    assert type(model.layer3[0].downsample[0]) is nn.Conv2d
    assert lipify(model, exclude=["layer4"]) is model  # layers already LIP are not converted twice
    assert type(model.layer3[0].conv1.lip.logit.conv) is nn.Conv2d


@pytest.mark.parametrize(("build", "kwargs", "message"), [
    (lambda: nn.Sequential(nn.Linear(4, 4)), {}, "has no stride-2 pooling or convolution"),
    (lambda: timm.create_model("resnet18"), {"logit": "huge"}, "unknown LIP logit module 'huge'"),
    (lambda: timm.create_model("resnet18"), {"exclude": ["layer9"]}, "'layer9' matches no module"),
    (lambda: timm.create_model("convnext_atto"), {"convert_stem": True}, "'stem.0' (Conv2d): stride (4, 4)"),
    (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.MaxPool2d(3, 2, ceil_mode=True)), {}, "'1' (MaxPool2d): ceil_mode"),
    (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, stride=(2, 1))), {}, "'1' (Conv2d): stride (2, 1)"),
])
def test_inputs_it_cannot_convert_are_one_line_errors(build, kwargs: dict, message: str) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="lipify: |unknown LIP") as info:
        lipify(build(), **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(TypeError, match="expects a torch.nn.Module"):
        lipify("resnet18")  # type: ignore[arg-type]


def test_registered_models_load_the_plain_weights() -> None:
    torch.manual_seed(0)
    plain = timm.create_model("resnet18", num_classes=6)
    model = create_model("lip_resnet18", num_classes=6)
    assert isinstance(model.maxpool, LIP2d) and model.fc.out_features == 6
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(".logit." in k for k in missing)
    assert timm.create_model("lip_efficientnet_b0", logit="simplified").blocks[1][0].conv_dw.lip.logit.conv.groups == 1


@pytest.mark.slow
def test_train_py_trains_a_lipified_model_on_the_demo_data(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", classes=2, train=4, val=2, size=40)
    out = tmp_path / "run"
    trained = run([sys.executable, "train.py", "--config", "configs/demo.yaml",
                   *tiny_run(data, out, "model=lip_resnet18", "train.epochs=1", "tb.num_images=2")], timeout=300)
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
    assert "lip_resnet18" in trained.stdout and "finished 1 epochs" in trained.stdout
    assert (out / "checkpoints" / "last.pth").is_file()


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn"])
def test_lipified_model_on_cuda_matches_the_cpu(name: str) -> None:
    torch.manual_seed(0)
    model = lipify(timm.create_model(name, num_classes=10, **SMALL.get(name, {})), logit="bottleneck")
    for lip in (m for m in model.modules() if isinstance(m, LIP2d)):
        nn.init.normal_(lip.logit[-2].weight, 0, 0.1)  # non-uniform importance, so the kernels matter
    x = torch.randn(4, 3, 64, 64)
    want = model.eval()(x)
    cuda = model.cuda()
    # TF32 (cuDNN's default for convolutions; other tests may turn it on for matmuls) rounds at ~1e-3.
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        got = cuda(x.cuda()).cpu()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * want.abs().max().item())
    cuda.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = F.cross_entropy(cuda(x.cuda()), torch.arange(4).cuda())
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in cuda.parameters() if p.grad is not None)


def test_features_only_keeps_the_stem_under_timms_flattened_names() -> None:
    model = timm.create_model("lip_convnext_atto", features_only=True)  # the wrapper names stem.0 stem_0
    stem = model.get_submodule("stem_0")
    assert type(stem) is nn.Conv2d and stem.stride == (4, 4)
    assert sum(isinstance(m, LIPConv2d) for m in model.modules()) == 3  # the three stage downsamplings
    assert [f.shape[1] for f in model(torch.randn(1, 3, 32, 32))] == model.feature_info.channels()


def test_lipified_models_report_their_own_config() -> None:
    model = timm.create_model("lip_resnet18")
    cfg = model.pretrained_cfg
    assert cfg["architecture"] == "lip_resnet18" and cfg["first_conv"] == "conv1" and cfg["classifier"] == "fc"
    assert timm.data.resolve_data_config({}, model=model)["interpolation"] == "bilinear"
    assert timm.data.resolve_data_config({}, model=model)["crop_pct"] == 0.875


def test_hooks_on_a_converted_layer_move_to_its_lip() -> None:
    model = timm.create_model("resnet18", num_classes=2)
    seen: list[tuple[int, ...]] = []
    model.maxpool.register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape)))
    lipify(model)
    seen.clear()  # lipify's own probe forward ran the max-pool
    model.eval()(torch.randn(1, 3, 32, 32))
    assert isinstance(model.maxpool, LIP2d) and seen == [(1, 64, 8, 8)]
