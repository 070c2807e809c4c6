"""Native checkpoints: round trip, atomic replacement, and one clear error per bad file."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from model import GPT, CharTokenizer, CheckpointError, GPTConfig, load_checkpoint, save_checkpoint

CHARS = list("abcdefgh \n")


def _model(seed: int, n_embd: int = 16) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=8, vocab_size=len(CHARS), n_layer=1, n_head=2, n_embd=n_embd))


def _save(path, model, val_loss=1.5):
    return save_checkpoint(path, model, CharTokenizer(CHARS).spec(), {"val_loss": val_loss})


def test_native_round_trip_keeps_weights_tokenizer_and_provenance(tmp_path):
    model = _model(0)
    _save(tmp_path / "ck", model, val_loss=1.23)
    ckpt = load_checkpoint(tmp_path / "ck")
    assert ckpt.source_format == "gptserve"
    assert ckpt.config == model.config
    assert ckpt.tokenizer.decode(ckpt.tokenizer.encode("abc h")) == "abc h"
    assert ckpt.provenance == {"val_loss": 1.23}
    for name, tensor in model.state_dict().items():
        assert torch.equal(ckpt.model.state_dict()[name], tensor), f"{name} changed in round trip"
    assert ckpt.model.lm_head.weight is ckpt.model.transformer.wte.weight, "head is not tied"


def test_fp16_weights_load_as_fp32(tmp_path):
    model = _model(0)
    save_checkpoint(tmp_path / "ck", model, CharTokenizer(CHARS).spec(), dtype=torch.float16)
    ckpt = load_checkpoint(tmp_path / "ck")
    assert ckpt.model.transformer.wte.weight.dtype == torch.float32
    assert torch.allclose(ckpt.model.transformer.wte.weight, model.transformer.wte.weight, atol=1e-3)


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path):
    _save(tmp_path / "ck", _model(0))

    def explode(path):
        path.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path / "ck", _model(1), CharTokenizer(CHARS).spec(),
                        extra_files={"train_state.pt": explode})
    survivor = load_checkpoint(tmp_path / "ck")
    assert torch.equal(survivor.model.transformer.wte.weight, _model(0).transformer.wte.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"], "temporary folder left behind"


def test_process_killed_mid_save_leaves_previous_checkpoint_intact(tmp_path):
    _save(tmp_path / "ck", _model(0))
    # A real process dies (os._exit: no cleanup, like SIGKILL) halfway through writing.
    script = textwrap.dedent(f"""
        import os, torch
        from model import GPT, GPTConfig, CharTokenizer, save_checkpoint
        model = GPT(GPTConfig(block_size=8, vocab_size={len(CHARS)}, n_layer=1, n_head=2, n_embd=16))
        def die(path):
            path.write_bytes(b"partial")
            os._exit(9)
        save_checkpoint({str(tmp_path / "ck")!r}, model, CharTokenizer({CHARS!r}).spec(),
                        extra_files={{"train_state.pt": die}})
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, timeout=120, check=False
    )
    assert proc.returncode == 9, proc.stderr.decode()
    survivor = load_checkpoint(tmp_path / "ck")
    assert torch.equal(survivor.model.transformer.wte.weight, _model(0).transformer.wte.weight)
    # and the next save still works and replaces it
    _save(tmp_path / "ck", _model(2))
    assert torch.equal(load_checkpoint(tmp_path / "ck").model.transformer.wte.weight,
                       _model(2).transformer.wte.weight)


def test_interrupted_non_atomic_swap_is_recovered(tmp_path):
    _save(tmp_path / "ck", _model(0))
    (tmp_path / "ck").rename(tmp_path / ".ck.old-123")  # died between the fallback's two renames
    ckpt = load_checkpoint(tmp_path / "ck")
    assert torch.equal(ckpt.model.transformer.wte.weight, _model(0).transformer.wte.weight)


def test_missing_path_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope: does not exist"):
        load_checkpoint(tmp_path / "nope")


def test_truncated_weights_are_reported(tmp_path):
    _save(tmp_path / "ck", _model(0))
    weights = tmp_path / "ck" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unreadable or truncated"):
        load_checkpoint(tmp_path / "ck")


def test_wrong_shapes_are_reported(tmp_path):
    _save(tmp_path / "ck", _model(0, n_embd=16))
    other = tmp_path / "other"
    _save(other, _model(0, n_embd=32))
    (tmp_path / "ck" / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=r"tensor transformer\.\S+ has shape"):
        load_checkpoint(tmp_path / "ck")


def test_unknown_format_and_bad_json_are_reported(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        load_checkpoint(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_checkpoint(tmp_path / "bad")
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown checkpoint file"):
        load_checkpoint(tmp_path / "weights.npz")


def test_unknown_config_keys_are_an_error(tmp_path):
    _save(tmp_path / "ck", _model(0))
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["model"]["n_experts"] = 8
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unknown GPTConfig keys: n_experts"):
        load_checkpoint(tmp_path / "ck")


def test_saved_folder_has_ordinary_permissions(tmp_path):
    import os
    import stat

    _save(tmp_path / "ck", _model(0))
    umask = os.umask(0)
    os.umask(umask)
    folder_mode = stat.S_IMODE((tmp_path / "ck").stat().st_mode)
    file_mode = stat.S_IMODE((tmp_path / "ck" / "model.safetensors").stat().st_mode)
    assert folder_mode == 0o777 & ~umask, oct(folder_mode)
    assert file_mode == 0o666 & ~umask, oct(file_mode)
