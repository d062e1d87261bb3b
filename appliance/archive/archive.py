"""The archive as the Disk-Server sees it: asynchronous, never blocking the reactor.

File work runs on an I/O thread pool; index work on one database thread,
which also installs each object into place so that commits are serialised.
Every method returns a Deferred (or is a coroutine), and all bookkeeping
(archive size, pinned studies) lives in the reactor thread.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from itertools import islice
from typing import Callable, Dict, List, Optional, Tuple

from pydicom import dcmread
from pydicom.filereader import read_file_meta_info
from twisted.internet import defer

from ..dataset.deflate import DEFLATED, InflateLimits, read_deflated
from ..dataset.metadata import ObjectMetadata, extract
from ..logs import logger
from .eviction import StorageLimits, plan, shortfall
from .groups import GroupRunner
from .index import ArchiveIndex, InstanceRow, Misfiled, Upgrade
from .helper import HelperUnavailable, InstallHelper
from .install import Duplicate, HelperFailed, Installer, StoredObject, StoreOutcome
from .patients import Conflict
from .store import ObjectStore, TempObject, data_set_offset

__all__ = ["Archive", "OutOfResources", "Duplicate", "HelperFailed", "Misfiled", "StoredObject", "StoreOutcome",
           "Runner"]

#: ``runner(f, *args, **kwargs) -> Deferred``: where blocking work runs.
Runner = Callable[..., defer.Deferred]

_log = logger("appliance.archive")

#: Empty temporary files kept made ahead of need (:meth:`ObjectStore.make_spares`): one per object being installed
#: at once, roughly.
SPARE_FILES = 4


class OutOfResources(Exception):
    """No room for the object (A700)."""


@dataclass
class _Pins:
    counts: Dict[str, int] = field(default_factory=dict)

    def add(self, uid: str) -> None:
        self.counts[uid] = self.counts.get(uid, 0) + 1

    def remove(self, uid: str) -> None:
        left = self.counts.get(uid, 0) - 1
        if left > 0:
            self.counts[uid] = left
        else:
            self.counts.pop(uid, None)

    def __contains__(self, uid: str) -> bool:
        return uid in self.counts


class Archive:
    """The filesystem archive and its index, with storage management."""

    def __init__(
        self,
        root: str,
        limits: StorageLimits,
        on_duplicate: str,
        clock,
        io: Runner,
        db: Runner,
        inflate_limits: InflateLimits = InflateLimits(),
        helper: Optional[InstallHelper] = None,
    ) -> None:
        if on_duplicate not in ("replace", "keep", "reject"):
            raise ValueError(f"on_duplicate must be replace, keep or reject, not {on_duplicate!r}")
        self.root = root
        self.limits = limits
        self.on_duplicate = on_duplicate
        self.clock = clock
        self.io = io
        self.db = db
        self.inflate_limits = inflate_limits
        self.store = ObjectStore(root, spares=SPARE_FILES)
        self.index_path = os.path.join(root, "index.sqlite")
        self.index = ArchiveIndex(self.index_path, read_object=self._read_indexed)
        if self.index.upgrade is not None:
            _log_upgrade(self.index_path, self.index.upgrade)
        self.size = self.index.total_size()
        self.pins = _Pins()
        #: studies being deleted or evicted right now: a retrieve that pins one too late skips it
        self.deleting = _Pins()
        self.started_at = clock.seconds()
        #: what installs each group (:mod:`.install`), on the database thread; groups of several objects held in
        #: memory go to ``helper`` instead, if there is one (:class:`.helper.InstallHelper`, a process of its own)
        self.installer = Installer(self.store, self.index, on_duplicate)
        self.helper = helper
        #: objects ready to be installed, in groups on the database thread (:meth:`_install_group`)
        # (whether the archive has other objects in hand is read here, on the reactor, as each group starts)
        self._installs = GroupRunner(lambda work, group: db(work, group, self.in_hand > len(group)),
                                     self._install_group)
        #: objects in hand: received or being received, not answered yet (their writers, :mod:`.sink`); more than
        #: a group holds: other associations are storing at the same time
        self.in_hand = 0
        #: free space on the archive's file system after the last group was installed (None: not known yet), and
        #: the bytes of the objects on their way into it since
        self._free_space: Optional[int] = None
        self._incoming = 0
        self._making_spares = False
        self._spares_failing = False  # the last attempt failed (said once, until one succeeds)

    def close(self) -> None:
        """Database thread: stop the install helper, remove the spare files, close the index."""
        if self.helper is not None:
            self.helper.stop()
        self.store.close()
        self.index.close()

    def _read_indexed(self, relative: str) -> Optional[ObjectMetadata]:
        """An indexed object's attributes from its file (upgrading the index), None if it cannot be read."""
        try:
            return read_object(self.store.absolute(relative), self.inflate_limits, self.store.tmp)[0]
        except Exception:  # a missing or unreadable file: the upgrade keeps the indexed values
            return None

    # --- pins: studies being written or retrieved are never evicted ----------------

    def pin(self, study_uid: str) -> None:
        self.pins.add(study_uid)

    def unpin(self, study_uid: str) -> None:
        self.pins.remove(study_uid)

    def being_deleted(self, study_uid: str) -> bool:
        """Whether the study is being deleted (a pin taken now does not stop that)."""
        return study_uid in self.deleting

    # --- receiving ----------------------------------------------------------------

    def open_temp(self) -> defer.Deferred:
        return self.io(self.store.open_temp)

    def write(self, temp: TempObject, chunks: List[bytes]) -> defer.Deferred:
        """Append the chunks of an object still arriving, and start writing them to disk."""
        return self.io(self.store.write, temp, chunks, True)

    def discard(self, temp: TempObject) -> defer.Deferred:
        return self.io(self.store.discard, temp)

    async def commit(self, obj: StoredObject) -> StoreOutcome:
        """Make room if needed, install the file, index it; only then is the object stored.

        Objects that become ready while others are being installed are
        installed together (:meth:`_install_group`: written and fsynced one
        after the other, then one fsync per directory and one index
        transaction for all; several held in memory by the install helper).  Raises :class:`OutOfResources`,
        :class:`Duplicate` or :class:`Misfiled`; the temporary file is gone
        whatever happens.
        """
        study_uid = obj.metadata.study_instance_uid
        incoming = obj.file_size
        self.pin(study_uid)
        try:
            if obj.temp is not None:  # written already: the free space was measured with it on disk
                free = None if obj.free_space is None else obj.free_space + incoming
            else:  # as the last group left it, less what is on its way
                free = None if self._free_space is None else self._free_space - self._incoming
            await self._make_room(incoming, free, obj.temp is not None)
            self._incoming += incoming
            try:
                outcome, previous, size_delta, conflicts, self._free_space = await self._installs.submit(
                    (obj, self.clock.seconds()))
            except HelperFailed:
                # the helper may have installed some of its group before it ended: count the archive again
                self.size = await self.db(self.index.total_size)
                raise
            finally:
                self._incoming -= incoming
        except BaseException:
            leftover = obj.temp or obj.partial
            if leftover is not None:
                await self.io(self.store.discard, leftover)
            raise
        finally:
            self.unpin(study_uid)
        self.size += size_delta
        log_conflicts(conflicts)
        self.prepare()
        if previous is not None:
            await self.io(self.store.remove, previous.path)
        return outcome

    def prepare(self) -> None:
        """Make spare temporary files on an I/O thread once half of them were taken (one such job at a time).
        A failure is said once, and again only after an attempt succeeded (a full or failing disk would otherwise
        add a line to every store, whose own refusal says it already)."""
        if self._making_spares or not self.store.needs_spares:
            return
        self._making_spares = True

        def made(count):
            self._making_spares = False
            if self._spares_failing:
                self._spares_failing = False
                _log.info("making spare temporary files works again")
            return count

        def failed(failure):
            self._making_spares = False
            if not self._spares_failing:
                self._spares_failing = True
                _log.warn("making spare temporary files failed: {error}; not said again until it works",
                          error=failure.value)

        self.io(self.store.make_spares).addCallbacks(made, failed)

    def _install_group(self, group: List[Tuple[StoredObject, float]], others: bool = False) -> List[object]:
        """Database thread: :meth:`Installer.install`, here or in the install helper's process (whose
        interpreter lock the reactor does not hold): there when every object of the group is held in memory and
        either the group has several or the archive had ``others`` in hand as it started (other associations
        storing at once, the reactor busy with them)."""
        helper = self.helper
        if helper is not None and (len(group) > 1 or others) and all(
                obj.temp is None and obj.partial is None for obj, _ in group):
            try:
                return helper.install(group)
            except HelperUnavailable as error:  # nothing of the group was done: done here, and from now on
                self.helper = None
                _log.error("{error}; groups are installed by this process from now on", error=error)
            except HelperFailed as error:  # its objects are answered a failure; the next group starts another
                _log.error("{error}", error=error)
                raise
        return self.installer.install(group)

    def start_helper(self) -> defer.Deferred:
        """Start the install helper (on the database thread, where it is used); if it cannot start, groups are
        installed by this process (logged).  Fires with its process id, or None."""
        helper = self.helper
        if helper is None:
            return defer.succeed(None)

        def started(pid):
            _log.info("install helper started (process {pid}): objects stored by several associations at once are "
                      "installed there", pid=pid)
            return pid

        def failed(failure):
            failure.trap(HelperUnavailable)
            self.helper = None
            _log.error("{error}; groups are installed by this process", error=failure.value)
            return None

        return self.db(helper.start).addCallbacks(started, failed)

    # --- storage management ----------------------------------------------------------

    async def _make_room(self, incoming: int, free: Optional[int] = None, written: bool = False) -> None:
        """Evict until ``incoming`` more bytes fit the limits; ``free``: the free space before they were written
        (None: measured now); ``written``: whether they are on disk already (a sealed temporary file)."""
        if free is None:
            free = await self._measure_free(incoming, written)
        short = shortfall(self.limits, self.size, free, incoming)
        if short.needed <= 0:
            return
        # appliance-archive may have deleted studies behind our back: count again before evicting
        self.size = await self.db(self.index.total_size)
        free = await self._measure_free(incoming, written)
        short = shortfall(self.limits, self.size, free, incoming)
        if short.needed <= 0:
            return
        if not self.limits.auto_delete:
            raise OutOfResources(f"archive full and auto_delete is off: {short.reason}")
        freed = await self.evict(short.target)
        if freed < short.needed:
            raise OutOfResources(
                f"archive full: eviction freed {freed} of {short.needed} bytes needed, the rest is protected "
                f"or in use; {short.reason}"
            )

    async def _measure_free(self, incoming: int, written: bool) -> int:
        """The free space now, less the objects on their way that are not written yet (counted as if they were)."""
        return await self.io(self.store.free_space) - self._incoming + (incoming if written else 0)

    async def eviction_plan(self, target: int, limit: int = 100000):
        candidates = await self.db(lambda: list(islice(self.index.eviction_order(), limit)))
        return plan(candidates, set(self.pins.counts), target)

    async def evict(self, target: int, limit: int = 100000) -> int:
        """Evict least recently accessed studies until ``target`` bytes are freed; return bytes freed.

        In :meth:`eviction_plan`'s order, skipping pinned studies; a study that
        cannot be deleted is logged and skipped, and the next ones make up for it.
        """
        candidates = await self.db(lambda: list(islice(self.index.eviction_order(), limit)))
        freed = 0
        for study_uid, _, _ in candidates:
            if freed >= target:
                break
            if study_uid in self.pins:  # being written or retrieved
                continue
            try:
                freed += await self.delete_study(study_uid, why="evicted (least recently accessed)")
            except Exception:
                _log.failure("evicting study {study} failed; eviction goes on with the next", study=study_uid)
        return freed

    async def delete_study(self, study_uid: str, why: str = "deleted") -> int:
        """Remove a study, instance by instance: its file, then its row (:func:`_delete_files_then_rows`)."""
        self.deleting.add(study_uid)
        try:
            rows: List[InstanceRow] = await self.db(self.index.study_instances, study_uid)
            if not rows:
                return 0
            freed, failed = await self.db(_delete_files_then_rows, self.store, self.index, rows)
        finally:
            self.deleting.remove(study_uid)
        self.size -= freed
        _log.info("study {study} {why}: {count} instances, {size} bytes", study=study_uid, why=why,
                  count=len(rows) - len(failed), size=freed)
        for row, error in failed:
            _log.error("deleting SOP instance {sop} of study {study} failed: {error}", sop=row.sop_uid,
                       study=study_uid, error=error)
        return freed

    def touch(self, study_uids: List[str]) -> defer.Deferred:
        """Mark studies accessed now (stored, retrieved or viewed)."""
        return self.db(self.index.touch_studies, list(study_uids), self.clock.seconds())

    # --- start-up reconciliation --------------------------------------------------------

    def reconcile(self) -> defer.Deferred:
        """Remove what interrupted stores left, and rows whose files vanished; fires with the counts."""
        return self.io(_reconcile, self.store, self.index_path, self.started_at, self.inflate_limits)


def _delete_files_then_rows(store: ObjectStore, index: ArchiveIndex,
                            rows: List[InstanceRow]) -> Tuple[int, List[Tuple[InstanceRow, str]]]:
    """Database thread: the instances' files, then their rows.

    The start-up check indexes files the index does not name, so files go
    before their rows: a crash in between leaves rows without files, which
    it removes.  A row is deleted only if it still names the file removed (an
    instance stored again meanwhile keeps its new row).  The rows go in one
    transaction; if that fails, one by one, so that one instance that cannot
    be deleted does not keep the others.  Returns (bytes freed, [(row, why)]
    for each instance that failed).
    """
    failed: List[Tuple[InstanceRow, str]] = []
    removed: List[InstanceRow] = []
    for row in rows:
        try:
            store.remove(row.path)
            removed.append(row)
        except Exception as error:  # logged by the caller; its row stays, naming its file
            failed.append((row, f"{type(error).__name__}: {error}"))
    try:
        return index.delete_instances(removed), failed
    except Exception:
        pass  # one at a time, below
    freed = 0
    for row in removed:
        try:
            if index.delete_instance(row.sop_uid, row.path):
                freed += row.size
        except Exception as error:  # a row without its file: the start-up check removes it
            failed.append((row, f"{type(error).__name__}: {error}"))
    return freed, failed


@dataclass
class Reconciliation:
    """What the start-up check found and did."""

    temps: List[str] = field(default_factory=list)  # unfinished stores, removed
    reindexed: List[str] = field(default_factory=list)  # whole objects the index had lost, indexed again
    stale: List[str] = field(default_factory=list)  # older versions of re-stored instances, removed
    quarantined: List[str] = field(default_factory=list)  # unreadable files, moved aside
    missing: List[InstanceRow] = field(default_factory=list)  # rows whose file was gone, removed
    conflicts: List[Conflict] = field(default_factory=list)  # patient attributes the re-indexed objects disagree on
    failed: List[str] = field(default_factory=list)  # steps that failed (logged), the check went on


def _reconcile(store: ObjectStore, index_path: str, started_before: float,
               limits: InflateLimits = InflateLimits()) -> Reconciliation:
    """I/O thread, at start-up: bring the index and the files back into agreement.

    Files are the truth.  A file under objects/ was fsynced and linked or
    renamed into place only after it was checked, so one the index does not
    name is a whole object whose row was lost (the index commits with
    ``synchronous=NORMAL``: a power cut may drop the last commits) or whose
    store was cut short before its commit: it is indexed again, unless the
    index holds a newer version of the same instance.  Rows whose file is
    gone are removed.  Files newer than ``started_before`` belong to stores
    in flight and are left alone.
    """
    result = Reconciliation(temps=store.remove_stale_temps(started_before))
    index = ArchiveIndex(index_path)  # a connection of this thread's own
    try:
        for relative, mtime in store.stored_files():
            if mtime >= started_before or index.has_path(relative):
                continue
            try:
                _adopt(store, index, relative, mtime, result, limits)
            except Exception as error:  # one file does not stop the check of the others
                result.failed.append(f"indexing {relative} again: {type(error).__name__}: {error}")
        missing = [row for row in index.all_instances() if not os.path.exists(store.absolute(row.path))]
        for row in missing:
            try:
                if index.delete_instance(row.sop_uid, row.path):
                    result.missing.append(row)
            except Exception as error:
                result.failed.append(f"removing the row of {row.sop_uid}: {type(error).__name__}: {error}")
    finally:
        index.close()
    for name in result.temps:
        _log.info("removed the unfinished temporary file {name} of an interrupted store", name=name)
    for path in result.reindexed:
        _log.warn("indexed {path} again: a whole stored object whose index row was lost", path=path)
    for path in result.stale:
        _log.info("removed {path}: an older version of an instance stored again since", path=path)
    for path in result.quarantined:
        _log.error("moved {path} to quarantine: it cannot be read as a DICOM object", path=path)
    for row in result.missing:
        _log.error("index row for SOP instance {sop} pointed to missing file {path}; row removed",
                   sop=row.sop_uid, path=row.path)
    for failure in result.failed:
        _log.error("start-up check: {problem}; the check went on", problem=failure)
    log_conflicts(result.conflicts)
    return result


def _adopt(store: ObjectStore, index: ArchiveIndex, relative: str, mtime: float, result: Reconciliation,
           limits: InflateLimits) -> None:
    """Index a stored file the index does not name, or drop it if the index has a newer version."""
    path = store.absolute(relative)
    try:
        meta, transfer_syntax, source_ae = read_object(path, limits, store.tmp)
    except Exception:  # whatever makes it unreadable, a person should look at it
        result.quarantined.append(store.quarantine(relative))
        return
    existing = index.lookup(meta.sop_instance_uid)
    if existing is not None:
        try:
            existing_mtime = os.stat(store.absolute(existing.path)).st_mtime
        except FileNotFoundError:
            existing_mtime = -1.0
        if existing_mtime >= mtime:
            store.remove(relative)
            result.stale.append(relative)
            return
    try:
        added = index.add(meta, relative, os.path.getsize(path), transfer_syntax, source_ae, mtime)
    except Misfiled as error:  # it contradicts the index: a person should look at it
        result.quarantined.append(store.quarantine(relative))
        result.failed.append(f"{relative} not indexed again: {error}")
        return
    if added.previous is not None and added.previous.path != relative:
        store.remove(added.previous.path)
    result.reindexed.append(relative)
    result.conflicts.extend(added.conflicts)


def read_object(path: str, limits: InflateLimits = InflateLimits(),
                spill_dir: Optional[str] = None) -> Tuple[ObjectMetadata, str, str]:
    """A stored Part 10 file's index attributes, transfer syntax and source AE title.

    Pixel data is never read; a deflated data set is inflated as a stream
    within ``limits`` (pydicom would inflate it whole, in memory), spilling
    to ``spill_dir`` in the rare case its attributes need more than the
    in-memory prefix.
    """
    meta_info = read_file_meta_info(path)
    transfer_syntax = str(meta_info.get("TransferSyntaxUID", "") or "")
    source_ae = str(meta_info.get("SourceApplicationEntityTitle", "") or "").strip()
    if transfer_syntax == DEFLATED:
        with open(path, "rb") as handle:
            meta, _ = read_deflated(handle, data_set_offset(handle), limits, spill_dir)
        return meta, transfer_syntax, source_ae
    return extract(dcmread(path, stop_before_pixels=True, defer_size=1 << 20)), transfer_syntax, source_ae


def log_conflicts(conflicts) -> None:
    """One warning per newly recorded conflict (study, Patient ID, attribute names); the values at debug level."""
    for conflict in conflicts:
        if conflict.new:
            _log.warn("patient attributes conflict: {description}; the study answers with its most recently "
                      "stored object's values (appliance-archive conflicts lists them)",
                      description=conflict.describe(), study=conflict.study_uid, patient_id=conflict.patient_id,
                      attributes=conflict.attributes)
        else:
            _log.debug("patient attributes conflict seen again: {description}", description=conflict.describe())
        _log.debug("conflict values for study {study} (SOP instance {sop}): {values}", study=conflict.study_uid,
                   sop=conflict.sop_uid or "-",
                   values="; ".join(f"{keyword} {theirs!r} -> {ours!r}" for keyword, theirs, ours in conflict.values))


def _log_upgrade(path: str, upgrade: Upgrade) -> None:
    _log.warn("upgraded the index {path} from schema version {version}: {studies} studies now answer with the "
              "patient attributes of their own most recently stored object ({files} read from their files, "
              "{kept} kept the indexed values: their file could not be read); {conflicts} conflicts recorded",
              path=path, version=upgrade.from_version, studies=upgrade.studies, files=upgrade.from_files,
              kept=upgrade.from_index, conflicts=len(upgrade.conflicts))
    log_conflicts(upgrade.conflicts)
