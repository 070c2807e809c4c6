"""Live checkpoint reload: ``--watch`` and ``POST /admin/reload`` (see ``reloader.py``)."""

from service.reload.reloader import (
    ReloadConfig,
    Reloader,
    ReloadError,
    ReloadOutcome,
    server_reloader,
)
from service.reload.snapshot import (
    Fingerprint,
    FolderChanged,
    ModelInfo,
    Snapshot,
    check_compatible,
    load_consistent,
    system_fingerprint,
)

__all__ = [
    "Fingerprint",
    "FolderChanged",
    "ModelInfo",
    "ReloadConfig",
    "ReloadError",
    "ReloadOutcome",
    "Reloader",
    "Snapshot",
    "check_compatible",
    "load_consistent",
    "server_reloader",
    "system_fingerprint",
]
