"""Fixtures several test modules share, and the markers' run-time rules.

Markers (registered in pyproject.toml): `slow` (subprocesses, training runs, torchrun, full-size networks),
`slurm` (the real SLURM cluster, which needs root) and `cuda` (skipped without a CUDA device;
scripts/gpu_check.sh runs them on a GPU). The quick tier is `pytest -m "not slow and not slurm"`
(`make quick`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from train_utils import make_dataset

from models import create_model


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    no_gpu = pytest.mark.skip(reason="needs a CUDA device (none visible to torch here)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(no_gpu)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's JPEG dataset, small: 3 classes, 16 train and 7 val images each (an odd val count, so two
    ranks get unequal shares), 40 px. Read-only: a test that needs to change it copies it first."""
    return make_dataset(tmp_path_factory.mktemp("demo_data") / "shapes", classes=3, train=16, val=7, size=40)


class Payload:
    """Unpickling this runs a shell command that creates `marker`: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture()
def payload(tmp_path: Path) -> Payload:
    """A malicious pickle payload; the test asserts `payload.marker` never appears."""
    return Payload(tmp_path / "pwned")


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    """Deterministic non-trivial weights: every parameter and BN statistic drawn, logit heads active."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.dtype.is_floating_point:
                if name.endswith("running_var"):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                elif name.endswith(("weight", "bias", "running_mean")) and t.dim() == 1:
                    gain = 0.2 if ".bn3." in name else 1.0  # small last-BN gains keep residual sums bounded
                    t.copy_(torch.randn(t.shape, generator=g) * 0.1 + (gain if name.endswith("weight") else 0.0))
                else:
                    fan_in = t[0].numel() if t.dim() > 1 else 1
                    t.copy_(torch.randn(t.shape, generator=g) * (2.0 / fan_in) ** 0.5)
    return model.eval()


@pytest.fixture()
def randomise() -> Callable[[nn.Module, int], nn.Module]:
    """`randomise(model, seed)`: weights drawn from `seed` (untrained BN statistics would hide bugs)."""
    return _randomise


@pytest.fixture()
def classifier() -> nn.Module:
    """A seeded lip_resnet_tiny with 5 classes and non-trivial weights, in eval mode."""
    torch.manual_seed(0)
    return _randomise(create_model("lip_resnet_tiny", num_classes=5), seed=5)
