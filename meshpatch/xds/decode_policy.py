"""Decode route-level policy (RouteAction extras, header mutations, fault filter
config, redirects, direct responses) into :mod:`meshpatch.routing.route_policy`.

Errors raise ``ValueError`` with a reason; the route decoder turns that into a
NACK naming the route.  Fields gRPC and Envoy accept but that change nothing for
an in-process client (stats prefixes, tracing) are ignored.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

from meshpatch.routing.matchers import StringMatcher, compile_regex
from meshpatch.routing.route_policy import (
    APPEND_IF_EXISTS_OR_ADD,
    GRPC_RETRY_ON,
    HTTP_RETRY_ON,
    NO_HEADER_OPS,
    OVERWRITE_IF_EXISTS_OR_ADD,
    DirectResponse,
    Fault,
    HashPolicy,
    HeaderOps,
    MirrorPolicy,
    QueryMatcher,
    Redirect,
    RetryPolicy,
    RoutePolicy,
)

FAULT_FILTER = "envoy.filters.http.fault"
HTTP_FAULT_TYPE = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
FILTER_CONFIG_TYPE = "type.googleapis.com/envoy.config.route.v3.FilterConfig"
_DENOMINATORS = {0: 100.0, 1: 10_000.0, 2: 1_000_000.0}
_REDIRECT_CODES = {0: 301, 1: 302, 2: 303, 3: 307, 4: 308}


def _seconds(duration: Any) -> float:
    return duration.seconds + duration.nanos / 1e9


def fraction(percent: Any) -> float:
    """A FractionalPercent as a probability."""
    denominator = _DENOMINATORS.get(percent.denominator)
    if denominator is None:
        raise ValueError("unknown FractionalPercent denominator")
    return min(percent.numerator / denominator, 1.0)


def query_matchers(match: Any) -> Tuple[QueryMatcher, ...]:
    out = []
    for qm in match.query_parameters:
        if not qm.name:
            raise ValueError("query parameter matcher without a name")
        which = qm.WhichOneof("query_parameter_match_specifier")
        if which == "string_match":
            sm = qm.string_match
            kind = sm.WhichOneof("match_pattern")
            if kind == "safe_regex":
                string = StringMatcher("regex", sm.safe_regex.regex)
            elif kind in ("exact", "prefix", "suffix", "contains"):
                string = StringMatcher(kind, getattr(sm, kind), sm.ignore_case)
            else:
                raise ValueError(f"query string matcher {kind!r} not supported")
            out.append(QueryMatcher(qm.name, string))
        else:
            out.append(QueryMatcher(qm.name, None, present=qm.present_match if which == "present_match" else True))
    return tuple(out)


def retry_policy(proto: Any) -> RetryPolicy:
    conditions = [c.strip() for c in proto.retry_on.split(",") if c.strip()]
    http = frozenset(c for c in conditions if c in HTTP_RETRY_ON)
    grpc = frozenset(GRPC_RETRY_ON[c] for c in conditions if c in GRPC_RETRY_ON)
    num = proto.num_retries.value if proto.HasField("num_retries") else 1
    base = 0.025
    maximum: Optional[float] = None
    if proto.HasField("retry_back_off"):
        backoff = proto.retry_back_off
        if not backoff.HasField("base_interval") or _seconds(backoff.base_interval) <= 0:
            raise ValueError("retry_back_off.base_interval must be set and positive")
        base = _seconds(backoff.base_interval)
        if backoff.HasField("max_interval"):
            maximum = _seconds(backoff.max_interval)
            if maximum < base:
                raise ValueError("retry_back_off.max_interval is smaller than base_interval")
    per_try = _seconds(proto.per_try_timeout) if proto.HasField("per_try_timeout") else 0.0
    return RetryPolicy(
        retry_on=http,
        grpc_codes=grpc,
        num_retries=num,
        per_try_timeout=per_try,
        base_interval=base,
        max_interval=maximum if maximum is not None else base * 10,
        retriable_status_codes=frozenset(proto.retriable_status_codes),
    )


def hash_policies(action: Any) -> Tuple[HashPolicy, ...]:
    out = []
    for hp in action.hash_policy:
        which = hp.WhichOneof("policy_specifier")
        if which == "header":
            if not hp.header.header_name:
                raise ValueError("hash policy header without a name")
            regex, substitution = None, ""
            if hp.header.HasField("regex_rewrite"):
                regex = compile_regex(hp.header.regex_rewrite.pattern.regex)
                substitution = hp.header.regex_rewrite.substitution
            out.append(HashPolicy("header", hp.header.header_name.lower(), hp.terminal, regex, substitution))
        elif which == "cookie":
            out.append(HashPolicy("cookie", hp.cookie.name, hp.terminal))
        elif which == "connection_properties":
            if hp.connection_properties.source_ip:
                out.append(HashPolicy("source_ip", "", hp.terminal))
        elif which == "query_parameter":
            out.append(HashPolicy("query", hp.query_parameter.name, hp.terminal))
        # filter_state (gRPC's io.grpc.channel_id) has no equivalent here: ignored, no hash
    return tuple(out)


def _mirrors(policies: Any) -> Tuple[MirrorPolicy, ...]:
    out = []
    for mp in policies:
        if not mp.cluster:
            continue  # cluster_header mirrors are not supported: skipped
        share = None
        if mp.HasField("runtime_fraction"):
            share = fraction(mp.runtime_fraction.default_value)
        out.append(MirrorPolicy(mp.cluster, share, not mp.disable_shadow_host_suffix_append))
    return tuple(out)


def header_ops(owner: Any) -> HeaderOps:
    """The four header-mutation fields that routes, virtual hosts and weighted clusters share."""
    if not (len(owner.request_headers_to_add) or len(owner.request_headers_to_remove)
            or len(owner.response_headers_to_add) or len(owner.response_headers_to_remove)):
        return NO_HEADER_OPS
    return HeaderOps(
        tuple(_header_value_option(o) for o in owner.request_headers_to_add),
        tuple(n.lower() for n in owner.request_headers_to_remove),
        tuple(_header_value_option(o) for o in owner.response_headers_to_add),
        tuple(n.lower() for n in owner.response_headers_to_remove),
    )


def _header_value_option(option: Any) -> Tuple[str, str, int]:
    key = option.header.key
    if not key:
        raise ValueError("header to add without a key")
    if key.startswith(":") or key.lower() == "host":
        raise ValueError(f"header {key!r} cannot be mutated")
    value = option.header.value or option.header.raw_value.decode("latin-1")
    if option.HasField("append"):
        action = APPEND_IF_EXISTS_OR_ADD if option.append.value else OVERWRITE_IF_EXISTS_OR_ADD
    else:
        action = option.append_action
    return key.lower(), value, action


def fault(typed_per_filter_config: Any) -> Optional[Fault]:
    if FAULT_FILTER not in typed_per_filter_config:
        return None
    config = typed_per_filter_config[FAULT_FILTER]
    if config.type_url == FILTER_CONFIG_TYPE:
        from envoy.config.route.v3 import route_components_pb2

        wrapper = route_components_pb2.FilterConfig()
        config.Unpack(wrapper)
        config = wrapper.config
    if config.type_url != HTTP_FAULT_TYPE:
        raise ValueError(f"{FAULT_FILTER} config has type {config.type_url!r}")
    from envoy.extensions.filters.http.fault.v3 import fault_pb2

    proto = fault_pb2.HTTPFault()
    config.Unpack(proto)
    delay, delay_share = 0.0, 0.0
    if proto.HasField("delay") and proto.delay.HasField("fixed_delay"):
        delay = _seconds(proto.delay.fixed_delay)
        delay_share = fraction(proto.delay.percentage) if proto.delay.HasField("percentage") else 0.0
    abort_http = abort_grpc = None
    abort_share = 0.0
    if proto.HasField("abort"):
        which = proto.abort.WhichOneof("error_type")
        if which == "http_status":
            if not 200 <= proto.abort.http_status < 600:
                raise ValueError(f"fault abort http_status {proto.abort.http_status} out of range")
            abort_http = proto.abort.http_status
        elif which == "grpc_status":
            abort_grpc = proto.abort.grpc_status
        if which in ("http_status", "grpc_status"):
            abort_share = fraction(proto.abort.percentage) if proto.abort.HasField("percentage") else 0.0
    max_active = proto.max_active_faults.value if proto.HasField("max_active_faults") else None
    if not delay_share and not abort_share:
        return None
    return Fault(delay, delay_share, abort_http, abort_grpc, abort_share, max_active)


def redirect(proto: Any) -> Redirect:
    scheme = "https" if proto.https_redirect else (proto.scheme_redirect or None)
    path = prefix = None
    regex, substitution = None, ""
    which = proto.WhichOneof("path_rewrite_specifier")
    if which == "path_redirect":
        path = proto.path_redirect
    elif which == "prefix_rewrite":
        prefix = proto.prefix_rewrite
    elif which == "regex_rewrite":
        regex = compile_regex(proto.regex_rewrite.pattern.regex)
        substitution = proto.regex_rewrite.substitution
    code = _REDIRECT_CODES.get(proto.response_code)
    if code is None:
        raise ValueError(f"unknown redirect response_code {proto.response_code}")
    return Redirect(scheme, proto.host_redirect or None, proto.port_redirect or None, path, prefix, regex,
                    substitution, code, proto.strip_query)


def direct_response(proto: Any) -> DirectResponse:
    if not 200 <= proto.status < 600:
        raise ValueError(f"direct_response status {proto.status} out of range")
    body = b""
    if proto.HasField("body"):
        which = proto.body.WhichOneof("specifier")
        if which == "inline_string":
            body = proto.body.inline_string.encode()
        elif which == "inline_bytes":
            body = proto.body.inline_bytes
        elif which is not None:
            raise ValueError(f"direct_response body from {which} not supported (inline only)")
    return DirectResponse(proto.status, body)


def route_policy(route: Any, vhost: Any) -> RoutePolicy:
    """Everything but matching and the cluster choice, with virtual-host defaults
    applied where Envoy applies them (retry policy, mirrors, header mutations, fault)."""
    action = route.route if route.WhichOneof("action") == "route" else None
    retry = None
    if action is not None and action.HasField("retry_policy"):
        retry = retry_policy(action.retry_policy)
    elif vhost.HasField("retry_policy"):
        retry = retry_policy(vhost.retry_policy)
    mirrors: Tuple[MirrorPolicy, ...] = ()
    cluster_ops: List[Tuple[str, HeaderOps]] = []
    prefix_rewrite = host_rewrite = None
    regex_rewrite = None
    hashes: Tuple[HashPolicy, ...] = ()
    if action is not None:
        mirrors = _mirrors(action.request_mirror_policies) or _mirrors(vhost.request_mirror_policies)
        hashes = hash_policies(action)
        prefix_rewrite = action.prefix_rewrite or None
        if action.HasField("regex_rewrite"):
            regex_rewrite = (compile_regex(action.regex_rewrite.pattern.regex), action.regex_rewrite.substitution)
        if action.WhichOneof("host_rewrite_specifier") == "host_rewrite_literal":
            host_rewrite = action.host_rewrite_literal or None
        if action.WhichOneof("cluster_specifier") == "weighted_clusters":
            for wc in action.weighted_clusters.clusters:
                ops = header_ops(wc)
                if ops:
                    cluster_ops.append((wc.name, ops))
    # Envoy's default order: most specific first, less specific levels applied after.
    ops = header_ops(route).then(header_ops(vhost))
    route_fault = fault(route.typed_per_filter_config) if len(route.typed_per_filter_config) else None
    if route_fault is None and len(vhost.typed_per_filter_config):
        route_fault = fault(vhost.typed_per_filter_config)
    which = route.WhichOneof("action")
    return RoutePolicy(
        retry=retry,
        hash_policies=hashes,
        mirrors=mirrors,
        header_ops=ops,
        prefix_rewrite=prefix_rewrite,
        regex_rewrite=regex_rewrite,
        host_rewrite=host_rewrite,
        redirect=redirect(route.redirect) if which == "redirect" else None,
        direct=direct_response(route.direct_response) if which == "direct_response" else None,
        fault=route_fault,
        query=query_matchers(route.match),
        cluster_header_ops=tuple(cluster_ops),
    )
