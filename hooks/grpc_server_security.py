"""grpc servers: mesh mTLS and RBAC for the ports an app binds (security; lanes are grpc_server_hook).

Patched from :mod:`grpc_hook` / :mod:`grpc_aio_hook` when the app imports
grpc / grpc.aio.  ``grpc.server(...)`` and ``grpc.aio.server(...)`` get
meshpatch's RBAC interceptor first in the chain; ``add_insecure_port`` of a
TCP ``host:port`` waits for the port's inbound listener and binds it with
mTLS (STRICT) or plaintext; see :mod:`meshpatch.security.server` for the
rules.  Servers created with ``xds=True`` (grpc's own xDS server), meshpatch's
own servers and processes without a server_listener_resource_name_template
are left alone; ``MESHPATCH_SERVER_SECURITY=0`` turns this off.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Optional, Tuple

from meshpatch import safety
from meshpatch.internal import suppressed

from ._common import current_agent, is_patched, is_suppressed, mark_patched

_ATTR = "_meshpatch_managed"


def patch(module: Any) -> str:
    import wrapt
    from grpc import _server

    if is_patched(_server._Server):
        return "grpc servers already patched"
    wrapt.wrap_function_wrapper(module, "server", _server_wrapper)
    wrapt.wrap_function_wrapper(_server._Server, "add_insecure_port", _add_insecure_port)
    wrapt.wrap_function_wrapper(_server._Server, "add_secure_port", _add_secure_port)
    wrapt.wrap_function_wrapper(_server._Server, "stop", _stop)
    wrapt.wrap_function_wrapper(_server._Server, "start", _start)
    wrapt.wrap_function_wrapper(_server._Server, "wait_for_termination", _wait_for_termination)
    wrapt.wrap_function_wrapper(_server._Server, "add_generic_rpc_handlers", _record("add_generic_rpc_handlers"))
    if hasattr(_server._Server, "add_registered_method_handlers"):
        wrapt.wrap_function_wrapper(_server._Server, "add_registered_method_handlers",
                                    _record("add_registered_method_handlers"))
    mark_patched(_server._Server)
    return "grpc.server: ports follow the mesh's inbound listeners (mTLS, RBAC, live mode switches)"


def patch_aio(aio: Any) -> str:
    import wrapt
    from grpc.aio import _server

    if is_patched(_server.Server):
        return "grpc.aio servers already patched"
    wrapt.wrap_function_wrapper(aio, "server", _aio_server_wrapper)
    wrapt.wrap_function_wrapper(_server.Server, "add_insecure_port", _add_insecure_port)
    wrapt.wrap_function_wrapper(_server.Server, "add_secure_port", _add_secure_port)
    wrapt.wrap_function_wrapper(_server.Server, "stop", _aio_stop)
    mark_patched(_server.Server)
    return "grpc.aio.server: ports follow the mesh's inbound listeners (mTLS, RBAC)"


def _plan(kind: str) -> Optional[Any]:
    """A ManagedServer for a new app server, or None to leave it alone."""
    from meshpatch.security import server as mesh_server

    if not mesh_server.enabled():
        return None
    agent = current_agent()
    if agent is None:
        return None
    template = mesh_server.listener_template(agent)
    if template is None:
        return None
    return mesh_server.ManagedServer(agent, template, kind)


def _managed_server(wrapped: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any], names: Tuple[str, ...],
                    kind: str, interceptor: Callable[[Any], Any]) -> Any:
    if is_suppressed():
        return wrapped(*args, **kwargs)
    try:
        bound = dict(zip(names, args))
        bound.update(kwargs)
        managed = None if bound.get("xds") else _plan(kind)
        if managed is not None:
            bound["interceptors"] = [interceptor(managed)] + list(bound.get("interceptors") or ())
    except Exception as exc:
        safety.internal_error(f"hooks.grpc_server.{kind}", exc)
        managed = None
    if managed is None:
        return wrapped(*args, **kwargs)
    server = wrapped(**bound)
    setattr(server, _ATTR, managed)
    if kind == "sync":
        _enable_live_switch(server, managed, wrapped, bound)
    from meshpatch.security.server import register

    register(managed)
    return server


_SYNC_ARGS = ("thread_pool", "handlers", "interceptors", "options", "maximum_concurrent_rpcs", "compression", "xds")
_AIO_ARGS = ("migration_thread_pool", "handlers", "interceptors", "options", "maximum_concurrent_rpcs", "compression")


def _server_wrapper(wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    return _managed_server(wrapped, args, kwargs, _SYNC_ARGS, "sync", SyncInterceptor)


def _aio_server_wrapper(wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    return _managed_server(wrapped, args, kwargs, _AIO_ARGS, "aio", AioInterceptor)


def _address_arg(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> str:
    return args[0] if args else kwargs["address"]


def _add_insecure_port(wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    managed = getattr(instance, _ATTR, None)
    if managed is None or is_suppressed():
        return wrapped(*args, **kwargs)
    from meshpatch.security import server as mesh_server

    address = _address_arg(args, kwargs)
    try:
        plan = managed.bind_plan(address)
    except mesh_server.BindRefused as exc:
        raise RuntimeError(str(exc)) from None  # what grpc raises for a port it cannot bind
    except Exception as exc:
        safety.internal_error("hooks.grpc_server.bind", exc)
        return wrapped(*args, **kwargs)
    if plan is None:  # unix sockets etc.: not in the mesh
        _binds(managed).append((address, None))
        return wrapped(*args, **kwargs)
    joined, port, watch = plan
    chain = watch.chain if watch.state == mesh_server.MESH else None
    if chain is not None and chain.tls is not None:
        credentials = mesh_server.dynamic_server_credentials(chain.tls)
        with suppressed():
            result = instance.add_secure_port(joined, credentials)
        managed.bound(watch, True)
    else:
        result = wrapped(joined)
        managed.bound(watch, False)
    return result


def _add_secure_port(wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    """The app's own TLS port: untouched, but noted (mesh RBAC reaches its calls too)."""
    managed = getattr(instance, _ATTR, None)
    if managed is not None and not is_suppressed():
        address = _address_arg(args, kwargs)
        managed.note_other_port(address)
        _binds(managed).append((address, args[1] if len(args) > 1 else kwargs["server_credentials"]))
    return wrapped(*args, **kwargs)


def _stop(wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    managed = getattr(instance, _ATTR, None)
    _close(instance)
    if managed is None:
        return wrapped(*args, **kwargs)
    with managed.swap_lock:  # not in the middle of a live switch
        return wrapped(*args, **kwargs)


# -- live mode switches (sync servers) -----------------------------------------------------

#: Seconds the replaced server lets calls on its connections finish
#: (``MESHPATCH_SERVER_DRAIN_GRACE``).
DRAIN_GRACE = 10.0


def _drain_grace() -> float:
    import os

    try:
        return max(0.0, float(os.environ.get("MESHPATCH_SERVER_DRAIN_GRACE", DRAIN_GRACE)))
    except ValueError:
        return DRAIN_GRACE


def _binds(managed: Any) -> Any:
    binds = getattr(managed, "other_binds", None)
    if binds is None:
        binds = managed.other_binds = []
    return binds


def _enable_live_switch(server: Any, managed: Any, factory: Any, bound: Dict[str, Any]) -> None:
    import threading
    import weakref

    managed.factory = factory
    managed.factory_args = dict(bound)
    managed.registrations = []
    managed.swap_lock = threading.RLock()
    managed.started = False
    ref = weakref.ref(server)
    managed.on_mode_change = lambda: _switch(ref, managed)


def _record(method: str) -> Callable[..., Any]:
    """Handler registrations are replayed on the server a live switch brings in."""

    def wrapper(wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        managed = getattr(instance, _ATTR, None)
        if managed is not None and hasattr(managed, "registrations"):
            managed.registrations.append((method, args, kwargs))
        return wrapped(*args, **kwargs)

    return wrapper


def _start(wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    managed = getattr(instance, _ATTR, None)
    if managed is None or not hasattr(managed, "swap_lock"):
        return wrapped(*args, **kwargs)
    with managed.swap_lock:
        result = wrapped(*args, **kwargs)
        managed.started = True
    return result


def _wait_for_termination(wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    """A live switch ends the server state the app was waiting on; keep waiting
    on the one that replaced it."""
    managed = getattr(instance, _ATTR, None)
    if managed is None:
        return wrapped(*args, **kwargs)
    import time

    timeout = args[0] if args else kwargs.get("timeout")
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        state = instance._state
        left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        done = wrapped(left)
        if instance._state is state or (deadline is not None and time.monotonic() >= deadline):
            return done


def _switch(ref: Any, managed: Any) -> None:
    """Re-bind every port of a running sync server in its current mesh mode."""
    from meshpatch.security import server as mesh_server

    instance = ref()
    if instance is None:
        return
    with managed.swap_lock:
        watches = list(managed.ports.values())
        if managed._closed or not any(w.restart_needed for w in watches):
            return
        fresh = None
        try:
            with suppressed():
                fresh = managed.factory(**managed.factory_args)
                for method, args, kwargs in managed.registrations:
                    getattr(fresh, method)(*args, **kwargs)
                modes = []
                for watch in watches:
                    chain = watch.chain if watch.state == mesh_server.MESH else None
                    if chain is not None and chain.tls is not None:
                        fresh.add_secure_port(watch.address, mesh_server.dynamic_server_credentials(chain.tls))
                        modes.append((watch, True))
                    else:
                        fresh.add_insecure_port(watch.address)
                        modes.append((watch, False))
                for address, credentials in _binds(managed):
                    if credentials is None:
                        fresh.add_insecure_port(address)
                    else:
                        fresh.add_secure_port(address, credentials)
                if managed.started:
                    fresh.start()
        except Exception as exc:  # e.g. the app disabled SO_REUSEPORT: the port is taken
            if fresh is not None:
                fresh.stop(None)
            import logging

            logging.getLogger("meshpatch.security").warning(
                "meshpatch: cannot re-bind the gRPC server for the new mesh mode (%s); it applies after a restart", exc)
            return
        instance._state, fresh._state = fresh._state, instance._state
        for watch, mtls in modes:
            watch.bound_mtls = mtls
        managed.switches += 1
        fresh.stop(_drain_grace())  # the old listeners close now; their connections drain
    import logging

    logging.getLogger("meshpatch.security").info(
        "meshpatch: gRPC server re-bound for the new mesh mode: %s",
        ", ".join(f"{w.address} {'mTLS' if m else 'plaintext'}" for w, m in modes))
    managed.changed()


async def _aio_stop(wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    _close(instance)
    return await wrapped(*args, **kwargs)


def _close(instance: Any) -> None:
    managed = getattr(instance, _ATTR, None)
    if managed is not None:
        try:
            managed.close()
        except Exception as exc:
            safety.internal_error("hooks.grpc_server.stop", exc)


# -- interceptors -----------------------------------------------------------------------


def _wrap_handler(handler: Any, wrapper: Callable[[Any], Any]) -> Any:
    import grpc

    kinds = (("unary_unary", grpc.unary_unary_rpc_method_handler), ("unary_stream", grpc.unary_stream_rpc_method_handler),
             ("stream_unary", grpc.stream_unary_rpc_method_handler), ("stream_stream", grpc.stream_stream_rpc_method_handler))
    for kind, factory in kinds:
        behavior = getattr(handler, kind, None)
        if behavior is None:
            continue
        if hasattr(handler, "_replace"):
            return handler._replace(**{kind: wrapper(behavior)})
        return factory(wrapper(behavior), request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)
    return handler


def _denied(managed: Any, method: str, metadata: Any, context: Any) -> bool:
    from meshpatch.security.server import check

    try:
        return check(managed.rbac_state, method, metadata, context) is not None
    except Exception as exc:  # an engine bug denies rather than allows
        safety.internal_error("security.rbac", exc)
        return True


def _interceptor_base() -> Any:
    import grpc

    return grpc.ServerInterceptor


def _aio_interceptor_base() -> Any:
    import grpc.aio

    return grpc.aio.ServerInterceptor


class SyncInterceptor(_interceptor_base()):  # type: ignore[misc]
    """RBAC before the app's handler (and before the app's interceptors);
    costs one attribute read per call while the listener has no RBAC filter."""

    def __init__(self, managed: Any) -> None:
        self._managed = managed

    def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None or not self._managed.rbac_state.engine_sets:
            return handler
        import grpc

        from meshpatch.security.server import DENIED_MESSAGE

        managed = self._managed
        method = handler_call_details.method
        metadata = handler_call_details.invocation_metadata

        def wrapper(behavior: Any) -> Any:
            def guarded(request: Any, context: Any) -> Any:
                if _denied(managed, method, metadata, context):
                    context.abort(grpc.StatusCode.PERMISSION_DENIED, DENIED_MESSAGE)
                return behavior(request, context)

            return guarded

        return _wrap_handler(handler, wrapper)


class AioInterceptor(_aio_interceptor_base()):  # type: ignore[misc]
    def __init__(self, managed: Any) -> None:
        self._managed = managed

    async def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or not self._managed.rbac_state.engine_sets:
            return handler
        import grpc

        from meshpatch.security.server import DENIED_MESSAGE

        managed = self._managed
        method = handler_call_details.method
        metadata = handler_call_details.invocation_metadata

        def wrapper(behavior: Any) -> Any:
            if inspect.isasyncgenfunction(behavior):
                async def guarded_stream(request: Any, context: Any) -> Any:
                    if _denied(managed, method, metadata, context):
                        await context.abort(grpc.StatusCode.PERMISSION_DENIED, DENIED_MESSAGE)
                    async for item in behavior(request, context):
                        yield item

                return guarded_stream

            async def guarded(request: Any, context: Any) -> Any:
                if _denied(managed, method, metadata, context):
                    await context.abort(grpc.StatusCode.PERMISSION_DENIED, DENIED_MESSAGE)
                result = behavior(request, context)
                if inspect.isawaitable(result):
                    return await result
                return result

            return guarded

        return _wrap_handler(handler, wrapper)
