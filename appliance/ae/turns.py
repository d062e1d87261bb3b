"""Work that takes turns: one at a time per key, first come first served, handed over in a loop.

The Web Software-Server runs one association per remote AE at a time (statement 3.3.1.2).  A turn that ends
at once (a query stopped while it waited, a connection refused before any I/O) hands over to the next one
here in a loop, never from inside the previous turn's callbacks: Twisted's DeferredLock calls the next
waiter from within its release, so a long line of turns that end at once nests one call chain per turn, and
past Python's recursion limit the handing over broke off and the line stood still for good.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Deque, Dict, Hashable, Optional, Tuple

from twisted.internet import defer
from twisted.python.failure import Failure

__all__ = ["Turns"]


class _Line:
    """The turns of one key: those waiting, in order, and the one under way."""

    def __init__(self) -> None:
        self.waiting: Deque[Tuple[Callable[[], Any], defer.Deferred]] = deque()
        #: the turn under way (its caller's Deferred) and the Deferred of its work
        self.turn: Optional[defer.Deferred] = None
        self.work: Optional[defer.Deferred] = None
        #: True while the loop of :meth:`Turns._hand_over` runs for this line
        self.handing_over = False


class Turns:
    """Runs work one at a time per key, in the order asked."""

    def __init__(self) -> None:
        self._lines: Dict[Hashable, _Line] = {}

    def run(self, key: Hashable, work: Callable[[], Any]) -> defer.Deferred:
        """``work()`` (giving a coroutine or a Deferred) once every earlier turn of ``key`` has ended.

        Fires as the work does.  Cancelling it before its turn takes it out of the line; during its turn
        cancels the work (whose outcome it then fires with).
        """
        line = self._lines.setdefault(key, _Line())
        turn = defer.Deferred(lambda cancelled: self._withdraw(line, cancelled))
        line.waiting.append((work, turn))
        self._hand_over(line)
        return turn

    def waiting(self, key: Hashable) -> int:
        """Turns of ``key`` waiting (the one under way not counted)."""
        line = self._lines.get(key)
        return len(line.waiting) if line is not None else 0

    @staticmethod
    def _withdraw(line: _Line, turn: defer.Deferred) -> None:
        for index, (_, waiting) in enumerate(line.waiting):
            if waiting is turn:
                del line.waiting[index]
                return  # the Deferred then fails with CancelledError
        if line.turn is turn and line.work is not None:
            line.work.cancel()

    def _hand_over(self, line: _Line) -> None:
        """Start the next turn while none is under way; turns that end at once are followed here, in this loop."""
        if line.handing_over:
            return  # called from a turn that ended inside the loop below: the loop goes on
        line.handing_over = True
        try:
            while line.turn is None and line.waiting:
                work, turn = line.waiting.popleft()
                try:
                    started = defer.ensureDeferred(work())
                except Exception:
                    started = defer.fail()
                line.turn, line.work = turn, started
                started.addBoth(self._ended, line, turn)
        finally:
            line.handing_over = False

    def _ended(self, result, line: _Line, turn: defer.Deferred) -> None:
        line.turn = line.work = None
        if not turn.called:
            if isinstance(result, Failure):
                turn.errback(result)
            else:
                turn.callback(result)
        self._hand_over(line)
