"""Which gRPC channel targets the hook may route, and what it sends as :authority."""

from __future__ import annotations

from typing import Optional, Tuple

import pytest

from meshpatch.hooks._grpc_target import endpoint_target, metadata_headers, parse_target, subchannel_options


@pytest.mark.parametrize(
    "target, expected",
    [
        ("reviews:9080", ("reviews", 9080, "reviews:9080")),
        ("reviews.default.svc.cluster.local:7070", ("reviews.default.svc.cluster.local", 7070,
                                                    "reviews.default.svc.cluster.local:7070")),
        ("reviews", ("reviews", None, "reviews")),  # router applies gRPC's default port 443
        ("dns:///reviews:9080", ("reviews", 9080, "reviews:9080")),
        ("dns:reviews:9080", ("reviews", 9080, "reviews:9080")),
        (b"reviews:9080", ("reviews", 9080, "reviews:9080")),
        # never mesh names: grpc keeps its own channel
        ("127.0.0.1:50051", None),
        ("10.0.0.7", None),
        ("[::1]:50051", None),
        ("localhost:50051", None),
        ("api.localhost:50051", None),
        ("unix:/tmp/grpc.sock", None),
        ("unix:///tmp/grpc.sock", None),
        ("unix-abstract:name", None),
        ("xds:///reviews:9080", None),
        ("ipv4:10.0.0.1:80,10.0.0.2:80", None),
        ("dns://8.8.8.8/reviews:9080", None),  # a pinned DNS server is the app's explicit choice
        ("passthrough:///reviews:9080", None),
        ("reviews:notaport", None),
        ("reviews:0", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_target(target: object, expected: Optional[Tuple[str, Optional[int], str]]) -> None:
    parsed = parse_target(target)
    if expected is None:
        assert parsed is None
    else:
        assert parsed is not None
        assert (parsed.host, parsed.port, parsed.authority) == expected


def test_subchannel_options_keep_the_apps_choices() -> None:
    app = [("grpc.max_receive_message_length", 1024)]
    assert subchannel_options(app, "reviews:9080", None) == app + [("grpc.default_authority", "reviews:9080")]
    assert subchannel_options(app, "reviews:9080", "reviews") == app + [
        ("grpc.default_authority", "reviews:9080"), ("grpc.ssl_target_name_override", "reviews")]
    own = [("grpc.default_authority", "mine"), ("grpc.ssl_target_name_override", "mine")]
    assert subchannel_options(own, "reviews:9080", "reviews") == own
    assert app == [("grpc.max_receive_message_length", 1024)]  # not mutated


def test_endpoint_target_and_metadata() -> None:
    assert endpoint_target("127.0.0.2", 7070) == "127.0.0.2:7070"
    assert endpoint_target("fd00::2", 7070) == "ipv6:[fd00::2]:7070"
    headers = metadata_headers((("X-Version", "v1"), ("x-version", "v2"), ("trace-bin", b"\x00")))
    assert headers == {"x-version": "v1", "trace-bin": b"\x00"}
    assert metadata_headers(None).get("x-version") is None
