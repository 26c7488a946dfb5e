"""User-facing errors.

Every problem a user can cause (a typo in a method name, a bad config value, a missing data path) is
raised as a :class:`BalanceMMError`. The CLI prints its message as one line and exits nonzero without
a traceback, so the message itself must say what is wrong and how to fix it.
"""

from __future__ import annotations


class BalanceMMError(Exception):
    """A problem the user can fix; the message is printed verbatim as one line."""

    exit_code = 2


class ConfigError(BalanceMMError):
    """An unknown key, a wrong type or an out-of-range value in the resolved configuration."""


class DataError(BalanceMMError):
    """Missing or unreadable data."""


class NonFiniteLossError(BalanceMMError):
    """A loss term became NaN or infinite; training stops and the run is marked failed."""

    exit_code = 3


class SweepFailed(BalanceMMError):
    """Some jobs of a sweep failed; the others finished, and rerunning the sweep retries the failed."""

    exit_code = 1


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when empty): third-party errors often
    carry pages of detail, and a user error is one line."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
