"""The archive as an object sink (appliance.interfaces.IObjectSink): received data sets to durable files.

Each data set streams to a temporary file as its fragments arrive:
fragments are gathered into chunks written on the archive's I/O threads,
and reading from the peer stops while more than :data:`MAX_IN_FLIGHT` bytes
wait to be written, so the memory one association uses does not grow with
the object.  A data set that fits in memory is written and fsynced while it
is checked, in parallel; a larger one is checked from its first chunk while
the rest is written (read back only when that chunk does not reach the pixel
data); a deflated one is inflated as a stream.  The checks are
:mod:`appliance.dataset.checks`; then the file is coerced where the
statement says, installed and indexed (:meth:`Archive.commit`), and only
then is it kept.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Callable, List, Optional, Tuple

from twisted.internet import defer
from zope.interface import implementer

from ..dataset.checks import (
    PLAIN_SYNTAXES,
    Coercion,
    Kept,
    ObjectDescription,
    Refusal,
    Refused,
    apply_coercion,
    inspect_deflated_file,
    inspect_file,
    inspect_memory,
    inspect_prefix,
    refuse_unless_whole_file,
)
from ..dataset.deflate import DEFLATED, InflateLimits
from ..interfaces import IObjectSink, IObjectWriter
from ..logs import logger
from .archive import Archive, Duplicate, Misfiled, OutOfResources, StoredObject, StoreOutcome
from .store import ObjectStore, TempObject, part10_header

__all__ = ["ArchiveSink", "ArchiveWriter", "examine", "CHUNK", "MAX_IN_FLIGHT"]

_log = logger("appliance.archive")

#: Write to disk in chunks of this size.
CHUNK = 256 * 1024
#: Stop reading from the peer while this much is waiting to be written.
MAX_IN_FLIGHT = 1024 * 1024


# --- the I/O thread's jobs -------------------------------------------------------------------------------


def _seal_coerced(temp: TempObject, coercion: Optional[Coercion]) -> None:
    if coercion is not None:
        apply_coercion(temp.handle, coercion)
    ObjectStore.seal(temp)


def examine(temp: TempObject, header_length: int, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str,
            source_ae: str) -> StoredObject:
    """I/O thread, for an object written to its temporary file: check it (read back up to the pixel data),
    coerce, fsync."""
    temp.handle.flush()
    metadata, coercion = inspect_file(temp.path, header_length, sop_class_uid, sop_instance_uid, transfer_syntax)
    _seal_coerced(temp, coercion)
    return StoredObject(temp, metadata, transfer_syntax, source_ae, coercion is not None)


def _examine_deflated(temp: TempObject, header_length: int, description: ObjectDescription, limits: InflateLimits,
                      spill_dir: str) -> StoredObject:
    """I/O thread, for a deflated object: inflate as a stream within ``limits``, check, fsync (kept deflated)."""
    temp.handle.flush()
    metadata = inspect_deflated_file(temp.path, header_length, description.sop_class_uid,
                                     description.sop_instance_uid, limits, spill_dir)
    ObjectStore.seal(temp)
    return StoredObject(temp, metadata, DEFLATED, description.source_ae, False)


def _finish_streamed(store: ObjectStore, temp: TempObject, chunks: List[bytes], header_length: int,
                     description: ObjectDescription, limits: InflateLimits) -> StoredObject:
    """I/O thread, for an object already streaming to its file: write the rest, examine, seal."""
    try:
        store.write(temp, chunks)
        if description.transfer_syntax == DEFLATED:
            stored = _examine_deflated(temp, header_length, description, limits, store.tmp)
        else:
            stored = examine(temp, header_length, description.sop_class_uid, description.sop_instance_uid,
                             description.transfer_syntax, description.source_ae)
    except BaseException:
        store.discard(temp)
        raise
    stored.free_space = store.free_space()
    return stored


def _finish_sealed(store: ObjectStore, temp: TempObject, chunks: List[bytes], header_length: int,
                   transfer_syntax: str) -> Tuple[TempObject, int]:
    """I/O thread: write the rest of a streamed object, check that it is whole, fsync it; the free space after."""
    try:
        store.write(temp, chunks)
        temp.handle.flush()
        refuse_unless_whole_file(temp.path, header_length, transfer_syntax)
        ObjectStore.seal(temp)
    except BaseException:
        store.discard(temp)
        raise
    return temp, store.free_space()


def _write_sealed(store: ObjectStore, header: bytes, data: bytes) -> Tuple[TempObject, int]:
    """I/O thread: a new temporary file holding the object, fsynced; and the free space after it."""
    temp = store.open_temp([header, data])
    try:
        ObjectStore.seal(temp)
    except BaseException:
        store.discard(temp)
        raise
    return temp, store.free_space()


def _examine_sealed(temp: TempObject, header_length: int, description: ObjectDescription) -> StoredObject:
    """I/O thread: read a sealed object back with pydicom, check it and coerce it (fsyncing again)."""
    metadata, coercion = inspect_file(temp.path, header_length, description.sop_class_uid,
                                      description.sop_instance_uid, description.transfer_syntax)
    if coercion is not None:
        _coerce_sealed(temp, coercion)
    return StoredObject(temp, metadata, description.transfer_syntax, description.source_ae, coercion is not None)


def _coerce_sealed(temp: TempObject, coercion: Coercion) -> None:
    """I/O thread: apply a coercion to a sealed temporary file and fsync it again."""
    with open(temp.path, "r+b") as handle:
        apply_coercion(handle, coercion)
        handle.flush()
        os.fsync(handle.fileno())


# --- the sink -----------------------------------------------------------------------------------------------


@implementer(IObjectSink)
class ArchiveSink:
    """Received objects into the :class:`Archive`, as Part 10 files with our File Meta Information."""

    def __init__(self, archive: Archive, implementation_class_uid: str,
                 implementation_version_name: Optional[str]) -> None:
        self.archive = archive
        self.limits = archive.inflate_limits
        self.implementation_class_uid = implementation_class_uid
        self.implementation_version_name = implementation_version_name

    def open(self, description: ObjectDescription, pause: Callable[[], None],
             resume: Callable[[], None]) -> "ArchiveWriter":
        return ArchiveWriter(self, description, pause, resume)


@implementer(IObjectWriter)
class ArchiveWriter:
    """One data set on its way into the archive."""

    def __init__(self, sink: ArchiveSink, description: ObjectDescription, pause: Callable[[], None],
                 resume: Callable[[], None]) -> None:
        self.sink = sink
        self.archive = sink.archive
        self.description = description
        self._pause, self._resume = pause, resume
        self.refusal: Optional[Refused] = None
        self.temp: Optional[TempObject] = None
        self._chunks: List[bytes] = []
        self._prefix: Optional[bytes] = None
        self._buffered = 0
        self._in_flight = 0
        self._paused = False
        self._header = part10_header(
            description.sop_class_uid, description.sop_instance_uid, description.transfer_syntax,
            sink.implementation_class_uid, sink.implementation_version_name, description.source_ae,
        )
        # the file is created with the first chunk; a small object's whole life is one job at finish()
        self._chain: defer.Deferred = defer.succeed(None)

    def _opened(self, temp: TempObject) -> None:
        self.temp = temp

    def _failed(self, failure) -> None:
        if self.refusal is None:
            error = failure.value
            if isinstance(error, OSError):
                self.refusal = Refused(Refusal.OUT_OF_RESOURCES, f"cannot write to the archive: {error.strerror}")
            else:
                _log.failure("writing a received object failed", failure)
                self.refusal = Refused(Refusal.FAILED, f"archive error: {error}")

    def write(self, data: bytes) -> None:
        if self.refusal is not None:
            return  # drained: the data set is read and dropped, then refused
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
                self._resume()
            return result

        self._chain.addCallback(write)
        self._chain.addErrback(self._failed)
        self._chain.addBoth(written)
        if self._in_flight > MAX_IN_FLIGHT and not self._paused:
            self._paused = True
            self._pause()

    def finish(self) -> defer.Deferred:
        self._chain.addCallback(lambda _: defer.ensureDeferred(self._complete()))
        return self._chain

    async def _complete(self) -> Kept:
        if self._paused:
            self._paused = False
            self._resume()
        if self.refusal is not None:
            await self._discard()
            raise self.refusal
        chunks, self._chunks, self._buffered = self._chunks, [], 0
        temp, self.temp = self.temp, None  # from here on, the code below stores it or discards it
        syntax = self.description.transfer_syntax
        try:
            if temp is None and syntax in PLAIN_SYNTAXES:
                stored = await self._receive_small(b"".join(chunks))
            elif temp is None:  # deflated: inflated as a stream from its file
                temp = await self.archive.io(self.archive.store.open_temp, [self._header] + chunks)
                chunks = []
            if temp is not None:
                stored = await self._receive_streamed(temp, chunks)
        except OSError as error:
            raise Refused(Refusal.OUT_OF_RESOURCES, f"cannot write to the archive: {error.strerror}") from None
        try:
            outcome = await self.archive.commit(stored)
        except OutOfResources as error:
            raise Refused(Refusal.OUT_OF_RESOURCES, str(error)) from None
        except Duplicate as error:
            raise Refused(Refusal.DUPLICATE, str(error)) from None
        except Misfiled as error:  # PS3.3: a series belongs to one study
            raise Refused(Refusal.NOT_MATCHING, str(error)) from None
        except OSError as error:
            raise Refused(Refusal.OUT_OF_RESOURCES, f"cannot write to the archive: {error.strerror}") from None
        except sqlite3.OperationalError as error:
            # SQLITE_FULL: the index commit found the file system full (the object was not stored)
            if getattr(error, "sqlite_errorcode", None) != getattr(sqlite3, "SQLITE_FULL", 13):
                raise
            raise Refused(Refusal.OUT_OF_RESOURCES, f"cannot write to the archive's index: {error}") from None
        duplicate = None
        if outcome is not StoreOutcome.STORED:
            duplicate = f"{outcome.value} (on_duplicate = {self.archive.on_duplicate})"
            _log.info("SOP instance {sop} from {ae}: {outcome}", sop=self.description.sop_instance_uid,
                      ae=self.description.source_ae, outcome=duplicate)
        return Kept(coerced=stored.coerced, duplicate=duplicate)

    async def _receive_streamed(self, temp: TempObject, chunks: List[bytes]) -> StoredObject:
        """An object already streaming to its file: finish and fsync it while its first chunk is checked.

        Falls back to reading the file back with pydicom when the first chunk
        does not reach the pixel data.
        """
        prefix, self._prefix = self._prefix, None
        description = self.description
        if prefix is None or description.transfer_syntax not in PLAIN_SYNTAXES:
            return await self.archive.io(_finish_streamed, self.archive.store, temp, chunks, len(self._header),
                                         description, self.sink.limits)
        writing = self.archive.io(_finish_sealed, self.archive.store, temp, chunks, len(self._header),
                                  description.transfer_syntax)
        checking = self.archive.io(inspect_prefix, prefix, len(self._header), description.sop_class_uid,
                                   description.sop_instance_uid, description.transfer_syntax)
        return await self._write_while_checking(writing, checking)

    async def _receive_small(self, data: bytes) -> StoredObject:
        """A data set held whole in memory: write and fsync it while it is checked, in parallel."""
        description = self.description
        writing = self.archive.io(_write_sealed, self.archive.store, self._header, data)
        checking = self.archive.io(inspect_memory, data, len(self._header), description.sop_class_uid,
                                   description.sop_instance_uid, description.transfer_syntax)
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
        description = self.description
        try:
            if not checked:
                inspected.raiseException()
            if inspected is None:
                stored = await self.archive.io(_examine_sealed, temp, len(self._header), description)
                stored.free_space = free_space
                return stored
            metadata, coercion = inspected
            if coercion is not None:
                await self.archive.io(_coerce_sealed, temp, coercion)
        except BaseException:
            await self.archive.discard(temp)
            raise
        return StoredObject(temp, metadata, description.transfer_syntax, description.source_ae, coercion is not None,
                            free_space)

    async def _discard(self) -> None:
        if self.temp is not None:
            await self.archive.discard(self.temp)
            self.temp = None

    def abandon(self, reason: str) -> None:
        if self._paused:
            self._paused = False
        if self.refusal is None:
            self.refusal = Refused(Refusal.FAILED, f"abandoned: {reason}")
        self._chunks = []
        self._chain.addBoth(lambda _: defer.ensureDeferred(self._discard()))
