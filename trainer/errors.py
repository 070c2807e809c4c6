"""The exceptions the command line turns into a message and an exit status."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class TrainerError(Exception):
    """Bad input or an unrecoverable condition a user can fix; the message says how."""


@dataclass
class TrainingInterrupted(Exception):
    """A run stopped by SIGINT (Ctrl-C) or SIGTERM after saving ``saved`` at ``step``."""

    step: int
    signum: int
    saved: Path
    world_size: int = 1
    is_main: bool = True  # only rank 0 reports it
