"""Worker threads for blocking work (files, SQLite), tied to the service lifecycle."""

from __future__ import annotations

from functools import partial

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

__all__ = ["ThreadPoolService", "synchronous_runner"]


class ThreadPoolService(Service):
    """A thread pool that starts and stops with its parent service; ``runner`` defers work to it."""

    def __init__(self, reactor, name: str, max_threads: int) -> None:
        self.pool = ThreadPool(minthreads=0, maxthreads=max_threads, name=name)
        self.runner = partial(deferToThreadPool, reactor, self.pool)
        self.setName(name)

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self):
        super().stopService()
        self.pool.stop()


def synchronous_runner(function, *args, **kwargs) -> defer.Deferred:
    """Runs the work at once in the calling thread (tests and command-line tools)."""
    return defer.maybeDeferred(function, *args, **kwargs)
