"""Tokenizer files for an exported Hugging Face folder, so transformers and vLLM need no other.

- BPE (tiktoken ranks, GPT-2's byte-level scheme): ``vocab.json`` + ``merges.txt``, the files
  ``GPT2Tokenizer`` reads. tiktoken stores only ranks; the merge that made each token is recovered
  by running byte-level BPE on the token's bytes with every lower rank (a token of rank r is the
  merge of exactly two parts that lower ranks produce).
- Character vocabularies: a ``tokenizer.json`` for ``PreTrainedTokenizerFast``: a word-level
  model over single characters, a pre-tokenizer that isolates every character, a fusing decoder.

``read_hf_tokenizer`` reads both back (and the BPE ``tokenizer.json`` of Hugging Face's own GPT-2
folders) as tiktoken ranks, so a GPT-2 folder with its tokenizer files needs no tiktoken cache.
"""

from __future__ import annotations

import json
from pathlib import Path

from model.checkpoint.files import CheckpointError, CheckpointFiles
from model.tokenizer import GPT2_EOT, CharTokenizer, TiktokenTokenizer, Tokenizer, TokenizerError


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from each byte to a printable unicode character."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def _split_by_lower_ranks(token: bytes, ranks: dict[bytes, int], limit: int) -> list[bytes]:
    """Byte-level BPE of ``token`` using only merges whose rank is below ``limit``."""
    parts = [bytes([b]) for b in token]
    while True:
        best = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < limit and (best is None or rank < best[0]):
                best = (rank, i)
        if best is None:
            return parts
        i = best[1]
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2 :]


def write_bpe_files(tokenizer: TiktokenTokenizer, folder: Path) -> None:
    ranks = tokenizer.mergeable_ranks()
    byte_char = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(byte_char[x] for x in b)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = _split_by_lower_ranks(token, ranks, rank)
        if len(parts) != 2:
            raise ValueError(f"BPE rank {rank} is not the merge of two lower-ranked tokens")
        merges.append(f"{text(parts[0])} {text(parts[1])}")
    eot = tokenizer.eot_id
    if eot is not None:
        vocab[GPT2_EOT] = eot
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": GPT2_EOT, "eos_token": GPT2_EOT, "unk_token": GPT2_EOT}
    config = {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False,
              "model_max_length": 1_000_000, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def write_char_files(tokenizer: CharTokenizer, folder: Path) -> None:
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        # every character is its own pre-token ([\s\S]: any character, newlines included)
        "pre_tokenizer": {
            "type": "Split",
            "pattern": {"Regex": r"[\s\S]"},
            "behavior": "Isolated",
            "invert": False,
        },
        "post_processor": None,
        "decoder": {"type": "Fuse"},
        "model": {
            "type": "WordLevel",
            "vocab": {c: i for i, c in enumerate(tokenizer.chars)},
            "unk_token": tokenizer.chars[0],
        },
    }
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False, indent=1))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1_000_000,
              "clean_up_tokenization_spaces": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def read_hf_tokenizer(files: CheckpointFiles) -> Tokenizer | None:
    """The tokenizer a Hugging Face folder's files describe, None when it has none.

    ``tokenizer.json`` (a character WordLevel vocabulary as ``write_char_files`` writes, or a
    byte-level BPE), else ``vocab.json`` + ``merges.txt`` (GPT-2's files). Files describing a
    tokenizer this server cannot run are refused by name, never replaced by GPT-2's BPE.
    """
    if files.exists("tokenizer.json"):
        return _from_tokenizer_json(files.read_json("tokenizer.json"), files.where("tokenizer.json"))
    has_vocab, has_merges = files.exists("vocab.json"), files.exists("merges.txt")
    if not (has_vocab or has_merges):
        return None
    if not (has_vocab and has_merges):
        missing = "merges.txt" if has_vocab else "vocab.json"
        raise CheckpointError(f"{files.where(missing)}: missing; a BPE tokenizer needs vocab.json "
                              "and merges.txt")  # fmt: skip
    vocab = files.read_json("vocab.json")
    text = files.read("merges.txt")
    try:
        lines = text.decode("utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise CheckpointError(
            f"{files.where('merges.txt')}: not UTF-8 text (bad byte at offset {err.start})"
        ) from None
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    return bpe_from_vocab(vocab, [line for line in lines if line], files.where("vocab.json"), {})


def _from_tokenizer_json(spec: object, where: Path) -> Tokenizer:
    model = spec.get("model") if isinstance(spec, dict) else None
    kind = model.get("type") if isinstance(model, dict) else None
    if kind == "WordLevel":
        vocab = model.get("vocab")
        if not isinstance(vocab, dict) or not vocab:
            raise CheckpointError(f"{where}: a WordLevel model needs a 'vocab' object")
        by_id = {i: c for c, i in vocab.items() if isinstance(i, int) and not isinstance(i, bool)}
        if sorted(by_id) != list(range(len(vocab))) or any(len(c) != 1 for c in vocab):
            raise CheckpointError(
                f"{where}: only a WordLevel vocabulary of single characters with ids 0..n-1 "
                "can be served (a character model)"
            )
        return CharTokenizer([by_id[i] for i in range(len(by_id))])
    if kind == "BPE":
        added = spec.get("added_tokens") or []
        special = {
            t["content"]: t["id"]
            for t in added
            if isinstance(t, dict) and isinstance(t.get("content"), str)
            and isinstance(t.get("id"), int)
        }
        return bpe_from_vocab(model.get("vocab"), model.get("merges"), where, special)
    raise CheckpointError(
        f"{where}: describes a {str(kind)[:40]} tokenizer; this server runs character vocabularies "
        "and GPT-2-style byte-level BPE"
    )


def bpe_from_vocab(
    vocab: object, merges: object, where: Path, special: dict[str, int]
) -> TiktokenTokenizer:
    """tiktoken ranks from GPT-2-style files: the 256 bytes in GPT-2's order, then each merge in
    order (what tiktoken's ``data_gym_to_mergeable_bpe_ranks`` does); ``vocab`` must agree."""
    if not isinstance(vocab, dict) or not isinstance(merges, list):
        raise CheckpointError(f"{where}: a BPE tokenizer needs a vocab object and a merges list")
    byte_char = bytes_to_unicode()
    char_byte = {c: b for b, c in byte_char.items()}

    def to_bytes(text: object) -> bytes | None:
        if not isinstance(text, str) or not text or any(c not in char_byte for c in text):
            return None
        return bytes(char_byte[c] for c in text)

    ranks = {bytes([b]): rank for rank, b in enumerate(byte_char)}
    for lineno, merge in enumerate(merges, 1):
        parts = merge.split(" ") if isinstance(merge, str) else merge
        pair = [to_bytes(p) for p in parts] if isinstance(parts, list) and len(parts) == 2 else []
        if len(pair) != 2 or None in pair:
            raise CheckpointError(f"{where}: merge {lineno} is not two byte-level BPE tokens")
        ranks.setdefault(pair[0] + pair[1], len(ranks))
    matched = 0
    for text, token_id in vocab.items():
        token = to_bytes(text)
        if token is not None and token in ranks:
            matched += 1
            if ranks[token] != token_id:
                raise CheckpointError(
                    f"{where}: token ids do not follow the merge order (not a GPT-2-style "
                    "byte-level BPE this server can run)"
                )
        elif isinstance(token_id, int) and not isinstance(token_id, bool):
            special.setdefault(text, token_id)
        else:
            raise CheckpointError(f"{where}: vocab ids must be integers")
    if matched != len(ranks):
        raise CheckpointError(f"{where}: the vocab lacks {len(ranks) - matched} tokens the merges make")
    try:
        return TiktokenTokenizer.from_ranks(ranks, special_tokens=special)
    except TokenizerError as err:
        raise CheckpointError(f"{where}: {err}") from None


def write_tokenizer_files(tokenizer: Tokenizer, folder: Path) -> None:
    """Write the files ``transformers.AutoTokenizer`` loads for ``tokenizer``."""
    if isinstance(tokenizer, TiktokenTokenizer):
        write_bpe_files(tokenizer, folder)
    elif isinstance(tokenizer, CharTokenizer):
        write_char_files(tokenizer, folder)
    else:
        raise TypeError(f"no Hugging Face tokenizer export for {type(tokenizer).__name__}")
