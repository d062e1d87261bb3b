"""The archive as an object sink (appliance.interfaces.IObjectSink): received data sets to durable files.

An object's head (the elements before its Pixel Data) is checked where it
arrives (:func:`appliance.dataset.checks.inspect_head`: whole, readable,
the command's UIDs), as soon as its first fragments hold it, so that an
object that is not the command's is refused at once and the rest drained.
Fragments are gathered into chunks; an object larger than :data:`CHUNK`
streams to a temporary file as they come, written on the archive's I/O
threads (each chunk starting its way to disk), but for its last chunk,
written with the fsync at the end; reading from the peer stops while more
than :data:`MAX_IN_FLIGHT` bytes wait to be written, so the memory one
association uses does not grow with the object.

Once whole, the rest is checked (only the elements from the Pixel Data on
are walked; the whole object where the head could not be checked, by
pydicom from its file where the fast scanner cannot vouch for it, inflated
as a stream when deflated) and the coercion the statement calls for
applied; then, on the database thread, what is left is written and the
file fsynced, and the archive installs and indexes it with the objects that
became ready at the same time (:meth:`Archive.commit`).  Only then is it
kept.
"""

from __future__ import annotations

import sqlite3
from functools import partial
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
    check_head,
    coerce_in_memory,
    inspect_deflated_file,
    inspect_file,
    inspect_memory,
    refuse_unless_whole,
    refuse_unless_whole_file,
)
from ..dataset.deflate import DEFLATED, InflateLimits
from ..interfaces import IObjectSink, IObjectWriter
from ..logs import logger
from .archive import Archive, Duplicate, HelperFailed, Misfiled, OutOfResources, StoredObject, StoreOutcome
from .store import ObjectStore, TempObject, part10_header

__all__ = ["ArchiveSink", "ArchiveWriter", "examine", "CHUNK", "MAX_IN_FLIGHT", "HEAD_TRIES"]

_log = logger("appliance.archive")

#: Write to disk in chunks of this size (and what arrives with the fragment that passes it); an object that fits
#: in one is held in memory until whole, and so is the last chunk of a larger one (two at most are held).
CHUNK = 256 * 1024
#: Stop reading from the peer while this much is waiting to be written.
MAX_IN_FLIGHT = 1024 * 1024
#: The head of a data set is looked for in its first fragments, this many times at most (it is usually within
#: the first); past that, or past the first chunk, the whole object is checked at the end.
HEAD_TRIES = 4


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


def _finish_unchecked(store: ObjectStore, temp: Optional[TempObject], header: bytes, chunks: List[bytes],
                      description: ObjectDescription, limits: InflateLimits) -> StoredObject:
    """I/O thread, for an object whose head could not be checked as it arrived (deflated, no Pixel Data, or one
    the fast scanner cannot vouch for): write the rest (the file made now if there is none yet), check the whole
    from the file, coerce, fsync."""
    if temp is None:
        temp = store.open_temp([header] + chunks)
    else:
        try:
            store.write(temp, chunks)
        except BaseException:
            store.discard(temp)
            raise
    try:
        if description.transfer_syntax == DEFLATED:
            stored = _examine_deflated(temp, len(header), description, limits, store.tmp)
        else:
            stored = examine(temp, len(header), description.sop_class_uid, description.sop_instance_uid,
                             description.transfer_syntax, description.source_ae)
    except BaseException:
        store.discard(temp)
        raise
    stored.free_space = store.free_space()
    return stored


def _finish_checked(temp: TempObject, chunks: List[bytes], header_length: int, transfer_syntax: str, whole: bool,
                    coercion: Optional[Coercion], store: ObjectStore) -> TempObject:
    """Database thread, as a streamed object whose head was checked is installed: write the rest, check that the
    whole is whole unless that is known, coerce, fsync."""
    try:
        store.write(temp, chunks)
        temp.handle.flush()
        if not whole:
            refuse_unless_whole_file(temp.path, header_length, transfer_syntax)
        _seal_coerced(temp, coercion)
    except BaseException:
        store.discard(temp)
        raise
    return temp


def _write_sealed(header: bytes, data: bytes, store: ObjectStore) -> TempObject:
    """As an object held in memory is installed (on the database thread, or in the install helper's process): a
    new temporary file holding it, fsynced."""
    temp = store.open_temp([header, data])
    try:
        ObjectStore.seal(temp)
    except BaseException:
        store.discard(temp)
        raise
    return temp


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
        self._buffered = 0
        self._in_flight = 0
        self._paused = False
        #: bytes received so far
        self.size = 0
        #: the head's check once the first fragments held it: (metadata, coercion, where Pixel Data starts and
        #: where the data set ends if it ends with that element, both from the data set's start)
        self.head: Optional[Tuple] = None
        self._head_tries = HEAD_TRIES if description.transfer_syntax in PLAIN_SYNTAXES else 0
        self._header = part10_header(
            description.sop_class_uid, description.sop_instance_uid, description.transfer_syntax,
            sink.implementation_class_uid, sink.implementation_version_name, description.source_ae,
        )
        # the file is created with the first chunk; a small object's whole life is one job at finish()
        self._chain: defer.Deferred = defer.succeed(None)
        self._counted = True  # in the archive's objects in hand, until answered (stored or not) or abandoned
        self.archive.in_hand += 1

    def _done(self, result=None):
        if self._counted:
            self._counted = False
            self.archive.in_hand -= 1
        return result

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
        if self._buffered >= CHUNK and (self._buffered >= 2 * CHUNK or not self._ends_within_a_chunk()):
            # a chunk is held and more follows: it goes to the file now; the last one (what the head says is
            # left fits a chunk) is written with the fsync at the end, on that thread, instead of waited for there
            self._flush()
        self._chunks.append(data)
        self._buffered += len(data)
        self.size += len(data)
        if self._head_tries:
            self._look_at_head()
            if self.refusal is not None:
                self._chunks, self._buffered = [], 0

    def _ends_within_a_chunk(self) -> bool:
        """Whether the head says the data set ends at most a chunk past what arrived (never more than two chunks
        are held: a sender sending more than it declared gets its data written as it comes)."""
        head = self.head
        return head is not None and head[3] is not None and head[3] - self.size <= CHUNK

    def _look_at_head(self) -> None:
        """Check the head once the fragments reach Pixel Data (the scanner reads no further).  Given up after a
        few fragments, or once the first chunk went to the file: then the whole is checked at the end."""
        self._head_tries -= 1
        if self.temp is not None or self._in_flight:
            self._head_tries = 0
            return
        chunks = self._chunks
        try:
            head = check_head(chunks[0] if len(chunks) == 1 else b"".join(chunks), self.description)
        except Refused as refusal:  # not the command's object, or broken: no need to wait for the rest
            self.refusal = refusal
            return
        if head is not None:  # else Pixel Data not reached yet, or none: the whole is checked at the end
            self._head_tries = 0
            self.head = head

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
                return self.archive.io(self.archive.store.open_temp, [self._header] + chunks, True).addCallback(
                    self._opened)
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
        self._chain.addBoth(self._done)
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
        try:
            stored = await self._seal(temp, chunks)
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
        except HelperFailed as error:  # logged once by the archive for its group; the sender may send it again
            raise Refused(Refusal.FAILED, f"archive error: {error}") from None
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

    async def _seal(self, temp: Optional[TempObject], chunks: List[bytes]) -> StoredObject:
        """The whole object checked and coerced, ready to be written (what is left of it) and fsynced as it is
        installed (:meth:`Archive.commit`).

        Held in memory (``temp`` None), it is checked here, where it arrived
        (the head already was, so only the elements from Pixel Data on are
        walked; a data set of up to a chunk otherwise).  Streamed, only what
        the head left open is checked, as it is installed.  An object whose
        head could not be checked is checked whole from its file, on an I/O
        thread, first.  Whatever fails, the file is discarded.
        """
        description, archive, header = self.description, self.archive, self._header
        syntax = description.transfer_syntax
        if syntax not in PLAIN_SYNTAXES or (self.head is None and temp is not None):
            return await archive.io(_finish_unchecked, archive.store, temp, header, chunks, description,
                                    self.sink.limits)
        if temp is None:
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            if self.head is not None:
                metadata, coercion, pixel_offset, _ = self.head
                refuse_unless_whole(data, pixel_offset, len(data), syntax, origin=0)
            else:
                metadata, coercion = inspect_memory(data, 0, description.sop_class_uid,
                                                    description.sop_instance_uid, syntax)
            if coercion is not None:
                data = coerce_in_memory(data, coercion)
            seal = partial(_write_sealed, header, data)
            size = len(header) + len(data)
        else:
            metadata, coercion, _, end = self.head
            if coercion is not None:  # its offset counts from the data set, the file starts with our header
                coercion = Coercion(coercion.offset + len(header), coercion.big_endian, coercion.length)
            # a data set that ends where its Pixel Data declares was walked whole: the head, and that element
            whole = end is not None and end == self.size
            seal = partial(_finish_checked, temp, chunks, len(header), syntax, whole, coercion)
            size = temp.size + sum(len(chunk) for chunk in chunks)
        return StoredObject(None, metadata, syntax, description.source_ae, coercion is not None, seal=seal,
                            size=size, partial=temp)

    async def _discard(self) -> None:
        if self.temp is not None:
            await self.archive.discard(self.temp)
            self.temp = None

    def abandon(self, reason: str) -> None:
        self._done()
        if self._paused:
            self._paused = False
        if self.refusal is None:
            self.refusal = Refused(Refusal.FAILED, f"abandoned: {reason}")
        self._chunks = []
        self._chain.addBoth(lambda _: defer.ensureDeferred(self._discard()))
