"""The RBAC manifests in deploy/rbac against the Kubernetes calls the code makes (issue 19).

Nothing here lists the calls by hand. The code is parsed with `ast`: every use of a kubernetes-client API object that
MeshKube.__init__ builds (`self.core = client.CoreV1Api(...)`, ...), wherever it is reached (`self.apps.X`,
`self.kube.custom.X`, a local alias `custom = self.kube.custom`), is one call. Its (apiGroup, resource, verb) comes
from the client's own generated method (the path template and HTTP method it hands to `call_api`), read as the API
server's RequestInfo reads a request; CustomObjectsApi's group and plural are its arguments, resolved from the
module's constants (PA_GROUP, PA_PLURAL). Raw `api_client.call_api` requests must be discovery (GET /apis/<group>,
GET /version): no rule grants those, the built-in ClusterRoles system:discovery and system:public-info-viewer allow
them to every authenticated user.

What the triggerer runs is computed the same way: from the trigger classes, the MeshKube members they use and, through
`self.<member>`, `self.kube.<member>`, `self.mtls.<member>` (typed by the classes' own annotations), everything those
reach. MeshKube is made of one class per resource (plugins/meshwave/kube/): a member is found in the class that
defines it, and `self.<member>` in one of those classes is a member of MeshKube.
"""

from __future__ import annotations

import ast
import functools
import inspect
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = ROOT / "plugins" / "meshwave"
KUBE = PLUGINS / "kube" / "client.py"  # where MeshKube.__init__ builds the API objects
WORKER_YAML = ROOT / "deploy" / "rbac" / "meshwave-worker.yaml"
TRIGGERER_YAML = ROOT / "deploy" / "rbac" / "meshwave-triggerer.yaml"
# `meshwave plan propose` is a command a person runs (cli.py), never an Airflow task: not the worker's calls.
CLI_ONLY = PLUGINS / "propose"
KUBE_REL = str(KUBE.relative_to(ROOT))
RBAC_API = "rbac.authorization.k8s.io"
READ_VERBS = frozenset({"get", "list", "watch"})
KNOWN_VERBS = READ_VERBS | {"create", "update", "patch", "delete", "deletecollection"}
# GET on these non-resource URLs is granted to system:authenticated by system:discovery (/api, /api/*, /apis, /apis/*,
# /version, /version/, /openapi, /openapi/*, /healthz) and system:public-info-viewer (/version, /version/, /healthz).
DISCOVERY_URLS = ("/api", "/api/*", "/apis", "/apis/*", "/version", "/version/", "/openapi", "/openapi/*", "/healthz")
RFC1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
RFC1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
CALL_API = re.compile(r"call_api\(\s*'([^']+)',\s*'([A-Z]+)'")  # the generated client's `*_with_http_info` body
RAW_REQUESTS = ("call_api", "request")  # the ApiClient members that send a request; the rest is configuration


# ---- what a call needs ------------------------------------------------------------------------------------------
@dataclass(frozen=True, order=True)
class Grant:
    group: str
    resource: str  # "pods", or "pods/log" for a subresource
    verb: str

    def __str__(self) -> str:
        return f"{self.verb} {self.resource}" + (f" ({self.group})" if self.group else " (core)")


@dataclass(frozen=True)
class Call:
    where: str  # "plugins/meshwave/kube/deployments.py:70"
    function: tuple[str, str]  # (file, "Deployments._deployment"): the function the call is written in
    method: str  # "AppsV1Api.read_namespaced_deployment"
    grant: Grant | None = None  # None: a non-resource URL (`url`)
    url: str | None = None
    root_only: bool = False  # its namespace argument is the cluster's root namespace

    def __str__(self) -> str:
        what = str(self.grant) if self.grant else f"GET {self.url}"
        return f"{self.where} {self.function[1]}: {self.method} -> {what}"


@functools.cache
def endpoint(cls: str, method: str) -> tuple[str, str] | None:
    """(path template, HTTP method) of a generated client method, from its source; None when it is no API call."""
    fn = getattr(getattr(k8s, cls), f"{method}_with_http_info", None)
    found = CALL_API.search(inspect.getsource(fn)) if fn is not None else None
    return (found.group(1), found.group(2)) if found else None


def grant_of(path: str, http: str, watch: bool = False) -> Grant:
    """As RequestInfo reads a request: /api/v1 is the core group, /apis/<group>/<version> another; namespaces/<ns>/
    before a resource is dropped; a GET without a name lists, a DELETE without one is a deletecollection."""
    parts = path.strip("/").split("/")
    group, parts = ("", parts[2:]) if parts[0] == "api" else (parts[1], parts[3:])
    if parts[0] == "namespaces" and len(parts) > 2:
        parts = parts[2:]
    named = len(parts) > 1
    resource = parts[0] + (f"/{parts[2]}" if len(parts) > 2 else "")
    verb = {"GET": ("get" if named else "watch" if watch else "list"), "POST": "create", "PUT": "update",
            "PATCH": "patch", "DELETE": "delete" if named else "deletecollection"}[http]
    return Grant(group, resource, verb)


def discovery_allows(url: str) -> bool:
    """Whether system:discovery / system:public-info-viewer allow GET `url` (a trailing * matches any rest)."""
    return any(url == u or (u.endswith("*") and url.startswith(u[:-1])) for u in DISCOVERY_URLS)


# ---- reading the code -------------------------------------------------------------------------------------------
def api_objects(kube_source: str) -> dict[str, str]:
    """{attribute: kubernetes.client class} as MeshKube.__init__ builds them; `self.api_client` is the ApiClient."""
    meshkube = next(c for c in ast.parse(kube_source).body if isinstance(c, ast.ClassDef) and c.name == "MeshKube")
    init = next(f for f in meshkube.body if isinstance(f, ast.FunctionDef) and f.name == "__init__")
    annotations = {a.arg: ast.unparse(a.annotation) for a in init.args.args if a.annotation is not None}
    found = {}
    for node in ast.walk(init):
        if not (isinstance(node, ast.Assign) and isinstance(target := node.targets[0], ast.Attribute)
                and ast.unparse(target.value) == "self"):
            continue
        value = node.value
        if isinstance(value, ast.Call) and ast.unparse(value.func).startswith("client."):
            found[target.attr] = ast.unparse(value.func).removeprefix("client.")
        elif isinstance(value, ast.Name) and annotations.get(value.id) == "client.ApiClient":
            found[target.attr] = "ApiClient"
    return found


@functools.cache
def constants(path: Path) -> dict[str, str]:
    """A module's top-level string constants (`A, B = "x", "y"` too) and those it imports from meshwave modules."""
    return constants_of(path.read_text())


def constants_of(source: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                names = target.elts if isinstance(target, ast.Tuple) else [target]
                values = node.value.elts if isinstance(node.value, ast.Tuple) else [node.value]
                for name, value in zip(names, values, strict=False):
                    if isinstance(name, ast.Name) and isinstance(value, ast.Constant) and isinstance(value.value, str):
                        found[name.id] = value.value
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("meshwave"):
            home = ROOT / "plugins" / Path(*node.module.split(".")).with_suffix(".py")
            home = home if home.exists() else home.with_suffix("") / "__init__.py"  # a package: its re-exports
            if home.exists():
                theirs = constants(home)
                found.update({a.asname or a.name: theirs[a.name] for a in node.names if a.name in theirs})
    return found


def with_parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}


def functions(tree: ast.Module) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """("Class.method" or "function", its def) of every function of a module (nested ones belong to their parent)."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node.name, node
        elif isinstance(node, ast.ClassDef):
            yield from ((f"{node.name}.{f.name}", f) for f in methods(node))


@dataclass
class Scan:
    """The calls found in some sources, and what could not be resolved (each one fails the test)."""

    calls: list[Call] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def scan(source: str, rel: str, objects: dict[str, str], known: dict[str, str]) -> Scan:
    """Every use of an API object in one module (`known`: the module's constants): `<...>.core.<method>`, or
    `<alias>.<method>` after `alias = <...>.custom` in the same function."""
    tree = ast.parse(source)
    parents = with_parents(tree)
    owner = {n: qualname for qualname, fn in functions(tree) for n in ast.walk(fn)}  # module-level code: "<module>"
    aliases = {(owner.get(n, "<module>"), t.id): n.value.attr for n in ast.walk(tree) if isinstance(n, ast.Assign)
               and isinstance(n.value, ast.Attribute) and n.value.attr in objects
               for t in n.targets if isinstance(t, ast.Name)}
    found = Scan()
    for node in (n for n in ast.walk(tree) if isinstance(n, ast.Attribute)):
        qualname, base = owner.get(node, "<module>"), node.value
        held = base.attr if isinstance(base, ast.Attribute) else aliases.get((qualname, getattr(base, "id", "")))
        if held not in objects or (objects[held] == "ApiClient" and node.attr not in RAW_REQUESTS):
            continue
        where = f"{rel}:{node.lineno}"
        try:
            found.calls.append(resolve(node, parents, objects[held], known, where, (rel, qualname)))
        except LookupError as exc:
            found.problems.append(f"{where} {qualname}: {exc}")
    return found


def other_clients(source: str, rel: str) -> list[str]:
    """The scan sees the API objects MeshKube holds: a kubernetes-client API class built anywhere else, or the
    client's watch/stream/dynamic modules, would be a way round it."""
    tree = ast.parse(source)
    owner = {n: qualname for qualname, fn in functions(tree) for n in ast.walk(fn)}
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = ast.unparse(node.func).split(".")[-1]
            built = name.endswith("Api") and isinstance(getattr(k8s, name, None), type)
            if built and (Path(rel).as_posix().endswith(KUBE_REL), owner.get(node)) != (True, "MeshKube.__init__"):
                problems.append(f"{rel}:{node.lineno} {owner.get(node, '<module>')}: builds kubernetes.client.{name} "
                                "outside MeshKube.__init__: its calls would not be seen")
        elif isinstance(node, ast.Import | ast.ImportFrom):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            modules += [f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom) else []
            for module in modules:
                if module.split(".")[:2] in (["kubernetes", "watch"], ["kubernetes", "stream"],
                                             ["kubernetes", "dynamic"]):
                    problems.append(f"{rel}:{node.lineno}: imports {module}: its requests would not be seen")
    return problems


def arguments(node: ast.Attribute, parents: dict[ast.AST, ast.AST]) -> tuple[list[ast.expr], list[ast.keyword]]:
    """The arguments the API method gets: those of its own call, or those after it when it is handed to a caller
    (`self._call(verb, target, fn, *args)`, `functools.partial(self._call, verb, target, fn, *args)`)."""
    parent = parents.get(node)
    if isinstance(parent, ast.Call):
        if parent.func is node:
            return list(parent.args), list(parent.keywords)
        if node in parent.args:
            return list(parent.args[parent.args.index(node) + 1:]), list(parent.keywords)
    return [], []


def text(expr: ast.expr | None, known: dict[str, str]) -> str | None:
    """A string argument's value: a literal or a module constant; None when it is computed."""
    if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
        return expr.value
    if isinstance(expr, ast.Name):
        return known.get(expr.id)
    return None


def resolve(node: ast.Attribute, parents: dict[ast.AST, ast.AST], cls: str, known: dict[str, str], where: str,
            function: tuple[str, str]) -> Call:
    method = f"{cls}.{node.attr}"
    args, keywords = arguments(node, parents)
    if cls == "ApiClient":
        return raw_request(args, method, where, function)
    found = endpoint(cls, node.attr)
    if found is None:
        raise LookupError(f"{method} is not an API operation of kubernetes.client.{cls}: cannot tell what it needs")
    path, http = found
    params = [p for p in inspect.signature(getattr(getattr(k8s, cls), node.attr)).parameters
              if p not in ("self", "kwargs")]
    bound: dict[str, ast.expr] = dict(zip(params, args, strict=False))
    bound.update({k.arg: k.value for k in keywords if k.arg})
    for placeholder in ("group", "plural"):  # what RBAC names; {namespace}, {name}, {version} do not matter
        if f"{{{placeholder}}}" in path:
            value = text(bound.get(placeholder), known)
            if value is None:
                raise LookupError(f"{method}: its {placeholder} argument is not a literal or a module constant")
            path = path.replace(f"{{{placeholder}}}", value)
    watch = isinstance(w := bound.get("watch"), ast.Constant) and w.value is True
    namespace = bound.get("namespace")
    root_only = namespace is not None and ast.unparse(namespace).endswith(".root_namespace")
    return Call(where, function, method, grant_of(path, http, watch), root_only=root_only)


def raw_request(args: list[ast.expr], method: str, where: str, function: tuple[str, str]) -> Call:
    """`api_client.call_api(path, http_method, ...)`: a discovery URL, or a resource request read from its path."""
    if len(args) < 2 or not isinstance(args[1], ast.Constant):
        raise LookupError(f"{method}: its path and HTTP method are not given where it is passed")
    path_expr, http = args[0], str(args[1].value)
    if isinstance(path_expr, ast.JoinedStr):  # f"/apis/{group}": each computed part is one path segment
        url = "".join(v.value if isinstance(v, ast.Constant) else "*" for v in path_expr.values)
    elif isinstance(path_expr, ast.Constant):
        url = str(path_expr.value)
    else:
        raise LookupError(f"{method}: its path is computed")
    segments = url.strip("/").split("/")
    if segments[0] in ("api", "apis") and len(segments) > 2 and "*" not in segments[:3]:
        return Call(where, function, method, grant_of(url, http))
    return Call(where, function, method, url=url)


def sources(include_cli: bool = False) -> list[Path]:
    """The code Airflow runs (plugins/meshwave, the DAG files); with `include_cli`, also the proposer's."""
    found = sorted(PLUGINS.rglob("*.py")) + sorted((ROOT / "dags").glob("*.py"))
    return [p for p in found if include_cli or CLI_ONLY not in p.parents]


@functools.cache
def code_scan(include_cli: bool = False) -> Scan:
    objects = api_objects(KUBE.read_text())
    total = Scan()
    for path in sources(include_cli):
        one = scan(path.read_text(), str(path.relative_to(ROOT)), objects, constants(path))
        total.calls += one.calls
        total.problems += one.problems
    return total


# ---- what the triggerer reaches ---------------------------------------------------------------------------------
@dataclass
class Code:
    """The classes and functions of the scanned modules, for following calls from the triggers."""

    defs: dict[tuple[str, str], ast.FunctionDef | ast.AsyncFunctionDef] = field(default_factory=dict)
    members: dict[str, set[str]] = field(default_factory=dict)  # class -> its methods and class attributes
    bases: dict[str, list[str]] = field(default_factory=dict)  # class -> its bases among the scanned classes
    imported: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)  # (file, name) -> its def
    home: dict[str, str] = field(default_factory=dict)  # class -> file
    typed: dict[str, str] = field(default_factory=dict)  # attribute -> class (self.kube: MeshKube, .mtls: ...)
    triggers: list[tuple[str, ast.ClassDef]] = field(default_factory=list)


def methods(cls: ast.ClassDef) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [f for f in cls.body if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)]


def class_attributes(cls: ast.ClassDef) -> set[str]:
    """Names assigned in the class body (`call, send, noop = _call, _send, _noop`)."""
    targets = [t for n in cls.body if isinstance(n, ast.Assign) for t in n.targets]
    return {n.id for t in targets for n in (t.elts if isinstance(t, ast.Tuple) else [t]) if isinstance(n, ast.Name)}


def read_code(paths: Iterable[Path]) -> Code:
    code = Code()
    for path in paths:
        rel, tree = str(path.relative_to(ROOT)), ast.parse(path.read_text())
        code.defs.update({(rel, q): fn for q, fn in functions(tree)})
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
            code.home[cls.name] = rel
            code.members[cls.name] = {f.name for f in methods(cls)} | class_attributes(cls)
            code.bases[cls.name] = [ast.unparse(b) for b in cls.bases]
            if any(ast.unparse(b).endswith("BaseTrigger") for b in cls.bases):
                code.triggers.append((rel, cls))
    code.bases = {c: [b for b in bases if b in code.home] for c, bases in code.bases.items()}
    for path in paths:
        code.imported.update(imported_functions(code, str(path.relative_to(ROOT)), ast.parse(path.read_text())))
    for (_, qualname), fn in code.defs.items():
        code.typed.update(typed_attributes(qualname, fn, set(code.home)))
    return code


def imported_functions(code: Code, rel: str, tree: ast.Module) -> dict[tuple[str, str], tuple[str, str]]:
    """`from meshwave.kube.state import assess_rollout` in `rel`: (rel, "assess_rollout") is that module's def."""
    found = {}
    for node in (n for n in tree.body if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("meshwave")):
        home = str((ROOT / "plugins" / Path(*node.module.split("."))).with_suffix(".py").relative_to(ROOT))
        found.update({(rel, a.asname or a.name): (home, a.name) for a in node.names if (home, a.name) in code.defs})
    return found


def mro(code: Code, cls: str) -> list[str]:
    """The class and its scanned bases, depth first in declaration order (enough for classes without diamonds)."""
    return [cls, *(c for b in code.bases.get(cls, []) for c in mro(code, b))]


def member(code: Code, cls: str, name: str) -> tuple[str, str] | None:
    """(file, "Class.name") of the class in cls's bases that defines `name`; None when none does."""
    return next(((code.home[c], f"{c}.{name}") for c in mro(code, cls) if name in code.members[c]), None)


def whole(code: Code, cls: str) -> str:
    """The class a resource class is mixed into (MeshKube for Deployments): `self` in it is that class."""
    return next((c for c, bases in code.bases.items() if cls in bases), cls)


def typed_attributes(qualname: str, fn: ast.FunctionDef | ast.AsyncFunctionDef, classes: set[str]) -> dict[str, str]:
    """`self.kube = kube` with `kube: MeshKube` in __init__, and `@cached_property def mtls(self) -> Peer...`."""
    found = {}
    returns = ast.unparse(fn.returns) if fn.returns is not None else ""
    if fn.decorator_list and returns in classes and "property" in ast.unparse(fn.decorator_list[0]):
        found[fn.name] = returns
    if qualname.endswith(".__init__"):
        annotated = {a.arg: ast.unparse(a.annotation) for a in fn.args.args if a.annotation is not None}
        for node in (n for n in ast.walk(fn) if isinstance(n, ast.Assign)):
            targets = node.targets[0].elts if isinstance(node.targets[0], ast.Tuple) else node.targets
            values = node.value.elts if isinstance(node.value, ast.Tuple) else [node.value]
            for target, value in zip(targets, values, strict=False):
                if (isinstance(target, ast.Attribute) and isinstance(value, ast.Name)
                        and annotated.get(value.id) in classes):
                    found[target.attr] = annotated[value.id]
    return found


def edges(code: Code, rel: str, qualname: str) -> set[tuple[str, str]]:
    """What one function reaches: `self.m` of its class, `<...>.kube.m` / `.mtls.m` of the typed attribute's class,
    and the functions it calls by name (its own module's, or imported from another scanned module)."""
    fn, owner = code.defs[(rel, qualname)], qualname.split(".")[0] if "." in qualname else None
    found = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Attribute):
            base = node.value
            if isinstance(base, ast.Name) and base.id == "self":
                cls = whole(code, owner) if owner else None
            else:
                cls = code.typed.get(base.attr) if isinstance(base, ast.Attribute) else None
            if cls and (where := member(code, cls, node.attr)):
                found.add(where)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            name = (rel, node.func.id)
            found |= {name} if name in code.defs else {code.imported[name]} if name in code.imported else set()
    return found


def kube_holders(cls: ast.ClassDef) -> set[str]:
    """Names in a trigger class that hold a MeshKube: assigned from mesh_kube(...), or from a method annotated to
    return one (`kubes = await self._kubes()`), or a dict filled with them (`kubes[c] = ...mesh_kube...`)."""
    returning = {f.name for f in methods(cls) if f.returns is not None and "MeshKube" in ast.unparse(f.returns)}
    found = set()
    for node in (n for n in ast.walk(cls) if isinstance(n, ast.Assign)):
        value = ast.unparse(node.value)
        if "mesh_kube" in value or any(f"self.{m}(" in value for m in returning):
            for target in node.targets:
                found.add(ast.unparse(target.value if isinstance(target, ast.Subscript) else target))
    return found


def trigger_roots(code: Code) -> tuple[set[tuple[str, str]], list[str]]:
    """(the functions the triggers start from, problems): their own methods, MeshKube.__init__ (mesh_kube builds
    one), and every MeshKube member they use on something not `self`; a MeshKube handed to another function is a
    problem (this closure would not follow it)."""
    roots, problems = {(code.home["MeshKube"], "MeshKube.__init__")}, []
    for rel, cls in code.triggers:
        roots |= {(rel, f"{cls.name}.{f.name}") for f in methods(cls)}
        for node in ast.walk(cls):
            if isinstance(node, ast.Attribute) and ast.unparse(node.value) != "self" \
                    and (where := member(code, "MeshKube", node.attr)):
                roots.add(where)
        holders = kube_holders(cls)
        for call in (n for n in ast.walk(cls) if isinstance(n, ast.Call)):
            for arg in [*call.args, *(k.value for k in call.keywords)]:
                held = arg.value if isinstance(arg, ast.Subscript) else arg
                if ast.unparse(held) in holders:
                    problems.append(f"{rel}:{call.lineno} {cls.name}: a MeshKube ({ast.unparse(arg)}) is handed to "
                                    f"{ast.unparse(call.func)}: follow it in trigger_roots")
    return roots, problems


def reachable(code: Code, roots: set[tuple[str, str]]) -> set[tuple[str, str]]:
    seen, todo = set(), [r for r in roots if r in code.defs]
    while todo:
        here = todo.pop()
        if here not in seen:
            seen.add(here)
            todo += [e for e in edges(code, *here) if e in code.defs and e not in seen]
    return seen


def triggerer_calls() -> tuple[list[Call], set[tuple[str, str]], list[str]]:
    code = read_code(sources())
    roots, problems = trigger_roots(code)
    reached = reachable(code, roots)
    return [c for c in code_scan().calls if c.function in reached], reached, problems


# ---- the manifests ----------------------------------------------------------------------------------------------
def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def rule_grants(role: dict[str, Any]) -> set[Grant]:
    return {Grant(g, r, v) for rule in role.get("rules") or [] for g in rule.get("apiGroups", [])
            for r in rule.get("resources", []) for v in rule.get("verbs", [])}


@dataclass(frozen=True)
class Granted:
    """What an identity may do: everywhere (its ClusterRole) and in the root namespace only (a Role there)."""

    everywhere: frozenset[Grant]
    root: frozenset[Grant] = frozenset()

    def allows(self, call: Call) -> bool:
        return call.grant in self.everywhere or (call.root_only and call.grant in self.root)


def granted(path: Path) -> Granted:
    docs = documents(path)
    roles = [d for d in docs if d["kind"] == "Role"]
    return Granted(frozenset(rule_grants(one(docs, "ClusterRole"))),
                   frozenset(g for r in roles for g in rule_grants(r)))


def not_granted(calls: Iterable[Call], identity: Granted, name: str) -> list[str]:
    """One line per call the identity may not make, naming the call, its file:line and the rule it needs."""
    problems = []
    for call in calls:
        if call.grant is None:
            if not discovery_allows(call.url or ""):
                problems.append(f"{call}: not a discovery URL that system:discovery allows")
        elif not identity.allows(call):
            where = " (or a Role in the root namespace)" if call.root_only else ""
            problems.append(f"{call}: not granted by {name}: add apiGroups [{call.grant.group!r}], resources "
                            f"[{call.grant.resource!r}], verbs [{call.grant.verb!r}]{where}")
    return problems


def unused(identity: Granted, calls: Iterable[Call], name: str) -> list[str]:
    """One line per granted (group, resource, verb) that no call needs."""
    calls = list(calls)
    needed = {c.grant for c in calls if c.grant}
    needed_at_root = {c.grant for c in calls if c.grant and c.root_only}
    return [f"{name}: {g} is granted but no call needs it" for g in sorted(identity.everywhere - needed)] + \
        [f"{name} (root namespace Role): {g} is granted but no call there needs it"
         for g in sorted(identity.root - needed_at_root)]


# ---- the tests --------------------------------------------------------------------------------------------------
def test_every_use_of_the_kubernetes_client_is_understood() -> None:
    found = code_scan()
    assert not found.problems, "calls whose permission cannot be derived:\n" + "\n".join(found.problems)
    # the scan sees the calls it must: a regression of the scanner itself would pass everything below
    assert {"kube/deployments.py", "kube/injection.py", "kube/canaries.py", "kube/pending_annotation.py",
            "kube/capacity.py", "kube/client.py", "meshwave/peer_auth.py", "meshwave/probe.py",
            "meshwave/lease.py"} <= {"/".join(Path(c.where.split(":")[0]).parts[-2:]) for c in found.calls}
    assert len(found.calls) >= 30
    others = [p for path in sources(include_cli=True) for p in other_clients(path.read_text(), str(path))]
    assert not others, "\n".join(others)
    assert other_clients("from kubernetes import watch\nclient.CoreV1Api(api).list_node()\n", "x.py") == [
        "x.py:1: imports kubernetes.watch: its requests would not be seen",
        "x.py:2 <module>: builds kubernetes.client.CoreV1Api outside MeshKube.__init__: its calls would not be seen"]


def test_the_worker_role_grants_every_call_the_code_makes() -> None:
    problems = not_granted(code_scan().calls, granted(WORKER_YAML), "ClusterRole meshwave-worker")
    assert not problems, "\n".join(problems)


def test_the_worker_role_grants_nothing_the_code_does_not_use() -> None:
    problems = unused(granted(WORKER_YAML), code_scan().calls, "meshwave-worker")
    assert not problems, "\n".join(problems)


def test_the_triggerer_role_reads_only_and_covers_what_the_triggers_reach() -> None:
    calls, reached, problems = triggerer_calls()
    assert not problems, "\n".join(problems)
    deployments = str((PLUGINS / "kube" / "deployments.py").relative_to(ROOT))
    # the scan follows the rollout wait into the resource class that defines it
    assert {(deployments, "Deployments.rollout"), (deployments, "Deployments.workload")} <= reached
    identity = granted(TRIGGERER_YAML)
    assert not identity.root
    writes = sorted(g for g in identity.everywhere if g.verb not in READ_VERBS)
    assert not writes, f"the triggerer's role may write: {', '.join(map(str, writes))}"
    problems = not_granted(calls, identity, "ClusterRole meshwave-triggerer") + \
        unused(identity, calls, "meshwave-triggerer")
    assert not problems, "\n".join(problems)


def test_the_proposer_needs_only_reads_the_worker_role_grants() -> None:
    """`meshwave plan propose` (a person's command) is not counted as the worker's; its own calls are reads the worker
    role grants (the MeshKube methods it uses are counted with the workers' calls above)."""
    cli = [c for c in code_scan(include_cli=True).calls if CLI_ONLY in (ROOT / c.where.split(":")[0]).parents]
    assert cli and all(c.grant is None or c.grant.verb in READ_VERBS for c in cli)
    assert not not_granted(cli, granted(WORKER_YAML), "ClusterRole meshwave-worker")


@pytest.mark.parametrize("path", [WORKER_YAML, TRIGGERER_YAML], ids=lambda p: p.name)
def test_the_manifest_is_well_formed(path: Path) -> None:
    docs = documents(path)
    api_versions = {"ServiceAccount": "v1", "ClusterRole": f"{RBAC_API}/v1", "ClusterRoleBinding": f"{RBAC_API}/v1",
                    "Role": f"{RBAC_API}/v1", "RoleBinding": f"{RBAC_API}/v1"}
    for doc in docs:
        kind, meta = doc["kind"], doc["metadata"]
        assert doc["apiVersion"] == api_versions[kind], f"{kind} {meta['name']}: apiVersion {doc['apiVersion']}"
        assert RFC1123_SUBDOMAIN.match(meta["name"]) and len(meta["name"]) <= 253, f"{kind} name {meta['name']!r}"
        namespaced = kind in ("ServiceAccount", "Role", "RoleBinding")
        assert ("namespace" in meta) == namespaced, f"{kind} {meta['name']}: namespace {meta.get('namespace')!r}"
        if namespaced:
            assert RFC1123_LABEL.match(meta["namespace"]) and len(meta["namespace"]) <= 63
        for rule in doc.get("rules") or []:
            check_rule(f"{kind} {meta['name']}", rule)
    account = one(docs, "ServiceAccount")["metadata"]
    assert RFC1123_LABEL.match(account["name"]) and len(account["name"]) <= 63
    bindings = [d for d in docs if d["kind"].endswith("Binding")]
    assert bindings
    for binding in bindings:
        check_binding(binding, docs, account)


def check_rule(where: str, rule: dict[str, Any]) -> None:
    assert set(rule) == {"apiGroups", "resources", "verbs"}, f"{where}: a rule with {sorted(rule)}"
    for key in ("apiGroups", "resources", "verbs"):
        assert rule[key] and "*" not in rule[key], f"{where}: {key} {rule[key]} (empty or a wildcard)"
    assert set(rule["verbs"]) <= KNOWN_VERBS, f"{where}: verbs {rule['verbs']}"


def check_binding(binding: dict[str, Any], docs: list[dict[str, Any]], account: dict[str, Any]) -> None:
    """The binding refers to a role of the same file (a Role: in the binding's namespace) and to its ServiceAccount."""
    ref, name = binding["roleRef"], binding["metadata"]["name"]
    assert ref["apiGroup"] == RBAC_API and ref["kind"] == binding["kind"].removesuffix("Binding"), f"{name}: {ref}"
    roles = [d for d in docs if d["kind"] == ref["kind"] and d["metadata"]["name"] == ref["name"]
             and d["metadata"].get("namespace") == binding["metadata"].get("namespace")]
    assert len(roles) == 1, f"{name}: roleRef {ref['kind']} {ref['name']} is not in {binding['metadata']}"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["name"],
                                    "namespace": account["namespace"]}], f"{name}: subjects {binding['subjects']}"


# ---- the checker checks itself ----------------------------------------------------------------------------------
OBJECTS = {"core": "CoreV1Api", "apps": "AppsV1Api", "custom": "CustomObjectsApi", "api_client": "ApiClient"}
SYNTHETIC = '''\
TELEMETRY_GROUP, TELEMETRY_PLURAL = "telemetry.istio.io", "telemetries"


class Extra:
    def secrets(self, ns):
        return self.kube.call("LIST", f"secrets {ns}", self.kube.core.list_namespaced_secret, ns)

    def logs(self, ns, name):
        return self.core.read_namespaced_pod_log(name, ns)

    def telemetry(self, ns):
        custom = self.kube.custom
        return self.kube.call("POST", "t", custom.create_namespaced_custom_object, TELEMETRY_GROUP, "v1", ns,
                              TELEMETRY_PLURAL, {})

    def guessed(self, ns, plural):
        return self.kube.call("GET", "x", self.kube.custom.list_namespaced_custom_object, "g", "v1", ns, plural)

    def raw(self):
        return self.kube.call("GET", "/metrics", self.kube.api_client.call_api, "/metrics", "GET")

    def wrong(self):
        return self.apps.not_an_operation()
'''


def test_a_call_added_without_a_rule_fails_naming_the_call_and_its_line() -> None:
    found = scan(SYNTHETIC, "plugins/meshwave/extra.py", OBJECTS, constants_of(SYNTHETIC))
    assert {str(c.grant) for c in found.calls if c.grant} == {
        "list secrets (core)", "get pods/log (core)", "create telemetries (telemetry.istio.io)"}
    problems = not_granted(found.calls, granted(WORKER_YAML), "ClusterRole meshwave-worker")
    assert len(problems) == 4, problems
    assert problems[0].startswith("plugins/meshwave/extra.py:6 Extra.secrets: CoreV1Api.list_namespaced_secret -> "
                                  "list secrets (core): not granted by ClusterRole meshwave-worker")
    assert "extra.py:9 Extra.logs" in problems[1] and "get pods/log" in problems[1]
    assert "extra.py:13 Extra.telemetry" in problems[2] and "telemetries" in problems[2]
    assert "extra.py:20 Extra.raw" in problems[3] and "GET /metrics" in problems[3]
    assert [p.split(": ", 1)[0] for p in found.problems] == ["plugins/meshwave/extra.py:17 Extra.guessed",
                                                             "plugins/meshwave/extra.py:23 Extra.wrong"]


def test_an_unused_rule_is_reported() -> None:
    extra = Grant("", "secrets", "get")
    worker = granted(WORKER_YAML)
    widened = Granted(worker.everywhere | {extra}, worker.root)
    assert unused(widened, code_scan().calls, "meshwave-worker") == [
        "meshwave-worker: get secrets (core) is granted but no call needs it"]


def test_the_client_methods_map_as_the_api_server_reads_them() -> None:
    assert grant_of(*endpoint("CoreV1Api", "read_namespace")) == Grant("", "namespaces", "get")
    assert grant_of(*endpoint("CoreV1Api", "list_namespace")) == Grant("", "namespaces", "list")
    assert grant_of(*endpoint("CoreV1Api", "list_pod_for_all_namespaces")) == Grant("", "pods", "list")
    assert grant_of(*endpoint("CoreV1Api", "delete_collection_namespaced_pod")) == Grant("", "pods",
                                                                                          "deletecollection")
    assert grant_of(*endpoint("CoreV1Api", "replace_namespaced_pod")) == Grant("", "pods", "update")
    assert grant_of(*endpoint("AppsV1Api", "patch_namespaced_deployment_scale")) == Grant("apps", "deployments/scale",
                                                                                          "patch")
    assert grant_of(*endpoint("CoreV1Api", "list_namespaced_pod"), watch=True) == Grant("", "pods", "watch")
    assert discovery_allows("/apis/*") and discovery_allows("/version") and not discovery_allows("/metrics")
