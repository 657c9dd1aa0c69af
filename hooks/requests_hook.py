"""requests: route each ``HTTPAdapter.send`` through the mesh.

Patched at class level, so ``requests.get`` and sessions/adapters created
before the patch are covered.  Per request the wrapper splits the prepared URL
by hand (no urlparse: the overhead budget is 10 us), asks the router, and if it
gets a :class:`~meshpatch.api.Pick` points ``request.url`` at the endpoint for
the duration of the send:

* ``Host`` carries the logical authority (unless the app set its own);
* for https urllib3 gets ``server_hostname``/``assert_hostname`` = the logical
  host through the pool-key attributes, so SNI and certificate checks use the
  name the app asked for, and pools (keep-alive) stay per endpoint;
* afterwards ``request.url`` and ``response.url`` are the logical URL again,
  so redirects, cookies and the app only ever see logical names.

The app's request is sent exactly once; nothing retries it.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

from meshpatch import safety
from meshpatch.api import MeshError

from ._common import current_agent, is_patched, is_suppressed, mark_patched

#: Attribute carried by a PreparedRequest only while it is being sent to an
#: endpoint; read by the pool-key wrapper (the request is the one object both
#: calls see, and it is per call, so no ContextVar is needed).
TLS_HOST_ATTR = "_meshpatch_tls_host"

_DEFAULT_PORTS = {"http": 80, "https": 443}

_Plan = Tuple[str, Optional[str], Optional[str]]  # endpoint URL, Host to add, TLS host

#: False on requests < 2.32 (no build_connection_pool_key_attributes): https
#: calls then stay unrouted rather than fail certificate checks.
_TLS_SUPPORTED = True


def patch(module: Any) -> str:
    """Install the wrappers once; return a one-line description for the status view."""
    import wrapt
    from requests import adapters

    adapter = adapters.HTTPAdapter
    if is_patched(adapter):
        return "already patched"
    global _TLS_SUPPORTED
    tls = hasattr(adapter, "build_connection_pool_key_attributes")
    _TLS_SUPPORTED = tls
    wrapt.wrap_function_wrapper(adapter, "send", _send_wrapper)
    if tls:
        wrapt.wrap_function_wrapper(adapter, "build_connection_pool_key_attributes", _pool_key_wrapper)
    mark_patched(adapter)
    version = getattr(module, "__version__", "?")
    if tls:
        return f"requests {version}: HTTPAdapter.send routed (http and https)"
    return f"requests {version}: HTTPAdapter.send routed (http only: this requests has no pool-key hook for TLS names)"


def _plan(request: Any, url: str) -> Optional[_Plan]:
    """Ask the router about one prepared request; None = leave it alone."""
    scheme_end = url.find("://")
    if scheme_end < 0:
        return None
    scheme = url[:scheme_end].lower()
    if scheme not in _DEFAULT_PORTS:
        return None
    start = scheme_end + 3
    path_start = url.find("/", start)
    if path_start < 0:
        path_start = len(url)
    netloc = url[start:path_start]
    hostport = netloc[netloc.rfind("@") + 1 :]
    if hostport.startswith("["):  # IPv6 literal: never a mesh name
        return None
    colon = hostport.rfind(":")
    port: Optional[int]
    if colon >= 0:
        host = hostport[:colon]
        port_text = hostport[colon + 1 :]
        port = int(port_text) if port_text else None
    else:
        host = hostport
        port = None
    if not host:
        return None
    if scheme == "https" and not _TLS_SUPPORTED:
        return None
    agent = current_agent()
    if agent is None:
        return None
    tail = url[path_start:]
    path = tail or "/"
    fragment = path.find("#")
    if fragment >= 0:
        path = path[:fragment]
    pick = agent.router.pick(scheme, host, port, request.method or "GET", path, request.headers)
    if pick is None:
        return None
    address = pick.address
    if ":" in address:
        address = f"[{address}]"
    endpoint_url = f"{scheme}://{address}:{pick.port}{tail}"
    add_host = None
    if "Host" not in request.headers:
        add_host = host if port is None or port == _DEFAULT_PORTS[scheme] else f"{host}:{port}"
    return endpoint_url, add_host, (host if scheme == "https" else None)


def _send_wrapper(wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Any) -> Any:
    if is_suppressed():
        return wrapped(*args, **kwargs)
    request = args[0] if args else kwargs.get("request")
    try:
        url = request.url
        plan = _plan(request, url)
    except MeshError as exc:
        from requests.exceptions import ConnectionError

        raise ConnectionError(str(exc), request=request) from exc
    except Exception as exc:
        safety.internal_error("hooks.requests.send", exc)
        return wrapped(*args, **kwargs)
    if plan is None:
        return wrapped(*args, **kwargs)

    endpoint_url, add_host, tls_host = plan
    headers = request.headers
    request.url = endpoint_url
    if add_host is not None:
        headers["Host"] = add_host
    if tls_host is not None:
        setattr(request, TLS_HOST_ATTR, tls_host)
    try:
        response = wrapped(*args, **kwargs)
    finally:
        request.url = url
        if add_host is not None:
            headers.pop("Host", None)
        if tls_host is not None:
            try:
                delattr(request, TLS_HOST_ATTR)
            except AttributeError:
                pass
    try:
        response.url = url
    except Exception as exc:  # an adapter subclass returning something odd
        safety.internal_error("hooks.requests.response_url", exc)
    return response


def _pool_key_wrapper(wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Any) -> Any:
    result = wrapped(*args, **kwargs)
    request = args[0] if args else kwargs.get("request")
    tls_host = getattr(request, TLS_HOST_ATTR, None)
    if tls_host is None:
        return result
    try:
        host_params, pool_kwargs = result
        if host_params.get("scheme") == "https":
            pool_kwargs["server_hostname"] = tls_host
            pool_kwargs["assert_hostname"] = tls_host
    except Exception as exc:
        safety.internal_error("hooks.requests.pool_key", exc)
    return result
