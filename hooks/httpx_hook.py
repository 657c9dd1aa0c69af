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
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

from meshpatch import safety
from meshpatch.api import MeshError

from ._common import current_agent, is_patched, is_suppressed, mark_patched

_SCHEMES = ("http", "https")


def patch(module: Any) -> str:
    import wrapt

    sync_transport = module.HTTPTransport
    async_transport = module.AsyncHTTPTransport
    if is_patched(sync_transport):
        return "already patched"
    wrapt.wrap_function_wrapper(sync_transport, "handle_request", _handle_request)
    wrapt.wrap_function_wrapper(async_transport, "handle_async_request", _handle_async_request)
    mark_patched(sync_transport)
    mark_patched(async_transport)
    return f"httpx {getattr(module, '__version__', '?')}: HTTPTransport and AsyncHTTPTransport routed"


def _pick(request: Any) -> Optional[Any]:
    url = request.url
    scheme = url.scheme
    if scheme not in _SCHEMES:
        return None
    host = url.host
    if not host or host.startswith("["):
        return None
    agent = current_agent()
    if agent is None:
        return None
    path = url.raw_path.decode("ascii")
    return agent.router.pick(scheme, host, url.port, request.method, path, request.headers)


def _reroute(request: Any, pick: Any) -> Tuple[Any, bool]:
    """Point the request at the endpoint; returns what :func:`_restore` needs."""
    url = request.url
    request.url = _endpoint_url(url, pick.address, pick.port)
    added_sni = False
    if url.scheme == "https":
        extensions = request.extensions
        if "sni_hostname" not in extensions:
            extensions["sni_hostname"] = url.host
            added_sni = True
    return url, added_sni


def _endpoint_url(url: Any, address: str, port: int) -> Any:
    """``url`` with the endpoint's host/port.  ``URL.copy_with`` re-parses and
    re-validates the whole URL (~12 us); the parsed form is a NamedTuple, so
    swap the two fields directly when this httpx has that layout."""
    reference = getattr(url, "_uri_reference", None)
    if reference is not None and hasattr(reference, "_replace") and address.replace(".", "").isdigit():
        new = url.__class__.__new__(url.__class__)
        new._uri_reference = reference._replace(host=address, port=port)
        return new
    return url.copy_with(host=address, port=port)


def _restore(request: Any, url: Any, added_sni: bool) -> None:
    request.url = url
    if added_sni:
        request.extensions.pop("sni_hostname", None)


def _error(request: Any, exc: MeshError) -> Exception:
    import httpx

    return httpx.ConnectError(str(exc), request=request)


def _handle_request(wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Any) -> Any:
    if is_suppressed():
        return wrapped(*args, **kwargs)
    request = args[0] if args else kwargs.get("request")
    try:
        pick = _pick(request)
        rerouted = _reroute(request, pick) if pick is not None else None
    except MeshError as exc:
        raise _error(request, exc) from exc
    except Exception as exc:
        safety.internal_error("hooks.httpx.handle_request", exc)
        return wrapped(*args, **kwargs)
    if rerouted is None:
        return wrapped(*args, **kwargs)
    try:
        return wrapped(*args, **kwargs)
    finally:
        _restore(request, *rerouted)


async def _handle_async_request(wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Any) -> Any:
    if is_suppressed():
        return await wrapped(*args, **kwargs)
    request = args[0] if args else kwargs.get("request")
    try:
        pick = _pick(request)
        rerouted = _reroute(request, pick) if pick is not None else None
    except MeshError as exc:
        raise _error(request, exc) from exc
    except Exception as exc:
        safety.internal_error("hooks.httpx.handle_async_request", exc)
        return await wrapped(*args, **kwargs)
    if rerouted is None:
        return await wrapped(*args, **kwargs)
    try:
        return await wrapped(*args, **kwargs)
    finally:
        _restore(request, *rerouted)
