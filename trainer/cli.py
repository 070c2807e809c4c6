"""The command line: ``python -m trainer {prepare,train,sample,export-hf}``.

Examples::

    python -m trainer prepare --input data/tinyshakespeare.txt --tokenizer char --out data/shakespeare-char
    python -m trainer train --data data/shakespeare-char --out runs/shakespeare-char --preset cpu-small
    python -m trainer train --data data/shakespeare-char --out runs/shakespeare-char --resume
    torchrun --nproc_per_node=2 -m trainer train --data ... --out ...      # DDP
    python -m trainer sample --checkpoint runs/shakespeare-char/best --prompt "ROMEO:" --max-tokens 200
    python -m trainer export-hf --checkpoint runs/shakespeare-char/best --out hf/shakespeare-char

Argparse lives only here: flags become a frozen ``TrainSpec``. Every user error becomes one
``error: ...`` line on stderr and exit status 2; a run stopped by Ctrl-C saves ``latest/``, says
how to resume and exits 130 (143 for SIGTERM). Building the parser imports no torch, so
``--help`` answers at once: everything heavy is imported inside the command that needs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import signal
import sys
from pathlib import Path

from model.flags import SuggestingParser, field_type, flag
from trainer.config import DEFAULTS, PRESETS, SECTIONS
from trainer.errors import TrainerError, TrainingInterrupted

EXIT_USAGE = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130, the shell's convention for Ctrl-C

SECTION_TITLES = (
    "model shape",
    "optimizer and learning-rate schedule",
    "training loop",
    "metrics (always OUT/log.jsonl)",
)
TRAIN_HELP = """Train a GPT on a prepared data folder. Hyperparameters come from the defaults, under
a --preset, under the flags you give. With --resume they come from the run's own checkpoint
(OUT/latest) instead, and only the flags you name again change them (each change is printed);
the model's shape cannot change."""


def build_parser() -> argparse.ArgumentParser:
    parser = SuggestingParser(prog="python -m trainer", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="tokenize a corpus into train.bin / val.bin")
    p.add_argument("--input", required=True, help="a text file or an http(s) URL")
    p.add_argument(
        "--tokenizer",
        default="char",
        choices=["char", "r50k_base", "gpt2"],
        help="char: one token per character of the corpus; r50k_base / gpt2: GPT-2's BPE "
        "(default: char)",
    )
    p.add_argument("--out", required=True, type=Path, help="data folder to write")

    t = sub.add_parser(
        "train", help="train a GPT on a prepared data folder", description=TRAIN_HELP
    )
    t.add_argument("--data", required=True, type=Path, help="folder written by `prepare`")
    t.add_argument("--out", required=True, type=Path, help="run folder: best/, latest/, log.jsonl")
    t.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="a named recipe; explicit flags override it (on --resume: must be the run's own)",
    )
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue OUT/latest with the settings it was saved with",
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    for cls, title in zip(SECTIONS, SECTION_TITLES, strict=True):
        group = t.add_argument_group(title)
        for field in dataclasses.fields(cls):
            _add_hyperparameter(group, field)

    s = sub.add_parser("sample", help="generate text from a checkpoint")
    s.add_argument("--checkpoint", required=True, type=Path, help="checkpoint folder or file")
    s.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    s.add_argument("--max-tokens", type=int, default=200, help="tokens to generate (default 200)")
    s.add_argument(
        "--temperature", type=float, default=0.8, help="0 is greedy; higher is more random (0.8)"
    )
    s.add_argument(
        "--top-k", type=int, default=200, help="sample among the k most likely tokens (200)"
    )
    s.add_argument("--seed", type=int, default=1337, help="sampling seed (default 1337)")
    s.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    s.add_argument(
        "--threads", type=int, default=None,
        help="intra-op CPU threads (fixed); default: OMP_NUM_THREADS if set, else every CPU this "
        "process may use, moved between 1 and that by measured step times (as the server does)",
    )

    e = sub.add_parser("export-hf", help="write a checkpoint as a Hugging Face GPT-2 folder")
    e.add_argument("--checkpoint", required=True, type=Path, help="checkpoint folder to export")
    e.add_argument("--out", required=True, type=Path, help="Hugging Face folder to write")
    return parser


def _add_hyperparameter(parser: argparse._ArgumentGroup, field: dataclasses.Field) -> None:
    """One flag per config field; default None means "not named" (preset, checkpoint or default)."""
    notes = [] if DEFAULTS[field.name] is None else [f"default {DEFAULTS[field.name]!r}"]
    presets = [name for name, values in PRESETS.items() if field.name in values]
    if presets:
        notes.append(f"set by --preset {', '.join(presets)}")
    helptext = field.metadata["help"] + (f" ({'; '.join(notes)})" if notes else "")
    if field.type in ("bool", bool):
        parser.add_argument(
            flag(field.name), action=argparse.BooleanOptionalAction, default=None, help=helptext
        )
        return
    kind = field_type(field) or float
    metavar = {int: "N", float: "X", str: "NAME"}[kind]
    parser.add_argument(flag(field.name), type=kind, default=None, metavar=metavar, help=helptext)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "sample":
        from model.threads import openmp_env

        openmp_env(os.environ)  # before torch loads: how OpenMP threads wait (model/threads.py)
    try:
        from model.checkpoint import CheckpointError  # imports torch: only once a command runs
        from model.tokenizer import TokenizerError

        try:
            return _COMMANDS[args.command](args)
        except (TrainerError, CheckpointError, TokenizerError) as err:
            return _fail(str(err))
        except TrainingInterrupted as stopped:
            return _interrupted(stopped, args)
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C
        _say("\ninterrupted: nothing more was saved (checkpoints on disk are complete)")
        return EXIT_INTERRUPTED


def _fail(message: str) -> int:
    _say(f"error: {message}")
    return EXIT_USAGE


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _interrupted(stopped: TrainingInterrupted, args: argparse.Namespace) -> int:
    if stopped.is_main:
        name = signal.Signals(stopped.signum).name if stopped.signum else "a signal"
        command = shlex.join(
            ["-m", "trainer", "train", "--data", str(args.data), "--out", str(args.out), "--resume"]
        )
        launcher = (
            f"python {command}"
            if stopped.world_size == 1
            else f"the same torchrun launch ({stopped.world_size} processes) of {command}"
        )
        _say(
            f"stopped by {name} at step {stopped.step}: saved {stopped.saved} (weights, optimizer, "
            "data position and RNG state at that step; no step is lost)"
        )
        _say(f"resume with: {launcher}")
    return 128 + (stopped.signum or signal.SIGINT)


def _prepare(args: argparse.Namespace) -> int:
    from trainer.data import prepare

    counts = prepare(args.input, args.tokenizer, args.out)
    print(f"wrote {args.out}: {counts['train']:,} train and {counts['val']:,} val tokens")
    return 0


def _train(args: argparse.Namespace) -> int:
    from trainer.run import train

    overrides = {name: getattr(args, name) for name in DEFAULTS if getattr(args, name) is not None}
    result = train(
        args.data,
        args.out,
        preset=args.preset,
        overrides=overrides,
        resume=args.resume,
        progress=not args.no_progress,
    )
    if result is not None:
        print(
            f"done: {result.final_step} steps in {result.wall_s:.0f} s, best val loss "
            f"{result.best_val_loss:.4f} at step {result.best_step}; served from {args.out}/best"
        )
    return 0


def _sample(args: argparse.Namespace) -> int:
    from trainer.sample import sample_text

    print(
        sample_text(
            args.checkpoint,
            args.prompt,
            args.max_tokens,
            args.temperature,
            args.top_k,
            args.seed,
            args.device,
            args.threads,
        )
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from model.checkpoint import export_huggingface, load_checkpoint

    checkpoint = load_checkpoint(args.checkpoint)
    export_huggingface(checkpoint.model, args.out, tokenizer=checkpoint.tokenizer)
    print(f"wrote a Hugging Face GPT-2 folder (weights, config, tokenizer) to {args.out}")
    return 0


_COMMANDS = {"prepare": _prepare, "train": _train, "sample": _sample, "export-hf": _export}
