"""Helpers for the trainer/evaluator tests: tiny real datasets, real train.py/torchrun processes, kill -9."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# One thread per process: 2 ranks (or a rank and a loader) on 2 cores must not oversubscribe them.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}


def make_dataset(out: Path, classes: int = 3, train: int = 16, val: int = 5, size: int = 40) -> Path:
    """Real JPEG files in the ImageNet layout, written by the demo data script."""
    subprocess.run([sys.executable, "scripts/make_demo_data.py", "--out", str(out), "--classes", str(classes),
                    "--train-per-class", str(train), "--val-per-class", str(val), "--size", str(size),
                    "--seed", "0"], cwd=ROOT, check=True, capture_output=True, env=ENV)
    return out


def tiny_run(data: Path, out: Path, *extra: str) -> list[str]:
    """Overrides for a run of a few seconds: lip_resnet_tiny at 32 px, batch 4, every step logged."""
    return [f"data.root={data}", f"output_dir={out}", f"data.cache_dir={out.parent / (out.name + '_cache')}",
            "data.image_size=32", "data.val_resize=36", "data.workers=0", "train.batch_size=4",
            "train.epochs=3", "train.log_every=1", "checkpoint.every_steps=2", "sched.milestones=[2]",
            "sched.warmup_epochs=1", "optim.lr=0.8", "tb.num_images=4", *extra]


def command(script: str, nproc: int, args: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, script, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            script, *args]


def train_cmd(nproc: int, overrides: list[str]) -> list[str]:
    return command("train.py", nproc, ["--config", "configs/demo.yaml", *overrides])


def run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def start(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as f:
        return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=f, stderr=subprocess.STDOUT)


def descendants(pid: int) -> list[int]:
    """pid and every process below it (torchrun puts its workers in new sessions, so no process group)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def kill9_tree(proc: subprocess.Popen[bytes]) -> None:
    """kill -9 the whole process tree at once: stop everything first so nobody reacts, then kill."""
    tree = descendants(proc.pid)
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
    proc.wait(timeout=30)


def wait_for(path: Path, text: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    """Until `text` appears in the file at `path` (fails if the process ends first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before '{text}' appeared in {path}")
        time.sleep(0.01)
    raise AssertionError(f"'{text}' did not appear in {path} within {timeout} s")


def worker_pids(proc: subprocess.Popen[bytes]) -> list[int]:
    """The training processes under a torchrun (its direct children running train.py)."""
    found = []
    for pid in descendants(proc.pid)[1:]:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"train.py" in cmdline and b"torch.distributed.run" not in cmdline:
            found.append(pid)
    return found


def load_weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoints" / "last.pth", map_location="cpu", weights_only=True)["model"]


def max_weight_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0 for k in a)


def metrics_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
