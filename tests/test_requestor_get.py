"""The requestor's C-GET (Association.get), driven in memory: role selection, C-STORE sub-operations into a sink.

The C-GET SCP is written as bytes from appliance.dicom.pdu and dimse, fed to
our RequestorProtocol over a StringTransport; time is a Clock.  Objects go
into real sinks: the Memory-Server's (MemoryStore + MemorySink) and, for
flow control, the archive's (ArchiveSink over an Archive in a temporary
folder).  A runner that runs its work later on the Clock
(``task.deferLater``) stands for worker threads that take their time.
"""

from __future__ import annotations

import os
import struct
from functools import partial
from typing import List, Optional, Sequence

from pydicom.dataset import Dataset
from twisted.internet import defer, task
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

try:
    from twisted.internet.testing import StringTransport
except ImportError:  # Twisted older than 21.2
    from twisted.test.proto_helpers import StringTransport

from appliance.archive.archive import Archive
from appliance.archive.eviction import StorageLimits
from appliance.archive.sink import ArchiveSink
from appliance.compat import encode_dataset as encode_identifier
from appliance.dicom import dimse as D
from appliance.dicom import pdu as P
from appliance.dicom import status as S
from appliance.dicom.negotiation import propose
from appliance.dicom.uids import (
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    IMPLICIT_VR_LITTLE_ENDIAN,
    STUDY_ROOT_GET,
    VERIFICATION,
)
from appliance.memory.sink import MemorySink
from appliance.memory.store import MemoryStore
from appliance.net.protocol import Timeouts
from appliance.net.requestor import AssociationAborted, AssociationError, RequestorProtocol
from appliance.net.threads import synchronous_runner

from .support_data import CT_IMAGE_STORAGE, dataset_bytes, encode_dataset, make_dataset
from .support_scu import RELEASE_RP, RELEASE_RQ, Message, MessageReader

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
MAX_PDU = 16384
TIMEOUTS = Timeouts(artim=5.0, association=10.0, dimse=20.0, idle=None)
PEER_IMPL_UID = "1.2.826.0.1.3680043.9.9999.7"
STUDY = "1.2.826.0.1.3680043.9.7101"
SERIES = f"{STUDY}.1"

#: context 1 the GET model, 3 CT, 5 MR (both to receive), 7 Verification
CONTEXTS = [
    (STUDY_ROOT_GET, (IMPLICIT_VR_LITTLE_ENDIAN,)),
    (CT_IMAGE_STORAGE, (EXPLICIT_VR_LITTLE_ENDIAN,)),
    (MR_IMAGE_STORAGE, (EXPLICIT_VR_LITTLE_ENDIAN,)),
    (VERIFICATION, (IMPLICIT_VR_LITTLE_ENDIAN,)),
]
ROLES = {CT_IMAGE_STORAGE: (False, True), MR_IMAGE_STORAGE: (False, True)}
GRANTED = (P.RoleSelection(CT_IMAGE_STORAGE, False, True), P.RoleSelection(MR_IMAGE_STORAGE, False, True))
PROTOCOL_ABORT = bytes((0x07, 0, 0, 0, 0, 4, 0, 0, 2, 6))  # provider source, invalid PDU parameter value
USER_ABORT = bytes((0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0))


def study_identifier() -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = STUDY
    return identifier


def image(number: int, sop_class: str = CT_IMAGE_STORAGE, size: int = 2048) -> Dataset:
    ds = make_dataset(study=STUDY, series=SERIES, sop=f"{SERIES}.{number}", sop_class=sop_class,
                      modality="CT" if sop_class == CT_IMAGE_STORAGE else "MR",
                      pixels=bytes((number + i) % 256 for i in range(size)))
    ds.InstanceNumber = number
    return ds


def closed(protocol) -> None:
    protocol.connectionLost(Failure(ConnectionDone("connection done")))


class Peer:
    """The C-GET SCP's side of one association with our RequestorProtocol, as bytes."""

    def __init__(self, test: SynchronousTestCase, clock: Clock, roles=ROLES) -> None:
        self.test = test
        self.request = propose("MANAGER", "ARCHIVE", CONTEXTS, MAX_PDU, IMPLEMENTATION_CLASS_UID,
                               IMPLEMENTATION_VERSION_NAME, roles)
        self.protocol = RequestorProtocol(clock, TIMEOUTS, self.request, MAX_PDU)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.sent_rq = P.decode_pdu(self.transport.value())
        self.transport.clear()
        self._reader = MessageReader(test, "the requestor")

    def accept(self, roles: Sequence[P.RoleSelection] = GRANTED):
        """Accept every context with its first syntax, answering ``roles``; returns our Association."""
        answer = P.AssociateAC(
            called_ae_title="ARCHIVE", calling_ae_title="MANAGER",
            presentation_contexts=tuple(P.PresentationContextAC(c.id, 0, c.transfer_syntaxes[0])
                                        for c in self.request.presentation_contexts),
            user_information=P.UserInformation(maximum_length=MAX_PDU, implementation_class_uid=PEER_IMPL_UID,
                                               role_selections=tuple(roles)),
        )
        self.protocol.dataReceived(answer.encode())
        return self.test.successResultOf(self.protocol.established)

    # --- what the peer sends

    @staticmethod
    def encode(context_id: int, command: D.Command, data: Optional[bytes] = None, max_pdu: int = MAX_PDU) -> bytes:
        command.CommandDataSetType = D.NO_DATA_SET if data is None else 0x0000
        out = b"".join(D.fragment(context_id, True, command.encode(), max_pdu))
        if data is not None:
            out += b"".join(D.fragment(context_id, False, data, max_pdu))
        return out

    @staticmethod
    def store_rq(message_id: int, ds_bytes: Optional[bytes], sop: str, sop_class: str = CT_IMAGE_STORAGE,
                 context_id: int = 3, max_pdu: int = 1024) -> bytes:
        """A C-STORE-RQ and its data set, in PDUs of ``max_pdu`` bytes (several fragments)."""
        command = D.Command(CommandField=D.CommandField.C_STORE_RQ, MessageID=message_id, Priority=0,
                            AffectedSOPClassUID=sop_class, AffectedSOPInstanceUID=sop)
        return Peer.encode(context_id, command, ds_bytes, max_pdu)

    @staticmethod
    def get_rsp(status: int, remaining: Optional[int], completed: int, failed: int = 0, warning: int = 0,
                message_id: int = 1, data: Optional[bytes] = None) -> bytes:
        command = D.Command(CommandField=D.CommandField.C_GET_RSP, MessageIDBeingRespondedTo=message_id,
                            AffectedSOPClassUID=STUDY_ROOT_GET, Status=status,
                            NumberOfCompletedSuboperations=completed, NumberOfFailedSuboperations=failed,
                            NumberOfWarningSuboperations=warning)
        if remaining is not None:
            command.NumberOfRemainingSuboperations = remaining
        return Peer.encode(1, command, data)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    # --- what our requestor sent

    def messages(self) -> List[Message]:
        """Every whole DIMSE message written since the last call; anything but P-DATA fails the test."""
        written = self.transport.value()
        self.transport.clear()
        return self._reader.read(written)

    def store_rsp(self) -> D.Command:
        """The one message sent since the last look, which must be a C-STORE-RSP without a data set."""
        (message,) = self.messages()
        self.test.assertEqual(message.command.CommandField, D.CommandField.C_STORE_RSP)
        self.test.assertIsNone(message.data)
        return message.command


def collect(stream) -> defer.Deferred:
    """Every response of ``stream``, pending ones and the final one."""
    async def consume():
        return [response async for response in stream]

    return defer.ensureDeferred(consume())


class GetTestCase(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        self.store = MemoryStore(64 * 1024 * 1024, self.clock)
        self.sink = MemorySink(self.store, synchronous_runner)

    def established(self, roles: Sequence[P.RoleSelection] = GRANTED, proposed=ROLES):
        peer = Peer(self, self.clock, proposed)
        return peer, peer.accept(roles)

    def start_get(self, peer, association, sink=None):
        stream = association.get(study_identifier(), sink or self.sink)
        (message,) = peer.messages()
        self.assertEqual(message.command.CommandField, D.CommandField.C_GET_RQ)
        return stream

    def held(self, ds: Dataset) -> bytes:
        held = self.store.find(STUDY, SERIES, ds.SOPInstanceUID)
        self.assertIsNotNone(held, f"{ds.SOPInstanceUID} is not in the store")
        return held.data

    def end(self, peer) -> None:
        """The connection closes; no timer is left."""
        closed(peer.protocol)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class RoleSelectionTests(GetTestCase):
    """The association a C-GET needs: role selection items proposed, the peer's answers recorded."""

    def test_roles_proposed_and_answered(self):
        """The A-ASSOCIATE-RQ carries SCU=0, SCP=1 for CT and MR; once answered, we are SCP on their contexts."""
        peer = Peer(self, self.clock)
        self.assertIsInstance(peer.sent_rq, P.AssociateRQ)
        self.assertEqual(peer.sent_rq.user_information.role_selections, GRANTED)
        association = peer.accept()
        roles = {c.id: (c.requestor_scu, c.requestor_scp) for c in association.negotiated.contexts}
        self.assertEqual(roles, {1: (True, False), 3: (False, True), 5: (False, True), 7: (True, False)})
        self.assertEqual(peer.protocol.record.notes, [])
        self.end(peer)

    def test_role_refused_for_one_class(self):
        """The peer refuses the SCP role for MR: the log notes it, and a C-STORE-RQ it sends on the MR context
        anyway is answered 0211 with an Error Comment, its data set drained and not kept; CT still works."""
        peer, association = self.established([P.RoleSelection(CT_IMAGE_STORAGE, False, True),
                                              P.RoleSelection(MR_IMAGE_STORAGE, False, False)])
        self.assertIn("SCP role not agreed for 1 SOP classes (no C-STORE can be received for them): MR Image Storage",
                      peer.protocol.record.notes)
        self.assertIn("the peer refused our SCP role", association.negotiated.contexts[2].reason)
        stream = self.start_get(peer, association)
        mr = image(1, MR_IMAGE_STORAGE)
        peer.send(Peer.store_rq(2, encode_dataset(mr, EXPLICIT_VR_LITTLE_ENDIAN), mr.SOPInstanceUID,
                                MR_IMAGE_STORAGE, context_id=5))
        response = peer.store_rsp()
        self.assertEqual(response.Status, S.UNRECOGNIZED_OPERATION)
        self.assertEqual(response.ErrorComment, "C-STORE-RQ on context 5, where we are not SCP")
        self.assertEqual(self.store.studies, {})
        self.assertEqual(self.store.reserved, 0)
        ct = image(2)
        peer.send(Peer.store_rq(3, encode_dataset(ct, EXPLICIT_VR_LITTLE_ENDIAN), ct.SOPInstanceUID))
        self.assertEqual(peer.store_rsp().Status, S.SUCCESS)
        peer.send(Peer.get_rsp(S.WARNING, None, completed=1, failed=1))
        responses = self.successResultOf(collect(stream))
        self.assertEqual([r.status for r in responses], [S.WARNING])
        self.assertEqual(stream.received, [(mr.SOPInstanceUID, S.UNRECOGNIZED_OPERATION), (ct.SOPInstanceUID, 0)])
        self.end(peer)

    def test_no_scp_role_at_all(self):
        """A peer that answers no role selection item keeps the default roles: get() refuses at once, sends
        nothing, and says why."""
        peer, association = self.established(roles=())
        error = self.assertRaises(AssociationError, association.get, study_identifier(), self.sink)
        self.assertIn("agreed to our SCP role on no presentation context", str(error))
        self.assertEqual(peer.transport.value(), b"")
        self.assertTrue(association.is_open)
        self.end(peer)


class SubOperationTests(GetTestCase):
    """C-STORE sub-operations during a C-GET, into a MemorySink."""

    def script(self, first: Dataset, second: Dataset) -> List[bytes]:
        """What the peer sends for a C-GET of two objects: store, pending, store, pending, final."""
        return [
            Peer.store_rq(2, encode_dataset(first, EXPLICIT_VR_LITTLE_ENDIAN), first.SOPInstanceUID),
            Peer.get_rsp(S.PENDING, 1, completed=1),
            Peer.store_rq(3, encode_dataset(second, EXPLICIT_VR_LITTLE_ENDIAN), second.SOPInstanceUID,
                          MR_IMAGE_STORAGE, context_id=5),
            Peer.get_rsp(S.PENDING, 0, completed=2),
            Peer.get_rsp(S.SUCCESS, None, completed=2),
        ]

    def test_two_objects_interleaved_with_pendings(self):
        """The C-GET-RQ as PS3.7 says; each C-STORE-RQ's data set kept as sent and answered 0000 with its UIDs on
        its own context; the stream gives the pendings and the final with the counts."""
        peer, association = self.established()
        stream = association.get(study_identifier(), self.sink)
        (rq,) = peer.messages()
        self.assertEqual(rq.context_id, 1)
        self.assertEqual(rq.command.CommandField, D.CommandField.C_GET_RQ)
        self.assertEqual(rq.command.MessageID, 1)
        self.assertEqual(rq.command.AffectedSOPClassUID, STUDY_ROOT_GET)
        self.assertEqual(rq.command.Priority, 0)
        self.assertEqual(rq.data, encode_identifier(study_identifier(), IMPLICIT_VR_LITTLE_ENDIAN))
        responses = collect(stream)
        ct, mr = image(1, size=5000), image(2, MR_IMAGE_STORAGE)
        store_ct, pending_1, store_mr, pending_2, final = self.script(ct, mr)

        peer.send(store_ct)
        ((context_id, response, data),) = peer.messages()
        self.assertEqual((context_id, data), (3, None))
        self.assertEqual(fields(response), fields(D.Command(
            CommandField=D.CommandField.C_STORE_RSP, MessageIDBeingRespondedTo=2, CommandDataSetType=D.NO_DATA_SET,
            Status=S.SUCCESS, AffectedSOPClassUID=CT_IMAGE_STORAGE, AffectedSOPInstanceUID=ct.SOPInstanceUID)))
        self.assertEqual(self.held(ct), encode_dataset(ct, EXPLICIT_VR_LITTLE_ENDIAN))
        peer.send(pending_1)
        peer.send(store_mr)
        ((context_id, response, _),) = peer.messages()
        self.assertEqual((context_id, response.Status, response.MessageIDBeingRespondedTo), (5, S.SUCCESS, 3))
        self.assertEqual(self.held(mr), encode_dataset(mr, EXPLICIT_VR_LITTLE_ENDIAN))
        peer.send(pending_2)
        self.assertNoResult(responses)
        peer.send(final)
        statuses = [(r.status, r.command.NumberOfRemainingSuboperations, r.command.NumberOfCompletedSuboperations)
                    for r in self.successResultOf(responses)]
        self.assertEqual(statuses, [(S.PENDING, 1, 1), (S.PENDING, 0, 2), (S.SUCCESS, None, 2)])
        self.assertEqual(stream.received, [(ct.SOPInstanceUID, 0), (mr.SOPInstanceUID, 0)])
        self.assertEqual(self.store.reserved, 0)
        released = association.release()
        self.assertEqual(peer.transport.value(), RELEASE_RQ)
        peer.send(RELEASE_RP)
        closed(peer.protocol)
        self.assertIsNone(self.successResultOf(released))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_fed_one_byte_at_a_time(self):
        """The same C-GET with every byte the peer sends fed alone: the same objects, answers and responses."""
        peer, association = self.established()
        stream = self.start_get(peer, association)
        ct, mr = image(1, size=5000), image(2, MR_IMAGE_STORAGE)
        for part in self.script(ct, mr):
            for index in range(len(part)):
                peer.send(part[index:index + 1])
        answers = [(m.context_id, m.command.MessageIDBeingRespondedTo, m.command.Status) for m in peer.messages()]
        self.assertEqual(answers, [(3, 2, S.SUCCESS), (5, 3, S.SUCCESS)])
        self.assertEqual([r.status for r in self.successResultOf(collect(stream))], [S.PENDING, S.PENDING, S.SUCCESS])
        self.assertEqual(self.held(ct), encode_dataset(ct, EXPLICIT_VR_LITTLE_ENDIAN))
        self.assertEqual(self.held(mr), encode_dataset(mr, EXPLICIT_VR_LITTLE_ENDIAN))
        self.end(peer)

    def test_bad_objects_answered_as_the_storage_scp_does(self):
        """A data set that is not the command's instance: A900; one that cannot be parsed: C000; a command whose
        SOP class is not its context's, or whose instance UID is no UID: C000 after its data set is drained
        (never echoed); each with an Error Comment, nothing kept, and the C-GET goes on."""
        peer, association = self.established()
        stream = self.start_get(peer, association)
        ct = image(1)
        data = encode_dataset(ct, EXPLICIT_VR_LITTLE_ENDIAN)

        peer.send(Peer.store_rq(2, data, f"{SERIES}.99"))
        response = peer.store_rsp()
        self.assertEqual((response.Status, response.AffectedSOPInstanceUID), (0xA900, f"{SERIES}.99"))
        self.assertTrue(response.ErrorComment)

        peer.send(Peer.store_rq(3, b"\x08\x00\x18\x00UI\xff\xff" + b"garbage" * 20, ct.SOPInstanceUID))
        response = peer.store_rsp()
        self.assertEqual(response.Status, S.CANNOT_UNDERSTAND)
        self.assertTrue(response.ErrorComment)

        peer.send(Peer.store_rq(4, data, ct.SOPInstanceUID, MR_IMAGE_STORAGE, context_id=3))
        response = peer.store_rsp()
        self.assertEqual(response.Status, S.CANNOT_UNDERSTAND)
        self.assertEqual(response.ErrorComment, f"SOP class is not context 3's {CT_IMAGE_STORAGE}")

        peer.send(Peer.store_rq(5, data, "../../etc/passwd"))
        response = peer.store_rsp()
        self.assertEqual(response.Status, S.CANNOT_UNDERSTAND)
        self.assertEqual(response.ErrorComment, "AffectedSOPInstanceUID is not a valid UID")
        self.assertIsNone(response.AffectedSOPInstanceUID)

        self.assertEqual(self.store.studies, {})
        self.assertEqual(self.store.reserved, 0)
        peer.send(Peer.get_rsp(0xA702, 0, completed=0, failed=4))
        self.assertEqual([r.status for r in self.successResultOf(collect(stream))], [0xA702])
        self.assertEqual([status for _, status in stream.received], [0xA900, 0xC000, 0xC000, 0xC000])
        self.assertTrue(association.is_open)
        self.end(peer)

    def test_memory_full_answered_a700(self):
        """An object the store has no room for is answered A700 with the store's reason; the next one still fits."""
        self.store.limit = 16 * 1024
        peer, association = self.established()
        stream = self.start_get(peer, association)
        big, small = image(1, size=32 * 1024), image(2)
        peer.send(Peer.store_rq(2, encode_dataset(big, EXPLICIT_VR_LITTLE_ENDIAN), big.SOPInstanceUID))
        response = peer.store_rsp()
        self.assertEqual(response.Status, S.OUT_OF_RESOURCES)
        self.assertTrue(response.ErrorComment.startswith("memory full: memory_limit=16384 reached"))
        peer.send(Peer.store_rq(3, encode_dataset(small, EXPLICIT_VR_LITTLE_ENDIAN), small.SOPInstanceUID))
        self.assertEqual(peer.store_rsp().Status, S.SUCCESS)
        peer.send(Peer.get_rsp(S.WARNING, None, completed=1, failed=1))
        self.assertEqual(self.successResultOf(collect(stream))[-1].status, S.WARNING)
        self.assertEqual(stream.received, [(big.SOPInstanceUID, S.OUT_OF_RESOURCES), (small.SOPInstanceUID, 0)])
        self.end(peer)


class ProtocolViolationTests(GetTestCase):
    """Requests the peer may not send: A-ABORT (provider source, reason 6), and what was outstanding fails."""

    def test_store_without_an_outstanding_get(self):
        """A C-STORE-RQ on an idle association aborts it."""
        peer, association = self.established()
        ct = image(1)
        peer.send(Peer.store_rq(2, encode_dataset(ct, EXPLICIT_VR_LITTLE_ENDIAN), ct.SOPInstanceUID))
        self.assertEqual(peer.transport.value(), PROTOCOL_ABORT)
        self.assertIn("a C-STORE-RQ from the peer while no C-GET of ours is outstanding", peer.protocol.record.outcome)
        self.assertEqual(self.store.studies, {})
        self.end(peer)

    def test_store_during_another_request(self):
        """A C-STORE-RQ while our C-ECHO (not a C-GET) is outstanding aborts, and the echo fails."""
        peer, association = self.established()
        echo = association.echo()
        peer.messages()
        ct = image(1)
        peer.send(Peer.store_rq(2, encode_dataset(ct, EXPLICIT_VR_LITTLE_ENDIAN), ct.SOPInstanceUID))
        self.assertEqual(peer.transport.value(), PROTOCOL_ABORT)
        self.failureResultOf(echo, AssociationAborted)
        self.end(peer)

    def test_other_request_during_get(self):
        """A C-ECHO-RQ from the peer during our C-GET aborts, and the C-GET fails with the reason."""
        peer, association = self.established()
        stream = self.start_get(peer, association)
        peer.send(Peer.encode(7, D.Command(CommandField=D.CommandField.C_ECHO_RQ, MessageID=9,
                                           AffectedSOPClassUID=VERIFICATION)))
        self.assertEqual(peer.transport.value(), PROTOCOL_ABORT)
        failure = self.failureResultOf(collect(stream), AssociationAborted)
        self.assertIn("a C-ECHO-RQ from the peer", str(failure.value))
        self.end(peer)

    def test_second_store_before_the_first_is_answered(self):
        """The peer may not send the next C-STORE-RQ before our C-STORE-RSP (no asynchronous operations): abort,
        and the object being decided is not answered."""
        self.sink = MemorySink(self.store, partial(task.deferLater, self.clock, 5.0), inline_limit=0)
        peer, association = self.established()
        stream = self.start_get(peer, association)
        first, second = image(1), image(2)
        peer.send(Peer.store_rq(2, encode_dataset(first, EXPLICIT_VR_LITTLE_ENDIAN), first.SOPInstanceUID))
        self.assertEqual(peer.messages(), [])
        peer.send(Peer.store_rq(3, encode_dataset(second, EXPLICIT_VR_LITTLE_ENDIAN), second.SOPInstanceUID))
        self.assertEqual(peer.transport.value(), PROTOCOL_ABORT)
        self.assertIn("C-STORE-RQ message 3 arrived before we answered message 2", peer.protocol.record.outcome)
        self.failureResultOf(collect(stream), AssociationAborted)
        self.clock.advance(TIMEOUTS.artim)
        self.assertTrue(peer.transport.disconnecting)
        self.assertEqual(peer.transport.value(), PROTOCOL_ABORT)  # the first is never answered
        self.end(peer)


class CancelTests(GetTestCase):
    def test_cancel_goes_on_the_get_context(self):
        """stream.cancel() after a sub-operation was answered sends C-CANCEL-RQ on the C-GET's context (not the
        storage context we answered on); the peer's FE00 with its counts ends the stream."""
        peer, association = self.established()
        stream = self.start_get(peer, association)
        ct = image(1)
        peer.send(Peer.store_rq(2, encode_dataset(ct, EXPLICIT_VR_LITTLE_ENDIAN), ct.SOPInstanceUID))
        self.assertEqual(peer.store_rsp().Status, S.SUCCESS)
        peer.send(Peer.get_rsp(S.PENDING, 2, completed=1))
        stream.cancel()
        ((context_id, cancel, data),) = peer.messages()
        self.assertEqual((context_id, data), (1, None))
        self.assertEqual(fields(cancel), fields(D.Command(CommandField=D.CommandField.C_CANCEL_RQ,
                                                          MessageIDBeingRespondedTo=1,
                                                          CommandDataSetType=D.NO_DATA_SET)))
        peer.send(Peer.get_rsp(S.CANCEL, 2, completed=1))
        responses = self.successResultOf(collect(stream))
        self.assertEqual([(r.status, r.command.NumberOfRemainingSuboperations) for r in responses],
                         [(S.PENDING, 2), (S.CANCEL, 2)])
        self.assertIsNotNone(self.store.find(STUDY, SERIES, ct.SOPInstanceUID))
        self.end(peer)


class TimerTests(GetTestCase):
    """The DIMSE timer bounds the peer's silence, not an object's size nor the sink's work."""

    def test_fragments_restart_the_timer(self):
        """An object whose fragments come 15 s apart (the timeout is 20 s) is received whole, 90 s in all."""
        peer, association = self.established()
        stream = self.start_get(peer, association)
        ct = image(1, size=6000)
        encoded = Peer.store_rq(2, encode_dataset(ct, EXPLICIT_VR_LITTLE_ENDIAN), ct.SOPInstanceUID, max_pdu=1024)
        pdus = split_pdus(encoded)
        self.assertGreater(len(pdus), 6)
        for pdu in pdus:
            self.clock.advance(15)
            peer.send(pdu)
        self.assertEqual(peer.store_rsp().Status, S.SUCCESS)
        self.clock.advance(15)
        peer.send(Peer.get_rsp(S.SUCCESS, None, completed=1))
        self.assertEqual(self.successResultOf(collect(stream))[-1].status, S.SUCCESS)
        self.end(peer)

    def test_silence_mid_object_times_out(self):
        """The peer stops in the middle of an object: A-ABORT after 20 s, the C-GET fails, and the object's
        reservation is given back when the connection closes."""
        peer, association = self.established()
        stream = self.start_get(peer, association)
        ct = image(1, size=6000)
        pdus = split_pdus(Peer.store_rq(2, encode_dataset(ct, EXPLICIT_VR_LITTLE_ENDIAN), ct.SOPInstanceUID))
        for pdu in pdus[:3]:
            peer.send(pdu)
        self.assertGreater(self.store.reserved, 0)
        self.clock.advance(TIMEOUTS.dimse - 1)
        self.assertEqual(peer.transport.value(), b"")
        self.clock.advance(1)
        self.assertEqual(peer.transport.value(), USER_ABORT)
        failure = self.failureResultOf(collect(stream), AssociationAborted)
        self.assertIn("DIMSE timeout", str(failure.value))
        self.clock.advance(TIMEOUTS.artim)
        self.end(peer)
        self.assertEqual(self.store.reserved, 0)
        self.assertEqual(self.store.studies, {})

    def test_sink_deciding_stops_the_timer_and_holds_the_final(self):
        """While the sink takes 60 s to check an object, nothing times out; a final C-GET-RSP the peer sends
        meanwhile is held until our C-STORE-RSP is sent, so the stream never ends before the object is kept."""
        self.sink = MemorySink(self.store, partial(task.deferLater, self.clock, 60.0), inline_limit=0)
        peer, association = self.established()
        stream = self.start_get(peer, association)
        responses = collect(stream)
        ct = image(1)
        peer.send(Peer.store_rq(2, encode_dataset(ct, EXPLICIT_VR_LITTLE_ENDIAN), ct.SOPInstanceUID))
        peer.send(Peer.get_rsp(S.SUCCESS, None, completed=1))
        self.clock.advance(59)
        self.assertEqual(peer.transport.value(), b"")
        self.assertNoResult(responses)
        self.clock.advance(1)
        self.assertEqual(peer.store_rsp().Status, S.SUCCESS)
        self.assertEqual([r.status for r in self.successResultOf(responses)], [S.SUCCESS])
        self.assertIsNotNone(self.store.find(STUDY, SERIES, ct.SOPInstanceUID))
        self.end(peer)

    def test_response_after_a_held_final_aborts(self):
        """Anything after the final C-GET-RSP (held while the sink decides) is a protocol violation."""
        self.sink = MemorySink(self.store, partial(task.deferLater, self.clock, 60.0), inline_limit=0)
        peer, association = self.established()
        stream = self.start_get(peer, association)
        ct = image(1)
        peer.send(Peer.store_rq(2, encode_dataset(ct, EXPLICIT_VR_LITTLE_ENDIAN), ct.SOPInstanceUID))
        peer.send(Peer.get_rsp(S.SUCCESS, None, completed=1))
        peer.send(Peer.get_rsp(S.SUCCESS, None, completed=1))
        self.assertEqual(peer.transport.value(), PROTOCOL_ABORT)
        self.assertIn("after the final response to message 1", peer.protocol.record.outcome)
        self.failureResultOf(collect(stream), AssociationAborted)
        self.clock.advance(60)  # the sink's decision comes to nothing: the association is gone
        self.assertEqual(peer.transport.value(), PROTOCOL_ABORT)
        self.clock.advance(TIMEOUTS.artim)
        self.end(peer)


class FlowControlTests(SynchronousTestCase):
    """An object sink that cannot keep up pauses reading from the peer, and the DIMSE timer with it."""

    def test_archive_sink_pauses_and_resumes(self):
        """Into the archive, whose writes take 30 s each (more than the DIMSE timeout): past 1 MiB in flight the
        transport is paused and the timer stopped; once written, reading resumes; the object is archived."""
        clock = Clock()
        clock.advance(1000)
        root = self.mktemp()
        os.makedirs(root)
        archive = Archive(root, StorageLimits(min_free_space=0), "replace", clock,
                          partial(task.deferLater, clock, 30.0), synchronous_runner)
        self.addCleanup(archive.close)
        sink = ArchiveSink(archive, IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME)
        peer = Peer(self, clock)
        association = peer.accept()
        stream = association.get(study_identifier(), sink)
        peer.messages()
        ct = image(1, size=3 * 1024 * 1024)
        pdus = split_pdus(Peer.store_rq(2, encode_dataset(ct, EXPLICIT_VR_LITTLE_ENDIAN), ct.SOPInstanceUID,
                                        max_pdu=MAX_PDU))
        pauses = 0
        for pdu in pdus:
            for _ in range(100):
                if peer.transport.producerState == "producing":
                    break
                clock.advance(30)  # waiting for the archive; the DIMSE timer does not run meanwhile
            self.assertEqual(peer.transport.producerState, "producing", "reading never resumed")
            peer.send(pdu)
            pauses += peer.transport.producerState == "paused"
        self.assertGreater(pauses, 0, "the archive sink never paused reading")
        for _ in range(100):
            if peer.transport.value():
                break
            clock.advance(30)
        self.assertEqual(peer.store_rsp().Status, S.SUCCESS)
        self.assertEqual(peer.transport.producerState, "producing")
        row = archive.index.lookup(ct.SOPInstanceUID)
        self.assertEqual((row.study_uid, row.transfer_syntax), (STUDY, EXPLICIT_VR_LITTLE_ENDIAN))
        self.assertEqual(dataset_bytes(archive.store.absolute(row.path)), encode_dataset(ct, EXPLICIT_VR_LITTLE_ENDIAN))
        peer.send(Peer.get_rsp(S.SUCCESS, None, completed=1))
        self.assertEqual(self.successResultOf(collect(stream))[-1].status, S.SUCCESS)
        closed(peer.protocol)
        clock.advance(30)  # the archive's spare files, made after the commit, take one more write here
        self.assertEqual(clock.getDelayedCalls(), [])


def fields(command: D.Command) -> dict:
    """A command's elements but its group length, by keyword."""
    return {keyword: int(value) if isinstance(value, int) else value for keyword, value in command.items()
            if keyword != "CommandGroupLength"}


def split_pdus(data: bytes) -> List[bytes]:
    """Cut encoded PDUs apart by their header lengths."""
    pdus, offset = [], 0
    while offset < len(data):
        (length,) = struct.unpack_from(">L", data, offset + 2)
        pdus.append(data[offset:offset + 6 + length])
        offset += 6 + length
    return pdus
