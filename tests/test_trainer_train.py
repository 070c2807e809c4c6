"""A few-iteration training run on tiny data, end to end through ``main([...])``."""

from __future__ import annotations

import pytest
import torch
from trainer_support import (
    TINY,
    records,
    single_thread,  # noqa: F401 (a fixture)
    write_corpus,
)

from model.checkpoint import load_checkpoint
from trainer.cli import main
from trainer.config import PRESETS, build_train_spec
from trainer.optim import learning_rate

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Prepare the corpus and train 30 steps; shared by the tests below."""
    root = tmp_path_factory.mktemp("train")
    corpus = write_corpus(root)
    assert main(["prepare", "--input", str(corpus), "--out", str(root / "data")]) == 0
    args = [
        "train",
        "--data",
        str(root / "data"),
        "--out",
        str(root / "run"),
        *TINY,
        "--max-iters",
        "30",
        "--eval-interval",
        "10",
    ]
    assert main(args) == 0
    return root


def test_run_folder_holds_best_latest_log_and_curve(tiny_run):
    run = tiny_run / "run"
    assert (run / "best" / "model.safetensors").is_file()
    assert (run / "latest" / "train_state.pt").is_file()
    assert not (run / "best" / "train_state.pt").exists(), "best/ is for serving: no optimizer"
    assert (run / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    evals = records(run, "eval")
    assert [r["step"] for r in evals] == [0, 10, 20, 30]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5, f"no learning: {evals}"
    assert evals[-1]["tokens_seen"] == 30 * 8 * 32


def test_best_checkpoint_loads_with_provenance_and_matches_logged_val_loss(tiny_run):
    ckpt = load_checkpoint(tiny_run / "run" / "best")
    best = min(records(tiny_run / "run", "eval"), key=lambda r: r["val_loss"])
    prov = ckpt.provenance
    assert prov["iterations"] == best["step"] and prov["val_loss"] == pytest.approx(
        best["val_loss"]
    )
    assert prov["dataset"].endswith("data") and prov["tokens_seen"] == best["tokens_seen"]
    assert prov["hyperparameters"]["n_embd"] == 32 and "date" in prov
    assert ckpt.config.n_layer == 2 and ckpt.config.vocab_size == ckpt.tokenizer.vocab_size


def test_sample_and_export_hf_work_on_the_trained_checkpoint(tiny_run, capsys):
    best = str(tiny_run / "run" / "best")
    capsys.readouterr()
    assert main(["sample", "--checkpoint", best, "--prompt", "First", "--max-tokens", "20"]) == 0
    text = capsys.readouterr().out.rstrip("\n")
    assert text.startswith("First") and len(text) == len("First") + 20, repr(text)
    assert main(["export-hf", "--checkpoint", best, "--out", str(tiny_run / "hf")]) == 0
    hf = load_checkpoint(tiny_run / "hf")
    assert hf.source_format == "huggingface" and hf.config.n_embd == 32
    ours = load_checkpoint(best).tokenizer
    assert hf.tokenizer.encode("First Citizen") == ours.encode("First Citizen"), "char vocab lost"


def test_fresh_run_refuses_to_overwrite_an_existing_run(tiny_run, capsys):
    before = (tiny_run / "run" / "latest" / "model.safetensors").read_bytes()
    args = ["train", "--data", str(tiny_run / "data"), "--out", str(tiny_run / "run"), *TINY]
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (tiny_run / "run" / "latest" / "model.safetensors").read_bytes() == before


def test_presets_layer_under_explicit_flags_and_unknown_keys_are_errors():
    spec = build_train_spec("shakespeare-char", batch_size=12)
    assert (spec.model.n_layer, spec.model.n_embd, spec.model.block_size) == (6, 384, 256)
    assert (
        spec.loop.batch_size == 12
        and spec.loop.max_iters == PRESETS["shakespeare-char"]["max_iters"]
    )
    with pytest.raises(ValueError, match="unknown hyperparameters: n_layers"):
        build_train_spec(None, n_layers=3)
    with pytest.raises(ValueError, match="divisible"):
        build_train_spec(None, n_embd=30, n_head=4)


def test_lr_schedule_warms_up_linearly_then_decays_by_cosine_to_min_lr():
    optim = build_train_spec("cpu-small").optim
    lrs = [learning_rate(s, optim, 1000) for s in range(1001)]
    warm = optim.warmup_iters
    assert lrs[0] < lrs[warm // 2] < lrs[warm - 1] <= optim.learning_rate
    assert all(a >= b for a, b in zip(lrs[warm:-1], lrs[warm + 1 :], strict=True)), (
        "cosine must not increase"
    )
    assert lrs[1000] == optim.min_lr and lrs[warm] == pytest.approx(optim.learning_rate)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_on_cpu_trains_and_saves_fp32_weights(tiny_run, dtype):
    out = tiny_run / f"run-{dtype}"
    args = [
        "train",
        "--data",
        str(tiny_run / "data"),
        "--out",
        str(out),
        *TINY,
        "--dtype",
        dtype,
        "--max-iters",
        "6",
        "--eval-interval",
        "3",
        "--grad-accum-steps",
        "2",
    ]
    assert main(args) == 0
    evals = records(out, "eval")
    assert evals[-1]["val_loss"] < evals[0]["val_loss"], evals
    ckpt = load_checkpoint(out / "latest")
    assert all(p.dtype == torch.float32 for p in ckpt.model.parameters())


def test_a_device_this_machine_lacks_is_one_error_line(tiny_run, capsys):
    """cuda:N one past the last GPU: no GPU at all on a CPU host, an index out of range on a GPU
    host. Either way one error line, before anything is written."""
    count = torch.cuda.device_count()
    args = ["train", "--data", str(tiny_run / "data"), "--out", str(tiny_run / "nodev"), *TINY]
    assert main([*args, "--device", f"cuda:{count}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    expected = (
        f"error: --device cuda:{count}: this machine has {count} CUDA GPU(s), cuda:0 to "
        f"cuda:{count - 1}"
        if torch.cuda.is_available()
        else f"error: --device cuda:{count}: no CUDA GPU is available to this torch build"
    )
    assert err == [expected], err
    assert not (tiny_run / "nodev").exists()


def test_auto_device_and_dtype_train_on_the_best_device_here(tiny_run, capsys):
    """--device auto / --dtype auto: CUDA with bf16 autocast on a GPU host, fp32 on CPU otherwise;
    the run learns and latest/ keeps fp32 weights either way."""
    out = tiny_run / "auto"
    args = ["train", "--data", str(tiny_run / "data"), "--out", str(out), *TINY]
    args += ["--device", "auto", "--dtype", "auto", "--max-iters", "20", "--eval-interval", "10"]
    assert main(args) == 0
    banner = capsys.readouterr().err
    cuda = torch.cuda.is_available()
    expect = "cuda:0 bfloat16" if cuda and torch.cuda.is_bf16_supported() else "cpu float32"
    assert expect in banner, banner
    evals = records(out, "eval")
    assert evals[-1]["val_loss"] < evals[0]["val_loss"], evals
    ckpt = load_checkpoint(out / "latest")
    assert all(p.dtype == torch.float32 for p in ckpt.model.parameters())


def test_the_step_zero_eval_that_prints_best_saves_best(tiny_run, tmp_path):
    from trainer_support import ENDLESS, start_trainer, wait_for

    run = tmp_path / "run"
    proc = start_trainer("train", "--data", str(tiny_run / "data"), "--out", str(run), *TINY,
                         *ENDLESS, "--eval-interval", "1000000", "--log-interval", "1")  # fmt: skip
    try:
        wait_for(lambda: bool(_train_records(run)), proc, "the first step after the step-0 eval")
    finally:
        proc.send_signal(2)  # SIGINT: saves latest/ and exits
        proc.wait(60)
    assert records(run, "eval")[0]["step"] == 0
    assert load_checkpoint(run / "best").provenance["iterations"] == 0, (
        "step 0 printed (best) but saved no best/"
    )


def _train_records(run) -> list[dict]:
    try:
        return records(run, "train")
    except (FileNotFoundError, ValueError):
        return []


def _sample(checkpoint, capsys) -> str:
    capsys.readouterr()
    argv = ["sample", "--checkpoint", str(checkpoint), "--prompt", "First", "--max-tokens", "20",
            "--seed", "3", "--temperature", "1.0"]  # fmt: skip
    assert main(argv) == 0
    return capsys.readouterr().out


def test_sample_and_the_server_take_a_run_folder_best_else_latest(tiny_run, tmp_path, capsys):
    import shutil

    import httpx
    from conftest import live_server

    run = tmp_path / "mine"
    shutil.copytree(tiny_run / "run", run)
    assert _sample(run, capsys) == _sample(run / "best", capsys)
    with live_server(run) as srv:
        card = httpx.get(srv.url + "/v1/models").json()["data"][0]
        assert card["checkpoint"]["checkpoint"] == "mine/best", card
    shutil.rmtree(run / "best")
    assert _sample(run, capsys) == _sample(run / "latest", capsys)


def test_no_eval_at_start_skips_the_step_zero_eval(tiny_run, tmp_path):
    run = tmp_path / "run"
    argv = ["train", "--data", str(tiny_run / "data"), "--out", str(run), *TINY,
            "--max-iters", "4", "--eval-interval", "2", "--no-eval-at-start"]  # fmt: skip
    assert main(argv) == 0
    assert [r["step"] for r in records(run, "eval")] == [2, 4]
    assert load_checkpoint(run / "best").provenance["iterations"] in (2, 4)


def test_the_cpu_tiny_preset_is_smaller_than_cpu_small_and_trains(tiny_run, tmp_path):
    tiny, small = build_train_spec("cpu-tiny"), build_train_spec("cpu-small")

    def work(spec) -> int:  # parameters x tokens over the run, evals included
        loop, shape = spec.loop, spec.model
        tokens = loop.batch_size * shape.block_size
        evals = loop.max_iters // loop.eval_interval + 1
        params = shape.n_layer * 12 * shape.n_embd**2
        return params * tokens * (loop.max_iters * 3 + evals * 2 * loop.eval_iters)

    assert work(tiny) * 3 < work(small), "cpu-tiny must be a fraction of cpu-small's work"
    run = tmp_path / "run"
    argv = ["train", "--data", str(tiny_run / "data"), "--out", str(run), "--preset", "cpu-tiny",
            "--max-iters", "3", "--eval-iters", "1", "--no-progress", "--peak-flops", "1e9"]  # fmt: skip
    assert main(argv) == 0
    assert load_checkpoint(run / "latest").provenance["preset"] == "cpu-tiny"
