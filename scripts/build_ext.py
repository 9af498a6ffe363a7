"""Build the fused C++ LIP kernel for this CPU (called by `make setup`); a no-op when it is up to date.

The build lands in build/lip_ext/lip_cpu_<cpu key>_<build key>/: the CPU key hashes the CPU's feature flags
(-march=native), so another CPU type sharing the checkout builds its own copy instead of crashing; the build
key hashes the sources, flags and torch/Python versions. Older builds for this CPU type are removed. A failed
build is a warning, not an error: models.lip then uses its pure-PyTorch path.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.lip_extension import extension_spec  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands and output")
    args = parser.parse_args()
    spec = extension_spec()
    where = spec.library.relative_to(REPO)
    for stale in spec.stale_builds():
        shutil.rmtree(stale, ignore_errors=True)
    if spec.library.is_file():
        print(f"lip extension: up to date ({where})")
        return 0
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        print(f"warning: lip extension not built: no C++ compiler ({compiler!r} not found); "
              "models.lip will use its slower pure-PyTorch path")
        return 0
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA runtime" noise
    from torch.utils.cpp_extension import load

    spec.build_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        load(name=spec.name, sources=[str(s) for s in spec.sources], extra_cflags=list(spec.cflags),
             extra_ldflags=list(spec.ldflags), build_directory=str(spec.build_dir), verbose=args.verbose,
             is_python_module=False)
    except (RuntimeError, OSError, ImportError, subprocess.SubprocessError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        reason = reason if len(reason) <= 100 else reason[:97] + "..."
        print(f"warning: lip extension build failed ({reason}); models.lip will use its slower pure-PyTorch path. "
              "See the compiler output with: python scripts/build_ext.py --verbose")
        return 0
    print(f"lip extension: built {where} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
