"""The training step on a GPU: no host synchronisation in the step path (checked by torch's sync debug mode),
a late read that waits for its own step only, and the CUDA RNG state of the rank's own device."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from models import create_model
from training.checkpoint import rng_state, set_rng_state
from training.config import load_config
from training.engine import StepAgreement, train_step
from training.recipe import build_recipe
from training.signals import StopRequest

pytestmark = pytest.mark.cuda

DEVICE = torch.device("cuda", 0)


@pytest.fixture()
def nccl(tmp_path: Path):
    torch.cuda.set_device(DEVICE)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            device_id=DEVICE)
    yield
    dist.destroy_process_group()


def setup(name: str):
    cfg = load_config("configs/demo.yaml", [f"model={name}", "data.root=unused", "train.amp=bf16",
                                            "train.mixup_alpha=0.2", "train.cutmix_alpha=1.0",
                                            "train.label_smoothing=0.1", "train.ema_decay=0.9"])
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).to(DEVICE, memory_format=torch.channels_last)
    recipe = build_recipe(cfg, model, steps_per_epoch=10, num_classes=10, device=DEVICE)
    # as train.py's wrap_ddp does with several ranks
    ddp = DistributedDataParallel(model, device_ids=[0], gradient_as_bucket_view=True)
    images = torch.randn(8, 3, 64, 64, device=DEVICE).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (8,), device=DEVICE)
    return ddp, recipe, images, labels


@pytest.mark.parametrize("name", ["resnet50", "lip_resnet_tiny"])
def test_training_steps_never_wait_for_the_gpu(nccl, name: str) -> None:
    ddp, recipe, images, labels = setup(name)
    agreement = StepAgreement(1, StopRequest(), DEVICE)

    def step(i: int):
        recipe.scheduler.step_update(i)
        where = (0, i, i, recipe.optimizer.param_groups[0]["lr"])
        return agreement.push(train_step(ddp, images, labels, recipe), where)

    for i in range(3):  # warm-up: cuDNN autotuning, NCCL and DDP bucket setup may synchronise
        step(i)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        results = [step(i) for i in range(3, 7)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [r.step for r in results] == [2, 3, 4, 5]  # each push returns the step before
    assert all(math.isfinite(r.loss) and not r.non_finite and not r.stop for r in results)

    # The late read waits for its own step only: with a long kernel queued after it, it returns at once.
    torch.cuda._sleep(5_000_000_000)  # several seconds of GPU time
    busy = torch.cuda.Event()
    busy.record()
    start = time.perf_counter()
    last = agreement.flush()
    assert last.step == 6 and time.perf_counter() - start < 1.0 and not busy.query()
    torch.cuda.synchronize()


def test_cuda_rng_state_is_the_own_devices() -> None:
    torch.cuda.set_device(DEVICE)
    saved = rng_state()
    assert isinstance(saved["cuda"], torch.Tensor) and torch.equal(saved["cuda"], torch.cuda.get_rng_state(DEVICE))
    first = torch.rand(4, device=DEVICE)
    set_rng_state(saved)
    assert torch.equal(torch.rand(4, device=DEVICE), first)
