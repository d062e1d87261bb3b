"""The Memory-Manager's loads, driven in memory: a scripted peer answers the C-MOVE (through the requestor's own
ResponseStream), the clock is a Clock; queueing, states and counts, every way a load fails, cancel, timeouts,
and the objects the Memory-Server reports for a load."""

from __future__ import annotations

import os
from typing import List, Optional

from pydicom.dataset import Dataset
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from appliance import config as configuration
from appliance.ae.manager import MAX_QUEUED, PROGRESS_INTERVAL, LoadState, MemoryManager, UnknownDevice, UnknownLoad
from appliance.compat import encode_dataset
from appliance.dataset.checks import ObjectDescription, Refusal, Refused
from appliance.dicom import dimse as D
from appliance.dicom import pdu as P
from appliance.dicom.uids import EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN, STUDY_ROOT_GET, STUDY_ROOT_MOVE
from appliance.interfaces import IObjectSink
from appliance.memory.store import OBJECT_OVERHEAD, MemoryStore
from appliance.net.requestor import (
    AssociationAborted,
    AssociationRejected,
    AssociationTimeout,
    ConnectionFailed,
    MessageIds,
    Response,
    ResponseStream,
)

from .test_memory import metadata

STUDY = "1.2.826.0.1.3680043.2.1"


class _Context:
    transfer_syntax = IMPLICIT_VR_LITTLE_ENDIAN


class _Negotiated:
    def context_for(self, abstract_syntax, transfer_syntax=None):
        return _Context() if abstract_syntax in (STUDY_ROOT_MOVE, STUDY_ROOT_GET) else None


class ScriptedAssociation:
    """The device's side of one association, as the requestor presents it: the test pushes its responses."""

    negotiated = _Negotiated()

    def __init__(self, message_ids: MessageIds) -> None:
        self.message_ids = message_ids
        self.moves: List[tuple] = []
        self.gets: List[tuple] = []
        self.stream: Optional[ResponseStream] = None
        self.cancels: List[int] = []
        self.released = False
        self.aborted: Optional[str] = None

    def move(self, identifier: Dataset, destination: str) -> ResponseStream:
        self.moves.append((identifier, destination))
        self.stream = ResponseStream(self, self.message_ids(), D.CommandField.C_MOVE_RQ)
        return self.stream

    def get(self, identifier: Dataset, store) -> ResponseStream:
        self.gets.append((identifier, store))
        self.stream = ResponseStream(self, self.message_ids(), D.CommandField.C_GET_RQ)
        return self.stream

    def cancel(self, message_id: int) -> None:
        self.cancels.append(message_id)

    def release(self):
        self.released = True
        return defer.succeed(None)

    def abort(self, why: str) -> None:
        self.aborted = why
        if self.stream is not None:
            self.stream._push(AssociationAborted(f"aborted by us: {why}"))

    def respond(self, status: int, remaining=None, completed=0, failed=0, warning=0, comment=None,
                failed_uids=None) -> None:
        command = D.Command(CommandField=D.CommandField.C_MOVE_RSP, MessageIDBeingRespondedTo=self.stream.message_id,
                            Status=status, NumberOfRemainingSuboperations=remaining,
                            NumberOfCompletedSuboperations=completed, NumberOfFailedSuboperations=failed,
                            NumberOfWarningSuboperations=warning, ErrorComment=comment)
        data = None
        if failed_uids:
            identifier = Dataset()
            identifier.FailedSOPInstanceUIDList = failed_uids
            data = encode_dataset(identifier, IMPLICIT_VR_LITTLE_ENDIAN)
        self.stream._push(Response(command, data))


class ManagerHarness:
    def __init__(self, test, manager=None, devices=None, memory_server=None):
        root = test.mktemp()
        self.clock = Clock()
        self.clock.advance(100)
        devices = devices or {"pacs": {"ae_title": "PACS", "host": "10.0.0.5", "port": 104}}
        self.config = configuration.parse(
            {"appliance": {"data_dir": root}, "memory_server": memory_server or {"port": 11113},
             "memory_manager": manager or {}, "devices": devices, "web": {"port": 0}},
            os.path.join(root, "a.toml"))
        self.store = MemoryStore(64 << 20, self.clock)
        self.message_ids = MessageIds()
        #: (device name, contexts, Deferred) of every association asked for, in order
        self.connections: List[tuple] = []
        self.roles: List[Optional[dict]] = []
        self.manager = MemoryManager(self.config, self.store, self.clock, self.connect)

    def connect(self, device, contexts, roles=None):
        waiting = defer.Deferred()
        self.connections.append((device.name, contexts, waiting))
        self.roles.append(roles)
        return waiting

    def establish(self, index: int = -1) -> ScriptedAssociation:
        association = ScriptedAssociation(self.message_ids)
        self.connections[index][2].callback(association)
        return association

    def arrive(self, load, sop: str, series: str = "1.9.1") -> None:
        """An object of ``load`` arrives at the Memory-Server: the sink asks, then keeps it."""
        description = ObjectDescription("1.2.840.10008.5.1.4.1.1.2", sop, EXPLICIT_VR_LITTLE_ENDIAN, "PACS",
                                        "MEMORY_MANAGER", load.message_id)
        assert self.manager.expects(description)
        self.store.reserve(100 + OBJECT_OVERHEAD)
        self.store.put(metadata(load.study, series, sop), EXPLICIT_VR_LITTLE_ENDIAN, bytes(100))
        self.store.release(100 + OBJECT_OVERHEAD)
        self.manager.kept(description)


class LoadTests(SynchronousTestCase):
    def setUp(self):
        self.h = ManagerHarness(self)
        self.manager = self.h.manager

    def test_study_load_states_and_counts(self):
        """queued -> running -> done, the counts of each pending response, the study pinned while it runs."""
        load = self.manager.submit("pacs", STUDY)
        self.assertEqual(load.state, LoadState.RUNNING)  # a free slot: started at once
        (device, contexts, _), = self.h.connections
        self.assertEqual((device, contexts[0][0]), ("pacs", STUDY_ROOT_MOVE))
        self.assertEqual(self.h.store.studies[STUDY].pins, 1)
        association = self.h.establish()
        (identifier, destination), = association.moves
        self.assertEqual((identifier.QueryRetrieveLevel, identifier.StudyInstanceUID, destination),
                         ("STUDY", STUDY, "MEMORY_SERVER"))
        self.assertNotIn("SeriesInstanceUID", identifier)
        association.respond(0xFF00, remaining=2, completed=0)
        self.assertEqual((load.remaining, load.completed), (2, 0))
        self.h.arrive(load, "1.9.1.1")
        association.respond(0xFF00, remaining=1, completed=1)
        self.h.arrive(load, "1.9.1.2")
        association.respond(0x0000, remaining=None, completed=2)
        self.assertEqual(load.state, LoadState.DONE)
        self.assertEqual((load.remaining, load.completed, load.failed, load.received, load.error), (0, 2, 0, 2, None))
        self.assertTrue(association.released)
        self.assertEqual(self.h.store.studies[STUDY].pins, 0)
        self.assertTrue(self.h.store.is_complete(STUDY))
        as_json = load.as_json()
        self.assertEqual((as_json["state"], as_json["completed"], as_json["device"]), ("done", 2, "pacs"))

    def test_watchers_hear_of_counts_at_most_every_interval_and_of_the_end_at_once(self):
        load = self.manager.submit("pacs", STUDY)
        association = self.h.establish()
        heard = []

        def watch():
            self.manager.changed(load.id).addCallback(lambda changed: heard.append((changed.completed, changed.state)))

        watch()
        association.respond(0xFF00, remaining=3, completed=0)
        self.assertEqual(heard, [], "the state changed to running just now: counts wait for the interval")
        self.h.clock.advance(PROGRESS_INTERVAL)
        self.assertEqual(heard, [(0, LoadState.RUNNING)])
        watch()
        association.respond(0xFF00, remaining=2, completed=1)
        association.respond(0xFF00, remaining=1, completed=2)
        self.h.clock.advance(PROGRESS_INTERVAL / 2)
        self.assertEqual(len(heard), 1)
        self.h.clock.advance(PROGRESS_INTERVAL / 2)
        self.assertEqual(heard[1:], [(2, LoadState.RUNNING)], "two responses, one answer with the latest counts")
        self.h.clock.advance(10 * PROGRESS_INTERVAL)
        watch()
        association.respond(0xFF00, remaining=0, completed=3)
        self.assertEqual(heard[2:], [(3, LoadState.RUNNING)], "long after the last: at once")
        watch()
        association.respond(0xFF00, remaining=0, completed=3)
        association.respond(0x0000, remaining=None, completed=3)
        self.assertEqual(heard[3:], [(3, LoadState.DONE)], "the end at once, the counts' call cancelled")
        self.assertEqual(self.h.clock.getDelayedCalls(), [])

    def test_load_from_the_local_archive(self):
        """The appliance's own Disk-Server is a device to load from, by its name "local"."""
        load = self.manager.submit("local", STUDY)
        (device, contexts, _), = self.h.connections
        self.assertEqual((device, load.device_ae_title), ("local", "DISK_SERVER"))

    def test_loaded_again_completes_at_once(self):
        load = self.manager.submit("pacs", STUDY)
        association = self.h.establish()
        self.h.arrive(load, "1.9.1.1")
        association.respond(0x0000, completed=1)
        again = self.manager.submit("pacs", STUDY)
        self.assertEqual(again.state, LoadState.DONE)
        self.assertEqual(len(self.h.connections), 1, "no C-MOVE for what is in memory")
        series = self.manager.submit("pacs", STUDY, "1.9.1")
        self.assertEqual(series.state, LoadState.DONE)
        instance = self.manager.submit("pacs", STUDY, "1.9.1", "1.9.1.1")
        self.assertEqual(instance.state, LoadState.DONE)
        missing = self.manager.submit("pacs", STUDY, "1.9.1", "1.9.1.7")
        self.assertEqual(missing.state, LoadState.RUNNING)
        self.h.store.drop(STUDY)
        self.assertEqual(self.manager.submit("pacs", STUDY).state, LoadState.QUEUED if len(
            self.manager.running) >= 4 else LoadState.RUNNING)

    def test_series_and_instance_identifiers(self):
        self.manager.submit("pacs", STUDY, "1.9.2")
        self.manager.submit("pacs", STUDY, "1.9.2", "1.9.2.5")
        first, second = self.h.establish(0), self.h.establish(1)
        self.assertEqual((first.moves[0][0].QueryRetrieveLevel, first.moves[0][0].SeriesInstanceUID), ("SERIES", "1.9.2"))
        identifier = second.moves[0][0]
        self.assertEqual((identifier.QueryRetrieveLevel, identifier.SeriesInstanceUID, identifier.SOPInstanceUID),
                         ("IMAGE", "1.9.2", "1.9.2.5"))

    def test_four_in_parallel_fifth_queued(self):
        loads = [self.manager.submit("pacs", f"{STUDY}.{n}") for n in range(5)]
        self.assertEqual([load.state for load in loads], [LoadState.RUNNING] * 4 + [LoadState.QUEUED])
        self.assertEqual(len(self.h.connections), 4)
        association = self.h.establish(2)
        association.respond(0x0000, completed=3)
        self.assertEqual(loads[2].state, LoadState.DONE)
        self.assertEqual(loads[4].state, LoadState.RUNNING, "the freed slot goes to the queued load")
        self.assertEqual(len(self.h.connections), 5)

    def test_message_ids_tell_parallel_loads_apart(self):
        first, second = self.manager.submit("pacs", f"{STUDY}.1"), self.manager.submit("pacs", f"{STUDY}.2")
        self.h.establish(0), self.h.establish(1)
        self.assertNotEqual(first.message_id, second.message_id)
        description = ObjectDescription("1.2", "1.3", EXPLICIT_VR_LITTLE_ENDIAN, "OTHER", "MEMORY_MANAGER",
                                        second.message_id)
        self.manager.kept(description)
        self.assertEqual((first.received, second.received), (0, 1))
        stranger = ObjectDescription("1.2", "1.3", EXPLICIT_VR_LITTLE_ENDIAN, "OTHER", "SOMEONE_ELSE", 1)
        self.assertFalse(self.manager.expects(stranger))
        # a device that does not name the originator is recognised by its AE title
        unnamed = ObjectDescription("1.2", "1.3", EXPLICIT_VR_LITTLE_ENDIAN, "PACS", None, None)
        self.assertTrue(self.manager.expects(unnamed))

    def test_unknown_device_and_load(self):
        with self.assertRaises(UnknownDevice) as raised:
            self.manager.submit("nowhere", STUDY)
        self.assertIn("configured: local, pacs", str(raised.exception))
        with self.assertRaises(UnknownLoad):
            self.manager.get(99)

    def test_keep_finished_bounds_the_list(self):
        h = ManagerHarness(self, manager={"keep_finished": 10})
        h.store.reserve(10)
        for number in range(30):
            load = h.manager.submit("pacs", f"{STUDY}.{number}")
            h.manager.cancel(load.id) if load.state is LoadState.QUEUED else None
            if load.state is LoadState.RUNNING:
                h.establish(len(h.connections) - 1).respond(0xA801)
        self.assertLessEqual(len(h.manager.loads), 10 + 4 + 1)


class FailureTests(SynchronousTestCase):
    def setUp(self):
        self.h = ManagerHarness(self)
        self.manager = self.h.manager

    def run_with(self, *responses, **submit):
        load = self.manager.submit("pacs", STUDY, **submit)
        association = self.h.establish()
        for response in responses:
            association.respond(**response)
        return load, association

    def test_long_queue_of_loads_refused_at_once(self):
        """A full queue of loads whose connections are refused as they start all end failed, one after the
        other in a loop, and the slots stay usable (a chain of nested calls broke off at the recursion limit)."""
        pending: List[defer.Deferred] = []

        def connect(device, contexts, roles=None):
            if len(pending) < self.manager.max_parallel:
                pending.append(defer.Deferred())
                return pending[-1]
            return defer.fail(ConnectionFailed("test: refused at once"))

        self.manager.connect = connect
        queued = MAX_QUEUED  # as many as may wait
        loads = [self.manager.submit("pacs", f"{STUDY}.{n}") for n in range(self.manager.max_parallel + queued)]
        self.assertEqual(len(self.manager.queue), queued)
        pending[0].errback(ConnectionFailed("test: refused"))
        self.assertEqual([load.state for load in loads[self.manager.max_parallel:]], [LoadState.FAILED] * queued)
        self.assertEqual((len(self.manager.queue), len(self.manager.running)), (0, self.manager.max_parallel - 1))
        for waiting in pending[1:]:
            waiting.errback(ConnectionFailed("test: refused"))
        self.assertEqual(len(self.manager.running), 0)

    def test_queue_bounded(self):
        """Past MAX_QUEUED waiting loads a new one is refused (QueueFull) until one has started; running ones do
        not count."""
        from appliance.ae import manager as manager_module
        self.patch(manager_module, "MAX_QUEUED", 3)
        for n in range(self.manager.max_parallel + 3):
            self.manager.submit("pacs", f"{STUDY}.{n}")
        with self.assertRaises(manager_module.QueueFull) as refused:
            self.manager.submit("pacs", f"{STUDY}.99")
        self.assertIn("3 loads are waiting already (at most 3)", str(refused.exception))
        self.h.establish(0)  # (the first running load's association: it runs on)
        self.manager.cancel(self.manager.queue[0].id)
        self.manager.submit("pacs", f"{STUDY}.99")
        self.assertEqual(len(self.manager.queue), 3)

    def test_a801_says_what_to_configure(self):
        load, _ = self.run_with(dict(status=0xA801, comment="Unknown destination"))
        self.assertEqual(load.state, LoadState.FAILED)
        for words in ("A801", "does not know the Memory-Server", "MEMORY_SERVER", "port 11113", "PACS at 10.0.0.5:104",
                      'retrieve = "get"', "Unknown destination"):
            self.assertIn(words, load.error)
        self.assertEqual(self.h.store.studies, {}, "the study pinned for nothing is gone")

    def test_partial_failure_b000_with_counts_and_uids(self):
        load, _ = self.run_with(dict(status=0xFF00, remaining=3), dict(status=0xB000, completed=1, failed=2,
                                                                        failed_uids=["1.9.1.2", "1.9.1.3"]))
        self.assertEqual(load.state, LoadState.FAILED)
        self.assertEqual((load.completed, load.failed, load.failed_instances), (1, 2, ["1.9.1.2", "1.9.1.3"]))
        self.assertIn("2 of 3 objects failed", load.error)
        self.assertIn("1.9.1.2, 1.9.1.3", load.error)

    def test_memory_full_named(self):
        load = self.manager.submit("pacs", STUDY)
        association = self.h.establish()
        description = ObjectDescription("1.2", "1.9.1.9", EXPLICIT_VR_LITTLE_ENDIAN, "PACS", "MEMORY_MANAGER",
                                        load.message_id)
        self.manager.refused(description, Refused(Refusal.OUT_OF_RESOURCES, "memory full: memory_limit=1 reached"))
        association.respond(status=0xA702, completed=0, failed=1)
        self.assertEqual(load.state, LoadState.FAILED)
        self.assertIn("A702", load.error)
        self.assertIn("memory full: memory_limit=1 reached", load.error)

    def test_other_statuses_with_comment(self):
        load, _ = self.run_with(dict(status=0xC123, comment="index broken"))
        self.assertIn("index broken", load.error)
        self.assertIn("C123", load.error)

    def test_nothing_found(self):
        load, _ = self.run_with(dict(status=0x0000, completed=0))
        self.assertEqual(load.state, LoadState.FAILED)
        self.assertIn("found nothing", load.error)

    def fail_connection(self, error):
        load = self.manager.submit("pacs", STUDY)
        self.h.connections[-1][2].errback(error)
        self.assertEqual(load.state, LoadState.FAILED)
        self.assertEqual(self.manager.running, {})
        return load

    def test_unreachable(self):
        load = self.fail_connection(ConnectionFailed("connection to PACS at 10.0.0.5:104 refused"))
        self.assertIn("cannot reach pacs", load.error)
        self.assertIn("refused", load.error)

    def test_rejected_in_ps38_words(self):
        load = self.fail_connection(AssociationRejected(P.AssociateRJ(1, 1, 7)))
        self.assertIn("rejected the association", load.error)
        self.assertIn("called-AE-title-not-recognized", load.error)

    def test_association_timeout(self):
        load = self.fail_connection(AssociationTimeout("no A-ASSOCIATE-AC from PACS within 30 s"))
        self.assertIn("timeout", load.error)

    def test_aborted_halfway(self):
        load = self.manager.submit("pacs", STUDY)
        association = self.h.establish()
        association.respond(0xFF00, remaining=5, completed=2)
        association.stream._push(AssociationAborted("provider abort: reason 0"))
        self.assertEqual(load.state, LoadState.FAILED)
        self.assertIn("ended after 2 objects", load.error)
        self.assertIn("provider abort", load.error)

    def test_memory_server_not_listening(self):
        h = ManagerHarness(self, memory_server={"port": 0})
        load = h.manager.submit("pacs", STUDY)
        self.assertEqual(load.state, LoadState.FAILED)
        self.assertIn("[memory_server] port = 0", load.error)
        self.assertEqual(h.connections, [])


class CancelAndTimeoutTests(SynchronousTestCase):
    def test_cancel_queued(self):
        h = ManagerHarness(self, manager={"max_parallel_loads": 1})
        h.manager.submit("pacs", f"{STUDY}.1")
        queued = h.manager.submit("pacs", f"{STUDY}.2")
        self.assertIs(h.manager.cancel(queued.id), queued)
        self.assertEqual(queued.state, LoadState.CANCELLED)
        self.assertEqual(list(h.manager.queue), [])

    def test_cancel_running_sends_c_cancel(self):
        h = ManagerHarness(self)
        load = h.manager.submit("pacs", STUDY)
        association = h.establish()
        association.respond(0xFF00, remaining=4, completed=1)
        h.manager.cancel(load.id)
        self.assertEqual(association.cancels, [load.message_id])
        self.assertEqual(load.state, LoadState.RUNNING, "until the device answers")
        association.respond(0xFE00, completed=1, remaining=3)
        self.assertEqual(load.state, LoadState.CANCELLED)
        self.assertIn("1 objects had arrived", load.error)

    def test_cancel_while_connecting(self):
        h = ManagerHarness(self)
        load = h.manager.submit("pacs", STUDY)
        h.manager.cancel(load.id)
        association = h.establish()
        self.assertEqual(association.moves, [])
        self.assertTrue(association.released)
        self.assertEqual(load.state, LoadState.CANCELLED)

    def test_load_timeout_aborts(self):
        h = ManagerHarness(self, manager={"load_timeout": "10 min"})
        load = h.manager.submit("pacs", STUDY)
        association = h.establish()
        association.respond(0xFF00, remaining=10, completed=3)
        h.clock.advance(599)
        self.assertEqual(load.state, LoadState.RUNNING)
        h.clock.advance(1)
        self.assertIn("load_timeout", association.aborted)
        self.assertEqual(load.state, LoadState.FAILED)
        self.assertIn("load_timeout (600 s) reached after 3 objects", load.error)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_timer_cancelled_when_done(self):
        h = ManagerHarness(self, manager={"load_timeout": 600})
        load = h.manager.submit("pacs", STUDY)
        association = h.establish()
        h.arrive(load, "1.9.1.1")
        association.respond(0x0000, completed=1)
        self.assertEqual(load.state, LoadState.DONE)
        self.assertEqual(h.clock.getDelayedCalls(), [])


class GetLoadTests(SynchronousTestCase):
    """retrieve = "get": the C-GET proposes the storage classes with our SCP role, and the objects that come back
    on the association are this load's."""

    def setUp(self):
        self.h = ManagerHarness(self, devices={"pacs": {"ae_title": "PACS", "host": "10.0.0.5", "port": 104,
                                                        "retrieve": "get"}})
        self.opened = []

        @implementer(IObjectSink)
        class Sink:
            limits = None

            def open(sink, description, pause, resume):
                self.opened.append(description)
                return None

        self.h.manager.sink = Sink()

    def test_get_load(self):
        load = self.h.manager.submit("pacs", STUDY)
        (_, contexts, _), = self.h.connections
        self.assertEqual(contexts[0][0], STUDY_ROOT_GET)
        self.assertEqual(self.h.roles[0]["1.2.840.10008.5.1.4.1.1.2"], (False, True))
        association = self.h.establish()
        self.assertEqual(association.moves, [])
        (identifier, store), = association.gets
        self.assertEqual((identifier.QueryRetrieveLevel, identifier.StudyInstanceUID), ("STUDY", STUDY))
        # an object arriving on the association is described as this load's, as a C-MOVE sub-operation names its move
        store.open(ObjectDescription("1.2.840.10008.5.1.4.1.1.2", "1.9.1.1", EXPLICIT_VR_LITTLE_ENDIAN, "PACS"),
                   None, None)
        (tagged,) = self.opened
        self.assertEqual((tagged.move_originator, tagged.move_message_id), ("MEMORY_MANAGER", load.message_id))
        self.assertTrue(self.h.manager.expects(tagged))
        association.respond(0xFF00, remaining=1, completed=1)
        self.h.arrive(load, "1.9.1.1")
        association.respond(0x0000, completed=1)
        self.assertEqual((load.state, load.completed, load.received), (LoadState.DONE, 1, 1))

    def test_without_the_memory_server_listening(self):
        """A C-GET does not need the Memory-Server's port."""
        h = ManagerHarness(self, memory_server={"port": 0},
                           devices={"pacs": {"ae_title": "PACS", "host": "h", "port": 104, "retrieve": "get"}})
        h.manager.sink = object()
        load = h.manager.submit("pacs", STUDY)
        self.assertEqual(load.state, LoadState.RUNNING)
        self.assertEqual(len(h.connections), 1)
