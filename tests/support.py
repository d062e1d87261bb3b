"""Helpers shared by the trial test modules: config files, subprocesses, peers and listeners.

Every wait here is bounded: by a number of attempts, or by a Deferred timeout.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import socket
import sys
import threading
from typing import Dict, List, Optional, Sequence

from twisted.internet import defer, protocol, task
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import formatEvent, globalLogPublisher

#: The checkout: the folder holding ``appliance``, ``tests`` and ``twisted/plugins``.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The configuration shipped with the appliance.
SHIPPED_CONFIG = os.path.join(ROOT, "etc", "appliance.toml")

#: How long a test waits for a peer process or a connection to end, in seconds.
WAIT_LIMIT = 20.0


def deferred_test(method):
    """Run an ``async def`` test method as a Deferred.

    Trial on Twisted 22.4 (Debian 12) does not await a coroutine a test method
    returns: without this the test would pass without running.
    """

    @functools.wraps(method)
    def run(*args, **kwargs):
        return defer.ensureDeferred(method(*args, **kwargs))

    return run


def keep_pynetdicom_reactor_off_responses(assoc) -> None:
    """Call on pynetdicom's association as requestor, once established: its reactor thread never takes a DIMSE
    message off the queue, so every response reaches the ``send_*()`` waiting for it.

    pynetdicom (3.0.4) stops that thread around each ``send_*()`` with an event, which it clears, and a flag the
    thread sets before blocking on the event; woken by one send's ``set()`` but scheduled only after the next
    send's ``clear()``, the thread runs one more loop while the flag still says paused, and its non-blocking
    read of the message queue can take the response the sender waits for: logged "Received unexpected C-STORE
    service message", then the sender's DIMSE timeout, an A-ABORT and no status (pydicom/pynetdicom#875; seen
    here in CI, and once in about 120 runs of the pynetdicom corpus test).  A requestor's reactor has nothing
    of its own to read there (responses, and a C-GET's C-STORE sub-operations, are read by the sender).
    """
    dimse = assoc.dimse
    get_msg = dimse.get_msg

    def get_msg_outside_reactor(block: bool = False):
        if not block and threading.current_thread() is assoc:
            return None, None
        return get_msg(block)

    dimse.get_msg = get_msg_outside_reactor


def subprocess_env(**extra: str) -> Dict[str, str]:
    """The environment for a child interpreter: ours, with the checkout first on PYTHONPATH."""
    env = dict(os.environ)
    inherited = env.get("PYTHONPATH")
    env["PYTHONPATH"] = ROOT + (os.pathsep + inherited if inherited else "")
    env.pop("APPLIANCE_CONFIG", None)  # the default config must not depend on the caller's shell
    env.update(extra)
    return env


def run_python(args: Sequence[str], path: Optional[str] = None) -> defer.Deferred:
    """Run ``sys.executable ARGS``; fires with ``(stdout, stderr, exit code)`` as text."""
    d = getProcessOutputAndValue(sys.executable, list(args), env=subprocess_env(), path=path or ROOT)
    return d.addCallback(_decode)


def run_program(executable: str, args: Sequence[str]) -> defer.Deferred:
    """Run a program (a DCMTK tool); fires with ``(stdout, stderr, exit code)`` as text."""
    d = getProcessOutputAndValue(executable, list(args), env=dict(os.environ), path=ROOT)
    return d.addCallback(_decode)


def _decode(result):
    out, err, code = result
    return out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), code


def write_file(testcase, text: str, name: Optional[str] = None) -> str:
    """Write ``text`` to a fresh file of ``testcase``'s temporary area; return its path."""
    folder = os.path.abspath(testcase.mktemp())
    os.makedirs(folder)
    path = os.path.join(folder, name or "appliance.toml")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return path


def load_tool(name: str):
    """tools/NAME.py as a module (``tools`` is not a package), loaded once per process."""
    module_name = f"_appliance_tools_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


#: The ports free_port handed out in this process: never handed out twice, so that two ports chosen for one
#: test before either is bound (a peer's, then the appliance's own) cannot be the same.
_HANDED_OUT: set = set()


def free_port() -> int:
    """A TCP port nothing listens on at the moment (bound to port 0, then closed: a small race with other
    processes) and not handed out before in this process."""
    for _ in range(100):
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        finally:
            probe.close()
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no port that was not handed out already")


def track_connections(factory) -> List[defer.Deferred]:
    """Make every protocol ``factory`` builds fire a Deferred when its connection is lost.

    Returns the (growing) list of those Deferreds, so a cleanup can wait for
    connections to close before trial checks that the reactor is clean.
    """
    lost: List[defer.Deferred] = []
    build = factory.buildProtocol

    def build_and_track(addr):
        built = build(addr)
        if built is None:
            return None
        done = defer.Deferred()
        original = built.connectionLost

        def connection_lost(reason=None):
            try:
                original(reason)
            finally:
                if not done.called:  # a timed-out wait may have cancelled it
                    done.callback(None)

        built.connectionLost = connection_lost
        lost.append(done)
        return built

    factory.buildProtocol = build_and_track
    return lost


def capture_log(testcase, level: str = "debug") -> List[dict]:
    """Every log event published from now to the end of the test, the appliance's at ``level`` and above."""
    from appliance import logs

    events: List[dict] = []
    logs.set_level(level)
    testcase.addCleanup(logs.set_level, "info")
    globalLogPublisher.addObserver(events.append)
    testcase.addCleanup(globalLogPublisher.removeObserver, events.append)
    return events


class Listening:
    """A factory listening on 127.0.0.1, port 0, for one test.

    In cleanup it stops listening and waits until every accepted connection
    closed, so trial finds the reactor clean.  Log lines of the association
    namespace (one per association, written when it ends) are collected.
    """

    def __init__(self, testcase, factory, reactor=None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.factory = factory
        self.lost = track_connections(factory)
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.number: int = self.port.getHost().port
        self.log: List[str] = []
        globalLogPublisher.addObserver(self._observe)
        testcase.addCleanup(globalLogPublisher.removeObserver, self._observe)
        # cleanups run last-added first: stop listening, then wait for the connections
        testcase.addCleanup(self.closed)
        testcase.addCleanup(self.port.stopListening)

    def _observe(self, event) -> None:
        if event.get("log_namespace") == "appliance.association":
            self.log.append(formatEvent(event))

    def closed(self) -> defer.Deferred:
        """Fires once every connection accepted so far has closed (at most WAIT_LIMIT seconds)."""
        pending = [d for d in self.lost if not d.called]
        gathered = defer.gatherResults(pending)
        if pending:
            gathered.addTimeout(WAIT_LIMIT, self.reactor)
        return gathered


class PeerProcess(protocol.ProcessProtocol):
    """A peer program (storescp, dcmqrscp) run for one test; ``ended`` fires when it is gone."""

    def __init__(self) -> None:
        self.output: List[bytes] = []
        self.ended = defer.Deferred()
        self.running = False

    def connectionMade(self) -> None:
        self.running = True
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.output.append(data)

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        self.running = False
        self.ended.callback(reason.value)

    def text(self) -> str:
        return b"".join(self.output).decode("utf-8", "replace")


def spawn_peer(testcase, argv: Sequence[str], path: Optional[str] = None, reactor=None) -> PeerProcess:
    """Start ``argv`` (argv[0] an absolute path); in cleanup kill it and wait until it ended."""
    if reactor is None:
        from twisted.internet import reactor
    peer = PeerProcess()
    reactor.spawnProcess(peer, argv[0], list(argv), env=dict(os.environ), path=path)

    def stop():
        if peer.running:
            try:
                peer.transport.signalProcess("KILL")
            except Exception:  # it ended between the check and the signal
                pass
        if not peer.ended.called:
            peer.ended.addTimeout(WAIT_LIMIT, reactor)
        return peer.ended

    testcase.addCleanup(stop)
    return peer


async def connect_when_listening(reactor, connect, peer: Optional[PeerProcess] = None,
                                 attempts: int = 200, delay: float = 0.05, only_refused: bool = False):
    """Call ``connect()`` (-> Deferred) until it does not fail with ConnectionFailed; bounded.

    For a peer just started: it listens a moment later.  Gives up after
    ``attempts`` tries (``attempts * delay`` seconds and then some), or at once
    when the peer process ended.  With ``only_refused``, any other
    ConnectionFailed (a TLS handshake refused, say) is the answer, raised at once.
    """
    from appliance.net.requestor import ConnectionFailed

    last: Optional[Exception] = None
    for _ in range(attempts):
        if peer is not None and not peer.running and peer.ended.called:
            raise AssertionError(f"the peer ended before it listened; its output:\n{peer.text()}")
        try:
            return await connect()
        except ConnectionFailed as error:
            if only_refused and "refused" not in str(error):
                raise
            last = error
        await task.deferLater(reactor, delay, lambda: None)
    raise AssertionError(f"no connection after {attempts} attempts: {last}")


class ApplianceProcess(protocol.ProcessProtocol):
    """``twistd -n appliance`` in a child interpreter; its output gathered; ``ready`` fires once every line
    in ``expected`` (regular expressions) has appeared in it."""

    def __init__(self, expected: Sequence[str]) -> None:
        self.output = bytearray()
        self.expected = [re.compile(pattern) for pattern in expected]
        self.ready: defer.Deferred = defer.Deferred()
        self.status = None
        self._ended: List[defer.Deferred] = []

    @property
    def pid(self) -> int:
        return self.transport.pid

    @property
    def running(self) -> bool:
        return self.status is None

    def connectionMade(self) -> None:
        self.transport.closeStdin()

    def childDataReceived(self, fd: int, data: bytes) -> None:
        self.output += data
        if not self.ready.called and all(pattern.search(self.text()) for pattern in self.expected):
            self.ready.callback(self)

    def processEnded(self, reason) -> None:
        self.status = reason.value
        if not self.ready.called:
            self.ready.errback(AssertionError(f"the appliance ended before it was ready ({reason.value}):\n"
                                              f"{self.text()[-3000:]}"))
        ended, self._ended = self._ended, []
        for d in ended:
            d.callback(reason.value)

    def text(self) -> str:
        return self.output.decode("utf-8", "replace")

    def ended(self) -> defer.Deferred:
        if self.status is not None:
            return defer.succeed(self.status)
        d = defer.Deferred()
        self._ended.append(d)
        return d

    async def stop(self, limit: float = 20.0) -> None:
        """SIGTERM (twistd stops cleanly), SIGKILL after ``limit`` seconds; returns once it is gone."""
        if not self.running:
            return
        from twisted.internet import reactor

        self.transport.signalProcess("TERM")
        kill = reactor.callLater(limit, lambda: self.running and self.transport.signalProcess("KILL"))
        await self.ended()
        if kill.active():
            kill.cancel()
