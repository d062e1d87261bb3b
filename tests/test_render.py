"""appliance.dataset.render: one frame as a PNG, compared with images computed here.

Every expected image is made in this module from pydicom's own decoding of
its test files (``pixel_array``) with PS3.3's formulas written out below,
never with render.py's helpers; a frame may differ by 1 for rounding.  A
file whose compressed syntax pydicom cannot decode on this machine is
skipped, after checking that render_png answers 415 for it.
"""

from __future__ import annotations

import io
import os
import random
import tracemalloc
import zlib

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from appliance.dataset import render
from appliance.dataset.render import NotRenderable, decoders, render_png

from .support_data import TEST_FILES, dataset_bytes, encode_dataset, make_dataset

IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
DEFLATED = "1.2.840.10008.1.2.1.99"
BIG_ENDIAN = "1.2.840.10008.1.2.2"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
RLE = "1.2.840.10008.1.2.5"
PALETTES = os.path.join(os.path.dirname(pydicom.__file__), "data", "palettes")
PYDICOM_3 = int(pydicom.__version__.split(".")[0]) >= 3

# PS3.3 C.7.6.3.1.2: YBR_FULL from RGB; its inverse gives RGB back.
YBR_FULL_FROM_RGB = np.array([[0.2990, 0.5870, 0.1140],
                              [-0.1687, -0.3313, 0.5000],
                              [0.5000, -0.4187, -0.0813]])


# --- the expected images, written out -----------------------------------------------------------------------


def linear_window(x, center, width):
    """PS3.3 C.11.2.1.2.1 to 0..255, piece by piece as the standard writes it."""
    x = np.asarray(x, dtype=float)
    y = np.empty(x.shape)
    below = x <= center - 0.5 - (width - 1) / 2
    above = x > center - 0.5 + (width - 1) / 2
    inside = ~(below | above)
    y[below] = 0
    y[above] = 255
    y[inside] = ((x[inside] - (center - 0.5)) / (width - 1) + 0.5) * 255
    return y


def min_max(x):
    x = np.asarray(x, dtype=float)
    low, high = x.min(), x.max()
    return np.zeros(x.shape) if high == low else (x - low) / (high - low) * 255


def first(value):
    return float(value[0]) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else float(value)


def expected_gray(ds, stored, window=None):
    """Modality (rescale) then VOI (``window``, the data set's first window, or min-max), inverted for
    MONOCHROME1, rounded."""
    x = stored.astype(float) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    if window is not None:
        y = linear_window(x, *window)
    elif "WindowCenter" in ds:
        y = linear_window(x, first(ds.WindowCenter), first(ds.WindowWidth))
    else:
        y = min_max(x)
    y = np.rint(y)
    return 255 - y if ds.PhotometricInterpretation == "MONOCHROME1" else y


def rgb_from_ybr_full(ybr):
    """YBR_FULL (8 bits) to RGB by inverting PS3.3's YBR_FULL equations."""
    centered = ybr.astype(float) - np.array([0, 128, 128])
    return np.clip(np.rint(centered @ np.linalg.inv(YBR_FULL_FROM_RGB).T), 0, 255)


def scaled_to_8_bits(x, bits):
    return np.rint(np.asarray(x, dtype=float) * 255 / (2 ** bits - 1))


def decode_png(testcase, png: bytes):
    """(the PNG's pixels, its mode); it is a PNG."""
    testcase.assertEqual(png[:8], b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(png))
    testcase.assertEqual(image.format, "PNG")
    return np.asarray(image).astype(int), image.mode


def pydicom_file(name):
    """(dcmread data set, transfer syntax, data set bytes) of one of pydicom's test files, or skip."""
    path = os.path.join(TEST_FILES, name)
    if not os.path.exists(path):
        raise SkipTest(f"{name} is not among pydicom {pydicom.__version__}'s test files")
    ds = pydicom.dcmread(path)
    return ds, str(ds.file_meta.TransferSyntaxUID), dataset_bytes(path)


class RenderCase(SynchronousTestCase):

    def assertClose(self, actual, expected, tolerance=1):
        expected = np.asarray(expected).astype(int)
        self.assertEqual(actual.shape, expected.shape)
        worst = int(np.abs(actual - expected).max())
        self.assertLessEqual(worst, tolerance, f"differs by {worst}")

    def assertNotRenderable(self, status, data, syntax, *args, **kwargs):
        error = self.assertRaises(NotRenderable, render_png, data, syntax, *args, **kwargs)
        self.assertEqual(error.status, status, str(error))
        self.assertTrue(str(error) and "\n" not in str(error))
        return error

    def pixel_array(self, ds, syntax, data, frame=0):
        """pydicom's own decoding of frame ``frame``; where pydicom cannot decode it here, render_png must
        answer 415 naming the syntax, and the test is skipped."""
        try:
            array = ds.pixel_array
        except Exception as error:
            refused = self.assertNotRenderable(415, data, syntax, frame)
            self.assertIn(syntax, str(refused))
            self.assertIn(UID(syntax).name, str(refused))
            reason = " ".join(str(error).split())[:160]
            raise SkipTest(f"{UID(syntax).name}: pydicom cannot decode it on this machine ({reason}); "
                           f"render_png answered 415")
        frames = int(ds.get("NumberOfFrames") or 1)
        return array[frame] if frames > 1 else array

    def check_gray(self, name, frame=0, window=None, tolerance=1):
        ds, syntax, data = pydicom_file(name)
        stored = self.pixel_array(ds, syntax, data, frame)
        pixels, mode = decode_png(self, render_png(data, syntax, frame, window))
        self.assertEqual(mode, "L")
        self.assertClose(pixels, expected_gray(ds, stored, window), tolerance)
        return pixels

    def check_rgb(self, name, frame=0):
        ds, syntax, data = pydicom_file(name)
        stored = self.pixel_array(ds, syntax, data, frame)
        pixels, mode = decode_png(self, render_png(data, syntax, frame))
        self.assertEqual(mode, "RGB")
        self.assertClose(pixels, scaled_to_8_bits(stored, ds.BitsStored))
        return pixels


class DecodersTests(SynchronousTestCase):

    def test_no_twisted(self):
        """appliance.dataset does no network I/O: importing render.py imports no twisted."""
        import subprocess
        import sys

        code = ("import sys, appliance.dataset.render; "
                "print(sorted(name for name in sys.modules if name.split('.')[0] == 'twisted'))")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                                timeout=60, env=dict(os.environ, PYTHONPATH=root), check=False)
        self.assertEqual((result.returncode, result.stdout.strip()), (0, "[]"), result.stderr)

    def test_uncompressed_and_rle_always(self):
        """The uncompressed syntaxes and RLE need nothing but numpy."""
        found = decoders()
        for syntax in (IMPLICIT, EXPLICIT, DEFLATED, BIG_ENDIAN, RLE):
            self.assertIs(found[syntax], True, syntax)

    def test_every_syntax_pydicom_knows(self):
        """One boolean per transfer syntax pydicom knows, video ones among them (no decoder)."""
        from pydicom.uid import AllTransferSyntaxes

        found = decoders()
        self.assertEqual(set(found), {str(uid) for uid in AllTransferSyntaxes})
        self.assertTrue(all(isinstance(value, bool) for value in found.values()))
        self.assertIs(found["1.2.840.10008.1.2.4.100"], False)

    def test_jpeg_baseline_with_pillow(self):
        """Pillow (a dependency) decodes JPEG baseline on both pydicom versions."""
        self.assertIs(decoders()[JPEG_BASELINE], True)


class GrayTests(RenderCase):

    def test_mr_window_from_data_set(self):
        """MONOCHROME2, 16-bit signed, the data set's Window Center 600 / Width 1600, in every encoding."""
        reference = self.check_gray("MR_small.dcm")
        for name in ("MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm", "MR_small_RLE.dcm",
                     "MR_small_padded.dcm", "MR_small_jp2klossless.dcm"):
            self.assertClose(self.check_gray(name), reference, 0)

    def test_window_asked_for_overrides(self):
        """A window asked for replaces the data set's."""
        pixels = self.check_gray("MR_small.dcm", window=(1000.0, 400.0))
        self.assertTrue((pixels == 0).any() and (pixels == 255).any() and ((pixels > 0) & (pixels < 255)).any())

    def test_window_width_one_is_a_step(self):
        """Width 1: black at or below center - 0.5, white above (C.11.2.1.2.1)."""
        ds, syntax, data = pydicom_file("MR_small.dcm")
        pixels, _ = decode_png(self, render_png(data, syntax, window=(500, 1)))
        self.assertClose(pixels, np.where(ds.pixel_array.astype(float) > 499.5, 255, 0), 0)

    def test_ct_rescale_then_window(self):
        """CT: Rescale Intercept -1024 applied before the window (a window of 40/400 in HU)."""
        self.check_gray("CT_small.dcm", window=(40, 400))
        self.check_gray("CT_small.dcm", window=(-1000, 400))

    def test_ct_min_max_without_window(self):
        """No window in the data set: its frame's minimum to maximum."""
        pixels = self.check_gray("CT_small.dcm")
        self.assertEqual((pixels.min(), pixels.max()), (0, 255))

    def test_jpeg_2000_rescale_and_window(self):
        """JPEG 2000, 14 of 16 bits stored, Rescale Intercept -1024 and the data set's window 40/100."""
        self.check_gray("693_J2KI.dcm")
        self.check_gray("J2K_pixelrep_mismatch.dcm")
        self.check_gray("JPEG2000.dcm")

    def test_eight_bit_deflated(self):
        """MONOCHROME2, 8-bit unsigned, from a deflated data set."""
        self.check_gray("image_dfl.dcm")

    def test_sixteen_bit_unsigned_twelve_stored(self):
        """16-bit unsigned, 12 bits stored, the first of two windows (a pydicom 3 file)."""
        self.check_gray("examples_overlay.dcm")

    def test_one_bit(self):
        """Bits Allocated 1: two values, black and white."""
        pixels = self.check_gray("liver_1frame.dcm")
        self.assertEqual(set(np.unique(pixels)), {0, 255})
        self.check_gray("liver_expb_1frame.dcm")

    def test_thirty_two_bit_multi_frame(self):
        """15 frames of 32-bit dose, native and RLE: each frame its own min-max."""
        for frame in (0, 7, 14):
            self.check_gray("rtdose.dcm", frame)
            self.check_gray("rtdose_rle.dcm", frame)
            self.check_gray("rtdose_expb.dcm", frame)

    def test_jpeg_ls_or_415(self):
        """JPEG-LS: rendered where a decoder is installed, else 415 naming the syntax and what is missing."""
        if not decoders()[JPEG_LS_LOSSLESS]:
            _, syntax, data = pydicom_file("MR_small_jpeg_ls_lossless.dcm")
            error = self.assertNotRenderable(415, data, syntax)
            self.assertIn("no decoder for it on this machine (pydicom says: ", str(error))
        self.check_gray("MR_small_jpeg_ls_lossless.dcm")

    def test_jpeg_extended_12_bit(self):
        """JPEG Extended 12-bit: Pillow cannot (415 with pydicom's reason), other decoders can."""
        self.check_gray("JPGExtended.dcm")


def mr_dataset(**changes):
    """MR_small.dcm's data set, changed."""
    ds = pydicom.dcmread(os.path.join(TEST_FILES, "MR_small.dcm"))
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


class SyntheticGrayTests(RenderCase):

    def test_monochrome1_inverted(self):
        """MONOCHROME1: the minimum is white."""
        ds = mr_dataset(PhotometricInterpretation="MONOCHROME1")
        pixels, mode = decode_png(self, render_png(encode_dataset(ds, EXPLICIT), EXPLICIT))
        self.assertEqual(mode, "L")
        self.assertClose(pixels, 255 - expected_gray(mr_dataset(), ds.pixel_array))
        self.assertClose(pixels, expected_gray(ds, ds.pixel_array))
        del ds.WindowCenter, ds.WindowWidth
        pixels, _ = decode_png(self, render_png(encode_dataset(ds, IMPLICIT), IMPLICIT))
        self.assertClose(pixels, 255 - np.rint(min_max(ds.pixel_array)))

    def test_unused_high_bits_dropped(self):
        """16 bits allocated, 12 stored: what the high 4 bits hold (an overlay) is not a value."""
        values = np.arange(64, dtype=np.uint16) * 64  # 0 .. 4032, twelve bits
        ds = make_dataset(pixels=(values | 0xF000).astype("<u2").tobytes())
        ds.BitsStored, ds.HighBit = 12, 11
        pixels, _ = decode_png(self, render_png(encode_dataset(ds, EXPLICIT), EXPLICIT))
        self.assertClose(pixels[0], np.rint(min_max(values)))

    def test_signed_twelve_bits_sign_extended(self):
        """Pixel Representation 1, 12 of 16 bits: bit 11 is the sign, the bits above it do not count."""
        values = np.array([-2048, -1000, -1, 0, 1, 1000, 2047, 0], dtype=np.int16)
        ds = make_dataset(pixels=((values.astype(np.int32) & 0x0FFF) | 0x5000).astype("<u2").tobytes())
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 1
        pixels, _ = decode_png(self, render_png(encode_dataset(ds, EXPLICIT), EXPLICIT, window=(0, 2048)))
        self.assertClose(pixels[0], np.rint(linear_window(values, 0, 2048)))

    def test_eight_bit_signed(self):
        values = np.array([-128, -64, 0, 64, 127, 0, 0, 0], dtype=np.int8)
        ds = make_dataset(pixels=values.tobytes(), bits_allocated=8)
        ds.PixelRepresentation = 1
        pixels, _ = decode_png(self, render_png(encode_dataset(ds, EXPLICIT), EXPLICIT))
        self.assertClose(pixels[0], np.rint(min_max(values)))

    def test_voi_lut_function(self):
        """The data set's VOI LUT Function: LINEAR_EXACT and SIGMOID (C.11.2.1.3)."""
        ds = mr_dataset(WindowCenter=700, WindowWidth=900)
        x = ds.pixel_array.astype(float)
        ds.VOILUTFunction = "LINEAR_EXACT"
        pixels, _ = decode_png(self, render_png(encode_dataset(ds, EXPLICIT), EXPLICIT))
        exact = np.where(x <= 700 - 450, 0, np.where(x > 700 + 450, 255, ((x - 700) / 900 + 0.5) * 255))
        self.assertClose(pixels, np.rint(exact))
        ds.VOILUTFunction = "SIGMOID"
        pixels, _ = decode_png(self, render_png(encode_dataset(ds, EXPLICIT), EXPLICIT))
        self.assertClose(pixels, np.rint(255 / (1 + np.exp(-4 * (x - 700) / 900))))

    def test_voi_lut_sequence(self):
        """No window, a VOI LUT Sequence: its table (12-bit entries) scaled to 8 bits."""
        ds = mr_dataset(WindowCenter=None, WindowWidth=None)
        table = np.random.RandomState(7).randint(0, 4096, size=2000).astype(np.uint16)
        item = Dataset()
        item.LUTDescriptor = [2000, 100, 12]
        item["LUTDescriptor"].VR = "US"
        item.LUTData = table.astype("<u2").tobytes()
        item["LUTData"].VR = "OW"
        ds.VOILUTSequence = Sequence([item])
        x = ds.pixel_array.astype(int)
        expected = np.rint(table[np.clip(x - 100, 0, 1999)].astype(float) * 255 / 4095)
        for syntax in (EXPLICIT, IMPLICIT):
            pixels, _ = decode_png(self, render_png(encode_dataset(ds, syntax), syntax))
            self.assertClose(pixels, expected)
        pixels, _ = decode_png(self, render_png(encode_dataset(ds, EXPLICIT), EXPLICIT, window=(600, 1600)))
        self.assertClose(pixels, np.rint(linear_window(x, 600, 1600)))  # a window asked for comes first

    def test_enhanced_multi_frame_functional_groups(self):
        """Each frame's own Pixel Value Transformation and Frame VOI LUT (per-frame, else shared)."""
        rows = cols = 4
        frames = np.arange(3 * rows * cols, dtype=np.uint16).reshape(3, rows, cols) * 10
        ds = make_dataset(pixels=frames.astype("<u2").tobytes())
        ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, 3
        per_frame = []
        for slope, intercept, center in ((1, 0, 50), (2, -100, 300), (0.5, 7, None)):
            group = Dataset()
            transform = Dataset()
            transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = slope, intercept, "US"
            group.PixelValueTransformationSequence = Sequence([transform])
            if center is not None:
                voi = Dataset()
                voi.WindowCenter, voi.WindowWidth = center, 200
                group.FrameVOILUTSequence = Sequence([voi])
            per_frame.append(group)
        shared = Dataset()
        voi = Dataset()
        voi.WindowCenter, voi.WindowWidth = 100, 100
        shared.FrameVOILUTSequence = Sequence([voi])
        ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
        ds.SharedFunctionalGroupsSequence = Sequence([shared])
        data = encode_dataset(ds, EXPLICIT)
        for frame, (slope, intercept, center, width) in enumerate(((1, 0, 50, 200), (2, -100, 300, 200),
                                                                   (0.5, 7, 100, 100))):
            pixels, _ = decode_png(self, render_png(data, EXPLICIT, frame))
            x = frames[frame].astype(float) * slope + intercept
            self.assertClose(pixels, np.rint(linear_window(x, center, width)))


def palette_dataset(indices, descriptor, red, green, blue, bits_allocated=8):
    ds = make_dataset(pixels=indices.tobytes(), bits_allocated=bits_allocated)
    ds.Rows, ds.Columns = indices.shape
    ds.PhotometricInterpretation = "PALETTE COLOR"
    for color, table in (("Red", red), ("Green", green), ("Blue", blue)):
        setattr(ds, f"{color}PaletteColorLookupTableDescriptor", descriptor)
        setattr(ds, f"{color}PaletteColorLookupTableData", table.tobytes())
        ds[f"{color}PaletteColorLookupTableData"].VR = "OW"
    return ds


class ColorTests(RenderCase):

    def test_rgb(self):
        """RGB as it is: planar configuration 1 in big endian, odd sizes, RLE, JPEG without color transform,
        JPEG 2000."""
        for name in ("ExplVR_BigEnd.dcm", "SC_rgb_small_odd.dcm", "SC_rgb_small_odd_big_endian.dcm",
                     "SC_rgb_rle.dcm", "SC_rgb_jpeg_dcmd.dcm", "SC_rgb_dcmtk_+eb+cr.dcm", "SC_rgb_gdcm_KY.dcm",
                     "SC_jpeg_no_color_transform.dcm", "examples_rgb_color.dcm"):
            try:
                self.check_rgb(name)
            except SkipTest:
                continue

    def test_rgb_multi_frame(self):
        for frame in (0, 1):
            self.check_rgb("SC_rgb_rle_2frame.dcm", frame)

    def test_rgb_16_and_32_bit_scaled(self):
        """More than 8 bits a sample: value * 255 / (2**BitsStored - 1)."""
        for frame in (0, 1):
            self.check_rgb("SC_rgb_rle_16bit_2frame.dcm", frame)
            self.check_rgb("SC_rgb_rle_32bit_2frame.dcm", frame)
        self.check_rgb("SC_rgb_rle_16bit.dcm")

    def test_ybr_to_rgb(self):
        """YBR_FULL and YBR_FULL_422 (JPEG and native): RGB computed here from the YBR samples decoded by
        pydicom (pydicom 3 converts unless asked for raw; pydicom 2 never does)."""
        for name in ("SC_rgb_dcmtk_+eb+cy+n1.dcm", "SC_rgb_dcmtk_+eb+cy+n2.dcm", "SC_rgb_dcmtk_+eb+cy+s4.dcm",
                     "SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm", "SC_rgb_dcmtk_+eb+cy+s2.dcm",
                     "SC_ybr_full_422_uncompressed.dcm", "SC_rgb_small_odd_jpeg.dcm"):
            ds, syntax, data = pydicom_file(name)
            self.assertIn(ds.PhotometricInterpretation, ("YBR_FULL", "YBR_FULL_422"))
            pixels, mode = decode_png(self, render_png(data, syntax))
            self.assertEqual(mode, "RGB")
            self.assertClose(pixels, rgb_from_ybr_full(self.raw_ybr(ds, syntax, data)))

    def raw_ybr(self, ds, syntax, data, frame=0):
        if PYDICOM_3:
            from pydicom.pixels import pixel_array

            return pixel_array(ds, index=frame, raw=True)
        return self.pixel_array(ds, syntax, data, frame)

    def test_ybr_looks_like_the_lossless_original(self):
        """The same picture as its lossless RGB original, whichever pydicom decoded it (the JPEG loss aside)."""
        original = pydicom_file("SC_rgb_rle.dcm")[0].pixel_array.astype(int)
        for name in ("SC_rgb_dcmtk_+eb+cy+n1.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm", "SC_rgb_jpeg_dcmtk.dcm",
                     "SC_ybr_full_422_uncompressed.dcm", "SC_rgb_dcmtk_+eb+cr.dcm"):
            _, syntax, data = pydicom_file(name)
            pixels, _ = decode_png(self, render_png(data, syntax))
            self.assertLess(np.abs(pixels - original).mean(), 4, name)

    def test_ybr_multi_frame_jpeg(self):
        """30 frames of YBR_FULL_422 JPEG (a pydicom 3 file): the last one."""
        ds, syntax, data = pydicom_file("examples_ybr_color.dcm")
        for frame in (0, 29):
            pixels, _ = decode_png(self, render_png(data, syntax, frame))
            self.assertClose(pixels, rgb_from_ybr_full(self.raw_ybr(ds, syntax, data, frame)))

    def test_jpeg_2000_ybr_rct(self):
        """YBR_RCT: the JPEG 2000 decoder reverses the component transform; RGB as decoded (pydicom 3 file)."""
        ds, syntax, data = pydicom_file("examples_jpeg2k.dcm")
        stored = self.pixel_array(ds, syntax, data)
        pixels, _ = decode_png(self, render_png(data, syntax))
        self.assertClose(pixels, stored)

    def test_window_ignored_for_color(self):
        _, syntax, data = pydicom_file("SC_rgb_rle.dcm")
        self.assertEqual(render_png(data, syntax, window=(10, 20)), render_png(data, syntax))

    def test_palette_file(self):
        """PALETTE COLOR with 16-bit entries (a pydicom 3 file): its table, scaled to 8 bits."""
        ds, syntax, data = pydicom_file("examples_palette.dcm")
        indices = self.pixel_array(ds, syntax, data)
        self.assertEqual(list(ds.RedPaletteColorLookupTableDescriptor), [256, 0, 16])
        tables = [np.frombuffer(ds[f"{color}PaletteColorLookupTableData"].value, "<u2")
                  for color in ("Red", "Green", "Blue")]
        pixels, mode = decode_png(self, render_png(data, syntax))
        self.assertEqual(mode, "RGB")
        self.assertClose(pixels, np.stack([scaled_to_8_bits(table[indices], 16) for table in tables], -1))

    def test_palette_sixteen_bit_entries_first_mapped(self):
        """A 16-bit palette whose first entry maps value 10: lower values take the first entry, higher
        ones the last."""
        rng = np.random.RandomState(3)
        indices = rng.randint(0, 256, size=(6, 8)).astype(np.uint8)
        red, green, blue = (rng.randint(0, 65536, size=100).astype("<u2") for _ in range(3))
        ds = palette_dataset(indices, [100, 10, 16], red, green, blue)
        position = np.clip(indices.astype(int) - 10, 0, 99)
        expected = np.stack([scaled_to_8_bits(table[position], 16) for table in (red, green, blue)], -1)
        for syntax in (EXPLICIT, IMPLICIT):
            pixels, mode = decode_png(self, render_png(encode_dataset(ds, syntax), syntax))
            self.assertEqual(mode, "RGB")
            self.assertClose(pixels, expected)

    def test_palette_eight_bit_entries(self):
        """pydicom's Hot Iron palette: 8-bit entries packed in OW."""
        source = pydicom.dcmread(os.path.join(PALETTES, "hotiron.dcm"))
        self.assertEqual(list(source.RedPaletteColorLookupTableDescriptor), [256, 0, 8])
        tables = [np.frombuffer(source[f"{color}PaletteColorLookupTableData"].value, np.uint8)
                  for color in ("Red", "Green", "Blue")]
        indices = np.arange(256, dtype=np.uint8).reshape(16, 16)
        ds = palette_dataset(indices, [256, 0, 8], *tables)
        pixels, _ = decode_png(self, render_png(encode_dataset(ds, EXPLICIT), EXPLICIT))
        self.assertClose(pixels, np.stack([table[indices] for table in tables], -1), 0)


class RequestTests(RenderCase):

    def setUp(self):
        _, self.syntax, self.data = pydicom_file("MR_small.dcm")

    def test_frame_out_of_range(self):
        for frame in (-1, 1, 1000):
            error = self.assertNotRenderable(404, self.data, self.syntax, frame)
            self.assertIn(f"no frame {frame}", str(error))
        _, syntax, data = pydicom_file("rtdose.dcm")
        self.assertNotRenderable(404, data, syntax, 15)
        self.assertNotRenderable(404, data, syntax, -1)
        decode_png(self, render_png(data, syntax, 14))
        _, syntax, data = pydicom_file("SC_rgb_rle_2frame.dcm")
        self.assertNotRenderable(404, data, syntax, 2)

    def test_frame_not_an_integer(self):
        for frame in ("0", 0.5, None, True):
            self.assertNotRenderable(400, self.data, self.syntax, frame)
        decode_png(self, render_png(self.data, self.syntax, np.int64(0)))

    def test_bad_window(self):
        for window in ((40, 0), (40, 0.5), (40, -10), (float("nan"), 100), (40, float("inf")), ("a", 100),
                       (40,), (1, 2, 3), "40,400", 400):
            error = self.assertNotRenderable(400, self.data, self.syntax, 0, window)
            self.assertIn("window", str(error))
        decode_png(self, render_png(self.data, self.syntax, 0, ("40", "400")))


class RefusalTests(RenderCase):

    def test_no_pixel_data(self):
        _, syntax, data = pydicom_file("rtplan.dcm")
        self.assertIn("no Pixel Data", str(self.assertNotRenderable(404, data, syntax)))
        ds = make_dataset()
        del ds.PixelData
        self.assertNotRenderable(404, encode_dataset(ds, EXPLICIT), EXPLICIT)
        ds.PixelData = b""
        self.assertNotRenderable(404, encode_dataset(ds, EXPLICIT), EXPLICIT)

    def test_float_pixel_data(self):
        ds = make_dataset()
        del ds.PixelData
        ds.FloatPixelData = np.zeros(16, "<f4").tobytes()
        self.assertNotRenderable(415, encode_dataset(ds, EXPLICIT), EXPLICIT)

    def test_unknown_transfer_syntax(self):
        for syntax in ("1.2.3.4", "", None, "1.2.840.10008.1.2.4.100\x00"):
            self.assertNotRenderable(415, encode_dataset(make_dataset(), EXPLICIT), syntax)

    def test_video_syntax_no_decoder(self):
        """A syntax pydicom knows but cannot decode: 415 naming it and pydicom's words."""
        ds = make_dataset()
        ds.PixelData = pydicom.encaps.encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
        ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
        syntax = "1.2.840.10008.1.2.4.100"
        error = self.assertNotRenderable(415, encode_dataset(ds, EXPLICIT), syntax)
        self.assertIn("cannot decode MPEG2 Main Profile / Main Level (1.2.840.10008.1.2.4.100): no decoder", str(error))

    def test_corrupt_jpeg(self):
        """A JPEG stream that is not one: the decoders fail, 415 with pydicom's words."""
        ds = pydicom_file("SC_rgb_dcmtk_+eb+cr.dcm")[0]
        ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8\xff\xe0" + bytes(200) + b"\xff\xd9"])
        error = self.assertNotRenderable(415, encode_dataset(ds, EXPLICIT), JPEG_BASELINE)
        self.assertIn("the decoders on this machine failed on it (pydicom says: ", str(error))

    def test_unrendered_photometric_interpretation(self):
        ds = make_dataset()
        ds.PhotometricInterpretation = "HSV"
        self.assertIn("HSV", str(self.assertNotRenderable(415, encode_dataset(ds, EXPLICIT), EXPLICIT)))

    def test_missing_or_contradictory_attributes(self):
        for keyword in ("Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation",
                        "SamplesPerPixel", "PhotometricInterpretation"):
            ds = make_dataset()
            delattr(ds, keyword)
            error = self.assertNotRenderable(422, encode_dataset(ds, EXPLICIT), EXPLICIT)
            self.assertIn(keyword, str(error))
        for keyword, value in (("SamplesPerPixel", 3), ("BitsAllocated", 12), ("BitsStored", 17),
                               ("PixelRepresentation", 2), ("Rows", 0), ("NumberOfFrames", "-1"),
                               ("PhotometricInterpretation", "RGB")):
            ds = make_dataset()
            setattr(ds, keyword, value)
            error = self.assertNotRenderable(422, encode_dataset(ds, EXPLICIT), EXPLICIT)
            self.assertIn(keyword, str(error))
        ds = make_dataset()
        ds.NumberOfFrames = "17"
        data = encode_dataset(ds, EXPLICIT).replace(b"\x28\x00\x08\x00IS\x02\x0017", b"\x28\x00\x08\x00IS\x02\x001A")
        self.assertIn(b"1A", data)
        self.assertIn("NumberOfFrames", str(self.assertNotRenderable(422, data, EXPLICIT)))
        _, syntax, data = pydicom_file("badVR.dcm")
        self.assertNotRenderable(422, data, syntax)
        _, syntax, data = pydicom_file("nested_priv_SQ.dcm")
        self.assertNotRenderable(422, data, syntax)

    def test_malformed_values(self):
        """Values pydicom cannot read or that make no image: 422 naming what is wrong."""
        data = encode_dataset(make_dataset(), EXPLICIT)
        rows = b"\x28\x00\x10\x00US\x02\x00\x01\x00"
        self.assertIn(rows, data)
        error = self.assertNotRenderable(422, data.replace(rows, b"\x28\x00\x10\x00US\x03\x00\x01\x00\x00"), EXPLICIT)
        self.assertIn("(0028,0010) Rows cannot be read", str(error))
        error = self.assertNotRenderable(422, data.replace(rows, b"\x28\x00\x10\x00US\x04\x00\x01\x00\x02\x00"),
                                         EXPLICIT)
        self.assertIn("Rows is not one integer", str(error))
        ds = make_dataset()
        ds.RescaleSlope, ds.RescaleIntercept = 1e308, 1e308
        self.assertIn("Rescale", str(self.assertNotRenderable(422, encode_dataset(ds, EXPLICIT), EXPLICIT)))
        ds = make_dataset()
        ds.ModalityLUTSequence = Sequence([Dataset()])
        self.assertIn("LUT", str(self.assertNotRenderable(422, encode_dataset(ds, EXPLICIT), EXPLICIT)))
        ds = make_dataset()
        item = Dataset()
        item.LUTDescriptor = [0, 0, 16]
        item["LUTDescriptor"].VR = "US"
        item.LUTData = bytes(20)
        item["LUTData"].VR = "OW"
        ds.VOILUTSequence = Sequence([item])
        self.assertIn("LUT", str(self.assertNotRenderable(422, encode_dataset(ds, EXPLICIT), EXPLICIT)))
        for syntax in (JPEG_BASELINE, RLE):  # native Pixel Data under an encapsulated syntax
            error = self.assertNotRenderable(422, encode_dataset(make_dataset(), EXPLICIT), syntax)
            self.assertIn("encapsulated Pixel Data", str(error))

    def test_number_of_frames_zero_is_one(self):
        """An empty or 0 Number of Frames is one frame, as pydicom reads it (pydicom 2.3 and 3.x alike)."""
        values = np.arange(16, dtype="<u2") * 100
        ds = make_dataset(pixels=values.tobytes())
        expected = np.rint(min_max(values)).reshape(1, 16)
        for value in (0, None):
            ds.NumberOfFrames = value
            pixels, _ = decode_png(self, render_png(encode_dataset(ds, EXPLICIT), EXPLICIT))
            self.assertClose(pixels, expected, 0)
            self.assertNotRenderable(404, encode_dataset(ds, EXPLICIT), EXPLICIT, 1)

    def test_malformed_palette(self):
        indices = np.zeros((2, 8), dtype=np.uint8)
        table = np.arange(256, dtype="<u2")
        for change, named in ((lambda ds: delattr(ds, "GreenPaletteColorLookupTableDescriptor"), "Green"),
                              (lambda ds: setattr(ds, "BluePaletteColorLookupTableDescriptor", [256, 0, 12]),
                               "12 bits"),
                              (lambda ds: setattr(ds, "RedPaletteColorLookupTableData", bytes(10)), "256 entries")):
            ds = palette_dataset(indices, [256, 0, 16], table, table, table)
            change(ds)
            self.assertIn(named, str(self.assertNotRenderable(422, encode_dataset(ds, EXPLICIT), EXPLICIT)))

    def test_truncated_pixel_data(self):
        """Pixel Data shorter than its attributes say, or than its own length says: 422."""
        _, syntax, data = pydicom_file("MR_truncated.dcm")
        self.assertIn("(7FE0,0010)", str(self.assertNotRenderable(422, data, syntax)))
        ds = make_dataset(pixels=bytes(64))
        ds.Rows = 3
        error = self.assertNotRenderable(422, encode_dataset(ds, EXPLICIT), EXPLICIT)
        self.assertIn("truncated", str(error))
        _, syntax, data = pydicom_file("MR_small.dcm")
        self.assertNotRenderable(422, data[:-100], syntax)
        _, syntax, data = pydicom_file("SC_rgb_rle_2frame.dcm")
        self.assertNotRenderable(422, data[:-100], syntax)

    def test_encoded_otherwise_than_its_syntax_says(self):
        """pydicom's SC_rgb_jpeg.dcm: implicit VR under an explicit VR syntax, not whole as it says."""
        _, syntax, data = pydicom_file("SC_rgb_jpeg.dcm")
        self.assertNotRenderable(422, data, syntax)
        _, _, data = pydicom_file("MR_small_implicit.dcm")
        self.assertNotRenderable(422, data, BIG_ENDIAN)

    def test_huge_declared_image_before_allocation(self):
        """Rows x Columns x Frames past the limit: 413 said from the attributes, nothing decoded (the
        pixel data is 8 KiB; its shortness would be 422)."""
        cases = []
        ds = mr_dataset(Rows=65535, Columns=65535)
        cases.append((encode_dataset(ds, EXPLICIT), EXPLICIT, f"{65535 * 65535 * 2} bytes"))
        ds = mr_dataset(NumberOfFrames=200000)
        cases.append((encode_dataset(ds, IMPLICIT), IMPLICIT, "1638400000 bytes"))
        ds, syntax, _ = pydicom_file("SC_rgb_rle_2frame.dcm")
        ds.Rows = ds.Columns = 20000
        cases.append((encode_dataset(ds, EXPLICIT), syntax, "2400000000 bytes"))
        ds = make_dataset(pixels=bytes(64), bits_allocated=8)
        ds.Rows = ds.Columns = 8192  # 64 MiB: under the byte limit, over the frame's pixel limit
        cases.append((encode_dataset(ds, EXPLICIT), EXPLICIT, f"limit of {render.MAX_FRAME_PIXELS} pixels"))
        tracemalloc.start()
        try:
            for data, syntax, figure in cases:
                error = self.assertNotRenderable(413, data, syntax)
                self.assertIn(figure, str(error))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertLess(peak, 16 << 20)

    def test_deflated_past_the_limit(self):
        self.patch(render, "MAX_INFLATED_BYTES", 64 << 10)
        ds = make_dataset(pixels=bytes(128 << 10))
        compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = compressor.compress(encode_dataset(ds, EXPLICIT)) + compressor.flush()
        self.assertIn("inflates past 65536 bytes", str(self.assertNotRenderable(413, data, DEFLATED)))
        self.assertNotRenderable(422, data[:len(data) // 2], DEFLATED)
        self.assertNotRenderable(422, b"not deflated at all", DEFLATED)

    def test_garbage(self):
        """Random bytes, empty data, text, and mutilated real data sets in every syntax: a PNG or
        NotRenderable, never another exception."""
        rng = random.Random(20240611)
        sources = [pydicom_file(name)[2] for name in ("MR_small.dcm", "SC_rgb_rle_2frame.dcm",
                                                   "SC_rgb_dcmtk_+eb+cy+np.dcm", "rtdose.dcm")]
        inputs = [b"", b"\x00", bytes(7), b"DICM" * 40, b"hello, world\n" * 20, b"\xff" * 300]
        inputs += [bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 600))) for _ in range(60)]
        for source in sources:
            for _ in range(60):
                mutated = bytearray(source)
                for _ in range(rng.randint(1, 8)):
                    mutated[rng.randrange(len(mutated))] = rng.getrandbits(8)
                cut = rng.choice((len(mutated), rng.randrange(len(mutated))))
                inputs.append(bytes(mutated[:cut]))
        syntaxes = (IMPLICIT, EXPLICIT, BIG_ENDIAN, DEFLATED, JPEG_BASELINE, RLE)
        outcomes = {}
        for data in inputs:
            for syntax in syntaxes:
                if syntax == DEFLATED:
                    compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
                    data = compressor.compress(data) + compressor.flush()
                try:
                    decode_png(self, render_png(data, syntax, rng.randint(0, 1)))
                    outcome = "png"
                except NotRenderable as error:
                    self.assertIn(error.status, (400, 404, 413, 415, 422))
                    self.assertTrue(str(error) and "\n" not in str(error), repr(str(error)))
                    outcome = error.status
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
        self.assertIn(422, outcomes)
        self.assertIn("png", outcomes)
