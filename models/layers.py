"""LIP building blocks and the timm config shared by the LIP-ResNet and LIP-DenseNet files.

Every LIP layer derives from `LIPPool`: it pools `x` with importance `exp(COEFF * sigmoid(z))`, where `z` is
the output of the layer's logit module (named by `logit_attr`). The module's final instance norm and the soft
gate are fused into the pooling operator (the normalised logit is never a tensor), so `importance_maps`
hooks the layer before that norm and applies it itself.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import nn

from .lip import norm_gated_lip2d, plane_affine

COEFF = 12.0  # soft gate: logit = COEFF * sigmoid(.), so importance lies in [1, exp(12)]
LOGIT_WIDTH = 128  # width of the "Bottleneck-128" logit modules


def conv1x1(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, bias=False)


def conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False)


@register_notrace_module
class InstanceNorm2d(nn.InstanceNorm2d):
    """nn.InstanceNorm2d that keeps the input's memory format (same parameters, keys and numerics).

    torch's instance_norm normalises an NCHW copy and returns it NCHW, so in a channels_last network every
    logit would reach the LIP kernel in a layout other than x's and every following convolution would copy
    it back. Here one reduction gives float32 per-plane statistics (as torch's kernels keep them under
    autocast) and one elementwise pass applies them in place of layout. `gated_pool` is the same norm folded
    into the LIP operator.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or self.track_running_stats:
            return F.instance_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                   self.training or not self.track_running_stats, self.momentum, self.eps)
        scale, shift = plane_affine(x, self.weight, self.bias, self.eps)
        return torch.addcmul(shift[:, :, None, None], x, scale[:, :, None, None]).to(x.dtype)

    def gated_pool(self, x: torch.Tensor, features: torch.Tensor, kernel_size: int, stride: int, padding: int,
                   coeff: float = COEFF) -> torch.Tensor:
        """LIP pooling of x with logit coeff * sigmoid(self(features)), the norm applied inside the op."""
        return norm_gated_lip2d(x, features, self.weight, self.bias, self.eps, coeff, kernel_size, stride, padding)


def instance_norm(channels: int) -> InstanceNorm2d:
    return InstanceNorm2d(channels, affine=True)


@register_notrace_module
class LIPPool(nn.Module):
    """Base class of every LIP layer; `logit_attr` names the logit module, whose last layer is an IN.

    `pool(x, features)` runs the logit module on `features` and pools `x` with importance
    exp(COEFF * sigmoid(logit)). The last instance norm and the gate run inside the LIP operator, whose
    backward keeps only `x`, the pre-norm features (which exist anyway) and output-sized tensors, so
    nothing needs recomputing; the same code runs in training, eval, torch.compile and TorchScript.
    """

    logit_attr = "logit"

    def __init__(self, kernel_size: int = 3, stride: int = 2, padding: int = 1) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def logit_module(self) -> nn.Sequential:
        return getattr(self, self.logit_attr)

    def pool(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        last = len(self.logit) - 1
        for i, layer in enumerate(self.logit):
            if i < last:
                features = layer(features)
        return self.logit[-1].gated_pool(x, features, self.kernel_size, self.stride, self.padding)


@register_notrace_module
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


@register_notrace_module
class SharedLIP(LIPPool):
    """LIP whose logit is a 1x1 head on the shared trunk (keys `postprocessing.{conv,bn}`)."""

    logit_attr = "postprocessing"

    def __init__(self, channels: int, width: int = LOGIT_WIDTH) -> None:
        super().__init__()
        self.postprocessing = nn.Sequential(OrderedDict([("conv", conv1x1(width, channels)),
                                                         ("bn", instance_norm(channels))]))

    def pool(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.postprocessing.bn.gated_pool(x, self.postprocessing.conv(features), self.kernel_size,
                                                 self.stride, self.padding)

    def forward(self, x: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        return self.pool(x, shared)


@register_notrace_module
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

    Runs one forward pass in eval mode with hooks on the layers feeding the logit modules' final norms
    (which run inside the LIP operator), applying each norm to what they return, so it shows what the
    network weighs when it pools; the model's train/eval mode is restored afterwards.
    """
    model = getattr(model, "module", model)
    maps: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, LIPPool):
            *_, before, norm = module.logit_module()

            def hook(_m: nn.Module, _inp: tuple, f: torch.Tensor, name: str = name, norm: nn.Module = norm) -> None:
                maps[name] = torch.exp(COEFF * torch.sigmoid(norm(f).float()))
            handles.append(before.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        model(images)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return maps
