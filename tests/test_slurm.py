"""scripts/slurm on a real SLURM cluster: two slurmd nodes on this machine (tests/slurm_cluster.py).

The cluster itself first (a job on both nodes, a job that requeues itself, USR1 reaching a batch script's
trap), then train.sbatch with the tiny demo: USR1 to the batch shell mid-epoch on 2 nodes ends in a
checkpoint, a requeue and a resume with the uninterrupted run's weights; a plain scancel checkpoints
without requeueing; failing runs are not requeued; eval.sbatch scores the result.
Needs root (and the SLURM packages, or apt-get to install them); elsewhere the module skips, saying why.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from slurm_cluster import SlurmCluster, unavailable
from train_utils import ENV, ROOT, load_weights, max_weight_diff, metrics_rows

TRAIN = ROOT / "scripts" / "slurm" / "train.sbatch"
EVAL = ROOT / "scripts" / "slurm" / "eval.sbatch"
CPU_JOB = ["--gpus-per-node=0", "--cpus-per-task=1"]  # the scripts default to 8 GPUs per node
JOB_ENV = {"OMP_NUM_THREADS": "1"}  # the same thread count as the reference run: identical arithmetic


pytestmark = [pytest.mark.slurm, pytest.mark.slow]
if (_reason := unavailable()) is not None:  # one line for the whole module, at collection
    pytest.skip(_reason, allow_module_level=True)


@pytest.fixture(scope="session")
def cluster() -> Iterator[SlurmCluster]:
    # Not under pytest's basetemp: munged wants every folder above its socket searchable by all (0700 there).
    with tempfile.TemporaryDirectory(prefix="slurm-") as root, SlurmCluster(Path(root), nodes=2) as running:
        yield running


CONFIG = ["--config", str(ROOT / "configs" / "demo.yaml")]


def tiny(data: Path, cache: Path, *extra: str) -> list[str]:
    """Overrides cutting the demo to 2 epochs of 12 steps (48 images, global batch 4) at 32 px."""
    return [f"data.root={data}", f"data.cache_dir={cache}", "data.image_size=32", "data.val_resize=36",
            "data.workers=0", "train.batch_size=4", "train.epochs=2", "checkpoint.every_steps=2",
            "tb.num_images=0", *extra]


def job_log(record: dict[str, str]) -> str:
    return Path(record["StdOut"]).read_text(errors="replace")


def stop_lines(log: str) -> int:
    """How many training processes said they stopped with a checkpoint (train.py prefixes its rank)."""
    return sum(line.startswith("[rank ") and "checkpoint saved" in line and "resume" in line
               for line in log.splitlines())


def wait_for_file(cluster: SlurmCluster, job: str, path: Path, timeout: float = 180) -> None:
    """Until `path` exists while the job runs (fails with the job's log if it ends first)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        record = cluster.job(job)
        assert record["JobState"] in ("PENDING", "CONFIGURING", "RUNNING"), job_log(record)
        assert time.monotonic() < deadline, f"no {path} after {timeout} s:\n{job_log(record)}"
        time.sleep(0.1)


def assert_not_requeued(cluster: SlurmCluster, jobs: list[str], state: str) -> list[dict[str, str]]:
    """Each job ends in `state` and is still there after longer than a requeued job waits to start."""
    for job in jobs:
        record = cluster.wait_job(job, timeout=180)
        assert record["JobState"] == state, job_log(record)
    time.sleep(7)  # > cred_expire (5 s) + a scheduling pass (1 s)
    records = [cluster.job(job) for job in jobs]
    for record in records:
        assert record["JobState"] == state and record["Restarts"] == "0", record
    return records


# --- the cluster ------------------------------------------------------------------------------------------

def test_batch_job_runs_a_step_on_every_node(cluster: SlurmCluster, tmp_path: Path) -> None:
    script = tmp_path / "hello.sh"
    script.write_text("#!/bin/bash\nsrun bash -c 'echo task $SLURM_PROCID on $SLURMD_NODENAME'\n")
    job = cluster.sbatch("--nodes=2", "--output=%j.out", str(script), cwd=tmp_path)
    record = cluster.wait_job(job, timeout=30)
    assert record["JobState"] == "COMPLETED", record
    lines = sorted(job_log(record).splitlines())
    assert lines == [f"task {i} on {node}" for i, node in enumerate(cluster.nodes)]


def test_job_requeues_itself_and_runs_again(cluster: SlurmCluster, tmp_path: Path) -> None:
    script = tmp_path / "requeue.sh"
    script.write_text("#!/bin/bash\n"
                      "echo run ${SLURM_RESTART_COUNT:-0}\n"
                      "if [[ -z $SLURM_RESTART_COUNT ]]; then scontrol requeue $SLURM_JOB_ID; sleep 30; fi\n")
    job = cluster.sbatch("--requeue", "--open-mode=append", "--output=%j.out", str(script), cwd=tmp_path)
    record = cluster.wait_job(job, states=["COMPLETED"], timeout=60)
    assert record["Restarts"] == "1"
    assert [line for line in job_log(record).splitlines() if line.startswith("run")] == ["run 0", "run 1"]


def test_usr1_reaches_the_batch_script_trap(cluster: SlurmCluster, tmp_path: Path) -> None:
    script = tmp_path / "trap.sh"
    script.write_text("#!/bin/bash\ntrap 'echo got USR1; exit 0' USR1\necho ready\nsleep 60 &\nwait\n")
    job = cluster.sbatch("--output=%j.out", str(script), cwd=tmp_path)
    out = Path(cluster.wait_job(job, states=["RUNNING"], timeout=30)["StdOut"])
    deadline = time.monotonic() + 30
    while not (out.exists() and "ready" in out.read_text()):  # the trap is set
        assert time.monotonic() < deadline, cluster.job(job)
        time.sleep(0.1)
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    record = cluster.wait_job(job, timeout=30)
    assert record["JobState"] == "COMPLETED"
    assert job_log(record).splitlines() == ["ready", "got USR1"]


# --- train.sbatch / eval.sbatch -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def preempted(cluster: SlurmCluster, demo_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """A 2-node train.sbatch job sent USR1 once its first checkpoint exists, run to completion, beside the
    same training run uninterrupted (2 torchrun ranks on this machine, outside SLURM)."""
    work = tmp_path_factory.mktemp("slurm_train")
    reference = work / "reference"
    ref_cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "train.py"), *CONFIG, *tiny(demo_data, work / "c1", f"output_dir={reference}")]
    with open(work / "reference.log", "wb") as ref_log:
        ref = subprocess.Popen(ref_cmd, cwd=ROOT, env={**ENV, **JOB_ENV}, stdout=ref_log, stderr=subprocess.STDOUT)
    try:
        job = cluster.sbatch(*CPU_JOB, "--nodes=2", str(TRAIN), *CONFIG, *tiny(demo_data, work / "c2"), cwd=work,
                             env=JOB_ENV)
        out = work / "runs" / f"demo-{job}"
        wait_for_file(cluster, job, out / "checkpoints" / "last.pth")
        cluster.run("scancel", "--signal=USR1", "--batch", job)
        record = cluster.wait_job(job, timeout=240)
        assert ref.wait(timeout=240) == 0, (work / "reference.log").read_text()
    finally:
        if ref.poll() is None:
            ref.kill()
    return record, out, reference


def test_usr1_checkpoints_requeues_and_resumes_exactly(preempted) -> None:
    record, out, reference = preempted
    log = job_log(record)
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", log
    assert int(record["Restarts"]) >= 1, log
    job = record["JobId"]
    assert f"output_dir {out}" in log
    assert f"requeueing job {job} (restart 1)" in log
    # Both ranks (one per node) stop together; a rank whose signal came after the step's vote says another did.
    assert stop_lines(log) == 2 and "received SIGUSR1: checkpoint saved" in log, log
    resumed = re.search(r"resuming from \S+: epoch 0, step (\d+)", log)
    assert f"job {job} (restart 1): nodes" in log and resumed and int(resumed[1]) > 0, log  # mid-epoch
    assert [row["epoch"] for row in metrics_rows(out)] == [0, 1]
    assert max_weight_diff(load_weights(out), load_weights(reference)) <= 1e-6
    assert (out / f"slurm-{job}.log").resolve() == Path(record["StdOut"]).resolve()


def test_eval_sbatch_scores_the_checkpoint(cluster: SlurmCluster, preempted, demo_data: Path, tmp_path: Path) -> None:
    _, out, _ = preempted
    job = cluster.sbatch(*CPU_JOB, str(EVAL), *CONFIG, "--checkpoint", str(out / "checkpoints" / "last.pth"),
                         *tiny(demo_data, tmp_path / "c"), cwd=tmp_path, env=JOB_ENV)
    record = cluster.wait_job(job, timeout=180)
    log = job_log(record)
    assert record["JobState"] == "COMPLETED", log
    result = [line for line in log.splitlines() if line.startswith('{"images"')]
    assert len(result) == 1 and '"images": 21' in result[0], log


def test_scancel_checkpoints_and_stops_without_requeue(cluster: SlurmCluster, demo_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    job = cluster.sbatch(*CPU_JOB, str(TRAIN), *CONFIG, *tiny(demo_data, tmp_path / "c", f"output_dir={out}"),
                         cwd=tmp_path, env={**JOB_ENV, "NPROC_PER_NODE": "2"})
    wait_for_file(cluster, job, out / "checkpoints" / "last.pth")
    cluster.run("scancel", job)
    [record] = assert_not_requeued(cluster, [job], "CANCELLED")
    log = job_log(record)
    assert stop_lines(log) == 2 and "received SIGTERM: checkpoint saved" in log, log
    assert "not requeueing" in log and "requeueing job" not in log, log
    assert "model" in torch.load(out / "checkpoints" / "last.pth", map_location="cpu", weights_only=True)


def test_failing_runs_are_not_requeued(cluster: SlurmCluster, demo_data: Path, tmp_path: Path) -> None:
    expected = {  # override -> what train.py says (bad config: exit 2; NaN loss: exit 3)
        "optim.lrr=0.1": "did you mean 'optim.lr'",
        "debug.nan_at_step=3": "non-finite",
    }
    jobs = [cluster.sbatch(*CPU_JOB, str(TRAIN), *CONFIG, *tiny(demo_data, tmp_path / f"c{i}", override),
                           cwd=tmp_path, env=JOB_ENV) for i, override in enumerate(expected)]
    for record, message in zip(assert_not_requeued(cluster, jobs, "FAILED"), expected.values(), strict=True):
        log = job_log(record)
        assert message in log and "failed with exit status" in log and "not requeueing" in log, log
