"""Whether a data set is whole (appliance/dataset/structure.py), and what the C-STORE SCP answers when not.

Issue 9: a PN declaring 200 bytes with 2 present, a sequence longer than
the data, a Pixel Data element declaring 2 GB with 10 bytes sent, sequences
nested 10,000 deep were stored with Success (or met pydicom's recursion).
"""

from __future__ import annotations

import struct

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from twisted.trial.unittest import SynchronousTestCase

from appliance.dataset.structure import MAX_DEPTH, problem
from appliance.dicom import status as S
from appliance.dicom.uids import EXPLICIT_VR_BIG_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN

from .support_data import CT_IMAGE_STORAGE, encode_dataset, make_dataset
from .test_storage import StorageHarness

SYNTAXES = (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN)


def check(data: bytes, syntax: str = EXPLICIT_VR_LITTLE_ENDIAN):
    return problem(data, 0, len(data), syntax == IMPLICIT_VR_LITTLE_ENDIAN, syntax != EXPLICIT_VR_BIG_ENDIAN)


def with_sequences() -> Dataset:
    ds = make_dataset(sop="1.2.826.0.1.11.1")
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "T-A0100", "SRT", "Brain"
    inner = Dataset()
    inner.ConceptNameCodeSequence = Sequence([code])
    ds.ProcedureCodeSequence = Sequence([code, Dataset()])
    ds.ContentSequence = Sequence([inner])
    return ds


def explicit_element(tag: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def item(body: bytes, undefined: bool = False) -> bytes:
    if undefined:
        return struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + body + struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
    return struct.pack("<HHL", 0xFFFE, 0xE000, len(body)) + body


def undefined_sequence(tag: int, items: bytes, vr: bytes = b"SQ") -> bytes:
    return (struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, vr, 0, 0xFFFFFFFF) + items
            + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))


class WholeTests(SynchronousTestCase):

    def test_whole_data_sets(self):
        for syntax in SYNTAXES:
            with self.subTest(syntax=syntax):
                self.assertIsNone(check(encode_dataset(with_sequences(), syntax), syntax))
                self.assertIsNone(check(b"", syntax))

    def test_every_cut_inside_an_element_is_found(self):
        """A data set cut anywhere but between two top-level elements is not whole, in every syntax."""
        ds = with_sequences()
        for syntax in SYNTAXES:
            data = encode_dataset(ds, syntax)
            boundaries = {0, len(data)}
            partial = Dataset()
            for element in ds:
                partial.add(element)
                boundaries.add(len(encode_dataset(partial, syntax)))
            for cut in range(1, len(data)):
                if cut not in boundaries:
                    self.assertIsNotNone(check(data[:cut], syntax), (syntax, cut))

    def test_undefined_lengths_and_fragments(self):
        name = explicit_element(0x00100010, b"PN", b"Doe^John")
        nested = undefined_sequence(0x00081032, item(name, undefined=True) + item(name))
        fragments = (struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF) + item(b"")
                     + item(b"\xff\xd8\xff\xd9") + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))
        self.assertIsNone(check(nested + fragments))
        self.assertIn("no delimiter", check(nested[:-8]))
        overrun = (struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF) + item(b"")
                   + struct.pack("<HHL", 0xFFFE, 0xE000, 100) + b"\xff\xd8" + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))
        self.assertEqual(check(overrun), "a pixel data fragment runs past the data set")
        # UN of undefined length: its items are in implicit VR (PS3.5 6.2.2)
        implicit_name = struct.pack("<HHL", 0x0010, 0x0010, 8) + b"Doe^John"
        self.assertIsNone(check(undefined_sequence(0x00091001, item(implicit_name), b"UN")))

    def test_the_audits_cases(self):
        head = explicit_element(0x00080016, b"UI", CT_IMAGE_STORAGE.encode() + b"\x00")
        name = struct.pack("<HH2sH", 0x0010, 0x0010, b"PN", 200) + b"Do"
        self.assertEqual(check(head + name), "element (0010,0010) declares 200 bytes, 2 remain")
        sequence = struct.pack("<HH2sHL", 0x0008, 0x1032, b"SQ", 0, 5000) + item(b"")
        self.assertIn("declares 5000 bytes", check(head + sequence))
        pixels = struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, 2 << 30) + bytes(10)
        self.assertEqual(check(head + pixels), f"element (7FE0,0010) declares {2 << 30} bytes, 10 remain")

    def test_nesting_ten_thousand_deep(self):
        """Sequences nested 10,000 deep are refused at MAX_DEPTH, without recursion."""
        body = explicit_element(0x00100010, b"PN", b"Doe")
        opening = struct.pack("<HH2sHL", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF) + struct.pack("<HHL", 0xFFFE, 0xE000,
                                                                                             0xFFFFFFFF)
        closing = struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
        deep = opening * 10000 + body + closing * 10000
        self.assertEqual(check(deep), f"sequences nested more than {MAX_DEPTH} deep")
        shallow = opening * 10 + body + closing * 10
        self.assertIsNone(check(shallow))


class NotWholeStoreTests(SynchronousTestCase):
    """The C-STORE SCP answers a data set that is not whole with C000 and keeps nothing."""

    def setUp(self):
        self.harness = StorageHarness(self)

    def test_cut_short(self):
        ds = make_dataset(sop="1.2.826.0.1.11.2", pixels=bytes(200))
        data = encode_dataset(ds, EXPLICIT_VR_LITTLE_ENDIAN)
        response = self.harness.store(data[:-10], CT_IMAGE_STORAGE, "1.2.826.0.1.11.2")
        self.assertEqual(response.Status, S.CANNOT_UNDERSTAND)
        self.assertTrue(response.ErrorComment.startswith("data set not whole: element (7FE0,0010) declares"))
        self.assertIsNone(self.harness.archive.index.lookup("1.2.826.0.1.11.2"))

    def test_large_object_checked_from_its_file(self):
        """An object streamed to its file (over the first chunk) is checked there too: 2 MB of pixel data
        declared 4 MB."""
        ds = make_dataset(sop="1.2.826.0.1.11.3", pixels=bytes(2 << 20))
        data = bytearray(encode_dataset(ds, EXPLICIT_VR_LITTLE_ENDIAN))
        at = data.rindex(b"\xe0\x7f\x10\x00OW")
        struct.pack_into("<L", data, at + 8, 4 << 20)
        response = self.harness.store(bytes(data), CT_IMAGE_STORAGE, "1.2.826.0.1.11.3")
        self.assertEqual(response.Status, S.CANNOT_UNDERSTAND)
        self.assertIsNone(self.harness.archive.index.lookup("1.2.826.0.1.11.3"))

    def test_deep_nesting_refused_without_a_traceback(self):
        ds = make_dataset(sop="1.2.826.0.1.11.4")
        head = encode_dataset(ds, EXPLICIT_VR_LITTLE_ENDIAN)
        opening = struct.pack("<HH2sHL", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF) + struct.pack("<HHL", 0xFFFE, 0xE000,
                                                                                             0xFFFFFFFF)
        closing = struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
        at = head.rindex(b"\xe0\x7f\x10\x00")  # the sequence goes before the pixel data, in tag order
        data = head[:at] + opening * 10000 + closing * 10000 + head[at:]
        response = self.harness.store(data, CT_IMAGE_STORAGE, "1.2.826.0.1.11.4")
        self.assertEqual(response.Status, S.CANNOT_UNDERSTAND)
        self.assertIn("nested more than", response.ErrorComment)
        self.assertEqual(self.flushLoggedErrors(), [])
