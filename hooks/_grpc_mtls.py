"""mTLS sub-channels for the gRPC hooks (sync and aio).

An RPC's attempt key is ``(address, port)`` for a plaintext cluster and
``(address, port, ClientTls)`` for a cluster whose CDS carries an
UpstreamTlsContext; a new certificate generation is a new ClientTls, hence a
new sub-channel for new RPCs while RPCs on the old one finish there.  The
sub-channel itself is grpc-core's xds-credentials channel fed by
:mod:`meshpatch.security.local_xds` (SPIFFE SAN checks, file_watcher certificates).
"""

from __future__ import annotations

from typing import Any, Callable, List, Sequence, Tuple

from meshpatch.security import of_pick


def attempt_key(call: Any) -> Tuple[Any, ...]:
    """Which sub-channel a routed call's current attempt uses: its endpoint, and
    the cluster's mTLS identity when the cluster has one."""
    endpoint = call.endpoint
    mesh_tls = of_pick(call)
    if mesh_tls is None:
        return (endpoint.address, endpoint.port)
    return (endpoint.address, endpoint.port, mesh_tls)


def open_subchannel(key: Tuple[Any, ...], options: Sequence[Tuple[str, Any]],
                    factory: Callable[..., Any]) -> Any:
    """``factory(target, options, credentials)`` → the app library's secure channel."""
    from meshpatch.security import local_xds

    address, port, mesh_tls = key
    local = local_xds.get()
    target, extra = local.client_channel(address, port, mesh_tls.tls)
    merged: List[Tuple[str, Any]] = [o for o in options if not (isinstance(o, (tuple, list)) and o and o[0] == "grpc.ssl_target_name_override")]
    merged.extend(extra)
    return factory(target, merged, local_xds.channel_credentials())


def endpoints(keys: Sequence[Tuple[Any, ...]]) -> Tuple[Tuple[str, int], ...]:
    return tuple(dict.fromkeys((k[0], k[1]) for k in keys))
