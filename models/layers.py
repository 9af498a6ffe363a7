"""LIP building blocks and the timm config shared by the LIP-ResNet and LIP-DenseNet files.

Every LIP layer derives from `LIPPool`: it pools `x` with importance `exp(COEFF * sigmoid(z))`, where `z` is
the output of the layer's logit module (named by `logit_attr`). The soft gate is fused into the pooling
operator; `importance_maps` hooks the logit modules' final instance norms.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .lip import gated_lip2d

COEFF = 12.0  # soft gate: logit = COEFF * sigmoid(.), so importance lies in [1, exp(12)]
LOGIT_WIDTH = 128  # width of the "Bottleneck-128" logit modules


def conv1x1(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, bias=False)


def conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False)


class InstanceNorm2d(nn.InstanceNorm2d):
    """nn.InstanceNorm2d whose output keeps the input's memory format (same parameters and keys).

    torch's instance_norm normalises an NCHW copy and returns it NCHW, so in a channels_last network every
    logit would reach the LIP kernel in a layout other than x's (strided loads and stores along the
    channels) and every following convolution would copy it back to channels_last.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            return y.contiguous(memory_format=torch.channels_last)
        return y


def instance_norm(channels: int) -> InstanceNorm2d:
    return InstanceNorm2d(channels, affine=True)


class LIPPool(nn.Module):
    """Base class of every LIP layer; `logit_attr` names the logit module, whose last layer is an IN.

    `pool(x, features)` runs the logit module on `features` and pools `x` with importance
    exp(COEFF * sigmoid(logit)). While training, the last instance norm, the gate and the pooling are
    recomputed in backward (torch.utils.checkpoint), so neither the normalised logit nor the pooling's
    intermediates are kept: only `x` and the pre-norm features, which exist anyway. In eval mode there is
    no checkpoint, so a strict torch.export sees plain ops.
    """

    logit_attr = "logit"

    def __init__(self, kernel_size: int = 3, stride: int = 2, padding: int = 1) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def logit_module(self) -> nn.Sequential:
        return getattr(self, self.logit_attr)

    def _norm_and_pool(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        z = self.logit_module()[-1](features)
        return gated_lip2d(x, z, COEFF, self.kernel_size, self.stride, self.padding)

    def pool(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        *head, _norm = self.logit_module()
        for layer in head:
            features = layer(features)
        if self.training and torch.is_grad_enabled() and (x.requires_grad or features.requires_grad):
            return checkpoint(self._norm_and_pool, x, features, use_reentrant=False, preserve_rng_state=False)
        return self._norm_and_pool(x, features)


class SimplifiedLIP(LIPPool):
    """Stem LIP: the logit is a 3x3 conv of the input itself (keys `logit.{conv,bn}` in ResNet)."""

    def __init__(self, channels: int, names: tuple[str, str] = ("conv", "bn")) -> None:
        super().__init__()
        self.logit = nn.Sequential(OrderedDict([(names[0], conv3x3(channels, channels)),
                                                (names[1], instance_norm(channels))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x, x)


class LogitTrunk(nn.Module):
    """The shared Bottleneck-128 trunk of a stride-2 ResNet block, run once on the block input."""

    def __init__(self, channels: int, width: int = LOGIT_WIDTH) -> None:
        super().__init__()
        self.logit = nn.Sequential(OrderedDict([
            ("conv1", conv1x1(channels, width)), ("bn1", instance_norm(width)), ("relu1", nn.ReLU(inplace=True)),
            ("conv2", conv3x3(width, width)), ("bn2", instance_norm(width)), ("relu2", nn.ReLU(inplace=True)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logit(x)


class SharedLIP(LIPPool):
    """LIP whose logit is a 1x1 head on the shared trunk (keys `postprocessing.{conv,bn}`)."""

    logit_attr = "postprocessing"

    def __init__(self, channels: int, width: int = LOGIT_WIDTH) -> None:
        super().__init__()
        self.postprocessing = nn.Sequential(OrderedDict([("conv", conv1x1(width, channels)),
                                                         ("bn", instance_norm(channels))]))

    def forward(self, x: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        return self.pool(x, shared)


class ProjectionLIP(LIPPool):
    """DenseNet transition LIP (k2 s2 p0) with its own full Bottleneck-128 logit module."""

    def __init__(self, channels: int, width: int = LOGIT_WIDTH) -> None:
        super().__init__(kernel_size=2, stride=2, padding=0)
        self.logit = nn.Sequential(OrderedDict([
            ("conv1", conv1x1(channels, width)), ("bn1", instance_norm(width)), ("relu1", nn.ReLU(inplace=True)),
            ("conv2", conv3x3(width, width)), ("bn2", instance_norm(width)), ("relu2", nn.ReLU(inplace=True)),
            ("conv3", conv1x1(width, channels)), ("bn3", instance_norm(channels)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x, x)


def imagenet_cfg(**kwargs: object) -> dict:
    """timm pretrained config: the paper's evaluation (224 px, resize 256 = crop 0.875, ImageNet mean/std)."""
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
            "crop_pct": 0.875, "interpolation": "bilinear", "mean": (0.485, 0.456, 0.406),
            "std": (0.229, 0.224, 0.225), "first_conv": "conv1", "classifier": "fc", **kwargs}


@torch.no_grad()
def importance_maps(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Importance exp(logit) of every LIP layer for `images`, keyed by module path (empty for baselines).

    Runs one forward pass in eval mode with hooks on the logit modules, so it shows what the network
    weighs when it pools; the model's train/eval mode is restored afterwards.
    """
    model = getattr(model, "module", model)
    maps: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, LIPPool):
            def hook(_m: nn.Module, _inp: tuple, z: torch.Tensor, name: str = name) -> None:
                maps[name] = torch.exp(COEFF * torch.sigmoid(z.float()))
            handles.append(module.logit_module()[-1].register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        model(images)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return maps
