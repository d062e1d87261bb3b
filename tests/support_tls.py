"""Certificates made at test time with ``cryptography``: a throwaway CA and what it signs.

:class:`Certificates` writes, into a test's temporary folder, PEM files for:

* ``ca``: the trust root the appliance and the peers are configured with;
* ``server``: for localhost / 127.0.0.1 (what our listeners present);
* ``client``: a client certificate (CN and DNS name ``modality.test``, IP 127.0.0.1);
* ``expired``: like ``client`` but no longer valid;
* ``other_host``: a server certificate for ``elsewhere.test`` / 192.0.2.7 only;
* ``rogue_ca`` and ``untrusted``: another CA and a client certificate it signed.

Keys are ECDSA P-256 (quick to make), unencrypted PKCS#8; ``encrypted_key``
writes one with a passphrase.

Also: :func:`tls_config` (a parsed configuration with a ``[tls]`` table),
:class:`TLSListening` (an AE's factory served over TLS on 127.0.0.1, port 0)
and :class:`LogCollector`.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.logger import formatEvent, globalLogPublisher

from appliance import config as configuration
from appliance.net import tls

from .support import Listening, track_connections

ONE_DAY = datetime.timedelta(days=1)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Appliance Tests"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


@dataclass
class Issued:
    """A certificate, its key, and the files they were written to."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    certificate_path: str
    key_path: str

    @property
    def subject(self) -> str:
        return self.certificate.subject.rfc4514_string()


class Certificates:
    """A throwaway PKI in ``folder`` (see the module docstring)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        self.issued: Dict[str, Issued] = {}
        self.ca = self.authority("ca", "Appliance Test CA")
        self.server = self.issue("server", "localhost", dns=["localhost"], ips=["127.0.0.1", "::1"])
        self.client = self.issue("client", "modality.test", dns=["modality.test"], ips=["127.0.0.1"])
        self.expired = self.issue("expired", "modality.test", dns=["modality.test"], ips=["127.0.0.1"],
                                  not_before=_now() - 30 * ONE_DAY, not_after=_now() - ONE_DAY)
        self.other_host = self.issue("other_host", "elsewhere.test", dns=["elsewhere.test"], ips=["192.0.2.7"])
        self.rogue_ca = self.authority("rogue_ca", "Rogue CA")
        self.untrusted = self.issue("untrusted", "modality.test", dns=["modality.test"], ips=["127.0.0.1"],
                                    issuer=self.rogue_ca)

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def _write(self, name: str, data: bytes) -> str:
        path = self.path(name)
        with open(path, "wb") as handle:
            handle.write(data)
        return path

    def _key(self) -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def _store(self, name: str, certificate: x509.Certificate, key) -> Issued:
        certificate_path = self._write(f"{name}.crt", certificate.public_bytes(serialization.Encoding.PEM))
        key_path = self._write(f"{name}.key", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        issued = Issued(certificate, key, certificate_path, key_path)
        self.issued[name] = issued
        return issued

    def authority(self, name: str, common_name: str) -> Issued:
        """A self-signed CA certificate, valid from yesterday for a year."""
        key = self._key()
        subject = _name(common_name)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - ONE_DAY)
            .not_valid_after(_now() + 365 * ONE_DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return self._store(name, certificate, key)

    def issue(self, name: str, common_name: str, dns: Iterable[str] = (), ips: Iterable[str] = (),
              issuer: Optional[Issued] = None, not_before: Optional[datetime.datetime] = None,
              not_after: Optional[datetime.datetime] = None, key=None) -> Issued:
        """An end-entity certificate for client and server use, signed by ``issuer`` (default the CA)."""
        issuer = issuer or self.ca
        key = key or self._key()
        alt_names = [x509.DNSName(name) for name in dns] + [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(issuer.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or _now() - ONE_DAY)
            .not_valid_after(not_after or _now() + 90 * ONE_DAY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
                           critical=False)
        )
        if alt_names:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        return self._store(name, builder.sign(issuer.key, hashes.SHA256()), key)

    def rsa_server(self) -> Issued:
        """A server certificate for localhost / 127.0.0.1 with an RSA 2048 key (for RSA-authenticated suites)."""
        if "server_rsa" not in self.issued:
            self.issue("server_rsa", "localhost", dns=["localhost"], ips=["127.0.0.1"],
                       key=rsa.generate_private_key(public_exponent=65537, key_size=2048))
        return self.issued["server_rsa"]

    def encrypted_key(self, issued: Issued, passphrase: bytes, name: str) -> Tuple[str, str]:
        """``issued``'s key encrypted with ``passphrase``; returns (key file, password file)."""
        key_path = self._write(f"{name}.key", issued.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(passphrase)))
        password_path = self._write(f"{name}.pass", passphrase + b"\n")
        return key_path, password_path

    def tls_table(self, identity: Optional[Issued] = None, **extra) -> dict:
        """A ``[tls]`` table: ``identity`` (default the server certificate) and the CA as trust root."""
        identity = identity or self.server
        table = {"certificate": identity.certificate_path, "private_key": identity.key_path,
                 "ca_certificates": self.ca.certificate_path}
        table.update(extra)
        return table


# --- configurations and listeners ---------------------------------------------------------------------------

def tls_config(testcase, tls_table: Optional[dict] = None, *, disk: Optional[dict] = None,
               memory: Optional[dict] = None, devices: Optional[dict] = None,
               appliance: Optional[dict] = None) -> configuration.ApplianceConfig:
    """A configuration through appliance.config.parse: no listening port unless given, ``[tls]`` as given."""
    folder = os.path.abspath(testcase.mktemp())
    os.makedirs(folder)
    data = {
        "appliance": appliance or {"data_dir": folder},
        "disk_server": {"interface": "127.0.0.1", "port": 0, "tls_port": 0, "timeout": 10, "artim_timeout": 5,
                        **(disk or {})},
        "memory_server": {"interface": "127.0.0.1", "port": 0, "tls_port": 0, **(memory or {})},
        "devices": devices or {},
    }
    if tls_table is not None:
        data["tls"] = tls_table
    return configuration.parse(data, os.path.join(folder, "appliance.toml"))


class TLSListening(Listening):
    """Like :class:`Listening` (127.0.0.1, port 0, connections awaited in cleanup), serving TLS
    with ``creator`` in front of ``factory``."""

    def __init__(self, testcase, factory, creator, reactor=None) -> None:  # noqa: D107 - see the class
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.factory = factory
        self.creator = creator
        self.lost = track_connections(factory)
        self.port = reactor.listenTCP(0, tls.server_factory(creator, factory), interface="127.0.0.1")
        self.number = self.port.getHost().port
        self.log = []
        globalLogPublisher.addObserver(self._observe)
        testcase.addCleanup(globalLogPublisher.removeObserver, self._observe)
        testcase.addCleanup(self.closed)
        testcase.addCleanup(self.port.stopListening)


class LogCollector:
    """Log lines of one namespace, collected for one test."""

    def __init__(self, testcase, namespace: str) -> None:
        self.namespace = namespace
        self.lines = []
        globalLogPublisher.addObserver(self._observe)
        testcase.addCleanup(globalLogPublisher.removeObserver, self._observe)

    def _observe(self, event) -> None:
        if event.get("log_namespace") == self.namespace:
            self.lines.append((event.get("log_level").name, formatEvent(event)))


async def connect_when_listening(reactor, connect, peer=None, attempts: int = 200, delay: float = 0.05):
    """tests.support.connect_when_listening, retrying only while the connection is refused (the peer
    not listening yet): a TLS handshake failure is the answer, raised at once."""
    from .support import connect_when_listening as retrying

    return await retrying(reactor, connect, peer, attempts, delay, only_refused=True)
