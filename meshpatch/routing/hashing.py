"""Consistent-hash tables: gRPC's ring (A42) and Envoy's Maglev table.

The ring is built exactly as grpcio's C-core builds it
(``src/core/load_balancing/ring_hash/ring_hash.cc``): endpoint weights are
normalised, scaled so the lightest endpoint gets ``ceil(min_ring_size ×
share)`` entries (capped by the max ring size and gRPC's 4096 cap), and each
endpoint contributes the XXH64 (seed 0) hashes of ``"<ip:port>_<n>"`` as
running sums dictate.  Same endpoint order, weights and sizes → the very same
ring, so a request hash lands on the same endpoint in meshpatch and in grpcio.

The Maglev table follows Envoy (``source/extensions/load_balancing_policies/
maglev/maglev_lb.cc``): endpoints sorted by key, offset = XXH64(key, 0) mod M,
skip = XXH64(key, 1) mod (M − 1) + 1, filled by weighted rounds.

Both are pure functions of their inputs and are cached by the cluster, so an
ejection (which only blocks entries) never rebuilds them.
"""

from __future__ import annotations

import math
from array import array
from typing import List, Sequence, Tuple

import xxhash

_xxh64 = xxhash.xxh64_intdigest


def endpoint_hash_key(address: str, port: int, metadata: object = None) -> str:
    """gRPC's key: the ``envoy.lb`` ``hash_key`` metadata if set (A76), else ``ip:port``
    (``[ip]:port`` for IPv6), as ``grpc_sockaddr_to_string`` prints it."""
    if metadata:
        lb = metadata.get("envoy.lb") if hasattr(metadata, "get") else None  # type: ignore[union-attr]
        if isinstance(lb, dict):
            key = lb.get("hash_key")
            if isinstance(key, str) and key:
                return key
    if ":" in address:
        return f"[{address}]:{port}"
    return f"{address}:{port}"


def build_ring(keys: Sequence[str], weights: Sequence[int], min_ring_size: int, max_ring_size: int,
               cap: int) -> Tuple[List[int], array]:
    """Sorted ring hashes and, in parallel, the index of the endpoint owning each."""
    count = len(keys)
    if count == 0:
        return [], array("I")
    weights = [w if w > 0 else 1 for w in weights]
    total = sum(weights)
    normalized = [w / total for w in weights]
    min_normalized = 1.0
    for value in normalized:
        if value < min_normalized:
            min_normalized = value
    min_size = min(min_ring_size, cap)
    max_size = min(max_ring_size, cap)
    scale = min(math.ceil(min_normalized * min_size) / min_normalized, float(max_size))
    entries: List[Tuple[int, int]] = []
    current = 0.0
    target = 0.0
    for index in range(count):
        prefix = keys[index] + "_"
        target += scale * normalized[index]
        n = 0
        while current < target:
            entries.append((_xxh64((prefix + str(n)).encode()), index))
            n += 1
            current += 1
    entries.sort(key=lambda e: e[0])
    return [h for h, _ in entries], array("I", [i for _, i in entries])


def build_maglev(keys: Sequence[str], weights: Sequence[int], table_size: int) -> array:
    """Envoy's original Maglev table: slot → endpoint index (table_size must be prime)."""
    count = len(keys)
    if count == 0:
        return array("I")
    total = sum(weights)
    normalized = [w / total for w in weights]
    max_normalized = max(normalized)
    order = sorted(range(count), key=lambda i: keys[i])
    offsets = []
    skips = []
    for i in order:
        key = keys[i].encode()
        offsets.append(_xxh64(key, 0) % table_size)
        skips.append(_xxh64(key, 1) % (table_size - 1) + 1)
    table = [-1] * table_size
    nexts = [0] * count
    targets = [0.0] * count
    wts = [normalized[i] for i in order]
    filled = 0
    iteration = 1
    while filled < table_size:
        for j in range(count):
            if filled >= table_size:
                break
            if iteration * wts[j] < targets[j]:
                continue
            targets[j] += max_normalized
            offset = offsets[j]
            skip = skips[j]
            step = nexts[j]
            slot = (offset + skip * step) % table_size
            while table[slot] != -1:
                step += 1
                slot = (offset + skip * step) % table_size
            table[slot] = order[j]
            nexts[j] = step + 1
            filled += 1
        iteration += 1
    return array("I", table)
