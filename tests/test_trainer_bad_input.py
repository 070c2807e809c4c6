"""Bad input gives one ``error: ...`` line on stderr and exit status 2, never a torch traceback,
and leaves whatever was already written intact."""

from __future__ import annotations

import subprocess
import sys

import pytest
from trainer_support import (
    REPO,
    TINY,
    child_env,
    single_thread,  # noqa: F401 (a fixture)
    write_corpus,
)

from trainer.cli import main

pytestmark = pytest.mark.usefixtures("single_thread")


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), f"expected one error line, got {err}"
    assert "Traceback" not in err[0]
    return err[0]


@pytest.fixture
def prepared(tmp_path):
    assert (
        main(["prepare", "--input", str(write_corpus(tmp_path)), "--out", str(tmp_path / "d")]) == 0
    )
    return tmp_path


def test_missing_corpus_is_one_error_line(tmp_path, capsys):
    code = main(["prepare", "--input", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "d")])
    assert code == 2 and "corpus file not found" in _one_error_line(capsys)
    assert not (tmp_path / "d").exists()


def test_empty_corpus_is_one_error_line_and_keeps_the_old_data_folder(prepared, capsys):
    before = (prepared / "d" / "train.bin").read_bytes()
    empty = prepared / "empty.txt"
    empty.write_text("  \n")
    assert main(["prepare", "--input", str(empty), "--out", str(prepared / "d")]) == 2
    assert "the corpus is empty" in _one_error_line(capsys)
    assert (prepared / "d" / "train.bin").read_bytes() == before


def test_block_size_larger_than_the_data_is_one_error_line(prepared, capsys):
    args = [
        "train",
        "--data",
        str(prepared / "d"),
        "--out",
        str(prepared / "run"),
        *TINY,
        "--block-size",
        "100000",
        "--max-iters",
        "2",
    ]
    assert main(args) == 2
    assert "block_size 100000 is larger than the" in _one_error_line(capsys)
    assert not (prepared / "run").exists()


def test_unprepared_data_folder_is_one_error_line(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), *TINY]) == 2
    assert "not a prepared data folder" in _one_error_line(capsys)


def test_resume_with_data_from_another_tokenizer_is_refused_and_changes_nothing(prepared, capsys):
    run = prepared / "run"
    base = ["--out", str(run), *TINY, "--eval-interval", "2"]
    assert main(["train", "--data", str(prepared / "d"), *base, "--max-iters", "2"]) == 0
    other = prepared / "other.txt"
    other.write_text("0123456789 +-*/=\n" * 400)
    assert main(["prepare", "--input", str(other), "--out", str(prepared / "digits")]) == 0
    snapshot = {p.name: p.read_bytes() for p in (run / "latest").iterdir()}
    log = (run / "log.jsonl").read_text()
    capsys.readouterr()
    args = ["train", "--data", str(prepared / "digits"), *base, "--max-iters", "4", "--resume"]
    assert main(args) == 2
    assert "different tokenizer" in _one_error_line(capsys)
    assert {p.name: p.read_bytes() for p in (run / "latest").iterdir()} == snapshot
    assert (run / "log.jsonl").read_text() == log


def test_characters_outside_the_vocabulary_at_sample_time_are_one_error_line(prepared, capsys):
    run = prepared / "run"
    assert (
        main(
            [
                "train",
                "--data",
                str(prepared / "d"),
                "--out",
                str(run),
                *TINY,
                "--max-iters",
                "2",
                "--eval-interval",
                "2",
            ]
        )
        == 0
    )
    capsys.readouterr()
    args = ["sample", "--checkpoint", str(run / "best"), "--prompt", "naïve ☃", "--max-tokens", "5"]
    assert main(args) == 2
    assert "is not in this model's" in _one_error_line(capsys)


def test_missing_checkpoint_at_sample_time_is_one_error_line(tmp_path, capsys):
    assert main(["sample", "--checkpoint", str(tmp_path / "none"), "--max-tokens", "3"]) == 2
    assert "does not exist" in _one_error_line(capsys)


# Cap the address space just above what the interpreter already uses, then ask for a batch whose
# activations cannot fit: the allocator fails for real, inside torch.
OOM_CHILD = """
import resource, sys
import torch
from trainer.cli import main
with open("/proc/self/status") as f:
    vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize:")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + 768 * 2**20, resource.RLIM_INFINITY))
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.timeout(120)
def test_out_of_memory_batch_is_one_error_line(prepared):
    args = [
        "train",
        "--data",
        str(prepared / "d"),
        "--out",
        str(prepared / "run"),
        *TINY,
        "--batch-size",
        "50000",
        "--max-iters",
        "2",
    ]
    proc = subprocess.run(
        [sys.executable, "-c", OOM_CHILD, *args],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert lines[-1].startswith("error: out of memory") and "--batch-size" in lines[-1], lines
    assert "Traceback" not in proc.stderr
