"""DICOM over TLS: certificates and keys read and checked, pyOpenSSL contexts built, swapped on reload.

The profile is PS3.15's BCP 195 profile (RFC 8996, RFC 9325): TLS 1.2 at
least, TLS 1.3 preferred (OpenSSL's own TLS 1.3 suites, all AEAD), TLS 1.2
suites ECDHE with AES-GCM or ChaCha20-Poly1305 only (no RSA key exchange, no
CBC, no 3DES, no NULL), no renegotiation, no compression.  A listener or a
device whose ``minimum_version`` is explicitly "1.0" or "1.1" gets a context of
its own allowing them, with CBC suites and OpenSSL's security level lowered to
0 for that context only, and a warning at start-up.

* :class:`TLSContexts` reads every file named by the configuration (PEM
  certificate chain, private key with an optional password file, trust roots),
  checks that the key matches the certificate and that the certificate is
  valid now, and builds one ``SSL.Context`` per TLS listener and per TLS device.
  Problems are :class:`~appliance.config.ConfigError` naming the file and the
  key.  :meth:`TLSContexts.reload` builds them all again and swaps them only if
  every one succeeded: new connections get the new contexts, established ones
  keep theirs.
* :class:`ServerCreator` and :class:`ClientCreator` are the connection
  creators Twisted's ``TLSMemoryBIOFactory`` and ``wrapClientTLS`` take; they
  make each new ``SSL.Connection`` from whatever context they hold at that
  moment.
* The client verifies the peer's chain against ``ca_certificates`` and its
  host name or IP address against the certificate with service_identity, and
  presents the appliance's certificate.
* :class:`CertificateBinding`: with ``bind_aet_to_certificate``, the calling AE
  title must be a device whose names (``certificate_names``, or its ``host``)
  the client certificate carries (subjectAltName DNS and IP entries, and CN).
* :func:`handshake_failure` turns the failure a TLS connection ended with into
  words: OpenSSL's reasons, and what our verification callback refused.
"""

from __future__ import annotations

import ipaddress
import re
import signal
import weakref
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import verify_certificate_hostname, verify_certificate_ip_address
from twisted.application.service import Service
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from ..compat import certificate_validity, verify_error_text
from ..compat import peer_certificate as _peer_certificate
from ..config import ApplianceConfig, ConfigError, DeviceConfig, TLSConfig
from ..logs import logger

__all__ = [
    "TLSContexts",
    "ServerCreator",
    "ClientCreator",
    "CertificateBinding",
    "TLSService",
    "Material",
    "load_material",
    "build_context",
    "server_factory",
    "is_tls",
    "peer_certificate",
    "certificate_names",
    "describe_session",
    "handshake_failure",
    "EXPIRY_WARNING",
]

_log = logger("appliance.tls")

_VERSIONS = {
    "1.0": SSL.TLS1_VERSION,
    "1.1": SSL.TLS1_1_VERSION,
    "1.2": SSL.TLS1_2_VERSION,
    "1.3": SSL.TLS1_3_VERSION,
}

#: A certificate expiring sooner than this is warned about at start-up and on reload.
EXPIRY_WARNING = timedelta(days=30)

_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?-----END CERTIFICATE-----", re.S)

#: What our verification callbacks refused, per connection (the connection ends soon after).
_refusals: "weakref.WeakKeyDictionary[SSL.Connection, str]" = weakref.WeakKeyDictionary()


# --- reading the files -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Material:
    """What one TLS configuration's files hold: our chain and key (if any) and the trust roots."""

    chain: Tuple[x509.Certificate, ...] = ()
    key: object = None
    trust_roots: Tuple[x509.Certificate, ...] = ()
    warnings: Tuple[str, ...] = ()

    @property
    def certificate(self) -> Optional[x509.Certificate]:
        return self.chain[0] if self.chain else None


def _read(path: str, config: ApplianceConfig, key: str, what: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        problem = "no such file"
    except PermissionError:
        problem = "permission denied (the appliance's user must be able to read it)"
    except IsADirectoryError:
        problem = f"is a directory, not {what}"
    except OSError as error:
        problem = f"cannot be read: {error.strerror}"
    raise ConfigError(config.path, key, f"{path}: {problem}")


def _certificates(path: str, config: ApplianceConfig, key: str) -> Tuple[x509.Certificate, ...]:
    data = _read(path, config, key, "a PEM certificate file")
    blocks = _PEM_CERTIFICATE.findall(data)
    if not blocks:
        raise ConfigError(config.path, key, f"{path}: holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    found = []
    for number, block in enumerate(blocks, 1):
        try:
            found.append(x509.load_pem_x509_certificate(block))
        except ValueError as error:
            raise ConfigError(config.path, key, f"{path}: certificate {number} cannot be read: {error}") from None
    return tuple(found)


def _private_key(tls: TLSConfig, config: ApplianceConfig):
    key_name = tls.key("private_key")
    data = _read(tls.private_key, config, key_name, "a PEM private key file")
    password: Optional[bytes] = None
    if tls.private_key_password_file is not None:
        raw = _read(tls.private_key_password_file, config, tls.key("private_key_password_file"), "a password file")
        password = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1] if raw.endswith(b"\n") else raw
        if not password:
            raise ConfigError(config.path, tls.key("private_key_password_file"),
                              f"{tls.private_key_password_file}: is empty")
    if b"-----BEGIN" not in data or b"PRIVATE KEY-----" not in data:
        raise ConfigError(config.path, key_name, f"{tls.private_key}: holds no PEM private key "
                                                 "(-----BEGIN PRIVATE KEY-----)")
    try:
        return serialization.load_pem_private_key(data, password=password)
    except TypeError:
        if password is None:
            problem = "the key is encrypted: set private_key_password_file to a file holding its passphrase"
        else:
            problem = f"the key is not encrypted, but private_key_password_file is set " \
                      f"({tls.private_key_password_file})"
        raise ConfigError(config.path, key_name, f"{tls.private_key}: {problem}") from None
    except ValueError as error:
        if password is not None:
            problem = (f"cannot be decrypted with the passphrase in {tls.private_key_password_file}, "
                       f"or is no PEM private key ({error})")
        else:
            problem = f"is no PEM private key OpenSSL can read ({error})"
        raise ConfigError(config.path, key_name, f"{tls.private_key}: {problem}") from None
    except Exception as error:  # unsupported algorithms, among others
        raise ConfigError(config.path, key_name, f"{tls.private_key}: cannot be read: {error}") from None


def _public_bytes(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _subject(certificate: x509.Certificate) -> str:
    return certificate.subject.rfc4514_string() or "(empty subject)"


def load_material(tls: TLSConfig, config: ApplianceConfig, now: Optional[datetime] = None,
                  cache: Optional[dict] = None) -> Material:
    """Read and check the files of one TLS configuration; :class:`ConfigError` names the file and the key.

    The certificate must be valid at ``now`` and match the private key; trust
    roots that expired only give a warning (bundles hold old roots).
    """
    now = now or datetime.now(timezone.utc)
    cache = cache if cache is not None else {}
    warnings: List[str] = []
    chain: Tuple[x509.Certificate, ...] = ()
    key = None
    if tls.certificate is not None:
        identity = ("identity", tls.certificate, tls.private_key, tls.private_key_password_file)
        if identity not in cache:
            chain = _certificates(tls.certificate, config, tls.key("certificate"))
            key = _private_key(tls, config)
            leaf = chain[0]
            if _public_bytes(key.public_key()) != _public_bytes(leaf.public_key()):
                raise ConfigError(config.path, tls.key("private_key"),
                                  f"{tls.private_key}: does not match the certificate in {tls.certificate} "
                                  f"({_subject(leaf)})")
            not_before, not_after = certificate_validity(leaf)
            if now > not_after:
                raise ConfigError(config.path, tls.key("certificate"),
                                  f"{tls.certificate}: the certificate ({_subject(leaf)}) expired on "
                                  f"{not_after:%Y-%m-%d %H:%M} UTC")
            if now < not_before:
                raise ConfigError(config.path, tls.key("certificate"),
                                  f"{tls.certificate}: the certificate ({_subject(leaf)}) is not valid before "
                                  f"{not_before:%Y-%m-%d %H:%M} UTC")
            cache[identity] = (chain, key)
        chain, key = cache[identity]
        not_after = certificate_validity(chain[0])[1]
        if not_after - now < EXPIRY_WARNING:
            warnings.append(f"{tls.key('certificate')}: {tls.certificate}: the certificate ({_subject(chain[0])}) "
                            f"expires on {not_after:%Y-%m-%d %H:%M} UTC")
    roots: List[x509.Certificate] = []
    for path in tls.ca_certificates:
        if ("roots", path) not in cache:
            cache[("roots", path)] = _certificates(path, config, tls.key("ca_certificates"))
        for root in cache[("roots", path)]:
            if now > certificate_validity(root)[1]:
                warnings.append(f"{tls.key('ca_certificates')}: {path}: the trust root {_subject(root)} has expired")
            roots.append(root)
    return Material(chain=chain, key=key, trust_roots=tuple(roots), warnings=tuple(warnings))


# --- contexts -----------------------------------------------------------------------------------------------


def _record_refusal(connection: SSL.Connection, why: str) -> None:
    if connection not in _refusals:  # the first reason is the one that matters
        _refusals[connection] = why


def _verifier(expected_host: Optional[str]) -> Callable:
    """A pyOpenSSL verify callback: OpenSSL's verdict, and (client side) the peer's name with service_identity."""

    def verify(connection, certificate, error_number, depth, ok) -> bool:
        try:
            if not ok:
                subject = _subject(certificate.to_cryptography())
                _record_refusal(connection, f"{verify_error_text(error_number)} (depth {depth}: {subject})")
                return False
            if depth == 0 and expected_host is not None:
                cert = certificate.to_cryptography()
                try:
                    if _is_ip_address(expected_host):
                        verify_certificate_ip_address(cert, expected_host)
                    else:
                        verify_certificate_hostname(cert, expected_host)
                except (VerificationError, CertificateError):
                    names = ", ".join(certificate_names(cert)) or "none"
                    _record_refusal(connection, f"the certificate ({_subject(cert)}) is not for {expected_host!r}: "
                                                f"it names {names}")
                    return False
            return True
        except Exception as error:  # never let an exception escape into OpenSSL's callback
            _record_refusal(connection, f"certificate check failed: {error!r}")
            return False

    return verify


def _is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def build_context(tls: TLSConfig, material: Material, config: ApplianceConfig, *, server: bool,
                  expected_host: Optional[str] = None) -> SSL.Context:
    """One ``SSL.Context`` for a listener (``server``) or for the connections to one device.

    ``expected_host`` (client side): the name or address the peer's certificate must carry.
    """
    context = SSL.Context(SSL.TLS_METHOD)
    options = SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_SSLv2 | SSL.OP_NO_SSLv3
    if server:
        options |= SSL.OP_CIPHER_SERVER_PREFERENCE
    context.set_options(options)
    context.set_min_proto_version(_VERSIONS[tls.minimum_version])
    ciphers = tls.cipher_string
    if tls.legacy and "@SECLEVEL" not in ciphers.upper():
        # OpenSSL 3 refuses TLS 1.0/1.1 (SHA-1 signatures) above security level 0: lowered for this context only
        ciphers += ":@SECLEVEL=0"
    try:
        context.set_cipher_list(ciphers.encode("ascii"))
    except SSL.Error as error:
        raise ConfigError(config.path, tls.key("ciphers"),
                          f"OpenSSL accepts none of the cipher suites in {tls.cipher_string!r}: "
                          f"{_openssl_reasons(error)}") from None
    if material.certificate is not None:
        context.use_certificate(crypto.X509.from_cryptography(material.certificate))
        for extra in material.chain[1:]:
            context.add_extra_chain_cert(crypto.X509.from_cryptography(extra))
        context.use_privatekey(crypto.PKey.from_cryptography_key(material.key))
        try:
            context.check_privatekey()
        except SSL.Error as error:  # pragma: no cover - load_material compared the public keys already
            raise ConfigError(config.path, tls.key("private_key"),
                              f"{tls.private_key}: does not match {tls.certificate}: {_openssl_reasons(error)}")
    store = context.get_cert_store()
    for root in material.trust_roots:
        try:
            store.add_cert(crypto.X509.from_cryptography(root))
        except crypto.Error:
            pass  # the same root twice in a bundle
    if server:
        if tls.require_client_certificate:
            context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, _verifier(None))
        elif material.trust_roots:
            context.set_verify(SSL.VERIFY_PEER, _verifier(None))  # verified when presented
        else:
            context.set_verify(SSL.VERIFY_NONE, _verifier(None))
        context.set_session_id(b"dicom-appliance")  # session resumption with client certificates needs one
    else:
        context.set_verify(SSL.VERIFY_PEER, _verifier(expected_host))
    return context


@implementer(IOpenSSLServerConnectionCreator)
class ServerCreator:
    """Makes each accepted connection's ``SSL.Connection`` from the context it holds now (swapped on reload)."""

    def __init__(self, context: SSL.Context, name: str) -> None:
        self.context = context
        self.name = name

    def serverConnectionForTLS(self, protocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = SSL.Connection(self.context, None)
        connection.set_app_data(protocol)
        return connection

    def getContext(self) -> SSL.Context:
        """For APIs taking an old-style context factory (``SSL4ServerEndpoint``)."""
        return self.context


@implementer(IOpenSSLClientConnectionCreator)
class ClientCreator:
    """Makes each outgoing connection's ``SSL.Connection`` (with SNI for a DNS name) from its current context."""

    def __init__(self, context: SSL.Context, hostname: str) -> None:
        self.context = context
        self.hostname = hostname

    def clientConnectionForTLS(self, protocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = SSL.Connection(self.context, None)
        connection.set_app_data(protocol)
        if not _is_ip_address(self.hostname):
            connection.set_tlsext_host_name(self.hostname.encode("idna"))
        return connection


def server_factory(creator: ServerCreator, factory) -> TLSMemoryBIOFactory:
    """``factory`` (an AE's AcceptorFactory) behind TLS: what a TLS listening port serves."""
    wrapped = TLSMemoryBIOFactory(creator, False, factory)
    wrapped.noisy = False  # the association log line says what matters
    return wrapped


@dataclass
class _Built:
    servers: Dict[str, SSL.Context] = field(default_factory=dict)
    clients: Dict[str, SSL.Context] = field(default_factory=dict)
    summaries: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)


#: The name of the web pages' HTTPS context among TLSContexts.servers.
WEB = "web"


class TLSContexts:
    """Every TLS context the configuration asks for: one per TLS listener, one per device with ``tls = true``.

    ``listeners=False`` or ``devices=[names]`` restrict what is built (a
    command-line tool needs one device's).  Raises :class:`ConfigError` for any
    file problem; :meth:`reload` raises it too, keeping the contexts in use.
    """

    def __init__(self, config: ApplianceConfig, *, listeners: bool = True,
                 devices: Optional[Iterable[str]] = None, now: Optional[Callable[[], datetime]] = None) -> None:
        self.config = config
        self._now = now or (lambda: datetime.now(timezone.utc))
        self.listener_configs: Dict[str, TLSConfig] = {}
        if listeners:
            for name, listener in config.listeners.items():
                if listener.tls is not None and listener.tls_port:
                    self.listener_configs[name] = listener.tls
            if config.web.tls is not None and config.web.port:
                self.listener_configs[WEB] = config.web.tls  # HTTPS for the pages
        wanted = set(config.devices) if devices is None else set(devices)
        self.devices: Dict[str, DeviceConfig] = {
            name: device for name, device in config.devices.items() if name in wanted and device.tls is not None
        }
        built = self._build()
        self.servers: Dict[str, ServerCreator] = {
            name: ServerCreator(context, name) for name, context in built.servers.items()
        }
        self.clients: Dict[str, ClientCreator] = {
            name: ClientCreator(context, self.devices[name].host) for name, context in built.clients.items()
        }
        self.summaries = built.summaries
        self.warnings = built.warnings

    @property
    def active(self) -> bool:
        return bool(self.servers or self.clients)

    def _build(self) -> _Built:
        now = self._now()
        cache: dict = {}
        built = _Built()
        for name, tls in self.listener_configs.items():
            material = load_material(tls, self.config, now, cache)
            built.servers[name] = build_context(tls, material, self.config, server=True)
            built.warnings.extend(material.warnings)
            if name == WEB:
                web = self.config.web
                built.summaries.append(
                    f"[web] HTTPS on {web.interface}:{web.port}: certificate {_subject(material.certificate)} "
                    f"(expires {certificate_validity(material.certificate)[1]:%Y-%m-%d}), TLS {tls.minimum_version} "
                    "or later")
                if tls.legacy:
                    built.warnings.append(_legacy_warning(tls, "the web pages' HTTPS"))
                continue
            listener = getattr(self.config, name)
            built.summaries.append(
                f"[{name}] DICOM over TLS on {listener.interface}:{listener.tls_port} for {listener.ae_title}: "
                f"certificate {_subject(material.certificate)} (expires "
                f"{certificate_validity(material.certificate)[1]:%Y-%m-%d}), TLS {tls.minimum_version} or later, "
                + ("client certificates required" if tls.require_client_certificate else
                   "client certificates verified when presented" if material.trust_roots else
                   "client certificates not asked for")
                + (", calling AE titles bound to certificates" if tls.bind_aet_to_certificate else "")
            )
            if tls.legacy:
                built.warnings.append(_legacy_warning(tls, f"the {listener.ae_title} TLS listener"))
        for name, device in sorted(self.devices.items()):
            tls = device.tls
            material = load_material(tls, self.config, now, cache)
            built.clients[name] = build_context(tls, material, self.config, server=False, expected_host=device.host)
            built.warnings.extend(material.warnings)
            built.summaries.append(
                f"[devices.{name}] TLS to {device.ae_title} at {device.host}:{device.port}: "
                + (f"presenting {_subject(material.certificate)}" if material.certificate is not None
                   else "presenting no certificate")
                + f", TLS {tls.minimum_version} or later"
            )
            if tls.legacy:
                built.warnings.append(_legacy_warning(tls, f"associations to {device.ae_title} ([devices.{name}])"))
        built.warnings = list(dict.fromkeys(built.warnings))
        return built

    def reload(self) -> List[str]:
        """Read every file again and swap the contexts (all or none); returns the warnings.

        New connections use the new contexts; established connections keep the
        ones they were made with.  A :class:`ConfigError` leaves everything as it was.
        """
        built = self._build()
        for name, context in built.servers.items():
            self.servers[name].context = context
        for name, context in built.clients.items():
            self.clients[name].context = context
        self.summaries = built.summaries
        self.warnings = built.warnings
        return built.warnings

    def client_endpoint(self, reactor, device: DeviceConfig, timeout: float):
        """The endpoint for an association to ``device`` (``tls = true``): TCP, then TLS with its context."""
        creator = self.clients.get(device.name)
        if creator is None:
            raise KeyError(f"no TLS context for [devices.{device.name}]")
        return wrapClientTLS(creator, HostnameEndpoint(reactor, device.host, device.port, timeout=timeout))


def _legacy_warning(tls: TLSConfig, what: str) -> str:
    return (f"{tls.key('minimum_version')} = \"{tls.minimum_version}\": {what} allows TLS {tls.minimum_version}, "
            "which RFC 8996 deprecates (CBC suites allowed, OpenSSL security level 0 for this context only)")


# --- a live connection ------------------------------------------------------------------------------------


def is_tls(transport) -> bool:
    """Whether ``transport`` is a TLS connection (Twisted's TLSMemoryBIOProtocol)."""
    return isinstance(transport, TLSMemoryBIOProtocol)


def peer_certificate(transport) -> Optional[x509.Certificate]:
    """The certificate the peer of a TLS transport presented, or None."""
    if not is_tls(transport):
        return None
    connection = transport.getHandle()
    try:
        return _peer_certificate(connection)
    except SSL.Error:
        return None


def certificate_names(certificate: x509.Certificate) -> Tuple[str, ...]:
    """The names a certificate carries: subjectAltName DNS names and IP addresses, then its CN."""
    names: List[str] = []
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        names.extend(san.get_values_for_type(x509.DNSName))
        names.extend(str(address) for address in san.get_values_for_type(x509.IPAddress))
    names.extend(str(attribute.value) for attribute in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME))
    return tuple(dict.fromkeys(names))


def describe_session(transport) -> str:
    """``TLSv1.3 TLS_AES_256_GCM_SHA384, peer CN=...``: what the association log line records."""
    connection = transport.getHandle()
    certificate = peer_certificate(transport)
    peer = f"peer {_subject(certificate)}" if certificate is not None else "no peer certificate"
    return f"{connection.get_protocol_version_name()} {connection.get_cipher_name()}, {peer}"


def _openssl_reasons(error: Exception) -> str:
    """The reasons of an ``SSL.Error``: its error queue as (library, function, reason) tuples."""
    queue = error.args[0] if error.args and isinstance(error.args[0], list) else list(error.args)
    reasons = []
    for item in queue:
        if isinstance(item, tuple) and len(item) == 3:
            reasons.append(item[2] or item[0])
        else:
            reasons.append(str(item))
    return "; ".join(reason for reason in reasons if reason) or type(error).__name__


def handshake_failure(transport, reason: Optional[Failure]) -> Optional[str]:
    """Why a TLS connection failed, in OpenSSL's words plus what our checks refused; None if not a TLS failure."""
    refusal = None
    if is_tls(transport):
        refusal = _refusals.get(transport.getHandle())
    if reason is not None and reason.check(SSL.Error):
        words = _openssl_reasons(reason.value)
        return f"{words}: {refusal}" if refusal else words
    if reason is not None and reason.check(VerificationError, CertificateError):
        return f"peer certificate refused: {reason.getErrorMessage()}"
    return refusal


# --- binding calling AE titles to client certificates ---------------------------------------------------


def _normal(name: str) -> str:
    try:
        return ipaddress.ip_address(name).compressed
    except ValueError:
        return name.strip().rstrip(".").lower()


class CertificateBinding:
    """``bind_aet_to_certificate``: the calling AE title must be a device the client certificate names."""

    def __init__(self, devices: Iterable[DeviceConfig]) -> None:
        self.identities: Dict[str, List[Tuple[str, Tuple[str, ...]]]] = {}
        for device in devices:
            self.identities.setdefault(device.ae_title, []).append((device.name, device.identities))

    def check(self, calling_ae_title: str, certificate: Optional[x509.Certificate]) -> Optional[str]:
        """None when the certificate may call as ``calling_ae_title``; otherwise why not."""
        if certificate is None:
            return "bind_aet_to_certificate: the peer presented no client certificate"
        configured = self.identities.get(calling_ae_title)
        if not configured:
            return (f"bind_aet_to_certificate: calling AE title {calling_ae_title!r} is no configured device's, "
                    f"so no certificate is bound to it")
        names = certificate_names(certificate)
        presented = {_normal(name) for name in names}
        for _, identities in configured:
            if presented & {_normal(name) for name in identities}:
                return None
        expected = "; ".join(f"[devices.{device}] {', '.join(identities)}" for device, identities in configured)
        return (f"bind_aet_to_certificate: the client certificate ({_subject(certificate)}; names "
                f"{', '.join(names) or 'none'}) is not one of {calling_ae_title!r}'s ({expected})")


# --- the running appliance: start-up report and reload on SIGHUP ------------------------------------------


class TLSService(Service):
    """Reports the TLS contexts at start-up and reloads the certificates on SIGHUP.

    The signal handler only schedules :meth:`reload` on the reactor thread
    (``callFromThread`` is safe from a signal handler); the previous handler
    is restored at shutdown.
    """

    name = "tls"

    def __init__(self, contexts: TLSContexts, reactor, handle_signal: bool = True) -> None:
        self.contexts = contexts
        self.reactor = reactor
        self.handle_signal = handle_signal
        self._previous = None
        self._installed = False
        #: called with True/False after each reload (tests wait on it)
        self.reloaded: List[Callable[[bool], None]] = []

    def startService(self) -> None:
        super().startService()
        for line in self.contexts.summaries:
            _log.info("{summary}", summary=line)
        for warning in self.contexts.warnings:
            _log.warn("{warning}", warning=warning)
        if self.handle_signal and hasattr(signal, "SIGHUP"):
            try:
                self._previous = signal.signal(signal.SIGHUP, self._hangup)
                self._installed = True
            except ValueError:  # not the main thread
                _log.warn("TLS certificates cannot be reloaded on SIGHUP: not running in the main thread")

    def stopService(self):
        if self._installed:
            signal.signal(signal.SIGHUP, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False
        return super().stopService()

    def _hangup(self, signum, frame) -> None:
        self.reactor.callFromThread(self.reload)

    def reload(self) -> bool:
        """Read the certificates and keys again; on any problem keep the ones in use and log why."""
        try:
            warnings = self.contexts.reload()
        except ConfigError as error:
            _log.error("TLS reload failed, the certificates in use stay: {error}", error=error)
            ok = False
        else:
            _log.info("TLS certificates reloaded: new connections use them, established ones keep theirs")
            for line in self.contexts.summaries:
                _log.info("{summary}", summary=line)
            for warning in warnings:
                _log.warn("{warning}", warning=warning)
            ok = True
        for callback in list(self.reloaded):
            callback(ok)
        return ok
