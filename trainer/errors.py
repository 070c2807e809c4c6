"""The one exception type the command line turns into a single ``error: ...`` line."""

from __future__ import annotations


class TrainerError(Exception):
    """Bad input or an unrecoverable condition a user can fix; the message says how."""
