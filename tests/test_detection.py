"""LIP-ResNet detection backbones: timm features_only, torchvision Faster R-CNN / RetinaNet with FPN."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.ops.misc import FrozenBatchNorm2d

from models import CheckpointError, LIPPool, create_model
from models.detection import (
    fasterrcnn_lip_resnet50_fpn,
    fasterrcnn_lip_resnet101_fpn,
    retinanet_lip_resnet50_fpn,
    retinanet_lip_resnet101_fpn,
)

DETECTORS = {"fasterrcnn": fasterrcnn_lip_resnet50_fpn, "retinanet": retinanet_lip_resnet50_fpn}
SMALL = {"min_size": 128, "max_size": 128}  # small images and few proposals keep a CPU step short
FEW = {"fasterrcnn": {"rpn_pre_nms_top_n_train": 200, "rpn_post_nms_top_n_train": 100, "box_batch_size_per_image": 64},
       "retinanet": {"topk_candidates": 100}}


@pytest.mark.parametrize(("name", "channels"), [
    ("lip_resnet50", [64, 256, 512, 1024, 2048]),
    ("lip_resnet101", [64, 256, 512, 1024, 2048]),
    ("lip_densenet121", [64, 256, 512, 1024, 1024]),
])
def test_features_only_gives_every_stage(name: str, channels: list[int]) -> None:
    model = timm.create_model(name, features_only=True).eval()
    assert model.feature_info.reduction() == [2, 4, 8, 16, 32]
    assert model.feature_info.channels() == channels
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in feats] == [(c, 64 // r, 64 // r) for c, r in zip(channels, [2, 4, 8, 16, 32],
                                                                                          strict=True)]
    picked = timm.create_model(name, features_only=True, out_indices=(2, 4))
    assert picked.feature_info.channels() == [channels[2], channels[4]]
    assert len(picked(torch.randn(1, 3, 64, 64))) == 2


def test_features_are_the_classifier_network_activations() -> None:
    torch.manual_seed(0)
    full = timm.create_model("lip_resnet50").eval()
    feats = timm.create_model("lip_resnet50", features_only=True, out_indices=(4,)).eval()
    feats.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("fc.")})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(feats(x)[0], full.forward_features(x))


def synthetic_batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Two small images, each with a bright box on a dark background and its target."""
    torch.manual_seed(0)
    images, targets = [], []
    for boxes, label in (([[10.0, 20.0, 70.0, 90.0]], 3), ([[30.0, 15.0, 100.0, 60.0], [5.0, 70.0, 40.0, 110.0]], 5)):
        img = torch.rand(3, 120, 128) * 0.1
        for x0, y0, x1, y1 in boxes:
            img[:, int(y0):int(y1), int(x0):int(x1)] += 0.8
        images.append(img)
        targets.append({"boxes": torch.tensor(boxes), "labels": torch.full((len(boxes),), label)})
    return images, targets


def lip_logit_params(backbone: nn.Module) -> dict[str, nn.Parameter]:
    return {f"{n}.{p}": param for n, m in backbone.named_modules() if isinstance(m, LIPPool)
            for p, param in m.logit_module().named_parameters()}


@pytest.mark.parametrize("kind", list(DETECTORS))
def test_train_step_and_eval_from_scratch(kind: str) -> None:
    torch.manual_seed(0)
    model = DETECTORS[kind](num_classes=7, **SMALL, **FEW[kind])
    assert isinstance(model, FasterRCNN if kind == "fasterrcnn" else RetinaNet)
    body = model.backbone.body
    assert all(p.requires_grad for p in model.parameters())  # no weights: nothing frozen
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in body.modules())

    for block in body.modules():  # the reference init zeros bn3, which cuts the branch LIPs off at step 0
        if hasattr(block, "bn3"):
            nn.init.ones_(block.bn3.weight)
    images, targets = synthetic_batch()
    model.train()
    losses = model(images, targets)
    assert losses and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    logits = lip_logit_params(body)
    assert any(k.startswith("maxpool.") for k in logits)
    for key, param in logits.items():
        assert param.grad is not None and torch.isfinite(param.grad).all(), key
    lips = [m for m in body.modules() if isinstance(m, LIPPool)]
    assert len(lips) == 7  # the stem, and a branch and a shortcut LIP in layer2-4
    assert all(sum(p.grad.abs().sum() for p in lip.parameters()) > 0 for lip in lips)

    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2
    for det in detections:
        n = det["boxes"].shape[0]
        assert det["boxes"].shape == (n, 4) and det["labels"].shape == (n,) and det["scores"].shape == (n,)
        assert torch.isfinite(det["boxes"]).all()


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """An ImageNet LIP-ResNet-50 checkpoint in the authors' release layout, with trained-looking BN stats."""
    torch.manual_seed(1)
    model = create_model("lip_resnet50")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
    state = model.state_dict()
    path = tmp_path_factory.mktemp("release") / "lip_resnet-50.pth.tar"
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 90}, path)
    return path, state


@pytest.mark.parametrize("kind", list(DETECTORS))
def test_backbone_holds_the_checkpoint_and_freezes_like_torchvision(
        kind: str, release: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, state = release
    model = DETECTORS[kind](num_classes=7, weights_backbone=str(path), trainable_backbone_layers=3, **SMALL)
    body = model.backbone.body
    held = body.state_dict()
    assert "fc.weight" not in held
    for key, value in held.items():
        assert torch.equal(value, state[key]), key
    assert not any(isinstance(m, nn.BatchNorm2d) for m in body.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in body.modules()) == 53
    for name, param in body.named_parameters():
        assert param.requires_grad == name.startswith(("layer2.", "layer3.", "layer4.")), name
    instance_norms = [n for n, m in body.named_modules() if isinstance(m, nn.InstanceNorm2d)]
    assert instance_norms and all(body.get_submodule(n).weight.requires_grad == n.startswith("layer")
                                  for n in instance_norms)



def test_frozen_stages_get_no_gradient_and_keep_their_statistics(
        release: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, state = release
    model = fasterrcnn_lip_resnet50_fpn(num_classes=7, weights_backbone=path, trainable_backbone_layers=3, **SMALL,
                                        **FEW["fasterrcnn"])
    body = model.backbone.body
    images, targets = synthetic_batch()
    model.train()
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for key, param in lip_logit_params(body).items():
        assert (param.grad is not None) == key.startswith(("layer2", "layer3", "layer4")), key
    for key in ("bn1.running_mean", "layer3.0.bn2.running_var"):  # a training forward leaves the stats alone
        assert torch.equal(body.state_dict()[key], state[key])


def test_all_layers_trainable_and_bad_input(release: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    path, state = release
    model = fasterrcnn_lip_resnet50_fpn(num_classes=3, weights_backbone=path, trainable_backbone_layers=5, **SMALL)
    assert all(p.requires_grad for p in model.backbone.body.parameters())
    with pytest.raises(ValueError, match=r"trainable_backbone_layers must be in \[0, 5\], got 6"):
        fasterrcnn_lip_resnet50_fpn(weights_backbone=path, trainable_backbone_layers=6)
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("layer4.")}, partial)
    with pytest.raises(CheckpointError, match="missing keys: layer4"):
        retinanet_lip_resnet50_fpn(weights_backbone=partial)


def test_resnet101_pair_builds() -> None:
    faster = fasterrcnn_lip_resnet101_fpn(num_classes=5)
    retina = retinanet_lip_resnet101_fpn(num_classes=5)
    assert isinstance(faster, FasterRCNN) and isinstance(retina, RetinaNet)
    assert len(faster.backbone.body.layer3) == 23 and len(retina.backbone.body.layer3) == 23
    assert faster.backbone.fpn.inner_blocks[-1][0].in_channels == 2048


@pytest.mark.cuda
@pytest.mark.parametrize("kind", list(DETECTORS))
def test_train_step_and_eval_on_cuda(kind: str) -> None:
    torch.manual_seed(0)
    model = DETECTORS[kind](num_classes=7, **SMALL).cuda()
    images, targets = synthetic_batch()
    images = [i.cuda() for i in images]
    targets = [{k: v.cuda() for k, v in t.items()} for t in targets]
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        losses = model(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(p.grad is not None for p in lip_logit_params(model.backbone.body).values())
    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2 and all(set(d) == {"boxes", "labels", "scores"} for d in detections)
