"""The memory budget: bytes from a config alone, the memory this process may still take, and the
serving engine's share (KV cache) counted before a checkpoint is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model import GPT, GPTConfig
from model.checkpoint import BudgetError
from model.checkpoint.budget import Memory, host_memory, load_bytes, parameter_count
from model.kv_cache import KVCache
from service.engine.config import EngineConfig
from service.engine.memory import prepacked_bytes
from service.reload.budget import serving_budget

SHAPES = [
    GPTConfig(block_size=32, vocab_size=61, n_layer=2, n_head=2, n_embd=16, bias=True),
    GPTConfig(block_size=64, vocab_size=101, n_layer=3, n_head=4, n_embd=32, bias=False),
    GPTConfig(block_size=1024, vocab_size=50304, n_layer=1, n_head=12, n_embd=768),
]


@pytest.mark.parametrize("config", SHAPES, ids=lambda c: f"L{c.n_layer}-C{c.n_embd}-b{c.bias}")
def test_parameter_count_from_the_config_equals_the_built_model(config):
    model = GPT(config)
    assert parameter_count(config) == sum(p.numel() for p in model.parameters())


def _fake_root(tmp_path: Path, cgroup: str, files: dict[str, str]) -> Path:
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/meminfo").write_text("MemTotal: 8000000 kB\nMemAvailable: 4000000 kB\n")
    (tmp_path / "proc/self/cgroup").write_text(cgroup)
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_host_memory_is_memavailable_without_a_cgroup_limit(tmp_path):
    root = _fake_root(tmp_path, "0::/app\n", {"sys/fs/cgroup/app/memory.max": "max\n",
                                              "sys/fs/cgroup/app/memory.current": "100\n"})
    assert host_memory(root) == Memory(4_000_000 * 1024, "MemAvailable in /proc/meminfo")


def test_host_memory_takes_the_tightest_cgroup_v2_limit_up_the_tree(tmp_path):
    root = _fake_root(tmp_path, "0::/pod/app\n", {
        "sys/fs/cgroup/pod/app/memory.max": "max\n",
        "sys/fs/cgroup/pod/app/memory.current": "1000\n",
        "sys/fs/cgroup/pod/memory.max": "600000000\n",
        "sys/fs/cgroup/pod/memory.current": "100000000\n",
    })  # fmt: skip
    memory = host_memory(root)
    assert memory.available == 500_000_000 and "pod" in memory.source, memory


def test_host_memory_reads_a_cgroup_v1_limit(tmp_path):
    root = _fake_root(tmp_path, "4:memory:/job\n1:cpu:/\n", {
        "sys/fs/cgroup/memory/job/memory.limit_in_bytes": "300000000\n",
        "sys/fs/cgroup/memory/job/memory.usage_in_bytes": "200000000\n",
    })  # fmt: skip
    assert host_memory(root).available == 100_000_000


def test_the_serving_budget_counts_the_kv_cache_beside_the_serving_engine():
    config = SHAPES[1]
    engine = EngineConfig(device="cpu", dtype="float32", max_batch_size=8)
    need = load_bytes(config) + (8 + 1) * KVCache.bytes_per_slot(config, torch.float32)  # + scratch
    need += prepacked_bytes(config, torch.float32, engine, torch.device("cpu"))  # oneDNN's copy

    class Live:  # what the budget reads of the engine serving now
        model_config, dtype, n_slots = SHAPES[0], torch.float32, 4

    fits = serving_budget(engine, Live(), lambda: Memory(need, "test"))
    fits(config)
    short = serving_budget(engine, Live(), lambda: Memory(need - 1, "test"))
    with pytest.raises(BudgetError, match=r"KV cache.*beside the serving model's \d+ bytes"):
        short(config)
    with pytest.raises(BudgetError, match="kv_memory"):  # not even one slot fits the budget
        serving_budget(EngineConfig(device="cpu", kv_memory=16))(config)
