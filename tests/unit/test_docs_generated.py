"""The generated docs (docs/generate.py, `make docs`) are what is committed, and the plan's JSON Schema agrees with
the pydantic models on every plan in the repository."""

from __future__ import annotations

import copy
import importlib.util
import json
from datetime import date, datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from meshwave.cli import main as meshwave
from meshwave.plan import PlanError, load_plan, parse_plan

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_FILE = ROOT / "docs" / "plan.schema.json"
# Every plan file the repository holds: the shipped ones and the tests' fixtures.
PLAN_FILES = sorted({*ROOT.glob("include/plans/*.yaml"), *ROOT.glob("tests/**/plans/*.yaml")})


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("docs_generate", ROOT / "docs" / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _schema() -> dict[str, Any]:
    return json.loads(SCHEMA_FILE.read_text())


def _as_yaml_text_reads(data: Any) -> Any:
    """The document as an editor's YAML language server sees it: PyYAML turns timestamps into datetimes, a JSON
    Schema validator sees strings."""
    def iso(value: Any) -> str:
        if isinstance(value, datetime | date):
            return value.isoformat()
        raise TypeError(type(value).__name__)

    return json.loads(json.dumps(data, default=iso))


@pytest.mark.parametrize("name", ["plan.schema.json", "plan-reference.md", "benchmarks.md"])
def test_the_committed_docs_are_what_the_generator_writes(name: str) -> None:
    expected = {path.name: text for path, text in _generator().outputs().items()}[name]
    committed = (ROOT / "docs" / name).read_text() if (ROOT / "docs" / name).exists() else None
    assert committed == expected, f"docs/{name} is out of date: run `make docs` and commit it"


def test_meshwave_plan_schema_prints_the_committed_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert meshwave(["plan", "schema"]) == 0
    assert json.loads(capsys.readouterr().out) == _schema()


def test_the_schema_is_a_valid_draft_2020_12_schema() -> None:
    schema = _schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)


def test_every_model_field_has_a_description() -> None:
    schema = _schema()
    models = {"Plan": schema, **schema["$defs"]}
    missing = [f"{name}.{field}" for name, model in models.items()
               for field, prop in model.get("properties", {}).items() if not prop.get("description")]
    assert not missing, f"fields without a description: {missing}"


def test_the_repository_has_plan_files() -> None:
    # so that a moved directory cannot turn the agreement test below into zero cases
    assert len(PLAN_FILES) >= 10 and ROOT / "include/plans/seed-fleet.yaml" in PLAN_FILES


@pytest.mark.parametrize("path", PLAN_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_plan_passes_both_the_json_schema_and_the_model(path: Path) -> None:
    data = _as_yaml_text_reads(yaml.safe_load(path.read_text()))
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft202012Validator(_schema()).iter_errors(data)]
    assert not errors, f"{path.name} fails docs/plan.schema.json: {errors}"
    load_plan(path)  # PlanError names the field


def _seed() -> dict[str, Any]:
    return _as_yaml_text_reads(yaml.safe_load((ROOT / "include/plans/seed-fleet.yaml").read_text()))


def _misspell(plan: dict[str, Any], where: str) -> dict[str, Any]:
    plan = copy.deepcopy(plan)
    target = {"plan": plan, "defaults": plan.setdefault("defaults", {}),
              "thresholds": plan["defaults"].setdefault("thresholds", {}),
              "wave": plan["waves"][0], "service": plan["waves"][0]["services"][0],
              "cluster": next(iter(plan["clusters"].values()))}[where]
    target["soak_second"] = 30  # soak_seconds, misspelled
    return plan


@pytest.mark.parametrize("where", ["plan", "defaults", "thresholds", "wave", "service", "cluster"])
def test_a_misspelled_key_fails_the_schema_as_it_fails_the_model(where: str) -> None:
    validator = jsonschema.Draft202012Validator(_schema())
    assert validator.is_valid(_seed())  # the plan itself is fine
    plan = _misspell(_seed(), where)
    errors = list(validator.iter_errors(plan))
    assert errors and any("soak_second" in e.message for e in errors), errors
    with pytest.raises(PlanError, match="soak_second"):
        parse_plan(plan)


def test_a_benchmark_without_intro_text_is_refused(tmp_path: Path) -> None:
    results = json.loads((ROOT / "bench" / "results.json").read_text())
    results["figures"].append({**results["figures"][0], "benchmark": "brand-new"})
    (tmp_path / "results.json").write_text(json.dumps(results))
    with pytest.raises(SystemExit, match="brand-new"):
        _generator().benchmarks_page(tmp_path / "results.json")


def test_every_figure_of_results_json_is_on_the_benchmarks_page() -> None:
    page = (ROOT / "docs" / "benchmarks.md").read_text().splitlines()
    for figure in json.loads((ROOT / "bench" / "results.json").read_text())["figures"]:
        rows = [line for line in page if line.startswith(f"| {figure['name']} |")]
        assert rows and all(figure["unit"] in row for row in rows), figure["name"]
