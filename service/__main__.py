"""Run the server: ``python -m service`` (or ``gptserve``); ``--help`` lists every flag.

Everything that can be wrong with the command line fails in one line on stderr before the model
loads and before anything listens: a missing checkpoint, an unavailable ``--device`` or
``--quantization`` on a device it cannot run on (exit 2), a
port that is busy or not permitted (exit 3). Then ``service.server.serve`` runs uvicorn on the
sockets bound here and loads the checkpoint in the background (a checkpoint that cannot be read
stops the server with exit 2). Exit statuses: 0 after a drain, 2 bad configuration, 3 cannot
listen, 4 the engine core (or, with ``--api-servers N``, another front end) died.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import replace

from model.threads import openmp_env
from service.engine.config import EngineConfig
from service.logs import configure_logging
from service.settings import Settings, parse_settings
from service.transport.sockets import ListenError, bind, fit_to_file_limit

log = logging.getLogger("service")

EXIT_CONFIG = 2  # a flag, the checkpoint or the device cannot work
EXIT_LISTEN = 3  # cannot listen (uvicorn's own status for a failed start-up)


class ConfigError(Exception):
    """The command line asks for something this machine cannot do (one-line message)."""


def check_checkpoint(settings: Settings) -> None:
    """Fail fast on the common mistakes (missing, a symlink loop); the loader checks the rest."""
    from model.checkpoint.files import CheckpointError, checkpoint_kind

    try:
        checkpoint_kind(settings.checkpoint)
    except CheckpointError as err:
        raise ConfigError(f"cannot load checkpoint: {err}") from None


def check_device(device: str) -> None:
    """Refuse ``--device cuda`` where torch sees no GPU, before minutes of loading."""
    if device != "cuda":
        return
    import torch

    if torch.cuda.is_available():
        return
    why = (
        f"this torch build ({torch.__version__}) has no CUDA support"
        if torch.version.cuda is None
        else "torch sees no GPU (no driver, or CUDA_VISIBLE_DEVICES hides them)"
    )
    raise ConfigError(f"--device cuda: {why}; use --device cpu or --device auto")


def check_quantization(engine: EngineConfig) -> None:
    """Refuse ``--quantization int8`` where its CPU kernels cannot run, before the model loads."""
    if engine.quantization == "none":
        return
    from service.engine.engine import check_quantization, resolve_device

    try:
        check_quantization(engine.quantization, resolve_device(engine.device))
    except ValueError as err:
        raise ConfigError(f"--quantization {engine.quantization}: {err}") from None


def main(argv: Sequence[str] | None = None) -> int:
    openmp_env(os.environ)  # before torch loads: how OpenMP threads wait (model/threads.py)
    settings = parse_settings(argv)
    configure_logging(settings.log_level, settings.log_format)
    sockets = []
    try:
        check_checkpoint(settings)
        sockets = bind(settings.host, settings.port)  # before torch loads: a busy port is quick
        limits = replace(
            settings.transport,
            max_connections=fit_to_file_limit(settings.transport.max_connections),
        )
        check_device(settings.engine.device)
        check_quantization(settings.engine)
    except (ConfigError, ListenError) as err:
        for sock in sockets:
            sock.close()
        print(f"gptserve: {err}", file=sys.stderr)
        return EXIT_LISTEN if isinstance(err, ListenError) else EXIT_CONFIG
    metrics_dir = None
    if settings.api_servers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # several API-server processes keep their metrics in files /metrics sums; the variable
        # must be set before prometheus_client is imported, here and in every spawned front end
        metrics_dir = tempfile.mkdtemp(prefix="gptserve-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    from service.server import serve  # imports the app, the engine and torch

    try:
        status = serve(settings, sockets, limits)
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    from service.reload.loading import jobs_still_running

    if stuck := jobs_still_running():  # abandoned loads: never finalize the interpreter under them
        log.warning("exiting while still running: %s", "; ".join(stuck))
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
