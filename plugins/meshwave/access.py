"""Who may press which button: the operator role of the operator DAGs, the connection ids the emergency form takes.

DAG-level access control (`DAG(access_control=...)`) is read by one auth manager only: FAB's
(apache-airflow-providers-fab). Airflow's DAG processor syncs it into FAB's permission tables only when
`[core] auth_manager` names the FabAuthManager (airflow/dag_processing/collection.py, `_sync_dag_perms`), and the
SimpleAuthManager authorizes by its own fixed roles (VIEWER, USER, OP, ADMIN), never by DAG. So the DAGs carry
`access_control` only under FAB: elsewhere it would change nothing and costs a RemovedInAirflow4Warning at every
parse. Under FAB the role must exist before the DAG is parsed, or FAB refuses the sync and the DAG is broken
(docker-compose.yaml's airflow-init creates it).

FAB grants, it never takes away: its built-in User, Op and Admin roles hold `can_edit` on every DAG and
`can_create` on every DAG run, so their users can trigger any DAG. The limit holds for users whose roles lack
those global permissions (Viewer plus the operator role): docs/operations.md, "Configuration: who may press which
button".
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

ROLE_ENV = "MESHWAVE_OPERATOR_ROLE"
DEFAULT_ROLE = "meshwave-operator"
PREFIXES_ENV = "MESHWAVE_CONNECTION_PREFIXES"
# Every connection the plans, the demo, the tests and docker-compose.yaml define starts with it.
DEFAULT_PREFIXES = ("meshlab_",)
FAB_AUTH_MANAGER = "FabAuthManager"  # the test Airflow itself applies (collection.py) before syncing
ROLE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.-]{0,63}$")
PREFIX = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")  # a leading part of an Airflow connection id (plan.CONN_ID)
# What triggering needs under FAB: can_edit on the DAG (FabAuthManager.is_authorized_dag asks for it before any
# DAG-run action) and can_create on its runs; can_read to see both. Resource names as FAB's RESOURCE_DETAILS_MAP.
OPERATOR_PERMISSIONS: Mapping[str, frozenset[str]] = {
    "DAGs": frozenset({"can_read", "can_edit"}),
    "DAG Runs": frozenset({"can_read", "can_create"}),
}


class AccessConfigError(ValueError):
    """A setting of this module that cannot be used: the DAG file fails to load, naming it."""


def operator_role(environ: Mapping[str, str] = os.environ) -> str:
    """The FAB role that may trigger the operator DAGs: `MESHWAVE_OPERATOR_ROLE`, default `meshwave-operator`."""
    role = environ.get(ROLE_ENV, "").strip() or DEFAULT_ROLE
    if not ROLE_NAME.match(role):
        raise AccessConfigError(f"{ROLE_ENV}: {role!r} is not a role name ({ROLE_NAME.pattern})")
    return role


def uses_dag_access_control(auth_manager: str) -> bool:
    """Whether `[core] auth_manager` is one that reads DAG-level access control (FAB's only)."""
    return FAB_AUTH_MANAGER in auth_manager


def operator_access_control(auth_manager: str | None = None,
                            environ: Mapping[str, str] = os.environ) -> dict[str, dict[str, set[str]]] | None:
    """`access_control` for an operator DAG: the operator role's grants under FAB, None (unset) elsewhere."""
    if auth_manager is None:
        from airflow.configuration import conf  # the local configuration only: no database, no network

        auth_manager = conf.get("core", "auth_manager")
    if not uses_dag_access_control(auth_manager):
        return None
    return {operator_role(environ): {resource: set(actions) for resource, actions in OPERATOR_PERMISSIONS.items()}}


def connection_prefixes(environ: Mapping[str, str] = os.environ) -> tuple[str, ...]:
    """The prefixes a connection id given in the emergency form must start with: `MESHWAVE_CONNECTION_PREFIXES`
    (comma-separated), default `meshlab_`. Never empty: an empty setting would allow every connection."""
    raw = environ.get(PREFIXES_ENV, "")
    prefixes = tuple(dict.fromkeys(p.strip() for p in raw.split(",") if p.strip())) or DEFAULT_PREFIXES
    bad = [p for p in prefixes if not PREFIX.match(p)]
    if bad:
        raise AccessConfigError(f"{PREFIXES_ENV}: {', '.join(map(repr, bad))} cannot start a connection id "
                                f"({PREFIX.pattern})")
    return prefixes


def check_connection_id(conn_id: str, where: str, prefixes: tuple[str, ...]) -> str:
    """The connection id when it starts with an allowed prefix; else ValueError naming it and the prefixes."""
    if not conn_id.startswith(prefixes):
        raise ValueError(f"{where}: connection {conn_id!r} is not allowed here: the emergency form takes only "
                         f"connection ids starting with {' or '.join(map(repr, prefixes))} ({PREFIXES_ENV})")
    return conn_id
