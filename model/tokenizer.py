"""Tokenizers behind one small interface: character-level and tiktoken BPE.

A tokenizer is described by a JSON-able *spec* stored in the checkpoint's ``config.json``:
``{"type": "char", "chars": [...]}`` (the vocabulary in id order, as nanoGPT's ``meta.pkl`` holds
it) or ``{"type": "tiktoken", "encoding": "r50k_base"}`` or, with BPE ranks shipped in the
checkpoint folder, ``{"type": "tiktoken", "ranks_file": "tokenizer.tiktoken"}``.
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

# GPT-2's pre-tokenisation regex and its one special token (r50k_base, identical to "gpt2").
GPT2_PAT_STR = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
GPT2_EOT = "<|endoftext|>"
GPT2_EOT_ID = 50256
_ENCODING_ALIASES = {"gpt2": "r50k_base", "r50k_base": "r50k_base"}


class TokenizerError(ValueError):
    """Text or ids that this tokenizer cannot represent."""


@runtime_checkable
class Tokenizer(Protocol):
    """What every tokenizer offers."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def eot_id(self) -> int | None: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def token_bytes(self, token_id: int) -> bytes: ...

    def spec(self) -> dict[str, Any]: ...


class CharTokenizer:
    """One token per Unicode character; the vocabulary lives in the checkpoint (nanoGPT)."""

    def __init__(self, chars: list[str]) -> None:
        if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise TokenizerError("a char vocabulary must be distinct single characters")
        self.chars = list(chars)
        self._stoi = {c: i for i, c in enumerate(self.chars)}
        self._bytes = [c.encode("utf-8") for c in self.chars]

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @property
    def eot_id(self) -> int | None:
        return None

    def encode(self, text: str) -> list[int]:
        try:
            return [self._stoi[c] for c in text]
        except KeyError as err:
            raise TokenizerError(
                f"character {err.args[0]!r} is not in this model's {self.vocab_size}-character "
                "vocabulary"
            ) from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[self._check(i)] for i in ids)

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[self._check(token_id)]

    def _check(self, token_id: int) -> int:
        if not 0 <= token_id < len(self.chars):
            raise TokenizerError(f"token id {token_id} is outside the vocabulary [0, {len(self.chars)})")
        return token_id

    def spec(self) -> dict[str, Any]:
        return {"type": "char", "chars": self.chars}


class TiktokenTokenizer:
    """Byte-level BPE through tiktoken (GPT-2's ``r50k_base`` by name, or ranks from a file)."""

    def __init__(self, encoding, spec: dict[str, Any]) -> None:
        self._enc = encoding
        self._spec = spec

    @classmethod
    def by_name(cls, name: str) -> TiktokenTokenizer:
        import tiktoken

        if name not in _ENCODING_ALIASES:
            raise TokenizerError(f"unknown tiktoken encoding {name!r}; known: gpt2, r50k_base")
        canonical = _ENCODING_ALIASES[name]
        try:
            encoding = tiktoken.get_encoding(canonical)
        except Exception as err:  # tiktoken downloads the ranks on first use; offline that fails
            raise TokenizerError(
                f"cannot load the {canonical} BPE ranks ({type(err).__name__}); with no network, "
                "point TIKTOKEN_CACHE_DIR at a tiktoken cache that holds them"
            ) from None
        return cls(encoding, {"type": "tiktoken", "encoding": canonical})

    @classmethod
    def from_ranks_file(cls, path: Path, spec: dict[str, Any]) -> TiktokenTokenizer:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        if not path.is_file():
            raise TokenizerError(f"{path}: BPE ranks file not found")
        ranks = load_tiktoken_bpe(str(path))
        special = spec.get("special_tokens", {GPT2_EOT: len(ranks)})
        enc = tiktoken.Encoding(
            name=spec.get("name", path.stem),
            pat_str=spec.get("pat_str", GPT2_PAT_STR),
            mergeable_ranks=ranks,
            special_tokens=special,
        )
        return cls(enc, spec)

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    @property
    def eot_id(self) -> int | None:
        return self._enc.eot_token

    def encode(self, text: str) -> list[int]:
        # <|endoftext|> in user text is encoded as plain text, never as the special token.
        return self._enc.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < self._enc.n_vocab:
            raise TokenizerError(
                f"token id {token_id} is outside the vocabulary [0, {self._enc.n_vocab})"
            )
        try:
            return self._enc.decode_single_token_bytes(token_id)
        except KeyError:
            raise TokenizerError(f"token id {token_id} has no bytes in this vocabulary") from None

    def spec(self) -> dict[str, Any]:
        return dict(self._spec)

    def mergeable_ranks(self) -> dict[bytes, int]:
        """The BPE ranks (token bytes -> id), without special tokens."""
        return dict(self._enc._mergeable_ranks)


def tokenizer_from_spec(spec: dict[str, Any], folder: Path | None = None) -> Tokenizer:
    """Build the tokenizer a checkpoint's spec describes (``folder`` holds any ranks file)."""
    kind = spec.get("type")
    if kind == "char":
        return CharTokenizer(spec["chars"])
    if kind == "tiktoken":
        if "ranks_file" in spec:
            if folder is None:
                raise TokenizerError("a tokenizer with a ranks_file needs its checkpoint folder")
            return TiktokenTokenizer.from_ranks_file(folder / spec["ranks_file"], spec)
        return TiktokenTokenizer.by_name(spec.get("encoding", "r50k_base"))
    raise TokenizerError(f"unknown tokenizer type {kind!r} (expected 'char' or 'tiktoken')")


class IncrementalDecoder:
    """Turns a stream of token ids into text without ever splitting a UTF-8 character.

    Bytes of an incomplete multi-byte character are held back until the token that completes it
    arrives; ``flush()`` releases whatever remains (invalid bytes become U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
