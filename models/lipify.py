"""Put LIP into any CNN: `lipify(model)` replaces its stride-2 downsampling with LIP pooling, in place.

    import timm
    from models import lipify
    model = lipify(timm.create_model("resnet18", pretrained=True))   # then fine-tune

Every max/average pooling with stride 2 becomes LIP over the same window (`LIP2d`), and every convolution
with stride 2 runs at stride 1 followed by LIP k3 s2 p1 (`LIPConv2d`), so the layer still halves the map
but picks what to keep by learned importance instead of by position. The stem convolution (the first one
applied to the image, timm's `pretrained_cfg["first_conv"]`) is left as it is unless `convert_stem=True`,
as in LIP-ResNet. Parameter keys and shapes are unchanged; only the logit modules are new.
"""

from __future__ import annotations

import fnmatch
from collections import OrderedDict
from collections.abc import Callable, Iterable

import timm
import torch
from timm.models import generate_default_cfgs, register_model
from timm.models._builder import pretrained_cfg_for_features, resolve_pretrained_cfg
from torch import nn

from .layers import LOGIT_WIDTH, LIPPool, conv1x1, conv3x3, imagenet_cfg, instance_norm

__all__ = ["LIP2d", "LIPConv2d", "LIPIFIED", "LOGIT_KINDS", "lipify", "logit_module"]

# The logit module kinds; the parameter cost is per LIP layer on a C-channel map (w = logit_width).
LOGIT_KINDS = {
    "depthwise": "3x3 depthwise conv + IN: 11C parameters, 9 multiply-adds per input element (the default)",
    "simplified": "3x3 conv C->C + IN (the paper's stem LIP): 9C^2 + 2C parameters",
    "bottleneck": "the paper's Bottleneck-128: 1x1 C->w, IN, ReLU, 3x3 w->w, IN, ReLU, 1x1 w->C, IN: "
                  "2Cw + 9w^2 + 4w + 2C parameters",
}


def logit_module(kind: str, channels: int, width: int = LOGIT_WIDTH) -> nn.Sequential:
    """A logit module of `kind` (see LOGIT_KINDS) whose last conv is zero, so its LIP starts as avg pooling."""
    if kind == "depthwise":
        layers = [("conv", nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)),
                  ("bn", instance_norm(channels))]
    elif kind == "simplified":
        layers = [("conv", conv3x3(channels, channels)), ("bn", instance_norm(channels))]
    elif kind == "bottleneck":
        layers = [("conv1", conv1x1(channels, width)), ("bn1", instance_norm(width)), ("relu1", nn.ReLU(inplace=True)),
                  ("conv2", conv3x3(width, width)), ("bn2", instance_norm(width)), ("relu2", nn.ReLU(inplace=True)),
                  ("conv3", conv1x1(width, channels)), ("bn3", instance_norm(channels))]
    else:
        raise ValueError(f"unknown LIP logit module '{kind}'; valid: {', '.join(LOGIT_KINDS)}")
    module = nn.Sequential(OrderedDict(layers))
    nn.init.zeros_(module[-2].weight)
    return module


class LIP2d(LIPPool):
    """LIP pooling whose logit module reads the map being pooled; what lipify puts in place of a pooling."""

    def __init__(self, channels: int, kernel_size: int = 3, stride: int = 2, padding: int = 1,
                 logit: str = "depthwise", logit_width: int = LOGIT_WIDTH) -> None:
        super().__init__(kernel_size, stride, padding)
        self.logit = logit_module(logit, channels, logit_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x, x)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class LIPConv2d(nn.Conv2d):
    """A stride-2 convolution run at stride 1 and pooled by LIP (k3 s2 p1): same keys and output shape.

    conv at stride 1 gives H' = H + 2p - d(k-1); LIP k3 s2 p1 then gives floor((H'-1)/2) + 1, which is
    exactly what the stride-2 conv gave, for every input size.
    """

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, lip: LIP2d) -> LIPConv2d:
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=1, padding=conv.padding,
                  dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                  padding_mode=conv.padding_mode, device="meta")
        new.weight, new.bias = conv.weight, conv.bias
        new.lip = lip
        return new.train(conv.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lip(self._conv_forward(x, self.weight, self.bias))


def _stem_names(model: nn.Module) -> set[str]:
    """timm's first_conv (a name or a list of names); without a timm config, the first Conv2d of the model.

    A config name is matched with '.' and '_' taken as one, since timm's feature wrappers flatten
    sequential modules (ConvNeXt's `stem.0` is `stem_0` in features_only models).
    """
    first = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    wanted = {first} if isinstance(first, str) else set(first) if isinstance(first, list | tuple) else set()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    found = {n for n in names if n in wanted or n.replace(".", "_") in {w.replace(".", "_") for w in wanted}}
    return found or set(names[:1])


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)  # type: ignore[return-value]


def _why_not(module: nn.Module) -> str | None:
    """Why a strided layer cannot become LIP, or None if it can."""
    if type(module) not in (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d):
        return f"{type(module).__name__} is a subclass of {type(module).__mro__[1].__name__} with its own forward"
    if _pair(module.stride) != (2, 2):
        return f"stride {module.stride}: only stride 2 (in both directions) is converted"
    if isinstance(module, nn.MaxPool2d | nn.AvgPool2d):
        if module.ceil_mode:
            return "ceil_mode=True: LIP pools in floor mode only"
        if isinstance(module, nn.MaxPool2d) and (_pair(module.dilation) != (1, 1) or module.return_indices):
            return "dilated or index-returning max pooling"
        k, p = _pair(module.kernel_size), _pair(module.padding)
        if k[0] != k[1] or p[0] != p[1]:
            return f"non-square window {k} / padding {p}"
    return None


def _strided(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d) and _pair(module.stride) != (1, 1)


def lipify(model: nn.Module, logit: str = "depthwise", logit_width: int = LOGIT_WIDTH,
           convert_stem: bool = False, exclude: Iterable[str] = ()) -> nn.Module:
    """Convert `model`'s stride-2 poolings and convolutions to LIP, in place; returns the model.

    logit: the logit module of every inserted LIP, one of LOGIT_KINDS. The default "depthwise" is the
        cheap one (11 parameters per channel, 9 multiply-adds per element of the map it pools); "bottleneck"
        is the paper's Bottleneck-128 (width `logit_width`), "simplified" its conv-IN stem module.
    convert_stem: also convert the stem convolution (left as it is by default, as in LIP-ResNet).
    exclude: module names or fnmatch patterns ("stages.3.*") left as they are, with everything below them.

    Original parameters and buffers keep their keys and shapes, so pretrained weights still load and only
    the logit modules are new. Their last conv is zero, so a fresh LIP is average pooling: a pretrained
    network converted this way sees average instead of max pooling, and strided convolutions followed by
    a 3x3 average instead of sub-sampling, so its accuracy drops until it is fine-tuned (the logits learn
    from there). The extra cost is the strided convolutions now running at full resolution, plus the
    logit modules; docs/lipify.md lists it per family. Raises ValueError naming the layer for a strided
    layer it cannot convert (exclude it to go on) and for a model with nothing to convert.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"lipify expects a torch.nn.Module, got {type(model).__name__}")
    if logit not in LOGIT_KINDS:
        raise ValueError(f"unknown LIP logit module '{logit}'; valid: {', '.join(LOGIT_KINDS)}")
    patterns = list(exclude)
    names = [n for n, _ in model.named_modules()]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ValueError(f"lipify: exclude pattern '{pattern}' matches no module of {type(model).__name__}")
    stems = _stem_names(model) if not convert_stem else set()

    def skipped(name: str) -> bool:
        parts = name.split(".")
        prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
        return name in stems or any(fnmatch.fnmatchcase(p, pat) for p in prefixes for pat in patterns)

    targets, lips = [], []
    for name, module in model.named_modules():
        if isinstance(module, LIPPool | LIPConv2d) or any(name.startswith(p) for p in lips):
            lips.append(f"{name}.")  # already LIP: its logit module is not converted again
            continue
        if _strided(module) and not skipped(name):
            reason = _why_not(module)
            if reason is not None:
                raise ValueError(f"lipify: cannot convert '{name}' ({type(module).__name__}): {reason}; "
                                 f"pass exclude=['{name}'] to leave it as it is")
            targets.append((name, module))
    if not targets:
        raise ValueError(f"lipify: {type(model).__name__} has no stride-2 pooling or convolution to convert "
                         f"(stem and excluded layers are left as they are)")

    reference = next(model.parameters(), None)
    channels = _pool_input_channels(model, [n for n, m in targets if not isinstance(m, nn.Conv2d)])
    for name, module in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if isinstance(module, nn.Conv2d):
            lip = LIP2d(module.out_channels, 3, 2, 1, logit, logit_width)
            lip = lip.to(device=module.weight.device, dtype=module.weight.dtype).train(module.training)
            new: nn.Module = LIPConv2d.from_conv(module, lip)
        else:
            new = LIP2d(channels[name], _pair(module.kernel_size)[0], 2, _pair(module.padding)[0], logit, logit_width)
            if reference is not None:
                new = new.to(device=reference.device, dtype=reference.dtype)
            new.train(module.training)
        for hooks in _HOOK_DICTS:  # e.g. timm's FeatureHookNet hooks the layers it returns
            getattr(new, hooks).update(getattr(module, hooks))
        setattr(parent, attr, new)
    return model


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


def _pool_input_channels(model: nn.Module, names: list[str]) -> dict[str, int]:
    """Channels entering each pooling in `names`, seen in one no-grad eval forward at the model's input size."""
    if not names:
        return {}
    cfg = getattr(model, "pretrained_cfg", None) or {}
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    size = tuple(cfg.get("input_size") or (first_conv.in_channels if first_conv else 3, 224, 224))
    reference = next(model.parameters(), None)
    seen: dict[str, int] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple) -> None:
            seen.setdefault(name, args[0].shape[1])
        return hook

    hooks = [model.get_submodule(n).register_forward_pre_hook(record(n)) for n in names]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *size, device=reference.device if reference is not None else None,
                                     dtype=reference.dtype if reference is not None else None))
    except Exception as exc:  # any failure of the user's model: say where it came from
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"lipify: a forward pass of {type(model).__name__} on zeros of shape (1, {size}) to "
                         f"find the channels of its poolings failed ({first})") from None
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    missing = [n for n in names if n not in seen]
    if missing:
        raise ValueError(f"lipify: pooling '{missing[0]}' is never called in a forward pass; exclude it")
    return seen


# Lipified timm models: create_model("lip_resnet18", pretrained=True) is lipify(resnet18 with its weights).
LIPIFIED = {"lip_resnet18": "resnet18", "lip_efficientnet_b0": "efficientnet_b0",
            "lip_convnext_atto": "convnext_atto", "lip_vgg11_bn": "vgg11_bn"}
_LIPIFY_ARGS = ("logit", "logit_width", "convert_stem", "exclude")


def _lipified_cfg(base: str) -> dict:
    """Our training recipe's data config (layers.imagenet_cfg) with the base network's layer names."""
    cfg = timm.models.get_pretrained_cfg(base)
    return imagenet_cfg(first_conv=cfg.first_conv, classifier=cfg.classifier, pool_size=cfg.pool_size)


default_cfgs = generate_default_cfgs({name: _lipified_cfg(base) for name, base in LIPIFIED.items()})


def _lipified(variant: str, pretrained: bool, **kwargs: object) -> nn.Module:
    """The base network's pretrained weights, or with pretrained_cfg_overlay=dict(file=...) a lipified file.

    The model reports its own pretrained_cfg (architecture `variant`, our recipe's data config), not the
    base network's.
    """
    options = {k: kwargs.pop(k) for k in _LIPIFY_ARGS if k in kwargs}
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    cfg = resolve_pretrained_cfg(variant, kwargs.pop("pretrained_cfg", None), overlay).to_dict()  # type: ignore[arg-type]
    file = overlay.get("file")  # type: ignore[union-attr]
    model = lipify(timm.create_model(LIPIFIED[variant], pretrained=pretrained and not file, **kwargs),  # type: ignore[arg-type]
                   **options)
    if pretrained and file:
        timm.models.load_checkpoint(model, file)  # strict: the file must hold the logit modules too
    model.pretrained_cfg = pretrained_cfg_for_features(cfg) if kwargs.get("features_only") else cfg
    model.default_cfg = model.pretrained_cfg
    return model


@register_model
def lip_resnet18(pretrained: bool = False, **kwargs: object) -> nn.Module:
    """timm ResNet-18 (BasicBlock) with LIP for its max-pool and stride-2 convs."""
    return _lipified("lip_resnet18", pretrained, **kwargs)


@register_model
def lip_efficientnet_b0(pretrained: bool = False, **kwargs: object) -> nn.Module:
    """timm EfficientNet-B0 with LIP after its stride-2 depthwise convs."""
    return _lipified("lip_efficientnet_b0", pretrained, **kwargs)


@register_model
def lip_convnext_atto(pretrained: bool = False, **kwargs: object) -> nn.Module:
    """timm ConvNeXt-Atto with LIP after its 2x2 stride-2 downsampling convs (the 4x4/4 stem is kept)."""
    return _lipified("lip_convnext_atto", pretrained, **kwargs)


@register_model
def lip_vgg11_bn(pretrained: bool = False, **kwargs: object) -> nn.Module:
    """timm VGG-11-BN with LIP for its 2x2 max-pools."""
    return _lipified("lip_vgg11_bn", pretrained, **kwargs)
