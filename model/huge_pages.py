"""A model's CPU weights moved into one arena of 2 MiB pages (Linux transparent huge pages), and
the CPU KV cache allocated in such pages.

Why: a decode step of one sequence reads every weight once, and at 4 KiB pages GPT-2-small's
494 MB are ~120,000 pages a token, each a TLB miss; in a virtual machine each miss walks two page
tables (the guest's and the host's). A one-row GPT-2-small forward took 22.9 ms from huge pages
against 24.2 ms from PyTorch's own allocations on this project's VM (``bench/floor.py``;
docs/BENCHMARKS.md, "One-row kernel and huge pages"). PyTorch's CPU
allocator takes large tensors from ``malloc``, which maps them at 4 KiB pages unless the system
turns transparent huge pages on for everything (``/sys/kernel/mm/transparent_hugepage/enabled``
is ``always``); with the common ``madvise`` setting only memory a program marks gets them. So
``move_to_huge_pages`` maps one anonymous arena aligned to 2 MiB, marks it ``MADV_HUGEPAGE``,
copies each parameter into it (64-byte aligned) and points the parameter at its copy (the old
storage is freed as each one moves, so the peak is one tensor over the model). Tied parameters
stay tied (each parameter moves once), values are unchanged bit for bit.

The KV cache (``model.kv_cache``) takes its CPU tensor from ``huge_page_zeros`` for the same
reason: a decode step reads every live sequence's keys and values (at 32 GPT-2-small streams
128 positions in, ~190 MB a step). Where the system says ``never``, the pages stay small and
nothing is lost but the copy.
"""

from __future__ import annotations

import math
import mmap
import sys
from dataclasses import dataclass

import torch
from torch import nn

HUGE_PAGE = 2 << 20
_ALIGN = 64  # a cache line: every tensor starts on one


@dataclass(frozen=True)
class HugePageArena:
    """Where ``move_to_huge_pages`` put the weights: ``moved`` bytes of parameters in an arena
    of ``size`` bytes starting at ``address``; ``huge`` of them were backed by 2 MiB pages when
    it was filled (the kernel's count, from ``/proc/self/smaps``)."""

    address: int
    size: int
    moved: int
    huge: int

    def describe(self) -> str:
        return (f"weights in one {self.size / 2**20:.0f} MiB arena, "
                f"{self.huge / 2**20:.0f} MiB of it in 2 MiB pages")


def move_to_huge_pages(module: nn.Module) -> HugePageArena | None:
    """Move every CPU parameter of ``module`` into one huge-page arena (see the module
    docstring); None where there is nothing to move or the platform has no ``MADV_HUGEPAGE``
    (not Linux). A caller that caches views of the parameters must drop them after this."""
    params = [p for p in module.parameters() if p.device.type == "cpu" and p.numel() > 0]
    if not params or sys.platform != "linux" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    sizes = [p.numel() * p.element_size() for p in params]
    offsets = [0]
    for nbytes in sizes[:-1]:
        offsets.append(offsets[-1] + -(-nbytes // _ALIGN) * _ALIGN)
    arena = _arena(offsets[-1] + sizes[-1])
    with torch.no_grad():
        for p, offset, nbytes in zip(params, offsets, sizes, strict=True):
            home = arena[offset:offset + nbytes].view(p.dtype).view(p.shape)
            home.copy_(p.data)
            p.data = home
    address, size = arena.data_ptr(), arena.numel()
    return HugePageArena(address, size, sum(sizes), _huge_bytes(address, size))


def huge_page_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed CPU tensor in its own 2 MiB-aligned ``MADV_HUGEPAGE`` mapping (Linux; elsewhere
    ``torch.zeros``). The pages are the kernel's zero-filled ones, touched only when written."""
    if sys.platform != "linux" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.zeros(shape, dtype=dtype)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return _arena(nbytes)[:nbytes].view(dtype).view(shape)


def _arena(nbytes: int) -> torch.Tensor:
    """``nbytes`` rounded up to whole huge pages, as a uint8 tensor over an anonymous mapping
    that starts on a 2 MiB boundary and is marked ``MADV_HUGEPAGE`` (the tensor keeps the
    mapping alive; it is unmapped when the last view of it goes)."""
    size = max(1, -(-nbytes // HUGE_PAGE)) * HUGE_PAGE
    # one huge page more, to start on a 2 MiB boundary (mmap aligns to 4 KiB only)
    region = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    whole = torch.frombuffer(region, dtype=torch.uint8)  # keeps ``region`` alive
    start = -whole.data_ptr() % HUGE_PAGE
    return whole[start:start + size]


def mapping_fields(address: int) -> dict[str, str]:
    """The ``/proc/self/smaps`` fields of the mapping that holds ``address`` (``AnonHugePages``:
    its bytes in huge pages, ``VmFlags``: ``hg`` where it is marked ``MADV_HUGEPAGE``); empty
    where no mapping holds it or smaps cannot be read."""
    fields: dict[str, str] = {}
    inside = False
    try:
        with open("/proc/self/smaps") as smaps:
            for line in smaps:
                first, _, rest = line.partition(" ")
                if not first.endswith(":"):  # a mapping's header: "lo-hi perms offset ..."
                    if inside:
                        break
                    lo, hi = (int(x, 16) for x in first.split("-"))
                    inside = lo <= address < hi
                elif inside:
                    fields[first[:-1]] = rest.strip()
    except OSError:
        return {}
    return fields


def _huge_bytes(address: int, size: int) -> int:
    """Bytes of the arena at ``address`` that the kernel backs with huge pages."""
    kib = mapping_fields(address).get("AnonHugePages", "0 kB").split()[0]
    return min(int(kib) * 1024, size)
