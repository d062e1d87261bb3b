"""The HTTP server's Site: bounded requests, JSON errors, no tracebacks.

Request bodies are bounded (:data:`MAX_BODY`): a request that announces or
sends more is answered 413 and its connection closed, without the rest being
kept.  Headers are bounded by twisted.web's own limits (their number and total
size), idle connections by the Site's timeout.  An exception in a handler is
logged and answered 500 with a short JSON reason; twisted.web's traceback
pages are off.
"""

from __future__ import annotations

import json

from twisted.web import http, server

from ..logs import logger

__all__ = ["ApplianceSite", "BoundedRequest", "MAX_BODY", "IDLE_TIMEOUT"]

_log = logger("appliance.web")

#: Request bodies larger than this are refused (the API's requests are a few hundred bytes).
MAX_BODY = 64 * 1024
#: Seconds a connection may stay idle.
IDLE_TIMEOUT = 60


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


class ApplianceSite(server.Site):
    """The Site the web port serves: bounded requests, no traceback pages, quiet access log."""

    requestFactory = BoundedRequest
    displayTracebacks = False
    noisy = False

    def __init__(self, resource, reactor=None) -> None:
        if reactor is None:
            super().__init__(resource, timeout=IDLE_TIMEOUT)
        else:
            super().__init__(resource, timeout=IDLE_TIMEOUT, reactor=reactor)

    def log(self, request) -> None:
        _log.debug("HTTP {method} {uri} {code}", method=request.method.decode("ascii", "replace"),
                   uri=request.uri.decode("ascii", "replace")[:200], code=request.code)
