"""The HTTP server's Site: bounded requests, JSON errors, no tracebacks.

Request bodies are bounded (:data:`MAX_BODY`): a request that announces or
sends more is answered 413 and its connection closed, without the rest being
kept.  Headers are bounded by twisted.web's own limits (their number and total
size), idle connections by the Site's timeout, and the connections open at
once by :data:`MAX_CONNECTIONS` (past it a new one is closed at once), so that
clients that hold connections (sending a header byte now and then) cannot take
the file descriptors the DICOM listeners need.  An exception in a handler is
logged and answered 500 with a short JSON reason; twisted.web's traceback
pages are off.
"""

from __future__ import annotations

import json
from typing import Optional

from twisted.internet.protocol import Protocol
from twisted.web import http, server

from ..logs import logger

__all__ = ["ApplianceSite", "BoundedRequest", "MAX_BODY", "IDLE_TIMEOUT", "MAX_CONNECTIONS"]

_log = logger("appliance.web")

#: Request bodies larger than this are refused (the API's requests are a few hundred bytes).
MAX_BODY = 64 * 1024
#: Seconds a connection may stay idle.
IDLE_TIMEOUT = 60
#: HTTP connections open at once at most (the pages need a few per browser; the process's 1,024 descriptors are
#: shared with the DICOM listeners, which bound theirs too).
MAX_CONNECTIONS = 256
#: Seconds between two log lines about connections closed for MAX_CONNECTIONS.
REFUSAL_LOG_INTERVAL = 60.0


class BoundedRequest(server.Request):
    """A request whose body may not exceed :data:`MAX_BODY` bytes."""

    _received = 0
    _refused = False

    def gotLength(self, length) -> None:
        if length is not None and length > MAX_BODY:
            self._refuse()
        super().gotLength(length if length is None or length <= MAX_BODY else 0)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > MAX_BODY:
            self._refuse()
            return
        super().handleContentChunk(data)

    def _refuse(self) -> None:
        """413 written straight to the connection, which is then closed: the rest of the body is never read."""
        if self._refused:
            return
        self._refused = True
        body = json.dumps({"error": f"request body larger than {MAX_BODY} bytes"}).encode("ascii")
        transport = self.channel.transport
        transport.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/json\r\n"
                        b"Content-Length: " + str(len(body)).encode("ascii") + b"\r\nConnection: close\r\n\r\n" + body)
        transport.loseConnection()

    def requestReceived(self, command, path, version) -> None:
        if self._refused:
            return
        super().requestReceived(command, path, version)

    def processingFailed(self, reason):
        _log.failure("HTTP {method} {path} failed", reason, method=self.method, path=self.path)
        if self.finished or self._disconnected:
            return None
        body = json.dumps({"error": "internal error (logged)"}).encode("ascii")
        self.setResponseCode(http.INTERNAL_SERVER_ERROR)
        self.setHeader(b"content-type", b"application/json")
        self.setHeader(b"content-length", str(len(body)).encode("ascii"))
        self.write(body)
        self.finish()
        return reason


class _ClosedAtOnce(Protocol):
    """A connection past MAX_CONNECTIONS: closed as soon as it is made, without a byte."""

    def connectionMade(self) -> None:
        self.transport.abortConnection()


class ApplianceSite(server.Site):
    """The Site the web port serves: bounded requests, no traceback pages, quiet access log."""

    requestFactory = BoundedRequest
    displayTracebacks = False
    noisy = False

    def __init__(self, resource, reactor=None, max_connections: Optional[int] = None) -> None:
        if reactor is None:
            super().__init__(resource, timeout=IDLE_TIMEOUT)
        else:
            super().__init__(resource, timeout=IDLE_TIMEOUT, reactor=reactor)
        self.max_connections = MAX_CONNECTIONS if max_connections is None else max_connections
        #: connections open now, and those closed at once for the bound since the last log line about them
        self.open_connections = 0
        self._refused = 0
        self._refusal_logged: float = float("-inf")

    def buildProtocol(self, addr):
        if self.open_connections >= self.max_connections:
            self._refused += 1
            now = self.reactor.seconds()
            if now - self._refusal_logged >= REFUSAL_LOG_INTERVAL:
                _log.warn("web: {count} connection(s) closed at once: {open} open already (at most {limit})",
                          count=self._refused, open=self.open_connections, limit=self.max_connections)
                self._refused, self._refusal_logged = 0, now
            return _ClosedAtOnce()  # (not None: behind TLS the wrapping factory would wrap None)
        protocol = super().buildProtocol(addr)
        self.open_connections += 1
        lost = protocol.connectionLost

        def connection_lost(reason=None):  # the count follows whichever channel class twisted.web builds
            self.open_connections -= 1
            return lost(reason)

        protocol.connectionLost = connection_lost
        return protocol

    def log(self, request) -> None:
        _log.debug("HTTP {method} {uri} {code}", method=request.method.decode("ascii", "replace"),
                   uri=request.uri.decode("ascii", "replace")[:200], code=request.code)
