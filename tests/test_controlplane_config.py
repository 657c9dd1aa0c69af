"""Istio YAML parsing: accepted shapes, per-resource rejection with a clear reason."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from meshpatch.controlplane import config_source
from meshpatch.controlplane.istio_config import ConfigLoadError, Duration, parse_duration, parse_yaml_text
from meshpatch.controlplane.istio_config import Reject

GOOD = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: echo}
spec:
  hosts: [echo.default.svc.cluster.local]
  addresses: [10.96.0.10]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {number: 7070, name: grpc, protocol: GRPC, targetPort: 17070}
  endpoints:
  - address: 127.0.0.2
    ports: {grpc: 5001}
    labels: {version: v1}
    locality: us-east/zone-a/rack-1
    weight: 3
---
apiVersion: networking.istio.io/v1beta1
kind: WorkloadEntry
metadata: {name: vm-1, namespace: prod}
spec: {address: 127.0.0.5, labels: {app: vm}, ports: {http: 8080}, locality: eu/z, weight: 2, serviceAccount: vm-sa}
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: echo}
spec:
  host: echo
  trafficPolicy:
    loadBalancer: {consistentHash: {httpHeaderName: x-user}}
    connectionPool: {http: {http2MaxRequests: 10}}
    outlierDetection: {consecutive5xxErrors: 3, interval: 5s}
    portLevelSettings:
    - port: {number: 7070}
      loadBalancer: {simple: ROUND_ROBIN}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo, namespace: default}
spec:
  hosts: [echo]
  http:
  - name: r1
    match:
    - name: m1
      uri: {prefix: /api}
      ignoreUriCase: true
      headers: {x-a: {exact: "1"}, x-b: {regex: "b.*"}}
      withoutHeaders: {x-c: {prefix: c}}
    route:
    - destination: {host: echo, subset: v1, port: {number: 7070}}
      weight: 100
    timeout: 1.5s
    retries: {attempts: 3, perTryTimeout: 250ms, retryOn: "unavailable,503"}
    fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 50}}}
"""


def test_all_kinds_parse_with_defaults_and_every_api_version() -> None:
    cfg = parse_yaml_text(GOOD, "good.yaml")
    assert cfg.skipped == []
    (se,) = cfg.service_entries
    assert se.meta.namespace == "default"  # metadata.namespace defaults like kubectl's
    assert se.addresses == ["10.96.0.10"] and se.resolution == "STATIC" and se.location == "MESH_INTERNAL"
    assert (se.ports[0].number, se.ports[0].name, se.ports[0].protocol, se.ports[0].target_port) == (7070, "grpc", "GRPC", 17070)
    ep = se.endpoints[0]
    assert (ep.address, ep.ports, ep.labels, ep.locality, ep.weight) == ("127.0.0.2", {"grpc": 5001}, {"version": "v1"}, "us-east/zone-a/rack-1", 3)
    (we,) = cfg.workload_entries
    assert (we.meta.namespace, we.spec.address, we.spec.service_account) == ("prod", "127.0.0.5", "vm-sa")
    (dr,) = cfg.destination_rules
    assert dr.traffic_policy.load_balancer.consistent_hash.http_header_name == "x-user"
    od = dr.traffic_policy.outlier_detection
    assert (od.consecutive_5xx_errors, od.interval, od.consecutive_gateway_errors) == (3, Duration(5), None)
    assert dr.traffic_policy.port_level_settings[0].load_balancer.simple == "ROUND_ROBIN"
    assert dr.subsets[0].traffic_policy.load_balancer.simple == "LEAST_REQUEST"
    (vs,) = cfg.virtual_services
    http = vs.http[0]
    m = http.match[0]
    assert (m.uri.kind, m.uri.value, m.ignore_uri_case) == ("prefix", "/api", True)
    assert {k: (v.kind, v.value) for k, v in m.headers.items()} == {"x-a": ("exact", "1"), "x-b": ("regex", "b.*")}
    assert m.without_headers["x-c"].kind == "prefix"
    assert http.route[0].destination.port == 7070 and http.route[0].weight == 100
    assert http.timeout == Duration(1, 500_000_000)
    assert http.retries.attempts == 3 and http.retries.per_try_timeout == Duration(0, 250_000_000)
    assert http.fault.abort.grpc_status == "UNAVAILABLE" and http.fault.abort.percentage == 50.0


@pytest.mark.parametrize(
    "doc, reason",
    [
        (
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: bad}\n"
            "spec: {hosts: [a], http: [{route: [{destination: {host: a}}], bogus: 1}]}",
            "unknown field spec.http[0].bogus",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: bad}\n"
            "spec: {hosts: [a.b], ports: [{number: '80', name: http}]}",
            "spec.ports[0].number: expected an integer",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: bad}\n"
            "spec: {hosts: [a.b], resolution: MAYBE}",
            "spec.resolution: 'MAYBE' is not one of",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: bad}\n"
            "spec: {hosts: [a], http: [{route: [{destination: {host: a}}], timeout: soon}]}",
            "spec.http[0].timeout: 'soon' is not a duration",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: bad}\n"
            "spec: {host: a, subsets: [{name: v1}, {name: v1}]}",
            "subset 'v1' is defined twice",
        ),
        (
            "apiVersion: networking.istio.io/v2\nkind: DestinationRule\nmetadata: {name: bad}\nspec: {host: a}",
            "apiVersion 'networking.istio.io/v2'",
        ),
        ("apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: bad}\nspec: {}", "unsupported kind 'Gateway'"),
        ("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {namespace: x}\nspec: {host: a}", "metadata.name is required"),
        ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: bad}\nspec: {hosts: [a], http: [{name: x}]}",
         "one of route, redirect, directResponse or delegate is required"),
    ],
)
def test_invalid_resource_is_skipped_alone_with_one_clear_log_line(doc: str, reason: str, caplog) -> None:
    good = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: ok}\nspec: {host: ok}\n"
    with caplog.at_level(logging.WARNING, logger="meshpatch.controlplane"):
        cfg = parse_yaml_text(good + "---\n" + doc + "\n---\n" + good.replace("name: ok", "name: ok2"), "mesh.yaml")
    assert [d.meta.name for d in cfg.destination_rules] == ["ok", "ok2"]
    assert len(cfg.skipped) == 1 and reason in cfg.skipped[0], cfg.skipped
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    assert "mesh.yaml (document 2)" in lines[0] and reason in lines[0], lines[0]
    kind = doc.split("kind: ")[1].split("\n")[0]
    assert f"skipped {kind} " in lines[0], lines[0]


def test_yaml_syntax_error_fails_the_whole_text() -> None:
    with pytest.raises(ConfigLoadError, match=r"broken.yaml: invalid YAML"):
        parse_yaml_text("kind: [unclosed\n", "broken.yaml")


def test_list_kind_and_empty_documents() -> None:
    text = """
---
apiVersion: v1
kind: List
items:
- apiVersion: networking.istio.io/v1
  kind: DestinationRule
  metadata: {name: a}
  spec: {host: a}
---
"""
    cfg = parse_yaml_text(text)
    assert [d.meta.name for d in cfg.destination_rules] == ["a"] and cfg.skipped == []


@pytest.mark.parametrize(
    "text, expected",
    [("1.5s", Duration(1, 500_000_000)), ("250ms", Duration(0, 250_000_000)), ("1m30s", Duration(90, 0)),
     ("0", Duration(0, 0)), ("2h", Duration(7200, 0)), ("10us", Duration(0, 10_000))],
)
def test_go_durations(text: str, expected: Duration) -> None:
    assert parse_duration(text, "t") == expected


@pytest.mark.parametrize("text", ["1", "s", "1.5", "-1s", "1d"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(Reject):
        parse_duration(text, "t")


def test_directory_source_reads_yaml_and_yml_ignores_hidden_and_other_files(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: a}\nspec: {host: a}\n")
    (tmp_path / "b.yml").write_text("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: b}\nspec: {host: b}\n")
    (tmp_path / ".tmp-c.yaml").write_text("this: [is not yaml")
    (tmp_path / "notes.txt").write_text("this: [is not yaml")
    cfg = config_source.load(str(tmp_path))
    assert [d.meta.name for d in cfg.destination_rules] == ["a", "b"]
    sig = config_source.signature(str(tmp_path))
    os.replace(tmp_path / "b.yml", tmp_path / "c.yml")
    assert config_source.signature(str(tmp_path)) != sig
    with pytest.raises(config_source.ConfigPathError, match="does not exist"):
        config_source.config_files(str(tmp_path / "missing"))
