"""meshwave as an Airflow provider: Airflow's own ProvidersManager finds the `meshwave_prometheus` connection type
through the entry point, shows its form from provider info, and imports the hook only when the type is used (every
task process lists providers: registering must not make them import the Prometheus client).

Reads the installed entry point: after editing pyproject.toml, `pip install --no-deps -e .` again."""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from meshwave import provider_info
from meshwave.hooks import PrometheusHook
from meshwave.provider_info import PROMETHEUS_CONN_TYPE, get_provider_info

# In a fresh interpreter: the ProvidersManagers are process-wide singletons, and what matters is what a new
# process imports.
PROBE = """
import json, sys
from airflow.api_fastapi.core_api.services.ui.connections import HookMetaService
from airflow.sdk.providers_manager_runtime import ProvidersManagerTaskRuntime

out = {}
runtime = ProvidersManagerTaskRuntime()
out["providers"] = {name: info.version for name, info in runtime.providers.items()}
runtime.hooks  # what a task runtime resolves connection types with
out["imported_after_listing"] = "meshwave.hooks" in sys.modules
meta = [m for m in HookMetaService.hook_meta_data() if m.connection_type == "meshwave_prometheus"]
out["imported_after_form"] = "meshwave.hooks" in sys.modules
out["form"] = meta[0].model_dump(mode="json") if meta else None
info = runtime.hooks["meshwave_prometheus"]
out["hook"] = info._asdict() if info else None
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def probed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    home = tmp_path_factory.mktemp("airflow")
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "AIRFLOW_HOME": str(home)})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_airflow_lists_meshwave_as_a_provider_at_the_installed_version(probed: dict[str, Any]) -> None:
    assert probed["providers"].get("meshwave") == metadata.version("meshwave")


def test_the_connection_type_resolves_to_the_hook(probed: dict[str, Any]) -> None:
    assert probed["hook"] == {
        "hook_class_name": "meshwave.hooks.PrometheusHook", "connection_id_attribute_name": "prometheus_conn_id",
        "package_name": "meshwave", "hook_name": "Prometheus (meshwave)", "connection_type": PROMETHEUS_CONN_TYPE,
        "connection_testable": True, "dialects": [],
    }


def test_the_form_has_a_field_for_each_extra_the_connection_is_read_with(probed: dict[str, Any]) -> None:
    form = probed["form"]
    # what connections.prometheus_source reads
    assert set(form["extra_fields"]) == {"cluster", "headers", "verify", "ca_bundle"}
    assert form["extra_fields"]["headers"]["schema"]["type"] == ["object", "null"]
    assert form["extra_fields"]["verify"]["schema"]["type"] == "boolean"
    assert form["extra_fields"]["verify"]["value"] is True  # verifies unless turned off
    assert form["extra_fields"]["ca_bundle"]["schema"]["type"] == ["string", "null"]
    assert form["standard_fields"]["host"]["title"] == "Prometheus URL"
    assert form["standard_fields"]["url_schema"]["hidden"] is True
    assert form["standard_fields"]["login"]["hidden"] is False  # basic auth


def test_registering_imports_the_hook_only_when_the_type_is_used(probed: dict[str, Any]) -> None:
    assert probed["imported_after_listing"] is False
    assert probed["imported_after_form"] is False


def test_provider_info_imports_nothing_and_matches_airflows_schema() -> None:
    """Every process that lists providers runs it: no import beyond typing, no I/O."""
    tree = ast.parse(Path(provider_info.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert imported <= {"__future__", "typing"}

    import jsonschema
    from airflow import providers_manager

    schema = json.loads((Path(providers_manager.__file__).parent / "provider_info.schema.json").read_text())
    info = get_provider_info()
    jsonschema.validate(info, schema)
    assert info["package-name"] == "meshwave"  # Airflow refuses a provider whose name is not its distribution's
    assert info["versions"][0] == metadata.version("meshwave")


def test_the_hook_declares_what_provider_info_says() -> None:
    (declared,) = get_provider_info()["connection-types"]
    assert PrometheusHook.conn_type == declared["connection-type"]
    assert PrometheusHook.hook_name == declared["hook-name"]
    assert f"{PrometheusHook.__module__}.{PrometheusHook.__qualname__}" == declared["hook-class-name"]
    # the form lives in provider info: defining it on the hook too is deprecated since Airflow 3.2
    assert "get_connection_form_widgets" not in PrometheusHook.__dict__
    assert "get_ui_field_behaviour" not in PrometheusHook.__dict__
