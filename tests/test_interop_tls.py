"""DICOM over TLS against real peers on 127.0.0.1: DCMTK (+tls), pynetdicom with an ssl.SSLContext,
openssl s_client, and our own requestor and appliance-echo.

Certificates come from a throwaway CA made at test time (tests/support_tls.py).
Our Disk-Server runs in-process with a plain listener and a TLS listener on
port 0 over one factory; DCMTK's storescp runs as a subprocess on a free port.
Every refused peer is checked in the association log, followed by a good peer
the listener still serves.  Nothing sleeps: every wait is bounded.
"""

from __future__ import annotations

import os
import re
import ssl
from typing import Dict, List, Optional, Sequence, Tuple

from twisted.internet import defer, reactor, threads
from twisted.logger import Logger
from twisted.trial import unittest

from appliance import config as configuration
from appliance.ae.listeners import acceptor_factory, disk_server_services
from appliance.archive.archive import Archive
from appliance.config import BCP195_CIPHERS
from appliance.dicom import dimse as D
from appliance.dicom.uids import (
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    VERIFICATION,
)
from appliance.net import requestor, tls
from appliance.net.protocol import Timeouts
from appliance.net.threads import ThreadPoolService

from .support import (
    WAIT_LIMIT,
    Listening,
    deferred_test,
    free_port,
    keep_pynetdicom_reactor_off_responses,
    run_program,
    run_python,
    spawn_peer,
    write_file,
)
from .support_data import CT_IMAGE_STORAGE, encode_dataset, make_dataset, write_part10
from .support_tls import Certificates, TLSListening, connect_when_listening
from .test_interop_retrieve import STUDY, DiskServer, movescu, received_files

try:
    import pynetdicom
except ImportError:
    pynetdicom = None

ECHOSCU = "/usr/bin/echoscu"
STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
MOVESCU = "/usr/bin/movescu"
OPENSSL = "/usr/bin/openssl"

TIMEOUTS = Timeouts(artim=5.0, association=10.0, dimse=10.0, idle=None)

_log = Logger(namespace="tests.tls_probe")


def _need(*programs: str) -> Optional[str]:
    missing = [program for program in programs if not os.access(program, os.X_OK)]
    return f"not installed: {', '.join(missing)}" if missing else None


def acceptor_log(listening) -> List[str]:
    return [line for line in listening.log if line.startswith("acceptor ")]


class TLSDiskServer(DiskServer):
    """The Disk-Server over a fresh archive with ``[tls]`` configured: a plain and a TLS listener on
    127.0.0.1 port 0 serving one factory, and TLS contexts for the devices with ``tls = true``."""

    def __init__(self, testcase: unittest.TestCase, pki: Certificates, devices: Optional[Dict[str, dict]] = None,
                 tls_table: Optional[dict] = None, **disk) -> None:
        self.root = os.path.abspath(testcase.mktemp())
        os.makedirs(self.root)
        self.pki = pki
        self.config = configuration.parse(
            {
                "appliance": {"data_dir": self.root},
                "tls": tls_table if tls_table is not None else pki.tls_table(),
                "disk_server": {"interface": "127.0.0.1", "port": 0, "tls_port": 2762, "timeout": 20,
                                "min_free_space": 0, **disk},
                "memory_server": {"port": 0, "tls_port": 0},
                "devices": devices or {},
            },
            os.path.join(self.root, "appliance.toml"),
        )
        self.contexts = tls.TLSContexts(self.config)
        self.io = ThreadPoolService(reactor, "test-archive-io", max_threads=4)
        self.db = ThreadPoolService(reactor, "test-archive-db", max_threads=1)
        self.io.startService()
        self.db.startService()
        self.archive = Archive(self.config.archive.path, self.config.archive.limits,
                               self.config.archive.on_duplicate, reactor, self.io.runner, self.db.runner)
        testcase.addCleanup(self.archive.close)
        testcase.addCleanup(self.db.stopService)
        testcase.addCleanup(self.io.stopService)
        self.factory = acceptor_factory(self.config.disk_server, self.config,
                                        disk_server_services(self.config, self.archive, tls=self.contexts), reactor)
        self.listening = Listening(testcase, self.factory, reactor)
        self.port = self.listening.number
        self.secure = TLSListening(testcase, self.factory, self.contexts.servers["disk_server"], reactor)
        self.tls_port = self.secure.number


def dcmtk_tls(pki: Certificates, identity=None) -> List[str]:
    """DCMTK's TLS options: our identity (default the client certificate) and the test CA as trust root."""
    identity = identity or pki.client
    return ["+tls", identity.key_path, identity.certificate_path, "+cf", pki.ca.certificate_path]


def echoscu(port: int, *options: str) -> defer.Deferred:
    """echoscu (debug output) against 127.0.0.1:port; fires with (output, exit code)."""
    args = ["-d", "-to", "10", "-ta", "10", "-td", "10", *options, "127.0.0.1", str(port)]
    return run_program(ECHOSCU, args).addCallback(lambda result: (result[0] + result[1], result[2]))


class EchoscuTLSTests(unittest.TestCase):
    """DCMTK echoscu +tls against the Disk-Server's TLS listener; the refused ones, and the listener going on."""

    timeout = 60
    skip = _need(ECHOSCU)

    def setUp(self):
        self.pki = Certificates(os.path.abspath(self.mktemp()))

    async def assertServes(self, server: TLSDiskServer) -> None:
        """A good echoscu +tls still gets Success."""
        output, code = await echoscu(server.tls_port, *dcmtk_tls(self.pki), "-aet", "MODALITY", "-aec", "DISK_SERVER")
        self.assertEqual(code, 0, output)
        self.assertIn("Received Echo Response (Success)", output)

    async def refused(self, server: TLSDiskServer, *options: str) -> str:
        """Run a refused echoscu, then a good one; return the refused one's acceptor log line."""
        output, code = await echoscu(server.tls_port, *options, "-aec", "DISK_SERVER")
        self.assertNotEqual(code, 0, output)
        await server.secure.closed()
        lines = acceptor_log(server.secure)
        await self.assertServes(server)
        await server.secure.closed()
        self.assertEqual(len(acceptor_log(server.secure)), len(lines) + 1)
        self.assertIn("MODALITY->DISK_SERVER: released", acceptor_log(server.secure)[-1])
        return lines[-1]

    @deferred_test
    async def test_echo(self):
        """echoscu +tls with a client certificate: Success, and the log line records TLS 1.2 or 1.3, an AEAD
        suite and the client's subject."""
        server = TLSDiskServer(self, self.pki)
        await self.assertServes(server)
        await server.secure.closed()
        (line,) = acceptor_log(server.secure)
        self.assertRegex(line, r"; TLS: TLSv1\.[23] (TLS_AES_\d+_GCM_SHA\d+|TLS_CHACHA20_POLY1305_SHA256|"
                               r"ECDHE-\w+-(AES\d+-GCM-SHA\d+|CHACHA20-POLY1305)), peer CN=modality\.test")

    @deferred_test
    async def test_no_client_certificate(self):
        """echoscu with TLS but no certificate (+tla) is refused: 'peer did not return a certificate'."""
        server = TLSDiskServer(self, self.pki)
        line = await self.refused(server, "+tla", "+cf", self.pki.ca.certificate_path)
        self.assertIn("TLS handshake failed: peer did not return a certificate", line)

    @deferred_test
    async def test_untrusted_client(self):
        """A client certificate from another CA is refused with OpenSSL's verification error."""
        server = TLSDiskServer(self, self.pki)
        line = await self.refused(server, *dcmtk_tls(self.pki, self.pki.untrusted))
        self.assertIn("TLS handshake failed: certificate verify failed: unable to get local issuer certificate", line)

    @deferred_test
    async def test_expired_client(self):
        """An expired client certificate is refused: 'certificate has expired'."""
        server = TLSDiskServer(self, self.pki)
        line = await self.refused(server, *dcmtk_tls(self.pki, self.pki.expired))
        self.assertIn("TLS handshake failed: certificate verify failed: certificate has expired", line)

    @deferred_test
    async def test_plain_dicom_on_tls_port(self):
        """A plain-TCP association on the TLS port fails the handshake; the plain port serves it."""
        server = TLSDiskServer(self, self.pki)
        line = await self.refused(server)
        self.assertIn("TLS handshake failed", line)
        output, code = await echoscu(server.port, "-aec", "DISK_SERVER")
        self.assertEqual(code, 0, output)

    @deferred_test
    async def test_bound_calling_ae_title(self):
        """bind_aet_to_certificate: the client certificate (modality.test) may call as MODALITY; calling as CT
        is rejected 'Calling AE Title Not Recognized' with the reason logged."""
        devices = {"modality": {"ae_title": "MODALITY", "host": "modality.test", "port": 104},
                   "ct": {"ae_title": "CT", "host": "10.9.9.9", "port": 104}}
        server = TLSDiskServer(self, self.pki, devices, bind_aet_to_certificate=True)
        output, code = await echoscu(server.tls_port, *dcmtk_tls(self.pki), "-aet", "CT", "-aec", "DISK_SERVER")
        self.assertNotEqual(code, 0, output)
        self.assertIn("Calling AE Title Not Recognized", output)
        await self.assertServes(server)
        await server.secure.closed()
        rejected, served = acceptor_log(server.secure)
        self.assertIn("CT->DISK_SERVER: rejected: rejected-permanent by service-user: "
                      "calling-AE-title-not-recognized (1,1,3); bind_aet_to_certificate", rejected)
        self.assertIn("[devices.ct] 10.9.9.9", rejected)
        self.assertIn("MODALITY->DISK_SERVER: released", served)


class StorescuTLSTests(unittest.TestCase):
    """DCMTK storescu +tls stores into the Disk-Server's archive."""

    timeout = 60
    skip = _need(STORESCU)

    @deferred_test
    async def test_store(self):
        """storescu +tls sends a CT image: stored (the index has it, with the data set bytes as sent)."""
        pki = Certificates(os.path.abspath(self.mktemp()))
        server = TLSDiskServer(self, pki)
        ds = make_dataset(study="1.2.826.0.1.3680043.9.7002", series="1.2.826.0.1.3680043.9.7002.1",
                          sop="1.2.826.0.1.3680043.9.7002.1.1")
        path = write_part10(os.path.join(server.root, "ct.dcm"), ds, EXPLICIT_VR_LITTLE_ENDIAN)
        out, err, code = await run_program(STORESCU, ["-to", "10", "-ta", "10", "-td", "10", *dcmtk_tls(pki),
                                                      "-aet", "MODALITY", "-aec", "DISK_SERVER", "127.0.0.1",
                                                      str(server.tls_port), path])
        self.assertEqual(code, 0, out + err)
        row = await server.archive.db(server.archive.index.lookup, ds.SOPInstanceUID)
        self.assertIsNotNone(row)
        with open(server.archive.store.absolute(row.path), "rb") as handle:
            stored = handle.read()
        self.assertTrue(stored.endswith(encode_dataset(ds, EXPLICIT_VR_LITTLE_ENDIAN)))
        await server.secure.closed()
        (line,) = acceptor_log(server.secure)
        self.assertIn("MODALITY->DISK_SERVER: released", line)
        self.assertIn("; TLS: TLSv1.", line)


# --- openssl s_client: what the listener offers ---------------------------------------------------------------


class Probe:
    """openssl s_client (-brief) runs against one TLS port, presenting the client certificate."""

    def __init__(self, testcase: unittest.TestCase, pki: Certificates, port: int) -> None:
        self.testcase = testcase
        self.pki = pki
        self.port = port

    async def run(self, *options: str) -> Tuple[Optional[str], Optional[str], str]:
        """(protocol version, cipher) of the handshake, or (None, None) when refused; and the output."""
        argv = [OPENSSL, "s_client", "-brief", "-connect", f"127.0.0.1:{self.port}",
                "-cert", self.pki.client.certificate_path, "-key", self.pki.client.key_path,
                "-CAfile", self.pki.ca.certificate_path, *options]
        peer = spawn_peer(self.testcase, argv)  # stdin closed: s_client ends after the handshake
        await peer.ended.addTimeout(WAIT_LIMIT, reactor)
        text = peer.text()
        version = re.search(r"^Protocol version: (\S+)", text, re.M)
        cipher = re.search(r"^Ciphersuite: (\S+)", text, re.M)
        if version is None or cipher is None:
            return None, None, text
        return version.group(1), cipher.group(1), text

    async def accepted_suites(self, version_option: str, suite_option: str, candidates: Sequence[str]) -> List[str]:
        """Every candidate suite the server accepts, in the server's order of preference: offer them all,
        note the one chosen, offer the rest again, until the handshake fails."""
        remaining = list(candidates)
        chosen: List[str] = []
        while remaining:
            suites = ":".join(remaining) + (":@SECLEVEL=0" if suite_option == "-cipher" else "")
            _, cipher, _ = await self.run(version_option, suite_option, suites)
            if cipher is None or cipher not in remaining:
                break
            chosen.append(cipher)
            remaining.remove(cipher)
        return chosen


async def _openssl_ciphers(*args: str) -> List[str]:
    out, err, code = await run_program(OPENSSL, ["ciphers", *args])
    if code != 0:
        raise AssertionError(f"openssl ciphers {' '.join(args)}: {err}")
    return [name for name in out.strip().split(":") if name]


class OpensslProbeTests(unittest.TestCase):
    """openssl s_client records which versions and cipher suites the default TLS listener offers."""

    timeout = 120
    skip = _need(OPENSSL)

    @deferred_test
    async def test_default_profile(self):
        """By default: TLS 1.2 and 1.3 only (1.0 and 1.1 refused, and logged), TLS 1.2 suites only ECDHE with
        AES-GCM or ChaCha20-Poly1305 (no CBC, no RSA key exchange, no 3DES, no NULL), with an ECDSA and an RSA
        certificate.  The findings are logged (namespace tests.tls_probe) and written to tls-probe.txt."""
        pki = Certificates(os.path.abspath(self.mktemp()))
        findings: List[str] = []
        every_tls12 = await _openssl_ciphers("-s", "-tls1_2", "ALL:COMPLEMENTOFALL:@SECLEVEL=0")
        tls13 = await _openssl_ciphers("-s", "-tls1_3")
        tls13 = [name for name in tls13 if name.startswith("TLS_")]
        for label, identity in (("ECDSA P-256", pki.server), ("RSA 2048", pki.rsa_server())):
            server = TLSDiskServer(self, pki, tls_table=pki.tls_table(identity))
            probe = Probe(self, pki, server.tls_port)
            versions = {}
            for option in ("-tls1", "-tls1_1", "-tls1_2", "-tls1_3"):
                extra = ["-cipher", "DEFAULT:@SECLEVEL=0"] if option in ("-tls1", "-tls1_1") else []
                version, cipher, text = await probe.run(option, *extra)
                versions[option] = version
            self.assertEqual(versions, {"-tls1": None, "-tls1_1": None, "-tls1_2": "TLSv1.2", "-tls1_3": "TLSv1.3"})
            tls12_suites = await probe.accepted_suites("-tls1_2", "-cipher", every_tls12)
            tls13_suites = await probe.accepted_suites("-tls1_3", "-ciphersuites", tls13)
            self.assertTrue(tls12_suites)
            self.assertTrue(tls13_suites)
            for name in tls12_suites:
                self.assertIn(name, BCP195_CIPHERS.split(":"))
                self.assertNotIn("CBC", name)
                self.assertTrue(name.startswith("ECDHE-"), name)
            expected_key = "ECDSA" if "ECDSA" in label else "RSA"
            self.assertTrue(all(name.startswith(f"ECDHE-{expected_key}-") for name in tls12_suites), tls12_suites)
            await server.secure.closed()
            refused = [line for line in acceptor_log(server.secure) if "TLS handshake failed" in line]
            self.assertGreaterEqual(len(refused), 2, acceptor_log(server.secure))
            self.assertTrue(any("unsupported protocol" in line for line in refused), refused)
            findings.append(f"{label} certificate: versions accepted {sorted(v for v in versions.values() if v)}, "
                            f"TLS 1.0/1.1 refused; TLS 1.2 suites in server order: {', '.join(tls12_suites)}; "
                            f"TLS 1.3 suites: {', '.join(tls13_suites)}")
        with open(os.path.join(os.path.abspath(self.mktemp()) + "-tls-probe.txt"), "w") as handle:
            handle.write("\n".join(findings) + "\n")
        for line in findings:
            _log.info("s_client probe: {line}", line=line)

    @deferred_test
    async def test_legacy_listener(self):
        """A listener with minimum_version = "1.0" accepts a TLS 1.1 client (a CBC suite): the operator's
        explicit choice, for that listener only."""
        pki = Certificates(os.path.abspath(self.mktemp()))
        server = TLSDiskServer(self, pki, minimum_version="1.0")
        version, cipher, text = await Probe(self, pki, server.tls_port).run("-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0")
        if version is None and "no protocols available" in text:
            raise unittest.SkipTest(f"openssl here cannot speak TLS 1.1: {text}")
        self.assertEqual(version, "TLSv1.1", text)
        self.assertTrue(cipher.endswith("-SHA"), cipher)


# --- pynetdicom with ssl.SSLContext ----------------------------------------------------------------------------


def _pynetdicom_tls_echo(port: int, context: ssl.SSLContext) -> dict:
    """pynetdicom's blocking SCU over TLS (in a thread): associate, C-ECHO, release."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="PYNETDICOM")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="DISK_SERVER", tls_args=(context, "localhost"))
        if not assoc.is_established:
            return {"established": False}
        keep_pynetdicom_reactor_off_responses(assoc)
        status = assoc.send_c_echo()
        assoc.release()
        return {"established": True, "status": getattr(status, "Status", None)}
    finally:
        ae.shutdown()


class PynetdicomTLSTests(unittest.TestCase):
    """pynetdicom's requestor with an ssl.SSLContext against the TLS listener."""

    timeout = 60
    skip = None if pynetdicom is not None else "pynetdicom is not installed"

    def setUp(self):
        self.pki = Certificates(os.path.abspath(self.mktemp()))

    def context(self, identity=None, maximum: Optional[ssl.TLSVersion] = None) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(self.pki.ca.certificate_path)
        if identity is not None:
            context.load_cert_chain(identity.certificate_path, identity.key_path)
        if maximum is not None:
            context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
            context.maximum_version = maximum
            context.set_ciphers("DEFAULT:@SECLEVEL=0")
        return context

    @deferred_test
    async def test_echo(self):
        """pynetdicom with a client certificate and our CA (verifying 'localhost'): Success."""
        server = TLSDiskServer(self, self.pki)
        result = await threads.deferToThread(_pynetdicom_tls_echo, server.tls_port, self.context(self.pki.client))
        self.assertEqual(result, {"established": True, "status": 0})
        await server.secure.closed()
        self.assertIn("PYNETDICOM->DISK_SERVER: released", acceptor_log(server.secure)[0])

    @deferred_test
    async def test_tls11_only_refused(self):
        """pynetdicom capped at TLS 1.1 gets no association; the log says why; a good client follows."""
        server = TLSDiskServer(self, self.pki)
        try:
            old = self.context(self.pki.client, ssl.TLSVersion.TLSv1_1)
        except ssl.SSLError as error:
            raise unittest.SkipTest(f"this Python's ssl cannot be capped at TLS 1.1: {error}")
        result = await threads.deferToThread(_pynetdicom_tls_echo, server.tls_port, old)
        self.assertEqual(result, {"established": False})
        await server.secure.closed()
        self.assertIn("TLS handshake failed", acceptor_log(server.secure)[0])
        result = await threads.deferToThread(_pynetdicom_tls_echo, server.tls_port, self.context(self.pki.client))
        self.assertEqual(result["status"], 0)


# --- our requestor against storescp +tls --------------------------------------------------------------------


class StorescpTLSTests(unittest.TestCase):
    """Our requestor, appliance-echo and C-MOVE sub-operations against DCMTK's storescp +tls."""

    timeout = 90
    skip = _need(STORESCP)

    def setUp(self):
        self.pki = Certificates(os.path.abspath(self.mktemp()))

    def storescp(self, identity=None, *options: str):
        """storescp +tls (AE DEST, bit-preserving, client certificates required) on a free port."""
        port = free_port()
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        identity = identity or self.pki.server
        peer = spawn_peer(self, [STORESCP, "+B", "-aet", "DEST", "-od", folder,
                                 "+tls", identity.key_path, identity.certificate_path,
                                 "+cf", self.pki.ca.certificate_path, *options, str(port)], path=folder)
        return peer, port, folder

    def device(self, port: int, host: str = "127.0.0.1") -> dict:
        return {"ae_title": "DEST", "host": host, "port": port, "tls": True, "timeout": 10}

    def client(self, port: int, host: str = "127.0.0.1") -> Tuple[tls.TLSContexts, configuration.DeviceConfig]:
        from .support_tls import tls_config

        config = tls_config(self, self.pki.tls_table(self.pki.client), devices={"dest": self.device(port, host)})
        return tls.TLSContexts(config), config.device("dest")

    def connect(self, port: int, host: str = "127.0.0.1", contexts=((VERIFICATION, (EXPLICIT_VR_LITTLE_ENDIAN,)),)):
        tls_contexts, device = self.client(port, host)
        return requestor.connect(
            reactor, device.host, device.port, "APPLIANCE", "DEST", contexts, timeouts=TIMEOUTS,
            implementation_class_uid=IMPLEMENTATION_CLASS_UID, implementation_version_name=IMPLEMENTATION_VERSION_NAME,
            endpoint=tls_contexts.client_endpoint(reactor, device, 10),
        )

    @deferred_test
    async def test_requestor_store(self):
        """Our requestor opens a TLS association to storescp +tls (verifying its certificate, presenting ours),
        C-STOREs a data set, and storescp writes it exactly as sent."""
        peer, port, folder = self.storescp()
        contexts = ((VERIFICATION, (EXPLICIT_VR_LITTLE_ENDIAN,)), (CT_IMAGE_STORAGE, (EXPLICIT_VR_LITTLE_ENDIAN,)))
        association = await connect_when_listening(reactor, lambda: self.connect(port, contexts=contexts), peer)
        self.assertIn("peer CN=localhost", association._protocol.record.tls)
        ds = make_dataset(sop="1.2.826.0.1.3680043.9.7003.1")
        data = encode_dataset(ds, EXPLICIT_VR_LITTLE_ENDIAN)
        command = D.Command(CommandField=D.CommandField.C_STORE_RQ, AffectedSOPClassUID=CT_IMAGE_STORAGE,
                            AffectedSOPInstanceUID=ds.SOPInstanceUID, Priority=0)
        response = await association.request(CT_IMAGE_STORAGE, command, data).final()
        self.assertEqual(response.status, 0x0000)
        await association.release()
        received = received_files(folder)
        self.assertEqual(list(received), [ds.SOPInstanceUID], peer.text())
        with open(received[ds.SOPInstanceUID], "rb") as handle:
            self.assertTrue(handle.read().endswith(data))

    @deferred_test
    async def test_appliance_echo(self):
        """appliance-echo on a device with tls = true: exit 0, Success, 'TLS' in its words."""
        peer, port, folder = self.storescp()
        probe = await connect_when_listening(reactor, lambda: self.connect(port), peer)
        await probe.release()
        path = write_file(self, "[appliance]\nae_title = \"APPLIANCE\"\n"
                                "[disk_server]\nport = 0\n[memory_server]\nport = 0\n"
                                f"[tls]\ncertificate = \"{self.pki.client.certificate_path}\"\n"
                                f"private_key = \"{self.pki.client.key_path}\"\n"
                                f"ca_certificates = \"{self.pki.ca.certificate_path}\"\n"
                                f"[devices.dest]\nae_title = \"DEST\"\nhost = \"localhost\"\nport = {port}\n"
                                "tls = true\ntimeout = 10\n")
        out, err, code = await run_python(["-m", "appliance.cli.echo", "--config", path, "dest"])
        self.assertEqual(code, 0, out + err)
        self.assertIn(f"dest (DEST at localhost:{port}, TLS): C-ECHO 0x0000 Success", out)

    @deferred_test
    async def test_peer_names_other_host(self):
        """storescp presenting a certificate for another host: our requestor refuses the handshake (saying which
        names the certificate has), and appliance-echo exits 3 with that reason."""
        peer, port, folder = self.storescp(self.pki.other_host)
        with self.assertRaises(requestor.ConnectionFailed) as caught:
            await connect_when_listening(reactor, lambda: self.connect(port), peer)
        self.assertIn("TLS handshake failed: certificate verify failed: the certificate (CN=elsewhere.test",
                      str(caught.exception))
        self.assertIn("is not for '127.0.0.1'", str(caught.exception))
        path = write_file(self, "[disk_server]\nport = 0\n[memory_server]\nport = 0\n"
                                f"[tls]\ncertificate = \"{self.pki.client.certificate_path}\"\n"
                                f"private_key = \"{self.pki.client.key_path}\"\n"
                                f"ca_certificates = \"{self.pki.ca.certificate_path}\"\n"
                                f"[devices.dest]\nae_title = \"DEST\"\nhost = \"127.0.0.1\"\nport = {port}\n"
                                "tls = true\ntimeout = 10\n")
        out, err, code = await run_python(["-m", "appliance.cli.echo", "--config", path, "dest"])
        self.assertEqual(code, 3, out + err)
        self.assertIn("is not for '127.0.0.1'", err)

    async def _move(self, identity=None):
        peer, port, folder = self.storescp(identity)
        server = TLSDiskServer(self, self.pki, {"dest": self.device(port)})
        if identity is None:
            probe = await connect_when_listening(reactor, lambda: self.connect(port), peer)
            await probe.release()
        else:
            with self.assertRaises(requestor.ConnectionFailed):
                await connect_when_listening(reactor, lambda: self.connect(port), peer)
        paths = await server.fill()
        return server, folder, paths

    @deferred_test
    async def test_move_to_tls_destination(self):
        """movescu asks the Disk-Server (plain port) to move a study to storescp +tls (a device with tls = true):
        the sub-association is TLS, every instance arrives byte for byte, final Success."""
        if _need(MOVESCU):
            raise unittest.SkipTest(_need(MOVESCU))
        from .support_data import dataset_bytes

        server, folder, paths = await self._move()
        run = await movescu(server, "DEST", "STUDY", StudyInstanceUID=STUDY)
        self.assertEqual(run.final["status"], 0x0000, run.output)
        self.assertEqual(run.final["Completed"], 3)
        received = received_files(folder)
        self.assertEqual(sorted(received), sorted(paths))
        for sop, path in paths.items():
            self.assertEqual(dataset_bytes(received[sop]), dataset_bytes(path), sop)

    @deferred_test
    async def test_move_to_destination_naming_other_host(self):
        """A TLS destination whose certificate names another host: nothing is sent, C000 with the TLS failure
        as comment."""
        if _need(MOVESCU):
            raise unittest.SkipTest(_need(MOVESCU))
        server, folder, paths = await self._move(self.pki.other_host)
        run = await movescu(server, "DEST", "STUDY", StudyInstanceUID=STUDY)
        self.assertEqual(run.statuses, [0xC000], run.output)
        self.assertIn("TLS handshake failed", run.output)
        self.assertEqual((run.final["Completed"], run.final["Failed"]), (0, 3))
        self.assertEqual(os.listdir(folder), [])
