"""The lock is what runs: installed versions equal requirements/dev.txt, the runtime lock holds what
the server and the trainer import, and every place that names an install command or the torch
version says the same thing (the README leads with the runtime lock; CI and "Test" use dev)."""

from __future__ import annotations

import ast
import re
import sys
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


def _bash_lines(markdown: str) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", markdown, re.S)
    return [line.split("#", 1)[0].strip() for block in blocks for line in block.splitlines()]


def test_readme_leads_with_the_runtime_lock_and_tests_with_the_commands_ci_runs():
    install, test = _ci_commands()
    assert "requirements/dev.txt" in install, "CI must install the dev lock (it runs the tests)"
    runtime = install.replace("requirements/dev.txt", "requirements/runtime.txt")
    readme = (ROOT / "README.md").read_text()
    assert _bash_lines(readme)[0] == runtime, (
        f"README.md's first command must install the runtime lock: {runtime}"
    )
    section = readme.split("\n## Test\n", 1)[1].split("\n## ", 1)[0]
    assert install in _bash_lines(section), f'README.md\'s "Test" must give CI\'s install: {install}'
    assert test in _bash_lines(section), f'README.md\'s "Test" must give CI\'s test command: {test}'


OPTIONAL_IMPORTS = {"wandb"}  # trainer --wandb only; the error says to install it


def test_the_runtime_lock_holds_everything_the_server_and_trainer_import():
    from importlib.metadata import packages_distributions

    providers = packages_distributions()
    runtime = set(_pins(REQUIREMENTS / "runtime.txt")) | {"torch"}
    missing = {}
    for package in ("model", "service", "trainer"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in sys.stdlib_module_names or top in ("model", "service", "trainer"):
                        continue
                    dists = {_normalise(d) for d in providers.get(top, [top])}
                    if top not in OPTIONAL_IMPORTS and not dists & runtime:
                        missing[top] = str(path.relative_to(ROOT))
    assert not missing, f"imported but not in requirements/runtime.txt (module: file): {missing}"


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
