"""Where and how the C++ LIP kernel (models/csrc/lip_cpu.cpp) is built, and loading a finished build.

A build with -march=native only runs on a CPU with the same feature flags, so the build directory is keyed
by the CPU's flags as well as by the sources, compiler flags and torch/Python versions: a checkout shared by
machines of several CPU types keeps one build per type, and an edit to the source makes the old build stale.
`scripts/build_ext.py` compiles; `load_ops` never does.
"""

from __future__ import annotations

import hashlib
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["ExtensionSpec", "extension_spec", "load_ops"]

REPO = Path(__file__).resolve().parents[1]
_SOURCES = (Path(__file__).resolve().parent / "csrc" / "lip_cpu.cpp",)
_CFLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno")
_LDFLAGS = ("-fopenmp",)


@dataclass(frozen=True)
class ExtensionSpec:
    """Where the C++ kernel for this CPU, source, torch and Python is built and how."""

    name: str
    build_dir: Path
    sources: tuple[Path, ...]
    cflags: tuple[str, ...]
    ldflags: tuple[str, ...]

    @property
    def library(self) -> Path:
        return self.build_dir / f"{self.name}.so"

    def stale_builds(self) -> list[Path]:
        """Older builds for this CPU type (builds for other CPUs sharing the checkout are kept)."""
        prefix = self.name.rsplit("_", 1)[0] + "_"
        return [d for d in self.build_dir.parent.glob(prefix + "*") if d.is_dir() and d != self.build_dir]


def _cpu_flags() -> str:
    """The CPU feature flags: a build with -march=native is only valid on a CPU with the same ones."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def extension_spec() -> ExtensionSpec:
    """Named lip_cpu_<cpu key>_<build key>: the CPU's flags, then sources, flags, torch and Python versions."""
    cpu = hashlib.sha256(f"{platform.machine()}\0{_cpu_flags()}".encode()).hexdigest()[:8]
    digest = hashlib.sha256()
    for src in _SOURCES:
        digest.update(src.read_bytes())
    for part in (*_CFLAGS, *_LDFLAGS, torch.__version__, sys.version):
        digest.update(part.encode() + b"\0")
    name = f"lip_cpu_{cpu}_{digest.hexdigest()[:12]}"
    return ExtensionSpec(name, REPO / "build" / "lip_ext" / name, _SOURCES, _CFLAGS, _LDFLAGS)


def load_ops() -> tuple[Any, str]:
    """(torch.ops.<name>, "loaded") for the prebuilt kernel of this CPU and source, else (None, why not)."""
    try:
        spec = extension_spec()
    except OSError as exc:
        return None, f"cannot read the C++ sources ({exc})"
    if not spec.library.is_file():
        return None, f"no build at {spec.library.relative_to(REPO)}"
    try:
        torch.ops.load_library(str(spec.library))
        ops = getattr(torch.ops, spec.name)
        ops.forward, ops.backward  # noqa: B018 (resolve both now, so a broken build falls back here)
    except (OSError, RuntimeError, AttributeError) as exc:
        return None, f"cannot load {spec.library} ({exc})"
    return ops, "loaded"
