"""The benchmark's models and prompts, built once and cached in the work folder.

- ``gpt2_small``: a GPT-2-small-shaped network (12 layers x 12 heads x 768 wide, vocab 50257,
  context 1024, ``gelu_new``) with random weights from a fixed seed, written by transformers'
  ``save_pretrained`` (safetensors) plus GPT-2's tokenizer files, so vLLM, CTranslate2's converter,
  HF and gptserve all read the same folder offline.
- ``tiny``: the shipped character model (``weights/shakespeare-char``) exported by gptserve's
  ``export_huggingface``.
- ``ctranslate2_folder``: either one converted by CTranslate2's ``TransformersConverter`` (fp32).

Every system must generate exactly the asked number of tokens, and gptserve's HTTP API has no
ignore-EOS switch. So the random model's end-of-text row of the (tied) embedding is zeroed: under
greedy decoding its logit is exactly 0 while the largest of the 50,256 other logits (random,
std ~0.5) is ~+2.3, so no system can pick it. vLLM, CTranslate2 and HF are told to ignore EOS too.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

GPT2_EOT = 50256


@dataclass(frozen=True)
class ModelFiles:
    """A Hugging Face GPT-2 folder and the figures the report needs about it."""

    name: str
    hf: Path
    params: int  # parameters, the tied embedding counted once
    block_size: int
    vocab_size: int


def _count_params(folder: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def _files(name: str, folder: Path) -> ModelFiles:
    cfg = json.loads((folder / "config.json").read_text())
    return ModelFiles(name, folder, _count_params(folder), cfg["n_positions"], cfg["vocab_size"])


SHAPES = {"small": (12, 768, 12), "xl": (48, 1600, 25)}  # (n_layer, n_embd, n_head)


def gpt2_small(workdir: Path, seed: int = 0, shape: str = "small") -> ModelFiles:
    """The GPT-2-small-shaped random model's folder, built on first use (``shape="xl"``: GPT-2
    XL's shape instead, 48 x 1600, for the bandwidth-bound rows of bench/gpu.sh; its workloads
    keep the "gpt2-small" label, and the header prints the parameter count)."""
    n_layer, n_embd, n_head = SHAPES[shape]
    folder = workdir / (f"gpt2-small-seed{seed}" if shape == "small" else
                        f"gpt2-{shape}-seed{seed}")
    if not (folder / "model.safetensors").is_file():
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        from model.checkpoint.hf_tokenizer import write_tokenizer_files
        from model.tokenizer import TiktokenTokenizer

        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        config = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=n_embd, n_layer=n_layer,
                            n_head=n_head, activation_function="gelu_new", bos_token_id=GPT2_EOT,
                            eos_token_id=GPT2_EOT)
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config).eval()
        with torch.no_grad():
            model.transformer.wte.weight[GPT2_EOT].zero_()  # greedy never picks EOS (docstring)
        model.save_pretrained(tmp, safe_serialization=True)
        write_tokenizer_files(TiktokenTokenizer.by_name("gpt2"), tmp)
        tmp.rename(folder)
    return _files("gpt2-small", folder)


def tiny(workdir: Path, checkpoint: Path) -> ModelFiles:
    """The shipped character model as a Hugging Face folder (export_huggingface, built once)."""
    folder = workdir / f"{checkpoint.name}-hf"
    if not (folder / "model.safetensors").is_file():
        from model.checkpoint import export_huggingface, load_checkpoint

        ck = load_checkpoint(checkpoint)
        export_huggingface(ck.model, folder, ck.tokenizer)
    return _files(checkpoint.name, folder)


def ctranslate2_folder(model: ModelFiles, workdir: Path) -> Path:
    """``model`` converted to CTranslate2 (weights kept fp32), converted once."""
    out = workdir / f"{model.hf.name}-ct2"
    if not (out / "model.bin").is_file():
        from ctranslate2.converters import TransformersConverter

        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        TransformersConverter(str(model.hf)).convert(str(tmp), force=True)
        config = json.loads((tmp / "config.json").read_text())
        if config.get("eos_token") is None:
            # a char vocabulary has no special tokens, but CTranslate2 refuses to load a model
            # without named ones; the first char stands in, never used: generation passes
            # end_token=[] (and min_length would suppress it)
            first = json.loads((tmp / "vocabulary.json").read_text())[0]
            config.update(bos_token=first, eos_token=first, unk_token=first)
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tmp.rename(out)
    return out


def gpt2_prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    """``n`` prompts of ``length`` GPT-2 BPE tokens cut from the corpus at ``GPTSERVE_TEST_CORPUS``
    (random token ids when it is unset), the same for every system."""
    rng = random.Random(seed)
    ids = _corpus_ids(lambda text: _bpe().encode(text))
    if len(ids) <= length:
        return [[rng.randrange(GPT2_EOT) for _ in range(length)] for _ in range(n)]
    starts = [rng.randrange(len(ids) - length) for _ in range(n)]
    return [ids[s : s + length] for s in starts]


def tiny_prompts(n: int, length: int, checkpoint: Path, seed: int = 0) -> list[list[int]]:
    """``n`` character prompts of ``length`` characters for the shipped model."""
    from model.checkpoint import load_checkpoint

    tokenizer = load_checkpoint(checkpoint).tokenizer
    rng = random.Random(seed)
    ids = _corpus_ids(tokenizer.encode)
    if len(ids) <= length:
        return [[rng.randrange(tokenizer.vocab_size) for _ in range(length)] for _ in range(n)]
    starts = [rng.randrange(len(ids) - length) for _ in range(n)]
    return [ids[s : s + length] for s in starts]


def _bpe():
    from model.tokenizer import TiktokenTokenizer

    return TiktokenTokenizer.by_name("gpt2")


def _corpus_ids(encode) -> list[int]:
    corpus = os.environ.get("GPTSERVE_TEST_CORPUS")
    if not corpus or not Path(corpus).is_file():
        return []
    try:
        return encode(Path(corpus).read_text(encoding="utf-8")[:100_000])
    except ValueError:
        return []
