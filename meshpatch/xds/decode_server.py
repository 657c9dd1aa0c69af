"""Decode server-side (inbound) Listeners: gRPC A36 / A29 / A41 validation.

An inbound listener (``xds.istio.io/grpc/lds/inbound/IP:port``) has no
api_listener; it has filter chains, each with an optional
DownstreamTlsContext and exactly one network filter, an
HttpConnectionManager whose HTTP filters may include RBAC filters and must end
with the router, and whose routes (inline or RDS) end in
``non_forwarding_action``.  Whatever gRPC NACKs we NACK: listener_filters,
use_original_dst, unknown non-optional HTTP filters, RBAC with CEL conditions
or ``grpc-`` header matchers, TLS that names unknown certificate providers.

The decoded :class:`ServerListener` keeps the listener as received (``raw``):
meshpatch hands it on to grpc-core (minus RBAC, which meshpatch enforces and
counts itself) rather than re-encoding what it understood.
"""

from __future__ import annotations

import ipaddress
from typing import Any, List, Optional, Tuple

from meshpatch.routing.matchers import HeaderMatcher, StringMatcher, compile_regex
from meshpatch.security import rbac
from meshpatch.security.model import DownstreamTls
from meshpatch.xds.decode_tls import downstream_tls

ROUTER_FILTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
RBAC_FILTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
#: HTTP filter types a gRPC server accepts without acting on them.
_IGNORED_SERVER_FILTERS = {
    "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",  # client-side only in gRPC
}


class FilterChain:
    __slots__ = ("name", "destination_port", "tls", "rbac", "rds_name", "routes_ok")

    def __init__(self, name: str, destination_port: Optional[int], tls: Optional[DownstreamTls],
                 rbac_engines: Tuple[rbac.Engine, ...], rds_name: Optional[str], routes_ok: bool) -> None:
        self.name = name
        self.destination_port = destination_port
        self.tls = tls
        self.rbac = rbac_engines
        self.rds_name = rds_name
        self.routes_ok = routes_ok


class ServerListener:
    """A validated inbound listener; equal when the bytes are equal."""

    __slots__ = ("name", "address", "port", "chains", "default_chain", "raw")

    def __init__(self, name: str, address: str, port: int, chains: Tuple[FilterChain, ...],
                 default_chain: Optional[FilterChain], raw: bytes) -> None:
        self.name = name
        self.address = address
        self.port = port
        self.chains = chains
        self.default_chain = default_chain
        self.raw = raw

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ServerListener) and other.raw == self.raw and other.name == self.name

    def __hash__(self) -> int:
        return hash((self.name, self.raw))

    def chain_for(self, port: int) -> Optional[FilterChain]:
        """The filter chain a connection to ``port`` uses (A36 subset: match on destination_port)."""
        for chain in self.chains:
            if chain.destination_port in (None, port):
                return chain
        return self.default_chain

    @property
    def mtls(self) -> bool:
        chain = self.chain_for(self.port)
        return chain is not None and chain.tls is not None


def decode_server_listener(listener: Any) -> ServerListener:
    """``listener`` is an envoy Listener without api_listener; raises ValueError."""
    if listener.listener_filters:
        raise ValueError("listener_filters are not supported on a server listener (A36)")
    if listener.HasField("use_original_dst") and listener.use_original_dst.value:
        raise ValueError("use_original_dst is not supported on a server listener (A36)")
    if not listener.HasField("address") or not listener.address.HasField("socket_address"):
        raise ValueError("server listener without a socket address")
    sock = listener.address.socket_address
    chains = tuple(_filter_chain(c, i) for i, c in enumerate(listener.filter_chains))
    default = _filter_chain(listener.default_filter_chain, -1) if listener.HasField("default_filter_chain") else None
    if not chains and default is None:
        raise ValueError("server listener has no filter chains")
    return ServerListener(listener.name, sock.address, sock.port_value, chains, default,
                          listener.SerializeToString(deterministic=True))


def _filter_chain(chain: Any, index: int) -> FilterChain:
    where = f"filter chain {chain.name or index}"
    destination_port = None
    if chain.HasField("filter_chain_match"):
        match = chain.filter_chain_match
        if match.server_names or match.application_protocols:
            raise ValueError(f"{where}: server_names / application_protocols matching is not supported")
        if match.transport_protocol not in ("", "raw_buffer"):
            raise ValueError(f"{where}: transport_protocol {match.transport_protocol!r} is not supported")
        if (match.prefix_ranges or match.source_prefix_ranges or match.direct_source_prefix_ranges
                or match.source_ports or match.source_type):
            raise ValueError(f"{where}: address / source matching in filter_chain_match is not supported by meshpatch")
        if match.HasField("destination_port"):
            destination_port = match.destination_port.value
    tls = None
    if chain.HasField("transport_socket"):
        try:
            tls = downstream_tls(chain.transport_socket)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    if len(chain.filters) != 1:
        raise ValueError(f"{where}: needs exactly one network filter (the HttpConnectionManager), "
                         f"has {len(chain.filters)}")
    network = chain.filters[0]
    if network.WhichOneof("config_type") != "typed_config" or network.typed_config.type_url != HCM_TYPE:
        raise ValueError(f"{where}: the network filter is not an HttpConnectionManager")
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2

    hcm = http_connection_manager_pb2.HttpConnectionManager()
    try:
        network.typed_config.Unpack(hcm)
    except Exception as exc:
        raise ValueError(f"{where}: malformed HttpConnectionManager: {exc}") from None
    if hcm.xff_num_trusted_hops or hcm.original_ip_detection_extensions:
        raise ValueError(f"{where}: xff_num_trusted_hops / original_ip_detection_extensions are not supported (A41)")
    engines = _http_filters(hcm.http_filters, where)
    which = hcm.WhichOneof("route_specifier")
    rds_name = None
    routes_ok = True
    if which == "rds":
        if hcm.rds.config_source.WhichOneof("config_source_specifier") not in ("ads", "self"):
            raise ValueError(f"{where}: RDS config_source must be ads")
        rds_name = hcm.rds.route_config_name
    elif which == "route_config":
        routes_ok = _routes_non_forwarding(hcm.route_config)
    else:
        raise ValueError(f"{where}: HttpConnectionManager needs rds or route_config")
    return FilterChain(chain.name, destination_port, tls, engines, rds_name, routes_ok)


def _routes_non_forwarding(config: Any) -> bool:
    """Whether calls can be served: a server route must be non_forwarding (A36);
    calls matching other routes fail with UNAVAILABLE.  Istio sends one
    catch-all non-forwarding route; anything else is served as "all calls fail"."""
    for vhost in config.virtual_hosts:
        for route in vhost.routes:
            if route.WhichOneof("action") != "non_forwarding_action":
                return False
    return bool(config.virtual_hosts)


def _http_filters(filters: Any, where: str) -> Tuple[rbac.Engine, ...]:
    if not filters:
        raise ValueError(f"{where}: no HTTP filters (the router must be last)")
    engines: List[rbac.Engine] = []
    for index, http_filter in enumerate(filters):
        type_url = http_filter.typed_config.type_url if http_filter.HasField("typed_config") else ""
        last = index == len(filters) - 1
        if type_url == ROUTER_FILTER_TYPE:
            if not last:
                raise ValueError(f"{where}: the router filter must be the last HTTP filter")
            continue
        if last:
            raise ValueError(f"{where}: the last HTTP filter must be the router")
        if type_url == RBAC_FILTER_TYPE:
            engine = _rbac_engine(http_filter, where)
            if engine is not None:
                engines.append(engine)
        elif type_url in _IGNORED_SERVER_FILTERS or http_filter.is_optional:
            continue
        else:
            raise ValueError(f"{where}: HTTP filter {http_filter.name!r} ({type_url.rsplit('.', 1)[-1] or 'no config'}) "
                             f"is not supported on servers")
    return tuple(engines)


def _rbac_engine(http_filter: Any, where: str) -> Optional[rbac.Engine]:
    from envoy.config.rbac.v3 import rbac_pb2 as config_pb2
    from envoy.extensions.filters.http.rbac.v3 import rbac_pb2

    message = rbac_pb2.RBAC()
    try:
        http_filter.typed_config.Unpack(message)
    except Exception as exc:
        raise ValueError(f"{where}: malformed RBAC filter {http_filter.name!r}: {exc}") from None
    if message.HasField("matcher"):
        raise ValueError(f"{where}: RBAC {http_filter.name!r}: the unified matcher API is not supported")
    if not message.HasField("rules"):
        return None  # no rules: the filter allows everything
    rules = message.rules
    action = config_pb2.RBAC.Action.Name(rules.action)
    if action == "LOG":
        return None  # A41: LOG has no effect
    where = f"{where}: RBAC {http_filter.name!r}"
    policies = []
    for name in sorted(rules.policies):
        policy = rules.policies[name]
        if policy.HasField("condition") or policy.HasField("checked_condition"):
            raise ValueError(f"{where}: policy {name}: CEL conditions are not supported (A41)")
        try:
            permissions = rbac.OrMatcher([_permission(p) for p in policy.permissions])
            principals = rbac.OrMatcher([_principal(p) for p in policy.principals])
        except ValueError as exc:
            raise ValueError(f"{where}: policy {name}: {exc}") from None
        policies.append(rbac.Policy(name, permissions, principals))
    return rbac.Engine(http_filter.name, action, policies, http_filter.SerializeToString(deterministic=True))


# -- permission / principal trees ----------------------------------------------------


def _string(sm: Any) -> StringMatcher:
    which = sm.WhichOneof("match_pattern")
    if which == "safe_regex":
        compile_regex(sm.safe_regex.regex)
        return StringMatcher("regex", sm.safe_regex.regex)
    if which in ("exact", "prefix", "suffix", "contains"):
        return StringMatcher(which, getattr(sm, which), sm.ignore_case)
    raise ValueError(f"string matcher {which!r} not supported")


def _header(hm: Any) -> rbac.HeaderRule:
    name = hm.name.lower()
    if not name:
        raise ValueError("header matcher without a name")
    if name.startswith("grpc-") or name == ":scheme":
        raise ValueError(f"header matcher on {hm.name!r} is not allowed (A41)")
    from meshpatch.xds.decode import _header_matcher  # the route decoder's matcher rules

    return rbac.HeaderRule(_header_matcher(hm) if name != "host" else _renamed(hm, ":authority"))


def _renamed(hm: Any, name: str) -> HeaderMatcher:
    from meshpatch.xds.decode import _header_matcher

    copy = type(hm)()
    copy.CopyFrom(hm)
    copy.name = name
    return _header_matcher(copy)


def _cidr(cidr: Any) -> Any:
    try:
        prefix = cidr.prefix_len.value if cidr.HasField("prefix_len") else None
        text = cidr.address_prefix if prefix is None else f"{cidr.address_prefix}/{prefix}"
        return ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise ValueError(f"bad CIDR range {cidr.address_prefix!r}: {exc}") from None


def _path_matcher(path_matcher: Any) -> StringMatcher:
    if path_matcher.WhichOneof("rule") != "path":
        raise ValueError("url_path needs a path StringMatcher")
    return _string(path_matcher.path)


def _permission(p: Any) -> rbac.Matcher:
    which = p.WhichOneof("rule")
    if which == "any":
        return rbac.AnyMatcher()
    if which == "and_rules":
        return rbac.AndMatcher([_permission(r) for r in p.and_rules.rules])
    if which == "or_rules":
        return rbac.OrMatcher([_permission(r) for r in p.or_rules.rules])
    if which == "not_rule":
        return rbac.NotMatcher(_permission(p.not_rule))
    if which == "header":
        return _header(p.header)
    if which == "url_path":
        return rbac.PathRule(_path_matcher(p.url_path))
    if which == "destination_ip":
        return rbac.CidrRule(_cidr(p.destination_ip), "local")
    if which == "destination_port":
        return rbac.PortRule(p.destination_port, p.destination_port + 1)
    if which == "destination_port_range":
        return rbac.PortRule(p.destination_port_range.start, p.destination_port_range.end)
    if which == "metadata":
        return rbac.NeverMatcher()
    if which == "requested_server_name":
        return rbac.StringRule(_string(p.requested_server_name), "")
    raise ValueError(f"permission {which!r} is not supported")


def _principal(p: Any) -> rbac.Matcher:
    which = p.WhichOneof("identifier")
    if which == "any":
        return rbac.AnyMatcher()
    if which == "and_ids":
        return rbac.AndMatcher([_principal(i) for i in p.and_ids.ids])
    if which == "or_ids":
        return rbac.OrMatcher([_principal(i) for i in p.or_ids.ids])
    if which == "not_id":
        return rbac.NotMatcher(_principal(p.not_id))
    if which == "authenticated":
        auth = p.authenticated
        return rbac.AuthenticatedRule(_string(auth.principal_name) if auth.HasField("principal_name") else None)
    if which in ("source_ip", "direct_remote_ip", "remote_ip"):
        return rbac.CidrRule(_cidr(getattr(p, which)), "peer")
    if which == "header":
        return _header(p.header)
    if which == "url_path":
        return rbac.PathRule(_path_matcher(p.url_path))
    if which == "metadata":
        return rbac.NeverMatcher()
    raise ValueError(f"principal {which!r} is not supported")
