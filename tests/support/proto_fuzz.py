"""Hypothesis strategies for hostile xDS: random protobuf messages of any type,
built by walking the message descriptors, plus the Any wrappers around them.

What they cover: every field of Listener / RouteConfiguration / Cluster /
ClusterLoadAssignment (and of the typed configs inside: HCM, filters, route
actions) set to random values of the right wire type, enum numbers that do not
exist, strings full of regex syntax, Any fields holding the wrong message or
random bytes, and unknown filter / resource type URLs.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from google.protobuf import any_pb2, descriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.service.discovery.v3 import discovery_pb2

FD = descriptor.FieldDescriptor

#: Messages an Any field may carry (right, wrong and unknown to meshpatch).
ANY_CANDIDATES: List[type] = [
    hcm_pb2.HttpConnectionManager, router_pb2.Router, fault_pb2.HTTPFault, rbac_pb2.RBAC,
    listener_pb2.Listener, route_pb2.RouteConfiguration, cluster_pb2.Cluster, endpoint_pb2.ClusterLoadAssignment,
]

REGEXISH = st.text(alphabet="ab/.*+?()[]{}|^$\\d-,:", max_size=24)
NAMES = st.sampled_from(["echo:80", "outbound|80||echo", "c1", "*", "", "echo", "x" * 300]) | st.text(max_size=12)

_INT_RANGES = {
    FD.TYPE_INT32: (-(2 ** 31), 2 ** 31 - 1), FD.TYPE_SINT32: (-(2 ** 31), 2 ** 31 - 1),
    FD.TYPE_SFIXED32: (-(2 ** 31), 2 ** 31 - 1), FD.TYPE_UINT32: (0, 2 ** 32 - 1), FD.TYPE_FIXED32: (0, 2 ** 32 - 1),
    FD.TYPE_INT64: (-(2 ** 63), 2 ** 63 - 1), FD.TYPE_SINT64: (-(2 ** 63), 2 ** 63 - 1),
    FD.TYPE_SFIXED64: (-(2 ** 63), 2 ** 63 - 1), FD.TYPE_UINT64: (0, 2 ** 64 - 1), FD.TYPE_FIXED64: (0, 2 ** 64 - 1),
}


def _scalar(field: Any) -> st.SearchStrategy:
    t = field.type
    if t in _INT_RANGES:
        low, high = _INT_RANGES[t]
        return st.integers(low, high) | st.sampled_from([0, 1, 80, 65535, 65536])
    if t == FD.TYPE_BOOL:
        return st.booleans()
    if t in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
        return st.floats(allow_nan=True, width=32 if t == FD.TYPE_FLOAT else 64)
    if t == FD.TYPE_STRING:
        if "regex" in field.name or field.name in ("prefix", "path", "exact", "suffix", "contains"):
            return REGEXISH
        if field.name in ("name", "cluster", "cluster_name", "route_config_name", "service_name"):
            return NAMES
        return st.text(max_size=16)
    if t == FD.TYPE_BYTES:
        return st.binary(max_size=32)
    if t == FD.TYPE_ENUM:
        numbers = [v.number for v in field.enum_type.values]
        return st.sampled_from(numbers) | st.integers(-5, 1000)  # open enums keep unknown numbers
    raise AssertionError(f"unhandled field type {t}")


@st.composite
def any_message(draw: Any, depth: int) -> any_pb2.Any:
    """An Any holding a random message of a random type, random bytes, or an unknown type."""
    kind = draw(st.integers(0, 9))
    packed = any_pb2.Any()
    if kind == 0:
        packed.type_url = draw(st.sampled_from(["type.googleapis.com/not.a.Type", "", "garbage"]))
        packed.value = draw(st.binary(max_size=40))
        return packed
    cls = draw(st.sampled_from(ANY_CANDIDATES))
    if kind == 1:
        packed.type_url = "type.googleapis.com/" + cls.DESCRIPTOR.full_name
        packed.value = draw(st.binary(max_size=40))  # right type, random bytes
        return packed
    packed.Pack(draw(message(cls, depth)))
    return packed


@st.composite
def message(draw: Any, cls: type, depth: int = 3) -> Message:
    """A ``cls`` message with a random subset of its fields set, ``depth`` levels deep."""
    msg = cls()
    fields = list(cls.DESCRIPTOR.fields)
    chosen = draw(st.lists(st.sampled_from(fields), max_size=min(len(fields), 6), unique_by=lambda f: f.number)) if fields else []
    for field in chosen:
        try:
            _fill(draw, msg, field, depth)
        except (ValueError, TypeError):  # a value the runtime refuses (e.g. a surrogate in a string)
            msg.ClearField(field.name)
    return msg


def _fill(draw: Any, msg: Message, field: Any, depth: int) -> None:
    is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
    if field.type == FD.TYPE_MESSAGE:
        if depth <= 0 or is_map:
            return
        sub_cls = _message_class(field.message_type)
        make = (lambda: draw(any_message(depth - 1))) if field.message_type.full_name == "google.protobuf.Any" \
            else (lambda: draw(message(sub_cls, depth - 1)))
        if _repeated(field):
            for _ in range(draw(st.integers(0, 3))):
                getattr(msg, field.name).add().CopyFrom(make())
        else:
            getattr(msg, field.name).CopyFrom(make())
        return
    if _repeated(field):
        getattr(msg, field.name).extend(draw(st.lists(_scalar(field), max_size=3)))
    else:
        setattr(msg, field.name, draw(_scalar(field)))


def _repeated(field: Any) -> bool:
    return getattr(field, "is_repeated", None) if hasattr(field, "is_repeated") else field.label == FD.LABEL_REPEATED


_CLASSES: Dict[str, type] = {}


def _message_class(desc: Any) -> type:
    cls = _CLASSES.get(desc.full_name)
    if cls is None:
        from google.protobuf import message_factory

        cls = _CLASSES[desc.full_name] = message_factory.GetMessageClass(desc)
    return cls


RESOURCE_CLASSES = {
    "type.googleapis.com/envoy.config.listener.v3.Listener": listener_pb2.Listener,
    "type.googleapis.com/envoy.config.route.v3.RouteConfiguration": route_pb2.RouteConfiguration,
    "type.googleapis.com/envoy.config.cluster.v3.Cluster": cluster_pb2.Cluster,
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment": endpoint_pb2.ClusterLoadAssignment,
}


@st.composite
def resource(draw: Any, type_url: str, depth: int = 3, reserved: Optional[set] = None) -> any_pb2.Any:
    """One resource for a ``type_url`` response: usually that type (random
    content), sometimes another type, random bytes, or a Resource wrapper."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        # Any message, often a resource type: it must keep off reserved names too.
        return protect(draw(any_message(depth)), reserved)
    msg = draw(message(RESOURCE_CLASSES[type_url], depth))
    _rename(msg, reserved)
    packed = any_pb2.Any()
    packed.Pack(msg)
    if kind == 1:
        wrapper = discovery_pb2.Resource(name="w", version="1")
        wrapper.resource.CopyFrom(packed)
        packed = any_pb2.Any()
        packed.Pack(wrapper)
    return packed


def _rename(msg: Message, reserved: Optional[set]) -> None:
    if reserved:
        for attr in ("name", "cluster_name"):
            if hasattr(msg, attr) and getattr(msg, attr) in reserved:
                setattr(msg, attr, getattr(msg, attr) + "-fuzz")


def protect(packed: any_pb2.Any, reserved: Optional[set]) -> any_pb2.Any:
    """``packed`` with a reserved resource name renamed, whatever resource type it
    holds.  A hostile resource must never carry the name of a resource of the
    good config: if it also happened to be valid it would be a legitimate
    replacement (a RouteConfiguration holding just that name is one: no virtual
    hosts, nothing routes), and the client would rightly apply it."""
    cls = RESOURCE_CLASSES.get(packed.type_url)
    if not reserved or cls is None:
        return packed
    msg = cls()
    try:
        if not packed.Unpack(msg):
            return packed
    except Exception:  # random bytes under a resource type: undecodable, so never valid
        return packed
    if not any(getattr(msg, attr, None) in reserved for attr in ("name", "cluster_name")):
        return packed
    _rename(msg, reserved)
    out = any_pb2.Any()
    out.Pack(msg)
    return out


def _submessages(msg: Message) -> List[Message]:
    """``msg`` and every message reachable through its set fields (not into Anys)."""
    out = [msg]
    for field, value in msg.ListFields():
        if field.type != FD.TYPE_MESSAGE or (field.message_type.GetOptions().map_entry):
            continue
        values = value if _repeated(field) else [value]
        for sub in values:
            out.extend(_submessages(sub))
    return out


@st.composite
def mutated(draw: Any, seed: Message, max_mutations: int = 4) -> Message:
    """A copy of a valid ``seed`` with a few random fields anywhere in it set to
    random values or cleared: reaches deep fields (a route's regex, a weighted
    cluster's weight, an endpoint's port) that random messages rarely build."""
    msg = type(seed)()
    msg.CopyFrom(seed)
    for _ in range(draw(st.integers(0, max_mutations))):
        target = draw(st.sampled_from(_submessages(msg)))
        fields = list(target.DESCRIPTOR.fields)
        if not fields:
            continue
        field = draw(st.sampled_from(fields))
        if draw(st.integers(0, 4)) == 0:
            target.ClearField(field.name)
            continue
        try:
            _fill(draw, target, field, 1)
        except (ValueError, TypeError):
            target.ClearField(field.name)
    return msg


_SEEDS: Dict[str, Message] = {}


def seed_resources() -> Dict[str, Message]:
    """Valid resources of each type, in Istio's shapes, to mutate from (built once;
    callers copy before changing them)."""
    if _SEEDS:
        return _SEEDS
    from tests.support import xds_resources as res

    routes = [
        res.route("/api", cluster="c1", headers={"x-v": "1"}),
        res.route(regex="/v[0-9]+/.*", weighted=[("c1", 20), ("c2", 80)]),
        res.route(path="/exact", cluster="c2"),
        res.route("/", cluster="c1"),
    ]
    rc = res.route_config("outbound|80||echo", [("echo:80", ["echo", "echo:80"], routes)])
    listener = res.listener("echo:80", "outbound|80||echo")
    hcm = hcm_pb2.HttpConnectionManager()
    listener.api_listener.api_listener.Unpack(hcm)
    _SEEDS.update({"listener": listener, "hcm": hcm, "route_config": rc, "cluster": res.cluster("c1"),
                   "cla": res.cla("c1", [("127.0.0.2", 8080), ("127.0.0.3", 8080)])})
    return _SEEDS


@st.composite
def hostile_resource(draw: Any, type_url: str, reserved: Optional[set] = None) -> any_pb2.Any:
    """Half the time a mutated valid resource (deep damage), else a random one (broad damage)."""
    if draw(st.booleans()):
        return draw(resource(type_url, reserved=reserved))
    seeds = seed_resources()
    if type_url.endswith("Listener"):
        hcm = draw(mutated(seeds["hcm"]))
        if draw(st.integers(0, 3)) == 0:  # an extra filter: unknown, wrong, optional or not
            extra = hcm.http_filters.add(name=draw(st.text(max_size=8)), is_optional=draw(st.booleans()))
            extra.typed_config.CopyFrom(draw(any_message(1)))
        msg = draw(mutated(seeds["listener"], 2))
        msg.api_listener.api_listener.Pack(hcm)
    elif type_url.endswith("RouteConfiguration"):
        msg = draw(mutated(seeds["route_config"], 6))
    elif type_url.endswith("Cluster"):
        msg = draw(mutated(seeds["cluster"]))
    else:
        msg = draw(mutated(seeds["cla"]))
    _rename(msg, reserved)
    packed = any_pb2.Any()
    packed.Pack(msg)
    return packed
