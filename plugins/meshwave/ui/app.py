"""The page's FastAPI app, mounted by the api-server at `/meshwave` (plugins/meshwave_ui.py).

Airflow mounts a plugin's app beside its own API, outside the routers that authenticate: every route here asks for
the user itself, through the core API's own dependency (`GetUserDep`: the `Authorization: Bearer` header, or the UI's
`_token` cookie; none: 401, a bad or expired one: 403 or 401), and shows only the wave DAGs the auth manager lets
that user read.

    GET /meshwave/                    the page (HTML; the UI shows it in its "Mesh migration" entry)
    GET /meshwave/api/fleet           the same, as JSON (view.FleetView)
    GET /meshwave/reports/{dag_id}/{run_id}.csv|.png   a run's report table or chart
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path
from typing import Annotated

from airflow.api_fastapi.app import get_auth_manager
from airflow.api_fastapi.auth.managers.models.base_user import BaseUser
from airflow.api_fastapi.core_api.security import GetUserDep
from airflow.configuration import conf
from fastapi import FastAPI, HTTPException
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, HTMLResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlalchemy.exc import SQLAlchemyError

from meshwave import report
from meshwave.fleet import load_fleet
from meshwave.ui import metadata
from meshwave.ui.view import STATE_ORDER, FleetView, Links, fleet_view

PREFIX = "/meshwave"
_TEMPLATES = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"),
                         autoescape=select_autoescape(["html"]))

app = FastAPI(title="meshwave: Mesh migration", description=__doc__)


def _links() -> Links:
    ui_root = urllib.parse.urlsplit(conf.get("api", "base_url", fallback="") or "/").path.rstrip("/")
    return Links(ui_root=ui_root, app_root=ui_root + PREFIX)


def _readable(user: BaseUser) -> set[str]:
    return get_auth_manager().get_authorized_dag_ids(user=user, method="GET")


def fleet(user: BaseUser) -> FleetView:
    """Every plan's waves the user may read, with what Airflow holds for each."""
    loaded = load_fleet()
    readable = _readable(user)
    plans = [p.model_copy(update={"waves": [w for w in p.waves if p.dag_id(w) in readable]}) for p in loaded.plans]
    plans = [p for p in plans if p.waves]
    links = _links()
    try:
        got = metadata.read((p.dag_id(w) for p in plans for w in p.waves), readable, links)
    except SQLAlchemyError as exc:  # the page says what it could not read, rather than a bare 500
        raise HTTPException(503, f"Airflow's metadata database did not answer: {type(exc).__name__}: {exc}") from exc
    return fleet_view(plans, got.waves, links, loaded.errors, got.later, got.emergency)


@app.get("/api/fleet", response_model=FleetView)
def fleet_json(user: GetUserDep) -> FleetView:
    return fleet(user)


def page_html(view: FleetView, user: str) -> str:
    return _TEMPLATES.get_template("page.html").render(view=view, states=[str(s) for s in STATE_ORDER], user=user)


@app.get("/", response_class=HTMLResponse)
def page(user: GetUserDep) -> HTMLResponse:
    return HTMLResponse(page_html(fleet(user), user.get_name()))


_DAG_ID = PathParam(pattern=r"^[A-Za-z0-9_.-]+$")


@app.get("/reports/{dag_id}/{run_file}")
def report_file(dag_id: Annotated[str, _DAG_ID], run_file: str, user: GetUserDep) -> Response:
    run_id, dot, suffix = run_file.rpartition(".")
    if not dot or suffix not in ("csv", "png"):
        raise HTTPException(404, f"{run_file}: a report is <run_id>.csv or <run_id>.png")
    if dag_id not in _readable(user):
        raise HTTPException(403, f"{dag_id}: not a DAG you may read")
    path = report.report_base(dag_id, run_id).with_suffix(f".{suffix}")
    if not path.is_file():
        raise HTTPException(404, f"no {suffix} report for {dag_id} run {run_id} in {path.parent}")
    media = "image/png" if suffix == "png" else "text/csv"
    if path.protocol in ("", "file", "local"):  # a local folder: served from disk as before
        return FileResponse(path.path, media_type=media)
    # object storage: a report is a CSV or a PNG of some hundred kB, read through the path's own filesystem
    with path.open("rb") as f:
        return Response(f.read(), media_type=media)
