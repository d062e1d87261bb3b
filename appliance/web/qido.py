"""QIDO-RS query parameters (PS3.18 8.3.4 and 10.6) as a Study Root C-FIND identifier, and C-FIND answers as DICOM
JSON (PS3.18 F.2), without I/O.

:func:`parse_query` checks every parameter before anything is sent to a device and raises
:class:`QueryError` with the reason (the API answers 400 with it):

* attributes by keyword (``PatientName``) or tag (``00100010``), each at most once; an attribute pydicom's
  dictionary does not know, a command or file meta element, Pixel Data or a sequence is refused;
* values checked against their VR: dates, times and date-times as single values or ranges (``20200101-``),
  UIDs (a comma- or backslash-separated list for UID list matching), text within the VR's length, without
  control characters or backslashes; ``*`` and ``?`` are the wildcards of PS3.4 C.2.2.2.4;
* ``includefield`` (keywords or tags, comma-separated, or ``all``), ``limit`` and ``offset``;
  ``fuzzymatching=true`` is not supported and is answered by a warning, as PS3.18 8.3.4.1 asks.

The identifier asks for each level's default return attributes (PS3.18 Table 10.6.1-5 to 10.6.1-7) and
whatever ``includefield`` adds; values that are not ASCII make it UTF-8 (Specific Character Set ``ISO_IR 192``).
"""

from __future__ import annotations

import datetime
import math
import re
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset

from ..compat import encode_dataset
from ..dicom.uids import EXPLICIT_VR_LITTLE_ENDIAN, is_valid_uid

__all__ = ["QueryError", "Query", "LEVELS", "RETURN_KEYS", "parse_query", "to_json"]


class QueryError(ValueError):
    """A parameter that cannot be sent to a device; the message says which and why."""


#: The query levels of the API's paths and their Query/Retrieve Level.
LEVELS = {"studies": "STUDY", "series": "SERIES", "instances": "IMAGE"}

#: What each level answers when nothing else is asked for (PS3.18 Table 10.6.1-5, -6 and -7, with the
#: patient's attributes a study list shows).
RETURN_KEYS: Mapping[str, Tuple[str, ...]] = {
    "STUDY": ("SpecificCharacterSet", "StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy",
              "ReferringPhysicianName", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
              "StudyInstanceUID", "StudyID", "StudyDescription", "NumberOfStudyRelatedSeries",
              "NumberOfStudyRelatedInstances"),
    "SERIES": ("SpecificCharacterSet", "Modality", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription",
               "SeriesDate", "SeriesTime", "BodyPartExamined", "NumberOfSeriesRelatedInstances"),
    "IMAGE": ("SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns",
              "BitsAllocated", "NumberOfFrames"),
}

#: The most matches one query may ask for with ``limit`` (and ``offset`` + ``limit``).
MAX_LIMIT = 100000

#: Longest value of each text VR (PS3.5 Table 6.2-1), for a matching key; others: at most 1024 characters.
_MAX_LENGTH = {"AE": 16, "AS": 4, "CS": 16, "DS": 16, "IS": 12, "LO": 64, "SH": 16, "PN": 324, "UI": 64,
               "ST": 1024, "LT": 1024, "UC": 1024, "UT": 1024, "UR": 1024}
_NOT_MATCHABLE_VRS = {"SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# ASCII digits only (\d would take other scripts' digits, which int() reads), and \Z: "$" lets a newline end a value
_DATE = re.compile(r"\d{8}\Z", re.ASCII)
_TIME = re.compile(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?\Z", re.ASCII)
_DATETIME = re.compile(r"\d{4}(\d{2}(\d{2}(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?)?)?([+-]\d{4})?\Z", re.ASCII)
_HEX_TAG = re.compile(r"[0-9A-Fa-f]{8}\Z")
_KEYWORD = re.compile(r"[A-Za-z][A-Za-z0-9]{0,63}\Z")
_WHOLE_NUMBER = re.compile(r"[+-]?\d{1,20}\Z", re.ASCII)
_DECIMAL = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\Z", re.ASCII)
#: the whole-number VRs and the values each holds (IS: a string of a signed 32-bit integer, PS3.5 6.2)
_WHOLE_NUMBER_RANGES = {"IS": (-(1 << 31), (1 << 31) - 1), "US": (0, 0xFFFF), "SS": (-0x8000, 0x7FFF),
                        "UL": (0, 0xFFFFFFFF), "SL": (-(1 << 31), (1 << 31) - 1), "UV": (0, (1 << 64) - 1),
                        "SV": (-(1 << 63), (1 << 63) - 1)}
#: VRs whose values are binary numbers: sent as numbers, not as the text given
_BINARY_NUMBER_VRS = {"US", "SS", "UL", "SL", "UV", "SV", "FL", "FD"}
#: parameters of the API itself, not attributes
_CONTROL_PARAMETERS = {"includefield", "limit", "offset", "fuzzymatching"}


@dataclass
class Query:
    """A checked query: the identifier to send, and what the API does with the answers."""

    identifier: Dataset
    limit: Optional[int] = None
    offset: int = 0
    #: things to say in a Warning header (PS3.18 8.3.4.1)
    warnings: List[str] = field(default_factory=list)


def _tag(name: str) -> int:
    """The tag a parameter names, by keyword or as 8 hexadecimal digits."""
    if _HEX_TAG.match(name):
        tag = int(name, 16)
    else:
        tag = tag_for_keyword(name) if _KEYWORD.match(name) else None
        if tag is None:
            raise QueryError(f"unknown attribute {name[:64]!r} (a DICOM keyword or 8 hexadecimal digits)")
    return tag


def _vr(tag: int, name: str) -> str:
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        raise QueryError(f"unknown attribute {name[:64]!r} (not in the DICOM dictionary)") from None
    if tag >> 16 in (0x0000, 0x0002) or tag == 0x7FE00010:
        raise QueryError(f"{name} cannot be queried")
    return vr


def _keyword(tag: int) -> str:
    return keyword_for_tag(tag) or f"{tag:08X}"


def _check_range(value: str, pattern: "re.Pattern", name: str, what: str) -> str:
    parts = value.split("-") if pattern is not _DATETIME else _split_datetime_range(value)
    if len(parts) > 2 or not any(parts) or not all(not part or pattern.match(part) for part in parts):
        raise QueryError(f"{name} must be a {what} or a range of them (A-B, A-, -B), not {value[:64]!r}")
    if pattern is _DATE:
        for part in parts:
            if part:
                try:
                    datetime.date(int(part[:4]), int(part[4:6]), int(part[6:]))
                except ValueError:
                    raise QueryError(f"{name}: {part} is not a date") from None
    return value


def _split_datetime_range(value: str) -> List[str]:
    # a date-time may carry a negative offset ("-0500"): the range's hyphen is the one not followed by 4 digits
    # that end the value or precede the range's other hyphen
    if value.count("-") == 0:
        return [value]
    for index, char in enumerate(value):
        if char == "-":
            left, right = value[:index], value[index + 1:]
            if (not left or _DATETIME.match(left)) and (not right or _DATETIME.match(right)):
                return [left, right]
    return [value, "", ""]  # no split works: refused by the caller


def _value(tag: int, vr: str, name: str, value: str) -> str:
    """The matching value of one parameter, checked against its VR."""
    if _CONTROL.search(value):
        raise QueryError(f"{name} contains control characters")
    if vr == "UI":
        uids = [uid for uid in re.split(r"[,\\]", value)]
        if not all(is_valid_uid(uid) for uid in uids):
            raise QueryError(f"{name} must be a UID or a list of UIDs separated by commas, not {value[:80]!r}")
        return "\\".join(uids)
    if "\\" in value:
        raise QueryError(f"{name} must be a single value (no backslash)")
    if vr == "DA":
        return _check_range(value, _DATE, name, "date YYYYMMDD")
    if vr == "TM":
        return _check_range(value, _TIME, name, "time HHMMSS")
    if vr == "DT":
        return _check_range(value, _DATETIME, name, "date-time YYYYMMDDHHMMSS")
    limit = _MAX_LENGTH.get(vr.split(" or ")[0], 1024)
    if len(value) > limit:
        raise QueryError(f"{name} is longer than its VR ({vr}) allows: {len(value)} characters, at most {limit}")
    first = vr.split(" or ")[0]
    if first in _WHOLE_NUMBER_RANGES and value:
        low, high = _WHOLE_NUMBER_RANGES[first]
        if not _WHOLE_NUMBER.match(value) or not low <= int(value) <= high:
            raise QueryError(f"{name} must be a whole number from {low} to {high} ({first}), not {value[:32]!r}")
    if first in ("DS", "FL", "FD") and value:
        if not _DECIMAL.match(value) or not math.isfinite(float(value)):
            raise QueryError(f"{name} must be a decimal number ({first}), not {value[:32]!r}")
    if vr == "AT" and value:
        raise QueryError(f"{name} (AT) cannot be matched on here; leave it empty to have it returned")
    return value


def parse_query(arguments: Mapping[str, Sequence[str]], level: str, fixed: Mapping[str, str] = (),
                max_results: int = 500) -> Query:
    """A Study Root C-FIND identifier at ``level`` (STUDY, SERIES, IMAGE) from the request's ``arguments``
    (name -> values, as decoded text) and the ``fixed`` unique keys of the path (keyword -> UID).

    ``max_results`` bounds ``offset`` + ``limit`` (C-FIND has no paging: the matches before the offset come too).
    """
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    query = Query(identifier)
    returned = list(RETURN_KEYS[level])
    matching: Dict[int, Tuple[str, str, str]] = {}
    for name, values in arguments.items():
        if len(values) != 1:
            raise QueryError(f"{name[:64]} is given {len(values)} times (once at most)")
        value = values[0]
        if name in _CONTROL_PARAMETERS:
            _control(query, name, value, returned, max_results)
            continue
        tag = _tag(name)
        vr = _vr(tag, name)
        keyword = _keyword(tag)
        if any(alternative in _NOT_MATCHABLE_VRS for alternative in vr.split(" or ")):
            raise QueryError(f"{keyword} ({vr}) cannot be a matching key here")
        if keyword in fixed:
            raise QueryError(f"{keyword} is given by the path")
        if keyword in ("QueryRetrieveLevel", "SpecificCharacterSet"):
            raise QueryError(f"{keyword} is set by the server")
        matching[tag] = (keyword, vr, _value(tag, vr, keyword, value))
    for keyword in returned:  # return keys: present and empty
        tag = _tag(keyword)
        identifier.add_new(tag, _vr(tag, keyword).split(" or ")[0], None)
    for tag, (keyword, vr, value) in matching.items():
        vr = vr.split(" or ")[0]
        if vr in _BINARY_NUMBER_VRS and value:
            identifier.add_new(tag, vr, float(value) if vr in ("FL", "FD") else int(value))
        else:
            identifier.add_new(tag, vr, value)
    for keyword, uid in dict(fixed).items():
        setattr(identifier, keyword, uid)
    if any(not value.isascii() for _, _, value in matching.values()):
        identifier.SpecificCharacterSet = "ISO_IR 192"
    if query.limit is not None and query.offset + query.limit > max_results:
        raise QueryError(f"offset + limit is {query.offset + query.limit}: at most [web] max_results = "
                         f"{max_results} matches are fetched from a device")
    try:  # whatever pydicom will not encode is said now, before a device is asked
        encode_dataset(identifier, EXPLICIT_VR_LITTLE_ENDIAN)
    except Exception as error:
        said = str(error).splitlines()[0] if str(error) else repr(error)
        raise QueryError(f"the query cannot be encoded: {said}"[:300]) from None
    return query


def _control(query: Query, name: str, value: str, returned: List[str], max_results: int) -> None:
    if name == "includefield":
        names = [item.strip() for item in value.split(",") if item.strip()]
        if not names:
            raise QueryError("includefield names no attribute")
        for item in names:
            if item == "all":
                continue  # every attribute the level has is more than a device answers anyway: its defaults stand
            tag = _tag(item)
            vr = _vr(tag, item)
            if vr in ("OB", "OW", "OF", "OD", "OL", "OV"):
                raise QueryError(f"{item} ({vr}) cannot be returned by a query")
            keyword = _keyword(tag)
            if keyword not in returned:
                returned.append(keyword)
    elif name in ("limit", "offset"):
        if not re.fullmatch(r"[0-9]{1,6}", value):
            raise QueryError(f"{name} must be a whole number from {1 if name == 'limit' else 0} to {MAX_LIMIT}")
        number = int(value)
        if name == "limit":
            if not 1 <= number <= MAX_LIMIT:
                raise QueryError(f"limit must be from 1 to {MAX_LIMIT}")
            query.limit = number
        else:
            if number > MAX_LIMIT:
                raise QueryError(f"offset must be at most {MAX_LIMIT}")
            query.offset = number
    elif name == "fuzzymatching":
        if value not in ("true", "false"):
            raise QueryError("fuzzymatching must be true or false")
        if value == "true":
            query.warnings.append("fuzzymatching is not supported: the query matched exactly")


def to_json(dataset: Dataset) -> dict:
    """One answer as DICOM JSON (PS3.18 F.2): its values in Unicode, without the query's own elements
    (Query/Retrieve Level, Specific Character Set); an element that cannot be converted is left out."""
    for keyword in ("QueryRetrieveLevel",):
        if keyword in dataset:
            del dataset[keyword]
    value = dataset.to_json_dict(suppress_invalid_tags=True)
    value.pop("00080005", None)
    return value
