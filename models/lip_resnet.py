"""LIP-ResNet (Gao et al., ICCV 2019) and the torchvision ResNet baselines.

A torchvision-style ResNet v1 in which the stem max-pool and every stride-2 bottleneck pool with LIP.
Module names follow the authors' checkpoints key for key, so their weights load after stripping `module.`.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from timm.layers import DropPath, create_classifier, get_device_dtype
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn

from .layers import (
    LOGIT_WIDTH,
    LIPPool,
    LogitTrunk,
    SharedLIP,
    SimplifiedLIP,
    conv1x1,
    imagenet_cfg,
)


def _residual_drop(drop_path: float) -> nn.Module:
    return DropPath(drop_path) if drop_path > 0 else nn.Identity()


class Bottleneck(nn.Module):
    """Plain ResNet bottleneck (1x1, 3x3, 1x1); a conv1x1 + BN shortcut where the width changes."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, dilation: int = 1, drop_path: float = 0.0) -> None:
        super().__init__()
        outplanes = planes * self.expansion
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, outplanes)
        self.bn3 = nn.BatchNorm2d(outplanes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Sequential | None = None
        if inplanes != outplanes:
            self.downsample = nn.Sequential(OrderedDict([
                ("conv", conv1x1(inplanes, outplanes)), ("bn", nn.BatchNorm2d(outplanes)),
            ]))
        self.drop_path = _residual_drop(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.drop_path(out) + identity)


class LIPBottleneck(nn.Module):
    """The first block of layer2-4: its 3x3 conv becomes LIP + 1x1 conv and its shortcut pools with LIP.

    Both LIPs take their logits from one shared Bottleneck-128 trunk on the block input. `stride=1` (a
    stage whose stride timm's output_stride turns into dilation) keeps the 3x3 LIP window at stride 1.
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 2, logit_width: int = LOGIT_WIDTH,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"LIP bottleneck stride must be 1 or 2, got {stride}")
        outplanes = planes * self.expansion
        self.stride = stride
        self.bottleneck_shared = LogitTrunk(inplanes, logit_width)
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.ModuleList([SharedLIP(planes, logit_width), conv1x1(planes, planes)])  # keys conv2.{0,1}
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, outplanes)
        self.bn3 = nn.BatchNorm2d(outplanes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = nn.ModuleDict(OrderedDict([  # containers without a forward: TorchScript compiles them
            ("lip", SharedLIP(inplanes, logit_width)),
            ("conv", conv1x1(inplanes, outplanes)), ("bn", nn.BatchNorm2d(outplanes)),
        ]))
        for lip in (self.conv2[0], self.downsample["lip"]):
            lip.stride = stride
        self.drop_path = _residual_drop(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.bottleneck_shared(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2[1](self.conv2[0](out, shared))))
        out = self.bn3(self.conv3(out))
        down = self.downsample
        identity = down["bn"](down["conv"](down["lip"](x, shared)))
        return self.relu(self.drop_path(out) + identity)


class LIPResNet(nn.Module):
    """LIP-ResNet: conv7x7/2 → BN → ReLU → stem LIP → four stages of bottlenecks → global pool → fc.

    Takes timm's model arguments (drop_rate before the fc, drop_path_rate with timm ResNet's linear rule,
    global_pool, output_stride 32/16/8, device/dtype); none of them adds a parameter, so the authors'
    checkpoints load into every configuration.
    """

    def __init__(self, layers: tuple[int, ...], num_classes: int = 1000, width: int = 64,
                 logit_width: int = LOGIT_WIDTH, in_chans: int = 3, output_stride: int = 32,
                 global_pool: str = "avg", drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"LIP-ResNet output_stride must be 8, 16 or 32, got {output_stride}")
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.conv1 = nn.Conv2d(in_chans, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = SimplifiedLIP(width)
        # the stages timm's features_only returns (stem after ReLU, then each layer's output)
        self.feature_info = [dict(num_chs=width, reduction=2, module="relu")]
        inplanes, net_stride, dilation, block_idx = width, 4, 1, 0
        for i, blocks in enumerate(layers):
            planes, stride = width * 2 ** i, 1 if i == 0 else 2
            if net_stride >= output_stride:  # as timm's ResNet: later strides become dilation
                dilation, stride = dilation * stride, 1
            else:
                net_stride *= stride
            stage = []
            for b in range(blocks):
                dpr = drop_path_rate * block_idx / max(sum(layers) - 1, 1)  # stochastic depth, linear rule
                if b == 0 and i > 0:
                    stage.append(LIPBottleneck(inplanes, planes, stride, logit_width, dpr))
                else:
                    stage.append(Bottleneck(inplanes, planes, dilation, dpr))
                inplanes, block_idx = planes * Bottleneck.expansion, block_idx + 1
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            self.feature_info.append(dict(num_chs=inplanes, reduction=net_stride, module=f"layer{i + 1}"))
        self.num_features = inplanes
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self._init_weights()
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def _init_weights(self) -> None:
        """The reference init: every LIP starts as average pooling and every residual branch as zero."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if isinstance(self.fc, nn.Linear):
            nn.init.normal_(self.fc.weight, 0, 0.01)
            nn.init.zeros_(self.fc.bias)
        for m in self.modules():
            if isinstance(m, Bottleneck | LIPBottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, LIPPool):
                nn.init.zeros_(m.logit_module()[0].weight)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """Parameter groups for timm's layer-wise lr decay: the stem, then stages (coarse) or blocks."""
        return dict(stem=r"^conv1|bn1|maxpool", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward (timm's checkpoint_seq) instead of keeping its activations."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """None: the paper decays every parameter, the LIP logit modules' instance norms included."""
        return set()

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new fc for `num_classes` (0: none, forward gives pooled features); global_pool None keeps it."""
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool, **dd)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def forward_intermediates(
            self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
            stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's intermediates API over feature_info's five taps (stem after ReLU, layer1-4); norm is unused."""
        assert output_fmt in ("NCHW",), "Output shape must be NCHW."
        intermediates = []
        take_indices, max_index = feature_take_indices(5, indices)
        x = self.relu(self.bn1(self.conv1(x)))
        if 0 in take_indices:
            intermediates.append(x)
        x = self.maxpool(x)
        layers = [self.layer1, self.layer2, self.layer3, self.layer4]
        if stop_early:
            layers = layers[:max_index]
        checkpointed = self.grad_checkpointing and not torch.jit.is_scripting()
        for feat_idx, layer in enumerate(layers, start=1):
            x = checkpoint_seq(layer, x) if checkpointed else layer(x)
            if feat_idx in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last tap in `indices` (and the head); returns the kept indices."""
        take_indices, max_index = feature_take_indices(5, indices)
        for name in ("layer1", "layer2", "layer3", "layer4")[max_index:]:
            setattr(self, name, nn.Sequential())  # empty, so checkpoint_seq can still iterate it
        if max_index == 0:
            self.maxpool = nn.Identity()
        if max_index < 4:  # the features now end at the last kept tap: the head sized for layer4 goes too
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or max_index < 4:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq([self.layer1, self.layer2, self.layer3, self.layer4], x, flatten=True)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

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
