"""grpc servers: capture the canary lane of inbound RPCs.

``grpc.server`` and ``grpc.aio.server`` are wrapped to put a server
interceptor first.  The interceptor does not set the lane itself (for sync
servers it may run on another thread than the handler); it wraps the method
handler's behaviour so the lane is current while the handler runs — the way
OTel's gRPC server instrumentation wraps behaviours.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Optional, Tuple

import grpc

from meshpatch import lanes, safety

from ._common import is_patched, mark_patched

_BEHAVIOURS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


def patch(module: Any) -> str:
    import wrapt

    details = []
    if is_patched(_Marker):
        details.append("grpc.server already patched")
    else:
        wrapt.wrap_function_wrapper(module, "server", _server_wrapper(LaneInterceptor))
        mark_patched(_Marker)
        details.append("grpc.server: inbound lanes captured")
    aio = getattr(module, "aio", None)
    if aio is not None:
        details.append(_patch_aio(aio))
    else:
        from meshpatch import _importhook

        _importhook.when_imported("grpc.aio", _patch_aio)
        details.append("grpc.aio.server: patched when imported")
    return "; ".join(details)


class _Marker:
    """Patch state of grpc.server (functions cannot carry the marker reliably)."""


class _AioMarker:
    pass


def _patch_aio(aio: Any) -> str:
    import wrapt

    if is_patched(_AioMarker):
        return "grpc.aio.server already patched"
    wrapt.wrap_function_wrapper(aio, "server", _server_wrapper(_aio_interceptor_class()))
    mark_patched(_AioMarker)
    return "grpc.aio.server: inbound lanes captured"


def _server_wrapper(interceptor_class: Any) -> Callable[..., Any]:
    def wrapper(wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        try:
            args, kwargs = _with_interceptor(args, kwargs, interceptor_class())
        except Exception as exc:
            safety.internal_error("hooks.grpc_server", exc)
        return wrapped(*args, **kwargs)

    return wrapper


def _with_interceptor(args: Tuple[Any, ...], kwargs: Dict[str, Any], ours: Any) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
    # grpc.server(thread_pool, handlers=None, interceptors=None, ...);
    # grpc.aio.server(migration_thread_pool=None, handlers=None, interceptors=None, ...)
    if len(args) >= 3:
        existing = args[2]
        return args[:2] + ([ours, *(existing or ())],) + args[3:], kwargs
    kwargs = dict(kwargs)
    kwargs["interceptors"] = [ours, *(kwargs.get("interceptors") or ())]
    return args, kwargs


def _metadata_lookup(metadata: Any) -> Callable[[str], Any]:
    def get(name: str) -> Any:
        for item in metadata or ():
            if item[0] == name:
                return item[1]
        return None

    return get


def _lane_of(details: Any) -> Optional[str]:
    try:
        return lanes.inbound_lane(_metadata_lookup(details.invocation_metadata))
    except Exception as exc:
        safety.internal_error("hooks.grpc_server.lane", exc)
        return None


def _in_lane(fn: Callable[..., Any], lane: str) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(fn):
        async def agen(request: Any, context: Any) -> Any:
            token = lanes.enter(lane)
            try:
                async for item in fn(request, context):
                    yield item
            finally:
                lanes.leave(token)

        return agen
    if inspect.iscoroutinefunction(fn):
        async def coro(request: Any, context: Any) -> Any:
            token = lanes.enter(lane)
            try:
                return await fn(request, context)
            finally:
                lanes.leave(token)

        return coro

    def sync(request: Any, context: Any) -> Any:
        token = lanes.enter(lane)
        try:
            result = fn(request, context)
        except BaseException:
            lanes.leave(token)
            raise
        if inspect.isgenerator(result):  # a streaming response: keep the lane while it is produced
            lanes.leave(token)
            return _generate_in_lane(result, lane)
        lanes.leave(token)
        return result

    return sync


def _generate_in_lane(generator: Any, lane: str) -> Any:
    while True:
        token = lanes.enter(lane)
        try:
            item = next(generator)
        except StopIteration:
            return
        finally:
            lanes.leave(token)
        yield item


def _handler_in_lane(handler: Any, lane: str) -> Any:
    changes = {}
    for name in _BEHAVIOURS:
        fn = getattr(handler, name, None)
        if fn is not None:
            changes[name] = _in_lane(fn, lane)
    if not changes:
        return handler
    replace = getattr(handler, "_replace", None)
    if replace is not None:  # grpc's RpcMethodHandler is a namedtuple
        return replace(**changes)
    return handler


class LaneInterceptor(grpc.ServerInterceptor):
    def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        lane = _lane_of(handler_call_details)
        if lane is None:
            return handler
        try:
            return _handler_in_lane(handler, lane)
        except Exception as exc:
            safety.internal_error("hooks.grpc_server.handler", exc)
            return handler


def _aio_interceptor_class() -> Any:
    import grpc.aio

    class AioLaneInterceptor(grpc.aio.ServerInterceptor):
        async def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
            handler = await continuation(handler_call_details)
            if handler is None:
                return None
            lane = _lane_of(handler_call_details)
            if lane is None:
                return handler
            try:
                return _handler_in_lane(handler, lane)
            except Exception as exc:
                safety.internal_error("hooks.grpc_server.aio_handler", exc)
                return handler

    return AioLaneInterceptor
