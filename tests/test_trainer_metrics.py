"""Per-step metrics: log.jsonl every ``--log-interval`` steps, the same scalars in TensorBoard
(and W&B when asked), the loss curve drawn from both kinds of record, MFU against the documented
fixed peak with the measured one printed beside it, an ETA that leaves evals out, and progress
through the step-0 eval on a terminal."""

from __future__ import annotations

import contextlib
import fcntl
import io
import math
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import types

import pytest
import torch
from trainer_support import (
    REPO,
    TINY,
    child_env,
    records,
    single_thread,  # noqa: F401 (a fixture)
    trainer_cmd,
    without,
    write_corpus,
)

from model.checkpoint import load_checkpoint
from trainer import progress
from trainer.cli import main
from trainer.config import build_train_spec
from trainer.flops import PEAK_FLOPS, peak_flops
from trainer.metrics import MetricsLog, curve_series
from trainer.optim import learning_rate
from trainer.sinks import WANDB_ID_FILE

pytestmark = pytest.mark.usefixtures("single_thread")

# No --peak-flops: MFU divides by the table's CPU figure, and the banner shows a measured peak.
FLAGS = [*without(TINY, "--peak-flops"), "--max-iters", "20", "--eval-interval", "10"]
FLAGS += ["--log-interval", "5"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 20-step run logging every 5 steps; returns (run folder, its stderr)."""
    root = tmp_path_factory.mktemp("metrics")
    assert main(["prepare", "--input", str(write_corpus(root)), "--out", str(root / "d")]) == 0
    err = io.StringIO()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stderr(err):
            assert (
                main(["train", "--data", str(root / "d"), "--out", str(root / "run"), *FLAGS]) == 0
            )
    finally:
        torch.set_num_threads(before)
    return root / "run", err.getvalue()


def test_step_records_carry_loss_lr_grad_norm_throughput_and_mfu(run):
    folder, _ = run
    steps = records(folder, "train")
    assert [r["step"] for r in steps] == [5, 10, 15, 20]
    assert [r["step"] for r in records(folder, "eval")] == [0, 10, 20], "evals are still logged"
    latest = load_checkpoint(folder / "latest")
    recorded = dict(latest.provenance["hyperparameters"])
    spec = build_train_spec(recorded.pop("preset"), **recorded)
    flops_per_token = latest.model.estimate_flops_per_token()
    for r in steps:
        # the learning rate the step used: step s is the s-th step, index s - 1
        assert r["lr"] == learning_rate(r["step"] - 1, spec.optim, spec.lr_decay_iters), r
        assert math.isfinite(r["loss"]) and 0 < r["grad_norm"] < 100, r
        assert r["tokens_seen"] == r["step"] * 8 * 32 and r["tokens_per_s"] > 0, r
        expected_mfu = r["tokens_per_s"] * flops_per_token / PEAK_FLOPS["cpu", torch.float32]
        assert r["mfu"] == pytest.approx(expected_mfu, rel=1e-3, abs=2e-6), r
    assert steps[-1]["loss"] < steps[0]["loss"], steps


def test_banner_shows_the_table_peak_with_the_measured_one_beside_it_once(run):
    _, err = run
    banner = re.findall(r"MFU peak (.*)", err)
    assert len(banner) == 1, err
    assert re.fullmatch(
        r"1 TFLOP/s per device \(table: cpu float32\), measured matmul here [\d.e+-]+ TFLOP/s",
        banner[0],
    ), banner
    assert "metrics every 5 steps: " in err and "TensorBoard" in err, err


def test_tensorboard_holds_the_same_scalars_as_the_log(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder, _ = run
    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    logged = records(folder, "train")
    for name in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
        points = events.Scalars(f"train/{name}")
        assert [p.step for p in points] == [r["step"] for r in logged], name
        assert [p.value for p in points] == pytest.approx([r[name] for r in logged], rel=1e-5)
    val = events.Scalars("eval/val_loss")
    assert [(p.step, round(p.value, 4)) for p in val] == [
        (r["step"], round(r["val_loss"], 4)) for r in records(folder, "eval")
    ]


def test_loss_curve_draws_every_step_record_and_every_eval(run):
    folder, _ = run
    log = MetricsLog(folder)
    log.resume_at(20)  # reads the file back (and keeps every record: the run ended at 20)
    series = curve_series(log.records)
    steps = records(folder, "train")
    evals = records(folder, "eval")
    assert series["train (per step)"] == ([r["step"] for r in steps], [r["loss"] for r in steps])
    assert series["val (eval)"] == ([r["step"] for r in evals], [r["val_loss"] for r in evals])
    assert series["train (eval)"][1] == [r["train_loss"] for r in evals]
    assert (folder / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_peak_is_the_documented_table_figure_unless_given():
    cpu = torch.device("cpu")
    assert peak_flops(cpu, torch.float32, None).flops == 1e12
    assert peak_flops(cpu, torch.bfloat16, None).source == "table: cpu bfloat16"
    given = peak_flops(cpu, torch.float32, 3.5e11)
    assert (given.flops, given.source) == (3.5e11, "--peak-flops")
    assert PEAK_FLOPS["A100", torch.bfloat16] == 312e12, "nanoGPT's convention"


def test_eta_counts_training_time_only(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    clock = progress.TrainClock()
    bar = progress.ProgressBar(0, 10, clock, enabled=False)
    now[0] += 40  # the first step pays one-time costs (lazy imports, kernel selection)
    clock.lap()
    bar.step()
    assert clock.eta(9) is None and bar.postfix == "", "no ETA from the warm-up step alone"
    now[0] += 3
    clock.lap()
    bar.step()
    now[0] += 600  # a 10-minute eval and checkpoint
    clock.restart()
    now[0] += 3
    clock.lap()
    assert (clock.steps, clock.seconds) == (2, 6.0)
    bar.step()  # the third step of ten shown: 7 left at 3 s each
    assert bar.postfix == "eta 0:00:21", bar.postfix
    bar.show(2.5, 1234.0, 0.25)
    bar.step()
    assert bar.postfix == "loss 2.5000, 1,234 tok/s, mfu 25.0%, eta 0:00:18", bar.postfix


def test_step_zero_eval_shows_a_progress_bar_on_a_terminal(tmp_path):
    assert (
        main(["prepare", "--input", str(write_corpus(tmp_path)), "--out", str(tmp_path / "d")]) == 0
    )
    flags = [a for a in TINY if a != "--no-progress"] + ["--max-iters", "2", "--eval-iters", "3"]
    leader, follower = pty.openpty()
    # a terminal of known size (a fresh pty is 0x0, where tqdm has no room to draw)
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))
    proc = subprocess.Popen(
        trainer_cmd("train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "r"), *flags),
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=follower,
    )
    os.close(follower)
    out = b""
    while True:  # read until the child closes the terminal (it exits)
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: no writer left
            break
        if not chunk:
            break
        out += chunk
    os.close(leader)
    assert proc.wait(timeout=60) == 0, out.decode(errors="replace")
    text = out.decode(errors="replace")
    assert re.search(r"eval step 0: +\d+%.*\| \d/6 ", text), text  # 2 splits x 3 batches
    assert text.index("eval step 0") < text.index("step 0: train loss"), text
    assert re.search(r"eta \d+:\d\d:\d\d", text), "the step bar shows the ETA"


def test_wandb_without_the_package_is_one_error_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    assert (
        main(["prepare", "--input", str(write_corpus(tmp_path)), "--out", str(tmp_path / "d")]) == 0
    )
    capsys.readouterr()
    args = ["train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "r"), *TINY]
    assert main([*args, "--max-iters", "2", "--wandb"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --wandb: the wandb package is not installed (pip install wandb), or drop --wandb"
    ]


class _FakeWandbRun:
    def __init__(self, calls: list, **kwargs) -> None:
        self.id, self.calls = kwargs["id"], calls
        calls.append(("init", kwargs))

    def log(self, data: dict, step: int) -> None:
        self.calls.append(("log", step, sorted(data)))

    def finish(self) -> None:
        self.calls.append(("finish",))


def test_wandb_gets_the_step_and_eval_metrics_and_resume_continues_its_run(tmp_path, monkeypatch):
    """W&B is optional and not installed here: a stand-in module records what the trainer calls,
    which is the documented ``wandb.init(...)`` / ``run.log(dict, step=)`` / ``run.finish()``."""
    calls: list = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: _FakeWandbRun(calls, **kwargs)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    assert (
        main(["prepare", "--input", str(write_corpus(tmp_path)), "--out", str(tmp_path / "d")]) == 0
    )
    out = tmp_path / "r"
    args = ["train", "--data", str(tmp_path / "d"), "--out", str(out)]
    flags = [*TINY, "--max-iters", "4", "--eval-interval", "4", "--log-interval", "2"]
    assert main([*args, *flags, "--wandb", "--wandb-project", "tiny"]) == 0
    init = calls[0][1]
    run_id = (out / WANDB_ID_FILE).read_text().strip()
    assert (init["project"], init["name"], init["id"], init["resume"]) == (
        "tiny",
        "r",
        run_id,
        "allow",
    )
    assert init["config"]["n_embd"] == 32 and init["config"]["wandb"] is True
    train_keys = ["train/grad_norm", "train/loss", "train/lr", "train/mfu", "train/tokens_per_s"]
    assert calls[1:] == [
        ("log", 0, ["eval/train_loss", "eval/val_loss"]),
        ("log", 2, train_keys),
        ("log", 4, train_keys),
        ("log", 4, ["eval/train_loss", "eval/val_loss"]),
        ("finish",),
    ]
    calls.clear()
    assert main([*args, "--resume", "--max-iters", "6"]) == 0  # --wandb restored from the run
    assert calls[0][1]["id"] == run_id, "a resumed run must continue the same W&B run"
