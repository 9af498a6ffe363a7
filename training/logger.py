"""The run's text log: rank 0 writes the console and `output_dir/train.log`; other ranks stay quiet except
for lines every rank must print (stop/checkpoint notices, errors)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from tqdm import tqdm


def _console(line: str, stream: TextIO) -> None:
    """One write per line, newline included: under PYTHONUNBUFFERED (our SLURM scripts) every write is a
    syscall, and ranks sharing one log would otherwise interleave a line with another rank's newline."""
    tqdm.write(line + "\n", file=stream, end="")
    stream.flush()


class RunLog:
    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        self._file = None
        self._at_end: list[Callable[[], None]] = []

    def close_at_end(self, close: Callable[[], None]) -> None:
        """Also call `close` when the log closes: at the end of the run however it ends (see cli.run_main)."""
        self._at_end.append(close)

    def open(self, path: Path) -> None:
        """Start appending to train.log (rank 0); a resumed run continues the same file."""
        if self.rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", buffering=1)  # noqa: SIM115 - held for the whole run

    def _to_file(self, msg: str) -> None:
        if self._file is not None:
            self._file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")

    def info(self, msg: str, console: bool = True) -> None:
        """A rank-0 line; `console=False` keeps it to train.log (e.g. while the progress bar shows it)."""
        if self.rank != 0:
            return
        self._to_file(msg)
        if console:
            _console(msg, sys.stdout)

    def every_rank(self, msg: str, error: bool = False) -> None:
        """A line every rank prints (prefixed with the rank under torchrun); rank 0 also logs it."""
        prefix = f"[rank {self.rank}] " if self.world_size > 1 else ""
        _console(prefix + msg, sys.stderr if error else sys.stdout)
        self._to_file(msg)

    def close(self) -> None:
        while self._at_end:
            self._at_end.pop()()
        if self._file is not None:
            self._file.close()
            self._file = None
