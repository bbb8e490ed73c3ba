"""Errors of the preference queue.

`PreferenceError` and its subclasses are mistakes a caller can cause (a record that breaks the schema,
an unknown pair id, a second label for one pair, a malformed dataset line): they are `UserError`s, so
the CLI prints one line. `QueueFull` is not a mistake: producers are ahead of judges and learners and
a blocking add waited `timeout` seconds for room. Nothing is written when any of them is raised.
"""

from __future__ import annotations

from rlfleet.errors import UserError


class PreferenceError(UserError):
    """The preference queue was used in a way it does not allow; the message says what and what is valid."""


class RecordError(PreferenceError):
    """A pair or a label does not match the schema; the message names the record and the field."""


class PairNotFound(PreferenceError):
    """No pair with that id is in this namespace's queue."""


class AlreadyLabelled(PreferenceError):
    """The pair already has a label (the first label wins; labels are never overwritten)."""


class DatasetError(PreferenceError):
    """A JSONL dataset has malformed lines; the message gives their line numbers."""


class QueueFull(TimeoutError):
    """`add` waited `timeout` seconds and the queue still had no room: nothing of the batch was written."""
