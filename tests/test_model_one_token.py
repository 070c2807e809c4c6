"""The whole network for one decode token in one call of the kernel library
(``CpuGemv.one_token``, ``gptserve_forward1_f32``): its logits and cache writes against the
PyTorch packed forward, the weights and caches it refuses, and the engine's warm-up refusing a
build whose logits are wrong."""

from __future__ import annotations

import pytest
import torch

from model.cpu_gemv import KernelUnavailable, OneTokenForward, load_cpu_gemv
from model.gpt import GPT, GPTConfig
from model.kv_cache import KVCache
from service.engine import EngineConfig
from service.engine.runner import ModelRunner


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    try:
        return load_cpu_gemv(tmp_path_factory.mktemp("kernels"))
    except KernelUnavailable as e:
        from tests.test_model_cpu_gemv import _skip_unless_buildable

        _skip_unless_buildable()  # skips where the kernel is not meant to build; else a failure
        raise AssertionError(f"the kernel should build here: {e}") from e


def _model(n_embd: int, n_head: int, bias: bool, activation: str, block_size: int = 24) -> GPT:
    torch.manual_seed(n_embd * 10 + n_head)
    cfg = GPTConfig(block_size=block_size, vocab_size=61, n_layer=3, n_head=n_head,
                    n_embd=n_embd, bias=bias, activation=activation)
    model = GPT(cfg).eval()
    with torch.no_grad():  # LayerNorms that are not the identity: their weights are read too
        for name, p in model.named_parameters():
            if "ln" in name:
                p.add_(0.3 * torch.randn_like(p))
            if "c_attn.weight" in name:  # peaked attention: each key's weight matters
                p.mul_(8.0)
    return model


# head sizes 8, 9, 16, 40 and 66 (every tail of the vector loops: 4 keys, 8 and 32 outputs at a
# time); both GELUs; with and without biases
CONFIGS = [(16, 2, True, "gelu"), (36, 4, False, "gelu_tanh"), (48, 3, True, "gelu_tanh"),
           (40, 5, False, "gelu"), (80, 2, True, "gelu_tanh"), (132, 2, False, "gelu")]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n_embd,n_head,bias,activation", CONFIGS)
def test_logits_and_cache_writes_equal_the_packed_forward(kernel, monkeypatch, n_embd, n_head,
                                                          bias, activation, threads):
    model = _model(n_embd, n_head, bias, activation)
    calls = []
    call = OneTokenForward.__call__
    monkeypatch.setattr(OneTokenForward, "__call__",
                        lambda self, *a: calls.append(a) or call(self, *a))
    g = torch.Generator().manual_seed(3)
    want_kv, got_kv = (KVCache.for_model(model.config, 3) for _ in range(2))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            # prompts of 1, 7 and 12 tokens in slots 2, 0, 1 (PyTorch's forward, both caches)
            lengths = {2: 1, 0: 7, 1: 12}
            for slot, n in lengths.items():
                prompt = torch.randint(0, 61, (n,), generator=g).tolist()
                for kv in (want_kv, got_kv):
                    model.use_cpu_gemv(None)
                    model.forward_packed(kv.pack([], [(slot, 0, prompt, True)]), kv)
            # one-token steps to the last position of the window
            steps = [(slot, pos) for slot, n in lengths.items() for pos in range(n, 24)]
            for slot, pos in steps:
                token = int(torch.randint(0, 61, (1,), generator=g))
                model.use_cpu_gemv(None)
                want = model.forward_packed(want_kv.pack([(slot, pos, token)]), want_kv)
                assert model.use_cpu_gemv(kernel, fused=True)
                got = model.forward_packed(got_kv.pack([(slot, pos, token)]), got_kv)
                assert got.shape == want.shape == (1, 61)
                # float rounding only: 1e-5 of the largest value (it was up to 1.5e-6 of it)
                err = (got - want).abs().max().item() / want.abs().max().item()
                assert err < 1e-5, f"slot {slot} position {pos}: |fused - packed| = {err}"
                kv_err = ((got_kv.data - want_kv.data).abs().max()
                          / want_kv.data.abs().max()).item()
                assert kv_err < 1e-5, f"slot {slot} position {pos}: cache differs by {kv_err}"
    finally:
        torch.set_num_threads(before)
    assert [(slot, pos) for _, pos, slot, _ in calls] == steps, "every step ran fused, once"


def test_a_long_context_agrees_with_the_packed_forward(kernel):
    # hundreds of keys (the vectorised softmax's every tail) in a 64-wide head
    model = _model(64, 1, True, "gelu_tanh", block_size=400)
    g = torch.Generator().manual_seed(5)
    want_kv, got_kv = (KVCache.for_model(model.config, 1) for _ in range(2))
    prompt = torch.randint(0, 61, (389,), generator=g).tolist()
    with torch.inference_mode():
        for kv in (want_kv, got_kv):
            model.use_cpu_gemv(None)
            model.forward_packed(kv.pack([], [(0, 0, prompt, True)]), kv)
        for pos in range(389, 400):
            model.use_cpu_gemv(None)
            want = model.forward_packed(want_kv.pack([(0, pos, pos % 61)]), want_kv)
            model.use_cpu_gemv(kernel, fused=True)
            got = model.forward_packed(got_kv.pack([(0, pos, pos % 61)]), got_kv)
            err = (got - want).abs().max().item() / want.abs().max().item()
            assert err < 1e-5, f"position {pos}: |fused - packed| = {err}"


def test_several_rows_chunks_and_padding_keep_the_pytorch_forward(kernel, monkeypatch):
    model = _model(16, 2, True, "gelu")
    model.use_cpu_gemv(kernel, fused=True)
    monkeypatch.setattr(OneTokenForward, "__call__", lambda *a: pytest.fail("ran fused"))
    kv = KVCache.for_model(model.config, 2)
    with torch.inference_mode():
        # a padding row writes into the scratch slot but attends slot 0 (its output unused)
        model.forward_packed(kv.pack([], decode_width=1), kv)
        model.forward_packed(kv.pack([], [(0, 0, [1, 2, 3], True)]), kv)  # a chunk
        model.forward_packed(kv.pack([], [(1, 0, [4], True)]), kv)  # a one-token chunk
        model.forward_packed(kv.pack([(0, 3, 5), (1, 1, 6)]), kv)  # two decode rows


def test_the_fused_path_is_only_set_where_every_weight_suits_it(kernel):
    model = _model(16, 2, True, "gelu")
    assert model.use_cpu_gemv(kernel) and model._inference_weights().one_token is not None
    assert model.use_cpu_gemv(kernel, fused=False)
    assert model._inference_weights().one_token is None, "per-product kernel only"
    model.use_cpu_gemv(kernel)
    model.use_cpu_gemv(None)
    assert model._inference_weights().one_token is None
    assert not model.to(torch.bfloat16).use_cpu_gemv(kernel)
    assert model._inference_weights().one_token is None, "fp32 only"
    int8 = _model(16, 2, True, "gelu").quantize_int8()
    assert not int8.use_cpu_gemv(kernel) and int8._inference_weights().one_token is None
    w = _model(16, 2, False, "gelu")._inference_weights()
    args = dict(wte=w.wte, wpe=w.wpe, ln_f=w.ln_f, ln_f_bias=w.ln_f_bias, layers=w.layers,
                n_head=2, gelu_tanh=False)
    assert kernel.one_token(**args) is not None
    bad_layer = list(w.layers[0])
    bad_layer[8] = w.layers[0][8].t().contiguous().t()  # the right shape, not row-major
    assert kernel.one_token(**{**args, "layers": (tuple(bad_layer), *w.layers[1:])}) is None
    bad_layer[8] = w.layers[0][8][:, :8].contiguous()  # a wrong shape
    assert kernel.one_token(**{**args, "layers": (tuple(bad_layer), *w.layers[1:])}) is None
    assert kernel.one_token(**{**args, "ln_f": w.ln_f.double()}) is None
    assert kernel.one_token(**{**args, "n_head": 3}) is None, "16 is not 3 heads"


def test_a_token_position_slot_or_cache_it_cannot_read_is_refused_before_it_runs(kernel):
    model = _model(16, 2, True, "gelu")
    model.use_cpu_gemv(kernel)
    fused = model._inference_weights().one_token
    kv = KVCache.for_model(model.config, 2)
    for token, position, slot in ((61, 0, 0), (-1, 0, 0), (1, 24, 0), (1, -1, 0), (1, 0, 3),
                                  (1, 0, -1)):
        with pytest.raises(ValueError, match="out of range"):
            fused(token, position, slot, kv)
    assert fused(1, 0, 2, kv).shape == (1, 61), "slot 2 is the scratch slot"
    other = KVCache.for_model(_model(48, 3, True, "gelu").config, 2)
    wide = KVCache(3, 2, 2, 48, 8)  # longer than the model's 24 positions
    for cache in (other, wide, KVCache.for_model(model.config, 2, dtype=torch.float64)):
        assert not fused.accepts_cache(cache)
        with pytest.raises(ValueError, match="cannot read"):
            fused(1, 0, 0, cache)


def test_the_warm_up_times_the_fused_kernel_and_keeps_its_cache_clean(kernel, monkeypatch,
                                                                       caplog):
    caplog.set_level("INFO", logger="service.engine.runner")
    monkeypatch.setattr("service.engine.runner.load_cpu_gemv", lambda: kernel)
    runner = ModelRunner(_model(16, 2, True, "gelu"), 2, torch.device("cpu"), torch.float32,
                         cpu_gemv=True)
    runner.warm_up()
    assert "not used" not in caplog.text
    assert "1-row step: F.linear" in caplog.text and "fused kernel" in caplog.text
    # the one-row timing wrote slot 0's position 0 only; the scratch slot takes the padding
    written = runner.kv.data.abs().sum(dim=(0, 3, 4)).nonzero().tolist()
    assert all(slot == 2 or (slot, pos) == (0, 0) for slot, pos in written), written


def test_the_warm_up_refuses_a_build_whose_logits_are_wrong(kernel, monkeypatch, caplog):
    monkeypatch.setattr(OneTokenForward, "__call__",
                        lambda self, token, pos, slot, kv: torch.zeros(1, self.vocab_size))
    monkeypatch.setattr("service.engine.runner.load_cpu_gemv", lambda: kernel)
    runner = ModelRunner(_model(16, 2, True, "gelu"), 2, torch.device("cpu"), torch.float32,
                         cpu_gemv=True)
    runner.warm_up()
    assert "fused kernel gave other logits than F.linear; not used" in caplog.text
    assert runner.model._inference_weights().one_token is None
    assert EngineConfig().cpu_kernels  # (on by default: what this guards)


def _sdpa_rows(q, kv, layer, slots, lengths, length):
    """What attend_rows computes, by PyTorch: row r over slot slots[r]'s first keys."""
    out = []
    for r in range(q.shape[0]):
        slot = r if slots is None else int(slots[r])
        n = length if lengths is None else int(lengths[slot])
        k, v = kv.slot_view(layer, slot, n)
        qr = q[r].view(1, kv.n_head, 1, kv.head_dim)
        out.append(torch.nn.functional.scaled_dot_product_attention(qr, k, v).reshape(-1))
    return torch.stack(out)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n_head,head_dim", [(2, 8), (3, 9), (2, 40), (1, 66)])
def test_decode_rows_attend_their_own_slots_and_keys(kernel, n_head, head_dim, threads):
    g = torch.Generator().manual_seed(n_head * 100 + head_dim)
    kv = KVCache(2, 6, n_head, 37, head_dim)
    kv.data.copy_(torch.randn(kv.data.shape, generator=g) * 3)
    C = n_head * head_dim
    qkv = torch.randn(5, 3 * C, generator=g) * 3
    q = qkv[:, :C]  # a strided view, as the model passes it
    cases = [(None, None, 37), (None, torch.tensor([1, 37, 5, 12, 30, 2, 9]), 37),
             (torch.tensor([0, 2, 3, 5, 6]), torch.tensor([4, 1, 33, 7, 1, 20, 11]), 33)]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for slots, lengths, length in cases:
            got = kernel.attend_rows(q, kv, 1, slots, lengths, length)
            want = _sdpa_rows(q, kv, 1, slots, lengths, length)
            err = ((got - want).abs().max() / want.abs().max()).item()
            assert err < 1e-5, f"slots {slots} lengths {lengths}: {err}"
    finally:
        torch.set_num_threads(before)


def test_decode_rows_the_kernel_cannot_read_are_left_to_pytorch(kernel):
    kv = KVCache(2, 3, 2, 16, 8)
    q = torch.randn(3, 16)
    ok = dict(kv=kv, layer=0, slots=None, lengths=None, length=16)
    assert kernel.attend_rows(q, **ok) is not None
    for bad in (dict(layer=2), dict(length=17), dict(length=0),
                dict(slots=torch.tensor([0, 1, 4])),  # slot 4: past the scratch slot
                dict(slots=torch.tensor([0, 1])),  # not one per row
                dict(slots=torch.tensor([0, 1, 2], dtype=torch.int32)),
                dict(lengths=torch.tensor([1, 17, 3, 1])),  # more keys than the cache holds
                dict(lengths=torch.tensor([1, 0, 3, 1])),  # none at all
                dict(lengths=torch.tensor([1, 2]))):  # fewer slots than rows
        assert kernel.attend_rows(q, **{**ok, **bad}) is None, bad
    assert kernel.attend_rows(q.double(), **ok) is None
    assert kernel.attend_rows(q.t().contiguous().t(), **ok) is None, "columns must be contiguous"
    assert kernel.attend_rows(q, **{**ok, "kv": KVCache(2, 3, 2, 16, 8, dtype=torch.float64)}) \
        is None
