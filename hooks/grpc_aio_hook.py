"""grpc.aio: the asyncio twin of :mod:`meshpatch.hooks.grpc_hook`.

``grpc.aio.insecure_channel``/``secure_channel`` return a :class:`MeshAioChannel`
(a real ``grpc.aio.Channel``) for mesh-able targets; each call picks an endpoint
and is handed to a real aio sub-channel for it (app options, credentials,
compression and interceptors kept, plus the logical ``:authority``/TLS name).

Known limit: the router's first call for a brand-new host may wait up to
``MESHPATCH_RESOLVE_TIMEOUT`` and that wait blocks the event loop; the
``prefetch`` at channel creation usually finishes resolution before the first
call.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Dict, Optional, Tuple

import grpc
import grpc.aio

from meshpatch import lanes, safety
from meshpatch.api import MeshError

from . import grpc_hook
from meshpatch.internal import suppressed

from ._common import is_patched, is_suppressed, mark_patched
from ._grpc_mtls import attempt_key
from ._grpc_channel import DispatchCore, RoutedChannelCore, plan_channel
from ._grpc_target import MeshTarget

_Key = Optional[Tuple[Any, ...]]


def patch(aio: Any) -> str:
    import wrapt

    if is_patched(aio):
        return "grpc.aio already patched"
    wrapt.wrap_function_wrapper(aio, "insecure_channel", _insecure_channel_wrapper)
    wrapt.wrap_function_wrapper(aio, "secure_channel", _secure_channel_wrapper)
    mark_patched(aio)
    from . import grpc_server_security

    return "grpc.aio: insecure_channel/secure_channel routed per RPC; " + grpc_server_security.patch_aio(aio)


def _plan(target: Any) -> Optional[MeshTarget]:
    return plan_channel(target, "hooks.grpc_aio.channel")


def _bind_insecure(target: Any, options: Any = None, compression: Any = None, interceptors: Any = None) -> Tuple[Any, Any, Any, Any]:
    return target, options, compression, interceptors


def _bind_secure(
    target: Any, credentials: Any, options: Any = None, compression: Any = None, interceptors: Any = None
) -> Tuple[Any, Any, Any, Any, Any]:
    return target, credentials, options, compression, interceptors


def _insecure_channel_wrapper(wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    if is_suppressed():
        return wrapped(*args, **kwargs)
    target, options, compression, interceptors = _bind_insecure(*args, **kwargs)
    mesh = _plan(target)
    channel = wrapped(*args, **kwargs)
    if mesh is None:
        return channel

    def factory(endpoint: str, extra: Any, credentials: Any = None) -> Any:
        if credentials is not None:  # mesh mTLS sub-channel
            with suppressed():
                return grpc.aio.secure_channel(endpoint, credentials, extra, compression, interceptors)
        return wrapped(endpoint, extra, compression, interceptors)

    return _mesh_channel(channel, mesh, options, factory, tls=False)


def _secure_channel_wrapper(wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    if is_suppressed():
        return wrapped(*args, **kwargs)
    target, credentials, options, compression, interceptors = _bind_secure(*args, **kwargs)
    mesh = _plan(target)
    channel = wrapped(*args, **kwargs)
    if mesh is None:
        return channel

    def factory(endpoint: str, extra: Any, mesh_credentials: Any = None) -> Any:
        # mesh mTLS (cluster TLS in CDS) replaces the app's own channel credentials
        return wrapped(endpoint, mesh_credentials or credentials, extra, compression, interceptors)

    return _mesh_channel(channel, mesh, options, factory, tls=True)


def _mesh_channel(channel: Any, mesh: MeshTarget, options: Any, factory: Any, tls: bool) -> Any:
    try:
        return MeshAioChannel(channel, mesh, options, factory, tls)
    except Exception as exc:
        safety.internal_error("hooks.grpc_aio.mesh_channel", exc)
        return channel


class MeshAioChannel(RoutedChannelCore, grpc.aio.Channel):
    """A real ``grpc.aio.Channel`` that routes each RPC through the mesh router."""

    _SITE = "hooks.grpc_aio"

    def __init__(self, passthrough: Any, mesh: MeshTarget, options: Any, factory: Callable[..., Any], tls: bool) -> None:
        self._init_core(passthrough, mesh, options, factory, tls)

    def __repr__(self) -> str:
        return f"<meshpatch MeshAioChannel {self._mesh.authority!r} endpoints={len(self._subchannels)}>"

    def _closed_error(self) -> Exception:
        return grpc.aio.UsageError("Channel is closed.")

    def _route(self, method: str, metadata: Any) -> _Key:
        return self._route_key(method, metadata)

    # grpc.aio.Channel ----------------------------------------------------------

    async def __aenter__(self) -> "MeshAioChannel":
        return self

    async def __aexit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        await self.close(None)

    async def close(self, grace: Optional[float] = None) -> None:
        with self._lock:
            self._closed = True
            channels = list(self._subchannels.values())
        channels.append(self._passthrough)
        await asyncio.gather(*(channel.close(grace) for channel in channels))

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._connectivity_channel().get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._connectivity_channel().wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self._connectivity_channel().channel_ready()


class _Dispatch(DispatchCore):
    __slots__ = ()

    def _attempt(self, call: Any, request: Any, kwargs: Dict[str, Any]) -> Tuple[Any, Any]:
        """Start one attempt: the real aio call."""
        call.next_endpoint()  # the attempt has begun: end it if it cannot be sent
        try:
            key = attempt_key(call)
            if not call.plain:
                limit = call.attempt_timeout()
                if limit is not None:
                    kwargs = dict(kwargs)
                    timeout = kwargs.get("timeout")
                    kwargs["timeout"] = limit if timeout is None else min(timeout, limit)
            rpc = self._callable(key)(request, **kwargs)
        except BaseException as exc:
            call.finish(grpc_hook.outcome_of(exc))
            raise
        return rpc

    def __call__(self, request: Any = None, **kwargs: Any) -> Any:
        metadata = kwargs.get("metadata")
        try:
            with_lane = lanes.outbound_grpc(metadata)
            if with_lane is not metadata:
                kwargs["metadata"] = with_lane
        except Exception as exc:
            safety.internal_error("hooks.grpc_aio.lane", exc)
        try:
            call = self._channel._start_call(self._method, kwargs.get("metadata"))  # lets MeshError out
            if call is None:
                return self._callable(None)(request, **kwargs)
            if self._kind == "unary_unary" and (call.policy.retry is not None or call.policy.fault is not None):
                return _UnaryCall(self, call, request, kwargs)
            fault = call.fault()
            if fault is not None:  # streams: abort applies; a delay cannot be applied without blocking
                fault.done()
                error = grpc_hook.fault_error(fault)
                if error is not None:
                    call.aborted(error.code().name)
                    return FailedAioCall(error.details(), error.code())
            rpc = self._attempt(call, request, kwargs)
        except MeshError as exc:
            return FailedAioCall(str(exc))
        _report_when_done(rpc, call)
        return rpc


def _report_when_done(rpc: Any, call: Any) -> None:
    def done(_: Any) -> None:
        async def finish() -> None:
            try:
                code = await rpc.code()
                details = await rpc.details() if code != grpc.StatusCode.OK else ""
                outcome = _outcome(code, details)
                call.finish(outcome)
            except Exception as exc:
                safety.internal_error("hooks.grpc_aio.report", exc)

        asyncio.ensure_future(finish())

    try:
        rpc.add_done_callback(done)
    except Exception as exc:
        safety.internal_error("hooks.grpc_aio.report", exc)


def _outcome(code: Any, details: str) -> Any:
    if code == grpc.StatusCode.OK:
        return grpc_hook.outcome_of(None)
    return grpc_hook.outcome_of(grpc_hook.MeshRpcError(details or "", code))


class _UnaryCall:
    """An aio unary call with mesh retries / fault injection: awaitable like
    grpc's UnaryUnaryCall; status methods answer for the last attempt."""

    def __init__(self, dispatch: _Dispatch, call: Any, request: Any, kwargs: Dict[str, Any]) -> None:
        self._dispatch = dispatch
        self._call = call
        self._request = request
        self._kwargs = kwargs
        self._last: Any = None
        self._task: Optional[asyncio.Future] = None
        self._error: Optional[BaseException] = None

    def _run_task(self) -> asyncio.Future:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())
        return self._task

    def __await__(self) -> Any:
        return self._run_task().__await__()

    async def _run(self) -> Any:
        call = self._call
        fault = call.fault()
        if fault is not None:
            try:
                if fault.delay:
                    await asyncio.sleep(fault.delay)
                error = grpc_hook.fault_error(fault)
                if error is not None:
                    call.aborted(error.code().name)
                    self._error = FailedAioCall(error.details(), error.code())._error()
                    raise self._error
            finally:
                fault.done()
        while True:
            try:
                rpc = self._dispatch._attempt(call, self._request, self._kwargs)
            except MeshError as exc:
                self._error = FailedAioCall(str(exc))._error()
                raise self._error from exc
            self._last = rpc
            error = None
            try:
                response = await rpc
                outcome = _outcome(grpc.StatusCode.OK, "")
            except grpc.aio.AioRpcError as exc:
                error = exc
                outcome = _outcome(exc.code(), exc.details() or "")
            except BaseException as exc:
                outcome = grpc_hook.outcome_of(exc)
                call.finish(outcome)
                raise
            delay = call.attempt_done(outcome)
            if delay is None:
                if error is not None:
                    self._error = error
                    raise error
                return response
            await asyncio.sleep(delay)

    async def _settled(self) -> None:
        try:
            await self._run_task()
        except BaseException:
            pass

    async def code(self) -> grpc.StatusCode:
        await self._settled()
        if self._last is None:
            return self._error.code() if isinstance(self._error, grpc.aio.AioRpcError) else grpc.StatusCode.UNKNOWN
        return await self._last.code()

    async def details(self) -> str:
        await self._settled()
        if self._last is None:
            return self._error.details() if isinstance(self._error, grpc.aio.AioRpcError) else ""
        return await self._last.details()

    async def initial_metadata(self) -> Any:
        await self._settled()
        return await self._last.initial_metadata() if self._last is not None else grpc.aio.Metadata()

    async def trailing_metadata(self) -> Any:
        await self._settled()
        return await self._last.trailing_metadata() if self._last is not None else grpc.aio.Metadata()

    async def debug_error_string(self) -> str:
        await self._settled()
        return await self._last.debug_error_string() if self._last is not None else ""

    async def wait_for_connection(self) -> None:
        await self._settled()

    def cancelled(self) -> bool:
        return self._task is not None and self._task.cancelled()

    def done(self) -> bool:
        return self._task is not None and self._task.done()

    def time_remaining(self) -> Optional[float]:
        return self._last.time_remaining() if self._last is not None else None

    def cancel(self) -> bool:
        if self._last is not None:
            self._last.cancel()
        return self._run_task().cancel()

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        self._run_task().add_done_callback(lambda _: callback(self))


class _UnaryUnary(_Dispatch, grpc.aio.UnaryUnaryMultiCallable):
    __slots__ = ()


class _UnaryStream(_Dispatch, grpc.aio.UnaryStreamMultiCallable):
    __slots__ = ()


class _StreamUnary(_Dispatch, grpc.aio.StreamUnaryMultiCallable):
    __slots__ = ()


class _StreamStream(_Dispatch, grpc.aio.StreamStreamMultiCallable):
    __slots__ = ()


MeshAioChannel._MULTICALLABLES = {"unary_unary": _UnaryUnary, "unary_stream": _UnaryStream,
                                  "stream_unary": _StreamUnary, "stream_stream": _StreamStream}


class FailedAioCall:
    """The call object for an RPC the mesh could not place: awaiting it, reading
    from it or iterating it raises ``AioRpcError(UNAVAILABLE)``, as a real call
    that failed to connect would."""

    def __init__(self, details: str, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        self._details = details
        self._code = code

    def _error(self) -> grpc.aio.AioRpcError:
        empty = grpc.aio.Metadata()
        return grpc.aio.AioRpcError(self._code, empty, empty, self._details, self._details)

    def __await__(self) -> Any:
        raise self._error()
        yield  # pragma: no cover  (makes this a generator)

    def __aiter__(self) -> "FailedAioCall":
        return self

    async def __anext__(self) -> Any:
        raise self._error()

    async def read(self) -> Any:
        raise self._error()

    async def write(self, request: Any) -> None:
        raise self._error()

    async def done_writing(self) -> None:
        raise self._error()

    async def wait_for_connection(self) -> None:
        raise self._error()

    async def code(self) -> grpc.StatusCode:
        return self._code

    async def details(self) -> str:
        return self._details

    async def initial_metadata(self) -> Any:
        return grpc.aio.Metadata()

    async def trailing_metadata(self) -> Any:
        return grpc.aio.Metadata()

    async def debug_error_string(self) -> str:
        return self._details

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return True

    def time_remaining(self) -> Optional[float]:
        return None

    def cancel(self) -> bool:
        return False

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        callback(self)
