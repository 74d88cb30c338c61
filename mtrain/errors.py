"""mtrain's own error types and the one place that turns them into a CLI exit.

Errors that a user can fix (bad config, bad input files) are `MtrainError`s: the command line
prints them as one line and exits with code 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import TypeVar

EXIT_USER_ERROR = 2

F = TypeVar("F", bound=Callable)


class MtrainError(Exception):
    """An error the user can fix; the message says what and how."""


class ConfigError(MtrainError):
    """A config key has an invalid value or an invalid combination with another key."""


class CheckpointError(MtrainError):
    """A checkpoint (HF or Megatron) is missing, incomplete or inconsistent with its own metadata."""


class DataError(MtrainError):
    """An input data file or record cannot be used."""


def exit_on_user_error(fn: F) -> F:
    """Run `fn`; on an `MtrainError` print `error: <message>` to stderr and exit with code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MtrainError as err:
            logging.shutdown()
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper  # type: ignore[return-value]
