"""An exported folder carries tokenizer files that transformers reads to the same token ids."""

from __future__ import annotations

import os

import pytest
import torch

from model import (
    GPT,
    CharTokenizer,
    GPTConfig,
    TiktokenTokenizer,
    export_huggingface,
    load_checkpoint,
)

transformers = pytest.importorskip("transformers")

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak."
MIXED = "Hello, world! 你好，世界 🙂🚀 naïve café —  two  spaces\n\ttab 'll've"  # HF parses <|endoftext|> in text as special; we do not


def _tiny(vocab: int) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=vocab, n_layer=1, n_head=2, n_embd=16)).eval()


def test_char_tokenizer_export_round_trips_in_transformers(tmp_path):
    tok = CharTokenizer.from_text(TEXT)
    export_huggingface(_tiny(tok.vocab_size), tmp_path / "hf", tokenizer=tok)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = hf.encode(TEXT, add_special_tokens=False)
    assert ids == tok.encode(TEXT), "transformers tokenizes the char vocabulary differently"
    assert hf.decode(ids) == TEXT
    again = load_checkpoint(tmp_path / "hf")  # and our own loader reads the vocabulary back
    assert isinstance(again.tokenizer, CharTokenizer) and again.tokenizer.chars == tok.chars


def test_bpe_export_matches_tiktoken_in_transformers(tmp_path):
    tok = TiktokenTokenizer.by_name("gpt2")
    export_huggingface(_tiny(50304), tmp_path / "hf", tokenizer=tok)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    corpus = os.environ.get("GPTSERVE_TEST_CORPUS")
    text = MIXED + (open(corpus, encoding="utf-8").read()[:20_000] if corpus else TEXT)
    ours = tok.encode(text)
    theirs = hf.encode(text, add_special_tokens=False)
    assert theirs == ours, "exported GPT-2 BPE files tokenize differently from tiktoken"
    assert hf.decode(ours) == text
    assert hf.eos_token_id == 50256
    config = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    assert config.eos_token_id == 50256
