"""Patient attributes per study, and conflicts between them: pure functions.

Each study answers C-FIND with the patient attributes its own objects carry
(the most recently stored object's).  Studies with the same Patient ID and
Issuer of Patient ID are one patient for the counters PS3.4 computes (Number
of Patient Related Studies, Series, Instances), but their names, birth dates
and the rest are never merged: a name corrected at registration, a typo on a
modality or a married name leaves each study under the name its images carry.

When two such studies, or two objects of one study, disagree, that is a
conflict an administrator should fix at the source.  :func:`differences`
says which attributes disagree; :class:`Conflict` is what the index
records and the archive logs (attribute names at warning level, values only
at debug level: they are patient data).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from ..dataset.metadata import PATIENT_KEYWORDS, json_text, level_tags
from .matching import normalize_name

__all__ = ["identity", "differences", "value_text", "Conflict"]

#: (keyword, tag hex) of the patient attributes compared, in PATIENT_KEYWORDS order
_COMPARED = tuple((keyword, f"{tag:08X}") for keyword, tag in level_tags(PATIENT_KEYWORDS))


def identity(patient_id: str, issuer: str, study_uid: str) -> str:
    """Who the patient is: Patient ID and Issuer, or, without a Patient ID, the study alone.

    Without a Patient ID nothing says two studies share a patient, so each
    such study is a patient of its own.
    """
    if patient_id:
        return f"id\\{patient_id}\\{issuer}"
    return f"study\\{study_uid}"


def _canonical(entry: Optional[dict]):
    """What an attribute's DICOM JSON entry says, for comparison.

    No value and an empty value are the same; person names compare without
    their trailing empty components (``Doe^John^^`` is ``Doe^John``).
    """
    text = json_text(entry)
    if text is None:
        return None
    if entry.get("vr") == "PN":
        return tuple(normalize_name(name) for name in text)
    return json.dumps(entry["Value"], sort_keys=True, ensure_ascii=False)


def _parse(attributes: str) -> Dict[str, dict]:
    return json.loads(attributes) if attributes else {}


def differences(old: str, new: str) -> Tuple[str, ...]:
    """Keywords of the patient attributes on which two levels' JSON (as the index keeps it) disagree."""
    if old == new:
        return ()
    before, after = _parse(old), _parse(new)
    return tuple(keyword for keyword, tag in _COMPARED if _canonical(before.get(tag)) != _canonical(after.get(tag)))


def value_text(attributes: str, keyword: str) -> str:
    """One patient attribute's value as text (for debug logs): ``Doe^John``, ``19700101``, ``-`` when absent."""
    tag = next(tag for name, tag in _COMPARED if name == keyword)
    value = _canonical(_parse(attributes).get(tag))
    if value is None:
        return "-"
    if isinstance(value, tuple):
        return "\\".join(value)
    return "\\".join(str(v) for v in json.loads(value))


@dataclass(frozen=True)
class Conflict:
    """Patient attributes of a study that differ from another study of its patient, or from its own earlier
    objects (``other_study_uid`` empty)."""

    study_uid: str
    patient_id: str
    issuer: str
    attributes: Tuple[str, ...]
    other_study_uid: str
    #: the object whose storing showed it
    sop_uid: str
    #: first time the index recorded this conflict (later occurrences are counted, not logged as warnings)
    new: bool
    #: (keyword, the other side's value, this object's value), for debug logs only
    values: Tuple[Tuple[str, str, str], ...] = ()

    @property
    def against(self) -> str:
        return f"study {self.other_study_uid}" if self.other_study_uid else "the study's earlier objects"

    def describe(self) -> str:
        """One line without patient data beyond the Patient ID: what an administrator looks for."""
        issuer = f" (issuer {self.issuer})" if self.issuer else ""
        return (f"study {self.study_uid} of Patient ID {self.patient_id or '(none)'}{issuer}: "
                f"{', '.join(self.attributes)} differ from {self.against}")
