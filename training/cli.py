"""Command-line plumbing shared by train.py and eval.py: argument parsing and how a run exits."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from .config import ConfigError, describe_keys
from .distributed import shutdown
from .errors import EXIT_NON_FINITE, EXIT_USER_ERROR, NonFiniteLossError, UserError
from .logger import RunLog


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (plus a pointer to --help), like every other user error."""

    def __init__(self, description: str) -> None:
        super().__init__(description=description, epilog=describe_keys(),
                         formatter_class=argparse.RawDescriptionHelpFormatter)
        self.add_argument("--config", required=True, help="YAML config file (see configs/)")

    def add_overrides(self) -> None:
        self.add_argument("overrides", nargs="*", metavar="key=value",
                          help="config overrides, values parsed as YAML (e.g. train.epochs=2 optim.lr=0.2)")

    def parse_args(self, args: Sequence[str] | None = None, namespace: None = None) -> argparse.Namespace:  # type: ignore[override]
        """As argparse; `--help` after `--config FILE` lists the values that file resolves to."""
        argv = list(sys.argv[1:] if args is None else args)
        if "-h" in argv or "--help" in argv:
            pre = argparse.ArgumentParser(add_help=False)
            pre.add_argument("--config")
            known, rest = pre.parse_known_args(argv)
            if known.config is not None:
                overrides = [a for a in rest if "=" in a and not a.startswith("-")]
                try:
                    self.epilog = describe_keys(known.config, overrides)
                except ConfigError as e:
                    self.error(str(e))
        return super().parse_args(argv, namespace)

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR)


def run_main(main: Callable[[], None], log: RunLog) -> None:
    """Run `main`, turning the errors a user can cause into one line (stderr and train.log) and an exit code.

    Each rank reports for itself; under torchrun a failing rank makes torchrun stop the others, so no rank
    is left waiting in a collective.
    """
    from data import DataError
    from models import CheckpointError

    try:
        main()
    except (UserError, DataError, CheckpointError) as e:
        log.every_rank(f"error: {e}", error=True)
        raise SystemExit(EXIT_USER_ERROR) from None
    except NonFiniteLossError as e:
        log.every_rank(f"error: {e}", error=True)
        raise SystemExit(EXIT_NON_FINITE) from None
    finally:
        shutdown()  # on every exit path: NCCL resources are released, not left to the interpreter's exit
        log.close()
