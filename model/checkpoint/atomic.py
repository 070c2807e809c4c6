"""Atomic replacement of a checkpoint folder.

Everything is written into a fresh sibling folder, every file fsynced, and only then swapped in.
On Linux the swap is one ``renameat2(RENAME_EXCHANGE)`` call, so at every instant the target path
holds either the complete old checkpoint or the complete new one. Elsewhere the old folder is first
renamed aside (``NAME.old-*``), a window that ``recover_interrupted_swap`` closes on the next load.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def fsync_path(path: Path) -> None:
    """fsync a file or a directory so its contents (or entries) survive a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the call is unavailable."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc != 0:
        errno = ctypes.get_errno()
        if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: filesystem cannot exchange
            return False
        raise OSError(errno, os.strerror(errno), str(b))
    return True


def recover_interrupted_swap(target: Path) -> None:
    """If a non-atomic swap died between its two renames, put the old folder back."""
    if target.exists():
        return
    aside = sorted(target.parent.glob(f".{target.name}.old-*"))
    if aside:
        os.rename(aside[-1], target)


def _default_mode() -> int:
    """0o777 less the process umask: the mode a plain ``mkdir`` would have given."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


@contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yield a temporary folder to fill; on clean exit it replaces ``target`` atomically.

    If the body raises (or the process dies) ``target`` is untouched and the temp folder removed
    (or left as an ignorable ``.NAME.tmp-*`` sibling after a hard kill).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_swap(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        mode = _default_mode()
        for child in tmp.iterdir():
            if child.is_file():
                os.chmod(child, mode & 0o666)  # safetensors and mkstemp create 0600 files
            fsync_path(child)
        os.chmod(tmp, mode)  # mkdtemp makes 0700: let a server under another user read it
        fsync_path(tmp)
        if not target.exists():
            os.rename(tmp, target)
        elif _exchange(tmp, target):
            shutil.rmtree(tmp)  # tmp now holds the old checkpoint
        else:
            aside = target.parent / f".{target.name}.old-{os.getpid()}"
            os.rename(target, aside)
            os.rename(tmp, target)
            shutil.rmtree(aside)
        fsync_path(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

