"""A process killed in the middle of writing a checkpoint leaves the previous one loadable; the
next run removes what the killed save left; a full disk is one clear error line that leaves the
last checkpoint intact; a second trainer on the same run folder is refused."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import subprocess
import sys

import pytest
from trainer_support import (
    REPO,
    TINY,
    child_env,
    latest_step,
    records,
    single_thread,  # noqa: F401 (a fixture)
    trainer_cmd,
    write_corpus,
)

from model.checkpoint import load_checkpoint
from trainer.cli import main
from trainer.run_folder import is_disk_full

pytestmark = pytest.mark.usefixtures("single_thread")

# Re-save latest/ with a train-state writer that SIGKILLs its own process halfway: the weights and
# config of the new checkpoint are already in the temporary folder when the process dies.
CRASH_MID_SAVE = """
import os, signal, sys, torch
from model.checkpoint import load_checkpoint, save_checkpoint
ckpt = load_checkpoint(sys.argv[1])
with torch.no_grad():
    for p in ckpt.model.parameters():
        p.zero_()
def die(path):
    path.write_bytes(b"half a train state")
    os.kill(os.getpid(), signal.SIGKILL)
save_checkpoint(sys.argv[1], ckpt.model, ckpt.tokenizer.spec(), {"iterations": 999},
                extra_files={"train_state.pt": die})
"""


def _leftovers(run) -> list[str]:
    return sorted(p.name.split("-")[0] for p in run.iterdir() if ".tmp-" in p.name)


@pytest.fixture
def prepared(tmp_path):
    corpus = write_corpus(tmp_path)
    assert main(["prepare", "--input", str(corpus), "--out", str(tmp_path / "d")]) == 0
    return tmp_path


@pytest.mark.timeout(120)
def test_crash_mid_save_leaves_the_previous_checkpoint_and_the_next_run_sweeps_the_leftovers(
    prepared, capsys
):
    run = prepared / "run"
    base = [
        "train",
        "--data",
        str(prepared / "d"),
        "--out",
        str(run),
        *TINY,
        "--eval-interval",
        "5",
    ]
    assert main([*base, "--max-iters", "10"]) == 0
    latest = run / "latest"
    before = (latest / "model.safetensors").read_bytes()

    for target in (run / "best", latest):
        crashed = subprocess.run(
            [sys.executable, "-c", CRASH_MID_SAVE, str(target)],
            cwd=REPO,
            env=child_env(),
            capture_output=True,
            check=False,
        )
        assert crashed.returncode == -9, crashed.stderr
    assert (latest / "model.safetensors").read_bytes() == before, "old weights were touched"
    ckpt = load_checkpoint(latest)
    assert ckpt.provenance["iterations"] == 10
    assert any(float(p.detach().abs().sum()) > 0 for p in ckpt.model.parameters())
    assert _leftovers(run) == [".best.tmp", ".latest.tmp"], "each killed save leaves a temp folder"

    capsys.readouterr()
    assert (
        main(
            [
                "train",
                "--data",
                str(prepared / "d"),
                "--out",
                str(run),
                "--resume",
                "--max-iters",
                "15",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert re.search(
        r"removed 2 temporary file\(s\) or folder\(s\) \([\d.]+ MiB\) left by a save", err
    )
    assert _leftovers(run) == [], "the next run must remove what killed saves left"
    assert [r["step"] for r in records(run, "eval")] == [0, 5, 10, 15]


def test_a_second_trainer_on_a_run_folder_in_use_is_refused_and_removes_nothing(prepared, capsys):
    run = prepared / "run"
    args = ["train", "--data", str(prepared / "d"), "--out", str(run), *TINY, "--max-iters", "2"]
    assert main(args) == 0
    in_flight = run / ".latest.tmp-inflight"  # what a live trainer's save looks like mid-write
    in_flight.mkdir()
    fd = os.open(run / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the running trainer holds it
        os.pwrite(fd, b"4242\n", 0)
        capsys.readouterr()
        resume = ["train", "--data", str(prepared / "d"), "--out", str(run), "--resume"]
        assert main([*resume, "--max-iters", "4"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (
            f"error: {run} is in use by another trainer (pid 4242); wait for it to finish, "
            "or choose another --out"
        ), err
        assert in_flight.is_dir(), "a live writer's temp folder was removed"
    finally:
        os.close(fd)
    assert main([*resume, "--max-iters", "4"]) == 0, "the lock must not outlive its holder"
    assert latest_step(run) == 4


# Send the train-state file to /dev/full: the kernel answers every write with ENOSPC, exactly as
# a full disk does, through torch.save's own error path. Used where no tmpfs can be mounted.
DEV_FULL_CHILD = """
import io, sys
from pathlib import Path
from trainer.cli import main
real_open = io.open
def open_(file, mode="r", *args, **kwargs):
    if "w" in mode and Path(str(file)).name == "train_state.pt":
        return real_open("/dev/full", mode, *args, **kwargs)
    return real_open(file, mode, *args, **kwargs)
io.open = open_
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs where this process may mount one (root, and mounting allowed), else None."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)]
    if os.geteuid() != 0 or subprocess.run(mount, capture_output=True, check=False).returncode:
        yield None
        return
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, check=False)


def _fill(disk, leave: int) -> None:
    """Write a file that leaves ``leave`` bytes free on ``disk``."""
    stat = os.statvfs(disk)
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave))


@pytest.mark.timeout(120)
def test_a_full_disk_is_one_error_line_and_the_last_checkpoint_survives(prepared, small_disk):
    run = (small_disk or prepared) / "run"
    data = ["--data", str(prepared / "d")]
    first = subprocess.run(
        trainer_cmd(
            "train", *data, "--out", str(run), *TINY, "--max-iters", "5", "--eval-interval", "5"
        ),
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        check=False,
        timeout=100,
    )
    assert first.returncode == 0, first.stderr
    resume = ["train", *data, "--out", str(run), "--resume", "--max-iters", "10"]
    if small_disk is not None:  # a real full filesystem: whichever write comes first fails
        _fill(small_disk, leave=100 * 1024)
        cmd = trainer_cmd(*resume)
    else:
        cmd = [sys.executable, "-c", DEV_FULL_CHILD, *resume]
    proc = subprocess.run(
        cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, check=False, timeout=100
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "enforce fail" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors == proc.stderr.strip().splitlines()[-1:], proc.stderr
    assert re.fullmatch(
        rf"error: the disk holding {re.escape(str(run))} is full \([\d.]+ MiB free\); "
        rf"{re.escape(str(run / 'latest'))} \(step 5\) is intact: free some space, then add "
        r"--resume",
        errors[0],
    ), errors[0]
    assert load_checkpoint(run / "latest").provenance["iterations"] == 5
    assert _leftovers(run) == [], "a failed save must not leave its temp folder"


@pytest.mark.timeout(120)
def test_a_full_disk_before_the_first_latest_names_the_best_checkpoint_it_kept(prepared):
    run = prepared / "fresh"
    cmd = [sys.executable, "-c", DEV_FULL_CHILD, "train", "--data", str(prepared / "d"),
           "--out", str(run), *TINY, "--max-iters", "5", "--eval-interval", "5"]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, check=False, timeout=100
    )
    assert proc.returncode == 2, proc.stderr
    best = load_checkpoint(run / "best")  # written before latest/'s train state hit the full disk
    step = best.provenance["iterations"]
    error = proc.stderr.strip().splitlines()[-1]
    assert "no checkpoint" not in error, error
    assert re.fullmatch(
        rf"error: the disk holding {re.escape(str(run))} is full \([\d.]+ MiB free\); "
        rf"{re.escape(str(run / 'best'))} \(step {step}\) is intact but there is no latest/ to "
        r"resume from: free some space, then start the run again \(or serve best/\)",
        error,
    ), error


def test_disk_full_is_recognised_in_the_errors_torch_and_python_raise():
    import torch

    full = open("/dev/full", "wb")  # buffered, as the trainer's train-state writer opens it
    try:
        with pytest.raises(RuntimeError) as torch_err:
            torch.save({"w": torch.zeros(1000)}, full)
    finally:
        with contextlib.suppress(OSError):  # closing flushes into /dev/full once more
            full.close()
    assert "enforce fail" in str(torch_err.value)
    assert is_disk_full(torch_err.value), "torch hides the ENOSPC in the exception's context"
    fd = os.open("/dev/full", os.O_WRONLY)
    try:
        with pytest.raises(OSError) as os_err:
            os.write(fd, b"x")
    finally:
        os.close(fd)
    assert is_disk_full(os_err.value)
    assert not is_disk_full(RuntimeError("unexpected pos 704 vs 598"))
    assert not is_disk_full(OSError(13, "Permission denied"))
