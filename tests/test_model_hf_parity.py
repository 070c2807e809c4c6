"""Parity with Hugging Face GPT-2: the oracle for the network (minGPT's test, on random weights)."""

from __future__ import annotations

import pytest
import torch

from model import (
    GPT,
    CharTokenizer,
    GPTConfig,
    export_huggingface,
    load_checkpoint,
    reference_generate,
)
from model.checkpoint.hf_tokenizer import write_char_files

transformers = pytest.importorskip("transformers")


def _random_hf_gpt2(activation: str = "gelu_new"):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=101,
        n_positions=24,
        n_embd=32,
        n_layer=2,
        n_head=4,
        activation_function=activation,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # non-zero biases and LayerNorm params, so transposes and names matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _chars(n: int) -> CharTokenizer:
    """A vocabulary of ``n`` tokens: a GPT-2 folder without tokenizer files is GPT-2's 50,257-token
    BPE, too many for these tiny models, so each folder gets a character vocabulary of its size."""
    return CharTokenizer([chr(0x100 + i) for i in range(n)])


@pytest.mark.parametrize("safetensors", [True, False])
@pytest.mark.parametrize("activation", ["gelu_new", "gelu"])
def test_hf_gpt2_folder_loads_with_equal_logits(tmp_path, safetensors, activation):
    hf = _random_hf_gpt2(activation)
    hf.save_pretrained(tmp_path, safe_serialization=safetensors)
    write_char_files(_chars(101), tmp_path)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.source_format == "huggingface"
    idx = torch.randint(0, 101, (3, 24))
    with torch.no_grad():
        ours, _ = ckpt.model(idx)
        theirs = hf(idx).logits
    err = (ours - theirs).abs().max().item()
    assert err < 1e-5, f"max |ours - HF| logit difference {err}"


def test_greedy_tokens_equal_hf_generate(tmp_path):
    hf = _random_hf_gpt2()
    hf.save_pretrained(tmp_path)
    write_char_files(_chars(101), tmp_path)
    ckpt = load_checkpoint(tmp_path)
    prompt = [5, 17, 42, 3]
    ours = reference_generate(ckpt.model, prompt, 12, temperature=0.0)
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        )
    assert ours == out[0, len(prompt) :].tolist(), "greedy tokens differ from transformers.generate"


@pytest.mark.parametrize("bias", [True, False])
def test_exported_checkpoint_loads_in_transformers_with_equal_logits(tmp_path, bias):
    torch.manual_seed(1)
    ours = GPT(GPTConfig(block_size=16, vocab_size=67, n_layer=2, n_head=2, n_embd=24, bias=bias)).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    export_huggingface(ours, tmp_path / "hf", tokenizer=_chars(67))
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 67, (2, 16))
    with torch.no_grad():
        err = (ours(idx)[0] - hf(idx).logits).abs().max().item()
    assert err < 1e-5, f"exported model's logits differ in transformers by {err}"
    # and it round-trips through our own loader
    again = load_checkpoint(tmp_path / "hf")
    with torch.no_grad():
        assert torch.allclose(again.model(idx)[0], ours(idx)[0], atol=1e-5)
