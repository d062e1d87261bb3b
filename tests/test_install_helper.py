"""The install helper: groups of several objects held in memory installed by a process of its own (a real one
here), the rest by the archive's database thread; a helper that ends mid-group or cannot start."""

from __future__ import annotations

import errno
import json
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import threading
from functools import partial

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from appliance.archive.archive import SPARE_FILES, Archive, Duplicate, HelperFailed, Misfiled, StoreOutcome
from appliance.archive.eviction import StorageLimits
from appliance.archive.helper import HelperUnavailable, InstallHelper, _portable
from appliance.archive.sink import ArchiveSink, _write_sealed
from appliance.archive.store import part10_header
from appliance.dataset.checks import ObjectDescription, Refusal, Refused, inspect_memory
from appliance.dicom.uids import IMPLEMENTATION_CLASS_UID
from appliance.net.threads import synchronous_runner

from .support import ROOT, capture_log, subprocess_env
from .support_data import encode_dataset, make_dataset
from .test_archive import HeldRunner, StoredObject

EXPLICIT_LE = "1.2.840.10008.1.2.1"


def unsealed(ds):
    """An object as the sink hands over one it held in memory: checked, written as it is installed."""
    data = encode_dataset(ds, EXPLICIT_LE)
    header = part10_header(ds.SOPClassUID, ds.SOPInstanceUID, EXPLICIT_LE, IMPLEMENTATION_CLASS_UID, "T", "SCU")
    metadata, _ = inspect_memory(data, 0, ds.SOPClassUID, ds.SOPInstanceUID, EXPLICIT_LE)
    return StoredObject(None, metadata, EXPLICIT_LE, "SCU", seal=partial(_write_sealed, header, data),
                        size=len(header) + len(data))


class RecordingHelper:
    """Stands for the helper where only the archive's choice is tested: records the groups, installs nothing."""

    def __init__(self):
        self.groups = []

    def install(self, group):
        self.groups.append([obj.metadata.sop_instance_uid for obj, _ in group])
        raise HelperUnavailable("not a real helper")

    def stop(self):
        pass


class ArchiveWithHelperMixin:
    def setUp(self):
        self.root = self.mktemp()
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.db = HeldRunner()

    def make_archive(self, helper=None, on_duplicate="replace"):
        archive = Archive(self.root, StorageLimits(min_free_space=0), on_duplicate, self.clock, synchronous_runner,
                          self.db, helper=helper)
        self.addCleanup(archive.close)
        return archive

    def real_helper(self, on_duplicate="replace"):
        helper = InstallHelper(self.root, on_duplicate, SPARE_FILES)
        self.addCleanup(helper.stop)
        return helper

    def commit_together(self, archive, objects):
        """The first object alone (on the database thread), the others as one group."""
        results = [defer.ensureDeferred(archive.commit(obj)) for obj in objects]
        self.db.run_all()
        return results


class ChoiceTests(ArchiveWithHelperMixin, SynchronousTestCase):
    """Which groups go to the helper: several objects, all held in memory."""

    def setUp(self):
        super().setUp()
        self.events = capture_log(self)

    def test_one_object_alone_is_installed_here(self):
        helper = RecordingHelper()
        archive = self.make_archive(helper)
        result = defer.ensureDeferred(archive.commit(unsealed(make_dataset(study="1", series="1.1", sop="1.1.1"))))
        self.db.run_all()
        self.assertEqual(self.successResultOf(result), StoreOutcome.STORED)
        self.assertEqual(helper.groups, [])
        self.assertIs(archive.helper, helper)

    def test_several_held_in_memory_go_to_the_helper(self):
        """The helper is asked for the group of two; it cannot start: the group is installed here, and every
        group after it (the helper is given up, and said so)."""
        helper = RecordingHelper()
        archive = self.make_archive(helper)
        objects = [unsealed(make_dataset(study="2", series="2.1", sop=f"2.1.{n}")) for n in range(3)]
        results = self.commit_together(archive, objects)
        self.assertEqual([self.successResultOf(r) for r in results], [StoreOutcome.STORED] * 3)
        self.assertEqual(helper.groups, [["2.1.1", "2.1.2"]])
        self.assertIsNone(archive.helper)
        self.assertEqual(archive.index.counts()[3], 3)
        self.assertEqual([formatEvent(e) for e in self.events if e.get("log_level") == LogLevel.error],
                         ["not a real helper; groups are installed by this process from now on"])

    def writer(self, archive, ds):
        """A writer of the sink as an association has one, the data set written (not finished)."""
        writer = ArchiveSink(archive, IMPLEMENTATION_CLASS_UID, "T").open(
            ObjectDescription(ds.SOPClassUID, ds.SOPInstanceUID, EXPLICIT_LE, "SCU"), lambda: None, lambda: None)
        writer.write(encode_dataset(ds, EXPLICIT_LE))
        return writer

    def test_one_object_while_others_are_in_hand_goes_to_the_helper(self):
        """Several associations storing at once: a group of one goes to the helper when the archive has other
        objects in hand (received or arriving, not answered) as the group starts; alone, it stays here.  The
        count goes back to nothing once each is answered or abandoned."""
        helper = RecordingHelper()
        archive = self.make_archive(helper)
        first, second, third = (self.writer(archive, make_dataset(study="4", series="4.1", sop=f"4.1.{n}"))
                                for n in range(3))
        self.assertEqual(archive.in_hand, 3)
        done = first.finish()  # its group of one starts while the two others are in hand
        self.db.run_all()
        self.assertEqual(helper.groups, [["4.1.0"]])  # asked; it cannot start: installed here
        self.assertEqual(self.successResultOf(done).duplicate, None)
        self.assertEqual(archive.in_hand, 2)
        third.abandon("association aborted")
        self.db.run_all()
        self.assertEqual(archive.in_hand, 1)
        archive.helper = helper  # as if it could have started
        done = second.finish()  # alone now
        self.db.run_all()
        self.successResultOf(done)
        self.assertEqual(helper.groups, [["4.1.0"]])  # not asked again
        self.assertEqual(archive.in_hand, 0)
        second.abandon("released after its answer")  # counted once only
        self.assertEqual(archive.in_hand, 0)
        self.assertEqual(archive.index.counts()[3], 2)

    def test_a_group_with_a_streamed_object_is_installed_here(self):
        helper = RecordingHelper()
        archive = self.make_archive(helper)
        objects = [unsealed(make_dataset(study="3", series="3.1", sop=f"3.1.{n}")) for n in range(3)]
        streamed = objects[2]
        streamed.partial = archive.store.open_temp()  # as a streamed object's file with its first chunks
        results = self.commit_together(archive, objects)
        self.assertEqual([self.successResultOf(r) for r in results], [StoreOutcome.STORED] * 3)
        self.assertEqual(helper.groups, [])


class HelperProcessTests(ArchiveWithHelperMixin, SynchronousTestCase):
    """A real helper process installing the groups."""

    def test_a_group_is_installed_by_the_helper(self):
        helper = self.real_helper()
        archive = self.make_archive(helper)
        pid = helper.start()
        self.assertNotEqual(pid, os.getpid())
        asked = []
        install = helper.install
        self.patch(helper, "install", lambda group: (asked.append(len(group)), install(group))[1])
        objects = [unsealed(make_dataset(study="4", series=f"4.{n % 2}", sop=f"4.9.{n}")) for n in range(4)]
        results = self.commit_together(archive, objects)
        self.assertEqual([self.successResultOf(r) for r in results], [StoreOutcome.STORED] * 4)
        self.assertEqual(asked, [3])
        self.assertEqual(archive.index.counts(), (1, 1, 2, 4))
        for n in range(4):
            row = archive.index.lookup(f"4.9.{n}")
            with open(archive.store.absolute(row.path), "rb") as handle:
                self.assertEqual(handle.read()[128:132], b"DICM")
        self.assertEqual(archive.size, sum(row.size for row in archive.index.all_instances()))

    def test_failures_of_single_objects_come_back_as_they_were(self):
        """A misfiled object and a duplicate refused, in one group installed by the helper: each fails alone, with
        its own exception; the others are stored."""
        helper = self.real_helper(on_duplicate="reject")
        archive = self.make_archive(helper, on_duplicate="reject")
        helper.start()
        objects = [unsealed(make_dataset(study="5", series="5.1", sop="5.1.0")),
                   unsealed(make_dataset(study="5", series="5.1", sop="5.1.1")),
                   unsealed(make_dataset(study="6", series="5.1", sop="5.1.2")),  # series 5.1 is study 5's
                   unsealed(make_dataset(study="5", series="5.1", sop="5.1.1"))]  # twice in the group
        results = self.commit_together(archive, objects)
        self.assertEqual(self.successResultOf(results[0]), StoreOutcome.STORED)
        self.assertEqual(self.successResultOf(results[1]), StoreOutcome.STORED)
        self.failureResultOf(results[2], Misfiled)
        self.failureResultOf(results[3], Duplicate)
        self.assertEqual(archive.index.counts()[3], 2)
        # nothing left of the refused ones: what is in tmp/ is the spare files, empty
        self.assertEqual([os.path.getsize(os.path.join(archive.store.tmp, name)) for name in
                          archive.store.leftovers()], [0] * len(archive.store.leftovers()))

    def test_a_helper_ending_mid_group_fails_the_group_and_the_next_starts_another(self):
        helper = self.real_helper()
        archive = self.make_archive(helper)
        first = helper.start()
        os.kill(first, signal.SIGKILL)
        helper.process.wait()
        objects = [unsealed(make_dataset(study="7", series="7.1", sop=f"7.1.{n}")) for n in range(3)]
        results = self.commit_together(archive, objects)
        self.assertEqual(self.successResultOf(results[0]), StoreOutcome.STORED)  # alone, here
        for result in results[1:]:
            failure = self.failureResultOf(result, HelperFailed)
            self.assertIn("ended during a group of 2", str(failure.value))
        self.assertEqual(archive.size, sum(row.size for row in archive.index.all_instances()))
        # the next group starts a new helper
        objects = [unsealed(make_dataset(study="7", series="7.1", sop=f"7.1.{n}")) for n in range(1, 4)]
        results = self.commit_together(archive, objects)
        self.assertEqual([self.successResultOf(r) for r in results], [StoreOutcome.STORED] * 3)
        self.assertNotEqual(helper.pid, first)
        self.assertEqual(archive.index.counts()[3], 4)

    def test_the_archive_is_counted_again_after_a_helper_ended(self):
        """A helper that installed its group and ended before answering: the objects are stored, unanswered; the
        archive's size is counted again from the index, so that it includes them."""
        helper = self.real_helper()
        archive = self.make_archive(helper)
        helper.start()
        install = helper.install

        def installed_then_ended(group):
            install(group)
            raise HelperFailed("ended before answering")

        self.patch(helper, "install", installed_then_ended)
        objects = [unsealed(make_dataset(study="9", series="9.1", sop=f"9.1.{n}")) for n in range(3)]
        results = self.commit_together(archive, objects)
        self.failureResultOf(results[1], HelperFailed)
        self.failureResultOf(results[2], HelperFailed)
        self.assertEqual(archive.index.counts()[3], 3)
        self.assertEqual(archive.size, sum(row.size for row in archive.index.all_instances()))

    def test_the_sender_is_answered_a_processing_failure(self):
        """HelperFailed reaches the C-STORE as a refusal with its reason (no traceback: it is logged where it
        happened)."""
        archive = self.make_archive()
        archive.db = synchronous_runner

        async def ended(obj):
            raise HelperFailed("the install helper ended during a group of 2")

        self.patch(archive, "commit", ended)
        ds = make_dataset(study="10", series="10.1", sop="10.1.1")
        writer = ArchiveSink(archive, IMPLEMENTATION_CLASS_UID, "T").open(
            ObjectDescription(ds.SOPClassUID, ds.SOPInstanceUID, EXPLICIT_LE, "SCU"), lambda: None, lambda: None)
        writer.write(encode_dataset(ds, EXPLICIT_LE))
        refusal = self.failureResultOf(writer.finish(), Refused).value
        self.assertEqual(refusal.kind, Refusal.FAILED)
        self.assertIn("the install helper ended", refusal.comment)

    def test_a_helper_that_cannot_start_is_said_so_and_given_up(self):
        events = capture_log(self)
        archive = self.make_archive(InstallHelper(self.root, "replace", 0, executable="/nonexistent/python3"))
        started = archive.start_helper()
        self.db.run_all()
        self.assertIsNone(self.successResultOf(started))
        self.assertIsNone(archive.helper)
        self.assertEqual([formatEvent(e) for e in events if e.get("log_level") == LogLevel.error],
                         ["cannot start the install helper: [Errno 2] No such file or directory: "
                          "'/nonexistent/python3'; groups are installed by this process"])

    def test_the_helper_that_cannot_open_the_archive_says_why(self):
        os.makedirs(self.root)
        with open(os.path.join(self.root, "index.sqlite"), "wb") as handle:
            handle.write(b"not a database" * 100)
        helper = InstallHelper(self.root, "replace", 0)
        self.addCleanup(helper.stop)
        error = self.assertRaises(HelperUnavailable, helper.start)
        self.assertIn("could not open the archive", str(error))
        self.assertIsNone(helper.process)

    def test_the_helper_ends_when_our_end_is_closed(self):
        helper = self.real_helper()
        helper.start()
        process = helper.process
        helper.stop()
        self.assertEqual(process.returncode, 0)
        self.assertIsNone(helper.process)
        self.assertEqual(os.listdir(os.path.join(self.root, "tmp")), [])  # its spare files removed

    def test_a_group_handed_over_is_finished_despite_sigterm(self):
        """SIGTERM (a service manager stopping everything) does not cut the helper's group short: it ends when
        its parent's end closes."""
        helper = self.real_helper()
        pid = helper.start()
        os.kill(pid, signal.SIGTERM)
        objects = [(unsealed(make_dataset(study="8", series="8.1", sop=f"8.1.{n}")), 1000.0) for n in range(2)]
        answers = helper.install(objects)
        self.assertEqual([answer[0] for answer in answers], [StoreOutcome.STORED] * 2)


#: run in a fresh interpreter: the helper's main on one end of a socket pair; the other end, on a thread, notes
#: whether the sink's module is loaded when "ready" comes, then closes, which ends the helper
_READY_PROBE = """
import json, os, pickle, socket, sys, threading
from multiprocessing.connection import Connection
from appliance.archive import helper
seen = {"before": "appliance.archive.sink" in sys.modules}
ours, theirs = socket.socketpair()
def listen():
    connection = Connection(ours.detach())
    seen["reply"] = pickle.loads(connection.recv_bytes())[0]
    seen["at_ready"] = "appliance.archive.sink" in sys.modules
    connection.close()
listener = threading.Thread(target=listen)
listener.start()
seen["status"] = helper.main([str(theirs.fileno()), sys.argv[1], "replace", "0"])
listener.join()
print(json.dumps(seen))
"""


class ReadyTests(SynchronousTestCase):
    def test_the_sink_module_is_loaded_before_ready(self):
        """What a group's objects refer to when unpickled (the sink's functions) is loaded before the helper says
        it is ready, not while the first group's senders wait (some 40 ms)."""
        root = os.path.abspath(self.mktemp())  # the probe runs in the checkout
        done = subprocess.run([sys.executable, "-c", _READY_PROBE, root], env=subprocess_env(), cwd=ROOT,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        seen = json.loads(done.stdout.splitlines()[-1])
        self.assertEqual(seen, {"before": False, "reply": "ready", "at_ready": True, "status": 0})


class PortableTests(SynchronousTestCase):
    """Exceptions as the helper sends them back."""

    def test_an_index_full_is_no_space_left(self):
        error = sqlite3.OperationalError("database or disk is full")
        error.sqlite_errorcode = getattr(sqlite3, "SQLITE_FULL", 13)
        portable = _portable(error)
        self.assertIsInstance(portable, OSError)
        self.assertEqual(portable.errno, errno.ENOSPC)

    def test_what_does_not_pickle_says_what_it_was(self):
        class Local(Exception):
            pass

        portable = _portable(Local("with a lock", threading.Lock()))
        self.assertIsInstance(portable, RuntimeError)
        self.assertIn("Local", str(portable))
        self.assertIsInstance(pickle.loads(pickle.dumps(portable)), RuntimeError)

    def test_others_pass_as_they_are(self):
        for error in (Misfiled("series 1 is study 2's"), Duplicate("stored already"), OSError(errno.EIO, "I/O")):
            self.assertIs(_portable(error), error)
