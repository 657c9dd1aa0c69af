"""What the sync and asyncio mesh channels share: picking a target per RPC and
keeping one real sub-channel per endpoint (and TLS material).

Only the failure types differ between grpc and grpc.aio (a closed channel, a
call the mesh cannot place), so the subclasses supply those and their own
``grpc.Channel`` / ``grpc.aio.Channel`` surface.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict, Optional, Tuple

from meshpatch import safety

from ._common import current_agent, is_suppressed
from ._grpc_mtls import attempt_key, endpoints, open_subchannel
from ._grpc_target import MeshTarget, endpoint_target, metadata_headers, parse_target, subchannel_options

Key = Optional[Tuple[Any, ...]]  # endpoint (address, port[, tls]); None = the app's own target


def plan_channel(target: Any, site: str) -> Optional[MeshTarget]:
    """The mesh target for a new channel (resolution started in the background),
    or None to give the app its own channel."""
    try:
        parsed = parse_target(target)
        if parsed is None:
            return None
        agent = current_agent()
        if agent is None:
            return None
        agent.prefetch(parsed.host, parsed.port, "grpc")
        return parsed
    except Exception as exc:
        safety.internal_error(site, exc)
        return None


class RoutedChannelCore:
    """Per-RPC routing state of a mesh channel.  Subclasses set ``_SITE`` and
    implement ``_closed_error()``."""

    _SITE = "hooks.grpc"
    #: kind ("unary_unary", ...) → the module's multicallable class (set by each hook module)
    _MULTICALLABLES: Dict[str, Any] = {}

    # grpc.Channel / grpc.aio.Channel multicallable factories: one per-RPC router each
    def unary_unary(self, method: str, request_serializer: Any = None, response_deserializer: Any = None, *args: Any, **kwargs: Any) -> Any:
        return self._MULTICALLABLES["unary_unary"](self, "unary_unary", method, (request_serializer, response_deserializer) + args, kwargs)

    def unary_stream(self, method: str, request_serializer: Any = None, response_deserializer: Any = None, *args: Any, **kwargs: Any) -> Any:
        return self._MULTICALLABLES["unary_stream"](self, "unary_stream", method, (request_serializer, response_deserializer) + args, kwargs)

    def stream_unary(self, method: str, request_serializer: Any = None, response_deserializer: Any = None, *args: Any, **kwargs: Any) -> Any:
        return self._MULTICALLABLES["stream_unary"](self, "stream_unary", method, (request_serializer, response_deserializer) + args, kwargs)

    def stream_stream(self, method: str, request_serializer: Any = None, response_deserializer: Any = None, *args: Any, **kwargs: Any) -> Any:
        return self._MULTICALLABLES["stream_stream"](self, "stream_stream", method, (request_serializer, response_deserializer) + args, kwargs)

    def _init_core(self, passthrough: Any, mesh: MeshTarget, options: Any, factory: Callable[..., Any], tls: bool) -> None:
        self._passthrough = passthrough
        self._mesh = mesh
        self._factory = factory
        self._options = subchannel_options(options, mesh.authority, mesh.host if tls else None)
        self._subchannels: Dict[Tuple[Any, ...], Any] = {}
        self._lock = threading.Lock()
        self._closed = False

    def _closed_error(self) -> Exception:  # pragma: no cover - interface
        raise NotImplementedError

    def _start_call(self, method: str, metadata: Any) -> Any:
        """The routed call for one RPC (None = not in the mesh); lets MeshError out."""
        if is_suppressed():
            return None
        try:
            agent = current_agent()
            if agent is None:
                return None
            mesh = self._mesh
            return agent.router.start("grpc", mesh.host, mesh.port, "POST", method, metadata_headers(metadata))
        except Exception as exc:
            from meshpatch.api import MeshError

            if isinstance(exc, MeshError):
                raise
            safety.internal_error(self._SITE + ".pick", exc)
            return None

    def _route_key(self, method: str, metadata: Any) -> Key:
        """Where a call would go (connectivity questions); no attempt is made."""
        call = self._start_call(method, metadata)
        if call is None:
            return None
        call.next_endpoint(begin=False)
        return attempt_key(call)

    def _channel_for(self, key: Key) -> Any:
        if key is None:
            return self._passthrough
        channel = self._subchannels.get(key)
        if channel is not None:
            return channel
        with self._lock:
            if self._closed:
                raise self._closed_error()
            channel = self._subchannels.get(key)
            if channel is None:
                if len(key) == 3:
                    channel = open_subchannel(key, self._options, self._factory)
                else:
                    channel = self._factory(endpoint_target(*key), self._options)
                self._subchannels[key] = channel
        return channel

    def _connectivity_channel(self) -> Any:
        """The channel whose connectivity stands for this one (channel_ready_future,
        get_state): an endpoint the router would pick, else any endpoint in use,
        else the app's own target."""
        from meshpatch.api import MeshError

        try:
            key = self._route_key("/", None)
        except MeshError:
            key = None
        if key is None and self._subchannels:
            key = next(iter(self._subchannels))
        return self._channel_for(key)

    def endpoints(self) -> Tuple[Tuple[str, int], ...]:
        """Endpoints this channel has sub-channels to (status output, tests)."""
        return endpoints(list(self._subchannels))


class DispatchCore:
    """Per (channel, method) state shared by the sync and aio multicallables: the
    real multicallable for each endpoint, cached so the hot path is one pick and
    one dict lookup."""

    __slots__ = ("_channel", "_kind", "_method", "_args", "_kwargs", "_calls")

    def __init__(self, channel: Any, kind: str, method: str, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        self._channel = channel
        self._kind = kind
        self._method = method
        self._args = args
        self._kwargs = kwargs
        self._calls: Dict[Key, Any] = {}

    def _callable(self, key: Key) -> Any:
        call = self._calls.get(key)
        if call is None:
            channel = self._channel._channel_for(key)
            call = getattr(channel, self._kind)(self._method, *self._args, **self._kwargs)
            self._calls[key] = call
        return call
