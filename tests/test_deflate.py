"""Deflated data sets (issue 9): inflated as a stream in bounded memory, within limits, never whole.

The audit stored 407 KB of Deflated Explicit VR Little Endian that inflated
to 419 MB with Success, and memory went from 72 MB to 873 MB.  Tested here:
the streaming inflater and its limits (dataset/deflate.py), its attributes
against pydicom's, the C-STORE SCP's answers (A700 past a limit, C000 for a
broken stream, Success for a good one, stored as received), and the
start-up check and ``verify`` reading stored deflated files.
"""

from __future__ import annotations

import io
import os
import tracemalloc
import zlib

from pydicom import dcmread
from twisted.trial.unittest import SynchronousTestCase

from appliance.archive.archive import read_object
from appliance.dataset.deflate import (
    DEFLATED,
    PREFIX,
    InflateLimits,
    NotInflatable,
    TooLarge,
    inflate,
    read_deflated,
)
from appliance.dataset.metadata import extract
from appliance.dicom import status as S
from appliance.dicom.uids import EXPLICIT_VR_LITTLE_ENDIAN

from .support_data import CT_IMAGE_STORAGE, TEST_FILES, encode_dataset, make_dataset
from .test_storage import StorageHarness


def deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


def zeros_deflated(size: int, head: bytes = b"") -> bytes:
    """``head`` then ``size`` zero bytes, deflated piece by piece (never ``size`` bytes in memory)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [packer.compress(head)]
    block = bytes(1 << 20)
    left = size
    while left:
        step = min(left, len(block))
        out.append(packer.compress(block[:step]))
        left -= step
    out.append(packer.flush())
    return b"".join(out)


def bomb_data_set(sop: str, pixel_bytes: int) -> bytes:
    """A valid image data set, Explicit VR Little Endian, whose Pixel Data is ``pixel_bytes`` zeros, deflated."""
    ds = make_dataset(sop=sop, pixels=b"\x00\x00" * 8)
    head = encode_dataset(ds, EXPLICIT_VR_LITTLE_ENDIAN)
    header_of_pixels = head[: head.rindex(b"\xe0\x7f\x10\x00")]
    pixel_header = b"\xe0\x7f\x10\x00OW\x00\x00" + pixel_bytes.to_bytes(4, "little")
    return zeros_deflated(pixel_bytes, header_of_pixels + pixel_header)


class InflateTests(SynchronousTestCase):
    """inflate(): the first bytes kept, every byte counted, the limits enforced as the stream goes."""

    def test_whole_stream(self):
        data = bytes(range(256)) * 4000
        prefix, size, compressed = inflate(io.BytesIO(deflate(data)), InflateLimits(), keep=1000)
        self.assertEqual((prefix, size, compressed), (data[:1000], len(data), len(deflate(data))))
        sink = io.BytesIO()
        inflate(io.BytesIO(deflate(data)), InflateLimits(), keep=0, sink=sink)
        self.assertEqual(sink.getvalue(), data)

    def test_max_size(self):
        with self.assertRaises(TooLarge) as raised:
            inflate(io.BytesIO(zeros_deflated(5 << 20)), InflateLimits(max_size=4 << 20, ratio_floor=1 << 40))
        self.assertIn("max_object_size", str(raised.exception))

    def test_ratio_past_its_floor(self):
        """A bomb stops at the ratio limit once past the floor; below the floor any ratio passes."""
        bomb = zeros_deflated(64 << 20)
        with self.assertRaises(TooLarge) as raised:
            inflate(io.BytesIO(bomb), InflateLimits(max_ratio=200, ratio_floor=16 << 20))
        self.assertIn("max_inflation_ratio", str(raised.exception))
        _, size, _ = inflate(io.BytesIO(zeros_deflated(8 << 20)), InflateLimits(max_ratio=200, ratio_floor=16 << 20))
        self.assertEqual(size, 8 << 20)

    def test_not_a_whole_stream(self):
        data = deflate(bytes(range(256)) * 4000)
        with self.assertRaises(NotInflatable):
            inflate(io.BytesIO(data[: len(data) // 2]), InflateLimits())
        with self.assertRaises(NotInflatable):
            inflate(io.BytesIO(b"\xff" * 1000), InflateLimits())
        with self.assertRaises(NotInflatable):
            inflate(io.BytesIO(b""), InflateLimits())

    def test_memory_stays_bounded(self):
        """Inflating 400 MB (the audit's bomb, within the limits here) holds a few pieces at most, not the data
        set: Python's peak allocation stays under 16 MB (pydicom's whole-data-set inflation took 800 MB)."""
        bomb = zeros_deflated(400 << 20)
        tracemalloc.start()
        try:
            baseline = tracemalloc.get_traced_memory()[0]
            _, size, _ = inflate(io.BytesIO(bomb), InflateLimits(max_ratio=100000))
            peak = tracemalloc.get_traced_memory()[1] - baseline
        finally:
            tracemalloc.stop()
        self.assertEqual(size, 400 << 20)
        self.assertLess(peak, 16 << 20)


class ReadDeflatedTests(SynchronousTestCase):
    """read_deflated and read_object give pydicom's attributes, reading the stream once (or spilling)."""

    def test_pydicoms_deflated_file(self):
        path = os.path.join(TEST_FILES, "image_dfl.dcm")
        meta, transfer_syntax, _ = read_object(path)
        self.assertEqual(transfer_syntax, DEFLATED)
        self.assertEqual(meta, extract(dcmread(path, stop_before_pixels=True)))

    def test_attributes_beyond_the_prefix(self):
        """Attributes after a private element larger than the in-memory prefix are read from a spill file."""
        ds = make_dataset(sop="1.2.826.0.1.9.1")
        ds.add_new(0x00090010, "LO", "TESTS")
        ds.add_new(0x00091001, "OB", bytes(PREFIX + 1024))
        ds.ImageComments = "after the big element"  # (0020,4000): after group 0009
        data = encode_dataset(ds, EXPLICIT_VR_LITTLE_ENDIAN)
        meta, size = read_deflated(io.BytesIO(deflate(data)), 0, InflateLimits(), self.mktemp_dir())
        self.assertEqual(size, len(data))
        self.assertEqual(meta, extract(ds))
        self.assertIn("after the big element", meta.instance_json)

    def mktemp_dir(self) -> str:
        path = self.mktemp()
        os.makedirs(path)
        return path


class DeflatedStoreTests(SynchronousTestCase):
    """C-STORE in Deflated Explicit VR Little Endian through the Disk-Server."""

    def setUp(self):
        self.harness = StorageHarness(self, inflate_limits=InflateLimits(max_size=64 << 20, max_ratio=200,
                                                                          ratio_floor=16 << 20))

    def leftovers(self):
        return self.harness.archive.store.leftovers()

    def test_good_deflated_object_stored_as_received(self):
        ds = make_dataset(sop="1.2.826.0.1.9.2", pixels=bytes(range(256)) * 64)
        sent = deflate(encode_dataset(ds, EXPLICIT_VR_LITTLE_ENDIAN))
        response = self.harness.store(sent, CT_IMAGE_STORAGE, "1.2.826.0.1.9.2", DEFLATED)
        self.assertEqual(response.Status, S.SUCCESS)
        row = self.harness.archive.index.lookup("1.2.826.0.1.9.2")
        self.assertEqual(row.transfer_syntax, DEFLATED)
        with open(self.harness.archive.store.absolute(row.path), "rb") as handle:
            self.assertTrue(handle.read().endswith(sent))

    def test_bomb_refused_with_a700(self):
        """The audit's bomb, smaller: 100 MB of zeros in ~100 KB: A700 naming the limit, nothing kept."""
        response = self.harness.store(bomb_data_set("1.2.826.0.1.9.3", 100 << 20), CT_IMAGE_STORAGE,
                                      "1.2.826.0.1.9.3", DEFLATED)
        self.assertEqual(response.Status, S.OUT_OF_RESOURCES)
        self.assertIn("max_inflation_ratio", response.ErrorComment)
        self.assertIsNone(self.harness.archive.index.lookup("1.2.826.0.1.9.3"))
        self.assertEqual(self.leftovers(), [])

    def test_past_max_object_size_refused_with_a700(self):
        """Within the ratio but past max_object_size (64 MiB here) when inflated: A700."""
        harness = StorageHarness(self, inflate_limits=InflateLimits(max_size=32 << 20, max_ratio=100000))
        response = harness.store(bomb_data_set("1.2.826.0.1.9.4", 40 << 20), CT_IMAGE_STORAGE, "1.2.826.0.1.9.4",
                                 DEFLATED)
        self.assertEqual(response.Status, S.OUT_OF_RESOURCES)
        self.assertIn("max_object_size", response.ErrorComment)

    def test_uncompressed_data_set_past_max_object_size(self):
        """max_object_size bounds every received data set: the rest is drained and the C-STORE answered A700;
        the association goes on."""
        harness = StorageHarness(self, inflate_limits=InflateLimits(max_size=1 << 20))
        big = make_dataset(sop="1.2.826.0.1.9.5", pixels=bytes(2 << 20))
        response = harness.store(encode_dataset(big, EXPLICIT_VR_LITTLE_ENDIAN), CT_IMAGE_STORAGE, "1.2.826.0.1.9.5")
        self.assertEqual(response.Status, S.OUT_OF_RESOURCES)
        self.assertIn("max_object_size", response.ErrorComment)
        small = make_dataset(sop="1.2.826.0.1.9.6")
        response = harness.store(encode_dataset(small, EXPLICIT_VR_LITTLE_ENDIAN), CT_IMAGE_STORAGE,
                                 "1.2.826.0.1.9.6", protocol=True)
        self.assertEqual(response.Status, S.SUCCESS)

    def test_broken_deflate_stream_refused_with_c000(self):
        ds = make_dataset(sop="1.2.826.0.1.9.7")
        sent = deflate(encode_dataset(ds, EXPLICIT_VR_LITTLE_ENDIAN))
        response = self.harness.store(sent[: len(sent) // 2], CT_IMAGE_STORAGE, "1.2.826.0.1.9.7", DEFLATED)
        self.assertEqual(response.Status, S.CANNOT_UNDERSTAND)
        self.assertIn("deflate", response.ErrorComment)
        self.assertEqual(self.leftovers(), [])


class StoredDeflatedTests(SynchronousTestCase):
    """Stored deflated objects are read as a stream by the start-up check and by ``appliance-archive verify``."""

    def setUp(self):
        self.harness = StorageHarness(self, inflate_limits=InflateLimits(max_size=64 << 20))
        self.archive = self.harness.archive
        ds = make_dataset(sop="1.2.826.0.1.9.10", pixels=bytes(range(256)) * 64)
        sent = deflate(encode_dataset(ds, EXPLICIT_VR_LITTLE_ENDIAN))
        self.assertEqual(self.harness.store(sent, CT_IMAGE_STORAGE, "1.2.826.0.1.9.10", DEFLATED).Status, S.SUCCESS)

    def reconcile(self):
        import time

        from appliance.archive.archive import _reconcile

        return _reconcile(self.archive.store, self.archive.index_path, time.time() + 60, self.archive.inflate_limits)

    def test_lost_row_indexed_again(self):
        self.archive.index.delete_instance("1.2.826.0.1.9.10")
        result = self.reconcile()
        self.assertEqual((len(result.reindexed), result.quarantined), (1, []))
        self.assertEqual(self.archive.index.lookup("1.2.826.0.1.9.10").transfer_syntax, DEFLATED)

    def test_stored_bomb_quarantined_not_inflated(self):
        """A deflated file past the limits under objects/ (never acknowledged: no row) is moved aside."""
        from appliance.archive.store import part10_header

        bomb = bomb_data_set("1.2.826.0.1.9.11", 200 << 20)
        path = os.path.join(self.archive.store.objects, "bomb.dcm")
        with open(path, "wb") as handle:
            handle.write(part10_header(CT_IMAGE_STORAGE, "1.2.826.0.1.9.11", DEFLATED, "1.2.3", None, "X") + bomb)
        result = self.reconcile()
        self.assertEqual(len(result.quarantined), 1)
        self.assertIsNone(self.archive.index.lookup("1.2.826.0.1.9.11"))

    def test_verify(self):
        from appliance.cli.archive import _verify

        out = io.StringIO()
        self.assertEqual(_verify(self.archive, out), 0, out.getvalue())
        self.assertIn("verified 1 instances: 0 problems", out.getvalue())
