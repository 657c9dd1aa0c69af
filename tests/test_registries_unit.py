"""Registry pieces without servers: configuration, the registries' own formats
(Dubbo provider URLs, go-zero/Kratos keys, Consul and Nacos answers), names,
and the merge with xDS endpoints (table-driven, README "Registries")."""

from __future__ import annotations

import collections
import threading
from typing import Any, Dict, List

import pytest

from meshpatch.config import ConfigError, Settings
from meshpatch.registries import available_sources, build_catalog
from meshpatch.registries.base import Instance, Registry
from meshpatch.registries.catalog import Catalog
from meshpatch.registries.config import RegistryURI, parse_aliases, parse_registries, split_uris
from meshpatch.registries.consul import parse_health
from meshpatch.registries.etcd import decode_kv, prefix_range_end
from meshpatch.registries.file import FileFormatError, parse_registry_yaml
from meshpatch.registries.nacos import parse_instances
from meshpatch.registries.zookeeper import decode_provider
from meshpatch.routing.lb import build_picker
from meshpatch.routing.merge import for_port, matching, merge_endpoints, parse_cluster_name, subset_selector
from meshpatch.routing.model import Endpoint, EndpointsConfig, LocalityEndpoints
from meshpatch.routing.router import Router

KNOWN = sorted(available_sources())


# --------------------------------------------------------------------------- configuration


def test_builtin_sources_are_declared_as_entry_points() -> None:
    from importlib.metadata import entry_points

    declared = {ep.name for ep in entry_points(group="meshpatch.registries")}
    assert {"file", "zookeeper", "etcd", "consul", "nacos"} <= declared


def test_uri_list_splits_only_at_a_new_scheme() -> None:
    raw = "zookeeper://10.0.0.1:2181,10.0.0.2:2181/dubbo, file:///etc/reg.yaml,nacos://n:8848?namespace=dev&group=G"
    assert split_uris(raw) == ["zookeeper://10.0.0.1:2181,10.0.0.2:2181/dubbo", "file:///etc/reg.yaml",
                               "nacos://n:8848?namespace=dev&group=G"]
    zk, file, nacos = parse_registries(raw, KNOWN)
    assert (zk.scheme, zk.hosts, zk.path) == ("zookeeper", [("10.0.0.1", 2181), ("10.0.0.2", 2181)], "/dubbo")
    assert (file.scheme, file.path) == ("file", "/etc/reg.yaml")
    assert nacos.params == {"namespace": "dev", "group": "G"} and nacos.hosts == [("n", 8848)]
    (consul,) = parse_registries("consul://agent", KNOWN)
    assert consul.hosts == [("agent", 8500)]  # the registry's own default port


@pytest.mark.parametrize("raw, fragment", [
    ("zookeeper//h:2181", "not a URI"),
    ("redis://h:6379", "unknown registry scheme 'redis'"),
    ("file://relative/path.yaml", "absolute path"),
    ("etcd://h:notaport/x", "bad host:port"),
])
def test_bad_registry_uri_is_one_clear_error(raw: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_registries(raw, KNOWN)
    assert info.value.variable == "MESHPATCH_REGISTRY"
    assert fragment in str(info.value) and "Fix:" in str(info.value)


def test_aliases() -> None:
    parsed = parse_aliases("user-service=User.default.svc.cluster.local, user-service=users ,com.example.Demo=demo")
    assert parsed == {"user-service": {"user.default.svc.cluster.local", "users"}, "com.example.Demo": {"demo"}}
    for bad in ("user-service", "=x", "svc=host:80", "svc=bad host"):
        with pytest.raises(ConfigError) as info:
            parse_aliases(bad)
        assert info.value.variable == "MESHPATCH_REGISTRY_ALIASES"


def test_bad_settings_disable_the_agent_with_the_variable_named() -> None:
    settings = Settings({"MESHPATCH_REGISTRY": "mysql://db:3306"})
    with pytest.raises(ConfigError, match="MESHPATCH_REGISTRY: unknown registry scheme 'mysql'"):
        build_catalog(settings)
    assert build_catalog(Settings({})) is None


# --------------------------------------------------------------------------- the registries' formats


def test_dubbo_provider_url_becomes_an_instance_with_labels() -> None:
    child = ("dubbo%3A%2F%2F10.0.0.5%3A20880%2Fcom.example.Demo%3Fanyhost%3Dtrue%26application%3Ddemo-provider"
             "%26group%3Dg1%26interface%3Dcom.example.Demo%26methods%3DsayHello%2CsayBye%26pid%3D42"
             "%26side%3Dprovider%26timestamp%3D1%26version%3D1.0.0%26weight%3D50")
    inst = decode_provider(child, "com.example.Demo")
    assert inst is not None
    assert (inst.service, inst.address, inst.port, inst.weight, inst.healthy) == ("com.example.Demo", "10.0.0.5", 20880, 50, True)
    assert inst.labels == {"anyhost": "true", "application": "demo-provider", "group": "g1", "interface": "com.example.Demo",
                           "side": "provider", "version": "1.0.0", "weight": "50", "protocol": "dubbo"}
    disabled = decode_provider("tri%3A%2F%2F10.0.0.6%3A50051%2Fx%3Fenabled%3Dfalse", "x")
    assert disabled is not None and not disabled.healthy and disabled.weight == 100
    assert decode_provider("not-a-url", "x") is None
    assert decode_provider("dubbo%3A%2F%2F10.0.0.5%2Fx", "x") is None  # no port


def test_etcd_layouts() -> None:
    (gozero,) = decode_kv("product.rpc/7587864068988009477", "10.0.0.7:9002")
    assert (gozero.service, gozero.address, gozero.port, gozero.labels) == ("product.rpc", "10.0.0.7", 9002, {})
    kratos = decode_kv("/microservices/helloworld/abc", '{"id":"abc","name":"helloworld","version":"v2",'
                       '"metadata":{"zone":"east"},"endpoints":["grpc://10.0.0.8:9000?isSecure=false","http://10.0.0.8:8000"]}')
    assert [(i.service, i.port, i.labels["protocol"]) for i in kratos] == [("helloworld", 9000, "grpc"), ("helloworld", 8000, "http")]
    assert kratos[0].labels == {"zone": "east", "version": "v2", "id": "abc", "protocol": "grpc"}
    assert decode_kv("config/some-flag", "true") == [] and decode_kv("/x/y", "{not json") == []
    assert prefix_range_end(b"/microservices") == b"/microservicet" and prefix_range_end(b"a\xff") == b"b"


def test_consul_health_answer() -> None:
    entries = [
        {"Node": {"Address": "10.0.0.1"}, "Service": {"Address": "", "Port": 8080, "Meta": {"version": "v1"},
                                                       "Tags": ["zone=east", "primary"], "Weights": {"Passing": 3}},
         "Checks": [{"Status": "passing"}, {"Status": "passing"}]},
        {"Node": {"Address": "10.0.0.2"}, "Service": {"Address": "10.0.0.9", "Port": 8080},
         "Checks": [{"Status": "passing"}, {"Status": "critical"}]},
    ]
    a, b = parse_health("web", entries)
    assert (a.address, a.port, a.healthy, a.weight, a.labels) == ("10.0.0.1", 8080, True, 3, {"version": "v1", "zone": "east"})
    assert (b.address, b.healthy) == ("10.0.0.9", False)  # Service.Address wins; one check not passing


def test_nacos_answers_v1_and_v3() -> None:
    v1 = {"name": "DEFAULT_GROUP@@web", "hosts": [
        {"ip": "10.0.0.1", "port": 80, "weight": 1.0, "healthy": True, "enabled": True, "clusterName": "DEFAULT", "metadata": {"version": "v1"}},
        {"ip": "10.0.0.2", "port": 80, "weight": 1.0, "healthy": True, "enabled": False, "metadata": {}},
        {"ip": "10.0.0.3", "port": 80, "weight": 0.0, "healthy": True, "enabled": True, "metadata": {}},
    ]}
    a, b, c = parse_instances("web", v1)
    assert a.labels == {"version": "v1", "cluster": "DEFAULT"} and a.healthy and a.weight == 1
    assert not b.healthy and c.weight == 0
    (d,) = parse_instances("web", {"code": 0, "message": "success", "data": [v1["hosts"][0]]})
    assert d.address == "10.0.0.1"
    with pytest.raises(ValueError):
        parse_instances("web", {"code": 20004, "message": "resource not found", "data": None})


def test_registry_file_format() -> None:
    services = parse_registry_yaml(
        "services:\n  web:\n  - {address: 10.0.0.1, port: 80, labels: {version: v1}, weight: 2}\n  - 10.0.0.2:80\n  empty: []\n")
    assert [(i.address, i.port, i.weight, i.labels) for i in services["web"]] == [
        ("10.0.0.1", 80, 2, {"version": "v1"}), ("10.0.0.2", 80, 1, {})]
    assert services["empty"] == []
    for bad in ("services: [1]", "services:\n  web: [{address: x}]", "services:\n  web: ['nohostport']", ": :"):
        with pytest.raises(FileFormatError):
            parse_registry_yaml(bad)


# --------------------------------------------------------------------------- names and merge


class StaticRegistry(Registry):
    """A source whose snapshot the test sets (the threads of real sources are
    tested against real servers elsewhere)."""

    scheme = "static"

    def __init__(self, services: Dict[str, List[Instance]]) -> None:
        super().__init__(RegistryURI("static://", "static", [], "", {}))
        self.initial = services

    def run(self) -> None:
        self.publish(self.initial)
        self._stop.wait()


def inst(service: str, address: str, port: int = 80, healthy: bool = True, weight: int = 1, source: str = "s", **labels: str) -> Instance:
    return Instance(service, address, port, labels, healthy, weight, source)


def test_catalog_names_aliases_and_kubernetes_forms() -> None:
    catalog = Catalog([], parse_aliases("com.example.Demo=demo.default.svc.cluster.local"), "default", "cluster.local")
    assert catalog.names_for_host("USER-service") == ("user-service",)
    assert catalog.names_for_host("user-service.default.svc.cluster.local") == ("user-service.default.svc.cluster.local", "user-service")
    assert catalog.names_for_host("user-service.default.svc") == ("user-service.default.svc", "user-service")
    assert catalog.names_for_host("user-service.other.svc.cluster.local") == ("user-service.other.svc.cluster.local",)
    assert catalog.names_for_host("demo.default.svc.cluster.local") == ("demo.default.svc.cluster.local", "com.example.demo", "demo")


def test_catalog_merges_sources_by_address_and_port() -> None:
    one = StaticRegistry({"web": [inst("web", "10.0.0.1", version="v1"), inst("web", "10.0.0.2")]})
    two = StaticRegistry({"Web": [inst("Web", "10.0.0.1", healthy=False, zone="east", source="t"), inst("Web", "10.0.0.3")]})
    catalog = Catalog([one, two], {}, "default")
    changes = threading.Event()
    catalog.add_listener(changes.set)
    catalog.start()
    try:
        assert catalog.wait_first_attempt(5)
        got = catalog.instances("web.default.svc.cluster.local")
        assert got is not None
        assert [(i.address, i.healthy) for i in got] == [("10.0.0.1", False), ("10.0.0.2", True), ("10.0.0.3", True)]
        assert got[0].labels == {"version": "v1", "zone": "east"} and got[0].source == "s,t"
        assert catalog.instances("other") is None and changes.is_set()
    finally:
        catalog.stop()


ROWS = [
    # (case, eds endpoints [(addr, port, health)], registry [(addr, port, healthy, labels)], subset selector, port,
    #  expected usable set)
    ("registry only", [], [("r1", 80, True, {}), ("r2", 80, True, {})], {}, 80, {"r1", "r2"}),
    ("union", [("e1", 80, 1)], [("r1", 80, True, {})], {}, 80, {"e1", "r1"}),
    ("dedupe keeps one", [("x", 80, 1)], [("x", 80, True, {})], {}, 80, {"x"}),
    ("registry unhealthy wins", [("x", 80, 1)], [("x", 80, False, {})], {}, 80, set()),
    ("eds unhealthy wins", [("x", 80, 2)], [("x", 80, True, {})], {}, 80, set()),
    ("subset selects by labels", [("e2", 80, 1)], [("r1", 80, True, {"version": "v1"}), ("r2", 80, True, {"version": "v2"})],
     {"version": "v2"}, 80, {"e2", "r2"}),
    ("port match preferred", [], [("r1", 80, True, {}), ("r1", 9090, True, {})], {}, 9090, {"r1:9090"}),
    ("no port match: all", [], [("r1", 8080, True, {}), ("r2", 8081, True, {})], {}, 80, {"r1:8080", "r2:8081"}),
]


@pytest.mark.parametrize("case, eds, registry, selector, port, usable", ROWS, ids=[r[0] for r in ROWS])
def test_merge_table(case: str, eds: list, registry: list, selector: dict, port: int, usable: set) -> None:
    eds_config = EndpointsConfig("c", (LocalityEndpoints("r/z/", 1, 0, tuple(Endpoint(a, p, h) for a, p, h in eds)),)) if eds else None
    instances = tuple(inst("svc", a, p, healthy=h, **labels) for a, p, h, labels in registry)
    joining = matching(for_port(instances, port), selector)
    merged = merge_endpoints("c", eds_config, joining, instances)
    picker = build_picker(merged)
    picked = [picker.pick() for _ in range(20)]
    names = {e.address if e.port == 80 else f"{e.address}:{e.port}" for e in picked if e is not None}
    assert names == usable
    keys = [(e.address, e.port) for loc in merged.localities for e in loc.endpoints]
    assert len(keys) == len(set(keys)), "duplicate address:port after merge"


def test_merge_labels_from_both_and_locality_weights() -> None:
    eds = EndpointsConfig("c", (
        LocalityEndpoints("a/a/", 2, 0, (Endpoint("e1", 80, 1, 1, {"istio": {"workload": "w"}}), Endpoint("e2", 80))),
        LocalityEndpoints("b/b/", 2, 0, (Endpoint("e3", 80), Endpoint("e4", 80))),
    ))
    registry = (inst("svc", "e1", version="v1"), inst("svc", "r1"), inst("svc", "r2"))
    merged = merge_endpoints("c", eds, registry, registry)
    first = merged.localities[0].endpoints[0]
    assert first.metadata["istio"] == {"workload": "w"} and first.metadata["meshpatch"]["labels"] == {"version": "v1"}
    extra = merged.localities[-1]
    assert extra.locality == "registry" and extra.weight == 2 and [e.address for e in extra.endpoints] == ["r1", "r2"]
    # each endpoint gets about the same share: 6 endpoints, weights 2+2+2 over 2+2+2 endpoints
    picker = build_picker(merged)
    counts = collections.Counter(picker.pick().address for _ in range(6000))
    assert set(counts) == {"e1", "e2", "e3", "e4", "r1", "r2"}
    assert all(800 < c < 1200 for c in counts.values()), counts


def test_subset_selection_for_istiod_and_local_control_plane() -> None:
    assert parse_cluster_name("outbound|9080|v2|reviews.default.svc.cluster.local") == ("v2", "reviews.default.svc.cluster.local", 9080)
    assert parse_cluster_name("registry|80||x") is None and parse_cluster_name("outbound|x||h") is None
    assert subset_selector("v2", None) == {"version": "v2"}  # istiod: no labels in CDS
    assert subset_selector("canary", {"track": "canary"}) == {"track": "canary"}  # local control plane sends them
    assert subset_selector("", None) == {}


def test_cluster_metadata_carries_subset_labels() -> None:
    from google.protobuf import struct_pb2

    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.config.core.v3 import config_source_pb2
    from meshpatch.controlplane.generator import _add_subset_labels
    from meshpatch.xds.decode import ResourceError, decode_cluster
    from google.protobuf import any_pb2

    def pack(message: Any) -> Any:
        packed = any_pb2.Any()
        packed.Pack(message)
        return packed

    cluster = cluster_pb2.Cluster(name="outbound|80|v2|h", type=cluster_pb2.Cluster.EDS)
    cluster.eds_cluster_config.eds_config.ads.CopyFrom(config_source_pb2.AggregatedConfigSource())
    _, config = decode_cluster(pack(cluster))
    assert config.subset_labels is None
    _add_subset_labels(cluster, {"version": "v2", "zone": "east"})
    _, config = decode_cluster(pack(cluster))
    assert config.subset_labels == (("version", "v2"), ("zone", "east"))
    bad = struct_pb2.Struct()
    bad.update({"subset_labels": {"version": 2}})
    cluster.metadata.filter_metadata["meshpatch"].CopyFrom(bad)
    with pytest.raises(ResourceError):
        decode_cluster(pack(cluster))


# --------------------------------------------------------------------------- router without xDS


def test_router_without_xds_routes_registry_hosts_and_follows_changes() -> None:
    source = StaticRegistry({"user-service": [inst("user-service", "127.0.0.2", 8080), inst("user-service", "127.0.0.3", 8080)]})
    catalog = Catalog([source], {}, "default")
    router = Router(None, 2.0, catalog.start, catalog)
    try:
        picks = collections.Counter(router.pick("http", "user-service", None, "GET", "/x").address for _ in range(10))
        assert picks == {"127.0.0.2": 5, "127.0.0.3": 5}
        pick = router.pick("http", "user-service", None, "GET", "/x")
        assert pick.port == 8080 and pick.cluster == "registry|80||user-service" and pick.authority == "user-service:80"
        assert pick.metadata["meshpatch"]["service"] == "user-service"
        assert router.pick("http", "not-registered", None, "GET", "/") is None  # not in any registry: untouched
        source.publish({"user-service": [inst("user-service", "127.0.0.3", 8080)], "new-service": [inst("new-service", "127.0.0.4", 81)]})
        assert {router.pick("http", "user-service", None, "GET", "/x").address for _ in range(4)} == {"127.0.0.3"}
        assert router.pick("http", "new-service", None, "GET", "/").address == "127.0.0.4"
        source.publish({"user-service": [inst("user-service", "127.0.0.3", 8080, healthy=False)]})
        from meshpatch.api import NoHealthyUpstream

        with pytest.raises(NoHealthyUpstream):
            router.pick("http", "user-service", None, "GET", "/x")
    finally:
        catalog.stop()


def test_registry_threads_are_internal_traffic() -> None:
    """The hooks check is_suppressed(); every source's thread sets it."""
    from meshpatch.internal import is_suppressed

    seen: List[bool] = []
    source = StaticRegistry({"a": [inst("a", "10.0.0.1")]})
    source.start(lambda _src: seen.append(is_suppressed()))
    try:
        assert source.first_attempt.wait(5)
        assert seen == [True] and not is_suppressed()
    finally:
        source.stop()
