"""C-FIND responses' fast path (appliance.archive.encode) against the pydicom path, and the service
encoding on its worker thread.

Every comparison is differential: the pydicom path is what FindService did on the reactor before the
fast path existed (``Dataset.from_json``, ``response_character_set``, Specific Character Set and
Query/Retrieve Level added, ``write_dataset``: ``FindService._encode``); the fast path must give exactly
its bytes, or None.  The corpus is every response identifier that queries at STUDY, SERIES and IMAGE
level, asking every supported key (computed ones and sequences included), get from archives of the
C-FIND tests' generated corpus, of a few objects with varied values, and of pydicom's character-set
files; then those files' names in synthetic identifiers; then identifiers built for the edge cases.
Each is encoded with several requested character sets in the three uncompressed transfer syntaxes.
"""

from __future__ import annotations

import os
import struct
import threading
import warnings
from typing import Dict, List, Optional

from pydicom import config
from pydicom.charset import convert_encodings, encode_string
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from appliance import compat
from appliance.ae import query as find_module
from appliance.ae.query import FindService, response_character_set, response_encoder
from appliance.archive import encode as encode_module
from appliance.archive.encode import encode_identifier
from appliance.archive.query import KEYS, QueryRun, build_query
from appliance.dicom.uids import EXPLICIT_VR_BIG_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN

from .support_data import CHARSET_FILES, make_dataset
from .support_query import ROOT, archive_copy, charset_files, fill_charsets, fill_corpus, store_dataset
from .test_query import FindHarness, identifier

SYNTAXES = (IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN)
#: requested character sets the fast path writes itself (None: the request has none)
PLAIN_REQUESTS = (None, ("ISO_IR 100",), ("ISO_IR 192",))
#: ... and those it leaves to pydicom (or, the unknown one, treats as none)
OTHER_REQUESTS = (("ISO 2022 IR 87",), ("", "ISO 2022 IR 87"), ("ISO_IR 6",), ("ISO_IR 999",), ("ISO_IR 144",),
                  ("GB18030",))
REQUESTS = PLAIN_REQUESTS + OTHER_REQUESTS
LEVELS = ("STUDY", "SERIES", "IMAGE")
_DEPTH = {"PATIENT": 0, "STUDY": 0, "SERIES": 1, "IMAGE": 2}


def pydicom_path(result: dict, level: str, requested, transfer_syntax: str):
    """The pydicom path's bytes, or the name of what it raised."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return FindService._encode(result, level, list(requested) if requested else None, transfer_syntax)
        except Exception as error:
            return type(error).__name__


def fast_path(result: dict, level: str, requested, transfer_syntax: str) -> Optional[bytes]:
    """The fast path (any exception propagates: it must decline, never raise)."""
    return encode_identifier(result, level, list(requested) if requested else None, transfer_syntax)


def has_items(result: dict) -> bool:
    """Whether a response identifier holds a sequence with items (left to pydicom)."""
    return any(entry.get("vr") == "SQ" and entry.get("Value") for entry in result.values())


# --- the corpora ---------------------------------------------------------------------------------------------


def fill_varied(archive) -> None:
    """Objects with the values the generated corpus lacks: DS and multi-valued numbers, odd lengths,
    Latin-1 text in ISO_IR 100, long text, empty and multi-valued names, other sequences."""
    ds = make_dataset(patient="Müller^Jürgen^^Dr.", patient_id="PIDVAR1", study=f"{ROOT}.77", series=f"{ROOT}.77.1",
                      sop=f"{ROOT}.77.1.1")
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientSize = "1.805"
    ds.PatientWeight = "72.50"
    ds.PatientAge = "045Y"
    ds.PatientBirthTime = "0830"
    ds.StudyDescription = "Thorax ä"
    ds.AdditionalPatientHistory = "line one\r\nline two, odd"
    ds.PatientComments = "x" * 301
    ds.NameOfPhysiciansReadingStudy = ["Grey^Meredith", "", "Yang^Cristina"]
    ds.OperatorsName = "Op^One=Ideo"
    ds.SliceLocation = "-12.25"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.ImageComments = "odd"
    ds.NumberOfFrames = "3"
    ds.ContrastBolusAgent = "Iodine 300"
    ds.InstanceCreationDate = "20240102"
    ds.FrameOfReferenceUID = "1.2.3.45"
    other = Dataset()
    other.PatientID = "ALT1"
    other.IssuerOfPatientID = "HOSP"
    ds.OtherPatientIDsSequence = Sequence([other])
    store_dataset(archive, ds)
    second = make_dataset(patient="Plain^Name", patient_id="PIDVAR2", study=f"{ROOT}.78", series=f"{ROOT}.78.1",
                          sop=f"{ROOT}.78.1.1")
    second.PatientWeight = "80"
    second.PatientSize = "1e0"
    second.SliceLocation = "0.000001"
    second.EthnicGroup = "ABC"
    store_dataset(archive, second)


def all_keys(level: str, sub_keys: bool) -> Dataset:
    """An identifier at ``level`` asking every supported key down to it (empty: universal); sequences
    with no item, or (``sub_keys``) with one item asking a few of their keys."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, key in KEYS.items():
        if _DEPTH[key.level] > _DEPTH[level]:
            continue
        if key.vr == "SQ":
            item = Dataset()
            if sub_keys:
                for sub in ("CodeValue", "CodeMeaning", "PatientID", "LocalNamespaceEntityID", "Rows"):
                    setattr(item, sub, None)
            setattr(ds, keyword, Sequence([item] if sub_keys else []))
        else:
            setattr(ds, keyword, None)
    return ds


def run_query(archive, ds: Dataset) -> List[dict]:
    """build_query + QueryRun on ``archive``'s index: every match, as DICOM JSON."""
    run = QueryRun(archive.index_path, build_query(ds, retrieve_ae_title="DISK_SERVER"))
    results = []
    try:
        while not run.done:
            results.extend(run.fetch(64))
    finally:
        run.close()
    return results


def walk(archive) -> List[tuple]:
    """(level, result) of every match at every level, asking every key (two ways for sequences)."""
    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for sub_keys in (False, True):
            for study in run_query(archive, all_keys("STUDY", sub_keys)):
                found.append(("STUDY", study))
                study_uid = study["0020000D"]["Value"][0]
                series_query = all_keys("SERIES", sub_keys)
                series_query.StudyInstanceUID = study_uid
                for series in run_query(archive, series_query):
                    found.append(("SERIES", series))
                    image_query = all_keys("IMAGE", sub_keys)
                    image_query.StudyInstanceUID = study_uid
                    image_query.SeriesInstanceUID = series["0020000E"]["Value"][0]
                    found.extend(("IMAGE", image) for image in run_query(archive, image_query))
    return found


def pn_json(name: str) -> dict:
    """A person name in the DICOM JSON model, as the index keeps it (empty groups left out)."""
    return {label: group for label, group in zip(("Alphabetic", "Ideographic", "Phonetic"), name.split("="))
            if group}


# --- differential --------------------------------------------------------------------------------------------


class Differential:
    """Compares both paths over identifiers; counts the fast answers."""

    def __init__(self, test: SynchronousTestCase) -> None:
        self.test = test
        self.compared = 0
        self.fast = 0

    def check(self, result: dict, level: str, requests=REQUESTS, syntaxes=SYNTAXES, must_be_fast=None):
        """Fast bytes == pydicom bytes whenever the fast path answers; it must answer for the plain requests
        when ``must_be_fast`` (default: no sequence with items)."""
        if must_be_fast is None:
            must_be_fast = not has_items(result)
        for requested in requests:
            for syntax in syntaxes:
                fast = fast_path(result, level, requested, syntax)
                self.compared += 1
                if fast is None:
                    if must_be_fast and requested in PLAIN_REQUESTS:
                        self.test.fail(f"fast path declined a plain case: {requested} {syntax} {result}")
                    continue
                self.fast += 1
                expected = pydicom_path(result, level, requested, syntax)
                if fast != expected:
                    self.test.fail(f"{level} {requested} {syntax}\n{result}\nfast:    {fast!r}\npydicom: {expected!r}")


class CorpusTests(SynchronousTestCase):
    """Every response identifier of the C-FIND test corpora, both paths."""

    def differential(self, *fillers) -> Differential:
        """Both paths over every identifier of an archive holding what ``fillers`` store."""
        archive = archive_copy(os.path.abspath(self.mktemp()), *fillers)
        self.addCleanup(archive.close)
        results = walk(archive)
        self.assertTrue(results)
        check = Differential(self)
        for level, result in results:
            check.check(result, level)
        return check

    def test_generated_corpus(self):
        """The generated corpus and the varied objects at STUDY, SERIES and IMAGE level, every key asked
        (computed ones, sequences without and with sub-keys): identical bytes whenever the fast path
        answers, and it answers every plain request of every identifier without sequence items."""
        check = self.differential(fill_corpus, fill_varied)
        # 2 x (11 studies + 15 series + 29 images) identifiers, 9 requests, 3 syntaxes
        self.assertEqual(check.compared, 2 * (11 + 15 + 29) * len(REQUESTS) * 3)
        self.assertGreater(check.fast, check.compared // 3)

    def test_character_set_files(self):
        """pydicom's character-set files as stored (names and text in many scripts), every level and key:
        identical bytes whenever the fast path answers, and it answers every plain request."""
        check = self.differential(fill_charsets)
        self.assertGreater(check.fast, 100)

    def test_character_set_file_names(self):
        """Each character-set file's name (decoded from the file in CHARSET_FILES) as Patient's Name,
        Referring Physician's Name and Study Description (text), alone and with other values: identical
        bytes, the fast path taken for the plain requests."""
        names = [item.patient_name for item in charset_files() if item.patient_name]
        self.assertGreaterEqual(len(names), 15)
        self.assertTrue(all(item.path.startswith(CHARSET_FILES) for item in charset_files()))
        check = Differential(self)
        for name in names:
            result = {"00100010": {"vr": "PN", "Value": [pn_json(name)]},
                      "00080090": {"vr": "PN", "Value": [pn_json(name), {"Alphabetic": "Doe^John"}]},
                      "00081030": {"vr": "LO", "Value": [name]},
                      "0020000D": {"vr": "UI", "Value": [f"{ROOT}.1"]}}
            check.check(result, "STUDY")
            check.check({"00100010": {"vr": "PN", "Value": [pn_json(name)]}}, "STUDY")
        self.assertGreaterEqual(check.fast, len(names) * 2 * len(PLAIN_REQUESTS) * 3)

    def test_requested_character_sets_chosen_alike(self):
        """The Specific Character Set of fast responses is the one response_character_set chooses."""
        cases = [({"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Buc^Jérôme"}]}}, ("ISO_IR 100",), b"ISO_IR 100"),
                 ({"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Buc^Jérôme"}]}}, None, b"ISO_IR 192"),
                 ({"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Люкceмбypг"}]}}, ("ISO_IR 100",), b"ISO_IR 192"),
                 ({"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^John"}]}}, ("ISO_IR 192",), b"ISO_IR 192"),
                 ({"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^John"}]}}, ("ISO_IR 999",), None),
                 ({"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^John"}]}}, None, None)]
        for result, requested, charset in cases:
            with self.subTest(result=result, requested=requested):
                data = fast_path(result, "STUDY", requested, EXPLICIT_VR_LITTLE_ENDIAN)
                self.assertEqual(data, pydicom_path(result, "STUDY", requested, EXPLICIT_VR_LITTLE_ENDIAN))
                if charset is None:
                    self.assertFalse(data.startswith(b"\x08\x00\x05\x00"))
                else:
                    self.assertTrue(data.startswith(b"\x08\x00\x05\x00CS\x0a\x00" + charset), data)


# --- edge cases ----------------------------------------------------------------------------------------------


def element(vr: str, *values, tag: Optional[str] = None) -> dict:
    """A one-element identifier: an attribute of ``vr`` (or ``tag``) with ``values`` (none: no "Value")."""
    entry = {"vr": vr}
    if values:
        entry["Value"] = list(values)
    return {tag or TAG_OF_VR[vr]: entry}


#: an attribute of each VR (dictionary VR where there is one; the JSON VR is what is written)
TAG_OF_VR = {"AE": "00080054", "AS": "00101010", "CS": "00080061", "DA": "00080020", "DT": "0008002A",
             "TM": "00080030", "UR": "00080120", "UI": "0020000D", "SH": "00200010", "LO": "00081030",
             "ST": "00080081", "LT": "00104000", "UC": "00080119", "UT": "00180011", "PN": "00100010",
             "IS": "00201208", "DS": "00101030", "US": "00280010", "SS": "00189219", "UL": "00081161",
             "SL": "00189352", "FL": "00189310", "FD": "00189327", "SQ": "00081032", "AT": "00209165",
             "OB": "00880200", "UN": "00091001"}


class EdgeCaseTests(SynchronousTestCase):
    """Identifiers built for the cases the corpora may miss."""

    def same(self, result: dict, fast_expected: bool = True, level: str = "STUDY", requests=PLAIN_REQUESTS):
        """Both paths agree in every syntax; the fast path answers (or, ``fast_expected`` False, declines)."""
        for requested in requests:
            for syntax in SYNTAXES:
                with self.subTest(result=result, requested=requested, syntax=syntax):
                    fast = fast_path(result, level, requested, syntax)
                    if not fast_expected:
                        self.assertIsNone(fast)
                        continue
                    self.assertIsNotNone(fast)
                    self.assertEqual(fast, pydicom_path(result, level, requested, syntax))

    def test_empty_values(self):
        """Every written VR without a value (no "Value", an empty list, an empty string or name, an empty
        sequence) is an element of length zero, as pydicom writes it."""
        for vr in ("AE", "AS", "CS", "DA", "DT", "TM", "UR", "UI", "SH", "LO", "ST", "LT", "UC", "UT", "PN", "IS",
                   "DS", "US", "SS", "UL", "SL", "FL", "FD", "SQ"):
            self.same(element(vr))
            self.same({TAG_OF_VR[vr]: {"vr": vr, "Value": []}})
        for vr in ("AE", "CS", "DA", "UI", "SH", "LO", "LT", "UT"):
            self.same(element(vr, ""))
        self.same(element("PN", {}))
        self.same(element("PN", {"Alphabetic": ""}))
        data = fast_path(element("SQ"), "STUDY", None, EXPLICIT_VR_LITTLE_ENDIAN)
        self.assertIn(b"\x08\x00\x32\x10SQ\x00\x00\x00\x00\x00\x00", data)

    def test_multiple_values(self):
        """Several values are joined by backslash (names, text, strings, UIDs, numbers), binary ones packed."""
        self.same(element("CS", "ORIGINAL", "PRIMARY", "AXIAL"))
        self.same(element("CS", "A", "", "B"))
        self.same(element("UI", "1.2.3", "1.2.840.10008.5.1.4.1.1.2"))
        self.same(element("LO", "one", "two", "three"))
        self.same(element("LO", "Jérôme", "Müller"))
        self.same(element("PN", {"Alphabetic": "Doe^John"}, {}, {"Alphabetic": "Roe^Jane", "Ideographic": "X"}))
        self.same(element("PN", {}, {}))
        self.same(element("IS", 1, -2, 300))
        self.same(element("DS", 1.5, -0.25, 100.0))
        self.same(element("US", 1, 2, 65535))
        self.same(element("FD", 0.1, -2.5))

    def test_odd_length_padding(self):
        """Odd lengths are padded: space for text, names, strings and numbers, NUL for UIDs; after encoding
        for text (a two-byte UTF-8 character makes an odd length even)."""
        self.same(element("CS", "ABC"))
        self.same(element("UI", "1.2.3"))
        self.same(element("LO", "odd"))
        self.same(element("LO", "é"))
        self.same(element("LO", "éa"))
        self.same(element("PN", {"Alphabetic": "Doe^Joh"}))
        self.same(element("IS", 5))
        self.same(element("DS", 1.5))
        self.same(element("AE", "DISK"))
        data = fast_path(element("UI", "1.2.3"), "STUDY", None, EXPLICIT_VR_LITTLE_ENDIAN)
        self.assertIn(b"UI\x06\x001.2.3\x00", data)
        data = fast_path(element("LO", "é"), "STUDY", None, EXPLICIT_VR_LITTLE_ENDIAN)
        self.assertIn(b"LO\x02\x00\xc3\xa9", data)

    def test_number_strings(self):
        """IS from JSON integers and DS from JSON numbers are formatted as pydicom formats them (DS 1.0 is
        "1.0", an integer DS 3 is "3.0", 1e16 is "1e+16")."""
        for number in (0, 5, -12, 2**31, 2**40, 123456789012):
            self.same(element("IS", number))
        for number in (1.0, 0.5, -0.0, 1e-07, 1e16, 123456.789, 0.1 + 0.2, 72.5, 3, 1.805, 100000.0, 1e-300):
            self.same(element("DS", number))
        data = fast_path(element("DS", 1.0), "STUDY", None, EXPLICIT_VR_LITTLE_ENDIAN)
        self.assertIn(b"DS\x04\x001.0 ", data)
        for declined in (element("IS", "5"), element("IS", 5.0), element("IS", True), element("DS", "1.5"),
                         element("DS", float("nan")), element("DS", float("inf")), element("IS", None)):
            self.same(declined, fast_expected=False)

    def test_binary_numbers_in_each_byte_order(self):
        """US, SS, UL, SL, FL and FD are packed in the syntax's byte order (big endian included)."""
        cases = (("US", 512), ("SS", -2), ("UL", 70000), ("SL", -70000), ("FL", 1.5), ("FL", 3), ("FD", 0.1))
        for vr, number in cases:
            self.same(element(vr, number))
            self.same(element(vr, number, number))
        big = fast_path(element("US", 512), "STUDY", None, EXPLICIT_VR_BIG_ENDIAN)
        self.assertIn(b"\x00\x28\x00\x10US\x00\x02\x02\x00", big)
        little = fast_path(element("US", 512), "STUDY", None, EXPLICIT_VR_LITTLE_ENDIAN)
        self.assertIn(b"\x28\x00\x10\x00US\x02\x00\x00\x02", little)
        implicit = fast_path(element("FD", 0.1), "STUDY", None, IMPLICIT_VR_LITTLE_ENDIAN)
        self.assertIn(b"\x18\x00\x27\x93\x08\x00\x00\x00" + struct.pack("<d", 0.1), implicit)
        # what pydicom cannot pack is left to it (it raises)
        for declined in (element("US", 70000), element("US", -1), element("FL", 1e40), element("US", 1.0),
                         element("FD", "0.1"), element("US", True)):
            self.same(declined, fast_expected=False)

    def test_person_name_groups(self):
        """Name groups are joined by '=' as from_json does, trailing empty groups dropped as PersonName does."""
        for value in ({"Alphabetic": "A", "Phonetic": ""}, {"Ideographic": "山田^太郎"}, {"Phonetic": "やまだ"},
                      {"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎", "Phonetic": "やまだ^たろう"},
                      {"Alphabetic": "A^B^^^", "Ideographic": ""}, {"Alphabetic": "Doe^John", "Other": "x"}):
            self.same(element("PN", value))
        for declined in (element("PN", "Doe^John"), element("PN", {"Alphabetic": 5}), element("PN", None)):
            self.same(declined, fast_expected=False)

    def test_strings_and_uids(self):
        """AE, AS, CS, DA, DT, TM and UR in ISO 8859-1 whatever the character set; UIDs stripped as UID() does;
        a value ISO 8859-1 cannot carry is left to pydicom (which raises)."""
        for vr in ("AE", "AS", "CS", "DA", "DT", "TM", "UR"):
            self.same(element(vr, "VALUE1"))
            self.same(element(vr, "É"))
            self.same(element(vr, "Ж"), fast_expected=False)
        self.same(element("UI", " 1.2.3 "))
        self.same(element("UI", "1.2.3\t", " 1.2.4"))
        self.same(element("ST", "a\\b"))
        self.same(element("UT", "x" * 70001))  # a 4-byte length in every syntax

    def test_too_long_for_a_short_length(self):
        """A value past 64 KiB in a VR with a 2-byte explicit length is left to pydicom (it writes UN);
        in implicit VR it is written."""
        result = element("LO", "x" * 70000)
        self.assertIsNone(fast_path(result, "STUDY", None, EXPLICIT_VR_LITTLE_ENDIAN))
        self.assertIsNone(fast_path(result, "STUDY", None, EXPLICIT_VR_BIG_ENDIAN))
        implicit = fast_path(result, "STUDY", None, IMPLICIT_VR_LITTLE_ENDIAN)
        self.assertEqual(implicit, pydicom_path(result, "STUDY", None, IMPLICIT_VR_LITTLE_ENDIAN))

    def test_character_sets(self):
        """The request's plain character set when it carries every value (ISO_IR 6 is ISO 8859-1 to pydicom),
        else UTF-8; an unknown one is never echoed; other character sets are left to pydicom."""
        latin = element("PN", {"Alphabetic": "Buc^Jérôme"})
        greek = element("LO", "Διονυσιος")
        ascii_only = element("PN", {"Alphabetic": "Doe^John"})
        for result in (latin, greek, ascii_only, {**latin, **greek}, {**latin, **ascii_only}):
            self.same(result, requests=PLAIN_REQUESTS + (("ISO_IR 999",),))
            self.same(result, fast_expected=False, requests=(("ISO 2022 IR 87",), ("", "ISO 2022 IR 87"),
                                                             ("ISO_IR 144",), ("GB18030",), ("ISO_IR 100", "ISO_IR 192")))
        for result in (latin, ascii_only):
            self.same(result, requests=(("ISO_IR 6",),))
        # a lone surrogate cannot be UTF-8: pydicom replaces it, with a warning
        self.same(element("LO", "a\udc80"), fast_expected=False)

    def test_declined(self):
        """Sequences with items, AT, binary VRs, bulk data, keys that are not upper-case tags, group lengths,
        the two elements it adds, other transfer syntaxes: None."""
        item = {"00080100": {"vr": "SH", "Value": ["X"]}}
        for result in (element("SQ", item), element("AT", "00100010"), element("OB"),
                       {TAG_OF_VR["OB"]: {"vr": "OB", "InlineBinary": "AAAA"}},
                       {"0010001a": {"vr": "LO", "Value": ["x"]}}, {"00100000": {"vr": "UL", "Value": [4]}},
                       element("CS", "STUDY", tag="00080052"), element("CS", "ISO_IR 100", tag="00080005"),
                       {"00100010": {"vr": "PN", "Value": {"Alphabetic": "x"}}}, {"00100010": "x"},
                       {"00280010": {"vr": "US or SS", "Value": [1]}}, {"00281101": {"vr": "SS", "Value": [1, 2, 3]}}):
            self.same(result, fast_expected=False)
        ok = element("LO", "x")
        self.assertIsNone(encode_identifier(ok, "STUDY", None, "1.2.840.10008.1.2.1.99"))
        self.assertIsNone(encode_identifier(ok, "STUDY", None, "1.2.840.10008.1.2.4.50"))

    def test_pydicom_settings_changed(self):
        """With pydicom settings that change what from_json or write_dataset make (Decimal DS, date/time
        objects, raising validation), the fast path declines."""
        result = element("DS", 0.1)
        self.assertIsNotNone(fast_path(result, "STUDY", None, EXPLICIT_VR_LITTLE_ENDIAN))
        for name, value in (("use_DS_decimal", True), ("datetime_conversion", True),
                            ("use_none_as_empty_text_VR_value", True)):
            self.patch(config, name, value)
            self.assertIsNone(fast_path(result, "STUDY", None, EXPLICIT_VR_LITTLE_ENDIAN), name)
            self.patch(config, name, not value)
        for attribute in ("reading_validation_mode", "writing_validation_mode"):
            saved = getattr(config.settings, attribute)
            setattr(config.settings, attribute, config.RAISE)
            try:
                self.assertIsNone(fast_path(result, "STUDY", None, EXPLICIT_VR_LITTLE_ENDIAN), attribute)
            finally:
                setattr(config.settings, attribute, saved)
        self.assertIsNotNone(fast_path(result, "STUDY", None, EXPLICIT_VR_LITTLE_ENDIAN))

    def test_levels(self):
        """The Query/Retrieve Level of each level (odd STUDY/IMAGE, even SERIES) is written as pydicom does."""
        for level in LEVELS:
            self.same(element("LO", "x"), level=level)
            self.same({}, level=level)


# --- the character set check and the service ---------------------------------------------------------------


class CharacterSetCheckTests(SynchronousTestCase):
    """response_character_set's check no longer touches warning filters, and decides as before."""

    def test_can_encode_text_as_encode_string_under_error_filter(self):
        """compat.can_encode_text says yes exactly when encode_string succeeds with warnings as errors (what
        response_character_set did), for the character-set files' names in many character sets."""
        texts = [item.patient_name for item in charset_files() if item.patient_name]
        texts += ["Doe^John", "Jérôme", "ﾔﾏﾀﾞ^ﾀﾛｳ", "a\udc80", "Ж", "\\", "=山田"]
        charsets = (["ISO_IR 100"], ["ISO_IR 192"], ["ISO_IR 6"], ["ISO 2022 IR 87"], ["", "ISO 2022 IR 87"],
                    ["ISO 2022 IR 13", "ISO 2022 IR 87"], ["", "ISO 2022 IR 149"], ["ISO_IR 144"], ["ISO_IR 126"],
                    ["GB18030"], ["GBK"], ["ISO_IR 13"], ["", "ISO 2022 IR 58"], ["ISO 2022 IR 6", "ISO 2022 IR 100"])
        for charset in charsets:
            encodings = convert_encodings(charset)
            for text in texts:
                with warnings.catch_warnings():
                    warnings.simplefilter("error")
                    try:
                        encode_string(text, encodings)
                        expected = True
                    except (UnicodeError, LookupError, ValueError, UserWarning):
                        expected = False
                self.assertEqual(compat.can_encode_text(text, encodings), expected, (charset, text))

    def test_filters_untouched(self):
        """response_character_set leaves the process-wide warning filters alone (it runs on worker threads,
        and warnings.catch_warnings is not thread-safe)."""
        before = list(warnings.filters)
        ds = Dataset()
        ds.PatientName = "Люкceмбypг"
        original = warnings.catch_warnings

        def forbidden(*args, **kwargs):
            raise AssertionError("catch_warnings used")

        self.patch(warnings, "catch_warnings", forbidden)
        self.assertEqual(response_character_set(ds, ["ISO_IR 100"]), ["ISO_IR 192"])
        self.assertEqual(response_character_set(ds, ["ISO_IR 144"]), ["ISO_IR 144"])
        self.patch(warnings, "catch_warnings", original)
        self.assertEqual(warnings.filters, before)


class WorkerRunner:
    """A runner that runs each job at once but records that it is inside one (a worker thread's job)."""

    def __init__(self) -> None:
        self.inside = False
        self.jobs: List[str] = []

    def __call__(self, function, *args, **kwargs) -> defer.Deferred:
        self.jobs.append(function.__name__)
        self.inside = True
        try:
            return defer.maybeDeferred(function, *args, **kwargs)
        finally:
            self.inside = False


class ServiceTests(SynchronousTestCase):
    """FindService encodes in the fetch job and sends those bytes."""

    def test_encoded_in_the_fetch_job(self):
        """Every response identifier is encoded inside the runner's fetch job (never on the reactor), and the
        bytes sent are the pydicom path's for the same match."""
        runner = WorkerRunner()
        harness = FindHarness(self, fill_corpus, read=runner)
        harness.associate()
        encoded_inside = []
        real = find_module.encode_identifier

        def spy(*args):
            encoded_inside.append(runner.inside and runner.jobs[-1] == "fetch")
            return real(*args)

        self.patch(find_module, "encode_identifier", spy)
        query = identifier("STUDY", PatientName="", PatientID="", StudyDate="", StudyInstanceUID="",
                           ModalitiesInStudy="", NumberOfStudyRelatedInstances="", ProcedureCodeSequence=Sequence([]))
        found = harness.find(query)
        self.assertEqual(len(found), 10)
        self.assertEqual(encoded_inside, [True] * 9)
        expected = {}
        for result in run_query(harness.archive, query):
            data = pydicom_path(result, "STUDY", None, EXPLICIT_VR_LITTLE_ENDIAN)
            expected[result["0020000D"]["Value"][0]] = data
        for response in found[:-1]:
            self.assertEqual(response.raw, expected[str(response.identifier.StudyInstanceUID)])

    def test_encoding_failure_after_earlier_matches(self):
        """A match that cannot be encoded ends the C-FIND with C000 after the matches before it, as when the
        reactor encoded them, and is logged."""
        harness = FindHarness(self, fill_corpus)
        harness.associate()
        calls = []
        pydicom_encode = FindService._encode

        def failing(result, level, requested, transfer_syntax):
            calls.append(1)
            if len(calls) == 3:
                raise ValueError("cannot encode this one")
            return pydicom_encode(result, level, requested, transfer_syntax)

        self.patch(find_module, "encode_identifier", lambda *args: None)
        self.patch(FindService, "_encode", staticmethod(failing))
        found = harness.find(identifier("STUDY", AccessionNumber=""))
        self.assertEqual([r.status for r in found], [0xFF00, 0xFF00, 0xC000])
        self.assertEqual(found[-1].command.ErrorComment, "unable to process: cannot encode this one")
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_encoder_falls_back_to_pydicom(self):
        """response_encoder gives the fast bytes when there are, the pydicom path's otherwise (a sequence
        with items, ISO 2022)."""
        item = {"00080100": {"vr": "SH", "Value": ["X"]}}
        result = {**element("SQ", item), **element("PN", {"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎"})}
        for requested in (None, ["ISO 2022 IR 87"], ["", "ISO 2022 IR 87"]):
            encode = response_encoder("STUDY", requested, EXPLICIT_VR_LITTLE_ENDIAN)
            self.assertEqual(encode(result), pydicom_path(result, "STUDY", requested, EXPLICIT_VR_LITTLE_ENDIAN))
        self.assertIs(find_module.encode_identifier, encode_module.encode_identifier)

    def test_thread_safety_smoke(self):
        """The fast path and the pydicom fallback give the same bytes when run on several threads at once."""
        results = [element("PN", {"Alphabetic": f"Name^{n}é"}) for n in range(50)]
        results += [{**element("SQ", {"00080100": {"vr": "SH", "Value": [str(n)]}}), **element("LO", "Ж")}
                    for n in range(50)]
        expected = [pydicom_path(r, "STUDY", ["ISO_IR 100"], EXPLICIT_VR_LITTLE_ENDIAN) for r in results]
        outputs: Dict[int, list] = {}

        def work(number: int) -> None:
            encode = response_encoder("STUDY", ["ISO_IR 100"], EXPLICIT_VR_LITTLE_ENDIAN)
            outputs[number] = [encode(result) for result in results]

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(sorted(outputs), [0, 1, 2, 3])
        for output in outputs.values():
            self.assertEqual(output, expected)
