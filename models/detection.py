"""torchvision Faster R-CNN and RetinaNet with a LIP-ResNet-FPN backbone (the paper's COCO experiments).

    from models.detection import fasterrcnn_lip_resnet50_fpn
    model = fasterrcnn_lip_resnet50_fpn(num_classes=91, weights_backbone="lip_resnet-50.pth.tar")

The builders follow torchvision's `fasterrcnn_resnet50_fpn` / `retinanet_resnet50_fpn` (v1) conventions:
with ImageNet weights, BatchNorm is frozen (torchvision's FrozenBatchNorm2d) and only the last
`trainable_backbone_layers` of (layer4, layer3, layer2, layer1, stem) train; without weights nothing is
frozen and BatchNorm trains. The LIP logit modules end in InstanceNorms, which have no running statistics:
they are left as they are and train with the stage that holds them (the stem LIP belongs to the stem).
Keyword arguments go to torchvision's FasterRCNN / RetinaNet (min_size, max_size, ...).
"""

from __future__ import annotations

from pathlib import Path

from timm.layers import freeze_batch_norm_2d
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

from .checkpoint import load_checkpoint
from .lip_resnet import LIPResNet, lip_resnet50, lip_resnet101

__all__ = ["fasterrcnn_lip_resnet50_fpn", "fasterrcnn_lip_resnet101_fpn", "lip_resnet_fpn_backbone",
           "retinanet_lip_resnet50_fpn", "retinanet_lip_resnet101_fpn"]

# The stages in the order torchvision unfreezes them; the stem LIP ("maxpool") trains with the stem conv.
_STAGES = (("layer4",), ("layer3",), ("layer2",), ("layer1",), ("conv1", "bn1", "maxpool"))
_ARCHS = {"lip_resnet50": lip_resnet50, "lip_resnet101": lip_resnet101}


def lip_resnet_fpn_backbone(arch: str = "lip_resnet50", weights_backbone: str | Path | None = None,
                            trainable_backbone_layers: int | None = 3, returned_layers: tuple[int, ...] = (1, 2, 3, 4),
                            extra_blocks: ExtraFPNBlock | None = None) -> BackboneWithFPN:
    """A LIP-ResNet with an FPN on the outputs of `returned_layers` (256 channels each).

    `weights_backbone` is an ImageNet checkpoint (ours or the authors' release), loaded with
    `load_checkpoint`'s rules (safe, all or nothing) except that the classifier's keys are ignored.
    `trainable_backbone_layers=None` means 3, as in torchvision (its reference scripts pass None).
    """
    if arch not in _ARCHS:
        raise ValueError(f"unknown LIP-ResNet '{arch}'; valid: {', '.join(_ARCHS)}")
    if trainable_backbone_layers is None:
        trainable_backbone_layers = 3
    if not 0 <= trainable_backbone_layers <= len(_STAGES):
        raise ValueError(f"trainable_backbone_layers must be in [0, {len(_STAGES)}], got {trainable_backbone_layers}")
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
    backbone = lip_resnet_fpn_backbone(arch, weights_backbone, trainable_backbone_layers)
    return FasterRCNN(backbone, num_classes=num_classes, **kwargs)


def _retinanet(arch: str, num_classes: int, weights_backbone: str | Path | None,
               trainable_backbone_layers: int | None, **kwargs: object) -> RetinaNet:
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
