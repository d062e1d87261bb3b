"""An SCU in memory for tests: associate with an acceptor factory over a StringTransport, send DIMSE requests,
collect the responses.  Nothing is listened on and no time passes unless the test's clock is advanced."""

from __future__ import annotations

import dataclasses
from typing import List, NamedTuple, Optional, Sequence, Tuple

try:
    from twisted.internet.testing import StringTransport
except ImportError:  # Twisted < 19.7
    from twisted.test.proto_helpers import StringTransport

from appliance.dicom import dimse as D
from appliance.dicom import pdu as P
from appliance.dicom.negotiation import propose
from appliance.dicom.uids import IMPLEMENTATION_CLASS_UID

RELEASE_RQ = bytes((0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0))
RELEASE_RP = bytes((0x06, 0, 0, 0, 0, 4, 0, 0, 0, 0))


class Message(NamedTuple):
    """One DIMSE message the acceptor sent: its presentation context, command set and data set bytes (or None)."""

    context_id: int
    command: D.Command
    data: Optional[bytes]


class MessageReader:
    """The whole DIMSE messages in what one side of an association wrote, fed as it comes; anything but a
    P-DATA-TF PDU fails the test."""

    def __init__(self, test, who: str) -> None:
        self.test = test
        self.who = who
        self._framer = P.PDUFramer(1 << 24)
        self._assembler = D.MessageAssembler()
        self._partial: Optional[Tuple[int, D.Command, bytearray]] = None

    def read(self, written: bytes) -> List[Message]:
        self._framer.feed(written)
        found: List[Message] = []
        while True:
            raw = self._framer.next_pdu()
            if raw is None:
                return found
            pdu = P.decode_pdu(raw)
            self.test.assertIsInstance(pdu, P.PDataTF, f"{self.who} sent {pdu!r}")
            for event in self._assembler.receive(pdu.pdvs):
                if isinstance(event, D.CommandReceived):
                    if event.command.has_data_set:
                        self._partial = (event.context_id, event.command, bytearray())
                    else:
                        found.append(Message(event.context_id, event.command, None))
                else:
                    context_id, command, data = self._partial
                    data += event.data
                    if event.is_last:
                        found.append(Message(context_id, command, bytes(data)))
                        self._partial = None


class MemorySCU:
    """One association at a time with ``factory`` (an AcceptorFactory), all in memory."""

    def __init__(self, test, factory, calling: str = "SCU", called: str = "DISK_SERVER", max_pdu: int = 16384) -> None:
        self.test = test
        self.factory = factory
        self.calling, self.called, self.max_pdu = calling, called, max_pdu
        self.protocol = None
        self.transport: Optional[StringTransport] = None

    def associate(self, contexts: Sequence[Tuple[str, Sequence[str]]], extended: Sequence = ()) -> P.AssociateAC:
        """Connect and associate proposing ``contexts`` (with SOP class extended negotiation items ``extended``);
        checks that the A-ASSOCIATE-AC came and returns it."""
        self.protocol = self.factory.buildProtocol(None)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        request = propose(self.calling, self.called, list(contexts), self.max_pdu, IMPLEMENTATION_CLASS_UID, "TESTS")
        if extended:
            info = dataclasses.replace(request.user_information, sop_class_extended=tuple(extended))
            request = dataclasses.replace(request, user_information=info)
        self.protocol.dataReceived(request.encode())
        accept = P.decode_pdu(self.transport.value())
        self.transport.clear()
        self.test.assertIsInstance(accept, P.AssociateAC)
        self._reader = MessageReader(self.test, "the acceptor")
        return accept

    def send(self, command: D.Command, data: Optional[bytes] = None, context_id: int = 1) -> None:
        """Send a DIMSE message: the command set, then the data set if any (Command Data Set Type set to match)."""
        command.CommandDataSetType = D.NO_DATA_SET if data is None else 0x0000
        self.send_raw(b"".join(D.fragment(context_id, True, command.encode(), self.max_pdu)))
        if data is not None:
            self.send_raw(b"".join(D.fragment(context_id, False, data, self.max_pdu)))

    def send_raw(self, encoded: bytes) -> None:
        self.protocol.dataReceived(encoded)

    def messages(self) -> List[Message]:
        """Every whole DIMSE message written since the last call (only P-DATA-TF PDUs expected)."""
        written = self.transport.value()
        self.transport.clear()
        return self._reader.read(written)

    def request(self, command: D.Command, data: Optional[bytes] = None, context_id: int = 1) -> List[Message]:
        """Send a request and return the messages the acceptor wrote in answer (so far)."""
        self.send(command, data, context_id)
        return self.messages()

    def release(self) -> None:
        """A-RELEASE-RQ, the RP checked, the connection closed."""
        self.transport.clear()
        self.protocol.dataReceived(RELEASE_RQ)
        self.test.assertEqual(self.transport.value(), RELEASE_RP)
        self.protocol.connectionLost(None)

    def lost(self) -> None:
        """The connection is gone (as the reactor would say)."""
        self.protocol.connectionLost(None)
