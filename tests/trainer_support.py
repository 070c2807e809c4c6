"""Shared helpers for the trainer tests: a small corpus, a prepared data folder, tiny-run flags.

Tests read the corpus from ``GPTSERVE_TEST_CORPUS`` (CI exports it) and fall back to a text they
write themselves; only the first 60k characters are used, to keep every run fast.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS_CHARS = 60_000

# A 2-layer, 32-wide model on 32-token windows: a training step takes a few milliseconds.
TINY = [
    "--n-layer",
    "2",
    "--n-head",
    "2",
    "--n-embd",
    "32",
    "--block-size",
    "32",
    "--batch-size",
    "8",
    "--dropout",
    "0.1",
    "--learning-rate",
    "3e-3",
    "--min-lr",
    "3e-4",
    "--warmup-iters",
    "5",
    "--eval-iters",
    "2",
    "--device",
    "cpu",
    "--dtype",
    "float32",
    "--peak-flops",
    "1e9",
    "--seed",
    "7",
    "--no-progress",
]


def corpus_text() -> str:
    path = os.environ.get("GPTSERVE_TEST_CORPUS")
    if path and Path(path).is_file():
        return Path(path).read_text(encoding="utf-8")[:CORPUS_CHARS]
    verse = (
        "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
        "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n\n"
    )
    return (verse * (CORPUS_CHARS // len(verse) + 1))[:CORPUS_CHARS]


def write_corpus(folder: Path, text: str | None = None) -> Path:
    path = folder / "corpus.txt"
    path.write_text(corpus_text() if text is None else text, encoding="utf-8")
    return path


def child_env() -> dict[str, str]:
    """Environment for trainer subprocesses: one thread (deterministic, polite to a 2-core box)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # no spinning on a shared CI box
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def trainer_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "trainer", *args]


def run_trainer(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        trainer_cmd(*args),
        check=False,
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
