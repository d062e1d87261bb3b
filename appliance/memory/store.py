"""The Memory-Server's store: received objects held in memory, bounded, least recently used dropped first.

Objects are kept as received (the data set's bytes, in the transfer syntax
they came in) with what the API needs to list them (their index metadata).
What is held is counted in real bytes (the data sets, and a fixed allowance
per object for what Python keeps around them) against ``memory_limit``:
room is made by dropping whole studies, least recently used first, never one
that a running load or an open reader pins; when nothing can be dropped the
object is refused.  ``retention`` drops studies not used for that long.
"The user determines the duration of the storage" (statement 2.1.3): a study
stays until freed, dropped for room, or past its retention.

Synchronous and reactor-thread only; the clock is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional

from ..dataset.metadata import ObjectMetadata

__all__ = ["MemoryStore", "HeldObject", "HeldStudy", "NoRoom", "OBJECT_OVERHEAD"]

#: Bytes counted for each object beyond its data set (its metadata and bookkeeping).
OBJECT_OVERHEAD = 4096


class NoRoom(Exception):
    """Not enough memory can be freed for an object (the C-STORE gets A700)."""


@dataclass
class HeldObject:
    metadata: ObjectMetadata
    transfer_syntax: str
    data: bytes
    stored_at: float

    @property
    def size(self) -> int:
        return len(self.data) + OBJECT_OVERHEAD


@dataclass
class HeldStudy:
    study_uid: str
    #: series UID -> SOP Instance UID -> object
    series: Dict[str, Dict[str, HeldObject]] = field(default_factory=dict)
    size: int = 0
    used_at: float = 0.0
    #: loads running for it, readers open on it: while any, it is never dropped
    pins: int = 0
    #: what loads brought in whole: "*" for the study, else series UIDs (forgotten when the study is dropped)
    complete: set = field(default_factory=set)

    def objects(self) -> Iterator[HeldObject]:
        for instances in self.series.values():
            yield from instances.values()

    @property
    def count(self) -> int:
        return sum(len(instances) for instances in self.series.values())


class MemoryStore:
    """Studies of objects in memory under ``limit`` bytes; ``retention`` seconds unused at most (None: forever)."""

    def __init__(self, limit: int, clock, retention: Optional[float] = None) -> None:
        self.limit = limit
        self.retention = retention
        self.clock = clock
        self.studies: Dict[str, HeldStudy] = {}
        #: bytes held, plus bytes promised to objects being received (reservations)
        self.size = 0
        self.reserved = 0
        #: (study UID, why) of what was dropped, newest last, for logs and tests
        self.dropped: List[tuple] = []

    # --- room ---------------------------------------------------------------------------

    def reserve(self, size: int) -> None:
        """Promise ``size`` more bytes to an object being received, dropping studies for it; NoRoom if impossible."""
        self.expire()
        if self.size + self.reserved + size > self.limit:
            self._make_room(self.size + self.reserved + size - self.limit)
        self.reserved += size

    @property
    def free(self) -> int:
        """Bytes that can be reserved without dropping anything."""
        return self.limit - self.size - self.reserved

    def release(self, size: int) -> None:
        """Give back a reservation (the object was kept, refused or abandoned)."""
        self.reserved -= size

    def _make_room(self, needed: int) -> None:
        candidates = sorted((study for study in self.studies.values() if not study.pins), key=lambda s: s.used_at)
        if sum(study.size for study in candidates) < needed:
            raise NoRoom(f"memory_limit={self.limit} reached: {self.size} bytes held, "
                         f"{sum(s.size for s in self.studies.values() if s.pins)} of them in use by loads or "
                         f"readers, {self.reserved} promised to objects being received")
        freed = 0
        for study in candidates:
            if freed >= needed:
                break
            freed += study.size
            self.drop(study.study_uid, "dropped for room (least recently used)")

    def expire(self) -> None:
        """Drop the studies not used for ``retention`` seconds (and not pinned)."""
        if self.retention is None:
            return
        cutoff = self.clock.seconds() - self.retention
        for study in [s for s in self.studies.values() if not s.pins and s.used_at < cutoff]:
            self.drop(study.study_uid, f"past its retention ({self.retention:g} s unused)")

    # --- keeping and dropping ----------------------------------------------------------------

    def put(self, metadata: ObjectMetadata, transfer_syntax: str, data: bytes) -> bool:
        """Keep an object (replacing one with its SOP Instance UID); True if it replaced one.  The caller has
        reserved its size."""
        now = self.clock.seconds()
        replaced = self.remove_instance(metadata.sop_instance_uid)
        study = self.studies.get(metadata.study_instance_uid)
        if study is None:
            study = self.studies[metadata.study_instance_uid] = HeldStudy(metadata.study_instance_uid)
        held = HeldObject(metadata, transfer_syntax, data, now)
        study.series.setdefault(metadata.series_instance_uid, {})[metadata.sop_instance_uid] = held
        study.size += held.size
        study.used_at = now
        self.size += held.size
        return replaced

    def remove_instance(self, sop_uid: str) -> bool:
        for study in self.studies.values():
            for series_uid, instances in study.series.items():
                held = instances.pop(sop_uid, None)
                if held is not None:
                    study.size -= held.size
                    self.size -= held.size
                    if not instances:
                        del study.series[series_uid]
                    if not study.series:
                        del self.studies[study.study_uid]
                    return True
        return False

    def drop(self, study_uid: str, why: str = "freed") -> int:
        """Forget a study; the bytes freed (0 if it was not held)."""
        study = self.studies.pop(study_uid, None)
        if study is None:
            return 0
        self.size -= study.size
        self.dropped.append((study_uid, why))
        return study.size

    # --- using ----------------------------------------------------------------------------------

    def pin(self, study_uid: str) -> None:
        """Keep a study (while a load runs, or a reader reads): it is created empty if not held yet."""
        study = self.studies.get(study_uid)
        if study is None:
            study = self.studies[study_uid] = HeldStudy(study_uid, used_at=self.clock.seconds())
        study.pins += 1

    def unpin(self, study_uid: str) -> None:
        study = self.studies.get(study_uid)
        if study is None:
            return
        study.pins -= 1
        if not study.pins and not study.series:
            del self.studies[study_uid]  # pinned for a load that brought nothing

    def mark_complete(self, study_uid: str, series_uid: Optional[str] = None) -> None:
        """A load brought the whole study (or series) in."""
        study = self.studies.get(study_uid)
        if study is not None:
            study.complete.add(series_uid or "*")

    def is_complete(self, study_uid: str, series_uid: Optional[str] = None) -> bool:
        """Whether a load brought in the whole study, or the series (itself or with its study), since it was
        last dropped."""
        study = self.studies.get(study_uid)
        if study is None or not study.series:
            return False
        return "*" in study.complete or (series_uid is not None and series_uid in study.complete
                                         and series_uid in study.series)

    def touch(self, study_uid: str) -> None:
        study = self.studies.get(study_uid)
        if study is not None:
            study.used_at = self.clock.seconds()

    def find(self, study_uid: str, series_uid: Optional[str] = None,
             sop_uid: Optional[str] = None) -> Optional[HeldObject]:
        study = self.studies.get(study_uid)
        if study is None:
            return None
        if series_uid is None:
            return next(study.objects(), None)
        instances = study.series.get(series_uid, {})
        if sop_uid is None:
            return next(iter(instances.values()), None)
        return instances.get(sop_uid)
