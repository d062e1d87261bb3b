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

from ..dataset.checks import Kept, ObjectDescription, Refusal, Refused, apply_coercion, inspect_deflated, inspect_memory
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
        if type(buffer) is bytes:
            buffer = bytearray(buffer)
        apply_coercion(_BufferFile(buffer), coercion)
    return buffer, metadata, coercion is not None


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
    """One data set on its way into memory."""

    def __init__(self, sink: MemorySink, description: ObjectDescription) -> None:
        self.sink = sink
        self.store = sink.store
        self.description = description
        #: the data set's fragments as they came: joined once, when whole (growing one buffer on the
        #: reactor thread copied each object several times over)
        self.chunks: List[bytes] = []
        self.size = 0
        self.reserved = 0
        self.refusal: Optional[Refused] = None
        self.wanted = sink.loads.expects(description) if sink.loads is not None else False
        if not self.wanted and not sink.accept_unsolicited:
            self.refusal = Refused(Refusal.NOT_WANTED, "no load asked for this object (accept_unsolicited = false)")

    def write(self, data: bytes) -> None:
        if self.refusal is not None:
            return  # drained
        size = self.size + len(data)
        if size > self.reserved and not self._reserve(size - self.reserved):
            return
        self.chunks.append(data)
        self.size = size

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

    def finish(self) -> defer.Deferred:
        if self.refusal is not None:
            self._release()
            return defer.fail(self.refusal).addErrback(self._tell)
        if self.size + OBJECT_OVERHEAD > self.reserved and not self._reserve(self.size + OBJECT_OVERHEAD - self.reserved):
            return defer.fail(self.refusal).addErrback(self._tell)
        inline = self.size <= self.sink.inline_limit and self.description.transfer_syntax != DEFLATED
        run = defer.maybeDeferred if inline else self.sink.runner
        checking = run(_check, self.chunks, self.description, self.sink.limits)
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
