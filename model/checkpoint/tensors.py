"""Weights files read after their shapes are checked: safetensors headers, memory-mapped torch.

A safetensors file's header is checked against the config before a tensor is read, so a file
whose header promises huge tensors allocates nothing. ``torch.load`` runs with
``weights_only=True`` (no code runs) and ``mmap=True`` (tensors stay in the file until
``build_model`` has checked their shapes and copies them).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from model.checkpoint.budget import host_memory
from model.checkpoint.common import check_shapes
from model.checkpoint.files import CheckpointError, CheckpointFiles
from model.config import GPTConfig

Rename = Callable[[str], str | None]  # file name -> nanoGPT name, None to skip the tensor


def read_safetensors(
    files: CheckpointFiles,
    name: str,
    config: GPTConfig,
    rename: Rename = lambda key: key,
    transposed: Callable[[str], bool] = lambda key: False,
) -> dict[str, torch.Tensor]:
    """The tensors of ``name`` under nanoGPT names, after their header shapes matched ``config``
    (``transposed`` names the ones stored transposed, e.g. Hugging Face's ``Conv1D``)."""
    where = files.where(name)
    with files.path(name) as (path, _size):
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = {key: rename(key) for key in f.keys()}
                shapes = {}
                for key, new in keys.items():
                    if new is not None:
                        shape = tuple(f.get_slice(key).get_shape())
                        shapes[new] = shape[::-1] if transposed(new) else shape
                check_shapes(config, shapes, where)
                state = {}
                for key, new in keys.items():
                    if new is not None:
                        tensor = f.get_tensor(key)
                        state[new] = tensor.t().contiguous() if transposed(new) else tensor
                return state
        except (SafetensorError, OSError) as err:
            message = str(err).replace(str(path), str(where))
            raise CheckpointError(
                f"{where}: unreadable or truncated safetensors file ({message})"
            ) from None


def read_torch(files: CheckpointFiles, name: str, *, follow: bool = False) -> Any:
    """``torch.load`` of ``name``: plain data and tensors only, tensors memory-mapped."""
    where = files.where(name)
    with files.path(name, follow=follow) as (path, size):
        try:
            try:
                return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):  # only the pre-1.6 format cannot be mapped
                    raise
            memory = host_memory()
            if size > memory.available:
                raise CheckpointError(
                    f"{where}: an old-format torch file of {size} bytes must be read whole; only "
                    f"{memory.available} bytes are available ({memory.source})"
                )
            return torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            text = str(err).strip().replace(str(path), str(where))
            first_line = text.splitlines()[0] if text else ""
            raise CheckpointError(
                f"{where}: refused, the file holds Python objects that would run code when loaded "
                f"(only tensors and plain data are accepted): {first_line}"
            ) from None
        except (RuntimeError, EOFError, OSError, ValueError) as err:
            if isinstance(err, CheckpointError):
                raise
            text = str(err).strip().replace(str(path), str(where))
            first_line = text.splitlines()[0] if text else type(err).__name__
            raise CheckpointError(f"{where}: unreadable or truncated torch file ({first_line})") from None


def tensor_dict(value: object, where: Path, what: str) -> dict[str, torch.Tensor]:
    """``value`` checked to be a dict of name -> tensor (a list or a string where a state dict
    belongs is refused by name)."""
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()
    ):
        raise CheckpointError(f"{where}: {what} must be a dict of tensor names to tensors")
    return value
