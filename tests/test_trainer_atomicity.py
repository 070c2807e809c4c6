"""A process killed in the middle of writing a checkpoint leaves the previous one loadable."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from trainer_support import REPO, TINY, child_env, write_corpus

from model.checkpoint import load_checkpoint
from trainer.cli import main

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


@pytest.mark.timeout(120)
def test_crash_mid_save_leaves_the_previous_checkpoint_loadable_and_resumable(tmp_path):
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
        "5",
    ]
    assert main([*base, "--max-iters", "10"]) == 0
    latest = tmp_path / "run" / "latest"
    before = (latest / "model.safetensors").read_bytes()

    crashed = subprocess.run(
        [sys.executable, "-c", CRASH_MID_SAVE, str(latest)],
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
    leftovers = [p.name for p in latest.parent.iterdir() if p.name.startswith(".latest.tmp-")]
    assert leftovers, "the half-written checkpoint should be an ignorable temp folder"

    assert main([*base, "--max-iters", "15", "--resume"]) == 0
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 5, 10, 15]
