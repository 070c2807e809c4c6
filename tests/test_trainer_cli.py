"""The command line itself: ``--help`` imports no torch (it answers at once), and every flag of
every subcommand says what it does."""

from __future__ import annotations

import argparse
import subprocess
import sys

from trainer_support import REPO, child_env, trainer_cmd

from trainer.cli import build_parser

NO_TORCH = """
import sys
from trainer.cli import build_parser
build_parser().format_help()
# model/ itself imports lazily (model.flags builds the flags); its network and loaders may not load
heavy = sorted(m for m in ("torch", "numpy", "model.gpt", "model.checkpoint", "tqdm", "matplotlib")
               if m in sys.modules)
print(",".join(heavy))
"""


def test_building_the_parser_imports_no_torch():
    """Measured by what is imported, not by a clock: torch alone takes seconds to import."""
    proc = subprocess.run(
        [sys.executable, "-c", NO_TORCH],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"imported before parsing: {proc.stdout.strip()}"


def test_help_of_the_program_and_of_each_subcommand_answers():
    for args in ([], ["prepare"], ["train"], ["sample"], ["export-hf"]):
        proc = subprocess.run(
            trainer_cmd(*args, "--help"),
            cwd=REPO,
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0 and proc.stdout.startswith("usage: python -m trainer"), args


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_flag_of_every_subcommand_has_help_text():
    subcommands = _subparsers(build_parser())
    assert sorted(subcommands) == ["export-hf", "prepare", "sample", "train"]
    missing = [
        f"{name} {action.option_strings[0]}"
        for name, sub in subcommands.items()
        for action in sub._actions
        if not isinstance(action, argparse._HelpAction)
        and (not action.help or action.help == argparse.SUPPRESS or len(action.help) < 8)
    ]
    assert missing == [], f"flags without help text: {missing}"


def test_a_mistyped_flag_names_the_closest_one_in_one_line():
    """A mistyped flag printed the whole usage and no hint."""
    proc = subprocess.run(
        trainer_cmd("train", "--data", "d", "--out", "o", "--lerning-rate", "1"),
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "--lerning-rate: did you mean --learning-rate?" in proc.stderr, proc.stderr
    assert len(proc.stderr.splitlines()) <= 2, proc.stderr
