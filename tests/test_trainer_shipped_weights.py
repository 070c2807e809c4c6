"""The shipped default checkpoint, weights/shakespeare-char/, is what weights/README.md says."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from model.checkpoint import load_checkpoint

SHIPPED = Path(__file__).resolve().parents[1] / "weights" / "shakespeare-char"
TARGET_VAL_LOSS = 1.70


def test_shipped_checkpoint_is_a_servable_cpu_small_char_model_without_optimizer_state():
    ckpt = load_checkpoint(SHIPPED)
    assert ckpt.source_format == "gptserve" and ckpt.tokenizer.spec()["type"] == "char"
    assert ckpt.config.block_size >= 128
    prov = ckpt.provenance
    assert prov["preset"] == "cpu-small" and prov["val_loss"] <= TARGET_VAL_LOSS, prov
    assert not (SHIPPED / "train_state.pt").exists(), "no optimizer state in shipped weights"
    assert sum(f.stat().st_size for f in SHIPPED.iterdir()) < 50 * 2**20
    log = [json.loads(line) for line in (SHIPPED / "log.jsonl").read_text().splitlines()]
    assert min(r["val_loss"] for r in log) == pytest.approx(prov["val_loss"])


def test_shipped_checkpoint_reaches_the_target_loss_on_held_out_shakespeare():
    corpus = os.environ.get("GPTSERVE_TEST_CORPUS")
    if not corpus or not Path(corpus).is_file():
        pytest.skip("GPTSERVE_TEST_CORPUS (tinyshakespeare.txt) is not set")
    text = Path(corpus).read_text(encoding="utf-8")
    ckpt = load_checkpoint(SHIPPED)
    val = torch.tensor(ckpt.tokenizer.encode(text[int(len(text) * 0.9) :]))  # prepare's split
    T = ckpt.config.block_size
    n = min(128, (len(val) - 1) // T)  # the first 128 non-overlapping windows of val
    x = val[: n * T].view(n, T)
    y = val[1 : n * T + 1].view(n, T)
    with torch.no_grad():
        _, loss = ckpt.model(x, y)
    assert loss.item() <= TARGET_VAL_LOSS, f"held-out loss {loss.item():.4f}"
