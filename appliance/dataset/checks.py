"""What every kept object must pass, wherever it is kept (the archive, memory): blocking functions, no DIMSE.

A received data set is checked once: that it is whole (:mod:`.structure`),
that its attributes can be read (:mod:`.fastscan` for the common case,
pydicom for the rest), that its UIDs are the command's and are UIDs, and
whether its Pixel Data needs the statement's one coercion (OW to OB when
Bits Allocated is 8).  A check that fails raises :class:`Refused` with a
:class:`Refusal` kind and a comment; the C-STORE SCP turns kinds into
statuses, so nothing here knows DIMSE.
"""

from __future__ import annotations

import enum
import io
import mmap
import os
import struct
from dataclasses import dataclass
from typing import List, Optional, Tuple

from pydicom import dcmread
from pydicom.filereader import read_dataset

from ..dicom.uids import (
    EXPLICIT_VR_BIG_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    UNCOMPRESSED_TRANSFER_SYNTAXES,
    is_received_uid,
)
from . import structure
from .deflate import DEFLATED, InflateLimits, NotInflatable, TooLarge, read_deflated
from .fastscan import ALL_LEVELS, scan
from .metadata import ObjectMetadata, extract

__all__ = [
    "Refusal",
    "Refused",
    "Coercion",
    "ObjectDescription",
    "Kept",
    "PLAIN_SYNTAXES",
    "coerce_in_memory",
    "check_head",
    "check_metadata",
    "inspect",
    "parse_memory",
    "parse_file",
    "inspect_memory",
    "inspect_deflated",
    "inspect_head",
    "inspect_file",
    "inspect_deflated_file",
    "refuse_unless_whole",
    "refuse_unless_whole_file",
    "apply_coercion",
]

#: Transfer syntaxes whose data set bytes pydicom can read straight from memory
#: (deflated ones are inflated as a stream: :mod:`.deflate`).
PLAIN_SYNTAXES = frozenset(UNCOMPRESSED_TRANSFER_SYNTAXES) | {
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.5",
}
PIXEL_DATA_LE = b"\xe0\x7f\x10\x00"
PIXEL_DATA_BE = b"\x7f\xe0\x00\x10"


class Refusal(enum.Enum):
    """Why an object is not kept (the C-STORE SCP answers each with its status)."""

    OUT_OF_RESOURCES = "out of resources"  # no room, a limit passed, the disk full (A700)
    NOT_MATCHING = "does not match"  # its UIDs are not the command's, missing, or a series of another study (A900)
    NOT_UNDERSTOOD = "cannot be understood"  # not whole, not parseable, a UID that is no UID (C000)
    DUPLICATE = "duplicate"  # stored already, and duplicates are refused (0111)
    NOT_WANTED = "not wanted"  # nobody asked for it, and unsolicited objects are refused (0124)
    FAILED = "failed"  # an unexpected error while keeping it (C001)


class Refused(Exception):
    """An object that is not kept: why (:class:`Refusal`) and an explanation for the Error Comment."""

    def __init__(self, kind: Refusal, comment: str) -> None:
        super().__init__(comment)
        self.kind = kind
        self.comment = comment


@dataclass(frozen=True)
class ObjectDescription:
    """What the command says of the data set that follows it."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    source_ae: str
    #: a C-MOVE's sub-operation names the move that caused it (0000,1030)/(0000,1031); None otherwise
    move_originator: Optional[str] = None
    move_message_id: Optional[int] = None


@dataclass(frozen=True)
class Kept:
    """An object kept: whether it was coerced, and what happened when it was there already (None: new)."""

    coerced: bool = False
    duplicate: Optional[str] = None


@dataclass(frozen=True)
class Coercion:
    """Where a top-level Pixel Data element sent as OW with Bits Allocated 8 starts, to become OB."""

    offset: int
    big_endian: bool
    length: int


def _at_pixel_data(tag, vr, length) -> bool:
    return tag == 0x7FE00010


def inspect(ds, pixel_offset: int, pixel_header: bytes, sop_class_uid: str, sop_instance_uid: str,
            transfer_syntax: str) -> Tuple[ObjectMetadata, Optional[Coercion]]:
    """Check a data set parsed by pydicom against its command; its metadata and the coercion it needs.

    ``pixel_header`` is the 12 bytes at ``pixel_offset`` (tag, VR, reserved,
    length of an explicit VR element).
    """
    try:
        metadata = extract(ds)
    except ValueError as error:
        raise Refused(Refusal.NOT_MATCHING, str(error)) from None
    except Exception as error:
        raise Refused(Refusal.NOT_UNDERSTOOD, f"cannot read the data set's attributes: {error}") from None
    return check_metadata(metadata, pixel_offset, pixel_header, sop_class_uid, sop_instance_uid, transfer_syntax)


def check_metadata(metadata: ObjectMetadata, pixel_offset: int, pixel_header: bytes, sop_class_uid: str,
                   sop_instance_uid: str, transfer_syntax: str) -> Tuple[ObjectMetadata, Optional[Coercion]]:
    """:func:`inspect` once the metadata is known (from pydicom or :mod:`.fastscan`): the UIDs against the
    command, and the coercion the pixel data header calls for."""
    if metadata.sop_instance_uid != sop_instance_uid:
        raise Refused(Refusal.NOT_MATCHING, "SOP Instance UID differs from the command's Affected SOP Instance UID")
    if metadata.sop_class_uid != sop_class_uid:
        raise Refused(Refusal.NOT_MATCHING, "SOP Class UID differs from the command's Affected SOP Class UID")
    for keyword, uid in (("Study Instance UID", metadata.study_instance_uid),
                         ("Series Instance UID", metadata.series_instance_uid)):
        if not is_received_uid(uid):
            raise Refused(Refusal.NOT_MATCHING, f"{keyword} is not a valid UID")
    coercion = None
    big_endian = transfer_syntax == EXPLICIT_VR_BIG_ENDIAN
    if metadata.bits_allocated == 8 and transfer_syntax in (EXPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN):
        if pixel_header[:4] == (PIXEL_DATA_BE if big_endian else PIXEL_DATA_LE) and pixel_header[4:6] == b"OW":
            length = struct.unpack(">L" if big_endian else "<L", pixel_header[8:12])[0]
            coercion = Coercion(pixel_offset, big_endian, length)
    return metadata, coercion


def _parse_or_refuse(parse, *args):
    try:
        return parse(*args)
    except Exception as error:  # pydicom raises many kinds on garbage
        raise Refused(Refusal.NOT_UNDERSTOOD, f"cannot parse data set: {type(error).__name__}: {error}") from None


def parse_memory(data: bytes, header_length: int, transfer_syntax: str):
    """pydicom's reading of a data set in memory up to its Pixel Data: (data set, pixel offset + header_length,
    the 12 bytes there)."""
    implicit = transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN
    reader = io.BytesIO(data)
    ds = read_dataset(reader, implicit, transfer_syntax != EXPLICIT_VR_BIG_ENDIAN, stop_when=_at_pixel_data)
    offset = reader.tell()
    return ds, header_length + offset, data[offset : offset + 12]


def parse_file(path: str):
    """pydicom's reading of a Part 10 file up to its Pixel Data: (data set, pixel offset, the 12 bytes there)."""
    with open(path, "rb") as reader:
        ds = dcmread(reader, stop_before_pixels=True, defer_size=1 << 20)
        offset = reader.tell()
        return ds, offset, reader.read(12)


def refuse_unless_whole(data, start: int, end: int, transfer_syntax: str, origin: Optional[int] = None) -> None:
    """NOT_UNDERSTOOD for a data set whose declared lengths do not fit (:mod:`.structure`); ``data[start:end]``
    may be a run of its whole top-level elements (see :func:`.structure.problem`)."""
    problem = structure.problem(data, start, end, transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN,
                                transfer_syntax != EXPLICIT_VR_BIG_ENDIAN, origin)
    if problem is not None:
        raise Refused(Refusal.NOT_UNDERSTOOD, f"data set not whole: {problem}")


def refuse_unless_whole_file(path: str, header_length: int, transfer_syntax: str) -> None:
    """:func:`refuse_unless_whole` for a data set in a file, mapped rather than read (only headers are touched)."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size <= header_length:
            return
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            refuse_unless_whole(mapped, header_length, size, transfer_syntax)


def inspect_memory(data: bytes, header_length: int, sop_class_uid: str, sop_instance_uid: str,
                   transfer_syntax: str) -> Tuple[ObjectMetadata, Optional[Coercion]]:
    """A whole data set in memory checked: whole, then its attributes by the fast scanner, or by pydicom when
    the scanner cannot vouch for them, against the command.  ``header_length`` is added to offsets."""
    refuse_unless_whole(data, 0, len(data), transfer_syntax)
    fast = scan(data, header_length, transfer_syntax)
    if fast is not None:
        return check_metadata(*fast, sop_class_uid, sop_instance_uid, transfer_syntax)
    ds, offset, pixel_header = _parse_or_refuse(parse_memory, data, header_length, transfer_syntax)
    return inspect(ds, offset, pixel_header, sop_class_uid, sop_instance_uid, transfer_syntax)


def inspect_head(prefix: bytes, header_length: int, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str,
                 levels: frozenset = ALL_LEVELS, nested: Optional[List[Tuple[int, int]]] = None
                 ) -> Optional[Tuple[ObjectMetadata, Optional[Coercion], int, Optional[int]]]:
    """An object checked from the first part of its data set: its metadata, the coercion it needs, where its Pixel
    Data element starts and where the data set ends if it ends with that element (the end its header declares;
    None for undefined length: how large it will likely be); or None when that part does not reach the Pixel Data
    element (then only the whole can say).  Offsets count from the start of ``prefix`` plus ``header_length``.
    ``levels``, ``nested``: see :func:`.fastscan.scan`.  Wholeness is not checked here."""
    fast = scan(prefix, header_length, transfer_syntax, levels, nested)
    if fast is None:
        return None
    metadata, offset, pixel_header = fast
    if len(pixel_header) < 12 or pixel_header[:4] not in (PIXEL_DATA_LE, PIXEL_DATA_BE):
        return None  # the scan ran to the end of the part, not to the end of the data set
    metadata, coercion = check_metadata(metadata, offset, pixel_header, sop_class_uid, sop_instance_uid,
                                        transfer_syntax)
    return metadata, coercion, offset, _pixel_data_end(offset, pixel_header, transfer_syntax)


def check_head(prefix: bytes, description: ObjectDescription, levels: frozenset = ALL_LEVELS):
    """What a sink checks of the head of a data set arriving (``prefix``, its first fragments): :func:`inspect_head`
    (offsets from the data set's start), and the head whole (its elements' lengths fit).  None while the prefix
    does not reach Pixel Data (or the scanner cannot vouch for it: the whole is checked at the end); Refused for an
    object that is not the command's, or not whole, which need not wait for the rest."""
    nested: List[Tuple[int, int]] = []
    syntax = description.transfer_syntax
    head = inspect_head(prefix, 0, description.sop_class_uid, description.sop_instance_uid, syntax, levels, nested)
    if head is not None:  # the rest is walked once it is there: together they say what the whole says
        # the scan found each element before Pixel Data to fit, one after the other, but for those holding others:
        # they are walked; one not whole has the whole head walked, for that walk's verdict and words
        implicit, little = syntax == IMPLICIT_VR_LITTLE_ENDIAN, syntax != EXPLICIT_VR_BIG_ENDIAN
        if any(structure.problem(prefix, start, end, implicit, little, 0) is not None for start, end in nested):
            refuse_unless_whole(prefix, 0, head[2], syntax)
    return head


def _pixel_data_end(offset: int, pixel_header: bytes, transfer_syntax: str) -> Optional[int]:
    if transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN:
        (length,), start = struct.unpack("<L", pixel_header[4:8]), offset + 8
    else:
        big_endian = transfer_syntax == EXPLICIT_VR_BIG_ENDIAN
        (length,), start = struct.unpack(">L" if big_endian else "<L", pixel_header[8:12]), offset + 12
    return None if length == 0xFFFFFFFF else start + length


def inspect_file(path: str, header_length: int, sop_class_uid: str, sop_instance_uid: str,
                 transfer_syntax: str) -> Tuple[ObjectMetadata, Optional[Coercion]]:
    """A Part 10 file (its data set after ``header_length`` bytes) checked: whole, read back by pydicom up to
    the pixel data, against the command."""
    refuse_unless_whole_file(path, header_length, transfer_syntax)
    ds, offset, pixel_header = _parse_or_refuse(parse_file, path)
    return inspect(ds, offset, pixel_header, sop_class_uid, sop_instance_uid, transfer_syntax)


def inspect_deflated_file(path: str, header_length: int, sop_class_uid: str, sop_instance_uid: str,
                          limits: InflateLimits, spill_dir: Optional[str] = None) -> ObjectMetadata:
    """A deflated data set in a file checked by inflating it as a stream within ``limits``, never whole."""
    with open(path, "rb") as handle:
        return inspect_deflated(handle, header_length, sop_class_uid, sop_instance_uid, limits, spill_dir)


def inspect_deflated(handle, offset: int, sop_class_uid: str, sop_instance_uid: str, limits: InflateLimits,
                     spill_dir: Optional[str] = None) -> ObjectMetadata:
    """A deflated data set starting at ``offset`` of the file object ``handle``, checked by inflating it as a
    stream within ``limits``; Refused when it is not acceptable.  OSError (the file's) passes through."""
    try:
        metadata, _ = read_deflated(handle, offset, limits, spill_dir)
    except TooLarge as error:
        raise Refused(Refusal.OUT_OF_RESOURCES, str(error)) from None
    except NotInflatable as error:
        raise Refused(Refusal.NOT_UNDERSTOOD, str(error)) from None
    except ValueError as error:
        raise Refused(Refusal.NOT_MATCHING, str(error)) from None
    except OSError:
        raise
    except Exception as error:  # pydicom raises many kinds on garbage
        raise Refused(Refusal.NOT_UNDERSTOOD, f"cannot parse data set: {type(error).__name__}: {error}") from None
    return check_metadata(metadata, 0, b"", sop_class_uid, sop_instance_uid, DEFLATED)[0]


def apply_coercion(handle, coercion: Coercion) -> None:
    """Rewrite a top-level Pixel Data element from OW to OB in place (explicit VR only), in an open file or a
    BytesIO.  In big endian OW holds byte-swapped 16-bit words, so the bytes of each pair are swapped back
    into plain byte order."""
    handle.seek(coercion.offset + 4)
    if handle.read(2) != b"OW":
        raise ValueError("Pixel Data is not encoded as OW")
    handle.seek(coercion.offset + 4)
    handle.write(b"OB")
    if not coercion.big_endian or coercion.length in (0, 0xFFFFFFFF):
        return
    start = coercion.offset + 12
    chunk = 1 << 20
    done = 0
    while done < coercion.length:
        size = min(chunk, coercion.length - done)
        handle.seek(start + done)
        data = bytearray(handle.read(size))
        if len(data) % 2:
            data = data[:-1]
        data[0::2], data[1::2] = data[1::2], data[0::2]
        handle.seek(start + done)
        handle.write(data)
        done += len(data) or size


class _BufferFile:
    """A bytearray seen as a file (seek, read, write in place), for the coercion: no copy of the data set."""

    def __init__(self, buffer: bytearray) -> None:
        self.buffer = buffer
        self.position = 0

    def seek(self, position: int) -> None:
        self.position = position

    def read(self, size: int) -> bytes:
        data = bytes(self.buffer[self.position:self.position + size])
        self.position += len(data)
        return data

    def write(self, data: bytes) -> None:
        self.buffer[self.position:self.position + len(data)] = data
        self.position += len(data)


def coerce_in_memory(data, coercion: Coercion) -> bytearray:
    """:func:`apply_coercion` to a data set in memory: in place in a bytearray, else in a copy (bytes)."""
    buffer = data if type(data) is bytearray else bytearray(data)
    apply_coercion(_BufferFile(buffer), coercion)
    return buffer
