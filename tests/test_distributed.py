"""Multi-rank plumbing that runs in one process: the node's index read from the cache, the process group
destroyed on every exit path, DDP's bucket views, the small-batch warning and the arithmetic settings."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from train_utils import make_dataset

import data.index
from data.index import from_node_cache, load_index
from training import backends
from training.cli import run_main
from training.distributed import Dist, small_batch_warning, wrap_ddp
from training.errors import NonFiniteLossError, UserError
from training.logger import RunLog


@pytest.mark.slow
def test_other_ranks_of_a_node_read_the_index_without_walking_the_tree(tmp_path: Path, monkeypatch) -> None:
    root = make_dataset(tmp_path / "shapes", classes=3, train=4, val=2, size=32)
    broken = root / "train" / "01_square" / "broken.JPEG"
    broken.write_bytes(b"not a jpeg")
    cache = tmp_path / "cache"
    first = load_index(root, "train", cache, log=lambda _msg: None)  # what local rank 0 does

    def no_walk(*_args):
        raise AssertionError("listed the tree")

    monkeypatch.setattr(data.index, "_list_class", no_walk)
    with from_node_cache():
        again = load_index(root, "train", cache, log=lambda _msg: None)
    assert again.classes == first.classes and again.checked == 0
    for name in ("paths", "labels", "widths", "heights"):
        assert np.array_equal(getattr(again, name), getattr(first, name)), name
    assert again.bad_files == first.bad_files and str(broken) in again.bad_files[0][0]

    with from_node_cache(), pytest.raises(AssertionError, match="listed the tree"):
        load_index(root, "train", tmp_path / "no-cache-yet", log=lambda _msg: None)  # no cache: scans
    with pytest.raises(AssertionError, match="listed the tree"):
        load_index(root, "train", cache, log=lambda _msg: None)  # outside the context: scans as always


@pytest.fixture()
def process_group(tmp_path: Path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def _raise(error: Exception):
    def main() -> None:
        raise error
    return main


@pytest.mark.parametrize("error, code", [(None, None), (UserError("bad input"), 2),
                                         (NonFiniteLossError("nan loss"), 3)], ids=["ok", "exit2", "exit3"])
def test_process_group_destroyed_on_every_exit_path(process_group, error, code, capsys) -> None:
    assert dist.is_initialized()
    if error is None:
        run_main(lambda: None, RunLog(0, 1))
    else:
        with pytest.raises(SystemExit) as exit_info:
            run_main(_raise(error), RunLog(0, 1))
        assert exit_info.value.code == code
        assert capsys.readouterr().err.strip() == f"error: {error}"
    assert not dist.is_initialized()


def test_ddp_keeps_gradients_in_its_buckets(process_group) -> None:
    model = wrap_ddp(nn.Linear(4, 2), Dist(0, 2, 0, torch.device("cpu")))  # world_size 2: DDP is used
    assert model.gradient_as_bucket_view
    for _ in range(2):  # views are set up from the second step on
        model.zero_grad(set_to_none=True)
        model(torch.randn(3, 4)).sum().backward()
    weight = model.module.weight.grad
    assert weight._base is not None  # a view into the communication bucket, not its own tensor


def test_small_batch_warning_on_gpus_only() -> None:
    gpu = Dist(0, 4, 0, torch.device("cuda", 0))
    said = small_batch_warning(gpu, 16)
    assert said is not None and "16 images per GPU" in said and "128" in said
    assert small_batch_warning(gpu, 32) is None
    assert small_batch_warning(Dist(0, 4, 0, torch.device("cpu")), 16) is None


@pytest.fixture()
def restore_backends():
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
     torch.backends.cudnn.allow_tf32) = saved[2:6]
    if saved[6] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[6]


def test_tf32_and_deterministic_settings(restore_backends) -> None:
    gpu = torch.device("cuda", 0)  # configure only sets flags, so this runs without a GPU
    said = backends.configure({"tf32": True, "deterministic": False}, gpu)
    assert said == "tf32 on, cudnn.benchmark on, deterministic off"
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert not torch.are_deterministic_algorithms_enabled()

    said = backends.configure({"tf32": False, "deterministic": False}, gpu)
    assert said.startswith("tf32 off") and not torch.backends.cuda.matmul.allow_tf32
    assert not torch.backends.cudnn.allow_tf32

    said = backends.configure({"tf32": True, "deterministic": True}, gpu)  # deterministic wins over tf32
    assert said == "tf32 off, cudnn.benchmark off, deterministic on"
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == backends.CUBLAS_WORKSPACE


def test_lines_of_ranks_sharing_one_unbuffered_log_stay_whole(tmp_path: Path) -> None:
    """Under SLURM every rank's stdout goes to one log with PYTHONUNBUFFERED=1; a line and its newline must
    leave in one write, or another rank's line lands between them."""
    ranks, lines = 4, 2000
    script = ("import sys, time; from training.logger import RunLog; log = RunLog(int(sys.argv[1]), 4)\n"
              "time.sleep(max(0.0, float(sys.argv[2]) - time.time()))\n"  # all ranks write at the same time
              f"for i in range({lines}): log.every_rank(f'line {{i}} ' + 'x' * 120 + ' end')\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    start = time.time() + 3
    with open(tmp_path / "job.log", "ab") as out:
        procs = [subprocess.Popen([sys.executable, "-c", script, str(rank), str(start)], stdout=out, env=env)
                 for rank in range(ranks)]
        assert all(p.wait(timeout=120) == 0 for p in procs)
    written = (tmp_path / "job.log").read_text().splitlines()
    whole = re.compile(r"\[rank [0-3]\] line \d+ x{120} end")
    assert len(written) == ranks * lines and all(whole.fullmatch(line) for line in written)
