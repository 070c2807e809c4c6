"""Reading a checkpoint's files without trusting them: plain files inside its folder only.

A checkpoint folder may come from anywhere (a download, a shared volume, a careless hand), so
every file is opened through one open handle on the folder, by a plain name (no ``/``, no
``..``), without following a symlink (``O_NOFOLLOW``), non-blocking (a FIFO cannot hang the
open), and checked with ``fstat`` to be a regular file before a byte is read. Sizes are capped
per file. Messages name the file and the problem, never the file's contents.

The path the operator gives (``--checkpoint``, a reload's ``checkpoint``) may itself be a
symlink: that is the operator's choice. What lies inside the folder may not point elsewhere.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MiB = 1024 * 1024
JSON_LIMIT = 16 * MiB  # config.json, tokenizer.json, vocab.json (GPT-2's vocab.json is 1 MiB)
TEXT_LIMIT = 64 * MiB  # ranks files, merges.txt, meta.pkl


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the file and the problem."""


_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a folder",
    stat.S_IFLNK: "a symbolic link",
}


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def describe_os_error(path: Path, err: OSError) -> CheckpointError:
    """One clear sentence for what the OS said about ``path``."""
    if err.errno == errno.ENOENT:
        return CheckpointError(f"{path}: does not exist")
    if err.errno == errno.ELOOP:
        return CheckpointError(f"{path}: symbolic link loop (too many levels of symbolic links)")
    if err.errno in (errno.EACCES, errno.EPERM):
        return CheckpointError(f"{path}: permission denied")
    if err.errno == errno.ENOTDIR:
        return CheckpointError(f"{path}: a path component is not a folder")
    return CheckpointError(f"{path}: cannot be read ({err.strerror or err})")


def checkpoint_kind(path: Path) -> str:
    """``"folder"`` or ``"file"`` for the path the operator gave; anything else is refused."""
    try:
        mode = os.stat(path).st_mode  # follows the operator's own symlink, if any
    except OSError as err:
        raise describe_os_error(path, err) from None
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISREG(mode):
        return "file"
    raise CheckpointError(f"{path}: is {_kind(mode)}, not a checkpoint file or folder")


class CheckpointFiles:
    """Owns one open handle on a checkpoint folder and reads plain files inside it by name.

    Every read goes through the handle, so all files come from the folder that was opened even
    if the path is renamed meanwhile (a trainer's atomic swap).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        try:
            self._fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as err:
            raise describe_os_error(self.folder, err) from None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> CheckpointFiles:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def where(self, name: str) -> Path:
        """The file's path, for messages."""
        return self.folder / name

    def exists(self, name: str) -> bool:
        """Whether the folder has an entry ``name`` (of any kind: reading it checks the kind)."""
        _check_name(name)
        try:
            os.stat(name, dir_fd=self._fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        except OSError as err:
            raise describe_os_error(self.where(name), err) from None
        return True

    def _open(self, name: str, *, follow: bool = False) -> tuple[int, os.stat_result]:
        """An fd on ``name``, checked to be a regular file; ``follow`` only for the operator's
        own file path (a nanoGPT ``ckpt.pt`` given directly)."""
        _check_name(name)
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
        try:
            fd = os.open(name, flags, dir_fd=self._fd)
        except OSError as err:
            if err.errno == errno.ELOOP and not follow:
                raise CheckpointError(
                    f"{self.where(name)}: is a symbolic link; a checkpoint's files must be regular "
                    "files inside its folder"
                ) from None
            if err.errno == errno.ENXIO:  # a socket (or a FIFO opened for writing)
                raise CheckpointError(f"{self.where(name)}: is not a regular file") from None
            raise describe_os_error(self.where(name), err) from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise CheckpointError(
                f"{self.where(name)}: is {_kind(info.st_mode)}, not a regular file"
            )
        return fd, info

    def read(self, name: str, limit: int = TEXT_LIMIT) -> bytes:
        """The bytes of ``name`` (at most ``limit``; larger files are refused before reading)."""
        fd, info = self._open(name)
        try:
            if info.st_size > limit:
                raise CheckpointError(
                    f"{self.where(name)}: is {info.st_size} bytes, larger than the {limit}-byte "
                    "limit for this file"
                )
            chunks, total = [], 0
            while chunk := os.read(fd, min(MiB, limit + 1 - total)):
                chunks.append(chunk)
                total += len(chunk)
                if total > limit:  # grew while being read
                    raise CheckpointError(f"{self.where(name)}: grew past {limit} bytes")
            return b"".join(chunks)
        except OSError as err:
            raise describe_os_error(self.where(name), err) from None
        finally:
            os.close(fd)

    def read_json(self, name: str) -> Any:
        """``name`` parsed as UTF-8 JSON (the error says where, not what)."""
        data = self.read(name, JSON_LIMIT)
        try:
            return json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise CheckpointError(
                f"{self.where(name)}: not UTF-8 text (bad byte at offset {err.start})"
            ) from None
        except json.JSONDecodeError as err:
            raise CheckpointError(
                f"{self.where(name)}: not valid JSON ({err.msg} at line {err.lineno} "
                f"column {err.colno})"
            ) from None
        except RecursionError:
            raise CheckpointError(f"{self.where(name)}: JSON nested too deeply") from None

    @contextmanager
    def path(self, name: str, *, follow: bool = False) -> Iterator[tuple[Path, int]]:
        """A path to a checked regular file for libraries that open by name (safetensors, torch),
        with its size.

        On Linux it is ``/proc/self/fd/N`` of the fd that was checked, so the library opens that
        very file; elsewhere the plain path (checked, but open to a swap in between).
        """
        fd, info = self._open(name, follow=follow)
        try:
            handle = Path(f"/proc/self/fd/{fd}")
            yield (handle if handle.exists() else self.where(name)), info.st_size
        finally:
            os.close(fd)


def _check_name(name: str) -> None:
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or "/" in name
        or "\\" in name
        or "\0" in name
    ):
        raise CheckpointError(f"{name!r}: not a plain file name inside the checkpoint folder")
