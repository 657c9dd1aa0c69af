"""A tiny JSON-over-HTTP GET for registry APIs (Consul, Nacos).

The standard library's http.client on purpose: the hooks patch requests, httpx
and grpc, never http.client, so a registry's own long-polls can never be
rerouted (py-consul uses a requests session and nacos-sdk-python grpcio, which
is why meshpatch does not use them).
"""

from __future__ import annotations

import http.client
import json
from typing import Any, Dict, Mapping, Optional, Tuple
from urllib.parse import urlencode


class HttpStatusError(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        super().__init__(f"HTTP {status}: {body[:200]!r}")


def get_json(
    host: str,
    port: int,
    path: str,
    params: Optional[Mapping[str, Any]] = None,
    headers: Optional[Mapping[str, str]] = None,
    timeout: float = 5.0,
) -> Tuple[Any, Dict[str, str]]:
    """GET ``path?params``; returns (decoded JSON, lower-case response headers)."""
    query = urlencode({k: v for k, v in (params or {}).items() if v is not None and v != ""})
    target = f"{path}?{query}" if query else path
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", target, headers=dict(headers or {}))
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise HttpStatusError(resp.status, body)
        return json.loads(body or b"null"), {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()
