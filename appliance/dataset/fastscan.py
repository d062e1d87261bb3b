"""The ingest's fast path: the index's view of a data set read straight from its bytes.

:func:`scan` gives, for a data set held in memory, what storage's pydicom
path gives (``read_dataset(..., stop_when=Pixel Data)``, then
:func:`.metadata.extract`, then where Pixel Data starts): the same
:class:`~.metadata.ObjectMetadata` (the same JSON strings, character for
character), the same offset and the same 12 bytes of pixel data header; or
None when it cannot be sure, and the caller then parses with pydicom.

How:

- The top-level elements are walked with :mod:`struct` up to (7FE0,0010),
  in Implicit VR Little Endian, Explicit VR Little Endian (and the
  compressed syntaxes, whose data sets are explicit little endian) and
  Explicit VR Big Endian; never a deflated one.  Values not needed are
  skipped by their length; sequences of undefined length (at any depth)
  are walked item by item exactly where pydicom reads them, and must be
  well formed.
- Only the attributes the index keeps are decoded (the level keyword lists
  of :mod:`.metadata`, which hold every column's attribute, and Specific
  Character Set): text, person names, IS, DS and binary numbers, as
  pydicom 2.3 and 3 decode them in their default configuration, for the
  character sets whose decoding is a plain codec (none, ``ISO_IR 6``,
  ``ISO_IR 100``, ``ISO_IR 192`` and their ISO 2022 twins for 6 and 100).
  Kept sequences are decoded item by item, every element of every item,
  as :func:`.metadata._json_value` converts them.
- A kept attribute this module does not decode itself (a VR such as UN, OB
  or AT, an IS or DS string that is not a plain number, a text with an
  escape or bytes that are not valid UTF-8, a multi-valued column, a
  sequence whose items hold such an element, a private tag in implicit VR,
  an ambiguous VR, a LUT descriptor or their own Specific Character Set)
  is handed to pydicom: its bytes, with Specific Character Set and
  Pixel Representation (the context pydicom consults), make a small data
  set that ``read_dataset`` reads and :func:`.metadata._json_value` /
  ``_text`` / ``_integer`` convert, as they would in the whole data set.
- Anything unusual makes :func:`scan` answer None: a length past the end,
  elements out of order or repeated, group 0002 elements, item or delimiter
  tags out of place, a VR that is not a standard one, a first element whose
  VR heuristic would make pydicom switch between implicit and explicit VR,
  an undefined length that is not a sequence, another character set, a
  missing SOP/study/series UID, pydicom settings changed from their defaults
  (:func:`~appliance.compat.pydicom_reads_by_default`).  The pydicom path
  then decides, including every refusal.
"""

from __future__ import annotations

import re
import struct
from io import BytesIO
from typing import Callable, Dict, List, Optional, Tuple

from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_VR
from pydicom.filereader import read_dataset

from .. import compat
from . import metadata as M
from .structure import holds_items
from .metadata import normalize_name

__all__ = ["scan", "Unsupported", "LEVELS", "ALL_LEVELS"]

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
#: Deflated data sets are inflated by pydicom reading the file, never scanned here.
DEFLATED = frozenset({"1.2.840.10008.1.2.1.99"})

_UNDEFINED = 0xFFFFFFFF
_PIXEL_DATA = 0x7FE00010
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
_CHARSET = 0x00080005
_PIXEL_REPRESENTATION = 0x00280103
#: Deeper nesting than this is left to pydicom.
_MAX_DEPTH = 32

#: PS3.5 7.1.2: explicit VRs with a reserved field and a 32-bit length; the rest have a 16-bit length.
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_SHORT_VRS = frozenset(b"AE AS AT CS DA DS DT FD FL IS LO LT PN SH SL SS ST TM UI UL US".split())

#: Specific Character Set values (single, as pydicom strips them) whose decoding is one plain codec.
_SIMPLE_CHARSETS = {
    "": "latin_1",  # pydicom decodes the default repertoire as ISO 8859-1 ("iso8859")
    "ISO_IR 6": "latin_1",
    "ISO 2022 IR 6": "latin_1",
    "ISO_IR 100": "latin_1",
    "ISO 2022 IR 100": "latin_1",
    "ISO_IR 192": "utf_8",
}

_ESC = b"\x1b"
_IS_NUMBER = re.compile(r" *[+-]?[0-9]{1,12} *\Z")
_DS_NUMBER = re.compile(r" *[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)? *\Z")


class Unsupported(Exception):
    """The data set is not one the fast path can vouch for; pydicom must read it."""


class _Delegate(Exception):
    """This one attribute is converted by pydicom (in a small data set of its own)."""


#: A multi-valued attribute, as a column value (``str(MultiValue)`` is pydicom's business).
_MULTI = object()


class _Syntax:
    """Structs of one transfer syntax's byte order."""

    def __init__(self, implicit: bool, little: bool) -> None:
        order = "<" if little else ">"
        self.implicit = implicit
        self.little = little
        self.order = order
        self.tag_length = struct.Struct(order + "HHL").unpack_from
        self.u32 = struct.Struct(order + "L").unpack_from
        self.tag = struct.Struct(order + "HH").unpack_from
        # the top-level walk reads an explicit VR as a number
        self.explicit_codes = struct.Struct(order + "HHHH").unpack_from
        code = struct.Struct(order + "H").unpack
        self.long_vrs = frozenset(code(vr)[0] for vr in _LONG_VRS)
        self.short_vrs = frozenset(code(vr)[0] for vr in _SHORT_VRS)
        self.sq = code(b"SQ")[0]


_SYNTAXES = {(implicit, little): _Syntax(implicit, little) for implicit, little in ((True, True), (False, True),
                                                                                     (False, False))}

_DICTIONARY_VR: Dict[int, Optional[str]] = {}


def _dictionary_vr(tag: int) -> Optional[str]:
    """pydicom's dictionary VR of ``tag`` (repeating groups included), None when unknown; cached."""
    try:
        return _DICTIONARY_VR[tag]
    except KeyError:
        pass
    try:
        vr = str(dictionary_VR(tag))
    except KeyError:
        vr = None
    if len(_DICTIONARY_VR) < 65536:
        _DICTIONARY_VR[tag] = vr
    return vr


# --- what is kept -----------------------------------------------------------------------------------------

_LEVELS = (M.PATIENT_KEYWORDS, M.STUDY_KEYWORDS, M.SERIES_KEYWORDS, M.INSTANCE_KEYWORDS)
#: (tag, "GGGGEEEE") of each level's attributes.
_LEVEL_KEYS: Tuple[Tuple[Tuple[int, str], ...], ...] = tuple(
    tuple((tag, f"{tag:08X}") for _, tag in M.level_tags(keywords)) for keywords in _LEVELS
)
#: The levels by name, in _LEVEL_KEYS's order; scan() builds all of them unless told which.
LEVELS = ("patient", "study", "series", "instance")
ALL_LEVELS = frozenset(LEVELS)
#: Every kept attribute and its dictionary VR (the VR of its implicit VR encoding).
_KEPT: Dict[int, str] = {tag: str(dictionary_VR(tag)) for keys in _LEVEL_KEYS for tag, _ in keys}
#: What the walk records: the kept attributes and the context pydicom consults converting them.
_RECORDED = frozenset(_KEPT) | {_CHARSET, _PIXEL_REPRESENTATION}

#: ObjectMetadata's columns: (field, keyword, tag).  Text columns are ``metadata._text``, integer ones
#: ``metadata._integer``; the UIDs are required.
_UID_COLUMNS = (("sop_class_uid", "SOPClassUID"), ("sop_instance_uid", "SOPInstanceUID"),
                ("study_instance_uid", "StudyInstanceUID"), ("series_instance_uid", "SeriesInstanceUID"))
_TEXT_COLUMNS = _UID_COLUMNS + (
    ("patient_id", "PatientID"), ("issuer_of_patient_id", "IssuerOfPatientID"), ("patient_name", "PatientName"),
    ("patient_birth_date", "PatientBirthDate"), ("patient_sex", "PatientSex"), ("study_date", "StudyDate"),
    ("study_time", "StudyTime"), ("accession_number", "AccessionNumber"), ("study_id", "StudyID"),
    ("modality", "Modality"),
)
_INTEGER_COLUMNS = (("series_number", "SeriesNumber"), ("instance_number", "InstanceNumber"),
                    ("bits_allocated", "BitsAllocated"))


def _column_tags(columns):
    from pydicom.datadict import tag_for_keyword

    out = tuple((name, keyword, tag_for_keyword(keyword)) for name, keyword in columns)
    for _, keyword, tag in out:
        assert tag in _KEPT, f"{keyword} is a column but in no level's keyword list"
    return out


_TEXT_COLUMN_TAGS = _column_tags(_TEXT_COLUMNS)
_INTEGER_COLUMN_TAGS = _column_tags(_INTEGER_COLUMNS)
#: VRs whose pydicom value is an int (or a list of them, or None/"" when empty): what ``_integer`` reads simply.
_INTEGER_VRS = frozenset({"IS", "US", "SS", "UL", "SL", "SV", "UV"})


# --- values, as pydicom converts them ---------------------------------------------------------------------
#
# Each decoder takes the value bytes, the Python codec of the data set's character set and the byte order,
# and returns (DICOM JSON entry as metadata._json_value builds it, column value): the column value is what
# ``str(value)`` gives for a text value, the int for an integer one (None or "" when empty), or _MULTI.


def _single_or_multi(vr: str, values: List) -> Tuple[dict, object]:
    """Entry and column value of a text value pydicom split into ``values``."""
    if len(values) == 1:
        value = values[0]
        return ({"vr": vr, "Value": [value]} if value else {"vr": vr}), value
    return {"vr": vr, "Value": values}, _MULTI


def _decode(raw: bytes, codec: str) -> str:
    """charset.decode_bytes for a plain codec: escapes and undecodable bytes are pydicom's business."""
    if _ESC in raw:
        raise _Delegate
    try:
        return raw.decode(codec)
    except UnicodeDecodeError:  # pydicom warns and substitutes
        raise _Delegate from None


def _text_split(vr: str) -> Callable:
    # values.convert_text (SH, LO, UC): decoded, split on backslash, each value right-stripped of NUL and space
    def decode(raw, codec, syntax):
        text = _decode(raw, codec)
        if "\\" in text:
            return {"vr": vr, "Value": [part.rstrip("\x00 ") for part in text.split("\\")]}, _MULTI
        text = text.rstrip("\x00 ")
        return ({"vr": vr, "Value": [text]} if text else {"vr": vr}), text
    return decode


def _text_single(vr: str) -> Callable:
    # values.convert_single_string (LT, ST, UT): one value, right-stripped of NUL and space
    def decode(raw, codec, syntax):
        text = _decode(raw, codec).rstrip("\x00 ")
        return ({"vr": vr, "Value": [text]} if text else {"vr": vr}), text
    return decode


def _default_string(vr: str) -> Callable:
    # values.convert_string (AS, CS, DA, DT, TM with datetime_conversion off): ISO 8859-1, the whole value
    # right-stripped of space and NUL, then split
    def decode(raw, codec, syntax):
        text = raw.decode("latin_1").rstrip(" \x00")
        if "\\" in text:
            return {"vr": vr, "Value": text.split("\\")}, _MULTI
        return ({"vr": vr, "Value": [text]} if text else {"vr": vr}), text
    return decode


def _decode_ae(raw, codec, syntax):
    # values.convert_AE_string: split, each value stripped of spaces at both ends
    return _single_or_multi("AE", [part.strip() for part in raw.decode("latin_1").split("\\")])


def _decode_ui(raw, codec, syntax):
    # values.convert_UI: right-stripped of NUL and space, split, each a UID (stripped of whitespace)
    text = raw.decode("latin_1").rstrip("\x00 ")
    if "\\" in text:
        return {"vr": "UI", "Value": [part.strip() for part in text.split("\\")]}, _MULTI
    text = text.strip()
    return ({"vr": "UI", "Value": [text]} if text else {"vr": "UI"}), text


def _decode_ur(raw, codec, syntax):
    # values.convert_UR_string: one value, right-stripped of whitespace
    return _single_or_multi("UR", [raw.decode("latin_1").rstrip()])


_GROUP_LABELS = ("Alphabetic", "Ideographic", "Phonetic")


def _decode_pn(raw, codec, syntax):
    # values.convert_PN: right-stripped of NUL and space, split on backslash; each name's component groups
    # split on "=", trailing empty groups dropped (valuerep.PersonName); the JSON keeps the non-empty groups
    names = []
    joined = []
    for part in _decode(raw.rstrip(b"\x00 "), codec).split("\\"):
        groups = part.split("=")
        while groups and not groups[-1]:
            groups.pop()
        names.append({label: group for label, group in zip(_GROUP_LABELS, groups) if group})
        joined.append("=".join(groups))
    if len(names) == 1:
        if joined[0] == "":
            return {"vr": "PN"}, ""
        return {"vr": "PN", "Value": names}, joined[0]
    return {"vr": "PN", "Value": names}, _MULTI


def _decode_is(raw, codec, syntax):
    # values.convert_IS_string: right-stripped of space and NUL, split; each an IS, which _json_value turns
    # into int(str(value)); anything but a plain integer (IS("1.0"), "1A", blanks between values) is pydicom's
    parts = raw.decode("latin_1").rstrip(" \x00").split("\\")
    if len(parts) == 1 and parts[0] == "":
        return {"vr": "IS"}, ""
    numbers = []
    for part in parts:
        if _IS_NUMBER.match(part) is None:
            raise _Delegate
        numbers.append(int(part))
    return {"vr": "IS", "Value": numbers}, numbers[0] if len(numbers) == 1 else _MULTI


def _decode_ds(raw, codec, syntax):
    # values.convert_DS_string: stripped, then right-stripped of space and NUL, split; each a DSfloat, which
    # _json_value turns into float(str(value))
    parts = raw.decode("latin_1").strip().rstrip(" \x00").split("\\")
    if len(parts) == 1 and parts[0] == "":
        return {"vr": "DS"}, ""
    numbers = []
    for part in parts:
        if _DS_NUMBER.match(part) is None:
            raise _Delegate
        numbers.append(float(part))
    return {"vr": "DS", "Value": numbers}, numbers[0] if len(numbers) == 1 else _MULTI


def _binary(vr: str, code: str, kind: type) -> Callable:
    # values.convert_numbers: a whole number of values in the data set's byte order
    size = struct.calcsize("=" + code)

    def decode(raw, codec, syntax):
        count, rest = divmod(len(raw), size)
        if rest:  # pydicom raises BytesLengthException
            raise _Delegate
        if count == 0:
            return {"vr": vr}, None
        values = [kind(value) for value in struct.unpack(f"{syntax.order}{count}{code}", raw)]
        return {"vr": vr, "Value": values}, values[0] if count == 1 else _MULTI
    return decode


_DECODERS: Dict[str, Callable] = {
    "AE": _decode_ae, "UI": _decode_ui, "UR": _decode_ur, "PN": _decode_pn, "IS": _decode_is, "DS": _decode_ds,
    **{vr: _text_split(vr) for vr in ("SH", "LO", "UC")},
    **{vr: _text_single(vr) for vr in ("LT", "ST", "UT")},
    **{vr: _default_string(vr) for vr in ("AS", "CS", "DA", "DT", "TM")},
    "US": _binary("US", "H", int), "SS": _binary("SS", "h", int), "UL": _binary("UL", "L", int),
    "SL": _binary("SL", "l", int), "UV": _binary("UV", "Q", int), "SV": _binary("SV", "q", int),
    "FL": _binary("FL", "f", float), "FD": _binary("FD", "d", float),
}


# --- sequences, as metadata._json_value gives them ---------------------------------------------------------
#
# A kept sequence's items are converted element by element (metadata._dataset_json); any element whose
# conversion depends on more than its own bytes and the character set (a private tag in implicit VR, an
# ambiguous or unknown VR, UN, a LUT descriptor, a Specific Character Set in the item, binary data) makes
# the whole sequence pydicom's (_Delegate).

#: hooks.raw_element_value / DataElement_from_raw adjust these (a first value read as negative).
_LUT_DESCRIPTORS = frozenset({0x00281101, 0x00281102, 0x00281103, 0x00283002})


def _item_vr(tag: int, group: int, vr: Optional[bytes]) -> str:
    if vr is not None:
        if vr == b"UN":
            raise _Delegate
        return vr.decode("ascii")
    if group & 1:
        raise _Delegate  # pydicom looks private VRs up by their creator
    dictionary = _dictionary_vr(tag)
    if dictionary is None:
        if tag & 0xFFFF == 0:
            return "UL"  # a group length pydicom's dictionary lacks: UL, as pydicom says
        raise _Delegate
    return dictionary


def _sequence_json(data: bytes, position: int, end: Optional[int], syntax: _Syntax, codec: str,
                   depth: int) -> Tuple[list, int]:
    """The items of a sequence whose value starts at ``position`` (to ``end``, or to its delimiter when of
    undefined length) as DICOM JSON objects, and the position after the sequence."""
    if depth > _MAX_DEPTH:
        raise _Delegate
    limit = len(data) if end is None else end
    tag_length = syntax.tag_length
    items = []
    while True:
        if end is not None and position == end:
            return items, position
        if position + 8 > limit:
            raise _Delegate
        group, element, length = tag_length(data, position)
        tag = group << 16 | element
        position += 8
        if tag == _SEQUENCE_END:
            if end is None and length == 0:
                return items, position
            raise _Delegate
        if tag != _ITEM:
            raise _Delegate
        if length == _UNDEFINED:
            item, position = _item_json(data, position, None, syntax, codec, depth)
        else:
            item_end = position + length
            if item_end > limit:
                raise _Delegate
            item = _item_json(data, position, item_end, syntax, codec, depth)[0] if length else {}
            position = item_end
        items.append(item)


def _item_element_header(data: bytes, position: int, limit: int, syntax: "_Syntax", length: int):
    """(VR bytes or None, value length, value start) of the element at ``position`` inside an item.

    ``length`` is the 4 bytes after the tag as read by ``syntax.tag_length``.
    None when the element is not in a standard explicit VR form (the caller gives up).
    """
    if syntax.implicit:
        return None, length, position + 8
    vr = bytes(data[position + 4:position + 6])  # hashable when data is a bytearray (the memory store's buffers)
    if vr in _LONG_VRS:
        if position + 12 > limit:
            return None
        return vr, syntax.u32(data, position + 8)[0], position + 12
    if vr in _SHORT_VRS:
        return vr, (length >> 16 if syntax.little else length & 0xFFFF), position + 8
    return None


def _item_json(data: bytes, position: int, end: Optional[int], syntax: _Syntax, codec: str,
               depth: int) -> Tuple[dict, int]:
    """One item's elements (to ``end``, or to its delimiter) as a DICOM JSON object, and the position after."""
    limit = len(data) if end is None else end
    out = {}
    previous = -1
    while True:
        if end is not None and position == end:
            return out, position
        if position + 8 > limit:
            raise _Delegate
        group, element, length = syntax.tag_length(data, position)
        tag = group << 16 | element
        if tag == _ITEM_END:
            if end is None and length == 0:
                return out, position + 8
            raise _Delegate
        if group == 0xFFFE or tag <= previous or tag == _CHARSET or tag in _LUT_DESCRIPTORS:
            raise _Delegate
        # a standard VR: the item is not one pydicom reads as implicit VR (see _walk_item)
        header = _item_element_header(data, position, limit, syntax, length)
        if header is None:
            raise _Delegate
        vr_bytes, length, start = header
        previous = tag
        vr = _item_vr(tag, group, vr_bytes)
        if vr == "SQ":
            value_end = None if length == _UNDEFINED else start + length
            if value_end is not None and value_end > limit:
                raise _Delegate
            value, position = _sequence_json(data, start, value_end, syntax, codec, depth + 1)
            if position > limit:
                raise _Delegate
            entry = {"vr": vr, "Value": value}
        else:
            decoder = _DECODERS.get(vr)
            if decoder is None or length == _UNDEFINED:
                raise _Delegate
            position = start + length
            if position > limit:
                raise _Delegate
            entry = decoder(data[start:position], codec, syntax)[0]
        out[f"{tag:08X}"] = entry


def _kept_sequence(data: bytes, start: int, end: int, undefined: bool, syntax: _Syntax, codec: str):
    """The DICOM JSON entry and column value of a kept sequence at the top level."""
    items, position = _sequence_json(data, start, None if undefined else end, syntax, codec, 1)
    if position != end:
        raise _Delegate
    return {"vr": "SQ", "Value": items}, _MULTI


# --- the walk ---------------------------------------------------------------------------------------------


def _looks_explicit(data: bytes, position: int) -> bool:
    """filereader._is_implicit_vr's test: the two bytes after the tag are upper-case letters."""
    return 0x40 < data[position + 4] < 0x5B and 0x40 < data[position + 5] < 0x5B


def _is_sequence(tag: int, vr: Optional[bytes], data: bytes, start: int, syntax: _Syntax) -> bool:
    """Whether pydicom reads an element of undefined length as a sequence (data_element_generator).

    Explicit VR: only SQ here (UN would be read as a sequence of implicit VR items: left to pydicom).
    Implicit VR: the dictionary says SQ, or the tag is unknown and an item follows.
    """
    if not syntax.implicit:
        return vr == b"SQ"
    dictionary = _dictionary_vr(tag)
    if dictionary == "SQ":
        return True
    return dictionary is None and start + 4 <= len(data) and syntax.tag(data, start) == (0xFFFE, 0xE000)


def _check_nested_charset(value: bytes) -> None:
    """pydicom converts a Specific Character Set met inside an item while reading it: only known terms pass."""
    for term in value.decode("latin_1").rstrip(" \x00").split("\\"):
        if term not in python_encoding:
            raise Unsupported


def _skip_sequence(data: bytes, position: int, syntax: _Syntax, depth: int) -> int:
    """Walk a sequence of undefined length from its first item; return the position after its delimiter."""
    if depth > _MAX_DEPTH:
        raise Unsupported
    size = len(data)
    tag_length = syntax.tag_length
    while True:
        if position + 8 > size:
            raise Unsupported
        group, element, length = tag_length(data, position)
        tag = group << 16 | element
        position += 8
        if tag == _SEQUENCE_END:
            if length != 0:
                raise Unsupported
            return position
        if tag != _ITEM:
            raise Unsupported
        if length == _UNDEFINED:
            position = _walk_item(data, position, None, syntax, depth)
        else:
            end = position + length
            if end > size:
                raise Unsupported
            if length:
                _walk_item(data, position, end, syntax, depth)
            position = end


def _walk_item(data: bytes, position: int, end: Optional[int], syntax: _Syntax, depth: int) -> int:
    """Walk one item's elements to ``end`` (defined length) or its delimiter; return the position after it."""
    size = len(data) if end is None else end
    while True:
        if end is not None and position == end:
            return position
        if position + 8 > size:
            raise Unsupported
        group, element, length = syntax.tag_length(data, position)
        tag = group << 16 | element
        if tag == _ITEM_END:
            if end is not None or length != 0:
                raise Unsupported
            return position + 8
        if group == 0xFFFE:
            raise Unsupported
        # a standard VR is two capitals, so pydicom's switch to implicit VR for an item whose first
        # element does not look explicit (filereader._is_implicit_vr) never happens to what passes here
        header = _item_element_header(data, position, size, syntax, length)
        if header is None:
            raise Unsupported
        vr, length, start = header
        if length == _UNDEFINED:
            if not _is_sequence(tag, vr, data, start, syntax):
                raise Unsupported
            position = _skip_sequence(data, start, syntax, depth + 1)
            if position > size:
                raise Unsupported
        else:
            position = start + length
            if position > size:
                raise Unsupported
            if tag == _CHARSET:
                _check_nested_charset(data[start:position])


def _walk(data: bytes, syntax: _Syntax) -> Tuple[Dict[int, tuple], int, List[Tuple[int, int]]]:
    """The top-level walk: {recorded tag: (explicit VR or None, element start, value start, element end,
    undefined length)}, where Pixel Data starts (the end of the data when there is none), and (start, end) of
    the elements that hold others (sequences: those the wholeness check walks into, :mod:`.structure`; every
    other element before Pixel Data was found to fit, one after the other).

    The hot loop of the fast path (every top-level element goes through it), hence its shape: one loop
    per VR encoding, constants in locals, bounds left to struct (struct.error: too short) and checked once
    at the end (a length past the end stops the loop there).
    """
    size = len(data)
    if size < 8 or _looks_explicit(data, 0) == syntax.implicit:
        raise Unsupported  # empty, or pydicom's VR heuristic would switch (with a warning)
    recorded = _RECORDED
    found: Dict[int, tuple] = {}
    u32 = syntax.u32
    pixel_data = _PIXEL_DATA
    undefined = _UNDEFINED
    nested: List[Tuple[int, int]] = []
    previous = -1
    position = 0
    try:
        if syntax.implicit:
            tag_length = syntax.tag_length
            holds = holds_items
            while position < size:
                group, element, length = tag_length(data, position)
                tag = group << 16 | element
                if tag <= previous or 0x00020000 <= tag < 0x00030000:
                    raise Unsupported  # out of order (after an item tag too), repeated, or File Meta Information
                if tag == pixel_data:
                    return found, position, nested
                previous = tag
                start = position + 8
                if length == undefined:
                    if not _is_sequence(tag, None, data, start, syntax):
                        raise Unsupported
                    position = _skip_sequence(data, start, syntax, 1)
                    nested.append((start - 8, position))
                else:
                    position = start + length
                    if length and holds(tag):  # a sequence by its tag, as the wholeness check knows it
                        nested.append((start - 8, position))
                if tag in recorded:
                    found[tag] = (None, start - 8, start, position, length == undefined)
        else:
            explicit = syntax.explicit_codes
            long_vrs = syntax.long_vrs
            short_vrs = syntax.short_vrs
            sq = syntax.sq
            while position < size:
                group, element, code, length = explicit(data, position)
                tag = group << 16 | element
                if code in long_vrs:
                    length = u32(data, position + 8)[0]
                    start = position + 12
                elif code in short_vrs:
                    start = position + 8
                else:
                    raise Unsupported  # not a standard VR: pydicom guesses
                if tag <= previous or 0x00020000 <= tag < 0x00030000:
                    raise Unsupported
                if tag == pixel_data:
                    return found, position, nested
                previous = tag
                if length == undefined:
                    if not _is_sequence(tag, b"SQ" if code == sq else None, data, start, syntax):
                        raise Unsupported
                    end = _skip_sequence(data, start, syntax, 1)
                    nested.append((position, end))
                else:
                    end = start + length
                    if code == sq:
                        nested.append((position, end))
                if tag in recorded:
                    found[tag] = (data[position + 4:position + 6], position, start, end, length == undefined)
                position = end
    except struct.error:
        raise Unsupported from None
    if position != size or previous >= 0xFFFE0000:
        raise Unsupported  # a length past the end; an item or delimiter tag at the top level
    return found, size, nested


# --- the scan ---------------------------------------------------------------------------------------------


def _syntax_for(transfer_syntax: str) -> _Syntax:
    if transfer_syntax in DEFLATED:
        raise Unsupported
    # as storage reads a data set in memory: implicit only for Implicit VR Little Endian, big endian only for
    # Explicit VR Big Endian, explicit little endian for every other (the compressed syntaxes)
    implicit = transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN
    return _SYNTAXES[(implicit, transfer_syntax != EXPLICIT_VR_BIG_ENDIAN)]


def _charset_codec(data: bytes, found) -> str:
    entry = found.get(_CHARSET)
    if entry is None:
        return "latin_1"
    vr, _, start, end, undefined = entry
    if vr not in (None, b"CS") or undefined:
        raise Unsupported
    codec = _SIMPLE_CHARSETS.get(data[start:end].decode("latin_1").rstrip(" \x00"))
    if codec is None:
        raise Unsupported
    return codec


def _check_pixel_representation(data: bytes, found, syntax: _Syntax) -> None:
    """pydicom 3 converts a top-level Pixel Representation when it converts a sequence (to tell its items):
    it must convert without error, as it would."""
    entry = found.get(_PIXEL_REPRESENTATION)
    if entry is None:
        return
    vr, _, start, end, undefined = entry
    decoder = _DECODERS.get("US" if vr is None else vr.decode("ascii"))
    if decoder is None or undefined:
        raise Unsupported
    try:
        decoder(data[start:end], "latin_1", syntax)
    except _Delegate:
        raise Unsupported from None


def _by_pydicom(data: bytes, found, tags: List[int], syntax: _Syntax):
    """The kept attributes ``tags`` as pydicom converts them: a data set of their bytes and their context."""
    chosen = sorted(set(tags) | ({_CHARSET, _PIXEL_REPRESENTATION} & found.keys()))
    small = b"".join(data[found[tag][1]:found[tag][3]] for tag in chosen)
    if _looks_explicit(small, 0) == syntax.implicit:
        raise Unsupported
    try:
        return read_dataset(BytesIO(small), syntax.implicit, syntax.little)
    except Exception:
        raise Unsupported from None


def _scan(data: bytes, header_length: int, transfer_syntax: str, levels: frozenset = ALL_LEVELS,
          nested: Optional[List[Tuple[int, int]]] = None):
    """:func:`scan`, raising :class:`Unsupported` instead of answering None."""
    syntax = _syntax_for(transfer_syntax)
    if not compat.pydicom_reads_by_default():
        raise Unsupported
    found, pixel_offset, holding = _walk(data, syntax)
    codec = _charset_codec(data, found)
    _check_pixel_representation(data, found, syntax)

    # each level's elements, as bytes in the data set's order, with what decoding them depends on
    context = (transfer_syntax, codec, _element_bytes(data, found, _CHARSET),
               _element_bytes(data, found, _PIXEL_REPRESENTATION))
    sources: List[list] = [[context] for _ in _LEVEL_KEYS]
    level_of = _TAG_LEVEL
    for tag, entry in found.items():
        index = level_of.get(tag)
        if index is not None:
            sources[index].append(data[entry[1]:entry[3]])
    columns: Dict[str, object] = {}
    levels_json: List[Optional[str]] = []
    for index, source in enumerate(sources):
        with_json = LEVELS[index] in levels
        slot = index * 2 + with_json
        recent = _RECENT_LEVELS[slot]
        for known in recent:
            if known[0] == source:
                text, level_columns = known[1], known[2]
                break
        else:
            text, level_columns = _level(data, found, index, with_json, syntax, codec)
            # the newest first, the oldest forgotten: a new tuple replaces the slot's whole (threads scan at once)
            _RECENT_LEVELS[slot] = ((source, text, level_columns),) + recent[:_RECENT - 1]
        columns.update(level_columns)
        levels_json.append(text)
    for name, _ in _UID_COLUMNS:
        if not columns[name]:
            raise Unsupported  # extract() refuses it: say so the pydicom way
    metadata = M.ObjectMetadata(patient_json=levels_json[0], study_json=levels_json[1],
                                series_json=levels_json[2], instance_json=levels_json[3], **columns)
    if nested is not None:
        nested += holding
    return metadata, header_length + pixel_offset, data[pixel_offset:pixel_offset + 12]


def _level(data: bytes, found, index: int, with_json: bool, syntax: _Syntax, codec: str):
    """One level's attributes decoded: its JSON text (None without ``with_json``: then only its columns' attributes
    are decoded) and its columns."""
    entries: Dict[int, Optional[dict]] = {}
    scalars: Dict[int, object] = {}
    delegated: List[int] = []
    for tag in (_LEVEL_TAGS if with_json else _LEVEL_COLUMN_TAGS)[index]:
        element = found.get(tag)
        if element is None:
            continue
        vr_bytes, _, start, end, undefined = element
        vr = _KEPT[tag] if vr_bytes is None else vr_bytes.decode("ascii")
        try:
            if vr == "SQ":
                entries[tag], scalars[tag] = _kept_sequence(data, start, end, undefined, syntax, codec)
                continue
            decoder = _DECODERS.get(vr)
            if decoder is None:
                raise _Delegate
            entries[tag], scalars[tag] = decoder(data[start:end], codec, syntax)
        except _Delegate:
            delegated.append(tag)

    columns: Dict[str, object] = {}
    pending: List[Tuple[str, str, int, bool]] = []  # columns pydicom gives: (field, keyword, tag, integer)
    for name, keyword, tag in _TEXT_COLUMN_TAGS_BY_LEVEL[index]:
        if tag not in found:
            columns[name] = ""
        elif tag in scalars and isinstance(scalars[tag], str):
            columns[name] = scalars[tag].strip()
        else:
            pending.append((name, keyword, tag, False))
    for name, keyword, tag in _INTEGER_COLUMN_TAGS_BY_LEVEL[index]:
        if tag not in found:
            columns[name] = None
            continue
        vr = found[tag][0]
        vr = _KEPT[tag] if vr is None else vr.decode("ascii")
        if tag in scalars and vr in _INTEGER_VRS:
            value = scalars[tag]
            columns[name] = value if isinstance(value, int) else None  # "", None and several values: None
        else:
            pending.append((name, keyword, tag, True))
    for _, _, tag, _ in pending:
        if tag not in delegated:
            delegated.append(tag)

    if delegated:
        small = _by_pydicom(data, found, delegated, syntax)
        try:
            for tag in delegated:
                entries[tag] = M._json_value(small[tag])
            for name, keyword, _, integer in pending:
                columns[name] = M._integer(small, keyword) if integer else M._text(small, keyword)
        except Exception:  # pydicom's own path raises it again, or not: let it decide
            raise Unsupported from None
    if "patient_name" in columns:
        columns["patient_name"] = normalize_name(columns["patient_name"])
    if not with_json:
        return None, columns
    level = {}
    for tag, key in _LEVEL_KEYS[index]:
        entry = entries.get(tag)
        if entry is not None:
            level[key] = entry
    return M.dump_level(level), columns


#: per level and whether its JSON was built, the last few [what decoding its elements depends on, their bytes...]
#: seen, with their JSON text and columns, the newest first: the objects of a series arrive one after another with
#: the same patient, study and series elements (several series at once from several senders), and comparing bytes
#: costs less than decoding again.  Each slot holds a tuple replaced whole (threads scan at once).
_RECENT = 8
_RECENT_LEVELS: List[Tuple[Tuple[list, Optional[str], Dict[str, object]], ...]] = [()] * (2 * len(_LEVEL_KEYS))
_TAG_LEVEL: Dict[int, int] = {tag: index for index, keys in enumerate(_LEVEL_KEYS) for tag, _ in keys}
#: per level, its attributes' tags, and those of its attributes that are columns
_LEVEL_TAGS: Tuple[Tuple[int, ...], ...] = tuple(tuple(tag for tag, _ in keys) for keys in _LEVEL_KEYS)
_TEXT_COLUMN_TAGS_BY_LEVEL = tuple(tuple(c for c in _TEXT_COLUMN_TAGS if _TAG_LEVEL[c[2]] == index)
                                   for index in range(len(_LEVEL_KEYS)))
_INTEGER_COLUMN_TAGS_BY_LEVEL = tuple(tuple(c for c in _INTEGER_COLUMN_TAGS if _TAG_LEVEL[c[2]] == index)
                                      for index in range(len(_LEVEL_KEYS)))
_LEVEL_COLUMN_TAGS: Tuple[Tuple[int, ...], ...] = tuple(
    tuple(tag for _, _, tag in _TEXT_COLUMN_TAGS_BY_LEVEL[index] + _INTEGER_COLUMN_TAGS_BY_LEVEL[index])
    for index in range(len(_LEVEL_KEYS)))


def _element_bytes(data, found, tag: int) -> Optional[bytes]:
    entry = found.get(tag)
    return None if entry is None else bytes(data[entry[1]:entry[3]])


def scan(data: bytes, header_length: int, transfer_syntax: str, levels: frozenset = ALL_LEVELS,
         nested: Optional[List[Tuple[int, int]]] = None):
    """``(ObjectMetadata, pixel data offset, 12 bytes at it)`` of a data set in memory, or None.

    Exactly what storage's pydicom path (``read_dataset`` up to Pixel Data,
    :func:`.metadata.extract`, ``header_length`` + the offset) gives, for
    the common case; None whenever that cannot be vouched for (including
    every data set pydicom would refuse), and the caller parses with pydicom.
    ``levels`` (names of :data:`LEVELS`) says which levels' JSON to build:
    the others are None, and their attributes are not decoded (nor vouched
    for).  ``nested``: a list given gets the (start, end) of the top-level
    elements before Pixel Data that hold others (sequences), the only ones
    whose wholeness the scan leaves to :mod:`.structure`.  Never raises.
    """
    try:
        return _scan(data, header_length, transfer_syntax, levels, nested)
    except Unsupported:
        return None
    except Exception:  # a case this module did not foresee: pydicom decides
        return None
