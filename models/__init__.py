"""LIP models and their torchvision baselines behind one factory.

    from models import create_model, load_checkpoint
    model = create_model("lip_resnet50")            # or lip_resnet101, lip_densenet121,
    load_checkpoint(model, "lip_resnet-50.pth.tar")  # resnet50, resnet101, densenet121

`lipify(model)` puts LIP into any CNN (models/lipify.py); `lip_resnet18`, `lip_efficientnet_b0`,
`lip_convnext_atto` and `lip_vgg11_bn` are timm models converted that way.

Importing this package registers the LIP models with timm (`timm.create_model("lip_resnet50")`). The
baselines are not re-registered: timm's own resnet50/resnet101/densenet121 have the torchvision key layout
and forward pass already (tests check that our checkpoints load into them and give the same logits), and
overwriting them would delete timm's pretrained tags for every other user of the process.
"""

from __future__ import annotations

from collections.abc import Callable

import torchvision
from torch import nn

from . import lip_densenet, lip_resnet
from . import lipify as _lipify_module
from .checkpoint import CheckpointError, load_checkpoint
from .layers import LIPPool, importance_maps
from .lipify import lipify

__all__ = ["CheckpointError", "LIPPool", "create_model", "importance_maps", "lipify", "list_models",
           "load_checkpoint"]

_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "lip_resnet50": lip_resnet.lip_resnet50,
    "lip_resnet101": lip_resnet.lip_resnet101,
    "lip_densenet121": lip_densenet.lip_densenet121,
    "resnet50": torchvision.models.resnet50,
    "resnet101": torchvision.models.resnet101,
    "densenet121": torchvision.models.densenet121,
    "lip_resnet_tiny": lip_resnet.lip_resnet_tiny,
    **{name: getattr(_lipify_module, name) for name in _lipify_module.LIPIFIED},
}


def list_models() -> list[str]:
    return list(_FACTORIES)


def create_model(name: str, num_classes: int = 1000, **kwargs: object) -> nn.Module:
    """Build a model with the reference init; unknown names raise a one-line ValueError listing valid ones.

    Other keywords are the model's: for the LIP models timm's (drop_rate, drop_path_rate, global_pool,
    output_stride, features_only, device, dtype, ...), with None meaning the default, as in timm.create_model.
    """
    if name not in _FACTORIES:
        raise ValueError(f"unknown model '{name}'; valid models: {', '.join(_FACTORIES)}")
    return _FACTORIES[name](num_classes=num_classes, **{k: v for k, v in kwargs.items() if v is not None})
