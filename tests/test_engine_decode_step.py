"""The decode step is ready for CUDA graphs: no host synchronisation, one graph, static buffers."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from engine_support import (
    one_thread,  # noqa: F401 (autouse fixture: one intra-op thread)
    request,
)
from torch.utils._python_dispatch import TorchDispatchMode

from model import GPT, CharTokenizer, Checkpoint, GPTConfig, KVCache
from service.engine import Engine, EngineConfig
from service.engine.graphs import StaticDecode

# Ops that make the host wait for the device (or that only exist to do so): a value read back
# (item), a data-dependent shape (nonzero, masked_select, boolean-mask indexing), a truth test.
SYNC_OPS = {"aten._local_scalar_dense", "aten.item", "aten.nonzero", "aten.masked_select",
            "aten.is_nonzero", "aten.unique", "aten._unique2", "aten.equal"}


class OpCounter(TorchDispatchMode):
    """Counts every aten op, and the sync-prone ones (boolean-mask indexing included)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.sync: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.ops[name] += 1
        if name in SYNC_OPS or (name in ("aten.index", "aten.index_put", "aten.index_put_")
                                and _has_bool_index(args)):
            self.sync[name] += 1
        return func(*args, **(kwargs or {}))


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


def _checkpoint(n_layer: int) -> Checkpoint:
    torch.manual_seed(0)
    chars = [chr(ord("a") + i) for i in range(26)]
    config = GPTConfig(block_size=64, vocab_size=32, n_layer=n_layer, n_head=2, n_embd=32)
    return Checkpoint(GPT(config).eval(), CharTokenizer(chars), config, "gptserve", None, {})


SAMPLING = [dict(temperature=0.0),
            dict(temperature=0.8, top_k=5, top_p=0.9, min_p=0.05, seed=1, logprobs=2),
            dict(temperature=1.0, repetition_penalty=1.3, presence_penalty=0.5,
                 logit_bias={3: 2.0})]


def _decode_step_ops(n_layer: int, batch: int) -> OpCounter:
    eng = Engine(_checkpoint(n_layer), EngineConfig(device="cpu", max_batch_size=8))
    core = eng._core
    for i in range(batch):
        prompt = [(7 * i + j) % 26 for j in range(3 + i)]
        core.add_request(request(f"r{i}", prompt, max_tokens=50, **SAMPLING[i % len(SAMPLING)]))
    for _ in range(3):  # prefill, then decoding
        core.step()
    assert all(s.num_to_compute == 1 for s in core.scheduler.running), "not decoding yet"
    with OpCounter() as counter:
        core.step()
    return counter


def test_a_decode_step_has_no_sync_prone_op_at_any_depth_or_batch_size():
    counts = {}
    for n_layer in (2, 4):
        for batch in (1, 3, 8):
            counter = _decode_step_ops(n_layer, batch)
            assert not counter.sync, (
                f"{n_layer} layers, batch {batch}: sync-prone ops {dict(counter.sync)}")
            counts[n_layer, batch] = sum(counter.ops.values())
    # batch 3 and 8 mix every sampling feature (filters, logprobs, penalties, bias): their op
    # count must not depend on how many rows there are, and per layer it is a constant
    assert counts[2, 3] == counts[2, 8] and counts[4, 3] == counts[4, 8], counts
    per_layer = (counts[4, 8] - counts[2, 8]) / 2
    assert per_layer == (counts[4, 1] - counts[2, 1]) / 2, counts


def test_the_decode_forward_compiles_as_one_graph_without_breaks():
    ck = _checkpoint(2)
    kv = KVCache.for_model(ck.config, 4)
    batch = kv.pack([(0, 3, 5), (1, 7, 9), (3, 0, 1)])  # slot 2 idle: the scatter path
    dense = kv.pack([(0, 4, 5), (1, 8, 9)], decode_width=4, decode_length=16)
    with torch.inference_mode():
        for b in (batch, dense):
            explained = torch._dynamo.explain(ck.model.forward_packed)(b, kv)
            assert explained.graph_count == 1 and explained.graph_break_count == 0, (
                explained.break_reasons)
            compiled = torch.compile(ck.model.forward_packed, fullgraph=True, backend="eager")
            assert torch.allclose(compiled(b, kv), ck.model.forward_packed(b, kv), atol=1e-6)
        torch._dynamo.reset()


@pytest.mark.parametrize("slots", [[0], [0, 1, 2], [1, 5], [0, 2, 3, 6]])
def test_static_decode_buffers_give_the_packed_forward_logits(slots):
    ck = _checkpoint(2)
    kv = KVCache.for_model(ck.config, 8)
    g = torch.Generator().manual_seed(len(slots))
    prompts = {s: torch.randint(0, 26, (5 + 3 * s,), generator=g).tolist() for s in slots}
    static = StaticDecode(ck.model, kv, cuda_graphs=False, compile=False)
    with torch.inference_mode():
        ck.model.forward_packed(kv.pack([], [(s, 0, p[:-1], False) for s, p in prompts.items()]),
                                kv)
        decode = [(s, len(p) - 1, p[-1]) for s, p in prompts.items()]
        want = ck.model.forward_packed(kv.pack(decode), kv)
        got = static.run(decode)
        again = static.run(decode)  # the same bucket, buffers refilled: same answer
    assert torch.allclose(got, want, atol=1e-5) and torch.equal(got, again)
    width = max(slots) + 1
    assert all(w >= width and w & (w - 1) == 0 for w, _ in static._buckets), static._buckets


def test_every_decode_bucket_is_made_at_start_up_and_serving_makes_none():
    ck = _checkpoint(2)
    kv = KVCache.for_model(ck.config, 6)  # widths 1, 2, 4, 6 (capped at the slot count)
    static = StaticDecode(ck.model, kv, cuda_graphs=False, compile=False)
    with torch.inference_mode():
        made = static.capture_all()
        lengths = {length for _, length in static._buckets}
        assert made == len(static._buckets) == 4 * len(lengths)
        assert {w for w, _ in static._buckets} == {1, 2, 4, 6}
        assert min(lengths) == 16 and max(lengths) == kv.max_len
        before = dict(static._buckets)
        for slots, pos in (([0], 3), ([0, 4], 20), ([1, 2, 5], kv.max_len - 1)):
            static.run([(s, pos, 1) for s in slots])
    assert static._buckets == before, "a bucket was made while serving"
