"""Tokenizers behind one small interface: character-level and tiktoken BPE.

A tokenizer is described by a JSON-able *spec* stored in the checkpoint's ``config.json``:
- ``{"type": "char", "chars": [...]}``: the vocabulary in id order, as nanoGPT's ``meta.pkl``;
- ``{"type": "tiktoken", "encoding": "r50k_base"}``: GPT-2's BPE by name (its ranks ship in
  ``model/bpe/``, so it needs no tiktoken cache and no network);
- ``{"type": "tiktoken", "ranks_file": "tokenizer.tiktoken", "ranks_sha256": "..."}`` (optionally
  with ``"encoding"``, ``"special_tokens"``, ``"pat_str"``): BPE ranks shipped in the checkpoint
  folder, so it needs no tiktoken cache. ``save_checkpoint`` writes this form for every BPE model.

``Tokenizer.spec()`` is the tokenizer's *identity* (equal specs encode alike): the storage fields
(``ranks_file``, ``ranks_sha256`` of GPT-2's own ranks) are not part of it.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import hashlib
import re
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

# GPT-2's pre-tokenisation regex and its one special token (r50k_base, identical to "gpt2").
GPT2_PAT_STR = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
GPT2_EOT = "<|endoftext|>"
GPT2_EOT_ID = 50256
# sha256 of r50k_base.tiktoken as tiktoken publishes it (tiktoken_ext/openai_public.py,
# ``expected_hash``); ``dump_ranks`` writes GPT-2's ranks byte for byte as that file.
R50K_BASE_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
RANKS_FILE = "tokenizer.tiktoken"
# GPT-2's ranks, shipped with the package (MIT, model/bpe/LICENSE): checked against the hash above
SHIPPED_RANKS = Path(__file__).resolve().parent / "bpe" / "r50k_base.tiktoken"
_ENCODING_ALIASES = {"gpt2": "r50k_base", "r50k_base": "r50k_base"}
_SPEC_KEYS = {
    "char": {"type", "chars"},
    "tiktoken": {"type", "encoding", "ranks_file", "ranks_sha256", "special_tokens", "pat_str",
                 "name"},
}
_RANKS_LIMIT = 64 * 1024 * 1024


class TokenizerError(ValueError):
    """Text or ids that this tokenizer cannot represent, or a spec that describes no tokenizer."""


class FileSource(Protocol):
    """Reads one file of a checkpoint folder by plain name (``model.checkpoint.files``)."""

    def read(self, name: str, limit: int = ...) -> bytes: ...


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
        if any(not isinstance(c, str) or len(c) != 1 or "\ud800" <= c <= "\udfff" for c in chars):
            raise TokenizerError(
                "a char vocabulary must be a list of single characters (no lone surrogates)"
            )
        if len(set(chars)) != len(chars):
            raise TokenizerError("a char vocabulary must hold distinct characters")
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
        # token_bytes' answers so far: the server detokenizes every streamed token through it,
        # and a dict lookup is cheaper than the checked call (IncrementalDecoder.push_many: 0.29
        # us a token instead of 0.47 here); a few MB at most
        self._bytes: dict[int, bytes] = {}

    @classmethod
    def by_name(cls, name: str) -> TiktokenTokenizer:
        """GPT-2's BPE (``gpt2`` or ``r50k_base``) from the ranks shipped in ``model/bpe/``."""
        if name not in _ENCODING_ALIASES:
            raise TokenizerError(f"unknown tiktoken encoding {name!r}; known: gpt2, r50k_base")
        try:
            data = SHIPPED_RANKS.read_bytes()
        except OSError as err:
            raise TokenizerError(f"cannot read GPT-2's BPE ranks ({err.strerror})") from None
        if hashlib.sha256(data).hexdigest() != R50K_BASE_SHA256:
            raise TokenizerError(f"{SHIPPED_RANKS} is not GPT-2's BPE ranks (sha256 differs)")
        return cls.from_ranks(parse_ranks(data, "GPT-2's BPE ranks"), name="r50k_base")

    @classmethod
    def from_ranks(
        cls,
        ranks: dict[bytes, int],
        *,
        special_tokens: dict[str, int] | None = None,
        pat_str: str = GPT2_PAT_STR,
        name: str = "bpe",
    ) -> TiktokenTokenizer:
        """BPE over ``ranks`` (GPT-2's regex, ``<|endoftext|>`` after the last rank, by default).
        Its spec is ``r50k_base`` when the ranks are GPT-2's, else their sha256."""
        import tiktoken

        if special_tokens is None:
            special_tokens = {GPT2_EOT: max(ranks.values()) + 1}
        taken = set(ranks.values())
        if any(i in taken for i in special_tokens.values()):
            raise TokenizerError("a special token's id is also a BPE rank")
        try:
            encoding = tiktoken.Encoding(
                name=name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=special_tokens
            )
        except Exception as err:  # tiktoken's regex compiler and BPE core raise their own types
            raise TokenizerError(f"tiktoken refused the BPE ranks ({type(err).__name__})") from None
        sha = hashlib.sha256(dump_ranks(ranks)).hexdigest()
        gpt2 = sha == R50K_BASE_SHA256 and pat_str == GPT2_PAT_STR and special_tokens == {
            GPT2_EOT: GPT2_EOT_ID
        }
        spec: dict[str, Any] = {"type": "tiktoken"}
        if gpt2:
            spec["encoding"] = "r50k_base"
        else:
            spec["ranks_sha256"] = sha
            spec["special_tokens"] = dict(special_tokens)
            if pat_str != GPT2_PAT_STR:
                spec["pat_str"] = pat_str
        return cls(encoding, spec)

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
        known = self._bytes.get(token_id)
        if known is not None:
            return known
        if not 0 <= token_id < self._enc.n_vocab:
            raise TokenizerError(
                f"token id {token_id} is outside the vocabulary [0, {self._enc.n_vocab})"
            )
        try:
            raw = self._enc.decode_single_token_bytes(token_id)
        except KeyError:
            raise TokenizerError(f"token id {token_id} has no bytes in this vocabulary") from None
        self._bytes[token_id] = raw
        return raw

    def spec(self) -> dict[str, Any]:
        return dict(self._spec)

    def mergeable_ranks(self) -> dict[bytes, int]:
        """The BPE ranks (token bytes -> id), without special tokens."""
        return dict(self._enc._mergeable_ranks)

    def stored_spec(self) -> tuple[dict[str, Any], bytes]:
        """What a checkpoint stores: its spec naming ``RANKS_FILE``, and that file's bytes."""
        data = dump_ranks(self.mergeable_ranks())
        spec = {k: v for k, v in self._spec.items() if k != "ranks_sha256"}
        spec.update(ranks_file=RANKS_FILE, ranks_sha256=hashlib.sha256(data).hexdigest())
        if "encoding" not in spec:
            spec["special_tokens"] = dict(self._enc._special_tokens)
            if self._enc._pat_str != GPT2_PAT_STR:
                spec["pat_str"] = self._enc._pat_str
        return spec, data


def dump_ranks(ranks: dict[bytes, int]) -> bytes:
    """tiktoken's ``.tiktoken`` format: ``base64(token) rank`` per line, in rank order."""
    ordered = sorted(ranks.items(), key=lambda item: item[1])
    return b"".join(base64.b64encode(token) + b" %d\n" % rank for token, rank in ordered)


def parse_ranks(data: bytes, where: str) -> dict[bytes, int]:
    """Parse a ``.tiktoken`` ranks file; errors name the line, never its contents."""
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (ValueError, binascii.Error):
            raise TokenizerError(
                f"{where}: line {lineno} is not '<base64 token> <rank>' (not a BPE ranks file)"
            ) from None
        if not token or rank < 0 or token in ranks:
            raise TokenizerError(f"{where}: line {lineno} repeats a token or has a bad rank")
        ranks[token] = rank
    if not ranks:
        raise TokenizerError(f"{where}: holds no BPE ranks")
    if len(set(ranks.values())) != len(ranks):
        raise TokenizerError(f"{where}: two tokens share a rank")
    return ranks


def tokenizer_from_spec(spec: object, files: FileSource | Path | None = None) -> Tokenizer:
    """Build the tokenizer a checkpoint's spec describes (``files`` reads its ranks file)."""
    spec = validate_spec(spec)
    if spec["type"] == "char":
        return CharTokenizer(spec["chars"])
    if "ranks_file" not in spec:
        return TiktokenTokenizer.by_name(spec["encoding"])
    if files is None:
        raise TokenizerError("a tokenizer with a ranks_file needs its checkpoint folder")
    name = spec["ranks_file"]
    if isinstance(files, Path):  # a plain folder (the trainer's data folder): read it safely
        from model.checkpoint.files import CheckpointFiles

        with CheckpointFiles(files) as folder:
            data = folder.read(name, _RANKS_LIMIT)
    else:
        data = files.read(name, _RANKS_LIMIT)
    expected = spec.get("ranks_sha256")
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise TokenizerError(
            f"{name}: its sha256 differs from tokenizer.ranks_sha256 in config.json (the ranks "
            "file was changed or corrupted)"
        )
    tokenizer = TiktokenTokenizer.from_ranks(
        parse_ranks(data, name),
        special_tokens=spec.get("special_tokens"),
        pat_str=spec.get("pat_str", GPT2_PAT_STR),
        name=spec.get("name", "bpe"),
    )
    claimed = spec.get("encoding")
    if claimed is not None and tokenizer.spec().get("encoding") != _ENCODING_ALIASES[claimed]:
        raise TokenizerError(
            f"{name}: tokenizer.encoding says {claimed} but these ranks (with these special "
            f"tokens) are not tiktoken's published {_ENCODING_ALIASES[claimed]}"
        )
    return tokenizer


def validate_spec(spec: object) -> dict[str, Any]:
    """Check a spec's shape and types (before reading any file); returns it."""
    if not isinstance(spec, dict):
        raise TokenizerError(f"the tokenizer spec must be a JSON object, got {type(spec).__name__}")
    kind = spec.get("type")
    if kind not in _SPEC_KEYS:
        raise TokenizerError(f"unknown tokenizer type {kind!r} (expected 'char' or 'tiktoken')")
    unknown = sorted(str(k) for k in set(spec) - _SPEC_KEYS[kind])
    if unknown:
        raise TokenizerError(f"unknown keys in the {kind} tokenizer spec: {', '.join(unknown)}")
    if kind == "char":
        if not isinstance(spec.get("chars"), list):
            raise TokenizerError("tokenizer.chars must be a list of single characters")
        return spec
    _check_type(spec, "encoding", str)
    if "encoding" in spec and spec["encoding"] not in _ENCODING_ALIASES:
        raise TokenizerError(
            f"unknown tiktoken encoding {spec['encoding']!r}; known: gpt2, r50k_base"
        )
    if "encoding" not in spec and "ranks_file" not in spec:
        raise TokenizerError("a tiktoken spec needs an 'encoding' or a 'ranks_file'")
    for key in ("ranks_file", "ranks_sha256", "pat_str", "name"):
        _check_type(spec, key, str)
    name = spec.get("ranks_file")
    if name is not None and (name in ("", ".", "..") or re.search(r"[/\\\0]", name)):
        raise TokenizerError(
            f"tokenizer.ranks_file {name!r} must name a file inside the checkpoint folder (a "
            "plain file name: no '/', no '..')"
        )
    sha = spec.get("ranks_sha256")
    if sha is not None and not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise TokenizerError("tokenizer.ranks_sha256 must be 64 lowercase hex digits")
    special = spec.get("special_tokens")
    if special is not None and (
        not isinstance(special, dict)
        or any(not k or not isinstance(v, int) or isinstance(v, bool) or v < 0
               for k, v in special.items())
    ):
        raise TokenizerError("tokenizer.special_tokens must map token text to ids >= 0")
    return spec


def _check_type(spec: dict[str, Any], key: str, kind: type) -> None:
    if key in spec and not isinstance(spec[key], kind):
        raise TokenizerError(f"tokenizer.{key} must be a {kind.__name__}, got {spec[key]!r:.40}")


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

    def push_many(self, token_ids: list[int]) -> str:
        """The text of several tokens at once (one decode call, not one per token)."""
        token_bytes = self._tokenizer.token_bytes
        return self._utf8.decode(b"".join([token_bytes(t) for t in token_ids]))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
