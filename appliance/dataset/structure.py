"""Whether a received data set is whole: every declared length fits (PS3.5 7.1, 7.5, A.4), pure.

pydicom reads a value declared longer than what is left as whatever is
left, and parsing stops at the pixel data anyway, so a PN declaring 200
bytes with 2 present, a sequence longer than the data set or a Pixel Data
element declaring 2 GB with 10 bytes sent would be stored as if whole.
:func:`problem` walks the element headers of the whole data set (the
values are skipped, never decoded), into sequences and items of defined and
undefined length and encapsulated pixel data, and says what is wrong, or
None.  It works on anything sliceable (bytes, or an ``mmap`` of the
temporary file for a large object), iteratively, with nesting bounded.
"""

from __future__ import annotations

import functools
import struct
from typing import List, Optional, Tuple

from pydicom.datadict import dictionary_VR

__all__ = ["problem", "holds_items", "MAX_DEPTH"]

#: Sequences nested deeper than this are refused (pydicom would recurse until Python gives up).
MAX_DEPTH = 64

_LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"))
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010


class _Broken(Exception):
    pass


@functools.lru_cache(maxsize=4096)
def holds_items(tag: int) -> bool:
    """Whether an implicit VR element of defined length with this tag holds items (the dictionary says SQ): the
    walk goes into it."""
    try:
        return dictionary_VR(tag) == "SQ"
    except KeyError:
        return False


def problem(data, start: int, end: int, implicit: bool, little: bool, origin: Optional[int] = None) -> Optional[str]:
    """What makes the data set in ``data[start:end]`` not whole, or None.

    The range may be a run of whole top-level elements of a larger data set (its head, then the rest from
    where the head ended: together they say what the whole says); offsets in the answer count from
    ``origin`` (default ``start``), where the data set begins."""
    try:
        _walk(data, start, end, implicit, little, start if origin is None else origin)
    except _Broken as error:
        return str(error)
    return None


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


#: by byte order: an explicit VR element's header (group, element, VR, 16-bit length), an implicit VR one's
#: (group, element, length), and a 32-bit length
_EXPLICIT = {True: struct.Struct("<HH2sH").unpack_from, False: struct.Struct(">HH2sH").unpack_from}
_IMPLICIT = {True: struct.Struct("<HHL").unpack_from, False: struct.Struct(">HHL").unpack_from}
_U32 = {True: struct.Struct("<L").unpack_from, False: struct.Struct(">L").unpack_from}


def _plain_explicit(data, position: int, bound: int, little: bool) -> int:
    """Past the plain explicit VR elements from ``position``: of defined length, no sequence, within ``bound``.
    Stops (and returns where) at the first element that is anything else, for :func:`_walk` to decide.

    Most of a data set is plain elements one after the other: this loop is the walk's hot path."""
    header, u32 = _EXPLICIT[little], _U32[little]
    long_vrs = _LONG_VRS
    try:
        while True:
            group, _, vr, length = header(data, position)
            if group == 0xFFFE or vr == b"SQ":
                return position
            if vr in long_vrs:
                (length,) = u32(data, position + 8)
                if length == _UNDEFINED:
                    return position
                after = position + 12 + length
            else:
                after = position + 8 + length
            if after > bound:
                return position
            position = after
    except struct.error:  # fewer than a header's bytes left
        return position


def _plain_implicit(data, position: int, bound: int, little: bool) -> int:
    """:func:`_plain_explicit` for implicit VR: a sequence is known by its tag (PS3.5 7.1.3)."""
    header = _IMPLICIT[little]
    try:
        while True:
            group, element, length = header(data, position)
            if group == 0xFFFE or length == _UNDEFINED:
                return position
            after = position + 8 + length
            if after > bound or (length and holds_items(group << 16 | element)):
                return position
            position = after
    except struct.error:
        return position


def _walk(data, start: int, end: int, implicit: bool, little: bool, origin: int) -> None:
    order = "<" if little else ">"
    u16, u32 = struct.Struct(order + "H"), struct.Struct(order + "L")
    tag_struct = struct.Struct(order + "HH")

    def tag_at(position: int) -> int:
        group, element = tag_struct.unpack_from(data, position)
        return (group << 16) | element

    # frames: (kind, limit, bound, implicit) where kind is "set" (elements up to limit, or to an item
    # delimiter when limit is None), "items" (items up to limit, or to a sequence delimiter when None) or
    # "fragments"; bound is the limit of the nearest enclosing frame of defined length
    frames: List[Tuple[str, Optional[int], int, bool]] = [("set", end, end, implicit)]
    position = start
    while frames:
        kind, limit, bound, frame_implicit = frames[-1]
        if kind == "set":  # the plain elements in one go; what follows them is decided below
            position = (_plain_implicit if frame_implicit else _plain_explicit)(data, position, bound, little)
        if limit is not None and position == limit:
            frames.pop()
            continue
        if bound - position < 8:
            if limit is None:
                raise _Broken("a sequence or item of undefined length has no delimiter")
            raise _Broken(f"{bound - position} stray bytes where an element should start")
        tag = tag_at(position)
        if kind != "set" or tag >> 16 == 0xFFFE:
            (length,) = u32.unpack_from(data, position + 4)
            position += 8
            if tag == _ITEM_END and kind == "set" and limit is None:
                frames.pop()
                continue
            if tag == _SEQUENCE_END and kind in ("items", "fragments") and limit is None:
                frames.pop()
                continue
            if tag != _ITEM or kind == "set":
                raise _Broken(f"unexpected {_tag_text(tag)} at offset {position - 8 - origin}")
            if kind == "fragments":
                if length == _UNDEFINED or position + length > bound:
                    raise _Broken("a pixel data fragment runs past the data set")
                position += length
                continue
            if length == _UNDEFINED:
                frames.append(("set", None, bound, frame_implicit))
            else:
                if position + length > bound:
                    raise _Broken(f"an item declares {length} bytes, {bound - position} remain")
                frames.append(("set", position + length, position + length, frame_implicit))
            if len(frames) > 2 * MAX_DEPTH:
                raise _Broken(f"sequences nested more than {MAX_DEPTH} deep")
            continue
        if frame_implicit:
            vr = None
            (length,) = u32.unpack_from(data, position + 4)
            position += 8
        else:
            vr = bytes(data[position + 4:position + 6])
            if vr in _LONG_VRS:
                if bound - position < 12:
                    raise _Broken(f"element {_tag_text(tag)}'s header is cut short")
                (length,) = u32.unpack_from(data, position + 8)
                position += 12
            else:
                (length,) = u16.unpack_from(data, position + 6)
                position += 8
        if length == _UNDEFINED:
            if tag == _PIXEL_DATA:
                frames.append(("fragments", None, bound, frame_implicit))
            elif vr in (None, b"SQ"):
                frames.append(("items", None, bound, frame_implicit))
            elif vr == b"UN":  # PS3.5 6.2.2: its items are in Implicit VR Little Endian
                frames.append(("items", None, bound, True))
            else:
                raise _Broken(f"element {_tag_text(tag)} ({vr.decode('ascii', 'replace')}) has an undefined length")
            if len(frames) > 2 * MAX_DEPTH:
                raise _Broken(f"sequences nested more than {MAX_DEPTH} deep")
            continue
        if position + length > bound:
            raise _Broken(f"element {_tag_text(tag)} declares {length} bytes, {bound - position} remain")
        if vr == b"SQ" or (vr is None and length and holds_items(tag)):
            frames.append(("items", position + length, position + length, frame_implicit))
            if len(frames) > 2 * MAX_DEPTH:
                raise _Broken(f"sequences nested more than {MAX_DEPTH} deep")
            continue
        position += length
