"""The engine's CPU thread plan (model/threads.py): what it resolves from the flag, the
environment, the affinity and the cgroup's CPU quota; what the server and the trainer's sample
log and use. The quota tests run a real ``python -m service`` inside a real cgroup with a CPU
quota (this machine's cgroup v1 ``cpu`` controller, or cgroup v2)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from deploy_support import ROOT, free_port, make_tiny_checkpoint

from model.threads import SPIN_COUNT, cgroup_cpu_quota, plan_threads
from service.engine import Engine, EngineConfig, Request, SamplingParams
from service.settings import parse_settings


@pytest.mark.parametrize(
    ("requested", "env", "cpus", "quota", "threads", "adaptive", "source"),
    [
        (3, {"OMP_NUM_THREADS": "1"}, 2, None, 3, False, "--threads"),
        (None, {"OMP_NUM_THREADS": "1"}, 2, None, 1, False, "OMP_NUM_THREADS"),
        (None, {}, 2, None, 2, True, "the CPUs in affinity"),
        (None, {}, 1, None, 1, False, "the CPUs in affinity"),
        (None, {}, 8, 1.5, 1, False, "the cgroup's CPU quota"),  # never past the quota
        (None, {}, 8, 4.0, 4, True, "the cgroup's CPU quota"),
        (None, {}, 2, 4.0, 2, True, "the CPUs in affinity"),
        (None, {}, 4, 0.5, 1, False, "the cgroup's CPU quota"),
    ],
)
def test_the_plan_takes_the_flag_then_omp_num_threads_then_the_usable_cpus(
        requested, env, cpus, quota, threads, adaptive, source):
    plan = plan_threads(requested, env, cpus=cpus, quota=quota)
    assert (plan.threads, plan.adaptive, plan.source) == (threads, adaptive, source), plan


def test_bad_thread_counts_are_refused_with_their_name():
    with pytest.raises(ValueError, match="threads must be >= 1"):
        plan_threads(0, {}, cpus=2, quota=None)
    with pytest.raises(ValueError, match="OMP_NUM_THREADS must be a positive integer, got 'two'"):
        plan_threads(None, {"OMP_NUM_THREADS": "two"}, cpus=2, quota=None)
    with pytest.raises(ValueError, match="EngineConfig.threads must be a positive integer"):
        EngineConfig(threads=0)
    with pytest.raises(SystemExit):
        parse_settings(["--threads", "two"], {})
    assert parse_settings(["--threads", "3"], {}).engine.threads == 3
    assert parse_settings([], {"GPTSERVE_THREADS": "2"}).engine.threads == 2


def _fake_proc(tmp_path: Path, cgroup: str, mounts: list[str]) -> Path:
    proc = tmp_path / "proc"
    proc.mkdir(parents=True)
    (proc / "cgroup").write_text(cgroup)
    (proc / "mountinfo").write_text("\n".join(mounts) + "\n")
    return proc


def test_the_quota_is_the_smallest_along_the_cgroup_path_v2(tmp_path):
    root = tmp_path / "fs"
    (root / "kubepods" / "pod1").mkdir(parents=True)
    (root / "cpu.max").write_text("max 100000\n")
    (root / "kubepods" / "cpu.max").write_text("400000 100000\n")
    (root / "kubepods" / "pod1" / "cpu.max").write_text("150000 100000\n")
    proc = _fake_proc(tmp_path, "0::/kubepods/pod1\n", [
        f"30 23 0:26 / {root} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate"])
    assert cgroup_cpu_quota(proc) == 1.5
    (root / "kubepods" / "pod1" / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(proc) == 4.0
    (root / "kubepods" / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(proc) is None


def test_the_quota_is_read_from_the_v1_cpu_controller_at_its_mount(tmp_path):
    cpu = tmp_path / "cpu"
    (cpu / "docker" / "abc").mkdir(parents=True)
    for folder, quota in ((cpu, -1), (cpu / "docker", -1), (cpu / "docker" / "abc", 250000)):
        (folder / "cpu.cfs_quota_us").write_text(f"{quota}\n")
        (folder / "cpu.cfs_period_us").write_text("100000\n")
    proc = _fake_proc(tmp_path, "4:memory:/docker/abc\n2:cpu,cpuacct:/docker/abc\n0::/\n", [
        f"25 23 0:22 / {tmp_path}/memory rw - cgroup cgroup rw,memory",
        f"26 23 0:23 / {cpu} rw - cgroup cgroup rw,cpu,cpuacct",
    ])
    assert cgroup_cpu_quota(proc) == 2.5
    missing = _fake_proc(tmp_path / "other", "", [])
    assert cgroup_cpu_quota(missing) is None


@pytest.mark.parametrize(("env", "expected"), [
    ({}, str(SPIN_COUNT)),
    ({"OMP_WAIT_POLICY": "passive"}, None),
    ({"GOMP_SPINCOUNT": "5"}, "5"),
])
def test_entry_points_set_the_spin_only_when_the_environment_says_nothing(env, expected):
    code = ("import os, sys; from model.threads import openmp_env; "
            "took = openmp_env(os.environ); assert 'torch' not in sys.modules; "
            "print(took, os.environ.get('GOMP_SPINCOUNT'))")
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(not env), str(expected)], out


def test_after_torch_has_loaded_the_spin_is_left_alone():
    code = ("import os, torch; from model.threads import openmp_env; "
            "print(openmp_env(os.environ), os.environ.get('GOMP_SPINCOUNT'))")
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], env=base, cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["False", "None"], "libgomp reads the spin once: setting it later would lie"


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_the_engine_steps_on_the_planned_count_and_tunes_only_when_it_may(
        tmp_path, restore_threads):
    ckpt_path = make_tiny_checkpoint(tmp_path / "ck")
    from model.checkpoint import load_checkpoint

    fixed = Engine(load_checkpoint(ckpt_path), EngineConfig(threads=1, max_batch_size=2))
    torch.set_num_threads(2)
    seen = [torch.get_num_threads() for _ in fixed.iterate(
        [Request("a", (1, 2, 3), SamplingParams(max_tokens=5, temperature=0.0))])]
    assert seen and set(seen) == {1}, f"steps ran on {set(seen)} threads, --threads 1 was asked"
    assert (fixed.threads.threads, fixed.threads.adaptive) == (1, False)
    assert fixed._core.tuner is None

    cpus = len(os.sched_getaffinity(0))
    auto = Engine(load_checkpoint(ckpt_path), EngineConfig(max_batch_size=2))
    assert auto.threads.adaptive == (cpus > 1 and "OMP_NUM_THREADS" not in os.environ)
    invariant = Engine(load_checkpoint(ckpt_path),
                       EngineConfig(max_batch_size=2, batch_invariant=True))
    assert not invariant.threads.adaptive, "a batch-invariant engine must not change its count"


# ---- a real server inside a real cgroup ----------------------------------------------------


class CpuCgroup:
    """A cgroup with a CPU quota (v1 ``cpu`` controller, else v2), removed on exit."""

    def __init__(self, cpus: float) -> None:
        name = f"gptserve-test-{uuid.uuid4().hex[:8]}"
        v1, v2 = Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup")
        if (v1 / "cpu.cfs_quota_us").exists():
            self.path = v1 / name
            self.path.mkdir()
            (self.path / "cpu.cfs_period_us").write_text("100000")
            (self.path / "cpu.cfs_quota_us").write_text(str(int(cpus * 100000)))
        elif "cpu" in (v2 / "cgroup.controllers").read_text().split():
            self.path = v2 / name
            self.path.mkdir()
            (self.path / "cpu.max").write_text(f"{int(cpus * 100000)} 100000")
        else:
            pytest.fail("no writable cgroup CPU controller on this machine (the test needs root)")

    def enter(self) -> None:  # in the child, before it runs Python
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def remove(self) -> None:
        """Remove the group once it is empty: the server's engine core exits just after its
        front end, which is all ``proc.wait`` waited for (rmdir of a busy group: EBUSY)."""
        deadline = time.monotonic() + 30
        while (self.path / "cgroup.procs").read_text().split() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.path.rmdir()


def _server_log(tmp_path: Path, args: list[str], env: dict[str, str],
                preexec=None) -> str:
    """Start ``python -m service``, wait for its engine's thread plan in the log, stop it."""
    log_path = tmp_path / f"server-{uuid.uuid4().hex[:6]}.log"
    ckpt = make_tiny_checkpoint(tmp_path / f"ck-{uuid.uuid4().hex[:6]}")
    argv = [sys.executable, "-m", "service", "--checkpoint", str(ckpt), "--port",
            str(free_port()), "--device", "cpu", *args]
    with log_path.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=preexec)
    try:
        deadline = time.monotonic() + 60
        while "CPU threads:" not in log_path.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()
            time.sleep(0.1)
        return log_path.read_text()
    finally:
        proc.terminate()
        proc.wait(30)


def _env(**extra: str) -> dict[str, str]:
    drop = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "GPTSERVE_THREADS")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def test_the_server_logs_a_thread_plan_capped_by_its_cgroup_quota(tmp_path):
    group = CpuCgroup(1.5)
    try:
        log = _server_log(tmp_path, [], _env(), preexec=group.enter)
    finally:
        group.remove()
    cpus = len(os.sched_getaffinity(0))
    line = next(line for line in log.splitlines() if "CPU threads:" in line)
    assert "CPU threads: fixed 1 (from the cgroup's CPU quota" in line, line
    assert f"{cpus} CPUs in affinity, cgroup quota 1.5 CPUs" in line, line
    assert f"OpenMP waits: GOMP_SPINCOUNT={SPIN_COUNT} (gptserve's default)" in line, line


def test_the_server_logs_its_thread_plan_from_the_flag_the_environment_or_the_cpus(tmp_path):
    cpus = len(os.sched_getaffinity(0))
    auto = _server_log(tmp_path, [], _env())
    expected = f"adaptive 1..{cpus} by measured step time" if cpus > 1 else "fixed 1"
    assert f"CPU threads: {expected} (from the CPUs in affinity" in auto, auto
    flag = _server_log(tmp_path, ["--threads", "1"], _env(OMP_WAIT_POLICY="passive"))
    assert "CPU threads: fixed 1 (from --threads;" in flag, flag
    assert "OpenMP waits: OMP_WAIT_POLICY=passive (environment)" in flag, flag
    omp = _server_log(tmp_path, [], _env(OMP_NUM_THREADS="1"))
    assert "CPU threads: fixed 1 (from OMP_NUM_THREADS;" in omp, omp


def test_the_trainers_sample_takes_threads_and_refuses_a_bad_count(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "ck")
    run = [sys.executable, "-m", "trainer", "sample", "--checkpoint", str(ckpt), "--prompt", "ab",
           "--max-tokens", "40", "--temperature", "0"]
    fixed = subprocess.run([*run, "--threads", "1"], cwd=ROOT, env=_env(), capture_output=True,
                           text=True, timeout=120, check=False)
    auto = subprocess.run(run, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120,
                          check=False)
    assert fixed.returncode == 0 and auto.returncode == 0, fixed.stderr + auto.stderr
    assert fixed.stdout == auto.stdout and fixed.stdout.startswith("ab")
    bad = subprocess.run([*run, "--threads", "0"], cwd=ROOT, env=_env(), capture_output=True,
                         text=True, timeout=120, check=False)
    assert bad.returncode == 2 and "threads must be >= 1" in bad.stderr, bad.stderr
