"""Errors of the replay service.

`ReplayError` (and its `SchemaError`, `TableNotFound`) are mistakes a user or a writer can cause: a
record that does not match the table's schema, a table opened with another schema or options, a
priority update on a table that has no priorities. They are `UserError`s, so the CLI prints one line.

`RateLimiterTimeout` is not a mistake: a blocking `insert`/`sample` waited longer than its timeout
for the rate limiter to allow it (writers too far ahead of learners or the other way round).
"""

from __future__ import annotations

from rlfleet.errors import UserError


class ReplayError(UserError):
    """A replay table was used in a way it does not allow; the message says what and what is valid."""


class SchemaError(ReplayError):
    """A record or a schema does not match the table's schema; the message names the field."""


class TableNotFound(ReplayError):
    """No table of that name exists in that namespace (or it was dropped while a client held it)."""


class KeyNotLive(ReplayError):
    """A read by key named an item that is no longer (or never was) in the table: `key`, and the live `keys`."""

    def __init__(self, message: str, key: int, live: range) -> None:
        super().__init__(message)
        self.key, self.live = key, live


class RateLimiterTimeout(TimeoutError):
    """A blocking insert or sample waited `timeout` seconds and the rate limiter still did not allow it."""
