"""The memory a checkpoint needs to be *served*, checked from its config before it is loaded.

``model.checkpoint.budget`` counts what a load takes; serving adds the engine's KV cache (slots
counted exactly as the engine will count them, with ``service.engine.memory.slots_wanted``) and,
on an accelerator, the weights in the serving dtype. The check runs against what this process
may still allocate: host ``MemAvailable`` and the memory cgroup's headroom, the accelerator's free
memory. The engine already serving is resident (its weights are loaded and its KV cache is
zero-filled, so every page is touched), so it is already outside those numbers: a reload that
passes fits *beside* it. Its footprint is named in a refusal so the operator sees why.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from model.checkpoint import Budget
from model.checkpoint.budget import (
    BudgetError,
    Memory,
    check_fits,
    host_memory,
    load_bytes,
    weight_bytes,
)
from model.config import GPTConfig
from model.kv_cache import KVCache
from service.engine.config import EngineConfig
from service.engine.engine import resolve_device, resolve_dtype
from service.engine.memory import prepacked_bytes, slots_wanted


def engine_bytes(config: GPTConfig, dtype: torch.dtype, n_slots: int) -> int:
    """Weights plus KV cache of an engine serving ``config`` in ``dtype`` with ``n_slots``."""
    return weight_bytes(config, dtype) + (n_slots + 1) * KVCache.bytes_per_slot(config, dtype)


def serving_budget(
    engine: EngineConfig,
    live: object | None = None,
    memory: Callable[[], Memory] = host_memory,
) -> Budget:
    """A ``Budget`` for a model an engine with ``engine``'s settings will serve; ``live`` is the
    engine serving now (named in a refusal), ``memory`` reads the host's free memory."""

    def check(config: GPTConfig) -> None:
        try:
            device = resolve_device(engine.device)
        except ValueError:  # no such device: the engine says so itself, it is not the checkpoint's
            device = torch.device("cpu")
        dtype = resolve_dtype(engine.dtype, device)
        try:  # the engine's own count; whether it fits is checked below, naming the shape
            slots = max(1, slots_wanted(config, dtype, engine, device))
        except ValueError as err:
            raise BudgetError(str(err)) from None
        kv = (slots + 1) * KVCache.bytes_per_slot(config, dtype)
        host = memory()
        if live is not None:
            in_use = engine_bytes(live.model_config, live.dtype, live.n_slots)
            host = Memory(host.available, f"{host.source}, beside the serving model's "
                                          f"{in_use} bytes of weights and KV cache")  # fmt: skip
        if device.type == "cpu":
            parts = {"to load": load_bytes(config), "KV cache": kv}
            packed = prepacked_bytes(config, dtype, engine, device)
            if packed:
                parts["prepacked weights"] = packed
            check_fits(config, parts, host, "host")
            return
        check_fits(config, {"to load": load_bytes(config)}, host, "host")
        free, _total = torch.cuda.mem_get_info(device)
        weights = engine_bytes(config, dtype, 0)
        check_fits(config, {"weights": weights, "KV cache": kv},
                   Memory(free, f"free memory on {device}"), str(device))  # fmt: skip

    return check
