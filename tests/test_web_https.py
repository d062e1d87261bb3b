"""The web pages over HTTPS ([web] tls = true): the [tls] certificate presented, sessions' cookies Secure, plain
HTTP refused on that port; and the configuration's rules (a certificate needed; another interface than loopback
only over HTTPS and with users)."""

from __future__ import annotations

import json
import os
from io import BytesIO

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import Certificate
from twisted.trial import unittest
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, FileBodyProducer, readBody
from twisted.web.http_headers import Headers

from appliance import config as configuration
from appliance.web.auth import hash_password

from appliance.web import server as web_server

from .support import WAIT_LIMIT, deferred_test
from .support_tls import Certificates
from .test_interop_load import Appliance

PASSWORD = "a long enough password"


class ConfigTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.pki = Certificates(os.path.abspath(self.mktemp()))

    def parse(self, tables):
        return configuration.parse(tables, "/srv/appliance.toml")

    def test_a_certificate_is_needed(self):
        with self.assertRaises(configuration.ConfigError) as raised:
            self.parse({"web": {"tls": True}})
        self.assertIn("[web] tls", str(raised.exception))
        self.assertIn("certificate", str(raised.exception))
        web = self.parse({"tls": self.pki.tls_table(), "web": {"tls": True},
                          "disk_server": {"tls_port": 0}, "memory_server": {"tls_port": 0}}).web
        self.assertEqual(web.tls.certificate, self.pki.server.certificate_path)
        self.assertFalse(web.tls.require_client_certificate, "browsers present no certificate")

    def test_other_interfaces_only_over_https_with_users(self):
        users = {"alice": hash_password(PASSWORD)}
        tls = {"tls": self.pki.tls_table(), "disk_server": {"tls_port": 0}, "memory_server": {"tls_port": 0}}
        for web in ({"interface": "0.0.0.0"}, {"interface": "0.0.0.0", "users": users},
                    {"interface": "0.0.0.0", "tls": True}):
            with self.assertRaises(configuration.ConfigError) as raised:
                self.parse(dict(tls, web=web))
            self.assertIn("[web] interface", str(raised.exception))
            self.assertIn("HTTPS", str(raised.exception))
        web = self.parse(dict(tls, web={"interface": "0.0.0.0", "tls": True, "users": users})).web
        self.assertEqual(web.interface, "0.0.0.0")


class HTTPSTests(unittest.TestCase):
    timeout = 60

    @deferred_test
    async def test_pages_over_https(self):
        pki = Certificates(os.path.abspath(self.mktemp()))
        appliance = Appliance(self, tls=pki.tls_table(), web={"tls": True, "users": {"alice": hash_password(PASSWORD)}})
        with open(pki.ca.certificate_path, "rb") as handle:
            trust = Certificate.loadPEM(handle.read())
        agent = Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=trust))
        base = f"https://localhost:{appliance.web_port}"
        response = await agent.request(b"GET", f"{base}/api/session".encode())
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(await readBody(response)), {"users": True, "user": None, "csrf": None})
        self.assertIn(b"script-src 'self'", response.headers.getRawHeaders(b"content-security-policy")[0])
        body = FileBodyProducer(BytesIO(json.dumps({"user": "alice", "password": PASSWORD}).encode()))
        response = await agent.request(b"POST", f"{base}/api/session".encode(),
                                       Headers({b"content-type": [b"application/json"]}), body)
        await readBody(response)
        self.assertEqual(response.code, 200)
        cookie = response.headers.getRawHeaders(b"set-cookie")[0].lower()
        self.assertIn(b"secure", cookie)
        self.assertIn(b"httponly", cookie)
        # plain HTTP on the HTTPS port gets no answer
        plain = Agent(reactor)
        try:
            response = await plain.request(b"GET", f"http://127.0.0.1:{appliance.web_port}/api/session".encode())
            await readBody(response)
            self.fail(f"plain HTTP was answered {response.code}")
        except Exception as error:  # the TLS port closes on bytes that are no TLS handshake
            self.assertNotIsInstance(error, AssertionError)

    @deferred_test
    async def test_connections_past_the_bound_closed_behind_tls(self):
        """Behind TLS too, a connection past MAX_CONNECTIONS is closed at once (no traceback: the TLS wrapper is
        given a protocol that closes, never None), and once one closes the pages answer again."""
        self.patch(web_server, "MAX_CONNECTIONS", 1)
        pki = Certificates(os.path.abspath(self.mktemp()))
        appliance = Appliance(self, tls=pki.tls_table(), web={"tls": True, "users": {"alice": hash_password(PASSWORD)}})
        with open(pki.ca.certificate_path, "rb") as handle:
            trust = Certificate.loadPEM(handle.read())
        holder = _Holder()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", appliance.web_port), holder)
        turned_away = _Holder()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", appliance.web_port), turned_away)
        await turned_away.lost.addTimeout(WAIT_LIMIT, reactor)
        self.assertEqual(turned_away.data, b"")
        holder.transport.loseConnection()
        await holder.lost.addTimeout(WAIT_LIMIT, reactor)
        agent = Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=trust), pool=None)
        response = await agent.request(b"GET", f"https://localhost:{appliance.web_port}/api/session".encode(),
                                       Headers({b"connection": [b"close"]}))
        await readBody(response)
        self.assertEqual(response.code, 200)


class _Holder(Protocol):
    """A client that connects and says nothing: it holds a connection."""

    def __init__(self) -> None:
        self.data = b""
        self.lost: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason=None) -> None:
        self.lost.callback(None)
