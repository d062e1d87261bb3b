"""The install helper: a process of its own that installs groups of objects, beside the reactor's process.

Installing an object is mostly waiting on the disk, but between its system
calls (write, fsync, link, each index statement) the database thread
takes Python's interpreter lock back, and with several senders the reactor
holds it much of the time: a group of objects took three to four times as
long to install as alone.  This process has an interpreter of its own.  The
archive hands it the groups of more than one object held in memory (one
object alone, or one streamed to a temporary file, is installed on the
database thread as before: the hand-off costs more than it saves there).

The protocol, over a socket pair, framed by :mod:`multiprocessing.connection`,
messages pickled (both ends are this program): the helper sends
``("ready", pid)`` once its archive is open; then for each group it receives
it answers ``("answers", [...], log)`` (one answer per object, as
:meth:`.install.Installer.install` gives them) or ``("failed", exception,
log)`` when the group as a whole failed; ``log``: the helper's warnings and
errors while installing, for the parent to log.  It ends when the parent's
end closes (the parent closed it, or died); it ignores SIGINT and SIGTERM so
that a group it started is finished.

Run as ``python -m appliance.archive.helper FD ROOT ON_DUPLICATE SPARES``.
"""

from __future__ import annotations

import errno
import os
import pickle
import signal
import socket
import sqlite3
import subprocess
import sys
from multiprocessing.connection import Connection
from typing import List, Optional, Sequence

from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from ..logs import logger
from .index import ArchiveIndex
from .install import HelperFailed, Installer
from .store import ObjectStore

__all__ = ["InstallHelper", "HelperFailed", "HelperUnavailable", "main"]

_log = logger("appliance.archive")


class HelperUnavailable(Exception):
    """The install helper could not be started: nothing was handed to it."""


#: seconds the helper may take to open the archive and say it is ready, and to end once its end is closed
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


class InstallHelper:
    """The parent's end: starts the helper process, hands it groups (blocking: the database thread's), stops it.

    A helper that died, or cannot be reached, makes :meth:`install` raise
    :class:`HelperFailed` (the group's objects may or may not have been
    installed; none was answered); the next group starts a new one.
    """

    def __init__(self, root: str, on_duplicate: str, spares: int, executable: str = sys.executable) -> None:
        self.root = root
        self.on_duplicate = on_duplicate
        self.spares = spares
        self.executable = executable
        self.process: Optional[subprocess.Popen] = None
        self._connection: Optional[Connection] = None

    @property
    def pid(self) -> Optional[int]:
        return self.process.pid if self.process is not None else None

    def start(self) -> int:
        """Start the helper and wait until its archive is open; its process id.  HelperUnavailable if it cannot
        be started."""
        try:
            return self._start()
        except OSError as error:
            self._end()
            raise HelperUnavailable(f"cannot start the install helper: {error}") from None

    def _start(self) -> int:
        ours, theirs = socket.socketpair()
        try:
            environment = dict(os.environ)
            # the modules where this process found them (a checkout, a virtualenv, the Debian package's)
            environment["PYTHONPATH"] = os.pathsep.join(path for path in sys.path if path and os.path.exists(path))
            self.process = subprocess.Popen(
                [self.executable, "-m", "appliance.archive.helper", str(theirs.fileno()), self.root,
                 self.on_duplicate, str(self.spares)],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=environment,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._connection = Connection(ours.detach())
        try:
            if not self._connection.poll(START_TIMEOUT):
                raise HelperUnavailable(f"the install helper did not start within {START_TIMEOUT:g} s")
            reply = pickle.loads(self._connection.recv_bytes())
        except (EOFError, OSError) as error:
            status = self.process.poll() if self.process is not None else None
            self._end()
            raise HelperUnavailable(f"the install helper ended while starting ({_why(error)}, exit status "
                                    f"{status})") from None
        except HelperUnavailable:
            self._end()
            raise
        if reply[0] != "ready":
            self._end()
            raise HelperUnavailable(f"the install helper could not open the archive: {reply[1]}")
        return self.process.pid

    def install(self, group: Sequence) -> List[object]:
        """Database thread: have the helper install ``group``; its answers (see :meth:`.Installer.install`).
        Raises what failed the whole group; HelperFailed if the helper ended with it; HelperUnavailable if no
        helper could be started for it (then nothing of it was done)."""
        if self._connection is None:
            self.start()
        try:
            self._connection.send_bytes(pickle.dumps(list(group), protocol=pickle.HIGHEST_PROTOCOL))
            reply = pickle.loads(self._connection.recv_bytes())
        except (EOFError, OSError) as error:
            self._end()
            raise HelperFailed(f"the install helper ended during a group of {len(group)} ({_why(error)}); "
                               "its objects were not answered Success") from None
        kind, payload, messages = reply
        for message in messages:
            _log.error("install helper: {message}", message=message)
        if kind == "failed":
            raise payload
        return payload

    def stop(self) -> None:
        """Close our end and wait for the helper to end (killed if it does not)."""
        self._end()

    def _end(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        process, self.process = self.process, None
        if process is None:
            return
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _why(error: BaseException) -> str:
    return "its end closed" if isinstance(error, EOFError) else f"{type(error).__name__}: {error}"


def _portable(error: BaseException) -> BaseException:
    """An exception as the parent can take it back: an index full (SQLITE_FULL, whose code a pickle loses) as the
    OSError ENOSPC it is, anything that does not pickle as a RuntimeError saying what it was."""
    if isinstance(error, sqlite3.Error) and getattr(error, "sqlite_errorcode", None) == getattr(
            sqlite3, "SQLITE_FULL", 13):
        return OSError(errno.ENOSPC, f"the index: {error}")
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error


# --- the helper ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str]) -> int:
    fd, root, on_duplicate, spares = int(argv[0]), argv[1], argv[2], int(argv[3])
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    connection = Connection(fd)
    messages: List[str] = []

    def keep(event) -> None:
        if event.get("log_level", LogLevel.info) >= LogLevel.warn:
            messages.append(formatEvent(event))

    globalLogPublisher.addObserver(keep)
    try:
        store = ObjectStore(root, spares=spares)
        index = ArchiveIndex(os.path.join(root, "index.sqlite"))
    except Exception as error:
        connection.send_bytes(pickle.dumps(("error", f"{type(error).__name__}: {error}")))
        return 1
    installer = Installer(store, index, on_duplicate)
    # what a group's objects refer to (the sink's functions that write them), loaded before saying ready rather
    # than by the first group's unpickling (some 40 ms, which its senders would wait)
    from . import sink  # noqa: F401
    try:
        _make_spares(store)
        connection.send_bytes(pickle.dumps(("ready", os.getpid())))
        while True:
            try:
                group = pickle.loads(connection.recv_bytes())
            except EOFError:
                return 0
            try:
                reply = ("answers", [_portable(a) if isinstance(a, BaseException) else a
                                     for a in installer.install(group)], messages[:])
            except Exception as error:
                reply = ("failed", _portable(error), messages[:])
            messages.clear()
            connection.send_bytes(pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL))
            _make_spares(store)
    finally:
        store.close()
        index.close()


def _make_spares(store: ObjectStore) -> None:
    """Between groups: spare temporary files made (a full disk says so when the next group is installed)."""
    if store.needs_spares:
        try:
            store.make_spares()
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
