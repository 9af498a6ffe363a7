"""Every registered LIP model keeps timm's model contract, checked the way timm's own model tests check it.

forward, backward, pretrained_cfg, forward_features / forward_head, num_classes=0, TorchScript, FX forward and
backward, forward_intermediates, prune_intermediate_layers, features_only with each feature_cls, and the
keywords timm's train.py passes to create_model. The 50-layer and lipified models beyond ResNet-18 run in the
slow tier: their channels cannot be made tiny, so they take seconds per check on two cores.
"""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import DropPath
from timm.layers._fx import get_notrace_functions, get_notrace_modules
from timm.optim import create_optimizer_v2
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import models
from models.lipify import LIPIFIED

QUICK = ["lip_resnet_tiny", "lip_resnet18"]
HEAVY = ["lip_resnet50", "lip_resnet101", "lip_densenet121",
         *[name for name in LIPIFIED if name not in QUICK]]
ALL = [*QUICK, *[pytest.param(name, marks=pytest.mark.slow) for name in HEAVY]]
# Tracing and feature extraction per architecture class: LIPResNet (tiny), lipify (ResNet-18) and LIPDenseNet;
# the other registered models share these classes' code and run forward, backward, cfg and TorchScript above.
BUT_101 = [*QUICK, pytest.param("lip_densenet121", marks=pytest.mark.slow)]
SIZE = 32  # every model reduces 32x: a 1x1 final map, as small as timm's own tests go
CFG_KEYS = ("architecture", "input_size", "pool_size", "crop_pct", "interpolation", "mean", "std",
            "first_conv", "classifier", "num_classes")


def _input(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def _create(name: str, **kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs)


def test_every_registered_lip_model_is_covered() -> None:
    assert set(timm.list_models("lip_*")) == set(QUICK) | set(HEAVY)


@pytest.mark.parametrize("name", ALL)
def test_forward_backward_cfg_and_head(name: str) -> None:
    model = _create(name, num_classes=10).train()
    x = _input()
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.mean().backward()
    params = [n for n, p in model.named_parameters() if p.requires_grad]
    assert params == [n for n, p in model.named_parameters() if p.grad is not None]  # every parameter is reached

    cfg = model.pretrained_cfg
    assert all(k in cfg for k in CFG_KEYS) and cfg["architecture"] == name and model.default_cfg == cfg
    assert (cfg["interpolation"], cfg["crop_pct"]) == ("bilinear", 0.875)  # what our recipe evaluates with
    state = model.state_dict()
    first_convs = [cfg["first_conv"]] if isinstance(cfg["first_conv"], str) else cfg["first_conv"]
    assert all(f"{conv}.weight" in state for conv in first_convs)
    assert model.get_submodule(cfg["classifier"]) is model.get_classifier()

    model.eval()
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape[1] == model.num_features and features.shape[2:] == (SIZE // 32, SIZE // 32)
        assert model.forward_head(features, pre_logits=True).shape == (2, model.head_hidden_size)
        torch.testing.assert_close(model.forward_head(features), model(x))

        final, intermediates = model.forward_intermediates(x)
        torch.testing.assert_close(final, features)
        info = model.feature_info
        info = info.get_dicts() if hasattr(info, "get_dicts") else info
        assert len(intermediates) == len(info)
        for tensor, tap in zip(intermediates, info, strict=True):
            assert tensor.shape[1:] == (tap["num_chs"], SIZE // tap["reduction"], SIZE // tap["reduction"])

        model.reset_classifier(0)
        assert model(x).shape == (2, model.head_hidden_size)  # VGG's pre-logits MLP: 4096, not num_features
        model.reset_classifier(0, "")
        unpooled = model(x)
        assert unpooled.dim() == 4 and unpooled.shape[1] == model.head_hidden_size


@pytest.mark.parametrize("name", BUT_101)
def test_num_classes_0_gives_pooled_features(name: str) -> None:
    model = _create(name, num_classes=0).eval()
    with torch.no_grad():
        assert model(_input()).shape == (2, model.head_hidden_size)


@pytest.mark.parametrize("name", ALL)
def test_torchscript_matches_eager(name: str) -> None:
    model = _create(name, num_classes=10).eval()
    scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(_input()), model(_input()))


def _fx(model: nn.Module) -> nn.Module:
    """timm's FX test: trace to the last graph node, with timm's registered leaf modules and functions."""
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=tracer_kwargs)


@pytest.mark.parametrize("name", BUT_101)
def test_fx_forward_and_backward(name: str) -> None:
    model = _create(name, num_classes=10)
    fx_model = _fx(model.eval()).eval()
    with torch.no_grad():
        out = fx_model(_input())
        out = out[next(iter(out))] if isinstance(out, dict) else out
        torch.testing.assert_close(out, model(_input()))
    fx_model = _fx(model.train()).train()
    out = fx_model(_input())
    out = out[next(iter(out))] if isinstance(out, dict) else out
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("feature_cls", [None, "hook", "fx", "getter"])
@pytest.mark.parametrize("name", BUT_101)
def test_features_only(name: str, feature_cls: str | None) -> None:
    model = _create(name, features_only=True, feature_cls=feature_cls).eval()
    assert model.pretrained_cfg["architecture"] == name and "classifier" not in model.pretrained_cfg
    with torch.no_grad():
        maps = model(_input())
    maps = list(maps.values()) if isinstance(maps, dict) else maps
    channels, reductions = model.feature_info.channels(), model.feature_info.reduction()
    assert [m.shape[1] for m in maps] == channels
    assert [m.shape[2] for m in maps] == [SIZE // r for r in reductions]
    assert sum(isinstance(m, models.LIPPool) for m in model.modules()) > 0


@pytest.mark.parametrize("name", BUT_101)
def test_prune_intermediate_layers(name: str) -> None:
    model = _create(name, num_classes=10).eval()
    info = model.feature_info
    info = info.get_dicts() if hasattr(info, "get_dicts") else info
    assert model.prune_intermediate_layers([1, 2]) == [1, 2]
    with torch.no_grad():
        maps = model.forward_intermediates(_input(), indices=[1, 2], intermediates_only=True)
        assert [m.shape[1] for m in maps] == [info[1]["num_chs"], info[2]["num_chs"]]
        assert model(_input()).shape[:2] == (2, info[2]["num_chs"])  # head pruned: the last kept map


@pytest.mark.parametrize("name", BUT_101)
def test_device_and_dtype_keywords(name: str) -> None:
    model = _create(name, num_classes=10, device="cpu", dtype=torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert model.eval()(_input(1).double()).dtype == torch.float64


def _train_outputs_differ(model: nn.Module) -> bool:
    model.train()
    x = _input(4)
    with torch.no_grad():
        return not torch.equal(model(x), model(x))


@pytest.mark.parametrize("name", ["lip_resnet_tiny", "lip_resnet18"])
def test_train_py_keywords_act_in_training(name: str) -> None:
    model = _create(name, num_classes=7, global_pool="avg", drop_rate=0.0, drop_path_rate=0.0)
    assert not _train_outputs_differ(model)  # batch-norm statistics alone are deterministic
    for keywords in (dict(drop_rate=0.5), dict(drop_path_rate=0.5)):
        model = _create(name, num_classes=7, global_pool="avg", **keywords)
        nn.init.normal_(model.get_classifier().weight)  # a live head and residual branches, so drops show
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
        assert _train_outputs_differ(model), keywords
        with torch.no_grad():
            assert torch.equal(model.eval()(_input(4)), model(_input(4)))


def test_drop_path_follows_timms_linear_rule_and_adds_no_keys() -> None:
    plain = models.create_model("lip_resnet50")
    model = models.create_model("lip_resnet50", drop_path_rate=0.2, drop_rate=0.3)
    assert list(model.state_dict()) == list(plain.state_dict())
    blocks = [b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]
    rates = [b.drop_path.drop_prob if isinstance(b.drop_path, DropPath) else 0.0 for b in blocks]
    assert rates == pytest.approx([0.2 * i / (len(blocks) - 1) for i in range(len(blocks))])
    assert model.drop_rate == 0.3


def test_densenet_takes_timms_densenet_keywords() -> None:
    model = models.create_model("lip_densenet121", num_classes=5, drop_rate=0.2, proj_drop_rate=0.1,
                                global_pool="max", drop_path_rate=None)
    assert model.head_drop.p == 0.2 and model.features.denseblock1.denselayer1.drop_rate == 0.1
    assert model.global_pool.pool_type == "max"
    with pytest.raises(TypeError, match="drop_path_rate"):  # no residual branches, as timm's densenet
        models.create_model("lip_densenet121", drop_path_rate=0.1)
    with pytest.raises(ValueError, match="output_stride must be 32"):
        models.create_model("lip_densenet121", output_stride=16)


def test_output_stride_dilates_the_later_stages() -> None:
    x = torch.randn(1, 3, 64, 64)
    keys = list(models.create_model("lip_resnet_tiny").state_dict())
    for stride in (32, 16, 8):
        model = models.create_model("lip_resnet_tiny", output_stride=stride).eval()
        assert list(model.state_dict()) == keys
        with torch.no_grad():
            maps = model.forward_intermediates(x, intermediates_only=True)
        assert [64 // m.shape[-1] for m in maps] == [i["reduction"] for i in model.feature_info]
        assert maps[-1].shape[-1] == 64 // stride
    with pytest.raises(ValueError, match="output_stride must be 8, 16 or 32, got 12"):
        models.create_model("lip_resnet_tiny", output_stride=12)


@pytest.mark.parametrize("name", ["lip_resnet_tiny", pytest.param("lip_densenet121", marks=pytest.mark.slow)])
def test_grad_checkpointing_recomputes_and_gives_the_same_gradients(name: str) -> None:
    grads, calls = [], []
    for enable in (False, True):
        model = _create(name, num_classes=3).train()
        model.set_grad_checkpointing(enable)
        probe = model.layer1[0].conv1 if name == "lip_resnet_tiny" else model.features.denseblock1.denselayer1.norm1
        seen: list[int] = []
        probe.register_forward_hook(lambda *_, seen=seen: seen.append(1))
        model(_input()).sum().backward()
        grads.append([p.grad for p in model.parameters()])
        calls.append(len(seen))
    assert calls == [1, 2]  # the checkpointed block runs again in backward
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["lip_resnet_tiny", pytest.param("lip_densenet121", marks=pytest.mark.slow)])
def test_group_matcher_feeds_timms_layer_decay(name: str) -> None:
    model = _create(name, num_classes=3)
    assert model.no_weight_decay() == set()
    optimizer = create_optimizer_v2(model, "sgd", lr=0.1, weight_decay=1e-4, layer_decay=0.5)
    grouped = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(grouped) == len(list(model.parameters())) and len({id(p) for p in grouped}) == len(grouped)
    scales = {g["lr_scale"] for g in optimizer.param_groups}
    assert len(scales) > 2 and max(scales) == 1.0  # the head trains at full lr, the stem least
