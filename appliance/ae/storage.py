"""The Storage Service Class as SCP (PS3.4 Annex B) over the filesystem archive.

Each C-STORE data set streams to a temporary file as its P-DATA fragments
arrive: fragments are gathered into chunks written on the archive's I/O
threads, and the association stops reading while more than
``MAX_IN_FLIGHT`` bytes wait to be written, so the memory one association
uses does not grow with the object.  Once the data set is whole it is
checked (parsed up to the pixel data, UIDs compared with the command),
coerced where the statement says (Pixel Data OW to OB when Bits Allocated
is 8), fsynced, installed and indexed; only then is Success sent.
"""

from __future__ import annotations

import io
import mmap
import os
import sqlite3
import struct
from dataclasses import dataclass
from typing import List, Mapping, Optional, Tuple

from pydicom import dcmread
from pydicom.filereader import read_dataset
from twisted.internet import defer
from zope.interface import implementer

from ..archive.archive import Archive, Duplicate, Misfiled, OutOfResources, StoredObject, StoreOutcome
from ..archive.store import ObjectStore, TempObject, part10_header, pixel_data_coercion
from ..dataset import structure
from ..dataset.deflate import DEFLATED, InflateLimits, NotInflatable, TooLarge, read_deflated
from ..dataset.fastscan import scan
from ..dataset.metadata import ObjectMetadata, extract
from ..dicom import dimse as D
from ..dicom import status as S
from ..dicom.uids import (
    EXPLICIT_VR_BIG_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    UNCOMPRESSED_TRANSFER_SYNTAXES,
    is_received_uid,
)
from ..interfaces import IDataSetConsumer, IServiceClass
from ..logs import logger

__all__ = ["StorageService", "IncomingObject", "StoreResult", "DUPLICATE_REJECTED"]

_log = logger("appliance.storage")

#: Write to disk in chunks of this size.
CHUNK = 256 * 1024
#: Stop reading from the peer while this much is waiting to be written.
MAX_IN_FLIGHT = 1024 * 1024
#: PS3.7 C.4 "Duplicate SOP instance", answered when on_duplicate = "reject".
DUPLICATE_REJECTED = 0x0111

#: Transfer syntaxes whose data set bytes pydicom can read straight from memory
#: (deflated ones are inflated as a stream: dataset/deflate.py).
_PLAIN_SYNTAXES = frozenset(UNCOMPRESSED_TRANSFER_SYNTAXES) | {
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.5",
}
_PIXEL_DATA_LE = b"\xe0\x7f\x10\x00"
_PIXEL_DATA_BE = b"\x7f\xe0\x00\x10"


@dataclass(frozen=True)
class StoreResult:
    status: int
    comment: Optional[str] = None


class _Refused(Exception):
    """A C-STORE that cannot be stored, with its status and Error Comment."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment


def _at_pixel_data(tag, vr, length) -> bool:
    return tag == 0x7FE00010


@dataclass(frozen=True)
class _Coercion:
    """Where a top-level Pixel Data element sent as OW with Bits Allocated 8 starts, to become OB."""

    offset: int
    big_endian: bool
    length: int


def inspect(
    ds,
    pixel_offset: int,
    pixel_header: bytes,
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax: str,
):
    """Check a parsed data set against its command; return its metadata and the coercion it needs.

    ``pixel_header`` is the 12 bytes at ``pixel_offset`` (tag, VR, reserved,
    length of an explicit VR element).  Raises :class:`_Refused` with the
    status PS3.4 calls for.
    """
    try:
        metadata = extract(ds)
    except ValueError as error:
        raise _Refused(0xA900, str(error)) from None
    except Exception as error:
        raise _Refused(S.CANNOT_UNDERSTAND, f"cannot read the data set's attributes: {error}") from None
    return check_metadata(metadata, pixel_offset, pixel_header, sop_class_uid, sop_instance_uid, transfer_syntax)


def check_metadata(
    metadata: ObjectMetadata,
    pixel_offset: int,
    pixel_header: bytes,
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax: str,
):
    """:func:`inspect` once the metadata is known (from pydicom or :mod:`..dataset.fastscan`): the UIDs
    against the command, and the coercion the pixel data header calls for."""
    if metadata.sop_instance_uid != sop_instance_uid:
        raise _Refused(0xA900, "SOP Instance UID differs from the command's Affected SOP Instance UID")
    if metadata.sop_class_uid != sop_class_uid:
        raise _Refused(0xA900, "SOP Class UID differs from the command's Affected SOP Class UID")
    for keyword, uid in (("Study Instance UID", metadata.study_instance_uid),
                         ("Series Instance UID", metadata.series_instance_uid)):
        if not is_received_uid(uid):
            raise _Refused(0xA900, f"{keyword} is not a valid UID")
    coercion = None
    big_endian = transfer_syntax == EXPLICIT_VR_BIG_ENDIAN
    if metadata.bits_allocated == 8 and transfer_syntax in (EXPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN):
        if pixel_header[:4] == (_PIXEL_DATA_BE if big_endian else _PIXEL_DATA_LE) and pixel_header[4:6] == b"OW":
            length = struct.unpack(">L" if big_endian else "<L", pixel_header[8:12])[0]
            coercion = _Coercion(pixel_offset, big_endian, length)
    return metadata, coercion


def _parse_or_refuse(parse, *args):
    try:
        return parse(*args)
    except Exception as error:  # pydicom raises many kinds on garbage
        raise _Refused(S.CANNOT_UNDERSTAND, f"cannot parse data set: {type(error).__name__}: {error}") from None


def _parse_memory(data: bytes, header_length: int, transfer_syntax: str):
    implicit = transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN
    reader = io.BytesIO(data)
    ds = read_dataset(reader, implicit, transfer_syntax != EXPLICIT_VR_BIG_ENDIAN, stop_when=_at_pixel_data)
    offset = reader.tell()
    return ds, header_length + offset, data[offset : offset + 12]


def _parse_file(path: str):
    with open(path, "rb") as reader:
        ds = dcmread(reader, stop_before_pixels=True, defer_size=1 << 20)
        offset = reader.tell()
        return ds, offset, reader.read(12)


def inspect_memory(data: bytes, header_length: int, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str):
    """Worker thread: parse a data set still in memory (no file read back) and inspect it.

    The fast path (:func:`..dataset.fastscan.scan`) reads the common case straight from the bytes; what it
    cannot vouch for is parsed by pydicom.
    """
    _refuse_unless_whole(data, 0, len(data), transfer_syntax)
    fast = scan(data, header_length, transfer_syntax)
    if fast is not None:
        return check_metadata(*fast, sop_class_uid, sop_instance_uid, transfer_syntax)
    ds, offset, pixel_header = _parse_or_refuse(_parse_memory, data, header_length, transfer_syntax)
    return inspect(ds, offset, pixel_header, sop_class_uid, sop_instance_uid, transfer_syntax)


def _refuse_unless_whole(data, start: int, end: int, transfer_syntax: str) -> None:
    """C000 for a data set whose declared lengths do not fit (:mod:`..dataset.structure`)."""
    problem = structure.problem(data, start, end, transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN,
                                transfer_syntax != EXPLICIT_VR_BIG_ENDIAN)
    if problem is not None:
        raise _Refused(S.CANNOT_UNDERSTAND, f"data set not whole: {problem}")


def _refuse_unless_whole_file(path: str, header_length: int, transfer_syntax: str) -> None:
    """:func:`_refuse_unless_whole` for a data set in a file, mapped rather than read (only headers are touched)."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size <= header_length:
            return
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            _refuse_unless_whole(mapped, header_length, size, transfer_syntax)


def inspect_prefix(prefix: bytes, header_length: int, sop_class_uid: str, sop_instance_uid: str,
                   transfer_syntax: str):
    """Worker thread: check an object from the first chunk of its data set, or None when that chunk
    does not reach the Pixel Data element (then only the whole file can say)."""
    fast = scan(prefix, header_length, transfer_syntax)
    if fast is None:
        return None
    metadata, offset, pixel_header = fast
    if len(pixel_header) < 12 or pixel_header[:4] not in (_PIXEL_DATA_LE, _PIXEL_DATA_BE):
        return None  # the scan ran to the end of the chunk, not to the end of the data set
    return check_metadata(metadata, offset, pixel_header, sop_class_uid, sop_instance_uid, transfer_syntax)


def finish_sealed(store: ObjectStore, temp: TempObject, chunks: List[bytes], header_length: int,
                  transfer_syntax: str) -> Tuple[TempObject, int]:
    """I/O thread: write the rest of a streamed object, check that it is whole, fsync it; the free space after."""
    try:
        store.write(temp, chunks)
        temp.handle.flush()
        _refuse_unless_whole_file(temp.path, header_length, transfer_syntax)
        ObjectStore.seal(temp)
    except BaseException:
        store.discard(temp)
        raise
    return temp, store.free_space()


def examine_sealed(temp: TempObject, header_length: int, sop_class_uid: str, sop_instance_uid: str,
                   transfer_syntax: str, source_ae: str) -> StoredObject:
    """I/O thread: read a sealed object back with pydicom, check it and coerce it (fsyncing again)."""
    ds, offset, pixel_header = _parse_or_refuse(_parse_file, temp.path)
    metadata, coercion = inspect(ds, offset, pixel_header, sop_class_uid, sop_instance_uid, transfer_syntax)
    if coercion is not None:
        coerce_sealed(temp, coercion)
    return StoredObject(temp, metadata, transfer_syntax, source_ae, coercion is not None)


def coerce(handle, coercion: _Coercion) -> None:
    """Apply the OW to OB coercion to an open file."""
    pixel_data_coercion(handle, coercion.offset, coercion.big_endian, coercion.length)


def examine(
    temp: TempObject,
    header_length: int,
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax: str,
    source_ae: str,
) -> StoredObject:
    """I/O thread, for an object written to its temporary file: read it back up to the pixel data,
    check it, coerce, fsync."""
    temp.handle.flush()
    _refuse_unless_whole_file(temp.path, header_length, transfer_syntax)
    ds, offset, pixel_header = _parse_or_refuse(_parse_file, temp.path)
    metadata, coercion = inspect(ds, offset, pixel_header, sop_class_uid, sop_instance_uid, transfer_syntax)
    if coercion is not None:
        coerce(temp.handle, coercion)
    ObjectStore.seal(temp)
    return StoredObject(temp, metadata, transfer_syntax, source_ae, coercion is not None)


def write_sealed(store: ObjectStore, header: bytes, data: bytes) -> Tuple[TempObject, int]:
    """I/O thread: a new temporary file holding the object, fsynced; and the free space after it."""
    temp = store.open_temp([header, data])
    try:
        ObjectStore.seal(temp)
    except BaseException:
        store.discard(temp)
        raise
    return temp, store.free_space()


def coerce_sealed(temp: TempObject, coercion: _Coercion) -> None:
    """I/O thread: apply a coercion to a sealed temporary file and fsync it again."""
    with open(temp.path, "r+b") as handle:
        coerce(handle, coercion)
        handle.flush()
        os.fsync(handle.fileno())


def examine_deflated(temp: TempObject, header_length: int, sop_class_uid: str, sop_instance_uid: str,
                     source_ae: str, limits: InflateLimits, spill_dir: str) -> StoredObject:
    """I/O thread, for a deflated object written to its temporary file: inflate it as a stream within
    ``limits`` (never whole, in memory), check it, fsync.  Stored as received, deflated."""
    temp.handle.flush()
    try:
        with open(temp.path, "rb") as handle:
            metadata, _ = read_deflated(handle, header_length, limits, spill_dir)
    except TooLarge as error:
        raise _Refused(S.OUT_OF_RESOURCES, str(error)) from None
    except NotInflatable as error:
        raise _Refused(S.CANNOT_UNDERSTAND, str(error)) from None
    except ValueError as error:
        raise _Refused(0xA900, str(error)) from None
    except OSError:
        raise
    except Exception as error:  # pydicom raises many kinds on garbage
        raise _Refused(S.CANNOT_UNDERSTAND, f"cannot parse data set: {type(error).__name__}: {error}") from None
    metadata, _ = check_metadata(metadata, 0, b"", sop_class_uid, sop_instance_uid, DEFLATED)
    ObjectStore.seal(temp)
    return StoredObject(temp, metadata, DEFLATED, source_ae, False)


def finish_streamed(store: ObjectStore, temp: TempObject, chunks: List[bytes], header_length: int,
                    sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_ae: str,
                    limits: InflateLimits = InflateLimits()) -> StoredObject:
    """I/O thread, for an object already streaming to its file: write the rest, examine, seal."""
    try:
        store.write(temp, chunks)
        if transfer_syntax == DEFLATED:
            stored = examine_deflated(temp, header_length, sop_class_uid, sop_instance_uid, source_ae, limits,
                                      store.tmp)
        else:
            stored = examine(temp, header_length, sop_class_uid, sop_instance_uid, transfer_syntax, source_ae)
    except BaseException:
        store.discard(temp)
        raise
    stored.free_space = store.free_space()
    return stored


@implementer(IDataSetConsumer)
class IncomingObject:
    """One C-STORE data set on its way to the archive."""

    def __init__(self, service: "StorageService", request) -> None:
        self.service = service
        self.request = request
        self.archive: Archive = service.archive
        command = request.command
        self.sop_class_uid = command.AffectedSOPClassUID
        self.sop_instance_uid = command.AffectedSOPInstanceUID
        self.transfer_syntax = request.context.transfer_syntax
        self.source_ae = request.association.record.calling
        self.refusal: Optional[_Refused] = None
        self.temp: Optional[TempObject] = None
        self._chunks: List[bytes] = []
        self._prefix: Optional[bytes] = None
        self._buffered = 0
        self._received = 0
        self._in_flight = 0
        self._paused = False
        for keyword, uid in (("Affected SOP Instance UID", self.sop_instance_uid),
                             ("Affected SOP Class UID", self.sop_class_uid)):
            if not is_received_uid(uid or ""):
                self.refusal = _Refused(S.CANNOT_UNDERSTAND, f"{keyword} is not a valid UID")
                self._chain: defer.Deferred = defer.succeed(None)
                return
        self._header = part10_header(
            self.sop_class_uid, self.sop_instance_uid, self.transfer_syntax,
            service.implementation_class_uid, service.implementation_version_name, self.source_ae,
        )
        # the file is created with the first chunk; a small object's whole life is one job at finish()
        self._chain = defer.succeed(None)

    def _opened(self, temp: TempObject) -> None:
        self.temp = temp

    def _failed(self, failure) -> None:
        if self.refusal is None:
            error = failure.value
            if isinstance(error, OSError):
                self.refusal = _Refused(S.OUT_OF_RESOURCES, f"cannot write to the archive: {error.strerror}")
            else:
                _log.failure("writing a received object failed", failure)
                self.refusal = _Refused(0xC001, f"archive error: {error}")

    def write(self, data: bytes) -> None:
        if self.refusal is not None:
            return  # drain: the data set is read and dropped, then refused
        self._received += len(data)
        if self._received > self.service.limits.max_size:
            self.refusal = _Refused(S.OUT_OF_RESOURCES,
                                    f"data set larger than max_object_size={self.service.limits.max_size}")
            self._chunks, self._buffered = [], 0
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered >= CHUNK:
            self._flush()

    def _flush(self) -> None:
        if not self._chunks:
            return
        chunks, size = self._chunks, self._buffered
        self._chunks, self._buffered = [], 0
        self._in_flight += size
        if self._prefix is None:
            # the first chunk (one CHUNK and a PDU at most) stays for the check at the end: the
            # attributes before the pixel data are almost always in it, so the file is not read back
            self._prefix = b"".join(chunks)

        def write(_):
            if self.refusal is not None:
                return None
            if self.temp is None:
                return self.archive.io(self.archive.store.open_temp, [self._header] + chunks).addCallback(self._opened)
            return self.archive.write(self.temp, chunks)

        def written(result):
            self._in_flight -= size
            if self._paused and self._in_flight <= MAX_IN_FLIGHT // 2:
                self._paused = False
                self.request.association.resume_reading()
            return result

        self._chain.addCallback(write)
        self._chain.addErrback(self._failed)
        self._chain.addBoth(written)
        if self._in_flight > MAX_IN_FLIGHT and not self._paused:
            self._paused = True
            self.request.association.pause_reading()

    def finish(self) -> defer.Deferred:
        self._chain.addCallback(lambda _: defer.ensureDeferred(self._complete()))
        return self._chain

    async def _complete(self) -> StoreResult:
        if self._paused:
            self._paused = False
            self.request.association.resume_reading()
        if self.refusal is not None:
            await self._discard()
            return StoreResult(self.refusal.status, self.refusal.comment)
        chunks, self._chunks, self._buffered = self._chunks, [], 0
        temp, self.temp = self.temp, None  # from here on, the code below stores it or discards it
        try:
            if temp is None and self.transfer_syntax in _PLAIN_SYNTAXES:
                stored = await self._receive_small(b"".join(chunks))
            elif temp is None:
                # deflated: pydicom inflates it reading the file
                temp = await self.archive.io(self.archive.store.open_temp, [self._header] + chunks)
                chunks = []
            if temp is not None:
                stored = await self._receive_streamed(temp, chunks)
        except _Refused as refusal:
            return StoreResult(refusal.status, refusal.comment)
        except OSError as error:
            return StoreResult(S.OUT_OF_RESOURCES, f"cannot write to the archive: {error.strerror}")
        try:
            outcome = await self.archive.commit(stored)
        except OutOfResources as error:
            return StoreResult(S.OUT_OF_RESOURCES, str(error))
        except Duplicate as error:
            return StoreResult(DUPLICATE_REJECTED, str(error))
        except Misfiled as error:  # PS3.3: a series belongs to one study
            return StoreResult(0xA900, str(error))
        except OSError as error:
            return StoreResult(S.OUT_OF_RESOURCES, f"cannot write to the archive: {error.strerror}")
        except sqlite3.OperationalError as error:
            # SQLITE_FULL: the index commit found the file system full (the object was not stored)
            if getattr(error, "sqlite_errorcode", None) != getattr(sqlite3, "SQLITE_FULL", 13):
                raise
            return StoreResult(S.OUT_OF_RESOURCES, f"cannot write to the archive's index: {error}")
        if outcome is not StoreOutcome.STORED:
            _log.info("SOP instance {sop} from {ae}: {outcome} (on_duplicate = {policy})",
                      sop=self.sop_instance_uid, ae=self.source_ae, outcome=outcome.value,
                      policy=self.archive.on_duplicate)
        if stored.coerced:
            return StoreResult(S.WARNING, "Pixel Data coerced from OW to OB (Bits Allocated 8)")
        return StoreResult(S.SUCCESS)

    async def _receive_streamed(self, temp: TempObject, chunks: List[bytes]) -> StoredObject:
        """An object already streaming to its file: finish and fsync it while its first chunk is checked.

        Falls back to reading the file back with pydicom when the first chunk
        does not reach the pixel data.
        """
        prefix, self._prefix = self._prefix, None
        if prefix is None or self.transfer_syntax not in _PLAIN_SYNTAXES:
            return await self.archive.io(
                finish_streamed, self.archive.store, temp, chunks, len(self._header), self.sop_class_uid,
                self.sop_instance_uid, self.transfer_syntax, self.source_ae, self.service.limits,
            )
        writing = self.archive.io(finish_sealed, self.archive.store, temp, chunks, len(self._header),
                                  self.transfer_syntax)
        checking = self.archive.io(inspect_prefix, prefix, len(self._header), self.sop_class_uid,
                                   self.sop_instance_uid, self.transfer_syntax)
        return await self._write_while_checking(writing, checking)

    async def _receive_small(self, data: bytes) -> StoredObject:
        """A data set held whole in memory: write and fsync it while it is parsed, in parallel."""
        writing = self.archive.io(write_sealed, self.archive.store, self._header, data)
        checking = self.archive.io(inspect_memory, data, len(self._header), self.sop_class_uid,
                                   self.sop_instance_uid, self.transfer_syntax)
        return await self._write_while_checking(writing, checking)

    async def _write_while_checking(self, writing: defer.Deferred, checking: defer.Deferred) -> StoredObject:
        """Join a file being written and fsynced (fires with (temp, free space)) and its check, run in parallel.

        A check that could not decide (None: the first chunk did not reach the
        pixel data) is done again on the sealed file.  Whatever fails, the
        file is discarded.
        """
        (wrote, written), (checked, inspected) = await defer.DeferredList([writing, checking], consumeErrors=True)
        if not wrote:
            written.raiseException()  # the writer discarded the file itself
        temp, free_space = written
        try:
            if not checked:
                inspected.raiseException()
            if inspected is None:
                stored = await self.archive.io(
                    examine_sealed, temp, len(self._header), self.sop_class_uid, self.sop_instance_uid,
                    self.transfer_syntax, self.source_ae,
                )
                stored.free_space = free_space
                return stored
            metadata, coercion = inspected
            if coercion is not None:
                await self.archive.io(coerce_sealed, temp, coercion)
        except BaseException:
            await self.archive.discard(temp)
            raise
        return StoredObject(temp, metadata, self.transfer_syntax, self.source_ae, coercion is not None, free_space)

    async def _discard(self) -> None:
        if self.temp is not None:
            await self.archive.discard(self.temp)
            self.temp = None

    def abandon(self, reason: str) -> None:
        if self._paused:
            self._paused = False
        self._chunks = []
        self._chain.addBoth(lambda _: defer.ensureDeferred(self._discard()))


@implementer(IServiceClass)
class StorageService:
    """C-STORE SCP storing into an :class:`Archive`."""

    operations = frozenset({D.CommandField.C_STORE_RQ})

    def __init__(
        self,
        archive: Archive,
        abstract_syntaxes: Mapping[str, Tuple[str, ...]],
        implementation_class_uid: str,
        implementation_version_name: Optional[str],
        limits: InflateLimits = InflateLimits(),
    ) -> None:
        self.archive = archive
        #: max_object_size for every data set received, and how far a deflated one may inflate
        self.limits = limits
        self.abstract_syntaxes = dict(abstract_syntaxes)
        self.implementation_class_uid = implementation_class_uid
        self.implementation_version_name = implementation_version_name

    def open_data_set(self, request) -> IncomingObject:
        return IncomingObject(self, request)

    def handle(self, request) -> None:
        result: StoreResult = request.data
        elements = {}
        if result.comment:
            elements["ErrorComment"] = result.comment.encode("ascii", "replace").decode("ascii")[:64]
        if S.category(result.status) == "failure":
            _log.warn("C-STORE of {sop} from {ae} answered {status}: {comment}", sop=self.sop_uid(request),
                      ae=request.association.record.calling, status=S.describe(result.status), comment=result.comment)
        request.respond(result.status, **elements)

    @staticmethod
    def sop_uid(request) -> str:
        return request.command.AffectedSOPInstanceUID or "?"

    def cancel(self, request) -> None:
        """C-CANCEL does not apply to C-STORE (PS3.7 9.3.1)."""
