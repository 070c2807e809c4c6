"""TextStream: incremental detokenization and stop strings ("text lives at the edges")."""

from __future__ import annotations

import random

import pytest

from model.tokenizer import CharTokenizer, TiktokenTokenizer, TokenizerError
from service.text import TextStream, encode_text

CHARS = CharTokenizer(list("abcdefgh \n"))


def _run(tokenizer, ids, stop=()):
    stream = TextStream(tokenizer, tuple(stop))
    deltas, stopped = [], False
    for token_id in ids:
        delta = stream.push(token_id)
        deltas.append(delta)
        if delta.stopped:
            stopped = True
            break
    if not stopped:
        deltas.append(stream.finish())
    return deltas, stopped


def _expected(text: str, stop) -> tuple[str, bool]:
    """Generation stops at the first character that completes any stop string."""
    for end in range(1, len(text) + 1):
        hits = [i for i in (text[:end].find(s) for s in stop) if i >= 0]
        if hits:
            return text[: min(hits)], True
    return text, False


def test_stop_string_across_token_boundaries_is_never_partly_emitted():
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice("abc") for _ in range(rng.randint(1, 30)))
        stop = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 4))) for _ in range(2)]
        deltas, stopped = _run(CHARS, CHARS.encode(text), stop)
        want, want_stop = _expected(text, stop)
        got = "".join(d.text for d in deltas)
        assert got == want, f"text {text!r} stop {stop}: emitted {got!r}, expected {want!r}"
        assert stopped == want_stop
        emitted = ""
        for d in deltas:  # every prefix emitted so far is a prefix of the final answer
            emitted += d.text
            assert want.startswith(emitted), f"emitted {emitted!r} beyond {want!r}"


def test_held_back_prefix_is_released_when_the_stop_string_does_not_complete():
    stream = TextStream(CHARS, ("abc",))
    assert stream.push(CHARS.encode("a")[0]).text == ""  # might be the start of "abc"
    assert stream.push(CHARS.encode("b")[0]).text == ""
    assert stream.push(CHARS.encode("d")[0]).text == "abd"
    assert stream.finish().text == ""


def test_token_accounting_drops_tokens_that_only_spell_the_stop_string():
    ids = CHARS.encode("abcdef")
    deltas, stopped = _run(CHARS, ids, ["cd"])
    assert stopped
    assert sum(d.num_tokens for d in deltas) == 2, "a and b are released, c/d spell the stop"
    assert sum(d.num_dropped for d in deltas) == 2
    assert [o for d in deltas for o in d.offsets] == [0, 1]


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    return TiktokenTokenizer.by_name("gpt2")


def test_multibyte_characters_split_across_bpe_tokens_come_out_whole(gpt2_tokenizer):
    text = "naïve café — 世界 🎉🎉 ok"
    ids = gpt2_tokenizer.encode(text)
    pieces = [gpt2_tokenizer.token_bytes(i) for i in ids]
    assert any(_invalid_alone(p) for p in pieces), "the test needs a token that splits a char"
    deltas, _ = _run(gpt2_tokenizer, ids)
    assert "".join(d.text for d in deltas) == text
    assert all("\ufffd" not in d.text for d in deltas), "a delta split a UTF-8 character"


def test_stop_string_inside_a_bpe_token_cuts_at_the_exact_character(gpt2_tokenizer):
    text = "Hello world, the quick brown fox"
    ids = gpt2_tokenizer.encode(text)
    deltas, stopped = _run(gpt2_tokenizer, ids, ["ck bro"])
    assert stopped
    assert "".join(d.text for d in deltas) == "Hello world, the qui"


def _invalid_alone(piece: bytes) -> bool:
    try:
        piece.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def _byte_level_bpe() -> TiktokenTokenizer:
    """A byte-level BPE with one token per byte (no merges): built here, needs no ranks file."""
    import tiktoken

    from model.tokenizer import GPT2_PAT_STR

    ranks = {bytes([b]): b for b in range(256)}
    encoding = tiktoken.Encoding(
        name="bytes", pat_str=GPT2_PAT_STR, mergeable_ranks=ranks, special_tokens={}
    )
    return TiktokenTokenizer(encoding, {"type": "tiktoken", "name": "bytes"})


@pytest.mark.parametrize("text", ["\ud800", "ab\udfffcd", "x\ud83d"])
def test_a_lone_surrogate_is_refused_by_every_tokenizer(text):
    bpe = _byte_level_bpe()
    assert bpe.encode(text), "byte-level BPE alone replaces the surrogate silently"
    for tokenizer in (bpe, CharTokenizer(list("abcdx"))):
        with pytest.raises(TokenizerError, match="lone surrogate"):
            encode_text(tokenizer, text)
    assert encode_text(bpe, "héllo 🎉") == bpe.encode("héllo 🎉")


@pytest.mark.parametrize("offsets", [True, False])
def test_the_end_token_ends_a_choice_but_adds_no_text(offsets):
    """A BPE model that samples <|endoftext|> (a JSON value the grammar lets end there, e.g.)
    answered '10<|endoftext|>'; the end token is no part of the text, as in vLLM."""
    bpe = TiktokenTokenizer.by_name("gpt2")
    ids = bpe.encode("10") + [bpe.eot_id]
    stream = TextStream(bpe, (), offsets=offsets)
    text = stream.push_many(ids).text + stream.finish().text
    assert text == "10"
