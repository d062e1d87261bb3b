"""The archive's index: an embedded SQLite database of patients, studies, series and instances.

Synchronous and thread-confined: the server calls it from its one database
thread, ``appliance-archive`` from its own process (SQLite's WAL mode and
busy timeout make the two safe together).  Values come in through SQL
parameters only.

Each level keeps the columns C-FIND matches on most (indexed), its other
query attributes in the DICOM JSON model, and the counters PS3.4 computes
(number of related series and instances).  Studies carry the archive's
storage management state: size, stored and last-accessed times, protection.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

from .matching import fold, name_groups
from .metadata import ObjectMetadata

__all__ = ["ArchiveIndex", "InstanceRow", "StudyRow", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS patients (
    pk INTEGER PRIMARY KEY,
    patient_id TEXT NOT NULL,
    issuer TEXT NOT NULL,
    patient_name TEXT NOT NULL,
    birth_date TEXT NOT NULL,
    sex TEXT NOT NULL,
    attributes TEXT NOT NULL,
    -- who the patient is: Patient ID and Issuer, or, without a Patient ID, the study
    identity TEXT NOT NULL UNIQUE
);
CREATE INDEX IF NOT EXISTS patients_name ON patients (patient_name);
-- C-FIND on Patient ID (p.patient_id IN (...)): without it every query scans all patients
CREATE INDEX IF NOT EXISTS patients_patient_id ON patients (patient_id);
CREATE TABLE IF NOT EXISTS patient_names (
    patient_pk INTEGER NOT NULL REFERENCES patients (pk) ON DELETE CASCADE,
    name TEXT NOT NULL,
    folded TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS patient_names_name ON patient_names (name);
CREATE INDEX IF NOT EXISTS patient_names_folded ON patient_names (folded);
CREATE INDEX IF NOT EXISTS patient_names_patient ON patient_names (patient_pk);
CREATE INDEX IF NOT EXISTS patients_birth_date ON patients (birth_date);
CREATE TABLE IF NOT EXISTS studies (
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
    protected INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS studies_patient ON studies (patient_pk);
CREATE INDEX IF NOT EXISTS studies_date ON studies (study_date, study_time);
CREATE INDEX IF NOT EXISTS studies_accession ON studies (accession_number);
CREATE INDEX IF NOT EXISTS studies_lru ON studies (protected, accessed_at);
CREATE TABLE IF NOT EXISTS series (
    pk INTEGER PRIMARY KEY,
    study_pk INTEGER NOT NULL REFERENCES studies (pk),
    series_uid TEXT NOT NULL UNIQUE,
    modality TEXT NOT NULL,
    series_number INTEGER,
    attributes TEXT NOT NULL,
    num_instances INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS series_study ON series (study_pk);
CREATE INDEX IF NOT EXISTS series_modality ON series (modality);
CREATE TABLE IF NOT EXISTS instances (
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
);
CREATE INDEX IF NOT EXISTS instances_series ON instances (series_pk);
CREATE INDEX IF NOT EXISTS instances_sop_class ON instances (sop_class);
CREATE INDEX IF NOT EXISTS instances_path ON instances (path);
"""


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


class ArchiveIndex:
    """One SQLite connection to the index at ``path`` (created on first use)."""

    def __init__(self, path: str) -> None:
        self.path = path
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        self.db = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL: the WAL is synced at checkpoints, not at every commit.  A power cut may
        # drop the last commits, never corrupt the database; the objects they indexed are
        # fsynced files that the start-up reconciliation indexes again (archive._reconcile).
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(_SCHEMA)  # idempotent; executescript commits on its own
        with self.transaction():
            row = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                self.db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise RuntimeError(f"{path}: index schema version {row[0]}, this release reads {SCHEMA_VERSION}")

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
    ) -> Optional[InstanceRow]:
        """Index a stored object (replacing any instance with its SOP Instance UID).

        Returns the replaced instance's row, whose file the caller removes
        if its path differs.  One transaction.
        """
        with self.transaction() as db:
            previous = self.lookup(meta.sop_instance_uid)
            if previous is not None:
                self._delete_instance(previous.sop_uid)
            patient_pk = self._upsert_patient(db, meta)
            study_pk = self._upsert_study(db, meta, patient_pk, now)
            series_pk = self._upsert_series(db, meta, study_pk)
            db.execute(
                """INSERT INTO instances (series_pk, sop_uid, sop_class, instance_number, transfer_syntax,
                       path, size, source_ae, stored_at, attributes)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (series_pk, meta.sop_instance_uid, meta.sop_class_uid, meta.instance_number, transfer_syntax,
                 path, size, source_ae, now, meta.instance_json),
            )
            db.execute("UPDATE series SET num_instances = num_instances + 1 WHERE pk = ?", (series_pk,))
            db.execute(
                "UPDATE studies SET num_instances = num_instances + 1, size = size + ? WHERE pk = ?",
                (size, study_pk),
            )
        return previous

    @staticmethod
    def patient_identity(meta: ObjectMetadata) -> str:
        """Objects with the same Patient ID and Issuer belong to one patient; without a Patient ID
        nothing says two studies share a patient, so each such study has a patient of its own."""
        if meta.patient_id:
            return f"id\\{meta.patient_id}\\{meta.issuer_of_patient_id}"
        return f"study\\{meta.study_instance_uid}"

    def _upsert_patient(self, db: sqlite3.Connection, meta: ObjectMetadata) -> int:
        identity = self.patient_identity(meta)
        row = db.execute("SELECT pk FROM patients WHERE identity = ?", (identity,)).fetchone()
        values = (meta.patient_name, meta.patient_birth_date, meta.patient_sex, meta.patient_json)
        if row is not None:
            pk = row[0]
            db.execute(
                "UPDATE patients SET patient_name = ?, birth_date = ?, sex = ?, attributes = ? WHERE pk = ?",
                values + (pk,),
            )
            db.execute("DELETE FROM patient_names WHERE patient_pk = ?", (pk,))
        else:
            pk = db.execute(
                "INSERT INTO patients (patient_id, issuer, patient_name, birth_date, sex, attributes, identity)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (meta.patient_id, meta.issuer_of_patient_id) + values + (identity,),
            ).lastrowid
        # each component group of the name, as stored and case/accent-folded, for C-FIND
        db.executemany(
            "INSERT INTO patient_names (patient_pk, name, folded) VALUES (?, ?, ?)",
            [(pk, group, fold(group)) for group in name_groups(meta.patient_name)],
        )
        return pk

    def _upsert_study(self, db: sqlite3.Connection, meta: ObjectMetadata, patient_pk: int, now: float) -> int:
        row = db.execute("SELECT pk FROM studies WHERE study_uid = ?", (meta.study_instance_uid,)).fetchone()
        values = (meta.study_date, meta.study_time, meta.accession_number, meta.study_id, meta.study_json)
        if row is not None:
            db.execute(
                """UPDATE studies SET study_date = ?, study_time = ?, accession_number = ?, study_id = ?,
                       attributes = ?, accessed_at = ? WHERE pk = ?""",
                values + (now, row[0]),
            )
            return row[0]
        cursor = db.execute(
            """INSERT INTO studies (patient_pk, study_uid, study_date, study_time, accession_number, study_id,
                   attributes, stored_at, accessed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (patient_pk, meta.study_instance_uid) + values + (now, now),
        )
        return cursor.lastrowid

    def _upsert_series(self, db: sqlite3.Connection, meta: ObjectMetadata, study_pk: int) -> int:
        row = db.execute("SELECT pk, study_pk FROM series WHERE series_uid = ?", (meta.series_instance_uid,)).fetchone()
        if row is not None:
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

    def _delete_instance(self, sop_uid: str) -> None:
        """Delete one instance row and maintain counters; empty series, studies and patients go too."""
        db = self.db
        row = db.execute(
            """SELECT i.pk, i.size, se.pk, st.pk, st.patient_pk FROM instances i
               JOIN series se ON i.series_pk = se.pk JOIN studies st ON se.study_pk = st.pk
               WHERE i.sop_uid = ?""",
            (sop_uid,),
        ).fetchone()
        if row is None:
            return
        instance_pk, size, series_pk, study_pk, patient_pk = row
        db.execute("DELETE FROM instances WHERE pk = ?", (instance_pk,))
        db.execute("UPDATE series SET num_instances = num_instances - 1 WHERE pk = ?", (series_pk,))
        db.execute("UPDATE studies SET num_instances = num_instances - 1, size = size - ? WHERE pk = ?", (size, study_pk))
        if db.execute("SELECT num_instances FROM series WHERE pk = ?", (series_pk,)).fetchone()[0] == 0:
            db.execute("DELETE FROM series WHERE pk = ?", (series_pk,))
            db.execute("UPDATE studies SET num_series = num_series - 1 WHERE pk = ?", (study_pk,))
        if db.execute("SELECT num_instances FROM studies WHERE pk = ?", (study_pk,)).fetchone()[0] == 0:
            db.execute("DELETE FROM studies WHERE pk = ?", (study_pk,))
            if db.execute("SELECT 1 FROM studies WHERE patient_pk = ? LIMIT 1", (patient_pk,)).fetchone() is None:
                db.execute("DELETE FROM patients WHERE pk = ?", (patient_pk,))

    def delete_instances(self, sop_uids: Iterable[str]) -> None:
        """Delete instance rows (after their files were removed), in one transaction."""
        with self.transaction():
            for sop_uid in sop_uids:
                self._delete_instance(sop_uid)

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
            """SELECT st.study_uid, p.patient_id, p.patient_name, st.study_date, st.attributes, st.num_series,
                      st.num_instances, st.size, st.stored_at, st.accessed_at, st.protected
               FROM studies st JOIN patients p ON st.patient_pk = p.pk ORDER BY st.accessed_at DESC"""
        ).fetchall()
        return [StudyRow(*row[:-1], bool(row[-1])) for row in rows]

    def patients(self) -> List[Tuple[str, str, int, int]]:
        """(patient ID, name, number of studies, total size) for every patient."""
        return self.db.execute(
            """SELECT p.patient_id, p.patient_name, COUNT(st.pk), COALESCE(SUM(st.size), 0)
               FROM patients p LEFT JOIN studies st ON st.patient_pk = p.pk
               GROUP BY p.pk ORDER BY p.patient_name, p.patient_id"""
        ).fetchall()

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
