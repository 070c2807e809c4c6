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

from service.engine.config import EngineConfig

ENV_PREFIX = "GPTSERVE_"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
LOG_FORMATS = ("text", "json")
# The shipped weights, found next to the package (not the working directory).
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "weights" / "shakespeare-char"
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


@dataclass(frozen=True)
class Settings:
    """Everything the HTTP server is configured with. The engine's knobs are not repeated here:
    ``engine`` is the engine's own config, and its flags are generated from its fields."""

    checkpoint: Path = DEFAULT_CHECKPOINT
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str | None = None  # None: a name from the checkpoint (see served_model_name)
    engine: EngineConfig = field(default_factory=EngineConfig)
    api_key: str | None = field(default=None, repr=False)  # never printed or logged
    cors_origins: tuple[str, ...] = ()
    request_timeout: float = 600.0  # seconds; 0 = no limit
    shutdown_timeout: float = 30.0
    log_level: str = "info"
    max_request_bytes: int = 1024 * 1024
    watch: bool = False  # reload the checkpoint when the trainer swaps in a new one
    watch_interval: float = 2.0  # seconds between two looks at the checkpoint folder
    load_timeout: float = 300.0  # seconds a checkpoint load may take (start-up and reloads)
    # The HTTP edge (service/transport): limits on what a client may hold open or send before
    # the app sees a request, and the log format.
    max_header_bytes: int = 16 * 1024  # request line + header fields; beyond it 431
    max_headers: int = 100  # header fields per request; beyond it 431
    header_timeout: float = 10.0  # seconds from connect (or a request's first byte) to its headers
    body_timeout: float = 30.0  # seconds from a request's headers to the end of its body
    keep_alive_timeout: float = 5.0  # seconds an idle keep-alive connection stays open
    max_connections: int = 1024  # open connections; lowered at start to fit RLIMIT_NOFILE
    log_format: str = "text"
    # Jinja2 text for /v1/chat/completions; None: the checkpoint's own, else the builtin one
    chat_template: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {LOG_LEVELS}, got {self.log_level!r}")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"log_format must be one of {LOG_FORMATS}, got {self.log_format!r}")
        for name in ("max_request_bytes", "max_header_bytes", "max_headers", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.request_timeout < 0 or self.shutdown_timeout < 0:
            raise ValueError("request_timeout and shutdown_timeout must be >= 0")
        if self.watch_interval <= 0:
            raise ValueError(f"watch_interval must be > 0, got {self.watch_interval}")
        if self.load_timeout <= 0:
            raise ValueError(f"load_timeout must be > 0, got {self.load_timeout}")
        for name in ("header_timeout", "body_timeout", "keep_alive_timeout"):
            if not getattr(self, name) > 0:  # also refuses NaN
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty (leave it unset to disable auth)")

    @classmethod
    def create(cls, **values) -> Settings:
        """Settings from flat keyword arguments, as the command line gives them: the engine's
        knobs (``EngineConfig``'s fields) go into ``engine``."""
        knobs = {f.name for f in EngineConfig.knobs()}
        engine = {name: values.pop(name) for name in list(values) if name in knobs}
        return cls(engine=EngineConfig(**engine), **values)

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


def _chat_template(value: str) -> str:
    """``--chat-template``: a Jinja2 template or a file holding one, compiled at startup."""
    from service.chat_template import TemplateError, template_arg

    try:
        return template_arg(value)
    except TemplateError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


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
    add(
        "--model-name",
        "model name reported by /v1/models and required in requests (unset: the checkpoint's "
        "provenance name, else the run folder's name for RUN/best and RUN/latest, else the "
        "checkpoint folder's name)",
        d.model_name,
    )
    _add_engine_flags(add)
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
    _add_edge_flags(add, d)
    add(
        "--chat-template",
        "Jinja2 chat template for /v1/chat/completions, or a file holding one (unset: the "
        "checkpoint's chat_template.jinja or config chat_template, else the builtin plain-text "
        "'User: ... / Assistant:' template; /v1/models shows the one in use)",
        d.chat_template,
        type=_chat_template,
    )
    return parser


def _add_engine_flags(add) -> None:
    """One flag per ``EngineConfig`` field, with the field's help text and default: the engine's
    config is the one place its knobs are defined."""
    for knob in EngineConfig.knobs():
        flag = "--" + knob.name.replace("_", "-")
        meta, kind = knob.metadata, str(knob.type)
        if kind == "bool":
            add(flag, meta["help"], knob.default, type=parse_flag, nargs="?", const=True)
        elif meta.get("size"):
            add(flag, meta["help"], knob.default, type=parse_size)
        elif "choices" in meta:
            add(flag, meta["help"], knob.default, choices=meta["choices"])
        else:
            add(flag, meta["help"], knob.default, type=float if kind == "float" else int)


def _add_edge_flags(add, d: Settings) -> None:
    """The HTTP edge's flags: transport limits (docs/API.md "Transport limits") and logs."""
    add(
        "--max-header-bytes",
        "largest request line plus header fields, e.g. 16k; larger requests get 431",
        d.max_header_bytes,
        type=parse_size,
    )
    add("--max-headers", "most header fields in one request; more get 431", d.max_headers, type=int)
    add(
        "--header-timeout",
        "seconds a client has to send a request's headers, counted from the connection (or from "
        "the request's first byte on a kept-alive connection); then 408 and close",
        d.header_timeout,
        type=float,
    )
    add(
        "--body-timeout",
        "seconds a client has to send a request's whole body once its headers are in; then 408 "
        "and close",
        d.body_timeout,
        type=float,
    )
    add(
        "--keep-alive-timeout",
        "seconds an idle keep-alive connection is kept open between two requests",
        d.keep_alive_timeout,
        type=float,
    )
    add(
        "--max-connections",
        "most open client connections; at the cap the longest-idle connection without a request "
        "in flight is closed to admit a new one. Lowered at start to fit the open-file limit "
        "(ulimit -n)",
        d.max_connections,
        type=int,
    )
    add(
        "--log-format",
        "text: one readable line per record; json: one JSON object per line (for log shippers)",
        d.log_format,
        choices=LOG_FORMATS,
    )


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
        return Settings.create(**values)
    except ValueError as err:
        parser.error(str(err))
        raise  # unreachable: parser.error exits
