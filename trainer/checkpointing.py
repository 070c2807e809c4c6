"""The run folder's checkpoints: ``best/`` (what gets served) and ``latest/`` (what resumes).

Both are native checkpoints written atomically by ``model.save_checkpoint``. ``latest/`` also holds
``train_state.pt`` (optimizer, step, data-sampler and per-rank RNG states) inside the same atomic
swap, so the weights and the state that resumes them can never disagree.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.gpt import GPT
from trainer.errors import TrainerError

TRAIN_STATE = "train_state.pt"
SAVE_DTYPES = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Provenance:
    """Where a checkpoint came from; stored in its config.json."""

    dataset: str
    step: int
    val_loss: float | None  # None: saved between evals (an interrupted run)
    tokens_seen: int
    hyperparameters: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "trainer": "gptserve.trainer",
            "dataset": self.dataset,
            "iterations": self.step,
            "val_loss": None if self.val_loss is None else round(self.val_loss, 6),
            "tokens_seen": self.tokens_seen,
            "preset": self.hyperparameters.get("preset"),
            "hyperparameters": self.hyperparameters,
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }


def save_best(
    run_dir: Path, model: GPT, tokenizer_spec: dict, provenance: Provenance, save_dtype: str
) -> None:
    save_checkpoint(
        run_dir / "best", model, tokenizer_spec, provenance.to_dict(), dtype=SAVE_DTYPES[save_dtype]
    )


def save_latest(
    run_dir: Path,
    model: GPT,
    tokenizer_spec: dict,
    provenance: Provenance,
    train_state: dict[str, Any],
) -> None:
    """fp32 weights (resume must be exact) plus the train state, in one atomic swap."""

    def write_state(path: Path) -> None:
        # Through a Python file object: on a full disk the OSError (ENOSPC) stays chained to
        # torch's "[enforce fail at inline_container.cc]" RuntimeError, where a path would lose it.
        with path.open("wb") as f:
            torch.save(train_state, f)

    save_checkpoint(
        run_dir / "latest",
        model,
        tokenizer_spec,
        provenance.to_dict(),
        extra_files={TRAIN_STATE: write_state},
    )


def load_latest(run_dir: Path, tokenizer_spec: dict, expected_model: dict) -> tuple[GPT, dict]:
    """The latest checkpoint's model and train state; refuses a different tokenizer or shape.

    Dropout is not part of the shape: a resumed run may change it.
    """
    folder = run_dir / "latest"
    if not (folder / TRAIN_STATE).is_file():
        raise TrainerError(f"--resume: {folder} has no {TRAIN_STATE} to resume from")
    try:
        ckpt = load_checkpoint(folder)
    except CheckpointError as err:
        raise TrainerError(f"--resume: {err}") from None
    if ckpt.tokenizer.spec() != tokenizer_spec:
        raise TrainerError(
            f"--resume: {folder} was trained with a different tokenizer than the --data folder "
            f"({_describe(ckpt.tokenizer.spec())} vs {_describe(tokenizer_spec)})"
        )
    diff = {
        k: (v, expected_model.get(k))
        for k, v in ckpt.config.to_dict().items()
        if expected_model.get(k) != v and k != "dropout"
    }
    if diff:
        raise TrainerError(
            f"--resume: model shape differs from the checkpoint's (checkpoint, flags): {diff}"
        )
    state = torch.load(folder / TRAIN_STATE, map_location="cpu", weights_only=True)
    return ckpt.model.train(), state


def _describe(spec: dict) -> str:
    if spec.get("type") == "char":
        return f"char, {len(spec.get('chars', []))} characters"
    return f"{spec.get('type')} {spec.get('encoding') or spec.get('ranks_file')}"
