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

mTLS: when the picked cluster's CDS carries an UpstreamTlsContext the attempt
goes to ``https://<endpoint>`` with the cluster's
:class:`~meshpatch.security.client_tls.MeshSSLContext` put into urllib3's pool
key (``ssl_context``, ``assert_hostname=False``; the context checks the peer's
SPIFFE SANs itself), and the app's ``verify``/``cert`` are not used for it:
they were about the app's own (plain) URL, not the mesh's identities.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional

import time as _time

from meshpatch import lanes, safety
from meshpatch.api import MeshError
from meshpatch.routing.call import apply_header_ops
from meshpatch.routing.outcome import HTTP_ANSWERS, OK, Outcome
from meshpatch.security import of_pick

from ._common import current_agent, is_patched, is_suppressed, mark_patched, patch_request_method

#: Attribute carried by a PreparedRequest only while it is being sent to an
#: endpoint; read by the pool-key wrapper (the request is the one object both
#: calls see, and it is per call, so no ContextVar is needed).
TLS_HOST_ATTR = "_meshpatch_tls_host"
#: The :class:`~meshpatch.security.client_tls.ClientTls` of an mTLS attempt.
MESH_TLS_ATTR = "_meshpatch_mesh_tls"

#: ``HTTPAdapter.send`` / ``build_connection_pool_key_attributes`` as every
#: requests 2.x defines them (parameter names, then defaults).  The patches
#: take exactly these parameters, so a call binds straight to them and is passed
#: on positionally: no ``*args``/``**kwargs`` tuple and dict built twice per call.
_SEND_SIGNATURE = (("self", "request", "stream", "timeout", "verify", "cert", "proxies"), (False, None, True, None, None))
_POOL_KEY_SIGNATURE = (("self", "request", "verify", "cert"), (None,))

_DEFAULT_PORTS = {"http": 80, "https": 443}


#: False on requests < 2.32 (no build_connection_pool_key_attributes): https
#: calls then stay unrouted rather than fail certificate checks.
_TLS_SUPPORTED = True


def _signature(owner: type, name: str) -> Any:
    """(parameter names, defaults) of ``owner.<name>`` as requests defines it,
    under any wrappers another instrumentation put around it (they follow
    ``__wrapped__`` and take what the original takes); None if absent."""
    method = getattr(owner, name, None)
    for _ in range(8):
        inner = getattr(method, "__wrapped__", None)
        if inner is None:
            break
        method = inner
    code = getattr(method, "__code__", None)
    if code is None:
        return None
    return code.co_varnames[: code.co_argcount], getattr(method, "__defaults__", None)


def patch(module: Any) -> str:
    """Install the wrappers once; return a one-line description for the status view."""
    from requests import adapters

    adapter = adapters.HTTPAdapter
    if is_patched(adapter):
        return "already patched"
    version = getattr(module, "__version__", "?")
    if _signature(adapter, "send") != _SEND_SIGNATURE:
        # never guess how to call an unknown send: the app's calls stay untouched
        return f"requests {version}: HTTPAdapter.send has parameters meshpatch does not know; not routed"
    global _TLS_SUPPORTED
    tls = _signature(adapter, "build_connection_pool_key_attributes") == _POOL_KEY_SIGNATURE
    _TLS_SUPPORTED = tls
    patch_request_method(adapter, "send", _make_send)
    if tls:
        patch_request_method(adapter, "build_connection_pool_key_attributes", _make_pool_key)
    mark_patched(adapter)
    if tls:
        return f"requests {version}: HTTPAdapter.send routed (http and https)"
    return f"requests {version}: HTTPAdapter.send routed (http only: this requests has no pool-key hook for TLS names)"


def _split_head(head: str, scheme_end: int) -> Any:
    """``scheme://[user@]host[:port]`` → (scheme, host, port, Host header value)
    without urlparse; False for what is never routed (other schemes, IPv6
    literals, no host)."""
    scheme = head[:scheme_end].lower()
    if scheme not in _DEFAULT_PORTS:
        return False
    netloc = head[scheme_end + 3:]
    hostport = netloc[netloc.rfind("@") + 1 :]
    if hostport.startswith("["):  # IPv6 literal: never a mesh name
        return False
    colon = hostport.rfind(":")
    port: Optional[int]
    if colon >= 0:
        host = hostport[:colon]
        port_text = hostport[colon + 1 :]
        if port_text and not port_text.isdigit():
            return False  # not a port: requests will reject the URL itself
        port = int(port_text) if port_text else None
    else:
        host = hostport
        port = None
    if not host:
        return False
    return scheme, host, port, host if port is None or port == _DEFAULT_PORTS[scheme] else f"{host}:{port}"


#: URL head (everything before the path) → _split_head's answer.  An app calls a
#: handful of origins, so per request this is two ``find`` and one dict probe
#: instead of a dozen string operations; cleared when full.
_HEADS: dict = {}
_HEADS_MAX = 1024


def _local_response(request: Any, url: str, status: int, body: bytes = b"", headers: Optional[dict] = None) -> Any:
    """A response made here (direct response, redirect, fault abort), shaped like
    one from the network so Session.send, redirects and the app handle it as usual."""
    import io
    from http.client import responses

    from requests.models import Response
    from requests.structures import CaseInsensitiveDict

    response = Response()
    response.status_code = status
    response.reason = responses.get(status, "")
    response.headers = CaseInsensitiveDict(headers or {})
    response.headers.setdefault("content-length", str(len(body)))
    if body:
        response.headers.setdefault("content-type", "text/plain")
    response._content = body
    response._content_consumed = True
    response.raw = io.BytesIO(body)
    response.url = url
    response.request = request
    response.encoding = None
    return response


def _outcome_from_error(exc: BaseException) -> Any:
    from requests import exceptions as rex

    from meshpatch.routing import outcome as oc

    if isinstance(exc, rex.ConnectTimeout):
        return oc.Outcome(oc.CONNECT_FAILURE)
    if isinstance(exc, rex.Timeout):
        return oc.Outcome(oc.TIMEOUT)
    if isinstance(exc, rex.ConnectionError):
        text = repr(exc)
        if "NewConnectionError" in text or "Connection refused" in text or "Failed to establish" in text:
            return oc.Outcome(oc.CONNECT_FAILURE)
        return oc.Outcome(oc.RESET)
    return oc.Outcome(oc.LOCAL)


def _make_send(original: Any) -> Any:
    def send(self: Any, request: Any, stream: Any = False, timeout: Any = None, verify: Any = True, cert: Any = None,
             proxies: Any = None) -> Any:
        return _routed_send(original, self, request, stream, timeout, verify, cert, proxies)

    return send


def _routed_send(original: Any, adapter: Any, request: Any, stream: Any, timeout: Any, verify: Any, cert: Any,
                 proxies: Any) -> Any:
    """``HTTPAdapter.send`` through the mesh; ``original(adapter, request,
    stream, timeout, verify, cert, proxies)`` is the unpatched method."""
    if is_suppressed():
        return original(adapter, request, stream, timeout, verify, cert, proxies)
    call = None
    try:
        lanes.outbound_http(request.headers)
        url = request.url
        scheme_end = url.find("://")
        path_start = url.find("/", scheme_end + 3)
        if path_start < 0:
            path_start = len(url)
        head = url[:path_start]
        parts = _HEADS.get(head)
        if parts is None and scheme_end >= 0:
            parts = _split_head(head, scheme_end)
            if len(_HEADS) >= _HEADS_MAX:
                _HEADS.clear()
            _HEADS[head] = parts
        if parts:
            scheme, host, port, host_header = parts
            agent = current_agent()
            if agent is not None and (scheme != "https" or _TLS_SUPPORTED):
                tail = url[path_start:]
                path = tail or "/"
                fragment = path.find("#")
                if fragment >= 0:
                    path = path[:fragment]
                router = agent.router
                call = router.start(scheme, host, port, request.method or "GET", path, request.headers)
    except MeshError as exc:
        from requests.exceptions import ConnectionError

        raise ConnectionError(str(exc), request=request) from exc
    except Exception as exc:
        safety.internal_error("hooks.requests.send", exc)
        call = None
    if call is None:  # not in the mesh (or meshpatch failed): the original call
        return original(adapter, request, stream, timeout, verify, cert, proxies)
    policy = call.policy
    if call.handle is None:  # answered here: direct response or redirect
        kind = call.kind
        if kind == "direct":
            return _local_response(request, url, policy.direct.status, policy.direct.body)
        if kind == "redirect":
            return _local_response(request, url, policy.redirect.code, b"", {"location": call.redirect_location()})
    headers = request.headers
    saved_headers = ops = None
    if not call.plain:  # fault, header ops, rewrite, mirrors (RoutePolicy.plain)
        shaped = _shape(request, url, router, call, scheme, tail)
        if shaped.__class__ is not tuple:
            return shaped  # fault filter abort
        tail, ops, saved_headers = shaped
    # requests' CaseInsensitiveDict keeps (name, value) under the lower-cased
    # name; going to that store directly spares a KeyError per call on the miss
    store = getattr(headers, "_store", None)
    if store.__class__ is not OrderedDict:
        store = None
    if store is not None:
        entry = store.get("host")
        previous_host = entry[1] if entry is not None else None
    else:
        previous_host = headers.get("Host")
    add_host = previous_host is None or policy.host_rewrite is not None
    if add_host:
        value = policy.host_rewrite or host_header
        if store is not None:
            store["host"] = ("Host", value)
        else:
            headers["Host"] = value
    tls_host = (policy.host_rewrite or host) if scheme == "https" else None
    body = request.body
    if body is not None and not isinstance(body, (bytes, str)):
        call.retries = 1 << 30  # a streamed body cannot be sent twice
    attempt_timeout = timeout
    response = None
    error: Optional[BaseException] = None
    used_mesh_tls = False
    try:
        while True:
            endpoint = call.next_endpoint()  # raises NoHealthyUpstream; else the attempt has begun
            response = error = None
            try:
                if not call.plain:
                    limit = call.attempt_timeout()
                    if limit is not None:
                        attempt_timeout = _bounded_timeout(timeout, limit)
                address = endpoint.address
                if ":" in address:
                    address = f"[{address}]"
                mesh_tls = of_pick(call)
                if mesh_tls is not None:
                    request.url = f"https://{address}:{endpoint.port}{tail}"
                    setattr(request, MESH_TLS_ATTR, mesh_tls)
                    used_mesh_tls = True
                    # verify/cert: no CA file or client certificate of the app's on the mesh connection
                    response = original(adapter, request, stream, attempt_timeout, True, None, proxies)
                else:
                    request.url = f"{scheme}://{address}:{endpoint.port}{tail}"
                    if tls_host is not None:
                        setattr(request, TLS_HOST_ATTR, tls_host)
                    response = original(adapter, request, stream, attempt_timeout, verify, cert, proxies)
                outcome = HTTP_ANSWERS[response.status_code]
            except BaseException as exc:  # classified, reported, then re-raised below
                error = exc
                outcome = _outcome_from_error(exc)
            delay = call.attempt_done(outcome)
            if delay is None:
                break
            if response is not None:
                response.close()
            _time.sleep(delay)
    except MeshError as exc:  # raised before an attempt was sent (no healthy endpoint)
        from requests.exceptions import ConnectionError

        raise ConnectionError(str(exc), request=request) from exc
    finally:
        request.url = url
        if tls_host is not None:
            request.__dict__.pop(TLS_HOST_ATTR, None)
        if used_mesh_tls:
            request.__dict__.pop(MESH_TLS_ATTR, None)
        if saved_headers is not None:
            request.headers = saved_headers
        elif add_host:
            if store is not None:
                if previous_host is None:
                    store.pop("host", None)
                else:
                    store["host"] = entry
            elif previous_host is None:
                del headers["Host"]
            else:
                headers["Host"] = previous_host
    if error is not None:
        raise error
    try:
        response.url = url
        if ops is not None and (ops.response_add or ops.response_remove):
            apply_header_ops(response.headers, ops.response_add, ops.response_remove)
    except Exception as exc:  # an adapter subclass returning something odd
        safety.internal_error("hooks.requests.response", exc)
    return response


def _shape(request: Any, url: str, router: Any, call: Any, scheme: str, tail: str) -> Any:
    """The route's steps before the attempts, for calls that are not plain:
    fault delay / abort (→ a local response), request header ops, path
    rewrite, mirrors.  Returns the abort response or ``(tail, ops, saved_headers)``."""
    fault = call.fault()
    if fault is not None:
        try:
            if fault.delay:
                _time.sleep(fault.delay)
            if fault.abort_http is not None:
                call.aborted(fault.abort_http)
                return _local_response(request, url, fault.abort_http, b"fault filter abort")
        finally:
            fault.done()
    saved_headers = None
    ops = call.header_ops()
    if ops is not None:
        saved_headers = request.headers.copy()
        apply_header_ops(request.headers, ops.request_add, ops.request_remove)
    tail = call.rewritten_path() or tail
    body = request.body
    if call.policy.mirrors and (body is None or isinstance(body, (bytes, str))):
        _mirror(router, call, request, scheme, tail)
    return tail, ops, saved_headers


def _bounded_timeout(app_timeout: Any, limit: float) -> Any:
    if app_timeout is None:
        return limit
    if isinstance(app_timeout, tuple):
        return tuple(limit if t is None else min(t, limit) for t in app_timeout)
    return min(app_timeout, limit)


_mirror_adapter: Any = None


def _mirror(router: Any, call: Any, request: Any, scheme: str, tail: str) -> None:
    """Shadow copies to the mirror clusters; never delays or fails the real call."""
    global _mirror_adapter
    from meshpatch.routing import mirror

    for pick in call.mirror_picks(router):
        shadow = request.copy()
        address = f"[{pick.address}]" if ":" in pick.address else pick.address
        shadow.url = f"{scheme}://{address}:{pick.port}{tail}"
        shadow.headers["Host"] = pick.authority
        if _mirror_adapter is None:
            from requests.adapters import HTTPAdapter

            _mirror_adapter = HTTPAdapter()
        adapter = _mirror_adapter

        def send(shadow: Any = shadow, pick: Any = pick) -> None:
            pick.started()
            try:
                response = adapter.send(shadow, timeout=5)
                pick.finished(Outcome(OK, response.status_code))
                response.close()
            except BaseException as exc:
                pick.finished(_outcome_from_error(exc))
                raise

        mirror.submit(send)


_MESH_DROPPED_POOL_KWARGS = ("ca_certs", "ca_cert_dir", "ca_cert_data", "cert_file", "key_file", "key_password",
                             "server_hostname", "assert_fingerprint")


def _make_pool_key(original: Any) -> Any:
    def build_connection_pool_key_attributes(self: Any, request: Any, verify: Any, cert: Any = None) -> Any:
        return _pool_key(request, original(self, request, verify, cert))

    return build_connection_pool_key_attributes


def _pool_key(request: Any, result: Any) -> Any:
    """The pool key of a routed https attempt: the logical name for SNI and the
    certificate check, or the mesh's mTLS context."""
    mesh_tls = getattr(request, MESH_TLS_ATTR, None)
    if mesh_tls is not None:
        try:
            host_params, pool_kwargs = result
            for key in _MESH_DROPPED_POOL_KWARGS:
                pool_kwargs.pop(key, None)
            pool_kwargs["ssl_context"] = mesh_tls.ssl_context
            pool_kwargs["cert_reqs"] = "CERT_REQUIRED"
            pool_kwargs["assert_hostname"] = False  # the context checks SPIFFE SANs instead
        except Exception as exc:
            safety.internal_error("hooks.requests.pool_key", exc)
            raise
        return result
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
