"""The lock is what runs: installed versions equal requirements/dev.txt, and every place that
names the install command or the torch version says the same thing."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "requirements"


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{path.name}: {line!r} is not an exact pin"
            pins[_normalise(name)] = version.strip()
    return pins


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _ci_commands() -> tuple[str, str]:
    text = (ROOT / ".ci" / "run").read_text()
    install = re.search(r"^INSTALL='(.+)'$", text, re.M).group(1)
    test = re.search(r"^TEST='(.+)'$", text, re.M).group(1)
    return install, test


def test_every_locked_distribution_is_installed_at_its_locked_version():
    wrong = {}
    for name, version in _pins(REQUIREMENTS / "dev.txt").items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = "missing"
        if installed != version:
            wrong[name] = f"locked {version}, installed {installed}"
    assert not wrong, f"the environment drifted from requirements/dev.txt: {wrong}"


def test_runtime_lock_is_the_dev_lock_restricted_to_the_server():
    dev, runtime = _pins(REQUIREMENTS / "dev.txt"), _pins(REQUIREMENTS / "runtime.txt")
    differ = {n: (v, dev.get(n)) for n, v in runtime.items() if dev.get(n) != v}
    assert not differ, f"runtime.txt and dev.txt pin these differently (runtime, dev): {differ}"


def test_every_declared_dependency_is_locked():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        declared += extra
    locked = _pins(REQUIREMENTS / "dev.txt")
    names = {_normalise(re.split(r"[\s<>=!~\[;]", d, maxsplit=1)[0]) for d in declared}
    missing = sorted(names - set(locked) - {"torch"})
    assert not missing, f"declared in pyproject.toml but not locked (run requirements/lock.sh): {missing}"


def test_readme_gives_the_commands_ci_runs():
    install, test = _ci_commands()
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    lines = {line.strip() for block in blocks for line in block.splitlines()}
    assert install in lines, f"README.md must give the install command CI runs: {install}"
    assert test in lines, f"README.md must give the test command CI runs: {test}"


def test_torch_version_is_the_same_everywhere():
    install, _ = _ci_commands()
    version = re.search(r"torch==([\w.+]+)", install).group(1)
    lock_script = (REQUIREMENTS / "lock.sh").read_text()
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"TORCH_VERSION={version}\n" in lock_script, "requirements/lock.sh pins another torch"
    assert f"ARG TORCH_VERSION={version}\n" in dockerfile, "the Dockerfile pins another torch"
    for name in ("dev.txt", "runtime.txt"):
        header = (REQUIREMENTS / name).read_text().splitlines()[0]
        assert f"torch=={version}" in header, f"{name} was generated for another torch"
