"""C-FIND test data: a generated corpus of patients, studies, series and images, pydicom's
character-set files, and archives filled with them.

The corpus is small (9 studies of 5 patients, 13 series, 27 instances) but varied: names
that share prefixes, dates on both sides of a year end, multi-valued Image Type, studies
with several modalities, a coded sequence.  Building an archive costs an fsync per object,
so each kind of archive is built once per test process (under trial's working folder) and
copied for every test that needs it.
"""

from __future__ import annotations

import os
import shutil
import warnings
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from twisted.internet import defer
from twisted.internet.task import Clock

from appliance.ae.storage import STATUSES
from appliance.archive.archive import Archive
from appliance.archive.eviction import StorageLimits
from appliance.archive.sink import examine
from appliance.archive.store import part10_header
from appliance.dataset.checks import Refused
from appliance.dicom.uids import EXPLICIT_VR_LITTLE_ENDIAN, IMPLEMENTATION_CLASS_UID
from appliance.net.threads import synchronous_runner

from .support_data import CHARSET_FILES, dataset_bytes, encode_dataset, make_dataset

#: Root of the corpus UIDs (a UUID-derived 2.25 root keeps them clear of anyone else's).
ROOT = "2.25.91334627813412360218912648730126455100"

SOP_CLASSES = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "US": "1.2.840.10008.5.1.4.1.1.6.1",
    "CR": "1.2.840.10008.5.1.4.1.1.1",
    "SR": "1.2.840.10008.5.1.4.1.1.88.11",
    "NM": "1.2.840.10008.5.1.4.1.1.20",
}


class Patient(NamedTuple):
    name: str
    id: str
    birth_date: str
    sex: str


class Study(NamedTuple):
    patient: int
    date: str
    time: str
    accession: str
    description: str
    referring: str
    modalities: Tuple[str, ...]  # one series per entry


PATIENTS = (
    Patient("Doe^John", "PID001", "19700101", "M"),
    Patient("Doe^Jane", "PID002", "19751231", "F"),
    Patient("Smith^Anna", "PID003", "19800615", "F"),
    Patient("Smithers^Waylon^J", "PID004", "19550301", "M"),
    Patient("O'Brien^Pat", "PID005", "19901111", "O"),
)

STUDIES = (
    Study(0, "20230105", "081500", "ACC1001", "CT HEAD", "House^Gregory", ("CT", "CT")),
    Study(0, "20230610", "143000", "ACC1002", "MR KNEE", "Wilson^James", ("MR",)),
    Study(1, "20231231", "235959", "ACC1003", "CHEST PA", "House^Gregory", ("CR",)),
    Study(1, "20240101", "000001", "ACC1004", "CT ABDOMEN", "", ("CT", "SR")),
    Study(2, "20240215", "101010", "ACC1005", "US ABDOMEN", "Cuddy^Lisa", ("US",)),
    Study(2, "20240229", "120000", "ACC1006", "MR BRAIN", "Wilson^James", ("MR", "MR", "SR")),
    Study(3, "20240301", "093000", "ACC1007", "CT CHEST", "Foreman^Eric", ("CT",)),
    Study(4, "20240415", "170000", "ACC1008", "CR HAND", "Cuddy^Lisa", ("CR",)),
    Study(4, "20240416", "071500", "ACC1009", "SR REPORT", "House^Gregory", ("SR",)),
)


def study_uid(study: int) -> str:
    return f"{ROOT}.{study + 1}"


def series_uid(study: int, series: int) -> str:
    return f"{ROOT}.{study + 1}.{series + 1}"


def sop_uid(study: int, series: int, instance: int) -> str:
    return f"{ROOT}.{study + 1}.{series + 1}.{instance + 1}"


def instance_count(study: int, series: int) -> int:
    """1 to 3 instances per series, varied."""
    return 1 + (study + 2 * series) % 3


def corpus() -> List[Dataset]:
    """The corpus's objects, freshly made (27 of them), in study, series, instance order."""
    datasets = []
    for s, study in enumerate(STUDIES):
        patient = PATIENTS[study.patient]
        for k, modality in enumerate(study.modalities):
            for i in range(instance_count(s, k)):
                ds = make_dataset(patient=patient.name, patient_id=patient.id, study=study_uid(s),
                                  series=series_uid(s, k), sop=sop_uid(s, k, i), sop_class=SOP_CLASSES[modality],
                                  modality=modality)
                ds.PatientBirthDate = patient.birth_date
                ds.PatientSex = patient.sex
                ds.StudyDate, ds.StudyTime = study.date, study.time
                ds.AccessionNumber = study.accession
                ds.StudyDescription = study.description
                ds.ReferringPhysicianName = study.referring
                ds.StudyID = f"S{s + 1}"
                ds.SeriesNumber = k + 1
                ds.SeriesDescription = f"{modality} series {k + 1}"
                ds.SeriesDate = study.date
                ds.SeriesTime = f"{int(study.time[:2]):02d}{(int(study.time[2:4]) + k) % 60:02d}00"
                ds.InstanceNumber = i + 1
                ds.ContentDate = study.date
                ds.ContentTime = ds.SeriesTime
                ds.AcquisitionDateTime = f"{study.date}{ds.SeriesTime}.{i}"
                if modality == "SR":
                    for keyword in ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                                    "SamplesPerPixel", "PhotometricInterpretation", "PixelData"):
                        delattr(ds, keyword)
                else:
                    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"] if i % 2 == 0 else ["DERIVED", "SECONDARY"]
                if s in (0, 6):  # CT studies carry a procedure code
                    code = Dataset()
                    code.CodeValue = "CTHEAD" if s == 0 else "CTCHEST"
                    code.CodingSchemeDesignator = "LOCAL"
                    code.CodeMeaning = study.description
                    ds.ProcedureCodeSequence = DicomSequence([code])
                datasets.append(ds)
    return datasets


# --- patient attributes that differ between studies of one Patient ID ----------------------------------------


class ConflictStudy(NamedTuple):
    uid: str
    patient_id: str
    name: str
    birth_date: str
    sex: str
    modalities: Tuple[str, ...]  # one series per entry, two instances each


CONFLICT_ROOT = f"{ROOT}.800"
_CONFLICT_SURNAMES = ("Smith", "Jones", "Rossi", "Novak")


def _conflict_studies() -> Tuple[ConflictStudy, ...]:
    """Issue 8's case, small: one Patient ID whose two studies carry different names and birth dates (a name
    corrected at registration), an unrelated study, then twelve more such pairs of varied names, in the order
    they are stored (each pair's first study first)."""
    studies = [
        ConflictStudy(f"{CONFLICT_ROOT}.1", "PIDC01", "Jones^Mary", "19800101", "F", ("CT",)),
        ConflictStudy(f"{CONFLICT_ROOT}.2", "PIDC01", "Smith^Mary", "19800110", "F", ("MR", "MR")),
        ConflictStudy(f"{CONFLICT_ROOT}.3", "PIDC02", "Rossi^Paolo", "19601231", "M", ("NM",)),
    ]
    for i in range(12):
        first, second = _CONFLICT_SURNAMES[i % 4], _CONFLICT_SURNAMES[(i + 1 + i // 4) % 4]
        birth = f"19{50 + i:02d}0{1 + i % 9}15"
        other_birth = birth if i % 2 else f"19{50 + i:02d}0{1 + i % 9}16"  # odd pairs differ in the name only
        patient_id = f"PIDX{i:02d}"
        studies.append(ConflictStudy(f"{CONFLICT_ROOT}.{10 + 2 * i}", patient_id, f"{first}^Pat{i:04d}", birth,
                                     "O", (("NM", "CT", "MR")[i % 3],)))
        studies.append(ConflictStudy(f"{CONFLICT_ROOT}.{11 + 2 * i}", patient_id, f"{second}^Pat{i:04d}", other_birth,
                                     "O", (("CT", "NM")[i % 2],)))
    return tuple(studies)


CONFLICT_STUDIES = _conflict_studies()


def conflict_corpus() -> List[Dataset]:
    """The objects of :data:`CONFLICT_STUDIES`, in the order they are stored."""
    datasets = []
    for s, study in enumerate(CONFLICT_STUDIES):
        for k, modality in enumerate(study.modalities):
            for i in range(2):
                ds = make_dataset(patient=study.name, patient_id=study.patient_id, study=study.uid,
                                  series=f"{study.uid}.{k + 1}", sop=f"{study.uid}.{k + 1}.{i + 1}",
                                  sop_class=SOP_CLASSES[modality],
                                  modality=modality)
                ds.PatientBirthDate, ds.PatientSex = study.birth_date, study.sex
                ds.AccessionNumber = f"ACCX{s + 1:03d}"
                ds.StudyDate = f"2024{1 + s % 12:02d}{1 + s % 28:02d}"
                ds.SeriesNumber, ds.InstanceNumber = k + 1, i + 1
                datasets.append(ds)
    return datasets


def fill_conflicts(archive: Archive) -> None:
    for ds in conflict_corpus():
        store_dataset(archive, ds)


# --- pydicom's character-set files --------------------------------------------------------------------


class CharsetFile(NamedTuple):
    name: str
    path: str
    #: the decoded Patient's Name, None for files without one
    patient_name: Optional[str]
    sop_uid: Optional[str]


def charset_files() -> List[CharsetFile]:
    """Every DICOM file in pydicom's charset_files folder (FileInfo.txt is not one)."""
    found = []
    for name in sorted(os.listdir(CHARSET_FILES)):
        if not name.endswith(".dcm"):
            continue
        path = os.path.join(CHARSET_FILES, name)
        ds = dcmread(path, stop_before_pixels=True)
        ds.decode()
        patient_name = str(ds.PatientName) if "PatientName" in ds else None
        found.append(CharsetFile(name, path, patient_name, str(ds.get("SOPInstanceUID", "")) or None))
    return found


# --- archives ----------------------------------------------------------------------------------------


def open_archive(root: str, clock: Optional[Clock] = None) -> Archive:
    """An Archive at ``root`` with synchronous runners (everything happens at once, in this thread)."""
    if clock is None:
        clock = Clock()
        clock.advance(1_000_000)
    return Archive(root, StorageLimits(min_free_space=0), "replace", clock, synchronous_runner, synchronous_runner)


def store_bytes(archive: Archive, data: bytes, sop_class: str, sop_instance: str,
                transfer_syntax: str = EXPLICIT_VR_LITTLE_ENDIAN, source_ae: str = "TESTS"):
    """Store a data set through the archive as the C-STORE SCP does: temporary file, examine, commit.

    Returns the StoreOutcome; raises what ``examine`` or the commit raise.
    """
    temp = _result(archive.open_temp())
    header = part10_header(sop_class, sop_instance, transfer_syntax, IMPLEMENTATION_CLASS_UID, "TESTS", source_ae)
    _result(archive.write(temp, [header, data]))
    try:
        stored = examine(temp, len(header), sop_class, sop_instance, transfer_syntax, source_ae)
    except BaseException:
        _result(archive.discard(temp))
        raise
    return _result(defer.ensureDeferred(archive.commit(stored)))


def store_dataset(archive: Archive, ds: Dataset):
    return store_bytes(archive, encode_dataset(ds, EXPLICIT_VR_LITTLE_ENDIAN), ds.SOPClassUID, ds.SOPInstanceUID)


def _result(d: defer.Deferred):
    """The result of a Deferred that has fired (synchronous runners), raising its failure."""
    results: list = []
    d.addBoth(results.append)
    if not results:
        raise AssertionError("a synchronous archive operation did not complete")
    if isinstance(results[0], Exception) or hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


def fill_corpus(archive: Archive) -> None:
    for ds in corpus():
        store_dataset(archive, ds)


def fill_charsets(archive: Archive) -> Dict[str, str]:
    """Store every character-set file that has its UIDs; returns {file name: why it was refused}."""
    refused = {}
    for item in charset_files():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = dcmread(item.path, stop_before_pixels=True)
        # the data set's own UIDs, as a C-STORE SCU sends them (chrJapMulti's File Meta Information
        # names another instance); the file meta's when the data set has none
        sop_class = str(ds.get("SOPClassUID") or ds.file_meta.MediaStorageSOPClassUID)
        sop_instance = str(ds.get("SOPInstanceUID") or ds.file_meta.MediaStorageSOPInstanceUID)
        try:
            store_bytes(archive, dataset_bytes(item.path), sop_class, sop_instance,
                        str(ds.file_meta.TransferSyntaxUID))
        except Refused as error:  # examine's refusal: the status the C-STORE SCP answers it with, and why
            refused[item.name] = f"{STATUSES[error.kind]:04X} {error}"
    return refused


def fill_many(archive: Archive, count: int = 150) -> None:
    """``count`` instances in one series of one study (for streaming, max_results and cancel).

    Indexed directly (no files): C-FIND reads the index only, and an fsync per object would
    cost seconds.
    """
    from appliance.dataset.metadata import extract

    for number in range(count):
        ds = make_dataset(patient="Many^Images", patient_id="PIDMANY", study=f"{ROOT}.99", series=f"{ROOT}.99.1",
                          sop=f"{ROOT}.99.1.{number + 1}")
        ds.InstanceNumber = number + 1
        archive.index.add(extract(ds), f"none/{number}", 1000, EXPLICIT_VR_LITTLE_ENDIAN, "TESTS", 1.0)


def fill_long_names(archive: Archive, count: int = 400) -> None:
    """``count`` studies whose patient names are runs of 60 letters: what a backtracking wildcard matcher
    chokes on (issue 9).  Indexed directly (no files)."""
    from appliance.dataset.metadata import extract

    for number in range(count):
        ds = make_dataset(patient="a" * 60 + "=" + "a" * (number % 7), patient_id=f"PIDLONG{number}",
                          study=f"{ROOT}.98.{number + 1}", series=f"{ROOT}.98.{number + 1}.1",
                          sop=f"{ROOT}.98.{number + 1}.1.1")
        archive.index.add(extract(ds), f"none/long{number}", 1000, EXPLICIT_VR_LITTLE_ENDIAN, "TESTS", 1.0)


_TEMPLATES: Dict[str, str] = {}


def archive_copy(folder: str, *fillers: Callable[[Archive], object]) -> Archive:
    """A fresh Archive at ``folder`` holding what ``fillers`` store.

    The first call for a combination of fillers builds it (in trial's working folder);
    later calls copy those files, which is much faster than storing again.
    """
    key = "+".join(filler.__name__ for filler in fillers)
    template = _TEMPLATES.get(key)
    if template is None or not os.path.isdir(template):
        template = os.path.abspath(f"query-template-{os.getpid()}-{key}")
        shutil.rmtree(template, ignore_errors=True)
        archive = open_archive(template)
        try:
            for filler in fillers:
                filler(archive)
        finally:
            archive.close()  # the last connection: the WAL is checkpointed into the database file
        _TEMPLATES[key] = template
    shutil.copytree(template, folder)
    return open_archive(folder)
