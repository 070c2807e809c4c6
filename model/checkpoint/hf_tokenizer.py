"""Tokenizer files for an exported Hugging Face folder, so transformers and vLLM need no other.

- BPE (tiktoken ranks, GPT-2's byte-level scheme): ``vocab.json`` + ``merges.txt``, the files
  ``GPT2Tokenizer`` reads. tiktoken stores only ranks; the merge that made each token is recovered
  by running byte-level BPE on the token's bytes with every lower rank (a token of rank r is the
  merge of exactly two parts that lower ranks produce).
- Character vocabularies: a ``tokenizer.json`` for ``PreTrainedTokenizerFast``: a word-level
  model over single characters, a pre-tokenizer that isolates every character, a fusing decoder.
"""

from __future__ import annotations

import json
from pathlib import Path

from model.tokenizer import GPT2_EOT, CharTokenizer, TiktokenTokenizer, Tokenizer


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


def read_char_tokenizer(file: Path) -> CharTokenizer | None:
    """The character vocabulary of a ``tokenizer.json`` written by ``write_char_files``, or None
    when the file is absent or describes another tokenizer (e.g. GPT-2's BPE)."""
    try:
        spec = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    model = spec.get("model") if isinstance(spec, dict) else None
    if not isinstance(model, dict) or model.get("type") != "WordLevel":
        return None
    vocab = model.get("vocab") or {}
    if not vocab or any(len(c) != 1 for c in vocab):
        return None
    by_id = {i: c for c, i in vocab.items()}
    if sorted(by_id) != list(range(len(by_id))):
        return None
    return CharTokenizer([by_id[i] for i in range(len(by_id))])


def write_tokenizer_files(tokenizer: Tokenizer, folder: Path) -> None:
    """Write the files ``transformers.AutoTokenizer`` loads for ``tokenizer``."""
    if isinstance(tokenizer, TiktokenTokenizer):
        write_bpe_files(tokenizer, folder)
    elif isinstance(tokenizer, CharTokenizer):
        write_char_files(tokenizer, folder)
    else:
        raise TypeError(f"no Hugging Face tokenizer export for {type(tokenizer).__name__}")
