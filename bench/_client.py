"""Benchmark client: an ordinary app that knows nothing of meshpatch.

Usage: python bench/_client.py HTTP_URL GRPC_TARGET CALLS
Prints one JSON line: median and p90 microseconds per call for requests
(one Session, keep-alive), httpx (one Client), grpc (one channel, unary).
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import grpc
import httpx
import requests


def measure(call, calls: int) -> dict:
    for _ in range(max(50, calls // 10)):
        call()
    samples = []
    clock = time.perf_counter
    for _ in range(calls):
        start = clock()
        call()
        samples.append((clock() - start) * 1e6)
    samples.sort()
    return {"median": statistics.median(samples), "p90": samples[int(len(samples) * 0.9)]}


def main() -> None:
    url, target, calls = sys.argv[1], sys.argv[2], int(sys.argv[3])
    session = requests.Session()
    client = httpx.Client()
    channel = grpc.insecure_channel(target)
    unary = channel.unary_unary("/bench.Echo/Call", request_serializer=None, response_deserializer=None)

    def do_requests() -> None:
        response = session.get(url)
        assert response.status_code == 200

    def do_httpx() -> None:
        response = client.get(url)
        assert response.status_code == 200

    def do_grpc() -> None:
        assert unary(b"ping", timeout=5)

    out = {"requests": measure(do_requests, calls), "httpx": measure(do_httpx, calls), "grpc": measure(do_grpc, calls)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
