"""The server's settings: one frozen dataclass, parsed from flags with ``GPTSERVE_*`` env twins.

Every flag ``--foo-bar`` has an environment twin ``GPTSERVE_FOO_BAR``; the environment sets the
default and an explicit flag wins. ``parse_settings(argv, environ)`` is the only entry point, so
tests build settings exactly as the command line does.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ENV_PREFIX = "GPTSERVE_"
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
# The shipped weights, found next to the package (not the working directory).
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "weights" / "shakespeare-char"
MAX_N = 16  # SamplingParams.validate's default bound on n, which the engine applies
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


@dataclass(frozen=True)
class Settings:
    """Everything the HTTP server is configured with (engine knobs are passed through)."""

    checkpoint: Path = DEFAULT_CHECKPOINT
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    dtype: str = "auto"
    model_name: str | None = None  # None: a name from the checkpoint (see served_model_name)
    max_batch_size: int = 32
    max_queue: int = 256
    kv_memory: int | None = None  # bytes; None: the engine sizes it for max_batch_size windows
    window_shift: int | None = None  # None: the engine's default
    batch_invariant: bool = True  # a seeded request samples the same tokens in any batch
    api_key: str | None = field(default=None, repr=False)  # never printed or logged
    cors_origins: tuple[str, ...] = ()
    request_timeout: float = 600.0  # seconds; 0 = no limit
    shutdown_timeout: float = 30.0
    log_level: str = "info"
    max_request_bytes: int = 1024 * 1024
    max_n: int = 16
    watch: bool = False  # reload the checkpoint when the trainer swaps in a new one
    watch_interval: float = 2.0  # seconds between two looks at the checkpoint folder
    load_timeout: float = 300.0  # seconds a checkpoint load may take (start-up and reloads)

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {LOG_LEVELS}, got {self.log_level!r}")
        for name in ("max_batch_size", "max_queue", "max_request_bytes", "max_n"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_n > MAX_N:
            raise ValueError(f"max_n must be <= {MAX_N} (the engine's limit), got {self.max_n}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.request_timeout < 0 or self.shutdown_timeout < 0:
            raise ValueError("request_timeout and shutdown_timeout must be >= 0")
        if self.watch_interval <= 0:
            raise ValueError(f"watch_interval must be > 0, got {self.watch_interval}")
        if self.load_timeout <= 0:
            raise ValueError(f"load_timeout must be > 0, got {self.load_timeout}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty (leave it unset to disable auth)")

    @functools.cached_property
    def served_model_name(self) -> str:
        """``--model-name``, else the checkpoint's provenance name, its run folder's name (for
        ``RUN/best`` and ``RUN/latest``) or its folder's name (read once, then fixed)."""
        from model.checkpoint.naming import default_model_name

        return self.model_name or default_model_name(self.checkpoint)


def parse_size(text: str) -> int:
    """Bytes from ``"1048576"``, ``"512M"``, ``"2GiB"`` or ``"64k"`` (binary units)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmg]?)(?:i?b)?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 1048576, 512M, 2GiB)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


def parse_flag(text: str | bool) -> bool:
    """A boolean from ``1/true/yes/on`` or ``0/false/no/off`` (for env twins of switches)."""
    if isinstance(text, bool):
        return text
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r} (use 1/0, true/false)")


def _origins(text: str) -> tuple[str, ...]:
    return tuple(o.strip() for o in text.split(",") if o.strip())


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The command line; each flag's default comes from its ``GPTSERVE_*`` twin when set."""
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="gptserve",
        description="Serve a GPT checkpoint over an OpenAI-compatible HTTP API "
        "(/v1/completions with SSE streaming, /metrics, a web page at /). "
        f"Every flag --foo-bar can also be set by the environment variable {ENV_PREFIX}FOO_BAR.",
    )
    d = Settings()

    def add(flag: str, help_text: str, default, *, secret: bool = False, **kwargs) -> None:
        env_name = ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()
        if env_name in env:
            default = env[env_name]  # argparse applies ``type`` to string defaults
        shown = "set" if secret and default else default
        shown = "unset" if shown in (None, "") else shown
        help_text = f"{help_text} (now: {shown}; env {env_name})".replace("%", "%%")
        parser.add_argument(flag, default=default, help=help_text, **kwargs)

    add(
        "--checkpoint",
        "checkpoint to serve: a gptserve folder, a Hugging Face GPT-2 folder or a nanoGPT ckpt.pt",
        d.checkpoint,
        type=Path,
    )
    add("--host", "address to listen on", d.host)
    add("--port", "TCP port to listen on", d.port, type=int)
    add("--device", "where the model runs (auto: cuda when available)", d.device, choices=DEVICES)
    add(
        "--dtype",
        "weight/activation dtype (auto: bfloat16 on cuda, float32 on cpu)",
        d.dtype,
        choices=DTYPES,
    )
    add(
        "--model-name",
        "model name reported by /v1/models and required in requests (unset: the checkpoint's "
        "provenance name, else the run folder's name for RUN/best and RUN/latest, else the "
        "checkpoint folder's name)",
        d.model_name,
    )
    add(
        "--max-batch-size",
        "most sequences decoded together (engine slots)",
        d.max_batch_size,
        type=int,
    )
    add(
        "--max-queue",
        "most requests waiting for a slot; beyond it requests get 503 with Retry-After",
        d.max_queue,
        type=int,
    )
    add(
        "--kv-memory",
        "bytes for the KV cache, e.g. 512M (unset: enough for max-batch-size full context windows)",
        d.kv_memory,
        type=parse_size,
    )
    add(
        "--window-shift",
        "tokens dropped when a sequence outgrows the context window "
        "(1 = exactly nanoGPT's crop every step; unset: the engine's default)",
        d.window_shift,
        type=int,
    )
    add(
        "--batch-invariant",
        "on: a seeded request gets the same tokens alone or in any batch (decode always runs "
        "every slot at full window width); off: decode only the busy slots, ~3x faster for a lone "
        "request on CPU, but rows may differ in the last bits between batch sizes",
        d.batch_invariant,
        type=parse_flag,
        nargs="?",
        const=True,
    )
    add(
        "--api-key",
        "require 'Authorization: Bearer KEY' on every route except /health and "
        "/ready; unset: no auth",
        d.api_key,
        secret=True,
    )
    add(
        "--cors-origins",
        "comma-separated browser origins allowed by CORS",
        ",".join(d.cors_origins),
        type=_origins,
    )
    add(
        "--request-timeout",
        "seconds a completion may take before it is cancelled (0: no limit)",
        d.request_timeout,
        type=float,
    )
    add(
        "--shutdown-timeout",
        "seconds in-flight requests get to finish after SIGTERM before they are cancelled",
        d.shutdown_timeout,
        type=float,
    )
    add("--log-level", "logging level", d.log_level, choices=LOG_LEVELS)
    add(
        "--max-request-bytes",
        "largest accepted request body; larger bodies get 413",
        d.max_request_bytes,
        type=parse_size,
    )
    add(
        "--max-n",
        "largest n (choices per prompt) a request may ask for (at most 16)",
        d.max_n,
        type=int,
    )
    add(
        "--watch",
        "reload the checkpoint live when a new one appears in its folder (the trainer's atomic "
        "save): requests in flight finish on the old weights, new ones get the new weights",
        d.watch,
        type=parse_flag,
        nargs="?",
        const=True,
    )
    add(
        "--watch-interval",
        "seconds between two looks at the checkpoint folder when --watch is on",
        d.watch_interval,
        type=float,
    )
    add(
        "--load-timeout",
        "seconds a checkpoint load may take, at start-up and on each reload, before it is "
        "abandoned and refused",
        d.load_timeout,
        type=float,
    )
    return parser


def parse_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Settings from flags (``argv``, default ``sys.argv[1:]``) over ``GPTSERVE_*`` variables."""
    parser = build_parser(environ)
    args = parser.parse_args(argv)
    values = vars(args)
    if isinstance(values["cors_origins"], str):
        values["cors_origins"] = _origins(values["cors_origins"])
    try:
        return Settings(**values)
    except ValueError as err:
        parser.error(str(err))
        raise  # unreachable: parser.error exits
