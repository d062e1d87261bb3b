"""DICOM over TLS: configuration, files checked at start-up, contexts, binding, reload, and the wiring.

Certificates are made at test time (tests/support_tls.py).  Context tests
hand-shake two pyOpenSSL connections in memory; association tests run our
acceptor and requestor over TLS on 127.0.0.1, port 0.  Nothing sleeps.
"""

from __future__ import annotations

import os
import shutil
import signal
from datetime import datetime, timedelta, timezone
from typing import Optional, Tuple

from OpenSSL import SSL
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer, reactor
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial import unittest

from appliance import compat
from appliance import config as configuration
from appliance import tap
from appliance.ae.listeners import acceptor_factory
from appliance.ae.verification import VerificationService
from appliance.config import BCP195_CIPHERS, LEGACY_CIPHERS, ConfigError
from appliance.dicom.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from appliance.net import requestor, tls
from appliance.net.protocol import AcceptorFactory, Timeouts

from .support import WAIT_LIMIT, deferred_test, free_port, run_python, write_file
from .support_tls import Certificates, LogCollector, TLSListening, tls_config

TIMEOUTS = Timeouts(artim=5.0, association=10.0, dimse=10.0, idle=None)

#: twistd as a module (as in test_tap)
TWISTD = ["-c", "from twisted.scripts.twistd import run; run()"]


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)


def toml(tables: dict) -> str:
    """A TOML document from {table name: {key: value}} (enough for these tests)."""
    lines = []
    for name, table in tables.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in table.items())
    return "\n".join(lines) + "\n"


# --- configuration -------------------------------------------------------------------------------------------


class ConfigTests(unittest.SynchronousTestCase):
    """The TLS keys of [tls], the listeners and the devices, and their errors."""

    def setUp(self):
        self.pki = Certificates(os.path.abspath(self.mktemp()))

    def load(self, tables: dict) -> configuration.ApplianceConfig:
        return configuration.load(write_file(self, toml(tables)))

    def assertConfigError(self, tables: dict, key: str, *words: str) -> ConfigError:
        path = write_file(self, toml(tables))
        with self.assertRaises(ConfigError) as caught:
            configuration.load(path)
        error = caught.exception
        self.assertEqual((error.path, error.key), (path, key), str(error))
        for text in words:
            self.assertIn(text, str(error))
        return error

    def test_off_without_certificate(self):
        """With no certificate anywhere, both TLS listeners are off (tls_port 0) and devices use plain TCP."""
        config = self.load({"devices.pacs": {"ae_title": "PACS", "host": "h", "port": 104}})
        for listener in (config.disk_server, config.memory_server):
            self.assertEqual((listener.tls_port, listener.tls), (0, None))
        self.assertIsNone(config.device("pacs").tls)
        self.assertEqual(config.device("pacs").certificate_names, ())

    def test_defaults_with_certificate(self):
        """With [tls] certificate, key and trust roots: ports 2762 and 2763, TLS 1.2, BCP 195 ciphers,
        client certificates required, no AE title binding."""
        config = self.load({"tls": self.pki.tls_table()})
        self.assertEqual((config.disk_server.tls_port, config.memory_server.tls_port), (2762, 2763))
        settings = config.disk_server.tls
        self.assertEqual(settings.certificate, self.pki.server.certificate_path)
        self.assertEqual(settings.private_key, self.pki.server.key_path)
        self.assertEqual(settings.ca_certificates, (self.pki.ca.certificate_path,))
        self.assertEqual(settings.minimum_version, "1.2")
        self.assertTrue(settings.require_client_certificate)
        self.assertFalse(settings.bind_aet_to_certificate)
        self.assertFalse(settings.legacy)
        self.assertEqual(settings.cipher_string, BCP195_CIPHERS)
        self.assertEqual(config.memory_server.tls, settings)

    def test_bcp195_cipher_list(self):
        """The default TLS 1.2 list is ECDHE with AES-GCM or ChaCha20-Poly1305 only: no RSA key exchange,
        no CBC, no 3DES, no NULL."""
        for name in BCP195_CIPHERS.split(":"):
            self.assertTrue(name.startswith("ECDHE-"), name)
            self.assertTrue(name.endswith(("GCM-SHA256", "GCM-SHA384", "CHACHA20-POLY1305")), name)
        self.assertTrue(LEGACY_CIPHERS.startswith(BCP195_CIPHERS + ":"))

    def test_relative_paths(self):
        """TLS file paths resolve against the configuration file's folder; ca_certificates may be a list."""
        path = write_file(self, toml({"tls": {"certificate": "pki/a.crt", "private_key": "pki/a.key",
                                              "ca_certificates": ["pki/ca1.crt", "/etc/ca2.crt"]}}))
        config = configuration.load(path)
        folder = os.path.dirname(path)
        self.assertEqual(config.disk_server.tls.certificate, os.path.join(folder, "pki", "a.crt"))
        self.assertEqual(config.disk_server.tls.ca_certificates, (os.path.join(folder, "pki", "ca1.crt"), "/etc/ca2.crt"))

    def test_listener_override(self):
        """A listener's own keys override [tls] for that listener only, and errors name where a key was set."""
        config = self.load({"tls": self.pki.tls_table(),
                            "memory_server": {"minimum_version": "1.0", "require_client_certificate": False,
                                              "bind_aet_to_certificate": True}})
        memory, disk = config.memory_server.tls, config.disk_server.tls
        self.assertEqual((memory.minimum_version, memory.legacy, memory.cipher_string), ("1.0", True, LEGACY_CIPHERS))
        self.assertFalse(memory.require_client_certificate)
        self.assertTrue(memory.bind_aet_to_certificate)
        self.assertEqual((disk.minimum_version, disk.require_client_certificate), ("1.2", True))
        self.assertEqual(memory.key("minimum_version"), "[memory_server] minimum_version")
        self.assertEqual(memory.key("certificate"), "[tls] certificate")

    def test_minimum_version_float(self):
        """minimum_version = 1.3 written as a TOML number is accepted as "1.3"."""
        config = self.load({"tls": dict(self.pki.tls_table(), minimum_version=1.3)})
        self.assertEqual(config.disk_server.tls.minimum_version, "1.3")

    def test_minimum_version_unknown(self):
        """An unknown version is refused with the allowed ones."""
        self.assertConfigError({"tls": dict(self.pki.tls_table(), minimum_version="1.4")},
                               "[tls] minimum_version", "'1.0', '1.1', '1.2', '1.3'", "'1.4'")

    def test_ciphers_with_spaces(self):
        """A cipher string with spaces is refused (OpenSSL's syntax joins names with ':')."""
        self.assertConfigError({"tls": dict(self.pki.tls_table(), ciphers="AES GCM")}, "[tls] ciphers", "cipher string")

    def test_tls_port_disables(self):
        """tls_port = 0 turns a TLS listener off even with a certificate."""
        config = self.load({"tls": self.pki.tls_table(), "memory_server": {"tls_port": 0}})
        self.assertEqual((config.memory_server.tls_port, config.memory_server.tls), (0, None))
        self.assertEqual(config.disk_server.tls_port, 2762)

    def test_tls_port_without_certificate(self):
        """A tls_port set explicitly with no certificate configured is an error saying what to set."""
        self.assertConfigError({"disk_server": {"tls_port": 2762}}, "[disk_server] tls_port",
                               "needs a certificate", "tls_port = 0")

    def test_client_certificates_need_trust_roots(self):
        """Requiring client certificates needs ca_certificates to verify them."""
        table = self.pki.tls_table()
        del table["ca_certificates"]
        self.assertConfigError({"tls": table}, "[tls] ca_certificates", "require_client_certificate")
        config = self.load({"tls": dict(table, require_client_certificate=False)})
        self.assertEqual(config.disk_server.tls.ca_certificates, ())

    def test_key_without_certificate(self):
        """A private key without a certificate is an error naming certificate."""
        self.assertConfigError({"tls": {"private_key": "k.pem"}}, "[tls] certificate", "is required with private_key")

    def test_listener_certificate_without_key(self):
        """A listener's certificate override without any private key names private_key."""
        self.assertConfigError({"tls": {"ca_certificates": "ca.pem"},
                                "disk_server": {"certificate": "c.pem"}}, "[tls] private_key", "is required")

    def test_unknown_tls_key(self):
        """Unknown keys of [tls] are errors listing the known ones."""
        error = self.assertConfigError({"tls": {"certfile": "x"}}, "[tls] certfile", "unknown key")
        self.assertIn("private_key_password_file", error.problem)

    def test_device_tls(self):
        """A device with tls = true gets [tls]'s settings with its overrides, and its certificate_names."""
        config = self.load({"tls": self.pki.tls_table(self.pki.client),
                            "devices.ct": {"ae_title": "CT", "host": "ct.example", "port": 2762, "tls": True,
                                           "minimum_version": "1.1", "certificate_names": ["ct.example", "10.0.0.5"]},
                            "devices.mr": {"ae_title": "MR", "host": "mr.example", "port": 104}})
        ct, mr = config.device("ct"), config.device("mr")
        self.assertEqual(ct.tls.certificate, self.pki.client.certificate_path)
        self.assertEqual((ct.tls.minimum_version, ct.tls.key("minimum_version")), ("1.1", "[devices.ct] minimum_version"))
        self.assertEqual(ct.certificate_names, ("ct.example", "10.0.0.5"))
        self.assertEqual(ct.identities, ("ct.example", "10.0.0.5"))
        self.assertIsNone(mr.tls)
        self.assertEqual(mr.identities, ("mr.example",))

    def test_device_tls_needs_trust_roots(self):
        """tls = true without ca_certificates is an error: the device's certificate could not be verified."""
        self.assertConfigError({"devices.ct": {"ae_title": "CT", "host": "h", "port": 1, "tls": True}},
                               "[tls] ca_certificates", "[devices.ct] tls = true")

    def test_device_tls_key_without_tls(self):
        """A TLS key on a device without tls = true is an error rather than silently unused."""
        self.assertConfigError({"devices.ct": {"ae_title": "CT", "host": "h", "port": 1, "minimum_version": "1.0"}},
                               "[devices.ct] minimum_version", "set tls = true")

    def test_device_server_only_key(self):
        """require_client_certificate is a listener's key: on a device it is unknown."""
        self.assertConfigError({"tls": self.pki.tls_table(),
                                "devices.ct": {"ae_title": "CT", "host": "h", "port": 1, "tls": True,
                                               "require_client_certificate": False}},
                               "[devices.ct] require_client_certificate", "unknown key")

    def test_tls_port_conflicts(self):
        """A TLS port may not take another listener's port (plain or TLS) on an overlapping interface."""
        self.assertConfigError({"tls": self.pki.tls_table(), "memory_server": {"tls_port": 2762}},
                               "[memory_server] tls_port", "2762 is [disk_server] tls_port too")
        self.assertConfigError({"tls": self.pki.tls_table(), "memory_server": {"port": 2762}},
                               "[memory_server] port", "2762 is [disk_server] tls_port too")
        self.assertConfigError({"tls": self.pki.tls_table(), "disk_server": {"tls_port": 11112}},
                               "[disk_server] tls_port", "11112 is [disk_server] port too")


# --- files read and checked -----------------------------------------------------------------------------------


class FileCheckTests(unittest.SynchronousTestCase):
    """TLSContexts reads every file at start-up; each problem stops it with the file and the key named."""

    def setUp(self):
        self.pki = Certificates(os.path.abspath(self.mktemp()))

    def contexts(self, tls_table: dict, **tables) -> tls.TLSContexts:
        tables.setdefault("disk", {"tls_port": 2762})
        return tls.TLSContexts(tls_config(self, tls_table, **tables))

    def assertFileError(self, tls_table: dict, key: str, *words: str, **tables) -> ConfigError:
        tables.setdefault("disk", {"tls_port": 2762})
        config = tls_config(self, tls_table, **tables)
        with self.assertRaises(ConfigError) as caught:
            tls.TLSContexts(config)
        error = caught.exception
        self.assertEqual((error.path, error.key), (config.path, key), str(error))
        for text in words:
            self.assertIn(text, str(error))
        return error

    def test_good_files(self):
        """Matching certificate and key, trusted roots: a server context for the Disk-Server only."""
        contexts = self.contexts(self.pki.tls_table())
        self.assertEqual(sorted(contexts.servers), ["disk_server"])
        self.assertEqual(contexts.clients, {})
        self.assertTrue(contexts.active)
        self.assertEqual(contexts.warnings, [])
        self.assertIn("client certificates required", contexts.summaries[0])
        self.assertIn("CN=localhost", contexts.summaries[0])

    def test_missing_certificate(self):
        """A certificate file that does not exist: the key and the path, 'no such file'."""
        missing = self.pki.path("nowhere.crt")
        self.assertFileError(dict(self.pki.tls_table(), certificate=missing), "[tls] certificate",
                             missing, "no such file")

    def test_certificate_is_directory(self):
        """A directory where a file belongs is named as such."""
        self.assertFileError(dict(self.pki.tls_table(), certificate=self.pki.folder), "[tls] certificate",
                             "is a directory")

    def test_unreadable_key(self):
        """A key file the appliance may not read: permission denied (skipped as root, who reads anything)."""
        if os.geteuid() == 0:
            raise unittest.SkipTest("root reads files whatever their mode")
        path = self.pki.path("locked.key")
        shutil.copy(self.pki.server.key_path, path)
        os.chmod(path, 0)
        self.assertFileError(dict(self.pki.tls_table(), private_key=path), "[tls] private_key", path,
                             "permission denied")

    def test_not_pem(self):
        """A file that holds no PEM certificate says so."""
        path = self.pki.path("garbage.crt")
        with open(path, "w") as handle:
            handle.write("not a certificate\n")
        self.assertFileError(dict(self.pki.tls_table(), certificate=path), "[tls] certificate", path,
                             "holds no PEM certificate")

    def test_key_not_matching(self):
        """A key that is not the certificate's: private_key named, with both files."""
        self.assertFileError(dict(self.pki.tls_table(), private_key=self.pki.client.key_path), "[tls] private_key",
                             self.pki.client.key_path, "does not match the certificate", self.pki.server.certificate_path)

    def test_expired(self):
        """An expired certificate stops start-up: the file, the subject and the date."""
        self.assertFileError(self.pki.tls_table(self.pki.expired), "[tls] certificate",
                             self.pki.expired.certificate_path, "expired on")

    def test_not_yet_valid(self):
        """A certificate valid only from tomorrow is refused too."""
        now = datetime.now(timezone.utc)
        future = self.pki.issue("future", "localhost", dns=["localhost"], not_before=now + timedelta(days=1),
                                not_after=now + timedelta(days=10))
        self.assertFileError(self.pki.tls_table(future), "[tls] certificate", "is not valid before")

    def test_expiring_soon_warns(self):
        """A certificate expiring within 30 days loads, with a warning naming it."""
        now = datetime.now(timezone.utc)
        soon = self.pki.issue("soon", "localhost", dns=["localhost"], not_after=now + timedelta(days=3))
        contexts = self.contexts(self.pki.tls_table(soon))
        self.assertEqual(len(contexts.warnings), 1)
        self.assertIn("[tls] certificate", contexts.warnings[0])
        self.assertIn("expires on", contexts.warnings[0])

    def test_override_named(self):
        """A bad file set in a listener's table is reported under that table's key."""
        missing = self.pki.path("nowhere.crt")
        self.assertFileError(self.pki.tls_table(), "[disk_server] certificate", missing,
                             disk={"tls_port": 2762, "certificate": missing})

    def test_encrypted_key(self):
        """A passphrase-protected key loads with private_key_password_file; without it, or with a wrong
        passphrase, the error says what to do."""
        key, password = self.pki.encrypted_key(self.pki.server, b"s3cret", "server-encrypted")
        table = dict(self.pki.tls_table(), private_key=key)
        self.contexts(dict(table, private_key_password_file=password))
        self.assertFileError(table, "[tls] private_key", key, "set private_key_password_file")
        wrong = self.pki.path("wrong.pass")
        with open(wrong, "wb") as handle:
            handle.write(b"guess\n")
        self.assertFileError(dict(table, private_key_password_file=wrong), "[tls] private_key", key,
                             "cannot be decrypted", wrong)

    def test_unknown_ciphers(self):
        """A cipher string OpenSSL matches nothing in is a ciphers error."""
        self.assertFileError(dict(self.pki.tls_table(), ciphers="NO-SUCH-CIPHER"), "[tls] ciphers",
                             "accepts none of the cipher suites")

    def test_legacy_warning(self):
        """minimum_version "1.0" on one listener gives a start-up warning naming the key, that listener only."""
        contexts = self.contexts(self.pki.tls_table(), disk={"tls_port": 2762, "minimum_version": "1.0"},
                                 memory={"tls_port": 2763})
        self.assertEqual(sorted(contexts.servers), ["disk_server", "memory_server"])
        self.assertEqual(len(contexts.warnings), 1)
        self.assertIn('[disk_server] minimum_version = "1.0"', contexts.warnings[0])
        self.assertIn("security level 0", contexts.warnings[0])

    def test_device_contexts(self):
        """Devices with tls = true get client contexts; restricting to one device builds only its own."""
        devices = {name: {"ae_title": name.upper(), "host": "127.0.0.1", "port": 104, "tls": True}
                   for name in ("a", "b")}
        devices["plain"] = {"ae_title": "PLAIN", "host": "h", "port": 104}
        config = tls_config(self, self.pki.tls_table(self.pki.client), devices=devices)
        self.assertEqual(sorted(tls.TLSContexts(config).clients), ["a", "b"])
        only = tls.TLSContexts(config, listeners=False, devices=["b"])
        self.assertEqual((sorted(only.clients), only.servers), (["b"], {}))


# --- contexts, handshaking in memory --------------------------------------------------------------------------


def _pump(source: SSL.Connection, target: SSL.Connection) -> int:
    moved = 0
    while True:
        try:
            data = source.bio_read(65536)
        except SSL.WantReadError:
            return moved
        target.bio_write(data)
        moved += len(data)


def handshake(server_context: SSL.Context, client_context: SSL.Context) -> Tuple[SSL.Connection, SSL.Connection]:
    """Hand-shake two memory-BIO connections, then exchange one byte each way (TLS 1.3 reports a refused
    client certificate only then).  Raises the first SSL.Error either side raises."""
    server = SSL.Connection(server_context, None)
    server.set_accept_state()
    client = SSL.Connection(client_context, None)
    client.set_connect_state()
    for _ in range(20):
        for connection in (client, server):
            try:
                connection.do_handshake()
            except SSL.WantReadError:
                pass
        if not _pump(client, server) + _pump(server, client):
            break
    client.send(b"c")
    server.send(b"s")
    for _ in range(5):
        _pump(client, server)
        _pump(server, client)
    for connection in (server, client):
        try:
            connection.recv(1)
        except SSL.WantReadError:
            raise SSL.Error([("test", "", "no application data arrived")]) from None
    return server, client


def peer_context(pki: Certificates, identity=None, *, max_version: Optional[int] = None,
                 ciphers: bytes = b"DEFAULT:@SECLEVEL=0", trust: bool = True) -> SSL.Context:
    """A plain pyOpenSSL client: ``identity``'s certificate, optionally capped at ``max_version``."""
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_VERSION)
    if max_version is not None:
        context.set_max_proto_version(max_version)
    context.set_cipher_list(ciphers)
    if identity is not None:
        context.use_certificate_file(identity.certificate_path)
        context.use_privatekey_file(identity.key_path)
    if trust:
        context.load_verify_locations(pki.ca.certificate_path)
    context.set_verify(SSL.VERIFY_NONE, lambda *args: True)
    return context


class ContextTests(unittest.SynchronousTestCase):
    """What the contexts allow, checked by real handshakes in memory."""

    def setUp(self):
        self.pki = Certificates(os.path.abspath(self.mktemp()))

    def server_context(self, identity=None, **disk) -> SSL.Context:
        config = tls_config(self, self.pki.tls_table(identity), disk=dict(disk, tls_port=2762))
        return tls.TLSContexts(config).servers["disk_server"].context

    def client_context(self, host: str, identity=None) -> SSL.Context:
        config = tls_config(self, self.pki.tls_table(identity or self.pki.client),
                            devices={"d": {"ae_title": "D", "host": host, "port": 2762, "tls": True}})
        return tls.TLSContexts(config).clients["d"].context

    def assertRefused(self, server_context, client_context, *words: str) -> SSL.Error:
        with self.assertRaises(SSL.Error) as caught:
            handshake(server_context, client_context)
        text = str(caught.exception)
        for word in words:
            self.assertIn(word, text)
        return caught.exception

    def test_tls13_preferred(self):
        """A client offering everything gets TLS 1.3 and presents its certificate."""
        server, _ = handshake(self.server_context(), peer_context(self.pki, self.pki.client))
        self.assertEqual(server.get_protocol_version_name(), "TLSv1.3")
        self.assertEqual(tls.certificate_names(compat.peer_certificate(server)), ("modality.test", "127.0.0.1"))

    def test_tls12_aead_only(self):
        """A TLS 1.2 client gets an ECDHE suite with AES-GCM or ChaCha20-Poly1305."""
        server, _ = handshake(self.server_context(), peer_context(self.pki, self.pki.client, max_version=SSL.TLS1_2_VERSION))
        self.assertEqual(server.get_protocol_version_name(), "TLSv1.2")
        self.assertIn(server.get_cipher_name(), BCP195_CIPHERS.split(":"))

    def test_tls11_refused_by_default(self):
        """A client that speaks at most TLS 1.1 is refused by the default context."""
        self.assertRefused(self.server_context(), peer_context(self.pki, self.pki.client, max_version=SSL.TLS1_1_VERSION))

    def test_cbc_refused_by_default(self):
        """A TLS 1.2 client offering only CBC suites finds nothing in common."""
        client = peer_context(self.pki, self.pki.client, max_version=SSL.TLS1_2_VERSION,
                              ciphers=b"ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384")
        self.assertRefused(self.server_context(), client)

    def test_offered_suites(self):
        """Everything the default server context enables for TLS 1.2 and below is ECDHE with an AEAD cipher;
        the rest are TLS 1.3 suites."""
        names = SSL.Connection(self.server_context(), None).get_cipher_list()
        self.assertTrue(names)
        for name in names:
            if name.startswith("TLS_"):
                continue  # TLS 1.3: AES-GCM, ChaCha20-Poly1305 (all AEAD)
            self.assertIn(name, BCP195_CIPHERS.split(":"))
        for forbidden in ("CBC", "DES", "NULL", "RC4", "MD5"):
            self.assertFalse([name for name in names if forbidden in name], forbidden)

    def test_no_renegotiation(self):
        """The contexts set OP_NO_RENEGOTIATION and OP_NO_COMPRESSION."""
        options = self.server_context().set_options(0)
        self.assertTrue(options & SSL.OP_NO_RENEGOTIATION)
        self.assertTrue(options & SSL.OP_NO_COMPRESSION)
        self.assertTrue(self.client_context("127.0.0.1").set_options(0) & SSL.OP_NO_RENEGOTIATION)

    def test_legacy_listener_allows_tls11(self):
        """minimum_version = "1.0" on the listener accepts a TLS 1.1-only client (a CBC suite, security level 0)."""
        try:
            server, _ = handshake(self.server_context(minimum_version="1.0"),
                                  peer_context(self.pki, self.pki.client, max_version=SSL.TLS1_1_VERSION))
        except SSL.Error as error:
            if "no protocols available" in str(error):
                raise unittest.SkipTest(f"this OpenSSL has no TLS 1.1 at all: {error}")
            raise
        self.assertEqual(server.get_protocol_version_name(), "TLSv1.1")
        self.assertIn(server.get_cipher_name(), LEGACY_CIPHERS.split(":"))

    def test_client_certificate_required(self):
        """Without a client certificate the default listener refuses the handshake."""
        self.assertRefused(self.server_context(), peer_context(self.pki, None))

    def test_client_certificate_optional(self):
        """require_client_certificate = false: a client without certificate is served."""
        server, _ = handshake(self.server_context(require_client_certificate=False), peer_context(self.pki, None))
        self.assertIsNone(compat.peer_certificate(server))

    def test_untrusted_client_refused(self):
        """A client certificate from another CA is refused, and the reason recorded for the log."""
        server_context = self.server_context()
        error = self.assertRefused(server_context, peer_context(self.pki, self.pki.untrusted))
        self.assertIn("certificate verify failed", tls._openssl_reasons(error))

    def test_expired_client_refused(self):
        """An expired client certificate is refused."""
        self.assertRefused(self.server_context(), peer_context(self.pki, self.pki.expired))

    def test_client_verifies_host(self):
        """Our client context accepts a server certificate naming its host, by IP or DNS name."""
        server_context = self.server_context()
        handshake(server_context, self.client_context("127.0.0.1"))
        handshake(server_context, self.client_context("localhost"))

    def test_client_refuses_other_host(self):
        """Our client context refuses a server certificate for another host; the reason names both."""
        server_context = self.server_context(self.pki.other_host)
        client_context = self.client_context("127.0.0.1")
        server = SSL.Connection(server_context, None)
        server.set_accept_state()
        client = SSL.Connection(client_context, None)
        client.set_connect_state()
        with self.assertRaises(SSL.Error):
            for _ in range(20):
                for connection in (client, server):
                    try:
                        connection.do_handshake()
                    except SSL.WantReadError:
                        pass
                if not _pump(client, server) + _pump(server, client):
                    break
        reason = tls._refusals.get(client)
        self.assertIn("is not for '127.0.0.1'", reason)
        self.assertIn("elsewhere.test", reason)

    def test_client_refuses_untrusted_server(self):
        """A server certificate our trust roots do not cover is refused by our client."""
        rogue = self.pki.issue("rogue_server", "localhost", dns=["localhost"], ips=["127.0.0.1"],
                               issuer=self.pki.rogue_ca)
        config = tls_config(self, self.pki.tls_table(rogue, require_client_certificate=False),
                            disk={"tls_port": 2762})
        server_context = tls.TLSContexts(config).servers["disk_server"].context
        self.assertRefused(server_context, self.client_context("127.0.0.1"))


# --- binding AE titles to certificates ------------------------------------------------------------------------


class BindingTests(unittest.SynchronousTestCase):
    """CertificateBinding: the calling AE title must be a device the client certificate names."""

    def setUp(self):
        self.pki = Certificates(os.path.abspath(self.mktemp()))
        config = tls_config(self, devices={
            "modality": {"ae_title": "MODALITY", "host": "10.1.1.1", "port": 104,
                         "certificate_names": ["MODALITY.test"]},
            "ct": {"ae_title": "CT", "host": "127.0.0.1", "port": 104},
            "ct_v6": {"ae_title": "CT6", "host": "0:0:0:0:0:0:0:1", "port": 104},
            "xray": {"ae_title": "XRAY", "host": "10.1.1.2", "port": 104, "certificate_names": ["xray.test"]},
        })
        self.binding = tls.CertificateBinding(config.devices.values())

    def test_certificate_names(self):
        """A certificate's names: subjectAltName DNS names, then IP addresses, then the CN."""
        self.assertEqual(tls.certificate_names(self.pki.server.certificate), ("localhost", "127.0.0.1", "::1"))
        self.assertEqual(tls.certificate_names(self.pki.client.certificate), ("modality.test", "127.0.0.1"))
        bare = self.pki.issue("bare", "cn-only.test")
        self.assertEqual(tls.certificate_names(bare.certificate), ("cn-only.test",))

    def test_certificate_names_match(self):
        """A device's certificate_names (compared without case) bind its AE title."""
        self.assertIsNone(self.binding.check("MODALITY", self.pki.client.certificate))

    def test_host_when_no_names(self):
        """Without certificate_names the device's host is the name; IP addresses compare as addresses."""
        self.assertIsNone(self.binding.check("CT", self.pki.client.certificate))
        self.assertIsNone(self.binding.check("CT6", self.pki.server.certificate))

    def test_other_device(self):
        """A certificate naming another device may not call with this one's AE title: the reason names both."""
        problem = self.binding.check("XRAY", self.pki.client.certificate)
        self.assertIn("is not one of 'XRAY'", problem)
        self.assertIn("modality.test", problem)
        self.assertIn("[devices.xray] xray.test", problem)

    def test_unknown_calling(self):
        """A calling AE title that is no device's cannot be bound."""
        self.assertIn("no configured device", self.binding.check("STRANGER", self.pki.client.certificate))

    def test_no_certificate(self):
        """No client certificate, nothing to bind."""
        self.assertIn("no client certificate", self.binding.check("MODALITY", None))

    def test_failure_words(self):
        """handshake_failure: OpenSSL's reasons from an SSL.Error; None for a failure that is not TLS."""
        error = SSL.Error([("SSL routines", "", "tlsv1 alert unknown ca"), ("SSL routines", "", "second")])
        self.assertEqual(tls.handshake_failure(None, Failure(error)), "tlsv1 alert unknown ca; second")
        self.assertIsNone(tls.handshake_failure(None, Failure(ConnectionError("closed"))))


# --- associations over TLS on 127.0.0.1 ------------------------------------------------------------------------


def acceptor_log(listening) -> list:
    """The acceptor's association log lines (our requestor's lines are collected too)."""
    return [line for line in listening.log if line.startswith("acceptor ")]


class LoopbackTLS:
    """Our acceptor (Verification) over TLS on 127.0.0.1 port 0, and our requestor as its client."""

    def __init__(self, testcase: unittest.TestCase, pki: Certificates, server_table: dict,
                 devices: Optional[dict] = None, disk: Optional[dict] = None) -> None:
        self.testcase = testcase
        self.pki = pki
        self.config = tls_config(testcase, server_table, disk={"tls_port": 2762, **(disk or {})}, devices=devices)
        self.contexts = tls.TLSContexts(self.config)
        self.factory = acceptor_factory(self.config.disk_server, self.config, [VerificationService()], reactor)
        self.listening = TLSListening(testcase, self.factory, self.contexts.servers["disk_server"], reactor)

    def client(self, client_table: dict) -> Tuple[tls.TLSContexts, configuration.DeviceConfig]:
        config = tls_config(self.testcase, client_table, devices={
            "appliance": {"ae_title": "DISK_SERVER", "host": "127.0.0.1", "port": self.listening.number,
                          "tls": True, "timeout": 10}})
        return tls.TLSContexts(config), config.device("appliance")

    def connect(self, calling: str, client_table: dict) -> defer.Deferred:
        contexts, device = self.client(client_table)
        return requestor.connect(
            reactor, device.host, device.port, calling, "DISK_SERVER", timeouts=TIMEOUTS,
            implementation_class_uid=IMPLEMENTATION_CLASS_UID, implementation_version_name=IMPLEMENTATION_VERSION_NAME,
            endpoint=contexts.client_endpoint(reactor, device, 10),
        )


class AssociationTests(unittest.TestCase):
    """Associations over TLS: the log line, binding rejections, handshake failures, reload."""

    timeout = 60

    def setUp(self):
        self.pki = Certificates(os.path.abspath(self.mktemp()))

    @deferred_test
    async def test_echo_logged_with_tls(self):
        """A C-ECHO over TLS succeeds; both sides' log lines record version, cipher and peer subject."""
        loop = LoopbackTLS(self, self.pki, self.pki.tls_table())
        association = await loop.connect("MODALITY", self.pki.tls_table(self.pki.client))
        self.assertIn("TLSv1.3", association._protocol.record.tls)
        self.assertIn("peer CN=localhost", association._protocol.record.tls)
        self.assertEqual(await association.echo(), 0)
        await association.release()
        await loop.listening.closed()
        (line,) = acceptor_log(loop.listening)
        self.assertIn("MODALITY->DISK_SERVER: released", line)
        self.assertIn("; TLS: TLSv1.3 TLS_", line)
        self.assertIn("peer CN=modality.test,O=Appliance Tests", line)

    @deferred_test
    async def test_binding(self):
        """bind_aet_to_certificate: the certificate of modality.test may call as MODALITY, not as XRAY or as
        an unknown AE (rejected 1,1,3, with the reason logged); the listener keeps serving."""
        devices = {"modality": {"ae_title": "MODALITY", "host": "10.1.1.1", "port": 104,
                                "certificate_names": ["modality.test"]},
                   "xray": {"ae_title": "XRAY", "host": "10.1.1.2", "port": 104}}
        loop = LoopbackTLS(self, self.pki, self.pki.tls_table(bind_aet_to_certificate=True), devices)
        client = self.pki.tls_table(self.pki.client)
        for calling in ("XRAY", "NOBODY"):
            with self.assertRaises(requestor.AssociationRejected) as caught:
                await loop.connect(calling, client)
            self.assertEqual(caught.exception.rejection.result, 1)
            self.assertEqual((caught.exception.rejection.source, caught.exception.rejection.reason), (1, 3))
        association = await loop.connect("MODALITY", client)
        self.assertEqual(await association.echo(), 0)
        await association.release()
        await loop.listening.closed()
        lines = acceptor_log(loop.listening)
        self.assertEqual(len(lines), 3, lines)
        rejected_xray, rejected_nobody, served = lines
        self.assertIn("XRAY->DISK_SERVER: rejected: rejected-permanent by service-user: "
                      "calling-AE-title-not-recognized (1,1,3); bind_aet_to_certificate: the client certificate", rejected_xray)
        self.assertIn("is no configured device", rejected_nobody)
        self.assertIn("MODALITY->DISK_SERVER: released", served)

    @deferred_test
    async def test_binding_not_over_plain_tcp(self):
        """The binding applies to TLS connections only: the same AE's plain port serves XRAY as before."""
        from .support import Listening

        loop = LoopbackTLS(self, self.pki, self.pki.tls_table(bind_aet_to_certificate=True),
                           {"xray": {"ae_title": "XRAY", "host": "10.1.1.2", "port": 104}})
        plain = Listening(self, loop.factory, reactor)
        association = await requestor.connect(
            reactor, "127.0.0.1", plain.number, "STRANGER", "DISK_SERVER", timeouts=TIMEOUTS,
            implementation_class_uid=IMPLEMENTATION_CLASS_UID, implementation_version_name=IMPLEMENTATION_VERSION_NAME)
        self.assertEqual(await association.echo(), 0)
        await association.release()
        await plain.closed()

    @deferred_test
    async def test_no_client_certificate(self):
        """A client without certificate: the handshake fails, our requestor says why (ConnectionFailed), the
        acceptor logs the peer and OpenSSL's reason, and then serves a good client."""
        loop = LoopbackTLS(self, self.pki, self.pki.tls_table())
        with self.assertRaises(requestor.ConnectionFailed) as caught:
            await loop.connect("MODALITY", {"ca_certificates": self.pki.ca.certificate_path})
        self.assertIn("TLS handshake failed", str(caught.exception))
        await loop.listening.closed()
        (line,) = acceptor_log(loop.listening)
        self.assertIn("TLS handshake failed: peer did not return a certificate", line)
        self.assertIn("acceptor 127.0.0.1:", line)
        association = await loop.connect("MODALITY", self.pki.tls_table(self.pki.client))
        self.assertEqual(await association.echo(), 0)
        await association.release()

    @deferred_test
    async def test_stalled_handshake(self):
        """A peer that connects to the TLS port and never hand-shakes is dropped when ARTIM expires; the log
        says so, and the listener serves the next client."""
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
        from twisted.internet.protocol import Protocol

        class Silent(Protocol):
            """Connects and says nothing."""

            def __init__(self) -> None:
                self.lost = defer.Deferred()

            def connectionLost(self, reason=None) -> None:
                self.lost.callback(None)

        loop = LoopbackTLS(self, self.pki, self.pki.tls_table(), disk={"artim_timeout": 0.2})
        silent = Silent()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", loop.listening.number, timeout=10), silent)
        await silent.lost.addTimeout(WAIT_LIMIT, reactor)
        await loop.listening.closed()
        (line,) = acceptor_log(loop.listening)
        self.assertIn("?->DISK_SERVER: provider abort: ARTIM timer expired before an A-ASSOCIATE-RQ arrived", line)
        self.assertIn("the TLS handshake did not complete", line)
        association = await loop.connect("MODALITY", self.pki.tls_table(self.pki.client))
        self.assertEqual(await association.echo(), 0)
        await association.release()

    @deferred_test
    async def test_server_for_other_host(self):
        """Our requestor refuses a server whose certificate names another host, saying which names it has."""
        loop = LoopbackTLS(self, self.pki, self.pki.tls_table(self.pki.other_host))
        with self.assertRaises(requestor.ConnectionFailed) as caught:
            await loop.connect("MODALITY", self.pki.tls_table(self.pki.client))
        self.assertIn("is not for '127.0.0.1'", str(caught.exception))
        self.assertIn("elsewhere.test", str(caught.exception))
        await loop.listening.closed()
        self.assertIn("TLS handshake failed", acceptor_log(loop.listening)[0])

    @deferred_test
    async def test_reload_keeps_established(self):
        """After a reload with a renewed certificate, an association established before it keeps working on
        its old session, and a new association gets the new certificate; a reload that fails keeps both."""
        loop = LoopbackTLS(self, self.pki, self.pki.tls_table())
        client = self.pki.tls_table(self.pki.client)
        service = tls.TLSService(loop.contexts, reactor, handle_signal=False)
        creator = loop.contexts.servers["disk_server"]
        before = creator.context

        first = await loop.connect("MODALITY", client)
        self.assertIn("peer CN=localhost,", first._protocol.record.tls)
        renewed = self.pki.issue("renewed", "localhost-renewed", dns=["localhost"], ips=["127.0.0.1"])
        shutil.copy(renewed.certificate_path, self.pki.server.certificate_path)
        shutil.copy(renewed.key_path, self.pki.server.key_path)
        self.assertTrue(service.reload())
        self.assertIsNot(creator.context, before)

        self.assertEqual(await first.echo(), 0)  # still on the old session
        second = await loop.connect("MODALITY", client)
        self.assertIn("peer CN=localhost-renewed", second._protocol.record.tls)
        self.assertEqual(await second.echo(), 0)

        with open(self.pki.server.key_path, "w") as handle:
            handle.write("broken\n")
        swapped = creator.context
        self.assertFalse(service.reload())
        self.assertIs(creator.context, swapped)
        third = await loop.connect("MODALITY", client)
        self.assertIn("peer CN=localhost-renewed", third._protocol.record.tls)
        for association in (first, second, third):
            self.assertEqual(await association.echo(), 0)
            await association.release()

    @deferred_test
    async def test_sighup_reloads(self):
        """TLSService reloads on SIGHUP (through the reactor thread) and restores the previous handler when
        stopped."""
        config = tls_config(self, self.pki.tls_table(), disk={"tls_port": 2762})
        contexts = tls.TLSContexts(config)
        previous = signal.getsignal(signal.SIGHUP)
        service = tls.TLSService(contexts, reactor)
        log = LogCollector(self, "appliance.tls")
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        self.assertNotEqual(signal.getsignal(signal.SIGHUP), previous)
        done = defer.Deferred()
        service.reloaded.append(done.callback)
        before = contexts.servers["disk_server"].context
        os.kill(os.getpid(), signal.SIGHUP)
        self.assertTrue(await done.addTimeout(WAIT_LIMIT, reactor))
        self.assertIsNot(contexts.servers["disk_server"].context, before)
        self.assertIn(("info", "TLS certificates reloaded: new connections use them, established ones keep theirs"),
                      log.lines)
        service.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), previous)


# --- the composition root -------------------------------------------------------------------------------------


class TapTests(unittest.SynchronousTestCase):
    """tap: TLS listeners beside the plain ones, their ports checked, TLS files read before anything binds."""

    def setUp(self):
        self.pki = Certificates(os.path.abspath(self.mktemp()))

    def options_for(self, tables: dict) -> tap.Options:
        options = tap.Options()
        options.parseOptions(["--config", write_file(self, toml(tables))])
        return options

    def make_service(self, options, reactor_):
        root = tap.makeService(options, reactor_)

        def close_archive():
            for service in root:
                archive = getattr(service, "archive", None)
                if archive is not None:
                    archive.close()

        self.addCleanup(close_archive)
        return root

    def test_tls_listeners(self):
        """Each AE gets a '<name>_tls' service on its tls_port serving its own AcceptorFactory behind TLS
        (the same factory as its plain port), and a 'tls' service for reloads."""
        disk, disk_tls, memory_tls = free_port(), free_port(), free_port()
        options = self.options_for({
            "appliance": {"data_dir": os.path.abspath(self.mktemp())},
            "tls": self.pki.tls_table(),
            "disk_server": {"interface": "127.0.0.1", "port": disk, "tls_port": disk_tls},
            "memory_server": {"interface": "127.0.0.1", "port": 0, "tls_port": memory_tls},
            "web": {"port": 0},
        })
        memory_reactor = MemoryReactorClock()
        root = self.make_service(options, memory_reactor)
        listeners = {s.name: s for s in root if isinstance(s, StreamServerEndpointService)}
        self.assertEqual(sorted(listeners), ["disk_server", "disk_server_tls", "memory_server_tls"])
        self.assertIsInstance(root.getServiceNamed("tls"), tls.TLSService)
        for service in listeners.values():
            service.startService()
            self.addCleanup(service.stopService)
        bound = {port: factory for port, factory, backlog, interface in memory_reactor.tcpServers}
        self.assertEqual(sorted(bound), sorted([disk, disk_tls, memory_tls]))
        self.assertIsInstance(bound[disk], AcceptorFactory)
        self.assertIsInstance(bound[disk_tls], TLSMemoryBIOFactory)
        self.assertIs(bound[disk_tls].wrappedFactory, bound[disk])
        self.assertEqual(bound[memory_tls].wrappedFactory.policy.ae_title, "MEMORY_SERVER")
        self.assertEqual(sorted(options["tls"].servers), ["disk_server", "memory_server"])

    def test_tls_port_in_use(self):
        """A TLS port already bound is reported as '[disk_server] tls_port' before anything listens."""
        import socket

        busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        path = write_file(self, toml({"tls": self.pki.tls_table(),
                                      "disk_server": {"interface": "127.0.0.1", "port": 0, "tls_port": port},
                                      "memory_server": {"port": 0, "tls_port": 0}}))
        with self.assertRaises(usage.UsageError) as caught:
            tap.Options().parseOptions(["--config", path])
        self.assertEqual(str(caught.exception), f"{path}: [disk_server] tls_port: 127.0.0.1:{port} is already in use")

    def test_bad_certificate_stops_options(self):
        """An expired certificate is a UsageError naming the configuration, the key and the certificate file."""
        path = write_file(self, toml({"tls": self.pki.tls_table(self.pki.expired),
                                      "disk_server": {"port": 0, "tls_port": free_port()},
                                      "memory_server": {"port": 0, "tls_port": 0}}))
        with self.assertRaises(usage.UsageError) as caught:
            tap.Options().parseOptions(["--config", path])
        message = str(caught.exception)
        self.assertTrue(message.startswith(f"{path}: [tls] certificate: {self.pki.expired.certificate_path}: "), message)
        self.assertIn("expired on", message)


class TwistdTLSTests(unittest.TestCase):
    """twistd itself with a bad TLS file."""

    timeout = 60

    @deferred_test
    async def test_twistd_key_mismatch(self):
        """`twistd -n appliance` whose key does not match the certificate exits 1 with one line naming the
        configuration, '[tls] private_key' and the key file."""
        pki = Certificates(os.path.abspath(self.mktemp()))
        path = write_file(self, toml({"tls": dict(pki.tls_table(), private_key=pki.client.key_path),
                                      "disk_server": {"interface": "127.0.0.1", "port": 0, "tls_port": free_port()},
                                      "memory_server": {"port": 0, "tls_port": 0}}))
        out, err, code = await run_python(TWISTD + ["-n", "--pidfile=", "appliance", "--config", path],
                                          path=os.path.dirname(path))
        self.assertEqual(code, 1, out + err)
        self.assertTrue(err.strip().startswith(f"appliance: {path}: [tls] private_key: {pki.client.key_path}: "
                                               "does not match the certificate"), err)
        self.assertNotIn("Traceback", out + err)
