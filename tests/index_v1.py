"""An archive index as release 1 of the schema wrote it, for the upgrade tests.

The schema is version 1's, verbatim; :func:`add_v1` writes an object's rows as
version 1's ``ArchiveIndex.add`` did: one patient row per Patient ID and
Issuer, its name, birth date, sex and attributes overwritten by whatever
object was stored last (the defect version 2 fixes), and a study filed under
the patient of its first object.
"""

from __future__ import annotations

import sqlite3

from appliance.archive.matching import fold, name_groups
from appliance.dataset.metadata import ObjectMetadata

SCHEMA_V1 = """
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


def create_v1(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA foreign_keys=ON")
    db.executescript(SCHEMA_V1)
    db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    return db


def add_v1(db: sqlite3.Connection, meta: ObjectMetadata, path: str, size: int, transfer_syntax: str,
           source_ae: str, now: float) -> None:
    """Version 1's rows for one new object (no replacement: the tests store each instance once)."""
    db.execute("BEGIN IMMEDIATE")
    identity = (f"id\\{meta.patient_id}\\{meta.issuer_of_patient_id}" if meta.patient_id
                else f"study\\{meta.study_instance_uid}")
    values = (meta.patient_name, meta.patient_birth_date, meta.patient_sex, meta.patient_json)
    row = db.execute("SELECT pk FROM patients WHERE identity = ?", (identity,)).fetchone()
    if row is not None:
        patient_pk = row[0]
        db.execute("UPDATE patients SET patient_name = ?, birth_date = ?, sex = ?, attributes = ? WHERE pk = ?",
                   values + (patient_pk,))
        db.execute("DELETE FROM patient_names WHERE patient_pk = ?", (patient_pk,))
    else:
        patient_pk = db.execute(
            "INSERT INTO patients (patient_id, issuer, patient_name, birth_date, sex, attributes, identity)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)", (meta.patient_id, meta.issuer_of_patient_id) + values + (identity,),
        ).lastrowid
    db.executemany("INSERT INTO patient_names (patient_pk, name, folded) VALUES (?, ?, ?)",
                   [(patient_pk, group, fold(group)) for group in name_groups(meta.patient_name)])
    study = (meta.study_date, meta.study_time, meta.accession_number, meta.study_id, meta.study_json)
    row = db.execute("SELECT pk FROM studies WHERE study_uid = ?", (meta.study_instance_uid,)).fetchone()
    if row is not None:
        study_pk = row[0]
        db.execute("UPDATE studies SET study_date = ?, study_time = ?, accession_number = ?, study_id = ?, "
                   "attributes = ?, accessed_at = ? WHERE pk = ?", study + (now, study_pk))
    else:
        study_pk = db.execute(
            "INSERT INTO studies (patient_pk, study_uid, study_date, study_time, accession_number, study_id, "
            "attributes, stored_at, accessed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (patient_pk, meta.study_instance_uid) + study + (now, now)).lastrowid
    row = db.execute("SELECT pk FROM series WHERE series_uid = ?", (meta.series_instance_uid,)).fetchone()
    if row is not None:
        series_pk = row[0]
        db.execute("UPDATE series SET modality = ?, series_number = ?, attributes = ? WHERE pk = ?",
                   (meta.modality, meta.series_number, meta.series_json, series_pk))
    else:
        series_pk = db.execute(
            "INSERT INTO series (study_pk, series_uid, modality, series_number, attributes) VALUES (?, ?, ?, ?, ?)",
            (study_pk, meta.series_instance_uid, meta.modality, meta.series_number, meta.series_json)).lastrowid
        db.execute("UPDATE studies SET num_series = num_series + 1 WHERE pk = ?", (study_pk,))
    db.execute(
        "INSERT INTO instances (series_pk, sop_uid, sop_class, instance_number, transfer_syntax, path, size, "
        "source_ae, stored_at, attributes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (series_pk, meta.sop_instance_uid, meta.sop_class_uid, meta.instance_number, transfer_syntax, path, size,
         source_ae, now, meta.instance_json))
    db.execute("UPDATE series SET num_instances = num_instances + 1 WHERE pk = ?", (series_pk,))
    db.execute("UPDATE studies SET num_instances = num_instances + 1, size = size + ? WHERE pk = ?",
               (size, study_pk))
    db.execute("COMMIT")
