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

from pydicom.dataset import Dataset

from .matching import normalize_name

__all__ = ["PATIENT_KEYWORDS", "STUDY_KEYWORDS", "SERIES_KEYWORDS", "INSTANCE_KEYWORDS", "ObjectMetadata", "extract"]

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
    patient_json: str
    study_json: str
    series_json: str
    instance_json: str


def _level_json(ds: Dataset, keywords) -> str:
    level = Dataset()
    for keyword in keywords:
        if keyword in ds:
            level[keyword] = ds[keyword]
    # an attribute whose value does not parse (IS "1A") is left out of the index, not a reason to refuse the object
    return json.dumps(level.to_json_dict(bulk_data_threshold=1 << 20, bulk_data_element_handler=None,
                                         suppress_invalid_tags=True), sort_keys=True)


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
    """The index's view of ``ds``; raises ValueError when a required UID is missing."""
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
