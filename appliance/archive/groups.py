"""Work done in groups: items submitted one at a time, one call on a worker thread for all that are ready.

The archive installs received objects this way (group commit): one index
transaction and one fsync per directory for every object that became
ready while the previous group was being installed.
"""

from __future__ import annotations

from typing import Any, Callable, List, Sequence, Tuple

from twisted.internet import defer
from twisted.python.failure import Failure

__all__ = ["GroupRunner"]


class GroupRunner:
    """Items submitted one at a time, done in groups: one call of ``work(items)`` on ``runner`` for many.

    While a group is being done, the items submitted meanwhile wait and go
    together as the next group (at most ``max_group`` of them), so that a
    cost paid once per call (a commit, an fsync) is shared by whatever
    became ready while the previous one was paid; an item submitted while
    nothing runs starts a group of one at once.  ``work`` returns one
    answer per item, in order: a value, or an exception for that item
    alone; if ``work`` itself raises, every item of its group fails with it.
    Reactor thread only.
    """

    def __init__(self, runner: Callable[..., defer.Deferred], work: Callable[[List[Any]], Sequence[Any]],
                 max_group: int = 64) -> None:
        if max_group < 1:
            raise ValueError("max_group must be at least 1")
        self.runner = runner
        self.work = work
        self.max_group = max_group
        self._waiting: List[Tuple[Any, defer.Deferred]] = []
        self._running = False

    def submit(self, item) -> defer.Deferred:
        """Fires with ``item``'s answer once its group is done."""
        done = defer.Deferred()
        self._waiting.append((item, done))
        if not self._running:
            self._start()
        return done

    def _start(self) -> None:
        group, self._waiting = self._waiting[:self.max_group], self._waiting[self.max_group:]
        self._running = True
        self.runner(self.work, [item for item, _ in group]).addBoth(self._finished, group)

    def _finished(self, answers, group: List[Tuple[Any, defer.Deferred]]) -> None:
        self._running = False
        if self._waiting:  # the next group starts before this one's waiters run
            self._start()
        if isinstance(answers, Failure):
            for _, done in group:
                done.errback(answers)
            return None
        if len(answers) != len(group):
            error = Failure(RuntimeError(f"{len(answers)} answers for a group of {len(group)}"))
            for _, done in group:
                done.errback(error)
            return None
        for (_, done), answer in zip(group, answers):
            if isinstance(answer, BaseException):
                done.errback(Failure(answer))
            else:
                done.callback(answer)
        return None
