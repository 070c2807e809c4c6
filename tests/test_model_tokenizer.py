"""Tokenizers round-trip text, and incremental decoding never splits a UTF-8 character."""

from __future__ import annotations

import shutil

import pytest

from model import (
    CharTokenizer,
    IncrementalDecoder,
    TiktokenTokenizer,
    TokenizerError,
    tokenizer_from_spec,
)
from model.tokenizer import SHIPPED_RANKS

MIXED = "Hello, world! 你好，世界 🙂🚀 naïve café — ünïcödé\nnew line"


@pytest.fixture(scope="module")
def bpe():
    return TiktokenTokenizer.by_name("gpt2")


def _stream(tokenizer, ids):
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    return pieces


def test_char_round_trip_and_incremental_decode():
    tok = CharTokenizer.from_text(MIXED)
    ids = tok.encode(MIXED)
    assert tok.decode(ids) == MIXED
    assert "".join(_stream(tok, ids)) == MIXED
    assert tokenizer_from_spec(tok.spec()).encode(MIXED) == ids


def test_char_tokenizer_names_the_unknown_character():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(TokenizerError, match=r"character 'z' is not in this model's 3-character"):
        tok.encode("abz")
    with pytest.raises(TokenizerError, match=r"token id 3 is outside the vocabulary \[0, 3\)"):
        tok.decode([3])


def test_bpe_round_trip_emoji_and_cjk(bpe):
    ids = bpe.encode(MIXED)
    assert bpe.decode(ids) == MIXED
    assert bpe.vocab_size == 50257 and bpe.eot_id == 50256
    assert bpe.encode("Hello world") == [15496, 995]  # GPT-2's well-known ids


def test_bpe_incremental_decoder_never_emits_partial_characters(bpe):
    ids = bpe.encode(MIXED)
    # An emoji is several byte-level tokens: the stream must hold bytes back, not emit U+FFFD.
    assert any(bpe.token_bytes(i).decode("utf-8", errors="ignore") != bpe.token_bytes(i).decode(
        "utf-8", errors="replace") for i in ids), "test text should contain split characters"
    pieces = _stream(bpe, ids)
    assert "".join(pieces) == MIXED
    assert all("\ufffd" not in p for p in pieces), f"partial character emitted: {pieces}"


def test_bpe_token_bytes_stay_tiktokens_on_every_call_and_bad_ids_still_raise():
    bpe = TiktokenTokenizer.by_name("gpt2")  # its own: token_bytes keeps what it answered
    ids = [0, 262, 50256, 262, 0]
    first, again = [bpe.token_bytes(i) for i in ids], [bpe.token_bytes(i) for i in ids]
    expected = [bpe._enc.decode_single_token_bytes(i) for i in ids]
    assert first == again == expected, "a repeated token_bytes call changed its answer"
    for bad in (50257, -1, 50257):  # twice: a refusal is never remembered as an answer
        with pytest.raises(TokenizerError, match=rf"token id {bad} is outside the vocabulary"):
            bpe.token_bytes(bad)


def test_bpe_special_token_text_is_plain_text(bpe):
    assert 50256 not in bpe.encode("<|endoftext|>")


def test_bpe_ranks_file_in_checkpoint_folder(bpe, tmp_path):
    shutil.copy(SHIPPED_RANKS, tmp_path / "tokenizer.tiktoken")
    tok = tokenizer_from_spec({"type": "tiktoken", "ranks_file": "tokenizer.tiktoken"}, tmp_path)
    assert tok.encode(MIXED) == bpe.encode(MIXED)
    assert tok.eot_id == 50256


def test_unknown_tokenizer_spec_is_rejected():
    with pytest.raises(TokenizerError, match="unknown tokenizer type 'sentencepiece'"):
        tokenizer_from_spec({"type": "sentencepiece"})
