"""The Triton LIP kernels on the CPU, through Triton's interpreter, in a child process.

triton reads TRITON_INTERPRET when a kernel is defined (at import), so the cases in lip_triton_cases.py run
in a child pytest with TRITON_INTERPRET=1 and LIP_BACKEND=triton; the variable never reaches this process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_triton_kernels_in_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "LIP_BACKEND": "triton", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W",
                           "error::RuntimeWarning", "tests/lip_triton_cases.py"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, summary
