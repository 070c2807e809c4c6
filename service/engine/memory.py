"""KV cache sizing: how many slots of the model package's ``KVCache`` the memory budget buys.

The budget is checked before anything is allocated. With ``kv_memory`` set it is that many bytes.
Unset, it is ``max_batch_size`` full windows, and on CUDA at most ``kv_memory_fraction`` of the
device's free memory (measured after the weights are loaded, as vLLM does). Either way the slots
must fit in the memory the device has free now (on CPU: the available RAM, within any cgroup
limit), or the engine is refused with a message saying what to lower; a live reload's second
engine goes through the same check while the first one still holds its memory.

Why slots, not blocks: a sequence never holds more than one window (``block_size``, 128 for the
shipped shakespeare-char, 1024 for GPT-2) and is re-encoded when it outgrows it, so paging would
save memory only for sequences shorter than a window, at the price of a gather of every block on
every decode step; with slots, a decode step attends over a plain view of the cache (see
docs/BENCHMARKS.md, Engine, "Slots, not pages"). An fp32 or bf16 CPU engine also plans room
for a second copy of the weights (``prepacked_bytes``: oneDNN's reordered layout, ``model.gpt``).
"""

from __future__ import annotations

import torch

from model.checkpoint.budget import host_memory, weight_bytes
from model.config import GPTConfig
from model.gpt import can_prepack
from model.kv_cache import KVCache
from service.engine.config import EngineConfig

_HEADROOM = 0.9  # never plan the last 10% of the free memory: activations, the sampler, Python


def plan_slots(
    config: GPTConfig, dtype: torch.dtype, engine: EngineConfig, device: torch.device
) -> int:
    """How many KV slots to preallocate; raises ``ValueError`` when not even the planned
    cache fits the device's free memory."""
    per_slot = KVCache.bytes_per_slot(config, dtype)
    free = free_memory(device)
    slots = slots_wanted(config, dtype, engine, device, free)
    needed = (slots + 1) * per_slot  # + the scratch slot padding writes into
    packed = prepacked_bytes(config, dtype, engine, device)
    if slots < 1 or needed + packed > free * _HEADROOM:
        also = f" (and {_gib(packed)} for the prepacked CPU weights)" if packed else ""
        raise ValueError(
            f"the KV cache needs {_gib(needed)} for {max(slots, 1)} sequence window(s) of "
            f"{_gib(per_slot)} each{also}, but the {device.type} device has {_gib(free)} free: "
            f"lower --max-batch-size or --kv-memory, or use a smaller dtype"
        )
    return slots


def prepacked_bytes(
    config: GPTConfig, dtype: torch.dtype, engine: EngineConfig, device: torch.device
) -> int:
    """Room for the second copy of the weights that fp32 and bf16 CPU engines may reorder for
    oneDNN (``GPT.prepack_cpu_weights``; the warm-up drops it when it does not pay): planned
    for, so that the KV cache never takes the memory that copy needs."""
    return weight_bytes(config, dtype) if prepacks(engine, device, dtype) else 0


def prepacks(engine: EngineConfig, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether an engine with these settings tries oneDNN-prepacked weights: where the model can
    prepack them (``model.gpt.can_prepack``: fp32 or bf16 on CPU), not under batch invariance
    (its fixed shapes rely on one kernel) nor ``compile`` (Inductor packs by itself), nor with
    int8 weights."""
    return (can_prepack(device, dtype) and not engine.batch_invariant and not engine.compile
            and engine.quantization == "none")  # int8 weights are packed by fbgemm instead


def slots_wanted(
    config: GPTConfig, dtype: torch.dtype, engine: EngineConfig, device: torch.device,
    free: int | None = None,
) -> int:
    """The slot count the settings ask for: ``max_batch_size``, lowered by ``kv_memory`` and, on
    CUDA with ``kv_memory`` unset, by ``kv_memory_fraction`` of the free memory (not checked
    against the free memory here: ``plan_slots`` does that)."""
    per_slot = KVCache.bytes_per_slot(config, dtype)
    slots = engine.max_batch_size
    if engine.kv_memory is not None:
        slots = min(slots, engine.kv_memory // per_slot)
        if slots < 1:
            raise ValueError(
                f"kv_memory={engine.kv_memory} bytes cannot hold one sequence window "
                f"({per_slot} bytes for this model in {dtype})"
            )
    elif device.type == "cuda":
        free = free_memory(device) if free is None else free
        slots = min(slots, int(free * engine.kv_memory_fraction) // per_slot)
    return slots


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device`` now: CUDA's free memory, or on CPU what this process may still
    take (``MemAvailable``, lowered to any memory cgroup's headroom: a container's limit)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return host_memory().available


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
