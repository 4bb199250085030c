"""Airflow plugin: the "Mesh migration" page (meshwave.ui), in the UI's navigation.

Airflow imports this file in every process that loads plugins, task runs included: the FastAPI app is built only when
the api-server asks for `fastapi_apps`, so a task start pays for no web framework.
"""

from __future__ import annotations

from typing import Any

from airflow.plugins_manager import AirflowPlugin


class MeshMigrationPlugin(AirflowPlugin):
    name = "meshwave"
    external_views = [{
        "name": "Mesh migration",
        "href": "/meshwave/",
        "destination": "nav",
        "url_route": "mesh-migration",  # the UI shows the page in its frame at /plugin/mesh-migration
        "category": "browse",
    }]

    @property
    def fastapi_apps(self) -> list[dict[str, Any]]:  # type: ignore[override]
        from meshwave.ui.app import PREFIX, app

        return [{"app": app, "url_prefix": PREFIX, "name": "meshwave: Mesh migration"}]
