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
import os
import sqlite3
import struct
from dataclasses import dataclass
from typing import List, Mapping, Optional, Tuple

from pydicom import dcmread
from pydicom.filereader import read_dataset
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from ..archive.archive import Archive, Duplicate, OutOfResources, StoredObject, StoreOutcome
from ..archive.metadata import extract
from ..archive.store import ObjectStore, TempObject, part10_header, pixel_data_coercion
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

__all__ = ["StorageService", "IncomingObject", "StoreResult", "DUPLICATE_REJECTED"]

_log = Logger(namespace="appliance.storage")

#: Write to disk in chunks of this size.
CHUNK = 256 * 1024
#: Stop reading from the peer while this much is waiting to be written.
MAX_IN_FLIGHT = 1024 * 1024
#: PS3.7 C.4 "Duplicate SOP instance", answered when on_duplicate = "reject".
DUPLICATE_REJECTED = 0x0111

#: Transfer syntaxes whose data set bytes pydicom can read straight from memory
#: (deflated ones are read through dcmread, which inflates).
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


def _parse(temp: TempObject, header_length: int, data: Optional[bytes], transfer_syntax: str):
    """The data set up to its pixel data, the file offset of the Pixel Data element and its first 4 bytes."""
    if data is not None and transfer_syntax in _PLAIN_SYNTAXES:
        # the whole data set is in memory (a small object): no need to read the file back
        implicit = transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN
        reader = io.BytesIO(data)
        ds = read_dataset(reader, implicit, transfer_syntax != EXPLICIT_VR_BIG_ENDIAN, stop_when=_at_pixel_data)
        offset = reader.tell()
        return ds, header_length + offset, data[offset : offset + 4]
    temp.handle.flush()
    with open(temp.path, "rb") as reader:
        ds = dcmread(reader, stop_before_pixels=True, defer_size=1 << 20)
        offset = reader.tell()
        return ds, offset, reader.read(4)


def examine(
    temp: TempObject,
    header_length: int,
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax: str,
    source_ae: str,
    data: Optional[bytes] = None,
) -> StoredObject:
    """I/O thread: parse the received object up to its pixel data, check it, coerce, fsync.

    ``data`` is the whole data set when it is still in memory.  Raises
    :class:`_Refused` with the status PS3.4 calls for.
    """
    try:
        ds, pixel_offset, tag = _parse(temp, header_length, data, transfer_syntax)
    except Exception as error:  # pydicom raises many kinds on garbage
        raise _Refused(S.CANNOT_UNDERSTAND, f"cannot parse data set: {type(error).__name__}: {error}") from None
    try:
        metadata = extract(ds)
    except ValueError as error:
        raise _Refused(0xA900, str(error)) from None
    except Exception as error:
        raise _Refused(S.CANNOT_UNDERSTAND, f"cannot read the data set's attributes: {error}") from None
    if metadata.sop_instance_uid != sop_instance_uid:
        raise _Refused(0xA900, "SOP Instance UID differs from the command's Affected SOP Instance UID")
    if metadata.sop_class_uid != sop_class_uid:
        raise _Refused(0xA900, "SOP Class UID differs from the command's Affected SOP Class UID")
    for keyword, uid in (("Study Instance UID", metadata.study_instance_uid),
                         ("Series Instance UID", metadata.series_instance_uid)):
        if not is_received_uid(uid):
            raise _Refused(0xA900, f"{keyword} is not a valid UID")
    coerced = False
    big_endian = transfer_syntax == EXPLICIT_VR_BIG_ENDIAN
    if metadata.bits_allocated == 8 and transfer_syntax in (EXPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN):
        if tag == (_PIXEL_DATA_BE if big_endian else _PIXEL_DATA_LE):
            temp.handle.seek(pixel_offset + 4)
            header = temp.handle.read(8)
            if header[:2] == b"OW":
                length = struct.unpack(">L" if big_endian else "<L", header[4:8])[0]
                pixel_data_coercion(temp.handle, pixel_offset, big_endian, length)
                coerced = True
            temp.handle.seek(0, os.SEEK_END)
    ObjectStore.seal(temp)
    return StoredObject(temp, metadata, transfer_syntax, source_ae, coerced)


def receive(
    store: ObjectStore,
    temp: Optional[TempObject],
    header: bytes,
    chunks: List[bytes],
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax: str,
    source_ae: str,
) -> StoredObject:
    """I/O thread, once the data set is whole: write what is left, examine, seal, measure free space.

    One job per object for small objects (the file is created here too);
    the temporary file is discarded if anything fails.
    """
    data = None
    try:
        if temp is None:
            data = b"".join(chunks)
            temp = store.open_temp([header, data])
        else:
            store.write(temp, chunks)
        stored = examine(temp, len(header), sop_class_uid, sop_instance_uid, transfer_syntax, source_ae, data)
    except BaseException:
        if temp is not None:
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
        self._buffered = 0
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
        temp, self.temp = self.temp, None  # receive() owns it now: it stores it or discards it
        try:
            stored = await self.archive.io(
                receive, self.archive.store, temp, self._header, chunks, self.sop_class_uid,
                self.sop_instance_uid, self.transfer_syntax, self.source_ae,
            )
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

    def __init__(
        self,
        archive: Archive,
        abstract_syntaxes: Mapping[str, Tuple[str, ...]],
        implementation_class_uid: str,
        implementation_version_name: Optional[str],
    ) -> None:
        self.archive = archive
        self.abstract_syntaxes = dict(abstract_syntaxes)
        self.implementation_class_uid = implementation_class_uid
        self.implementation_version_name = implementation_version_name

    def open_data_set(self, request) -> IncomingObject:
        return IncomingObject(self, request)

    def handle(self, request) -> None:
        if request.command.CommandField != D.CommandField.C_STORE_RQ:
            request.respond(S.UNRECOGNIZED_OPERATION, ErrorComment="only C-STORE on storage SOP classes")
            return
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
