"""How a run ends: user errors and a non-finite loss become one line and an exit code, never a traceback.

Exit codes are a contract with the SLURM scripts (a failed job is not requeued in a loop):
0 done or stopped by a signal after a checkpoint, 2 user error (config, data, checkpoint), 3 non-finite loss.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2
EXIT_NON_FINITE = 3


class UserError(ValueError):
    """Bad input from the user (config, paths, files); the message is one line saying what and where."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stops without writing a checkpoint."""
