"""C-FIND responses' fast path: a response identifier written straight from its DICOM JSON.

:func:`encode_identifier` gives, for a match as :class:`.query.QueryRun`
returns it (``{"GGGGEEEE": {"vr": ..., "Value": [...]}}``), the bytes the
pydicom path of :class:`appliance.ae.query.FindService` writes
(``Dataset.from_json``, ``response_character_set``, Specific Character Set
and Query/Retrieve Level added, ``write_dataset``), byte for byte; or None
when it cannot be sure, and the caller then encodes with pydicom.  It does
for responses what :mod:`.fastscan` does for ingest.

How:

- Elements are written in tag order, with (0008,0005) Specific Character
  Set (when one applies) and (0008,0052) Query/Retrieve Level added, in
  Implicit VR Little Endian, Explicit VR Little Endian or Explicit VR Big
  Endian (2- or 4-byte lengths as PS3.5 7.1.2 gives per VR).
- Values as pydicom writes them after ``from_json``: text (SH, LO, ST, LT,
  UC, UT) and person names (groups joined by ``=``, trailing empty groups
  dropped) in the response's character set, space padded; AE, AS, CS, DA,
  DT, TM and UR in ISO 8859-1 (pydicom's default), space padded; UI NUL
  padded; several values joined by backslash; IS from a JSON integer
  (``str``) and DS from a JSON number (``repr`` of the float), space padded;
  US, SS, UL, SL, FL and FD packed in the syntax's byte order; an element
  without a value (or an empty sequence) with length zero.
- The character set is the one ``response_character_set`` chooses: the
  request's when it can carry every text value, otherwise ``ISO_IR 192``;
  for ASCII values the request's or none.  Only the plain codecs are written
  here: no Specific Character Set, ``ISO_IR 6``, ``ISO_IR 100`` and
  ``ISO_IR 192`` (pydicom's codecs for them: ISO 8859-1 for the first three,
  UTF-8).
- Anything else makes it answer None: another requested character set
  (ISO 2022 code extensions, other ISO 8859 parts, GB18030...), a sequence
  with items, another VR (AT, OB, OW, UN...), a value of an unexpected JSON
  type (a string for IS, a float for US, ``null``, a person name that is not
  an object), a number that does not pack or format, a value too long for a
  2-byte length, a group length, a transfer syntax other than the three,
  pydicom settings changed from their defaults
  (:func:`~appliance.compat.pydicom_converts_json_by_default`).

Pure Python on plain values, safe on any thread: nothing global is touched but a cache of parsed tags
(and warning filters never).
"""

from __future__ import annotations

import math
import struct
from typing import Dict, List, Optional, Sequence, Tuple

from pydicom.charset import python_encoding

from .. import compat
from ..dicom.uids import EXPLICIT_VR_BIG_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN

__all__ = ["encode_identifier", "known_character_set", "SIMPLE_CHARACTER_SETS"]

_CHARSET = 0x00080005
_LEVEL = 0x00080052

#: Specific Character Sets (a single value) whose text this module writes, and pydicom's codec for each.
SIMPLE_CHARACTER_SETS: Dict[str, str] = {term: python_encoding[term] for term in ("ISO_IR 6", "ISO_IR 100",
                                                                                  "ISO_IR 192")}
#: pydicom's codec without a Specific Character Set (``charset.default_encoding``, ISO 8859-1)
_DEFAULT_CODEC = "iso8859"
_UTF8 = ["ISO_IR 192"]
_UTF8_CODEC = SIMPLE_CHARACTER_SETS["ISO_IR 192"]

#: write_text: the response's character set, space padded (with PN, what response_character_set examines)
_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UC", "UT"})
#: write_string: ISO 8859-1 whatever the character set, space padded
_STRING_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "TM", "UR"})
_NUMBER_FORMATS = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "FL": "f", "FD": "d"}
_FLOAT_VRS = frozenset({"FL", "FD"})
#: VRs written here (a sequence only when it has no item)
_KNOWN_VRS = _TEXT_VRS | _STRING_VRS | frozenset(_NUMBER_FORMATS) | {"PN", "UI", "IS", "DS", "SQ"}
#: PS3.5 7.1.2: explicit VRs with a reserved field and a 32-bit length
_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
#: pydicom writes these (US or SS) specially: left to it
_LUT_DESCRIPTORS = frozenset({0x00281101, 0x00281102, 0x00281103, 0x00283002})
_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")


class _Decline(Exception):
    """Not a value this module vouches for: pydicom encodes the identifier."""


def known_character_set(terms: Optional[Sequence[str]]) -> bool:
    """Whether pydicom knows every defined term of a Specific Character Set (the first may be empty)."""
    return bool(terms) and all((term == "" and index == 0) or term in python_encoding
                               for index, term in enumerate(terms))


# --- values -------------------------------------------------------------------------------------------------


def _strings(values: list) -> List[str]:
    for value in values:
        if type(value) is not str:
            raise _Decline
    return values


def _default_string(values: list, padding: str) -> bytes:
    """write_string / write_UI: joined, padded to an even number of characters, then ISO 8859-1."""
    text = "\\".join(_strings(values))
    if len(text) % 2:
        text += padding
    try:
        return text.encode("latin_1")
    except UnicodeEncodeError:  # pydicom raises: its path says so
        raise _Decline from None


def _person_name(value) -> str:
    """A JSON person name as ``from_json`` makes it, then PersonName's groups (trailing empty ones dropped)."""
    if type(value) is not dict:
        raise _Decline
    groups = []
    for label in _PN_GROUPS:
        group = value.get(label, "")
        if type(group) is not str:
            raise _Decline
        groups.append(group)
    while groups and not groups[-1]:
        groups.pop()
    return "=".join(groups)


def _is(values: list) -> bytes:
    for value in values:
        if type(value) is not int:
            raise _Decline
    try:
        text = "\\".join([str(value) for value in values])
    except ValueError:  # more digits than Python converts
        raise _Decline from None
    return (text + " " if len(text) % 2 else text).encode("ascii")


def _ds(values: list) -> bytes:
    texts = []
    for value in values:
        if type(value) is not float and type(value) is not int:
            raise _Decline
        number = float(value)
        if not math.isfinite(number):
            raise _Decline
        texts.append(repr(number))  # str(DSfloat(number)): the float's repr
    text = "\\".join(texts)
    return (text + " " if len(text) % 2 else text).encode("ascii")


def _numbers(values: list, vr: str, order: str) -> bytes:
    expected = float if vr in _FLOAT_VRS else int
    for value in values:
        kind = type(value)
        if kind is not expected and not (kind is int and expected is float):
            raise _Decline
    try:
        return struct.pack(f"{order}{len(values)}{_NUMBER_FORMATS[vr]}", *values)
    except (struct.error, OverflowError):
        raise _Decline from None


# --- headers ------------------------------------------------------------------------------------------------


class _Syntax:
    """Element headers of one uncompressed transfer syntax."""

    def __init__(self, implicit: bool, little: bool) -> None:
        self.order = "<" if little else ">"
        self.implicit = implicit
        self._implicit = struct.Struct(self.order + "HHL").pack
        self._short = struct.Struct(self.order + "HH2sH").pack
        self._long = struct.Struct(self.order + "HH2sHL").pack

    def header(self, tag: int, vr: str, length: int) -> bytes:
        if self.implicit:
            return self._implicit(tag >> 16, tag & 0xFFFF, length)
        if vr in _LONG_VRS:
            return self._long(tag >> 16, tag & 0xFFFF, vr.encode("ascii"), 0, length)
        if length > 0xFFFF:
            raise _Decline  # pydicom writes it as UN, with a warning
        return self._short(tag >> 16, tag & 0xFFFF, vr.encode("ascii"), length)


_SYNTAXES = {
    IMPLICIT_VR_LITTLE_ENDIAN: _Syntax(True, True),
    EXPLICIT_VR_LITTLE_ENDIAN: _Syntax(False, True),
    EXPLICIT_VR_BIG_ENDIAN: _Syntax(False, False),
}


# --- the identifier -----------------------------------------------------------------------------------------


def encode_identifier(result: dict, level: str, requested: Optional[Sequence[str]],
                      transfer_syntax: str) -> Optional[bytes]:
    """The response identifier's bytes, exactly as the pydicom path writes them; None when unsure.

    ``result`` is a match as DICOM JSON, ``level`` the Query/Retrieve Level,
    ``requested`` the request's Specific Character Set (its values, or None)
    and ``transfer_syntax`` the presentation context's.
    """
    syntax = _SYNTAXES.get(transfer_syntax)
    if syntax is None or not compat.pydicom_converts_json_by_default():
        return None
    try:
        return _encode(result, level, requested, syntax)
    except _Decline:
        return None


def _encode(result: dict, level: str, requested: Optional[Sequence[str]], syntax: _Syntax) -> bytes:
    if requested and not known_character_set(requested):
        requested = None  # never echoed
    if requested and (len(requested) != 1 or requested[0] not in SIMPLE_CHARACTER_SETS):
        raise _Decline
    # (tag, vr, bytes) of the elements whose bytes do not depend on the character set, and
    # (tag, vr, strings) of those that do (text and person names)
    written: List[Tuple[int, str, bytes]] = []
    texts: List[Tuple[int, str, List[str]]] = []
    ascii_only = True
    for key, entry in result.items():
        tag = _TAGS.get(key)
        if tag is None:
            tag = _tag(key)
        if type(entry) is not dict:
            raise _Decline
        vr = entry.get("vr")
        if vr not in _KNOWN_VRS or "InlineBinary" in entry or "BulkDataURI" in entry:
            raise _Decline
        values = entry.get("Value")
        if values is None or (type(values) is list and not values):
            written.append((tag, vr, b""))  # no value: length 0
            continue
        if type(values) is not list:
            raise _Decline
        if vr in _TEXT_VRS:
            strings = _strings(values)
        elif vr == "PN":
            strings = [_person_name(value) for value in values]
        else:
            written.append((tag, vr, _value(vr, values, syntax.order)))
            continue
        texts.append((tag, vr, strings))
        if ascii_only:
            ascii_only = all([text.isascii() for text in strings])

    # response_character_set: ASCII values go in the request's character set or none; others in the
    # request's when it can carry every one of them, else in UTF-8
    if ascii_only:
        charset = requested or None
        encoded = _encode_texts(texts, SIMPLE_CHARACTER_SETS[requested[0]] if requested else _DEFAULT_CODEC)
    else:
        charset = requested
        encoded = _encode_texts(texts, SIMPLE_CHARACTER_SETS[requested[0]]) if requested else None
        if encoded is None:
            charset = _UTF8
            encoded = _encode_texts(texts, _UTF8_CODEC)
    if encoded is None:
        raise _Decline  # lone surrogates, say: pydicom warns and replaces

    written.extend(encoded)
    if charset:
        written.append((_CHARSET, "CS", _default_string(list(charset), " ")))
    written.append((_LEVEL, "CS", _default_string([level], " ")))
    written.sort(key=_first)
    header = syntax.header
    parts = []
    previous = -1
    for tag, vr, value in written:
        if tag == previous:
            raise _Decline  # the same tag twice (our own two among them): pydicom keeps one
        previous = tag
        parts.append(header(tag, vr, len(value)))
        parts.append(value)
    return b"".join(parts)


def _value(vr: str, values: list, order: str) -> bytes:
    """The bytes of a non-empty value whose encoding does not depend on the character set."""
    if vr in _STRING_VRS:
        return _default_string(values, " ")
    if vr == "UI":
        return _default_string([uid.strip() for uid in _strings(values)], "\x00")  # UID() strips
    if vr == "IS":
        return _is(values)
    if vr == "DS":
        return _ds(values)
    if vr in _NUMBER_FORMATS:
        return _numbers(values, vr, order)
    raise _Decline  # a sequence with items


_HEX = frozenset("0123456789ABCDEF")
_TAGS: Dict[str, int] = {}


def _tag(key) -> int:
    """The tag of a JSON key (``GGGGEEEE``, upper-case hex, as QueryRun writes them); cached."""
    if type(key) is not str or len(key) != 8 or not _HEX.issuperset(key):
        raise _Decline
    tag = int(key, 16)
    if tag & 0xFFFF == 0 or tag in _LUT_DESCRIPTORS or tag == _CHARSET or tag == _LEVEL:
        # a group length (pydicom skips some), pydicom's special case of US or SS, or one of the two we
        # add (a match's own Specific Character Set would change how pydicom writes its text)
        raise _Decline
    if len(_TAGS) < 65536:
        _TAGS[key] = tag
    return tag


def _first(item: tuple) -> int:
    return item[0]


def _encode_texts(texts: List[Tuple[int, str, List[str]]], codec: str) -> Optional[List[Tuple[int, str, bytes]]]:
    """write_text and write_PN in ``codec``: each value encoded, joined by backslash, space padded; None when a
    value does not encode."""
    out = []
    try:
        for tag, vr, strings in texts:
            value = b"\\".join([text.encode(codec) for text in strings])
            if len(value) % 2:
                value += b" "
            out.append((tag, vr, value))
    except UnicodeEncodeError:
        return None
    return out
