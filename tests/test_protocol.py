"""The Twisted adapters, driven in memory: AcceptorProtocol, AcceptorFactory and RequestorProtocol.

No ports are opened and no time passes: bytes are fed to the protocols
through StringTransport (or iosim's FakeTransport pumps) and timers are
driven with twisted.internet.task.Clock.
"""

from __future__ import annotations

import struct

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.logger import formatEvent
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

try:
    from twisted.internet.testing import StringTransport
except ImportError:  # Twisted older than 21.2
    from twisted.test.proto_helpers import StringTransport
from twisted.test.iosim import FakeTransport, connect

from appliance import config as C
from appliance.ae.listeners import acceptor_factory
from appliance.ae.verification import VerificationService
from appliance.dicom import dimse as D
from appliance.dicom import pdu as P
from appliance.dicom import status as S
from appliance.dicom.negotiation import propose
from appliance.dicom.uids import (
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    IMPLICIT_VR_LITTLE_ENDIAN,
    STUDY_ROOT_FIND,
    VERIFICATION,
)
from appliance.interfaces import IServiceClass
from appliance.net.protocol import BufferedDataSet, Timeouts
from appliance.net.requestor import (
    Association,
    AssociationAborted,
    AssociationError,
    AssociationRejected,
    RequestorProtocol,
)

ARTIM = 5.0
IDLE = 60.0
MAX_PDU = 16384
PEER_IMPL_UID = "1.2.826.0.1.3680043.9.9999.7"


def abort_bytes(source: int, reason: int) -> bytes:
    """An encoded A-ABORT PDU, by hand (PS3.8 9.3.8)."""
    return bytes((0x07, 0, 0, 0, 0, 4, 0, 0, source, reason))


def rj_bytes(result: int, source: int, reason: int) -> bytes:
    """An encoded A-ASSOCIATE-RJ PDU, by hand (PS3.8 9.3.4)."""
    return bytes((0x03, 0, 0, 0, 0, 4, 0, result, source, reason))


RELEASE_RQ = bytes((0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0))
RELEASE_RP = bytes((0x06, 0, 0, 0, 0, 4, 0, 0, 0, 0))


def split_pdus(data: bytes):
    """Cut a byte string into whole PDUs by their header lengths."""
    pdus, offset = [], 0
    while offset < len(data):
        (length,) = struct.unpack_from(">L", data, offset + 2)
        pdus.append(data[offset : offset + 6 + length])
        offset += 6 + length
    return pdus


def decode_messages(data: bytes):
    """(context_id, Command, data set bytes or None) of every DIMSE message in ``data`` (P-DATA-TF PDUs only)."""
    assembler = D.MessageAssembler()
    messages = []
    for raw in split_pdus(data):
        for event in assembler.receive(P.PDataTF.decode(raw).pdvs):
            if isinstance(event, D.CommandReceived):
                messages.append([event.context_id, event.command, None])
            else:
                messages[-1][2] = (messages[-1][2] or b"") + event.data
    return [tuple(m) for m in messages]


def message_pdus(context_id: int, command: D.Command, data: bytes = None, max_pdu: int = MAX_PDU) -> bytes:
    """A DIMSE message as encoded P-DATA-TF PDUs."""
    if data is None:
        command.CommandDataSetType = D.NO_DATA_SET
    else:
        command.CommandDataSetType = 0x0000
    out = b"".join(D.fragment(context_id, True, command.encode(), max_pdu))
    if data is not None:
        out += b"".join(D.fragment(context_id, False, data, max_pdu))
    return out


def echo_rq(message_id: int) -> D.Command:
    return D.Command(CommandField=D.CommandField.C_ECHO_RQ, MessageID=message_id, AffectedSOPClassUID=VERIFICATION)


def echo_request(calling: str = "ECHOSCU", called: str = "DISK_SERVER") -> P.AssociateRQ:
    return propose(calling, called, [(VERIFICATION, [IMPLICIT_VR_LITTLE_ENDIAN])], MAX_PDU, PEER_IMPL_UID, "PEER_1")


def closed(protocol) -> None:
    """Tell ``protocol`` its connection is gone, as the reactor would."""
    protocol.connectionLost(Failure(ConnectionDone("connection done")))


def make_factory(clock: Clock, services=None, **disk_server):
    """An AcceptorFactory for the Disk-Server from a parsed configuration."""
    settings = {"artim_timeout": ARTIM, "idle_timeout": IDLE}
    settings.update(disk_server)
    config = C.parse({"disk_server": settings}, "/tmp/x.toml")
    return acceptor_factory(config.disk_server, config, services or [VerificationService()], clock)


@implementer(IServiceClass)
class HoldingService:
    """A Verification SCP that, while ``hold`` is set, keeps requests unanswered."""

    def __init__(self) -> None:
        self.abstract_syntaxes = {VERIFICATION: (IMPLICIT_VR_LITTLE_ENDIAN,)}
        self.operations = {D.CommandField.C_ECHO_RQ, D.CommandField.C_STORE_RQ}
        self.hold = True
        self.held = []

    def open_data_set(self, request):
        return BufferedDataSet(limit=0)

    def handle(self, request):
        if self.hold:
            self.held.append(request)
        else:
            request.respond(S.SUCCESS)

    def cancel(self, request):
        pass


class AcceptorTestMixin:
    """Helpers for driving AcceptorProtocols of one factory."""

    def setUp(self):
        self.clock = Clock()
        self.factory = make_factory(self.clock)

    def connect(self, factory=None):
        factory = factory or self.factory
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def establish(self, factory=None, request=None):
        """A connected protocol with an accepted association; the transport is cleared after the AC."""
        protocol, transport = self.connect(factory)
        protocol.dataReceived((request or echo_request()).encode())
        self.assertEqual(transport.value()[:1], b"\x02")
        transport.clear()
        return protocol, transport

    def echo(self, protocol, transport, message_id: int) -> D.Command:
        """Send a C-ECHO-RQ and return the single response command."""
        protocol.dataReceived(message_pdus(1, echo_rq(message_id)))
        ((context_id, response, data),) = decode_messages(transport.value())
        transport.clear()
        self.assertEqual((context_id, data), (1, None))
        return response

    def assertAbortedThenRecovers(self, protocol, transport, expected: bytes):
        """``expected`` (an A-ABORT) was the last thing written; ARTIM closes; the factory still serves."""
        self.assertEqual(split_pdus(transport.value())[-1], expected)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(ARTIM)
        self.assertTrue(transport.disconnecting)
        closed(protocol)
        self.assertEqual((self.factory.connections, self.factory.associations), (0, 0))
        # a fresh protocol from the same factory still serves an echo
        fresh, fresh_transport = self.establish()
        self.assertEqual(self.echo(fresh, fresh_transport, 1).Status, S.SUCCESS)
        fresh.dataReceived(RELEASE_RQ)
        self.assertEqual(fresh_transport.value(), RELEASE_RP)
        closed(fresh)
        self.assertEqual((self.factory.connections, self.factory.associations), (0, 0))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class AcceptorAssociationTests(AcceptorTestMixin, unittest.TestCase):
    """An association with our acceptor, from A-ASSOCIATE-RQ to A-RELEASE-RP."""

    def test_full_association(self):
        """RQ gets the exact AC, C-ECHO-RQ gets a success C-ECHO-RSP, A-RELEASE-RQ gets A-RELEASE-RP."""
        protocol, transport = self.connect()
        self.assertEqual((self.factory.connections, self.factory.associations), (1, 0))
        request = propose(
            "ECHOSCU", "DISK_SERVER",
            [(VERIFICATION, [IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN]), (STUDY_ROOT_FIND, [IMPLICIT_VR_LITTLE_ENDIAN])],
            MAX_PDU, PEER_IMPL_UID, "PEER_1",
        )
        protocol.dataReceived(request.encode())
        expected_ac = P.AssociateAC(
            called_ae_title="DISK_SERVER",
            calling_ae_title="ECHOSCU",
            presentation_contexts=(
                P.PresentationContextAC(1, 0, EXPLICIT_VR_LITTLE_ENDIAN),
                P.PresentationContextAC(3, 3),
            ),
            user_information=P.UserInformation(
                maximum_length=16384,
                implementation_class_uid=IMPLEMENTATION_CLASS_UID,
                implementation_version_name=IMPLEMENTATION_VERSION_NAME,
            ),
        )
        self.assertEqual(transport.value(), expected_ac.encode())
        self.assertEqual(self.factory.associations, 1)
        transport.clear()

        response = self.echo(protocol, transport, 42)
        self.assertEqual(response.CommandField, D.CommandField.C_ECHO_RSP)
        self.assertEqual(response.MessageIDBeingRespondedTo, 42)
        self.assertEqual(response.Status, 0x0000)
        self.assertEqual(response.AffectedSOPClassUID, VERIFICATION)
        self.assertEqual(response.CommandDataSetType, D.NO_DATA_SET)

        protocol.dataReceived(RELEASE_RQ)
        self.assertEqual(transport.value(), RELEASE_RP)
        self.assertFalse(transport.disconnecting)  # the requestor closes (PS3.8 Sta13)
        closed(protocol)
        self.assertEqual((self.factory.connections, self.factory.associations), (0, 0))
        self.assertEqual(protocol.record.outcome, "released")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_bytes_in_pieces(self):
        """An RQ and an echo fed one byte at a time give the same AC and response."""
        protocol, transport = self.connect()
        for byte in echo_request().encode():
            protocol.dataReceived(bytes((byte,)))
        self.assertEqual(P.decode_pdu(transport.value()).presentation_contexts, (P.PresentationContextAC(1, 0, IMPLICIT_VR_LITTLE_ENDIAN),))
        transport.clear()
        for byte in message_pdus(1, echo_rq(9)):
            protocol.dataReceived(bytes((byte,)))
        ((_, response, _),) = decode_messages(transport.value())
        self.assertEqual((response.MessageIDBeingRespondedTo, response.Status), (9, 0))
        closed(protocol)
        self.assertEqual((self.factory.connections, self.factory.associations), (0, 0))

    def test_called_ae_rejected(self):
        """An RQ for another AE title is answered with A-ASSOCIATE-RJ (1, 1, 7), then closed after ARTIM."""
        protocol, transport = self.connect()
        protocol.dataReceived(echo_request(called="OTHER").encode())
        self.assertEqual(transport.value(), rj_bytes(1, 1, 7))
        self.assertEqual(self.factory.associations, 0)
        self.clock.advance(ARTIM)
        self.assertTrue(transport.disconnecting)
        closed(protocol)
        self.assertEqual((self.factory.connections, self.factory.associations), (0, 0))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_protocol_version_rejected(self):
        """An RQ whose protocol version lacks bit 0 is rejected by the provider: A-ASSOCIATE-RJ (1, 2, 2)."""
        protocol, transport = self.connect()
        request = echo_request()
        raw = bytearray(request.encode())
        struct.pack_into(">H", raw, 6, 0x0002)
        protocol.dataReceived(bytes(raw))
        self.assertEqual(transport.value(), rj_bytes(1, 2, 2))
        self.assertEqual(self.factory.associations, 0)
        self.clock.advance(ARTIM)
        self.assertTrue(transport.disconnecting)
        closed(protocol)
        self.assertEqual((self.factory.connections, self.factory.associations), (0, 0))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_malformed_echo_answered_c000(self):
        """A C-ECHO-RQ without its Message ID, or carrying a data set, is answered 0xC000 and the association goes on."""
        protocol, transport = self.establish()
        no_id = D.Command(CommandField=D.CommandField.C_ECHO_RQ, AffectedSOPClassUID=VERIFICATION)
        protocol.dataReceived(message_pdus(1, no_id))
        ((_, response, _),) = decode_messages(transport.value())
        transport.clear()
        self.assertEqual((response.Status, response.MessageIDBeingRespondedTo), (S.CANNOT_UNDERSTAND, 0))
        self.assertIn("MessageID", response.ErrorComment)
        protocol.dataReceived(message_pdus(1, echo_rq(4), b"unexpected data set"))
        ((_, response, _),) = decode_messages(transport.value())
        transport.clear()
        self.assertEqual((response.Status, response.MessageIDBeingRespondedTo), (S.CANNOT_UNDERSTAND, 4))
        self.assertEqual(self.echo(protocol, transport, 5).Status, S.SUCCESS)
        closed(protocol)
        self.assertEqual((self.factory.connections, self.factory.associations), (0, 0))

    def test_max_associations_exceeded(self):
        """With max_associations=1 a second RQ gets A-ASSOCIATE-RJ (2, 3, 2); after the first ends, a third is accepted."""
        self.factory = make_factory(self.clock, max_associations=1)
        first, first_transport = self.establish()
        second, second_transport = self.connect()
        second.dataReceived(echo_request().encode())
        self.assertEqual(second_transport.value(), rj_bytes(2, 3, 2))
        self.assertEqual((self.factory.connections, self.factory.associations), (2, 1))
        self.clock.advance(ARTIM)
        self.assertTrue(second_transport.disconnecting)
        closed(second)
        self.assertEqual((self.factory.connections, self.factory.associations), (1, 1))
        first.dataReceived(RELEASE_RQ)
        self.assertEqual(first_transport.value(), RELEASE_RP)
        closed(first)
        third, third_transport = self.establish()
        self.assertEqual(self.echo(third, third_transport, 2).Status, S.SUCCESS)
        closed(third)
        self.assertEqual((self.factory.connections, self.factory.associations), (0, 0))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class PerHostLimitTests(AcceptorTestMixin, unittest.TestCase):
    """max_associations_per_host: one peer address cannot take every association of the AE."""

    def connect_from(self, host: str):
        from twisted.internet.address import IPv4Address

        protocol = self.factory.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, 40000))
        protocol.makeConnection(transport)
        return protocol, transport

    def test_limit_per_address(self):
        self.factory = make_factory(self.clock, max_associations=4, max_associations_per_host=2)
        held = []
        for _ in range(2):
            protocol, transport = self.connect_from("10.0.0.1")
            protocol.dataReceived(echo_request().encode())
            self.assertEqual(transport.value()[:1], b"\x02")
            held.append(protocol)
        third, third_transport = self.connect_from("10.0.0.1")
        third.dataReceived(echo_request().encode())
        self.assertEqual(third_transport.value(), rj_bytes(2, 3, 2))
        self.assertIn("2 associations from 10.0.0.1 of max_associations_per_host=2", third.record.outcome)
        other, other_transport = self.connect_from("10.0.0.2")
        other.dataReceived(echo_request().encode())
        self.assertEqual(other_transport.value()[:1], b"\x02")  # another host still gets in
        closed(held.pop())
        again, again_transport = self.connect_from("10.0.0.1")
        again.dataReceived(echo_request().encode())
        self.assertEqual(again_transport.value()[:1], b"\x02")
        for protocol in (third, other, again, *held):
            closed(protocol)
        self.assertEqual((self.factory.connections, self.factory.associations, self.factory.host_associations),
                         (0, 0, {}))


class AcceptorTimerTests(AcceptorTestMixin, unittest.TestCase):
    """ARTIM and the idle timeout."""

    def test_artim_silent_peer(self):
        """A peer that connects and sends nothing is disconnected after artim_timeout, with no PDU sent."""
        protocol, transport = self.connect()
        self.clock.advance(ARTIM - 1)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        closed(protocol)
        self.assertIn("ARTIM", protocol.record.outcome)
        self.assertEqual(self.factory.connections, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_idle_timeout_aborts(self):
        """An established association with no traffic for idle_timeout gets an A-ABORT, then is closed after ARTIM."""
        protocol, transport = self.establish()
        self.clock.advance(IDLE - 1)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(1)
        self.assertEqual(transport.value(), abort_bytes(0, 0))
        self.assertFalse(transport.disconnecting)
        self.clock.advance(ARTIM)
        self.assertTrue(transport.disconnecting)
        closed(protocol)
        self.assertEqual((self.factory.connections, self.factory.associations), (0, 0))
        self.assertIn("idle", protocol.record.outcome)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_traffic_resets_idle_timer(self):
        """Traffic restarts the idle timer: an echo just before it expires postpones the abort by a full period."""
        protocol, transport = self.establish()
        self.clock.advance(IDLE - 1)
        self.assertEqual(self.echo(protocol, transport, 1).Status, 0)
        self.clock.advance(IDLE - 1)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(1)
        self.assertEqual(transport.value(), abort_bytes(0, 0))
        self.clock.advance(ARTIM)
        closed(protocol)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stalled_operation_aborted(self):
        """Issue 9: an operation in progress on which nothing is received or sent for idle_timeout is aborted
        (a C-STORE-RQ whose data set never comes held its association forever); the outcome says which."""
        service = HoldingService()
        self.factory = make_factory(self.clock, services=[service])
        protocol, transport = self.establish()
        protocol.dataReceived(message_pdus(1, echo_rq(1)))
        self.clock.advance(IDLE - 1)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(1)
        self.assertEqual(transport.value(), abort_bytes(0, 0))
        self.assertIn("idle for 60 s: nothing received or sent while C-ECHO-RQ message 1 was in progress",
                      protocol.record.outcome)
        self.clock.advance(ARTIM)
        closed(protocol)
        self.assertEqual((self.factory.connections, self.factory.associations), (0, 0))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stalled_data_set_aborted(self):
        """A C-STORE-RQ announcing a data set, then nothing: aborted after idle_timeout, the data set's consumer
        abandoned; a data set trickling in keeps it alive."""
        abandoned = []

        class Consumer(BufferedDataSet):
            def abandon(self, reason):
                abandoned.append(reason)

        ct = "1.2.840.10008.5.1.4.1.1.2"

        class Holding(HoldingService):
            def __init__(self):
                super().__init__()
                self.abstract_syntaxes = {ct: (IMPLICIT_VR_LITTLE_ENDIAN,)}

            def open_data_set(self, request):
                return Consumer(limit=1 << 20)

        self.factory = make_factory(self.clock, services=[Holding()])
        request = propose("MODALITY", "DISK_SERVER", [(ct, [IMPLICIT_VR_LITTLE_ENDIAN])], MAX_PDU, PEER_IMPL_UID, "P")
        protocol, transport = self.establish(request=request)
        command = D.Command(CommandField=D.CommandField.C_STORE_RQ, MessageID=1, Priority=0, AffectedSOPClassUID=ct,
                            AffectedSOPInstanceUID="1.2.3.4", CommandDataSetType=0)
        protocol.dataReceived(b"".join(D.fragment(1, True, command.encode(), MAX_PDU)))
        for _ in range(3):
            self.clock.advance(IDLE - 1)
            protocol.dataReceived(b"".join(D.fragment(1, False, b"\x00\x00", MAX_PDU, last=False)))
        self.assertEqual(transport.value(), b"")
        self.clock.advance(IDLE)
        self.assertEqual(transport.value(), abort_bytes(0, 0))
        self.assertIn("while C-STORE-RQ message 1 was in progress", protocol.record.outcome)
        self.clock.advance(ARTIM)
        closed(protocol)
        self.assertEqual(len(abandoned), 1)
        self.assertEqual((self.factory.connections, self.factory.associations), (0, 0))

    def test_peer_closes_after_abort(self):
        """When the peer closes after our A-ABORT, ARTIM is stopped and nothing stays scheduled."""
        protocol, transport = self.establish()
        self.clock.advance(IDLE)
        self.assertEqual(transport.value(), abort_bytes(0, 0))
        closed(protocol)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual((self.factory.connections, self.factory.associations), (0, 0))


class AcceptorBadInputTests(AcceptorTestMixin, unittest.TestCase):
    """Hostile or broken input over the adapter: an A-ABORT, and the factory is unharmed."""

    def test_garbage_before_association(self):
        """An HTTP request instead of an A-ASSOCIATE-RQ: A-ABORT (2, 1) unrecognised PDU."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: appliance\r\n\r\n")
        self.assertEqual(transport.value(), abort_bytes(2, 1))
        self.assertAbortedThenRecovers(protocol, transport, abort_bytes(2, 1))

    def test_unknown_pdu_type_on_association(self):
        """A PDU of type 0x08 on an established association: A-ABORT (2, 1)."""
        protocol, transport = self.establish()
        protocol.dataReceived(bytes((0x08, 0, 0, 0, 0, 4, 0, 0, 0, 0)))
        self.assertEqual(transport.value(), abort_bytes(2, 1))
        self.assertAbortedThenRecovers(protocol, transport, abort_bytes(2, 1))

    def test_item_overruns_pdu(self):
        """An A-ASSOCIATE-RQ whose application context item claims more bytes than its PDU holds: A-ABORT (2, 6)."""
        raw = bytearray(echo_request().encode())
        self.assertEqual(raw[74], 0x10)  # the application context item follows the 68-byte fixed part
        struct.pack_into(">H", raw, 76, 0x1000)
        protocol, transport = self.connect()
        protocol.dataReceived(bytes(raw))
        self.assertEqual(transport.value(), abort_bytes(2, 6))
        self.assertAbortedThenRecovers(protocol, transport, abort_bytes(2, 6))

    def test_pdv_overruns_pdata(self):
        """A P-DATA-TF whose PDV item length exceeds the PDU: A-ABORT (2, 6)."""
        protocol, transport = self.establish()
        protocol.dataReceived(bytes((0x04, 0, 0, 0, 0, 8)) + struct.pack(">LBB", 100, 1, 3) + b"xx")
        self.assertEqual(transport.value(), abort_bytes(2, 6))
        self.assertAbortedThenRecovers(protocol, transport, abort_bytes(2, 6))

    def test_pdata_over_max_pdu_aborts_on_header(self):
        """A P-DATA-TF declaring max_pdu + 1 bytes is aborted (2, 6) as soon as its 6-byte header arrives."""
        protocol, transport = self.establish()
        protocol.dataReceived(b"\x04\x00" + struct.pack(">L", MAX_PDU + 1))
        self.assertEqual(transport.value(), abort_bytes(2, 6))
        # what follows is not buffered or read
        protocol.dataReceived(bytes(4096))
        self.assertEqual(transport.value(), abort_bytes(2, 6))
        self.assertEqual(protocol.ul._framer.buffered, 6)
        self.assertAbortedThenRecovers(protocol, transport, abort_bytes(2, 6))

    def test_pdata_of_exactly_max_pdu_is_awaited(self):
        """A P-DATA-TF header declaring exactly max_pdu bytes is not refused: its body is awaited."""
        protocol, transport = self.establish()
        protocol.dataReceived(b"\x04\x00" + struct.pack(">L", MAX_PDU))
        self.assertEqual(transport.value(), b"")
        closed(protocol)
        self.assertEqual((self.factory.connections, self.factory.associations), (0, 0))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_associate_rq_over_one_mebibyte(self):
        """An A-ASSOCIATE-RQ declaring 1 MiB + 1 bytes is aborted (2, 6) right after its header."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"\x01\x00" + struct.pack(">L", 1024 * 1024 + 1))
        self.assertEqual(transport.value(), abort_bytes(2, 6))
        self.assertAbortedThenRecovers(protocol, transport, abort_bytes(2, 6))

    def test_unexpected_pdu_before_association(self):
        """An A-RELEASE-RQ before any A-ASSOCIATE-RQ: A-ABORT (2, 2) unexpected PDU."""
        protocol, transport = self.connect()
        protocol.dataReceived(RELEASE_RQ)
        self.assertEqual(transport.value(), abort_bytes(2, 2))
        self.assertAbortedThenRecovers(protocol, transport, abort_bytes(2, 2))

    def test_pdv_on_unaccepted_context(self):
        """A C-ECHO-RQ on presentation context 3, never accepted: A-ABORT (2, 6) and no response."""
        protocol, transport = self.establish()
        protocol.dataReceived(message_pdus(3, echo_rq(1)))
        self.assertEqual(transport.value(), abort_bytes(2, 6))
        self.assertIn("presentation context 3", protocol.record.outcome)
        self.assertAbortedThenRecovers(protocol, transport, abort_bytes(2, 6))

    def test_second_request_while_outstanding(self):
        """A second request while the first is unanswered (no asynchronous window): A-ABORT (2, 6)."""
        service = HoldingService()
        self.factory = make_factory(self.clock, services=[service])
        protocol, transport = self.establish()
        protocol.dataReceived(message_pdus(1, echo_rq(1)))
        self.assertEqual(len(service.held), 1)
        self.assertEqual(transport.value(), b"")
        protocol.dataReceived(message_pdus(1, echo_rq(2)))
        self.assertEqual(transport.value(), abort_bytes(2, 6))
        self.assertEqual(len(service.held), 1)
        self.assertIn("while message 1 was outstanding", protocol.record.outcome)
        # a late answer to the held request is not sent on the aborted association
        service.held[0].respond(S.SUCCESS)
        self.assertEqual(transport.value(), abort_bytes(2, 6))
        service.hold = False
        self.assertAbortedThenRecovers(protocol, transport, abort_bytes(2, 6))

    def test_response_sent_to_acceptor(self):
        """A C-ECHO-RSP sent to the acceptor is a protocol violation: A-ABORT (2, 6)."""
        protocol, transport = self.establish()
        response = D.Command(CommandField=D.CommandField.C_ECHO_RSP, MessageIDBeingRespondedTo=1, Status=0)
        protocol.dataReceived(message_pdus(1, response))
        self.assertEqual(transport.value(), abort_bytes(2, 6))
        self.assertAbortedThenRecovers(protocol, transport, abort_bytes(2, 6))

    def test_malformed_command_set(self):
        """A command set holding an element outside group 0000: A-ABORT (2, 6)."""
        protocol, transport = self.establish()
        bad = echo_rq(1).encode() + struct.pack("<HHL", 0x0008, 0x0016, 2) + b"1\x00"
        protocol.dataReceived(b"".join(D.fragment(1, True, bad, MAX_PDU)))
        self.assertEqual(transport.value(), abort_bytes(2, 6))
        self.assertAbortedThenRecovers(protocol, transport, abort_bytes(2, 6))

    def test_peer_abort(self):
        """An A-ABORT from the peer closes at once and is recorded, with nothing sent back."""
        protocol, transport = self.establish()
        protocol.dataReceived(abort_bytes(0, 0))
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)
        closed(protocol)
        self.assertEqual(protocol.record.outcome, "aborted by the peer (A-ABORT source 0, reason 0)")
        self.assertEqual((self.factory.connections, self.factory.associations), (0, 0))
        self.assertEqual(self.clock.getDelayedCalls(), [])


# --- the requestor -------------------------------------------------------------------

TIMEOUTS = Timeouts(artim=ARTIM, association=10.0, dimse=20.0, idle=IDLE)


def accept_all(request: P.AssociateRQ, max_pdu: int = 32768) -> P.AssociateAC:
    """An A-ASSOCIATE-AC accepting every proposed context with its first transfer syntax."""
    return P.AssociateAC(
        called_ae_title=request.called_ae_title,
        calling_ae_title=request.calling_ae_title,
        presentation_contexts=tuple(
            P.PresentationContextAC(c.id, 0, c.transfer_syntaxes[0]) for c in request.presentation_contexts
        ),
        user_information=P.UserInformation(maximum_length=max_pdu, implementation_class_uid=PEER_IMPL_UID),
    )


def response_pdus(context_id: int, field: int, message_id: int, status: int, data: bytes = None, sop_class=VERIFICATION):
    command = D.Command(CommandField=field, MessageIDBeingRespondedTo=message_id, Status=status, AffectedSOPClassUID=sop_class)
    return message_pdus(context_id, command, data)


class RequestorTests(unittest.TestCase):
    """RequestorProtocol over a StringTransport."""

    def setUp(self):
        self.clock = Clock()

    def start(self, contexts=((VERIFICATION, (IMPLICIT_VR_LITTLE_ENDIAN,)),)):
        request = propose("ECHOSCU", "DISK_SERVER", list(contexts), MAX_PDU, IMPLEMENTATION_CLASS_UID, "V1")
        protocol = RequestorProtocol(self.clock, TIMEOUTS, request, MAX_PDU)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport, request

    def establish(self, contexts=((VERIFICATION, (IMPLICIT_VR_LITTLE_ENDIAN,)),)):
        protocol, transport, request = self.start(contexts)
        self.assertEqual(transport.value(), request.encode())
        transport.clear()
        protocol.dataReceived(accept_all(request).encode())
        association = self.successResultOf(protocol.established)
        return protocol, transport, association

    def test_echo_and_release(self):
        """RQ written, AC fires established, echo fires with 0, release fires after the RP and the close."""
        protocol, transport, request = self.start()
        self.assertEqual(transport.value(), request.encode())
        self.assertNoResult(protocol.established)
        transport.clear()
        protocol.dataReceived(accept_all(request).encode())
        association = self.successResultOf(protocol.established)
        self.assertIsInstance(association, Association)
        self.assertTrue(association.is_open)
        self.assertEqual(association.peer_max_pdu, 32768)

        d = association.echo()
        ((context_id, command, data),) = decode_messages(transport.value())
        self.assertEqual((context_id, data), (1, None))
        self.assertEqual(command.CommandField, D.CommandField.C_ECHO_RQ)
        self.assertEqual(command.MessageID, 1)
        self.assertEqual(command.AffectedSOPClassUID, VERIFICATION)
        self.assertEqual(command.CommandDataSetType, D.NO_DATA_SET)
        transport.clear()
        self.assertNoResult(d)
        protocol.dataReceived(response_pdus(1, D.CommandField.C_ECHO_RSP, 1, S.SUCCESS))
        self.assertEqual(self.successResultOf(d), 0)

        released = association.release()
        self.assertEqual(transport.value(), RELEASE_RQ)
        self.assertNoResult(released)
        protocol.dataReceived(RELEASE_RP)
        self.assertTrue(transport.disconnecting)  # the requestor closes after the RP
        self.assertNoResult(released)
        closed(protocol)
        self.assertIsNone(self.successResultOf(released))
        self.assertEqual(self.successResultOf(protocol.closed), "released")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_message_ids_increase(self):
        """Successive requests use Message IDs 1 and 2."""
        protocol, transport, association = self.establish()
        for expected_id in (1, 2):
            d = association.echo()
            ((_, command, _),) = decode_messages(transport.value())
            transport.clear()
            self.assertEqual(command.MessageID, expected_id)
            protocol.dataReceived(response_pdus(1, D.CommandField.C_ECHO_RSP, expected_id, S.SUCCESS))
            self.assertEqual(self.successResultOf(d), 0)
        closed(protocol)

    def test_rejected(self):
        """An A-ASSOCIATE-RJ fails established with AssociationRejected and closes the transport."""
        protocol, transport, request = self.start()
        protocol.dataReceived(rj_bytes(1, 1, 7))
        failure = self.failureResultOf(protocol.established, AssociationRejected)
        self.assertEqual(failure.value.rejection, P.AssociateRJ(1, 1, 7))
        self.assertIn("called-AE-title-not-recognized", str(failure.value))
        self.assertTrue(transport.disconnecting)
        closed(protocol)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_dimse_timeout(self):
        """No response within timeouts.dimse: A-ABORT, then the echo fails with AssociationAborted."""
        protocol, transport, association = self.establish()
        d = association.echo()
        transport.clear()
        self.clock.advance(TIMEOUTS.dimse - 1)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(1)
        self.assertEqual(transport.value(), abort_bytes(0, 0))
        self.assertFalse(association.is_open)
        self.clock.advance(ARTIM)
        self.assertTrue(transport.disconnecting)
        closed(protocol)
        failure = self.failureResultOf(d, AssociationAborted)
        self.assertIn("DIMSE timeout", str(failure.value))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_one_request_at_a_time(self):
        """A second request while one is outstanding is refused locally, nothing sent."""
        protocol, transport, association = self.establish()
        first = association.echo()
        transport.clear()
        self.assertRaises(AssociationError, association.echo)
        self.assertEqual(transport.value(), b"")
        closed(protocol)
        self.assertIn("transport connection closed", str(self.failureResultOf(first, AssociationAborted).value))

    def test_peer_abort_fails_outstanding_request(self):
        """An A-ABORT from the peer fails the outstanding request with AssociationAborted."""
        protocol, transport, association = self.establish()
        d = association.echo()
        protocol.dataReceived(abort_bytes(0, 0))
        self.assertTrue(transport.disconnecting)
        closed(protocol)
        self.failureResultOf(d, AssociationAborted)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_pending_responses_in_order(self):
        """Two pending responses with data sets and a final one arrive in order through async for."""
        protocol, transport, association = self.establish(
            ((VERIFICATION, (IMPLICIT_VR_LITTLE_ENDIAN,)), (STUDY_ROOT_FIND, (IMPLICIT_VR_LITTLE_ENDIAN,)))
        )
        query = D.Command(CommandField=D.CommandField.C_FIND_RQ, AffectedSOPClassUID=STUDY_ROOT_FIND, Priority=0)
        stream = association.request(STUDY_ROOT_FIND, query, b"identifier")
        ((context_id, sent, identifier),) = decode_messages(transport.value())
        self.assertEqual((context_id, sent.MessageID, identifier), (3, 1, b"identifier"))
        self.assertTrue(sent.has_data_set)

        async def consume():
            seen = []
            async for response in stream:
                seen.append((response.status, response.data))
            return seen

        d = defer.ensureDeferred(consume())
        # each pending response restarts the DIMSE timer
        self.clock.advance(15)
        protocol.dataReceived(response_pdus(3, D.CommandField.C_FIND_RSP, 1, S.PENDING, b"match-1", STUDY_ROOT_FIND))
        self.clock.advance(15)
        # the second data set in two fragments: the requestor joins them
        command = D.Command(CommandField=D.CommandField.C_FIND_RSP, MessageIDBeingRespondedTo=1, Status=S.PENDING,
                            AffectedSOPClassUID=STUDY_ROOT_FIND, CommandDataSetType=0)
        protocol.dataReceived(b"".join(D.fragment(3, True, command.encode(), MAX_PDU)))
        protocol.dataReceived(b"".join(D.fragment(3, False, b"match-", MAX_PDU, last=False)))
        protocol.dataReceived(b"".join(D.fragment(3, False, b"2", MAX_PDU)))
        self.clock.advance(15)
        self.assertNoResult(d)
        protocol.dataReceived(response_pdus(3, D.CommandField.C_FIND_RSP, 1, S.SUCCESS, None, STUDY_ROOT_FIND))
        self.assertEqual(
            self.successResultOf(d), [(S.PENDING, b"match-1"), (S.PENDING, b"match-2"), (S.SUCCESS, None)]
        )
        self.assertEqual(split_pdus(transport.value())[-1][:1], b"\x04")  # no A-ABORT was sent
        self.assertIsNone(protocol.outstanding)
        closed(protocol)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_responses_queued_before_consuming(self):
        """Responses that arrive before anyone iterates are queued and read back in order."""
        protocol, transport, association = self.establish(
            ((VERIFICATION, (IMPLICIT_VR_LITTLE_ENDIAN,)), (STUDY_ROOT_FIND, (IMPLICIT_VR_LITTLE_ENDIAN,)))
        )
        find = D.Command(CommandField=D.CommandField.C_FIND_RQ, Priority=0, AffectedSOPClassUID=STUDY_ROOT_FIND)
        stream = association.request(STUDY_ROOT_FIND, find, b"identifier")
        protocol.dataReceived(response_pdus(3, D.CommandField.C_FIND_RSP, 1, S.PENDING, b"match", STUDY_ROOT_FIND))
        protocol.dataReceived(response_pdus(3, D.CommandField.C_FIND_RSP, 1, S.SUCCESS, None, STUDY_ROOT_FIND))

        async def consume():
            return [response.status async for response in stream]

        self.assertEqual(self.successResultOf(defer.ensureDeferred(consume())), [S.PENDING, S.SUCCESS])
        closed(protocol)

    def test_pending_answer_to_a_request_without_pendings(self):
        """Issue 9: a destination answering a C-STORE (or C-ECHO) with a pending status kept the request alive
        and every response in memory; now it is a protocol violation: A-ABORT, the request fails."""
        protocol, transport, association = self.establish()
        d = association.echo()
        transport.clear()
        protocol.dataReceived(response_pdus(1, D.CommandField.C_ECHO_RSP, 1, S.PENDING))
        self.assertEqual(transport.value(), abort_bytes(2, 6))
        self.failureResultOf(d, AssociationAborted)
        self.assertIn("pending status 0xFF00 answering a C-ECHO-RQ", protocol.record.outcome)
        closed(protocol)

    def test_response_of_another_kind(self):
        """A C-FIND-RSP answering a C-ECHO-RQ (same Message ID) is a protocol violation too."""
        protocol, transport, association = self.establish()
        d = association.echo()
        transport.clear()
        protocol.dataReceived(response_pdus(1, D.CommandField.C_FIND_RSP, 1, S.SUCCESS, None, VERIFICATION))
        self.assertEqual(transport.value(), abort_bytes(2, 6))
        self.failureResultOf(d, AssociationAborted)
        closed(protocol)

    def test_pdata_over_own_max_pdu(self):
        """A P-DATA-TF declaring more than the maximum length we announced is aborted (2, 6) on its header."""
        protocol, transport, association = self.establish()
        d = association.echo()
        transport.clear()
        protocol.dataReceived(b"\x04\x00" + struct.pack(">L", MAX_PDU + 1))
        self.assertEqual(transport.value(), abort_bytes(2, 6))
        self.clock.advance(ARTIM)
        self.assertTrue(transport.disconnecting)
        closed(protocol)
        self.failureResultOf(d, AssociationAborted)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_response_for_other_message_aborts(self):
        """A response to a message we did not send is a protocol violation: A-ABORT (2, 6)."""
        protocol, transport, association = self.establish()
        d = association.echo()
        transport.clear()
        protocol.dataReceived(response_pdus(1, D.CommandField.C_ECHO_RSP, 99, S.SUCCESS))
        self.assertEqual(transport.value(), abort_bytes(2, 6))
        self.clock.advance(ARTIM)
        closed(protocol)
        self.failureResultOf(d, AssociationAborted)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class LoopbackTests(unittest.TestCase):
    """Our requestor and our acceptor joined in memory by iosim pumps."""

    def test_echo_over_loopback(self):
        """Our own requestor associates with, echoes and releases our own acceptor, no ports involved."""
        clock = Clock()
        factory = make_factory(clock)
        server = factory.buildProtocol(None)
        request = propose(
            "ECHOSCU", "DISK_SERVER", [(VERIFICATION, (IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN))],
            MAX_PDU, IMPLEMENTATION_CLASS_UID, "V1",
        )
        client = RequestorProtocol(clock, TIMEOUTS, request, MAX_PDU)
        pump = connect(server, FakeTransport(server, True), client, FakeTransport(client, False))
        association = self.successResultOf(client.established)
        self.assertEqual(association.negotiated.context_for(VERIFICATION).transfer_syntax, EXPLICIT_VR_LITTLE_ENDIAN)
        self.assertEqual((factory.connections, factory.associations), (1, 1))

        for _ in range(3):
            d = association.echo()
            pump.flush()
            self.assertEqual(self.successResultOf(d), 0)

        released = association.release()
        pump.flush()
        self.assertIsNone(self.successResultOf(released))
        self.assertEqual(server.record.outcome, "released")
        self.assertEqual(server.record.messages, 3)
        self.assertEqual((factory.connections, factory.associations), (0, 0))
        self.assertEqual(clock.getDelayedCalls(), [])


class HostileInputTests(AcceptorTestMixin, unittest.TestCase):
    """Issue 9's findings over the adapter: each answered as PS3.7/PS3.8 say, no traceback, the factory unharmed."""

    def logged(self, level: str = "info"):
        from .support import capture_log

        return capture_log(self, level)

    def assertNoTraceback(self, events):
        self.assertEqual([e for e in events if e.get("log_failure") is not None or e.get("isError")], [])

    def test_cancel_carrying_a_data_set_aborts_and_never_reruns(self):
        """Item 5: a C-CANCEL-RQ announcing a data set after a request is answered: A-ABORT (2, 6), the service
        handled the request once."""
        ct = "1.2.840.10008.5.1.4.1.1.2"
        handled = []

        @implementer(IServiceClass)
        class Finder:
            abstract_syntaxes = {ct: (IMPLICIT_VR_LITTLE_ENDIAN,)}
            operations = {D.CommandField.C_FIND_RQ}

            def open_data_set(self, request):
                return BufferedDataSet(limit=1024)

            def handle(self, request):
                handled.append(request.data)
                request.respond(S.SUCCESS)

            def cancel(self, request):
                pass

        self.factory = make_factory(self.clock, services=[Finder()])
        request = propose("FINDSCU", "DISK_SERVER", [(ct, [IMPLICIT_VR_LITTLE_ENDIAN])], MAX_PDU, PEER_IMPL_UID, "P")
        protocol, transport = self.establish(request=request)
        find = D.Command(CommandField=D.CommandField.C_FIND_RQ, MessageID=1, Priority=0, AffectedSOPClassUID=ct)
        protocol.dataReceived(message_pdus(1, find, b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY "))
        ((_, response, _),) = decode_messages(transport.value())
        transport.clear()
        self.assertEqual(response.Status, S.SUCCESS)
        cancel = D.Command(CommandField=D.CommandField.C_CANCEL_RQ, MessageIDBeingRespondedTo=1)
        protocol.dataReceived(message_pdus(1, cancel, b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY "))
        self.assertEqual(transport.value(), abort_bytes(2, 6))
        self.assertEqual(len(handled), 1)
        self.assertIn("C-CANCEL-RQ announcing a data set", protocol.record.outcome)
        self.clock.advance(ARTIM)
        self.assertTrue(transport.disconnecting)
        closed(protocol)
        self.assertEqual(len(handled), 1)
        self.assertEqual((self.factory.connections, self.factory.associations), (0, 0))

    def test_pdus_coalesced_with_the_associate_rq(self):
        """Item 6: a P-DATA, A-RELEASE-RQ or second RQ in the same segment as the A-ASSOCIATE-RQ: A-ABORT (AA-8,
        PS3.8 Table 9-10, Sta3) and no exception; an A-ABORT behind it just closes (AA-3)."""
        events = self.logged()
        for behind, expected in ((message_pdus(1, echo_rq(1)), abort_bytes(2, 2)), (RELEASE_RQ, abort_bytes(2, 2)),
                                 (echo_request().encode(), abort_bytes(2, 2))):
            with self.subTest(behind=behind[:1]):
                protocol, transport = self.connect()
                protocol.dataReceived(echo_request().encode() + behind)
                self.assertEqual(transport.value(), expected)
                self.assertIn("the peer sent more PDUs before our answer", "; ".join(protocol.record.notes))
                self.assertAbortedThenRecovers(protocol, transport, expected)
        protocol, transport = self.connect()
        protocol.dataReceived(echo_request().encode() + abort_bytes(0, 0))
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)
        closed(protocol)
        self.assertEqual((self.factory.connections, self.factory.associations), (0, 0))
        self.assertNoTraceback(events)

    def test_non_ascii_uid_in_a_command(self):
        """Item 7: a C-ECHO whose Affected SOP Class UID holds a byte over 0x7F: C000 without echoing it, and the
        association goes on."""
        events = self.logged()
        protocol, transport = self.establish()
        command = echo_rq(1)
        command.CommandDataSetType = D.NO_DATA_SET
        raw = bytearray(command.encode())
        at = raw.index(VERIFICATION.encode())
        raw[at + 4] = 0xFF
        command_set = bytes(raw)
        protocol.dataReceived(b"".join(D.fragment(1, True, command_set, MAX_PDU)))
        ((_, response, _),) = decode_messages(transport.value())
        transport.clear()
        self.assertEqual((response.Status, response.AffectedSOPClassUID), (S.CANNOT_UNDERSTAND, None))
        self.assertEqual(response.ErrorComment, "AffectedSOPClassUID is not a valid UID")
        self.assertEqual(self.echo(protocol, transport, 2).Status, S.SUCCESS)
        closed(protocol)
        self.assertNoTraceback(events)

    def test_store_on_the_verification_context(self):
        """Item 11: a C-STORE-RQ on the Verification context: its data set drained, then 0211 with one warning
        line and no traceback."""
        events = self.logged()
        protocol, transport = self.establish()
        store = D.Command(CommandField=D.CommandField.C_STORE_RQ, MessageID=1, Priority=0,
                          AffectedSOPClassUID=VERIFICATION, AffectedSOPInstanceUID="1.2.3")
        protocol.dataReceived(message_pdus(1, store, b"x" * 40000))
        ((_, response, _),) = decode_messages(transport.value())
        transport.clear()
        self.assertEqual(response.Status, S.UNRECOGNIZED_OPERATION)
        self.assertEqual(self.echo(protocol, transport, 2).Status, S.SUCCESS)
        closed(protocol)
        self.assertNoTraceback(events)
        warnings = [e for e in events if e["log_level"].name == "warn"]
        self.assertEqual(len(warnings), 1)

    def test_tiny_maximum_pdu_refused(self):
        """Item 11: a requestor announcing a maximum PDU length of 1 is rejected (1, 1, 1), saying why."""
        request = propose("ECHOSCU", "DISK_SERVER", [(VERIFICATION, [IMPLICIT_VR_LITTLE_ENDIAN])], 1, PEER_IMPL_UID,
                          "PEER_1")
        protocol, transport = self.connect()
        protocol.dataReceived(request.encode())
        self.assertEqual(transport.value(), rj_bytes(1, 1, 1))
        self.assertIn("maximum PDU length 1 is below 1024", protocol.record.outcome)
        closed(protocol)

    def test_too_many_presentation_contexts(self):
        """Item 9: an RQ with 300 presentation contexts is rejected before they are negotiated, and the log line
        stays short."""
        events = self.logged()
        import dataclasses

        request = dataclasses.replace(echo_request(), presentation_contexts=tuple(
            P.PresentationContextRQ((2 * n + 1) % 256, VERIFICATION, (IMPLICIT_VR_LITTLE_ENDIAN,)) for n in range(300)))
        protocol, transport = self.connect()
        protocol.dataReceived(request.encode())
        self.assertEqual(transport.value(), rj_bytes(1, 2, 1))
        closed(protocol)
        (line,) = [formatEvent(e) for e in events if e.get("log_namespace") == "appliance.association"]
        self.assertIn("300 presentation contexts proposed; at most 128", line)
        self.assertLess(len(line), 2000)

    def test_control_characters_in_the_calling_ae_title(self):
        """Item 12: a calling AE title with a carriage return and an ANSI escape is rejected (1, 1, 3); the log
        line shows it escaped."""
        events = self.logged()
        request = propose("EVIL\r\x1b[31m", "DISK_SERVER", [(VERIFICATION, [IMPLICIT_VR_LITTLE_ENDIAN])], MAX_PDU,
                          PEER_IMPL_UID, "PEER_1")
        protocol, transport = self.connect()
        protocol.dataReceived(request.encode())
        self.assertEqual(transport.value(), rj_bytes(1, 1, 3))
        closed(protocol)
        (line,) = [formatEvent(e) for e in events if e.get("log_namespace") == "appliance.association"]
        self.assertIn("EVIL\\r\\x1b[31m->DISK_SERVER", line)
        self.assertNotIn("\r", line)
        self.assertNotIn("\x1b", line)


class BoundedBuffersTests(AcceptorTestMixin, unittest.TestCase):
    """Issue 9, item 8: connections counted from their first byte; nothing read while the peer does not read."""

    def test_connections_without_association_are_capped(self):
        from appliance.net.protocol import MAX_UNASSOCIATED

        events = capture_log_events(self)
        waiting = [self.connect() for _ in range(MAX_UNASSOCIATED)]
        self.assertIsNone(self.factory.buildProtocol(None))
        self.assertEqual(self.factory.refused_connections, 1)
        self.assertIsNone(self.factory.buildProtocol(None))
        refusals = [e for e in events if "refused a connection" in e.get("log_format", "")]
        self.assertEqual(len(refusals), 1)  # at most one line a minute, however many
        first, first_transport = waiting[0]
        first.dataReceived(echo_request().encode())  # now associated: room for one more
        self.assertIsNotNone(self.factory.buildProtocol(None))
        for protocol, _ in waiting:
            closed(protocol)

    def test_bytes_of_partial_requests_are_capped(self):
        """Partial A-ASSOCIATE-RQs of 900 KB each: once all connections without an association hold more than
        MAX_PENDING_BYTES, the one that brought more is closed; the count goes back to 0 as they end."""
        from appliance.net.protocol import MAX_PENDING_BYTES

        partial = b"\x01\x00" + struct.pack(">L", 1024 * 1024) + bytes(900 * 1024)
        held, dropped = [], 0
        for _ in range(MAX_PENDING_BYTES // len(partial) + 3):
            protocol, transport = self.connect()
            protocol.dataReceived(partial)
            if transport.disconnecting:
                dropped += 1
            held.append(protocol)
        self.assertEqual(dropped, 3)
        self.assertLessEqual(self.factory.pending_bytes, MAX_PENDING_BYTES)
        fresh, fresh_transport = self.establish()  # a whole RQ is still served meanwhile
        closed(fresh)
        for protocol in held:
            closed(protocol)
        self.assertEqual((self.factory.pending_bytes, self.factory.connections), (0, 0))

    def test_reading_paused_while_the_peer_does_not_read(self):
        """When the transport's write buffer is full (the peer does not read our answers) we stop reading its
        requests; a consumer's own pause and this one are independent."""
        protocol, transport = self.establish()
        monitor = transport.producer
        self.assertIsNotNone(monitor)
        monitor.pauseProducing()  # what the transport does when its buffer passes its limit
        self.assertEqual(transport.producerState, "paused")
        protocol.pause_reading()
        monitor.resumeProducing()
        self.assertEqual(transport.producerState, "paused")  # the consumer still wants it paused
        protocol.resume_reading()
        self.assertEqual(transport.producerState, "producing")
        closed(protocol)


def capture_log_events(testcase):
    from .support import capture_log

    return capture_log(testcase, "info")


class MessageIdsTests(unittest.TestCase):
    def test_unique_then_wrapping(self):
        from appliance.net.requestor import MessageIds

        ids = MessageIds()
        self.assertEqual([ids(), ids(), ids()], [1, 2, 3])
        ids._next = 0xFFFF
        self.assertEqual([ids(), ids()], [0xFFFF, 1])
