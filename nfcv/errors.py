"""Errors a user can fix. The command-line tools print their message (no traceback) and exit 2."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

EXIT_USER_ERROR = 2


class NfcvError(Exception):
    """A problem with the input (config, data, checkpoint); the message says how to fix it."""


class ConfigError(NfcvError, ValueError):
    """A configuration that cannot be built, e.g. an image size the architecture cannot take."""


class DataError(NfcvError):
    """Dataset files missing, unreadable or not what the config says."""


class DataRangeError(NfcvError, ValueError):
    """Pixel values outside ``[0, num_bins - 1]`` or not integers."""


class NumericalError(NfcvError, ArithmeticError):
    """A model that cannot be evaluated reliably, e.g. a 1x1 convolution that is (nearly)
    singular, or non-finite values where a figure is reported."""


class CheckpointError(NfcvError):
    """A checkpoint that is missing, unreadable or not an nfcv checkpoint."""


class OutputError(NfcvError, OSError):
    """A file nfcv will not or cannot write: a folder where a file goes, an existing file that
    is not nfcv's own output, a full disk, a run folder another trainer holds. An `OSError`
    too, so code that handles failed writes handles these."""


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn `NfcvError` into a one-paragraph message on stderr and exit status 2."""
    try:
        yield
    except NfcvError as err:
        print(f"nfcv: error: {err}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
