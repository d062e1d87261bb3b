"""The ingest's fast path (appliance.dataset.fastscan) against storage's pydicom path.

Every comparison is differential: the pydicom path is what storage did before
the fast path existed (``read_dataset`` up to Pixel Data, ``metadata.extract``,
the offset and the 12 bytes there); the fast path must give exactly that, or
None.  The corpus is every file of pydicom's ``test_files`` and
``charset_files`` folders that pydicom reads, as stored and re-encoded in the
three uncompressed transfer syntaxes; the rest are data sets built byte by
byte for the edge cases.
"""

from __future__ import annotations

import dataclasses
import os
import random
import struct
import time
import warnings

from pydicom import config, dcmread
from twisted.trial.unittest import SynchronousTestCase

from appliance.compat import encode_dataset
from appliance.dataset import checks as storage
from appliance.dataset import fastscan
from appliance.dataset.metadata import extract
from appliance.dicom.uids import EXPLICIT_VR_BIG_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN

from .support_data import CHARSET_FILES, CT_IMAGE_STORAGE, TEST_FILES, dataset_offset, make_dataset

SYNTAXES = (IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN)
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
DEFLATED = "1.2.840.10008.1.2.1.99"

#: Files that must take the fast path in every uncompressed syntax (and as stored): plain images, ISO 8859-1
#: and UTF-8 text.
MUST_BE_FAST = ("CT_small.dcm", "MR_small.dcm", "chrFren.dcm", "chrFrenMulti.dcm", "chrGerm.dcm", "chrX1.dcm")
#: ... and at least this many corpus files per syntax, so that the corpus test cannot pass by falling back.
MIN_FAST_PER_SYNTAX = 30


def pydicom_path(data: bytes, transfer_syntax: str):
    """Storage's pydicom path: (ObjectMetadata, offset, pixel header), or the name of what it raised."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds, offset, header = storage.parse_memory(data, 0, transfer_syntax)
            return extract(ds), offset, header
        except Exception as error:  # the refusal storage would send
            return type(error).__name__


def fast_path(data: bytes, transfer_syntax: str):
    """The fast path, None when it declines; any other exception than Unsupported propagates (a bug)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return fastscan._scan(data, 0, transfer_syntax)
        except fastscan.Unsupported:
            return None


def read_file(path: str):
    """The data set of a corpus file (pixel data included), or None when pydicom cannot read it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = dcmread(path, force=True)
            len(ds)
            return ds
    except Exception:
        return None


def corpus():
    """(name, label, data set bytes, transfer syntax) for every file pydicom reads: the bytes as stored
    (after the File Meta Information) and re-encoded in each uncompressed syntax where pydicom can."""
    for folder in (TEST_FILES, CHARSET_FILES):
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                continue
            ds = read_file(path)
            if ds is None:
                continue
            with open(path, "rb") as handle:
                raw = handle.read()
            meta = getattr(ds, "file_meta", None)
            syntax = str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""
            if raw[128:132] == b"DICM" and syntax and syntax != DEFLATED:
                yield name, "stored", raw[dataset_offset(raw):], syntax
            for syntax in SYNTAXES:
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        data = encode_dataset(ds, syntax)
                except Exception:  # e.g. compressed pixel data in big endian
                    continue
                yield name, syntax, data, syntax


# --- data sets built byte by byte ---------------------------------------------------------------------------

_LONG = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
UNDEFINED = 0xFFFFFFFF


def _order(syntax: str) -> str:
    return ">" if syntax == EXPLICIT_VR_BIG_ENDIAN else "<"


def el(tag: int, vr: str, value, syntax: str, length: int = None) -> tuple:
    """One element (tag, bytes) as ``syntax`` encodes it; ``value`` bytes or text (ISO 8859-1)."""
    if isinstance(value, str):
        value = value.encode("latin_1")
    order = _order(syntax)
    length = len(value) if length is None else length
    head = struct.pack(order + "HH", tag >> 16, tag & 0xFFFF)
    if syntax == IMPLICIT_VR_LITTLE_ENDIAN:
        head += struct.pack("<L", length)
    elif vr in _LONG:
        head += vr.encode() + b"\0\0" + struct.pack(order + "L", length)
    else:
        head += vr.encode() + struct.pack(order + "H", length)
    return tag, head + value


def item(elements, syntax: str, undefined: bool = True) -> bytes:
    """A sequence item of ``elements`` (a list of (tag, bytes)), of undefined length or not."""
    order = _order(syntax)
    content = b"".join(data for _, data in elements)
    if undefined:
        return (struct.pack(order + "HHL", 0xFFFE, 0xE000, UNDEFINED) + content
                + struct.pack(order + "HHL", 0xFFFE, 0xE00D, 0))
    return struct.pack(order + "HHL", 0xFFFE, 0xE000, len(content)) + content


def sq(tag: int, items, syntax: str, undefined: bool = True) -> tuple:
    """A sequence element of ``items`` (bytes from :func:`item`), of undefined length or not."""
    order = _order(syntax)
    content = b"".join(items)
    if undefined:
        return el(tag, "SQ", content + struct.pack(order + "HHL", 0xFFFE, 0xE0DD, 0), syntax, UNDEFINED)
    return el(tag, "SQ", content, syntax)


def us(tag: int, value: int, syntax: str) -> tuple:
    """An unsigned short element."""
    return el(tag, "US", struct.pack(_order(syntax) + "H", value), syntax)


def pixel_data(syntax: str, vr: str = "OW", value: bytes = b"\x00\x01" * 8) -> tuple:
    """A Pixel Data element."""
    return el(0x7FE00010, vr, value, syntax)


def base(syntax: str, sop: str = "1.2.3.4.5") -> dict:
    """The attributes every stored object needs, as {tag: (tag, bytes)}."""
    return dict((e[0], e) for e in (
        el(0x00080016, "UI", CT_IMAGE_STORAGE.encode() + b"\0", syntax),
        el(0x00080018, "UI", sop.encode() + b"\0" * (len(sop) % 2), syntax),
        el(0x00080060, "CS", "CT", syntax),
        el(0x00100010, "PN", "Doe^John", syntax),
        el(0x00100020, "LO", "PID-1 ", syntax),
        el(0x0020000D, "UI", "1.2.3.4\0", syntax),
        el(0x0020000E, "UI", "1.2.3.4.1\0", syntax),
        el(0x00200011, "IS", "7 ", syntax),
        el(0x00200013, "IS", "12", syntax),
        us(0x00280100, 16, syntax),
    ))


def assemble(parts: dict, *extra) -> bytes:
    """The elements of ``parts`` and ``extra`` in tag order, as one data set."""
    elements = dict(parts)
    for element in extra:
        elements[element[0]] = element
    return b"".join(data for _, (_, data) in sorted(elements.items()))


def fast_path_delegating(data: bytes, transfer_syntax: str):
    """:func:`fast_path`, and the kept attributes it handed to pydicom (in a small data set)."""
    delegated = []
    original = fastscan._by_pydicom

    def spy(data, found, tags, syntax):
        delegated.extend(tags)
        return original(data, found, tags, syntax)

    fastscan._by_pydicom = spy
    try:
        return fast_path(data, transfer_syntax), sorted(delegated)
    finally:
        fastscan._by_pydicom = original


class Differential:
    """Assertions comparing the two paths."""

    def assertSame(self, data: bytes, syntax: str, fast: bool = True, pydicom=None):
        """The fast path gives what pydicom gives (or declines, unless ``fast``); returns its answer.

        ``pydicom``: the kept attributes the fast path must hand to pydicom (a sequence of tags; () for
        none), so that a decoder cannot hide behind the delegation.
        """
        expected = pydicom_path(data, syntax)
        answer, delegated = fast_path_delegating(data, syntax)
        if fast:
            self.assertIsNotNone(answer, f"the fast path declined (pydicom gives {expected!r})")
        if answer is not None:
            self.assertEqual(answer, expected)
            if pydicom is not None:
                self.assertEqual(delegated, sorted(pydicom), f"handed to pydicom ({syntax})")
        return answer

    def assertDeclines(self, data: bytes, syntax: str):
        """The fast path answers None (pydicom decides)."""
        self.assertIsNone(fast_path(data, syntax))
        self.assertIsNone(fastscan.scan(data, 0, syntax))


class CorpusTests(Differential, SynchronousTestCase):
    """pydicom's own test files, as stored and re-encoded."""

    def test_corpus(self):
        """Every readable file in every syntax: the fast path gives exactly the pydicom path's answer or
        declines; the plain files (CT, MR, ISO 8859-1, UTF-8) take it in every syntax, and enough files do."""
        counts = {}
        fast_names = {}
        mismatches = []
        delegating = set()
        for name, label, data, syntax in corpus():
            expected = pydicom_path(data, syntax)
            answer, delegated = fast_path_delegating(data, syntax)
            total, fast = counts.get(label, (0, 0))
            counts[label] = (total + 1, fast + (answer is not None))
            if answer is not None:
                fast_names.setdefault(label, set()).add(name)
                if delegated:
                    delegating.add(name)
                if answer != expected:
                    mismatches.append((name, label, answer, expected))
        self.assertEqual(mismatches, [])
        self.assertEqual(delegating & set(MUST_BE_FAST), set())  # decoded by the fast path itself
        for label in ("stored",) + SYNTAXES:
            for name in MUST_BE_FAST:
                if label == EXPLICIT_VR_BIG_ENDIAN and name.startswith("chr"):
                    continue  # pydicom does not write these in big endian
                self.assertIn(name, fast_names.get(label, ()), f"{name} did not take the fast path ({label})")
            self.assertGreaterEqual(counts[label][1], MIN_FAST_PER_SYNTAX if label != EXPLICIT_VR_BIG_ENDIAN
                                    else MIN_FAST_PER_SYNTAX // 2, label)
        print("\nfast path taken (files / of readable files):",
              ", ".join(f"{label}: {fast}/{total}" for label, (total, fast) in counts.items()),
              f"; with attributes handed to pydicom: {', '.join(sorted(delegating)) or 'none'}")

    def test_study_level_only(self):
        """Asked for the study level only (the Memory-Server), the scan gives pydicom's columns, pixel offset and
        study level exactly, the other levels None, wherever it answers; it answers wherever the full scan does."""
        study_only = frozenset({"study"})
        answered = 0
        for name, label, data, syntax in corpus():
            full = fast_path(data, syntax)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                light = fastscan.scan(data, 0, syntax, study_only)
            if full is not None:
                self.assertIsNotNone(light, (name, label))
            if light is None:
                continue
            answered += 1
            expected = pydicom_path(data, syntax)
            self.assertFalse(isinstance(expected, str), f"{name} ({label}): pydicom gives {expected}")
            metadata, offset, header = light
            self.assertEqual((offset, header), expected[1:], (name, label))
            self.assertEqual((metadata.patient_json, metadata.series_json, metadata.instance_json),
                             (None, None, None))
            wanted = dataclasses.replace(expected[0], patient_json=None, series_json=None, instance_json=None)
            self.assertEqual(metadata, wanted, (name, label))
        self.assertGreaterEqual(answered, MIN_FAST_PER_SYNTAX)

    def test_mutated_corpus_files(self):
        """Truncated and corrupted copies of corpus files: the fast path never raises, and never disagrees."""
        rng = random.Random(20240611)
        for name in ("CT_small.dcm", "MR_small.dcm", "chrX1.dcm", "rtplan.dcm"):
            folder = CHARSET_FILES if name.startswith("chr") else TEST_FILES
            ds = read_file(os.path.join(folder, name))
            for syntax in SYNTAXES:
                data = encode_dataset(ds, syntax)
                for cut in sorted(rng.sample(range(len(data)), min(60, len(data)))):
                    self.assertSame(data[:cut], syntax, fast=False)
                for _ in range(60):
                    corrupted = bytearray(data)
                    position = rng.randrange(min(len(data), 2048))
                    corrupted[position] = rng.randrange(256)
                    self.assertSame(bytes(corrupted), syntax, fast=False)

    def test_garbage(self):
        """Random bytes, empty data and tiny data: None or the same answer, never an exception."""
        rng = random.Random(7)
        samples = [b"", b"\x00", b"\x08\x00\x16\x00", b"\xff" * 1000, b"\x00" * 64]
        samples += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))) for _ in range(200)]
        for data in samples:
            for syntax in SYNTAXES + (JPEG_BASELINE,):
                self.assertSame(data, syntax, fast=False)
                fastscan.scan(data, 0, syntax)  # never raises


class LevelMemoTests(SynchronousTestCase):
    """A level's JSON text is reused while its elements' bytes (and what decoding them depends on) are the same:
    it is never another object's text."""

    def test_same_as_scanned_afresh(self):
        def variant(sop, patient="Test^Patient", weight="70", charset=None, syntax=EXPLICIT_VR_LITTLE_ENDIAN):
            ds = make_dataset(sop=sop, patient=patient)
            ds.PatientWeight = weight
            if charset:
                ds.SpecificCharacterSet = charset
            return encode_dataset(ds, syntax), syntax

        objects = [variant("1.2.3.1"), variant("1.2.3.2"), variant("1.2.3.3", patient="Test^Patiens"),
                   variant("1.2.3.4", weight="-0"), variant("1.2.3.5", weight="0"), variant("1.2.3.6", weight="-0"),
                   variant("1.2.3.7", charset="ISO_IR 100"), variant("1.2.3.8", charset="ISO_IR 192"),
                   variant("1.2.3.9", syntax=IMPLICIT_VR_LITTLE_ENDIAN), variant("1.2.3.10"), variant("1.2.3.2")]
        memo = fastscan._RECENT_LEVELS
        for data, syntax in objects:
            remembered = fastscan.scan(data, 0, syntax)
            memo[:] = [()] * len(memo)
            afresh = fastscan.scan(data, 0, syntax)
            self.assertIsNotNone(afresh)
            self.assertEqual(remembered, afresh)
        data, syntax = objects[5]
        metadata = fastscan.scan(data, 0, syntax)[0]
        self.assertIn("-0.0", metadata.patient_json + metadata.study_json)  # after a "0", still its own

    def test_interleaved_series_reuse_their_own_levels(self):
        """Objects of three series arriving interleaved (three senders at once) find their patient, study and
        series levels among the recent ones: only their instance level is decoded again, and every answer is the
        one a fresh scan gives."""
        def object_of(series, number):
            ds = make_dataset(patient=f"Patient^{series}", patient_id=f"P{series}", study=f"1.2.{series}",
                              series=f"1.2.{series}.1", sop=f"1.2.{series}.1.{number}")
            return encode_dataset(ds, EXPLICIT_VR_LITTLE_ENDIAN)

        objects = [object_of(series, number) for number in range(4) for series in range(3)]
        decoded = []
        level = fastscan._level
        self.patch(fastscan, "_level", lambda data, found, index, *rest: (decoded.append(index),
                                                                          level(data, found, index, *rest))[1])
        fastscan._RECENT_LEVELS[:] = [()] * len(fastscan._RECENT_LEVELS)
        answers = [fastscan.scan(data, 0, EXPLICIT_VR_LITTLE_ENDIAN) for data in objects]
        self.assertEqual(decoded[:12], [0, 1, 2, 3] * 3)  # each series' first object: every level
        self.assertEqual(decoded[12:], [3] * 9)  # then only the instances
        for data, answer in zip(objects, answers):
            fastscan._RECENT_LEVELS[:] = [()] * len(fastscan._RECENT_LEVELS)
            self.assertEqual(answer, fastscan.scan(data, 0, EXPLICIT_VR_LITTLE_ENDIAN))


class StructureTests(Differential, SynchronousTestCase):
    """Sequences, pixel data, offsets, and what makes the fast path decline."""

    def test_nested_undefined_length_sequences(self):
        """Sequences of undefined length nested three deep (items of defined and undefined length, a kept
        sequence and others) before Pixel Data are walked exactly: same metadata and offsets."""
        for syntax in SYNTAXES:
            innermost = [us(0x00280010, 4, syntax), el(0x00081150, "UI", "1.2.840.10008.5.1.4.1.1.2\0", syntax)]
            level3 = sq(0x00081140, [item(innermost, syntax), item(innermost, syntax, undefined=False)], syntax)
            level2 = sq(0x00081115, [item([level3, el(0x0020000E, "UI", "9.9\0", syntax)], syntax)], syntax)
            level1 = sq(0x00081110, [item([level2], syntax, undefined=False), item([], syntax)], syntax)
            code = [el(0x00080100, "SH", "CODE1 ", syntax), el(0x00080102, "SH", "L", syntax),
                    el(0x00080104, "LO", "Head", syntax)]
            procedure = sq(0x00081032, [item(code + [sq(0x0040A043, [item(code, syntax)], syntax)], syntax),
                                        item(code, syntax, undefined=False)], syntax)
            request = sq(0x00400275, [item([sq(0x00400008, [item(code, syntax)], syntax, undefined=False)],
                                           syntax)], syntax)
            private = (0x00091010, el(0x00091010, "SQ", item([us(0x00280011, 2, syntax)], syntax)
                                      + struct.pack(_order(syntax) + "HHL", 0xFFFE, 0xE0DD, 0), syntax,
                                      UNDEFINED)[1])
            data = assemble(base(syntax), level1, procedure, request, private, pixel_data(syntax))
            self.assertIn(b"\xff\xff\xff\xff", data)
            answer = self.assertSame(data, syntax, pydicom=())
            metadata, offset, header = answer
            self.assertEqual(offset, data.index(pixel_data(syntax)[1]))
            self.assertIn("CODE1", metadata.study_json)
            self.assertIn("00400008", metadata.series_json)

    def test_pixel_data_offset_and_header(self):
        """The offset is where Pixel Data starts (plus the header length given) and the header its first
        12 bytes, as storage's pydicom path reports them."""
        for syntax in SYNTAXES:
            data = assemble(base(syntax), pixel_data(syntax))
            metadata, offset, header = fastscan.scan(data, 100, syntax)
            start = len(data) - len(pixel_data(syntax)[1])
            self.assertEqual((offset, header), (100 + start, data[start:start + 12]))
            self.assertSame(data, syntax)

    def test_no_pixel_data(self):
        """A data set without Pixel Data: the offset is its end and the header empty, as with pydicom."""
        for syntax in SYNTAXES:
            data = assemble(base(syntax))
            _, offset, header = self.assertSame(data, syntax)
            self.assertEqual((offset, header), (len(data), b""))

    def test_elements_after_pixel_data_are_not_read(self):
        """Whatever follows Pixel Data (trailing padding, garbage) is not read, by either path."""
        for syntax in SYNTAXES:
            data = assemble(base(syntax), pixel_data(syntax)) + b"\xfc\xff\xfc\xff garbage"
            self.assertSame(data, syntax)

    def test_eight_bit_ow_pixel_data_coercion(self):
        """Pixel Data sent as OW with Bits Allocated 8: inspect_memory finds the same coercion on the fast
        path as on pydicom's (offset, byte order, length)."""
        for syntax in (EXPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN):
            ds = make_dataset(sop="1.2.4.1", pixels=bytes(range(32)), bits_allocated=8)
            ds["PixelData"].VR = "OW"
            data = encode_dataset(ds, syntax)
            self.assertIsNotNone(fastscan.scan(data, 132, syntax))
            fast = storage.inspect_memory(data, 132, CT_IMAGE_STORAGE, "1.2.4.1", syntax)
            ds_, offset, header = storage.parse_memory(data, 132, syntax)
            slow = storage.inspect(ds_, offset, header, CT_IMAGE_STORAGE, "1.2.4.1", syntax)
            self.assertEqual(fast, slow)
            self.assertIsNotNone(fast[1])
            self.assertEqual(fast[1].offset, 132 + data.index(b"\xe0\x7f\x10\x00" if syntax != EXPLICIT_VR_BIG_ENDIAN
                                                              else b"\x7f\xe0\x00\x10"))
            self.assertEqual(fast[1].length, 32)

    def test_compressed_syntax_data_set(self):
        """A data set of a compressed syntax (explicit VR little endian, encapsulated Pixel Data of undefined
        length) is read up to Pixel Data; a deflated one is left to pydicom."""
        syntax = EXPLICIT_VR_LITTLE_ENDIAN
        encapsulated = el(0x7FE00010, "OB", item([], syntax, undefined=False) + item([], syntax, undefined=False)
                          + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0), syntax, UNDEFINED)
        data = assemble(base(syntax), encapsulated)
        self.assertSame(data, JPEG_BASELINE)
        self.assertDeclines(data, DEFLATED)

    def test_declines_what_is_not_plain(self):
        """Group 0002 in the data set, tags out of order or repeated, a length past the end, an undefined
        length that is no sequence, a VR that is not standard, an item tag at the top level (before Pixel Data too:
        its order is checked before the scan stops there), an explicit VR
        data set announced as implicit, a missing SOP Instance UID: None, and pydicom decides."""
        for syntax in SYNTAXES:
            parts = base(syntax)
            cases = {
                "group 2": assemble(parts, el(0x00020010, "UI", "1.2.840.10008.1.2\0", syntax)),
                "out of order": assemble(parts) + el(0x00080020, "DA", "20240101", syntax)[1],
                "repeated": assemble(parts) + parts[0x00280100][1],
                "overrun": assemble(parts) + el(0x00291010, "LO", "x" * 10, syntax, length=100)[1],
                "undefined OB": assemble(parts, el(0x00091001, "OB", b"ab" + struct.pack(
                    _order(syntax) + "HHL", 0xFFFE, 0xE0DD, 0), syntax, UNDEFINED)),
                "item at top level": assemble(parts) + struct.pack(_order(syntax) + "HHL", 0xFFFE, 0xE00D, 0),
                "item before Pixel Data": assemble(parts) + struct.pack(_order(syntax) + "HHL", 0xFFFE, 0xE000, 4)
                + b"abcd" + pixel_data(syntax)[1],
                "no SOP instance": assemble({t: e for t, e in parts.items() if t != 0x00080018}),
                "truncated": assemble(parts, pixel_data(syntax))[:-20],
            }
            if syntax != IMPLICIT_VR_LITTLE_ENDIAN:
                cases["odd VR"] = assemble(parts, el(0x00091001, "XX", "ab", syntax))
                cases["lower-case VR"] = assemble(parts, el(0x00091001, "ab", "ab", syntax))
            for label, data in cases.items():
                self.assertIsNone(fast_path(data, syntax), f"{label} ({syntax})")
                self.assertDeclines(data, syntax)
                self.assertSame(data, syntax, fast=False)
        explicit = assemble(base(EXPLICIT_VR_LITTLE_ENDIAN))
        self.assertDeclines(explicit, IMPLICIT_VR_LITTLE_ENDIAN)
        self.assertDeclines(assemble(base(IMPLICIT_VR_LITTLE_ENDIAN)), EXPLICIT_VR_LITTLE_ENDIAN)

    def test_malformed_sequences_decline(self):
        """A sequence whose items overrun it, lack their delimiter, or hold a stray tag: None."""
        for syntax in SYNTAXES:
            order = _order(syntax)
            inner = [el(0x00080100, "SH", "C1", syntax)]
            bad_items = {
                "no delimiter": item(inner, syntax)[:-8],
                "stray tag": item(inner, syntax) + struct.pack(order + "HHL", 0xFFFE, 0xE00D, 0),
                "item overrun": struct.pack(order + "HHL", 0xFFFE, 0xE000, 400) + inner[0][1],
                "element overrun": item([el(0x00080100, "SH", "C1", syntax, length=30)], syntax, undefined=False),
            }
            for label, items in bad_items.items():
                for tag in (0x00081110, 0x00081032):  # a sequence skipped, a sequence kept
                    data = assemble(base(syntax), el(tag, "SQ", items + struct.pack(order + "HHL", 0xFFFE, 0xE0DD,
                                                                                       0), syntax, UNDEFINED),
                                    pixel_data(syntax))
                    self.assertDeclines(data, syntax)
                    self.assertSame(data, syntax, fast=False)

    def test_changed_pydicom_settings_decline(self):
        """With pydicom settings that change decoded values, the fast path steps aside."""
        data = assemble(base(EXPLICIT_VR_LITTLE_ENDIAN))
        self.assertIsNotNone(fastscan.scan(data, 0, EXPLICIT_VR_LITTLE_ENDIAN))
        for name in ("datetime_conversion", "use_none_as_empty_text_VR_value"):
            setattr(config, name, True)
            try:
                self.assertIsNone(fastscan.scan(data, 0, EXPLICIT_VR_LITTLE_ENDIAN))
            finally:
                setattr(config, name, False)

    def test_bytearray_takes_the_fast_path_too(self):
        """The memory store checks its objects in the bytearray they arrived in: sequences included, the fast
        path answers as it does for bytes (it once declined every such object, hashing a bytearray slice)."""
        from pydicom.dataset import Dataset

        ds = make_dataset(sop="1.2.9.5")
        item = Dataset()
        item.ReferencedSOPClassUID = CT_IMAGE_STORAGE
        item.ReferencedSOPInstanceUID = "1.2.9.4"
        ds.ReferencedImageSequence = [item]
        ds["ReferencedImageSequence"].is_undefined_length = True  # its items are walked, element by element
        item.is_undefined_length_sequence_item = True
        for syntax in (EXPLICIT_VR_LITTLE_ENDIAN, "1.2.840.10008.1.2.2", "1.2.840.10008.1.2"):
            data = encode_dataset(ds, syntax)
            answer = fastscan.scan(data, 0, syntax)
            self.assertIsNotNone(answer, syntax)
            self.assertEqual(fastscan.scan(bytearray(data), 0, syntax), answer, syntax)
        calls = []
        self.patch(storage, "parse_memory", lambda *args: calls.append(args))
        storage.inspect_memory(bytearray(data), 0, CT_IMAGE_STORAGE, "1.2.9.5", "1.2.840.10008.1.2")
        self.assertEqual(calls, [])

    def test_inspect_memory_takes_the_fast_path(self):
        """inspect_memory answers a plain data set without pydicom's parser, and hands the rest to it."""
        calls = []
        original = storage.parse_memory

        def spy(*args):
            calls.append(args)
            return original(*args)

        self.patch(storage, "parse_memory", spy)
        ds = make_dataset(sop="1.2.9.1")
        data = encode_dataset(ds, EXPLICIT_VR_LITTLE_ENDIAN)
        metadata, coercion = storage.inspect_memory(data, 0, CT_IMAGE_STORAGE, "1.2.9.1", EXPLICIT_VR_LITTLE_ENDIAN)
        self.assertEqual((metadata.sop_instance_uid, coercion, calls), ("1.2.9.1", None, []))
        ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
        data = encode_dataset(ds, EXPLICIT_VR_LITTLE_ENDIAN)
        metadata, _ = storage.inspect_memory(data, 0, CT_IMAGE_STORAGE, "1.2.9.1", EXPLICIT_VR_LITTLE_ENDIAN)
        self.assertEqual((metadata.sop_instance_uid, len(calls)), ("1.2.9.1", 1))
        with self.assertRaises(storage.Refused):  # the refusal stays pydicom's
            storage.inspect_memory(data, 0, CT_IMAGE_STORAGE, "1.2.9.2", EXPLICIT_VR_LITTLE_ENDIAN)


class ValueTests(Differential, SynchronousTestCase):
    """Values of each VR, decoded as pydicom decodes them."""

    def variants(self, *extra, charset=None, fast=True):
        """A data set with ``extra`` elements (built per syntax by the callables given) compared in every
        uncompressed syntax."""
        for syntax in SYNTAXES:
            elements = [make(syntax) for make in extra]
            if charset is not None:
                elements.append(el(0x00080005, "CS", charset, syntax))
            data = assemble(base(syntax), *elements, pixel_data(syntax))
            self.assertSame(data, syntax, fast=fast)

    def test_empty_values(self):
        """Zero-length text, names, numbers, IS, DS, US and sequences, and values of padding only."""
        self.variants(
            lambda s: el(0x00100010, "PN", "", s), lambda s: el(0x00100020, "LO", "", s),
            lambda s: el(0x00200011, "IS", "", s), lambda s: el(0x00200013, "IS", "  ", s),
            lambda s: el(0x00080008, "CS", "", s), lambda s: el(0x00101030, "DS", "", s),
            lambda s: el(0x00280100, "US", b"", s), lambda s: el(0x00280010, "US", b"", s),
            lambda s: el(0x00081030, "LO", "  ", s), lambda s: el(0x00104000, "LT", "\0\0", s),
            lambda s: el(0x00080020, "DA", "", s), lambda s: el(0x00080050, "SH", " ", s),
            lambda s: sq(0x00101002, [], s), lambda s: sq(0x00081032, [], s, undefined=False),
            lambda s: el(0x00081060, "PN", "==", s),
        )

    def test_multi_valued(self):
        """Multi-valued Image Type, names, IS, DS, US, UIDs, and empty values among them."""
        self.variants(
            lambda s: el(0x00080008, "CS", "ORIGINAL\\PRIMARY\\AXIAL ", s),
            lambda s: el(0x00081070, "PN", "Smith^J\\Doe^Jane=D^J\\", s),
            lambda s: el(0x00200013, "IS", " 1\\2 \\-3", s),
            lambda s: el(0x00201041, "DS", "1.5\\-2e3 \\.25", s),
            lambda s: el(0x00280010, "US", struct.pack(_order(s) + "HH", 512, 256), s),
            lambda s: el(0x00081030, "LO", "a \\ b\\", s),
            lambda s: el(0x00200052, "UI", "1.2\\3.4\0", s),
        )
        # several values in a column: str(MultiValue) is pydicom's (the attribute goes to pydicom)
        self.variants(lambda s: el(0x00100020, "LO", "A\\B", s), lambda s: el(0x00100010, "PN", "A\\B", s),
                      lambda s: el(0x00200011, "IS", "1\\2", s), lambda s: el(0x00080060, "CS", "CT\\MR", s))

    def test_person_name_groups(self):
        """Names with ideographic and phonetic groups, empty groups between and after, components."""
        self.variants(lambda s: el(0x00100010, "PN", "Yamada^Tarou=\xe5\xb1\xb1\xe7\x94\xb0^\xe5\xa4\xaa"
                                   "\xe9\x83\x8e=\xe3\x82\x84\xe3\x81\xbe\xe3\x81\xa0", s),
                      lambda s: el(0x00080090, "PN", "=Ideo^Only", s),
                      lambda s: el(0x00081050, "PN", "A^B==Phon=Extra", s),
                      lambda s: el(0x00081060, "PN", "^^^^", s), charset="ISO_IR 192")
        self.variants(lambda s: el(0x00100010, "PN", "  Doe^John^^^  = ", s))

    def test_character_sets(self):
        """No character set and ISO 8859-1 decode as pydicom does (bytes above 0x7F included), UTF-8 too;
        invalid UTF-8 and escape sequences are pydicom's (the fast path still answers); other character sets
        make it decline."""
        latin = lambda s: el(0x00100010, "PN", "Buc^J\xe9r\xf4me", s)  # noqa: E731
        text = lambda s: el(0x00081030, "LO", "Cr\xe2ne\\Thorax", s)  # noqa: E731
        for charset in (None, "ISO_IR 6", "ISO_IR 100", "ISO_IR 100 ", "ISO 2022 IR 100", ""):
            self.variants(latin, text, charset=charset)
        self.variants(lambda s: el(0x00100010, "PN", "Wang^XiaoDong=\xe7\x8e\x8b^\xe5\xb0\x8f\xe6\x9d\xb1", s),
                      charset="ISO_IR 192")
        self.variants(lambda s: el(0x00100010, "PN", b"Bad^\xff\xfe", s), charset="ISO_IR 192")  # pydicom replaces
        self.variants(lambda s: el(0x00104000, "LT", b"esc \x1b(B here", s), charset="ISO_IR 100")
        for charset in ("ISO_IR 101", "ISO 2022 IR 87", "\\ISO 2022 IR 87", "GB18030", "ISO_IR 999", "ISO_IR 192\\"):
            self.variants(latin, charset=charset, fast=False)
            syntax = EXPLICIT_VR_LITTLE_ENDIAN
            self.assertDeclines(assemble(base(syntax), latin(syntax), el(0x00080005, "CS", charset, syntax)),
                                syntax)

    def test_numbers_as_pydicom_reads_them(self):
        """IS and DS strings pydicom turns into numbers, or not (1.0, 1A, blanks, signs, exponents, huge),
        and binary numbers of each width and byte order."""
        # plain numbers are decoded by the fast path; the others go to pydicom, which may refuse them
        for values, fast in (((" 12", "+5 ", "-0", "007", "1\\2"), True),
                             (("1.0", "1A", " ", "1 2", "99999999999999999999", "1_0", "1\\"), False)):
            for value in values:
                self.variants(lambda s, v=value: el(0x00200013, "IS", v, s),
                              lambda s, v=value: el(0x00200011, "IS", v, s), fast=fast)
        for values, fast in ((("1e3", ".5", "5.", "-0.0", " 3.25 ", "+.5e-3", "1e999"), True),
                             (("abc", "nan", "1_0", "1.5\\x"), False)):
            for value in values:
                self.variants(lambda s, v=value: el(0x00101030, "DS", v, s),
                              lambda s, v=value: el(0x00201041, "DS", v, s), fast=fast)
        self.variants(lambda s: el(0x00280100, "US", b"\x08", s), fast=False)  # odd length: pydicom raises
        for vr, code in (("US", "H"), ("SS", "h"), ("UL", "L"), ("SL", "l"), ("FL", "f"), ("FD", "d")):
            self.variants(lambda s, vr=vr, code=code: el(0x00280011, vr, struct.pack(_order(s) + code * 2, 3, 4), s),
                          lambda s, vr=vr, code=code: el(0x00280100, vr, struct.pack(_order(s) + code, 8), s))

    def test_texts_of_each_vr(self):
        """Padding, backslashes and spaces as each text VR keeps or strips them (UI NUL, LT one value, AE
        stripped, leading spaces kept)."""
        self.variants(
            lambda s: el(0x00081030, "LO", "  lead and trail  \0", s),
            lambda s: el(0x00104000, "LT", "line\\with\\backslashes \r\n  ", s),
            lambda s: el(0x00204000, "LT", "  indented\0", s),
            lambda s: el(0x00080020, "DA", "20240101\0", s),
            lambda s: el(0x00080030, "TM", " 101010.5 ", s),
            lambda s: el(0x0008002A, "DT", "20240101101010", s),
            lambda s: el(0x00101010, "AS", "042Y", s),
            lambda s: el(0x00200052, "UI", " 1.2.3 \0", s),
            lambda s: el(0x00181030, "LO", "proto\tcol", s),
        )

    def test_explicit_vr_other_than_the_dictionary(self):
        """An explicit VR that differs from the dictionary's is the one used (UN, LO for SH, OB, ST, AT):
        the fast path decodes what it can and hands the rest to pydicom, and the answer is the same."""
        for make in (lambda s: el(0x00100010, "UN", "Doe^Jane", s),
                     lambda s: el(0x00200010, "LO", "STUDY-ID-LONGER-THAN-16", s),
                     lambda s: el(0x00081030, "OB", b"\x01\x02", s),
                     lambda s: el(0x00104000, "ST", "st\\text", s),
                     lambda s: el(0x00200011, "SH", " 7", s),
                     lambda s: el(0x00280100, "SS", struct.pack(_order(s) + "h", 8), s),
                     lambda s: el(0x00101030, "FD", struct.pack(_order(s) + "d", 71.5), s),
                     lambda s: el(0x00080060, "AE", " CT ", s)):
            for syntax in (EXPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN):
                self.assertSame(assemble(base(syntax), make(syntax), pixel_data(syntax)), syntax)

    def test_kept_sequences(self):
        """Kept sequences (other patient IDs, procedure codes, request attributes, issuer of accession
        number) of defined and undefined length, with private, binary and ambiguous elements in items (those
        go to pydicom)."""
        for syntax in SYNTAXES:
            ids = [el(0x00100020, "LO", "OTHER", syntax), el(0x00100021, "LO", "HOSP", syntax)]
            private = [el(0x00090010, "LO", "CREATOR", syntax), el(0x00091001, "LO", "p", syntax)]
            binary = [el(0x00081030, "LO", "x", syntax), el(0x00091002, "OB", b"\x00\x01", syntax)]
            ambiguous = [el(0x00280106, "US" if syntax != IMPLICIT_VR_LITTLE_ENDIAN else "SS",
                            struct.pack(_order(syntax) + "H", 3), syntax)]
            implicit = syntax == IMPLICIT_VR_LITTLE_ENDIAN
            kept = (0x00080051, 0x00101002, 0x00400275)
            for items, pydicom in (([ids], ()), ([ids, ids], ()), ([[]], ()), ([private], kept if implicit else ()),
                                   ([binary], kept), ([ambiguous], kept if implicit else ())):
                for undefined in (True, False):
                    parts = [item(elements, syntax, undefined) for elements in items]
                    self.assertSame(assemble(base(syntax), sq(0x00101002, parts, syntax, undefined),
                                             sq(0x00400275, parts, syntax, not undefined),
                                             sq(0x00080051, parts, syntax, undefined),
                                             us(0x00280103, 1, syntax), pixel_data(syntax)), syntax,
                                    pydicom=pydicom)

    def test_what_items_hold_that_pydicom_converts(self):
        """In a kept sequence, a Specific Character Set of the item's own, a LUT descriptor (whose first
        value pydicom reads as unsigned) and a private group length in implicit VR (UN to pydicom) send
        the sequence to pydicom, and the answer is the same."""
        for syntax in SYNTAXES:
            own_charset = [el(0x00080005, "CS", "ISO_IR 192", syntax), el(0x00100020, "LO", "Caf\xc3\xa9", syntax)]
            cases = [(sq(0x00101002, [item(own_charset, syntax)], syntax), el(0x00080005, "CS", "ISO_IR 100", syntax))]
            if syntax != IMPLICIT_VR_LITTLE_ENDIAN:
                lut = el(0x00283002, "SS", struct.pack(_order(syntax) + "hhh", -1, 0, 16), syntax)
                cases.append((sq(0x00400275, [item([lut], syntax)], syntax, undefined=False),))
            else:
                group_length = el(0x00090000, "UL", struct.pack("<L", 4), syntax)
                cases.append((sq(0x00400275, [item([group_length], syntax)], syntax),))
            for elements in cases:
                data = assemble(base(syntax), *elements, pixel_data(syntax))
                self.assertSame(data, syntax, pydicom=(elements[0][0],))

    def test_what_pydicom_cannot_read_in_a_skipped_sequence_declines(self):
        """A Specific Character Set pydicom cannot look up (it raises reading it) inside an item of a
        sequence the index does not keep: the fast path declines, pydicom refuses."""
        for syntax in SYNTAXES:
            bad = sq(0x00081110, [item([el(0x00080005, "CS", "IS\x00O", syntax)], syntax)], syntax)
            data = assemble(base(syntax), bad, pixel_data(syntax))
            self.assertDeclines(data, syntax)
            self.assertIsInstance(pydicom_path(data, syntax), str)

    def test_pixel_representation_pydicom_cannot_convert_declines(self):
        """pydicom 3 converts Pixel Representation when it converts a kept sequence: one of odd length makes
        the fast path decline (pydicom decides, and pydicom 3 refuses)."""
        for syntax in SYNTAXES:
            data = assemble(base(syntax), el(0x00280103, "US", b"\x01\x00\x00", syntax),
                            sq(0x00101002, [item([el(0x00100020, "LO", "X", syntax)], syntax)], syntax, False),
                            pixel_data(syntax))
            self.assertDeclines(data, syntax)
            self.assertSame(data, syntax, fast=False)

    def test_icon_image_sequence(self):
        """An icon image (its own pixel data inside the item) is kept as pydicom gives it."""
        for syntax in SYNTAXES:
            icon = [us(0x00280010, 2, syntax), us(0x00280011, 2, syntax), us(0x00280100, 8, syntax),
                    el(0x7FE00010, "OB", b"\x01\x02\x03\x04", syntax)]
            for undefined in (True, False):
                self.assertSame(assemble(base(syntax), sq(0x00880200, [item(icon, syntax, undefined)], syntax,
                                                          undefined), pixel_data(syntax)), syntax)


class TimingTests(SynchronousTestCase):
    """How much faster the fast path is (printed, not asserted)."""

    def test_timing_comparison(self):
        """Parse + extract of CT_small in each uncompressed syntax, pydicom path and fast path (best of 3
        rounds of 50)."""
        ds = read_file(os.path.join(TEST_FILES, "CT_small.dcm"))
        lines = []
        for syntax in SYNTAXES:
            data = encode_dataset(ds, syntax)

            def slow():
                extract(storage.parse_memory(data, 0, syntax)[0])

            def fast():
                fastscan.scan(data, 0, syntax)

            timings = []
            for function in (slow, fast):
                best = float("inf")
                for _ in range(3):
                    start = time.perf_counter()
                    for _ in range(50):
                        function()
                    best = min(best, (time.perf_counter() - start) / 50)
                timings.append(best)
            self.assertIsNotNone(fastscan.scan(data, 0, syntax))
            lines.append(f"{syntax}: pydicom {timings[0] * 1e6:.0f} us, fast {timings[1] * 1e6:.0f} us "
                         f"({timings[0] / timings[1]:.1f}x)")
        print("\nCT_small parse + extract: " + "; ".join(lines))
