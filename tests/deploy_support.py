"""Helpers for the deployment tests: tiny checkpoints, real server processes, nginx, SSE clients.

Not a test module (no ``test_`` prefix): tests/test_deploy*.py, test_nginx*.py and test_reload*.py
import it. Everything runs on loopback with tiny models.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

from model.checkpoint import save_checkpoint
from model.config import GPTConfig
from model.gpt import GPT
from model.tokenizer import CharTokenizer

ROOT = Path(__file__).resolve().parents[1]
NGINX_DIR = ROOT / "deploy" / "nginx"
ALPHABET = "\n !',.:;?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_tiny_checkpoint(path: Path, *, seed: int = 0, provenance: dict | None = None) -> Path:
    """A random 2-layer char model saved with the real (atomic) checkpoint writer."""
    torch.manual_seed(seed)
    tokenizer = CharTokenizer(list(ALPHABET))
    config = GPTConfig(
        block_size=32, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_embd=16
    )
    return save_checkpoint(path, GPT(config), tokenizer.spec(), provenance or {})


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


@dataclass
class ServerProcess:
    """A real ``python -m service`` subprocess on a loopback port; its log goes to a file."""

    checkpoint: Path
    log_path: Path
    args: tuple[str, ...] = ()
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    nofile: int | None = None  # run under this open-file limit (RLIMIT_NOFILE, soft and hard)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        argv = [
            sys.executable,
            "-m",
            "service",
            "--checkpoint",
            str(self.checkpoint),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--device",
            "cpu",
            *self.args,
        ]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=child_env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=None if self.nofile is None else self._limit_files,
        )
        return self

    def _limit_files(self) -> None:  # runs in the child, before it executes Python
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"server on {self.url} not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: a crash, nothing drained."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        if getattr(self, "_log", None):
            self._log.close()


def metric_value(url: str, name: str, **labels: str) -> float:
    """The value of one sample in the server's /metrics (``name`` as exposed, e.g. ``..._total``)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise KeyError(f"no sample {name}{labels or ''} in /metrics")


@dataclass(frozen=True)
class StreamResult:
    """What one streaming completion delivered: the text, how it ended, and the response headers."""

    text: str
    finish_reason: str | None
    done: bool  # saw `data: [DONE]`
    model: str | None
    headers: dict[str, str]
    error: str | None = None
    fingerprint: str | None = None  # system_fingerprint: which checkpoint answered

    @property
    def complete(self) -> bool:
        return self.done and self.finish_reason is not None and self.error is None


def stream_completion(
    client: httpx.Client,
    url: str,
    prompt: str,
    max_tokens: int,
    headers: dict[str, str] | None = None,
    on_headers: Callable[[dict[str, str]], None] | None = None,
    **params,
) -> StreamResult:
    """POST a streaming /v1/completions and read the SSE stream to its end (or its break).

    ``on_headers`` is called with the response headers as soon as they arrive.
    """
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, **params}
    text, finish, done, model, got_headers, fingerprint = [], None, False, None, {}, None
    try:
        with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as resp:
            got_headers = dict(resp.headers)
            if on_headers is not None:
                on_headers(got_headers)
            if resp.status_code != 200:
                resp.read()
                return StreamResult(
                    "",
                    None,
                    False,
                    None,
                    got_headers,
                    f"HTTP {resp.status_code}: {resp.text[:200]}",
                )
            for line in resp.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    done = True
                    continue
                chunk = json.loads(data)
                model = chunk.get("model", model)
                fingerprint = chunk.get("system_fingerprint", fingerprint)
                for choice in chunk.get("choices", []):
                    text.append(choice.get("text") or "")
                    finish = choice.get("finish_reason") or finish
    except (httpx.TransportError, httpx.RemoteProtocolError) as err:
        return StreamResult("".join(text), finish, done, model, got_headers, repr(err), fingerprint)
    return StreamResult("".join(text), finish, done, model, got_headers, None, fingerprint)


def corpus_file(tmp_path: Path, chars: int = 20_000) -> Path:
    """A small training text: the head of $GPTSERVE_TEST_CORPUS, else a text written here."""
    source = os.environ.get("GPTSERVE_TEST_CORPUS")
    if source and Path(source).is_file():
        text = Path(source).read_text(encoding="utf-8")[:chars]
    else:
        line = "To be, or not to be: that is the question.\nWhether 'tis nobler in the mind.\n"
        text = line * (chars // len(line) + 1)
    out = tmp_path / "corpus.txt"
    out.write_text(text, encoding="utf-8")
    return out


def write_nginx_conf(
    prefix: Path,
    *,
    listen_port: int,
    upstreams: list[str],
    extra_server_lines: tuple[str, ...] = (),
) -> Path:
    """Render the shipped deploy/nginx/gptserve.conf for a local nginx under ``prefix``.

    Only what a container would supply differs: the upstream addresses (loopback ports instead of
    the `replica` service name), the listen port, the include path and the temp/log paths.
    """
    for sub in ("logs", "tmp"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    server_conf = (NGINX_DIR / "gptserve.conf").read_text()
    servers = "".join(f"    server {addr} max_fails=1 fail_timeout=10s;\n" for addr in upstreams)
    server_conf, n = re.subn(r"    server replica:8000[^\n]*\n", servers, server_conf)
    assert n == 1, "deploy/nginx/gptserve.conf: expected one `server replica:8000` line"
    server_conf = server_conf.replace("listen 8080;", f"listen 127.0.0.1:{listen_port};")
    server_conf = server_conf.replace(
        "/etc/nginx/gptserve-proxy.inc", str(NGINX_DIR / "gptserve-proxy.inc")
    )
    extra = "".join(f"        {line}\n" for line in extra_server_lines)
    server_conf = server_conf.replace("    location / {\n", "    location / {\n" + extra)
    (prefix / "gptserve.conf").write_text(server_conf)
    main = prefix / "nginx.conf"
    main.write_text(f"""\
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    include {prefix}/gptserve.conf;
}}
""")
    return main


def process_gone(pid: int) -> bool:
    """Process ``pid`` has exited (reaped, or a zombie waiting for its new parent)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def core_pid(server: ServerProcess) -> int:
    """The pid of the engine-core process a ``python -m service`` logged at start."""
    found = re.search(r"engine core \(pid (\d+)\)", server.log())
    assert found, f"the server never logged its engine core:\n{server.log()}"
    return int(found.group(1))
