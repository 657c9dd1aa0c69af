"""The ``reviews`` service as Istio YAML for the local control plane: a
ServiceEntry with static endpoints, v1/v2 subsets and a weighted split.  Shared
by tests and benchmarks that need "a service with two versions and a split"."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

REVIEWS = "reviews.default.svc.cluster.local"


def reviews_entry(endpoints: Sequence[Tuple[str, Optional[int], Optional[str]]], port: int = 9080,
                  host: str = REVIEWS) -> str:
    """The ServiceEntry.  ``endpoints``: (address, target port or None for the
    service port, version label or None)."""
    lines = []
    for address, target, version in endpoints:
        labels = f"{{app: reviews, version: {version}}}" if version else "{app: reviews}"
        ports = f", ports: {{http: {target}}}" if target is not None else ""
        lines.append(f"  - {{address: {address}, labels: {labels}{ports}}}")
    eps = "\n".join(lines)
    return f"""apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [{host}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: {port}, name: http, protocol: HTTP}}]
  endpoints:
{eps}
"""


def reviews_split(endpoints: Sequence[Tuple[str, Optional[int], str]], v1_weight: int, port: int = 9080,
                  host: str = REVIEWS) -> str:
    """The ServiceEntry plus v1/v2 subsets and a VirtualService sending
    ``v1_weight`` % to v1, the rest to v2."""
    return reviews_entry(endpoints, port, host) + f"""---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: default}}
spec:
  host: {host}
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [{host}]
  http:
  - route:
    - {{destination: {{host: {host}, subset: v1}}, weight: {v1_weight}}}
    - {{destination: {{host: {host}, subset: v2}}, weight: {100 - v1_weight}}}
"""
