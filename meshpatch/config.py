"""Settings from the environment, parsed once, with one clear error per bad value.

This module is imported at interpreter start whenever the agent is enabled, so
it uses only ``os`` (no dataclasses/typing/logging at import time): the start-up
budget is 15 ms for the whole agent.
"""

from __future__ import annotations

import os

KNOWN_HOOKS = ("requests", "httpx", "grpc", "wsgi", "asgi", "grpc_server")
#: Hooks that capture inbound requests (canary lanes) rather than route calls.
SERVER_HOOKS = ("wsgi", "asgi", "grpc_server")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


class ConfigError(Exception):
    """A bad user input: names the variable (or file) and says how to fix it."""

    def __init__(self, variable: str, problem: str, fix: str) -> None:
        self.variable = variable
        self.problem = problem
        self.fix = fix
        super().__init__(f"{variable}: {problem}. Fix: {fix}. meshpatch stays off; the app runs unpatched.")


def enabled_in(environ=os.environ) -> bool:
    """The activation gate shared by the .pth line, sitecustomize and child processes."""
    return environ.get("MESHPATCH_ENABLED", "").strip().lower() not in _FALSE


def _parse_bool(environ, name: str, default: bool) -> bool:
    raw = environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(name, f"{raw!r} is not a boolean", f"set {name} to 1 or 0")


def _parse_float(environ, name: str, default: float, low: float, high: float) -> float:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw.strip().rstrip("s"))
    except ValueError:
        raise ConfigError(name, f"{raw!r} is not a number of seconds", f"set {name} to e.g. 1.5") from None
    if not (low <= value <= high):
        raise ConfigError(name, f"{value} is out of range", f"set {name} between {low} and {high} seconds")
    return value


def _parse_hook_list(environ, name: str):
    raw = environ.get(name)
    if raw is None:
        return None
    items = [part.strip().lower() for part in raw.split(",") if part.strip()]
    unknown = [item for item in items if item not in KNOWN_HOOKS and item != "*"]
    if unknown:
        raise ConfigError(
            name,
            f"unknown hook(s) {', '.join(unknown)}",
            f"use a comma list of {', '.join(KNOWN_HOOKS)} (or *)",
        )
    if "*" in items:
        return set(KNOWN_HOOKS)
    return set(items)


def _parse_host_port(environ, name: str):
    raw = environ.get(name)
    if raw is None or not raw.strip():
        return None
    value = raw.strip()
    if value.startswith(("unix:", "dns:", "ipv4:", "ipv6:")):
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not (0 < int(port) < 65536):
        raise ConfigError(name, f"{raw!r} is not host:port", f"set {name} like 127.0.0.1:15010 or unix:///path/XDS")
    return value


def _parse_path(environ, name: str):
    raw = environ.get(name)
    if raw is None or not raw.strip():
        return None
    value = raw.strip()
    if not value.startswith("/"):
        raise ConfigError(name, f"{raw!r} is not an absolute path", f"set {name} to an absolute path")
    return value
_OUTLIER_PREFIX = "MESHPATCH_OUTLIER_"
# MESHPATCH_OUTLIER_<NAME> → (OutlierDetection field, kind): int, pct (0-100), secs, bool.
OUTLIER_ENV_FIELDS = {
    "CONSECUTIVE_5XX": ("consecutive_5xx", "int"),
    "ENFORCING_CONSECUTIVE_5XX": ("enforcing_consecutive_5xx", "pct"),
    "CONSECUTIVE_GATEWAY_FAILURE": ("consecutive_gateway_failure", "int"),
    "ENFORCING_CONSECUTIVE_GATEWAY_FAILURE": ("enforcing_consecutive_gateway_failure", "pct"),
    "CONSECUTIVE_LOCAL_ORIGIN_FAILURE": ("consecutive_local_origin_failure", "int"),
    "ENFORCING_CONSECUTIVE_LOCAL_ORIGIN_FAILURE": ("enforcing_consecutive_local_origin_failure", "pct"),
    "SPLIT_EXTERNAL_LOCAL_ORIGIN_ERRORS": ("split_external_local_origin_errors", "bool"),
    "INTERVAL": ("interval", "secs"),
    "BASE_EJECTION_TIME": ("base_ejection_time", "secs"),
    "MAX_EJECTION_TIME": ("max_ejection_time", "secs"),
    "MAX_EJECTION_TIME_JITTER": ("max_ejection_time_jitter", "secs"),
    "MAX_EJECTION_PERCENT": ("max_ejection_percent", "pct"),
    "ALWAYS_EJECT_ONE_HOST": ("always_eject_one_host", "bool"),
    "SUCCESS_RATE_MINIMUM_HOSTS": ("success_rate_minimum_hosts", "int"),
    "SUCCESS_RATE_REQUEST_VOLUME": ("success_rate_request_volume", "int"),
    "SUCCESS_RATE_STDEV_FACTOR": ("success_rate_stdev_factor", "int"),
    "ENFORCING_SUCCESS_RATE": ("enforcing_success_rate", "pct"),
    "ENFORCING_LOCAL_ORIGIN_SUCCESS_RATE": ("enforcing_local_origin_success_rate", "pct"),
    "FAILURE_PERCENTAGE_THRESHOLD": ("failure_percentage_threshold", "pct"),
    "FAILURE_PERCENTAGE_MINIMUM_HOSTS": ("failure_percentage_minimum_hosts", "int"),
    "FAILURE_PERCENTAGE_REQUEST_VOLUME": ("failure_percentage_request_volume", "int"),
    "ENFORCING_FAILURE_PERCENTAGE": ("enforcing_failure_percentage", "pct"),
    "ENFORCING_FAILURE_PERCENTAGE_LOCAL_ORIGIN": ("enforcing_failure_percentage_local_origin", "pct"),
}


def parse_outlier_env(environ=os.environ):
    """MESHPATCH_OUTLIER_DETECTION (``on``/``off``, default on) and the
    MESHPATCH_OUTLIER_<FIELD> defaults, as ``(mode, {field: value})``.

    Applied to clusters whose CDS carries no outlier_detection (istiod never
    sends one to proxyless clients).  With no MESHPATCH_OUTLIER_<FIELD> set the
    built-in connect-failure detector runs; ``off`` disables both.  Field names
    are Envoy's OutlierDetection fields in upper case, e.g.
    MESHPATCH_OUTLIER_CONSECUTIVE_5XX=3, MESHPATCH_OUTLIER_INTERVAL=5s.
    """
    name = "MESHPATCH_OUTLIER_DETECTION"
    raw = (environ.get(name) or "on").strip().lower()
    if raw in _TRUE or raw == "builtin":
        mode = "on"
    elif raw in _FALSE or raw in ("none", "disabled"):
        mode = "off"
    else:
        raise ConfigError(name, f"{raw!r} is not on/off", f"set {name} to on or off")
    values = {}
    for key in sorted(environ):
        if not key.startswith(_OUTLIER_PREFIX) or key == name:
            continue
        spec = OUTLIER_ENV_FIELDS.get(key[len(_OUTLIER_PREFIX):])
        if spec is None:
            known = ", ".join(_OUTLIER_PREFIX + k for k in sorted(OUTLIER_ENV_FIELDS))
            raise ConfigError(key, "unknown outlier detection setting", f"use one of {known}")
        field, kind = spec
        text = environ[key].strip()
        if not text:
            continue
        if kind == "bool":
            values[field] = _parse_bool(environ, key, False)
        elif kind == "secs":
            values[field] = _parse_float(environ, key, 0.0, 0.0, 86400.0)
        else:
            try:
                number = int(text.rstrip("%"))
            except ValueError:
                raise ConfigError(key, f"{text!r} is not a whole number", f"set {key} to e.g. 5") from None
            top = 100 if kind == "pct" else 1_000_000
            if not (0 <= number <= top):
                raise ConfigError(key, f"{number} is out of range", f"set {key} between 0 and {top}")
            values[field] = number
    if mode == "off" and values:
        raise ConfigError(name, "is off but MESHPATCH_OUTLIER_* defaults are set", f"unset {name} or the defaults")
    base = values.get("base_ejection_time", 30.0)
    if values.get("max_ejection_time", max(300.0, base)) < base:
        raise ConfigError("MESHPATCH_OUTLIER_MAX_EJECTION_TIME", "is smaller than the base ejection time",
                          "set it to at least MESHPATCH_OUTLIER_BASE_EJECTION_TIME (default 30s)")
    if values.get("interval", 10.0) <= 0:
        raise ConfigError("MESHPATCH_OUTLIER_INTERVAL", "must be greater than 0", "set it to e.g. 10s")
    return mode, values


def parse_ring_size_cap(environ=os.environ) -> int:
    """MESHPATCH_RING_HASH_SIZE_CAP: gRPC's ring-size cap (4096) unless raised (Envoy: 8388608)."""
    name = "MESHPATCH_RING_HASH_SIZE_CAP"
    raw = (environ.get(name) or "").strip()
    if not raw:
        return 4096
    if not raw.isdigit() or not (1 <= int(raw) <= 8_388_608):
        raise ConfigError(name, f"{raw!r} is not a ring size", f"set {name} between 1 and 8388608")
    return int(raw)


class Settings:
    """Everything the agent reads from the environment."""

    __slots__ = (
        "hooks",
        "xds_server",
        "namespace",
        "resolve_timeout",
        "log_level",
        "bootstrap_path",
        "bootstrap_inline",
        "cluster_domain",
        "xds_ca_cert",
        "xds_token_file",
        "xds_tls_server_name",
        "share_stream",
        "runtime_dir",
        "fail_mode",
        "hold_until_ready",
        "outlier",
        "ring_size_cap",
        "registry",
        "registry_aliases",
    )

    def __init__(self, environ=os.environ) -> None:
        selected = _parse_hook_list(environ, "MESHPATCH_HOOKS")
        disabled = _parse_hook_list(environ, "MESHPATCH_DISABLED_HOOKS") or set()
        hooks = set(KNOWN_HOOKS) if selected is None else selected
        self.hooks = frozenset(hooks - disabled)
        self.xds_server = _parse_host_port(environ, "MESHPATCH_XDS_SERVER")
        self.namespace = (environ.get("MESHPATCH_NAMESPACE") or environ.get("POD_NAMESPACE") or "default").strip()
        if not self.namespace or "." in self.namespace or "~" in self.namespace:
            raise ConfigError("MESHPATCH_NAMESPACE", f"{self.namespace!r} is not a namespace name", "set a Kubernetes namespace such as default")
        self.cluster_domain = (environ.get("MESHPATCH_CLUSTER_DOMAIN") or "cluster.local").strip().strip(".")
        self.resolve_timeout = _parse_float(environ, "MESHPATCH_RESOLVE_TIMEOUT", 1.0, 0.0, 60.0)
        level = (environ.get("MESHPATCH_LOG_LEVEL") or "WARNING").strip().upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError("MESHPATCH_LOG_LEVEL", f"{level!r} is not a log level", "use DEBUG, INFO, WARNING or ERROR")
        self.log_level = level
        self.bootstrap_path = (environ.get("GRPC_XDS_BOOTSTRAP") or "").strip() or None
        self.bootstrap_inline = (environ.get("GRPC_XDS_BOOTSTRAP_CONFIG") or "").strip() or None
        # istiod direct (no istio-agent): TLS with the mesh root cert + the pod's token.
        self.xds_ca_cert = _parse_path(environ, "MESHPATCH_XDS_CA_CERT")
        self.xds_token_file = _parse_path(environ, "MESHPATCH_XDS_TOKEN_FILE")
        self.xds_tls_server_name = (environ.get("MESHPATCH_XDS_TLS_SERVER_NAME") or "").strip() or None
        # One upstream stream per pod, shared through a local relay (meshpatch.xds.pod).
        self.share_stream = _parse_bool(environ, "MESHPATCH_SHARE_STREAM", True)
        self.runtime_dir = _parse_path(environ, "MESHPATCH_RUNTIME_DIR")
        mode = (environ.get("MESHPATCH_FAIL_MODE") or "open").strip().lower()
        if mode not in ("open", "closed"):
            raise ConfigError("MESHPATCH_FAIL_MODE", f"{mode!r} is not a fail mode",
                              "set it to open (call goes out unrouted) or closed (call fails fast)")
        self.fail_mode = mode
        self.hold_until_ready = _parse_float(environ, "MESHPATCH_HOLD_UNTIL_READY", 0.0, 0.0, 600.0)
        # Validated here so a bad value switches meshpatch off at start with a
        # clear message; the cluster code reads the same variables when needed.
        self.outlier = parse_outlier_env(environ)
        self.ring_size_cap = parse_ring_size_cap(environ)
        # Parsed (with their own ConfigErrors) when the agent is built: see meshpatch.registries.config.
        self.registry = (environ.get("MESHPATCH_REGISTRY") or "").strip() or None
        self.registry_aliases = (environ.get("MESHPATCH_REGISTRY_ALIASES") or "").strip() or None


# -- observability and lanes (issue 7) -------------------------------------------
# Parsed at activation with the rest, so a bad value is reported once and named;
# kept as plain functions here (this module is the only one start-up may import).

_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def parse_admin_address(environ=os.environ):
    """``MESHPATCH_ADMIN``: None (off, the default), ``("unix", path)`` or
    ``("tcp", host, port)`` on a loopback address.  ``{pid}`` in a socket path
    is replaced by the process id, so every worker of a pre-fork server gets
    its own socket.  Anything that could listen beyond this machine is refused:
    the status view shows the mesh's configuration."""
    name = "MESHPATCH_ADMIN"
    raw = (environ.get(name) or "").strip()
    if raw.lower() in _FALSE:
        return None
    fix = "use unix:///path/admin.sock (may contain {pid}) or 127.0.0.1:PORT"
    if raw.startswith("unix:"):
        path = raw[len("unix:"):]
        if path.startswith("//"):
            path = path[2:]
        if not path.startswith("/"):
            raise ConfigError(name, f"{raw!r} needs an absolute socket path", fix)
        return ("unix", path.replace("{pid}", str(os.getpid())))
    host, sep, port = raw.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(name, f"{raw!r} is neither unix:///path nor host:port", fix)
    host = host.strip("[]") if host.startswith("[") else host
    if host not in _LOOPBACK_HOSTS and not host.startswith("127."):
        raise ConfigError(name, f"{host!r} is not a loopback address (the admin endpoint never listens beyond this host)", fix)
    if host.startswith("127."):
        parts = host.split(".")
        if len(parts) != 4 or not all(p.isdigit() and int(p) < 256 for p in parts):
            raise ConfigError(name, f"{host!r} is not an IPv4 address", fix)
    return ("tcp", "::1" if host in ("::1", "[::1]") else ("127.0.0.1" if host == "localhost" else host), int(port))


_TOKEN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def is_token(text: str, limit: int = 64) -> bool:
    """A header name / lane name / label key we accept: 1..limit of [A-Za-z0-9._-]."""
    return 0 < len(text) <= limit and all(ch in _TOKEN_CHARS for ch in text)


class LaneSettings:
    """Canary lanes: where a lane tag arrives and where endpoints declare theirs.

    ``header``: request header carrying the lane (lower case); ``baggage_key``:
    the W3C baggage / OTel Baggage key carrying it; ``label``: the endpoint label
    (EDS ``filter_metadata["meshpatch"]["labels"]``, registry labels) naming an
    endpoint's lane.  ``enabled`` False turns capture, propagation and lane
    preference off.
    """

    __slots__ = ("enabled", "header", "baggage_key", "label")

    def __init__(self, environ=os.environ) -> None:
        self.enabled = _parse_bool(environ, "MESHPATCH_LANES", True)
        self.header = (environ.get("MESHPATCH_LANE_HEADER") or "x-mesh-lane").strip().lower()
        if not is_token(self.header):
            raise ConfigError("MESHPATCH_LANE_HEADER", f"{self.header!r} is not a header name",
                              "use letters, digits, '-', '_' or '.', e.g. x-mesh-lane")
        self.baggage_key = (environ.get("MESHPATCH_LANE_BAGGAGE_KEY") or "mesh.lane").strip()
        if not is_token(self.baggage_key, 128):
            raise ConfigError("MESHPATCH_LANE_BAGGAGE_KEY", f"{self.baggage_key!r} is not a baggage key",
                              "use letters, digits, '-', '_' or '.', e.g. mesh.lane")
        self.label = (environ.get("MESHPATCH_LANE_LABEL") or "lane").strip()
        if not self.label or any(ch in self.label for ch in " ,;=\"'"):
            raise ConfigError("MESHPATCH_LANE_LABEL", f"{self.label!r} is not a label key",
                              "use a label key such as lane or traffic.opensergo.io/label")
