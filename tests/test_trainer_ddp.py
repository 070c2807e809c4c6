"""DDP through ``torchrun --nproc_per_node=2`` on CPU (gloo): same global batch, same curve.

Each rank draws the same global batch from the shared data generator and trains on its half;
DDP averages the two halves' gradients, which is the gradient of the whole batch. So two ranks
with batch 4 must follow a single process with batch 8 (dropout 0), up to float summation order.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from trainer_support import REPO, TINY, child_env, records, run_trainer, write_corpus

TINY_NO_DROPOUT = [*TINY, "--dropout", "0.0", "--max-iters", "12", "--eval-interval", "6"]


def _records(run):
    return records(run, "eval")


@pytest.mark.timeout(180)
def test_two_gloo_ranks_match_one_process_with_the_whole_batch(tmp_path):
    assert (
        run_trainer(
            "prepare", "--input", str(write_corpus(tmp_path)), "--out", str(tmp_path / "data")
        ).returncode
        == 0
    )
    data = ["--data", str(tmp_path / "data")]
    ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "trainer",
            "train",
            *data,
            "--out",
            str(tmp_path / "ddp"),
            *TINY_NO_DROPOUT,
            "--batch-size",
            "4",
        ],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = run_trainer(
        "train", *data, "--out", str(tmp_path / "one"), *TINY_NO_DROPOUT, "--batch-size", "8"
    )
    assert single.returncode == 0, single.stderr

    assert ddp.stdout.count("done:") == 1, "only rank 0 may report"
    assert ddp.stderr.count("step 12: train loss") == 1, "only rank 0 may log evals"
    two, one = _records(tmp_path / "ddp"), _records(tmp_path / "one")
    assert [r["step"] for r in two] == [0, 6, 12], "one log line per eval, written once"
    assert [r["tokens_seen"] for r in two] == [r["tokens_seen"] for r in one]
    for a, b in zip(two, one, strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=2e-4), (a, b)
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=2e-4), (a, b)
    state = subprocess.run(
        [
            sys.executable,
            "-c",
            "import torch,sys; s=torch.load(sys.argv[1]); print(len(s['rng']))",
            str(tmp_path / "ddp" / "latest" / "train_state.pt"),
        ],
        env=child_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert state.stdout.strip() == "2", "the dropout RNG of both ranks must be saved"
