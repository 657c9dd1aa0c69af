"""``meshpatch doctor`` (also ``meshpatch-run --info``): what meshpatch would do
in this environment, without starting the app — settings parsed (a bad one is
named), the xDS bootstrap found or not and from where, whether its server
answers, which hooks would apply and whether their libraries are installed,
registries, lanes, the admin endpoint, OpenTelemetry.  Exits 1 when there is a
problem that keeps meshpatch off or unable to route."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from typing import Any, Dict, List, Mapping, Optional, Tuple

DESCRIPTION = __doc__

#: hook → the distributions whose presence makes it useful.
HOOK_LIBRARIES = {
    "requests": ("requests",),
    "httpx": ("httpx",),
    "grpc": ("grpcio",),
    "wsgi": ("flask", "django", "gunicorn"),
    "asgi": ("starlette", "fastapi", "django", "uvicorn"),
    "grpc_server": ("grpcio",),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--no-connect", action="store_true", help="do not try to reach the xDS server")


def run(args: argparse.Namespace) -> int:
    environ = dict(os.environ)
    environ.setdefault("MESHPATCH_ENABLED", "1")  # what meshpatch-run would set
    return print_report(environ, as_json=args.json, connect=not args.no_connect)


def print_report(environ: Mapping[str, str], as_json: bool = False, connect: bool = True) -> int:
    data = report(environ, connect=connect)
    if as_json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        sys.stdout.write(render(data))
    return 1 if data["problems"] else 0


def _version(distribution: str) -> Optional[str]:
    try:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version(distribution)
        except PackageNotFoundError:
            return None
    except Exception:
        return None


def report(environ: Mapping[str, str], connect: bool = True) -> Dict[str, Any]:
    import meshpatch
    from meshpatch.config import KNOWN_HOOKS, ConfigError, LaneSettings, Settings, enabled_in, parse_admin_address

    problems: List[str] = []
    notes: List[str] = []
    data: Dict[str, Any] = {
        "python": sys.executable,
        "python_version": sys.version.split()[0],
        "meshpatch": meshpatch.__version__,
        "meshpatch_path": os.path.dirname(os.path.abspath(meshpatch.__file__)),
        "enabled": enabled_in(environ),
        "problems": problems,
        "notes": notes,
    }
    if not data["enabled"]:
        notes.append("MESHPATCH_ENABLED is off here: run the app with meshpatch-run or MESHPATCH_ENABLED=1")
    settings: Optional[Any] = None
    try:
        settings = Settings(environ)
        data["settings"] = {name: _plain(getattr(settings, name)) for name in Settings.__slots__}
    except ConfigError as exc:
        problems.append(str(exc))
        data["settings"] = {"error": str(exc), "variable": exc.variable}
    try:
        lanes = LaneSettings(environ)
        data["lanes"] = {"enabled": lanes.enabled, "header": lanes.header, "baggage_key": lanes.baggage_key,
                         "label": lanes.label}
    except ConfigError as exc:
        problems.append(str(exc))
        data["lanes"] = {"error": str(exc), "variable": exc.variable}
    try:
        admin = parse_admin_address(environ)
        data["admin"] = ("unix:" + admin[1]) if admin and admin[0] == "unix" else (
            f"{admin[1]}:{admin[2]}" if admin else None)
    except ConfigError as exc:
        problems.append(str(exc))
        data["admin"] = {"error": str(exc), "variable": exc.variable}

    data["bootstrap"] = _bootstrap(settings, environ, problems, notes, connect)
    data["hooks"] = _hooks(settings, KNOWN_HOOKS, environ)
    if settings is not None and not any(h["would_apply"] for h in data["hooks"].values() if h["kind"] == "client"):
        problems.append("no client hook would apply (requests, httpx and grpc all disabled or not installed)")
    data["registries"] = _registries(settings, environ, problems)
    data["opentelemetry"] = {
        "api": _version("opentelemetry-api"),
        "sdk": _version("opentelemetry-sdk"),
        "instrumentation": _version("opentelemetry-instrumentation"),
        "exporters": {k: v for k, v in environ.items() if k.startswith("OTEL_") and k.endswith("_EXPORTER")},
    }
    if data["opentelemetry"]["api"] is None:
        notes.append("opentelemetry-api is not installed: no spans or metrics from meshpatch")
    return data


def _plain(value: Any) -> Any:
    if isinstance(value, (frozenset, set)):
        return sorted(value)
    return value


def _bootstrap(settings: Any, environ: Mapping[str, str], problems: List[str], notes: List[str],
               connect: bool) -> Dict[str, Any]:
    if settings is None:
        return {"found": False, "reason": "settings error"}
    from meshpatch.config import ConfigError

    try:
        from meshpatch.bootstrap import load_bootstrap

        bootstrap = load_bootstrap(settings)
    except ConfigError as exc:
        problems.append(str(exc))
        return {"found": False, "error": str(exc), "variable": exc.variable}
    except Exception as exc:  # pragma: no cover - a bug, but the doctor must still print
        problems.append(f"reading the bootstrap failed: {exc!r}")
        return {"found": False, "error": repr(exc)}
    registry = (environ.get("MESHPATCH_REGISTRY") or "").strip()
    if bootstrap is None:
        if registry:
            notes.append("no xDS configuration: the registries alone route")
            return {"found": False, "reason": "no xDS configuration (registries only)"}
        problems.append("no xDS configuration: set MESHPATCH_XDS_SERVER=host:port, or GRPC_XDS_BOOTSTRAP to the "
                        "bootstrap file istio-agent writes; calls would not be routed")
        return {"found": False, "reason": "none of MESHPATCH_XDS_SERVER, GRPC_XDS_BOOTSTRAP, GRPC_XDS_BOOTSTRAP_CONFIG"}
    server = bootstrap.servers[0]
    out: Dict[str, Any] = {
        "found": True,
        "source": bootstrap.source,
        "server": server.target,
        "credentials": server.creds_type,
        "node_id": bootstrap.node.get("id", ""),
        "namespace": bootstrap.namespace,
    }
    if connect:
        reachable, detail = _probe(server.target)
        out["reachable"] = reachable
        out["probe"] = detail
        if not reachable:
            notes.append(f"the xDS server {server.target} does not answer now ({detail}); the app would run "
                         "unrouted until it does, then route without a restart")
    return out


def _probe(target: str) -> Tuple[bool, str]:
    """A TCP connect (or Unix socket connect), no xDS exchange; 1 s at most."""
    try:
        if target.startswith("unix:"):
            path = target[5:]
            path = path[2:] if path.startswith("//") else path
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: Any = path
        else:
            text = target.split(":///", 1)[-1] if "://" in target else target
            host, _, port = text.rpartition(":")
            host = host.strip("[]")
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            address = (host, int(port))
        sock.settimeout(1.0)
        try:
            sock.connect(address)
        finally:
            sock.close()
        return True, "connects"
    except (OSError, ValueError) as exc:
        return False, str(exc) or type(exc).__name__


def _hooks(settings: Any, known: Tuple[str, ...], environ: Mapping[str, str]) -> Dict[str, Any]:
    from meshpatch.config import SERVER_HOOKS

    out = {}
    disabled_listed = {p.strip().lower() for p in (environ.get("MESHPATCH_DISABLED_HOOKS") or "").split(",")}
    for name in known:
        libraries = {lib: _version(lib) for lib in HOOK_LIBRARIES.get(name, ())}
        installed = {lib: v for lib, v in libraries.items() if v}
        selected = settings is not None and name in settings.hooks
        if settings is None:
            why = "settings error"
        elif not selected:
            why = "disabled by MESHPATCH_DISABLED_HOOKS" if (name in disabled_listed or "*" in disabled_listed) \
                else "not listed in MESHPATCH_HOOKS"
        elif not installed:
            why = f"enabled, but {' / '.join(HOOK_LIBRARIES.get(name, ()))} not installed here"
        else:
            why = "applies when the app imports " + ", ".join(f"{lib} {v}" for lib, v in installed.items())
        out[name] = {
            "kind": "server" if name in SERVER_HOOKS else "client",
            "selected": selected,
            "would_apply": bool(selected and installed),
            "installed": installed,
            "detail": why,
        }
    return out


def _registries(settings: Any, environ: Mapping[str, str], problems: List[str]) -> Any:
    raw = (environ.get("MESHPATCH_REGISTRY") or "").strip()
    if not raw:
        return {"configured": False}
    try:
        from meshpatch import registries  # issue 4: absent in builds without registries
    except ImportError:
        problems.append("MESHPATCH_REGISTRY is set but this meshpatch has no registry support")
        return {"configured": True, "error": "no registry support in this build"}
    if settings is None:
        return {"configured": True, "error": "settings error"}
    from meshpatch.config import ConfigError

    try:
        catalog = registries.build_catalog(settings)
    except ConfigError as exc:
        problems.append(str(exc))
        return {"configured": True, "error": str(exc), "variable": exc.variable}
    except Exception as exc:
        problems.append(f"MESHPATCH_REGISTRY: {exc!r}")
        return {"configured": True, "error": repr(exc)}
    sources = [getattr(s, "description", repr(s)) for s in getattr(catalog, "sources", ())]
    return {"configured": True, "sources": sources}


def render(data: Dict[str, Any]) -> str:
    out = [f"meshpatch {data['meshpatch']} at {data['meshpatch_path']}\n",
           f"python {data['python_version']} ({data['python']})\n",
           f"enabled: {'yes' if data['enabled'] else 'no'}\n"]
    settings = data.get("settings") or {}
    if "error" in settings:
        out.append(f"settings: ERROR {settings['error']}\n")
    else:
        out.append("settings: ok (" + ", ".join(
            f"{k}={v}" for k, v in sorted(settings.items()) if v not in (None, "", []) and k != "hooks") + ")\n")
    boot = data.get("bootstrap") or {}
    if boot.get("found"):
        reach = ""
        if "reachable" in boot:
            reach = "; server answers" if boot["reachable"] else f"; server does NOT answer ({boot.get('probe')})"
        out.append(f"xDS: {boot['server']} from {boot['source']} ({boot['credentials']}), node {boot['node_id']}, "
                   f"namespace {boot['namespace']}{reach}\n")
    else:
        out.append(f"xDS: not found — {boot.get('error') or boot.get('reason')}\n")
    out.append("hooks:\n")
    for name, hook in data.get("hooks", {}).items():
        mark = "+" if hook["would_apply"] else "-"
        out.append(f"  {mark} {name:<12} {hook['kind']:<6} {hook['detail']}\n")
    reg = data.get("registries") or {}
    if not reg.get("configured"):
        out.append("registries: none configured\n")
    elif reg.get("error"):
        out.append(f"registries: ERROR {reg['error']}\n")
    else:
        out.append(f"registries: {', '.join(reg.get('sources') or [])}\n")
    lanes = data.get("lanes") or {}
    if "error" in lanes:
        out.append(f"lanes: ERROR {lanes['error']}\n")
    else:
        out.append(f"lanes: {'on' if lanes.get('enabled') else 'off'} (header {lanes.get('header')}, baggage key "
                   f"{lanes.get('baggage_key')}, endpoint label {lanes.get('label')})\n")
    admin = data.get("admin")
    if isinstance(admin, dict):
        out.append(f"admin endpoint: ERROR {admin['error']}\n")
    else:
        out.append(f"admin endpoint: {admin or 'off (set MESHPATCH_ADMIN to enable)'}\n")
    otel = data.get("opentelemetry") or {}
    out.append(f"opentelemetry: api {otel.get('api') or 'not installed'}, sdk {otel.get('sdk') or 'not installed'}\n")
    for note in data.get("notes") or []:
        out.append(f"note: {note}\n")
    problems = data.get("problems") or []
    if problems:
        out.append(f"PROBLEMS ({len(problems)}):\n")
        out.extend(f"  - {p}\n" for p in problems)
    else:
        out.append("no problems found\n")
    return "".join(out)
