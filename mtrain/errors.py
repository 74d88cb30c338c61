"""mtrain's own error types and the one place that turns them into a CLI exit.

Errors that a user can fix (bad config, bad input files) are `MtrainError`s: the command line
prints them as one line and exits with code 2. Anything else is a bug and keeps its traceback.

Under scripts/train.sh every worker reports the same error; the launcher sets `MTRAIN_ERROR_FILE`,
the first worker to fail writes its line there, and the launcher shows that line once instead of
torchrun's report (and exits 2 too).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from typing import TypeVar

EXIT_USER_ERROR = 2
ERROR_FILE_VAR = "MTRAIN_ERROR_FILE"

F = TypeVar("F", bound=Callable)


class MtrainError(Exception):
    """An error the user can fix; the message says what and how."""


class ConfigError(MtrainError):
    """A config key has an invalid value or an invalid combination with another key."""


class CheckpointError(MtrainError):
    """A checkpoint (HF or Megatron) is missing, incomplete or inconsistent with its own metadata."""


class DataError(MtrainError):
    """An input data file or record cannot be used."""


def report(err: MtrainError) -> None:
    """`error: <message>` on stderr as one line, and in the launcher's error file (the first
    process to fail writes it; the others find it taken)."""
    line = "error: " + " ".join(str(err).split("\n"))
    path = os.environ.get(ERROR_FILE_VAR)
    if path:
        try:
            with open(path, "x") as f:
                f.write(line + "\n")
        except OSError:
            pass
    print(line, file=sys.stderr, flush=True)


def exit_on_user_error(fn: F) -> F:
    """Run `fn`; on an `MtrainError` print `error: <message>` to stderr and exit with code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MtrainError as err:
            logging.shutdown()
            report(err)
            sys.exit(EXIT_USER_ERROR)

    return wrapper  # type: ignore[return-value]
