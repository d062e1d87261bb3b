"""Each study keeps the patient attributes its own objects carry; conflicts are recorded and logged.

Issue 8: one Patient ID arriving with two names (a name corrected at
registration, a typo on a modality, a married name) must not put a study
under a name its images do not carry.  Tested at each layer: the pure
comparison (appliance/archive/patients.py), the index (rows, counters,
conflicts, the upgrade from schema version 1), C-FIND at every level on the
conflict corpus of tests/support_query.py, the archive's log lines and
``appliance-archive conflicts``.
"""

from __future__ import annotations

import io
import os
import sqlite3
import sys
from typing import Dict, List, Optional

from pydicom import dcmread
from pydicom.dataset import Dataset
from twisted.logger import formatEvent
from twisted.trial.unittest import SynchronousTestCase

from appliance import config as configuration
from appliance.archive.index import SCHEMA_VERSION, ArchiveIndex
from appliance.dataset.metadata import dump_level, extract
from appliance.archive.patients import Conflict, differences, identity, value_text
from appliance.cli import archive as cli
from appliance.dicom.uids import EXPLICIT_VR_LITTLE_ENDIAN

from .index_v1 import add_v1, create_v1
from .support import capture_log
from .support_data import make_dataset
from .support_query import (
    CONFLICT_STUDIES,
    archive_copy,
    conflict_corpus,
    fill_conflicts,
    open_archive,
    store_dataset,
)
from .test_query import FindHarness, identifier, identifiers, run_query

EXPLICIT_LE = EXPLICIT_VR_LITTLE_ENDIAN
FIRST, SECOND, UNRELATED = CONFLICT_STUDIES[:3]  # Jones^Mary and Smith^Mary (PIDC01), Rossi^Paolo (PIDC02)


def patient_json(**values) -> str:
    """A patient level as the index keeps it, from keyword=value."""
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2", "1.2.3", "1.2.4", "1.2.5"
    return extract(ds).patient_json


# --- the pure comparison --------------------------------------------------------------------------------------


class DifferencesTests(SynchronousTestCase):
    """patients.differences: which patient attributes two levels disagree on."""

    def test_names_and_birth_dates(self):
        old = patient_json(PatientName="Jones^Mary", PatientID="P1", PatientBirthDate="19800101", PatientSex="F")
        new = patient_json(PatientName="Smith^Mary", PatientID="P1", PatientBirthDate="19800110", PatientSex="F")
        self.assertEqual(differences(old, new), ("PatientName", "PatientBirthDate"))
        self.assertEqual(differences(new, old), ("PatientName", "PatientBirthDate"))

    def test_same_values_do_not_differ(self):
        """Identical levels, empty values and absent ones, and names with trailing empty components agree."""
        same = patient_json(PatientName="Doe^John", PatientID="P1")
        self.assertEqual(differences(same, same), ())
        self.assertEqual(differences(patient_json(PatientName="Doe^John^^", PatientID="P1", PatientSex=""),
                                     patient_json(PatientName="Doe^John", PatientID="P1")), ())
        self.assertEqual(differences("{}", dump_level({"00100040": {"vr": "CS"}})), ())

    def test_a_value_against_none_differs(self):
        """A sex given in one object and not in the other is a difference (the study would answer otherwise)."""
        self.assertEqual(differences(patient_json(PatientID="P1", PatientSex="M"), patient_json(PatientID="P1")),
                         ("PatientSex",))

    def test_every_patient_attribute_is_compared(self):
        """Issuer, Other Patient IDs, ethnic group and comments count too; case matters (it is another name)."""
        base = dict(PatientName="Doe^John", PatientID="P1")
        self.assertEqual(differences(patient_json(**base), patient_json(**base, IssuerOfPatientID="HOSP")),
                         ("IssuerOfPatientID",))
        self.assertEqual(differences(patient_json(**base, PatientComments="a"), patient_json(**base, EthnicGroup="x")),
                         ("EthnicGroup", "PatientComments"))
        self.assertEqual(differences(patient_json(**base), patient_json(PatientName="DOE^JOHN", PatientID="P1")),
                         ("PatientName",))

    def test_value_text(self):
        attributes = patient_json(PatientName="Yamada^Tarou=山田^太郎", PatientID="P1", PatientBirthDate="19700101")
        self.assertEqual(value_text(attributes, "PatientName"), "Yamada^Tarou=山田^太郎")
        self.assertEqual(value_text(attributes, "PatientBirthDate"), "19700101")
        self.assertEqual(value_text(attributes, "PatientSex"), "-")

    def test_identity(self):
        self.assertEqual(identity("P1", "", "1.2.3"), "id\\P1\\")
        self.assertEqual(identity("P1", "HOSP", "1.2.3"), "id\\P1\\HOSP")
        self.assertEqual(identity("", "HOSP", "1.2.3"), "study\\1.2.3")

    def test_describe_names_no_patient_data_but_the_id(self):
        conflict = Conflict("1.2.3", "P1", "", ("PatientName", "PatientBirthDate"), "1.2.4", "1.2.3.1.1", True,
                            (("PatientName", "Jones^Mary", "Smith^Mary"), ("PatientBirthDate", "19800101", "19800110")))
        text = conflict.describe()
        self.assertEqual(text, "study 1.2.3 of Patient ID P1: PatientName, PatientBirthDate differ from study 1.2.4")
        within = Conflict("1.2.3", "", "", ("PatientSex",), "", "1.2.3.1.1", True)
        self.assertIn("differ from the study's earlier objects", within.describe())
        self.assertIn("Patient ID (none)", within.describe())


# --- the index ------------------------------------------------------------------------------------------------


class IndexPatientTests(SynchronousTestCase):
    """ArchiveIndex.add: the study's own patient attributes, the counters by Patient ID, the conflicts."""

    def setUp(self):
        self.index = ArchiveIndex(os.path.join(self.mktemp(), "index.sqlite"))
        self.addCleanup(self.index.close)
        self.now = 100.0

    def add(self, study: str, sop: str, name: str = "Doe^John", patient_id: str = "P1", now: Optional[float] = None,
            series: Optional[str] = None, **attributes):
        ds = make_dataset(patient=name, patient_id=patient_id, study=study, series=series or f"{study}.1", sop=sop)
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        if now is None:
            self.now += 1
            now = self.now
        return self.index.add(extract(ds), f"objects/{sop}.dcm", 10, EXPLICIT_LE, "SCU", now)

    def study(self, uid: str) -> Dict[str, object]:
        row = self.index.db.execute(
            "SELECT st.patient_id, st.patient_name, st.birth_date, st.sex, p.patient_id, p.identity "
            "FROM studies st JOIN patients p ON st.patient_pk = p.pk WHERE st.study_uid = ?", (uid,)).fetchone()
        names = [name for (name,) in self.index.db.execute(
            "SELECT n.name FROM study_names n JOIN studies st ON n.study_pk = st.pk WHERE st.study_uid = ?", (uid,))]
        return dict(patient_id=row[0], name=row[1], birth_date=row[2], sex=row[3], patient=row[4], identity=row[5],
                    names=names)

    def test_each_study_keeps_its_own_patient_attributes(self):
        """Two studies of one Patient ID keep their own name and birth date: one patient, two names."""
        self.add("1.1", "1.1.1.1", "Jones^Mary", PatientBirthDate="19800101")
        self.add("1.2", "1.2.1.1", "Smith^Mary", PatientBirthDate="19800110")
        self.add("1.3", "1.3.1.1", "Rossi^Paolo", "P2")
        self.assertEqual((self.study("1.1")["name"], self.study("1.1")["birth_date"]), ("Jones^Mary", "19800101"))
        self.assertEqual((self.study("1.2")["name"], self.study("1.2")["birth_date"]), ("Smith^Mary", "19800110"))
        self.assertEqual(self.study("1.1")["names"], ["Jones^Mary"])
        self.assertEqual(self.index.counts(), (2, 3, 3, 3))
        self.assertEqual([(row[0], row[2], row[3]) for row in self.index.patients()],
                         [("P1", ("Smith^Mary", "Jones^Mary"), 2), ("P2", ("Rossi^Paolo",), 1)])

    def test_conflict_between_studies_recorded_once(self):
        """The first object of the second study shows the conflict (new); its next objects agree with their own
        study and show nothing; the row names both studies, the Patient ID and the attributes."""
        self.assertEqual(self.add("1.1", "1.1.1.1", "Jones^Mary", PatientBirthDate="19800101").conflicts, ())
        added = self.add("1.2", "1.2.1.1", "Smith^Mary", PatientBirthDate="19800110")
        self.assertEqual([(c.study_uid, c.other_study_uid, c.attributes, c.new) for c in added.conflicts],
                         [("1.2", "1.1", ("PatientName", "PatientBirthDate"), True)])
        self.assertEqual(added.conflicts[0].values, (("PatientName", "Jones^Mary", "Smith^Mary"),
                                                     ("PatientBirthDate", "19800101", "19800110")))
        self.assertEqual(self.add("1.2", "1.2.1.2", "Smith^Mary", PatientBirthDate="19800110").conflicts, ())
        rows = self.index.conflicts()
        self.assertEqual([(r.study_uid, r.other_study_uid, r.patient_id, r.attributes, r.sop_uid, r.occurrences)
                          for r in rows], [("1.2", "1.1", "P1", ("PatientName", "PatientBirthDate"), "1.2.1.1", 1)])

    def test_conflict_within_a_study(self):
        """Objects of one study that disagree: the most recently stored one's values stand, each disagreement is
        recorded against the study's earlier objects, and the same one again is counted, not new."""
        self.add("1.1", "1.1.1.1", "Jones^Mary")
        changed = self.add("1.1", "1.1.1.2", "Jones-Smith^Mary")
        self.assertEqual([(c.other_study_uid, c.attributes, c.new) for c in changed.conflicts],
                         [("", ("PatientName",), True)])
        self.assertEqual(self.study("1.1")["name"], "Jones-Smith^Mary")
        self.assertEqual(self.study("1.1")["names"], ["Jones-Smith^Mary"])
        back = self.add("1.1", "1.1.1.3", "Jones^Mary")
        self.assertEqual([(c.other_study_uid, c.new) for c in back.conflicts], [("", False)])
        self.assertEqual(self.study("1.1")["name"], "Jones^Mary")
        self.assertEqual([(r.study_uid, r.other_study_uid, r.occurrences) for r in self.index.conflicts()],
                         [("1.1", "", 2)])

    def test_an_older_object_does_not_override(self):
        """An object stored before the study's current values (re-indexed at start-up) is a conflict, but the
        most recently stored object's values stay."""
        self.add("1.1", "1.1.1.1", "Smith^Mary", now=500.0)
        older = self.add("1.1", "1.1.1.2", "Jones^Mary", now=200.0)
        self.assertEqual([c.attributes for c in older.conflicts], [("PatientName",)])
        self.assertEqual(self.study("1.1")["name"], "Smith^Mary")

    def test_patient_id_changed_within_a_study(self):
        """A study whose newest object names another Patient ID moves to that patient; the old one, left
        without studies, goes."""
        self.add("1.1", "1.1.1.1", "Doe^John", "WRONG")
        added = self.add("1.1", "1.1.1.2", "Doe^John", "P1")
        self.assertEqual([c.attributes for c in added.conflicts], [("PatientID",)])
        self.assertEqual((self.study("1.1")["patient_id"], self.study("1.1")["patient"]), ("P1", "P1"))
        self.assertEqual(self.index.counts()[0], 1)

    def test_studies_without_patient_id_never_conflict(self):
        """Without a Patient ID each study is a patient of its own: different names are no conflict."""
        self.add("2.1", "2.1.1.1", "First^Anonymous", "")
        self.assertEqual(self.add("2.2", "2.2.1.1", "Second^Anonymous", "").conflicts, ())
        self.assertEqual(self.index.counts()[:2], (2, 2))

    def test_replacing_a_studys_only_instance_keeps_the_study(self):
        """Storing the one instance of a study again keeps the study's protection, stored time and conflicts."""
        self.add("1.1", "1.1.1.1", "Jones^Mary")
        self.add("1.2", "1.2.1.1", "Smith^Mary")
        self.index.set_protected("1.2", True)
        stored_at = self.index.db.execute("SELECT stored_at FROM studies WHERE study_uid = '1.2'").fetchone()[0]
        replaced = self.add("1.2", "1.2.1.1", "Smith^Mary")
        self.assertEqual(replaced.previous.sop_uid, "1.2.1.1")
        self.assertEqual(replaced.conflicts, ())
        row = self.index.db.execute("SELECT stored_at, protected, num_instances FROM studies WHERE study_uid = '1.2'")
        self.assertEqual(row.fetchone(), (stored_at, 1, 1))
        self.assertEqual(len(self.index.conflicts()), 1)

    def test_replacing_into_another_series_prunes_the_old_one(self):
        """An instance stored again under another series and study leaves no empty series, study or patient."""
        self.add("1.1", "1.1.1.1", "Doe^John", "P1")
        self.add("1.2", "1.1.1.1", "Doe^John", "P2", series="1.2.9")
        self.assertEqual(self.index.counts(), (1, 1, 1, 1))

    def test_deleting_a_study_forgets_its_conflicts(self):
        self.add("1.1", "1.1.1.1", "Jones^Mary")
        self.add("1.2", "1.2.1.1", "Smith^Mary")
        self.add("1.3", "1.3.1.1", "Smith^Mary")
        self.assertEqual(len(self.index.conflicts()), 2)  # 1.2 and 1.3 each differ from 1.1
        self.index.delete_instance("1.1.1.1")
        self.assertEqual(self.index.conflicts(), [])

    def test_clear_conflicts(self):
        self.add("1.1", "1.1.1.1", "Jones^Mary")
        self.add("1.2", "1.2.1.1", "Smith^Mary")
        self.add("1.3", "1.3.1.1", "Doe^Jane", "P3")
        self.add("1.3", "1.3.1.2", "Doe^Janet", "P3")
        self.assertEqual(self.index.clear_conflicts("1.1"), 1)
        self.assertEqual([r.study_uid for r in self.index.conflicts()], ["1.3"])
        self.assertEqual(self.index.clear_conflicts(), 1)
        self.assertEqual(self.index.conflicts(), [])


# --- C-FIND -------------------------------------------------------------------------------------------------


class ConflictQueryTests(SynchronousTestCase):
    """C-FIND on the conflict corpus: every study matches and answers its own patient attributes."""

    def setUp(self):
        folder = os.path.abspath(self.mktemp())
        self.archive = archive_copy(folder, fill_conflicts)
        self.addCleanup(self.archive.close)

    def query(self, level: str = "STUDY", **keys) -> List[Dataset]:
        keys.setdefault("StudyInstanceUID", "")
        for keyword in ("PatientName", "PatientID", "PatientBirthDate"):
            keys.setdefault(keyword, "")
        return [Dataset.from_json(result) for result in run_query(self.archive, identifier(level, **keys))]

    def answers(self, level: str = "STUDY", **keys) -> set:
        return {(str(ds.StudyInstanceUID), str(ds.PatientName), str(ds.PatientBirthDate))
                for ds in self.query(level, **keys)}

    @staticmethod
    def own(*studies) -> set:
        return {(study.uid, study.name, study.birth_date) for study in studies}

    def test_each_name_finds_exactly_its_study(self):
        self.assertEqual(self.answers(PatientName="Jones^Mary"), self.own(FIRST))
        self.assertEqual(self.answers(PatientName="Smith^Mary"), self.own(SECOND))
        self.assertEqual(self.answers(PatientBirthDate="19800101"), self.own(FIRST))

    def test_patient_id_finds_both_each_with_its_own_name(self):
        self.assertEqual(self.answers(PatientID="PIDC01"), self.own(FIRST, SECOND))

    def test_series_and_image_levels_answer_the_studys_own_name(self):
        for study in (FIRST, SECOND):
            with self.subTest(study=study.uid):
                series = self.query("SERIES", StudyInstanceUID=study.uid, SeriesInstanceUID="")
                self.assertEqual({(str(ds.PatientName), str(ds.PatientBirthDate)) for ds in series},
                                 {(study.name, study.birth_date)})
                images = self.query("IMAGE", StudyInstanceUID=study.uid, SeriesInstanceUID=f"{study.uid}.1",
                                    SOPInstanceUID="")
                self.assertEqual(len(images), 2)
                self.assertEqual({str(ds.PatientName) for ds in images}, {study.name})
        # a name that only the other study carries matches nothing below this study
        self.assertEqual(self.query("SERIES", StudyInstanceUID=FIRST.uid, SeriesInstanceUID="",
                                    PatientName="Smith*"), [])

    def test_patient_related_counters_count_by_patient_id(self):
        """Number of Patient Related Studies/Series/Instances count every study of the Patient ID, whatever names
        they carry."""
        found = self.query(PatientName="Jones^Mary", NumberOfPatientRelatedStudies="",
                           NumberOfPatientRelatedSeries="", NumberOfPatientRelatedInstances="")
        self.assertEqual(len(found), 1)
        ds = found[0]
        self.assertEqual((int(ds.NumberOfPatientRelatedStudies), int(ds.NumberOfPatientRelatedSeries),
                          int(ds.NumberOfPatientRelatedInstances)), (2, 3, 6))

    def test_the_whole_corpus_answers_exactly(self):
        """Issue 8's queries on the whole corpus, against the answers worked out from the corpus itself."""
        import fnmatch

        def expected(predicate) -> set:
            return self.own(*(study for study in CONFLICT_STUDIES if predicate(study)))

        cases = [
            ({"PatientName": "Smith*"}, lambda s: s.name.startswith("Smith")),
            ({"PatientName": "Jone?^Pat0001*"}, lambda s: fnmatch.fnmatchcase(s.name, "Jone?^Pat0001*")),
            ({"PatientName": "Rossi*", "ModalitiesInStudy": "NM"},
             lambda s: s.name.startswith("Rossi") and "NM" in s.modalities),
            ({"PatientName": "*^Pat000?"}, lambda s: fnmatch.fnmatchcase(s.name, "*^Pat000?")),
            ({"PatientBirthDate": "19500115-19541231"}, lambda s: "19500115" <= s.birth_date <= "19541231"),
            ({"PatientID": "PIDX03\\PIDX04"}, lambda s: s.patient_id in ("PIDX03", "PIDX04")),
        ]
        for keys, predicate in cases:
            with self.subTest(keys=keys):
                answers = self.answers(**keys)
                self.assertEqual(answers, expected(predicate))
                self.assertTrue(answers)

    def test_insensitive_names(self):
        """pn_matching = "insensitive" matches the study's own name too (the folded names are per study)."""
        found = {str(ds.StudyInstanceUID) for ds in
                 (Dataset.from_json(r) for r in run_query(self.archive, identifier("STUDY", PatientName="smith^m*",
                                                                                  StudyInstanceUID=""),
                                                          insensitive_names=True))}
        self.assertEqual(found, {SECOND.uid})

    def test_through_the_find_service(self):
        """The C-FIND SCP answers each study with its own name (the DIMSE path, encoded responses)."""
        harness = FindHarness(self, fill_conflicts)
        harness.associate()
        found = identifiers(harness.find(identifier("STUDY", PatientID="PIDC01", PatientName="",
                                                    PatientBirthDate="", StudyInstanceUID="")))
        self.assertEqual({(str(ds.StudyInstanceUID), str(ds.PatientName), ds.PatientBirthDate) for ds in found},
                         self.own(FIRST, SECOND))


# --- the archive: log lines ------------------------------------------------------------------------------------


class ConflictLogTests(SynchronousTestCase):
    """Archive.commit logs each new conflict once, as a warning without names or birth dates."""

    def setUp(self):
        self.archive = open_archive(os.path.abspath(self.mktemp()))
        self.addCleanup(self.archive.close)

    def store(self, study, instance: int = 1) -> None:
        ds = make_dataset(patient=study.name, patient_id=study.patient_id, study=study.uid, series=f"{study.uid}.1",
                          sop=f"{study.uid}.1.{instance}")
        ds.PatientBirthDate = study.birth_date
        store_dataset(self.archive, ds)

    def test_warning_names_study_patient_id_and_attributes_only(self):
        events = capture_log(self, "info")
        self.store(FIRST)
        self.store(SECOND)
        self.store(SECOND, 2)
        warnings = [event for event in events if event.get("log_namespace") == "appliance.archive"
                    and event["log_level"].name == "warn"]
        self.assertEqual(len(warnings), 1, [formatEvent(e) for e in warnings])
        text = formatEvent(warnings[0])
        for expected in (SECOND.uid, FIRST.uid, "PIDC01", "PatientName, PatientBirthDate"):
            self.assertIn(expected, text)
        for patient_data in ("Smith", "Jones", "19800101", "19800110"):
            self.assertNotIn(patient_data, text)
        self.assertEqual(warnings[0]["attributes"], ("PatientName", "PatientBirthDate"))
        self.assertFalse([event for event in events if event["log_level"].name == "debug"])

    def test_values_only_at_debug_level(self):
        events = capture_log(self, "debug")
        self.store(FIRST)
        self.store(SECOND)
        debug = [formatEvent(event) for event in events if event.get("log_namespace") == "appliance.archive"
                 and event["log_level"].name == "debug"]
        self.assertTrue(any("'Jones^Mary' -> 'Smith^Mary'" in line and "'19800101' -> '19800110'" in line
                            for line in debug), debug)


# --- appliance-archive conflicts ----------------------------------------------------------------------------


class ConflictsCommandTests(SynchronousTestCase):
    """``appliance-archive conflicts`` lists the recorded conflicts; ``--clear`` forgets them."""

    def setUp(self):
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        self.config_path = os.path.join(folder, "appliance.toml")
        with open(self.config_path, "w") as handle:
            handle.write('[appliance]\ndata_dir = "data"\n\n[disk_server]\nport = 0\nmin_free_space = 0\n')
        config = configuration.load(self.config_path)
        archive = open_archive(config.archive.path)
        try:
            for ds in conflict_corpus()[:7]:  # FIRST, SECOND (two series) and UNRELATED
                store_dataset(archive, ds)
        finally:
            archive.close()

    def run_cli(self, *argv: str):
        out = io.StringIO()
        self.patch(sys, "stderr", io.StringIO())
        return cli.main(["--config", self.config_path, *argv], out=out), out.getvalue()

    def test_list_and_clear(self):
        code, output = self.run_cli("conflicts")
        self.assertEqual(code, 0)
        lines = output.splitlines()
        self.assertEqual(lines[-1], "1 conflicts")
        self.assertIn(f"Patient ID PIDC01: study {SECOND.uid} differs from study {FIRST.uid} in PatientName, "
                      "PatientBirthDate (seen once)", lines[0])
        self.assertNotIn("Smith", output)
        code, output = self.run_cli("conflicts", "--clear", FIRST.uid)
        self.assertEqual((code, output), (0, "forgot 1 conflicts\n"))
        self.assertEqual(self.run_cli("conflicts")[1], "0 conflicts\n")

    def test_list_patients_shows_each_name(self):
        code, output = self.run_cli("list", "--patients")
        self.assertEqual(code, 0)
        self.assertIn("Smith^Mary | Jones^Mary", output)


# --- upgrading an index of schema version 1 -------------------------------------------------------------------


class UpgradeTests(SynchronousTestCase):
    """An index written by schema version 1 is upgraded when the archive opens it, without losing a row."""

    def build_v1(self, datasets: List[Dataset], missing: tuple = ()) -> str:
        """An archive folder with the objects' files and a version 1 index of them (stored in order, one second
        apart); the files of SOP instances in ``missing`` are then removed.  Returns the folder."""
        root = os.path.abspath(self.mktemp())
        archive = open_archive(root)  # the files, exactly as the archive writes them
        try:
            for ds in datasets:
                store_dataset(archive, ds)
            paths = {row.sop_uid: row.path for row in archive.index.all_instances()}
        finally:
            archive.close()
        for name in os.listdir(root):
            if name.startswith("index.sqlite"):
                os.remove(os.path.join(root, name))
        db = create_v1(os.path.join(root, "index.sqlite"))
        try:
            for number, ds in enumerate(datasets):
                path = paths[ds.SOPInstanceUID]
                meta = extract(dcmread(os.path.join(root, path), stop_before_pixels=True))
                add_v1(db, meta, path, os.path.getsize(os.path.join(root, path)), EXPLICIT_LE, "TESTS",
                       1000.0 + number)
        finally:
            db.close()
        for sop in missing:
            os.remove(os.path.join(root, paths[sop]))
        return root

    @staticmethod
    def counts(path: str) -> tuple:
        db = sqlite3.connect(path)
        try:
            return tuple(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
                         for table in ("patients", "studies", "series", "instances"))
        finally:
            db.close()

    @staticmethod
    def layout(path: str) -> dict:
        """Every table's columns (name, type, not null, default) and every index's columns."""
        db = sqlite3.connect(path)
        try:
            tables = [name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
            return {table: ([row[1:5] for row in db.execute(f"PRAGMA table_info({table})")],
                            sorted((index[1], tuple(column[2] for column in db.execute(f"PRAGMA index_info({index[1]})")))
                                   for index in db.execute(f"PRAGMA index_list({table})")))
                    for table in tables}
        finally:
            db.close()

    def study_answers(self, archive) -> Dict[str, tuple]:
        results = run_query(archive, identifier("STUDY", StudyInstanceUID="", PatientName="", PatientID="",
                                                PatientBirthDate="", NumberOfPatientRelatedStudies=""))
        return {str(ds.StudyInstanceUID): (str(ds.PatientName), ds.PatientBirthDate, int(ds.NumberOfPatientRelatedStudies))
                for ds in map(Dataset.from_json, results)}

    def test_version_1_index_answers_the_shared_name_before(self):
        """The defect the upgrade removes: in a version 1 index both studies of PIDC01 carry the last name."""
        root = self.build_v1(conflict_corpus()[:6])
        db = sqlite3.connect(os.path.join(root, "index.sqlite"))
        self.addCleanup(db.close)
        names = db.execute("SELECT DISTINCT p.patient_name FROM studies st JOIN patients p ON st.patient_pk = p.pk "
                           "WHERE p.patient_id = 'PIDC01'").fetchall()
        self.assertEqual(names, [("Smith^Mary",)])

    def test_upgrade_gives_every_study_its_own_name(self):
        datasets = conflict_corpus()
        root = self.build_v1(datasets)
        before = self.counts(os.path.join(root, "index.sqlite"))
        events = capture_log(self, "info")
        archive = open_archive(root)
        self.addCleanup(archive.close)
        upgrade = archive.index.upgrade
        self.assertEqual((upgrade.from_version, upgrade.studies, upgrade.from_files, upgrade.from_index),
                         (1, len(CONFLICT_STUDIES), len(CONFLICT_STUDIES), 0))
        self.assertEqual(self.counts(archive.index_path), before)  # not a row lost
        answers = self.study_answers(archive)
        patients = {}
        for study in CONFLICT_STUDIES:
            patients[study.patient_id] = patients.get(study.patient_id, 0) + 1
        self.assertEqual(answers, {study.uid: (study.name, study.birth_date, patients[study.patient_id])
                                   for study in CONFLICT_STUDIES})
        # one conflict per pair of studies of a Patient ID, recorded and logged
        self.assertEqual(len(upgrade.conflicts), len(CONFLICT_STUDIES) - len(patients))
        self.assertEqual(len(archive.index.conflicts()), len(upgrade.conflicts))
        warnings = [formatEvent(e) for e in events if e.get("log_namespace") == "appliance.archive"
                    and e["log_level"].name == "warn"]
        self.assertIn("upgraded the index", warnings[0])
        self.assertEqual(len(warnings), 1 + len(upgrade.conflicts))
        version = archive.index.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
        self.assertEqual(int(version), SCHEMA_VERSION)
        # the upgraded index is laid out exactly as a new one
        fresh = os.path.join(os.path.abspath(self.mktemp()), "index.sqlite")
        ArchiveIndex(fresh).close()
        self.assertEqual(self.layout(archive.index_path), self.layout(fresh))
        # and works as one: a new object of PIDC01 with a third name is checked against both studies
        store_dataset(archive, make_dataset(patient="Brown^Mary", patient_id="PIDC01", study="1.2.826.0.1.77",
                                            series="1.2.826.0.1.77.1", sop="1.2.826.0.1.77.1.1"))
        self.assertEqual(len(archive.index.conflicts()), len(upgrade.conflicts) + 2)

    def test_the_newest_object_of_a_study_stands(self):
        """In a version 1 study whose objects disagree, the most recently stored object's values are taken."""
        first = make_dataset(patient="Jones^Mary", patient_id="P1", study="1.2.826.0.1.5", series="1.2.826.0.1.5.1",
                             sop="1.2.826.0.1.5.1.1")
        second = make_dataset(patient="Jones-Smith^Mary", patient_id="P1", study="1.2.826.0.1.5",
                              series="1.2.826.0.1.5.2", sop="1.2.826.0.1.5.2.1")
        archive = open_archive(self.build_v1([first, second]))
        self.addCleanup(archive.close)
        self.assertEqual(self.study_answers(archive)["1.2.826.0.1.5"][0], "Jones-Smith^Mary")

    def test_unreadable_object_keeps_the_indexed_values(self):
        """A study whose newest file is gone keeps its patient's indexed values (and its rows, until the
        start-up check removes the row without a file)."""
        datasets = conflict_corpus()[:3]  # FIRST (two objects), SECOND's first object
        root = self.build_v1(datasets, missing=(datasets[1].SOPInstanceUID,))
        archive = open_archive(root)
        self.addCleanup(archive.close)
        self.assertEqual((archive.index.upgrade.from_files, archive.index.upgrade.from_index), (1, 1))
        answers = self.study_answers(archive)
        self.assertEqual(answers[FIRST.uid][0], "Smith^Mary")  # version 1's value: the best there is
        self.assertEqual(answers[SECOND.uid][0], "Smith^Mary")

    def test_without_a_reader_version_1_is_refused(self):
        root = self.build_v1(conflict_corpus()[:2])
        path = os.path.join(root, "index.sqlite")
        with self.assertRaises(RuntimeError) as raised:
            ArchiveIndex(path)
        self.assertIn(path, str(raised.exception))
        self.assertEqual(self.counts(path)[1], 1)  # still version 1, untouched
        db = sqlite3.connect(path)
        self.addCleanup(db.close)
        self.assertEqual(db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone(), ("1",))

    def test_a_failed_upgrade_leaves_version_1(self):
        """An error half-way through the upgrade rolls it back whole: version 1 as it was, upgraded next time."""
        root = self.build_v1(conflict_corpus()[:4])
        path = os.path.join(root, "index.sqlite")
        before = self.layout(path)

        class Failing:
            """An object read for the upgrade whose values fail inside the transaction (a disk error, say)."""

            def __init__(self, study_uid: str) -> None:
                self.study_instance_uid = study_uid

            @property
            def patient_id(self):
                raise sqlite3.OperationalError("disk I/O error")

        def read(relative: str):
            return Failing(str(dcmread(os.path.join(root, relative), stop_before_pixels=True).StudyInstanceUID))

        with self.assertRaises(sqlite3.OperationalError):
            ArchiveIndex(path, read_object=read)
        self.assertEqual(self.layout(path), before)
        archive = open_archive(root)
        self.addCleanup(archive.close)
        self.assertEqual(self.study_answers(archive)[FIRST.uid][0], "Jones^Mary")
