"""Live reload reads only whole checkpoints, and refuses bad ones (no server needed).

The HTTP-level reload test (a trainer writing while clients stream) is tests/test_reload_live.py.
"""

from __future__ import annotations

import threading

import pytest
import torch
from deploy_support import make_tiny_checkpoint

from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.tokenizer import CharTokenizer
from service.reload import Fingerprint, FolderChanged, ModelInfo, check_compatible, load_consistent


@pytest.mark.timeout(60)
def test_reader_never_mixes_config_and_weights_of_two_checkpoints(tmp_path):
    # Four distinct checkpoints, made up front (GPT's init draws from the global RNG, which the
    # reader's loads also draw from: the writer thread only saves).
    models, refs = {}, {}
    for it in range(4):
        ck = load_checkpoint(make_tiny_checkpoint(tmp_path / f"ref{it}", seed=it))
        models[it], refs[it] = ck.model, ck.model.transformer.wte.weight.detach().clone()
    spec = ck.tokenizer.spec()
    live = tmp_path / "latest"
    save_checkpoint(live, models[0], spec, {"iterations": 0})
    stop = threading.Event()

    def trainer():  # rewrites the folder atomically, as the trainer does, as fast as it can
        it = 0
        while not stop.is_set():
            it = (it + 1) % 4
            save_checkpoint(live, models[it], spec, {"iterations": it})

    writer = threading.Thread(target=trainer)
    writer.start()
    loads = races = 0
    try:
        while loads < 30:
            try:
                ck = load_consistent(live).checkpoint
            except FolderChanged:
                races += 1
                continue
            it = ck.provenance["iterations"]
            assert torch.equal(ck.model.transformer.wte.weight, refs[it]), (
                f"config.json said iteration {it} but the weights are another checkpoint's"
            )
            assert ck.path == live, "the checkpoint must report the watched path, not the handle"
            loads += 1
    finally:
        stop.set()
        writer.join()
    assert loads == 30


def test_fingerprint_changes_with_each_atomic_save_and_not_otherwise(tmp_path):
    live = make_tiny_checkpoint(tmp_path / "best", seed=1)
    first = Fingerprint.of(live)
    assert Fingerprint.of(live) == first, "an untouched checkpoint must keep its fingerprint"
    make_tiny_checkpoint(live, seed=2)
    assert Fingerprint.of(live) != first, "a new atomic save must change the fingerprint"
    assert Fingerprint.of(tmp_path / "missing") is None


def test_truncated_weights_are_refused_not_loaded(tmp_path):
    live = make_tiny_checkpoint(tmp_path / "best", seed=1)
    weights = live / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_consistent(live)


def test_nan_weights_and_a_different_tokenizer_are_refused(tmp_path):
    live = load_checkpoint(make_tiny_checkpoint(tmp_path / "a", seed=1))
    spec = live.tokenizer.spec()
    check_compatible(live, spec)  # the same checkpoint is compatible with itself
    other = CharTokenizer(list("abc"))
    with pytest.raises(CheckpointError, match="tokenizer"):
        check_compatible(live, other.spec())
    model = live.model
    with torch.no_grad():
        model.transformer.wte.weight[0, 0] = float("nan")
    save_checkpoint(tmp_path / "nan", model, spec, {})
    with pytest.raises(CheckpointError, match="NaN"):
        check_compatible(load_consistent(tmp_path / "nan").checkpoint, spec)


def test_model_info_reads_the_trainers_provenance(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "best", provenance={"iterations": 250, "val_loss": 1.5})
    info = ModelInfo.of(load_consistent(path).checkpoint, path)
    assert (info.iteration, info.val_loss, info.path) == (250, 1.5, path)
    assert info.checkpoint == f"{tmp_path.name}/best", "clients see the run and folder, not a path"
