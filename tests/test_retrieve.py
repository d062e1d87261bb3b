"""The Disk-Server's C-MOVE SCP, in memory: statuses, sub-operations, conversion, cancel, pins, flow control.

The C-MOVE arrives on our AcceptorProtocol over a StringTransport; the
sub-association is our own requestor joined by twisted.test.iosim pumps to a
small in-test destination (our acceptor with a service that keeps what it
receives and answers the statuses a test scripts).  The archive is real, in a
temporary folder, with synchronous runners; time is a Clock.
"""

from __future__ import annotations

import io
import os
import struct
import warnings

from pydicom import dcmread
from pydicom.dataset import Dataset
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.test.iosim import FakeTransport
from twisted.test.iosim import connect as iosim_connect
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

try:
    from twisted.internet.testing import StringTransport
except ImportError:  # Twisted < 19.7
    from twisted.test.proto_helpers import StringTransport

from appliance import config as configuration
from appliance.ae import retrieve
from appliance.ae.listeners import acceptor_factory, disk_server_services
from appliance.ae.retrieve import (
    IdentifierError,
    RetrieveService,
    choose_context,
    convert_stored_data_set,
    failed_uid_list,
    parse_identifier,
    propose_contexts,
)
from appliance.ae.verification import VerificationService
from appliance.archive.archive import Archive
from appliance.archive.eviction import StorageLimits
from appliance.archive.index import InstanceRow
from appliance.archive.sink import examine
from appliance.archive.store import data_set_offset, part10_header
from appliance.compat import decode_dataset
from appliance.compat import encode_dataset as encode_identifier
from appliance.dicom import dimse as D
from appliance.dicom import pdu as P
from appliance.dicom import status as S
from appliance.dicom.negotiation import AcceptorPolicy, ContextOutcome, Negotiated, propose
from appliance.dicom.uids import (
    EXPLICIT_VR_BIG_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLEMENTATION_CLASS_UID,
    IMPLICIT_VR_LITTLE_ENDIAN,
    STUDY_ROOT_MOVE,
)
from appliance.interfaces import IServiceClass
from appliance.net import requestor
from appliance.net.protocol import SEND_BLOCK, AcceptorFactory, BufferedDataSet, Timeouts
from appliance.net.threads import synchronous_runner

from .support_data import CT_IMAGE_STORAGE, SECONDARY_CAPTURE, dataset_bytes, encode_dataset, make_dataset
from .support_scu import MemorySCU
from .test_protocol import message_pdus

ILE, ELE, EBE = IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
MAX_PDU = 16384
DEST_PDU = 8192
STUDY, STUDY2 = "1.2.826.0.1.7", "1.2.826.0.1.8"
SERIES_A, SERIES_B, SERIES_C = "1.2.826.0.1.7.1", "1.2.826.0.1.7.2", "1.2.826.0.1.8.1"


def identifier(level: str, study=None, series=None, sop=None, **extra) -> Dataset:
    """A C-MOVE identifier; list values become multi-valued keys."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in (("StudyInstanceUID", study), ("SeriesInstanceUID", series), ("SOPInstanceUID", sop)):
        if value is not None:
            setattr(ds, keyword, value)
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    return ds


def encapsulated(ds: Dataset, fragment: bytes = b"\xff\xd8\xff\xd9") -> bytes:
    """``ds`` (without pixels) in explicit VR little endian, then encapsulated Pixel Data (PS3.5 A.4)."""
    def item(tag: int, value: bytes) -> bytes:
        return struct.pack("<HHL", 0xFFFE, tag, len(value)) + value

    ds = ds.copy()
    del ds.PixelData
    return (encode_dataset(ds, ELE) + b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff" + item(0xE000, b"")
            + item(0xE000, fragment) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))


@implementer(IServiceClass)
class Destination:
    """A storage SCP for the sub-association: keeps each data set and answers scripted statuses."""

    operations = {D.CommandField.C_STORE_RQ}

    def __init__(self, syntaxes, statuses=None, on_store=None):
        self.abstract_syntaxes = syntaxes
        self.statuses = statuses or {}
        self.on_store = on_store
        #: (SOP Instance UID, transfer syntax, data set bytes, command) in the order received
        self.received = []

    def open_data_set(self, request):
        return BufferedDataSet(limit=64 * 1024 * 1024)

    def handle(self, request):
        command = request.command
        self.received.append((command.AffectedSOPInstanceUID, request.context.transfer_syntax, request.data, command))
        if self.on_store is not None:
            self.on_store(len(self.received))
        request.respond(self.statuses.get(command.AffectedSOPInstanceUID, S.SUCCESS))

    def cancel(self, request):
        pass


class PumpedEndpoint:
    """An endpoint joining our requestor to the destination factory in memory (iosim)."""

    def __init__(self, server_factory):
        self.server_factory = server_factory
        self.pumps = []
        self.servers = []

    def connect(self, client_factory):
        client = client_factory.buildProtocol(None)
        server = self.server_factory.buildProtocol(None)
        pump = iosim_connect(server, FakeTransport(server, True), client, FakeTransport(client, False), greet=False)
        self.pumps.append(pump)
        self.servers.append(server)
        return defer.succeed(client)


class MoveHarness:
    """A Disk-Server with a real archive, its C-MOVE SCP, and one in-memory destination DEST."""

    def __init__(self, test: SynchronousTestCase, dest_syntaxes=None, statuses=None, on_store=None,
                 pending_every=100, dest_ae="DEST", dest_pdu=DEST_PDU):
        self.test = test
        root = os.path.abspath(test.mktemp())
        self.clock = Clock()
        self.clock.advance(1000)
        self.config = configuration.parse(
            {
                "appliance": {"data_dir": root},
                "disk_server": {"artim_timeout": 5, "idle_timeout": 60},
                "devices": {
                    "dest": {"ae_title": "DEST", "host": "dest.example", "port": 11120, "max_pdu": DEST_PDU,
                             "timeout": 10},
                    "other": {"ae_title": "OTHER", "host": "other.example", "port": 11121},
                },
            },
            os.path.join(root, "appliance.toml"),
        )
        self.archive = Archive(self.config.archive.path, StorageLimits(min_free_space=0), "replace", self.clock,
                               synchronous_runner, synchronous_runner)
        test.addCleanup(self.archive.close)
        if dest_syntaxes is None:
            dest_syntaxes = {CT_IMAGE_STORAGE: (ELE, ILE, EBE, JPEG_BASELINE), SECONDARY_CAPTURE: (ELE, ILE, EBE)}
        self.destination = Destination(dest_syntaxes, statuses, on_store)
        policy = AcceptorPolicy(ae_title=dest_ae, abstract_syntaxes=dest_syntaxes, max_pdu=dest_pdu,
                                implementation_class_uid="1.2.826.0.1.3680043.9.9999.8",
                                implementation_version_name="DEST")
        services = {syntax: self.destination for syntax in dest_syntaxes}
        self.dest_factory = AcceptorFactory(policy, services, self.clock, Timeouts(artim=5, idle=None), 4)
        self.endpoint = PumpedEndpoint(self.dest_factory)
        self.connects = []
        self.connect_error = None
        self.service = RetrieveService(self.config, self.archive, connect=self._connect, clock=self.clock,
                                       pending_every=pending_every)
        self.factory = acceptor_factory(self.config.disk_server, self.config,
                                        [VerificationService(), self.service], self.clock)
        self.log = []
        globalLogPublisher.addObserver(self._observe)
        test.addCleanup(globalLogPublisher.removeObserver, self._observe)

    def _observe(self, event):
        if event.get("log_namespace") == "appliance.retrieve":
            self.log.append((event["log_level"].name, formatEvent(event)))

    def _connect(self, host, port, calling, called, contexts, **options):
        self.connects.append((host, port, calling, called, list(contexts), options))
        if self.connect_error is not None:
            return defer.fail(self.connect_error)
        return requestor.connect(self.clock, host, port, calling, called, contexts, endpoint=self.endpoint, **options)

    # --- the archive ---

    def store(self, ds: Dataset, transfer_syntax: str = ELE, data: bytes = None) -> str:
        """Store ``ds`` as received in ``transfer_syntax``; returns the stored file's path."""
        archive = self.archive
        data = encode_dataset(ds, transfer_syntax) if data is None else data
        header = part10_header(ds.SOPClassUID, ds.SOPInstanceUID, transfer_syntax, IMPLEMENTATION_CLASS_UID, "T",
                               "MODALITY")
        temp = self.test.successResultOf(archive.open_temp())
        self.test.successResultOf(archive.write(temp, [header, data]))
        stored = examine(temp, len(header), ds.SOPClassUID, ds.SOPInstanceUID, transfer_syntax, "MODALITY")
        self.test.successResultOf(defer.ensureDeferred(archive.commit(stored)))
        return self.path(ds.SOPInstanceUID)

    def path(self, sop_uid: str) -> str:
        return self.archive.store.absolute(self.archive.index.lookup(sop_uid).path)

    def fill(self):
        """Study STUDY: series A (2 CT images), series B (1 CT image); study STUDY2: series C (1 SC image)."""
        sops = {}
        for number, (study, series, sop_class) in enumerate(
            ((STUDY, SERIES_A, CT_IMAGE_STORAGE), (STUDY, SERIES_A, CT_IMAGE_STORAGE),
             (STUDY, SERIES_B, CT_IMAGE_STORAGE), (STUDY2, SERIES_C, SECONDARY_CAPTURE)), 1):
            sop = f"{series}.{number}"
            ds = make_dataset(patient="Secret^Patient", study=study, series=series, sop=sop, sop_class=sop_class)
            ds.InstanceNumber = number
            ds.SeriesNumber = int(series.rsplit(".", 1)[1])
            sops[sop] = self.store(ds)
        return sops

    # --- the C-MOVE ---

    def associate(self, transfer_syntax: str = ELE):
        self.scu = MemorySCU(self.test, self.factory, calling="MOVESCU", max_pdu=MAX_PDU)
        accept = self.scu.associate([(STUDY_ROOT_MOVE, (transfer_syntax,))])
        self.test.assertEqual(accept.presentation_contexts[0].result, 0)
        self.protocol, self.transport = self.scu.protocol, self.scu.transport
        return self.protocol, self.transport

    def send_move(self, ident, destination: str = "DEST", transfer_syntax: str = ELE, message_id: int = 7):
        """Send a C-MOVE-RQ (``ident`` a Dataset, or raw bytes) on a new association; does not pump."""
        self.associate(transfer_syntax)
        data = ident if isinstance(ident, bytes) else encode_identifier(ident, transfer_syntax)
        command = D.Command(CommandField=D.CommandField.C_MOVE_RQ, MessageID=message_id, Priority=0,
                            AffectedSOPClassUID=STUDY_ROOT_MOVE, MoveDestination=destination)
        self.scu.send(command, data)

    def settle(self, limit: int = 100000):
        """Pump the sub-association until nothing moves (bounded)."""
        for _ in range(limit):
            moved = [pump.pump() for pump in self.endpoint.pumps]
            busy = any(moved) or any(pump.clientIO.producer is not None or pump.clientIO.stream
                                     or pump.serverIO.stream for pump in self.endpoint.pumps)
            if not busy:
                return
        self.test.fail(f"the sub-association still moved data after {limit} pumps")

    def release(self):
        """Release the C-MOVE association (A-RELEASE-RQ, RP, close)."""
        self.scu.release()

    def responses(self, transfer_syntax: str = ELE):
        """(Command, identifier Dataset or None) of every C-MOVE response written since the last call."""
        return [(m.command, None if m.data is None else decode_dataset(m.data, transfer_syntax))
                for m in self.scu.messages()]

    def move(self, ident, destination: str = "DEST", transfer_syntax: str = ELE, message_id: int = 7):
        """C-MOVE and pump to the end; returns the responses (the last one final)."""
        self.send_move(ident, destination, transfer_syntax, message_id)
        self.settle()
        found = self.responses(transfer_syntax)
        self.test.assertTrue(found, "no C-MOVE response")
        self.test.assertNotEqual(found[-1][0].Status, S.PENDING, "no final C-MOVE response")
        return found


def counts(command: D.Command):
    """(remaining, completed, failed, warning) of a C-MOVE response."""
    return (command.NumberOfRemainingSuboperations, command.NumberOfCompletedSuboperations,
            command.NumberOfFailedSuboperations, command.NumberOfWarningSuboperations)


def failed_list(ds):
    """The Failed SOP Instance UID List of a response identifier, as a list."""
    if ds is None:
        return None
    value = ds.FailedSOPInstanceUIDList
    return [value] if isinstance(value, str) else list(value)


class RegistrationTests(SynchronousTestCase):
    """The Disk-Server offers the service."""

    def test_in_disk_server_services(self):
        """disk_server_services includes a RetrieveService for Study Root MOVE in the three uncompressed syntaxes."""
        harness = MoveHarness(self)
        services = [s for s in disk_server_services(harness.config, harness.archive) if isinstance(s, RetrieveService)]
        self.assertEqual(len(services), 1)
        self.assertTrue(verifyObject(IServiceClass, services[0]))
        self.assertEqual(dict(services[0].abstract_syntaxes), {STUDY_ROOT_MOVE: (ILE, ELE, EBE)})
        self.assertEqual(services[0].ae_title, "DISK_SERVER")
        self.assertEqual(sorted(services[0].devices), ["DEST", "OTHER"])


class RefusedMoveTests(SynchronousTestCase):
    """Moves refused before any sub-operation: no outbound connection, nothing pinned."""

    def test_unknown_destination(self):
        """A Move Destination that is no configured device's AE title: A801 with a comment, no connection."""
        harness = MoveHarness(self)
        harness.fill()
        ((command, data),) = harness.move(identifier("STUDY", STUDY), destination="NOWHERE")
        self.assertEqual(command.Status, S.MOVE_DESTINATION_UNKNOWN)
        self.assertEqual(command.CommandField, D.CommandField.C_MOVE_RSP)
        self.assertEqual(command.MessageIDBeingRespondedTo, 7)
        self.assertIn("NOWHERE", command.ErrorComment)
        self.assertIsNone(data)
        self.assertEqual(harness.connects, [])
        self.assertEqual(harness.archive.pins.counts, {})
        self.assertIn("0xA801", harness.log[-1][1])

    def test_bad_identifiers(self):
        """Identifiers that are not a Study Root retrieve get A900 (or C000 if undecodable), never a connection."""
        harness = MoveHarness(self)
        harness.fill()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns of the invalid UI value
            not_a_uid = encode_identifier(identifier("STUDY", "../../etc"), ELE)
        cases = [
            (identifier("", STUDY), S.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "Query/Retrieve Level"),
            (identifier("PATIENT", STUDY), S.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "PATIENT"),
            (identifier("STUDY"), S.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "Study Instance UID is required"),
            (identifier("STUDY", ""), S.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "Study Instance UID is required"),
            (identifier("STUDY", STUDY, SERIES_A), S.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "relational"),
            (identifier("SERIES", [STUDY, STUDY2], SERIES_A), S.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "not 2"),
            (identifier("SERIES", STUDY), S.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "Series Instance UID is required"),
            (identifier("SERIES", STUDY, SERIES_A, "1.2.3"), S.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "relational"),
            (identifier("IMAGE", STUDY, sop="1.2.3"), S.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "Series Instance UID"),
            (identifier("IMAGE", STUDY, SERIES_A), S.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "SOP Instance UID"),
            (not_a_uid, S.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "not a UID"),
            (b"\x08\x00\x52\x00ZZ\x02\x00AB", retrieve.UNABLE_TO_PROCESS, "cannot decode"),  # no such VR
        ]
        for ident, status, words in cases:
            ((command, data),) = harness.move(ident)
            self.assertEqual(command.Status, status, (ident, command))
            self.assertIn(words, command.ErrorComment, ident)
            self.assertIsNone(command.NumberOfCompletedSuboperations)
            self.assertIsNone(data)
        self.assertEqual(harness.connects, [])
        self.assertEqual(harness.archive.pins.counts, {})

    def test_offending_element(self):
        """An A900 names the offending key in Offending Element (0000,0901)."""
        harness = MoveHarness(self)
        ((command, _),) = harness.move(identifier("SERIES", STUDY))
        self.assertEqual(command.Status, S.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS)
        self.assertEqual(command.OffendingElement, 0x0020000E)

    def test_nothing_matched(self):
        """UIDs the archive does not hold: Success with zero sub-operations, and no connection."""
        harness = MoveHarness(self)
        harness.fill()
        ((command, data),) = harness.move(identifier("STUDY", "1.2.3.999"))
        self.assertEqual(command.Status, S.SUCCESS)
        self.assertEqual(counts(command), (None, 0, 0, 0))
        self.assertIsNone(data)
        self.assertEqual(harness.connects, [])

    def test_not_a_move(self):
        """A C-FIND on the MOVE context is answered 0211 (unrecognized operation)."""
        harness = MoveHarness(self)
        harness.associate()
        command = D.Command(CommandField=D.CommandField.C_FIND_RQ, MessageID=3, Priority=0,
                            AffectedSOPClassUID=STUDY_ROOT_MOVE)
        harness.protocol.dataReceived(message_pdus(1, command, encode_identifier(identifier("STUDY", STUDY), ELE)))
        ((command, _),) = harness.responses()
        self.assertEqual(command.Status, S.UNRECOGNIZED_OPERATION)


class SuccessfulMoveTests(SynchronousTestCase):
    """Moves whose sub-operations all succeed."""

    def test_study_level(self):
        """A study moves over one sub-association: data sets byte for byte, Move Originator set, pending
        responses after each sub-operation, final 0000 with the counts, released, unpinned, touched."""
        pins_seen = []
        harness = MoveHarness(self, on_store=lambda n: pins_seen.append(dict(harness.archive.pins.counts)))
        paths = harness.fill()
        harness.clock.advance(500)
        responses = harness.move(identifier("STUDY", STUDY))
        statuses = [command.Status for command, _ in responses]
        self.assertEqual(statuses, [S.PENDING, S.PENDING, S.SUCCESS])
        self.assertEqual([counts(c) for c, _ in responses], [(2, 1, 0, 0), (1, 2, 0, 0), (None, 3, 0, 0)])
        self.assertEqual([d for _, d in responses], [None, None, None])
        self.assertNotIn("ErrorComment", responses[-1][0])
        # the sub-association
        ((host, port, calling, called, contexts, options),) = harness.connects
        self.assertEqual((host, port, calling, called), ("dest.example", 11120, "DISK_SERVER", "DEST"))
        self.assertEqual(contexts, [(CT_IMAGE_STORAGE, (ELE,)), (CT_IMAGE_STORAGE, (ELE, ILE, EBE))])
        self.assertEqual(options["max_pdu"], DEST_PDU)
        self.assertEqual(options["timeouts"].dimse, 10)
        received = harness.destination.received
        self.assertEqual([sop for sop, *_ in received], [f"{SERIES_A}.1", f"{SERIES_A}.2", f"{SERIES_B}.3"])
        for sop, syntax, data, command in received:
            self.assertEqual(syntax, ELE)
            self.assertEqual(data, dataset_bytes(paths[sop]))
            self.assertEqual(command.MoveOriginatorApplicationEntityTitle, "MOVESCU")
            self.assertEqual(command.MoveOriginatorMessageID, 7)
            self.assertEqual(command.AffectedSOPClassUID, CT_IMAGE_STORAGE)
        (server,) = harness.endpoint.servers
        self.assertEqual(server.record.outcome, "released")
        self.assertEqual((server.record.calling, server.record.called), ("DISK_SERVER", "DEST"))
        self.assertEqual(pins_seen[0], {STUDY: 1})
        self.assertEqual(harness.archive.pins.counts, {})
        accessed = {row.study_uid: row.accessed_at for row in harness.archive.index.studies()}
        self.assertEqual(accessed[STUDY], 1500)
        self.assertEqual(accessed[STUDY2], 1000)
        harness.release()
        self.assertEqual(harness.clock.getDelayedCalls(), [])

    def test_series_image_and_study_lists(self):
        """SERIES with one series, IMAGE with two SOP UIDs, STUDY with two studies: exactly those instances."""
        harness = MoveHarness(self)
        harness.fill()
        cases = [
            (identifier("SERIES", STUDY, SERIES_A), [f"{SERIES_A}.1", f"{SERIES_A}.2"]),
            (identifier("SERIES", STUDY, [SERIES_B, SERIES_C]), [f"{SERIES_B}.3"]),  # C is not in STUDY
            (identifier("IMAGE", STUDY, SERIES_A, [f"{SERIES_A}.2", "1.2.3.4"]), [f"{SERIES_A}.2"]),
            (identifier("STUDY", [STUDY2, STUDY]), [f"{SERIES_A}.1", f"{SERIES_A}.2", f"{SERIES_B}.3",
                                                     f"{SERIES_C}.4"]),
        ]
        for ident, expected in cases:
            before = len(harness.destination.received)
            responses = harness.move(ident)
            final = responses[-1][0]
            self.assertEqual((final.Status, counts(final)), (S.SUCCESS, (None, len(expected), 0, 0)), ident)
            self.assertEqual([sop for sop, *_ in harness.destination.received[before:]], expected)
        self.assertEqual(harness.archive.pins.counts, {})

    def test_two_sop_classes_contexts(self):
        """Two SOP classes: for each, the stored syntax alone and the three uncompressed ones."""
        harness = MoveHarness(self)
        harness.fill()
        harness.move(identifier("STUDY", [STUDY, STUDY2]))
        contexts = harness.connects[0][4]
        self.assertEqual(contexts, [(CT_IMAGE_STORAGE, (ELE,)), (CT_IMAGE_STORAGE, (ELE, ILE, EBE)),
                                    (SECONDARY_CAPTURE, (ELE,)), (SECONDARY_CAPTURE, (ELE, ILE, EBE))])

    def test_identifier_in_big_endian(self):
        """The identifier is decoded in the context's transfer syntax (explicit VR big endian here)."""
        harness = MoveHarness(self)
        harness.fill()
        responses = harness.move(identifier("STUDY", STUDY2), transfer_syntax=EBE)
        self.assertEqual((responses[-1][0].Status, counts(responses[-1][0])), (S.SUCCESS, (None, 1, 0, 0)))

    def test_pending_throttled_by_clock(self):
        """A move of more than pending_every (3) instances, each C-STORE taking 0.2 s: pending responses at
        most every 0.5 s (the default), so one (after the third) before the final one."""
        harness = MoveHarness(self, pending_every=3, on_store=lambda n: harness.clock.advance(0.2))
        for number in range(1, 7):
            harness.store(make_dataset(study=STUDY, series=SERIES_A, sop=f"{SERIES_A}.{number}"))
        responses = harness.move(identifier("STUDY", STUDY))
        self.assertEqual([(c.Status, counts(c)) for c, _ in responses],
                         [(S.PENDING, (3, 3, 0, 0)), (S.SUCCESS, (None, 6, 0, 0))])

    def test_log_line(self):
        """One info line per move, with destination, counts, outcome and duration, and no patient name."""
        harness = MoveHarness(self, on_store=lambda n: harness.clock.advance(0.25))
        harness.fill()
        harness.move(identifier("STUDY", STUDY))
        infos = [text for level, text in harness.log if level == "info"]
        self.assertEqual(len(infos), 1, harness.log)
        self.assertIn("C-MOVE 7 from MOVESCU to DEST: 0x0000 Success", infos[0])
        self.assertIn("3 matched, 3 completed, 0 failed, 0 warning, 0 not attempted; 0.750 s", infos[0])
        self.assertNotIn("Secret", " ".join(text for _, text in harness.log))


class DeletionRaceTests(SynchronousTestCase):
    """Issue 9: a C-MOVE of a study whose eviction began before the move pinned it."""

    def test_study_being_deleted_is_skipped(self):
        """The audit's move matched 400 instances and 396 sub-operations failed on vanished files; now a study
        being deleted no longer matches: nothing is attempted, Success with zero sub-operations."""
        harness = MoveHarness(self)
        harness.fill()
        harness.archive.deleting.add(STUDY)  # its deletion is under way (between its files and its rows)
        responses = harness.move(identifier("STUDY", STUDY))
        self.assertEqual([command.Status for command, _ in responses], [S.SUCCESS])
        self.assertEqual(harness.destination.received, [])
        self.assertEqual(harness.connects, [])
        harness.archive.deleting.remove(STUDY)
        harness.release()

    def test_delete_study_marks_it_while_under_way(self):
        harness = MoveHarness(self)
        harness.fill()
        seen = []
        original = harness.archive.index.study_instances

        def looking(study_uid):
            seen.append(harness.archive.being_deleted(study_uid))
            return original(study_uid)

        self.patch(harness.archive.index, "study_instances", looking)
        self.successResultOf(defer.ensureDeferred(harness.archive.delete_study(STUDY)))
        self.assertEqual((seen, harness.archive.being_deleted(STUDY)), ([True], False))


class FailedSubOperationTests(SynchronousTestCase):
    """The statement's policy: a failed C-STORE ends the sub-association and the C-MOVE answers A702."""

    def test_destination_fails_one_store(self):
        """The second C-STORE answered A700: no third, sub-association released, A702 with the counts and
        the failed UIDs (the refused one and those never attempted), logged at warn."""
        harness = MoveHarness(self, statuses={f"{SERIES_A}.2": 0xA700})
        harness.fill()
        responses = harness.move(identifier("STUDY", STUDY))
        final, data = responses[-1]
        self.assertEqual([c.Status for c, _ in responses], [S.PENDING, S.SUBOPERATIONS_FAILED])
        self.assertEqual(counts(final), (None, 1, 2, 0))
        self.assertIn("0xA700", final.ErrorComment)
        self.assertEqual(failed_list(data), [f"{SERIES_A}.2", f"{SERIES_B}.3"])
        self.assertEqual(len(harness.destination.received), 2)
        self.assertEqual(harness.endpoint.servers[0].record.outcome, "released")
        warnings = [text for level, text in harness.log if level == "warn"]
        self.assertEqual(len(warnings), 1)
        self.assertIn("0xA700", warnings[0])
        self.assertEqual(harness.archive.pins.counts, {})
        harness.release()
        self.assertEqual(harness.clock.getDelayedCalls(), [])

    def test_warning_counts_as_warning(self):
        """A C-STORE answered B007 is a warning sub-operation: the move goes on and ends B000."""
        harness = MoveHarness(self, statuses={f"{SERIES_A}.1": 0xB007})
        harness.fill()
        final, data = harness.move(identifier("STUDY", STUDY))[-1]
        self.assertEqual((final.Status, counts(final)), (S.WARNING, (None, 2, 0, 1)))
        self.assertIsNone(data)
        self.assertEqual(len(harness.destination.received), 3)

    def test_destination_rejects_association(self):
        """A destination that rejects the association: C000 naming the reason, every instance failed."""
        harness = MoveHarness(self, dest_ae="SOMEONE_ELSE")
        harness.fill()
        ((final, data),) = harness.move(identifier("SERIES", STUDY, SERIES_A))
        self.assertEqual(final.Status, retrieve.UNABLE_TO_PROCESS)
        self.assertIn("rejected (1,1,7) by DEST: called-AE-title-not-rec", final.ErrorComment)
        self.assertEqual(counts(final), (None, 0, 2, 0))
        self.assertEqual(failed_list(data), [f"{SERIES_A}.1", f"{SERIES_A}.2"])
        self.assertEqual(harness.destination.received, [])
        self.assertEqual(harness.archive.pins.counts, {})
        harness.release()
        self.assertEqual(harness.clock.getDelayedCalls(), [])

    def test_destination_unreachable(self):
        """A destination that cannot be reached: C000 with the connection error as comment."""
        harness = MoveHarness(self)
        harness.fill()
        harness.connect_error = requestor.ConnectionFailed("connection to DEST at dest.example:11120 refused")
        ((final, data),) = harness.move(identifier("STUDY", STUDY2))
        self.assertEqual(final.Status, retrieve.UNABLE_TO_PROCESS)
        self.assertEqual(final.ErrorComment, "connection to DEST at dest.example:11120 refused")
        self.assertEqual(failed_list(data), [f"{SERIES_C}.4"])
        self.assertEqual(harness.archive.pins.counts, {})

    def test_destination_aborts_mid_move(self):
        """The destination aborts during the second C-STORE: A702, sub-association lost, rest failed."""
        def abort(number):
            if number == 2:
                harness.endpoint.servers[0].abort("test: destination gives up")

        harness = MoveHarness(self, on_store=abort)
        harness.fill()
        harness.send_move(identifier("STUDY", STUDY))
        harness.settle()
        harness.clock.advance(5)  # ARTIM: the destination closes after its A-ABORT
        harness.settle()
        final, data = harness.responses()[-1]
        self.assertEqual(final.Status, S.SUBOPERATIONS_FAILED)
        self.assertIn("lost", final.ErrorComment)
        self.assertEqual(counts(final), (None, 1, 2, 0))
        self.assertEqual(failed_list(data), [f"{SERIES_A}.2", f"{SERIES_B}.3"])
        self.assertEqual(harness.archive.pins.counts, {})

    def test_compressed_without_its_context(self):
        """A JPEG object whose syntax the destination refused fails alone (never decoded); the others go,
        over the same sub-association, and the move ends B000 listing it."""
        harness = MoveHarness(self, dest_syntaxes={CT_IMAGE_STORAGE: (ELE, ILE, EBE)})
        jpeg = make_dataset(study=STUDY, series=SERIES_A, sop=f"{SERIES_A}.1")
        jpeg.InstanceNumber = 1
        harness.store(jpeg, JPEG_BASELINE, data=encapsulated(jpeg))
        plain = make_dataset(study=STUDY, series=SERIES_A, sop=f"{SERIES_A}.2")
        plain.InstanceNumber = 2
        harness.store(plain, ELE)
        responses = harness.move(identifier("STUDY", STUDY))
        final, data = responses[-1]
        self.assertEqual((final.Status, counts(final)), (S.WARNING, (None, 1, 1, 0)))
        self.assertEqual(failed_list(data), [f"{SERIES_A}.1"])
        self.assertEqual([sop for sop, *_ in harness.destination.received], [f"{SERIES_A}.2"])
        self.assertEqual(harness.connects[0][4], [(CT_IMAGE_STORAGE, (ELE,)), (CT_IMAGE_STORAGE, (JPEG_BASELINE,)),
                                                 (CT_IMAGE_STORAGE, (ELE, ILE, EBE))])
        self.assertTrue(any("never decoded" in text for level, text in harness.log if level == "warn"))

    def test_every_sub_operation_failing_is_a_failure(self):
        """When no sub-operation succeeds (two JPEG objects, a destination refusing JPEG), the move fails A702
        (PS3.4 C.4.2.3.1: Failure when all are unsuccessful), not B000, with the counts and both UIDs listed."""
        harness = MoveHarness(self, dest_syntaxes={CT_IMAGE_STORAGE: (ELE, ILE, EBE)})
        for number in (1, 2):
            jpeg = make_dataset(study=STUDY, series=SERIES_A, sop=f"{SERIES_A}.{number}")
            jpeg.InstanceNumber = number
            harness.store(jpeg, JPEG_BASELINE, data=encapsulated(jpeg))
        final, data = harness.move(identifier("STUDY", STUDY))[-1]
        self.assertEqual((final.Status, counts(final)), (S.SUBOPERATIONS_FAILED, (None, 0, 2, 0)))
        self.assertIn("none of the 2 sub-operations succeeded", final.ErrorComment)
        self.assertEqual(failed_list(data), [f"{SERIES_A}.1", f"{SERIES_A}.2"])
        self.assertEqual(harness.destination.received, [])
        self.assertEqual(harness.archive.pins.counts, {})

    def test_compressed_sent_in_its_syntax(self):
        """A JPEG object goes out in JPEG baseline when the destination accepts it, bytes unchanged."""
        harness = MoveHarness(self)
        jpeg = make_dataset(study=STUDY, series=SERIES_A, sop=f"{SERIES_A}.1")
        path = harness.store(jpeg, JPEG_BASELINE, data=encapsulated(jpeg))
        final, _ = harness.move(identifier("STUDY", STUDY))[-1]
        self.assertEqual(final.Status, S.SUCCESS)
        ((sop, syntax, data, _),) = harness.destination.received
        self.assertEqual((syntax, data), (JPEG_BASELINE, dataset_bytes(path)))

    def test_missing_file_fails_that_sub_operation(self):
        """A file gone from the archive fails its sub-operation only; the move ends B000."""
        harness = MoveHarness(self)
        paths = harness.fill()
        os.unlink(paths[f"{SERIES_A}.1"])
        final, data = harness.move(identifier("STUDY", STUDY))[-1]
        self.assertEqual((final.Status, counts(final)), (S.WARNING, (None, 2, 1, 0)))
        self.assertEqual(failed_list(data), [f"{SERIES_A}.1"])


class CancelTests(SynchronousTestCase):
    """C-CANCEL stops after the sub-operation in flight."""

    def test_cancel_mid_move(self):
        """A C-CANCEL during the second C-STORE: no third, FE00 with remaining 1, completed 2, released."""
        def cancel(number):
            if number == 2:
                command = D.Command(CommandField=D.CommandField.C_CANCEL_RQ, MessageIDBeingRespondedTo=7)
                harness.protocol.dataReceived(message_pdus(1, command))

        harness = MoveHarness(self, on_store=cancel)
        harness.fill()
        responses = harness.move(identifier("STUDY", STUDY))
        final, data = responses[-1]
        self.assertEqual([c.Status for c, _ in responses], [S.PENDING, S.PENDING, S.CANCEL])
        self.assertEqual(counts(final), (1, 2, 0, 0))
        self.assertIsNone(data)
        self.assertEqual(len(harness.destination.received), 2)
        self.assertEqual(harness.endpoint.servers[0].record.outcome, "released")
        self.assertEqual(harness.archive.pins.counts, {})
        self.assertIn("0xFE00", [text for level, text in harness.log if level == "info"][0])

    def test_next_object_opened_while_one_is_sent_and_closed_when_not_needed(self):
        """Each sub-operation's file is opened while the one before it is sent; cancelled after the second, the
        third, opened already, is closed, and every file opened is closed."""
        events, opened = [], []
        real_open = retrieve.open_stored_data_set

        def tracked_open(path):
            handle, length = real_open(path)
            opened.append(handle)
            events.append(("open", len(opened)))
            return handle, length

        def stored(number):
            events.append(("stored", number))
            if number == 2:
                command = D.Command(CommandField=D.CommandField.C_CANCEL_RQ, MessageIDBeingRespondedTo=7)
                harness.protocol.dataReceived(message_pdus(1, command))

        self.patch(retrieve, "open_stored_data_set", tracked_open)
        harness = MoveHarness(self, on_store=stored)
        harness.fill()
        final, _ = harness.move(identifier("STUDY", STUDY))[-1]
        self.assertEqual((final.Status, counts(final)), (S.CANCEL, (1, 2, 0, 0)))
        self.assertEqual(events, [("open", 1), ("open", 2), ("stored", 1), ("open", 3), ("stored", 2)])
        self.assertEqual([handle.closed for handle in opened], [True, True, True])

    def test_cancel_while_connecting(self):
        """A C-CANCEL before the sub-association is up: nothing is sent, FE00 with every instance remaining."""
        harness = MoveHarness(self)
        harness.fill()
        harness.send_move(identifier("STUDY", STUDY))
        self.assertEqual(len(harness.connects), 1)
        harness.protocol.dataReceived(message_pdus(1, D.Command(CommandField=D.CommandField.C_CANCEL_RQ,
                                                                MessageIDBeingRespondedTo=7)))
        harness.settle()
        ((final, data),) = harness.responses()
        self.assertEqual((final.Status, counts(final)), (S.CANCEL, (3, 0, 0, 0)))
        self.assertEqual(harness.destination.received, [])
        self.assertEqual(harness.endpoint.servers[0].record.outcome, "released")
        self.assertEqual(harness.archive.pins.counts, {})

    def test_move_association_lost(self):
        """The C-MOVE's own association dropping mid-move stops it after the sub-operation in flight."""
        harness = MoveHarness(self, on_store=lambda n: n == 1 and harness.protocol.connectionLost(None))
        harness.fill()
        harness.send_move(identifier("STUDY", STUDY))
        harness.settle()
        self.assertEqual(len(harness.destination.received), 1)
        self.assertEqual(harness.endpoint.servers[0].record.outcome, "released")
        self.assertEqual(harness.archive.pins.counts, {})
        self.assertIn("the C-MOVE association ended", harness.log[-1][1])


class ConversionTests(SynchronousTestCase):
    """Uncompressed objects are re-encoded when the destination takes only another uncompressed syntax."""

    def test_explicit_to_implicit(self):
        """Stored explicit VR little endian, destination accepts implicit only: the data set received is
        what pydicom writes for implicit VR little endian."""
        harness = MoveHarness(self, dest_syntaxes={CT_IMAGE_STORAGE: (ILE,)})
        ds = make_dataset(study=STUDY, series=SERIES_A, sop=f"{SERIES_A}.1")
        path = harness.store(ds, ELE)
        final, _ = harness.move(identifier("STUDY", STUDY))[-1]
        self.assertEqual((final.Status, counts(final)), (S.SUCCESS, (None, 1, 0, 0)))
        ((_, syntax, data, _),) = harness.destination.received
        self.assertEqual(syntax, ILE)
        self.assertEqual(data, encode_dataset(dcmread(path), ILE))
        self.assertEqual(data, encode_dataset(ds, ILE))
        self.assertEqual(harness.archive.store.leftovers(), [])

    def test_big_to_little_endian_keeps_values(self):
        """Stored explicit VR big endian, destination accepts explicit little endian only: 16-bit pixel words
        keep their values (their bytes are swapped), and every other attribute is the same."""
        harness = MoveHarness(self, dest_syntaxes={CT_IMAGE_STORAGE: (ELE,)})
        ds = make_dataset(study=STUDY, series=SERIES_A, sop=f"{SERIES_A}.1", pixels=struct.pack(">4H", 1, 2, 300, 4))
        harness.store(ds, EBE)
        final, _ = harness.move(identifier("STUDY", STUDY))[-1]
        self.assertEqual(final.Status, S.SUCCESS)
        ((_, syntax, data, _),) = harness.destination.received
        self.assertEqual(syntax, ELE)
        received = decode_dataset(data, ELE)
        self.assertEqual(struct.unpack("<4H", received.PixelData), (1, 2, 300, 4))
        for keyword in ("SOPInstanceUID", "Rows", "Columns", "BitsAllocated", "PatientName", "StudyDate"):
            self.assertEqual(received.get(keyword), ds.get(keyword), keyword)

    def test_same_byte_order_preferred(self):
        """A little endian object goes to an accepted little endian syntax rather than big endian."""
        negotiated = Negotiated("A", "B", (ContextOutcome(1, CT_IMAGE_STORAGE, 0, EBE),
                                           ContextOutcome(3, CT_IMAGE_STORAGE, 0, ILE)), 0)
        self.assertEqual(choose_context(negotiated, CT_IMAGE_STORAGE, ELE), (ILE, True))
        self.assertEqual(choose_context(negotiated, CT_IMAGE_STORAGE, EBE), (EBE, False))
        self.assertEqual(choose_context(negotiated, CT_IMAGE_STORAGE, JPEG_BASELINE), None)
        self.assertEqual(choose_context(negotiated, SECONDARY_CAPTURE, ELE), None)

    def test_conversion_refuses_compressed(self):
        """convert_stored_data_set never decodes a compressed object."""
        with self.assertRaises(ValueError):
            convert_stored_data_set("/nonexistent", JPEG_BASELINE, ELE)

    def test_streamed_conversion_keeps_every_value(self):
        """pydicom's uncompressed test files (8, 16 bit, RGB, padded, big endian) converted to each other
        uncompressed syntax read back with the same values, the pixel data's words swapped exactly when the
        byte order changes (the new pydicom's whole-object conversion gives the same bytes)."""
        import pydicom
        from pydicom.filebase import DicomBytesIO
        from pydicom.filereader import read_dataset
        from pydicom.filewriter import correct_ambiguous_vr

        from appliance.ae.retrieve import _swap_words
        from appliance.compat import encode_dataset

        names = ("CT_small.dcm", "MR_small.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm",
                 "MR_small_padded.dcm", "SC_rgb_small_odd.dcm", "SC_rgb_small_odd_big_endian.dcm")
        folder = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files")
        newest = int(pydicom.__version__.split(".")[0]) >= 3
        checked = 0
        for name in names:
            path = os.path.join(folder, name)
            if not os.path.exists(path):
                continue
            stored = str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
            if stored not in (ELE, ILE, EBE):
                continue
            for target in (ELE, ILE, EBE):
                with self.subTest(name=name, target=target):
                    spool, length = convert_stored_data_set(path, stored, target)
                    with spool:
                        converted = spool.read()
                    self.assertEqual(length, len(converted))
                    original = dcmread(path)
                    pixels = original.PixelData
                    ours = read_dataset(DicomBytesIO(converted), target == ILE, target != EBE)
                    if (stored != EBE) != (target != EBE):
                        correct_ambiguous_vr(original, stored != EBE)
                        if original["PixelData"].VR == "OW":
                            pixels = b"".join(pixels[i + 1:i + 2] + pixels[i:i + 1] for i in range(0, len(pixels), 2))
                    self.assertEqual(ours.PixelData, pixels)
                    for element in original:
                        if element.tag != 0x7FE00010:
                            self.assertEqual(ours[element.tag].value, element.value, element)
                    if newest:
                        ds = dcmread(path)
                        if (stored != EBE) != (target != EBE):
                            correct_ambiguous_vr(ds, stored != EBE)
                            _swap_words(ds)
                        self.assertEqual(converted, encode_dataset(ds, target))
                    checked += 1
        self.assertGreaterEqual(checked, 15)

    def test_conversion_memory_stays_bounded(self):
        """Issue 9: converting a 200 MB object took +572 MB; now Python's peak allocation stays under 16 MB
        for 96 MB of pixel data, and the words come out swapped."""
        import tracemalloc

        from appliance.archive.store import part10_header

        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        path = os.path.join(folder, "big.dcm")
        ds = make_dataset(sop="1.2.826.0.1.77.1", pixels=b"\x01\x02" * 8)
        head = encode_dataset(ds, ELE)
        head = head[: head.rindex(b"\xe0\x7f\x10\x00")]
        size = 96 << 20
        with open(path, "wb") as handle:
            handle.write(part10_header(CT_IMAGE_STORAGE, "1.2.826.0.1.77.1", ELE, "1.2.3", None, "X") + head)
            handle.write(b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<L", size))
            block = b"\x01\x02" * (1 << 19)
            for _ in range(size // len(block)):
                handle.write(block)
        tracemalloc.start()
        try:
            baseline = tracemalloc.get_traced_memory()[0]
            spool, length = convert_stored_data_set(path, ELE, EBE, folder)
            peak = tracemalloc.get_traced_memory()[1] - baseline
        finally:
            tracemalloc.stop()
        with spool:
            spool.seek(length - 4)
            self.assertEqual(spool.read(), b"\x02\x01\x02\x01")
        self.assertLess(peak, 16 << 20)


class FlowControlTests(SynchronousTestCase):
    """A file is read one PDU at a time as the destination takes it."""

    def test_slow_destination_is_not_buffered(self):
        """While a 2 MB object moves, what was read from its file never runs more than a PDU ahead of
        what the destination received, and each read asks for at most one PDU's worth."""
        harness = MoveHarness(self)
        ds = make_dataset(study=STUDY, series=SERIES_A, sop=f"{SERIES_A}.1", pixels=b"\x01\x02" * 1_000_000)
        path = harness.store(ds, ELE)
        reads = []

        class Counting:
            def __init__(self, handle):
                self.handle = handle

            def read(self, size):
                data = self.handle.read(size)
                reads.append(len(data))
                return data

            def close(self):
                self.handle.close()

        original = retrieve.open_stored_data_set

        def counting_open(stored):
            handle, length = original(stored)
            return Counting(handle), length

        self.patch(retrieve, "open_stored_data_set", counting_open)
        harness.send_move(identifier("STUDY", STUDY))
        with open(path, "rb") as handle:
            total = os.path.getsize(path) - data_set_offset(handle)
        steps = 0
        while harness.endpoint.pumps and not harness.destination.received:
            (pump,) = harness.endpoint.pumps
            pump.pump()
            steps += 1
            server = harness.endpoint.servers[0]
            # at most one block read ahead of what the destination took
            self.assertLessEqual(sum(reads), server.record.bytes_in + SEND_BLOCK + 2 * DEST_PDU)
            self.assertLess(steps, 10000)
        self.assertEqual(sum(reads), total)
        self.assertLessEqual(max(reads), SEND_BLOCK)
        self.assertGreaterEqual(len(reads), total // SEND_BLOCK)
        harness.settle()
        self.assertEqual(harness.responses()[-1][0].Status, S.SUCCESS)


class PieceTests(SynchronousTestCase):
    """The module's pure helpers."""

    def test_parse_identifier_levels(self):
        """Each level yields its keys; UIDs are de-duplicated in order."""
        keys = parse_identifier(encode_identifier(identifier("STUDY", [STUDY, STUDY2, STUDY]), ILE), ILE)
        self.assertEqual((keys.level, keys.study_uids), ("STUDY", (STUDY, STUDY2)))
        keys = parse_identifier(encode_identifier(identifier("IMAGE", STUDY, SERIES_A, ["1.2", "1.3"]), EBE), EBE)
        self.assertEqual((keys.series_uids, keys.sop_uids), ((SERIES_A,), ("1.2", "1.3")))
        with self.assertRaises(IdentifierError) as caught:
            parse_identifier(encode_identifier(identifier("IMAGE", STUDY, [SERIES_A, SERIES_B], "1.2"), ELE), ELE)
        self.assertEqual(caught.exception.status, 0xA900)

    def test_contexts_within_128(self):
        """Over 128 contexts: first the uncompressed exact ones go, then one context per class, the most
        populated classes kept."""
        def rows(classes, syntaxes, per_class=1):
            return [InstanceRow(f"9.{c}.{s}.{n}", f"1.2.3.{c}", "1", "2", syntax, "p", 1)
                    for c in range(classes) for s, syntax in enumerate(syntaxes) for n in range(per_class)]

        self.assertEqual(len(propose_contexts(rows(60, [ELE]))), 120)
        plan_b = propose_contexts(rows(70, [ELE]))
        self.assertEqual(plan_b, [(f"1.2.3.{c}", (ELE, ILE, EBE)) for c in sorted(range(70), key=str)])
        plan_b2 = propose_contexts(rows(40, [ELE, JPEG_BASELINE]))  # 120 contexts
        self.assertEqual(len(plan_b2), 120)
        plan_c = propose_contexts(rows(70, [JPEG_BASELINE, ELE]) + rows(1, [JPEG_BASELINE]))
        self.assertEqual(len(plan_c), 70)
        self.assertEqual(dict(plan_c)["1.2.3.0"], (JPEG_BASELINE, ELE, ILE, EBE))
        many = rows(200, [ELE]) + rows(3, [ELE], per_class=5)
        kept = propose_contexts(many)
        self.assertEqual(len(kept), 128)
        self.assertTrue({"1.2.3.0", "1.2.3.1", "1.2.3.2"} <= dict(kept).keys())

    def test_data_set_offset(self):
        """The data set starts after the File Meta Information, with or without its group length."""
        from .support_data import file_meta_bytes

        with_length = file_meta_bytes(CT_IMAGE_STORAGE, "1.2.3", ELE)
        self.assertEqual(data_set_offset(io.BytesIO(with_length + b"rest")), len(with_length))
        # the same elements without (0002,0000): 12 bytes shorter
        without = with_length[:132] + with_length[144:]
        self.assertEqual(data_set_offset(io.BytesIO(without + b"rest")), len(without))
        with self.assertRaises(ValueError):
            data_set_offset(io.BytesIO(b"\x00" * 200))

    def test_failed_list_cut_in_explicit_vr(self):
        """A Failed SOP Instance UID List longer than a UI value's 65534 bytes is cut in explicit VR only."""
        uids = [f"1.2.826.0.1.3680043.9.{10**39 + number}" for number in range(2000)]  # 62 characters each
        data, listed = failed_uid_list(uids, ELE)
        self.assertLess(listed, 2000)
        self.assertEqual(list(decode_dataset(data, ELE).FailedSOPInstanceUIDList), uids[:listed])
        data, listed = failed_uid_list(uids, ILE)
        self.assertEqual(listed, 2000)
        self.assertEqual(len(decode_dataset(data, ILE).FailedSOPInstanceUIDList), 2000)


class RequestFromFileTests(SynchronousTestCase):
    """Association.request_from_file: the DIMSE timer measures progress, not the whole transfer."""

    def test_dimse_timer_restarts_with_each_read(self):
        """Reads 9 s apart keep a 10 s DIMSE timeout from firing; 10 s without a read aborts."""
        clock = Clock()
        request = propose("SCU", "PEER", [(CT_IMAGE_STORAGE, (ELE,))], 4096, IMPLEMENTATION_CLASS_UID, "T")
        protocol = requestor.RequestorProtocol(clock, Timeouts(artim=5, dimse=10, idle=None), request, 4096)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(P.AssociateAC(
            called_ae_title="PEER", calling_ae_title="SCU",
            presentation_contexts=(P.PresentationContextAC(1, 0, ELE),),
            user_information=P.UserInformation(maximum_length=4096, implementation_class_uid="1.2.3"),
        ).encode())
        association = self.successResultOf(protocol.established)
        data = b"z" * (4 * SEND_BLOCK)  # four reads of a block each
        command = D.Command(CommandField=D.CommandField.C_STORE_RQ, Priority=0, AffectedSOPClassUID=CT_IMAGE_STORAGE,
                            AffectedSOPInstanceUID="1.2.3")
        stream = association.request_from_file(CT_IMAGE_STORAGE, command, io.BytesIO(data), len(data))
        for _ in range(3):
            clock.advance(9)
            transport.producer.resumeProducing()
        self.assertTrue(association.is_open)
        clock.advance(10)
        self.assertFalse(association.is_open)
        self.assertIn("DIMSE timeout", protocol.record.outcome)
        protocol.connectionLost(None)
        self.failureResultOf(defer.ensureDeferred(stream.final()), requestor.AssociationAborted)
