"""A real checkpoint whose greedy output is known in advance, for tests that need exact text.

``save_scripted_checkpoint`` builds a char-level GPT whose every layer adds nothing (zero output
projections) and whose position embeddings point at the next character of a script: greedy
decoding then writes ``script`` right after a prompt of ``prompt_len`` tokens, whatever that prompt
says. It is a genuine GPT run by the genuine engine; only its weights are chosen by hand.
"""

from __future__ import annotations

from conftest import ALPHABET

PULL = 10.0  # how strongly a position embedding points at its scripted character


def save_scripted_checkpoint(path, prompt_len: int, script: str, *, block_size: int = 64):
    import torch

    from model import GPT, GPTConfig, save_checkpoint
    from model.tokenizer import CharTokenizer

    tokenizer = CharTokenizer(list(ALPHABET))
    vocab = tokenizer.vocab_size
    if prompt_len + len(script) > block_size:
        raise ValueError("the script must fit in the window after the prompt")
    config = GPTConfig(
        block_size=block_size, vocab_size=vocab, n_layer=1, n_head=2, n_embd=vocab + vocab % 2
    )
    model = GPT(config)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if "c_proj" in name:
                tensor.zero_()  # attention and MLP add nothing to the residual stream
        wte = model.transformer.wte.weight  # (vocab, n_embd), tied to lm_head
        wte.zero_()
        wte[:, :vocab] = torch.eye(vocab)
        wpe = model.transformer.wpe.weight  # (block_size, n_embd)
        wpe.zero_()
        # the token at position p predicts the one at p + 1
        for i, char in enumerate(script):
            wpe[prompt_len - 1 + i, tokenizer.encode(char)[0]] = PULL
    return save_checkpoint(path, model, tokenizer.spec(), {"note": f"scripted: {script!r}"})
