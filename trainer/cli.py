"""The command line: ``python -m trainer {prepare,train,sample,export-hf}``.

Examples::

    python -m trainer prepare --input data/tinyshakespeare.txt --tokenizer char --out data/shakespeare-char
    python -m trainer train --data data/shakespeare-char --out runs/shakespeare-char --preset cpu-small
    torchrun --nproc_per_node=2 -m trainer train --data ... --out ...      # DDP
    python -m trainer sample --checkpoint runs/shakespeare-char/best --prompt "ROMEO:" --max-tokens 200
    python -m trainer export-hf --checkpoint runs/shakespeare-char/best --out hf/shakespeare-char

Argparse lives only here: flags become a frozen ``TrainSpec``. Every user error becomes one
``error: ...`` line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from model.checkpoint import CheckpointError
from model.tokenizer import TokenizerError
from trainer.config import PRESETS, LoopConfig, ModelShape, OptimConfig, build_train_spec
from trainer.errors import TrainerError

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="tokenize a corpus into train.bin / val.bin")
    p.add_argument("--input", required=True, help="a text file or an http(s) URL")
    p.add_argument("--tokenizer", default="char", choices=["char", "r50k_base", "gpt2"])
    p.add_argument("--out", required=True, type=Path, help="data folder to write")

    t = sub.add_parser("train", help="train a GPT on a prepared data folder")
    t.add_argument("--data", required=True, type=Path, help="folder written by `prepare`")
    t.add_argument("--out", required=True, type=Path, help="run folder: best/, latest/, log.jsonl")
    t.add_argument("--preset", choices=sorted(PRESETS), help="a named recipe; flags override it")
    t.add_argument("--resume", action="store_true", help="continue from OUT/latest")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    for cls in (ModelShape, OptimConfig, LoopConfig):
        for field in dataclasses.fields(cls):
            _add_hyperparameter(t, field)

    s = sub.add_parser("sample", help="generate text from a checkpoint")
    s.add_argument("--checkpoint", required=True, type=Path)
    s.add_argument("--prompt", default="\n")
    s.add_argument("--max-tokens", type=int, default=200)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-k", type=int, default=200)
    s.add_argument("--seed", type=int, default=1337)
    s.add_argument("--device", default="cpu")

    e = sub.add_parser("export-hf", help="write a checkpoint as a Hugging Face GPT-2 folder")
    e.add_argument("--checkpoint", required=True, type=Path)
    e.add_argument("--out", required=True, type=Path)
    return parser


def _add_hyperparameter(parser: argparse.ArgumentParser, field: dataclasses.Field) -> None:
    """One flag per config field; default None means "preset, else the dataclass default"."""
    flag = "--" + field.name.replace("_", "-")
    helptext = f"default {field.default!r} (or the preset's)"
    if field.type in ("bool", bool):
        parser.add_argument(
            flag, action=argparse.BooleanOptionalAction, default=None, help=helptext
        )
        return
    kind = {"int": int, "float": float, "str": str}.get(str(field.type).split(" |")[0], float)
    parser.add_argument(flag, type=kind, default=None, help=helptext)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except (TrainerError, CheckpointError, TokenizerError) as err:
        return _fail(str(err))
    except KeyboardInterrupt:
        return _fail("interrupted")


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return EXIT_USAGE


def _prepare(args: argparse.Namespace) -> int:
    from trainer.data import prepare

    counts = prepare(args.input, args.tokenizer, args.out)
    print(f"wrote {args.out}: {counts['train']:,} train and {counts['val']:,} val tokens")
    return 0


def _train(args: argparse.Namespace) -> int:
    from trainer.run import train

    names = {
        f.name for cls in (ModelShape, OptimConfig, LoopConfig) for f in dataclasses.fields(cls)
    }
    try:
        spec = build_train_spec(args.preset, **{n: getattr(args, n) for n in names})
    except ValueError as err:
        raise TrainerError(str(err)) from None
    result = train(spec, args.data, args.out, resume=args.resume, progress=not args.no_progress)
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
