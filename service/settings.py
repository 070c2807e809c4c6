"""The server's settings: one frozen dataclass, parsed from flags with ``GPTSERVE_*`` env twins.

Every flag ``--foo-bar`` has an environment twin ``GPTSERVE_FOO_BAR``; the environment sets the
default and an explicit flag wins. ``parse_settings(argv, environ)`` is the only entry point, so
tests build settings exactly as the command line does. Each knob is defined once, as a field with
its help text (``Settings``, ``EngineConfig``, ``TransportLimits``); the flags are generated from
the fields, and a mistyped flag names the closest one (``SuggestingParser``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from model.flags import SuggestingParser, field_type, flag
from service.engine.config import EngineConfig
from service.transport.limits import TransportLimits

ENV_PREFIX = "GPTSERVE_"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
LOG_FORMATS = ("text", "json")
ENGINE_CORES = ("process", "thread")
# The shipped weights, found next to the package (not the working directory).
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "weights" / "shakespeare-char"
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
CLOSE_GRACE = 5  # seconds open connections get to close after the drain, before exit


def _chat_template(value: str) -> str:
    """``--chat-template``: a Jinja2 template or a file holding one, compiled at startup."""
    from service.chat_template import TemplateError, template_arg

    try:
        return template_arg(value)
    except TemplateError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _origins(text: str) -> tuple[str, ...]:
    return tuple(o.strip() for o in text.split(",") if o.strip())


def _flag(default, help_text: str, *, repr: bool = True, **meta):  # noqa: A002 (field's name)
    """A settings field and its flag's help: ``--foo-bar`` is generated from field ``foo_bar``
    (``meta``: ``choices``, ``size``, ``secret``, ``parse``: the flag's type function)."""
    return field(default=default, repr=repr, metadata={"help": help_text, **meta})


@dataclass(frozen=True)
class Settings:
    """Everything the HTTP server is configured with, each field with its flag's help text. The
    engine's knobs and the transport limits are not repeated here: ``engine`` and ``transport``
    are their own configs, and their flags are generated from their fields too."""

    checkpoint: Path = _flag(
        DEFAULT_CHECKPOINT, "checkpoint to serve: a gptserve folder, a Hugging Face GPT-2 folder "
        "or a nanoGPT ckpt.pt")
    host: str = _flag("127.0.0.1", "address to listen on")
    port: int = _flag(8000, "TCP port to listen on")
    model_name: str | None = _flag(
        None, "model name reported by /v1/models and required in requests (unset: the "
        "checkpoint's provenance name, else the run folder's name for RUN/best and RUN/latest, "
        "else the checkpoint folder's name)")
    engine: EngineConfig = field(default_factory=EngineConfig)
    engine_core: str = _flag(
        "process", "process: the engine core (model, scheduler, sampler) runs in its own process "
        "and the HTTP front end never shares a GIL with it; thread: both in one process (the "
        "engine on a thread)", choices=ENGINE_CORES)
    api_servers: int = _flag(
        1, "HTTP front-end processes sharing the listening socket and one engine core (as vLLM's "
        "--api-server-count): each parses, tokenizes, detokenizes and streams its own requests; "
        "admission counts every one against the same slots and queue. More than 1 needs "
        "--engine-core process and leaves live reload (--watch, /admin/reload) off")
    api_key: str | None = _flag(
        None, "require 'Authorization: Bearer KEY' on the API (/v1/*, /tokenize, /detokenize, "
        "/admin/*, /docs); the web page, /health and /ready stay open, and /metrics too unless "
        "--metrics-auth; unset: no auth", secret=True, repr=False)  # never printed or logged
    metrics_auth: bool = _flag(
        False, "with --api-key, require the key on /metrics too (off: /metrics is open, as "
        "vLLM keys only /v1; a scraper then needs no secret)")
    cors_origins: tuple[str, ...] = _flag(
        (), "comma-separated browser origins allowed by CORS", parse=_origins)
    request_timeout: float = _flag(
        600.0, "seconds a completion may take before it is cancelled (0: no limit)")
    shutdown_timeout: float = _flag(
        30.0, "seconds in-flight requests get to finish after SIGTERM before they are "
        f"cancelled; connections still open then get {CLOSE_GRACE} s more to close")
    log_level: str = _flag("info", "logging level", choices=LOG_LEVELS)
    max_request_bytes: int = _flag(
        1024 * 1024, "largest accepted request body; larger bodies get 413", size=True)
    watch: bool = _flag(
        False, "reload the checkpoint live when a new one appears in its folder (the trainer's "
        "atomic save): requests in flight finish on the old weights, new ones get the new weights")
    watch_interval: float = _flag(
        2.0, "seconds between two looks at the checkpoint folder when --watch is on")
    load_timeout: float = _flag(
        300.0, "seconds a checkpoint load may take, at start-up and on each reload, before it is "
        "abandoned and refused")
    # The HTTP edge (service/transport): what a client may hold open or send before the app
    # sees a request (docs/API.md "Transport limits").
    transport: TransportLimits = field(default_factory=TransportLimits)
    log_format: str = _flag(
        "text", "text: one readable line per record; json: one JSON object per line (for log "
        "shippers)", choices=LOG_FORMATS)
    # Jinja2 text for /v1/chat/completions; None: the checkpoint's own, else the builtin one
    chat_template: str | None = _flag(
        None, "Jinja2 chat template for /v1/chat/completions, or a file holding one (unset: the "
        "checkpoint's chat_template.jinja or config chat_template, else the builtin plain-text "
        "'User: ... / Assistant:' template; /v1/models shows the one in use)",
        parse=_chat_template, repr=False)

    def __post_init__(self) -> None:
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {LOG_LEVELS}, got {self.log_level!r}")
        if self.engine_core not in ENGINE_CORES:
            raise ValueError(f"engine_core must be one of {ENGINE_CORES}, got {self.engine_core!r}")
        if self.api_servers < 1:
            raise ValueError(f"api_servers must be >= 1, got {self.api_servers}")
        if self.api_servers > 1 and self.engine_core != "process":
            raise ValueError("--api-servers > 1 needs --engine-core process (the front ends "
                             "share an engine core process)")
        if self.api_servers > 1 and self.watch:
            raise ValueError("--watch needs --api-servers 1 (live reload switches one front "
                             "end's engine)")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"log_format must be one of {LOG_FORMATS}, got {self.log_format!r}")
        if self.max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be >= 1, got {self.max_request_bytes}")
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

    @classmethod
    def create(cls, **values) -> Settings:
        """Settings from flat keyword arguments, as the command line gives them: the engine's
        knobs (``EngineConfig``'s fields) go into ``engine``, the transport limits into
        ``transport``."""
        nested = {}
        for name, config in (("engine", EngineConfig), ("transport", TransportLimits)):
            knobs = {f.name for f in config.knobs()}
            nested[name] = config(**{k: values.pop(k) for k in list(values) if k in knobs})
        return cls(**nested, **values)

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


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The command line, one flag per setting (``Settings``, ``EngineConfig`` and
    ``TransportLimits`` fields, with their help); each flag's default comes from its
    ``GPTSERVE_*`` twin when set."""
    env = os.environ if environ is None else environ
    parser = SuggestingParser(
        prog="gptserve",
        description="Serve a GPT checkpoint over an OpenAI-compatible HTTP API "
        "(/v1/completions with SSE streaming, /metrics, a web page at /). "
        f"Every flag --foo-bar can also be set by the environment variable {ENV_PREFIX}FOO_BAR.",
    )
    for f in dataclasses.fields(Settings):
        nested = {"engine": EngineConfig, "transport": TransportLimits}.get(f.name)
        for knob in nested.knobs() if nested else (f,):
            _add_flag(parser, knob, env)
    return parser


def _add_flag(parser: argparse.ArgumentParser, f: dataclasses.Field, env: Mapping[str, str]):
    """``--foo-bar`` for field ``foo_bar``: its type from the field, its default from the field
    or from ``GPTSERVE_FOO_BAR``, its help from the field's metadata."""
    env_name = ENV_PREFIX + f.name.upper()
    meta, kind = f.metadata, str(f.type)
    default = ",".join(f.default) if isinstance(f.default, tuple) else f.default
    if env_name in env:
        default = env[env_name]  # argparse applies ``type`` to string defaults
    options: dict = {}
    if "parse" in meta:
        options["type"] = meta["parse"]
    elif kind == "bool":
        options.update(type=parse_flag, nargs="?", const=True)
    elif meta.get("size"):
        options["type"] = parse_size
    elif "choices" in meta:
        options["choices"] = meta["choices"]
    elif field_type(f) not in (None, str):
        options["type"] = field_type(f)
    shown = "set" if meta.get("secret") and default else default
    shown = "unset" if shown in (None, "") else shown
    help_text = f"{meta['help']} (now: {shown}; env {env_name})".replace("%", "%%")
    parser.add_argument(flag(f.name), default=default, help=help_text, **options)


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
