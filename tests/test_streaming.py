"""Data sets stream through an association in both directions without being held whole."""

from __future__ import annotations

import io

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

try:
    from twisted.internet.testing import StringTransport
except ImportError:  # Twisted < 19.7
    from twisted.test.proto_helpers import StringTransport

from appliance.dicom import dimse as D
from appliance.dicom import pdu as P
from appliance.dicom.negotiation import AcceptorPolicy, propose
from appliance.dicom.uids import EXPLICIT_VR_LITTLE_ENDIAN, IMPLEMENTATION_CLASS_UID
from appliance.interfaces import IDataSetConsumer, IServiceClass
from appliance.net.protocol import AcceptorFactory, Timeouts
from appliance.net.requestor import RequestorProtocol

from .support_scu import MemorySCU

CT = "1.2.840.10008.5.1.4.1.1.2"
MAX_PDU = 4096


@implementer(IDataSetConsumer)
class RecordingConsumer:
    """Keeps the size of each fragment and a running digest, never the data."""

    def __init__(self):
        self.sizes = []
        self.total = 0
        self.checksum = 0
        self.finished = False
        self.abandoned = None

    def write(self, data):
        self.sizes.append(len(data))
        self.total += len(data)
        self.checksum = (self.checksum * 31 + sum(data)) % (2**61 - 1)

    def finish(self):
        self.finished = True
        return self.total

    def abandon(self, reason):
        self.abandoned = reason


@implementer(IServiceClass)
class RecordingStorage:
    """A storage-like service that answers Success once the data set is consumed."""

    abstract_syntaxes = {CT: (EXPLICIT_VR_LITTLE_ENDIAN,)}
    operations = {D.CommandField.C_STORE_RQ}

    def __init__(self):
        self.consumers = []
        self.handled = []

    def open_data_set(self, request):
        consumer = RecordingConsumer()
        self.consumers.append(consumer)
        return consumer

    def handle(self, request):
        self.handled.append(request.data)
        request.respond(0x0000)

    def cancel(self, request):
        pass


def checksum_of(data: bytes, chunk: int) -> int:
    value = 0
    for offset in range(0, len(data), chunk):
        value = (value * 31 + sum(data[offset : offset + chunk])) % (2**61 - 1)
    return value


class AcceptorStreamingTests(SynchronousTestCase):
    """An acceptor hands a large data set to its consumer PDU by PDU."""

    def setUp(self):
        self.clock = Clock()
        self.service = RecordingStorage()
        policy = AcceptorPolicy(
            ae_title="DISK_SERVER",
            abstract_syntaxes=self.service.abstract_syntaxes,
            max_pdu=MAX_PDU,
            implementation_class_uid=IMPLEMENTATION_CLASS_UID,
            implementation_version_name="TEST",
        )
        self.factory = AcceptorFactory(policy, {CT: self.service}, self.clock, Timeouts(), 4)
        scu = MemorySCU(self, self.factory, max_pdu=MAX_PDU)
        scu.associate([(CT, (EXPLICIT_VR_LITTLE_ENDIAN,))])
        self.protocol, self.transport = scu.protocol, scu.transport

    def test_large_data_set_reaches_consumer_in_bounded_fragments(self):
        """A 3 MB data set arrives as fragments no larger than one PDU; the framer never holds more than one PDU."""
        data = bytes(range(256)) * (3 * 1024 * 1024 // 256)
        command = D.Command(
            CommandField=D.CommandField.C_STORE_RQ, MessageID=7, Priority=0, AffectedSOPClassUID=CT,
            AffectedSOPInstanceUID="1.2.3.4", CommandDataSetType=0,
        )
        for encoded in D.fragment(1, True, command.encode(), MAX_PDU):
            self.protocol.dataReceived(encoded)
        largest_buffer = 0
        for encoded in D.fragment(1, False, data, MAX_PDU):
            # feed each PDU in two pieces, as TCP may deliver it
            self.protocol.dataReceived(encoded[:100])
            largest_buffer = max(largest_buffer, self.protocol.ul._framer.buffered)
            self.protocol.dataReceived(encoded[100:])
        consumer = self.service.consumers[0]
        self.assertTrue(consumer.finished)
        self.assertEqual(consumer.total, len(data))
        self.assertEqual(max(consumer.sizes), MAX_PDU - 6)
        self.assertEqual(consumer.checksum, checksum_of(data, MAX_PDU - 6))
        self.assertLessEqual(largest_buffer, MAX_PDU + 6)
        self.assertEqual(self.service.handled, [len(data)])
        response = P.decode_pdu(self.transport.value())
        command = D.Command.decode(response.pdvs[0].data)
        self.assertEqual((command.CommandField, command.Status, command.MessageIDBeingRespondedTo), (0x8001, 0, 7))

    def test_connection_lost_mid_data_set_abandons_consumer(self):
        """A peer that vanishes halfway through a data set gets its consumer abandoned, and counters return to 0."""
        command = D.Command(
            CommandField=D.CommandField.C_STORE_RQ, MessageID=1, Priority=0, AffectedSOPClassUID=CT,
            AffectedSOPInstanceUID="1.2.3.4", CommandDataSetType=0,
        )
        for encoded in D.fragment(1, True, command.encode(), MAX_PDU):
            self.protocol.dataReceived(encoded)
        first = next(D.fragment(1, False, b"x" * 10000, MAX_PDU))
        self.protocol.dataReceived(first)
        self.protocol.connectionLost(None)
        consumer = self.service.consumers[0]
        self.assertFalse(consumer.finished)
        self.assertIn("association ended", consumer.abandoned)
        self.assertEqual((self.factory.connections, self.factory.associations), (0, 0))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class SenderStreamingTests(SynchronousTestCase):
    """send_message_from_file writes one PDU each time the transport asks for more."""

    def setUp(self):
        self.clock = Clock()
        request = propose("SCU", "PEER", [(CT, (EXPLICIT_VR_LITTLE_ENDIAN,))], MAX_PDU, IMPLEMENTATION_CLASS_UID, "T")
        self.protocol = RequestorProtocol(self.clock, Timeouts(idle=None), request, MAX_PDU)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        accept = P.AssociateAC(
            called_ae_title="PEER", calling_ae_title="SCU",
            presentation_contexts=(P.PresentationContextAC(1, 0, EXPLICIT_VR_LITTLE_ENDIAN),),
            user_information=P.UserInformation(maximum_length=MAX_PDU, implementation_class_uid="1.2.3"),
        )
        self.protocol.dataReceived(accept.encode())
        self.association = self.successResultOf(self.protocol.established)
        self.transport.clear()

    def _command(self):
        return D.Command(
            CommandField=D.CommandField.C_STORE_RQ, MessageID=1, Priority=0, AffectedSOPClassUID=CT,
            AffectedSOPInstanceUID="1.2.3.4",
        )

    def test_pull_producer_sends_one_block_per_request(self):
        """Nothing of the data set is written until the transport pulls, then one block of PDUs per pull,
        each PDU within the peer's maximum, only the very last flagged last."""
        from appliance.net.protocol import SEND_BLOCK

        block = SEND_BLOCK // (MAX_PDU - 6) * (MAX_PDU - 6)
        data = bytes(range(256)) * (2 * block // 256 + 50)  # two whole blocks and a bit
        done = self.protocol.send_message_from_file(1, self._command(), io.BytesIO(data), len(data))
        command_bytes = self.transport.value()
        self.assertEqual(P.decode_pdu(command_bytes).pdvs[0].is_command, True)
        self.assertEqual(type(self.transport.producer).__name__, "_DataSetSender")
        self.assertFalse(self.transport.streaming)
        received = b""
        pulls = 0
        while not done.called:
            self.transport.clear()
            self.transport.producer.resumeProducing()
            pulls += 1
            framer = P.PDUFramer(MAX_PDU)
            framer.feed(self.transport.value())
            pulled = 0
            while True:
                raw = framer.next_pdu()
                if raw is None:
                    break
                pdu = P.decode_pdu(raw)
                self.assertEqual(len(pdu.pdvs), 1)
                self.assertLessEqual(len(raw), MAX_PDU + 6)
                received += pdu.pdvs[0].data
                pulled += len(pdu.pdvs[0].data)
                self.assertEqual(pdu.pdvs[0].is_last, len(received) == len(data))
            self.assertEqual(framer.buffered, 0)
            self.assertLessEqual(pulled, block)
        self.assertEqual(received, data)
        self.assertEqual(pulls, 3)
        self.assertIsNone(self.successResultOf(done))
        self.assertIsNone(self.transport.producer)

    def test_short_source_fails_and_aborts(self):
        """A file shorter than announced fails the Deferred and aborts instead of sending a truncated data set."""
        done = self.protocol.send_message_from_file(1, self._command(), io.BytesIO(b"abc"), 10)
        self.transport.clear()
        self.transport.producer.resumeProducing()
        self.failureResultOf(done, EOFError)
        abort = P.decode_pdu(self.transport.value())
        self.assertIsInstance(abort, P.Abort)

    def test_connection_lost_fails_send(self):
        """Losing the connection mid-send fails the Deferred with ConnectionError."""
        data = b"y" * 600000  # more than one block
        done = self.protocol.send_message_from_file(1, self._command(), io.BytesIO(data), len(data))
        self.transport.producer.resumeProducing()
        producer = self.transport.producer
        self.protocol.connectionLost(None)
        producer.stopProducing()
        self.failureResultOf(done, ConnectionError)
