"""What the index keeps of each stored object: the query keys of every level.

:func:`extract` reads a data set (pixel data never loaded) into an
:class:`ObjectMetadata`: a few columns per level for matching, and each level's
attributes in pydicom's DICOM JSON model (PS3.18 F.2) so that C-FIND can
answer any of them with the value as stored, in Unicode whatever the
object's Specific Character Set was.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, Optional

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

__all__ = ["PATIENT_KEYWORDS", "STUDY_KEYWORDS", "SERIES_KEYWORDS", "INSTANCE_KEYWORDS", "ObjectMetadata", "extract",
           "dump_level", "level_tags", "json_text", "normalize_name"]

PATIENT_KEYWORDS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "OtherPatientIDsSequence",
    "EthnicGroup",
    "PatientComments",
)
STUDY_KEYWORDS = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "ReferringPhysicianName",
    "StudyDescription",
    "NameOfPhysiciansReadingStudy",
    "AdmittingDiagnosesDescription",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "Occupation",
    "AdditionalPatientHistory",
    "IssuerOfAccessionNumberSequence",
    "ProcedureCodeSequence",
)
SERIES_KEYWORDS = (
    "SeriesInstanceUID",
    "Modality",
    "SeriesNumber",
    "SeriesDate",
    "SeriesTime",
    "SeriesDescription",
    "BodyPartExamined",
    "Laterality",
    "ProtocolName",
    "OperatorsName",
    "PerformingPhysicianName",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "RequestAttributesSequence",
)
INSTANCE_KEYWORDS = (
    "SOPInstanceUID",
    "SOPClassUID",
    "InstanceNumber",
    "FrameOfReferenceUID",
    "ContentDate",
    "ContentTime",
    "AcquisitionDate",
    "AcquisitionTime",
    "AcquisitionDateTime",
    "ImageType",
    "InstanceCreationDate",
    "InstanceCreationTime",
    "SliceLocation",
    "Rows",
    "Columns",
    "ContrastBolusAgent",
    "BitsAllocated",
    "SamplesPerPixel",
    "NumberOfFrames",
    "PhotometricInterpretation",
    "IconImageSequence",
    "ImageComments",
)


@dataclass(frozen=True)
class ObjectMetadata:
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str
    issuer_of_patient_id: str
    patient_name: str
    patient_birth_date: str
    patient_sex: str
    study_date: str
    study_time: str
    accession_number: str
    study_id: str
    modality: str
    series_number: Optional[int]
    instance_number: Optional[int]
    bits_allocated: Optional[int]
    #: each level's attributes as the index stores them (dump_level); None for a level not built (the
    #: Memory-Server's scan builds only the study's: the others serve the archive's index and C-FIND)
    patient_json: Optional[str]
    study_json: Optional[str]
    series_json: Optional[str]
    instance_json: Optional[str]


def normalize_name(name: str) -> str:
    """A person name without trailing empty components or groups (PS3.5 6.2: they are insignificant)."""
    groups = [group.rstrip("^ ").strip() for group in name.split("=")]
    while groups and not groups[-1]:
        groups.pop()
    return "=".join(groups)


_NUMBER_VRS = {"US": int, "SS": int, "UL": int, "SL": int, "UV": int, "SV": int, "FL": float, "FD": float}
_TEXT_VRS = {"AE", "AS", "CS", "DA", "DT", "LO", "LT", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}


def _json_value(element) -> Optional[dict]:
    """One element in the DICOM JSON model (PS3.18 F.2), built directly for the common VRs.

    Falls back to pydicom's own conversion for the rest (binary VRs); an
    element whose value does not convert (IS "1A") is left out (None).
    """
    vr = element.VR
    value = element.value
    if value is None or value == "" or (vr != "SQ" and isinstance(value, (list, tuple)) and not value):
        return {"vr": vr}
    values = list(value) if element.VM > 1 else [value]
    try:
        if vr in _TEXT_VRS:
            return {"vr": vr, "Value": [str(v) for v in values]}
        if vr == "PN":
            names = []
            for name in values:
                groups = name.components if hasattr(name, "components") else str(name).split("=")
                names.append({label: group for label, group in zip(("Alphabetic", "Ideographic", "Phonetic"), groups)
                              if group})
            return {"vr": vr, "Value": names}
        if vr == "IS":
            return {"vr": vr, "Value": [int(str(v)) for v in values]}
        if vr == "DS":
            return {"vr": vr, "Value": [float(str(v)) for v in values]}
        if vr in _NUMBER_VRS:
            return {"vr": vr, "Value": [_NUMBER_VRS[vr](v) for v in values]}
        if vr == "SQ":
            return {"vr": vr, "Value": [_dataset_json(item) for item in value]}
        return element.to_json_dict(None, 1 << 20)
    except (TypeError, ValueError, OverflowError):
        return None


def _dataset_json(ds: Dataset) -> dict:
    out = {}
    for element in ds:
        entry = _json_value(element)
        if entry is not None:
            out[f"{int(element.tag):08X}"] = entry
    return out


_TAGS: dict = {}


def level_tags(keywords) -> list:
    """(keyword, tag) of each keyword of a level's list, looked up once."""
    tags = _TAGS.get(keywords)
    if tags is None:
        tags = _TAGS[keywords] = [(keyword, tag_for_keyword(keyword)) for keyword in keywords]
    return tags


def dump_level(level: dict) -> str:
    """A level's attributes (``{"00100010": DICOM JSON entry, ...}``) as the index stores them.

    The one serialisation of the index's JSON, shared with the ingest's fast
    path (:mod:`.fastscan`) so that both give the same string.
    """
    return _ENCODER.encode(level)


#: ``json.dumps(..., sort_keys=True, ensure_ascii=False)``, its encoder built once.
_ENCODER = json.JSONEncoder(sort_keys=True, ensure_ascii=False)


def _level_json(ds: Dataset, keywords) -> str:
    level = {}
    for _, tag in level_tags(keywords):
        if tag in ds:
            entry = _json_value(ds[tag])
            if entry is not None:  # an attribute whose value does not parse is left out of the index
                level[f"{tag:08X}"] = entry
    return dump_level(level)


def json_text(entry: Optional[dict]) -> Any:
    """A DICOM JSON attribute's value as text (a list of strings, one a value; a person name as ``A=I=P``), None
    when it has none: what C-FIND matches, and what the index compares."""
    if not entry:
        return None
    values = entry.get("Value")
    if not values:
        return None
    if entry.get("vr") == "PN":
        names = []
        for value in values:
            if isinstance(value, dict):
                groups = [value.get("Alphabetic", ""), value.get("Ideographic", ""), value.get("Phonetic", "")]
                names.append("=".join(groups).rstrip("="))
            else:
                names.append(str(value))
        return names
    return [str(v) for v in values]


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    return str(value).strip()


def _integer(ds: Dataset, keyword: str) -> Optional[int]:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def extract(ds: Dataset) -> ObjectMetadata:
    """The index's view of ``ds``; raises ValueError when a required UID is missing.

    :mod:`.fastscan` gives the same from a data set's bytes for the common case (the ingest's fast path);
    a change here needs the same change there (``tests/test_fastscan.py`` compares the two).
    """
    uids: Dict[str, Any] = {}
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        value = _text(ds, keyword)
        if not value:
            raise ValueError(f"the data set has no {keyword}")
        uids[keyword] = value
    return ObjectMetadata(
        sop_class_uid=uids["SOPClassUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        study_instance_uid=uids["StudyInstanceUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        patient_id=_text(ds, "PatientID"),
        issuer_of_patient_id=_text(ds, "IssuerOfPatientID"),
        patient_name=normalize_name(_text(ds, "PatientName")),
        patient_birth_date=_text(ds, "PatientBirthDate"),
        patient_sex=_text(ds, "PatientSex"),
        study_date=_text(ds, "StudyDate"),
        study_time=_text(ds, "StudyTime"),
        accession_number=_text(ds, "AccessionNumber"),
        study_id=_text(ds, "StudyID"),
        modality=_text(ds, "Modality"),
        series_number=_integer(ds, "SeriesNumber"),
        instance_number=_integer(ds, "InstanceNumber"),
        bits_allocated=_integer(ds, "BitsAllocated"),
        patient_json=_level_json(ds, PATIENT_KEYWORDS),
        study_json=_level_json(ds, STUDY_KEYWORDS),
        series_json=_level_json(ds, SERIES_KEYWORDS),
        instance_json=_level_json(ds, INSTANCE_KEYWORDS),
    )
