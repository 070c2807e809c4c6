"""Bad checkpoints, built on disk one way each, for tests/test_hostile_checkpoints.py.

Not a test module. Every builder takes an empty folder and returns the path to hand to the server
(a checkpoint folder or a nanoGPT ``ckpt.pt``); ``CASES`` pairs each with the words the refusal
must contain. The good bases are the same tiny char model (the alphabet of deploy_support), so a
refusal can only come from the one thing each builder broke.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from deploy_support import ALPHABET, make_tiny_checkpoint

from model.checkpoint import export_huggingface, load_checkpoint

SECRET_LINE = "root-secret-line:x:0:0:must never be echoed"  # stands in for /etc/passwd


@dataclass(frozen=True)
class BadCheckpoint:
    """One hostile or careless checkpoint: how to build it and what its refusal must say."""

    name: str
    build: Callable[[Path], Path]
    says: str  # a regex the refusal message must match (case-insensitive)


def native(folder: Path, seed: int = 1) -> Path:
    return make_tiny_checkpoint(folder / "ck", seed=seed, provenance={"iterations": 7})


def _edit_config(path: Path, edit: Callable[[dict], None]) -> Path:
    meta = json.loads((path / "config.json").read_text())
    edit(meta)
    (path / "config.json").write_text(json.dumps(meta))
    return path


def model_field(key: str, value) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        return _edit_config(native(folder), lambda m: m["model"].__setitem__(key, value))

    return build


def model_fields(**values) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        return _edit_config(native(folder), lambda m: m["model"].update(values))

    return build


def config_key(key: str, value) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        return _edit_config(native(folder), lambda m: m.__setitem__(key, value))

    return build


def tokenizer_spec(spec) -> Callable[[Path], Path]:
    return config_key("tokenizer", spec)


def ranks_file(name: str, *, content: bytes | None = None, link: str | None = None):
    """A native checkpoint whose tokenizer is BPE with ``ranks_file`` ``name``."""

    def build(folder: Path) -> Path:
        path = native(folder)
        secret = folder / "passwd"
        secret.write_text(SECRET_LINE + "\n")
        if content is not None:
            (path / name).write_bytes(content)
        if link is not None:
            os.symlink(link.replace("SECRET", str(secret)), path / name)
        spec = {"type": "tiktoken", "ranks_file": name.replace("SECRET", str(secret))}
        return _edit_config(path, lambda m: m.__setitem__("tokenizer", spec))

    return build


def small_ranks(*, sha: str | None = None, encoding: str | None = None):
    """A valid 256-byte-token ranks file, with a wrong hash or a false encoding claim."""

    def build(folder: Path) -> Path:
        import base64

        path = native(folder)
        lines = b"".join(base64.b64encode(bytes([b])) + b" %d\n" % b for b in range(256))
        (path / "tokenizer.tiktoken").write_bytes(lines)
        spec = {"type": "tiktoken", "ranks_file": "tokenizer.tiktoken"}
        if sha is not None:
            spec["ranks_sha256"] = sha
        if encoding is not None:
            spec["encoding"] = encoding
        return _edit_config(path, lambda m: m.__setitem__("tokenizer", spec))

    return build


def replace_file(name: str, kind: str) -> Callable[[Path], Path]:
    """Replace ``name`` in a good checkpoint with a FIFO, a symlink out, a loop, or a folder."""

    def build(folder: Path) -> Path:
        path = native(folder)
        target = path / name
        outside = folder / f"outside-{name}"
        shutil.copy(target, outside)
        target.unlink()
        if kind == "fifo":
            os.mkfifo(target)
        elif kind == "symlink_out":
            os.symlink(outside, target)
        elif kind == "loop":
            os.symlink(target, target)
        elif kind == "missing":
            pass
        elif kind == "truncated":
            target.write_bytes(outside.read_bytes()[:100])
        elif kind == "huge":
            with open(target, "wb") as f:
                f.truncate(64 * 1024 * 1024)  # sparse: 64 MiB of NULs, no disk used
        return path

    return build


def write_file(name: str, content: bytes) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        path = native(folder)
        (path / name).write_bytes(content)
        return path

    return build


def path_loop(folder: Path) -> Path:
    loop = folder / "loop"
    os.symlink(loop, loop)
    return loop


def missing_path(folder: Path) -> Path:
    return folder / "does-not-exist"


def fifo_path(folder: Path) -> Path:
    path = folder / "ckpt.pt"
    os.mkfifo(path)
    return path


def wrong_shapes(folder: Path) -> Path:
    """config.json says n_embd 32, the weights are n_embd 16 (a config edited by hand)."""
    return _edit_config(native(folder), lambda m: m["model"].__setitem__("n_embd", 32))


def nan_weights(folder: Path) -> Path:
    from model.checkpoint import save_checkpoint

    ck = load_checkpoint(native(folder / "src"))
    with torch.no_grad():
        ck.model.transformer.wte.weight[0, 0] = float("nan")
    return save_checkpoint(folder / "nan", ck.model, ck.tokenizer.spec(), {"iterations": 8})


# ---- nanoGPT ckpt.pt (+ meta.pkl) -----------------------------------------------------------


def _nanogpt_parts(folder: Path) -> tuple[dict, dict]:
    ck = load_checkpoint(native(folder / "src"))
    args = {k: getattr(ck.config, k) for k in
            ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")}
    state = {k: v for k, v in ck.model.state_dict().items() if k != "lm_head.weight"}
    ckpt = {"model": state, "model_args": args, "iter_num": 3, "best_val_loss": 2.0}
    chars = list(ALPHABET)
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)),
            "stoi": {c: i for i, c in enumerate(chars)}}
    return ckpt, meta


def nanogpt(edit_ckpt=None, edit_meta=None, *, raw_meta: bytes | None = None):
    def build(folder: Path) -> Path:
        ckpt, meta = _nanogpt_parts(folder)
        if edit_ckpt is not None:
            edit_ckpt(ckpt)
        if edit_meta is not None:
            edit_meta(meta)
        out = folder / "out"
        out.mkdir()
        torch.save(ckpt, out / "ckpt.pt")
        (out / "meta.pkl").write_bytes(raw_meta if raw_meta is not None else pickle.dumps(meta))
        return out / "ckpt.pt"

    return build


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


# ---- Hugging Face GPT-2 folders -------------------------------------------------------------


def hf(edit_config=None, *, files: dict[str, str] | None = None, drop: tuple[str, ...] = ()):
    def build(folder: Path) -> Path:
        ck = load_checkpoint(native(folder / "src"))
        out = export_huggingface(ck.model, folder / "hf", tokenizer=ck.tokenizer)
        if edit_config is not None:
            _edit_config(out, edit_config)
        for name, text in (files or {}).items():
            (out / name).write_text(text)
        for name in drop:
            (out / name).unlink()
        return out

    return build


def _char_tokenizer_json(chars: str) -> str:
    return json.dumps({"model": {"type": "WordLevel", "vocab": {c: i for i, c in enumerate(chars)},
                                 "unk_token": chars[0]}})


_BIG = 1_000_000_000
CASES: list[BadCheckpoint] = [
    # native config.json: types, ranges, sizes
    BadCheckpoint("config-not-json", write_file("config.json", b"{not json"), r"not valid JSON"),
    BadCheckpoint("config-not-utf8", write_file("config.json", b"\xff\xfe{}"), r"UTF-8"),
    BadCheckpoint("config-an-array", write_file("config.json", b"[1, 2]"), r"unknown checkpoint"),
    BadCheckpoint("config-deep-nesting", write_file("config.json", b"[" * 100_000),
                  r"config\.json"),
    BadCheckpoint("n_layer-1e9", model_field("n_layer", _BIG), r"n_layer.*at most 4096"),
    BadCheckpoint("too-big-to-fit", model_field("n_embd", 2**20), r"n_embd=1048576.*memory"),
    # loads in ~0.3 GB, but its KV cache (4096 layers x 4M positions per slot) is terabytes
    BadCheckpoint("kv-cache-too-big",
                  model_fields(n_layer=4096, n_head=1, n_embd=2, block_size=2**22),
                  r"KV cache.*memory|memory.*KV cache"),
    BadCheckpoint("n_embd-1e9-float", model_field("n_embd", 1e9), r"n_embd.*integer"),
    BadCheckpoint("n_embd-1e9", model_field("n_embd", _BIG), r"n_embd=1000000000.*memory"),
    BadCheckpoint("vocab-1e12", model_field("vocab_size", 10**12), r"vocab_size"),
    BadCheckpoint("block_size-negative", model_field("block_size", -1), r"block_size.*positive"),
    BadCheckpoint("n_layer-string", model_field("n_layer", "2"), r"n_layer.*integer"),
    BadCheckpoint("n_layer-bool", model_field("n_layer", True), r"n_layer.*integer"),
    BadCheckpoint("bias-string", model_field("bias", "yes"), r"bias.*(bool|true or false)"),
    BadCheckpoint("dropout-string", model_field("dropout", "0.1"), r"dropout.*number"),
    BadCheckpoint("activation-list", model_field("activation", ["gelu"]), r"activation"),
    BadCheckpoint("model-unknown-key", model_field("n_experts", 8), r"unknown.*n_experts"),
    BadCheckpoint("model-a-list", config_key("model", [1, 2]), r"model.*object"),
    BadCheckpoint("format-version-2", config_key("format_version", 2), r"format_version"),
    BadCheckpoint("provenance-a-list", config_key("provenance", [1]), r"provenance.*object"),
    # tokenizer specs
    BadCheckpoint("tokenizer-a-string", tokenizer_spec("char"), r"tokenizer.*object"),
    BadCheckpoint("tokenizer-type-unknown", tokenizer_spec({"type": "sentencepiece"}),
                  r"unknown tokenizer type"),
    BadCheckpoint("chars-a-string", tokenizer_spec({"type": "char", "chars": "abc"}),
                  r"chars.*list"),
    BadCheckpoint("chars-of-ints", tokenizer_spec({"type": "char", "chars": [1, 2, 3]}),
                  r"single characters"),
    BadCheckpoint("chars-lone-surrogate", tokenizer_spec({"type": "char", "chars": ["a", "\ud800"]}),
                  r"surrogate"),
    BadCheckpoint("chars-duplicated", tokenizer_spec({"type": "char", "chars": ["a", "a"]}),
                  r"distinct"),
    BadCheckpoint("chars-exceed-model-vocab",
                  tokenizer_spec({"type": "char", "chars": [chr(0x4E00 + i) for i in range(80)]}),
                  r"80 tokens.*only 61"),
    BadCheckpoint("spec-unknown-key", tokenizer_spec({"type": "char", "chars": ["a"], "x": 1}),
                  r"unknown.*\bx\b"),
    BadCheckpoint("ranks_file-absolute", ranks_file("SECRET"), r"ranks_file.*inside"),
    BadCheckpoint("ranks_file-dotdot", ranks_file("../passwd"), r"ranks_file.*inside"),
    BadCheckpoint("ranks_file-symlink-out", ranks_file("tok.tiktoken", link="SECRET"),
                  r"symbolic link"),
    BadCheckpoint("ranks_file-garbage",
                  ranks_file("tok.tiktoken", content=(SECRET_LINE + "\n").encode()),
                  r"tok\.tiktoken.*(line 1|not a BPE ranks file)"),
    BadCheckpoint("ranks_file-missing", ranks_file("absent.tiktoken"), r"absent\.tiktoken"),
    BadCheckpoint("ranks-sha-mismatch", small_ranks(sha="0" * 64), r"sha256"),
    BadCheckpoint("ranks-false-r50k-claim", small_ranks(encoding="r50k_base"), r"r50k_base"),
    # files that are not plain files inside the folder
    BadCheckpoint("config-fifo", replace_file("config.json", "fifo"), r"config\.json.*FIFO"),
    BadCheckpoint("config-symlink-out", replace_file("config.json", "symlink_out"),
                  r"config\.json.*symbolic link"),
    BadCheckpoint("config-symlink-loop", replace_file("config.json", "loop"),
                  r"config\.json.*symbolic link"),
    BadCheckpoint("config-huge", replace_file("config.json", "huge"), r"config\.json.*larger"),
    BadCheckpoint("weights-fifo", replace_file("model.safetensors", "fifo"),
                  r"model\.safetensors.*FIFO"),
    BadCheckpoint("weights-symlink-out", replace_file("model.safetensors", "symlink_out"),
                  r"model\.safetensors.*symbolic link"),
    BadCheckpoint("weights-missing", replace_file("model.safetensors", "missing"),
                  r"model\.safetensors.*(not found|does not exist)"),
    BadCheckpoint("weights-truncated", replace_file("model.safetensors", "truncated"),
                  r"model\.safetensors.*(truncated|unreadable)"),
    BadCheckpoint("weights-wrong-shapes", wrong_shapes, r"shape"),
    BadCheckpoint("weights-nan", nan_weights, r"NaN"),
    BadCheckpoint("path-symlink-loop", path_loop, r"symbolic link loop"),
    BadCheckpoint("path-missing", missing_path, r"does not exist"),
    BadCheckpoint("path-fifo", fifo_path, r"FIFO"),
    # nanoGPT
    BadCheckpoint("nanogpt-model-a-list", nanogpt(lambda c: c.__setitem__("model", [1, 2])),
                  r"'model'.*(dict|mapping)"),
    BadCheckpoint("nanogpt-args-a-string", nanogpt(lambda c: c.__setitem__("model_args", "x")),
                  r"model_args"),
    BadCheckpoint("nanogpt-n_layer-1e9",
                  nanogpt(lambda c: c["model_args"].__setitem__("n_layer", _BIG)),
                  r"n_layer.*at most"),
    BadCheckpoint("nanogpt-n_embd-1e9",
                  nanogpt(lambda c: c["model_args"].__setitem__("n_embd", _BIG)),
                  r"n_embd=1000000000.*memory"),
    BadCheckpoint("meta-itos-of-ints",
                  nanogpt(edit_meta=lambda m: m.__setitem__("itos", {i: i for i in range(61)})),
                  r"meta\.pkl.*itos"),
    BadCheckpoint("meta-itos-gap",
                  nanogpt(edit_meta=lambda m: m.__setitem__("itos", {0: "a", 5: "b"})),
                  r"meta\.pkl.*itos"),
    BadCheckpoint("meta-a-list", nanogpt(raw_meta=pickle.dumps([1, 2])), r"meta\.pkl"),
    BadCheckpoint("meta-runs-code", nanogpt(raw_meta=pickle.dumps(_Evil())), r"refus"),
    BadCheckpoint("meta-exceeds-model-vocab",
                  nanogpt(edit_meta=lambda m: m.update(
                      vocab_size=80, itos={i: chr(0x4E00 + i) for i in range(80)})),
                  r"80 tokens.*only 61"),
    # Hugging Face GPT-2 folders
    BadCheckpoint("hf-eps-a-string", hf(lambda m: m.__setitem__("layer_norm_epsilon", "1e-5")),
                  r"layer_norm_epsilon"),
    BadCheckpoint("hf-n_layer-1e9", hf(lambda m: m.__setitem__("n_layer", _BIG)),
                  r"n_layer.*at most"),
    BadCheckpoint("hf-n_embd-1e9", hf(lambda m: m.__setitem__("n_embd", _BIG)),
                  r"n_embd=1000000000.*memory"),
    BadCheckpoint("hf-n_inner", hf(lambda m: m.__setitem__("n_inner", 7)), r"n_inner"),
    BadCheckpoint("hf-untied", hf(lambda m: m.__setitem__("tie_word_embeddings", False)),
                  r"tie_word_embeddings"),
    BadCheckpoint("hf-unigram-tokenizer",
                  hf(files={"tokenizer.json": json.dumps({"model": {"type": "Unigram"}})}),
                  r"tokenizer\.json.*Unigram"),
    BadCheckpoint("hf-vocab-exceeds-model",
                  hf(files={"tokenizer.json": _char_tokenizer_json(
                      "".join(chr(0x4E00 + i) for i in range(80)))}),
                  r"80 tokens.*only 61"),
    BadCheckpoint("hf-bpe-vocab-without-merges",
                  hf(files={"vocab.json": json.dumps({"a": 0, "b": 1})}, drop=("tokenizer.json",)),
                  r"merges\.txt"),
]
