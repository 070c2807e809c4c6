"""``--resume`` after a SIGKILL reproduces the uninterrupted run's loss curve exactly.

Exactness holds because everything random is restored: the data sampler's generator, every rank's
dropout RNG, AdamW's moments and step counts, and fp32 weights; eval batches come from their own
fixed generator. Both runs use one CPU thread, so the arithmetic is the same op for op.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from trainer_support import REPO, TINY, child_env, run_trainer, trainer_cmd, write_corpus

from trainer.cli import main

RUN = [*TINY, "--max-iters", "30", "--eval-interval", "5"]


def _curve(run: Path) -> list[tuple[int, float, float, int]]:
    lines = (run / "log.jsonl").read_text().splitlines()
    return [
        (r["step"], r["train_loss"], r["val_loss"], r["tokens_seen"])
        for r in map(json.loads, lines)
    ]


def _latest_step(run: Path) -> int:
    try:
        meta = json.loads((run / "latest" / "config.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return -1
    return meta["provenance"]["iterations"]


@pytest.mark.timeout(240)
def test_sigkilled_run_resumed_has_the_uninterrupted_loss_curve(tmp_path):
    assert (
        main(["prepare", "--input", str(write_corpus(tmp_path)), "--out", str(tmp_path / "data")])
        == 0
    )
    data = ["--data", str(tmp_path / "data")]
    env = child_env()
    reference = subprocess.Popen(
        trainer_cmd("train", *data, "--out", str(tmp_path / "ref"), *RUN),
        cwd=REPO,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    victim = subprocess.Popen(
        trainer_cmd("train", *data, "--out", str(tmp_path / "cut"), *RUN),
        cwd=REPO,
        env=env,
        stderr=subprocess.DEVNULL,
    )
    while _latest_step(tmp_path / "cut") < 5 and victim.poll() is None:
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = _latest_step(tmp_path / "cut")
    assert 5 <= killed_at < 30

    resumed = run_trainer("train", *data, "--out", str(tmp_path / "cut"), *RUN, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert reference.wait(timeout=200) == 0, reference.stderr.read()

    expected = _curve(tmp_path / "ref")
    assert [s for s, *_ in expected] == list(range(0, 31, 5))
    assert _curve(tmp_path / "cut") == expected, f"curves diverge after resuming at {killed_at}"
    best = json.loads((tmp_path / "cut" / "best" / "config.json").read_text())["provenance"]
    ref_best = json.loads((tmp_path / "ref" / "best" / "config.json").read_text())["provenance"]
    assert (best["iterations"], best["val_loss"]) == (ref_best["iterations"], ref_best["val_loss"])


def test_resume_continues_a_finished_run_when_max_iters_is_raised(tmp_path):
    assert (
        main(["prepare", "--input", str(write_corpus(tmp_path)), "--out", str(tmp_path / "d")]) == 0
    )
    base = [
        "train",
        "--data",
        str(tmp_path / "d"),
        "--out",
        str(tmp_path / "run"),
        *TINY,
        "--eval-interval",
        "10",
        "--lr-decay-iters",
        "40",
    ]
    assert main([*base, "--max-iters", "20"]) == 0
    assert main([*base, "--max-iters", "40", "--resume"]) == 0
    assert [s for s, *_ in _curve(tmp_path / "run")] == [0, 10, 20, 30, 40]
    assert _latest_step(tmp_path / "run") == 40
