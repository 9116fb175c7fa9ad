"""User errors: what is wrong, which file or key, how to fix it. The entry points print one as a single paragraph
and exit with status 2, without a traceback (set ETK_DEBUG=1 or HYDRA_FULL_ERROR=1 to see it)."""

from __future__ import annotations

import os
import sys
import textwrap
from typing import Any, Callable


class EtkError(Exception):
    """A problem with the user's input (config, files, data, models), not a bug in etk."""


class ConfigError(EtkError, ValueError):
    """A config value etk cannot use."""


class DataError(EtkError, ValueError):
    """Data (prompts, word lists, files of results) etk cannot use."""


def debug() -> bool:
    return bool(os.environ.get("ETK_DEBUG")) or os.environ.get("HYDRA_FULL_ERROR") == "1"


def paragraph(err: BaseException) -> str:
    """One paragraph: the error's kind and message, wrapped."""
    text = " ".join(str(err).split())
    return textwrap.fill(f"etk: {type(err).__name__}: {text}", width=110, subsequent_indent="  ")


def report_user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap an entry point's task function: an EtkError becomes one paragraph on stderr and exit status 2."""
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EtkError as e:
            if debug():
                raise
            print(paragraph(e), file=sys.stderr)
            raise SystemExit(2) from None
    wrapped.__name__, wrapped.__doc__ = fn.__name__, fn.__doc__
    return wrapped
