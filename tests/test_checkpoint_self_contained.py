"""A checkpoint carries what serving it needs: BPE ranks, a meaningful name, an honest HF export.

- A BPE checkpoint holds its ranks file (sha256 in config.json, GPT-2's equal to tiktoken's
  published hash); a real server serves it with no tiktoken cache at all.
- The served model id comes from the checkpoint (provenance name, run folder, folder name);
  ``--model-name`` wins. ``/v1/models`` names the checkpoint without a filesystem path.
- ``export-hf`` drops nanoGPT's padded vocabulary rows, so ``transformers`` never samples an id
  that is not a token.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from conftest import live_server, save_tiny_checkpoint
from deploy_support import ROOT, ServerProcess, child_env

from model import GPT, GPTConfig, TiktokenTokenizer, export_huggingface, load_checkpoint
from model.checkpoint import save_checkpoint
from model.tokenizer import GPT2_EOT_ID, R50K_BASE_SHA256, RANKS_FILE, dump_ranks
from service.settings import Settings

TEXT = "Hello, world! naïve café 你好 🙂\nROMEO: But soft, what light"


@pytest.fixture(scope="module")
def gpt2_bpe():
    return TiktokenTokenizer.by_name("gpt2")


def _bpe_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=256, vocab_size=50304, n_layer=1, n_head=2, n_embd=16)).eval()


def test_a_bpe_checkpoint_holds_its_ranks_with_tiktokens_published_hash(gpt2_bpe, tmp_path):
    path = save_checkpoint(tmp_path / "bpe", _bpe_model(), gpt2_bpe.spec(), {"iterations": 1})
    ranks = (path / RANKS_FILE).read_bytes()
    spec = json.loads((path / "config.json").read_text())["tokenizer"]
    assert spec["ranks_file"] == RANKS_FILE and spec["encoding"] == "r50k_base", spec
    assert hashlib.sha256(ranks).hexdigest() == spec["ranks_sha256"] == R50K_BASE_SHA256
    loaded = load_checkpoint(path)
    assert loaded.tokenizer.spec() == gpt2_bpe.spec(), "the tokenizer's identity changed"
    assert loaded.tokenizer.encode(TEXT) == gpt2_bpe.encode(TEXT)
    assert loaded.tokenizer.eot_id == GPT2_EOT_ID


def test_loading_a_ranks_file_writes_nothing_into_the_tiktoken_cache(gpt2_bpe, tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "bpe", _bpe_model(), gpt2_bpe.spec())
    config = json.loads((path / "config.json").read_text())
    config["tokenizer"] = {"type": "tiktoken", "ranks_file": "hand.tiktoken"}  # a hand-made one
    (path / "config.json").write_text(json.dumps(config))
    (path / "hand.tiktoken").write_bytes(dump_ranks(gpt2_bpe.mergeable_ranks()))
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    assert load_checkpoint(path).tokenizer.encode(TEXT) == gpt2_bpe.encode(TEXT)
    assert not list(cache.iterdir()), "a checkpoint's ranks file was copied into the tiktoken cache"


def test_the_trainers_save_path_writes_the_ranks_file(gpt2_bpe, tmp_path):
    from trainer.checkpointing import Provenance, save_best

    provenance = Provenance("data/bpe", 10, 5.0, 100, {"preset": None})
    save_best(tmp_path / "run", _bpe_model(), {"type": "tiktoken", "encoding": "r50k_base"},
              provenance, "float32")  # fmt: skip
    ranks = tmp_path / "run" / "best" / RANKS_FILE
    assert hashlib.sha256(ranks.read_bytes()).hexdigest() == R50K_BASE_SHA256


@dataclass
class CachelessServer(ServerProcess):
    """``python -m service`` with no tiktoken cache anywhere: TIKTOKEN_CACHE_DIR unset and TMPDIR
    (tiktoken's fallback cache location) an empty folder; the machine has no network."""

    tmpdir: Path | None = None

    def start(self) -> CachelessServer:
        env = {k: v for k, v in child_env().items() if k != "TIKTOKEN_CACHE_DIR"}
        env["TMPDIR"] = str(self.tmpdir)
        argv = [sys.executable, "-m", "service", "--checkpoint", str(self.checkpoint),
                "--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu", *self.args]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT)  # fmt: skip
        return self


@pytest.mark.timeout(180)
def test_a_bpe_checkpoint_serves_with_no_tiktoken_cache_under_its_run_name(
        gpt2_bpe, tmp_path, short_tmp_path):
    best = save_checkpoint(tmp_path / "shakespeare-bpe" / "best", _bpe_model(), gpt2_bpe.spec(),
                           {"iterations": 3})  # fmt: skip
    empty = short_tmp_path  # short: the engine core's sockets go there
    server = CachelessServer(best, tmp_path / "server.log", tmpdir=empty)
    server.start()
    try:
        server.wait_ready()
        models = httpx.get(f"{server.url}/v1/models", timeout=10).json()
        assert models["data"][0]["id"] == "shakespeare-bpe", models
        ids = httpx.post(f"{server.url}/tokenize", json={"prompt": TEXT}, timeout=10).json()
        assert ids["tokens"] == gpt2_bpe.encode(TEXT), ids
        done = httpx.post(f"{server.url}/v1/completions", timeout=60,
                          json={"model": "shakespeare-bpe", "prompt": TEXT, "max_tokens": 8})
        assert done.status_code == 200, done.text
        # tiktoken's fallback cache is TMPDIR/data-gym-cache; the server's own private folder
        # (the engine core's sockets, gptserve-core-*) may be there
        written = [p.name for p in empty.iterdir()
                   if not p.name.startswith("gptserve-core-")]
        assert not written, f"tiktoken wrote a cache after all: {written}"
    finally:
        server.stop()
    hf = export_huggingface(load_checkpoint(best).model, tmp_path / "hf", tokenizer=gpt2_bpe)
    env = {k: v for k, v in child_env(TMPDIR=str(empty)).items()
           if k != "TIKTOKEN_CACHE_DIR"}  # fmt: skip
    code = ("import sys; from model.checkpoint import load_checkpoint; "
            "t = load_checkpoint(sys.argv[1]).tokenizer; print(t.spec(), t.encode(sys.argv[2]))")
    out = subprocess.run([sys.executable, "-c", code, str(hf), TEXT], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == f"{gpt2_bpe.spec()} {gpt2_bpe.encode(TEXT)}", out.stdout


def _name(path: Path, **settings) -> str:
    return Settings(checkpoint=path, **settings).served_model_name


def test_the_served_model_id_comes_from_the_checkpoint_and_model_name_wins(tmp_path):
    run = save_tiny_checkpoint(tmp_path / "mine" / "best")
    assert _name(run) == "mine", "a run's best/ is served under the run's name"
    latest = save_tiny_checkpoint(tmp_path / "mine" / "latest")
    assert _name(latest) == "mine"
    plain = save_tiny_checkpoint(tmp_path / "tiny-char")
    assert _name(plain) == "tiny-char"
    assert _name(plain, model_name="chosen") == "chosen"
    named = save_tiny_checkpoint(tmp_path / "other" / "best")
    config = json.loads((named / "config.json").read_text())
    config["provenance"]["name"] = "shakespeare-v2"
    (named / "config.json").write_text(json.dumps(config))
    assert _name(named) == "shakespeare-v2", "the provenance name comes first"
    assert _name(named, model_name="chosen") == "chosen"
    (tmp_path / "out-nanogpt").mkdir()
    assert _name(tmp_path / "out-nanogpt" / "ckpt.pt") == "out-nanogpt"


@pytest.mark.timeout(60)
def test_v1_models_names_the_checkpoint_without_a_filesystem_path(tmp_path):
    best = save_tiny_checkpoint(tmp_path / "run" / "best")
    config = json.loads((best / "config.json").read_text())
    config["provenance"].update(iterations=5, dataset=str(tmp_path / "data" / "corpus"))
    (best / "config.json").write_text(json.dumps(config))
    with live_server(best, model_name=None) as server:
        text = httpx.get(f"{server.url}/v1/models", timeout=10).text
    card = json.loads(text)["data"][0]
    assert str(tmp_path) not in text, f"/v1/models shows a filesystem path: {text}"
    assert card["id"] == "run" and card["checkpoint"]["checkpoint"] == "run/best", card
    assert card["checkpoint"]["provenance"]["dataset"] == "corpus", card
    assert card["checkpoint"]["iteration"] == 5


def test_export_hf_drops_padded_rows_so_transformers_samples_only_real_tokens(gpt2_bpe, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = _bpe_model()
    with torch.no_grad():  # make nanoGPT's 47 padded rows the most likely "tokens" by far
        wte = model.transformer.wte.weight
        wte[50257:] = 100.0 * wte[:47]
    out = export_huggingface(model, tmp_path / "hf", tokenizer=gpt2_bpe)
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 50257, config["vocab_size"]
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    prompt = torch.tensor([gpt2_bpe.encode("ROMEO:")])
    with torch.no_grad():
        greedy = hf.generate(prompt, max_new_tokens=64, do_sample=False, pad_token_id=0,
                             eos_token_id=None, attention_mask=torch.ones_like(prompt))
        torch.manual_seed(0)
        sampled = hf.generate(prompt, max_new_tokens=128, do_sample=True, top_k=0, top_p=1.0,
                              pad_token_id=0, eos_token_id=None,
                              attention_mask=torch.ones_like(prompt))  # fmt: skip
    for name, ids in (("greedy", greedy), ("sampled", sampled)):
        bad = [i for i in ids[0].tolist() if i >= 50257]
        assert not bad, f"transformers {name} generation produced non-token ids {bad[:5]}"
    logits = hf(prompt).logits[0, -1]
    ours = model(prompt)[0][0, -1, :50257]
    assert torch.allclose(logits, ours, atol=1e-4), "the kept rows must be the same weights"
