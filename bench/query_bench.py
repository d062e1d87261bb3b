#!/usr/bin/env python3
"""Query/retrieve benchmark (issue 4): C-FIND and C-MOVE of the Disk-Server against Orthanc.

Usage (from the repository root; ``make bench`` runs it after store_bench.py, ``make bench-query``
alone, options through ``BENCH_ARGS`` or ``QUERY_BENCH_ARGS``)::

    PYTHONPATH=. .venv/bin/python bench/query_bench.py [--repeat N] [--no-scale] [--no-move]
                                                       [--load-associations N] [--universal-1m-repeat N]

What it does:

* builds, once, a query corpus under ``bench/.corpus/query/``: 21,200 small
  Part 10 files (8x8 16-bit pixels, ~1 KB each) in 4,024 studies of 2,012
  patients (two studies each), 200 of them named ``Smith^...`` (400 studies),
  study dates spread over 2014-2023 so that the range 20220101-20230331 holds
  ~500 studies, CT/MR/CR/DX/US series, one or two series per study; all
  values come from a seeded generator, so the expected match counts are known
  (``bench/.corpus/query.json``);
* builds, once, a one-study copy of store_bench's large corpus (200 CT images
  of 512x512 16-bit, ~0.5 MB each, same builder) in ``bench/.corpus/move/``;
* builds, once, a 1,000,000-instance index for the scaling measurement
  (``bench/.corpus/query-1m/index.sqlite``): the same 4,024 studies with the
  same values, plus 185,786 other studies (978,800 instances) of patients
  who are not Smith, dated 1995-2013, written straight into an SQLite
  database made by :class:`appliance.archive.index.ArchiveIndex` (bulk
  ``executemany`` in one transaction, ``synchronous=OFF`` and the secondary
  indexes built after the rows, during the build only).  The filler leaves
  the Patient ID, name and date-range answers exactly as at 20k, so the 1M/20k
  ratio is the cost of the archive's size, not of a longer answer.  Rows are
  checked against what ``ArchiveIndex.add(extract(ds))`` writes for the same
  objects.  The files are not written (C-FIND never opens them): every
  synthesized row names one placeholder file, so the start-up check, which
  drops rows whose file is missing, keeps them;
* starts, on 127.0.0.1 and free ports: DCMTK ``storescp`` as the C-MOVE
  destination (AE ``MOVESCP``), our appliance (twistd) on an empty archive,
  Orthanc (Debian's package, its SQLite index, default options but for the
  ports, C-FIND/C-MOVE allowed from any AE, the destination in
  ``DicomModalities`` and ``StableAge`` 2 s so that its studies-become-stable
  work is over before the measurements), all with ``TCP_NODELAY=1`` for the
  DCMTK network layer; waits for C-ECHO (bounded attempts);
* loads the query corpus into the appliance, then into Orthanc, with
  ``storescu`` (``--load-associations`` parallel associations, default 4), and
  prints the loading times (not a measured quantity);
* starts a second appliance on a copy of the 1M index and waits for its
  start-up check to end;
* waits (at most 2 minutes) for the CPUs to be idle for 3 s in a row before
  the C-FIND and the C-MOVE measurements;
* C-FIND: study level, Study Root, keys PatientName, PatientID, StudyDate,
  StudyInstanceUID, ModalitiesInStudy, NumberOfStudyRelatedInstances, for
  four queries: one Patient ID, PatientName=Smith*, StudyDate=20220101-20230331,
  and the universal query.  One untimed warm-up of each on each server, then
  ``--repeat`` rounds, each timing one ``findscu -v -sr`` process per (query,
  server), servers in an order rotating from round to round.  The time is
  the wall time of the findscu process (``time.perf_counter`` around it):
  process start-up, association and release included, for every server
  alike.  Every run's matches are counted from findscu's "Find Response"
  lines and checked against the expected count and the final Success;
  ``-sr`` keeps the identifiers' dumps out of the output.  The universal
  query on the 1M index (189,810 studies) is timed ``--universal-1m-repeat``
  times (default 1) after the rounds: it grows linearly by nature;
* patient attribute conflicts (issue 8), unless ``--no-conflicts``: a corpus of
  2,000 studies, one image each, of 1,000 Patient IDs whose two studies carry
  different names (and half of them different birth dates), stored in a fresh
  appliance and a fresh Orthanc; three queries (``PatientName=Smith*``,
  ``PatientName=Jone?^Pat0001*``, ``PatientName=Rossi*`` with
  ``ModalitiesInStudy=NM``) are answered once by each, and each answer is
  checked against the studies whose own objects match: matches returned,
  matches expected, and answers under a name their study's objects do not carry;
* C-MOVE: stores the move corpus in both servers, then per round times one
  ``movescu`` STUDY-level move of the 200 images to storescp per server
  (one untimed warm-up each) and checks that storescp received 200 files;
* prints medians, our/Orthanc ratios and the 1M/20k ratios, the findscu
  process start-up alone (``findscu --version``), the SQLite plans of our four
  queries on the 1M index, and writes everything as JSON to
  ``bench/results/query-<timestamp>.json``.

Needs DCMTK (findscu, movescu, storescu, storescp, echoscu) and Orthanc; ``make bench``
installs both.  Every server is killed (its whole process group) whatever happens.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import random
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from types import SimpleNamespace
from typing import Dict, Iterator, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import store_bench as sb  # noqa: E402  (shared helpers: servers, corpora, tools)
from store_bench import HOST, BenchError  # noqa: E402

CORPUS_DIR = sb.CORPUS_DIR
RESULTS_DIR = sb.RESULTS_DIR
QUERY_CORPUS = os.path.join(CORPUS_DIR, "query")
QUERY_MANIFEST = os.path.join(CORPUS_DIR, "query.json")
SCALE_DIR = os.path.join(CORPUS_DIR, "query-1m")
QUERY_CORPUS_VERSION = 1
CONFLICT_CORPUS = os.path.join(CORPUS_DIR, "conflicts")
CONFLICT_CORPUS_VERSION = 1
N_CONFLICT_PATIENTS = 1000
SCALE_VERSION = 1

EXPLICIT_VR_LITTLE_ENDIAN = sb.EXPLICIT_VR_LITTLE_ENDIAN
N_STUDIES = 4024
N_INSTANCES = 21200
N_SMITH_PATIENTS = 200            # two studies each: 400 Smith studies
SCALE_INSTANCES = 1_000_000
DATE_RANGE = ("20220101", "20230331")
CORPUS_DATES = (datetime.date(2014, 1, 1), datetime.date(2023, 12, 31))
FILLER_DATES = (datetime.date(1995, 1, 1), datetime.date(2013, 12, 31))
QUERY_PATIENT = 1000              # index of the patient of the one-Patient-ID query
PLACEHOLDER = os.path.join("objects", "bench", "placeholder.dcm")
SOURCE_AE = "STORESCU"

LOAD_TIMEOUT = 900
FIND_TIMEOUT = 120
FIND_1M_UNIVERSAL_TIMEOUT = 900
MOVE_TIMEOUT = 300
READY_TIMEOUT = 300               # seconds for an appliance's start-up check of its archive

MOVE_CORPUS = dict(count=200, studies=1, size=(512, 512), label="200 CT 512x512 (~0.5 MB) in one study")
MOVE_DEST_AET = "MOVESCP"
FIND_AET = "QBENCHFIND"
MOVE_AET = "QBENCHMOVE"

SOP_CLASSES = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "CR": "1.2.840.10008.5.1.4.1.1.1",
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",
    "US": "1.2.840.10008.5.1.4.1.1.6.1",
    "NM": "1.2.840.10008.5.1.4.1.1.20",
}
MODALITY_WEIGHTS = (("CT", 35), ("MR", 25), ("CR", 15), ("DX", 15), ("US", 10))
DESCRIPTIONS = {
    "CT": ("CT CHEST", "CT ABDOMEN", "CT HEAD"), "MR": ("MR BRAIN", "MR KNEE", "MR SPINE"),
    "CR": ("CR CHEST", "CR HAND"), "DX": ("DX CHEST", "DX PELVIS"), "US": ("US ABDOMEN", "US THYROID"),
}
SURNAMES = (
    "Jones", "Brown", "Taylor", "Wilson", "Davies", "Evans", "Thomas", "Johnson", "Roberts", "Walker",
    "Wright", "Robinson", "Thompson", "White", "Hughes", "Edwards", "Green", "Hall", "Wood", "Harris",
    "Lewis", "Martin", "Jackson", "Clarke", "Clark", "Turner", "Hill", "Scott", "Cooper", "Morris",
    "Ward", "Moore", "King", "Watson", "Baker", "Harrison", "Morgan", "Patel", "Young", "Allen",
    "Mitchell", "James", "Anderson", "Phillips", "Lee", "Bell", "Parker", "Davis", "Muller", "Garcia",
    "Martinez", "Rossi", "Dubois", "Kowalski", "Novak", "Silva", "Santos", "Lopez", "Schmidt", "Fischer",
)
GIVEN_NAMES = (
    "John", "Mary", "David", "Susan", "Peter", "Anna", "James", "Linda", "Paul", "Karen", "Mark", "Laura",
    "Tom", "Emma", "Luke", "Sarah", "Adam", "Julia", "Simon", "Helen", "Eric", "Alice", "Ivan", "Nora",
)
REFERRING = ("Ref^Alpha", "Ref^Beta", "Ref^Gamma", "Ref^Delta", "")
UID_NAMESPACE = uuid.UUID("6f1c1e5a-3b1d-4c1e-9a55-0d0c2b7a4e01")

# queries: name -> (label, matching keys)
QUERIES = {
    "patient_id": ("one Patient ID", None),  # the Patient ID is filled in from the corpus
    "name": ("PatientName=Smith*", {"PatientName": "Smith*"}),
    "date_range": (f"StudyDate={DATE_RANGE[0]}-{DATE_RANGE[1]}", {"StudyDate": f"{DATE_RANGE[0]}-{DATE_RANGE[1]}"}),
    "universal": ("universal (all studies)", {}),
}
RETURN_KEYS = ("PatientName", "PatientID", "StudyDate", "StudyInstanceUID", "ModalitiesInStudy",
               "NumberOfStudyRelatedInstances")
#: the issue's Orthanc figures (SQLite, 21,200 instances in 4,024 studies, findscu)
ISSUE_ORTHANC = {"patient_id": 0.028, "name": 0.086, "date_range": 0.066, "universal": 0.42, "move": 0.32}


# --------------------------------------------------------------------------- the generator


def _uid(*parts) -> str:
    return "2.25." + str(uuid.uuid5(UID_NAMESPACE, "/".join(str(p) for p in parts)).int)


def _date(rng: random.Random, span: Tuple[datetime.date, datetime.date]) -> str:
    days = (span[1] - span[0]).days
    return (span[0] + datetime.timedelta(days=rng.randrange(days + 1))).strftime("%Y%m%d")


def _modality(rng: random.Random) -> str:
    pick = rng.randrange(sum(w for _, w in MODALITY_WEIGHTS))
    for modality, weight in MODALITY_WEIGHTS:
        if pick < weight:
            return modality
        pick -= weight
    raise AssertionError


def generate(kind: str, n_studies: int, n_instances: int, smith_patients: int,
             dates: Tuple[datetime.date, datetime.date], seed: int) -> Iterator[dict]:
    """Deterministic studies: two per patient; ``smith_patients`` of the patients are Smith^..."""
    rng = random.Random(seed)
    n_patients = -(-n_studies // 2)
    smiths = set(rng.sample(range(n_patients), smith_patients)) if smith_patients else set()
    base, extra = divmod(n_instances, n_studies)
    bigger = set(rng.sample(range(n_studies), extra))
    patient = None
    for s in range(n_studies):
        p = s // 2
        if s % 2 == 0:
            surname = "Smith" if p in smiths else SURNAMES[rng.randrange(len(SURNAMES))]
            patient = {
                "pid": f"{kind.upper()}{p:07d}",
                "name": f"{surname}^{GIVEN_NAMES[rng.randrange(len(GIVEN_NAMES))]}",
                "birth": _date(rng, (datetime.date(1930, 1, 1), datetime.date(2010, 12, 31))),
                "sex": "MFO"[rng.randrange(3)],
            }
        count = base + (1 if s in bigger else 0)
        first = _modality(rng)
        modalities = [first] if rng.random() < 0.7 else [first, first if rng.random() < 0.5 else _modality(rng)]
        series = []
        left = count
        for j, modality in enumerate(modalities):
            n = -(-left // (len(modalities) - j))
            left -= n
            series.append({
                "uid": _uid(kind, "series", s, j), "modality": modality, "number": j + 1,
                "description": DESCRIPTIONS[modality][rng.randrange(len(DESCRIPTIONS[modality]))],
                "instances": [_uid(kind, "sop", s, j, k) for k in range(n)],
            })
        yield {
            "index": s, "patient_index": p, "patient": patient, "uid": _uid(kind, "study", s),
            "date": _date(rng, dates),
            "time": f"{rng.randrange(7, 19):02d}{rng.randrange(60):02d}{rng.randrange(60):02d}",
            "accession": f"{kind.upper()}A{s:07d}", "study_id": str(s + 1),
            "description": series[0]["description"], "referring": REFERRING[rng.randrange(len(REFERRING))],
            "series": series,
        }


def corpus_studies() -> Iterator[dict]:
    return generate("qb", N_STUDIES, N_INSTANCES, N_SMITH_PATIENTS, CORPUS_DATES, seed=4024)


def filler_studies() -> Iterator[dict]:
    n_instances = SCALE_INSTANCES - N_INSTANCES
    n_studies = round(n_instances * N_STUDIES / N_INSTANCES)
    return generate("qf", n_studies, n_instances, 0, FILLER_DATES, seed=1000000)


def expected_counts(studies: List[dict]) -> dict:
    patient_id = next(s["patient"]["pid"] for s in studies if s["patient_index"] == QUERY_PATIENT)
    return {
        "patient_id_value": patient_id,
        "patient_id": sum(1 for s in studies if s["patient"]["pid"] == patient_id),
        "name": sum(1 for s in studies if s["patient"]["name"].startswith("Smith")),
        "date_range": sum(1 for s in studies if DATE_RANGE[0] <= s["date"] <= DATE_RANGE[1]),
        "universal": len(studies),
        "patients": len({s["patient"]["pid"] for s in studies}),
        "studies": len(studies),
        "series": sum(len(s["series"]) for s in studies),
        "instances": sum(len(se["instances"]) for s in studies for se in s["series"]),
    }


# --------------------------------------------------------------------------- the query corpus


def _dataset(study: dict, series: dict, number: int, sop_uid: str):
    """One small Part 10 object (8x8 16-bit pixels)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(EXPLICIT_VR_LITTLE_ENDIAN)
    ds.file_meta.MediaStorageSOPClassUID = SOP_CLASSES[series["modality"]]
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = SOP_CLASSES[series["modality"]]
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = study["date"]
    ds.StudyTime = study["time"]
    ds.AccessionNumber = study["accession"]
    ds.Modality = series["modality"]
    ds.ReferringPhysicianName = study["referring"]
    ds.StudyDescription = study["description"]
    ds.SeriesDescription = series["description"]
    patient = study["patient"]
    ds.PatientName = patient["name"]
    ds.PatientID = patient["pid"]
    ds.PatientBirthDate = patient["birth"]
    ds.PatientSex = patient["sex"]
    ds.StudyInstanceUID = study["uid"]
    ds.SeriesInstanceUID = series["uid"]
    ds.StudyID = study["study_id"]
    ds.SeriesNumber = series["number"]
    ds.InstanceNumber = number
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = 8
    ds.Columns = 8
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(range(128))
    ds["PixelData"].VR = "OW"
    return ds


def _dir_stats(directory: str) -> dict:
    files = 0
    total = 0
    for root, _, names in os.walk(directory):
        for name in names:
            if name.endswith(".dcm"):
                files += 1
                total += os.path.getsize(os.path.join(root, name))
    return {"files": files, "bytes": total}


def ensure_query_corpus(parts: int) -> dict:
    """The query corpus files (built if missing or stale) and the expected answers."""
    try:
        with open(QUERY_MANIFEST) as handle:
            manifest = json.load(handle)
    except (OSError, ValueError):
        manifest = {}
    if (manifest.get("version") == QUERY_CORPUS_VERSION and manifest.get("parts") == parts
            and os.path.isdir(QUERY_CORPUS) and _dir_stats(QUERY_CORPUS) == manifest.get("stats")):
        return manifest
    print(f"building the query corpus: {N_INSTANCES:,} instances in {N_STUDIES:,} studies into {QUERY_CORPUS} ...",
          flush=True)
    started = time.perf_counter()
    studies = list(corpus_studies())
    staging = QUERY_CORPUS + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    for part in range(parts):
        os.makedirs(os.path.join(staging, f"part{part}"))
    written = 0
    for study in studies:
        part = os.path.join(staging, f"part{study['index'] % parts}")
        for series in study["series"]:
            for k, sop_uid in enumerate(series["instances"]):
                sb._write(_dataset(study, series, k + 1, sop_uid), os.path.join(part, f"{written:06d}.dcm"))
                written += 1
    shutil.rmtree(QUERY_CORPUS, ignore_errors=True)
    os.replace(staging, QUERY_CORPUS)
    manifest = {"version": QUERY_CORPUS_VERSION, "parts": parts, "stats": _dir_stats(QUERY_CORPUS),
                "expected": expected_counts(studies)}
    with open(QUERY_MANIFEST + ".tmp", "w") as handle:
        json.dump(manifest, handle, indent=1)
    os.replace(QUERY_MANIFEST + ".tmp", QUERY_MANIFEST)
    print(f"  built in {time.perf_counter() - started:.1f} s", flush=True)
    return manifest


def ensure_move_corpus() -> dict:
    """store_bench's large corpus builder (512x512 16-bit CT), 200 images in one study."""
    sb.CORPORA.setdefault("move", MOVE_CORPUS)
    return sb.ensure_corpora(["move"])["move"]


# --------------------------------------------------------------------------- the 1M index


def _pn(name: str) -> dict:
    return {"vr": "PN", "Value": [{"Alphabetic": name}]} if name else {"vr": "PN"}


def _dumps(level: dict) -> str:
    return json.dumps(level, sort_keys=True, ensure_ascii=False)


class Synthesizer:
    """Bulk rows for the index, the same as ArchiveIndex.add(extract(ds)) writes for _dataset()'s objects."""

    def __init__(self, db: sqlite3.Connection, file_size: int, now: float) -> None:
        from appliance.archive.index import ArchiveIndex
        from appliance.archive.matching import fold, name_groups, normalize_name

        self.db = db
        self.file_size = file_size
        self.now = now
        self.identity = ArchiveIndex.patient_identity
        self.fold, self.name_groups, self.normalize_name = fold, name_groups, normalize_name
        self.next_pk = {table: (db.execute(f"SELECT COALESCE(MAX(pk), 0) FROM {table}").fetchone()[0] + 1)
                        for table in ("patients", "studies", "series", "instances")}
        self.patient_pks: Dict[str, int] = {}
        self.rows: Dict[str, list] = {t: [] for t in ("patients", "study_names", "studies", "series", "instances")}

    def _pk(self, table: str) -> int:
        pk = self.next_pk[table]
        self.next_pk[table] = pk + 1
        return pk

    def add_study(self, study: dict) -> None:
        patient = study["patient"]
        name = self.normalize_name(patient["name"])
        patient_pk = self.patient_pks.get(patient["pid"])
        if patient_pk is None:
            patient_pk = self.patient_pks[patient["pid"]] = self._pk("patients")
            identity = self.identity(SimpleNamespace(patient_id=patient["pid"], issuer_of_patient_id="",
                                                     study_instance_uid=study["uid"]))
            self.rows["patients"].append((patient_pk, patient["pid"], "", identity))
        # each study keeps its patient attributes (ArchiveIndex: the study's own objects')
        patient_attributes = _dumps({
            "00100010": _pn(name), "00100020": {"vr": "LO", "Value": [patient["pid"]]},
            "00100030": {"vr": "DA", "Value": [patient["birth"]]}, "00100040": {"vr": "CS", "Value": [patient["sex"]]},
        })
        study_pk = self._pk("studies")
        self.rows["study_names"].extend((study_pk, group, self.fold(group)) for group in self.name_groups(name))
        attributes = _dumps({
            "00080020": {"vr": "DA", "Value": [study["date"]]}, "00080030": {"vr": "TM", "Value": [study["time"]]},
            "00080050": {"vr": "SH", "Value": [study["accession"]]}, "00080090": _pn(study["referring"]),
            "00081030": {"vr": "LO", "Value": [study["description"]]},
            "0020000D": {"vr": "UI", "Value": [study["uid"]]}, "00200010": {"vr": "SH", "Value": [study["study_id"]]},
        })
        total = 0
        for series in study["series"]:
            series_pk = self._pk("series")
            modality = series["modality"]
            self.rows["series"].append((series_pk, study_pk, series["uid"], modality, series["number"], _dumps({
                "00080060": {"vr": "CS", "Value": [modality]}, "0008103E": {"vr": "LO", "Value": [series["description"]]},
                "0020000E": {"vr": "UI", "Value": [series["uid"]]}, "00200011": {"vr": "IS", "Value": [series["number"]]},
            }), len(series["instances"])))
            sop_class = SOP_CLASSES[modality]
            for k, sop_uid in enumerate(series["instances"]):
                self.rows["instances"].append((
                    self._pk("instances"), series_pk, sop_uid, sop_class, k + 1, EXPLICIT_VR_LITTLE_ENDIAN,
                    PLACEHOLDER, self.file_size, SOURCE_AE, self.now, _dumps({
                        "00080008": {"vr": "CS", "Value": ["ORIGINAL", "PRIMARY"]},
                        "00080016": {"vr": "UI", "Value": [sop_class]}, "00080018": {"vr": "UI", "Value": [sop_uid]},
                        "00200013": {"vr": "IS", "Value": [k + 1]}, "00280002": {"vr": "US", "Value": [1]},
                        "00280004": {"vr": "CS", "Value": ["MONOCHROME2"]}, "00280010": {"vr": "US", "Value": [8]},
                        "00280011": {"vr": "US", "Value": [8]}, "00280100": {"vr": "US", "Value": [16]},
                    })))
            total += len(series["instances"])
        self.rows["studies"].append((study_pk, patient_pk, study["uid"], study["date"], study["time"],
                                     study["accession"], study["study_id"], attributes, len(study["series"]), total,
                                     total * self.file_size, self.now, self.now, 0, patient["pid"], "", name,
                                     patient["birth"], patient["sex"], patient_attributes, self.now))

    def flush(self) -> None:
        statements = {
            "patients": "INSERT INTO patients (pk, patient_id, issuer, identity) VALUES (?, ?, ?, ?)",
            "study_names": "INSERT INTO study_names (study_pk, name, folded) VALUES (?, ?, ?)",
            "studies": "INSERT INTO studies (pk, patient_pk, study_uid, study_date, study_time, accession_number, "
                       "study_id, attributes, num_series, num_instances, size, stored_at, accessed_at, protected, "
                       "patient_id, issuer, patient_name, birth_date, sex, patient_attributes, patient_stored_at) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            "series": "INSERT INTO series (pk, study_pk, series_uid, modality, series_number, attributes, num_instances)"
                      " VALUES (?, ?, ?, ?, ?, ?, ?)",
            "instances": "INSERT INTO instances (pk, series_pk, sop_uid, sop_class, instance_number, transfer_syntax, "
                         "path, size, source_ae, stored_at, attributes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        }
        for table in ("patients", "studies", "study_names", "series", "instances"):
            if self.rows[table]:
                self.db.executemany(statements[table], self.rows[table])
                self.rows[table] = []


def _table_dump(db: sqlite3.Connection) -> dict:
    """Every row of the query-relevant columns, without pks, times, paths and sizes, for comparison."""
    return {
        "patients": sorted(db.execute("SELECT patient_id, issuer, identity FROM patients")),
        "study_names": sorted(db.execute("SELECT st.study_uid, n.name, n.folded FROM study_names n "
                                         "JOIN studies st ON n.study_pk = st.pk")),
        "studies": sorted(db.execute("SELECT p.patient_id, st.study_uid, st.study_date, st.study_time, "
                                     "st.accession_number, st.study_id, st.attributes, st.num_series, st.num_instances,"
                                     " st.protected, st.patient_id, st.issuer, st.patient_name, st.birth_date, st.sex,"
                                     " st.patient_attributes FROM studies st JOIN patients p ON st.patient_pk = p.pk")),
        "series": sorted(db.execute("SELECT st.study_uid, se.series_uid, se.modality, se.series_number, se.attributes,"
                                    " se.num_instances FROM series se JOIN studies st ON se.study_pk = st.pk")),
        "instances": sorted(db.execute("SELECT se.series_uid, i.sop_uid, i.sop_class, i.instance_number, "
                                       "i.transfer_syntax, i.source_ae, i.attributes FROM instances i "
                                       "JOIN series se ON i.series_pk = se.pk")),
    }


def check_synthesis(workdir: str) -> None:
    """The synthesized rows of a few studies equal what the appliance's own indexing writes for their files."""
    from pydicom import dcmread
    from appliance.archive.index import ArchiveIndex
    from appliance.dataset.metadata import extract

    sample = [s for s in corpus_studies() if s["index"] < 6 or len(s["series"]) > 1][:8]
    real_path = os.path.join(workdir, "real.sqlite")
    real = ArchiveIndex(real_path)
    try:
        for study in sample:
            for series in study["series"]:
                for k, sop_uid in enumerate(series["instances"]):
                    path = os.path.join(workdir, "object.dcm")
                    sb._write(_dataset(study, series, k + 1, sop_uid), path)
                    meta = extract(dcmread(path, stop_before_pixels=True))
                    real.add(meta, PLACEHOLDER, os.path.getsize(path), EXPLICIT_VR_LITTLE_ENDIAN, SOURCE_AE, 0.0)
        real_rows = _table_dump(real.db)
    finally:
        real.close()
    synth_path = os.path.join(workdir, "synth.sqlite")
    ArchiveIndex(synth_path).close()
    db = sqlite3.connect(synth_path, isolation_level=None)
    try:
        db.execute("BEGIN")
        synthesizer = Synthesizer(db, 1000, 0.0)
        for study in sample:
            synthesizer.add_study(study)
        synthesizer.flush()
        db.execute("COMMIT")
        synth_rows = _table_dump(db)
    finally:
        db.close()
    for table, rows in real_rows.items():
        if rows != synth_rows[table]:
            difference = next(((a, b) for a, b in zip(rows, synth_rows[table]) if a != b), (len(rows), len(synth_rows[table])))
            raise BenchError(f"the synthesized {table} rows differ from ArchiveIndex.add(extract(ds)):\n"
                             f"  appliance: {difference[0]}\n  synthesized: {difference[1]}")


def _scale_key() -> dict:
    from appliance.archive import index
    from appliance.dataset import metadata

    schema = hashlib.sha256(repr(index._SCHEMA).encode()).hexdigest()[:16]
    keywords = hashlib.sha256(repr((metadata.PATIENT_KEYWORDS, metadata.STUDY_KEYWORDS, metadata.SERIES_KEYWORDS,
                                    metadata.INSTANCE_KEYWORDS)).encode()).hexdigest()[:16]
    return {"version": SCALE_VERSION, "schema_version": index.SCHEMA_VERSION, "schema": schema,
            "keywords": keywords, "corpus_version": QUERY_CORPUS_VERSION, "instances": SCALE_INSTANCES}


def ensure_scale_index(workdir: str, file_size: int) -> dict:
    """The cached 1M-instance index: built if missing or made for another schema."""
    path = os.path.join(SCALE_DIR, "index.sqlite")
    manifest_path = os.path.join(SCALE_DIR, "manifest.json")
    key = _scale_key()
    try:
        with open(manifest_path) as handle:
            manifest = json.load(handle)
    except (OSError, ValueError):
        manifest = {}
    if manifest.get("key") == key and os.path.isfile(path) and os.path.getsize(path) == manifest.get("bytes"):
        return manifest
    from appliance.archive.index import ArchiveIndex

    print(f"synthesizing a {SCALE_INSTANCES:,}-instance index into {path} ...", flush=True)
    started = time.perf_counter()
    check_synthesis(workdir)
    shutil.rmtree(SCALE_DIR, ignore_errors=True)
    os.makedirs(SCALE_DIR)
    staging = path + ".partial"
    ArchiveIndex(staging).close()  # the schema and its version, exactly as the appliance makes them
    db = sqlite3.connect(staging, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=DELETE")
        db.execute("PRAGMA synchronous=OFF")  # the build only: the result is fsynced below
        db.execute("PRAGMA cache_size=-1000000")
        indexes = db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL").fetchall()
        db.execute("BEGIN")
        for name, _ in indexes:  # built after the rows: much faster than row by row
            db.execute(f'DROP INDEX "{name}"')
        synthesizer = Synthesizer(db, file_size, time.time())
        studies = 0
        for stream in (corpus_studies(), filler_studies()):
            for study in stream:
                synthesizer.add_study(study)
                studies += 1
                if studies % 20000 == 0:
                    synthesizer.flush()
        synthesizer.flush()
        for _, sql in indexes:
            db.execute(sql)
        db.execute("COMMIT")
        counts = {table: db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
                  for table in ("patients", "studies", "series", "instances")}
        db.execute("PRAGMA journal_mode=WAL")
    finally:
        db.close()
    if counts["instances"] != SCALE_INSTANCES:
        raise BenchError(f"the synthesized index holds {counts['instances']} instances, not {SCALE_INSTANCES}")
    with open(staging, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(staging, path)
    manifest = {"key": key, "bytes": os.path.getsize(path), "counts": counts,
                "build_seconds": round(time.perf_counter() - started, 1)}
    with open(manifest_path, "w") as handle:
        json.dump(manifest, handle, indent=1)
    print(f"  built in {manifest['build_seconds']} s: {counts}, {manifest['bytes'] / 1e6:.0f} MB", flush=True)
    return manifest


# --------------------------------------------------------------------------- patient attribute conflicts

#: issue 8's queries: keys, and which studies' own values match them
CONFLICT_QUERIES = {
    "smith": ({"PatientName": "Smith*"}, lambda s: s["name"].startswith("Smith")),
    "jones_pat0001": ({"PatientName": "Jone?^Pat0001*"},
                      lambda s: re.fullmatch(r"Jone.\^Pat0001.*", s["name"]) is not None),
    "rossi_nm": ({"PatientName": "Rossi*", "ModalitiesInStudy": "NM"},
                 lambda s: s["name"].startswith("Rossi") and s["modality"] == "NM"),
}


def conflict_studies() -> List[dict]:
    """2,000 one-image studies: each Patient ID's second study carries another surname (a married name, a
    corrected registration), half of them another birth date; stored first study, second study, next ID."""
    rng = random.Random(8)
    surnames = ("Smith", "Jones", "Rossi", "Brown", "Novak", "Dubois", "Silva", "Jonas")
    studies = []
    for p in range(N_CONFLICT_PATIENTS):
        birth = _date(rng, (datetime.date(1930, 1, 1), datetime.date(2010, 12, 31)))
        first = surnames[rng.randrange(len(surnames))]
        second = surnames[(surnames.index(first) + 1 + rng.randrange(len(surnames) - 1)) % len(surnames)]
        for k, surname in enumerate((first, second)):
            s = 2 * p + k
            studies.append({
                "index": s, "pid": f"QC{p:07d}", "name": f"{surname}^Pat{p:05d}",
                "birth": birth if k == 0 or p % 2 else birth[:6] + f"{int(birth[6:]) % 28 + 1:02d}",
                "sex": "MFO"[p % 3], "modality": ("NM", "CT", "MR")[rng.randrange(3)],
                "uid": _uid("qc", "study", s), "series": _uid("qc", "series", s), "sop": _uid("qc", "sop", s),
            })
    return studies


def ensure_conflict_corpus() -> List[dict]:
    """The conflict corpus files (built if missing or stale); returns the studies in storing order."""
    studies = conflict_studies()
    stamp = os.path.join(CONFLICT_CORPUS, "version")
    try:
        with open(stamp) as handle:
            if handle.read().strip() == str(CONFLICT_CORPUS_VERSION):
                return studies
    except OSError:
        pass
    print(f"building the conflict corpus: {len(studies):,} studies into {CONFLICT_CORPUS} ...", flush=True)
    staging = CONFLICT_CORPUS + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    for study in studies:
        shaped = {"date": "20240101", "time": "120000", "accession": f"QCA{study['index']:07d}",
                  "referring": "", "description": "CONFLICTS", "study_id": str(study["index"] + 1),
                  "uid": study["uid"],
                  "patient": {"name": study["name"], "pid": study["pid"], "birth": study["birth"], "sex": study["sex"]}}
        series = {"modality": study["modality"], "description": "CONFLICTS", "uid": study["series"], "number": 1}
        sb._write(_dataset(shaped, series, 1, study["sop"]), os.path.join(staging, f"{study['index']:06d}.dcm"))
    with open(os.path.join(staging, "version"), "w") as handle:
        handle.write(str(CONFLICT_CORPUS_VERSION))
    shutil.rmtree(CONFLICT_CORPUS, ignore_errors=True)
    os.replace(staging, CONFLICT_CORPUS)
    return studies


_ANSWER_ELEMENT = re.compile(rb"^I: \((0010,0010|0020,000d)\) \w\w (?:\[(.*?)\]|\(no value available\))", re.M)


def find_answers(tools, server, keys: Dict[str, str]) -> List[Tuple[str, str]]:
    """One findscu -v (dumps printed): (Study Instance UID, Patient's Name) of each answer."""
    command = [c for c in find_command(tools, server, keys) if c != "-sr"]
    done = subprocess.run(command, env=sb.dcmtk_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=FIND_TIMEOUT)
    final = _FINAL.search(done.stdout)
    if done.returncode != 0 or final is None or final.group(1) != b"Success":
        raise BenchError(f"findscu on {server.name} failed: {' '.join(command)}\n"
                         + done.stdout.decode("utf-8", "replace")[-2000:])
    answers = []
    for block in _RESPONSE.split(done.stdout)[1:]:
        values = {tag: (value or b"").decode("utf-8", "replace").strip(" \x00")
                  for tag, value in _ANSWER_ELEMENT.findall(block)}
        answers.append((values.get(b"0020,000d", ""), values.get(b"0010,0010", "")))
    return answers


def measure_conflicts(tools, workdir: str, move_port: int) -> dict:
    """Issue 8's check: each server loaded with the conflict corpus answers the three queries; returned,
    expected, and answers under a name the study's own objects do not carry."""
    studies = ensure_conflict_corpus()
    own = {study["uid"]: study["name"] for study in studies}
    files = [os.path.join(CONFLICT_CORPUS, f"{study['index']:06d}.dcm") for study in studies]
    result = {"studies": len(studies), "patients": N_CONFLICT_PATIENTS, "queries": {}}
    servers = {"appliance": QueryAppliance(tools, workdir, "appliance", move_port),
               "orthanc": QueryOrthanc(tools, workdir, move_port)}
    try:
        for name, server in servers.items():
            server.start()
            store = subprocess.run([tools["storescu"], "-aec", server.aet, HOST, str(server.port), *files],
                                   env=sb.dcmtk_env(), stdin=subprocess.DEVNULL, capture_output=True,
                                   timeout=LOAD_TIMEOUT)
            if store.returncode != 0:
                raise BenchError(f"storescu to {name} failed:\n" + store.stdout.decode("utf-8", "replace")[-2000:])
        for query, (keys, predicate) in CONFLICT_QUERIES.items():
            expected = {study["uid"] for study in studies if predicate(study)}
            row = {"keys": keys, "expected": len(expected)}
            for name, server in servers.items():
                answers = find_answers(tools, server, keys)
                found = {uid for uid, _ in answers}
                row[name] = {"returned": len(answers), "correct": len(found & expected),
                             "not_matching": len(found - expected),
                             "under_another_name": sum(1 for uid, shown in answers if own.get(uid) != shown)}
            result["queries"][query] = row
            print(f"conflicts {query:<14} expected {row['expected']:4d}  " + "  ".join(
                f"{name} {row[name]['returned']:4d} returned ({row[name]['correct']} right, "
                f"{row[name]['under_another_name']} under another name)" for name in servers), flush=True)
    finally:
        for server in servers.values():
            server.stop()
    return result


# --------------------------------------------------------------------------- servers


class QueryAppliance(sb.ApplianceServer):
    """The Disk-Server with the C-MOVE destination as a device, optionally on a prepared archive."""

    def __init__(self, tools, workdir, label: str, move_port: int, index: Optional[str] = None,
                 placeholder: Optional[str] = None) -> None:
        super().__init__(tools, workdir)
        self.name = label
        self.move_port = move_port
        self.index = index
        self.placeholder = placeholder
        self.check = None

    def command(self) -> List[str]:
        archive = os.path.join(self.dir, "data", "archive")
        if self.index:
            os.makedirs(os.path.join(archive, os.path.dirname(PLACEHOLDER)))
            shutil.copyfile(self.placeholder, os.path.join(archive, PLACEHOLDER))
            shutil.copyfile(self.index, os.path.join(archive, "index.sqlite"))
            os.sync()
        return super().command()

    def config(self) -> str:
        return super().config() + (
            "[devices.movescp]\n"
            f'ae_title = "{MOVE_DEST_AET}"\n'
            f'host = "{HOST}"\n'
            f"port = {self.move_port}\n"
            "timeout = 120\n"
        )

    def wait_listening(self) -> None:
        super().wait_listening()
        # then for the start-up check of the archive (a query during it would compete with it)
        deadline = time.monotonic() + READY_TIMEOUT
        pattern = re.compile(r"start-up check removed (\d+) unfinished temporary files, (\d+) never-indexed files, "
                             r"(\d+) rows without files")
        while time.monotonic() < deadline:
            with open(self.log_path, "rb") as handle:
                found = pattern.search(handle.read().decode("utf-8", "replace"))
            if found:
                self.check = tuple(int(n) for n in found.groups())
                if self.check[2]:
                    raise BenchError(f"{self.name}: the start-up check dropped {self.check[2]} index rows:\n"
                                     + self.log_tail())
                return
            if self.process.poll() is not None:
                raise BenchError(f"{self.name} exited while checking its archive:\n" + self.log_tail())
            time.sleep(0.2)
        raise BenchError(f"{self.name}: no end of the archive's start-up check after {READY_TIMEOUT} s:\n"
                         + self.log_tail())


class QueryOrthanc(sb.OrthancServer):
    """Orthanc with its defaults, C-FIND and C-MOVE allowed, the C-MOVE destination known."""

    def __init__(self, tools, workdir, move_port: int) -> None:
        super().__init__(tools, workdir)
        self.move_port = move_port

    def command(self) -> List[str]:
        command = super().command()
        path = command[-1]
        with open(path) as handle:
            config = json.load(handle)
        config.pop("SyncStorageArea", None)  # Orthanc's default
        # studies become "stable" StableAge seconds after their last instance (default 60), which
        # updates the index: soon, so that it is over before the measurements (wait_idle)
        config["StableAge"] = 2
        config["Name"] = "query-bench"
        config["DicomAlwaysAllowFind"] = True
        config["DicomAlwaysAllowMove"] = True
        config["DicomModalities"] = {
            "movescp": [MOVE_DEST_AET, HOST, self.move_port],
            "findscu": [FIND_AET, HOST, 104],
            "movescu": [MOVE_AET, HOST, 104],
        }
        with open(path, "w") as handle:
            json.dump(config, handle, indent=1)
        return command

    def counts(self) -> dict:
        with urllib.request.urlopen(f"http://{HOST}:{self.http_port}/statistics", timeout=30) as response:
            return json.load(response)


class MoveDestination(sb.StorescpServer):
    name = "storescp"
    aet = MOVE_DEST_AET

    def clear(self) -> None:
        out = os.path.join(self.dir, "out")
        for name in os.listdir(out):
            os.unlink(os.path.join(out, name))


# --------------------------------------------------------------------------- measuring


def load(tools, server, directories: List[str], files: int) -> float:
    """storescu of each directory on its own association, all at once; returns the wall time."""
    commands = [[tools["storescu"], "-aec", server.aet, HOST, str(server.port), "+sd", directory]
                for directory in directories]
    return sb.run_senders(server, commands, LOAD_TIMEOUT)


#: "Received Find Response N (Pending)" with -v -sr ("Find Response: N (Pending)" and a dump without -sr)
_RESPONSE = re.compile(rb"^I: (?:Received Find Response \d+|Find Response: \d+) \(", re.M)
_FINAL = re.compile(rb"^I: Received Final Find Response \(([^)]*)\)", re.M)


def find_command(tools, server, keys: Dict[str, str]) -> List[str]:
    command = [tools["findscu"], "-v", "-sr", "-S", "-aet", FIND_AET, "-aec", server.aet,
               "-k", "QueryRetrieveLevel=STUDY"]
    for keyword in RETURN_KEYS:
        value = keys.get(keyword)
        command += ["-k", keyword if value is None else f"{keyword}={value}"]
    return command + [HOST, str(server.port)]


def find(tools, server, keys: Dict[str, str], expected: Optional[int], timeout: float) -> Tuple[float, int]:
    """One findscu process: (wall seconds, matches); checks Success and the expected count."""
    command = find_command(tools, server, keys)
    started = time.perf_counter()
    try:
        done = subprocess.run(command, env=sb.dcmtk_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"findscu on {server.name} took more than {timeout} s: {' '.join(command)}") from None
    elapsed = time.perf_counter() - started
    matches = len(_RESPONSE.findall(done.stdout))
    final = _FINAL.search(done.stdout)
    if done.returncode != 0 or final is None or final.group(1) != b"Success":
        raise BenchError(f"findscu on {server.name} failed (exit {done.returncode}, final "
                         f"{final.group(1).decode() if final else 'none'}): {' '.join(command)}\n"
                         + done.stdout.decode("utf-8", "replace")[-2000:] + "\nserver log:\n" + server.log_tail())
    if expected is not None and matches != expected:
        raise BenchError(f"{server.name} answered {matches} matches, expected {expected}: {' '.join(command)}")
    return elapsed, matches


def move(tools, server, destination: MoveDestination, study_uid: str, expected: int) -> float:
    destination.clear()
    command = [tools["movescu"], "-S", "-aet", MOVE_AET, "-aec", server.aet, "-aem", MOVE_DEST_AET,
               "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}", HOST, str(server.port)]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, env=sb.dcmtk_env(), stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=MOVE_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise BenchError(f"movescu on {server.name} took more than {MOVE_TIMEOUT} s") from None
    elapsed = time.perf_counter() - started
    received = destination.stored()
    if done.returncode != 0 or received != expected:
        raise BenchError(f"movescu on {server.name}: exit {done.returncode}, storescp received {received} of "
                         f"{expected} files:\n" + (done.stdout + done.stderr).decode("utf-8", "replace")[-2000:]
                         + "\nserver log:\n" + server.log_tail())
    return elapsed


def _cpu_idle_jiffies() -> Tuple[int, int]:
    with open("/proc/stat") as handle:
        fields = [int(v) for v in handle.readline().split()[1:]]
    return fields[3] + fields[4], sum(fields)  # idle + iowait, total


def wait_idle(what: str, threshold: float = 0.85, seconds: int = 3, limit: float = 120.0) -> float:
    """Wait (at most ``limit`` s) until the CPUs were ``threshold`` idle for ``seconds`` seconds in a row.

    After loading, the servers finish background work (Orthanc marks studies
    stable, SQLite checkpoints): measuring during it would time that too.
    """
    started = time.monotonic()
    calm = 0
    idle, total = _cpu_idle_jiffies()
    while time.monotonic() - started < limit:
        time.sleep(1.0)
        idle2, total2 = _cpu_idle_jiffies()
        share = (idle2 - idle) / max(1, total2 - total)
        idle, total = idle2, total2
        calm = calm + 1 if share >= threshold else 0
        if calm >= seconds:
            break
    else:
        print(f"  (the CPUs were still busy after {limit:.0f} s; measuring {what} anyway)", flush=True)
    return time.monotonic() - started


def process_startup(tools, repeat: int) -> float:
    times = []
    for _ in range(max(3, repeat)):
        started = time.perf_counter()
        subprocess.run([tools["findscu"], "--version"], stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def query_plans(index_path: str, queries: Dict[str, dict]) -> Dict[str, List[str]]:
    """EXPLAIN QUERY PLAN of our SQL for each query (appliance.archive.query.build_query)."""
    from pydicom.dataset import Dataset
    from appliance.archive.query import build_query

    plans = {}
    db = sqlite3.connect(f"file:{index_path}?mode=ro", uri=True)
    try:
        for name, keys in queries.items():
            identifier = Dataset()
            identifier.QueryRetrieveLevel = "STUDY"
            for keyword in RETURN_KEYS:
                setattr(identifier, keyword, keys.get(keyword, ""))
            query = build_query(identifier)
            plans[name] = [f"{row[-1]}" for row in db.execute("EXPLAIN QUERY PLAN " + query.sql, query.params)]
    finally:
        db.close()
    return plans


# --------------------------------------------------------------------------- reporting


def _median_row(times: List[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs": len(times)}


def summarise(result: dict) -> dict:
    summary: Dict[str, dict] = {}
    for run in result["runs"]:
        summary.setdefault(run["query"], {}).setdefault(run["server"], []).append(run)
    out = {}
    for query, servers in summary.items():
        rows = {}
        for server, runs in servers.items():
            row = _median_row([r["seconds"] for r in runs])
            row["matches"] = sorted({r["matches"] for r in runs if r.get("matches") is not None})
            rows[server] = row
        ours, orthanc = rows.get("appliance"), rows.get("orthanc")
        if ours and orthanc:
            rows["ratio_appliance_vs_orthanc"] = ours["median_s"] / orthanc["median_s"]
        big = rows.get("appliance-1m")
        if ours and big:
            rows["ratio_1m_vs_20k"] = big["median_s"] / ours["median_s"]
        out[query] = rows
    return out


def report(result: dict) -> str:
    lines = []
    cfg = result["config"]
    loaded = result.get("loading", {})
    lines.append(f"\nquery corpus: {result['corpus']['expected']['instances']:,} instances, "
                 f"{result['corpus']['expected']['studies']:,} studies, {result['corpus']['expected']['patients']:,} "
                 f"patients, {result['corpus']['stats']['bytes'] / 1e6:.1f} MB")
    for server, info in loaded.items():
        lines.append(f"  loaded into {server:<10} in {info['seconds']:7.1f} s ({info['files'] / info['seconds']:.0f} "
                     f"images/s, {info['associations']} storescu associations)")
    if "scale" in result:
        counts = result["scale"]["counts"]
        lines.append(f"  1M index: {counts['instances']:,} instances, {counts['studies']:,} studies, "
                     f"{counts['patients']:,} patients, {result['scale']['bytes'] / 1e6:.0f} MB"
                     + (f", appliance ready {result['scale']['ready_s']:.1f} s after start" if "ready_s" in result["scale"] else ""))
    lines.append(f"\nC-FIND, study level, wall time of one findscu process, median of {cfg['repeat']} runs "
                 f"(findscu start-up alone: {result['findscu_startup_s'] * 1000:.1f} ms)")
    header = (f"  {'query':<32} {'server':<13} {'matches':>8} {'median ms':>10} {'min ms':>8} {'max ms':>8} "
              f"{'runs':>5}  ratio")
    lines.append(header)
    for query, rows in result["summary"].items():
        label = result["queries"][query]["label"] if query in result["queries"] else query
        for server in ("appliance", "orthanc", "appliance-1m"):
            row = rows.get(server)
            if not row:
                continue
            ratio = ""
            if server == "appliance" and "ratio_appliance_vs_orthanc" in rows:
                ratio = f"ours/Orthanc {rows['ratio_appliance_vs_orthanc']:.2f}"
            if server == "appliance-1m" and "ratio_1m_vs_20k" in rows:
                ratio = f"1M/20k {rows['ratio_1m_vs_20k']:.2f}"
            if server == "orthanc" and query in ISSUE_ORTHANC:
                ratio = f"(issue: {ISSUE_ORTHANC[query] * 1000:.0f} ms)"
            matches = ",".join(str(m) for m in row["matches"]) or "-"
            lines.append(f"  {label if server == 'appliance' else '':<32} {server:<13} {matches:>8} "
                         f"{row['median_s'] * 1000:>10.1f} {row['min_s'] * 1000:>8.1f} {row['max_s'] * 1000:>8.1f} "
                         f"{row['runs']:>5}  {ratio}")
    if result.get("move_summary"):
        info = result["move_corpus"]
        lines.append(f"\nC-MOVE, STUDY level, {info['files']} images ({info['bytes'] / 1e6:.0f} MB) to storescp, wall "
                     f"time of one movescu process, median of {cfg['repeat']} runs")
        rows = result["move_summary"]
        for server in ("appliance", "orthanc"):
            row = rows.get(server)
            if row:
                ratio = f"ours/Orthanc {rows['ratio_appliance_vs_orthanc']:.2f}" if (
                    server == "appliance" and "ratio_appliance_vs_orthanc" in rows) else (
                    f"(issue: {ISSUE_ORTHANC['move'] * 1000:.0f} ms)" if server == "orthanc" else "")
                lines.append(f"  {server:<13} median {row['median_s'] * 1000:8.1f} ms  min {row['min_s'] * 1000:8.1f}"
                             f"  max {row['max_s'] * 1000:8.1f}  {info['files'] / row['median_s']:6.0f} images/s  "
                             f"{ratio}")
    if result.get("summary"):
        claims = []
        for query in ("patient_id", "name", "date_range"):
            ratio = result["summary"].get(query, {}).get("ratio_1m_vs_20k")
            if ratio is not None:
                claims.append(f"{query} {ratio:.2f}x")
        if claims:
            lines.append(f"\nscaling 20k -> 1M instances ({SCALE_INSTANCES / N_INSTANCES:.0f}x the archive, "
                         f"log ratio ln(1M)/ln(20k) = {_log_ratio():.2f}): " + ", ".join(claims)
                         + "; same match counts at both sizes.")
            ratio = result["summary"].get("universal", {}).get("ratio_1m_vs_20k")
            if ratio is not None:
                lines.append(f"  the universal query returns every study ({result['summary']['universal']['appliance-1m']['matches']}"
                             f" at 1M): it grows linearly by nature ({ratio:.1f}x) and is not part of the logarithmic "
                             "claim.")
    if result.get("conflicts"):
        lines.append(report_conflicts(result["conflicts"]))
    if result.get("plans"):
        lines.append("\nSQLite plans of our queries on the 1M index (EXPLAIN QUERY PLAN of build_query's SQL):")
        for query, plan in result["plans"].items():
            lines.append(f"  {query}: " + " | ".join(plan))
    loads = [r["loadavg_1m_before"] for r in result["runs"] + result["move_runs"] if "loadavg_1m_before" in r]
    if loads:
        settle = result.get("settle_s", {})
        lines.append(f"\n1-minute load average before the runs: min {min(loads):.2f}, median "
                     f"{statistics.median(loads):.2f}, max {max(loads):.2f} on {os.cpu_count()} CPUs (it lags: "
                     "the loading comes just before); CPUs idle "
                     + ", ".join(f"{s:.0f} s before {what}" for what, s in settle.items()))
    lines.append("servers interleaved, their order rotating from round to round; findscu process start-up, "
                 "association and release are in every time, for every server alike.")
    return "\n".join(lines)


def report_conflicts(info: dict) -> str:
    lines = [f"\npatient attribute conflicts: {info['studies']:,} studies of {info['patients']:,} Patient IDs, each ID's "
             "two studies under different names; answers against the studies whose own objects match",
             f"  {'query':<40} {'expected':>8}  {'appliance':>30}  {'orthanc':>30}"]
    for row in info["queries"].values():
        keys = " ".join(f"{k}={v}" for k, v in row["keys"].items())
        cells = [f"{row[name]['returned']} ({row[name]['correct']} right, {row[name]['under_another_name']} misnamed)"
                 for name in ("appliance", "orthanc")]
        lines.append(f"  {keys:<40} {row['expected']:>8}  {cells[0]:>30}  {cells[1]:>30}")
    return "\n".join(lines)


def _log_ratio() -> float:
    import math

    return math.log(SCALE_INSTANCES) / math.log(N_INSTANCES)


# --------------------------------------------------------------------------- main


@contextlib.contextmanager
def _servers_stopped():
    try:
        yield
    finally:
        sb.stop_all()


def find_tools(args) -> Dict[str, str]:
    tools = sb.find_tools(["appliance", "storescp", "orthanc"])
    missing = []
    for name in ("findscu", "movescu"):
        tools[name] = sb._which(name)
        if tools[name] is None:
            missing.append(f"{name} (Debian package dcmtk)")
    if missing:
        raise BenchError("missing: " + "; ".join(missing) + " -- `make bench` installs them")
    return tools


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed runs of each (query, server) (default 5)")
    parser.add_argument("--no-scale", action="store_true", help="skip the 1M-instance index")
    parser.add_argument("--no-move", action="store_true", help="skip the C-MOVE measurement")
    parser.add_argument("--no-conflicts", action="store_true", help="skip the patient attribute conflicts check")
    parser.add_argument("--conflicts-only", action="store_true", help="only the patient attribute conflicts check")
    parser.add_argument("--load-associations", type=int, default=4,
                        help="parallel storescu associations loading the corpus (default 4)")
    parser.add_argument("--universal-1m-repeat", type=int, default=1,
                        help="timed universal queries on the 1M index (default 1; 0 skips them)")
    parser.add_argument("--workdir", default=None, help="where the servers' temporary storage goes (default $TMPDIR)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if not 1 <= args.load_associations <= 16:
        parser.error("--load-associations must be from 1 to 16")

    return sb.run_guarded("query_bench", _run, args)


def _run(args) -> int:
    if not sys.platform.startswith("linux"):
        raise BenchError("Linux only")
    tools = find_tools(args)
    started = datetime.datetime.now()
    if args.conflicts_only:
        with tempfile.TemporaryDirectory(prefix="query-bench-", dir=args.workdir) as workdir, _servers_stopped():
            destination = MoveDestination(tools, workdir)
            destination.start()
            result = {"conflicts": measure_conflicts(tools, workdir, destination.port)}
        print(report_conflicts(result["conflicts"]))
        return 0
    corpus = ensure_query_corpus(args.load_associations)
    expected = corpus["expected"]
    queries = {name: {"label": label, "keys": dict(keys) if keys is not None else
                      {"PatientID": expected["patient_id_value"]}, "expected": expected[name]}
               for name, (label, keys) in QUERIES.items()}
    move_corpus = ensure_move_corpus() if not args.no_move else None
    parts = [os.path.join(QUERY_CORPUS, f"part{n}") for n in range(args.load_associations)]
    sample_file = os.path.join(parts[0], sorted(os.listdir(parts[0]))[0])
    result = {
        "timestamp": started.isoformat(timespec="seconds"),
        "host": {"cpus": os.cpu_count(), "kernel": os.uname().release, "machine": os.uname().machine},
        "versions": sb.versions(tools),
        "config": {"repeat": args.repeat, "load_associations": args.load_associations,
                   "universal_1m_repeat": args.universal_1m_repeat, "scale": not args.no_scale,
                   "move": not args.no_move, "conflicts": not args.no_conflicts,
                   "findscu": " ".join(["findscu", "-v", "-sr", "-S", "-aet", FIND_AET, "-aec", "AET",
                                        "-k", "QueryRetrieveLevel=STUDY"]
                                       + [x for k in RETURN_KEYS for x in ("-k", k + "[=value]")]
                                       + ["127.0.0.1", "PORT"]) + ", TCP_NODELAY=1",
                   "movescu": f"movescu -S -aet {MOVE_AET} -aec AET -aem {MOVE_DEST_AET} -k QueryRetrieveLevel=STUDY "
                              "-k StudyInstanceUID=UID 127.0.0.1 PORT, TCP_NODELAY=1"},
        "corpus": {"dir": QUERY_CORPUS, "stats": corpus["stats"], "expected": expected},
        "queries": queries,
        "runs": [],
        "move_runs": [],
    }
    # servers stopped before their folders are removed, whatever happens
    with tempfile.TemporaryDirectory(prefix="query-bench-", dir=args.workdir) as workdir, _servers_stopped():
        if not args.no_scale:
            scale = ensure_scale_index(workdir, os.path.getsize(sample_file))
            result["scale"] = {"counts": scale["counts"], "bytes": scale["bytes"],
                               "build_seconds": scale.get("build_seconds")}
        result["findscu_startup_s"] = process_startup(tools, args.repeat)

        destination = MoveDestination(tools, workdir)
        destination.start()
        servers = {
            "appliance": QueryAppliance(tools, workdir, "appliance", destination.port),
            "orthanc": QueryOrthanc(tools, workdir, destination.port),
        }
        for server in servers.values():
            server.start()
        result["loading"] = {}
        for name, server in servers.items():
            print(f"loading {corpus['stats']['files']:,} files into {name} ({args.load_associations} associations) ...",
                  flush=True)
            seconds = load(tools, server, parts, corpus["stats"]["files"])
            held = server.stored() if name == "appliance" else server.counts()["CountInstances"]
            if held != expected["instances"]:
                raise BenchError(f"{name} holds {held} instances after loading {expected['instances']}:\n"
                                 + server.log_tail())
            result["loading"][name] = {"seconds": seconds, "files": corpus["stats"]["files"],
                                       "associations": args.load_associations}
            print(f"  {seconds:.1f} s ({corpus['stats']['files'] / seconds:.0f} images/s)", flush=True)
        os.sync()
        if not args.no_scale:
            print("starting the appliance on a copy of the 1M index ...", flush=True)
            big = QueryAppliance(tools, workdir, "appliance-1m", destination.port,
                                 index=os.path.join(SCALE_DIR, "index.sqlite"), placeholder=sample_file)
            ready = time.perf_counter()
            big.start()
            result["scale"]["ready_s"] = time.perf_counter() - ready
            servers["appliance-1m"] = big
            result["plans"] = query_plans(os.path.join(big.dir, "data", "archive", "index.sqlite"),
                                          {name: q["keys"] for name, q in queries.items()})
            os.sync()

        def expected_for(server: str, query: str) -> Optional[int]:
            if server == "appliance-1m" and query == "universal":
                return result["scale"]["counts"]["studies"]
            return queries[query]["expected"]

        result["settle_s"] = {"find": wait_idle("C-FIND")}
        print(f"CPUs idle after {result['settle_s']['find']:.0f} s", flush=True)
        names = list(servers)
        print("C-FIND warm-up (one untimed run of each query on each server) ...", flush=True)
        for query in queries:
            for name in names:
                if name == "appliance-1m" and query == "universal":
                    continue
                find(tools, servers[name], queries[query]["keys"], expected_for(name, query), FIND_TIMEOUT)
        for rep in range(args.repeat):
            order = names[rep % len(names):] + names[:rep % len(names)]
            for query in queries:
                for name in order:
                    if name == "appliance-1m" and query == "universal":
                        continue
                    load_avg = os.getloadavg()[0]
                    seconds, matches = find(tools, servers[name], queries[query]["keys"], expected_for(name, query),
                                            FIND_TIMEOUT)
                    result["runs"].append({"query": query, "server": name, "repetition": rep + 1, "seconds": seconds,
                                           "matches": matches, "loadavg_1m_before": round(load_avg, 2)})
                    print(f"[{rep + 1}/{args.repeat}] {query:<11} {name:<13} {seconds * 1000:9.1f} ms  {matches:6d} "
                          f"matches  load {load_avg:.2f}", flush=True)
        if "appliance-1m" in servers:
            for rep in range(args.universal_1m_repeat):
                load_avg = os.getloadavg()[0]
                seconds, matches = find(tools, servers["appliance-1m"], queries["universal"]["keys"],
                                        expected_for("appliance-1m", "universal"), FIND_1M_UNIVERSAL_TIMEOUT)
                result["runs"].append({"query": "universal", "server": "appliance-1m", "repetition": rep + 1,
                                       "seconds": seconds, "matches": matches, "loadavg_1m_before": round(load_avg, 2)})
                print(f"[{rep + 1}/{args.universal_1m_repeat}] universal   appliance-1m  {seconds * 1000:9.1f} ms  "
                      f"{matches:6d} matches  load {load_avg:.2f}", flush=True)
            servers.pop("appliance-1m").stop()

        if move_corpus is not None:
            from pydicom import dcmread

            move_files = sorted(os.listdir(move_corpus["dir"]))
            study_uid = str(dcmread(os.path.join(move_corpus["dir"], move_files[0]), stop_before_pixels=True)
                            .StudyInstanceUID)
            result["move_corpus"] = dict(move_corpus, study_uid=study_uid)
            result["move_loading"] = {}
            for name in ("appliance", "orthanc"):
                seconds = load(tools, servers[name], [move_corpus["dir"]], move_corpus["files"])
                result["move_loading"][name] = seconds
                print(f"stored the move study ({move_corpus['files']} images) in {name} in {seconds:.1f} s", flush=True)
            os.sync()
            sb.warm_page_cache(move_corpus)
            result["settle_s"]["move"] = wait_idle("C-MOVE")
            for name in ("appliance", "orthanc"):  # warm-up, untimed
                move(tools, servers[name], destination, study_uid, move_corpus["files"])
            move_names = ["appliance", "orthanc"]
            for rep in range(args.repeat):
                order = move_names[rep % 2:] + move_names[:rep % 2]
                for name in order:
                    load_avg = os.getloadavg()[0]
                    seconds = move(tools, servers[name], destination, study_uid, move_corpus["files"])
                    result["move_runs"].append({"server": name, "repetition": rep + 1, "seconds": seconds,
                                                "received": move_corpus["files"],
                                                "loadavg_1m_before": round(load_avg, 2)})
                    print(f"[{rep + 1}/{args.repeat}] C-MOVE      {name:<13} {seconds * 1000:9.1f} ms  "
                          f"{move_corpus['files']} received  load {load_avg:.2f}", flush=True)
            destination.clear()
        if not args.no_conflicts:
            for name in ("appliance", "orthanc"):
                servers.pop(name).stop()
            result["conflicts"] = measure_conflicts(tools, workdir, destination.port)
        sb.stop_all()

    result["summary"] = summarise(result)
    if result["move_runs"]:
        rows = {name: _median_row([r["seconds"] for r in result["move_runs"] if r["server"] == name])
                for name in ("appliance", "orthanc")}
        rows["ratio_appliance_vs_orthanc"] = rows["appliance"]["median_s"] / rows["orthanc"]["median_s"]
        result["move_summary"] = rows
    result["elapsed_s"] = (datetime.datetime.now() - started).total_seconds()
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"query-{started.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as handle:
        json.dump(result, handle, indent=1)
    print(report(result))
    print(f"\nelapsed {result['elapsed_s']:.0f} s; results: {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
