"""torchvision Faster R-CNN and RetinaNet with a LIP-ResNet-FPN backbone (the paper's COCO experiments).

    from models.detection import fasterrcnn_lip_resnet50_fpn
    model = fasterrcnn_lip_resnet50_fpn(num_classes=91, weights_backbone="lip_resnet-50.pth.tar")

The builders follow torchvision's `fasterrcnn_resnet50_fpn` / `retinanet_resnet50_fpn` (v1) conventions:
with ImageNet weights, BatchNorm is frozen (torchvision's FrozenBatchNorm2d) and only the last
`trainable_backbone_layers` of (layer4, layer3, layer2, layer1, stem) train; without weights nothing is
frozen and BatchNorm trains. The LIP logit modules end in InstanceNorms, which have no running statistics:
they are left as they are and train with the stage that holds them (the stem LIP belongs to the stem).
Keyword arguments go to torchvision's FasterRCNN / RetinaNet (min_size, max_size, ...).

`get_detection_model` is the lookup for torchvision's detection reference scripts: our builders by name,
any other name from `torchvision.models.get_model`, so one script trains both rows of a comparison.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torchvision
from timm.layers import freeze_batch_norm_2d
from torch import nn
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

from .checkpoint import check_checkpoint_file, load_checkpoint
from .lip_resnet import LIPResNet, lip_resnet50, lip_resnet101

__all__ = ["fasterrcnn_lip_resnet50_fpn", "fasterrcnn_lip_resnet101_fpn", "get_detection_model",
           "lip_resnet_fpn_backbone", "retinanet_lip_resnet50_fpn", "retinanet_lip_resnet101_fpn"]

# The stages in the order torchvision unfreezes them; the stem LIP ("maxpool") trains with the stem conv.
_STAGES = (("layer4",), ("layer3",), ("layer2",), ("layer1",), ("conv1", "bn1", "maxpool"))
_ARCHS = {"lip_resnet50": lip_resnet50, "lip_resnet101": lip_resnet101}


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    """`value` as an int in [low, high]; bools, strings and floats are refused, not coerced."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < low or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


def _check_path(name: str, value: object) -> None:
    if value is not None and not isinstance(value, str | os.PathLike):
        raise ValueError(f"{name} must be the path of a checkpoint file or None, got {value!r} "
                         f"({type(value).__name__})")


def lip_resnet_fpn_backbone(arch: str = "lip_resnet50", weights_backbone: str | Path | None = None,
                            trainable_backbone_layers: int | None = 3, returned_layers: tuple[int, ...] = (1, 2, 3, 4),
                            extra_blocks: ExtraFPNBlock | None = None) -> BackboneWithFPN:
    """A LIP-ResNet with an FPN on the outputs of `returned_layers` (256 channels each).

    `weights_backbone` is an ImageNet checkpoint (ours or the authors' release), loaded with
    `load_checkpoint`'s rules (safe, all or nothing) except that the classifier's keys are ignored.
    `trainable_backbone_layers=None` means 3, as in torchvision (its reference scripts pass None).
    """
    if not isinstance(arch, str) or arch not in _ARCHS:
        raise ValueError(f"unknown LIP-ResNet {arch!r}; valid: {', '.join(_ARCHS)}")
    _check_path("weights_backbone", weights_backbone)
    if trainable_backbone_layers is None:
        trainable_backbone_layers = 3
    _check_int("trainable_backbone_layers", trainable_backbone_layers, 0, len(_STAGES))
    layers = tuple(returned_layers) if isinstance(returned_layers, tuple | list) else None
    if not layers or list(layers) != sorted(set(layers)) or any(
            isinstance(i, bool) or i not in (1, 2, 3, 4) for i in layers):
        raise ValueError(f"returned_layers must be increasing stage numbers from 1 to 4, got {returned_layers!r}")
    if weights_backbone is not None:
        check_checkpoint_file(weights_backbone)  # before the network is built: a wrong file fails at once
    backbone: LIPResNet = _ARCHS[arch]()
    if weights_backbone is None:
        trainable_backbone_layers = len(_STAGES)  # from scratch: nothing frozen, BatchNorm trains
    else:
        load_checkpoint(backbone, weights_backbone, ignore=("fc.",))
        backbone = freeze_batch_norm_2d(backbone)
    trainable = tuple(f"{name}." for stage in _STAGES[:trainable_backbone_layers] for name in stage)
    for name, parameter in backbone.named_parameters():
        if not name.startswith(trainable):
            parameter.requires_grad_(False)
    return_layers = {f"layer{i}": str(k) for k, i in enumerate(returned_layers)}
    in_channels = [backbone.feature_info[i]["num_chs"] for i in returned_layers]
    return BackboneWithFPN(backbone, return_layers, in_channels, out_channels=256,
                           extra_blocks=extra_blocks or LastLevelMaxPool())


def _faster_rcnn(arch: str, num_classes: int, weights_backbone: str | Path | None,
                 trainable_backbone_layers: int | None, **kwargs: object) -> FasterRCNN:
    _check_int("num_classes", num_classes, 1)
    backbone = lip_resnet_fpn_backbone(arch, weights_backbone, trainable_backbone_layers)
    return FasterRCNN(backbone, num_classes=num_classes, **kwargs)


def _retinanet(arch: str, num_classes: int, weights_backbone: str | Path | None,
               trainable_backbone_layers: int | None, **kwargs: object) -> RetinaNet:
    _check_int("num_classes", num_classes, 1)
    # torchvision's RetinaNet v1: P3-P5 from the FPN, P6/P7 from P5
    backbone = lip_resnet_fpn_backbone(arch, weights_backbone, trainable_backbone_layers, returned_layers=(2, 3, 4),
                                       extra_blocks=LastLevelP6P7(256, 256))
    return RetinaNet(backbone, num_classes=num_classes, **kwargs)


def fasterrcnn_lip_resnet50_fpn(num_classes: int = 91, weights_backbone: str | Path | None = None,
                                trainable_backbone_layers: int | None = 3, **kwargs: object) -> FasterRCNN:
    """Faster R-CNN with a LIP-ResNet-50-FPN backbone."""
    return _faster_rcnn("lip_resnet50", num_classes, weights_backbone, trainable_backbone_layers, **kwargs)


def fasterrcnn_lip_resnet101_fpn(num_classes: int = 91, weights_backbone: str | Path | None = None,
                                 trainable_backbone_layers: int | None = 3, **kwargs: object) -> FasterRCNN:
    """Faster R-CNN with a LIP-ResNet-101-FPN backbone."""
    return _faster_rcnn("lip_resnet101", num_classes, weights_backbone, trainable_backbone_layers, **kwargs)


def retinanet_lip_resnet50_fpn(num_classes: int = 91, weights_backbone: str | Path | None = None,
                               trainable_backbone_layers: int | None = 3, **kwargs: object) -> RetinaNet:
    """RetinaNet with a LIP-ResNet-50-FPN backbone."""
    return _retinanet("lip_resnet50", num_classes, weights_backbone, trainable_backbone_layers, **kwargs)


def retinanet_lip_resnet101_fpn(num_classes: int = 91, weights_backbone: str | Path | None = None,
                                trainable_backbone_layers: int | None = 3, **kwargs: object) -> RetinaNet:
    """RetinaNet with a LIP-ResNet-101-FPN backbone."""
    return _retinanet("lip_resnet101", num_classes, weights_backbone, trainable_backbone_layers, **kwargs)


_BUILDERS = {f.__name__: f for f in (fasterrcnn_lip_resnet50_fpn, fasterrcnn_lip_resnet101_fpn,
                                     retinanet_lip_resnet50_fpn, retinanet_lip_resnet101_fpn)}


def get_detection_model(name: str, weights: Any = None, weights_backbone: Any = None, num_classes: int | None = None,
                        **kwargs: Any) -> nn.Module:
    """`torchvision.models.get_model` with our LIP detectors added: the one call torchvision's detection
    reference script needs, so the same script trains the LIP detectors and torchvision's own baselines.

    Our builders take `weights_backbone` (an ImageNet checkpoint path); they have no full-detector weights
    (`weights`), which are refused rather than ignored: continue a run of ours with the script's `--resume`.
    Every other name, with all its arguments, goes to torchvision unchanged.
    """
    if name not in _BUILDERS and name not in torchvision.models.list_models():
        raise ValueError(f"unknown detection model {name!r}: neither one of ours ({', '.join(_BUILDERS)}) nor one "
                         "of torchvision.models.list_models()")
    if name not in _BUILDERS:
        config = {} if num_classes is None else {"num_classes": num_classes}
        return torchvision.models.get_model(name, weights=weights, weights_backbone=weights_backbone,
                                            **config, **kwargs)
    if weights is not None:
        raise ValueError(f"{name}: weights={weights!r} is not supported, there are no published full-detector "
                         "weights for LIP detectors; start from weights_backbone (--weights-backbone) or continue "
                         "a run with --resume")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    return _BUILDERS[name](weights_backbone=weights_backbone, **kwargs)
