"""One frame of a data set rendered as an 8-bit PNG, pure (no I/O, never imports twisted).

The grayscale pipeline is PS3.3's: the stored values (C.7.6.3, Bits Stored
of Bits Allocated, signed or not), the Modality LUT (C.11.1: Rescale Slope
and Intercept, or a Modality LUT Sequence), the VOI LUT (C.11.2: a window,
or a VOI LUT Sequence), then MONOCHROME1 inverted (its minimum is white).
The VOI is, in this order: the ``window`` asked for (center, width; the
LINEAR function of C.11.2.1.2.1, width at least 1); the data set's first
Window Center and Width (a frame's own from the functional groups of an
enhanced multi-frame first) with its VOI LUT Function (LINEAR, LINEAR_EXACT
or SIGMOID); its first VOI LUT Sequence item; else the frame's own minimum
to maximum.  A data set window that cannot be read or whose width is out of
range (under 1 for LINEAR, not above 0 for the others) is passed over for
the next.  An empty or 0 Number of Frames is one frame, as pydicom reads
it.  Color is drawn as it is: RGB; YBR_FULL and YBR_FULL_422
converted to RGB (C.7.6.3.1.2); PALETTE COLOR through its palette; samples
of more than 8 bits scaled to 8 (``value * 255 / (2**BitsStored - 1)``).
A window does not apply to color and is ignored there.

Decoding is pydicom's, with whatever decoders this machine has
(:func:`decoders`), one frame at a time where the pixel data is
compressed; what differs between pydicom 2.3 and 3.x is in
:mod:`appliance.compat`.  A data set that cannot be rendered raises
:class:`NotRenderable` carrying the HTTP status the web API answers, never
anything else:

- 400: a bad request: ``frame`` not an integer, ``window`` not two finite
  numbers or its width under 1.
- 404: no Pixel Data (or an empty one), or no such frame.
- 413: the decoded pixel data would exceed :data:`MAX_DECODED_BYTES`, a
  frame :data:`MAX_FRAME_PIXELS`, or a deflated data set inflates past
  :data:`MAX_INFLATED_BYTES`; said from the declared attributes before
  anything is decoded.
- 415: compressed pixel data that no decoder here decodes (the transfer
  syntax named, with pydicom's words on what is missing or what failed), a
  transfer syntax pydicom does not know, Float or Double Float Pixel Data, a
  photometric interpretation not drawn here.
- 422: a data set that cannot be read (garbage, not whole: a value declared
  longer than what follows), or whose image attributes are missing,
  malformed or contradictory, or whose pixel data is truncated.
"""

from __future__ import annotations

import io
import math
import numbers
from collections import namedtuple
from typing import Dict, Optional, Tuple

import numpy as np

from .. import compat
from . import structure
from .deflate import DEFLATED, InflateLimits, NotInflatable, TooLarge, inflate

__all__ = ["NotRenderable", "render_png", "decoders", "MAX_DECODED_BYTES", "MAX_FRAME_PIXELS",
           "MAX_INFLATED_BYTES"]

#: Decoded pixel data of all frames at most (Rows x Columns x Samples x Frames x bytes per sample).
MAX_DECODED_BYTES = 1 << 30
#: Pixels of one frame at most (the frame is worked on in 64-bit floats).
MAX_FRAME_PIXELS = 1 << 25
#: Inflated bytes of a deflated data set at most.
MAX_INFLATED_BYTES = MAX_DECODED_BYTES + (64 << 20)

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
_NATIVE = frozenset((IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN, DEFLATED))

_GRAY = frozenset(("MONOCHROME1", "MONOCHROME2"))
_SAMPLES = {"MONOCHROME1": 1, "MONOCHROME2": 1, "PALETTE COLOR": 1,
            "RGB": 3, "YBR_FULL": 3, "YBR_FULL_422": 3, "YBR_ICT": 3, "YBR_RCT": 3}


class NotRenderable(Exception):
    """Why a data set cannot be rendered; ``status`` is the HTTP status the web API answers (400, 404, 413,
    415, 422: see the module's documentation) and ``str()`` the reason, one line."""

    def __init__(self, status: int, reason: str):
        super().__init__(" ".join(reason.split()))  # one line, whatever a value or pydicom's words hold
        self.status = status


def decoders() -> Dict[str, bool]:
    """Transfer syntax UID -> whether pydicom can decode its pixel data on this machine (every syntax pydicom
    knows; the uncompressed ones are always True)."""
    return compat.pixel_decoders()


def render_png(data: bytes, transfer_syntax: str, frame: int = 0,
               window: Optional[Tuple[float, float]] = None) -> bytes:
    """Frame ``frame`` (0-based) of the bare data set ``data`` (no File Meta Information) encoded in
    ``transfer_syntax``, as PNG bytes: 8-bit grayscale ("L") for MONOCHROME1/2, 8-bit RGB for color.

    ``window`` = (center, width) overrides the data set's VOI for grayscale images.  Raises
    :class:`NotRenderable`.
    """
    frame, window = _request(frame, window)
    available = decoders()
    ds, pixel_syntax = _parse(data, transfer_syntax, available)
    image = _render(ds, pixel_syntax, frame, window, available)
    return _png(image)


# --- the request --------------------------------------------------------------------------------------------


def _request(frame, window):
    if isinstance(frame, bool) or not isinstance(frame, numbers.Integral):
        raise NotRenderable(400, f"frame must be an integer, not {frame!r}")
    if window is None:
        return int(frame), None
    try:
        center, width = window
        center, width = float(center), float(width)
    except (TypeError, ValueError):
        raise NotRenderable(400, f"window must be two numbers, center and width, not {window!r}") from None
    if not (math.isfinite(center) and math.isfinite(width)):
        raise NotRenderable(400, f"window center and width must be finite numbers, not {center:g}, {width:g}")
    if width < 1:
        raise NotRenderable(400, f"window width must be at least 1 (PS3.3 C.11.2.1.2.1), not {width:g}")
    return int(frame), (center, width)


# --- reading the data set -----------------------------------------------------------------------------------


def _syntax_name(uid: str) -> str:
    from pydicom.uid import UID

    name = UID(uid).name
    return f"{name} ({uid})" if name != uid else uid


def _one_line(error: BaseException, limit: int = 400) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _parse(data, transfer_syntax: str, available: Dict[str, bool]):
    """(the pydicom data set, the transfer syntax its pixel data is decoded in)."""
    if not isinstance(transfer_syntax, str) or transfer_syntax not in available:
        raise NotRenderable(415, f"unknown transfer syntax {transfer_syntax!r}: not one pydicom knows")
    data = bytes(data)
    encoding = pixel_syntax = transfer_syntax
    if transfer_syntax == DEFLATED:
        limits = InflateLimits(max_size=MAX_INFLATED_BYTES, max_ratio=math.inf)
        try:
            data, _, _ = inflate(io.BytesIO(data), limits, keep=MAX_INFLATED_BYTES)
        except TooLarge:
            raise NotRenderable(413, f"the deflated data set inflates past {MAX_INFLATED_BYTES} bytes") from None
        except NotInflatable as error:
            raise NotRenderable(422, f"the deflated data set cannot be inflated: {error}") from None
        encoding = pixel_syntax = EXPLICIT_VR_LITTLE_ENDIAN
    elif transfer_syntax not in _NATIVE:
        encoding = EXPLICIT_VR_LITTLE_ENDIAN  # PS3.5 A.4: encapsulated syntaxes are explicit VR little endian
    implicit = encoding == IMPLICIT_VR_LITTLE_ENDIAN
    little = encoding != EXPLICIT_VR_BIG_ENDIAN
    broken = structure.problem(data, 0, len(data), implicit, little)
    if broken is not None:
        raise NotRenderable(422, f"the data set is not whole: {broken}")
    try:
        ds = compat.image_dataset(data, encoding, pixel_syntax)
    except Exception as error:  # pydicom's parser: anything on garbage
        raise NotRenderable(422, f"the data set cannot be parsed: {_one_line(error)}") from None
    return ds, pixel_syntax


_Image = namedtuple("_Image", "rows columns samples bits_allocated bits_stored signed photometric frames")


def _tag_name(keyword: str) -> str:
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X}) {keyword}" if tag is not None else keyword


def _value(ds, keyword: str):
    """The element's value, or None when absent; 422 when pydicom cannot read it."""
    try:
        return ds.get(keyword) if keyword in ds else None
    except Exception as error:
        raise NotRenderable(422, f"{_tag_name(keyword)} cannot be read: {_one_line(error)}") from None


def _integer(ds, keyword: str, low: int, high: int, default: Optional[int] = None) -> int:
    value = _value(ds, keyword)
    if value is None or value == "":
        if default is None:
            raise NotRenderable(422, f"the data set lacks {_tag_name(keyword)}, needed to render its pixel data")
        return default
    try:
        if not isinstance(value, (str, numbers.Number)):  # several values, bytes
            raise ValueError
        number = int(value)
        if isinstance(value, numbers.Number) and number != value:
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise NotRenderable(422, f"{_tag_name(keyword)} is not one integer: {value!r}") from None
    if not low <= number <= high:
        raise NotRenderable(422, f"{_tag_name(keyword)} {number} is out of range ({low} to {high})")
    return number


def _attributes(ds) -> _Image:
    """The Image Pixel module (PS3.3 C.7.6.3) as far as rendering needs it, checked."""
    photometric = _value(ds, "PhotometricInterpretation")
    if photometric is None or photometric == "":
        raise NotRenderable(422, "the data set lacks (0028,0004) PhotometricInterpretation, "
                                 "needed to render its pixel data")
    if not isinstance(photometric, str):
        raise NotRenderable(422, f"(0028,0004) PhotometricInterpretation is not one value: {photometric!r}")
    photometric = photometric.strip()
    if photometric not in _SAMPLES:
        raise NotRenderable(415, f"photometric interpretation {photometric} is not rendered (only "
                                 + ", ".join(sorted(_SAMPLES)) + ")")
    samples = _integer(ds, "SamplesPerPixel", 1, 4)
    if samples != _SAMPLES[photometric]:
        raise NotRenderable(422, f"{_tag_name('SamplesPerPixel')} {samples} contradicts "
                                 f"{_tag_name('PhotometricInterpretation')} {photometric}, which has "
                                 f"{_SAMPLES[photometric]}")
    bits_allocated = _integer(ds, "BitsAllocated", 1, 64)
    if bits_allocated not in (1, 8, 16, 32):
        raise NotRenderable(422, f"(0028,0100) BitsAllocated {bits_allocated} is not 1, 8, 16 or 32")
    return _Image(
        rows=_integer(ds, "Rows", 1, 0xFFFF),
        columns=_integer(ds, "Columns", 1, 0xFFFF),
        samples=samples,
        bits_allocated=bits_allocated,
        bits_stored=_integer(ds, "BitsStored", 1, bits_allocated),
        signed=_integer(ds, "PixelRepresentation", 0, 1) == 1,
        photometric=photometric,
        # absent, empty or 0: one frame, as pydicom reads it
        frames=_integer(ds, "NumberOfFrames", 0, 1 << 31, default=1) or 1,
    )


# --- rendering ----------------------------------------------------------------------------------------------


def _render(ds, pixel_syntax: str, frame: int, window, available: Dict[str, bool]):
    if "PixelData" not in ds:
        for keyword in ("FloatPixelData", "DoubleFloatPixelData"):
            if keyword in ds:
                raise NotRenderable(415, f"{_tag_name(keyword)} is not rendered (only Pixel Data)")
        raise NotRenderable(404, "the data set has no Pixel Data (7FE0,0010)")
    pixel_data = _value(ds, "PixelData")
    if not pixel_data:
        raise NotRenderable(404, "the data set's Pixel Data (7FE0,0010) is empty")
    image = _attributes(ds)
    if not 0 <= frame < image.frames:
        raise NotRenderable(404, f"no frame {frame}: the data set has {image.frames} "
                                 + ("frame (0)" if image.frames == 1 else f"frames (0 to {image.frames - 1})"))
    _check_size(image)
    encapsulated = pixel_syntax not in _NATIVE
    if encapsulated:
        if not available.get(pixel_syntax):
            raise NotRenderable(415, f"cannot decode {_syntax_name(pixel_syntax)}: no decoder for it on this "
                                     f"machine (pydicom says: {compat.missing_decoders(pixel_syntax)})")
        try:
            compressed = compat.encapsulated_frame(ds, frame, image.frames)
        except Exception as error:
            raise NotRenderable(422, f"frame {frame} cannot be found in the encapsulated Pixel Data: "
                                     f"{_one_line(error)}") from None
        compat.encapsulate_frame(ds, compressed)
        index = 0
    else:
        _check_length(image, len(pixel_data))
        if "NumberOfFrames" in ds and ds.NumberOfFrames != image.frames:
            ds.NumberOfFrames = image.frames  # empty or 0 is 1, for pydicom 2.3 as for 3.x
        index = frame
    try:
        array, decoded = compat.decode_frame(ds, pixel_syntax, index)
    except Exception as error:  # whatever a decoder raises on data it cannot decode
        if encapsulated:
            raise NotRenderable(415, f"cannot decode {_syntax_name(pixel_syntax)}: the decoders on this "
                                     f"machine failed on it (pydicom says: {_one_line(error)})") from None
        raise NotRenderable(422, f"the pixel data cannot be read: {_one_line(error)}") from None
    expected = (image.rows, image.columns) + ((3,) if image.samples == 3 else ())
    if array.shape != expected:
        raise NotRenderable(422, f"the decoded frame is {'x'.join(map(str, array.shape))}, the data set "
                                 f"declares {'x'.join(map(str, expected))}")
    array = _stored_bits(array, image)
    if decoded in _GRAY:
        return _gray(ds, array, frame, window, decoded, little=pixel_syntax != EXPLICIT_VR_BIG_ENDIAN)
    if decoded == "PALETTE COLOR":
        return _palette(ds, array)
    if decoded == "RGB":
        if array.dtype == np.uint8 and image.bits_stored == 8:
            return array
        return _to_8_bits(array.astype(np.float64), image.bits_stored)
    if decoded in ("YBR_FULL", "YBR_FULL_422"):
        return _to_8_bits(_ybr_full_to_rgb(array, image.bits_stored), image.bits_stored)
    raise NotRenderable(415, f"pixel data decoded as {decoded} is not rendered")


def _check_size(image: _Image) -> None:
    per_sample = max(image.bits_allocated, 8) // 8
    total = image.rows * image.columns * image.samples * image.frames * per_sample
    if total > MAX_DECODED_BYTES:
        raise NotRenderable(413, f"the decoded pixel data would take {total} bytes (Rows {image.rows} x Columns "
                                 f"{image.columns} x Samples {image.samples} x Frames {image.frames} x "
                                 f"{per_sample} bytes), more than the limit of {MAX_DECODED_BYTES} bytes")
    if image.rows * image.columns > MAX_FRAME_PIXELS:
        raise NotRenderable(413, f"a frame of {image.rows} x {image.columns} pixels is more than the limit of "
                                 f"{MAX_FRAME_PIXELS} pixels")


def _check_length(image: _Image, length: int) -> None:
    """Native pixel data holds every frame it declares (PS3.5 8.1.1; YBR_FULL_422 two samples a pixel)."""
    pixels = image.rows * image.columns * image.frames
    if image.bits_allocated == 1:
        needed = (pixels * image.samples + 7) // 8
    else:
        samples = 2 if image.photometric == "YBR_FULL_422" else image.samples
        needed = pixels * samples * image.bits_allocated // 8
    if length < needed:
        raise NotRenderable(422, f"the Pixel Data is truncated: {length} bytes where Rows, Columns, Samples, "
                                 f"Frames and Bits Allocated need {needed}")


def _stored_bits(array, image: _Image):
    """The stored value of each sample: bits above Bits Stored dropped, signed ones sign-extended."""
    if array.dtype.kind not in "ui":
        return array
    width = array.dtype.itemsize * 8
    if image.bits_stored >= width:
        return array
    if image.signed:
        if array.dtype.kind == "u":  # same bits, read as two's complement
            order = array.dtype.byteorder if array.dtype.byteorder in "<>" else "="
            array = array.view(np.dtype(f"{order}i{array.dtype.itemsize}"))
        shift = width - image.bits_stored
        return (array << shift) >> shift
    return array & np.array((1 << image.bits_stored) - 1, dtype=array.dtype)


def _to_8_bits(values, bits: int):
    """Samples of ``bits`` bits (0 to 2**bits - 1) as 0 to 255, rounded."""
    if bits != 8:
        values = values * (255.0 / ((1 << bits) - 1))
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _ybr_full_to_rgb(array, bits: int):
    """PS3.3 C.7.6.3.1.2: YBR_FULL (and YBR_FULL_422 once upsampled) to RGB, the inverse of its equations."""
    offset = float(1 << (bits - 1))
    y = array[..., 0].astype(np.float64)
    cb = array[..., 1].astype(np.float64) - offset
    cr = array[..., 2].astype(np.float64) - offset
    rgb = np.empty(array.shape, dtype=np.float64)
    rgb[..., 0] = y + 1.402 * cr
    rgb[..., 1] = y - 0.344136 * cb - 0.714136 * cr
    rgb[..., 2] = y + 1.772 * cb
    return np.clip(rgb, 0, (1 << bits) - 1, out=rgb)


def _palette(ds, array):
    """PS3.3 C.7.6.3.1.5-6: the three tables (or segmented ones, C.7.9.2) through pydicom, scaled to 8 bits."""
    bits = None
    for color in ("Red", "Green", "Blue"):
        keyword = f"{color}PaletteColorLookupTableDescriptor"
        descriptor = _value(ds, keyword)
        try:
            entries, _, bits = (int(number) for number in descriptor)
        except (TypeError, ValueError):
            raise NotRenderable(422, f"PALETTE COLOR needs {_tag_name(keyword)} of three numbers, "
                                     f"not {descriptor!r}") from None
        if bits not in (8, 16):
            raise NotRenderable(422, f"{_tag_name(keyword)} says {bits} bits per entry (8 or 16)")
        data = _value(ds, f"{color}PaletteColorLookupTableData")
        if data is not None and (not isinstance(data, bytes) or len(data) not in (entries or 65536,
                                                                                   2 * (entries or 65536))):
            raise NotRenderable(422, f"{_tag_name(f'{color}PaletteColorLookupTableData')} does not hold the "
                                     f"{entries or 65536} entries its descriptor says")
    try:
        rgb = compat.apply_color_lut(array, ds)
    except Exception as error:  # a palette pydicom cannot apply: its words
        raise NotRenderable(422, f"the palette cannot be applied: {_one_line(error)}") from None
    return _to_8_bits(rgb[..., :3].astype(np.float64), bits)


# --- grayscale: Modality LUT, VOI LUT, presentation -------------------------------------------------------


def _frame_item(ds, frame: int, sequence: str):
    """The first item of ``sequence`` in the frame's Per-Frame Functional Group, else the Shared one, else None
    (an enhanced multi-frame image keeps its rescale and windows there, PS3.3 C.7.6.16)."""
    for groups, position in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        try:
            item = ds[groups].value[position] if groups in ds else None
            found = item.get(sequence) if item is not None and sequence in item else None
            if found:
                return found[0]
        except Exception:  # a malformed functional group is as good as none
            continue
    return None


def _numbers(source, keyword: str):
    """The element's numbers as floats (first of several), or None when absent or unreadable."""
    try:
        value = source.get(keyword) if keyword in source else None
        if value is None or value == "":
            return None
        values = list(value) if not isinstance(value, (str, bytes, numbers.Number)) else [value]
        result = float(values[0])
        return result if math.isfinite(result) else None
    except Exception:
        return None


def _lut(values, item, signed: bool, little: bool):
    """A LUT (Modality or VOI: LUT Descriptor, LUT Data) applied to ``values``: (outputs, bits per entry)."""
    try:
        descriptor = [int(number) for number in item.LUTDescriptor]
        entries, first, bits = descriptor[0] or 65536, descriptor[1], descriptor[2]
        if signed and first > 0x7FFF:
            first -= 0x10000  # an SS value read as US
        data = item.LUTData
        if isinstance(data, (bytes, bytearray)):
            table = np.frombuffer(data, dtype="<u2" if little else ">u2")
        else:
            table = np.asarray(data if not isinstance(data, numbers.Number) else [data], dtype=np.float64)
        if len(table) < entries or not 1 <= bits <= 16:
            raise ValueError(f"LUT Descriptor {descriptor} with {len(table)} entries of LUT Data")
    except NotRenderable:
        raise
    except Exception as error:
        raise NotRenderable(422, f"a LUT cannot be read: {_one_line(error)}") from None
    index = np.clip(np.rint(values) - first, 0, entries - 1).astype(np.intp)
    return table[:entries].astype(np.float64)[index], bits


def _gray(ds, array, frame: int, window, photometric: str, little: bool):
    values = array.astype(np.float64)
    signed = _value(ds, "PixelRepresentation") == 1
    # Modality LUT (C.11.1): a LUT Sequence, or Rescale Slope and Intercept (a frame's own first)
    modality = _value(ds, "ModalityLUTSequence")
    if modality:
        values, _ = _lut(values, modality[0], signed, little)
        signed = False
    else:
        source = _frame_item(ds, frame, "PixelValueTransformationSequence") or ds
        slope, intercept = _numbers(source, "RescaleSlope"), _numbers(source, "RescaleIntercept")
        slope = 1.0 if slope is None else slope
        intercept = 0.0 if intercept is None else intercept
        if slope != 1 or intercept != 0:
            values *= slope
            values += intercept
            if not np.isfinite(values).all():
                raise NotRenderable(422, f"Rescale Slope {slope:g} and Intercept {intercept:g} take values "
                                         "past what a float holds")
            signed = signed or intercept < 0 or slope < 0
    # VOI LUT (C.11.2)
    if window is not None:
        out = _window(values, window[0], window[1], "LINEAR")
    else:
        out = _dataset_voi(ds, frame, values, signed, little)
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if photometric == "MONOCHROME1":
        np.subtract(255, out, out=out)
    return out


def _dataset_voi(ds, frame: int, values, signed: bool, little: bool):
    source = _frame_item(ds, frame, "FrameVOILUTSequence") or ds
    center, width = _numbers(source, "WindowCenter"), _numbers(source, "WindowWidth")
    if center is not None and width is not None:
        function = "LINEAR"
        try:
            function = str(source.get("VOILUTFunction") or "LINEAR").strip().upper()
        except Exception:
            pass
        if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
            function = "LINEAR"  # PS3.3 C.11.2.1.3: LINEAR when absent
        if width >= 1 or (function != "LINEAR" and width > 0):
            return _window(values, center, width, function)
    voi_luts = _value(ds, "VOILUTSequence")
    if voi_luts:
        out, bits = _lut(values, voi_luts[0], signed, little)
        return out * (255.0 / ((1 << bits) - 1))
    low, high = float(values.min()), float(values.max())
    if high == low:
        return np.zeros(values.shape)
    return (values - low) * (255.0 / (high - low))


def _window(values, center: float, width: float, function: str):
    """PS3.3 C.11.2.1.2.1 (LINEAR), C.11.2.1.3.2 (LINEAR_EXACT), C.11.2.1.3.1 (SIGMOID), to 0..255."""
    if function == "SIGMOID":
        return 255.0 / (1.0 + np.exp(np.clip(-4.0 * (values - center) / width, -700, 700)))
    if function == "LINEAR_EXACT":
        return np.clip(((values - center) / width + 0.5) * 255.0, 0, 255)
    if width == 1:  # the whole range is one step at center - 0.5
        return np.where(values > center - 0.5, 255.0, 0.0)
    return np.clip(((values - (center - 0.5)) / (width - 1) + 0.5) * 255.0, 0, 255)


def _png(image) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    return buffer.getvalue()
