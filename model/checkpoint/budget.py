"""Will this model fit? Bytes estimated from a config alone, checked before anything is allocated.

A config.json that says ``n_layer: 1000000000`` must be refused from its numbers, not discovered
by building layers until the machine swaps. ``load_bytes`` is the host memory a load peaks at;
``host_memory`` what this process may still take (the smaller of the kernel's ``MemAvailable``
and the headroom of every memory cgroup above the process). The server adds what serving needs
(the KV cache, the accelerator) with its own ``Budget`` (service/reload/budget.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from model.checkpoint.files import CheckpointError
from model.config import GPTConfig

if TYPE_CHECKING:
    import torch

FP32 = 4
# Python objects of one transformer block (modules, parameters, hooks dicts): a few KiB each;
# counted generously so a config with thousands of tiny layers is not under-estimated.
LAYER_OVERHEAD = 64 * 1024
GiB = 1024**3

Budget = Callable[[GPTConfig], None]  # raises BudgetError when the config cannot fit


class BudgetError(CheckpointError):
    """The checkpoint's shape needs more memory than this process has."""


def parameter_count(config: GPTConfig) -> int:
    """Parameters of ``GPT(config)`` (the tied LM head counted once), from the shape alone."""
    c, b = config.n_embd, int(config.bias)
    per_layer = 12 * c * c + 2 * c + b * 11 * c  # attn 4C^2 + mlp 8C^2, 2 LayerNorms, biases
    embeddings = (config.vocab_size + config.block_size) * c
    return embeddings + config.n_layer * per_layer + c + b * c  # + ln_f


def weight_bytes(config: GPTConfig, dtype: torch.dtype) -> int:
    """Bytes of ``GPT(config)``'s parameters held in ``dtype``."""
    return parameter_count(config) * dtype.itemsize


def load_bytes(config: GPTConfig) -> int:
    """Host bytes a load peaks at: the fp32 model plus the state dict being copied into it."""
    return 2 * FP32 * parameter_count(config) + config.n_layer * LAYER_OVERHEAD


@dataclass(frozen=True)
class Memory:
    """Bytes this process may still allocate somewhere, and what said so."""

    available: int
    source: str


def host_memory(root: Path = Path("/")) -> Memory:
    """The smaller of ``MemAvailable`` and each memory cgroup's headroom (limit - usage)."""
    best = Memory(_meminfo_available(root / "proc/meminfo"), "MemAvailable in /proc/meminfo")
    for where, limit, usage in _cgroup_limits(root):
        headroom = max(0, limit - usage)
        if headroom < best.available:
            best = Memory(headroom, f"the memory cgroup limit at {where}")
    return best


def _meminfo_available(file: Path) -> int:
    try:
        for line in file.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 2**63  # no /proc (not Linux): nothing to go by, so no refusal on this count


def _read_int(file: Path) -> int | None:
    try:
        text = file.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (v2, no limit) is not a number


def _cgroup_limits(root: Path) -> list[tuple[Path, int, int]]:
    """(folder, limit, usage) of every memory cgroup from this process's up to the root."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, group = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # cgroup v2
            base, limit_file, usage_file = root / "sys/fs/cgroup", "memory.max", "memory.current"
        elif "memory" in controllers.split(","):  # cgroup v1
            base = root / "sys/fs/cgroup/memory"
            limit_file, usage_file = "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        folder = base / group.lstrip("/")
        while True:  # in a namespace the path may not exist below the mount: its parents do
            limit, usage = _read_int(folder / limit_file), _read_int(folder / usage_file)
            if limit is not None and usage is not None and limit < 2**60:
                found.append((folder, limit, usage))
            if folder == base or base not in folder.parents:
                break
            folder = folder.parent
    return found


def check_fits(config: GPTConfig, needs: dict[str, int], memory: Memory, where: str) -> None:
    """Raise ``BudgetError`` naming the shape fields when ``needs`` exceed ``memory``."""
    total = sum(needs.values())
    if total <= memory.available:
        return
    parts = ", ".join(f"{what} {_size(n)}" for what, n in needs.items() if n)
    shape = ", ".join(
        f"{k}={getattr(config, k)}" for k in ("n_layer", "n_embd", "vocab_size", "block_size")
    )
    raise BudgetError(
        f"the model's shape ({shape}) needs about {_size(total)} of {where} memory ({parts}); "
        f"only {_size(memory.available)} is available ({memory.source})"
    )


def apply_budget(budget: Budget, config: GPTConfig, where: Path) -> None:
    """Run ``budget`` on ``config``; a refusal (or a ValueError it raises) names ``where``."""
    try:
        budget(config)
    except ValueError as err:
        raise BudgetError(f"{where}: {err}") from None


def host_budget(config: GPTConfig) -> None:
    """The default budget of ``load_checkpoint``: the load itself must fit in host memory."""
    check_fits(config, {"to load": load_bytes(config)}, host_memory(), "host")


def _size(n: int) -> str:
    for unit, scale in (("PiB", 1024**5), ("TiB", 1024**4), ("GiB", GiB), ("MiB", 1024**2)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"

