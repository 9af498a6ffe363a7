"""Without root, or without the SLURM packages and apt-get to install them, the SLURM tests skip with one
line saying why and how to run them; they never error."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import slurm_cluster
from train_utils import ENV, ROOT


def test_reason_names_what_is_missing_and_how_to_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slurm_cluster.os, "geteuid", lambda: 1000)
    reason = slurm_cluster.unavailable()
    assert reason is not None and "need root" in reason and "sudo" in reason and "-m slurm" in reason
    assert "\n" not in reason

    monkeypatch.setattr(slurm_cluster.os, "geteuid", lambda: 0)
    monkeypatch.setattr(slurm_cluster.shutil, "which", lambda cmd, path=None: None)
    reason = slurm_cluster.unavailable()
    assert reason is not None and "apt-get" in reason and "sbatch" in reason and "sudo" in reason

    everything = {*slurm_cluster.COMMANDS, "apt-get"}
    monkeypatch.setattr(slurm_cluster.shutil, "which", lambda cmd, path=None: f"/usr/bin/{cmd}" * (cmd in everything))
    assert slurm_cluster.unavailable() is None
    monkeypatch.setattr(slurm_cluster.shutil, "which", lambda cmd, path=None: "/usr/bin/apt-get" * (cmd == "apt-get"))
    assert slurm_cluster.unavailable() is None  # root with apt: the packages get installed


@pytest.mark.slow
def test_a_non_root_run_of_the_slurm_module_skips_it_with_one_line() -> None:
    """The module run by pytest as a user whose euid is not 0 (pretended in the child process when this
    suite runs as root): no error, no test started, one line with the reason."""
    code = ("import os, sys, pytest; os.geteuid = lambda: 65534; "
            "sys.exit(pytest.main(['-q', '-rs', '-p', 'no:cacheprovider', 'tests/test_slurm.py']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == pytest.ExitCode.NO_TESTS_COLLECTED, out  # the only module asked for was skipped
    assert re.search(r"^1 skipped(, \d+ warnings?)? in ", out, re.MULTILINE), out
    reasons = [line for line in out.splitlines() if line.startswith("SKIPPED")]
    assert len(reasons) == 1 and "SLURM tests need root" in reasons[0] and "sudo" in reasons[0], out
    assert "error" not in out.lower(), out
