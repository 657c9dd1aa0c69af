"""The load-balancing tree for one cluster, modelled on gRPC's xDS policies.

``priority`` (lowest priority that has a usable endpoint) → ``weighted
localities`` (random pick proportional to locality weight, like gRPC's
weighted_target) → ``round robin`` inside a locality.  Pickers are immutable
and rebuilt on every EDS/registry update; picking takes no lock: the round
robin cursor is an ``itertools.count`` whose ``next`` is atomic under the GIL.
"""

from __future__ import annotations

import bisect
import itertools
import random
from typing import Container, Iterable, List, Optional, Sequence, Tuple

from meshpatch.routing.model import HEALTHY_STATES, Endpoint, EndpointsConfig, LocalityEndpoints


class Picker:
    """Base: ``pick()`` returns an endpoint or None when nothing is usable.

    ``request_hash`` is the route's hash-policy value for hashing policies
    (ring hash, maglev; None = no hash → random); ``exclude`` holds
    ``(address, port)`` of endpoints already tried by this call, avoided while
    another endpoint is available (retries never hit the same host twice).
    """

    __slots__ = ()

    def pick(self, request_hash: Optional[int] = None, exclude: Optional[Container] = None) -> Optional[Endpoint]:  # pragma: no cover
        raise NotImplementedError

    @property
    def endpoints(self) -> Tuple[Endpoint, ...]:  # pragma: no cover - interface
        raise NotImplementedError


class EmptyPicker(Picker):
    __slots__ = ("reason",)

    def __init__(self, reason: str = "no endpoints") -> None:
        self.reason = reason

    def pick(self, request_hash: Optional[int] = None, exclude: Optional[Container] = None) -> Optional[Endpoint]:
        return None

    @property
    def endpoints(self) -> Tuple[Endpoint, ...]:
        return ()


class RoundRobin(Picker):
    """Plain round robin (gRPC's RR ignores endpoint weights); starts at a random
    index so that many clients don't march over the endpoints in lock-step."""

    __slots__ = ("_endpoints", "_n", "_cursor")

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self._endpoints = tuple(endpoints)
        self._n = len(self._endpoints)
        self._cursor = itertools.count(random.randrange(self._n) if self._n else 0)

    def pick(self, request_hash: Optional[int] = None, exclude: Optional[Container] = None) -> Optional[Endpoint]:
        endpoint = self._endpoints[next(self._cursor) % self._n]
        if exclude and (endpoint.address, endpoint.port) in exclude:
            for _ in range(self._n - 1):
                candidate = self._endpoints[next(self._cursor) % self._n]
                if (candidate.address, candidate.port) not in exclude:
                    return candidate
        return endpoint

    @property
    def endpoints(self) -> Tuple[Endpoint, ...]:
        return self._endpoints


class WeightedRandom(Picker):
    """Chooses a child picker with probability proportional to its weight."""

    __slots__ = ("_children", "_cumulative", "_total", "_random")

    def __init__(self, children: Sequence[Tuple[int, Picker]]) -> None:
        self._children = tuple(child for _, child in children)
        running = 0
        cumulative: List[int] = []
        for weight, _ in children:
            running += weight
            cumulative.append(running)
        self._cumulative = cumulative
        self._total = running
        self._random = random.random

    def pick(self, request_hash: Optional[int] = None, exclude: Optional[Container] = None) -> Optional[Endpoint]:
        index = bisect.bisect_right(self._cumulative, self._random() * self._total)
        endpoint = self._children[index].pick(request_hash, exclude)
        if exclude and endpoint is not None and (endpoint.address, endpoint.port) in exclude:
            for child in self._children:  # another locality may still have an untried endpoint
                other = child.pick(request_hash, exclude)
                if other is not None and (other.address, other.port) not in exclude:
                    return other
        return endpoint

    @property
    def endpoints(self) -> Tuple[Endpoint, ...]:
        return tuple(ep for child in self._children for ep in child.endpoints)


def usable(endpoints: Iterable[Endpoint]) -> List[Endpoint]:
    """gRPC sends only to HEALTHY or UNKNOWN endpoints."""
    return [ep for ep in endpoints if ep.health in HEALTHY_STATES]


def _locality_picker(localities: Sequence[LocalityEndpoints]) -> Optional[Picker]:
    ready = [(loc, usable(loc.endpoints)) for loc in localities]
    ready = [(loc, eps) for loc, eps in ready if eps]
    if not ready:
        return None
    # Locality weights apply when the control plane set them (istiod always
    # does); a zero-weight locality is then skipped, as gRPC's weighted_target
    # does.  With no weights at all, localities share traffic equally.
    if any(loc.weight for loc, _ in ready):
        ready = [(loc, eps) for loc, eps in ready if loc.weight > 0]
        if not ready:
            return None
        weights = [loc.weight for loc, _ in ready]
    else:
        weights = [1] * len(ready)
    if len(ready) == 1:
        return RoundRobin(ready[0][1])
    return WeightedRandom([(w, RoundRobin(eps)) for w, (_, eps) in zip(weights, ready)])


def build_picker(config: Optional[EndpointsConfig]) -> Picker:
    """Lowest priority with a usable endpoint wins (no overprovisioning, as in gRPC)."""
    if config is None:
        return EmptyPicker("endpoints not received yet")
    by_priority: dict = {}
    for loc in config.localities:
        by_priority.setdefault(loc.priority, []).append(loc)
    for priority in sorted(by_priority):
        picker = _locality_picker(by_priority[priority])
        if picker is not None:
            return picker
    return EmptyPicker("no healthy endpoints")
