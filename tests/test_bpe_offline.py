"""GPT-2's BPE ranks ship with the package: the BPE path (prepare, train, serve a Hugging Face
folder that carries no tokenizer) works with no tiktoken cache and no network."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from deploy_support import ServerProcess
from trainer_support import REPO, TINY, child_env, write_corpus

from model.tokenizer import R50K_BASE_SHA256, SHIPPED_RANKS, TiktokenTokenizer

TEXT = "Hello, world! naïve café 🙂\nROMEO: <|endoftext|>"


def test_the_shipped_ranks_are_gpt2s_by_tiktokens_published_hash_and_mit_licensed():
    assert hashlib.sha256(SHIPPED_RANKS.read_bytes()).hexdigest() == R50K_BASE_SHA256
    assert "MIT License" in (SHIPPED_RANKS.parent / "LICENSE").read_text()
    bpe = TiktokenTokenizer.by_name("gpt2")
    assert bpe.spec() == {"type": "tiktoken", "encoding": "r50k_base"}
    assert (bpe.vocab_size, bpe.eot_id) == (50257, 50256)
    assert bpe.encode("Hello world") == [15496, 995]  # GPT-2's ids, as every GPT-2 port has them


def _offline_env(tmpdir: Path) -> dict[str, str]:
    """No tiktoken cache (TIKTOKEN_CACHE_DIR unset, TMPDIR the empty folder ``tmpdir``) and no
    network (every proxy a closed port)."""
    cache_vars = ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR")
    env = {k: v for k, v in child_env().items() if k not in cache_vars}
    dead = "http://127.0.0.1:9"
    env.update(TMPDIR=str(tmpdir), HTTP_PROXY=dead, HTTPS_PROXY=dead,
               http_proxy=dead, https_proxy=dead, NO_PROXY="", no_proxy="")  # fmt: skip
    return env


@dataclass
class OfflineServer(ServerProcess):
    """``python -m service`` in ``env``."""

    env: dict[str, str] = field(default_factory=dict)

    def start(self) -> OfflineServer:
        argv = [sys.executable, "-m", "service", "--checkpoint", str(self.checkpoint),
                "--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu"]  # fmt: skip
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(argv, cwd=REPO, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT)  # fmt: skip
        return self


def _run(env, *args: str) -> None:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=240, check=False)  # fmt: skip
    assert proc.returncode == 0, f"{args[:3]}: {proc.stderr[-3000:]}"


@pytest.mark.timeout(400)
def test_prepare_train_and_serve_a_tokenizerless_hf_folder_with_no_cache_and_no_network(
        tmp_path, short_tmp_path):
    env = _offline_env(short_tmp_path)  # short: the engine core's sockets go there
    corpus = write_corpus(tmp_path)
    data, run, hf = tmp_path / "data", tmp_path / "run", tmp_path / "hf"
    _run(env, "-m", "trainer", "prepare", "--input", str(corpus), "--tokenizer", "r50k_base",
         "--out", str(data))  # fmt: skip
    _run(env, "-m", "trainer", "train", "--data", str(data), "--out", str(run), *TINY,
         "--max-iters", "2", "--eval-interval", "2")  # fmt: skip
    _run(env, "-m", "trainer", "export-hf", "--checkpoint", str(run / "best"), "--out", str(hf))
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                 "special_tokens_map.json"):  # fmt: skip
        (hf / name).unlink(missing_ok=True)
    server = OfflineServer(hf, tmp_path / "server.log", env=env)
    server.start()
    try:
        server.wait_ready(120)
        ids = httpx.post(f"{server.url}/tokenize", json={"prompt": "Hello world"}, timeout=10)
        assert ids.json()["tokens"] == [15496, 995], ids.text
        done = httpx.post(f"{server.url}/v1/completions", timeout=60,
                          json={"prompt": TEXT, "max_tokens": 4})  # fmt: skip
        assert done.status_code == 200, done.text
    finally:
        server.stop()
    assert not (short_tmp_path / "data-gym-cache").exists(), "tiktoken made a cache after all"
