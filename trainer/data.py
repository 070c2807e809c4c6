"""Token data on disk: ``prepare`` writes it once, ``TokenData`` and ``BatchSampler`` read it.

A data folder holds ``train.bin`` and ``val.bin`` (uint16 token ids, a 90/10 split of the corpus,
nanoGPT's layout) and ``tokenizer.json`` (the tokenizer spec the checkpoint will carry).
"""

from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.checkpoint.atomic import atomic_folder
from model.tokenizer import CharTokenizer, TiktokenTokenizer, Tokenizer, tokenizer_from_spec
from trainer.errors import TrainerError

TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "val")
TRAIN_FRACTION = 0.9


def read_corpus(source: str) -> str:
    """The text of a local file or an http(s) URL; a missing or empty corpus is a TrainerError."""
    if source.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(source, timeout=60) as response:
                raw = response.read()
        except OSError as err:
            raise TrainerError(f"cannot download {source}: {err}") from None
    else:
        path = Path(source)
        if not path.is_file():
            raise TrainerError(f"{source}: corpus file not found")
        raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TrainerError(f"{source}: not UTF-8 text ({err})") from None
    if not text.strip():
        raise TrainerError(f"{source}: the corpus is empty")
    return text


def make_tokenizer(kind: str, text: str) -> Tokenizer:
    if kind == "char":
        return CharTokenizer.from_text(text)
    if kind in ("r50k_base", "gpt2"):
        return TiktokenTokenizer.by_name(kind)
    raise TrainerError(f"unknown tokenizer {kind!r} (expected char or r50k_base)")


def prepare(source: str, tokenizer_kind: str, out: Path) -> dict[str, int]:
    """Tokenize ``source`` into ``out``/{train,val}.bin + tokenizer.json; returns token counts."""
    text = read_corpus(source)
    tokenizer = make_tokenizer(tokenizer_kind, text)
    if tokenizer.vocab_size > np.iinfo(np.uint16).max + 1:
        raise TrainerError(f"vocabulary of {tokenizer.vocab_size} does not fit in uint16")
    split_at = int(len(text) * TRAIN_FRACTION)  # split the text, as nanoGPT does
    parts = {"train": text[:split_at], "val": text[split_at:]}
    ids = {name: np.array(tokenizer.encode(part), dtype=np.uint16) for name, part in parts.items()}
    with atomic_folder(Path(out)) as tmp:  # a re-prepare never leaves a half-written folder
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; data folders are shared (e.g. containers)
        for name, arr in ids.items():
            arr.tofile(tmp / f"{name}.bin")
        (tmp / TOKENIZER_FILE).write_text(json.dumps(tokenizer.spec(), ensure_ascii=False) + "\n")
    return {name: int(arr.size) for name, arr in ids.items()}


@dataclass(frozen=True)
class TokenData:
    """A prepared data folder: memory-mapped splits and the tokenizer spec that produced them."""

    folder: Path
    tokenizer_spec: dict[str, Any]
    vocab_size: int
    splits: dict[str, np.ndarray]

    @classmethod
    def open(cls, folder: str | Path) -> TokenData:
        folder = Path(folder)
        spec_file = folder / TOKENIZER_FILE
        if not spec_file.is_file():
            raise TrainerError(
                f"{folder}: not a prepared data folder (no {TOKENIZER_FILE}; "
                "run `python -m trainer prepare` first)"
            )
        try:
            spec = json.loads(spec_file.read_text(encoding="utf-8"))
            tokenizer = tokenizer_from_spec(spec, folder)
        except (ValueError, KeyError) as err:
            raise TrainerError(f"{spec_file}: unreadable tokenizer spec ({err})") from None
        splits = {}
        for name in SPLITS:
            file = folder / f"{name}.bin"
            if not file.is_file() or file.stat().st_size == 0:
                raise TrainerError(f"{file}: missing or empty")
            splits[name] = np.memmap(file, dtype=np.uint16, mode="r")
        return cls(folder, spec, tokenizer.vocab_size, splits)

    def check_block_size(self, block_size: int) -> None:
        for name, arr in self.splits.items():
            if len(arr) <= block_size + 1:
                raise TrainerError(
                    f"block_size {block_size} is larger than the {name} split "
                    f"({len(arr)} tokens in {self.folder}); use a smaller --block-size or more data"
                )


class BatchSampler:
    """Draws random (x, y) windows from one split with its own restorable ``torch.Generator``.

    Every rank draws the same global batch and keeps its own slice, so one generator state (saved
    by rank 0) restores the data order of the whole job.
    """

    def __init__(
        self,
        data: np.ndarray,
        block_size: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.data = data
        self.block_size = block_size
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.block_size
        starts = torch.randint(
            len(self.data) - T, (self.batch_size * self.world_size,), generator=self.generator
        )
        starts = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size].tolist()
        window = np.stack([self.data[i : i + T + 1] for i in starts]).astype(np.int64)
        xy = torch.from_numpy(window)  # (B, T+1)
        if device.type == "cuda":
            xy = xy.pin_memory().to(device, non_blocking=True)
        return xy[:, :-1].contiguous(), xy[:, 1:].contiguous()  # inputs, targets: (B, T)

    def state(self) -> torch.Tensor:
        return self.generator.get_state()

    def restore(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)
