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
