"""LIP-ResNet (Gao et al., ICCV 2019) and the torchvision ResNet baselines.

A torchvision-style ResNet v1 in which the stem max-pool and every stride-2 bottleneck pool with LIP.
Module names follow the authors' checkpoints key for key, so their weights load after stripping `module.`.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from .layers import (
    LOGIT_WIDTH,
    LIPPool,
    LogitTrunk,
    SharedLIP,
    SimplifiedLIP,
    conv1x1,
    conv3x3,
    imagenet_cfg,
)


class Bottleneck(nn.Module):
    """ResNet bottleneck; with stride 2 the 3x3 conv becomes LIP + 1x1 conv and the shortcut pools with LIP."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, logit_width: int = LOGIT_WIDTH) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"LIP bottleneck stride must be 1 or 2, got {stride}")
        outplanes = planes * self.expansion
        self.stride = stride
        if stride == 2:
            self.bottleneck_shared = LogitTrunk(inplanes, logit_width)
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        if stride == 2:
            self.conv2 = nn.Sequential(SharedLIP(planes, logit_width), conv1x1(planes, planes))
        else:
            self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, outplanes)
        self.bn3 = nn.BatchNorm2d(outplanes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Sequential | None = None
        if stride == 2:
            self.downsample = nn.Sequential(OrderedDict([
                ("lip", SharedLIP(inplanes, logit_width)),
                ("conv", conv1x1(inplanes, outplanes)), ("bn", nn.BatchNorm2d(outplanes)),
            ]))
        elif inplanes != outplanes:
            self.downsample = nn.Sequential(OrderedDict([
                ("conv", conv1x1(inplanes, outplanes)), ("bn", nn.BatchNorm2d(outplanes)),
            ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.bottleneck_shared(x) if self.stride == 2 else None
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.conv2(out) if shared is None else self.conv2[1](self.conv2[0](out, shared))
        out = self.relu(self.bn2(out))
        out = self.bn3(self.conv3(out))

        identity = x
        if self.downsample is not None:
            if shared is not None:
                identity = self.downsample.lip(x, shared)
            identity = self.downsample.bn(self.downsample.conv(identity))
        return self.relu(out + identity)


class LIPResNet(nn.Module):
    """LIP-ResNet: conv7x7/2 → BN → ReLU → stem LIP → four stages of bottlenecks → avg-pool → fc."""

    def __init__(self, layers: tuple[int, ...], num_classes: int = 1000, width: int = 64,
                 logit_width: int = LOGIT_WIDTH, in_chans: int = 3) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.inplanes = width
        self.conv1 = nn.Conv2d(in_chans, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = SimplifiedLIP(width)
        self.layer1 = self._make_layer(width, layers[0], 1, logit_width)
        self.layer2 = self._make_layer(width * 2, layers[1], 2, logit_width)
        self.layer3 = self._make_layer(width * 4, layers[2], 2, logit_width)
        self.layer4 = self._make_layer(width * 8, layers[3], 2, logit_width)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = width * 8 * Bottleneck.expansion
        self.fc = nn.Linear(self.num_features, num_classes)
        # the stages timm's features_only returns (stem after ReLU, then each layer's output)
        self.feature_info = [dict(num_chs=width, reduction=2, module="relu")] + [
            dict(num_chs=width * 2 ** i * Bottleneck.expansion, reduction=4 * 2 ** i, module=f"layer{i + 1}")
            for i in range(4)]
        self._init_weights()

    def _make_layer(self, planes: int, blocks: int, stride: int, logit_width: int) -> nn.Sequential:
        layers = [Bottleneck(self.inplanes, planes, stride, logit_width)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes, 1, logit_width) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        """The reference init: every LIP starts as average pooling and every residual branch as zero."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.fc.weight, 0, 0.01)
        nn.init.zeros_(self.fc.bias)
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, LIPPool):
                nn.init.zeros_(m.logit_module()[0].weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.fc(x)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


default_cfgs = generate_default_cfgs({
    "lip_resnet50": imagenet_cfg(paper_ids="arXiv:1908.04156"),
    "lip_resnet101": imagenet_cfg(paper_ids="arXiv:1908.04156"),
    "lip_resnet_tiny": imagenet_cfg(input_size=(3, 64, 64), pool_size=(2, 2)),
})


def _create(variant: str, pretrained: bool, layers: tuple[int, ...], **kwargs: object) -> LIPResNet:
    return build_model_with_cfg(LIPResNet, variant, pretrained, layers=layers, **kwargs)


@register_model
def lip_resnet50(pretrained: bool = False, **kwargs: object) -> LIPResNet:
    """LIP-ResNet-50 (23.9M params, 78.19 top-1 in the paper)."""
    return _create("lip_resnet50", pretrained, (3, 4, 6, 3), **kwargs)


@register_model
def lip_resnet101(pretrained: bool = False, **kwargs: object) -> LIPResNet:
    """LIP-ResNet-101 (42.9M params, 79.33 top-1 in the paper)."""
    return _create("lip_resnet101", pretrained, (3, 4, 23, 3), **kwargs)


@register_model
def lip_resnet_tiny(pretrained: bool = False, **kwargs: object) -> LIPResNet:
    """A narrow one-block-per-stage LIP-ResNet with every LIP layer kind, for CPU tests and the demo."""
    kwargs = {"width": 8, "logit_width": 16, **kwargs}
    return _create("lip_resnet_tiny", pretrained, (1, 1, 1, 1), **kwargs)
