"""httpx: route each request at the default transports.

Wrapping ``HTTPTransport.handle_request`` / ``AsyncHTTPTransport.handle_async_request``
(rather than ``Client.send``) covers clients created before the patch and
``httpx.get``, while custom transports (``MockTransport``, ASGI/WSGI apps) are
left alone: they never open a socket to a host name.

Per request the URL's host/port are swapped for the endpoint's for the duration
of the transport call.  httpx already put the logical ``Host`` header on the
request when it was built; for https the ``sni_hostname`` extension makes
httpcore use the logical name for SNI and certificate verification.  The URL is
restored before the response reaches the client, so ``response.url``,
redirects and cookies see the logical name.  Connection pools key on the
endpoint origin, so keep-alive works per endpoint.

mTLS: when the picked cluster's CDS carries an UpstreamTlsContext the attempt
goes to ``https://<endpoint>`` through a meshpatch-owned transport per
(cluster TLS config, certificate generation) built on that config's
:class:`~meshpatch.security.client_tls.MeshSSLContext` (which checks the
peer's SPIFFE SANs), instead of the app's transport: the app's own TLS
settings are about its plain URL, not mesh identities.  Those transports keep
their connections alive; a rotation starts a new one for new connections.
"""

from __future__ import annotations

import time as _time
from typing import Any, Optional

from meshpatch import lanes, safety
from meshpatch.api import MeshError
from meshpatch.routing.call import apply_header_ops
from meshpatch.routing.outcome import HTTP_ANSWERS, LOCAL, OK, Outcome
from meshpatch.security import of_pick

from ._common import current_agent, is_patched, is_suppressed, mark_patched, patch_request_method

_SCHEMES = ("http", "https")


def patch(module: Any) -> str:
    global _BYTE_STREAM, _PARSE_RESULT
    _BYTE_STREAM = getattr(module, "ByteStream", None)
    import sys

    _PARSE_RESULT = getattr(sys.modules.get(f"{module.__name__}._urlparse"), "ParseResult", None)
    sync_transport = module.HTTPTransport
    async_transport = module.AsyncHTTPTransport
    if is_patched(sync_transport):
        return "already patched"
    patch_request_method(sync_transport, "handle_request", _make_handle_request)
    patch_request_method(async_transport, "handle_async_request", _make_handle_async_request)
    mark_patched(sync_transport)
    mark_patched(async_transport)
    return f"httpx {getattr(module, '__version__', '?')}: HTTPTransport and AsyncHTTPTransport routed"


_endpoint_urls: dict = {}
_ENDPOINT_URLS_MAX = 4096


def _endpoint_url(url: Any, address: str, port: int, raw_path: Optional[bytes] = None, scheme: Optional[str] = None) -> Any:
    """``url`` with the endpoint's host/port (and a rewritten path / scheme).
    ``URL.copy_with`` re-parses and re-validates the whole URL (~12 us); the
    parsed form is a NamedTuple, so swap the fields directly when this httpx
    has that layout."""
    reference = getattr(url, "_uri_reference", None)
    if raw_path is None and reference is not None and hasattr(reference, "_replace") and address.replace(".", "").isdigit():
        key = (reference, address, port, scheme)
        new = _endpoint_urls.get(key)
        if new is not None:
            return new  # URLs are immutable: the same request line to the same endpoint reuses one
        new = url.__class__.__new__(url.__class__)
        if scheme is None:
            new._uri_reference = reference._replace(host=address, port=port)
        else:
            new._uri_reference = reference._replace(host=address, port=port, scheme=scheme)
        if len(_endpoint_urls) >= _ENDPOINT_URLS_MAX:
            _endpoint_urls.clear()
        _endpoint_urls[key] = new
        return new
    changes: dict = {"host": address, "port": port}
    if raw_path is not None:
        changes["raw_path"] = raw_path
    if scheme is not None:
        changes["scheme"] = scheme
    return url.copy_with(**changes)


def _error(request: Any, exc: MeshError) -> Exception:
    import httpx

    return httpx.ConnectError(str(exc), request=request)


def _local_response(request: Any, status: int, body: bytes = b"", headers: Optional[list] = None) -> Any:
    import httpx

    all_headers = list(headers or [])
    if body:
        all_headers.append(("content-type", "text/plain"))
    return httpx.Response(status, headers=all_headers, content=body, request=request)


def _outcome_from_error(exc: BaseException) -> Any:
    import httpx

    from meshpatch.routing import outcome as oc

    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        return oc.Outcome(oc.CONNECT_FAILURE)
    if isinstance(exc, httpx.TimeoutException):
        return oc.Outcome(oc.TIMEOUT)
    if isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
        return oc.Outcome(oc.RESET)
    return oc.Outcome(oc.LOCAL)


class _Plan:
    """What stays the same across the attempts of one httpx request."""

    __slots__ = ("call", "url", "raw_path", "tls_host", "saved_headers", "saved_extensions", "ops", "mesh_tls", "fault")

    def __init__(self, request: Any, router: Any, call: Any, scheme: str, host: str) -> None:
        self.call = call
        self.url = request.url
        policy = call.policy
        host_rewrite = policy.host_rewrite
        self.tls_host = (host_rewrite or host) if scheme == "https" else None
        self.saved_extensions = None  # copied before the first change (begin)
        self.saved_headers = None
        self.mesh_tls: Any = None
        byte_stream = _BYTE_STREAM
        if byte_stream is None:
            import httpx

            byte_stream = httpx.ByteStream
        replayable = isinstance(request.stream, byte_stream)
        if not replayable:
            call.retries = 1 << 30  # a streamed body cannot be sent twice
        self.raw_path = self.ops = self.fault = None
        if not call.plain:  # fault, header ops, rewrite, mirrors (RoutePolicy.plain)
            rewritten = call.rewritten_path()
            if rewritten is not None:
                self.raw_path = rewritten.encode("ascii")
            self.ops = call.header_ops()
        if self.ops is not None or host_rewrite:
            self.saved_headers = request.headers.copy()
            if self.ops is not None:
                apply_header_ops(request.headers, self.ops.request_add, self.ops.request_remove)
            if host_rewrite:
                request.headers["Host"] = host_rewrite
        if not call.plain:
            if policy.mirrors and replayable:
                _mirror(router, call, request, self.raw_path)
            self.fault = call.fault()

    def begin(self, request: Any) -> Any:
        """One attempt starts: its endpoint (the attempt counted as begun), the
        request aimed at it."""
        try:
            endpoint = self.call.next_endpoint()
        except MeshError as exc:
            raise _error(request, exc) from exc
        try:
            self.mesh_tls = mesh_tls = of_pick(self.call)
            if mesh_tls is not None:
                self._save_extensions(request)
                request.url = _endpoint_url(self.url, endpoint.address, endpoint.port, self.raw_path, "https")
                request.extensions.pop("sni_hostname", None)
            else:
                request.url = _endpoint_url(self.url, endpoint.address, endpoint.port, self.raw_path)
                if self.tls_host is not None:
                    self._save_extensions(request)
                    request.extensions["sni_hostname"] = self.tls_host
            if not self.call.plain:
                timeout = self.call.attempt_timeout()
                if timeout is not None:
                    self._save_extensions(request)
                    current = dict(request.extensions.get("timeout") or {})
                    for key in ("connect", "read", "write", "pool"):
                        value = current.get(key)
                        current[key] = timeout if value is None else min(value, timeout)
                    request.extensions["timeout"] = current
        except BaseException:  # the attempt began: end it before the error leaves
            self.call.finish(_LOCAL_FAILURE)
            raise
        return endpoint

    def _save_extensions(self, request: Any) -> None:
        if self.saved_extensions is None:
            self.saved_extensions = request.extensions
            request.extensions = dict(request.extensions)

    def restore(self, request: Any) -> None:
        request.url = self.url
        if self.saved_extensions is not None:
            request.extensions = self.saved_extensions
        if self.saved_headers is not None:
            request.headers = self.saved_headers

    def finish_response(self, response: Any) -> Any:
        ops = self.ops
        if ops is not None and (ops.response_add or ops.response_remove):
            try:
                apply_header_ops(response.headers, ops.response_add, ops.response_remove)
            except Exception as exc:
                safety.internal_error("hooks.httpx.response_headers", exc)
        return response


_mesh_transports: dict = {}
_mesh_async_transports: Any = None


def _mesh_transport(mesh_tls: Any) -> Any:
    """The sync transport for one (TLS config, generation); marked as meshpatch's
    own so the routing wrapper passes its calls straight through."""
    transport = _mesh_transports.get(mesh_tls.channel_key)
    if transport is None:
        import httpx

        transport = httpx.HTTPTransport(verify=mesh_tls.ssl_context, trust_env=False)
        transport._meshpatch_owned = True  # type: ignore[attr-defined]
        _remember(_mesh_transports, mesh_tls, transport)
    return transport


def _mesh_async_transport(mesh_tls: Any) -> Any:
    """Async transports hold connections bound to one event loop: one per loop."""
    global _mesh_async_transports
    import asyncio
    import weakref

    if _mesh_async_transports is None:
        _mesh_async_transports = weakref.WeakKeyDictionary()
    loop = asyncio.get_running_loop()
    per_loop = _mesh_async_transports.get(loop)
    if per_loop is None:
        per_loop = _mesh_async_transports[loop] = {}
    transport = per_loop.get(mesh_tls.channel_key)
    if transport is None:
        import httpx

        transport = httpx.AsyncHTTPTransport(verify=mesh_tls.ssl_context, trust_env=False)
        transport._meshpatch_owned = True  # type: ignore[attr-defined]
        _remember(per_loop, mesh_tls, transport)
    return transport


def _remember(cache: dict, mesh_tls: Any, transport: Any) -> None:
    """Keep the new transport and the previous generation's (its in-flight
    requests finish on their connections); older generations are dropped."""
    config_key = mesh_tls.channel_key[0]
    same_config = [key for key in cache if key[0] == config_key]
    for key in same_config[:-1]:
        cache.pop(key, None)
    cache[mesh_tls.channel_key] = transport


_BYTE_STREAM: Any = None  # httpx.ByteStream, set when patched (no import per request)
_LOCAL_FAILURE = Outcome(LOCAL)
_PARSE_RESULT: Any = None  # the class of httpx.URL._uri_reference this hook knows the fields of


def _local_answer(request: Any, call: Any) -> Optional[Any]:
    kind = call.kind
    if kind == "direct":
        return _local_response(request, call.policy.direct.status, call.policy.direct.body)
    if kind == "redirect":
        return _local_response(request, call.policy.redirect.code, b"", [("location", call.redirect_location())])
    return None


_mirror_transport: Any = None


def _mirror(router: Any, call: Any, request: Any, raw_path: Optional[bytes]) -> None:
    """Shadow copies on a plain sync transport in the background; never delays the real call."""
    global _mirror_transport
    import httpx

    from meshpatch.routing import mirror

    body = request.content
    for pick in call.mirror_picks(router):
        headers = request.headers.copy()
        headers["Host"] = pick.authority
        shadow = httpx.Request(request.method, _endpoint_url(request.url, pick.address, pick.port, raw_path),
                               headers=headers, content=body)
        if _mirror_transport is None:
            _mirror_transport = httpx.HTTPTransport()
        transport = _mirror_transport

        def send(shadow: Any = shadow, pick: Any = pick) -> None:
            from meshpatch.routing.outcome import OK, Outcome

            pick.started()
            try:
                response = transport.handle_request(shadow)
                response.read()
                response.close()
                pick.finished(Outcome(OK, response.status_code))
            except BaseException as exc:
                pick.finished(_outcome_from_error(exc))
                raise

        mirror.submit(send)


def _prepare(request: Any, site: str) -> Any:
    """The shared prologue: None = not in the mesh (send as is), a response = the
    mesh answered locally (direct response / redirect), else the call's _Plan."""
    try:
        lanes.outbound_http(request.headers)
        url = request.url
        ref = getattr(url, "_uri_reference", None)
        if ref is not None and ref.__class__ is _PARSE_RESULT:  # the parsed fields, without 4 property calls
            scheme = ref.scheme
            host = ref.host
            port = ref.port
            path = ref.path or "/"
            if ref.query is not None:
                path = f"{path}?{ref.query}"
            if host.startswith("xn--"):
                host = url.host  # IDNA: the router sees the decoded name, as url.host gives it
        else:
            scheme = url.scheme
            host = url.host
            port = url.port
            path = url.raw_path.decode("ascii")
        if scheme not in _SCHEMES or not host or host.startswith("["):
            return None
        agent = current_agent()
        if agent is None:
            return None
        router = agent.router
        call = router.start(scheme, host, port, request.method, path, request.headers)
        if call is None:
            return None
        if call.handle is None:  # redirect / direct response
            local = _local_answer(request, call)
            if local is not None:
                return local
        return _Plan(request, router, call, scheme, host)
    except MeshError as exc:
        raise _error(request, exc) from exc
    except Exception as exc:
        safety.internal_error(site, exc)
        return None


def _end(plan: Any, response: Any, error: Optional[BaseException]) -> Optional[float]:
    """One attempt ended: report it; the delay before a retry, or None when done."""
    if error is not None:
        outcome = _outcome_from_error(error)
    else:
        outcome = HTTP_ANSWERS[response.status_code]
    return plan.call.attempt_done(outcome)


def _abort(plan: Any, request: Any) -> Optional[Any]:
    """The fault filter's abort response, if this call drew one."""
    fault = plan.fault
    if fault.abort_http is None:
        return None
    plan.call.aborted(fault.abort_http)
    plan.restore(request)
    return _local_response(request, fault.abort_http, b"fault filter abort")


async def _async_sleep(delay: float) -> None:
    import asyncio  # only async apps get here; httpx itself does not import asyncio

    await asyncio.sleep(delay)


def _make_handle_request(original: Any) -> Any:
    def handle_request(self: Any, request: Any) -> Any:
        return _routed_handle(original, self, request)

    return handle_request


def _make_handle_async_request(original: Any) -> Any:
    async def handle_async_request(self: Any, request: Any) -> Any:
        return await _routed_handle_async(original, self, request)

    return handle_async_request


def _routed_handle(original: Any, transport: Any, request: Any) -> Any:
    """``HTTPTransport.handle_request(request)`` through the mesh;
    ``original(transport, request)`` is the unpatched method."""
    if is_suppressed() or getattr(transport, "_meshpatch_owned", False):
        return original(transport, request)
    plan = _prepare(request, "hooks.httpx.handle_request")
    if plan is None:
        return original(transport, request)
    if not isinstance(plan, _Plan):
        return plan  # answered by the mesh
    if plan.fault is not None:
        try:
            if plan.fault.delay:
                _time.sleep(plan.fault.delay)
            aborted = _abort(plan, request)
        finally:
            plan.fault.done()
        if aborted is not None:
            return aborted
    try:
        while True:
            plan.begin(request)
            response = error = None
            try:
                if plan.mesh_tls is not None:
                    response = _mesh_transport(plan.mesh_tls).handle_request(request)
                else:
                    response = original(transport, request)
            except BaseException as exc:
                error = exc
            delay = _end(plan, response, error)
            if delay is None:
                break
            if response is not None:
                response.close()
            _time.sleep(delay)
    finally:
        plan.restore(request)
    if error is not None:
        raise error
    return response if plan.ops is None else plan.finish_response(response)


async def _routed_handle_async(original: Any, transport: Any, request: Any) -> Any:
    if is_suppressed() or getattr(transport, "_meshpatch_owned", False):
        return await original(transport, request)
    plan = _prepare(request, "hooks.httpx.handle_async_request")
    if plan is None:
        return await original(transport, request)
    if not isinstance(plan, _Plan):
        return plan  # answered by the mesh
    if plan.fault is not None:
        try:
            if plan.fault.delay:
                await _async_sleep(plan.fault.delay)
            aborted = _abort(plan, request)
        finally:
            plan.fault.done()
        if aborted is not None:
            return aborted
    try:
        while True:
            plan.begin(request)
            response = error = None
            try:
                if plan.mesh_tls is not None:
                    response = await _mesh_async_transport(plan.mesh_tls).handle_async_request(request)
                else:
                    response = await original(transport, request)
            except BaseException as exc:
                error = exc
            delay = _end(plan, response, error)
            if delay is None:
                break
            if response is not None:
                await response.aclose()
            await _async_sleep(delay)
    finally:
        plan.restore(request)
    if error is not None:
        raise error
    return response if plan.ops is None else plan.finish_response(response)
