"""grpc (sync): route every RPC, not every channel.

``grpc.insecure_channel``/``secure_channel`` are wrapped.  For a target that can
be a mesh name the app gets a :class:`MeshChannel`: a real ``grpc.Channel``
whose multicallables pick an endpoint on *each* call (path = the method, headers
= the call metadata) and dispatch to a real sub-channel to that endpoint.  Sub-
channels are cached per endpoint and made with the app's own options,
credentials and compression plus ``grpc.default_authority`` = the logical target
(and, for TLS, ``grpc.ssl_target_name_override`` = the logical host), so the
server sees the name the app used.  When the router says "not in the mesh" the
call goes to a real channel made exactly as the app asked (created eagerly so
argument errors surface where the app expects them).

``grpc.aio`` is handled by :mod:`meshpatch.hooks.grpc_aio_hook`, patched from here.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import grpc

from meshpatch import lanes, safety
from meshpatch.api import MeshError
from meshpatch.routing import outcome as oc

_GRPC_OK = oc.Outcome(oc.OK, grpc_status="OK")  # immutable in practice: shared by every successful attempt

from meshpatch.internal import suppressed

from ._common import is_patched, is_suppressed, mark_patched
from ._grpc_mtls import attempt_key
from ._grpc_channel import DispatchCore, RoutedChannelCore, plan_channel
from ._grpc_target import MeshTarget

# endpoint (address, port), plus the ClientTls for mTLS clusters; None = the app's own target
_Key = Optional[Tuple[Any, ...]]


def patch(module: Any) -> str:
    import wrapt

    details = []
    if is_patched(module):
        details.append("grpc already patched")
    else:
        wrapt.wrap_function_wrapper(module, "insecure_channel", _insecure_channel_wrapper)
        wrapt.wrap_function_wrapper(module, "secure_channel", _secure_channel_wrapper)
        mark_patched(module)
        details.append(f"grpc {getattr(module, '__version__', '?')}: insecure_channel/secure_channel routed per RPC")
        from . import grpc_server_security

        details.append(grpc_server_security.patch(module))
    aio = getattr(module, "aio", None)
    if aio is not None:
        from . import grpc_aio_hook

        details.append(grpc_aio_hook.patch(aio))
    else:
        from meshpatch import _importhook

        def _aio_hook(aio_module: Any) -> None:
            from . import grpc_aio_hook

            grpc_aio_hook.patch(aio_module)

        _importhook.when_imported("grpc.aio", _aio_hook)
        details.append("grpc.aio: patched when imported")
    return "; ".join(details)


# -- channel factories --------------------------------------------------------


def _plan(target: Any) -> Optional[MeshTarget]:
    return plan_channel(target, "hooks.grpc.channel")


def _insecure_channel_wrapper(wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    if is_suppressed():
        return wrapped(*args, **kwargs)
    target, options, compression = _bind_insecure(*args, **kwargs)
    mesh = _plan(target)
    channel = wrapped(*args, **kwargs)
    if mesh is None:
        return channel

    def factory(endpoint: str, extra: Any, credentials: Any = None) -> Any:
        if credentials is not None:  # mesh mTLS sub-channel
            with suppressed():
                return grpc.secure_channel(endpoint, credentials, extra, compression)
        return wrapped(endpoint, extra, compression)

    return _mesh_channel(channel, mesh, options, factory, tls=False)


def _secure_channel_wrapper(wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    if is_suppressed():
        return wrapped(*args, **kwargs)
    target, credentials, options, compression = _bind_secure(*args, **kwargs)
    mesh = _plan(target)
    channel = wrapped(*args, **kwargs)
    if mesh is None:
        return channel

    def factory(endpoint: str, extra: Any, mesh_credentials: Any = None) -> Any:
        # mesh mTLS (cluster TLS in CDS) replaces the app's own channel credentials
        return wrapped(endpoint, mesh_credentials or credentials, extra, compression)

    return _mesh_channel(channel, mesh, options, factory, tls=True)


def _mesh_channel(channel: Any, mesh: MeshTarget, options: Any, factory: Any, tls: bool) -> Any:
    try:
        return MeshChannel(channel, mesh, options, factory, tls)
    except Exception as exc:
        safety.internal_error("hooks.grpc.mesh_channel", exc)
        return channel


def _bind_insecure(target: Any, options: Any = None, compression: Any = None) -> Tuple[Any, Any, Any]:
    return target, options, compression


def _bind_secure(target: Any, credentials: Any, options: Any = None, compression: Any = None) -> Tuple[Any, Any, Any, Any]:
    return target, credentials, options, compression


# -- the channel ---------------------------------------------------------------


class MeshChannel(RoutedChannelCore, grpc.Channel):
    """A real ``grpc.Channel`` that routes each RPC through the mesh router."""

    _SITE = "hooks.grpc"

    def __init__(self, passthrough: Any, mesh: MeshTarget, options: Any, factory: Callable[..., Any], tls: bool) -> None:
        self._init_core(passthrough, mesh, options, factory, tls)
        self._subscriptions: Dict[Any, Any] = {}

    def __repr__(self) -> str:
        return f"<meshpatch MeshChannel {self._mesh.authority!r} endpoints={len(self._subchannels)}>"

    def _closed_error(self) -> Exception:
        return ValueError("Cannot invoke RPC on closed channel!")

    def _route(self, method: str, metadata: Any) -> _Key:
        try:
            return self._route_key(method, metadata)
        except MeshError as exc:
            raise MeshRpcError(str(exc)) from exc

    # grpc.Channel ------------------------------------------------------------

    def subscribe(self, callback: Callable[[grpc.ChannelConnectivity], None], try_to_connect: bool = False) -> None:
        channel = self._connectivity_channel()
        with self._lock:
            self._subscriptions[callback] = channel
        channel.subscribe(callback, try_to_connect=try_to_connect)

    def unsubscribe(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        with self._lock:
            channel = self._subscriptions.pop(callback, None)
        if channel is not None:
            channel.unsubscribe(callback)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            channels = list(self._subchannels.values())
        channels.append(self._passthrough)
        for channel in channels:
            channel.close()

    def __enter__(self) -> "MeshChannel":
        return self

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> bool:
        self.close()
        return False


# -- multicallables ------------------------------------------------------------


_SIGNATURE = ("timeout", "metadata", "credentials", "wait_for_ready", "compression")


def _call_kwargs(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """grpc's multicallable arguments after the request, as keywords."""
    merged = dict(zip(_SIGNATURE, args))
    merged.update(kwargs)
    return merged


def _bounded(timeout: Optional[float], limit: Optional[float]) -> Optional[float]:
    if limit is None:
        return timeout
    return limit if timeout is None else min(timeout, limit)


def outcome_of(error: Optional[BaseException]) -> Any:
    """An attempt's Outcome from its gRPC error (None = OK)."""
    if error is None:
        return _GRPC_OK
    code = getattr(error, "code", None)
    try:
        status = code() if callable(code) else None
    except Exception:
        status = None
    name = getattr(status, "name", "UNKNOWN")
    if name == "CANCELLED":
        return oc.Outcome(oc.CANCELLED, grpc_status=name)
    if name == "DEADLINE_EXCEEDED":
        return oc.Outcome(oc.TIMEOUT, grpc_status=name)
    if name == "UNAVAILABLE":
        details = ""
        try:
            details = (error.details() or "").lower()  # type: ignore[attr-defined]
        except Exception:
            pass
        if "connect" in details or "refused" in details or "no route" in details:
            return oc.Outcome(oc.CONNECT_FAILURE, grpc_status=name)
    return oc.Outcome(oc.OK, grpc_status=name)


# gRPC's HTTP-to-status mapping, for an HTTP fault abort on a gRPC route.
_HTTP_TO_GRPC = {400: "INTERNAL", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "UNIMPLEMENTED",
                 429: "UNAVAILABLE", 502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "UNAVAILABLE"}


def fault_error(fault: Any) -> Optional["MeshRpcError"]:
    """The error a fault abort raises (None when the fault only delays)."""
    if fault.abort_grpc is not None:
        code = next((c for c in grpc.StatusCode if c.value[0] == fault.abort_grpc), grpc.StatusCode.UNKNOWN)
        return MeshRpcError("fault filter abort", code)
    if fault.abort_http is not None:
        return MeshRpcError("fault filter abort", getattr(grpc.StatusCode, _HTTP_TO_GRPC.get(fault.abort_http, "UNKNOWN")))
    return None


def report_when_done(rpc: Any, call: Any) -> Any:
    """For calls that return before they end (futures, streams): report the
    outcome to the cluster when the RPC terminates."""

    def done(*_: Any) -> None:
        try:
            error = None
            code = rpc.code()
            if code is not None and code != grpc.StatusCode.OK:
                error = rpc
            outcome = outcome_of(error)
            call.finish(outcome)
        except Exception as exc:
            safety.internal_error("hooks.grpc.report", exc)

    try:
        if hasattr(rpc, "add_done_callback"):
            rpc.add_done_callback(done)
        elif not rpc.add_callback(done):
            done()
    except Exception as exc:
        safety.internal_error("hooks.grpc.report", exc)
    return rpc


class _Dispatch(DispatchCore):
    """Per (channel, method): routes each call and hands it to a real
    multicallable, cached per endpoint so the hot path is one pick and one
    dict lookup."""

    __slots__ = ()

    def _prepare(self, kwargs: Dict[str, Any]) -> Any:
        """The routed call or None (not in the mesh); applies faults.
        ``kwargs`` is this call's own dict: the lane goes into its metadata."""
        metadata = kwargs.get("metadata")
        try:
            with_lane = lanes.outbound_grpc(metadata)
            if with_lane is not metadata:
                kwargs["metadata"] = with_lane
        except Exception as exc:
            safety.internal_error("hooks.grpc.lane", exc)
        try:
            call = self._channel._start_call(self._method, kwargs.get("metadata"))
        except MeshError as exc:
            raise MeshRpcError(str(exc)) from exc
        if call is None or call.plain:  # plain: no fault, no attempt timeout (RoutePolicy.plain)
            return call
        fault = call.fault()
        if fault is not None:
            try:
                if fault.delay:
                    import time

                    time.sleep(fault.delay)
                error = fault_error(fault)
                if error is not None:
                    call.aborted(error.code().name)
                    raise error
            finally:
                fault.done()
        return call

    def _pick(self, call: Any, kwargs: Dict[str, Any]) -> Tuple[Dict[str, Any], Any]:
        """The next attempt begins: its call arguments and the real
        multicallable for its endpoint."""
        try:
            call.next_endpoint()
        except MeshError as exc:
            raise MeshRpcError(str(exc)) from exc
        try:  # the attempt has begun: end it if it cannot be sent
            key = attempt_key(call)
            target = self._callable(key)
            if not call.plain:
                limit = call.attempt_timeout()
                if limit is not None:
                    kwargs = dict(kwargs)
                    kwargs["timeout"] = _bounded(kwargs.get("timeout"), limit)
        except BaseException as exc:
            call.finish(outcome_of(exc))
            raise
        return kwargs, target

    def _blocking(self, how: str, request: Any, kwargs: Dict[str, Any], retry: bool) -> Any:
        """A blocking call: attempts with retries, as Envoy/gRPC A44 do."""
        call = self._prepare(kwargs)
        if call is None:
            target = self._callable(None)
            return target(request, **kwargs) if how == "__call__" else getattr(target, how)(request, **kwargs)
        if not retry:
            call.retries = 1 << 30
        while True:
            attempt_kwargs, target = self._pick(call, kwargs)
            error = None
            try:
                result = target(request, **attempt_kwargs) if how == "__call__" else getattr(target, how)(request, **attempt_kwargs)
            except grpc.RpcError as exc:
                error = exc
            except BaseException as exc:
                outcome = outcome_of(exc)
                call.finish(outcome)
                raise
            delay = call.attempt_done(_GRPC_OK if error is None else outcome_of(error))
            if delay is None:
                if error is not None:
                    raise error
                return result
            import time

            time.sleep(delay)

    def _started(self, request: Any, kwargs: Dict[str, Any], how: Optional[str]) -> Any:
        """A call that returns before it ends (future, stream): one attempt,
        outcome reported on termination."""
        call = self._prepare(kwargs)
        if call is None:
            target = self._callable(None)
            return target(request, **kwargs) if how is None else getattr(target, how)(request, **kwargs)
        attempt_kwargs, target = self._pick(call, kwargs)
        try:
            rpc = target(request, **attempt_kwargs) if how is None else getattr(target, how)(request, **attempt_kwargs)
        except BaseException as exc:
            outcome = outcome_of(exc)
            call.finish(outcome)
            raise
        return report_when_done(rpc, call)


class _Blocking(_Dispatch):
    """The three forms of a call with a single response (``__call__``, ``with_call``,
    ``future``); ``_RETRY`` says whether a failed attempt may be re-sent (a unary
    request can, a consumed request iterator cannot)."""

    __slots__ = ()
    _RETRY = True

    def __call__(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        return self._blocking("__call__", request, _call_kwargs(args, kwargs) if args else kwargs, retry=self._RETRY)

    def with_call(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        return self._blocking("with_call", request, _call_kwargs(args, kwargs) if args else kwargs, retry=self._RETRY)

    def future(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return self._started(request, _call_kwargs(args, kwargs), "future")
        except MeshRpcError as error:
            return error


class _Streaming(_Dispatch):
    """A call with a response stream: one attempt, outcome reported when it ends."""

    __slots__ = ()

    def __call__(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return self._started(request, _call_kwargs(args, kwargs), None)
        except MeshRpcError as error:
            return error


class _UnaryUnary(_Blocking, grpc.UnaryUnaryMultiCallable):
    __slots__ = ()


class _UnaryStream(_Streaming, grpc.UnaryStreamMultiCallable):
    __slots__ = ()


class _StreamUnary(_Blocking, grpc.StreamUnaryMultiCallable):
    __slots__ = ()
    _RETRY = False


class _StreamStream(_Streaming, grpc.StreamStreamMultiCallable):
    __slots__ = ()


MeshChannel._MULTICALLABLES = {"unary_unary": _UnaryUnary, "unary_stream": _UnaryStream,
                               "stream_unary": _StreamUnary, "stream_stream": _StreamStream}


# -- the UNAVAILABLE error for MeshError ----------------------------------------


class MeshRpcError(grpc.RpcError, grpc.Call, grpc.Future):
    """What a failed RPC looks like to the app when the mesh has no endpoint or
    no route: ``StatusCode.UNAVAILABLE`` with meshpatch's message, usable as the
    raised error, as a failed future and as a stream that fails on first read,
    like grpc's own ``_InactiveRpcError``."""

    def __init__(self, details: str, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        super().__init__(details)
        self._details = details
        self._code = code

    def __str__(self) -> str:
        return (
            f"<{type(self).__name__} of RPC that terminated with:\n"
            f"\tstatus = {self._code}\n"
            f'\tdetails = "{self._details}"\n>'
        )

    __repr__ = __str__

    # grpc.Call / RpcContext
    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def initial_metadata(self) -> Tuple[Any, ...]:
        return ()

    def trailing_metadata(self) -> Tuple[Any, ...]:
        return ()

    def debug_error_string(self) -> str:
        return self._details

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> Optional[float]:
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return False

    # grpc.Future
    def cancelled(self) -> bool:
        return False

    def running(self) -> bool:
        return False

    def done(self) -> bool:
        return True

    def result(self, timeout: Optional[float] = None) -> Any:
        raise self

    def exception(self, timeout: Optional[float] = None) -> BaseException:
        return self

    def traceback(self, timeout: Optional[float] = None) -> Any:
        return self.__traceback__

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        fn(self)

    # a response stream that fails on first read
    def __iter__(self) -> "MeshRpcError":
        return self

    def __next__(self) -> Any:
        raise self
