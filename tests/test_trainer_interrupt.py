"""Ctrl-C (SIGINT) and SIGTERM stop a real ``python -m trainer train`` cleanly: ``latest/`` holds
the very step it stopped at, the message says what was saved and the exact command that resumes,
the exit status is 128 + the signal, and the printed command alone resumes the run exactly.

Every signal is sent after an observed event (a per-step record in log.jsonl) to a run that cannot
finish on its own, so where it lands never decides the outcome.
"""

from __future__ import annotations

import re
import shlex
import signal

import pytest
from trainer_support import (
    ENDLESS,
    TINY,
    curve,
    last_logged_step,
    latest_step,
    start_trainer,
    wait_for,
    write_corpus,
)

from trainer.cli import main

# Started from a preset whose shape (4 layers, 192 wide) differs from TINY's, so that a resume
# which re-applied the preset, or the defaults, instead of the checkpoint's settings would fail.
# eval_interval is out of reach: every step since the step-0 eval exists only in memory until the
# signal arrives.
FLAGS = [
    "--preset",
    "cpu-small",
    *[a for a in TINY if a != "--no-progress"],  # the progress output is checked below
    "--eval-interval",
    "100000",
    "--log-interval",
    "1",
    "--lr-decay-iters",
    "40",
]
STOPPED = re.compile(r"stopped by (SIG\w+) at step (\d+): saved (\S+) \(")
RESUME = re.compile(r"resume with: python (.*)")


def _stop(proc, sig: int, expect_code: int) -> tuple[int, str]:
    """Send ``sig``; returns the step the trainer says it saved, and its stderr."""
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == expect_code, err
    assert "Traceback" not in err and "error:" not in err, err
    match = STOPPED.search(err)
    assert match, f"no 'stopped by ... saved' line in: {err}"
    assert match.group(1) == signal.Signals(sig).name
    return int(match.group(2)), err


@pytest.mark.timeout(300)
def test_ctrl_c_saves_the_current_step_and_the_printed_command_resumes_it_exactly(tmp_path):
    assert (
        main(["prepare", "--input", str(write_corpus(tmp_path)), "--out", str(tmp_path / "d")]) == 0
    )
    data = ["--data", str(tmp_path / "d")]
    cut, ref = tmp_path / "cut", tmp_path / "ref"

    victim = start_trainer("train", *data, "--out", str(cut), *FLAGS, *ENDLESS)
    wait_for(lambda: last_logged_step(cut) >= 3, victim, "its third step")
    first, err = _stop(victim, signal.SIGINT, 130)
    assert first >= 3
    assert latest_step(cut) == first, "latest/ must hold the step the run stopped at"
    assert last_logged_step(cut) == first, "a step record after the saved step was kept"
    # the step-0 eval showed progress before its result (stderr is a pipe here: plain lines)
    assert err.index("eval step 0: 4 batches") < err.index("step 0: train loss"), err
    command = shlex.split(RESUME.search(err).group(1))
    assert command == ["-m", "trainer", "train", *data, "--out", str(cut), "--resume"], command

    # The printed command, plus the run's own preset and one override: shape, preset and loop
    # settings all come from the checkpoint, and only --max-iters changes.
    end = first + 3
    resumed = start_trainer(*command[2:], "--preset", "cpu-small", "--max-iters", str(end))
    reference = start_trainer(
        "train", *data, "--out", str(ref), *FLAGS, "--no-progress", "--max-iters", str(end)
    )
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert f"resuming {cut} from step {first}\n" in err, err
    assert f"steps {first} -> {end};" in err, err
    assert [line for line in err.splitlines() if "override" in line] == [
        f"override --max-iters: 1000000000 -> {end}"
    ], err
    _, ref_err = reference.communicate(timeout=120)
    assert reference.returncode == 0, ref_err

    expected = curve(ref)
    assert [s for s, *_ in expected["train"]] == list(range(1, end + 1))
    assert [s for s, *_ in expected["eval"]] == [0, end]
    assert curve(cut) == expected, f"curves diverge after stopping at step {first}"


@pytest.mark.timeout(120)
def test_sigterm_also_saves_the_current_step_and_exits_143(tmp_path):
    assert (
        main(["prepare", "--input", str(write_corpus(tmp_path)), "--out", str(tmp_path / "d")]) == 0
    )
    run = tmp_path / "run"
    victim = start_trainer(
        "train",
        "--data",
        str(tmp_path / "d"),
        "--out",
        str(run),
        *TINY,
        "--log-interval",
        "1",
        "--eval-interval",
        "100000",
        *ENDLESS,
    )
    wait_for(lambda: last_logged_step(run) >= 2, victim, "its second step")
    step, err = _stop(victim, signal.SIGTERM, 128 + signal.SIGTERM)
    assert latest_step(run) == step and last_logged_step(run) == step
    assert (
        f"resume with: python -m trainer train --data {tmp_path / 'd'} --out {run} --resume" in err
    )
