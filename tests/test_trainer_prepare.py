"""``python -m trainer prepare``: token files, split and tokenizer spec."""

from __future__ import annotations

import json

import numpy as np
import pytest
from trainer_support import write_corpus

from model.tokenizer import tokenizer_from_spec
from trainer.cli import main
from trainer.data import TokenData


def test_prepare_char_writes_uint16_90_10_split_that_decodes_back(tmp_path):
    corpus = write_corpus(tmp_path)
    text = corpus.read_text(encoding="utf-8")
    assert (
        main(
            [
                "prepare",
                "--input",
                str(corpus),
                "--tokenizer",
                "char",
                "--out",
                str(tmp_path / "data"),
            ]
        )
        == 0
    )
    spec = json.loads((tmp_path / "data" / "tokenizer.json").read_text())
    tok = tokenizer_from_spec(spec)
    assert spec["type"] == "char" and tok.vocab_size == len(set(text))
    train = np.fromfile(tmp_path / "data" / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "data" / "val.bin", dtype=np.uint16)
    split = int(len(text) * 0.9)
    assert tok.decode(train.tolist()) == text[:split], "train.bin must hold the first 90%"
    assert tok.decode(val.tolist()) == text[split:], "val.bin must hold the last 10%"
    data = TokenData.open(tmp_path / "data")
    assert data.vocab_size == tok.vocab_size and len(data.splits["val"]) == len(val)


def test_prepare_r50k_base_round_trips_through_tiktoken(tmp_path, monkeypatch):
    pytest.importorskip("tiktoken")
    corpus = write_corpus(tmp_path, "Hello world, this is GPT-2's tokenizer.\n" * 50)
    assert (
        main(
            [
                "prepare",
                "--input",
                str(corpus),
                "--tokenizer",
                "r50k_base",
                "--out",
                str(tmp_path / "bpe"),
            ]
        )
        == 0
    )
    data = TokenData.open(tmp_path / "bpe")
    assert data.tokenizer_spec == {"type": "tiktoken", "encoding": "r50k_base"}
    assert data.vocab_size == 50257
    tok = tokenizer_from_spec(data.tokenizer_spec)
    joined = tok.decode(data.splits["train"].tolist()) + tok.decode(data.splits["val"].tolist())
    assert joined == corpus.read_text(), "the two splits must decode back to the corpus"


def test_prepare_replaces_an_existing_data_folder_whole(tmp_path):
    first = write_corpus(tmp_path, "abc" * 1000)
    out = tmp_path / "data"
    assert main(["prepare", "--input", str(first), "--out", str(out)]) == 0
    second = write_corpus(tmp_path, "xyz!" * 1000)
    assert main(["prepare", "--input", str(second), "--out", str(out)]) == 0
    assert TokenData.open(out).tokenizer_spec["chars"] == ["!", "x", "y", "z"]
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "train.bin", "val.bin"]
