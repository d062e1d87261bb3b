"""The Memory-Server's object sink (appliance.interfaces.IObjectSink): received data sets into the memory store.

A data set's bytes are reserved against ``memory_limit`` as they arrive
(a MiB at a time while that much is free, else exactly; the store drops
least recently used studies for them, or the object is refused with A700 at
once and the rest drained), its fragments kept as they came, joined into one
buffer and checked once whole (:mod:`appliance.dataset.checks`: whole,
readable, the command's UIDs, the coercion applied in place; on a worker
thread for objects over a MiB and deflated ones), then put into the store on
the reactor thread.  An object no load asked for is kept or refused by
``accept_unsolicited``.
"""

from __future__ import annotations

from typing import Callable, List, Optional

from twisted.internet import defer
from zope.interface import implementer

from ..dataset.checks import (Kept, ObjectDescription, Refusal, Refused, check_head, coerce_in_memory,
                              inspect_deflated, inspect_memory, refuse_unless_whole)
from ..dataset.deflate import DEFLATED, InflateLimits
from ..interfaces import ILoadTracker, IObjectSink, IObjectWriter
from ..logs import logger
from .store import OBJECT_OVERHEAD, MemoryStore, NoRoom

__all__ = ["MemorySink", "MemoryWriter"]

_log = logger("appliance.memory")

#: Room is reserved for an object arriving this much at a time (exactly what is needed when less is left).
RESERVE_STEP = 1 << 20

#: ``runner(f, *args) -> Deferred``: where the checks of large objects run (a worker thread in the appliance).
Runner = Callable[..., defer.Deferred]

#: Objects of at most this many bytes are checked where they arrive (the reactor thread), larger ones by the
#: runner.  Checking a 0.5 MB image takes about 0.2 ms; handing it to a worker and its answer back cost more
#: than that (two thread wake-ups and the GIL changing hands, while the sender waits for the response), and the
#: worker gives no parallelism for this work, which holds the GIL.  Past this size the reactor would be held
#: long enough (the join and the scan grow with the object) that other associations should not wait for it;
#: a deflated object always goes to the runner (it may inflate to ``memory_limit``).
INLINE_CHECK_LIMIT = 1 << 20

#: The metadata levels the Memory-Server builds for the objects it checks as they arrive: the study's, which its
#: listing shows (with the columns); the patient, series and instance levels serve the archive's index and C-FIND.
MEMORY_LEVELS = frozenset({"study"})

#: The head of a data set (what precedes its Pixel Data) is looked for in its first fragments, this many times
#: at most (it is usually within the first).
HEAD_TRIES = 4


class _BufferReader:
    """A read-only file over a buffer without copying it (for the streaming inflater)."""

    def __init__(self, buffer) -> None:
        self.view = memoryview(buffer)
        self.position = 0

    def seek(self, position: int) -> None:
        self.position = position

    def read(self, size: int = -1) -> bytes:
        end = len(self.view) if size < 0 else min(len(self.view), self.position + size)
        data = bytes(self.view[self.position:end])
        self.position = end
        return data


def _check(chunks: List[bytes], description: ObjectDescription, limits: InflateLimits):
    """The object's data set in one buffer, its metadata, and whether the coercion was applied; Refused when it is
    not acceptable.  A data set that came in one fragment is kept as it came (no copy), unless coerced."""
    buffer = chunks[0] if len(chunks) == 1 and type(chunks[0]) is bytes else bytearray().join(chunks)
    if description.transfer_syntax == DEFLATED:
        return buffer, inspect_deflated(_BufferReader(buffer), 0, description.sop_class_uid,
                                        description.sop_instance_uid, limits), False
    metadata, coercion = inspect_memory(buffer, 0, description.sop_class_uid, description.sop_instance_uid,
                                        description.transfer_syntax)
    if coercion is not None:
        buffer = coerce_in_memory(buffer, coercion)
    return buffer, metadata, coercion is not None


def _check_whole(data, head: tuple, description: ObjectDescription):
    """An object whose head was checked as it arrived (whole too): the rest whole, and the coercion the head
    called for applied."""
    metadata, coercion, pixel_offset = head
    refuse_unless_whole(data, pixel_offset, len(data), description.transfer_syntax, origin=0)
    if coercion is not None:
        data = coerce_in_memory(data, coercion)
    return data, metadata, coercion is not None


@implementer(IObjectSink)
class MemorySink:
    """Objects into a :class:`MemoryStore`."""

    def __init__(self, store: MemoryStore, runner: Runner, limits: InflateLimits = InflateLimits(),
                 accept_unsolicited: bool = True, loads: Optional[ILoadTracker] = None,
                 inline_limit: int = INLINE_CHECK_LIMIT) -> None:
        self.store = store
        self.runner = runner
        self.inline_limit = inline_limit
        self.limits = limits
        self.accept_unsolicited = accept_unsolicited
        #: the Memory-Manager's loads (None: no load is ever running)
        self.loads = ILoadTracker(loads) if loads is not None else None

    def open(self, description: ObjectDescription, pause: Callable[[], None],
             resume: Callable[[], None]) -> "MemoryWriter":
        return MemoryWriter(self, description)


@implementer(IObjectWriter)
class MemoryWriter:
    """One data set on its way into memory.

    Its head (the elements before Pixel Data) is checked as soon as the
    first fragments hold it, while the rest is still arriving; an object that
    ends with its Pixel Data, as most images do, is then copied into a buffer
    of the size that element declares as its fragments come, so that once
    whole it is only walked for wholeness (no join, no scan) before its
    response.  Anything else is kept as fragments and checked whole.
    """

    def __init__(self, sink: MemorySink, description: ObjectDescription) -> None:
        self.sink = sink
        self.store = sink.store
        self.description = description
        #: the data set's fragments as they came, until a buffer of its size takes them: joined once, when whole
        #: (growing one buffer on the reactor thread copied each object several times over)
        self.chunks: List[bytes] = []
        #: the buffer the data set is copied into as it arrives, once its head says how large it is
        self.buffer: Optional[bytearray] = None
        self.size = 0
        self.reserved = 0
        self.refusal: Optional[Refused] = None
        #: the head's check, (metadata, coercion, where Pixel Data starts), once the fragments reach that element
        self.head: Optional[tuple] = None
        #: times the head is still looked for (deflated data sets are inflated before anything is read)
        self._head_tries = HEAD_TRIES if description.transfer_syntax != DEFLATED else 0
        self.wanted = sink.loads.expects(description) if sink.loads is not None else False
        if not self.wanted and not sink.accept_unsolicited:
            self.refusal = Refused(Refusal.NOT_WANTED, "no load asked for this object (accept_unsolicited = false)")

    def write(self, data: bytes) -> None:
        if self.refusal is not None:
            return  # drained
        size = self.size + len(data)
        if size > self.reserved and not self._reserve(size - self.reserved):
            return
        if self.buffer is not None:
            self.buffer[self.size:size] = data  # past the declared end (trailing elements) it grows
        else:
            self.chunks.append(data)
        self.size = size
        if self._head_tries:
            self._look_at_head()

    def _look_at_head(self) -> None:
        """Check the head once the fragments reach Pixel Data (the scanner reads no further), and size the buffer
        from it.  Given up after a few fragments, or past the inline limit: the whole is checked at the end."""
        self._head_tries -= 1
        if self.size > self.sink.inline_limit:
            self._head_tries = 0
            return
        prefix = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        try:
            head = check_head(prefix, self.description, MEMORY_LEVELS)
        except Refused as refusal:  # not the command's object, or broken: no need to wait for the rest
            self.refusal = refusal
            self._release()
            return
        if head is None:
            return  # Pixel Data not reached yet (or the scanner cannot vouch for this head: pydicom will, at the end)
        self._head_tries = 0
        metadata, coercion, pixel_offset, end = head
        self.head = (metadata, coercion, pixel_offset)
        if end is None or not self.size < end <= self.sink.inline_limit or not self._room_for(end):
            return
        buffer = bytearray(end)  # its pages are touched now, while the rest of the object is on its way
        buffer[:self.size] = prefix
        self.buffer, self.chunks = buffer, []

    def _room_for(self, size: int) -> bool:
        """Reserve up to ``size`` bytes held (and the object's overhead) if there is room without dropping
        anything for it; False otherwise (the fragments then reserve as they come)."""
        needed = size + OBJECT_OVERHEAD - self.reserved
        if needed <= 0:
            return True
        if needed > self.store.free:
            return False
        try:
            self.store.reserve(needed)
        except NoRoom:
            return False
        self.reserved += needed
        return True

    def _reserve(self, needed: int) -> bool:
        """Reserve room for ``needed`` more bytes: a RESERVE_STEP at once while that much is free (fewer calls
        per fragment), else exactly ``needed``, dropping studies for it; False (and refused) if impossible."""
        amount = RESERVE_STEP if needed <= RESERVE_STEP <= self.store.free else needed
        try:
            self.store.reserve(amount)
        except NoRoom as error:
            self.refusal = Refused(Refusal.OUT_OF_RESOURCES, f"memory full: {error}")
            self._release()
            return False
        self.reserved += amount
        return True

    def _release(self) -> None:
        self.store.release(self.reserved)
        self.reserved = 0
        self.chunks = []
        self.buffer = None

    def finish(self) -> defer.Deferred:
        if self.refusal is not None:
            self._release()
            return defer.fail(self.refusal).addErrback(self._tell)
        if self.size + OBJECT_OVERHEAD > self.reserved and not self._reserve(self.size + OBJECT_OVERHEAD - self.reserved):
            return defer.fail(self.refusal).addErrback(self._tell)
        description = self.description
        inline = self.size <= self.sink.inline_limit and description.transfer_syntax != DEFLATED
        if self.head is not None and inline:
            if self.buffer is not None:
                del self.buffer[self.size:]  # shorter than declared: the wholeness check says so
                data = self.buffer
            else:
                data = self.chunks[0] if len(self.chunks) == 1 else bytearray().join(self.chunks)
            checking = defer.maybeDeferred(_check_whole, data, self.head, description)
        else:
            run = defer.maybeDeferred if inline else self.sink.runner
            checking = run(_check, self.chunks, description, self.sink.limits)
        return checking.addBoth(self._checked).addErrback(self._tell)

    def _checked(self, result):
        self._release()
        if isinstance(result, BaseException) or hasattr(result, "raiseException"):
            return result  # a Refused (or an unexpected failure) goes on to the service
        buffer, metadata, coerced = result
        replaced = self.store.put(metadata, self.description.transfer_syntax, buffer)
        if self.wanted:
            self.sink.loads.kept(self.description)
        return Kept(coerced=coerced, duplicate="replaced" if replaced else None)

    def _tell(self, failure):
        """A refusal of an object a load asked for is the load's business too."""
        if self.wanted and failure.check(Refused):
            self.sink.loads.refused(self.description, failure.value)
        return failure

    def abandon(self, reason: str) -> None:
        if self.refusal is None:
            self.refusal = Refused(Refusal.FAILED, f"abandoned: {reason}")
        self._release()
