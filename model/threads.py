"""How many CPU threads the engine's intra-op work uses, and how those threads wait.

On a machine it shares (a laptop with a browser open, a Kubernetes node, a CI runner), two
OpenMP threads that spin at every parallel region while a third runnable thread holds one of two
cores made a decode step ~10x slower (docs/BENCHMARKS.md, "A busy neighbour"). Two defaults
answer it, both measured there:

- **A shorter spin**: OpenMP threads of torch's libgomp spin ``GOMP_SPINCOUNT`` iterations at a
  barrier before they sleep (libgomp's default: 300,000). ``openmp_env`` sets 10,000 unless the
  environment already says how to wait (``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``); libgomp reads
  it once, when torch loads, so only an entry point that runs before ``import torch`` can set it
  (``python -m service``, ``python -m trainer sample``).
- **An adaptive count** (``model.tuner.ThreadTuner``): the engine starts with every CPU it
  may use and moves between 1 and that many by the step times it measures.

``plan_threads`` resolves what the engine may use: ``--threads N`` (fixed N), else
``OMP_NUM_THREADS`` (fixed), else the CPUs in the process's affinity capped by its cgroup's CPU
quota (a container limited to 1.5 CPUs gets 1 thread, never more than its quota: a thread over the
quota is throttled for the rest of each 100 ms period), adaptive.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

SPIN_COUNT = 10_000  # see the module docstring; measured in docs/BENCHMARKS.md
_WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


@dataclass(frozen=True)
class ThreadPlan:
    """The engine's CPU threads: at most ``threads``, moved between 1 and it when ``adaptive``.
    ``cpus`` is the affinity's size, ``quota`` the cgroup's CPU quota (None: no quota),
    ``source`` says where ``threads`` came from, ``waits`` how the threads wait."""

    threads: int
    adaptive: bool
    cpus: int
    quota: float | None
    source: str
    waits: str

    def describe(self) -> str:
        """One line for the start-up log."""
        quota = "none" if self.quota is None else f"{self.quota:g} CPUs"
        mode = (f"adaptive 1..{self.threads} by measured step time" if self.adaptive
                else f"fixed {self.threads}")
        return (f"CPU threads: {mode} (from {self.source}; {self.cpus} CPUs in affinity, cgroup "
                f"quota {quota}); OpenMP waits: {self.waits}")


def plan_threads(requested: int | None, environ: Mapping[str, str] | None = None,
                 cpus: int | None = None, quota: float | None | str = "read") -> ThreadPlan:
    """What the engine may use: ``requested`` (``--threads``) wins, then ``OMP_NUM_THREADS``,
    else every usable CPU, adaptively. ``cpus`` and ``quota`` default to this process's affinity
    and cgroup quota (tests pass their own)."""
    env = os.environ if environ is None else environ
    cpus = len(os.sched_getaffinity(0)) if cpus is None else cpus
    quota = cgroup_cpu_quota() if quota == "read" else quota
    usable = cpus if quota is None else max(1, min(cpus, math.floor(quota)))
    waits = wait_policy(env)
    if requested is not None:
        if requested < 1:
            raise ValueError(f"threads must be >= 1, got {requested}")
        return ThreadPlan(requested, False, cpus, quota, "--threads", waits)
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if omp:
        if not omp.isdigit() or int(omp) < 1:
            raise ValueError(f"OMP_NUM_THREADS must be a positive integer, got {omp!r}")
        return ThreadPlan(int(omp), False, cpus, quota, "OMP_NUM_THREADS", waits)
    source = "the CPUs in affinity" if usable == cpus else "the cgroup's CPU quota"
    return ThreadPlan(usable, usable > 1, cpus, quota, source, waits)


def openmp_env(environ: MutableMapping[str, str]) -> bool:
    """Set ``GOMP_SPINCOUNT`` to gptserve's default unless the environment says how OpenMP
    threads wait or torch is loaded already (libgomp reads it once, as torch loads). True if it
    was set now; child processes inherit it."""
    if torch_loaded() or any(name in environ for name in _WAIT_VARIABLES):
        return False
    environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    return True


def wait_policy(environ: Mapping[str, str]) -> str:
    """How this process's OpenMP threads wait, for the log (what the environment said when
    torch loaded is what libgomp uses)."""
    said = [f"{name}={environ[name]}" for name in _WAIT_VARIABLES if name in environ]
    if not said:
        return "libgomp's default spin (set GOMP_SPINCOUNT before torch loads to change it)"
    default = environ.get("GOMP_SPINCOUNT") == str(SPIN_COUNT) and len(said) == 1
    return ", ".join(said) + (" (gptserve's default)" if default else " (environment)")


def torch_loaded() -> bool:
    return "torch" in sys.modules


# ---- the cgroup's CPU quota ------------------------------------------------------------------


def cgroup_cpu_quota(proc: Path = Path("/proc/self")) -> float | None:
    """CPUs this process may use per period by its cgroup (v2 ``cpu.max`` or v1
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``), the smallest along its cgroup path up to the
    hierarchy's root; None without a quota or a readable cgroup."""
    try:
        groups = (proc / "cgroup").read_text().splitlines()
        mounts = (proc / "mountinfo").read_text().splitlines()
    except OSError:
        return None
    found = [q for q in (_quota_v2(groups, mounts), _quota_v1(groups, mounts)) if q is not None]
    return min(found) if found else None


def _mount_point(mounts: list[str], fstype: str, option: str | None) -> tuple[str, str] | None:
    """(root inside the hierarchy, mount point) of the first mount of ``fstype`` whose super
    options name ``option`` (v1 controllers), from ``/proc/self/mountinfo``."""
    for line in mounts:
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3 or tail[0] != fstype:
            continue
        if option is None or option in tail[2].split(","):
            return fields[3], fields[4]
    return None


def _walk(mount: tuple[str, str], path: str) -> list[Path]:
    """The cgroup folders from ``path`` up to the mount's root."""
    root, point = mount
    rel = os.path.relpath(path, root) if path.startswith(root) else path.lstrip("/")
    parts = [] if rel in (".", "") else rel.split("/")
    return [Path(point, *parts[:i]) for i in range(len(parts), -1, -1)]


def _quota_v2(groups: list[str], mounts: list[str]) -> float | None:
    path = next((g[3:] for g in groups if g.startswith("0::")), None)
    mount = _mount_point(mounts, "cgroup2", None)
    if path is None or mount is None:
        return None
    quotas = []
    for folder in _walk(mount, path):
        try:
            limit, period = (folder / "cpu.max").read_text().split()[:2]
        except (OSError, ValueError):
            continue
        if limit != "max" and int(period) > 0:
            quotas.append(int(limit) / int(period))
    return min(quotas) if quotas else None


def _quota_v1(groups: list[str], mounts: list[str]) -> float | None:
    path = None
    for line in groups:
        _, controllers, where = line.split(":", 2)
        if "cpu" in controllers.split(","):
            path = where
    mount = _mount_point(mounts, "cgroup", "cpu")
    if path is None or mount is None:
        return None
    quotas = []
    for folder in _walk(mount, path):
        try:
            limit = int((folder / "cpu.cfs_quota_us").read_text())
            period = int((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        if limit > 0 and period > 0:
            quotas.append(limit / period)
    return min(quotas) if quotas else None
