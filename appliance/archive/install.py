"""Installing received objects into the archive, a group at a time: the durability protocol's steps for each.

Synchronous; the archive runs :meth:`Installer.install` on its database
thread for every group of objects that became ready together (group
commit: :class:`~.groups.GroupRunner`).  Nothing here knows of the reactor
or of DIMSE.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from ..dataset.metadata import ObjectMetadata
from ..logs import logger
from .index import ArchiveIndex, NewInstance
from .store import ObjectStore, TempObject

__all__ = ["Duplicate", "HelperFailed", "Installer", "StoredObject", "StoreOutcome"]

_log = logger("appliance.archive")


class Duplicate(Exception):
    """The SOP instance is stored already and on_duplicate is 'reject'."""


class HelperFailed(Exception):
    """The install helper process (:mod:`.helper`) died or could not be reached while it had a group: its objects
    may or may not be installed, none was answered Success."""


class StoreOutcome(enum.Enum):
    STORED = "stored"
    REPLACED = "replaced"
    KEPT_EXISTING = "kept existing"


@dataclass
class StoredObject:
    """A received object, checked and described, ready to commit: sealed in a temporary file, or to be written
    by ``seal`` as it is installed."""

    temp: Optional[TempObject]
    metadata: ObjectMetadata
    transfer_syntax: str
    source_ae: str
    coerced: bool = False
    #: free space on the archive's file system when the object was sealed (None: not measured)
    free_space: Optional[int] = None
    #: for an object not written yet (``temp`` None): run on the database thread as it is installed, writes its
    #: temporary file and fsyncs it (the file discarded if that fails); ``size``: the bytes the file will hold
    seal: Optional[Callable[[ObjectStore], TempObject]] = None
    size: int = 0
    #: the temporary file ``seal`` completes, if there is one already (discarded if the object goes no further)
    partial: Optional[TempObject] = None

    @property
    def file_size(self) -> int:
        return self.temp.size if self.temp is not None else self.size


class Installer:
    """Installs groups of received objects with the archive's files and index (:meth:`install`)."""

    def __init__(self, store: ObjectStore, index: ArchiveIndex, on_duplicate: str) -> None:
        self.store = store
        self.index = index
        self.on_duplicate = on_duplicate

    def install(self, group: List[Tuple[StoredObject, float]]) -> List[object]:
        """Each object not written yet written and fsynced, the duplicate policy, each file put in place
        (linked, or renamed), every directory involved fsynced once, one index transaction for all (each object
        in a savepoint of its own).

        One answer per object: (outcome, replaced row or None, size change, conflicts, free space after the
        group), or the exception that object alone failed with (its file is removed).
        """
        answers: List[object] = [None] * len(group)
        placed: List[Tuple[int, str, NewInstance]] = []  # (position in the group, path, row to index)
        directories: List[str] = []
        in_group: Dict[str, int] = {}  # SOP Instance UIDs placed by this group: keep and reject see them too
        kept: List[int] = []
        for position, (obj, now) in enumerate(group):
            meta = obj.metadata
            if obj.temp is None:
                try:
                    obj.temp = obj.seal(self.store)
                except Exception as error:  # the seal discarded its file
                    answers[position] = error
                    continue
            try:
                # the study the instance is stored in already (this group's earlier one, else the index's), if it is
                existing: Optional[str] = None
                if self.on_duplicate != "replace":
                    earlier = in_group.get(meta.sop_instance_uid)
                    if earlier is not None:
                        existing = group[earlier][0].metadata.study_instance_uid
                    else:
                        row = self.index.lookup(meta.sop_instance_uid)
                        existing = row.study_uid if row is not None else None
                if existing is not None and self.on_duplicate == "keep":
                    self.store.discard(obj.temp)
                    self.index.touch_studies([existing], now)  # the kept version's study was accessed
                    kept.append(position)
                    continue
                if existing is not None and self.on_duplicate == "reject":
                    raise Duplicate(f"SOP instance {meta.sop_instance_uid} is stored already (on_duplicate = reject)")
                relative = self.store.relative_path_for(meta.study_instance_uid, meta.series_instance_uid,
                                                        meta.sop_instance_uid)
                directories += self.store.place(obj.temp, relative)
            except Exception as error:
                self.store.discard(obj.temp)
                answers[position] = error
                continue
            in_group[meta.sop_instance_uid] = position
            placed.append((position, relative,
                           NewInstance(meta, relative, obj.temp.size, obj.transfer_syntax, obj.source_ae)))
        added: List[object] = []
        if placed:
            try:
                self.store.sync_directories(directories)
                added = self.index.add_group([row for _, _, row in placed], group[placed[0][0]][1])
            except Exception as error:  # nothing of the group was indexed: none of its files stays
                added = [error] * len(placed)
        free = self.store.free_space()
        for position in kept:
            answers[position] = (StoreOutcome.KEPT_EXISTING, None, 0, (), free)
        for (position, relative, _), result in zip(placed, added):
            if isinstance(result, Exception):
                self._unplace(relative)
                answers[position] = result
                continue
            obj = group[position][0]
            previous = result.previous
            delta = obj.temp.size - (previous.size if previous else 0)
            answers[position] = ((StoreOutcome.REPLACED if previous else StoreOutcome.STORED), previous, delta,
                                 result.conflicts, free)
        return answers

    def _unplace(self, relative: str) -> None:
        """Database thread: remove a file placed for an object that was then not indexed."""
        try:
            self.store.remove(relative)
        except OSError as error:  # the start-up check indexes it (a whole, checked object) or removes it
            _log.error("removing {path}, not indexed, failed: {error}", path=relative, error=error)
