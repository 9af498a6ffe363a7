"""LIP-ResNet detection backbones: timm features_only, torchvision Faster R-CNN / RetinaNet with FPN, and the
model lookup torchvision's detection reference script calls."""

from __future__ import annotations

import argparse
import pickle
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
    get_detection_model,
    lip_resnet_fpn_backbone,
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


@pytest.mark.slow
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



@pytest.mark.slow
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


@pytest.mark.parametrize(("argument", "value", "message"), [
    ("trainable_backbone_layers", "3", "must be an int, got '3' (str)"),
    ("trainable_backbone_layers", True, "must be an int, got True (bool)"),
    ("trainable_backbone_layers", 3.0, "must be an int, got 3.0 (float)"),
    ("trainable_backbone_layers", -1, "must be in [0, 5], got -1"),
    ("num_classes", "91", "must be an int"),
    ("num_classes", None, "must be an int, got None"),
    ("num_classes", 0, "must be >= 1, got 0"),
    ("weights_backbone", 3, "must be the path of a checkpoint file or None"),
])
@pytest.mark.parametrize("kind", list(DETECTORS))
def test_bad_builder_arguments_are_one_line_value_errors(kind: str, argument: str, value: object,
                                                         message: str) -> None:
    with pytest.raises(ValueError) as e:
        DETECTORS[kind](**{argument: value})
    assert str(e.value).startswith(f"{argument} {message}") and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("layers", [(), (0, 1), (3, 2), (2, 2), (True, 2), "234", (1, 5)])
def test_bad_returned_layers(layers: object) -> None:
    with pytest.raises(ValueError, match="returned_layers must be increasing stage numbers from 1 to 4"):
        lip_resnet_fpn_backbone(returned_layers=layers)


def _reference_lookup(model: str, weights: object = None, weights_backbone: object = None,
                      trainable_backbone_layers: int | None = None) -> nn.Module:
    """What torchvision's references/detection/train.py does after the documented edit: its kwargs, then one
    call to our lookup in place of torchvision.models.get_model."""
    kwargs: dict[str, object] = {"trainable_backbone_layers": trainable_backbone_layers}
    if "rcnn" in model:
        kwargs["rpn_score_thresh"] = 0.05  # the script's --rpn-score-thresh, passed to R-CNN models only
    return get_detection_model(model, weights=weights, weights_backbone=weights_backbone, num_classes=4, **kwargs)


def test_the_reference_lookup_builds_ours_and_torchvision_baselines(
        release: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, state = release
    ours = _reference_lookup("fasterrcnn_lip_resnet50_fpn", weights_backbone=str(path))
    assert isinstance(ours, FasterRCNN) and ours.rpn.score_thresh == 0.05
    assert ours.roi_heads.box_predictor.cls_score.out_features == 4
    assert torch.equal(ours.backbone.body.state_dict()["layer4.2.conv3.weight"], state["layer4.2.conv3.weight"])
    assert [n for n, p in ours.backbone.body.named_parameters() if p.requires_grad][0].startswith("layer2.")
    retina = _reference_lookup("retinanet_lip_resnet50_fpn")
    assert isinstance(retina, RetinaNet) and isinstance(retina.backbone.body, type(ours.backbone.body))
    baseline = _reference_lookup("fasterrcnn_resnet50_fpn")  # not ours: torchvision's own builder
    assert isinstance(baseline, FasterRCNN) and baseline.roi_heads.box_predictor.cls_score.out_features == 4
    assert not any(isinstance(m, LIPPool) for m in baseline.modules())
    assert type(baseline.backbone.body.layer1[0]).__module__ == "torchvision.models.resnet"


def test_the_reference_lookup_refuses_detector_weights_and_unknown_names() -> None:
    with pytest.raises(ValueError, match="^fasterrcnn_lip_resnet50_fpn: weights='COCO_V1' is not supported") as e:
        _reference_lookup("fasterrcnn_lip_resnet50_fpn", weights="COCO_V1")
    assert "--resume" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="unknown detection model 'fasterrcnn_lip_resnet18_fpn'"):
        _reference_lookup("fasterrcnn_lip_resnet18_fpn")


@pytest.mark.slow
def test_the_reference_resume_needs_namespace_and_the_same_weights_backbone(
        release: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    """The reference script's checkpoint.pth (model, optimizer, lr_scheduler, argparse args, epoch) read back as
    its --resume does (weights_only=True): with argparse.Namespace allowed it loads into the model rebuilt with
    the same --weights-backbone; rebuilt without it, BatchNorm is no longer frozen and the optimizer state does not
    fit."""
    path, _ = release
    model = _reference_lookup("fasterrcnn_lip_resnet50_fpn", weights_backbone=str(path))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.02, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[16, 22], gamma=0.1)
    args = argparse.Namespace(model="fasterrcnn_lip_resnet50_fpn", weights_backbone=str(path), epochs=26)
    saved = tmp_path / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "lr_scheduler": scheduler.state_dict(), "args": args, "epoch": 3}, saved)
    with pytest.raises(pickle.UnpicklingError, match="argparse.Namespace"):
        torch.load(saved, map_location="cpu", weights_only=True)
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(saved, map_location="cpu", weights_only=True)
    same = _reference_lookup("fasterrcnn_lip_resnet50_fpn", weights_backbone=checkpoint["args"].weights_backbone)
    same.load_state_dict(checkpoint["model"])
    torch.optim.SGD([p for p in same.parameters() if p.requires_grad], lr=0.02).load_state_dict(
        checkpoint["optimizer"])
    other = _reference_lookup("fasterrcnn_lip_resnet50_fpn")
    other.load_state_dict(checkpoint["model"])  # the weights fit (BatchNorm fills in num_batches_tracked) ...
    assert any(isinstance(m, nn.BatchNorm2d) for m in other.backbone.body.modules())  # ... but nothing is frozen
    with pytest.raises(ValueError, match="parameter group"):
        torch.optim.SGD([p for p in other.parameters() if p.requires_grad], lr=0.02).load_state_dict(
            checkpoint["optimizer"])


@pytest.mark.slow
def test_fresh_backbone_with_frozen_batchnorm_gets_no_gradient_in_its_residual_branches(tmp_path: Path) -> None:
    """Why weights_backbone must be trained weights: the init zeros every bn3 (and the logit convs), and frozen
    BatchNorm keeps the zero, so only the stem and the shortcuts can learn."""
    torch.manual_seed(0)
    fresh = tmp_path / "fresh.pth"
    torch.save(create_model("lip_resnet50").state_dict(), fresh)
    body = lip_resnet_fpn_backbone(weights_backbone=fresh, trainable_backbone_layers=5).body
    sum(out.sum() for out in body(torch.randn(1, 3, 32, 32)).values()).backward()
    branch = {n: p.grad for n, p in body.named_parameters() if ".conv1." in n or ".conv2." in n or ".conv3." in n}
    assert branch and all(g is None or not g.any() for g in branch.values())
    assert body.conv1.weight.grad.abs().sum() > 0 and body.layer3[0].downsample.conv.weight.grad.abs().sum() > 0
    blocks = [m for m in body.modules() if hasattr(m, "bn3")]
    assert all(isinstance(b.bn3, FrozenBatchNorm2d) and not b.bn3.weight.any() for b in blocks)  # stays zero
    trainable = lip_resnet_fpn_backbone(trainable_backbone_layers=5).body  # no weights: BatchNorm trains
    sum(out.sum() for out in trainable(torch.randn(2, 3, 32, 32)).values()).backward()
    assert all(b.bn3.weight.grad.abs().sum() > 0 for b in trainable.modules() if hasattr(b, "bn3"))


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
