"""Decode ``envoy.transport_sockets.tls`` (Upstream/DownstreamTlsContext) as gRPC A29 does.

Only certificate provider instances are supported — the proxyless model where
the agent writes certificates to files the bootstrap names.  Both field
generations are read: the current ``tls_certificate_provider_instance`` /
``ca_certificate_provider_instance`` and the deprecated
``tls_certificate_certificate_provider_instance`` /
``validation_context_certificate_provider_instance`` (istiod ≥ 1.29 sends both;
older istiod only the deprecated ones); the current field wins when both are set.

Errors are ``ValueError`` with a reason; the resource decoders turn them into a
NACK.  A cluster whose TLS config cannot be honoured is refused outright — never
downgraded to plaintext.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

from meshpatch.routing.matchers import compile_regex
from meshpatch.security import providers
from meshpatch.security.model import DownstreamTls, ProviderRef, SanMatcher, UpstreamTls

TLS_SOCKET = "envoy.transport_sockets.tls"
RAW_BUFFER = "envoy.transport_sockets.raw_buffer"
_PREFIX = "type.googleapis.com/"
UPSTREAM_TLS_TYPE = _PREFIX + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
DOWNSTREAM_TLS_TYPE = _PREFIX + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
RAW_BUFFER_TYPE = _PREFIX + "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"

_SAN_TYPES = {1: "EMAIL", 2: "DNS", 3: "URI", 4: "IP"}


def _socket_context(transport_socket: Any, wanted_type: str, side: str) -> Optional[Any]:
    """The TLS context message in a transport_socket, or None for plaintext."""
    from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

    which = transport_socket.WhichOneof("config_type")
    if which is None:
        if transport_socket.name in ("", RAW_BUFFER):
            return None
        raise ValueError(f"transport_socket {transport_socket.name!r} has no typed_config")
    if which != "typed_config":
        raise ValueError(f"transport_socket config {which} not supported (need typed_config)")
    typed = transport_socket.typed_config
    if typed.type_url == RAW_BUFFER_TYPE:
        return None
    if typed.type_url != wanted_type:
        raise ValueError(f"transport_socket type {typed.type_url.rsplit('/', 1)[-1]} not supported on the {side} side "
                         f"(need {wanted_type.rsplit('.', 1)[-1]})")
    message = tls_pb2.UpstreamTlsContext() if wanted_type == UPSTREAM_TLS_TYPE else tls_pb2.DownstreamTlsContext()
    try:
        typed.Unpack(message)
    except Exception as exc:
        raise ValueError(f"malformed {wanted_type.rsplit('.', 1)[-1]}: {exc}") from None
    return message


def _provider(instance: Any, what: str) -> ProviderRef:
    name = instance.instance_name
    if not name:
        raise ValueError(f"{what} has an empty instance_name")
    provider = providers.get(name)
    if provider is None:
        raise ValueError(providers.why_unknown(name))
    if what.startswith("identity") and not provider.has_identity:
        raise ValueError(f"certificate provider instance {name!r} has no certificate_file for the {what}")
    if what.startswith("CA") and not provider.has_ca:
        raise ValueError(f"certificate provider instance {name!r} has no ca_certificate_file for the {what}")
    return ProviderRef(name, instance.certificate_name)


def _identity(common: Any) -> Optional[ProviderRef]:
    if common.tls_certificates or common.tls_certificate_sds_secret_configs:
        raise ValueError("tls_certificates / tls_certificate_sds_secret_configs are not supported "
                         "(use certificate provider instances)")
    if common.HasField("tls_certificate_provider_instance"):
        return _provider(common.tls_certificate_provider_instance, "identity certificate")
    if common.HasField("tls_certificate_certificate_provider_instance"):
        return _provider(common.tls_certificate_certificate_provider_instance, "identity certificate")
    if common.HasField("tls_certificate_certificate_provider"):
        raise ValueError("tls_certificate_certificate_provider is not supported (use a provider instance)")
    return None


def _check_validation_context(context: Any) -> None:
    if context.HasField("trusted_ca"):
        raise ValueError("validation_context.trusted_ca is not supported (use ca_certificate_provider_instance)")
    if context.HasField("system_root_certs"):
        raise ValueError("validation_context.system_root_certs is not supported in the mesh")
    if context.verify_certificate_spki or context.verify_certificate_hash:
        raise ValueError("verify_certificate_spki / verify_certificate_hash are not supported")
    if context.HasField("require_signed_certificate_timestamp") and context.require_signed_certificate_timestamp.value:
        raise ValueError("require_signed_certificate_timestamp is not supported")
    if context.HasField("crl"):
        raise ValueError("crl is not supported")
    if context.HasField("custom_validator_config"):
        raise ValueError("custom_validator_config is not supported")


def _validation(common: Any) -> Tuple[Optional[ProviderRef], Optional[Any]]:
    """(CA provider, the CertificateValidationContext carrying SAN matchers)."""
    which = common.WhichOneof("validation_context_type")
    if which is None:
        return None, None
    if which == "validation_context":
        context = common.validation_context
        _check_validation_context(context)
        ca = (_provider(context.ca_certificate_provider_instance, "CA certificate")
              if context.HasField("ca_certificate_provider_instance") else None)
        return ca, context
    if which == "validation_context_certificate_provider_instance":
        return _provider(common.validation_context_certificate_provider_instance, "CA certificate"), None
    if which == "combined_validation_context":
        combined = common.combined_validation_context
        context = combined.default_validation_context if combined.HasField("default_validation_context") else None
        ca = None
        if context is not None:
            _check_validation_context(context)
            if context.HasField("ca_certificate_provider_instance"):
                ca = _provider(context.ca_certificate_provider_instance, "CA certificate")
        if ca is None and combined.HasField("validation_context_certificate_provider_instance"):
            ca = _provider(combined.validation_context_certificate_provider_instance, "CA certificate")
        if ca is None and (combined.HasField("validation_context_sds_secret_config")
                           or combined.HasField("validation_context_certificate_provider")):
            raise ValueError("validation context SDS / certificate_provider is not supported (use a provider instance)")
        return ca, context
    raise ValueError(f"{which} is not supported (use a certificate provider instance)")


def _san_matchers(context: Optional[Any]) -> Tuple[SanMatcher, ...]:
    if context is None:
        return ()
    out = []
    for sm in context.match_subject_alt_names:
        out.append(_string_matcher(sm, ""))
    for typed in context.match_typed_subject_alt_names:
        san_type = _SAN_TYPES.get(typed.san_type)
        if san_type is None:
            raise ValueError(f"match_typed_subject_alt_names san_type {typed.san_type} not supported")
        out.append(_string_matcher(typed.matcher, san_type))
    return tuple(out)


def _string_matcher(sm: Any, san_type: str) -> SanMatcher:
    which = sm.WhichOneof("match_pattern")
    if which == "safe_regex":
        compile_regex(sm.safe_regex.regex)
        return SanMatcher("regex", sm.safe_regex.regex, False, san_type)
    if which in ("exact", "prefix", "suffix", "contains"):
        value = getattr(sm, which)
        if not value and which != "exact":
            raise ValueError(f"SAN matcher {which} is empty")
        return SanMatcher(which, value, sm.ignore_case, san_type)
    raise ValueError(f"SAN matcher {which!r} not supported")


def upstream_tls(transport_socket: Any) -> Optional[UpstreamTls]:
    """A cluster's mTLS settings; None = plaintext (no or raw_buffer socket)."""
    context = _socket_context(transport_socket, UPSTREAM_TLS_TYPE, "client")
    if context is None:
        return None
    if not context.HasField("common_tls_context"):
        raise ValueError("UpstreamTlsContext without common_tls_context")
    common = context.common_tls_context
    identity = _identity(common)
    ca, validation = _validation(common)
    if ca is None:
        raise ValueError("UpstreamTlsContext has no CA certificate provider instance (no CA certs configured); "
                         "refusing rather than trusting any server")
    return UpstreamTls.make(identity, ca, _san_matchers(validation))


def downstream_tls(transport_socket: Any) -> Optional[DownstreamTls]:
    """A server filter chain's TLS termination; None = plaintext."""
    context = _socket_context(transport_socket, DOWNSTREAM_TLS_TYPE, "server")
    if context is None:
        return None
    if context.HasField("require_sni") and context.require_sni.value:
        raise ValueError("require_sni is not supported")
    if context.ocsp_staple_policy not in (0,):  # LENIENT_STAPLING
        raise ValueError("ocsp_staple_policy other than LENIENT_STAPLING is not supported")
    common = context.common_tls_context
    identity = _identity(common)
    if identity is None:
        raise ValueError("DownstreamTlsContext has no identity certificate provider instance")
    ca, validation = _validation(common)
    if validation is not None and (validation.match_subject_alt_names or validation.match_typed_subject_alt_names):
        raise ValueError("match_subject_alt_names is not supported on the server side")
    require = context.require_client_certificate.value if context.HasField("require_client_certificate") else False
    if require and ca is None:
        raise ValueError("require_client_certificate is set but no CA certificate provider instance is configured")
    return DownstreamTls(identity, ca, require)
