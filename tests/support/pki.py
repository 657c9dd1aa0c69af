"""A throw-away mesh PKI: a root CA and SPIFFE workload certificates, written
where a gRPC bootstrap's ``certificate_providers`` point, the way istio-agent
writes them (``cert-chain.pem``, ``key.pem``, ``root-cert.pem``).

    ca = MeshCA()                                  # trust domain cluster.local
    client = ca.workload_dir(tmp / "client", "default", "client")
    server = ca.issue("default", "server")        # Workload (pem bytes)
    client.rotate()                                # new key + cert, same identity
    bootstrap = with_certificate_providers(bootstrap_config(addr), client)

Certificates carry only a URI SAN (``spiffe://<td>/ns/<ns>/sa/<sa>``), no DNS
name and no CN — as Istio's do — so a client passes only if it checks SPIFFE
identities instead of host names.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Dict, Optional, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PEM = serialization.Encoding.PEM


def spiffe_id(namespace: str, service_account: str, trust_domain: str = "cluster.local") -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


class Workload:
    """One issued identity: PEM chain (leaf + nothing else), key and the root."""

    def __init__(self, spiffe: str, chain_pem: bytes, key_pem: bytes, root_pem: bytes) -> None:
        self.spiffe = spiffe
        self.chain_pem = chain_pem
        self.key_pem = key_pem
        self.root_pem = root_pem


class MeshCA:
    def __init__(self, trust_domain: str = "cluster.local", name: str = "meshpatch test mesh CA") -> None:
        self.trust_domain = trust_domain
        now = datetime.datetime.now(datetime.timezone.utc)
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
                             x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.root_pem = self.cert.public_bytes(PEM)

    def issue(self, namespace: str, service_account: str, *, uris: Optional[Sequence[str]] = None,
              dns: Sequence[str] = ()) -> Workload:
        """A workload certificate like istiod's CA signs: URI SAN only (plus
        optional DNS names), serverAuth + clientAuth, 1 day."""
        now = datetime.datetime.now(datetime.timezone.utc)
        key = ec.generate_private_key(ec.SECP256R1())
        spiffe = spiffe_id(namespace, service_account, self.trust_domain)
        names = [x509.UniformResourceIdentifier(u) for u in (uris if uris is not None else [spiffe])]
        names += [x509.DNSName(d) for d in dns]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(names), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=True,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        key_pem = key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        return Workload(spiffe, cert.public_bytes(PEM), key_pem, self.root_pem)

    def workload_dir(self, directory: "os.PathLike[str] | str", namespace: str, service_account: str,
                     **kwargs: object) -> "CertDir":
        d = CertDir(Path(directory), self, namespace, service_account, kwargs)
        d.rotate()
        return d


class CertDir:
    """istio-agent's output directory for one workload; ``rotate()`` re-issues
    and rewrites the files (one after the other, each atomically, like the agent)."""

    def __init__(self, directory: Path, ca: MeshCA, namespace: str, service_account: str, kwargs: Dict[str, object]) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca = ca
        self.namespace = namespace
        self.service_account = service_account
        self._kwargs = kwargs
        self.cert_file = str(self.dir / "cert-chain.pem")
        self.key_file = str(self.dir / "key.pem")
        self.ca_file = str(self.dir / "root-cert.pem")
        self.current: Optional[Workload] = None
        self.rotations = 0

    @property
    def spiffe(self) -> str:
        return spiffe_id(self.namespace, self.service_account, self.ca.trust_domain)

    def rotate(self) -> Workload:
        workload = self.ca.issue(self.namespace, self.service_account, **self._kwargs)  # type: ignore[arg-type]
        for path, data in ((self.cert_file, workload.chain_pem), (self.key_file, workload.key_pem),
                           (self.ca_file, workload.root_pem)):
            tmp = path + ".tmp"
            with open(tmp, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        self.current = workload
        self.rotations += 1
        return workload

    def provider_config(self, refresh_interval: str = "900s") -> Dict[str, object]:
        return {
            "plugin_name": "file_watcher",
            "config": {
                "certificate_file": self.cert_file,
                "private_key_file": self.key_file,
                "ca_certificate_file": self.ca_file,
                "refresh_interval": refresh_interval,
            },
        }


def with_certificate_providers(bootstrap: Dict[str, object], certs: CertDir, name: str = "default",
                               refresh_interval: str = "900s") -> Dict[str, object]:
    """``bootstrap`` plus istio-agent's ``certificate_providers`` section."""
    out = dict(bootstrap)
    out["certificate_providers"] = {name: certs.provider_config(refresh_interval)}
    return out
