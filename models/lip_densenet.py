"""LIP-DenseNet-121 (Gao et al., ICCV 2019): torchvision's DenseNet-BC with LIP in the stem and transitions.

The stem max-pool becomes a simplified LIP and each transition's 2x2 average pool a LIP with its own
Bottleneck-128 logit module; everything else, key names included, is torchvision's DenseNet.
"""

from __future__ import annotations

import torch
from timm.layers import create_classifier, get_device_dtype
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn
from torchvision.models.densenet import DenseNet, _DenseLayer, _Transition

from .layers import LOGIT_WIDTH, ProjectionLIP, SimplifiedLIP, imagenet_cfg


class LIPDenseNet(DenseNet):
    """DenseNet-BC whose pooling layers are LIP; init is torchvision's (no zero-init of the logit heads).

    Takes timm DenseNet's model arguments: drop_rate (dropout before the classifier), proj_drop_rate (dropout
    on each dense layer's new features, torchvision's drop_rate), global_pool, memory_efficient, device and
    dtype. The final ReLU is a module (`features.relu5`, no parameters), so `features` ends in the map the
    head pools and the feature extractors see it.
    """

    def __init__(self, growth_rate: int = 32, block_config: tuple[int, ...] = (6, 12, 24, 16),
                 num_init_features: int = 64, num_classes: int = 1000, logit_width: int = LOGIT_WIDTH,
                 in_chans: int = 3, global_pool: str = "avg", drop_rate: float = 0.0, proj_drop_rate: float = 0.0,
                 memory_efficient: bool = False, output_stride: int = 32,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        if output_stride != 32:
            raise ValueError(f"LIP-DenseNet output_stride must be 32 (its transitions always pool), "
                             f"got {output_stride}")
        super().__init__(growth_rate=growth_rate, block_config=block_config, num_init_features=num_init_features,
                         num_classes=num_classes, drop_rate=proj_drop_rate, memory_efficient=memory_efficient)
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
        self.features.add_module("relu5", nn.ReLU())
        self.global_pool, classifier = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        if isinstance(classifier, nn.Linear):  # keep torchvision's initialised Linear (same init, same RNG draws)
            classifier = self.classifier
        self.classifier = classifier
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.head_drop = nn.Dropout(drop_rate)
        # the stages timm's features_only returns: the stem after ReLU (before the stem LIP), each dense
        # block before its transition pools it, and the final norm and ReLU
        self.feature_info = [dict(num_chs=num_init_features, reduction=2, module="features.relu0")]
        channels = num_init_features
        for i, layers in enumerate(block_config):
            channels += layers * growth_rate
            name = f"features.denseblock{i + 1}" if i < len(block_config) - 1 else "features.relu5"
            self.feature_info.append(dict(num_chs=channels, reduction=4 * 2 ** i, module=name))
            channels //= 2
        names = [n for n, _ in self.features.named_children()]
        self.feature_ends = [names.index(f["module"].split(".", 1)[1]) for f in self.feature_info]
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, object]:
        """Parameter groups for timm's layer-wise lr decay: the stem, then blocks or dense layers."""
        from timm.models._manipulate import MATCH_PREV_GROUP

        return dict(stem=r"^features\.conv0|features\.norm0|features\.pool0",
                    blocks=r"^features\.(?:denseblock|transition)(\d+)" if coarse else [
                        (r"^features\.denseblock(\d+)\.denselayer(\d+)", None),
                        (r"^features\.transition(\d+)", MATCH_PREV_GROUP)])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each dense layer's bottleneck in backward (torchvision's memory_efficient)."""
        for module in self.features.modules():
            if isinstance(module, _DenseLayer):
                module.memory_efficient = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """None: the paper decays every parameter, the LIP logit modules' instance norms included."""
        return set()

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier for `num_classes` (0: none, forward gives pooled features)."""
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.global_pool, self.classifier = create_classifier(self.num_features, num_classes,
                                                              pool_type=global_pool, **dd)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.global_pool.train(self.training)
        self.classifier.train(self.training)

    def forward_intermediates(
            self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
            stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's intermediates API over feature_info's five taps; norm is unused (the last tap is normed)."""
        assert output_fmt in ("NCHW",), "Output shape must be NCHW."
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.feature_ends), indices)
        if torch.jit.is_scripting() or not stop_early:  # a Sequential cannot be sliced in TorchScript
            layers = self.features
        else:
            layers = self.features[:self.feature_ends[max_index] + 1]
        feat_idx = 0
        for i, layer in enumerate(layers):
            x = layer(x)
            if i in self.feature_ends:
                if feat_idx in take_indices:
                    intermediates.append(x)
                feat_idx += 1
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the layers after the last tap in `indices` (and the head); returns the kept indices."""
        take_indices, max_index = feature_take_indices(len(self.feature_ends), indices)
        self.features = self.features[:self.feature_ends[max_index] + 1]
        if max_index < len(self.feature_ends) - 1:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or max_index < len(self.feature_ends) - 1:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.global_pool(x))
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


default_cfgs = generate_default_cfgs({
    "lip_densenet121": imagenet_cfg(first_conv="features.conv0", classifier="classifier",
                            paper_ids="arXiv:1908.04156"),
})


@register_model
def lip_densenet121(pretrained: bool = False, **kwargs: object) -> LIPDenseNet:
    """LIP-DenseNet-121 (8.7M params, 76.64 top-1 in the paper)."""
    return build_model_with_cfg(LIPDenseNet, "lip_densenet121", pretrained,
                                feature_cfg=dict(flatten_sequential=True), **kwargs)
