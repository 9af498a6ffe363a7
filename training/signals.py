"""SIGUSR1 / SIGTERM: stop at the next step boundary with a checkpoint, instead of dying mid-step.

SLURM sends USR1 before a time limit or pre-emption and TERM on scancel. The handler only records the
signal; the training loop folds `pending` into the per-step all_reduce, so every rank sees the request
at the same step even when only one rank was signalled, and they checkpoint and exit together.
Installed before any loader worker is forked, so forked workers inherit it and ignore the signals too.
"""

from __future__ import annotations

import signal
from types import FrameType

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    def __init__(self) -> None:
        self.signal_name: str | None = None

    def install(self) -> StopRequest:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name

    @property
    def pending(self) -> bool:
        return self.signal_name is not None
