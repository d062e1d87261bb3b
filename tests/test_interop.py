"""Interoperability with real peers on 127.0.0.1: DCMTK's tools, pynetdicom, and our own CLI.

Our acceptor runs in-process on port 0; peers run as subprocesses (or, for
pynetdicom, in a thread) while trial's reactor runs.  Nothing sleeps: every
wait is a Deferred, bounded by a count of attempts or a timeout.
"""

from __future__ import annotations

import os
from typing import List, Optional

from twisted.internet import defer, reactor, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.trial import unittest

from appliance import config as configuration
from appliance.ae.listeners import acceptor_factory
from appliance.ae.verification import VerificationService
from appliance.dicom.uids import (
    EXPLICIT_VR_BIG_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    IMPLICIT_VR_LITTLE_ENDIAN,
    VERIFICATION,
)
from appliance.net import requestor
from appliance.net.protocol import Timeouts

from .support import (
    WAIT_LIMIT,
    Listening,
    connect_when_listening,
    deferred_test,
    free_port,
    keep_pynetdicom_reactor_off_responses,
    run_program,
    run_python,
    spawn_peer,
    write_file,
)

try:
    import pynetdicom
except ImportError:
    pynetdicom = None

DCMTK = "/usr/bin"
ECHOSCU = os.path.join(DCMTK, "echoscu")
STORESCP = os.path.join(DCMTK, "storescp")
DCMQRSCP = os.path.join(DCMTK, "dcmqrscp")

#: DCMTK's implementation class UIDs all start with the OFFIS root.
DCMTK_UID_ROOT = "1.2.276.0.7230010.3."

#: An A-ABORT PDU from the service provider, reason 'unrecognized PDU' (PS3.8 9.3.8).
ABORT_UNRECOGNIZED_PDU = bytes.fromhex("07 00 00000004 0000 02 01")

#: Short timeouts for our requestor: a test must not wait 30 s for a broken peer.
TIMEOUTS = Timeouts(artim=5.0, association=10.0, dimse=10.0, idle=None)


def _need(*programs: str) -> Optional[str]:
    missing = [program for program in programs if not os.access(program, os.X_OK)]
    return f"DCMTK not installed ({', '.join(missing)} missing)" if missing else None


def start_acceptor(testcase: unittest.TestCase, **settings) -> Listening:
    """The Disk-Server AE (its Verification service), configured through appliance.config.parse,
    listening on 127.0.0.1 port 0."""
    table = {"interface": "127.0.0.1", "port": 0, "timeout": 10, "artim_timeout": 5}
    table.update(settings)
    config = configuration.parse(
        {"disk_server": table, "memory_server": {"port": 0}}, os.path.abspath(testcase.mktemp())
    )
    factory = acceptor_factory(config.disk_server, config, [VerificationService()], reactor)
    return Listening(testcase, factory, reactor)


def echoscu(port: int, *options: str) -> defer.Deferred:
    """Run echoscu in debug mode against 127.0.0.1:port; fires with (output, exit code)."""
    args = ["-d", "-to", "10", "-ta", "10", "-td", "10", *options, "127.0.0.1", str(port)]
    return run_program(ECHOSCU, args).addCallback(lambda result: (result[0] + result[1], result[2]))


class EchoscuTests(unittest.TestCase):
    """DCMTK echoscu against our Disk-Server AE."""

    timeout = 60
    skip = _need(ECHOSCU)

    async def _echo_with(self, proposed: int, expected_name: str, expected_uid_name: str) -> None:
        listening = start_acceptor(self)
        output, code = await echoscu(listening.number, "-aec", "DISK_SERVER", "-pts", str(proposed))
        self.assertEqual(code, 0, output)
        self.assertIn(f"Accepted Transfer Syntax: ={expected_name}", output)
        self.assertIn("Received Echo Response (Success)", output)
        await listening.closed()
        self.assertEqual(len(listening.log), 1, listening.log)
        line = listening.log[0]
        self.assertIn("ECHOSCU->DISK_SERVER: released", line)
        self.assertIn(f"accepted [#1 Verification SOP Class accepted with {expected_uid_name}]", line)

    @deferred_test
    async def test_implicit_little_endian(self):
        """echoscu proposing only Implicit VR Little Endian (-pts 1) gets it, and Success."""
        await self._echo_with(1, "LittleEndianImplicit", "Implicit VR Little Endian")

    @deferred_test
    async def test_explicit_little_endian(self):
        """echoscu proposing implicit and explicit little endian (-pts 2) gets Explicit VR Little Endian."""
        await self._echo_with(2, "LittleEndianExplicit", "Explicit VR Little Endian")

    @deferred_test
    async def test_explicit_big_endian(self):
        """echoscu proposing all three uncompressed syntaxes (-pts 3) gets Explicit VR Big Endian,
        the statement's first choice."""
        await self._echo_with(3, "BigEndianExplicit", "Explicit VR Big Endian")

    @deferred_test
    async def test_wrong_called_ae_title(self):
        """A wrong called AE title is rejected: echoscu fails and reports Called AE Title Not Recognized."""
        listening = start_acceptor(self)
        output, code = await echoscu(listening.number, "-aec", "WRONG")
        self.assertNotEqual(code, 0, output)
        self.assertIn("Called AE Title Not Recognized", output)
        await listening.closed()
        self.assertIn("ECHOSCU->WRONG: rejected: rejected-permanent by service-user: "
                      "called-AE-title-not-recognized (1,1,7)", listening.log[0])

    @deferred_test
    async def test_calling_ae_title_not_allowed(self):
        """A calling AE title outside allowed_calling_aets is rejected; one inside it is served."""
        listening = start_acceptor(self, allowed_calling_aets=["FRIEND"])
        output, code = await echoscu(listening.number, "-aec", "DISK_SERVER", "-aet", "STRANGER")
        self.assertNotEqual(code, 0, output)
        self.assertIn("Calling AE Title Not Recognized", output)
        output, code = await echoscu(listening.number, "-aec", "DISK_SERVER", "-aet", "FRIEND")
        self.assertEqual(code, 0, output)
        self.assertIn("Received Echo Response (Success)", output)
        await listening.closed()
        self.assertEqual(len(listening.log), 2, listening.log)
        self.assertIn("calling-AE-title-not-recognized (1,1,3)", listening.log[0])
        self.assertIn("FRIEND->DISK_SERVER: released", listening.log[1])

    @deferred_test
    async def test_garbage_then_good_association(self):
        """Bytes that are no PDU get an A-ABORT (unrecognized PDU) and a closed connection;
        the AE then serves echoscu normally."""
        listening = start_acceptor(self)

        class Garbage(Protocol):
            def __init__(self) -> None:
                self.received = b""
                self.lost = defer.Deferred()

            def connectionMade(self) -> None:
                self.transport.write(b"GET / HTTP/1.0\r\n\r\n")

            def dataReceived(self, data: bytes) -> None:
                self.received += data
                if len(self.received) >= len(ABORT_UNRECOGNIZED_PDU):
                    self.transport.loseConnection()

            def connectionLost(self, reason=None) -> None:
                self.lost.callback(None)

        client = Garbage()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", listening.number, timeout=10), client)
        await client.lost.addTimeout(WAIT_LIMIT, reactor)
        self.assertEqual(client.received, ABORT_UNRECOGNIZED_PDU)
        await listening.closed()
        self.assertIn("provider abort: invalid PDU received: unrecognised PDU type 0x47", listening.log[0])
        self.assertEqual((listening.factory.connections, listening.factory.associations), (0, 0))

        output, code = await echoscu(listening.number, "-aec", "DISK_SERVER")
        self.assertEqual(code, 0, output)
        self.assertIn("Received Echo Response (Success)", output)
        await listening.closed()
        self.assertIn("ECHOSCU->DISK_SERVER: released", listening.log[1])
        self.assertEqual((listening.factory.connections, listening.factory.associations), (0, 0))


def _pynetdicom_echo(port: int, transfer_syntaxes: Optional[List[str]] = None) -> dict:
    """pynetdicom's blocking SCU (run in a thread): associate, C-ECHO, release."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="PYNETDICOM")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    if transfer_syntaxes is None:
        ae.add_requested_context(Verification)
    else:
        ae.add_requested_context(Verification, transfer_syntaxes)
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="DISK_SERVER")
        if not assoc.is_established:
            return {"established": False}
        keep_pynetdicom_reactor_off_responses(assoc)
        status = assoc.send_c_echo()
        accepted = [(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts]
        peer_uid = assoc.acceptor.implementation_class_uid
        assoc.release()
        return {
            "established": True,
            "status": getattr(status, "Status", None),
            "accepted": accepted,
            "released": assoc.is_released,
            "peer_uid": str(peer_uid),
        }
    finally:
        ae.shutdown()


class PynetdicomTests(unittest.TestCase):
    """pynetdicom as requestor against our acceptor, and as acceptor for our requestor."""

    timeout = 60
    skip = None if pynetdicom is not None else "pynetdicom is not installed"

    @deferred_test
    async def test_echo(self):
        """pynetdicom's C-ECHO with its default proposal succeeds, and the association is released."""
        listening = start_acceptor(self)
        result = await threads.deferToThread(_pynetdicom_echo, listening.number)
        self.assertEqual(result["established"], True)
        self.assertEqual(result["status"], 0x0000)
        self.assertEqual(result["released"], True)
        self.assertEqual(result["peer_uid"], IMPLEMENTATION_CLASS_UID)
        await listening.closed()
        self.assertIn("PYNETDICOM->DISK_SERVER: released", listening.log[0])

    @deferred_test
    async def test_big_endian_preferred(self):
        """Proposing implicit LE, explicit LE and explicit BE (in that order) gets explicit BE accepted."""
        listening = start_acceptor(self)
        proposed = [IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN]
        result = await threads.deferToThread(_pynetdicom_echo, listening.number, proposed)
        self.assertEqual(result["accepted"], [(VERIFICATION, EXPLICIT_VR_BIG_ENDIAN)])
        self.assertEqual(result["status"], 0x0000)
        await listening.closed()

    @deferred_test
    async def test_little_endian_when_big_not_proposed(self):
        """Without big endian in the proposal, explicit LE ranks before implicit LE."""
        listening = start_acceptor(self)
        proposed = [IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN]
        result = await threads.deferToThread(_pynetdicom_echo, listening.number, proposed)
        self.assertEqual(result["accepted"], [(VERIFICATION, EXPLICIT_VR_LITTLE_ENDIAN)])
        await listening.closed()

    @deferred_test
    async def test_our_requestor_against_pynetdicom(self):
        """Our requestor echoes pynetdicom's Verification SCP and releases."""
        from pynetdicom import AE
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title="PYNETSCP")
        ae.add_supported_context(Verification)
        server = ae.start_server(("127.0.0.1", 0), block=False)
        self.addCleanup(threads.deferToThread, ae.shutdown)
        port = server.server_address[1]
        association = await _connect(port, "PYNETSCP")
        self.assertEqual(await association.echo(), 0x0000)
        await association.release()
        self.assertFalse(association.is_open)
        self.assertEqual(association.negotiated.peer_implementation_class_uid, pynetdicom.PYNETDICOM_IMPLEMENTATION_UID)
        self.assertEqual(association.negotiated.context_for(VERIFICATION).transfer_syntax, IMPLICIT_VR_LITTLE_ENDIAN)


def _connect(port: int, called: str) -> defer.Deferred:
    return requestor.connect(
        reactor,
        "127.0.0.1",
        port,
        "APPLIANCE",
        called,
        timeouts=TIMEOUTS,
        implementation_class_uid=IMPLEMENTATION_CLASS_UID,
        implementation_version_name=IMPLEMENTATION_VERSION_NAME,
    )


class DcmtkAcceptorTests(unittest.TestCase):
    """Our requestor (appliance.net.requestor.connect) against DCMTK's storescp and dcmqrscp."""

    timeout = 60

    async def _echo_peer(self, peer, port: int, called: str) -> requestor.Association:
        association = await connect_when_listening(reactor, lambda: _connect(port, called), peer)
        self.assertTrue(association.negotiated.peer_implementation_class_uid.startswith(DCMTK_UID_ROOT),
                        association.negotiated.peer_implementation_class_uid)
        status = await association.echo()
        self.assertEqual(status, 0x0000, peer.text())
        await association.release()
        self.assertFalse(association.is_open)
        return association

    @deferred_test
    async def test_storescp(self):
        """storescp accepts our association (explicit LE, its default preference); C-ECHO answers Success."""
        port = free_port()
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        peer = spawn_peer(self, [STORESCP, "-aet", "STORESCP", "-od", folder, str(port)], path=folder)
        association = await self._echo_peer(peer, port, "STORESCP")
        self.assertEqual(association.negotiated.context_for(VERIFICATION).transfer_syntax, EXPLICIT_VR_LITTLE_ENDIAN)

    test_storescp.skip = _need(STORESCP)

    @deferred_test
    async def test_storescp_prefers_big_endian(self):
        """storescp told to prefer big endian (+xb) accepts our Explicit VR Big Endian proposal."""
        port = free_port()
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        peer = spawn_peer(self, [STORESCP, "+xb", "-aet", "STORESCP", "-od", folder, str(port)], path=folder)
        association = await self._echo_peer(peer, port, "STORESCP")
        self.assertEqual(association.negotiated.context_for(VERIFICATION).transfer_syntax, EXPLICIT_VR_BIG_ENDIAN)

    test_storescp_prefers_big_endian.skip = _need(STORESCP)

    @deferred_test
    async def test_dcmqrscp(self):
        """dcmqrscp, configured with one AE in its AETable, answers our C-ECHO with Success."""
        port = free_port()
        folder = os.path.abspath(self.mktemp())
        storage = os.path.join(folder, "QRSCP")
        os.makedirs(storage)
        config = write_file(
            self,
            "NetworkTCPPort  = 104\n"
            "MaxPDUSize      = 16384\n"
            "MaxAssociations = 4\n"
            "HostTable BEGIN\nHostTable END\n"
            "VendorTable BEGIN\nVendorTable END\n"
            "AETable BEGIN\n"
            f"QRSCP  {storage}  RW  (10, 10mb)  ANY\n"
            "AETable END\n",
            name="dcmqrscp.cfg",
        )
        # --fork (the default): dcmqrscp 3.6.7's --single-process crashes after an association
        peer = spawn_peer(self, [DCMQRSCP, "-c", config, str(port)], path=folder)
        await self._echo_peer(peer, port, "QRSCP")

    test_dcmqrscp.skip = _need(DCMQRSCP)

    @deferred_test
    async def test_dcmqrscp_unknown_called_ae(self):
        """dcmqrscp rejects a called AE title missing from its AETable; we report the PS3.8 reason."""
        port = free_port()
        folder = os.path.abspath(self.mktemp())
        storage = os.path.join(folder, "QRSCP")
        os.makedirs(storage)
        config = write_file(
            self,
            "NetworkTCPPort = 104\nMaxPDUSize = 16384\nMaxAssociations = 4\n"
            "HostTable BEGIN\nHostTable END\nVendorTable BEGIN\nVendorTable END\n"
            f"AETable BEGIN\nQRSCP {storage} RW (10, 10mb) ANY\nAETable END\n",
            name="dcmqrscp.cfg",
        )
        peer = spawn_peer(self, [DCMQRSCP, "-c", config, str(port)], path=folder)
        with self.assertRaises(requestor.AssociationRejected) as caught:
            await connect_when_listening(reactor, lambda: _connect(port, "NOBODY"), peer)
        self.assertIn("called-AE-title-not-recognized", str(caught.exception))

    test_dcmqrscp_unknown_called_ae.skip = _need(DCMQRSCP)


class _Silent(Protocol):
    """Accepts the connection and never says anything."""


class _Listener(Protocol):
    """Keeps what it receives and never answers; ``factory.heard`` fires with it once an A-ASSOCIATE-RQ came."""

    def connectionMade(self) -> None:
        self.data = bytearray()
        self.lost: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.data[:1] == b"\x01" and not self.factory.heard.called:
            self.factory.heard.callback(self)

    def connectionLost(self, reason=None) -> None:
        self.lost.callback(None)


class _Aborter(Protocol):
    """Answers the first bytes with an A-ABORT (service user, no reason)."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(bytes.fromhex("07 00 00000004 0000 00 00"))


class EchoCliTests(unittest.TestCase):
    """`python -m appliance.cli.echo --config CFG DEVICE` end to end, as a subprocess."""

    timeout = 60

    def config_with(self, port: int, ae_title: str = "DISK_SERVER", timeout: float = 10) -> str:
        return write_file(
            self,
            '[appliance]\nae_title = "APPLIANCE"\n'
            "[disk_server]\nport = 0\n[memory_server]\nport = 0\n"
            f'[devices.x]\nae_title = "{ae_title}"\nhost = "127.0.0.1"\nport = {port}\ntimeout = {timeout}\n',
        )

    def echo(self, config: str, device: str = "x") -> defer.Deferred:
        return run_python(["-m", "appliance.cli.echo", "--config", config, device])

    @deferred_test
    async def test_success(self):
        """A device that answers: exit 0 and 'Success' on stdout."""
        listening = start_acceptor(self)
        out, err, code = await self.echo(self.config_with(listening.number))
        self.assertEqual(code, 0, err)
        self.assertIn(f"x (DISK_SERVER at 127.0.0.1:{listening.number}): C-ECHO 0x0000 Success", out)
        await listening.closed()
        self.assertIn("APPLIANCE->DISK_SERVER: released", listening.log[0])

    @deferred_test
    async def test_unknown_device(self):
        """An unknown device: exit 2 and a message listing the configured devices."""
        out, err, code = await self.echo(self.config_with(free_port()), "nope")
        self.assertEqual(code, 2, err)
        self.assertIn("unknown device 'nope'", err)
        self.assertIn("configured devices: x", err)

    @deferred_test
    async def test_bad_config(self):
        """A bad configuration: exit 2 and the file, key and problem on stderr."""
        path = write_file(self, "[devices.x]\nhost = \"127.0.0.1\"\nport = 104\n")
        out, err, code = await self.echo(path)
        self.assertEqual(code, 2, err)
        self.assertIn(f"{path}: [devices.x] ae_title: is required", err)

    @deferred_test
    async def test_connection_refused(self):
        """Nothing listening: exit 3, connection refused."""
        out, err, code = await self.echo(self.config_with(free_port()))
        self.assertEqual(code, 3, err)
        self.assertIn("refused", err)

    @deferred_test
    async def test_rejected(self):
        """A wrong called AE title: exit 4 with PS3.8's words for the reason."""
        listening = start_acceptor(self)
        out, err, code = await self.echo(self.config_with(listening.number, ae_title="WRONG"))
        self.assertEqual(code, 4, err)
        self.assertIn("called-AE-title-not-recognized", err)
        await listening.closed()

    @deferred_test
    async def test_timeout(self):
        """A peer that accepts TCP and never answers, with timeout = 1: exit 5."""
        port = Listening(self, Factory.forProtocol(_Silent), reactor).number
        out, err, code = await self.echo(self.config_with(port, timeout=1))
        self.assertEqual(code, 5, err)
        self.assertIn("no A-ASSOCIATE-AC", err)

    @deferred_test
    async def test_cancelled_while_the_answer_is_awaited(self):
        """An association no longer wanted while its A-ASSOCIATE-AC is awaited (the web page that asked went
        away) is aborted and its connection closed, not left open with no timer to end it."""
        factory = Factory.forProtocol(_Listener)
        factory.heard = defer.Deferred()
        port = Listening(self, factory, reactor).number
        connecting = requestor.connect(reactor, "127.0.0.1", port, "APPLIANCE", "SILENT",
                                       timeouts=Timeouts(artim=1, association=60, dimse=60, idle=None),
                                       implementation_class_uid="1.2.826.0.1.3680043.9.7", implementation_version_name=None)
        peer = await factory.heard.addTimeout(WAIT_LIMIT, reactor)
        connecting.cancel()
        with self.assertRaises(defer.CancelledError):
            await connecting
        await peer.lost.addTimeout(WAIT_LIMIT, reactor)  # closed by us once ARTIM (1 s) expired
        request_length = 6 + int.from_bytes(peer.data[2:6], "big")
        self.assertEqual(bytes(peer.data[request_length:request_length + 1]), b"\x07", "an A-ABORT followed the RQ")

    @deferred_test
    async def test_aborted(self):
        """A peer that answers the A-ASSOCIATE-RQ with an A-ABORT: exit 6."""
        port = Listening(self, Factory.forProtocol(_Aborter), reactor).number
        out, err, code = await self.echo(self.config_with(port))
        self.assertEqual(code, 6, err)
        self.assertIn("aborted by the peer", err)
