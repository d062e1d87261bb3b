"""The local JSON API: loads (the Memory-Manager) and what is in memory (the Memory-Server's store).

::

    GET    /api/devices                                   the devices: the Local archive and [devices.*]
    POST   /api/devices/{name}/echo                       C-ECHO: status and round trip
    GET    /api/devices/{name}/studies                    C-FIND, QIDO-RS shaped (PS3.18 10.6): application/dicom+json
    GET    /api/devices/{name}/studies/{study}/series
    GET    /api/devices/{name}/studies/{study}/series/{series}/instances
    GET    /api/loads                                     every load, newest last
    POST   /api/loads                                     {"device", "study", "series"?, "instance"?} -> 202
    GET    /api/loads/{id}
    DELETE /api/loads/{id}                                cancel (C-CANCEL), or drop a queued load
    GET    /api/memory/studies                            what is held, by study
    GET    /api/memory/studies/{study}                    one study with its series and instances
    DELETE /api/memory/studies/{study}                    free it
    GET    /api/memory/studies/{study}/series/{series}/instances/{sop}            application/dicom (Part 10)
    GET    /api/memory/studies/{study}/series/{series}/instances/{sop}/metadata   DICOM JSON (PS3.18 F.2)
    GET    /api/memory/studies/{study}/series/{series}/instances/{sop}/rendered   image/png (?frame=&window=c,w)

Every answer is JSON except the instance, its metadata (application/dicom+json) and the rendered image;
every error is ``{"error": reason}`` with a 4xx status saying whose fault it is.  Path segments and
parameters are checked before anything is looked up: UIDs must be UIDs, ids numbers, bodies small JSON
objects with known keys.  Parsing and rendering run on worker threads.
"""

from __future__ import annotations

import hmac
import json
import re
from io import BytesIO
from typing import Callable, Dict, List, Optional, Tuple
from urllib.parse import quote

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from ..ae.manager import MemoryManager, QueueFull, UnknownDevice, UnknownLoad
from ..ae.web_queries import DeviceFailure, WebQueries
from ..ae.web_queries import UnknownDevice as UnknownQueryDevice
from ..config import LOCAL_ARCHIVE, ApplianceConfig
from ..dicom import status as S
from ..dataset.part10 import part10_header
from ..dicom.uids import is_valid_uid
from ..logs import logger
from ..memory.store import HeldObject, HeldStudy, MemoryStore
from .auth import Session, Sessions, SignInLimiter, check_password, hash_password
from .pages import SECURITY_HEADERS, Pages
from .qido import QueryError, parse_query, to_json

__all__ = ["ApiResource", "HTTPError"]

_log = logger("appliance.web")

#: Bytes written to the connection at a time when serving an object (flow-controlled by the transport).
SEND_CHUNK = 256 * 1024
#: Binary values up to this size are inlined in the metadata (InlineBinary); larger ones are referenced.
BULK_THRESHOLD = 1024
#: Longest ``?wait=`` on a load, in seconds.
MAX_WAIT = 60
_LOAD_KEYS = {"device", "study", "series", "instance"}
_DEVICE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_JSON = "application/json"
TOO_MANY_REQUESTS = 429  # RFC 6585 (twisted.web.http has no name for it)
#: Password checks (scrypt, on a worker thread) under way at once, at most.
MAX_CHECKING = 4
#: The session cookie's name.
SESSION_COOKIE = b"appliance_session"
#: Checked against when the user is unknown, so that a sign-in takes as long whoever it names.
_DECOY_HASH = hash_password("not a password", salt=b"decoy salt 16 b.")


class HTTPError(Exception):
    def __init__(self, code: int, reason: str, headers: Optional[Dict[str, str]] = None,
                 details: Optional[dict] = None) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.headers = headers or {}
        #: more of the answer's JSON object beside "error" (a device's status, the kind of failure)
        self.details = details or {}


def json_bytes(value) -> bytes:
    """JSON, ASCII only, with <, > and & escaped too: never markup, whatever a browser makes of it."""
    text = json.dumps(value, ensure_ascii=True)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").encode("ascii")


def _uid(value, what: str) -> str:
    if not isinstance(value, str) or not is_valid_uid(value):
        shown = value if isinstance(value, str) and len(value) <= 80 else type(value).__name__
        raise HTTPError(http.BAD_REQUEST, f"{what} must be a UID (digits and dots, at most 64 characters), "
                                          f"not {shown!r}")
    return value


class ApiResource(Resource):
    """The web port's root: one leaf resource routing on the path segments (everything is under /api)."""

    isLeaf = True

    def __init__(self, config: ApplianceConfig, manager: MemoryManager, store: MemoryStore,
                 runner: Callable[..., defer.Deferred], render=None, queries: Optional[WebQueries] = None,
                 clock=None) -> None:
        super().__init__()
        self.config = config
        self.manager = manager
        self.store = store
        clock = clock if clock is not None else manager.clock
        #: [web.users]; empty: the pages are open (on a loopback interface)
        self.users = dict(config.web.users)
        self.sessions = Sessions(clock, config.web.session_lifetime)
        self.limiter = SignInLimiter(clock)
        #: sign-in checks under way (at most MAX_CHECKING)
        self._checking = 0
        #: the Web Software-Server's C-FIND and C-ECHO (None: the query routes answer 503)
        self.queries = queries
        #: the web pages' files
        self.pages = Pages()
        #: where parsing and rendering run (a worker thread in the appliance)
        self.runner = runner
        #: render(data, transfer_syntax, frame, window) -> PNG bytes (appliance.dataset.render.render_png)
        self.renderer = render
        self.routes: List[Tuple[Tuple[str, ...], Dict[bytes, Callable]]] = [
            (("api", "session"), {b"GET": self.show_session, b"POST": self.sign_in, b"DELETE": self.sign_out}),
            (("api", "devices"), {b"GET": self.list_devices}),
            (("api", "devices", "*", "echo"), {b"POST": self.echo_device}),
            (("api", "devices", "*", "studies"), {b"GET": self.find_studies}),
            (("api", "devices", "*", "studies", "*", "series"), {b"GET": self.find_series}),
            (("api", "devices", "*", "studies", "*", "series", "*", "instances"), {b"GET": self.find_instances}),
            (("api", "loads"), {b"GET": self.list_loads, b"POST": self.create_load}),
            (("api", "loads", "*"), {b"GET": self.show_load, b"DELETE": self.cancel_load}),
            (("api", "memory", "studies"), {b"GET": self.list_studies}),
            (("api", "memory", "studies", "*"), {b"GET": self.show_study, b"DELETE": self.free_study}),
            (("api", "memory", "studies", "*", "series", "*", "instances", "*"), {b"GET": self.instance}),
            (("api", "memory", "studies", "*", "series", "*", "instances", "*", "metadata"), {b"GET": self.metadata}),
            (("api", "memory", "studies", "*", "series", "*", "instances", "*", "rendered"), {b"GET": self.rendered}),
        ]

    # --- dispatch -----------------------------------------------------------------------------------------

    def render(self, request):  # noqa: C901 (one dispatch)
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        request.setHeader(b"cache-control", b"no-store")
        try:
            segments = [segment.decode("utf-8") for segment in request.postpath]
        except UnicodeDecodeError:
            return self._error(request, HTTPError(http.BAD_REQUEST, "the path is not UTF-8"))
        if segments and segments[-1] == "":
            segments.pop()  # a trailing slash
        if not segments or segments[0] == "static":
            return self._page(request, segments)
        for pattern, methods in self.routes:
            if len(pattern) == len(segments) and all(p == "*" or p == s for p, s in zip(pattern, segments)):
                handler = methods.get(request.method)
                if handler is None:
                    allowed = ", ".join(sorted(m.decode("ascii") for m in methods))
                    return self._error(request, HTTPError(http.NOT_ALLOWED, f"{request.method.decode('ascii', 'replace')}"
                                                          f" is not allowed here (allowed: {allowed})",
                                                          {"Allow": allowed}))
                arguments = [s for p, s in zip(pattern, segments) if p == "*"]
                try:
                    self._guard(request, pattern)
                    result = handler(request, *arguments)
                except HTTPError as error:
                    return self._error(request, error)
                if isinstance(result, defer.Deferred):
                    result.addErrback(self._failed, request).addCallback(self._answer, request)
                    request.notifyFinish().addErrback(lambda _: result.cancel())
                    return NOT_DONE_YET
                return self._finish(request, result)
        return self._error(request, HTTPError(http.NOT_FOUND, f"no such resource: /{'/'.join(segments)}"[:200]))

    def _page(self, request, segments):
        """The pages' files: ``/`` is index.html, ``/static/NAME`` one of the others, by exact name."""
        if request.method not in (b"GET", b"HEAD"):
            return self._error(request, HTTPError(http.NOT_ALLOWED, "the pages are only read (GET)", {"Allow": "GET"}))
        if not segments:
            found = self.pages.index
        elif len(segments) == 2:
            found = self.pages.get(segments[1])
        else:
            found = None
        if found is None:
            return self._error(request, HTTPError(http.NOT_FOUND, "no such page"))
        content_type, body = found
        request.setHeader(b"cache-control", b"no-cache")
        return self._finish(request, (http.OK, content_type, body))

    def _failed(self, failure, request):
        if failure.check(HTTPError):
            return failure.value
        if failure.check(defer.CancelledError):
            return None  # the client went away
        _log.failure("HTTP {method} {path} failed", failure, method=request.method, path=request.path)
        return HTTPError(http.INTERNAL_SERVER_ERROR, "internal error (logged)")

    def _answer(self, result, request) -> None:
        if result is None or request.finished or getattr(request, "_disconnected", False):
            return
        if isinstance(result, HTTPError):
            body = self._error(request, result)
        else:
            body = self._finish(request, result)
        if body is not NOT_DONE_YET:
            request.write(body)
            request.finish()

    def _finish(self, request, result):
        """A handler's result: (status, JSON-able) or (status, content type, bytes) or a streaming callable."""
        if callable(result):
            result(request)
            return NOT_DONE_YET
        if len(result) == 2:
            code, value = result
            body, content_type = json_bytes(value), _JSON
        else:
            code, content_type, body = result
        request.setResponseCode(code)
        request.setHeader(b"content-type", content_type.encode("ascii"))
        request.setHeader(b"content-length", str(len(body)).encode("ascii"))
        return body

    @staticmethod
    def _error(request, error: HTTPError) -> bytes:
        request.setResponseCode(error.code)
        for name, value in error.headers.items():
            request.setHeader(name.encode("ascii"), value.encode("ascii"))
        body = json_bytes({"error": error.reason, **error.details})
        request.setHeader(b"content-type", _JSON.encode("ascii"))
        request.setHeader(b"content-length", str(len(body)).encode("ascii"))
        return body

    # --- devices and loads --------------------------------------------------------------------------------

    # --- who may ask: sessions, CSRF, origins ----------------------------------------------------------------

    def _guard(self, request, pattern) -> None:
        """Refuse what may not be done: a cross-origin change, a change without JSON (open pages) or without the
        session's CSRF token, anything but the session itself without a session when users are configured."""
        changes = request.method not in (b"GET", b"HEAD")
        if changes:
            origin = request.getHeader(b"origin")
            if origin is not None and not _same_origin(origin, request.getHeader(b"host")):
                raise HTTPError(http.FORBIDDEN, "a request from another origin is refused")
        if pattern == ("api", "session"):
            return
        session = self._session(request)
        if self.users and session is None:
            raise HTTPError(http.UNAUTHORIZED, "sign in first (POST /api/session)")
        if not changes:
            return
        if session is not None:
            _check_csrf(request, session)
        elif request.method == b"POST" and _content_type(request) != b"application/json":
            # a page of another site can POST a form or text/plain, never JSON (that needs a CORS preflight, as
            # DELETE does)
            raise HTTPError(http.UNSUPPORTED_MEDIA_TYPE, "send changes as application/json")

    def _session(self, request) -> Optional[Session]:
        cookie = request.getCookie(SESSION_COOKIE)
        return self.sessions.get(cookie.decode("ascii", "replace")) if cookie else None

    def show_session(self, request):
        session = self._session(request)
        return http.OK, {"users": bool(self.users), "user": session.user if session else None,
                         "csrf": session.csrf if session else None}

    def sign_in(self, request):
        if _content_type(request) != b"application/json":
            raise HTTPError(http.UNSUPPORTED_MEDIA_TYPE, "sign in with application/json")
        if not self.users:
            raise HTTPError(http.CONFLICT, "no users are configured: the pages are open")
        address = getattr(request.getClientAddress(), "host", "?")
        wait = self.limiter.retry_after(address)
        if wait is not None:
            seconds = max(1, int(wait + 0.999))
            raise HTTPError(TOO_MANY_REQUESTS, f"too many failed sign-ins from {address}: try again in "
                            f"{seconds} s", {"Retry-After": str(seconds)})
        body = _json_object(request, {"user", "password"})
        user, password = body.get("user"), body.get("password")
        if not isinstance(user, str) or not isinstance(password, str) or len(user) > 64 or len(password) > 1024:
            raise HTTPError(http.BAD_REQUEST, "give user and password as strings")
        if self._checking >= MAX_CHECKING:
            # each check costs scrypt's memory and ~50 ms of a worker: a flood waits outside, not in a queue
            raise HTTPError(http.SERVICE_UNAVAILABLE, "too many sign-ins at once: try again in a second",
                            {"Retry-After": "1"})
        # an unknown user costs the same work as a known one: the answer's time does not say who exists
        stored = self.users.get(user, _DECOY_HASH)
        self._checking += 1
        self.limiter.checking(address)
        checking = self.runner(check_password, password, stored)

        def done(result):
            self._checking -= 1
            self.limiter.checked(address)
            return result

        checking.addBoth(done)

        def checked(matches):
            if not matches or user not in self.users:
                self.limiter.failed(address)
                _log.warn("web sign-in refused for {user!r} from {address}", user=user[:64], address=address)
                raise HTTPError(http.UNAUTHORIZED, "wrong user or password")
            self.limiter.succeeded(address)
            token, session = self.sessions.create(user)
            request.addCookie(SESSION_COOKIE, token.encode("ascii"), path=b"/", httpOnly=True, sameSite="strict",
                              max_age=str(int(self.sessions.lifetime)).encode("ascii"),
                              secure=request.isSecure())
            _log.info("web sign-in of {user} from {address}", user=user, address=address)
            return http.OK, {"users": True, "user": user, "csrf": session.csrf}

        return checking.addCallback(checked)

    def sign_out(self, request):
        session = self._session(request)
        if session is not None:
            _check_csrf(request, session)
            self.sessions.end(request.getCookie(SESSION_COOKIE).decode("ascii", "replace"))
        request.addCookie(SESSION_COOKIE, b"", path=b"/", httpOnly=True, sameSite="strict", max_age=b"0",
                          secure=request.isSecure())
        return http.OK, {"users": bool(self.users), "user": None, "csrf": None}

    def list_devices(self, request):
        devices = self.config.remote_devices.values()  # the Local archive first, as the queries see them
        return http.OK, {"devices": [
            {"name": d.name, "label": "Local archive" if d.name == LOCAL_ARCHIVE else d.name, "ae_title": d.ae_title,
             "host": d.host, "port": d.port, "tls": d.tls is not None, "retrieve": d.retrieve} for d in devices]}

    # --- the Web Software-Server: C-ECHO and C-FIND to a device -------------------------------------------------

    def _queries(self, name: str) -> WebQueries:
        if not _DEVICE_NAME.match(name):
            raise HTTPError(http.BAD_REQUEST, "a device name is letters, digits, '.', '_' and '-' (1-64)")
        if self.queries is None:
            raise HTTPError(http.SERVICE_UNAVAILABLE, "queries are not available")
        try:
            self.queries.device(name)
        except UnknownQueryDevice as error:
            raise HTTPError(http.NOT_FOUND, str(error)) from None
        return self.queries

    def echo_device(self, request, name: str):
        queries = self._queries(name)
        if request.args:
            raise HTTPError(http.BAD_REQUEST, "an echo takes no parameters")
        d = queries.echo(name)

        def answered(echoed):
            return http.OK, {"device": name, "status": f"0x{echoed.status:04X}", "ok": echoed.status == 0,
                             "meaning": S.describe(echoed.status), "milliseconds": round(echoed.seconds * 1000, 1)}

        return d.addCallbacks(answered, _device_failed)

    def find_studies(self, request, name: str):
        return self._find(request, name, "STUDY", {})

    def find_series(self, request, name: str, study: str):
        return self._find(request, name, "SERIES", {"StudyInstanceUID": _uid(study, "the study")})

    def find_instances(self, request, name: str, study: str, series: str):
        return self._find(request, name, "IMAGE", {"StudyInstanceUID": _uid(study, "the study"),
                                                   "SeriesInstanceUID": _uid(series, "the series")})

    def _find(self, request, name: str, level: str, fixed: Dict[str, str]):
        """QIDO-RS shaped (PS3.18 10.6): the matches as application/dicom+json; a Warning header when more
        matched than [web] max_results (the query was cancelled there) or a parameter was not honoured.  With
        ``Accept: application/x-ndjson`` the matches are streamed as they arrive, one JSON object a line, and a
        last line says how it ended.  A client that goes away stops the query (C-CANCEL)."""
        queries = self._queries(name)
        try:
            arguments = {key.decode("utf-8"): [value.decode("utf-8") for value in values]
                         for key, values in request.args.items()}
        except UnicodeDecodeError:
            raise HTTPError(http.BAD_REQUEST, "query parameters must be UTF-8") from None
        try:
            query = parse_query(arguments, level, fixed, queries.max_results)
        except QueryError as error:
            raise HTTPError(http.BAD_REQUEST, str(error)) from None
        wanted = query.offset + query.limit if query.limit is not None else queries.max_results
        if b"application/x-ndjson" in (request.getHeader(b"accept") or b""):
            return lambda req: _QueryStream(req, queries, name, query, wanted).start()
        answered = queries.start(name, query.identifier, wanted).answer()  # the client gone: C-CANCEL, not an abort

        def found(result):
            shown = result.matches[query.offset:]
            if query.limit is not None:
                shown = shown[:query.limit]
            return self.runner(_dicom_json, shown).addCallback(answer, result)

        def answer(body, result):
            if request.finished or getattr(request, "_disconnected", False):
                return None
            request.setHeader(b"x-matches", str(len(result.matches)).encode("ascii"))
            request.setHeader(b"x-query-milliseconds", str(round(result.seconds * 1000)).encode("ascii"))
            if result.truncated:
                request.setHeader(b"x-truncated", b"true")
            for text in _warnings(query, result, queries.max_results):
                request.responseHeaders.addRawHeader(b"warning", f'299 appliance "{text}"'.encode("ascii", "replace"))
            return http.OK, "application/dicom+json", body

        return answered.addCallbacks(found, _device_failed)

    def list_loads(self, request):
        return http.OK, {"loads": [load.as_json() for load in self.manager.loads.values()]}

    def create_load(self, request):
        if _content_type(request) != b"application/json":
            raise HTTPError(http.UNSUPPORTED_MEDIA_TYPE, "send the load as application/json")
        body = _json_object(request, _LOAD_KEYS)
        device = body.get("device")
        if not isinstance(device, str) or not _DEVICE_NAME.match(device):
            raise HTTPError(http.BAD_REQUEST, "device must be the name of a configured device ([devices.NAME])")
        study = _uid(body.get("study"), "study")
        series = _uid(body["series"], "series") if body.get("series") is not None else None
        instance = _uid(body["instance"], "instance") if body.get("instance") is not None else None
        if instance is not None and series is None:
            raise HTTPError(http.BAD_REQUEST, "an instance is loaded with its series: give series too")
        try:
            load = self.manager.submit(device, study, series, instance)
        except UnknownDevice as error:
            raise HTTPError(http.NOT_FOUND, str(error)) from None
        except QueueFull as error:
            raise HTTPError(http.SERVICE_UNAVAILABLE, str(error), {"Retry-After": "10"}) from None
        request.setHeader(b"location", f"/api/loads/{load.id}".encode("ascii"))
        return http.ACCEPTED, load.as_json()

    def _load_id(self, text: str) -> int:
        if not _digits(text, 12):
            raise HTTPError(http.BAD_REQUEST, "a load id is a number")
        return int(text)

    def show_load(self, request, load_id: str):
        """The load; with ``?wait=SECONDS`` (1 to 60) answered at its next change (of state or counts), or after
        that long."""
        unknown = sorted(key.decode("ascii", "replace")[:40] for key in request.args if key != b"wait")
        if unknown:
            raise HTTPError(http.BAD_REQUEST, f"unknown parameter {unknown[0]!r} (known: wait)")
        try:
            load = self.manager.get(self._load_id(load_id))
        except UnknownLoad as error:
            raise HTTPError(http.NOT_FOUND, str(error)) from None
        if b"wait" not in request.args:
            return http.OK, load.as_json()
        text = request.args[b"wait"][-1].decode("ascii", "replace")
        if not _digits(text, 2) or not 1 <= int(text) <= MAX_WAIT:
            raise HTTPError(http.BAD_REQUEST, f"wait must be a number of seconds from 1 to {MAX_WAIT}")
        waiting = self.manager.changed(load.id)
        waiting.addTimeout(int(text), self.manager.clock, onTimeoutCancel=lambda result, timeout: load)
        return waiting.addCallback(lambda changed: (http.OK, changed.as_json()))

    def cancel_load(self, request, load_id: str):
        try:
            load = self.manager.cancel(self._load_id(load_id))
        except UnknownLoad as error:
            raise HTTPError(http.NOT_FOUND, str(error)) from None
        return (http.ACCEPTED if load.state.value == "running" else http.OK), load.as_json()

    # --- memory -------------------------------------------------------------------------------------------

    def list_studies(self, request):
        self.store.expire()
        return http.OK, {"size": self.store.size, "limit": self.store.limit,
                         "studies": [_study_json(study) for study in self.store.studies.values() if study.series]}

    def _study(self, study_uid: str) -> HeldStudy:
        _uid(study_uid, "the study")
        study = self.store.studies.get(study_uid)
        if study is None or not study.series:
            raise HTTPError(http.NOT_FOUND, f"study {study_uid} is not in memory")
        return study

    def show_study(self, request, study_uid: str):
        study = self._study(study_uid)
        self.store.touch(study_uid)
        value = _study_json(study)
        value["series"] = [
            {"series": series_uid, "modality": next(iter(instances.values())).metadata.modality,
             "instances": [{"instance": sop_uid, "sop_class": held.metadata.sop_class_uid,
                            "transfer_syntax": held.transfer_syntax, "number": held.metadata.instance_number,
                            "bytes": len(held.data)} for sop_uid, held in instances.items()]}
            for series_uid, instances in study.series.items()]
        return http.OK, value

    def free_study(self, request, study_uid: str):
        study = self._study(study_uid)
        if study.pins:
            raise HTTPError(http.CONFLICT, f"study {study_uid} is being loaded or read: cancel its load first")
        return http.OK, {"study": study_uid, "freed": self.store.drop(study_uid, "freed through the API")}

    def _held(self, study_uid: str, series_uid: str, sop_uid: str) -> HeldObject:
        self._study(study_uid)
        _uid(series_uid, "the series")
        _uid(sop_uid, "the instance")
        held = self.store.find(study_uid, series_uid, sop_uid)
        if held is None:
            raise HTTPError(http.NOT_FOUND, f"instance {sop_uid} of series {series_uid} is not in memory")
        self.store.touch(study_uid)
        return held

    def instance(self, request, study_uid: str, series_uid: str, sop_uid: str):
        held = self._held(study_uid, series_uid, sop_uid)
        header = part10_header(held.metadata.sop_class_uid, sop_uid, held.transfer_syntax,
                               self.config.implementation_class_uid, self.config.implementation_version_name,
                               self.config.memory_server.ae_title)
        length = len(header) + len(held.data)
        request.setResponseCode(http.OK)
        request.setHeader(b"content-type", b"application/dicom")
        request.setHeader(b"content-length", str(length).encode("ascii"))
        request.setHeader(b"content-disposition", f'attachment; filename="{sop_uid}.dcm"'.encode("ascii"))
        return lambda req: _Sender(req, self.store, study_uid, [header, held.data]).start()

    def metadata(self, request, study_uid: str, series_uid: str, sop_uid: str):
        held = self._held(study_uid, series_uid, sop_uid)
        uri = "/api/memory/studies/{}/series/{}/instances/{}".format(
            *(quote(uid, safe="") for uid in (study_uid, series_uid, sop_uid)))
        reading = self._pinned(study_uid, _metadata_json, held, uri)
        return reading.addCallback(lambda body: (http.OK, "application/dicom+json", body))

    def rendered(self, request, study_uid: str, series_uid: str, sop_uid: str):
        frame, window = _render_parameters(request.args)
        held = self._held(study_uid, series_uid, sop_uid)
        if self.renderer is None:
            raise HTTPError(http.NOT_IMPLEMENTED, "rendering is not available: numpy and Pillow are not installed")
        rendering = self._pinned(study_uid, self.renderer, bytes(held.data), held.transfer_syntax, frame, window)

        def not_renderable(failure):
            status = getattr(failure.value, "status", None)
            if isinstance(status, int) and 400 <= status < 500:
                return HTTPError(status, str(failure.value))
            return failure

        return rendering.addCallbacks(lambda png: (http.OK, "image/png", png), not_renderable)

    def _pinned(self, study_uid: str, function, *args) -> defer.Deferred:
        """``function(*args)`` on a worker thread, the study pinned until the worker is done with it, also when
        the answer is no longer wanted (a client gone cancels the Deferred returned, not the worker's reading)."""
        self.store.pin(study_uid)
        working = self.runner(function, *args)
        answer = defer.Deferred()

        def done(result):
            self.store.unpin(study_uid)
            if not answer.called:
                if isinstance(result, Failure):
                    answer.errback(result)
                else:
                    answer.callback(result)
            return None  # a failure after the client went away is not left unhandled

        working.addBoth(done)
        return answer


def _render_parameters(args) -> Tuple[int, Optional[Tuple[float, float]]]:
    unknown = sorted(key.decode("ascii", "replace")[:40] for key in args if key not in (b"frame", b"window"))
    if unknown:
        raise HTTPError(http.BAD_REQUEST, f"unknown parameter {unknown[0]!r} (known: frame, window)")
    frame = 0
    if b"frame" in args:
        text = args[b"frame"][-1].decode("ascii", "replace")
        if not _digits(text, 9):
            raise HTTPError(http.BAD_REQUEST, "frame must be a frame number from 0")
        frame = int(text)
    window = None
    if b"window" in args:
        parts = args[b"window"][-1].decode("ascii", "replace").split(",")
        try:
            center, width = (float(part) for part in parts)
        except ValueError:
            raise HTTPError(http.BAD_REQUEST, "window must be center,width (two numbers)") from None
        if not (width > 0 and abs(center) < 1e12 and width < 1e12):
            raise HTTPError(http.BAD_REQUEST, "window width must be above 0 (and both values finite)")
        window = (center, width)
    return frame, window


def _content_type(request) -> bytes:
    return (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()


def _same_origin(origin: bytes, host: Optional[bytes]) -> bool:
    """Whether an Origin header names this server (scheme aside: the host and port the request was sent to)."""
    text = origin.decode("ascii", "replace")
    return host is not None and text.split("://", 1)[-1].rstrip("/") == host.decode("ascii", "replace")


def _check_csrf(request, session: Session) -> None:
    token = request.getHeader(b"x-csrf-token") or b""
    if isinstance(token, str):
        token = token.encode("ascii", "replace")
    if not hmac.compare_digest(token, session.csrf.encode("ascii")):
        raise HTTPError(http.FORBIDDEN, "missing or wrong X-CSRF-Token (GET /api/session gives it)")


def _digits(text: str, most: int) -> bool:
    """``text`` is 1 to ``most`` ASCII digits (str.isdigit() also takes '²' and Arabic-Indic digits)."""
    return 0 < len(text) <= most and text.isascii() and text.isdigit()


def _json_object(request, keys) -> dict:
    try:
        body = json.loads(request.content.read().decode("utf-8"))
    except RecursionError:
        raise HTTPError(http.BAD_REQUEST, "the body is not JSON we read: nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as error:
        raise HTTPError(http.BAD_REQUEST, f"the body is not JSON: {error}"[:200]) from None
    if not isinstance(body, dict):
        raise HTTPError(http.BAD_REQUEST, "the body must be a JSON object")
    unknown = sorted(str(key)[:40] for key in body if key not in keys)
    if unknown:
        raise HTTPError(http.BAD_REQUEST, f"unknown key {unknown[0]!r} (known: {', '.join(sorted(keys))})")
    return body


def _warnings(query, result, max_results: int) -> List[str]:
    warnings = list(query.warnings)
    if result.truncated and len(result.matches) >= max_results:
        warnings.append(f"more than {len(result.matches)} matches: the query was cancelled there "
                        f"([web] max_results = {max_results}); narrow it")
    elif result.truncated:
        warnings.append(f"there may be more matches: ask again with offset={len(result.matches)}")
    if result.undecodable:
        warnings.append(f"{result.undecodable} answers could not be decoded and are left out")
    return warnings


class _QueryStream:
    """A query's matches written as they arrive (application/x-ndjson): one DICOM JSON object a line, then a
    line ``{"end": ...}`` with the count, whether it was cut or stopped, warnings, or the device's failure.
    Nothing is written before the first match, so a device that fails at once is answered 502 as usual."""

    def __init__(self, request, queries: WebQueries, name: str, query, wanted: int) -> None:
        self.request = request
        self.queries = queries
        self.query = query
        self.skipped = 0
        self.sent = 0
        self.writing = False
        self.run = queries.start(name, query.identifier, wanted, self._match)

    def start(self) -> None:
        self.request.notifyFinish().addErrback(lambda _: self.run.stop())
        self.run.done.addCallbacks(self._ended, self._failed)

    def _gone(self) -> bool:
        return self.request.finished or getattr(self.request, "_disconnected", False)

    def _begin(self) -> None:
        if not self.writing:
            self.writing = True
            self.request.setResponseCode(http.OK)
            self.request.setHeader(b"content-type", b"application/x-ndjson")

    def _match(self, match) -> None:
        if self._gone():
            return
        if self.skipped < self.query.offset:
            self.skipped += 1
            return
        if self.query.limit is not None and self.sent >= self.query.limit:
            return
        self._begin()
        self.sent += 1
        self.request.write(json_bytes(to_json(match)) + b"\n")

    def _ended(self, result) -> None:
        if self._gone():
            return
        self._begin()
        end = {"count": self.sent, "matches": len(result.matches), "truncated": result.truncated,
               "stopped": result.stopped, "milliseconds": round(result.seconds * 1000),
               "warnings": _warnings(self.query, result, self.queries.max_results)}
        self.request.write(json_bytes({"end": end}) + b"\n")
        self.request.finish()

    def _failed(self, failure) -> None:
        if self._gone():
            return None
        try:
            _device_failed(failure)
        except HTTPError as error:
            if not self.writing:  # nothing sent yet: a plain error answer
                body = ApiResource._error(self.request, error)
                self.request.write(body)
            else:
                self.request.write(json_bytes({"end": {"error": error.reason, **error.details}}) + b"\n")
            self.request.finish()
            return None
        except Exception:
            _log.failure("a streamed query failed", failure)
            if not self.writing:
                self.request.write(ApiResource._error(self.request, HTTPError(http.INTERNAL_SERVER_ERROR,
                                                                              "internal error (logged)")))
            self.request.finish()
        return None


def _device_failed(failure):
    """A device that could not answer: 502 with what happened (its status and Error Comment when it answered
    one), 504 for a timeout."""
    failure.trap(DeviceFailure)
    error = failure.value
    details = {"kind": error.kind}
    if error.status is not None:
        details["status"] = f"0x{error.status:04X}"
    if error.comment:
        details["comment"] = error.comment
    if error.kind == "busy":
        raise HTTPError(http.SERVICE_UNAVAILABLE, error.reason, {"Retry-After": "5"}, details=details)
    code = http.GATEWAY_TIMEOUT if error.kind == "timeout" else http.BAD_GATEWAY
    raise HTTPError(code, error.reason, details=details)


def _dicom_json(matches) -> bytes:
    """Worker thread: the matches as a DICOM JSON array."""
    return json_bytes([to_json(match) for match in matches])


def _study_json(study: HeldStudy) -> dict:
    first = next(study.objects(), None)
    metadata = first.metadata if first is not None else None
    return {
        "study": study.study_uid,
        "patient_name": metadata.patient_name if metadata else "",
        "patient_id": metadata.patient_id if metadata else "",
        "study_date": metadata.study_date if metadata else "",
        "description": _description(metadata),
        "accession_number": metadata.accession_number if metadata else "",
        "modalities": sorted({obj.metadata.modality for obj in study.objects() if obj.metadata.modality}),
        "series_count": len(study.series),
        "instance_count": study.count,
        "bytes": study.size,
        "in_use": study.pins > 0,
    }


def _description(metadata) -> str:
    if metadata is None:
        return ""
    try:
        value = json.loads(metadata.study_json).get("00081030", {}).get("Value", [""])
        return str(value[0]) if value else ""
    except (ValueError, AttributeError):
        return ""


def _metadata_json(held: HeldObject, uri: str) -> bytes:
    """Worker thread: the object as DICOM JSON; binary values above BULK_THRESHOLD bytes are a BulkDataURI
    naming the instance (whose Part 10 object holds them)."""
    from pydicom import dcmread

    header = part10_header(held.metadata.sop_class_uid, held.metadata.sop_instance_uid, held.transfer_syntax,
                           "1.2", None, None)
    try:
        ds = dcmread(BytesIO(header + bytes(held.data)), force=True)
        value = ds.to_json_dict(bulk_data_threshold=BULK_THRESHOLD, bulk_data_element_handler=lambda element: uri,
                                suppress_invalid_tags=True)
        return json_bytes([value])
    except Exception as error:  # pydicom raises many kinds on a data set it cannot read
        raise HTTPError(422,
                        f"cannot read the object as DICOM JSON: {type(error).__name__}: {error}"[:300]) from None


class _Sender:
    """Writes an object's bytes to the response a chunk at a time, as the transport drains (IPushProducer)."""

    def __init__(self, request, store: MemoryStore, study_uid: str, parts) -> None:
        self.request = request
        self.store = store
        self.study_uid = study_uid
        self.parts = [memoryview(part) for part in parts]
        self.paused = False
        self.done = False

    def start(self) -> None:
        self.store.pin(self.study_uid)
        self.request.registerProducer(self, True)
        self.request.notifyFinish().addBoth(self._ended)
        self._send()

    def _send(self) -> None:
        while not self.paused and not self.done:
            if not self.parts:
                self.done = True
                self.request.unregisterProducer()
                self.request.finish()
                return
            part = self.parts[0]
            chunk, self.parts[0] = part[:SEND_CHUNK], part[SEND_CHUNK:]
            if not len(self.parts[0]):
                self.parts.pop(0)
            self.request.write(bytes(chunk))

    def _ended(self, _) -> None:
        if not self.done:
            self.done = True
        self.parts = []
        self.store.unpin(self.study_uid)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            self._send()

    def stopProducing(self) -> None:
        self.done = True
        self.parts = []
