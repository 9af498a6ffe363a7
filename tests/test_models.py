"""The LIP model family: layout of the authors' checkpoints, exact sizes, init, numerics, timm, loading."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import models
import models.layers
from models import CheckpointError, create_model, importance_maps, load_checkpoint

# state_dict keys, dtypes and shapes of the authors' released checkpoints, one file per LIP model
KEYS_DIR = Path(__file__).resolve().parent / "data" / "official_keys"
LIP_MODELS = ["lip_resnet50", "lip_resnet101", "lip_densenet121"]
PARAMS = {"lip_resnet50": 23_864_232, "lip_resnet101": 42_856_360, "lip_densenet121": 8_690_920}
FLOPS = {"lip_resnet50": 5.342e9, "lip_resnet101": 9.064e9, "lip_densenet121": 4.128e9}


def official_layout(name: str) -> list[tuple[str, str, tuple[int, ...]]]:
    rows = []
    for line in (KEYS_DIR / f"{name}.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, dtype, shape = line.split()
        rows.append((key, dtype, () if shape == "scalar" else tuple(int(s) for s in shape.split("x"))))
    return rows


@pytest.fixture(scope="module")
def built() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {name: create_model(name) for name in LIP_MODELS}


@pytest.mark.parametrize("name", LIP_MODELS)
def test_key_layout_matches_the_authors_checkpoints(built: dict, name: str) -> None:
    ours = [(k, str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in built[name].state_dict().items()]
    assert ours == official_layout(name)


@pytest.mark.parametrize("name", LIP_MODELS)
def test_parameter_count_is_exact(built: dict, name: str) -> None:
    assert sum(p.numel() for p in built[name].parameters()) == PARAMS[name]


@pytest.mark.slow
@pytest.mark.parametrize("name", LIP_MODELS)
def test_flops_match_fvcore_reference(built: dict, name: str) -> None:
    from scripts.model_table import count_flops

    assert count_flops(built[name]) == pytest.approx(FLOPS[name], rel=5e-3)


def test_unknown_model_is_one_line_listing_valid_names() -> None:
    with pytest.raises(ValueError) as e:
        create_model("lip_resnet5O")
    msg = str(e.value)
    assert "\n" not in msg and "lip_resnet5O" in msg
    assert all(name in msg for name in [*LIP_MODELS, "resnet50", "resnet101", "densenet121"])


@pytest.mark.parametrize("name", ["resnet50", "resnet101", "densenet121"])
def test_baselines_are_torchvision_models(name: str) -> None:
    import torchvision

    torch.manual_seed(0)
    ours = create_model(name, num_classes=10)
    assert type(ours) is type(getattr(torchvision.models, name)())
    assert ours.state_dict().keys() == getattr(torchvision.models, name)(num_classes=10).state_dict().keys()


@pytest.mark.parametrize("name", LIP_MODELS)
def test_timm_creates_lip_models_with_the_paper_eval_config(name: str) -> None:
    model = timm.create_model(name, num_classes=7)
    assert sum(p.numel() for p in model.parameters()) < PARAMS[name]  # the 7-way head is smaller
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.875
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    data_cfg = timm.data.resolve_data_config({}, model=model)
    assert data_cfg["input_size"] == (3, 224, 224)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "densenet121"])
def test_timm_baselines_take_our_baseline_weights_and_agree(name: str) -> None:
    torch.manual_seed(0)
    ours = create_model(name).eval()
    theirs = timm.create_model(name).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), atol=1e-5, rtol=1e-5)


def test_reference_init(built: dict) -> None:
    r50 = built["lip_resnet50"]
    assert r50.maxpool.logit.conv.weight.abs().sum() == 0
    for block in [r50.layer2[0], r50.layer3[0], r50.layer4[0]]:
        assert block.conv2[0].postprocessing.conv.weight.abs().sum() == 0
        assert block.downsample.lip.postprocessing.conv.weight.abs().sum() == 0
        assert block.bottleneck_shared.logit.conv1.weight.std() > 0
    assert all(b.bn3.weight.abs().sum() == 0 for layer in [r50.layer1, r50.layer4] for b in layer)
    assert r50.fc.weight.std().item() == pytest.approx(0.01, rel=0.05) and r50.fc.bias.abs().sum() == 0
    conv = r50.layer1[0].conv1.weight  # Kaiming normal, fan_out: std = sqrt(2 / (out * k * k))
    assert conv.std().item() == pytest.approx((2 / conv.shape[0]) ** 0.5, rel=0.1)

    dense = built["lip_densenet121"]  # the reference defines but never calls the zero-init for DenseNet
    assert dense.features.pool0.logit.conv1.weight.std() > 0
    assert dense.features.transition1.pool.logit.conv3.weight.std() > 0
    assert dense.classifier.bias.abs().sum() == 0


def test_every_lip_starts_as_average_pooling() -> None:
    torch.manual_seed(0)
    model = create_model("lip_resnet_tiny", num_classes=5).eval()
    x = torch.randn(2, 8, 17, 17)
    expected = F.avg_pool2d(x, 3, 2, 1, count_include_pad=False)
    torch.testing.assert_close(model.maxpool(x), expected, atol=1e-5, rtol=1e-5)


def _naive_gated_lip2d(x: torch.Tensor, z: torch.Tensor, coeff: float = 12.0, kernel_size: int = 3,
                       stride: int = 2, padding: int = 1) -> torch.Tensor:
    w = torch.sigmoid(z).mul(coeff).exp()
    return F.avg_pool2d(x * w, kernel_size, stride, padding) / F.avg_pool2d(w, kernel_size, stride, padding)


def _naive_norm_gated_lip2d(x: torch.Tensor, f: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                            eps: float, coeff: float = 12.0, kernel_size: int = 3, stride: int = 2,
                            padding: int = 1) -> torch.Tensor:
    z = F.instance_norm(f, weight=weight, bias=bias, eps=eps)
    return _naive_gated_lip2d(x, z, coeff, kernel_size, stride, padding)


@pytest.mark.slow
@pytest.mark.parametrize("name", LIP_MODELS)
def test_logits_match_the_naive_formula(monkeypatch: pytest.MonkeyPatch, randomise, name: str) -> None:
    """Our fused operator inside the whole network vs the authors' exp/avg_pool formula in fp32.

    Both are compared with the float64 forward pass: the fused path must be as accurate as the formula
    (the fp32 noise floor of a deep network), and the two must agree to 2e-6 relative to the logits.
    """
    torch.manual_seed(0)
    model = randomise(create_model(name, num_classes=100), seed=1)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(x).double()
        monkeypatch.setattr(models.layers, "norm_gated_lip2d", _naive_norm_gated_lip2d)
        naive = model(x).double()
        truth = model.double()(x.double())
    scale = truth.abs().max().item()
    assert torch.isfinite(naive).all() and scale > 0.1
    err_ours, err_naive = (ours - truth).abs().max().item(), (naive - truth).abs().max().item()
    assert err_ours <= 1.5 * err_naive + 1e-7 * scale
    assert (ours - naive).abs().max().item() <= 2e-6 * max(scale, 1.0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lip_resnet50", "lip_densenet121"])
def test_channels_last_and_bf16_autocast_stay_finite(randomise, name: str) -> None:
    torch.manual_seed(0)
    model = randomise(create_model(name, num_classes=10), seed=3).train()
    for m in model.modules():  # push the soft gates to saturation: logits near 0 and 12
        if isinstance(m, models.LIPPool):
            m.logit_module()[0].weight.data.mul_(50)
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().square().mean().backward()
    assert torch.isfinite(out).all()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) == len(list(model.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)


def _layout(t: torch.Tensor) -> str:
    return "channels_last" if not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last) else "nchw"


@pytest.mark.parametrize("name", ["lip_resnet50", "lip_densenet121"])
def test_channels_last_network_hands_every_lip_x_and_logit_in_one_layout(monkeypatch: pytest.MonkeyPatch,
                                                                      name: str) -> None:
    """torch's instance_norm returns NCHW whatever its input; the logit modules' norms must not, or the LIP
    kernels read the logit across the channels with a stride of H*W (and write its gradient so)."""
    calls: list[tuple[str, str]] = []
    grads: list[str] = []
    real = models.layers.norm_gated_lip2d

    def spy(x: torch.Tensor, f: torch.Tensor, *args: object) -> torch.Tensor:
        calls.append((_layout(x), _layout(f)))
        if f.requires_grad:
            f.register_hook(lambda g: grads.append(_layout(g)))
        return real(x, f, *args)

    monkeypatch.setattr(models.layers, "norm_gated_lip2d", spy)
    model = create_model(name, num_classes=10).train().to(memory_format=torch.channels_last)
    model(torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last)).sum().backward()
    lips = sum(isinstance(m, models.LIPPool) for m in model.modules())
    assert len(calls) == lips and set(calls) == {("channels_last", "channels_last")}  # nothing recomputed
    assert len(grads) == lips and set(grads) == {"channels_last"}


def test_instance_norm_keeps_the_memory_format_and_values() -> None:
    x = torch.randn(2, 5, 7, 9)
    ours, plain = models.layers.instance_norm(5), nn.InstanceNorm2d(5, affine=True)
    with torch.no_grad():
        ours.weight.normal_(), ours.bias.normal_()
    plain.load_state_dict(ours.state_dict())
    for layout in (torch.contiguous_format, torch.channels_last):
        y = ours(x.contiguous(memory_format=layout))
        assert y.is_contiguous(memory_format=layout)
        torch.testing.assert_close(y, plain(x), rtol=1e-5, atol=1e-6)  # fp32 rounding: another summation order


def test_importance_maps_cover_stem_and_stride2_layers(randomise) -> None:
    torch.manual_seed(0)
    model = randomise(create_model("lip_resnet_tiny", num_classes=5), seed=4).train()
    maps = importance_maps(model, torch.randn(3, 3, 64, 64))
    assert model.training
    assert {"maxpool", "layer2.0.conv2.0", "layer3.0.conv2.0", "layer4.0.conv2.0"} <= set(maps)
    assert maps["maxpool"].shape == (3, 8, 32, 32)  # the importance of each pooled input
    for m in maps.values():
        assert m.min() >= 1.0 and m.max() <= torch.exp(torch.tensor(12.0)) * 1.0001
    assert importance_maps(create_model("resnet50", num_classes=5), torch.randn(1, 3, 32, 32)) == {}


# ---------------------------------------------------------------- checkpoints


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.mark.parametrize("layout", ["authors", "bare", "ours"])
def test_checkpoint_round_trip(tmp_path: Path, classifier: nn.Module, layout: str) -> None:
    sd = classifier.state_dict()
    obj = {"authors": {"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 90,
                       "best_prec1": torch.tensor(76.6), "arch": "lip_resnet_tiny"},
           "bare": sd, "ours": {"model": sd, "epoch": 3, "step": 10}}[layout]
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    fresh = create_model("lip_resnet_tiny", num_classes=5)
    load_checkpoint(fresh, path)
    assert _same_weights(fresh, classifier)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), classifier.eval()(x), atol=0, rtol=0)


def test_numpy_scalars_in_a_checkpoint_are_plain_data(tmp_path: Path, classifier: nn.Module) -> None:
    import numpy as np

    path = tmp_path / "np.pth"
    torch.save({"state_dict": classifier.state_dict(), "best_prec1": np.float64(76.6)}, path)
    assert load_checkpoint(create_model("lip_resnet_tiny", num_classes=5), path)["best_prec1"] == 76.6


def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path, classifier: nn.Module, payload) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": classifier.state_dict(), "payload": payload}, path, pickle_module=pickle)
    before = {k: v.clone() for k, v in classifier.state_dict().items()}
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(classifier, path)
    assert str(path) in str(e.value) and "\n" not in str(e.value) and "refused" in str(e.value)
    assert not payload.marker.exists()
    assert all(torch.equal(before[k], v) for k, v in classifier.state_dict().items())


def _refusal(tmp_path: Path, model: nn.Module, state: dict) -> str:
    path = tmp_path / "bad.pth"
    torch.save({"state_dict": state}, path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(model, path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "partially loaded"
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_partial_unexpected_and_misshaped_checkpoints_are_refused(tmp_path: Path, classifier: nn.Module,
                                                                  randomise) -> None:
    other = randomise(create_model("lip_resnet_tiny", num_classes=5), seed=9).state_dict()
    missing = {k: v for k, v in other.items() if k != "layer2.0.conv2.0.postprocessing.bn.weight"}
    assert "layer2.0.conv2.0.postprocessing.bn.weight" in _refusal(tmp_path, classifier, missing)
    extra = {**other, "layer9.weight": torch.zeros(1)}
    assert "layer9.weight" in _refusal(tmp_path, classifier, extra)
    shaped = {**other, "fc.weight": torch.zeros(7, other["fc.weight"].shape[1])}
    assert "fc.weight" in _refusal(tmp_path, classifier, shaped)
    wrong_model = create_model("resnet50", num_classes=5).state_dict()
    assert "missing" in _refusal(tmp_path, classifier, wrong_model)


def test_missing_and_garbage_files_are_one_line_errors(tmp_path: Path, classifier: nn.Module) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(classifier, tmp_path / "nope.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a checkpoint at all")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(classifier, garbage)
    assert "\n" not in str(e.value) and str(garbage) in str(e.value)
