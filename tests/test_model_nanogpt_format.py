"""nanoGPT's ckpt.pt + meta.pkl load through the one loader, and hostile pickles are refused."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from model import (
    GPT,
    CharTokenizer,
    CheckpointError,
    GPTConfig,
    load_checkpoint,
    reference_generate,
)

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n"


def _nanogpt_checkpoint(folder, *, bias: bool, compiled: bool):
    """Write ckpt.pt and meta.pkl exactly as nanoGPT's train.py and prepare.py shape them."""
    chars = sorted(set(TEXT))
    torch.manual_seed(3)
    model_args = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, bias=bias,
                      vocab_size=len(chars), dropout=0.0)
    model = GPT(GPTConfig(**model_args))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1]
    loss.backward()
    optimizer.step()
    prefix = "_orig_mod." if compiled else ""
    state = {prefix + k: v for k, v in model.state_dict().items()}
    torch.save(
        {
            "model": state,
            "optimizer": optimizer.state_dict(),
            "model_args": model_args,
            "iter_num": 250,
            "best_val_loss": torch.tensor(1.4697),
            "config": {"dataset": "shakespeare_char", "learning_rate": 1e-3},
        },
        folder / "ckpt.pt",
    )
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)),
            "stoi": {c: i for i, c in enumerate(chars)}}
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump(meta, f)
    return model.eval()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("compiled", [True, False])
def test_nanogpt_checkpoint_generates_what_the_reference_says(tmp_path, bias, compiled):
    original = _nanogpt_checkpoint(tmp_path, bias=bias, compiled=compiled)
    ckpt = load_checkpoint(tmp_path)  # the folder; the file path works too
    assert ckpt.source_format == "nanogpt"
    assert isinstance(ckpt.tokenizer, CharTokenizer)
    assert ckpt.config.bias is bias
    assert ckpt.provenance["iterations"] == 250
    assert ckpt.provenance["val_loss"] == pytest.approx(1.4697)
    prompt = ckpt.tokenizer.encode("First")
    want = reference_generate(original, prompt, 40, temperature=0.0)  # past block_size 16
    got = reference_generate(ckpt.model, prompt, 40, temperature=0.0)
    assert got == want, "loaded nanoGPT checkpoint generates different tokens"
    assert ckpt.tokenizer.decode(got) == CharTokenizer(sorted(set(TEXT))).decode(want)


def test_nanogpt_checkpoint_without_meta_uses_gpt2_bpe(tmp_path):
    _nanogpt_checkpoint(tmp_path, bias=True, compiled=False)
    (tmp_path / "meta.pkl").unlink()
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    ckpt["model_args"]["vocab_size"] = 50304
    state = GPT(GPTConfig(**ckpt["model_args"])).state_dict()
    ckpt["model"] = state
    torch.save(ckpt, tmp_path / "ckpt.pt")
    loaded = load_checkpoint(tmp_path / "ckpt.pt")
    assert loaded.tokenizer.vocab_size == 50257 and loaded.tokenizer.eot_id == 50256


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_ckpt_is_refused_without_executing(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": {}, "model_args": _Exploit(marker)}, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(tmp_path / "ckpt.pt")
    assert not marker.exists(), "loading the checkpoint executed code"


def test_malicious_meta_pkl_is_refused_without_executing(tmp_path):
    _nanogpt_checkpoint(tmp_path, bias=False, compiled=False)
    marker = tmp_path / "pwned"
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump({"itos": _Exploit(marker)}, f)
    with pytest.raises(CheckpointError, match=r"meta\.pkl: refused"):
        load_checkpoint(tmp_path)
    assert not marker.exists(), "loading meta.pkl executed code"
