"""A real SLURM cluster on loopback (this machine, one or more slurmd nodes), for tests that submit real jobs.

munged, slurmctld and slurmd run as children of the test process, with everything they write (slurm.conf,
munge key and socket, controller state, slurmd spool, logs, pid files) under one folder; clients find the
cluster through ``SLURM_CONF`` in ``SlurmCluster.env``. With ``nodes=1`` the node is this machine as
``slurmd -C`` sees it; with ``nodes=N`` the machine's CPUs are split between N slurmd daemons on distinct
ports (Debian builds SLURM with multiple-slurmd support), so multi-node jobs run for real on one host.
CPU only, no cgroups, and scheduling is event driven so a submitted job starts within about a second.
``stop`` ends the jobs and the daemons by pid whatever state they are in. Runs as root, as CI does; the
Debian packages are installed by ``scripts/slurm/install_slurm.sh`` when missing. ``unavailable`` says
why a machine cannot run it (not root, or the packages missing and no apt-get).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INSTALL_SCRIPT = REPO / "scripts" / "slurm" / "install_slurm.sh"
COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo", "squeue", "srun")
SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin"
FINISHED = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                      "BOOT_FAIL", "DEADLINE"})


class SlurmError(RuntimeError):
    """The cluster could not be installed, started or queried; the message says which and shows the log."""


def missing_commands() -> list[str]:
    path = f"{os.environ.get('PATH', '')}:{SBIN_PATH}"
    return [cmd for cmd in COMMANDS if shutil.which(cmd, path=path) is None]


def unavailable() -> str | None:
    """Why this machine cannot start the test cluster (one line, with how to run the tests), or None."""
    how = "run them as root on Debian/Ubuntu: sudo .venv/bin/python -m pytest -m slurm"
    if os.geteuid() != 0:
        return f"SLURM tests need root (the test cluster's daemons run as root); {how}"
    missing = missing_commands()
    if missing and shutil.which("apt-get") is None:
        return f"SLURM tests need {', '.join(missing)} or apt-get to install them; {how}"
    return None


def ensure_installed() -> None:
    """Installs Debian's munge and SLURM packages when a command is missing (a fresh CI machine)."""
    if not missing_commands():
        return
    started = time.monotonic()
    proc = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SlurmError(f"{INSTALL_SCRIPT} failed (exit {proc.returncode}): {proc.stderr.strip()}")
    print(f"SLURM packages installed in {time.monotonic() - started:.0f} s")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def parse_record(text: str) -> dict[str, str]:
    """``Key=Value`` pairs of one ``scontrol show -o`` line (values without spaces are all we read)."""
    return dict(re.findall(r"(\w+)=(\S*)", text))


class SlurmCluster:
    """munged + slurmctld + one slurmd per node on 127.0.0.1, in one default partition."""

    def __init__(self, root: Path, *, nodes: int = 1, partition: str = "debug") -> None:
        """`root` holds everything; munged requires each folder above it to be searchable by all users."""
        self.root = Path(root)
        self.num_nodes = nodes
        self.partition = partition
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "run" / "munge.socket"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf),
                    "PATH": f"{os.environ.get('PATH', '')}:{SBIN_PATH}"}
        for var in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            if var != "SLURM_CONF":
                del self.env[var]
        self.nodes: list[str] = []
        self._daemons: dict[str, subprocess.Popen] = {}

    # lifecycle -------------------------------------------------------------------------------------------

    def __enter__(self) -> SlurmCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> None:
        """Writes the config, starts munged, slurmctld and the slurmds, and waits until every node is idle."""
        if os.geteuid() != 0:
            raise SlurmError("the test SLURM cluster runs its daemons as root (SlurmUser=root); run as root")
        ensure_installed()
        self._make_folders()
        self._spawn("munged", ["munged", "--foreground", f"--key-file={self.root / 'munge' / 'munge.key'}",
                               f"--socket={self.munge_socket}", f"--pid-file={self.root / 'munge' / 'munged.pid'}",
                               f"--log-file={self.root / 'log' / 'munged.log'}",
                               f"--seed-file={self.root / 'munge' / 'munged.seed'}"])
        self._wait(lambda: self.munge_socket.exists(), timeout, "munged to create its socket", "munged")
        self._write_config()
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: self.run("scontrol", "ping", check=False).returncode == 0, timeout,
                   "slurmctld to answer", "slurmctld")
        for node in self.nodes:
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-f", str(self.conf), "-N", node])
        self._wait(self._nodes_idle, timeout, f"nodes {','.join(self.nodes)} to become idle", "slurmctld",
                   *(f"slurmd-{node}" for node in self.nodes))

    def stop(self) -> None:
        """Cancels every job, then ends the daemons and anything left of the jobs, each by pid."""
        if self._daemons.get("slurmctld") and self._daemons["slurmctld"].poll() is None:
            jobs = self.run("squeue", "-h", "-o", "%A", check=False).stdout.split()
            if jobs:
                self.run("scancel", *jobs, check=False)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and self.run("squeue", "-h", "-o", "%A",
                                                               check=False).stdout.split():
                    time.sleep(0.5)
        order = {"slurmctld": 1, "munged": 2}  # slurmds first, munged last
        for name in sorted(self._daemons, key=lambda daemon: order.get(daemon, 0)):
            proc = self._daemons.pop(name)
            if proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for pid in self._leftover_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _leftover_pids(self) -> list[int]:
        """Processes that inherited this cluster's SLURM_CONF: slurmstepd and job processes."""
        marker = f"SLURM_CONF={self.conf}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if marker in environ.split(b"\0"):
                pids.append(int(entry.name))
        return pids

    # setup -----------------------------------------------------------------------------------------------

    def _make_folders(self) -> None:
        # munged wants its key private and its socket folder (and those above) searchable by everyone.
        self.root.chmod(0o755)
        for sub, mode in (("munge", 0o700), ("run", 0o755), ("log", 0o755), ("state", 0o700), ("spool", 0o755)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
            (self.root / sub).chmod(mode)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)

    def _write_config(self) -> None:
        hardware = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, env=self.env, check=True)
        node_line = hardware.stdout.splitlines()[0]
        machine = parse_record(node_line)
        host = machine["NodeName"]
        if self.num_nodes == 1:
            self.nodes = [host]
            node_lines = [f"{node_line} NodeAddr=127.0.0.1 State=UNKNOWN"]
        else:
            cpus = int(machine["CPUs"]) // self.num_nodes
            if cpus < 1:
                raise SlurmError(f"{self.num_nodes} nodes need at least as many CPUs; this machine has "
                                 f"{machine['CPUs']}")
            memory = int(machine["RealMemory"]) // self.num_nodes
            self.nodes = [f"node{i}" for i in range(1, self.num_nodes + 1)]
            node_lines = [f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={_free_port()} "
                          f"CPUs={cpus} RealMemory={memory} State=UNKNOWN" for node in self.nodes]
        log = self.root / "log"
        self.conf.write_text("\n".join([
            "ClusterName=lipci",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
            f"AuthInfo=socket={self.munge_socket},cred_expire=5",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool' / '%n'}",
            f"SlurmctldPidFile={self.root / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'run' / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={log / 'slurmctld.log'}",
            f"SlurmdLogFile={log / 'slurmd-%n.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            # Random first id: two clusters on one machine (two test runs) never share job ids or ports.
            f"FirstJobId={random.randint(1000, 60000)}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/builtin",
            "SchedulerParameters=batch_sched_delay=0,sched_interval=1",
            "JobRequeue=1",
            "ReturnToService=2",
            "MinJobAge=3600",
            "KillWait=30",
            "InactiveLimit=0",
            *node_lines,
            f"PartitionName={self.partition} Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))

    def _spawn(self, name: str, argv: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.stdout", "wb")  # noqa: SIM115 - the daemon owns it
        self._daemons[name] = subprocess.Popen(argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()

    def _wait(self, ready: Callable[[], bool], timeout: float, what: str, *daemons: str) -> None:
        """Polls `ready` until true; fails with the daemons' logs if one of them exits or time runs out."""
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [name for name in daemons if self._daemons[name].poll() is not None]
            if dead or time.monotonic() > deadline:
                why = f"{dead[0]} exited with {self._daemons[dead[0]].returncode}" if dead else \
                    f"not ready after {timeout:.0f} s"
                logs = "\n".join(self.log_tail(name) for name in (dead or daemons))
                raise SlurmError(f"waiting for {what}: {why}\n{logs}")
            time.sleep(0.1)

    def _nodes_idle(self) -> bool:
        return self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split() == ["idle"] * len(self.nodes)

    def log_tail(self, daemon: str, lines: int = 30) -> str:
        """The last lines a daemon wrote, for error messages."""
        texts = []
        for path in (self.root / "log" / f"{daemon}.log", self.root / "log" / f"{daemon}.stdout"):
            if path.exists():
                texts.append(f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(texts)

    # clients ---------------------------------------------------------------------------------------------

    def run(self, *argv: str, check: bool = True, timeout: float = 30.0,
            cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Runs a SLURM client command against this cluster."""
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, cwd=cwd,
                              env={**self.env, **(env or {})})
        if check and proc.returncode != 0:
            raise SlurmError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def sbatch(self, *argv: str, cwd: Path, env: dict[str, str] | None = None) -> str:
        """Submits a batch job and returns its id."""
        return self.run("sbatch", "--parsable", *argv, cwd=cwd, env=env).stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """The job's record as ``scontrol show job`` prints it (JobState, Restarts, ExitCode, StdOut, ...)."""
        return parse_record(self.run("scontrol", "-o", "show", "job", job_id).stdout)

    def wait_job(self, job_id: str, states: Iterable[str] = FINISHED, timeout: float = 120.0) -> dict[str, str]:
        """Polls until the job is in one of ``states``; returns its record."""
        wanted = set(states)
        deadline = time.monotonic() + timeout
        while True:
            record = self.job(job_id)
            if record["JobState"] in wanted:
                return record
            if time.monotonic() > deadline:
                raise SlurmError(f"job {job_id} still {record['JobState']} after {timeout:.0f} s "
                                 f"(wanted {sorted(wanted)}): {record}")
            time.sleep(0.2)
