"""LIP-DenseNet-121 (Gao et al., ICCV 2019): torchvision's DenseNet-BC with LIP in the stem and transitions.

The stem max-pool becomes a simplified LIP and each transition's 2x2 average pool a LIP with its own
Bottleneck-128 logit module; everything else, key names included, is torchvision's DenseNet.
"""

from __future__ import annotations

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn
from torchvision.models.densenet import DenseNet, _Transition

from .layers import LOGIT_WIDTH, ProjectionLIP, SimplifiedLIP, imagenet_cfg


class LIPDenseNet(DenseNet):
    """DenseNet-BC whose pooling layers are LIP; init is torchvision's (no zero-init of the logit heads)."""

    def __init__(self, growth_rate: int = 32, block_config: tuple[int, ...] = (6, 12, 24, 16),
                 num_init_features: int = 64, num_classes: int = 1000,
                 logit_width: int = LOGIT_WIDTH, in_chans: int = 3) -> None:
        super().__init__(growth_rate=growth_rate, block_config=block_config,
                         num_init_features=num_init_features, num_classes=num_classes)
        self.num_classes = num_classes
        if in_chans != 3:
            self.features.conv0 = nn.Conv2d(in_chans, num_init_features, 7, stride=2, padding=3, bias=False)
        self.num_features = self.classifier.in_features
        self.features.pool0 = SimplifiedLIP(num_init_features, names=("conv1", "bn1"))
        for module in self.features:
            if isinstance(module, _Transition):
                module.pool = ProjectionLIP(module.conv.out_channels, logit_width)
        for module in self.features.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)
        # the stages timm's features_only returns: the stem after ReLU (before the stem LIP), each dense
        # block before its transition pools it, and the final norm
        self.feature_info = [dict(num_chs=num_init_features, reduction=2, module="features.relu0")]
        channels = num_init_features
        for i, layers in enumerate(block_config):
            channels += layers * growth_rate
            name = f"features.denseblock{i + 1}" if i < len(block_config) - 1 else "features.norm5"
            self.feature_info.append(dict(num_chs=channels, reduction=4 * 2 ** i, module=name))
            channels //= 2

    def get_classifier(self) -> nn.Module:
        return self.classifier


default_cfgs = generate_default_cfgs({
    "lip_densenet121": imagenet_cfg(first_conv="features.conv0", classifier="classifier",
                            paper_ids="arXiv:1908.04156"),
})


@register_model
def lip_densenet121(pretrained: bool = False, **kwargs: object) -> LIPDenseNet:
    """LIP-DenseNet-121 (8.7M params, 76.64 top-1 in the paper)."""
    return build_model_with_cfg(LIPDenseNet, "lip_densenet121", pretrained,
                                feature_cfg=dict(flatten_sequential=True), **kwargs)
