"""Shared helpers for the trainer tests: a small corpus, a prepared data folder, tiny-run flags.

Tests read the corpus from ``GPTSERVE_TEST_CORPUS`` (CI exports it) and fall back to a text they
write themselves; only the first 60k characters are used, to keep every run fast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORPUS_CHARS = 60_000

# A run that cannot end before a test stops it: the tests that kill or interrupt a trainer wait
# for an observed event (a log record, a checkpoint) and then signal it, so where the signal lands
# never decides whether the test passes.
ENDLESS = ["--max-iters", "1000000000"]

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


def records(run: Path, kind: str) -> list[dict]:
    """The ``kind`` ("train" or "eval") records of a run's log.jsonl, in order."""
    lines = (run / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind", "eval") == kind]


def last_logged_step(run: Path, kind: str = "train") -> int:
    """The step of the last complete ``kind`` record in log.jsonl; -1 when there is none yet."""
    try:
        lines = (run / "log.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return -1
    steps = [-1]
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break  # a line still being written
        if record.get("kind", "eval") == kind:
            steps.append(record["step"])
    return steps[-1]


def latest_step(run: Path) -> int:
    """The step RUN/latest holds; -1 when there is none (yet)."""
    try:
        meta = json.loads((run / "latest" / "config.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return -1
    return meta["provenance"]["iterations"]


def wait_for(event: Callable[[], bool], proc: subprocess.Popen, what: str) -> None:
    """Poll until ``event()`` holds; fail at once if ``proc`` exits first.

    No deadline of its own: the test's pytest-timeout bounds it, so a slow machine only waits
    longer and never changes the outcome.
    """
    while not event():
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"the trainer exited ({proc.returncode}) before {what}: {err}")
        time.sleep(0.01)


def start_trainer(*args: str) -> subprocess.Popen:
    """A ``python -m trainer`` subprocess with its stderr piped (text)."""
    return subprocess.Popen(
        trainer_cmd(*args), cwd=REPO, env=child_env(), stderr=subprocess.PIPE, text=True
    )


def curve(run: Path) -> dict[str, list[tuple]]:
    """What must be identical between two runs that trained the same steps: per-step loss, lr and
    gradient norm, and the eval losses (timings and throughput are left out)."""
    train = [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in records(run, "train")]
    evals = [
        (r["step"], r["train_loss"], r["val_loss"], r["tokens_seen"]) for r in records(run, "eval")
    ]
    return {"train": train, "eval": evals}


@pytest.fixture
def single_thread():
    """In-process training on one thread: deterministic, and fast on a shared 2-core machine
    (two threads contending with other processes spin-wait and run several times slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def without(flags: list[str], name: str) -> list[str]:
    """``flags`` less the flag ``name`` and its value."""
    at = flags.index(name)
    return flags[:at] + flags[at + 2 :]
