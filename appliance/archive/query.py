"""Study Root C-FIND against the index (PS3.4 C.4.1, C.6.2).

:func:`build_query` turns a decoded identifier into a :class:`FindQuery`: an
SQL statement whose conditions select a superset of the matches (equality,
UID lists, date ranges and wildcard prefixes use the indexes; values are
always SQL parameters), and Python matchers that decide each candidate with
the exact semantics of :mod:`appliance.archive.matching`.  A
:class:`QueryRun` executes it on a database thread of its own, yielding the
response identifiers in batches (as DICOM JSON, or encoded by the function it
is given, in the same worker job), so results stream without the whole result
set in memory.  Files are never opened.
"""

from __future__ import annotations

import json
import os
import sqlite3
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset

from ..dataset.metadata import json_text
from . import matching as M

__all__ = ["QueryError", "Key", "KEYS", "FindQuery", "build_query", "QueryRun", "LEVELS"]

LEVELS = ("STUDY", "SERIES", "IMAGE")
#: Longest list of values pushed down to SQL as parameters (SQLite allows 32766 per statement;
#: longer lists, like a UID list of thousands, are matched in Python only).
MAX_SQL_LIST = 500
_DEPTH = {"PATIENT": 0, "STUDY": 0, "SERIES": 1, "IMAGE": 2}


class QueryError(Exception):
    """The identifier breaks the information model: answer ``status`` with ``comment``."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment


@dataclass(frozen=True)
class Key:
    """A supported key: where its value lives in the index."""

    keyword: str
    level: str  # PATIENT, STUDY, SERIES or IMAGE
    column: Optional[str] = None  # SQL expression of an indexed column
    json_level: Optional[str] = None  # patient, study, series or instance attributes (DICOM JSON)
    computed: Optional[str] = None

    @property
    def tag(self) -> int:
        return tag_for_keyword(self.keyword)

    @property
    def tag_hex(self) -> str:
        return f"{self.tag:08X}"

    @property
    def vr(self) -> str:
        return dictionary_VR(self.tag)


def _keys() -> Dict[str, Key]:
    from ..dataset.metadata import INSTANCE_KEYWORDS, PATIENT_KEYWORDS, SERIES_KEYWORDS, STUDY_KEYWORDS

    keys: Dict[str, Key] = {}
    for keywords, level, json_level in (
        (PATIENT_KEYWORDS, "PATIENT", "patient"),
        (STUDY_KEYWORDS, "STUDY", "study"),
        (SERIES_KEYWORDS, "SERIES", "series"),
        (INSTANCE_KEYWORDS, "IMAGE", "instance"),
    ):
        for keyword in keywords:
            keys[keyword] = Key(keyword, level, json_level=json_level)
    # patient attributes are the study's own (archive/patients.py), matched and answered at every level
    columns = {
        "PatientName": "st.patient_name",
        "PatientID": "st.patient_id",
        "IssuerOfPatientID": "st.issuer",
        "PatientBirthDate": "st.birth_date",
        "PatientSex": "st.sex",
        "StudyInstanceUID": "st.study_uid",
        "StudyDate": "st.study_date",
        "StudyTime": "st.study_time",
        "AccessionNumber": "st.accession_number",
        "StudyID": "st.study_id",
        "SeriesInstanceUID": "se.series_uid",
        "Modality": "se.modality",
        "SeriesNumber": "se.series_number",
        "SOPInstanceUID": "i.sop_uid",
        "SOPClassUID": "i.sop_class",
        "InstanceNumber": "i.instance_number",
    }
    for keyword, column in columns.items():
        keys[keyword] = Key(keyword, keys[keyword].level, column=column, json_level=keys[keyword].json_level)
    for keyword, level in (
        ("ModalitiesInStudy", "STUDY"),
        ("SOPClassesInStudy", "STUDY"),
        ("NumberOfStudyRelatedSeries", "STUDY"),
        ("NumberOfStudyRelatedInstances", "STUDY"),
        ("NumberOfPatientRelatedStudies", "PATIENT"),
        ("NumberOfPatientRelatedSeries", "PATIENT"),
        ("NumberOfPatientRelatedInstances", "PATIENT"),
        ("NumberOfSeriesRelatedInstances", "SERIES"),
        ("RetrieveAETitle", "PATIENT"),
        ("InstanceAvailability", "PATIENT"),
    ):
        keys[keyword] = Key(keyword, level, computed=keyword)
    return keys


KEYS: Dict[str, Key] = _keys()

#: Pairs matched as one date-time when combined date-time matching is negotiated (PS3.4 C.2.2.2.5.1).
_DATE_TIME_PAIRS = (("StudyDate", "StudyTime"), ("SeriesDate", "SeriesTime"), ("ContentDate", "ContentTime"),
                    ("AcquisitionDate", "AcquisitionTime"))

_FROM = {
    "STUDY": "FROM studies st",
    "SERIES": "FROM series se JOIN studies st ON se.study_pk = st.pk",
    "IMAGE": "FROM instances i JOIN series se ON i.series_pk = se.pk JOIN studies st ON se.study_pk = st.pk",
}
_SELECT = {
    "STUDY": "st.patient_pk, st.patient_attributes, st.pk, st.attributes, st.num_series, st.num_instances",
    "SERIES": "st.patient_pk, st.patient_attributes, st.pk, st.attributes, st.num_series, st.num_instances, "
    "se.pk, se.attributes, se.num_instances",
    "IMAGE": "st.patient_pk, st.patient_attributes, st.pk, st.attributes, st.num_series, st.num_instances, "
    "se.pk, se.attributes, se.num_instances, i.attributes",
}


@dataclass
class _Term:
    key: Key
    matcher: Optional[Callable[[Any], bool]]
    sequence: Optional[List[Tuple[str, Optional[Callable[[Any], bool]]]]] = None  # (sub-tag hex, matcher)
    sub_tags: Tuple[str, ...] = ()


@dataclass
class FindQuery:
    level: str
    sql: str
    params: List[Any]
    terms: List[_Term]
    #: tags (hex) of keys asked for that the archive does not support (FF01)
    unsupported: List[str] = field(default_factory=list)
    combined: List[Tuple[str, str, Callable[[str, str], bool]]] = field(default_factory=list)
    retrieve_ae_title: str = ""


def _element_text(element) -> str:
    """A decoded element value as C-FIND text (multiple values joined by backslash)."""
    return _value_text(element.value)


def _value_text(value) -> str:
    """A decoded value (one, or several) as C-FIND text, multiple values joined by backslash."""
    if value is None or value == "":
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def _glob_terms(vr: str, text: str) -> Optional[List[Tuple[str, Any]]]:
    """(SQL operator, parameter) alternatives that select a superset, or None when no pushdown."""
    alternatives = text.split("\\")
    out = []
    for alternative in alternatives:
        alternative = alternative.strip()
        if not alternative or alternative == "*":
            return None
        if M.has_wildcard(alternative):
            out.append(("GLOB", M.glob_pattern(alternative)))
        else:
            out.append(("=", alternative))
    return out


def build_query(
    identifier: Dataset,
    insensitive_names: bool = False,
    combined_date_time: bool = False,
    retrieve_ae_title: str = "",
) -> FindQuery:
    """Plan a Study Root C-FIND; raises :class:`QueryError` when the identifier breaks the model."""
    level_element = identifier.get("QueryRetrieveLevel")
    level = str(level_element or "").strip().upper()
    if level == "PATIENT":
        raise QueryError(0xA900, "Study Root has no PATIENT level (use STUDY)")
    # Error Comments are LO: at most 64 characters, so these are kept short
    if not level:
        raise QueryError(0xA900, "no Query/Retrieve Level (0008,0052): STUDY, SERIES or IMAGE")
    if level not in LEVELS:
        raise QueryError(0xA900, f"Query/Retrieve Level {level[:16]} is not STUDY/SERIES/IMAGE")
    depth = _DEPTH[level]
    # hierarchical search (PS3.4 C.4.1.2.2.1): one value for the unique key of each level above
    for keyword, level_above in (("StudyInstanceUID", 1), ("SeriesInstanceUID", 2)):
        if depth >= level_above:
            value = _value_text(identifier.get(keyword)).strip()
            if not value or "\\" in value or M.has_wildcard(value):
                # hierarchical search: no relational queries (statement 3.1.3.4.2.1)
                raise QueryError(0xA900, f"{level} level needs a single {keyword} (unique key above)")

    terms: List[_Term] = []
    unsupported: List[str] = []
    where: List[str] = []
    params: List[Any] = []
    texts: Dict[str, str] = {}
    for element in identifier:
        tag = int(element.tag)
        keyword = keyword_for_tag(tag) if not element.tag.is_private else ""
        if tag >> 16 in (0x0000, 0x0002) or keyword in ("QueryRetrieveLevel", "SpecificCharacterSet"):
            continue
        if tag & 0xFFFF == 0:
            continue  # a (retired) group length is no key
        key = KEYS.get(keyword)
        if key is None or _DEPTH[key.level] > depth:
            unsupported.append(f"{tag:08X}")
            continue
        if element.VR == "SQ":
            terms.append(_sequence_term(key, element, insensitive_names))
            continue
        text = _element_text(element)
        texts[keyword] = text
        matcher = M.make_matcher(key.vr, text, insensitive_names)
        terms.append(_Term(key, matcher))
        if matcher is not None:
            condition = _pushdown(key, text, insensitive_names)
            if condition is not None:
                where.append(condition[0])
                params.extend(condition[1])

    combined = []
    if combined_date_time:
        for date_key, time_key in _DATE_TIME_PAIRS:
            date_text, time_text = texts.get(date_key, ""), texts.get(time_key, "")
            if date_text and time_text and M.parse_range(date_text) and M.parse_range(time_text):
                low_date, high_date = M.parse_range(date_text)
                low_time, high_time = M.parse_range(time_text)
                low = M.datetime_bounds(low_date + low_time if low_date else "", "")[0]
                high = M.datetime_bounds("", high_date + high_time if high_date else "")[1]
                for term in terms:
                    if term.key.keyword in (date_key, time_key):
                        term.matcher = None  # decided together below
                combined.append((date_key, time_key, _combined_matcher(low, high)))

    sql = f"SELECT {_SELECT[level]} {_FROM[level]}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    return FindQuery(level, sql, params, terms, unsupported, combined, retrieve_ae_title)


def _combined_matcher(low: str, high: str) -> Callable[[str, str], bool]:
    def match(date: str, time: str) -> bool:
        if not date:
            return False
        return low <= M.datetime_key(date, time) <= high

    return match


def _pushdown(key: Key, text: str, insensitive: bool) -> Optional[Tuple[str, List[Any]]]:
    """An SQL condition selecting a superset of the key's matches, or None."""
    vr = key.vr
    if key.computed == "ModalitiesInStudy":
        alternatives = _glob_terms(vr, text)
        if alternatives is None:
            return None
        clause = " OR ".join(f"modality {op} ?" for op, _ in alternatives)
        return f"st.pk IN (SELECT study_pk FROM series WHERE {clause})", [value for _, value in alternatives]
    if key.column is None:
        return None
    column = key.column
    if vr == "UI":
        uids = [uid.strip() for uid in text.split("\\") if uid.strip()]
        if len(uids) > MAX_SQL_LIST:
            return None  # beyond SQLite's parameter limit; the Python matcher decides alone
        return f"{column} IN ({', '.join('?' * len(uids))})", uids
    if vr == "DA":
        spans = []
        for alternative in text.split("\\"):
            span = M.parse_range(alternative) or (alternative, alternative)
            spans.append(M.date_bounds(*span))
        if len(spans) > MAX_SQL_LIST:
            return None
        # a legacy YYYY.MM.DD value sorts apart from the digits: its own dotted bounds, still indexed
        spans += [tuple(f"{bound[:4]}.{bound[4:6]}.{bound[6:]}" for bound in span) for span in spans]
        clause = " OR ".join(f"{column} BETWEEN ? AND ?" for _ in spans)
        return f"({clause})", [bound for span in spans for bound in span]
    if vr == "PN":
        return _name_pushdown(text, insensitive)
    if vr == "IS":
        try:
            numbers = [int(v) for v in text.split("\\")]
        except ValueError:
            return None
        if len(numbers) > MAX_SQL_LIST:
            return None
        return f"{column} IN ({', '.join('?' * len(numbers))})", numbers
    if vr in M.TEXT_VRS:
        alternatives = _glob_terms(vr, text)
        if alternatives is None or len(alternatives) > MAX_SQL_LIST:
            return None
        clause = " OR ".join(f"{column} {op} ?" for op, _ in alternatives)
        return f"({clause})", [value for _, value in alternatives]
    return None


def _name_pushdown(text: str, insensitive: bool) -> Optional[Tuple[str, List[Any]]]:
    """Studies one of whose name groups matches, for each of the query's names (backslash), a group the query
    requires: one non-universal group of it (with ``=``, the group in its place must match, and it is one of the
    study's groups).  None when some name matches every study."""
    conditions: List[str] = []
    params: List[Any] = []
    column = "folded" if insensitive else "name"
    for alternative in text.split("\\"):
        name = M.normalize_name(alternative)
        groups = [group for group in name.split("=") if group.strip("*")]
        if not groups:
            return None  # universal
        group = groups[0]
        if insensitive and "?" in group:
            return None  # '?' is one character of the name, folded names may be longer (Hangul, "ß")
        value = M.fold(group) if insensitive else group
        if M.has_wildcard(group):
            conditions.append(f"{column} GLOB ?")
            params.append(M.glob_pattern(value))
        else:
            conditions.append(f"{column} = ?")  # compared as it is: GLOB's escapes would make "[" never match
            params.append(value)
    if len(params) > MAX_SQL_LIST:
        return None
    return f"st.pk IN (SELECT study_pk FROM study_names WHERE {' OR '.join(conditions)})", params


def _sequence_term(key: Key, element, insensitive: bool) -> _Term:
    items = list(element.value)
    sub_terms: List[Tuple[str, Optional[Callable[[Any], bool]]]] = []
    sub_tags: List[str] = []
    if items:
        for sub in items[0]:
            if sub.VR == "SQ":
                continue  # nested sequence matching is not supported: returned only
            sub_tag = f"{int(sub.tag):08X}"
            sub_tags.append(sub_tag)
            sub_terms.append((sub_tag, M.make_matcher(sub.VR, _element_text(sub), insensitive)))
    return _Term(key, None, sub_terms, tuple(sub_tags))


# --- running ------------------------------------------------------------------------

#: Candidates decided per QueryRun.fetch call at most: a slice of a few milliseconds of work.
ROWS_PER_FETCH = 2048

#: computed patient counters: which of (studies, series, instances)
_PATIENT_COUNTS = {"NumberOfPatientRelatedStudies": 0, "NumberOfPatientRelatedSeries": 1,
                   "NumberOfPatientRelatedInstances": 2}


class QueryRun:
    """One C-FIND's execution on a database connection of its own (one worker thread at a time).

    With ``encode``, :meth:`fetch` returns what it makes of each match (the C-FIND SCP's response
    bytes, made on the worker thread that fetched them) instead of the DICOM JSON.
    """

    def __init__(self, index_path: str, query: FindQuery, encode: Optional[Callable[[dict], Any]] = None) -> None:
        self.query = query
        self.encode = encode
        # a URI, so the connection is read-only: the path is quoted ("?", "#" or "%" in a folder name)
        uri = f"file:{urllib.parse.quote(os.path.abspath(index_path))}?mode=ro"
        self.db = sqlite3.connect(uri, uri=True, timeout=30.0, check_same_thread=False)
        self.cursor = self.db.execute(query.sql, query.params)
        self._modalities: Dict[int, List[str]] = {}
        self._patient_counts: Dict[int, Tuple[int, int, int]] = {}
        self.done = False

    def close(self) -> None:
        self.db.close()

    def fetch(self, count: int, max_rows: int = None) -> List[Any]:
        """Up to ``count`` matches as DICOM JSON response identifiers (or encoded); fewer once exhausted.

        At most ``max_rows`` candidates (default :data:`ROWS_PER_FETCH`) are
        decided per call, so a query whose candidates mostly fail comes back
        in slices, perhaps with no match, rather than holding its worker
        thread over the whole index: :attr:`done` says when it is over.
        """
        budget = ROWS_PER_FETCH if max_rows is None else max_rows
        results: List[Any] = []
        while len(results) < count and budget > 0:
            rows = self.cursor.fetchmany(min(max(64, count), budget))
            if not rows:
                self.done = True
                break
            budget -= len(rows)
            for row in rows:
                result = self._match(row)
                if result is not None:
                    results.append(result)
        if self.encode is not None:
            encode = self.encode
            return [encode(result) for result in results]
        return results

    def _levels(self, row) -> Dict[str, Any]:
        level = self.query.level
        values: Dict[str, Any] = {
            "patient_pk": row[0], "patient": row[1], "study_pk": row[2], "study": row[3],
            "num_series": row[4], "num_instances": row[5],
        }
        if level in ("SERIES", "IMAGE"):
            values.update(series_pk=row[6], series=row[7], series_instances=row[8])
        if level == "IMAGE":
            values["instance"] = row[9]
        return values

    def _match(self, row) -> Optional[dict]:
        values = self._levels(row)
        parsed: Dict[str, dict] = {}

        def attributes(level: str) -> dict:
            if level not in parsed:
                parsed[level] = json.loads(values[level]) if values.get(level) else {}
            return parsed[level]

        response: Dict[str, dict] = {}
        for term in self.query.terms:
            key = term.key
            entry = self._entry(key, values, attributes)
            if term.sequence is not None:
                entry = self._match_sequence(term, entry)
                if entry is False:
                    return None
            elif term.matcher is not None and not term.matcher(json_text(entry)):
                return None
            response[key.tag_hex] = entry if entry else {"vr": key.vr}
        for date_key, time_key, matcher in self.query.combined:
            date = json_text(self._entry(KEYS[date_key], values, attributes))
            time = json_text(self._entry(KEYS[time_key], values, attributes))
            if not matcher(date[0] if date else "", time[0] if time else ""):
                return None
        return response

    def _entry(self, key: Key, values: Dict[str, Any], attributes) -> Optional[dict]:
        if key.computed:
            return self._computed(key, values)
        return attributes(key.json_level).get(key.tag_hex)

    def _computed(self, key: Key, values: Dict[str, Any]) -> dict:
        name = key.computed
        if name == "NumberOfStudyRelatedSeries":
            return {"vr": "IS", "Value": [values["num_series"]]}
        if name == "NumberOfStudyRelatedInstances":
            return {"vr": "IS", "Value": [values["num_instances"]]}
        if name == "NumberOfSeriesRelatedInstances":
            return {"vr": "IS", "Value": [values.get("series_instances", 0)]}
        if name in _PATIENT_COUNTS:
            # by Patient ID and Issuer (every study of the patient, whatever names they carry)
            counts = self._patient_counts.get(values["patient_pk"])
            if counts is None:
                counts = self.db.execute(
                    "SELECT COUNT(*), SUM(num_series), SUM(num_instances) FROM studies WHERE patient_pk = ?",
                    (values["patient_pk"],)).fetchone()
                self._patient_counts = {values["patient_pk"]: counts}
            return {"vr": "IS", "Value": [counts[_PATIENT_COUNTS[name]]]}
        if name == "ModalitiesInStudy":
            study_pk = values["study_pk"]
            modalities = self._modalities.get(study_pk)
            if modalities is None:
                modalities = [m for (m,) in self.db.execute(
                    "SELECT DISTINCT modality FROM series WHERE study_pk = ? AND modality != '' ORDER BY modality",
                    (study_pk,))]
                self._modalities = {study_pk: modalities}
            return {"vr": "CS", "Value": modalities} if modalities else {"vr": "CS"}
        if name == "SOPClassesInStudy":
            classes = [c for (c,) in self.db.execute(
                "SELECT DISTINCT i.sop_class FROM instances i JOIN series se ON i.series_pk = se.pk "
                "WHERE se.study_pk = ? ORDER BY i.sop_class", (values["study_pk"],))]
            return {"vr": "UI", "Value": classes} if classes else {"vr": "UI"}
        if name == "RetrieveAETitle":
            return {"vr": "AE", "Value": [self.query.retrieve_ae_title]} if self.query.retrieve_ae_title else {"vr": "AE"}
        if name == "InstanceAvailability":
            return {"vr": "CS", "Value": ["ONLINE"]}
        raise AssertionError(name)

    @staticmethod
    def _match_sequence(term: _Term, entry: Optional[dict]):
        """Sequence matching: the stored items matching every non-empty sub-key, with the asked sub-keys only."""
        items = (entry or {}).get("Value") or []
        wanted = term.sub_tags
        matchers = [(tag, matcher) for tag, matcher in (term.sequence or []) if matcher is not None]
        kept = []
        for item in items:
            if all(matcher(json_text(item.get(tag))) for tag, matcher in matchers):
                if wanted:
                    kept.append({tag: item.get(tag) or {"vr": dictionary_VR(int(tag, 16))} for tag in wanted})
                else:
                    kept.append(item)
        if matchers and not kept:
            return False
        return {"vr": "SQ", "Value": kept} if kept else {"vr": "SQ"}
