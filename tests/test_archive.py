"""The archive: index, files, durability protocol, duplicates, eviction and reconciliation."""

from __future__ import annotations

import os
import sqlite3
import time
from functools import partial
from typing import List

from pydicom import dcmread
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from appliance.archive.archive import (Archive, Duplicate, Misfiled, OutOfResources, StoredObject, StoreOutcome,
                                      _reconcile)
from appliance.archive.eviction import StorageLimits, plan, shortfall
from appliance.archive.index import ArchiveIndex
from appliance.archive.sink import _write_sealed, examine
from appliance.archive import store as store_module
from appliance.archive.store import part10_header, uid_hash
from appliance.dataset.checks import inspect_memory
from appliance.dicom.uids import IMPLEMENTATION_CLASS_UID
from appliance.net.threads import synchronous_runner

from .support_data import encode_dataset, make_dataset

EXPLICIT_LE = "1.2.840.10008.1.2.1"
CT = "1.2.840.10008.5.1.4.1.1.2"


class EvictionPolicyTests(SynchronousTestCase):
    """The pure storage management policy."""

    def test_no_shortfall_under_limits(self):
        """Nothing is needed while both limits hold."""
        limits = StorageLimits(max_archive_size=1000, min_free_space=100)
        self.assertEqual(shortfall(limits, 500, 10_000, 100).needed, 0)

    def test_size_limit_targets_low_water(self):
        """Crossing max_archive_size asks for the excess, and targets the low-water mark."""
        limits = StorageLimits(max_archive_size=1000, min_free_space=0, low_water=0.9)
        result = shortfall(limits, 950, 10_000, 100)
        self.assertEqual((result.needed, result.target), (50, 150))
        self.assertIn("max_archive_size is 1000", result.reason)

    def test_free_space_limit(self):
        """Leaving less than min_free_space asks for the difference plus headroom."""
        limits = StorageLimits(max_archive_size=0, min_free_space=1000, low_water=0.9)
        result = shortfall(limits, 0, 1050, 100)
        self.assertEqual((result.needed, result.target), (50, 150))

    def test_plan_skips_pinned_and_stops_at_target(self):
        """Least recently accessed first, pinned studies skipped, stop once the target is met."""
        candidates = [("a", 10, 1.0), ("b", 10, 2.0), ("c", 10, 3.0), ("d", 10, 4.0)]
        self.assertEqual(plan(candidates, {"b"}, 15), (["a", "c"], 20))
        self.assertEqual(plan(candidates, set(), 100), (["a", "b", "c", "d"], 40))


class ArchiveTests(SynchronousTestCase):
    """Archive operations with synchronous runners and a Clock."""

    def setUp(self):
        self.root = self.mktemp()
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.archive = self.make_archive()

    def make_archive(self, limits=StorageLimits(min_free_space=0), on_duplicate="replace"):
        archive = Archive(self.root, limits, on_duplicate, self.clock, synchronous_runner, synchronous_runner)
        self.addCleanup(archive.close)
        return archive

    def receive(self, archive, ds, source_ae="SCU"):
        """Write an object as the storage service would, and examine it."""
        data = encode_dataset(ds, EXPLICIT_LE)
        temp = self.successResultOf(archive.open_temp())
        header = part10_header(ds.SOPClassUID, ds.SOPInstanceUID, EXPLICIT_LE, IMPLEMENTATION_CLASS_UID, "T", source_ae)
        self.successResultOf(archive.write(temp, [header, data]))
        return examine(temp, len(header), ds.SOPClassUID, ds.SOPInstanceUID, EXPLICIT_LE, source_ae), data

    def store(self, archive, ds):
        stored, data = self.receive(archive, ds)
        outcome = self.successResultOf(defer.ensureDeferred(archive.commit(stored)))
        return outcome, data

    def test_store_indexes_and_files_part10(self):
        """A stored object is a Part 10 file with our meta header and the data set bytes as received."""
        ds = make_dataset(patient="Doe^Jane", study="1.2.3", series="1.2.3.4", sop="1.2.3.4.5")
        outcome, data = self.store(self.archive, ds)
        self.assertEqual(outcome, StoreOutcome.STORED)
        row = self.archive.index.lookup("1.2.3.4.5")
        path = self.archive.store.absolute(row.path)
        self.assertIn(uid_hash("1.2.3.4.5"), os.path.basename(path))
        self.assertNotIn("1.2.3.4.5", path)
        with open(path, "rb") as handle:
            content = handle.read()
        self.assertTrue(content.endswith(data))
        self.assertEqual(content[128:132], b"DICM")
        read = dcmread(path)
        self.assertEqual(read.file_meta.SourceApplicationEntityTitle, "SCU")
        self.assertEqual(read.file_meta.TransferSyntaxUID, EXPLICIT_LE)
        self.assertEqual(read.file_meta.ImplementationClassUID, IMPLEMENTATION_CLASS_UID)
        self.assertEqual(self.archive.size, len(content))
        self.assertEqual(self.archive.index.counts(), (1, 1, 1, 1))
        self.assertEqual(self.archive.store.leftovers(), [])

    def test_counters_across_levels(self):
        """Series and instance counters follow stores into one study and two series."""
        for sop, series in (("1.9.1", "1.9.10"), ("1.9.2", "1.9.10"), ("1.9.3", "1.9.11")):
            self.store(self.archive, make_dataset(study="1.9", series=series, sop=sop))
        study = self.archive.index.studies()[0]
        self.assertEqual((study.num_series, study.num_instances), (2, 3))

    def test_storing_into_a_study_makes_it_the_most_recent(self):
        """Storing is an access: a study that receives an object becomes the most recently accessed, and its
        series and study attributes follow its newest object's (written only when they changed)."""
        self.store(self.archive, make_dataset(study="8.1", series="8.1.1", sop="8.1.1.1"))
        self.clock.advance(10)
        self.store(self.archive, make_dataset(study="8.2", series="8.2.1", sop="8.2.1.1"))
        self.clock.advance(10)
        later = make_dataset(study="8.1", series="8.1.1", sop="8.1.1.2")
        later.StudyDate, later.SeriesNumber = "20250607", 9
        self.store(self.archive, later)
        self.assertEqual([uid for uid, _, _ in self.archive.index.eviction_order()], ["8.2", "8.1"])
        study = next(row for row in self.archive.index.studies() if row.study_uid == "8.1")
        self.assertEqual((study.study_date, study.accessed_at), ("20250607", self.clock.seconds()))
        (series_number,) = self.archive.index.db.execute(
            "SELECT series_number FROM series WHERE series_uid = '8.1.1'").fetchone()
        self.assertEqual(series_number, 9)

    def test_duplicate_replace(self):
        """on_duplicate = replace: the new version's file replaces the old, which is removed."""
        ds = make_dataset(sop="1.5.1", patient="Old^Name")
        self.store(self.archive, ds)
        old_path = self.archive.store.absolute(self.archive.index.lookup("1.5.1").path)
        ds.PatientName = "New^Name"
        outcome, _ = self.store(self.archive, ds)
        self.assertEqual(outcome, StoreOutcome.REPLACED)
        new_path = self.archive.store.absolute(self.archive.index.lookup("1.5.1").path)
        self.assertNotEqual(old_path, new_path)
        self.assertFalse(os.path.exists(old_path))
        self.assertEqual(str(dcmread(new_path).PatientName), "New^Name")
        self.assertEqual(self.archive.index.counts()[3], 1)
        self.assertEqual(self.archive.size, os.path.getsize(new_path))

    def test_duplicate_keep(self):
        """on_duplicate = keep: the stored version stays, the new one is discarded."""
        archive = self.make_archive(on_duplicate="keep")
        ds = make_dataset(sop="1.5.2", patient="First^Name")
        self.store(archive, ds)
        ds.PatientName = "Second^Name"
        outcome, _ = self.store(archive, ds)
        self.assertEqual(outcome, StoreOutcome.KEPT_EXISTING)
        path = archive.store.absolute(archive.index.lookup("1.5.2").path)
        self.assertEqual(str(dcmread(path).PatientName), "First^Name")
        self.assertEqual(archive.store.leftovers(), [])

    def test_duplicate_kept_touches_the_study_it_is_stored_in(self):
        """on_duplicate = keep: sending a stored instance again is an access of the study it is stored in, even when
        the new copy names another study (which is not made)."""
        archive = self.make_archive(on_duplicate="keep")
        self.store(archive, make_dataset(study="1.6", series="1.6.1", sop="1.6.1.1"))
        self.store(archive, make_dataset(study="1.7", series="1.7.1", sop="1.7.1.1"))
        self.clock.advance(60)
        outcome, _ = self.store(archive, make_dataset(study="1.8", series="1.8.1", sop="1.6.1.1"))
        self.assertEqual(outcome, StoreOutcome.KEPT_EXISTING)
        studies = {row.study_uid: row.accessed_at for row in archive.index.studies()}
        self.assertEqual(sorted(studies), ["1.6", "1.7"])
        self.assertEqual(studies["1.6"], self.clock.seconds())
        self.assertLess(studies["1.7"], self.clock.seconds())

    def test_duplicate_reject(self):
        """on_duplicate = reject: the second store fails with Duplicate and leaves nothing behind."""
        archive = self.make_archive(on_duplicate="reject")
        ds = make_dataset(sop="1.5.3")
        self.store(archive, ds)
        stored, _ = self.receive(archive, ds)
        self.failureResultOf(defer.ensureDeferred(archive.commit(stored)), Duplicate)
        self.assertEqual(archive.store.leftovers(), [])
        self.assertEqual(archive.index.counts()[3], 1)

    def test_eviction_least_recently_accessed_first(self):
        """Over max_archive_size, the least recently accessed unprotected study goes first."""
        self.store(self.archive, make_dataset(study="2.1", series="2.1.1", sop="2.1.1.1"))
        size_one = self.archive.size
        limits = StorageLimits(max_archive_size=int(size_one * 3.5), min_free_space=0, low_water=0.9)
        archive = self.make_archive(limits)
        self.clock.advance(10)
        self.store(archive, make_dataset(study="2.2", series="2.2.1", sop="2.2.1.1"))
        self.clock.advance(10)
        self.store(archive, make_dataset(study="2.3", series="2.3.1", sop="2.3.1.1"))
        self.clock.advance(10)
        self.successResultOf(archive.touch(["2.1"]))  # 2.1 viewed: now the most recent
        self.assertTrue(archive.index.set_protected("2.2", True))
        self.clock.advance(10)
        self.store(archive, make_dataset(study="2.4", series="2.4.1", sop="2.4.1.1"))
        remaining = sorted(s.study_uid for s in archive.index.studies())
        self.assertEqual(remaining, ["2.1", "2.2", "2.4"])  # 2.3 was the oldest unprotected
        self.assertLessEqual(archive.size, limits.max_archive_size)

    def test_auto_delete_off_refuses(self):
        """With auto_delete off, a full archive refuses with OutOfResources and keeps nothing partial."""
        self.store(self.archive, make_dataset(study="3.1", series="3.1.1", sop="3.1.1.1"))
        limits = StorageLimits(max_archive_size=self.archive.size + 10, min_free_space=0, auto_delete=False)
        self.archive.store.discard_spares()  # another archive on the same folder: its spares are not ours
        archive = self.make_archive(limits)
        stored, _ = self.receive(archive, make_dataset(study="3.2", series="3.2.1", sop="3.2.1.1"))
        failure = self.failureResultOf(defer.ensureDeferred(archive.commit(stored)), OutOfResources)
        self.assertIn("auto_delete is off", str(failure.value))
        self.assertEqual(archive.store.leftovers(), [])
        self.assertEqual(archive.index.counts()[3], 1)

    def test_pinned_study_not_evicted(self):
        """A study being retrieved or written (pinned) is never evicted; the store is refused instead."""
        self.store(self.archive, make_dataset(study="4.1", series="4.1.1", sop="4.1.1.1"))
        limits = StorageLimits(max_archive_size=self.archive.size + 10, min_free_space=0)
        archive = self.make_archive(limits)
        archive.pin("4.1")
        stored, _ = self.receive(archive, make_dataset(study="4.2", series="4.2.1", sop="4.2.1.1"))
        self.failureResultOf(defer.ensureDeferred(archive.commit(stored)), OutOfResources)
        self.assertEqual([s.study_uid for s in archive.index.studies()], ["4.1"])

    def test_delete_study_removes_files_then_rows(self):
        """Deleting a study removes its files, rows and empty directories."""
        self.store(self.archive, make_dataset(study="5.1", series="5.1.1", sop="5.1.1.1"))
        path = self.archive.store.absolute(self.archive.index.lookup("5.1.1.1").path)
        freed = self.successResultOf(defer.ensureDeferred(self.archive.delete_study("5.1")))
        self.assertGreater(freed, 0)
        self.assertFalse(os.path.exists(path))
        self.assertEqual(self.archive.index.counts(), (0, 0, 0, 0))
        self.assertEqual(os.listdir(self.archive.store.objects), [])
        self.assertEqual(self.archive.size, 0)

    def test_reconcile_removes_leftovers(self):
        """Start-up reconciliation removes temporary files, quarantines unreadable files, drops rows without files."""
        self.store(self.archive, make_dataset(study="6.1", series="6.1.1", sop="6.1.1.1"))
        self.store(self.archive, make_dataset(study="6.2", series="6.2.1", sop="6.2.1.1"))
        store = self.archive.store
        garbage = store.relative_path_for("6.3", "6.3.1", "6.3.1.1")
        os.makedirs(os.path.dirname(store.absolute(garbage)))
        with open(store.absolute(garbage), "wb") as handle:
            handle.write(b"not DICOM at all")
        with open(os.path.join(store.tmp, "dead.part"), "wb") as handle:
            handle.write(b"half")
        # a file lost behind the index's back
        os.unlink(store.absolute(self.archive.index.lookup("6.2.1.1").path))
        store.discard_spares()  # the check runs at start-up, before any spare is made
        result = _reconcile(store, self.archive.index_path, started_before=float("inf"))
        self.assertEqual(result.temps, ["dead.part"])
        self.assertEqual([row.sop_uid for row in result.missing], ["6.2.1.1"])
        self.assertEqual(len(result.quarantined), 1)
        self.assertFalse(os.path.exists(store.absolute(garbage)))
        self.assertTrue(os.path.exists(result.quarantined[0]))
        self.assertEqual(store.leftovers(), [])
        self.assertEqual([s.study_uid for s in self.archive.index.studies()], ["6.1"])

    def test_reconcile_indexes_whole_objects_the_index_lost(self):
        """A stored file whose index row was lost (a power cut after the fsync) is indexed again."""
        self.store(self.archive, make_dataset(study="8.1", series="8.1.1", sop="8.1.1.1", patient="Lost^Row"))
        row = self.archive.index.lookup("8.1.1.1")
        self.archive.index.delete_instance("8.1.1.1")  # as if the commit never reached the disk
        result = _reconcile(self.archive.store, self.archive.index_path, started_before=float("inf"))
        self.assertEqual(result.reindexed, [row.path])
        again = self.archive.index.lookup("8.1.1.1")
        self.assertEqual((again.path, again.size, again.transfer_syntax), (row.path, row.size, row.transfer_syntax))
        self.assertEqual(self.archive.index.studies()[0].patient_name, "Lost^Row")

    def test_reconcile_keeps_the_newest_version(self):
        """An older version left behind by a replace is removed; a newer one whose row was lost wins."""
        ds = make_dataset(study="9.1", series="9.1.1", sop="9.1.1.1", patient="First^Version")
        self.store(self.archive, ds)
        first = self.archive.index.lookup("9.1.1.1").path
        # keep a copy of the first version's file, as a crash before its removal would
        with open(self.archive.store.absolute(first), "rb") as handle:
            first_bytes = handle.read()
        ds.PatientName = "Second^Version"
        self.store(self.archive, ds)
        second = self.archive.index.lookup("9.1.1.1").path
        with open(self.archive.store.absolute(first), "wb") as handle:
            handle.write(first_bytes)
        os.utime(self.archive.store.absolute(first), (1, 1))  # older than the second version
        result = _reconcile(self.archive.store, self.archive.index_path, started_before=float("inf"))
        self.assertEqual(result.stale, [first])
        self.assertFalse(os.path.exists(self.archive.store.absolute(first)))
        self.assertEqual(self.archive.index.lookup("9.1.1.1").path, second)
        # now the other way round: the second version's row is lost, the first one's row is back
        os.utime(self.archive.store.absolute(second), None)
        self.archive.index.delete_instance("9.1.1.1")
        with open(self.archive.store.absolute(first), "wb") as handle:
            handle.write(first_bytes)
        os.utime(self.archive.store.absolute(first), (1, 1))
        _reconcile(self.archive.store, self.archive.index_path, started_before=float("inf"))
        self.assertEqual(self.archive.index.lookup("9.1.1.1").path, second)
        self.assertEqual(self.archive.index.studies()[0].patient_name, "Second^Version")
        self.assertEqual(self.archive.index.counts()[3], 1)

    def test_reconcile_spares_files_newer_than_start(self):
        """Files written after start-up (stores in flight) are left alone."""
        with open(os.path.join(self.archive.store.tmp, "live.part"), "wb") as handle:
            handle.write(b"in flight")
        result = _reconcile(self.archive.store, self.archive.index_path, started_before=0)
        self.assertEqual((result.temps, result.reindexed, result.missing), ([], [], []))
        self.assertEqual(os.listdir(self.archive.store.tmp), ["live.part"])

    # --- issue 9: one object must not poison the index; one failure does not stop the rest -----------------

    def test_series_of_another_study_refused(self):
        """An object naming a series that belongs to another study is refused (Misfiled): nothing of it is
        kept, the first study is untouched and can still be deleted and evicted."""
        self.store(self.archive, make_dataset(study="10.1", series="10.1.1", sop="10.1.1.1"))
        stored, _ = self.receive(self.archive, make_dataset(study="10.2", series="10.1.1", sop="10.2.1.1"))
        failure = self.failureResultOf(defer.ensureDeferred(self.archive.commit(stored)), Misfiled)
        self.assertEqual(str(failure.value), "series 10.1.1 belongs to study 10.1")
        self.assertEqual(self.archive.index.counts(), (1, 1, 1, 1))
        self.assertEqual(self.archive.store.leftovers(), [])
        self.assertEqual(sum(len(files) for _, _, files in os.walk(self.archive.store.objects)), 1)
        self.assertGreater(self.successResultOf(defer.ensureDeferred(self.archive.delete_study("10.1"))), 0)
        self.assertEqual(self.archive.index.counts(), (0, 0, 0, 0))

    def test_one_instance_that_cannot_be_deleted_does_not_keep_the_others(self):
        """A file that cannot be removed keeps its row (naming it); the study's other instances go."""
        for n in (1, 2, 3):
            self.store(self.archive, make_dataset(study="11.1", series="11.1.1", sop=f"11.1.1.{n}"))
        stuck = self.archive.index.lookup("11.1.1.2").path
        remove = self.archive.store.remove

        def refusing(relative):
            if relative == stuck:
                raise PermissionError(13, "Permission denied")
            remove(relative)

        self.patch(self.archive.store, "remove", refusing)
        self.successResultOf(defer.ensureDeferred(self.archive.delete_study("11.1")))
        self.assertEqual([row.sop_uid for row in self.archive.index.all_instances()], ["11.1.1.2"])
        self.assertTrue(os.path.exists(self.archive.store.absolute(stuck)))

    def test_eviction_goes_on_past_a_study_that_fails(self):
        """A study whose deletion raises is logged and skipped; eviction frees the room from the next ones."""
        for n, study in enumerate(("12.1", "12.2", "12.3")):
            self.clock.advance(10)
            self.store(self.archive, make_dataset(study=study, series=f"{study}.1", sop=f"{study}.1.1"))
        delete = self.archive.delete_study

        async def failing(study_uid, why="deleted"):
            if study_uid == "12.1":
                raise RuntimeError("simulated failure")
            return await delete(study_uid, why)

        self.patch(self.archive, "delete_study", failing)
        freed = self.successResultOf(defer.ensureDeferred(self.archive.evict(1)))
        self.assertGreater(freed, 0)
        self.assertEqual(sorted(s.study_uid for s in self.archive.index.studies()), ["12.1", "12.3"])
        self.flushLoggedErrors(RuntimeError)

    def test_row_of_an_instance_stored_again_is_kept(self):
        """Deleting an instance by the file it named spares the row of a version stored since (a race between
        eviction or the start-up check and a replace)."""
        ds = make_dataset(study="13.1", series="13.1.1", sop="13.1.1.1")
        self.store(self.archive, ds)
        old = self.archive.index.lookup("13.1.1.1")
        self.store(self.archive, ds)  # replaced: a new file
        self.assertFalse(self.archive.index.delete_instance("13.1.1.1", old.path))
        self.assertEqual(self.archive.index.counts()[3], 1)
        self.assertEqual(self.archive.index.delete_instances([old]), 0)
        self.assertEqual(self.archive.index.counts()[3], 1)

    def test_reconcile_goes_on_past_a_misfiled_object(self):
        """At start-up a file whose series belongs to another study is quarantined and named in the log; the
        other files are indexed again."""
        self.store(self.archive, make_dataset(study="14.1", series="14.1.1", sop="14.1.1.1"))
        self.store(self.archive, make_dataset(study="14.2", series="14.2.1", sop="14.2.1.1"))
        # a file of study 14.3 naming 14.1's series, and a good file, both without rows
        odd, _ = self.receive(self.archive, make_dataset(study="14.3", series="14.1.1", sop="14.3.1.1"))
        relative = self.archive.store.relative_path_for("14.3", "14.1.1", "14.3.1.1")
        self.archive.store.install(odd.temp, relative)
        lost = self.archive.index.lookup("14.2.1.1")
        self.archive.index.delete_instance("14.2.1.1")
        result = _reconcile(self.archive.store, self.archive.index_path, started_before=float("inf"))
        self.assertEqual(result.reindexed, [lost.path])
        self.assertEqual(len(result.quarantined), 1)
        self.assertIn("belongs to study 14.1", result.failed[0])
        self.assertEqual(self.archive.index.counts()[3], 2)

    def test_path_outside_archive_refused(self):
        """An index path that escapes the archive is refused, never opened or removed."""
        with self.assertRaises(ValueError):
            self.archive.store.absolute("objects/../../etc/passwd")
        with self.assertRaises(ValueError):
            self.archive.store.remove("/etc/passwd")


class IndexReopenTests(SynchronousTestCase):
    """The index persists and refuses other schema versions."""

    def test_reopen_keeps_rows(self):
        """Rows committed are there after the database is closed and opened again."""
        path = os.path.join(self.mktemp(), "index.sqlite")
        index = ArchiveIndex(path)
        from appliance.dataset.metadata import extract

        index.add(extract(make_dataset(sop="7.1")), "objects/x.dcm", 10, EXPLICIT_LE, "SCU", 1.0)
        index.close()
        again = ArchiveIndex(path)
        self.addCleanup(again.close)
        self.assertEqual(again.lookup("7.1").size, 10)

    def test_other_schema_version_refused(self):
        """An index from another schema version stops start-up with a message naming the file."""
        path = os.path.join(self.mktemp(), "index.sqlite")
        index = ArchiveIndex(path)
        index.db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
        index.close()
        with self.assertRaises(RuntimeError) as raised:
            ArchiveIndex(path)
        self.assertIn(path, str(raised.exception))


class PatientIdentityTests(SynchronousTestCase):
    """Which objects the index files under one patient."""

    def setUp(self):
        self.index = ArchiveIndex(os.path.join(self.mktemp(), "index.sqlite"))
        self.addCleanup(self.index.close)

    def add(self, **values):
        from appliance.dataset.metadata import extract

        ds = make_dataset(**values)
        self.index.add(extract(ds), f"objects/{values['sop']}.dcm", 10, EXPLICIT_LE, "SCU", 1.0)

    def test_same_patient_id_is_one_patient(self):
        """Two studies with the same Patient ID (and no issuer) share one patient."""
        self.add(patient_id="P1", patient="Doe^Jane", study="1.1", series="1.1.1", sop="1.1.1.1")
        self.add(patient_id="P1", patient="Doe^Jane", study="1.2", series="1.2.1", sop="1.2.1.1")
        self.assertEqual(self.index.counts()[:2], (1, 2))

    def test_studies_without_patient_id_are_not_merged(self):
        """Studies without a Patient ID each keep their own patient and name."""
        self.add(patient_id="", patient="First^Anonymous", study="2.1", series="2.1.1", sop="2.1.1.1")
        self.add(patient_id="", patient="Second^Anonymous", study="2.2", series="2.2.1", sop="2.2.1.1")
        self.assertEqual(self.index.counts()[:2], (2, 2))
        names = sorted(study.patient_name for study in self.index.studies())
        self.assertEqual(names, ["First^Anonymous", "Second^Anonymous"])


class InstallRaceTests(SynchronousTestCase):
    """Issue 9: a removal pruning the target directory between makedirs and the rename (another thread) no longer
    makes the store fail (a spurious A700)."""

    def test_directory_pruned_between_makedirs_and_rename(self):
        from appliance.archive import store as store_module
        from appliance.archive.store import ObjectStore

        store = ObjectStore(self.mktemp())
        temp = store.open_temp([b"x" * 10])
        store.seal(temp)
        relative = store.relative_path_for("1.2", "1.2.3", "1.2.3.4")
        directory = os.path.dirname(store.absolute(relative))
        real_makedirs = os.makedirs
        calls = []

        def racing_makedirs(path, *args, **kwargs):
            real_makedirs(path, *args, **kwargs)
            if path == directory:
                calls.append(path)
                if len(calls) == 1:
                    os.rmdir(directory)  # what remove() of its last other file does, from another thread

        self.patch(store_module.os, "makedirs", racing_makedirs)
        store.install(temp, relative)
        with open(store.absolute(relative), "rb") as handle:
            self.assertEqual(handle.read(), b"x" * 10)
        self.assertEqual(calls, [directory, directory])
        self.assertEqual(store.leftovers(), [])

    def test_directory_pruned_with_named_temporary_files(self):
        """The same where temporary files are named (renamed into place, not linked)."""
        self.patch(store_module, "unnamed_files_work", lambda directory: False)
        self.test_directory_pruned_between_makedirs_and_rename()


class UnnamedTemporaryFileTests(SynchronousTestCase):
    """Where the file system has them (O_TMPFILE), a temporary file has no name: linked into place once whole
    and fsynced, gone with its descriptor otherwise; none is ever seen in tmp/."""

    def setUp(self):
        self.store = store_module.ObjectStore(self.mktemp())
        self.addCleanup(self.store.close)
        if not self.store.unnamed:
            raise SkipTest("this file system has no unnamed files (O_TMPFILE)")

    def held(self):
        return _unnamed_in(self.store.tmp)

    def test_placed(self):
        temp = self.store.open_temp([b"one", b"two"])
        self.assertEqual(os.listdir(self.store.tmp), [])
        self.assertEqual(self.held(), [os.path.basename(temp.path)])
        self.assertEqual(self.store.leftovers(), [temp.path])
        self.store.seal(temp)
        with open(temp.path, "rb") as handle:  # read back through /proc while it has no name
            self.assertEqual(handle.read(), b"onetwo")
        relative = self.store.relative_path_for("1.2", "1.2.3", "1.2.3.4")
        self.store.install(temp, relative)
        with open(self.store.absolute(relative), "rb") as handle:
            self.assertEqual(handle.read(), b"onetwo")
        self.assertEqual(os.stat(self.store.absolute(relative)).st_nlink, 1)
        self.assertEqual((self.held(), self.store.leftovers(), os.listdir(self.store.tmp)), ([], [], []))

    def test_discarded_or_abandoned(self):
        """A file discarded, or one whose process ends before it is placed (its descriptor closed), leaves
        nothing; discarding twice is harmless."""
        discarded = self.store.open_temp([b"refused"])
        self.store.discard(discarded)
        self.store.discard(discarded)
        abandoned = self.store.open_temp([b"cut short"])
        self.store.seal(abandoned)
        abandoned.handle.close()  # what the end of the process does
        self.assertEqual(self.held(), [])
        self.assertEqual(os.listdir(self.store.tmp), [])
        self.assertEqual(list(self.store.stored_files()), [])

    def test_a_taken_name_is_not_overwritten(self):
        """Linking never replaces a file (unlike a rename): a name already taken fails the object, not the
        file that has it."""
        first = self.store.open_temp([b"first"])
        self.store.seal(first)
        relative = self.store.relative_path_for("1.2", "1.2.3", "1.2.3.4")
        self.store.install(first, relative)
        second = self.store.open_temp([b"second"])
        self.store.seal(second)
        self.assertRaises(FileExistsError, self.store.place, second, relative)
        self.store.discard(second)
        with open(self.store.absolute(relative), "rb") as handle:
            self.assertEqual(handle.read(), b"first")
        self.assertEqual(self.held(), [])

    def named_instead(self):
        """Another store made now has named temporary files, which work as they should."""
        store = store_module.ObjectStore(self.mktemp())
        self.addCleanup(store.close)
        self.assertFalse(store.unnamed)
        self.assertEqual(os.listdir(store.tmp), [])  # the probe left nothing
        temp = store.open_temp([b"named"])
        self.assertEqual(store.leftovers(), [os.path.basename(temp.path)])
        store.seal(temp)
        relative = store.relative_path_for("1.2", "1.2.3", "1.2.3.4")
        store.install(temp, relative)
        self.assertEqual((store.leftovers(), os.listdir(store.tmp)), ([], []))
        with open(store.absolute(relative), "rb") as handle:
            self.assertEqual(handle.read(), b"named")

    def test_without_o_tmpfile_named_files(self):
        """O_TMPFILE refused (a file system without it, an old kernel): named temporary files in tmp/."""
        real_open = os.open

        def no_tmpfile(path, flags, *args, **kwargs):
            if flags & store_module._O_TMPFILE == store_module._O_TMPFILE:
                raise OSError(95, "Operation not supported")
            return real_open(path, flags, *args, **kwargs)

        self.patch(store_module.os, "open", no_tmpfile)
        self.named_instead()

    def test_without_proc_named_files(self):
        """/proc not there to link an unnamed file through: named temporary files in tmp/."""
        real_link = os.link

        def no_proc(source, *args, **kwargs):
            if source.startswith("/proc/self/fd/"):
                raise FileNotFoundError(2, "No such file or directory")
            return real_link(source, *args, **kwargs)

        self.patch(store_module.os, "link", no_proc)
        self.named_instead()


class DirectoryHandleTests(SynchronousTestCase):
    """The handles kept of the directories objects are placed in: a directory placed in again is neither looked
    for nor opened again, and one pruned and made again under the same name is synced through a handle of the new
    one, never of the old."""

    def setUp(self):
        self.store = store_module.ObjectStore(self.mktemp())
        self.addCleanup(self.store.close)
        self.opened = []
        self.synced = []  # (directory, inode of the directory the handle is open on)
        open_directory, fsync_handle = store_module._open_directory, store_module._fsync_handle
        self.patch(store_module, "_open_directory", lambda path: (self.opened.append(path), open_directory(path))[1])
        self.patch(store_module, "_fsync_handle", lambda fd, path: (self.synced.append((path, os.fstat(fd).st_ino)),
                                                                    fsync_handle(fd, path))[1])

    def install(self, sop, series="1.2.3"):
        temp = self.store.open_temp([sop.encode() * 10])
        self.store.seal(temp)
        relative = self.store.relative_path_for("1.2", series, sop)
        self.store.install(temp, relative)
        return relative

    def test_a_directory_placed_in_again_is_neither_looked_for_nor_opened_again(self):
        first = self.install("1.2.3.1")
        directory = os.path.dirname(self.store.absolute(first))
        looked = []
        real_isdir, real_makedirs = os.path.isdir, os.makedirs
        self.patch(store_module.os.path, "isdir", lambda path: (looked.append(path), real_isdir(path))[1])
        self.patch(store_module.os, "makedirs", lambda path, **kw: (looked.append(path), real_makedirs(path, **kw)))
        opened = len(self.opened)
        second = self.install("1.2.3.2")
        self.assertEqual(looked, [])
        self.assertEqual(len(self.opened), opened)
        self.assertEqual(self.synced[-1], (directory, os.stat(directory).st_ino))
        with open(self.store.absolute(second), "rb") as handle:
            self.assertEqual(handle.read(), b"1.2.3.2" * 10)

    def test_a_directory_pruned_and_made_again_is_synced_through_a_new_handle(self):
        first = self.install("1.2.3.1")
        directory = os.path.dirname(self.store.absolute(first))
        study = os.path.dirname(directory)
        old_inode = os.stat(directory).st_ino
        self.assertTrue(self.store.remove(first))  # its last object: the series and study directories pruned
        self.assertFalse(os.path.exists(study))
        # a directory in the way keeps the new one from getting the old one's inode number back
        os.makedirs(os.path.join(self.store.objects, "in-the-way"))
        self.synced.clear()
        self.install("1.2.3.2")
        self.assertNotEqual(os.stat(directory).st_ino, old_inode)
        synced = dict(self.synced)
        # the new series directory and the study directory made for it, each through a handle of what is there
        self.assertEqual(synced[directory], os.stat(directory).st_ino)
        self.assertEqual(synced[study], os.stat(study).st_ino)
        self.assertEqual(synced[os.path.dirname(study)], os.stat(os.path.dirname(study)).st_ino)

    def test_a_directory_pruned_meanwhile_is_made_again(self):
        """The rename into a directory whose handle is kept finds it gone (pruned by another thread): it is made
        again and synced through a new handle."""
        first = self.install("1.2.3.1")
        directory = os.path.dirname(self.store.absolute(first))
        os.unlink(self.store.absolute(first))
        os.rmdir(directory)  # what remove() of its last file does, from another thread
        second = self.install("1.2.3.2")
        self.assertEqual(self.synced[-2][0], directory)
        self.assertEqual(self.synced[-2][1], os.stat(directory).st_ino)
        self.assertTrue(os.path.exists(self.store.absolute(second)))

    def test_a_directory_made_again_by_another_process_is_synced_as_it_is_now(self):
        """The install helper (another process) may prune and make a directory again whose handle this one keeps:
        the kept handle, of a directory without a name any more, is not the one synced."""
        first = self.install("1.2.3.1")
        directory = os.path.dirname(self.store.absolute(first))
        os.unlink(self.store.absolute(first))
        os.rmdir(directory)
        os.makedirs(directory)  # as another process would, unknown to this store
        self.synced.clear()
        self.install("1.2.3.2")
        self.assertEqual(self.synced, [(directory, os.stat(directory).st_ino)])

    def test_handles_are_bounded_and_closed(self):
        handles = store_module.DirectoryHandles(size=2)
        directories = [self.mktemp() for _ in range(3)]
        for directory in directories:
            os.makedirs(directory)
        before = len(os.listdir("/proc/self/fd"))
        for directory in directories + [directories[1]]:
            handles.sync(directory)
        self.assertEqual([d in handles for d in directories], [False, True, True])
        self.assertEqual(len(os.listdir("/proc/self/fd")), before + 2)
        handles.close()
        self.assertEqual([d in handles for d in directories], [False, False, False])
        self.assertEqual(len(os.listdir("/proc/self/fd")), before)

    def test_a_failing_fsync_forgets_the_handle(self):
        directory = self.mktemp()
        os.makedirs(directory)
        handles = store_module.DirectoryHandles()
        self.addCleanup(handles.close)

        def failing(fd, path):
            raise OSError(5, "Input/output error")

        self.patch(store_module, "_fsync_handle", failing)
        self.assertRaises(OSError, handles.sync, directory)
        self.assertNotIn(directory, handles)


class HeldRunner:
    """A database runner that holds its calls until the test runs them (in order), so that commits pile up into
    groups as they do while a group is being installed."""

    def __init__(self):
        self.calls = []

    def __call__(self, function, *args, **kwargs):
        done = defer.Deferred()
        self.calls.append((function, args, kwargs, done))
        return done

    def run_one(self):
        function, args, kwargs, done = self.calls.pop(0)
        defer.maybeDeferred(function, *args, **kwargs).chainDeferred(done)

    def run_all(self):
        while self.calls:
            self.run_one()


class GroupCommitTests(SynchronousTestCase):
    """Objects ready at the same time are installed together: each written and fsynced, one fsync per directory,
    one index transaction; one object's failure is its own."""

    def setUp(self):
        self.root = self.mktemp()
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.db = HeldRunner()
        self.groups = []
        self.synced = []

    def make_archive(self, on_duplicate="replace"):
        archive = Archive(self.root, StorageLimits(min_free_space=0), on_duplicate, self.clock, synchronous_runner,
                          self.db)
        self.addCleanup(archive.close)
        install_group = archive._install_group

        def recording(group, *others):
            self.groups.append([obj.metadata.sop_instance_uid for obj, _ in group])
            return install_group(group, *others)

        archive._installs.work = recording
        fsync = store_module._fsync_handle
        self.patch(store_module, "_fsync_handle", lambda fd, directory: (self.synced.append(directory),
                                                                         fsync(fd, directory))[1])
        return archive

    def unsealed(self, ds):
        """An object as the sink hands over one it held in memory: checked, written as it is installed."""
        data = encode_dataset(ds, EXPLICIT_LE)
        header = part10_header(ds.SOPClassUID, ds.SOPInstanceUID, EXPLICIT_LE, IMPLEMENTATION_CLASS_UID, "T", "SCU")
        metadata, _ = inspect_memory(data, 0, ds.SOPClassUID, ds.SOPInstanceUID, EXPLICIT_LE)
        return StoredObject(None, metadata, EXPLICIT_LE, "SCU", seal=partial(_write_sealed, header, data),
                            size=len(header) + len(data))

    def commit_all(self, archive, objects):
        """Commit every object at once (the first runs alone, the others wait and go as one group)."""
        results = [defer.ensureDeferred(archive.commit(obj)) for obj in objects]
        self.db.run_all()
        return results

    def stored_files(self, archive):
        return sorted(name for _, _, files in os.walk(archive.store.objects) for name in files)

    def test_objects_ready_together_are_installed_together(self):
        """Five objects in two series: the first alone, the four that waited as one group, each directory fsynced
        once for it, one index transaction; all stored, written from memory, no temporary file left."""
        archive = self.make_archive()
        transactions = []
        add_group = archive.index.add_group
        self.patch(archive.index, "add_group", lambda rows, now: (transactions.append(len(rows)),
                                                                  add_group(rows, now))[1])
        objects = [self.unsealed(make_dataset(study="20.1", series=f"20.1.{n % 2}", sop=f"20.1.9.{n}"))
                   for n in range(5)]
        results = [defer.ensureDeferred(archive.commit(obj)) for obj in objects]
        self.db.run_one()  # the first object, alone
        first_group = list(self.synced)
        self.db.run_one()  # the four that waited for it
        self.assertEqual([self.successResultOf(r) for r in results], [StoreOutcome.STORED] * 5)
        self.assertEqual(self.groups, [["20.1.9.0"], ["20.1.9.1", "20.1.9.2", "20.1.9.3", "20.1.9.4"]])
        self.assertEqual(transactions, [1, 4])
        second = self.synced[len(first_group):]
        study = os.path.join(archive.store.objects, uid_hash("20.1")[:2], uid_hash("20.1")[:40])
        # the new series' directory and the study's (which gained it), and the first series' directory: once each
        self.assertEqual(sorted(second), sorted([study, os.path.join(study, uid_hash("20.1.0")[:40]),
                                                 os.path.join(study, uid_hash("20.1.1")[:40])]))
        self.assertEqual(archive.index.counts(), (1, 1, 2, 5))
        self.assertEqual(len(self.stored_files(archive)), 5)
        self.assertEqual(archive.store.leftovers(), [])
        self.assertEqual(archive.size, sum(os.path.getsize(archive.store.absolute(row.path))
                                           for row in archive.index.all_instances()))
        row = archive.index.lookup("20.1.9.3")
        self.assertEqual(dcmread(archive.store.absolute(row.path)).SOPInstanceUID, "20.1.9.3")

    def test_a_misfiled_object_fails_alone(self):
        """In a group, an object naming another study's series is rolled back alone (its savepoint): the others
        are stored, its file removed."""
        archive = self.make_archive()
        self.commit_all(archive, [self.unsealed(make_dataset(study="21.1", series="21.1.1", sop="21.1.1.1"))])
        objects = [self.unsealed(make_dataset(study="21.1", series="21.1.1", sop="21.1.1.2")),
                   self.unsealed(make_dataset(study="21.1", series="21.1.1", sop="21.1.1.3")),
                   self.unsealed(make_dataset(study="21.2", series="21.1.1", sop="21.2.1.1")),
                   self.unsealed(make_dataset(study="21.1", series="21.1.1", sop="21.1.1.4"))]
        results = self.commit_all(archive, objects)
        self.assertEqual(self.groups[-1], ["21.1.1.3", "21.2.1.1", "21.1.1.4"])
        self.assertEqual(self.successResultOf(results[1]), StoreOutcome.STORED)
        self.assertEqual(str(self.failureResultOf(results[2], Misfiled).value), "series 21.1.1 belongs to study 21.1")
        self.assertEqual(self.successResultOf(results[3]), StoreOutcome.STORED)
        self.assertEqual(archive.index.counts(), (1, 1, 1, 4))
        self.assertEqual(len(self.stored_files(archive)), 4)
        self.assertEqual(archive.store.leftovers(), [])

    def test_duplicates_within_a_group(self):
        """The same SOP instance twice in one group: replace keeps the later, keep the earlier, reject refuses the
        later, as if they had come one after the other."""
        for policy, second in (("replace", StoreOutcome.REPLACED), ("keep", StoreOutcome.KEPT_EXISTING),
                               ("reject", None)):
            self.root = self.mktemp()
            archive = self.make_archive(on_duplicate=policy)
            first_ds = make_dataset(study="22.1", series="22.1.1", sop="22.1.1.1", patient="First^Version")
            second_ds = make_dataset(study="22.1", series="22.1.1", sop="22.1.1.1", patient="Second^Version")
            opener = self.unsealed(make_dataset(study="22.9", series="22.9.1", sop="22.9.1.1"))
            results = self.commit_all(archive, [opener, self.unsealed(first_ds), self.unsealed(second_ds)])
            self.assertEqual(self.successResultOf(results[1]), StoreOutcome.STORED, policy)
            if second is None:
                self.failureResultOf(results[2], Duplicate)
            else:
                self.assertEqual(self.successResultOf(results[2]), second, policy)
            path = archive.store.absolute(archive.index.lookup("22.1.1.1").path)
            expected = "First^Version" if policy in ("keep", "reject") else "Second^Version"
            self.assertEqual(str(dcmread(path).PatientName), expected, policy)
            self.assertEqual(len(self.stored_files(archive)), 2, policy)
            self.assertEqual(archive.store.leftovers(), [], policy)

    def test_an_object_that_cannot_be_written_fails_alone(self):
        """A write failing (the disk full) fails its object with the OSError; the group's others are stored."""
        archive = self.make_archive()
        broken = self.unsealed(make_dataset(study="23.1", series="23.1.1", sop="23.1.1.2"))

        def full(store):
            raise OSError(28, "No space left on device")

        broken.seal = full
        objects = [self.unsealed(make_dataset(study="23.1", series="23.1.1", sop="23.1.1.1")), broken,
                   self.unsealed(make_dataset(study="23.1", series="23.1.1", sop="23.1.1.3"))]
        results = self.commit_all(archive, objects)
        self.assertEqual(self.failureResultOf(results[1], OSError).value.errno, 28)
        self.assertEqual([self.successResultOf(results[n]) for n in (0, 2)], [StoreOutcome.STORED] * 2)
        self.assertEqual(archive.index.counts()[3], 2)

    def test_index_failure_fails_the_whole_group(self):
        """If the group's transaction cannot commit, none of its objects is stored and none of their files stays."""
        archive = self.make_archive()
        self.commit_all(archive, [self.unsealed(make_dataset(study="24.1", series="24.1.1", sop="24.1.1.1"))])

        def failing(rows, now):
            raise sqlite3.OperationalError("database or disk is full")

        self.patch(archive.index, "add_group", failing)
        objects = [self.unsealed(make_dataset(study="24.1", series="24.1.1", sop=f"24.1.1.{n}")) for n in (2, 3, 4)]
        results = self.commit_all(archive, objects)
        for result in results:
            self.failureResultOf(result, sqlite3.OperationalError)
        self.assertEqual(archive.index.counts()[3], 1)
        self.assertEqual(len(self.stored_files(archive)), 1)
        self.assertEqual(archive.store.leftovers(), [])

    def test_room_made_for_objects_on_their_way(self):
        """The free space an object is checked against counts the objects still on their way (not written yet)
        as taken: with room for two, the third of three arriving together is refused (auto_delete off)."""
        archive = Archive(self.root, StorageLimits(min_free_space=1, auto_delete=False), "replace", self.clock,
                          synchronous_runner, self.db)
        self.addCleanup(archive.close)
        objects = [self.unsealed(make_dataset(study="25.1", series="25.1.1", sop=f"25.1.1.{n}")) for n in range(4)]
        size = objects[0].size
        free = [10 * size]
        # the file system's free space: what it was, less what the archive stored since
        self.patch(archive.store, "free_space", lambda: free[0] - archive.size)
        self.commit_all(archive, objects[:1])  # the archive now knows the free space after a group
        free[0] = int(2.5 * size) + archive.size
        archive._free_space = int(2.5 * size)
        results = [defer.ensureDeferred(archive.commit(obj)) for obj in objects[1:]]
        self.db.run_all()
        self.assertEqual([self.successResultOf(r) for r in results[:2]], [StoreOutcome.STORED] * 2)
        self.assertIn("auto_delete is off", str(self.failureResultOf(results[2], OutOfResources).value))


def _unnamed_in(directory: str) -> List[str]:
    """The unnamed files made in ``directory`` that this process holds open, as /proc/self/fd names them (what the
    kernel says, not what the store counts)."""
    found, directory = [], os.path.realpath(directory)
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith(directory + "/#") and target.endswith(" (deleted)"):
            found.append(name)
    return sorted(found, key=int)


class SpareFileTests(SynchronousTestCase):
    """Temporary files made ahead of need: an object being installed takes one instead of creating its file.  Here
    unnamed ones (O_TMPFILE, where the file system has them); :class:`NamedSpareFileTests`: named ones in tmp/."""

    unnamed = True

    def setUp(self):
        probe = self.mktemp()
        os.makedirs(probe)
        if self.unnamed and not store_module.unnamed_files_work(probe):
            raise SkipTest("this file system has no unnamed files (O_TMPFILE)")
        if not self.unnamed:
            self.patch(store_module, "unnamed_files_work", lambda directory: False)

    def files(self, store) -> List[str]:
        """The temporary files that exist, sorted: names in tmp/, or the descriptors of the unnamed ones held
        open."""
        names = sorted(os.listdir(store.tmp))
        if self.unnamed:
            self.assertEqual(names, [])  # an unnamed file never has a name in tmp/
            return sorted(_unnamed_in(store.tmp))
        return names

    @staticmethod
    def ids(*temps) -> List[str]:
        """The temporary files as :meth:`files` names them."""
        return sorted(os.path.basename(temp.path) for temp in temps)

    def test_spares_made_taken_and_discarded(self):
        from appliance.archive.store import ObjectStore

        store = ObjectStore(self.mktemp(), spares=3)
        self.assertEqual(store.unnamed, self.unnamed)
        self.assertTrue(store.needs_spares)
        self.assertEqual(store.make_spares(), 3)
        self.assertEqual(store.make_spares(), 0)
        spares = self.files(store)
        self.assertEqual(len(spares), 3)
        temp = store.open_temp([b"data"])
        self.assertIn(os.path.basename(temp.path), spares)  # no new file: a spare
        self.assertEqual(self.files(store), spares)
        store.seal(temp)
        with open(temp.path, "rb") as handle:
            self.assertEqual(handle.read(), b"data")
        self.assertFalse(store.needs_spares)  # made again once half of them were taken
        second = store.open_temp([b"two"])
        self.assertTrue(store.needs_spares)
        self.assertEqual(store.make_spares(), 2)
        store.discard_spares()
        self.assertEqual(self.files(store), self.ids(temp, second))
        self.assertEqual(sorted(os.path.basename(path) for path in store.leftovers()), self.ids(temp, second))
        other = store.open_temp([b"more"])  # none left: made at once
        self.assertEqual(self.files(store), self.ids(temp, second, other))
        for made in (temp, second, other):
            store.discard(made)
        self.assertEqual(self.files(store), [])
        self.assertEqual(store.leftovers(), [])

    def test_spares_that_cannot_be_made(self):
        """Making spares failing (no inode left, say) is one warning however often it fails again, the files are
        created as objects need them, the next commit tries again, and the first success says so."""
        from twisted.logger import formatEvent

        from .support import capture_log

        clock = Clock()
        archive = Archive(self.mktemp(), StorageLimits(min_free_space=0), "replace", clock, synchronous_runner,
                          synchronous_runner)
        self.addCleanup(archive.close)
        events = capture_log(self, "info")
        attempts = []

        def failing():
            attempts.append(1)
            raise OSError(28, "No space left on device")

        self.patch(archive.store, "make_spares", failing)
        archive.prepare()
        archive.prepare()
        archive.prepare()
        self.assertEqual(len(attempts), 3)  # not stuck as "being made"
        said = [formatEvent(e) for e in events if "spare" in formatEvent(e)]
        self.assertEqual(said, ["making spare temporary files failed: [Errno 28] No space left on device; not said "
                                "again until it works"])
        self.patch(archive.store, "make_spares", lambda: 4)
        archive.prepare()
        archive.prepare()
        self.patch(archive.store, "make_spares", failing)
        archive.prepare()
        said = [formatEvent(e) for e in events if "spare" in formatEvent(e)]
        self.assertEqual(said[1:], ["making spare temporary files works again",
                                    "making spare temporary files failed: [Errno 28] No space left on device; not "
                                    "said again until it works"])
        temp = archive.store.open_temp([b"x"])  # none spare: made at once
        self.assertEqual(self.files(archive.store), [os.path.basename(temp.path)])
        archive.store.discard(temp)
        self.assertEqual(self.files(archive.store), [])

    def test_archive_keeps_spares_made(self):
        """After each commit the archive tops the spares up (an I/O job); closing removes them; spares a crash
        left behind are named temporary files the start-up check removes (unnamed ones go with the process)."""
        root = self.mktemp()
        clock = Clock()
        clock.advance(1_000_000)
        archive = Archive(root, StorageLimits(min_free_space=0), "replace", clock, synchronous_runner,
                          synchronous_runner)
        archive.prepare()
        self.assertEqual(len(self.files(archive.store)), archive.store.spares_wanted)
        for number in range(archive.store.spares_wanted // 2):
            ds = make_dataset(sop=f"30.{number}")
            data = encode_dataset(ds, EXPLICIT_LE)
            header = part10_header(ds.SOPClassUID, ds.SOPInstanceUID, EXPLICIT_LE, IMPLEMENTATION_CLASS_UID, "T",
                                   "SCU")
            metadata, _ = inspect_memory(data, 0, ds.SOPClassUID, ds.SOPInstanceUID, EXPLICIT_LE)
            stored = StoredObject(None, metadata, EXPLICIT_LE, "SCU", seal=partial(_write_sealed, header, data),
                                  size=len(header) + len(data))
            self.assertEqual(self.successResultOf(defer.ensureDeferred(archive.commit(stored))),
                             StoreOutcome.STORED)
        self.assertEqual(len(self.files(archive.store)), archive.store.spares_wanted)  # taken, made again
        self.assertEqual(archive.store.leftovers(), [])
        left = [] if self.unnamed else self.files(archive.store)
        for spare in archive.store._spares:  # as if the process had been killed: its descriptors closed
            if self.unnamed:
                spare.handle.close()
        archive.store._spares.clear()
        archive.close()
        self.assertEqual(self.files(archive.store), left)
        clock.advance(time.time() + 60 - clock.seconds())  # a restart, later than those files were made
        again = Archive(root, StorageLimits(min_free_space=0), "replace", clock, synchronous_runner,
                        synchronous_runner)
        result = self.successResultOf(again.reconcile())
        self.assertEqual(sorted(result.temps), left)
        self.assertEqual(os.listdir(again.store.tmp), [])
        again.prepare()
        again.close()
        self.assertEqual(self.files(again.store), [])


class NamedSpareFileTests(SpareFileTests):
    """:class:`SpareFileTests` on a file system without unnamed files: named ones in tmp/."""

    unnamed = False
