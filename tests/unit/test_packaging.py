"""meshwave installs into an existing Airflow deployment: its metadata declares what plugins/meshwave imports (the
lab's own packages in the `lab` extra), in ranges that hold the versions requirements.txt pins.

Reads the installed metadata: after editing pyproject.toml, `pip install --no-deps -e .` again."""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "plugins" / "meshwave"
# the lab and the stack that runs it (meshstack: the lab, Prometheus, Postgres and Airflow as processes)
LAB = (ROOT / "include" / "meshlab", ROOT / "include" / "meshstack")
FIRST_PARTY = {"meshwave", "meshlab", "meshstack"}

# Airflow's own interfaces, used as Airflow hands them over (its cron timetables, the plugin's FastAPI app and
# Jinja templates, its SQLAlchemy session, pendulum dates): the deployment's Airflow brings the version it works
# with, so meshwave does not pin a range of its own. Checked below to still be Airflow's requirements.
FROM_AIRFLOW = {"croniter", "fastapi", "jinja2", "pendulum", "sqlalchemy"}


def _imports(root: Path) -> Iterator[tuple[str, Path]]:
    """Every absolute import under root, as its full dotted module name, with the file it is in (imports inside
    functions too: they run as well, only later)."""
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield alias.name, path
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                yield node.module, path


@cache
def _packages_distributions() -> dict[str, list[str]]:
    return metadata.packages_distributions()


@cache
def _distribution(module: str) -> str | None:
    """The distribution that provides an import, None for the standard library and first-party code.

    `airflow` is one namespace over many distributions: each `airflow.providers.<a>.<b>` is the provider
    apache-airflow-providers-<a>-<b>; everything else there (airflow.sdk, airflow.models, ...) is apache-airflow."""
    top = module.split(".")[0]
    if top in sys.stdlib_module_names or top in FIRST_PARTY or top == "__future__":
        return None
    if top == "airflow":
        parts = module.split(".")
        if len(parts) > 2 and parts[1] == "providers":
            for depth in range(len(parts), 2, -1):  # the longest prefix that is an installed provider
                name = "apache-airflow-providers-" + "-".join(parts[2:depth])
                try:
                    metadata.distribution(name)
                except metadata.PackageNotFoundError:
                    continue
                return canonicalize_name(name)
            return canonicalize_name("apache-airflow-providers-" + parts[2])
        return "apache-airflow"
    found = _packages_distributions().get(top)
    assert found, f"import {module}: no installed distribution provides {top!r}"
    return canonicalize_name(found[0])


def _requirements(extra: str | None = None) -> dict[str, Requirement]:
    out = {}
    for line in metadata.requires("meshwave") or []:
        req = Requirement(line)
        in_extra = req.marker is not None and req.marker.evaluate({"extra": extra or ""})
        if (extra is None and req.marker is None) or (extra is not None and req.marker is not None and in_extra):
            out[canonicalize_name(req.name)] = req
    return out


def _airflow_requirements() -> set[str]:
    names = set()
    for dist in ("apache-airflow-core", "apache-airflow-task-sdk"):
        for line in metadata.requires(dist) or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                names.add(canonicalize_name(req.name))
    return names


def _undeclared(root: Path, declared: set[str]) -> list[str]:
    missing = []
    for module, path in _imports(root):
        dist = _distribution(module)
        if dist is None or dist in declared:
            continue
        if module.split(".")[0] in FROM_AIRFLOW:
            continue
        missing.append(f"{path.relative_to(ROOT)}: import {module} needs {dist}")
    return sorted(set(missing))


def test_every_import_of_the_package_is_a_declared_dependency() -> None:
    assert _undeclared(PACKAGE, set(_requirements())) == []


def test_what_is_taken_from_airflow_is_still_airflows_requirement() -> None:
    from_airflow = {_distribution(m) for m, _ in _imports(PACKAGE) if m.split(".")[0] in FROM_AIRFLOW}
    assert from_airflow, "nothing imported from FROM_AIRFLOW any more: empty the set"
    assert from_airflow <= _airflow_requirements()


def test_the_lab_extra_adds_what_the_lab_imports() -> None:
    declared = set(_requirements()) | set(_requirements("lab"))
    assert [missing for root in LAB for missing in _undeclared(root, declared)] == []
    # and only that: nothing of the lab's is forced on an Airflow deployment
    assert not set(_requirements("lab")) & {_distribution(m) for m, _ in _imports(PACKAGE)}


def _pins() -> dict[str, str]:
    pins = {}
    for name in ("requirements.txt", "constraints.txt"):
        for line in (ROOT / name).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if "==" in line:
                req = Requirement(line)
                pins.setdefault(canonicalize_name(req.name), next(iter(req.specifier)).version)
    return pins


@pytest.mark.parametrize("extra", [None, "lab"])
def test_the_ranges_hold_the_pinned_versions(extra: str | None) -> None:
    """`make setup` installs the pins and the package with --no-deps: a range that left them out would only show
    when someone installs meshwave the ordinary way."""
    pins = _pins()
    for name, req in _requirements(extra).items():
        assert name in pins, f"{name}: declared but not pinned in requirements.txt / constraints.txt"
        assert req.specifier.contains(pins[name]), f"{req} does not hold the pinned {name}=={pins[name]}"
        assert req.specifier.contains(metadata.version(name)), f"{req} does not hold the installed version"
