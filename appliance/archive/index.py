"""The archive's index: an embedded SQLite database of patients, studies, series and instances.

Synchronous and thread-confined: the server calls it from its one database
thread, ``appliance-archive`` from its own process (SQLite's WAL mode and
busy timeout make the two safe together).  Values come in through SQL
parameters only.

Each level keeps the columns C-FIND matches on most (indexed), its other
query attributes in the DICOM JSON model, and the counters PS3.4 computes
(number of related series and instances).  Each study keeps the patient
attributes its own objects carry (never another study's: see
:mod:`.patients`), and the archive's storage management state: size, stored
and last-accessed times, protection.  Patient attributes that disagree
between studies of one Patient ID, or within a study, are recorded as
conflicts.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from ..dataset.metadata import ObjectMetadata
from .matching import fold, name_groups
from .patients import Conflict, differences, identity, value_text

__all__ = ["ArchiveIndex", "InstanceRow", "StudyRow", "ConflictRow", "Added", "NewInstance", "Upgrade", "ObjectReader",
           "Misfiled", "SCHEMA_VERSION"]

SCHEMA_VERSION = 2

#: The schema, one statement each (run inside the upgrade's transaction too: no executescript).
#: The patient attributes live in each study (the most recently stored object's values);
#: ``patients`` only says which studies are one patient (Patient ID and Issuer), for the counters.
#: The study's patient columns come last, where the upgrade from version 1 adds them.
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS patients (
    pk INTEGER PRIMARY KEY,
    patient_id TEXT NOT NULL,
    issuer TEXT NOT NULL,
    -- who the patient is: Patient ID and Issuer, or, without a Patient ID, the study (patients.identity)
    identity TEXT NOT NULL UNIQUE
)""",
    """CREATE TABLE IF NOT EXISTS studies (
    pk INTEGER PRIMARY KEY,
    patient_pk INTEGER NOT NULL REFERENCES patients (pk),
    study_uid TEXT NOT NULL UNIQUE,
    study_date TEXT NOT NULL,
    study_time TEXT NOT NULL,
    accession_number TEXT NOT NULL,
    study_id TEXT NOT NULL,
    attributes TEXT NOT NULL,
    num_series INTEGER NOT NULL DEFAULT 0,
    num_instances INTEGER NOT NULL DEFAULT 0,
    size INTEGER NOT NULL DEFAULT 0,
    stored_at REAL NOT NULL,
    accessed_at REAL NOT NULL,
    protected INTEGER NOT NULL DEFAULT 0,
    -- the patient module as this study's own objects carry it: the most recently stored one's
    patient_id TEXT NOT NULL DEFAULT '',
    issuer TEXT NOT NULL DEFAULT '',
    patient_name TEXT NOT NULL DEFAULT '',
    birth_date TEXT NOT NULL DEFAULT '',
    sex TEXT NOT NULL DEFAULT '',
    patient_attributes TEXT NOT NULL DEFAULT '{}',
    patient_stored_at REAL NOT NULL DEFAULT 0
)""",
    "CREATE INDEX IF NOT EXISTS studies_patient ON studies (patient_pk)",
    "CREATE INDEX IF NOT EXISTS studies_date ON studies (study_date, study_time)",
    "CREATE INDEX IF NOT EXISTS studies_accession ON studies (accession_number)",
    "CREATE INDEX IF NOT EXISTS studies_lru ON studies (protected, accessed_at)",
    # C-FIND on Patient ID (st.patient_id IN (...)) and birth dates: without them every query scans all studies
    "CREATE INDEX IF NOT EXISTS studies_patient_id ON studies (patient_id)",
    "CREATE INDEX IF NOT EXISTS studies_birth_date ON studies (birth_date)",
    """CREATE TABLE IF NOT EXISTS study_names (
    study_pk INTEGER NOT NULL REFERENCES studies (pk) ON DELETE CASCADE,
    name TEXT NOT NULL,
    folded TEXT NOT NULL
)""",
    "CREATE INDEX IF NOT EXISTS study_names_name ON study_names (name)",
    "CREATE INDEX IF NOT EXISTS study_names_folded ON study_names (folded)",
    "CREATE INDEX IF NOT EXISTS study_names_study ON study_names (study_pk)",
    """CREATE TABLE IF NOT EXISTS series (
    pk INTEGER PRIMARY KEY,
    study_pk INTEGER NOT NULL REFERENCES studies (pk),
    series_uid TEXT NOT NULL UNIQUE,
    modality TEXT NOT NULL,
    series_number INTEGER,
    attributes TEXT NOT NULL,
    num_instances INTEGER NOT NULL DEFAULT 0
)""",
    "CREATE INDEX IF NOT EXISTS series_study ON series (study_pk)",
    "CREATE INDEX IF NOT EXISTS series_modality ON series (modality)",
    """CREATE TABLE IF NOT EXISTS instances (
    pk INTEGER PRIMARY KEY,
    series_pk INTEGER NOT NULL REFERENCES series (pk),
    sop_uid TEXT NOT NULL UNIQUE,
    sop_class TEXT NOT NULL,
    instance_number INTEGER,
    transfer_syntax TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    source_ae TEXT NOT NULL,
    stored_at REAL NOT NULL,
    attributes TEXT NOT NULL
)""",
    "CREATE INDEX IF NOT EXISTS instances_series ON instances (series_pk)",
    "CREATE INDEX IF NOT EXISTS instances_sop_class ON instances (sop_class)",
    "CREATE INDEX IF NOT EXISTS instances_path ON instances (path)",
    # patient attributes that differ between studies of one patient, or within a study (patients.Conflict)
    """CREATE TABLE IF NOT EXISTS conflicts (
    pk INTEGER PRIMARY KEY,
    study_uid TEXT NOT NULL,
    -- empty: the study's own earlier objects
    other_study_uid TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    issuer TEXT NOT NULL,
    -- keywords, comma-separated
    attributes TEXT NOT NULL,
    sop_uid TEXT NOT NULL,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    occurrences INTEGER NOT NULL DEFAULT 1,
    UNIQUE (study_uid, other_study_uid, attributes)
)""",
    "CREATE INDEX IF NOT EXISTS conflicts_other ON conflicts (other_study_uid)",
)

#: Most conflicting studies of one patient compared with each stored object (the rest are alike or many).
MAX_COMPARED_STUDIES = 64


@dataclass(frozen=True)
class InstanceRow:
    sop_uid: str
    sop_class: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    path: str
    size: int


@dataclass(frozen=True)
class StudyRow:
    study_uid: str
    patient_id: str
    patient_name: str
    study_date: str
    description_json: str
    num_series: int
    num_instances: int
    size: int
    stored_at: float
    accessed_at: float
    protected: bool


@dataclass(frozen=True)
class ConflictRow:
    """A recorded conflict (``appliance-archive conflicts``)."""

    study_uid: str
    other_study_uid: str
    patient_id: str
    issuer: str
    attributes: Tuple[str, ...]
    sop_uid: str
    first_seen: float
    last_seen: float
    occurrences: int


@dataclass(frozen=True)
class Added:
    """What :meth:`ArchiveIndex.add` did: the instance it replaced, and the conflicts the object showed."""

    previous: Optional[InstanceRow]
    conflicts: Tuple[Conflict, ...] = ()


@dataclass(frozen=True)
class NewInstance:
    """An object to index (:meth:`ArchiveIndex.add_group`): its attributes and where its file is."""

    metadata: ObjectMetadata
    path: str
    size: int
    transfer_syntax: str
    source_ae: str


@dataclass(frozen=True)
class Upgrade:
    """What opening an index of an older schema did (the archive logs it)."""

    from_version: int
    studies: int
    #: studies whose patient attributes were read from their most recently stored object
    from_files: int
    #: studies whose object could not be read: their patient's indexed values were kept
    from_index: int
    conflicts: Tuple[Conflict, ...] = ()


class Misfiled(ValueError):
    """An object names a series that belongs to another study (PS3.3: a series belongs to one study)."""


#: ``read_object(relative path) -> ObjectMetadata or None``: an indexed object's attributes read from its file.
ObjectReader = Callable[[str], Optional[ObjectMetadata]]


class ArchiveIndex:
    """One SQLite connection to the index at ``path`` (created on first use).

    An index of schema version 1 is upgraded when opened, in one
    transaction: ``read_object`` reads each study's most recently stored
    object so that the study gets the patient attributes its own objects
    carry (version 1 kept one set per Patient ID, the last stored).  Without
    ``read_object`` such an index is refused.  :attr:`upgrade` says what was done.
    """

    def __init__(self, path: str, read_object: Optional[ObjectReader] = None) -> None:
        self.path = path
        self.upgrade: Optional[Upgrade] = None
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        self.db = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL: the WAL is synced at checkpoints, not at every commit.  A power cut may
        # drop the last commits, never corrupt the database; the objects they indexed are
        # fsynced files that the start-up reconciliation indexes again (archive._reconcile).
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        try:
            self._open(read_object)
        except BaseException:
            self.db.close()
            raise

    def _open(self, read_object: Optional[ObjectReader]) -> None:
        version = self._version()
        if version == 1:
            if read_object is None:
                raise RuntimeError(f"{self.path}: index schema version 1 must be upgraded by the appliance "
                                   f"(it reads the stored objects)")
            self.upgrade = _upgrade_from_1(self, read_object)
            version = SCHEMA_VERSION
        if version not in (None, SCHEMA_VERSION):
            raise RuntimeError(f"{self.path}: index schema version {version}, this release reads {SCHEMA_VERSION}")
        with self.transaction() as db:
            for statement in _SCHEMA:  # idempotent
                db.execute(statement)
            if version is None:
                db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    def _version(self) -> Optional[int]:
        """The schema version written in the index; None for a new, empty one."""
        if self.db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone() is None:
            return None
        row = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        return None if row is None else int(row[0])

    def close(self) -> None:
        self.db.close()

    class _Transaction:
        def __init__(self, db: sqlite3.Connection) -> None:
            self.db = db

        def __enter__(self):
            self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, kind, value, traceback):
            if kind is None:
                self.db.execute("COMMIT")
            else:
                self.db.execute("ROLLBACK")
            return False

    def transaction(self) -> "_Transaction":
        """``with index.transaction():`` — BEGIN IMMEDIATE ... COMMIT, rolled back on error."""
        return self._Transaction(self.db)

    # --- storing ---------------------------------------------------------------

    def lookup(self, sop_uid: str) -> Optional[InstanceRow]:
        row = self.db.execute(
            """SELECT i.sop_uid, i.sop_class, st.study_uid, se.series_uid, i.transfer_syntax, i.path, i.size
               FROM instances i JOIN series se ON i.series_pk = se.pk JOIN studies st ON se.study_pk = st.pk
               WHERE i.sop_uid = ?""",
            (sop_uid,),
        ).fetchone()
        return InstanceRow(*row) if row else None

    def add(
        self,
        meta: ObjectMetadata,
        path: str,
        size: int,
        transfer_syntax: str,
        source_ae: str,
        now: float,
    ) -> Added:
        """Index a stored object (replacing any instance with its SOP Instance UID), stored at ``now``.

        Returns the replaced instance's row, whose file the caller removes if
        its path differs, and the patient attribute conflicts the object
        showed (recorded in the index; the caller logs them).  One transaction.
        """
        with self.transaction():
            return self._add(NewInstance(meta, path, size, transfer_syntax, source_ae), now)

    def add_group(self, instances: Sequence["NewInstance"], now: float) -> List[Union[Added, Exception]]:
        """:meth:`add` for several objects in one transaction (one commit for all: group commit).

        Each object is added inside a savepoint of its own: one that cannot
        be indexed (:class:`Misfiled`, or any other error) is rolled back alone
        and its exception takes its place in the answer; the others commit.
        If the commit itself fails, nothing was indexed and the exception
        propagates.  Objects are added in order: a later one replacing an
        earlier one of the group (the same SOP Instance UID) sees it as the
        previous instance.
        """
        if len(instances) == 1:  # its own transaction: no savepoint needed
            added = None
            try:
                with self.transaction():
                    added = self._add(instances[0], now)
            except Exception as error:
                if added is None:  # failed in _add (rolled back), not in the commit
                    return [error]
                raise
            return [added]
        results: List[Union[Added, Exception]] = []
        with self.transaction() as db:
            for instance in instances:
                db.execute("SAVEPOINT instance")
                try:
                    results.append(self._add(instance, now))
                except Exception as error:
                    db.execute("ROLLBACK TO instance")
                    results.append(error)
                db.execute("RELEASE instance")
        return results

    def _add(self, instance: "NewInstance", now: float) -> Added:
        """Inside a transaction: index one object."""
        db, meta = self.db, instance.metadata
        previous = self.lookup(meta.sop_instance_uid)
        parents = self._remove_instance(previous.sop_uid) if previous is not None else None
        patient_pk = self._patient(db, meta.patient_id, meta.issuer_of_patient_id, meta.study_instance_uid)
        study_pk, conflicts = self._upsert_study(db, meta, patient_pk, now)
        series_pk = self._upsert_series(db, meta, study_pk)
        db.execute(
            """INSERT INTO instances (series_pk, sop_uid, sop_class, instance_number, transfer_syntax,
                   path, size, source_ae, stored_at, attributes)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (series_pk, meta.sop_instance_uid, meta.sop_class_uid, meta.instance_number, instance.transfer_syntax,
             instance.path, instance.size, instance.source_ae, now, meta.instance_json),
        )
        db.execute("UPDATE series SET num_instances = num_instances + 1 WHERE pk = ?", (series_pk,))
        db.execute(  # storing is an access (LRU)
            "UPDATE studies SET num_instances = num_instances + 1, size = size + ?, accessed_at = ? WHERE pk = ?",
            (instance.size, now, study_pk),
        )
        if parents is not None:  # the replaced instance's series, study and patient, if it left them empty
            self._prune(*parents)
        return Added(previous, tuple(conflicts))

    @staticmethod
    def patient_identity(meta: ObjectMetadata) -> str:
        """Objects with the same Patient ID and Issuer belong to one patient (:func:`.patients.identity`)."""
        return identity(meta.patient_id, meta.issuer_of_patient_id, meta.study_instance_uid)

    @staticmethod
    def _patient(db: sqlite3.Connection, patient_id: str, issuer: str, study_uid: str) -> int:
        """The patient (Patient ID and Issuer) a study's objects name: its pk, the row made if new."""
        who = identity(patient_id, issuer, study_uid)
        row = db.execute("SELECT pk FROM patients WHERE identity = ?", (who,)).fetchone()
        if row is not None:
            return row[0]
        return db.execute("INSERT INTO patients (patient_id, issuer, identity) VALUES (?, ?, ?)",
                          (patient_id, issuer, who)).lastrowid

    @staticmethod
    def _patient_columns(meta: ObjectMetadata) -> tuple:
        return (meta.patient_id, meta.issuer_of_patient_id, meta.patient_name, meta.patient_birth_date,
                meta.patient_sex, meta.patient_json)

    @staticmethod
    def _set_names(db: sqlite3.Connection, study_pk: int, name: str, replace: bool = True) -> None:
        """Each component group of the study's patient name, as stored and case/accent-folded, for C-FIND."""
        if replace:
            db.execute("DELETE FROM study_names WHERE study_pk = ?", (study_pk,))
        db.executemany("INSERT INTO study_names (study_pk, name, folded) VALUES (?, ?, ?)",
                       [(study_pk, group, fold(group)) for group in name_groups(name)])

    def _upsert_study(
        self, db: sqlite3.Connection, meta: ObjectMetadata, patient_pk: int, now: float
    ) -> Tuple[int, List[Conflict]]:
        row = db.execute("SELECT pk, patient_pk, patient_attributes, patient_stored_at, study_date, study_time, "
                         "accession_number, study_id, attributes FROM studies WHERE study_uid = ?",
                         (meta.study_instance_uid,)).fetchone()
        values = (meta.study_date, meta.study_time, meta.accession_number, meta.study_id, meta.study_json)
        if row is None:
            study_pk = db.execute(
                """INSERT INTO studies (patient_pk, study_uid, study_date, study_time, accession_number, study_id,
                       attributes, stored_at, accessed_at, patient_id, issuer, patient_name, birth_date, sex,
                       patient_attributes, patient_stored_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (patient_pk, meta.study_instance_uid) + values + (now, now) + self._patient_columns(meta) + (now,),
            ).lastrowid
            self._set_names(db, study_pk, meta.patient_name, replace=False)
            return study_pk, self._compare_with_patient(db, study_pk, patient_pk, meta, now)
        study_pk, old_patient_pk, old_attributes, patient_stored_at = row[:4]
        if row[4:] != values:  # (the common case, the study's objects agree, costs no write here)
            db.execute(
                """UPDATE studies SET study_date = ?, study_time = ?, accession_number = ?, study_id = ?,
                       attributes = ? WHERE pk = ?""",
                values + (study_pk,),
            )
        if old_attributes == meta.patient_json and old_patient_pk == patient_pk:
            return study_pk, []  # the common case: the study's objects agree
        conflicts: List[Conflict] = []
        differing = differences(old_attributes, meta.patient_json)
        if differing:
            conflicts.append(self._record(db, meta.study_instance_uid, "", self._ours(meta), differing, old_attributes,
                                          now))
        if now >= patient_stored_at:  # the most recently stored object's values stand
            db.execute(
                """UPDATE studies SET patient_pk = ?, patient_id = ?, issuer = ?, patient_name = ?, birth_date = ?,
                       sex = ?, patient_attributes = ?, patient_stored_at = ? WHERE pk = ?""",
                (patient_pk,) + self._patient_columns(meta) + (now, study_pk),
            )
            self._set_names(db, study_pk, meta.patient_name)
            if old_patient_pk != patient_pk:
                self._prune_patient(old_patient_pk)
            if differing:
                conflicts.extend(self._compare_with_patient(db, study_pk, patient_pk, meta, now))
        return study_pk, conflicts

    def _compare_with_patient(
        self, db: sqlite3.Connection, study_pk: int, patient_pk: int, meta: ObjectMetadata, now: float
    ) -> List[Conflict]:
        """Conflicts of a study's (new) patient attributes with the other studies of its patient."""
        others = db.execute(
            "SELECT study_uid, patient_attributes FROM studies WHERE patient_pk = ? AND pk != ? "
            "AND patient_attributes != ? LIMIT ?",
            (patient_pk, study_pk, meta.patient_json, MAX_COMPARED_STUDIES),
        ).fetchall()
        conflicts = []
        for other_uid, theirs in others:
            differing = differences(theirs, meta.patient_json)
            if differing:
                conflicts.append(self._record(db, meta.study_instance_uid, other_uid, self._ours(meta), differing, theirs,
                                              now))
        return conflicts

    @staticmethod
    def _record(
        db: sqlite3.Connection,
        study_uid: str,
        other_uid: str,
        ours: Tuple[str, str, str, str],
        differing: Tuple[str, ...],
        theirs: str,
        now: float,
    ) -> Conflict:
        """Record a conflict (counted again if the pair of studies already has it, either way round).

        ``ours``: (Patient ID, Issuer, patient JSON, SOP Instance UID) of the object that showed it;
        ``theirs``: the patient JSON it differs from.
        """
        patient_id, issuer, attributes_json, sop_uid = ours
        attributes = ",".join(differing)
        row = db.execute(
            "SELECT pk FROM conflicts WHERE attributes = ? AND ((study_uid = ? AND other_study_uid = ?) "
            "OR (study_uid = ? AND other_study_uid = ?))",
            (attributes, study_uid, other_uid, other_uid, study_uid),
        ).fetchone()
        if row is None:
            db.execute(
                "INSERT INTO conflicts (study_uid, other_study_uid, patient_id, issuer, attributes, sop_uid, "
                "first_seen, last_seen) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (study_uid, other_uid, patient_id, issuer, attributes, sop_uid, now, now),
            )
        else:
            db.execute("UPDATE conflicts SET occurrences = occurrences + 1, last_seen = ?, sop_uid = ? WHERE pk = ?",
                       (now, sop_uid, row[0]))
        values = tuple((keyword, value_text(theirs, keyword), value_text(attributes_json, keyword))
                       for keyword in differing)
        return Conflict(study_uid, patient_id, issuer, differing, other_uid, sop_uid, row is None, values)

    @staticmethod
    def _ours(meta: ObjectMetadata) -> Tuple[str, str, str, str]:
        return meta.patient_id, meta.issuer_of_patient_id, meta.patient_json, meta.sop_instance_uid

    def _upsert_series(self, db: sqlite3.Connection, meta: ObjectMetadata, study_pk: int) -> int:
        row = db.execute("SELECT pk, study_pk, modality, series_number, attributes FROM series WHERE series_uid = ?",
                         (meta.series_instance_uid,)).fetchone()
        if row is not None and row[1] != study_pk:
            (other,) = db.execute("SELECT study_uid FROM studies WHERE pk = ?", (row[1],)).fetchone()
            raise Misfiled(f"series {meta.series_instance_uid} belongs to study {other}")
        if row is not None:
            if row[2:] == (meta.modality, meta.series_number, meta.series_json):
                return row[0]
            db.execute(
                "UPDATE series SET modality = ?, series_number = ?, attributes = ? WHERE pk = ?",
                (meta.modality, meta.series_number, meta.series_json, row[0]),
            )
            return row[0]
        cursor = db.execute(
            "INSERT INTO series (study_pk, series_uid, modality, series_number, attributes) VALUES (?, ?, ?, ?, ?)",
            (study_pk, meta.series_instance_uid, meta.modality, meta.series_number, meta.series_json),
        )
        db.execute("UPDATE studies SET num_series = num_series + 1 WHERE pk = ?", (study_pk,))
        return cursor.lastrowid

    # --- removing ----------------------------------------------------------------

    def _remove_instance(self, sop_uid: str, path: Optional[str] = None) -> Optional[Tuple[int, int, int]]:
        """Delete one instance row (only if it names ``path``, when given) and maintain counters; returns its
        (series, study, patient) pks, or None when there is no such row."""
        db = self.db
        query = """SELECT i.pk, i.size, se.pk, st.pk, st.patient_pk FROM instances i
               JOIN series se ON i.series_pk = se.pk JOIN studies st ON se.study_pk = st.pk
               WHERE i.sop_uid = ?"""
        params: Tuple = (sop_uid,)
        if path is not None:
            query, params = query + " AND i.path = ?", (sop_uid, path)
        row = db.execute(query, params).fetchone()
        if row is None:
            return None
        instance_pk, size, series_pk, study_pk, patient_pk = row
        db.execute("DELETE FROM instances WHERE pk = ?", (instance_pk,))
        db.execute("UPDATE series SET num_instances = num_instances - 1 WHERE pk = ?", (series_pk,))
        db.execute("UPDATE studies SET num_instances = num_instances - 1, size = size - ? WHERE pk = ?", (size, study_pk))
        return series_pk, study_pk, patient_pk

    def _prune(self, series_pk: int, study_pk: int, patient_pk: int) -> None:
        """Remove a series, study and patient left without instances (and the conflicts of such a study)."""
        db = self.db
        if db.execute("SELECT num_instances FROM series WHERE pk = ?", (series_pk,)).fetchone()[0] == 0:
            db.execute("DELETE FROM series WHERE pk = ?", (series_pk,))
            db.execute("UPDATE studies SET num_series = num_series - 1 WHERE pk = ?", (study_pk,))
        study = db.execute("SELECT num_instances, study_uid, patient_pk FROM studies WHERE pk = ?", (study_pk,)).fetchone()
        if study[0] == 0:
            db.execute("DELETE FROM studies WHERE pk = ?", (study_pk,))
            db.execute("DELETE FROM conflicts WHERE study_uid = ? OR other_study_uid = ?", (study[1], study[1]))
            self._prune_patient(study[2])

    def _prune_patient(self, patient_pk: int) -> None:
        if self.db.execute("SELECT 1 FROM studies WHERE patient_pk = ? LIMIT 1", (patient_pk,)).fetchone() is None:
            self.db.execute("DELETE FROM patients WHERE pk = ?", (patient_pk,))

    def delete_instances(self, rows: Sequence[InstanceRow]) -> int:
        """:meth:`delete_instance` for each row (only while it names the same file), in one transaction;
        returns the bytes of the rows deleted."""
        freed = 0
        with self.transaction():
            for row in rows:
                parents = self._remove_instance(row.sop_uid, row.path)
                if parents is not None:
                    self._prune(*parents)
                    freed += row.size
        return freed

    def delete_instance(self, sop_uid: str, path: Optional[str] = None) -> bool:
        """Delete an instance's row (after its file was removed), with its series, study and patient when they
        are left empty; with ``path``, only if the row still names that file (an instance stored again since
        keeps its new row).  One transaction; False when there was no such row."""
        with self.transaction():
            parents = self._remove_instance(sop_uid, path)
            if parents is not None:
                self._prune(*parents)
        return parents is not None

    def study_instances(self, study_uid: str) -> List[InstanceRow]:
        rows = self.db.execute(
            """SELECT i.sop_uid, i.sop_class, st.study_uid, se.series_uid, i.transfer_syntax, i.path, i.size
               FROM instances i JOIN series se ON i.series_pk = se.pk JOIN studies st ON se.study_pk = st.pk
               WHERE st.study_uid = ? ORDER BY se.series_number, se.pk, i.instance_number, i.pk""",
            (study_uid,),
        ).fetchall()
        return [InstanceRow(*row) for row in rows]

    def retrieve_instances(
        self, study_uids: Sequence[str], series_uids: Sequence[str] = (), sop_uids: Sequence[str] = ()
    ) -> List[InstanceRow]:
        """The instances a retrieve names, with no relational matching (PS3.4 C.4.2.2.1).

        STUDY level: ``study_uids`` only, one or more.  SERIES level: one study
        UID and ``series_uids``.  IMAGE level: one study UID, one series UID and
        ``sop_uids``.  UIDs that match nothing are skipped.  In study, series,
        instance order; long lists are queried in chunks (SQLite's parameter limit).
        """
        columns = """SELECT i.sop_uid, i.sop_class, st.study_uid, se.series_uid, i.transfer_syntax, i.path, i.size
               FROM instances i JOIN series se ON i.series_pk = se.pk JOIN studies st ON se.study_pk = st.pk"""
        order = "ORDER BY st.pk, se.series_number, se.pk, i.instance_number, i.pk"
        if sop_uids:
            fixed, column, listed = (study_uids[0], series_uids[0]), "i.sop_uid", sop_uids
            where = "st.study_uid = ? AND se.series_uid = ? AND "
        elif series_uids:
            fixed, column, listed = (study_uids[0],), "se.series_uid", series_uids
            where = "st.study_uid = ? AND "
        else:
            fixed, column, listed = (), "st.study_uid", study_uids
            where = ""
        unique = list(dict.fromkeys(listed))
        found: List[InstanceRow] = []
        for start in range(0, len(unique), 500):
            chunk = unique[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            rows = self.db.execute(f"{columns} WHERE {where}{column} IN ({marks}) {order}", (*fixed, *chunk)).fetchall()
            found.extend(InstanceRow(*row) for row in rows)
        return found

    # --- storage management --------------------------------------------------------

    def total_size(self) -> int:
        return self.db.execute("SELECT COALESCE(SUM(size), 0) FROM studies").fetchone()[0]

    def touch_studies(self, study_uids: Sequence[str], now: float) -> None:
        """Mark studies accessed (stored, retrieved or viewed) now."""
        with self.transaction() as db:
            db.executemany("UPDATE studies SET accessed_at = ? WHERE study_uid = ?", [(now, uid) for uid in study_uids])

    def set_protected(self, study_uid: str, protected: bool) -> bool:
        """Protect a study from eviction (or lift it); False if there is no such study."""
        with self.transaction() as db:
            cursor = db.execute("UPDATE studies SET protected = ? WHERE study_uid = ?", (int(protected), study_uid))
        return cursor.rowcount > 0

    def eviction_order(self) -> Iterator[Tuple[str, int, float]]:
        """Unprotected studies, least recently accessed first: (study UID, size, accessed at)."""
        cursor = self.db.execute(
            "SELECT study_uid, size, accessed_at FROM studies WHERE protected = 0 ORDER BY accessed_at, pk"
        )
        yield from cursor

    def studies(self) -> List[StudyRow]:
        rows = self.db.execute(
            """SELECT study_uid, patient_id, patient_name, study_date, attributes, num_series, num_instances, size,
                      stored_at, accessed_at, protected
               FROM studies ORDER BY accessed_at DESC"""
        ).fetchall()
        return [StudyRow(*row[:-1], bool(row[-1])) for row in rows]

    def patients(self) -> List[Tuple[str, str, Tuple[str, ...], int, int]]:
        """(patient ID, issuer, the names its studies carry (most recently stored first), number of studies, total
        size) for every patient, by Patient ID."""
        rows = self.db.execute(
            """SELECT p.patient_id, p.issuer, st.patient_name, st.size FROM patients p
               JOIN studies st ON st.patient_pk = p.pk ORDER BY p.pk, st.patient_stored_at DESC, st.pk DESC"""
        ).fetchall()
        patients: Dict[Tuple[str, str], list] = {}
        order = []
        for patient_id, issuer, name, size in rows:
            key = (patient_id, issuer) if patient_id else (patient_id, f"{len(order)}")
            entry = patients.get(key)
            if entry is None:
                entry = patients[key] = [patient_id, issuer, [], 0, 0]
                order.append(key)
            if name not in entry[2]:
                entry[2].append(name)
            entry[3] += 1
            entry[4] += size
        listed = [(pid, issuer, tuple(names), studies, size) for pid, issuer, names, studies, size
                  in (patients[key] for key in order)]
        return sorted(listed, key=lambda row: (row[0], row[1], row[2]))

    def conflicts(self, study_uid: Optional[str] = None) -> List[ConflictRow]:
        """Recorded patient attribute conflicts (of one study, either side), newest first."""
        where, params = "", ()
        if study_uid is not None:
            where, params = "WHERE study_uid = ? OR other_study_uid = ?", (study_uid, study_uid)
        rows = self.db.execute(
            f"""SELECT study_uid, other_study_uid, patient_id, issuer, attributes, sop_uid, first_seen, last_seen,
                       occurrences FROM conflicts {where} ORDER BY last_seen DESC, pk DESC""", params
        ).fetchall()
        return [ConflictRow(row[0], row[1], row[2], row[3], tuple(row[4].split(",")), *row[5:]) for row in rows]

    def clear_conflicts(self, study_uid: Optional[str] = None) -> int:
        """Forget recorded conflicts (of one study, either side, or all); returns how many."""
        with self.transaction() as db:
            if study_uid is None:
                return db.execute("DELETE FROM conflicts").rowcount
            return db.execute("DELETE FROM conflicts WHERE study_uid = ? OR other_study_uid = ?",
                              (study_uid, study_uid)).rowcount

    def all_instances(self) -> Iterator[InstanceRow]:
        cursor = self.db.execute(
            """SELECT i.sop_uid, i.sop_class, st.study_uid, se.series_uid, i.transfer_syntax, i.path, i.size
               FROM instances i JOIN series se ON i.series_pk = se.pk JOIN studies st ON se.study_pk = st.pk"""
        )
        for row in cursor:
            yield InstanceRow(*row)

    def has_path(self, path: str) -> bool:
        return self.db.execute("SELECT 1 FROM instances WHERE path = ? LIMIT 1", (path,)).fetchone() is not None

    def counts(self) -> Tuple[int, int, int, int]:
        """(patients, studies, series, instances)."""
        return tuple(
            self.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
            for table in ("patients", "studies", "series", "instances")
        )


# --- upgrading -------------------------------------------------------------------------


def _upgrade_from_1(index: ArchiveIndex, read_object: ObjectReader) -> Upgrade:
    """Schema 1 -> 2: each study gets the patient attributes its own objects carry.

    Version 1 kept one set of patient attributes per Patient ID and Issuer,
    overwritten by whatever object was stored last, so a study could answer
    with a name its images do not carry.  Each study's most recently stored
    object is read from its file (before the transaction: the index stays
    readable meanwhile); where it cannot be read, the study keeps its
    patient's indexed values.  A study whose newest object names another
    Patient ID moves to that patient.  Studies of one patient whose
    attributes then differ are recorded as conflicts.  Everything else is
    one transaction: a crash leaves version 1, upgraded again at the next start.
    """
    db = index.db
    newest = db.execute(
        """SELECT st.pk, st.study_uid,
                  (SELECT i.path FROM instances i JOIN series se ON i.series_pk = se.pk
                   WHERE se.study_pk = st.pk ORDER BY i.stored_at DESC, i.pk DESC LIMIT 1),
                  (SELECT MAX(i.stored_at) FROM instances i JOIN series se ON i.series_pk = se.pk
                   WHERE se.study_pk = st.pk)
           FROM studies st"""
    ).fetchall()
    read: Dict[int, Tuple[ObjectMetadata, float]] = {}
    for study_pk, study_uid, path, stored_at in newest:
        meta = read_object(path) if path else None
        if meta is not None and meta.study_instance_uid == study_uid:
            read[study_pk] = (meta, stored_at)
    conflicts: List[Conflict] = []
    with index.transaction():
        for name in ("patients_name", "patients_birth_date", "patients_patient_id", "patient_names_name",
                     "patient_names_folded", "patient_names_patient"):
            db.execute(f"DROP INDEX IF EXISTS {name}")
        for column, definition in (("patient_id", "TEXT NOT NULL DEFAULT ''"), ("issuer", "TEXT NOT NULL DEFAULT ''"),
                                   ("patient_name", "TEXT NOT NULL DEFAULT ''"),
                                   ("birth_date", "TEXT NOT NULL DEFAULT ''"), ("sex", "TEXT NOT NULL DEFAULT ''"),
                                   ("patient_attributes", "TEXT NOT NULL DEFAULT '{}'"),
                                   ("patient_stored_at", "REAL NOT NULL DEFAULT 0")):
            db.execute(f"ALTER TABLE studies ADD COLUMN {column} {definition}")
        # first the patient's indexed values, for studies whose object cannot be read
        db.execute(
            """UPDATE studies SET (patient_id, issuer, patient_name, birth_date, sex, patient_attributes) =
                   (SELECT patient_id, issuer, patient_name, birth_date, sex, attributes FROM patients
                    WHERE patients.pk = studies.patient_pk), patient_stored_at = stored_at"""
        )
        db.execute("DROP TABLE patient_names")
        for column in ("patient_name", "birth_date", "sex", "attributes"):
            db.execute(f"ALTER TABLE patients DROP COLUMN {column}")
        for statement in _SCHEMA:
            db.execute(statement)
        for study_pk, (meta, stored_at) in read.items():
            patient_pk = index._patient(db, meta.patient_id, meta.issuer_of_patient_id, meta.study_instance_uid)
            db.execute(
                """UPDATE studies SET patient_pk = ?, patient_id = ?, issuer = ?, patient_name = ?, birth_date = ?,
                       sex = ?, patient_attributes = ?, patient_stored_at = ? WHERE pk = ?""",
                (patient_pk,) + index._patient_columns(meta) + (stored_at, study_pk),
            )
        for study_pk, name in db.execute("SELECT pk, patient_name FROM studies").fetchall():
            index._set_names(db, study_pk, name, replace=False)
        db.execute("DELETE FROM patients WHERE pk NOT IN (SELECT patient_pk FROM studies)")
        # studies of one patient that now disagree: each compared with those stored before it
        now = max((stored_at for _, _, _, stored_at in newest if stored_at is not None), default=0.0)
        disagreeing = db.execute(
            "SELECT patient_pk FROM studies GROUP BY patient_pk HAVING COUNT(DISTINCT patient_attributes) > 1"
        ).fetchall()
        for (patient_pk,) in disagreeing:
            studies = db.execute(
                "SELECT study_uid, patient_id, issuer, patient_attributes FROM studies WHERE patient_pk = ? "
                "ORDER BY patient_stored_at, pk", (patient_pk,)).fetchall()
            for position, (study_uid, patient_id, issuer, attributes) in enumerate(studies):
                for other_uid, _, _, theirs in studies[:position][-MAX_COMPARED_STUDIES:]:
                    differing = differences(theirs, attributes)
                    if differing:
                        conflicts.append(index._record(db, study_uid, other_uid, (patient_id, issuer, attributes, ""),
                                                       differing, theirs, now))
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
    return Upgrade(1, len(newest), len(read), len(newest) - len(read), tuple(conflicts))

