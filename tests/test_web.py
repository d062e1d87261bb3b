"""The local JSON API over real HTTP parsing (twisted.web's channel on a StringTransport): loads, the memory store,
serving objects, and hostile requests (bodies too large, bad JSON, bad UIDs, unknown keys and methods)."""

from __future__ import annotations

import json
import re
from io import BytesIO
from typing import Dict, Optional, Tuple

from pydicom import dcmread

try:
    from twisted.internet.testing import StringTransport
except ImportError:  # Twisted < 19.7
    from twisted.test.proto_helpers import StringTransport
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from appliance.dicom.uids import EXPLICIT_VR_LITTLE_ENDIAN
from appliance.memory.store import OBJECT_OVERHEAD
from appliance.net.threads import synchronous_runner
from appliance.web.api import SEND_CHUNK, ApiResource
from appliance.web.server import MAX_BODY, REFUSAL_LOG_INTERVAL, ApplianceSite

from .support import capture_log
from .support_data import encode_dataset, make_dataset
from .test_manager import STUDY, ManagerHarness

SERIES = "1.2.826.0.1.3680043.2.1.1"
SOP = "1.2.826.0.1.3680043.2.1.1.1"


class Reply:
    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split(" ")[1])
        self.headers: Dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        if "content-length" in self.headers:
            assert len(self.body) == int(self.headers["content-length"]), (len(self.body), self.headers)

    def json(self):
        assert self.headers["content-type"].startswith("application/json") or \
            self.headers["content-type"] == "application/dicom+json", self.headers
        return json.loads(self.body)


class WebHarness(ManagerHarness):
    def __init__(self, test, render=None, **options):
        super().__init__(test, **options)
        self.api = ApiResource(self.config, self.manager, self.store, synchronous_runner, render)
        self.site = ApplianceSite(self.api, self.clock)

    def raw(self, data: bytes) -> Tuple[bytes, StringTransport]:
        channel = self.site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(data)
        return transport.value(), transport

    def request(self, method: str, path: str, body: Optional[bytes] = None,
                content_type: str = "application/json") -> Reply:
        head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
        if body is not None:
            head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        raw, _ = self.raw(head.encode("latin-1") + b"\r\n" + (body or b""))
        return Reply(raw)

    def post_load(self, value) -> Reply:
        return self.request("POST", "/api/loads", json.dumps(value).encode("utf-8"))

    def hold(self, study=STUDY, series=SERIES, sop=SOP, pixels=b"\x00\x01" * 16) -> bytes:
        data = encode_dataset(make_dataset(study=study, series=series, sop=sop, pixels=pixels),
                              EXPLICIT_VR_LITTLE_ENDIAN)
        self.store.reserve(len(data) + OBJECT_OVERHEAD)
        from appliance.dataset.metadata import extract
        from appliance.compat import decode_dataset

        self.store.put(extract(decode_dataset(data, EXPLICIT_VR_LITTLE_ENDIAN)), EXPLICIT_VR_LITTLE_ENDIAN, data)
        self.store.release(len(data) + OBJECT_OVERHEAD)
        return data


class LoadApiTests(SynchronousTestCase):
    def setUp(self):
        self.h = WebHarness(self)

    def test_devices(self):
        reply = self.h.request("GET", "/api/devices")
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.json()["devices"], [
            {"name": "local", "label": "Local archive", "ae_title": "DISK_SERVER", "host": "127.0.0.1", "port": 11112,
             "tls": False, "retrieve": "move"},
            {"name": "pacs", "label": "pacs", "ae_title": "PACS", "host": "10.0.0.5", "port": 104, "tls": False,
             "retrieve": "move"}])

    def test_create_follow_cancel(self):
        reply = self.h.post_load({"device": "pacs", "study": STUDY})
        self.assertEqual(reply.status, 202)
        load = reply.json()
        self.assertEqual(reply.headers["location"], f"/api/loads/{load['id']}")
        self.assertEqual((load["state"], load["device"], load["study"]), ("running", "pacs", STUDY))
        association = self.h.establish()
        association.respond(0xFF00, remaining=3, completed=1)
        shown = self.h.request("GET", f"/api/loads/{load['id']}").json()
        self.assertEqual((shown["remaining"], shown["completed"]), (3, 1))
        cancelling = self.h.request("DELETE", f"/api/loads/{load['id']}")
        self.assertEqual(cancelling.status, 202)
        self.assertEqual(association.cancels, [association.stream.message_id])
        association.respond(0xFE00, completed=1, remaining=2)
        listed = self.h.request("GET", "/api/loads").json()["loads"]
        self.assertEqual([(item["id"], item["state"]) for item in listed], [(load["id"], "cancelled")])

    def test_wait_for_the_next_change(self):
        """?wait=N answers at the load's next change of state, or after N seconds with it unchanged."""
        h = WebHarness(self, manager={"max_parallel_loads": 1})
        h.post_load({"device": "pacs", "study": STUDY})
        queued = h.post_load({"device": "pacs", "study": STUDY + ".2"}).json()
        self.assertEqual(queued["state"], "queued")
        channel = h.site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(f"GET /api/loads/{queued['id']}?wait=30 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        self.assertEqual(transport.value(), b"", "no answer while nothing changes")
        h.establish(0).respond(0xA801)  # the first load ends: the queued one starts
        self.assertEqual(Reply(transport.value()).json()["state"], "running")
        raw, _ = h.raw(f"GET /api/loads/{queued['id']}?wait=5 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        self.assertEqual(raw, b"")
        channel = h.site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(f"GET /api/loads/{queued['id']}?wait=5 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        h.clock.advance(5)
        self.assertEqual(Reply(transport.value()).json()["state"], "running")
        for query in ("?wait=0", "?wait=61", "?wait=x", "?poll=1", "?wait=%C2%B2", "?wait=%D9%A3"):
            self.assertEqual(h.request("GET", f"/api/loads/{queued['id']}{query}").status, 400, query)

    def test_series_and_instance(self):
        reply = self.h.post_load({"device": "pacs", "study": STUDY, "series": SERIES, "instance": SOP})
        self.assertEqual(reply.status, 202)
        self.assertEqual(self.h.manager.get(reply.json()["id"]).level, "IMAGE")

    def test_bad_bodies(self):
        cases = [
            ({"device": "pacs", "study": "1.2.abc"}, 400, "study must be a UID"),
            ({"device": "pacs", "study": "1." + "2" * 70}, 400, "study must be a UID"),
            ({"device": "pacs", "study": 12}, 400, "study must be a UID"),
            ({"device": "pacs"}, 400, "study must be a UID"),
            ({"device": "pacs", "study": STUDY, "series": "x"}, 400, "series must be a UID"),
            ({"device": "pacs", "study": STUDY, "instance": SOP}, 400, "give series too"),
            ({"device": "pacs", "study": STUDY, "priority": 1}, 400, "unknown key 'priority'"),
            ({"device": "<script>", "study": STUDY}, 400, "device must be"),
            ({"device": "elsewhere", "study": STUDY}, 404, "no device 'elsewhere' (configured: local, pacs)"),
            ([1, 2], 400, "must be a JSON object"),
        ]
        for body, status, words in cases:
            reply = self.h.post_load(body)
            self.assertEqual(reply.status, status, body)
            self.assertIn(words, reply.json()["error"], body)
            self.assertEqual(reply.headers["x-content-type-options"], "nosniff")
        self.assertEqual(self.h.manager.loads, {}, "nothing was queued")

    def test_queue_full_is_503(self):
        from appliance.ae import manager as manager_module
        self.patch(manager_module, "MAX_QUEUED", 1)
        for n in range(self.h.manager.max_parallel + 1):
            self.assertEqual(self.h.post_load({"device": "pacs", "study": f"{STUDY}.{n}"}).status, 202)
        reply = self.h.post_load({"device": "pacs", "study": f"{STUDY}.9"})
        self.assertEqual((reply.status, reply.headers["retry-after"]), (503, "10"))
        self.assertIn("1 loads are waiting already (at most 1)", reply.json()["error"])

    def test_not_json(self):
        reply = self.h.request("POST", "/api/loads", b"{'device': 1")
        self.assertEqual(reply.status, 400)
        self.assertIn("not JSON", reply.json()["error"])
        reply = self.h.request("POST", "/api/loads", b"\xff\xfe", content_type="application/json")
        self.assertEqual(reply.status, 400)
        reply = self.h.request("POST", "/api/loads", b"device=pacs", content_type="application/x-www-form-urlencoded")
        self.assertEqual(reply.status, 415)
        deep = b"[" * 30000 + b"]" * 30000  # within the size bound, past the JSON decoder's recursion
        reply = self.h.request("POST", "/api/loads", deep, content_type="application/json")
        self.assertEqual((reply.status, reply.json()["error"]), (400, "the body is not JSON we read: nested too deeply"))

    def test_body_too_large_is_refused_unread(self):
        """A declared length over the bound: 413 at once and the connection closed, the body never read."""
        raw, transport = self.h.raw(b"POST /api/loads HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                    b"Content-Length: " + str(MAX_BODY + 1).encode() + b"\r\n\r\n" + b"{" * 1000)
        self.assertEqual(Reply(raw).status, 413)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.h.manager.loads, {})

    def test_chunked_body_too_large(self):
        chunk = b"a" * 8192
        body = b"".join(b"%x\r\n" % len(chunk) + chunk + b"\r\n" for _ in range(MAX_BODY // len(chunk) + 2))
        raw, transport = self.h.raw(b"POST /api/loads HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                    b"Transfer-Encoding: chunked\r\n\r\n" + body + b"0\r\n\r\n")
        self.assertEqual(Reply(raw).status, 413)
        self.assertTrue(transport.disconnecting)

    def test_ids_methods_paths(self):
        self.assertEqual(self.h.request("GET", "/api/loads/abc").status, 400)
        for digits in ("%C2%B2", "%D9%A3", "%EF%BC%91"):  # '²', Arabic-Indic 3, fullwidth 1: not load ids
            for method in ("GET", "DELETE"):
                reply = self.h.request(method, f"/api/loads/{digits}")
                self.assertEqual((reply.status, reply.json()["error"]), (400, "a load id is a number"), digits)
        self.assertEqual(self.h.request("GET", "/api/loads/99").status, 404)
        self.assertEqual(self.h.request("DELETE", "/api/loads/99").status, 404)
        reply = self.h.request("PUT", "/api/loads", b"{}")
        self.assertEqual(reply.status, 405)
        self.assertEqual(reply.headers["allow"], "GET, POST")
        reply = self.h.request("GET", "/api/nothing/<b>here</b>")
        self.assertEqual(reply.status, 404)
        self.assertEqual(reply.headers["content-type"], "application/json")
        self.assertNotIn(b"<", reply.body)  # JSON, never markup
        self.assertEqual(reply.json()["error"], "no such resource: /api/nothing/<b>here</b>")
        self.assertEqual(self.h.request("GET", "/").status, 200)  # the pages
        self.assertEqual(self.h.request("GET", "/nothing").status, 404)
        self.assertEqual(self.h.request("GET", "/api/loads/").status, 200)

    def test_unexpected_error_is_500_without_traceback(self):
        def broken(*args):
            raise RuntimeError("secret internals")

        self.h.manager.submit = broken
        reply = self.h.post_load({"device": "pacs", "study": STUDY})
        self.assertEqual(reply.status, 500)
        self.assertEqual(reply.json(), {"error": "internal error (logged)"})
        self.assertNotIn(b"Traceback", reply.body)
        self.assertNotIn(b"secret", reply.body)
        self.flushLoggedErrors(RuntimeError)


class MemoryApiTests(SynchronousTestCase):
    def setUp(self):
        self.h = WebHarness(self)

    def test_studies_listed_and_shown(self):
        self.h.hold()
        self.h.hold(sop=SOP + ".2")
        studies = self.h.request("GET", "/api/memory/studies").json()
        self.assertEqual(studies["limit"], 64 << 20)
        (study,) = studies["studies"]
        self.assertEqual((study["study"], study["patient_name"], study["series_count"], study["instance_count"]),
                         (STUDY, "Test^Patient", 1, 2))
        self.assertEqual(study["bytes"], self.h.store.size)
        shown = self.h.request("GET", f"/api/memory/studies/{STUDY}").json()
        self.assertEqual([i["instance"] for i in shown["series"][0]["instances"]], [SOP, SOP + ".2"])

    def test_instance_as_part10(self):
        data = self.h.hold()
        reply = self.h.request("GET", f"/api/memory/studies/{STUDY}/series/{SERIES}/instances/{SOP}")
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.headers["content-type"], "application/dicom")
        self.assertTrue(reply.body.endswith(data))
        ds = dcmread(BytesIO(reply.body))
        self.assertEqual((ds.SOPInstanceUID, ds.file_meta.TransferSyntaxUID), (SOP, EXPLICIT_VR_LITTLE_ENDIAN))
        self.assertEqual(self.h.store.studies[STUDY].pins, 0, "the reader's pin is gone once it is sent")

    def test_large_instance_sent_in_chunks(self):
        data = self.h.hold(pixels=bytes(3 * SEND_CHUNK))
        reply = self.h.request("GET", f"/api/memory/studies/{STUDY}/series/{SERIES}/instances/{SOP}")
        self.assertTrue(reply.body.endswith(data))

    def test_metadata(self):
        self.h.hold(pixels=bytes(4096))
        reply = self.h.request("GET", f"/api/memory/studies/{STUDY}/series/{SERIES}/instances/{SOP}/metadata")
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.headers["content-type"], "application/dicom+json")
        (value,) = reply.json()
        self.assertEqual(value["00100010"], {"vr": "PN", "Value": [{"Alphabetic": "Test^Patient"}]})
        self.assertEqual(value["7FE00010"]["BulkDataURI"],
                         f"/api/memory/studies/{STUDY}/series/{SERIES}/instances/{SOP}")

    def test_free_and_in_use(self):
        self.h.hold()
        self.h.store.pin(STUDY)
        reply = self.h.request("DELETE", f"/api/memory/studies/{STUDY}")
        self.assertEqual(reply.status, 409)
        self.h.store.unpin(STUDY)
        reply = self.h.request("DELETE", f"/api/memory/studies/{STUDY}")
        self.assertEqual(reply.status, 200)
        self.assertGreater(reply.json()["freed"], 0)
        self.assertEqual((self.h.store.studies, self.h.store.size), ({}, 0))
        self.assertEqual(self.h.request("DELETE", f"/api/memory/studies/{STUDY}").status, 404)

    def test_bad_and_unknown_uids(self):
        self.h.hold()
        base = f"/api/memory/studies/{STUDY}/series/{SERIES}/instances"
        for path, status in (("/api/memory/studies/..%2F..", 400), ("/api/memory/studies/1.2.3", 404),
                             (f"/api/memory/studies/{STUDY}/series/x/instances/{SOP}", 400),
                             (f"{base}/1.2.3", 404), (f"{base}/{SOP}/frames", 404)):
            self.assertEqual(self.h.request("GET", path).status, status, path)

    def test_rendered_parameters_checked(self):
        self.h.hold()
        base = f"/api/memory/studies/{STUDY}/series/{SERIES}/instances/{SOP}/rendered"
        for query, words in (("?frame=x", "frame must be"), ("?frame=-1", "frame must be"),
                             ("?frame=%C2%B2", "frame must be"), ("?frame=%D9%A3", "frame must be"),
                             ("?window=40", "center,width"), ("?window=40,0", "above 0"),
                             ("?window=nan,nan", "above 0"), ("?zoom=2", "unknown parameter 'zoom'")):
            reply = self.h.request("GET", base + query)
            self.assertEqual(reply.status, 400, query)
            self.assertIn(words, reply.json()["error"], query)
        self.assertEqual(self.h.request("GET", base).status, 501, "no renderer given to this API")

    def test_rendered_png(self):
        """The appliance's renderer behind the API: a 16-bit CT frame comes back as an 8-bit grayscale PNG."""
        from PIL import Image

        from appliance.dataset.render import render_png

        h = WebHarness(self, render=render_png)
        h.hold(pixels=bytes(range(256)) * 2)
        reply = h.request("GET", f"/api/memory/studies/{STUDY}/series/{SERIES}/instances/{SOP}/rendered?window=0,4000")
        self.assertEqual((reply.status, reply.headers["content-type"]), (200, "image/png"), reply.body[:200])
        image = Image.open(BytesIO(reply.body))
        self.assertEqual((image.mode, image.size), ("L", (256, 1)))
        reply = h.request("GET", f"/api/memory/studies/{STUDY}/series/{SERIES}/instances/{SOP}/rendered?frame=1")
        self.assertEqual(reply.status, 404)
        self.assertIn("frame", reply.json()["error"])

    def test_rendered_through_the_renderer(self):
        calls = []

        class NotRenderable(Exception):
            status = 415

        def render(data, syntax, frame, window):
            calls.append((syntax, frame, window))
            if frame == 3:
                raise NotRenderable("cannot decode JPEG 2000 here")
            return b"\x89PNG fake for the routing test"

        h = WebHarness(self, render=render)
        h.hold()
        base = f"/api/memory/studies/{STUDY}/series/{SERIES}/instances/{SOP}/rendered"
        reply = h.request("GET", base + "?frame=1&window=40,400")
        self.assertEqual((reply.status, reply.headers["content-type"]), (200, "image/png"))
        self.assertEqual(calls, [(EXPLICIT_VR_LITTLE_ENDIAN, 1, (40.0, 400.0))])
        reply = h.request("GET", base + "?frame=3")
        self.assertEqual(reply.status, 415)
        self.assertIn("JPEG 2000", reply.json()["error"])
        self.assertEqual(h.store.studies[STUDY].pins, 0)

    def test_study_pinned_while_a_worker_still_renders_it(self):
        """A client that goes away mid-render does not unpin the study under the worker reading it: the pin
        goes when the worker is done (the study could be freed under it before)."""
        working = []

        def runner(function, *args):
            working.append((defer.Deferred(), function, args))
            return working[-1][0]

        h = WebHarness(self, render=lambda data, syntax, frame, window: b"\x89PNG")
        h.hold()
        h.api.runner = runner
        channel = h.site.buildProtocol(None)
        channel.makeConnection(StringTransport())
        base = f"/api/memory/studies/{STUDY}/series/{SERIES}/instances/{SOP}/rendered"
        channel.dataReceived(f"GET {base} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        self.assertEqual(h.store.studies[STUDY].pins, 1)
        channel.connectionLost(Failure(ConnectionDone("the client went away")))
        self.assertEqual(h.store.studies[STUDY].pins, 1, "the worker still reads it")
        finished, function, args = working[0]
        finished.callback(function(*args))
        self.assertEqual(h.store.studies[STUDY].pins, 0)


class ConnectionLimitTests(SynchronousTestCase):
    """The web port holds at most max_connections open: clients that hold theirs cannot take the descriptors the
    DICOM listeners need."""

    def test_connections_past_the_bound_are_closed_and_logged_once_a_minute(self):
        h = WebHarness(self)
        site = ApplianceSite(h.api, h.clock, max_connections=2)
        events = capture_log(self, "warn")
        channels = []
        for _ in range(2):
            channel = site.buildProtocol(None)
            channel.makeConnection(StringTransport())
            channels.append(channel)
        self.assertEqual(site.open_connections, 2)
        for _ in range(2):
            transport = StringTransport()
            site.buildProtocol(None).makeConnection(transport)
            self.assertTrue(transport.disconnecting, "closed at once")
            self.assertEqual(transport.value(), b"")
        said = [e["log_format"] for e in events if "closed at once" in e.get("log_format", "")]
        self.assertEqual(len(said), 1, "one line for the first refusal, none for the next within the minute")
        channels[0].connectionLost(Failure(ConnectionDone("gone")))
        self.assertEqual(site.open_connections, 1)
        replacement, transport = site.buildProtocol(None), StringTransport()
        replacement.makeConnection(transport)
        replacement.dataReceived(b"GET /api/devices HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"200 OK", transport.value())
        h.clock.advance(REFUSAL_LOG_INTERVAL)
        site.buildProtocol(None).makeConnection(StringTransport())
        counted = [e for e in events if "closed at once" in e.get("log_format", "")]
        # the second line counts the one refused unsaid within the first minute, and this one
        self.assertEqual((len(counted), counted[-1]["count"], counted[-1]["limit"]), (2, 2, 2))


class ConfigTests(SynchronousTestCase):
    def parse(self, data):
        from appliance import config as configuration

        return configuration.parse(data, "/srv/appliance.toml")

    def test_web_only_on_loopback(self):
        from appliance.config import ConfigError

        for interface in ("0.0.0.0", "192.168.1.4", "::", "localhost"):
            with self.assertRaises(ConfigError) as raised:
                self.parse({"web": {"interface": interface}})
            self.assertIn("[web] interface", str(raised.exception))
            self.assertIn("loopback", str(raised.exception))
        self.assertEqual(self.parse({"web": {"interface": "::1", "port": 8081}}).web.interface, "::1")
        self.assertEqual(self.parse({"web": {"interface": "0.0.0.0", "port": 0}}).web.port, 0)

    def test_query_keys_and_the_local_archive(self):
        from appliance.config import LOCAL_ARCHIVE, ConfigError

        config = self.parse({})
        self.assertEqual((config.web.ae_title, config.web.max_results), ("WEB_SERVER", 500))
        local = config.local_archive
        self.assertEqual((local.name, local.ae_title, local.host, local.port, local.max_pdu, local.tls),
                         (LOCAL_ARCHIVE, "DISK_SERVER", "127.0.0.1", 11112, 16384, None))
        self.assertEqual(self.parse({"disk_server": {"interface": "::", "port": 4242}}).local_archive.host, "::1")
        self.assertEqual(self.parse({"disk_server": {"interface": "10.1.2.3"}}).local_archive.host, "10.1.2.3")
        self.assertIsNone(self.parse({"disk_server": {"port": 0}}).local_archive)
        config = self.parse({"web": {"ae_title": "BROWSER", "max_results": 50}})
        self.assertEqual((config.web.ae_title, config.web.max_results), ("BROWSER", 50))
        for web, key in (({"max_results": 0}, "[web] max_results"), ({"ae_title": "x\\y"}, "[web] ae_title")):
            with self.assertRaises(ConfigError) as raised:
                self.parse({"web": web})
            self.assertIn(key, str(raised.exception))
        with self.assertRaises(ConfigError) as raised:
            self.parse({"devices": {"local": {"ae_title": "X", "host": "h", "port": 104}}})
        self.assertIn("[devices.local]", str(raised.exception))
        self.assertIn("own Disk-Server", str(raised.exception))

    def test_web_port_conflicts(self):
        from appliance.config import ConfigError

        with self.assertRaises(ConfigError) as raised:
            self.parse({"web": {"port": 11112}, "disk_server": {"interface": "0.0.0.0"}})
        self.assertIn("[web] port", str(raised.exception))
        self.assertIn("Disk-Server", str(raised.exception))

    def test_manager_keys(self):
        from appliance.config import ConfigError

        manager = self.parse({"memory_manager": {"max_parallel_loads": 2, "load_timeout": "1 h"}}).manager
        self.assertEqual((manager.ae_title, manager.max_parallel_loads, manager.load_timeout),
                         ("MEMORY_MANAGER", 2, 3600.0))
        for key, value in (("max_parallel_loads", 0), ("ae_title", "A\\B"), ("load_timeout", "soon"), ("x", 1)):
            with self.assertRaises(ConfigError) as raised:
                self.parse({"memory_manager": {key: value}})
            self.assertIn(f"[memory_manager] {key}", str(raised.exception))


class PagesTests(SynchronousTestCase):
    """The pages' files: served by exact name, with the security headers on every answer."""

    def setUp(self):
        self.h = WebHarness(self)

    def test_index_and_modules(self):
        reply = self.h.request("GET", "/")
        self.assertEqual((reply.status, reply.headers["content-type"]), (200, "text/html; charset=utf-8"))
        self.assertIn(b'<script type="module" src="/static/app.js"></script>', reply.body)
        for name, content_type in (("app.js", "text/javascript; charset=utf-8"), ("query.js", "text/javascript; "
                                   "charset=utf-8"), ("app.css", "text/css; charset=utf-8")):
            reply = self.h.request("GET", f"/static/{name}")
            self.assertEqual((reply.status, reply.headers["content-type"]), (200, content_type), name)

    def test_security_headers_everywhere(self):
        for path in ("/", "/static/app.js", "/api/devices", "/api/nothing", "/static/../setup.cfg"):
            reply = self.h.request("GET", path)
            csp = reply.headers["content-security-policy"]
            self.assertIn("script-src 'self'", csp, path)
            self.assertIn("default-src 'none'", csp, path)
            self.assertIn("frame-ancestors 'none'", csp, path)
            self.assertNotIn("unsafe-inline", csp, path)
            self.assertEqual((reply.headers["x-content-type-options"], reply.headers["x-frame-options"]),
                             ("nosniff", "DENY"), path)

    def test_only_the_files_by_name(self):
        for path in ("/static/../setup.cfg", "/static/%2e%2e%2fsetup.cfg", "/static/", "/static/a/b.js",
                     "/static/missing.js", "/static/pages.py", "/index.html"):
            reply = self.h.request("GET", path)
            self.assertEqual(reply.status, 404, path)
            self.assertNotIn(b"[metadata]", reply.body)
        self.assertEqual(self.h.request("POST", "/", b"{}").status, 405)

    def test_pages_never_write_markup(self):
        """The modules build elements with text nodes: no innerHTML, outerHTML, insertAdjacentHTML, document.write
        or eval anywhere, and no inline script or style in the HTML."""
        from appliance.web.pages import Pages

        pages = Pages()
        for name, (content_type, body) in pages.files.items():
            text = body.decode("utf-8")
            for forbidden in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                              "new Function", "setAttribute(\"on"):
                self.assertNotIn(forbidden, text, name)
            if name.endswith(".html"):
                self.assertNotIn("<script>", text)
                self.assertNotIn("style=", text)
                self.assertIsNone(re.search(r"<[^>]*\son[a-z]+\s*=", text), name)  # no inline event handler

