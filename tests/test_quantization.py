"""int8 weights (``--quantization int8``, ``model.quantize``): quality kept against fp32, served
over HTTP, and refused clearly where they cannot work.

Quality bars: the shipped model's val loss, scored the way the trainer's eval scores it
(its batches of its val split, drawn by its sampler with its seed), within +0.02 of fp32; greedy
tokens agreeing with fp32 on >= 95% of positions, over the engine oracle's prompts
(tests/test_engine_reference.py) and over the shipped model's greedy continuations.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import torch
from conftest import live_server
from deploy_support import ROOT, child_env
from engine_support import engine, one_thread, prompt_of, request, tiny_checkpoint  # noqa: F401
from test_engine_reference import ARRIVALS, MIX

from model import export_huggingface, load_checkpoint
from model.quantize import Int8Linear
from service import LLM, SamplingParams
from service.engine import EngineConfig
from service.engine.engine import check_quantization
from trainer.data import BatchSampler, TokenData, prepare
from trainer.loop import EVAL_SEED_OFFSET

pytestmark = pytest.mark.timeout(300)
SHIPPED = ROOT / "weights" / "shakespeare-char"
MAX_LOSS_INCREASE = 0.02
MIN_AGREEMENT = 0.95


@pytest.fixture(scope="module")
def shipped():
    return load_checkpoint(SHIPPED)


def _corpus() -> Path:
    corpus = os.environ.get("GPTSERVE_TEST_CORPUS")
    if not corpus or not Path(corpus).is_file():
        pytest.skip("GPTSERVE_TEST_CORPUS (tinyshakespeare.txt) is not set")
    return Path(corpus)


def _trainers_val_loss(model, data: TokenData, hp: dict) -> float:
    """``Trainer.evaluate``'s val figure on one process: the mean loss of ``eval_iters`` batches
    drawn from the val split by its ``BatchSampler`` with the eval seed."""
    sampler = BatchSampler(data.splits["val"], hp["block_size"], hp["batch_size"],
                           hp["seed"] + EVAL_SEED_OFFSET)
    total = 0.0
    with torch.no_grad():
        for _ in range(hp["eval_iters"]):
            x, y = sampler.next_batch(torch.device("cpu"))
            total += model(x, y)[1].item()
    return total / hp["eval_iters"]


def test_int8_val_loss_of_the_shipped_model_is_within_0_02_of_fp32(shipped, tmp_path):
    prepare(str(_corpus()), "char", tmp_path / "data")
    data = TokenData.open(tmp_path / "data")
    assert data.tokenizer_spec == shipped.tokenizer.spec(), "the corpus is not the model's"
    hp = shipped.provenance["hyperparameters"]
    fp32 = _trainers_val_loss(shipped.model, data, hp)
    int8 = _trainers_val_loss(shipped.model.quantize_int8(), data, hp)
    # the trainer's own figure for these weights, so this is the trainer's eval, batch for batch
    assert fp32 == pytest.approx(shipped.provenance["val_loss"], abs=2e-3), fp32
    assert int8 <= fp32 + MAX_LOSS_INCREASE, f"int8 val loss {int8:.4f} vs fp32 {fp32:.4f}"


def _agreement(want: list[list[int]], got: list[list[int]]) -> float:
    same = sum(a == b for w, g in zip(want, got, strict=True) for a, b in zip(w, g, strict=True))
    return same / sum(len(w) for w in want)


@pytest.mark.parametrize("prefill_chunk", [8, 32])
def test_int8_greedy_agrees_with_fp32_on_95_percent_of_the_oracle_positions(prefill_chunk):
    """The engine oracle's mixed batch (prompts past the window, staggered arrivals), free
    running: every position of every generation compared, after a first difference too."""
    ck = tiny_checkpoint()
    kw = dict(max_batch_size=4, window_shift=1, prefill_chunk=prefill_chunk,
              max_tokens_per_step=prefill_chunk + 8)
    reqs = [request(f"r{i}", prompt_of(n, i), max_tokens=m, temperature=0.0)
            for i, (n, m) in enumerate(MIX)]
    fp32 = engine(ck, **kw).generate(reqs, arrival_steps=ARRIVALS)
    int8 = engine(ck, quantization="int8", **kw).generate(reqs, arrival_steps=ARRIVALS)
    assert _agreement(fp32, int8) >= MIN_AGREEMENT, list(zip(fp32, int8, strict=True))


def test_int8_picks_fp32s_greedy_token_at_95_percent_of_the_shipped_models_positions(shipped):
    """The shipped char model has near-ties that send free-running greedy text elsewhere after
    one flip, so here each position is compared given the same context: fp32's greedy
    continuations (by the engine, inside the 128-token window), scored by both models."""
    text = _corpus().read_text(encoding="utf-8")
    val = text[int(len(text) * 0.9):]
    prompts = [shipped.tokenizer.encode(val[997 * i: 997 * i + max(n, 1)]) for i, (n, _) in
               enumerate(MIX)]
    fp32 = engine(shipped, max_batch_size=8).generate(
        [request(f"s{i}", p, max_tokens=48, temperature=0.0) for i, p in enumerate(prompts)])
    int8_model = shipped.model.quantize_int8()
    got = []
    with torch.no_grad():
        for prompt, tokens in zip(prompts, fp32, strict=True):
            ids = torch.tensor([prompt + tokens[:-1]])  # (1, T), T <= 128: no crop
            scored = slice(len(prompt) - 1, None)  # the positions that predict ``tokens``
            got.append(int8_model(ids)[0][0, scored].argmax(-1).tolist())
    assert _agreement(fp32, got) >= MIN_AGREEMENT, _agreement(fp32, got)


def test_quantize_int8_is_a_copy_with_only_int8_matrices(shipped):
    before = {k: v.clone() for k, v in shipped.model.state_dict().items()}
    q = shipped.model.quantize_int8()
    linears = [m for m in q.modules() if isinstance(m, torch.nn.Linear)]
    assert linears == [], f"fp32 matrices left in the int8 model: {linears}"
    assert sum(isinstance(m, Int8Linear) for m in q.modules()) == 4 * q.config.n_layer + 1
    assert q.quantization == "int8" and shipped.model.quantization == "none"
    after = shipped.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the source model changed"
    assert not q.prepack_cpu_weights(), "an int8 model has no fp32 matrices to prepack"


def _as_nanogpt(ck, folder: Path) -> Path:
    """The checkpoint as nanoGPT's train.py and prepare.py write it: ckpt.pt + meta.pkl."""
    folder.mkdir()
    cfg = ck.config
    model_args = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                      block_size=cfg.block_size, bias=cfg.bias, vocab_size=cfg.vocab_size,
                      dropout=0.0)
    torch.save({"model": ck.model.state_dict(), "model_args": model_args, "iter_num": 2000},
               folder / "ckpt.pt")
    chars = [ck.tokenizer.decode([i]) for i in range(ck.tokenizer.vocab_size)]
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)),
                     "stoi": {c: i for i, c in enumerate(chars)}}, f)
    return folder / "ckpt.pt"


def test_int8_quantizes_at_load_from_every_checkpoint_format(shipped, tmp_path):
    """The same weights as a gptserve folder, a Hugging Face GPT-2 folder and a nanoGPT ckpt.pt
    give the same int8 model: the same greedy text."""
    paths = {"gptserve": SHIPPED,
             "huggingface": export_huggingface(shipped.model, tmp_path / "hf", shipped.tokenizer),
             "nanogpt": _as_nanogpt(shipped, tmp_path / "nanogpt")}
    params = SamplingParams(max_tokens=32, temperature=0.0)
    texts = {}
    for fmt, path in paths.items():
        llm = LLM(path, quantization="int8", device="cpu", max_batch_size=2)
        assert llm.engine.checkpoint.source_format == fmt
        assert llm.engine._core.runner.model.quantization == "int8"
        texts[fmt] = llm.generate("ROMEO:", params)[0].outputs[0].text
    assert len(set(texts.values())) == 1, texts


def test_int8_in_bfloat16_serves_bfloat16_activations(shipped):
    eng = engine(shipped, quantization="int8", dtype="bfloat16", max_batch_size=2)
    [tokens] = eng.generate([request("b", [1, 2, 3], max_tokens=8, temperature=0.0)])
    assert len(tokens) == 8 and eng.dtype == torch.bfloat16


def test_openai_client_gets_int8_completions_from_a_real_server(shipped):
    """A real server started with int8 answers the real openai client with the text the offline
    ``LLM`` gives with int8 (one request alone: the same batches), and says what it serves."""
    prompt = "ROMEO:"
    offline = LLM(shipped, quantization="int8", device="cpu", max_batch_size=2).generate(
        prompt, SamplingParams(max_tokens=24, temperature=0.0))[0].outputs[0].text
    with live_server(SHIPPED, quantization="int8", model_name="shakespeare-char",
                     engine_core="process") as srv:  # what python -m service runs
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        resp = client.completions.create(model="shakespeare-char", prompt=prompt,
                                         max_tokens=24, temperature=0)
        chat = client.chat.completions.create(
            model="shakespeare-char", max_tokens=8, temperature=0,
            messages=[{"role": "user", "content": "Speak."}])
        card = client.models.list().data[0]
    assert resp.choices[0].text == offline and len(offline) == 24
    assert chat.choices[0].finish_reason == "length"
    assert (card.dtype, card.quantization) == ("float32", "int8"), card


def test_models_says_unquantized_when_serving_plain_weights(tiny_checkpoint):
    with live_server(tiny_checkpoint) as srv:
        card = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused").models.list().data[0]
    assert (card.dtype, card.quantization) == ("float32", None), card


def _serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(  # noqa: PLW1510 - the exit status is the assertion
        [sys.executable, "-m", "service", "--port", "0", *args], cwd=ROOT,
        env=child_env(), capture_output=True, text=True, timeout=90)


def test_a_bad_quantization_flag_fails_in_one_line_naming_the_choices():
    proc = _serve("--quantization", "int4")
    assert proc.returncode == 2, proc.stderr
    assert "argument --quantization: invalid choice: 'int4' (choose from 'none', 'int8')" in (
        proc.stderr), proc.stderr


def test_int8_with_batch_invariance_fails_before_loading_and_says_why():
    proc = _serve("--quantization", "int8", "--batch-invariant", "on")
    assert proc.returncode == 2, proc.stderr
    assert "cannot be batch invariant" in proc.stderr and "one scale" in proc.stderr, proc.stderr


@pytest.mark.parametrize(("knobs", "words"), [
    (dict(quantization="int4"), "must be one of ('none', 'int8'), got 'int4'"),
    (dict(quantization="INT8"), "must be one of ('none', 'int8'), got 'INT8'"),
    (dict(quantization=None), "must be one of ('none', 'int8'), got None"),
    (dict(quantization="int8", batch_invariant=True), "cannot be batch invariant"),
    (dict(quantization="int8", compile=True), "torch.compile (compile=True) is not supported"),
])
def test_engine_config_refuses_impossible_quantizations(knobs, words):
    with pytest.raises(ValueError) as err:
        EngineConfig(**knobs)
    assert words in str(err.value)


def test_int8_on_cuda_is_refused_with_what_to_do_instead():
    """No GPU here to run it on: the check itself, for the device an engine resolved."""
    with pytest.raises(ValueError, match="CPU only .* use --device cpu, or --quantization none"):
        check_quantization("int8", torch.device("cuda"))
    check_quantization("none", torch.device("cuda"))
    check_quantization("int8", torch.device("cpu"))
