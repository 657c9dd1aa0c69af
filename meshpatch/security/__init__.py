"""Istio-style workload security for the calls meshpatch routes and the gRPC servers it manages.

* :mod:`.model` — the decoded TLS settings (immutable, hashable by value);
* :mod:`.providers` — the bootstrap's ``certificate_providers`` (``file_watcher``),
  re-read on their refresh interval and when the files change;
* :mod:`.san` — SAN matching (``match_subject_alt_names``) on a peer certificate;
* :mod:`.client_tls` — per (cluster TLS config, certificate generation) client
  material: an :class:`ssl.SSLContext` that checks SPIFFE SANs itself;
* :mod:`.local_xds` — an in-process xDS server that hands grpc-core its own
  security config (xds credentials) for mTLS sub-channels and managed servers;
* :mod:`.rbac` — the RBAC engine (gRPC A41 semantics) and its counters;
* :mod:`.server` — managed ``grpc.server`` / ``grpc.aio.server`` ports.

Nothing here is imported at interpreter start.
"""

from typing import Any


def of_pick(pick: Any) -> Any:
    """The :class:`~.client_tls.ClientTls` for a picked endpoint's cluster, or
    None (plaintext).  ``pick``: a :class:`~meshpatch.api.Pick` or the routed
    :class:`~meshpatch.routing.call.Call` (both carry the cluster's ``handle``).
    Lives here, not in :mod:`.client_tls`, so the hooks can call it directly on
    every attempt without importing ssl material first."""
    handle = pick.handle
    config = handle.config if handle is not None else None
    tls = config.tls if config is not None else None
    if tls is None:
        return None
    from meshpatch.security.client_tls import client_tls

    return client_tls(tls)


def status() -> dict:
    """Certificate providers (generations, reloads, errors), managed gRPC server
    ports (mesh state, bound mode, restart-needed) and RBAC counters — for
    status output and telemetry.  Imports nothing that is not loaded yet."""
    import sys

    out: dict = {}
    providers = sys.modules.get("meshpatch.security.providers")
    if providers is not None:
        out["certificate_providers"] = providers.status()  # type: ignore[attr-defined]
    server = sys.modules.get("meshpatch.security.server")
    if server is not None:
        out["servers"] = server.status()  # type: ignore[attr-defined]
    rbac = sys.modules.get("meshpatch.security.rbac")
    if rbac is not None:
        out["rbac"] = rbac.COUNTERS.snapshot()  # type: ignore[attr-defined]
    local = sys.modules.get("meshpatch.security.local_xds")
    if local is not None and local._local is not None:  # type: ignore[attr-defined]
        out["local_xds"] = {"streams_opened": local._local.streams_opened, "nacks": dict(local._local.nacks)}  # type: ignore[attr-defined]
    return out
