"""Who may use the web pages: scrypt hashes and appliance-passwd, sessions and their expiry, sign-in attempts
limited per address, and the API's guard over HTTP parsing (sign-in, the session cookie, CSRF tokens, origins)."""

from __future__ import annotations

import io
import json

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from appliance import config as configuration
from appliance.cli import passwd
from appliance.web import auth
from appliance.web.api import SESSION_COOKIE, ApiResource
from appliance.web.server import ApplianceSite

from .test_manager import ManagerHarness
from .test_web import Reply

#: A cheap hash for the HTTP tests (N=16): the format and the check are the same, the cost is not.
PASSWORD = "correct horse battery"


def cheap_hash(password: str) -> str:
    import base64
    import hashlib

    salt = b"0123456789abcdef"
    digest = hashlib.scrypt(password.encode(), salt=salt, n=16, r=8, p=1, dklen=32)
    return f"scrypt$16$8$1${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


class HashTests(SynchronousTestCase):
    def test_round_trip_and_salt(self):
        stored = auth.hash_password(PASSWORD)
        self.assertTrue(stored.startswith("scrypt$16384$8$1$"))
        self.assertTrue(auth.check_password(PASSWORD, stored))
        self.assertFalse(auth.check_password(PASSWORD + "!", stored))
        self.assertNotEqual(stored, auth.hash_password(PASSWORD), "a fresh salt each time")

    def test_bad_hashes(self):
        for text in ("", "plain", "scrypt$16384$8$1$c2FsdA==", "bcrypt$x$y", "scrypt$1000$8$1$c2FsdHNhbHQ=$"
                     + "A" * 44, "scrypt$16384$8$1$!!!!!!!!$" + "A" * 44, "scrypt$2097152$8$1$c2FsdHNhbHQ=$" + "A" * 44,
                     None, 42):
            with self.assertRaises(auth.BadHash, msg=text):
                auth.parse_hash(text)


class PasswdTests(SynchronousTestCase):
    def run_passwd(self, argv, stdin=""):
        out, err = io.StringIO(), io.StringIO()
        code = passwd.main(argv, stdin=io.StringIO(stdin), stdout=out, stderr=err)
        return code, out.getvalue(), err.getvalue()

    def test_line_for_the_configuration(self):
        code, out, err = self.run_passwd(["--stdin", "alice"], PASSWORD + "\n")
        self.assertEqual(code, 0, err)
        self.assertNotIn(PASSWORD, out + err)
        name, _, value = out.strip().partition(" = ")
        self.assertEqual(name, "alice")
        stored = json.loads(value)
        self.assertTrue(auth.check_password(PASSWORD, stored))
        config = configuration.parse({"web": {"users": {"alice": stored}}}, "/srv/appliance.toml")
        self.assertEqual(list(config.web.users), ["alice"])

    def test_refusals(self):
        self.assertEqual(self.run_passwd(["--stdin", "alice"], "short\n")[0], 2)
        code, _, err = self.run_passwd(["--stdin", "a b"], PASSWORD + "\n")
        self.assertEqual(code, 2)
        self.assertIn("user name", err)


class SessionTests(SynchronousTestCase):
    def test_expiry_and_end(self):
        clock = Clock()
        sessions = auth.Sessions(clock, 3600)
        token, session = sessions.create("alice")
        self.assertEqual(sessions.get(token), session)
        self.assertIsNone(sessions.get("forged"))
        clock.advance(3599)
        self.assertIsNotNone(sessions.get(token))
        clock.advance(1)
        self.assertIsNone(sessions.get(token), "ended an hour after sign-in")
        token, _ = sessions.create("alice")
        sessions.end(token)
        self.assertIsNone(sessions.get(token))

    def test_bounded(self):
        sessions = auth.Sessions(Clock(), 3600)
        first, _ = sessions.create("a")
        for _ in range(auth.MAX_SESSIONS):
            sessions.create("b")
        self.assertEqual(len(sessions), auth.MAX_SESSIONS)
        self.assertIsNone(sessions.get(first), "the oldest went first")

    def test_sign_in_limiter(self):
        clock = Clock()
        limiter = auth.SignInLimiter(clock, max_failures=3, window=60)
        for _ in range(3):
            self.assertIsNone(limiter.retry_after("10.0.0.1"))
            limiter.failed("10.0.0.1")
            clock.advance(10)
        self.assertEqual(limiter.retry_after("10.0.0.1"), 30)
        self.assertIsNone(limiter.retry_after("10.0.0.2"), "per address")
        clock.advance(30)
        self.assertIsNone(limiter.retry_after("10.0.0.1"), "the oldest failure left the window")
        limiter.failed("10.0.0.1")
        limiter.succeeded("10.0.0.1")
        self.assertIsNone(limiter.retry_after("10.0.0.1"))


    def test_checks_under_way_count_against_the_limit(self):
        """Attempts sent at once: those whose checks are still running count as failures until they end, so no
        more than max_failures are ever checked in a window (8 of 5 were, in two batches of 4)."""
        clock = Clock()
        limiter = auth.SignInLimiter(clock, max_failures=5, window=300)
        for _ in range(4):
            limiter.failed("10.0.0.1")
        limiter.checking("10.0.0.1")
        self.assertEqual(limiter.retry_after("10.0.0.1"), 1.0, "a fifth check under way: the sixth waits for it")
        self.assertIsNone(limiter.retry_after("10.0.0.2"), "per address")
        limiter.checked("10.0.0.1")
        self.assertIsNone(limiter.retry_after("10.0.0.1"), "it ended well: one more may be checked")
        limiter.checking("10.0.0.1")
        limiter.failed("10.0.0.1")
        limiter.checked("10.0.0.1")
        self.assertEqual(limiter.retry_after("10.0.0.1"), 300)

class GuardHarness(ManagerHarness):
    def __init__(self, test, users=None):
        super().__init__(test)
        if users is not None:
            self.config = configuration.parse(
                {"appliance": {"data_dir": self.config.data_dir}, "web": {"port": 0, "users": users},
                 "devices": {"pacs": {"ae_title": "PACS", "host": "10.0.0.5", "port": 104}}}, self.config.path)
        self.api = ApiResource(self.config, self.manager, self.store, self.runner, None, None, self.clock)
        self.site = ApplianceSite(self.api, self.clock)

    @staticmethod
    def runner(f, *args):
        from twisted.internet import defer
        return defer.maybeDeferred(f, *args)

    def request(self, method, path, body=None, headers=None, content_type="application/json", answered=True):
        """The reply (or, with ``answered=False``, the transport of a request still waiting for its answer)."""
        from twisted.internet.testing import StringTransport

        lines = [f"{method} {path} HTTP/1.1", "Host: appliance.test:8080", "Connection: close"]
        if body is not None:
            lines += [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
        elif method == "POST":
            lines += [f"Content-Type: {content_type}", "Content-Length: 0"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        channel = self.site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b""))
        return Reply(transport.value()) if answered else transport

    def sign_in(self, user="alice", password=PASSWORD) -> Reply:
        return self.request("POST", "/api/session", json.dumps({"user": user, "password": password}).encode())


class GuardTests(SynchronousTestCase):
    def setUp(self):
        self.h = GuardHarness(self, users={"alice": cheap_hash(PASSWORD)})

    def cookie(self, reply) -> str:
        header = reply.headers["set-cookie"]
        return header.split(";")[0]

    def test_nothing_without_a_session(self):
        for method, path in (("GET", "/api/devices"), ("GET", "/api/loads"), ("GET", "/api/memory/studies"),
                             ("POST", "/api/loads")):
            reply = self.h.request(method, path)
            self.assertEqual(reply.status, 401, path)
            self.assertIn("sign in", reply.json()["error"])
        self.assertEqual(self.h.request("GET", "/").status, 200, "the pages themselves hold no data")
        session = self.h.request("GET", "/api/session").json()
        self.assertEqual(session, {"users": True, "user": None, "csrf": None})

    def test_sign_in_session_csrf_sign_out(self):
        reply = self.h.sign_in()
        self.assertEqual(reply.status, 200, reply.body)
        cookie = reply.headers["set-cookie"]
        for attribute in ("HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=28800"):
            self.assertIn(attribute.lower(), cookie.lower())
        csrf = reply.json()["csrf"]
        headers = {"Cookie": self.cookie(reply)}
        self.assertEqual(self.h.request("GET", "/api/devices", headers=headers).status, 200)
        self.assertEqual(self.h.request("GET", "/api/session", headers=headers).json()["user"], "alice")
        load = json.dumps({"device": "pacs", "study": "1.2.3"}).encode()
        reply = self.h.request("POST", "/api/loads", load, headers=headers)
        self.assertEqual(reply.status, 403)
        self.assertIn("X-CSRF-Token", reply.json()["error"])
        reply = self.h.request("POST", "/api/loads", load, headers=dict(headers, **{"X-CSRF-Token": "wrong"}))
        self.assertEqual(reply.status, 403)
        reply = self.h.request("POST", "/api/loads", load, headers=dict(headers, **{"X-CSRF-Token": csrf}))
        self.assertEqual(reply.status, 202, reply.body)
        self.assertEqual(self.h.request("DELETE", "/api/session", headers=headers).status, 403, "CSRF on sign-out")
        reply = self.h.request("DELETE", "/api/session", headers=dict(headers, **{"X-CSRF-Token": csrf}))
        self.assertEqual(reply.status, 200)
        self.assertIn("max-age=0", reply.headers["set-cookie"].lower())
        self.assertEqual(self.h.request("GET", "/api/devices", headers=headers).status, 401, "the session ended")

    def test_session_expires(self):
        headers = {"Cookie": self.cookie(self.h.sign_in())}
        self.h.clock.advance(8 * 3600)
        self.assertEqual(self.h.request("GET", "/api/devices", headers=headers).status, 401)

    def test_wrong_passwords_limited_per_address(self):
        for attempt in range(auth.MAX_FAILURES):
            reply = self.h.sign_in(password="nope" if attempt % 2 else PASSWORD, user="alice" if attempt % 2
                                   else "mallory")
            self.assertEqual((reply.status, reply.json()["error"]), (401, "wrong user or password"))
            self.assertNotIn("set-cookie", reply.headers)
        reply = self.h.sign_in()
        self.assertEqual(reply.status, 429, "even the right password waits")
        self.assertEqual(reply.headers["retry-after"], str(int(auth.WINDOW)))
        self.h.clock.advance(auth.WINDOW)
        self.assertEqual(self.h.sign_in().status, 200)

    def test_checks_at_once_bounded(self):
        """Sign-ins whose checks are still running are bounded: past MAX_CHECKING the next waits outside (503)."""
        from twisted.internet import defer

        from appliance.web import api as web_api

        pending = []
        self.h.api.runner = lambda f, *args: pending.append(defer.Deferred()) or pending[-1]
        body = json.dumps({"user": "alice", "password": PASSWORD}).encode()
        for _ in range(web_api.MAX_CHECKING):
            self.assertEqual(self.h.request("POST", "/api/session", body, answered=False).value(), b"")
        reply = self.h.request("POST", "/api/session", body)
        self.assertEqual((reply.status, reply.headers["retry-after"]), (503, "1"))
        self.assertEqual(len(pending), web_api.MAX_CHECKING)
        pending[0].callback(False)
        self.assertEqual(self.h.api._checking, web_api.MAX_CHECKING - 1, "a finished check frees its place")

    def test_bad_sign_in_bodies(self):
        for body, status in ((b"user=alice", 415), (b"[]", 400), (b'{"user": 1, "password": "x"}', 400),
                             (b'{"user": "alice", "password": "x", "remember": true}', 400), (b"{", 400)):
            content_type = "application/x-www-form-urlencoded" if body.startswith(b"user=") else "application/json"
            reply = self.h.request("POST", "/api/session", body, content_type=content_type)
            self.assertEqual(reply.status, status, body)

    def test_cross_origin_changes_refused(self):
        reply = self.h.request("POST", "/api/session", json.dumps({"user": "alice", "password": PASSWORD}).encode(),
                               headers={"Origin": "https://evil.example"})
        self.assertEqual(reply.status, 403)
        self.assertIn("another origin", reply.json()["error"])
        reply = self.h.request("POST", "/api/session", json.dumps({"user": "alice", "password": PASSWORD}).encode(),
                               headers={"Origin": "http://appliance.test:8080"})
        self.assertEqual(reply.status, 200)


class OpenPagesTests(SynchronousTestCase):
    """No users: the pages are open (on a loopback interface), changes must still be JSON from this origin."""

    def setUp(self):
        self.h = GuardHarness(self)

    def test_open(self):
        self.assertEqual(self.h.request("GET", "/api/session").json(), {"users": False, "user": None, "csrf": None})
        self.assertEqual(self.h.request("GET", "/api/devices").status, 200)
        self.assertEqual(self.h.sign_in().status, 409)

    def test_forms_and_other_origins_refused(self):
        load = json.dumps({"device": "pacs", "study": "1.2.3"}).encode()
        self.assertEqual(self.h.request("POST", "/api/loads", load, content_type="text/plain").status, 415)
        self.assertEqual(self.h.request("POST", "/api/loads", load,
                                        headers={"Origin": "http://attacker.example"}).status, 403)
        self.assertEqual(self.h.request("DELETE", "/api/memory/studies/1.2.3",
                                        headers={"Origin": "null"}).status, 403)
        self.assertEqual(self.h.request("POST", "/api/loads", load).status, 202)
        _ = SESSION_COOKIE
