"""``--resume``: exact after a SIGKILL, and it restores the run's own settings (nanoGPT's
``init_from='resume'``), with only the flags named again overriding them.

Exactness holds because everything random is restored: the data sampler's generator, every rank's
dropout RNG, AdamW's moments and step counts, and fp32 weights; eval batches come from their own
fixed generator. Both runs use one CPU thread, so the arithmetic is the same op for op.
"""

from __future__ import annotations

import json
import signal

import pytest
from trainer_support import (
    ENDLESS,
    TINY,
    curve,
    latest_step,
    records,
    single_thread,  # noqa: F401 (a fixture)
    start_trainer,
    wait_for,
    write_corpus,
)

from trainer.cli import main
from trainer.config import DEFAULTS, PRESETS, build_train_spec, resume_spec

pytestmark = pytest.mark.usefixtures("single_thread")

# lr_decay_iters is pinned, so the schedule does not depend on max_iters: the endless victim and a
# reference run that stops at any step train identical steps.
RUN = [*TINY, "--eval-interval", "5", "--log-interval", "1", "--lr-decay-iters", "30"]


@pytest.fixture
def data(tmp_path):
    corpus = write_corpus(tmp_path)
    assert main(["prepare", "--input", str(corpus), "--out", str(tmp_path / "data")]) == 0
    return ["--data", str(tmp_path / "data")]


@pytest.mark.timeout(240)
def test_sigkilled_run_resumed_has_the_uninterrupted_loss_curve(tmp_path, data):
    cut, ref = tmp_path / "cut", tmp_path / "ref"
    victim = start_trainer("train", *data, "--out", str(cut), *RUN, *ENDLESS)
    # The kill lands wherever it lands (mid-step, mid-save...): the run cannot finish first, and
    # the rest of the test starts from whatever checkpoint the kill left.
    wait_for(lambda: latest_step(cut) >= 5, victim, "its first checkpoint")
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    killed_at = latest_step(cut)
    assert killed_at >= 5 and killed_at % 5 == 0, killed_at
    end = killed_at + 10

    resumed = start_trainer("train", *data, "--out", str(cut), "--resume", "--max-iters", str(end))
    reference = start_trainer("train", *data, "--out", str(ref), *RUN, "--max-iters", str(end))
    _, resumed_err = resumed.communicate(timeout=200)
    _, reference_err = reference.communicate(timeout=200)
    assert resumed.returncode == 0, resumed_err
    assert reference.returncode == 0, reference_err
    assert f"resuming {cut} from step {killed_at}" in resumed_err, resumed_err
    assert f"override --max-iters: 1000000000 -> {end}" in resumed_err, resumed_err

    expected = curve(ref)
    assert [s for s, *_ in expected["eval"]] == list(range(0, end + 1, 5))
    assert [s for s, *_ in expected["train"]] == list(range(1, end + 1))
    assert curve(cut) == expected, f"curves diverge after resuming at {killed_at}"
    best = json.loads((cut / "best" / "config.json").read_text())["provenance"]
    ref_best = json.loads((ref / "best" / "config.json").read_text())["provenance"]
    assert (best["iterations"], best["val_loss"]) == (ref_best["iterations"], ref_best["val_loss"])
    assert not [p.name for p in cut.iterdir() if ".tmp-" in p.name], "a killed save was left"


def test_resume_continues_a_finished_run_when_max_iters_is_raised(tmp_path, data, capsys):
    run = tmp_path / "run"
    base = ["train", *data, "--out", str(run), *TINY, "--eval-interval", "10"]
    assert main([*base, "--lr-decay-iters", "40", "--max-iters", "20"]) == 0
    capsys.readouterr()
    assert main(["train", *data, "--out", str(run), "--resume", "--max-iters", "40"]) == 0
    err = capsys.readouterr().err
    assert f"resuming {run} from step 20" in err and "override --max-iters: 20 -> 40" in err, err
    assert [r["step"] for r in records(run, "eval")] == [0, 10, 20, 30, 40]
    assert latest_step(run) == 40


def test_resuming_a_finished_run_says_there_is_nothing_to_train(tmp_path, data, capsys):
    run = tmp_path / "run"
    assert main(["train", *data, "--out", str(run), *TINY, "--max-iters", "4"]) == 0
    capsys.readouterr()
    assert main(["train", *data, "--out", str(run), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "already at step 4 of 4: nothing to train; raise --max-iters" in err, err
    assert latest_step(run) == 4


def test_shape_flags_and_another_preset_are_refused_on_resume_and_change_nothing(
    tmp_path, data, capsys
):
    run = tmp_path / "run"
    assert main(["train", *data, "--out", str(run), *TINY, "--max-iters", "2"]) == 0
    before = (run / "latest" / "model.safetensors").read_bytes()
    capsys.readouterr()
    resume = ["train", *data, "--out", str(run), "--resume"]
    assert main([*resume, "--n-embd", "64"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: --n-embd 64: a resumed run keeps its model shape (n_embd is 32); start a new run "
        "(another --out) to train a different shape"
    ), err
    assert main([*resume, "--preset", "cpu-small"]) == 2
    assert "this run was started with no preset" in capsys.readouterr().err
    assert (run / "latest" / "model.safetensors").read_bytes() == before


# --- resume_spec, table-driven: what a resumed run's settings are ------------------------------

RECORDED = build_train_spec("cpu-small", max_iters=150, n_layer=2, n_embd=64).flat()


@pytest.mark.parametrize(
    ("preset", "overrides", "expect", "notes"),
    [
        # nothing named: the recorded run, not the defaults and not the preset's 2000 steps
        (None, {}, {"max_iters": 150, "n_layer": 2, "n_embd": 64, "batch_size": 32}, []),
        # the same preset again re-applies nothing
        ("cpu-small", {}, {"max_iters": 150, "n_layer": 2}, []),
        # a flag equal to the recorded value is not an override
        (None, {"max_iters": 150}, {"max_iters": 150}, []),
        (
            "cpu-small",
            {"max_iters": 300, "eval_interval": 50},
            {"max_iters": 300, "eval_interval": 50, "n_embd": 64},
            [
                "override --max-iters: 150 -> 300",
                "  the learning rate now decays to --min-lr at step 300 instead of 150; pin it "
                "with --lr-decay-iters",
                "override --eval-interval: 250 -> 50",
            ],
        ),
        (None, {"dropout": 0.1}, {"dropout": 0.1}, ["override --dropout: 0.0 -> 0.1"]),
    ],
)
def test_resume_spec_keeps_the_recorded_run_and_reports_each_override(
    preset, overrides, expect, notes
):
    spec, printed = resume_spec(RECORDED, preset, overrides)
    flat = spec.flat()
    assert {k: flat[k] for k in expect} == expect
    assert printed == notes
    assert spec.preset == "cpu-small"
    assert PRESETS["cpu-small"]["max_iters"] == 2000, "the case above must tell the two apart"


@pytest.mark.parametrize(
    ("preset", "overrides", "message"),
    [
        ("shakespeare-char", {}, "started with --preset cpu-small"),
        (None, {"n_layer": 3}, "--n-layer 3: a resumed run keeps its model shape"),
        (None, {"bias": True}, "--bias True: a resumed run keeps its model shape"),
        (None, {"n_layers": 3}, "unknown hyperparameters: n_layers"),
        (None, {"max_iters": 0}, "max_iters must be positive"),
    ],
)
def test_resume_spec_refuses_what_a_resumed_run_cannot_change(preset, overrides, message):
    with pytest.raises(ValueError, match=message):
        resume_spec(RECORDED, preset, overrides)


def test_resume_spec_reads_settings_recorded_by_an_older_trainer():
    older = {k: v for k, v in RECORDED.items() if k not in ("log_interval", "tensorboard")}
    spec, notes = resume_spec({**older, "retired_knob": 1}, None, {})
    assert spec.log.log_interval == DEFAULTS["log_interval"] and spec.loop.max_iters == 150
    assert notes == ["ignored retired_knob=1 recorded by another trainer version"]


def test_a_resumed_run_is_refused_without_a_checkpoint(tmp_path, data, capsys):
    assert main(["train", *data, "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --resume: {tmp_path / 'none'} has no latest/ checkpoint to resume from "
        "(start the run without --resume)"
    )
    assert not (tmp_path / "none").exists()
