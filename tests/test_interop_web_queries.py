"""The query API against real archives on 127.0.0.1: the appliance's own Disk-Server (the Local archive) and DCMTK's
dcmqrscp, which answers few keys; C-ECHO, studies, series and instances, queries past [web] max_results
(cancelled), a device that is not there and one that rejects the association."""

from __future__ import annotations

import json
import os
from typing import Tuple

from twisted.internet import defer
from twisted.trial import unittest
from twisted.web.client import readBody

from .support import deferred_test, free_port
from . import test_interop_load
from .test_interop_load import DCMQRIDX, DCMQRSCP, Appliance, _need, study_files

STUDIES = ("1.2.826.0.1.3680043.10.21", "1.2.826.0.1.3680043.10.22", "1.2.826.0.1.3680043.10.23")


class QueryAppliance(Appliance):
    async def get(self, path: str, method: bytes = b"GET") -> Tuple[int, dict, object]:
        """(status, headers by lower-case name, parsed JSON body)."""
        from twisted.web.http_headers import Headers
        response = await self.agent.request(method, f"http://127.0.0.1:{self.web_port}{path}".encode(),
                                            Headers({b"content-type": [b"application/json"]}))
        body = await readBody(response)
        headers = {name.decode().lower(): b", ".join(values).decode() for name, values in
                   response.headers.getAllRawHeaders()}
        return response.code, headers, json.loads(body) if body else None


def values(answer: dict, tag: str):
    return answer.get(tag, {}).get("Value", [])


class QueryInteropTests(unittest.TestCase):
    timeout = 120
    skip = _need(DCMQRSCP, DCMQRIDX, "/usr/bin/storescu")
    start_dcmqrscp = test_interop_load.DcmqrscpTests.start_dcmqrscp

    async def appliance(self, web=None) -> Tuple[QueryAppliance, int]:
        """The appliance holding three studies of two series of two images, and dcmqrscp holding the same."""
        files = []
        for study in STUDIES:
            files += study_files(os.path.abspath(self.mktemp()), study, 2, 2)
        port = free_port()
        appliance = QueryAppliance(self, devices={
            "qrscp": {"ae_title": "QRSCP", "host": "127.0.0.1", "port": port, "timeout": 20},
            "nobody": {"ae_title": "NOBODY", "host": "127.0.0.1", "port": free_port(), "timeout": 5},
            "wrongtitle": {"ae_title": "NOT_QRSCP", "host": "127.0.0.1", "port": port, "timeout": 20},
        }, web=web)
        await appliance.storescu(files)
        await self.start_dcmqrscp(port, files, None)
        return appliance, port

    @deferred_test
    async def test_local_archive_and_dcmqrscp(self):
        appliance, _ = await self.appliance()
        code, _, devices = await appliance.get("/api/devices")
        self.assertEqual([d["name"] for d in devices["devices"]][:2], ["local", "disk_server"])
        for device in ("local", "qrscp"):
            code, _, echoed = await appliance.get(f"/api/devices/{device}/echo", b"POST")
            self.assertEqual((code, echoed["ok"], echoed["status"]), (200, True, "0x0000"), echoed)
            code, headers, studies = await appliance.get(f"/api/devices/{device}/studies?PatientName=*")
            self.assertEqual(code, 200, studies)
            self.assertEqual(headers["content-type"], "application/dicom+json")
            self.assertEqual(sorted(values(s, "0020000D")[0] for s in studies), sorted(STUDIES), device)
            code, _, studies = await appliance.get(f"/api/devices/{device}/studies?StudyInstanceUID={STUDIES[1]}")
            self.assertEqual([values(s, "0020000D") for s in studies], [[STUDIES[1]]], device)
            code, _, series = await appliance.get(f"/api/devices/{device}/studies/{STUDIES[1]}/series")
            self.assertEqual(code, 200, series)
            self.assertEqual(sorted(values(s, "0020000E")[0] for s in series),
                             [f"{STUDIES[1]}.1", f"{STUDIES[1]}.2"], device)
            code, _, images = await appliance.get(
                f"/api/devices/{device}/studies/{STUDIES[1]}/series/{STUDIES[1]}.2/instances")
            self.assertEqual(code, 200, images)
            self.assertEqual(len(images), 2, device)
            self.assertTrue(all(values(image, "00080018") for image in images), images)
        # the Disk-Server answers its optional keys; dcmqrscp only some: both pages get what came back
        code, _, studies = await appliance.get(f"/api/devices/local/studies?StudyInstanceUID={STUDIES[0]}")
        self.assertEqual(values(studies[0], "00201208"), [4])

    @deferred_test
    async def test_two_queries_to_one_device_at_once(self):
        appliance, _ = await self.appliance()
        first = defer.ensureDeferred(appliance.get("/api/devices/qrscp/studies"))
        second = defer.ensureDeferred(appliance.get(f"/api/devices/qrscp/studies?StudyInstanceUID={STUDIES[2]}"))
        (code1, _, all_studies), (code2, _, one) = await defer.gatherResults([first, second])
        self.assertEqual((code1, code2, len(all_studies), len(one)), (200, 200, 3, 1))

    @deferred_test
    async def test_failures(self):
        appliance, _ = await self.appliance()
        code, _, answer = await appliance.get("/api/devices/nobody/studies")
        self.assertEqual((code, answer["kind"]), (502, "unreachable"), answer)
        code, _, answer = await appliance.get("/api/devices/wrongtitle/studies")
        self.assertEqual((code, answer["kind"]), (502, "rejected"), answer)
        self.assertIn("called-AE-title-not-recognized", answer["error"])
        code, _, answer = await appliance.get("/api/devices/wrongtitle/echo", b"POST")
        self.assertEqual((code, answer["kind"]), (502, "rejected"), answer)
        code, _, answer = await appliance.get("/api/devices/qrscp/studies?StudyDate=2020")
        self.assertEqual(code, 400, answer)

    @deferred_test
    async def test_past_max_results_cancelled(self):
        appliance, _ = await self.appliance(web={"max_results": 2})
        for device in ("local", "qrscp"):
            code, headers, studies = await appliance.get(f"/api/devices/{device}/studies")
            self.assertEqual((code, len(studies), headers.get("x-truncated")), (200, 2, "true"), device)
            self.assertIn("max_results = 2", headers["warning"])
            # the device is free again: the cancelled query ended its association
            code, _, one = await appliance.get(f"/api/devices/{device}/studies?StudyInstanceUID={STUDIES[0]}")
            self.assertEqual((code, len(one)), (200, 1), device)

    @deferred_test
    async def test_load_from_the_local_archive(self):
        """What the pages do: find a study on the Local archive, load it by the same device name, see it held."""
        appliance, _ = await self.appliance()
        code, _, studies = await appliance.get(f"/api/devices/local/studies?StudyInstanceUID={STUDIES[2]}")
        self.assertEqual(code, 200)
        load = await appliance.load("local", values(studies[0], "0020000D")[0])
        ended = await appliance.ended(load["id"])
        self.assertEqual((ended["state"], ended["completed"], ended["received"]), ("done", 4, 4), ended)
        self.assertEqual(len(appliance.held(STUDIES[2])), 4)

