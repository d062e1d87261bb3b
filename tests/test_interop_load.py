"""Loads into memory against real archives on 127.0.0.1, driven through the HTTP API of the whole appliance.

The appliance runs in-process, built by the composition root (tap.makeService) from a configuration file
with free ports: its Disk-Server is one remote archive (configured to know the Memory-Server as a device,
as the shipped configuration does), DCMTK's dcmqrscp holding generated studies another.  Requests go
through twisted.web's client to the API; waits are the API's own ``?wait=`` (answered at the load's next
change), never sleeps.
"""

from __future__ import annotations

import json
import os
from io import BytesIO
from typing import Dict, List, Optional, Sequence, Tuple

from pydicom import dcmread
from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory
from twisted.trial import unittest
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers
from zope.interface import implementer

from appliance import tap
from appliance.ae.manager import LoadState
from appliance.dataset.part10 import part10_header
from appliance.dicom import dimse as D
from appliance.dicom import status as S
from appliance.dicom.negotiation import AcceptorPolicy
from appliance.dicom.uids import (
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLEMENTATION_CLASS_UID,
    STUDY_ROOT_MOVE,
    UNCOMPRESSED_TRANSFER_SYNTAXES,
)
from appliance.interfaces import IServiceClass
from appliance.net import requestor
from appliance.net.protocol import AcceptorFactory, Timeouts

from .support import Listening, connect_when_listening, deferred_test, free_port, run_program, spawn_peer, write_file
from .support_data import CT_IMAGE_STORAGE, dataset_offset, make_dataset, write_part10

STORESCU = "/usr/bin/storescu"
DCMQRSCP = "/usr/bin/dcmqrscp"
DCMQRIDX = "/usr/bin/dcmqridx"


def _need(*programs: str) -> Optional[str]:
    missing = [program for program in programs if not os.access(program, os.X_OK)]
    return f"DCMTK not installed ({', '.join(missing)} missing)" if missing else None


def study_files(folder: str, study: str, series_count: int = 2, per_series: int = 2, pixels: int = 4096) -> List[str]:
    """Part 10 files of one generated study: ``series_count`` series of ``per_series`` CT images."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for series_number in range(1, series_count + 1):
        series = f"{study}.{series_number}"
        for number in range(1, per_series + 1):
            ds = make_dataset(study=study, series=series, sop=f"{series}.{number}",
                              pixels=bytes([number % 256]) * pixels)
            ds.InstanceNumber = number
            paths.append(write_part10(os.path.join(folder, f"{ds.SOPInstanceUID}.dcm"), ds,
                                      EXPLICIT_VR_LITTLE_ENDIAN))
    return paths


def dataset_of(path: str) -> bytes:
    with open(path, "rb") as handle:
        data = handle.read()
    return data[dataset_offset(data):]


class Appliance:
    """The whole appliance in-process on free ports, from a configuration file; its API through HTTP."""

    def __init__(self, testcase: unittest.TestCase, devices: Optional[Dict[str, dict]] = None,
                 memory: Optional[dict] = None, manager: Optional[dict] = None, web: Optional[dict] = None,
                 tls: Optional[dict] = None) -> None:
        self.testcase = testcase
        self.root = os.path.abspath(testcase.mktemp())
        os.makedirs(self.root)
        self.disk_port, self.memory_port, self.web_port = free_port(), free_port(), free_port()
        tables = {
            "appliance": {"data_dir": os.path.join(self.root, "var")},
            "disk_server": {"interface": "127.0.0.1", "port": self.disk_port, "min_free_space": 0, "timeout": 20},
            "memory_server": dict({"interface": "127.0.0.1", "port": self.memory_port, "timeout": 20}, **(memory or {})),
            "memory_manager": manager or {},
            "web": dict({"interface": "127.0.0.1", "port": self.web_port}, **(web or {})),
            "devices": dict({
                "disk_server": {"ae_title": "DISK_SERVER", "host": "127.0.0.1", "port": self.disk_port, "timeout": 20},
                "memory_server": {"ae_title": "MEMORY_SERVER", "host": "127.0.0.1", "port": self.memory_port,
                                  "timeout": 20},
            }, **(devices or {})),
        }
        if tls is not None:  # a [tls] table: for the web pages' HTTPS, the DICOM ports staying plain
            tables["tls"] = tls
            tables["disk_server"]["tls_port"] = tables["memory_server"]["tls_port"] = 0
        self.start(tables)

    def start(self, tables: dict) -> None:
        """Write ``tables`` as the configuration file, build the appliance from it and start it."""
        path = write_file(self.testcase, _toml(tables), name="appliance.toml")
        options = tap.Options()
        options.parseOptions(["--config", path])
        self.service = tap.makeService(options, reactor)
        self.service.startService()
        self.testcase.addCleanup(lambda: defer.ensureDeferred(self._stop()))
        factory = self.service.getServiceNamed("web").factory
        site = getattr(factory, "wrappedFactory", factory)  # behind TLS under HTTPS
        self.manager = site.resource.manager
        self.store = site.resource.store
        self.agent = Agent(reactor)

    async def _stop(self) -> None:
        await defer.maybeDeferred(self.service.stopService)  # the archive closes its index on its thread

    async def api(self, method: str, path: str, body=None) -> Tuple[int, dict]:
        headers = Headers({b"content-type": [b"application/json"]})
        producer = None
        if body is not None:
            from io import BytesIO

            from twisted.web.client import FileBodyProducer

            producer = FileBodyProducer(BytesIO(json.dumps(body).encode("utf-8")))
        response = await self.agent.request(method.encode("ascii"), f"http://127.0.0.1:{self.web_port}{path}".encode(),
                                            headers, producer)
        data = await readBody(response)
        return response.code, json.loads(data) if data else None

    async def load(self, device: str, study: str, series: str = None, instance: str = None) -> dict:
        body = {"device": device, "study": study}
        if series:
            body["series"] = series
        if instance:
            body["instance"] = instance
        code, load = await self.api("POST", "/api/loads", body)
        self.testcase.assertEqual(code, 202, load)
        return load

    async def ended(self, load_id: int, states: Optional[List[str]] = None) -> dict:
        """The load once it ended, following it with ?wait= (each state seen appended to ``states``)."""
        for _ in range(200):
            code, load = await self.api("GET", f"/api/loads/{load_id}?wait=30")
            self.testcase.assertEqual(code, 200, load)
            if states is not None and (not states or states[-1] != load["state"]):
                states.append(load["state"])
            if load["state"] in ("done", "failed", "cancelled"):
                return load
        raise AssertionError(f"load {load_id} did not end")

    async def storescu(self, files: Sequence[str]) -> None:
        out, err, code = await run_program(STORESCU, ["-to", "20", "-ta", "20", "-aec", "DISK_SERVER", "127.0.0.1",
                                                      str(self.disk_port), *files])
        self.testcase.assertEqual(code, 0, out + err)

    def held(self, study: str) -> Dict[str, bytes]:
        held = self.store.studies.get(study)
        return {} if held is None else {obj.metadata.sop_instance_uid: bytes(obj.data) for obj in held.objects()}


def follow(manager, load_id: int) -> List[str]:
    """The states a load goes through from now on, recorded as they change (from its current one)."""
    states = [manager.get(load_id).state.value]

    def changed(load):
        if load.state.value != states[-1]:
            states.append(load.state.value)
        if load.state.value not in ("done", "failed", "cancelled"):
            manager.changed(load_id).addCallback(changed)

    manager.changed(load_id).addCallback(changed)
    return states


def _toml(tables: dict) -> str:
    lines = []

    def value(item) -> str:
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, (int, float)):
            return str(item)
        return json.dumps(item)

    def table(name: str, content: dict) -> None:
        lines.append(f"[{name}]")
        nested = []
        for key, item in content.items():
            if isinstance(item, dict):
                nested.append((f"{name}.{key}", item))
            else:
                lines.append(f"{key} = {value(item)}")
        lines.append("")
        for child, content in nested:
            table(child, content)

    for name, content in tables.items():
        if name == "devices":
            for device, settings in content.items():
                table(f"devices.{device}", settings)
        else:
            table(name, content)
    return "\n".join(lines)


class FromDiskServerTests(unittest.TestCase):
    """Loads from the appliance's own Disk-Server."""

    timeout = 120
    skip = _need(STORESCU)

    @deferred_test
    async def test_study_series_instance(self):
        """A study, then (once freed) one series, then one instance: each load ends done with its counts, the
        objects in memory are the Disk-Server's data sets byte for byte, and the API serves them."""
        appliance = Appliance(self)
        study = "1.2.826.0.1.3680043.10.1"
        files = study_files(os.path.join(appliance.root, "files"), study)
        await appliance.storescu(files)
        states: List[str] = []
        load = await appliance.load("disk_server", study)
        ended = await appliance.ended(load["id"], states)
        self.assertEqual((ended["state"], ended["completed"], ended["failed"], ended["received"], ended["error"]),
                         ("done", 4, 0, 4, None), ended)
        self.assertEqual(states[-1], "done")
        held = appliance.held(study)
        self.assertEqual(held, {os.path.basename(path)[:-4]: dataset_of(path) for path in files})
        code, served = await appliance.api("GET", f"/api/memory/studies/{study}")
        self.assertEqual((code, served["instance_count"], served["series_count"]), (200, 4, 2))
        # in memory already: done at once, no C-MOVE
        again = await appliance.load("disk_server", study)
        self.assertEqual((again["state"], again["completed"]), ("done", 0))
        code, freed = await appliance.api("DELETE", f"/api/memory/studies/{study}")
        self.assertEqual(code, 200)
        load = await appliance.load("disk_server", study, series=f"{study}.2")
        ended = await appliance.ended(load["id"])
        self.assertEqual((ended["state"], ended["completed"]), ("done", 2), ended)
        self.assertEqual(sorted(appliance.held(study)), [f"{study}.2.1", f"{study}.2.2"])
        load = await appliance.load("disk_server", study, series=f"{study}.1", instance=f"{study}.1.2")
        ended = await appliance.ended(load["id"])
        self.assertEqual((ended["state"], ended["completed"]), ("done", 1), ended)
        self.assertEqual(sorted(appliance.held(study)), [f"{study}.1.2", f"{study}.2.1", f"{study}.2.2"])

    @deferred_test
    async def test_four_in_parallel_fifth_queued(self):
        appliance = Appliance(self)
        studies = [f"1.2.826.0.1.3680043.10.2.{n}" for n in range(5)]
        files = [path for n, study in enumerate(studies)
                 for path in study_files(os.path.join(appliance.root, f"files{n}"), study, 1, 2)]
        await appliance.storescu(files)
        loads = [appliance.manager.submit("disk_server", study) for study in studies]
        self.assertEqual([load.state for load in loads], [LoadState.RUNNING] * 4 + [LoadState.QUEUED])
        states = follow(appliance.manager, loads[4].id)
        ended = [await appliance.ended(load.id) for load in loads]
        self.assertEqual(states[0], "queued")
        self.assertEqual(states[-1], "done")
        self.assertIn("running", states)
        self.assertEqual([(load["state"], load["completed"]) for load in ended], [("done", 2)] * 5)
        for study in studies:
            self.assertEqual(len(appliance.held(study)), 2)

    @deferred_test
    async def test_cancel_in_the_middle(self):
        """A C-CANCEL while the study arrives: the Disk-Server stops, the load ends cancelled with what came."""
        appliance = Appliance(self)
        study = "1.2.826.0.1.3680043.10.3"
        await appliance.storescu(study_files(os.path.join(appliance.root, "files"), study, 1, 40, pixels=1 << 20))
        first_kept = defer.Deferred()
        kept = appliance.manager.kept

        def kept_then_tell(description):
            kept(description)
            if not first_kept.called:
                first_kept.callback(None)

        self.patch(appliance.manager, "kept", kept_then_tell)  # cancelled once the first image is in memory
        load = appliance.manager.submit("disk_server", study)
        await first_kept
        code, cancelling = await appliance.api("DELETE", f"/api/loads/{load.id}")
        self.assertIn(code, (200, 202))
        ended = await appliance.ended(load.id)
        self.assertEqual(ended["state"], "cancelled", ended)
        self.assertLess(ended["completed"], 40)
        self.assertEqual(len(appliance.held(study)), ended["received"])

    @deferred_test
    async def test_into_full_memory(self):
        """A study larger than memory_limit: what fits arrives, the rest is refused A700 by the Memory-Server,
        and the load fails saying memory is full."""
        appliance = Appliance(self, memory={"memory_limit": "1 MiB"})
        study = "1.2.826.0.1.3680043.10.4"
        await appliance.storescu(study_files(os.path.join(appliance.root, "files"), study, 1, 4, pixels=400 * 1024))
        load = await appliance.load("disk_server", study)
        ended = await appliance.ended(load["id"])
        self.assertEqual(ended["state"], "failed", ended)
        self.assertGreater(ended["failed"], 0)
        self.assertIn("memory full", ended["error"])
        self.assertIn("memory_limit=1048576", ended["error"])
        self.assertLessEqual(appliance.store.size, appliance.store.limit)


class FailureTests(unittest.TestCase):
    timeout = 60

    @deferred_test
    async def test_unreachable_and_unknown(self):
        appliance = Appliance(self, devices={"nowhere": {"ae_title": "NOWHERE", "host": "127.0.0.1",
                                                         "port": free_port(), "timeout": 5}})
        load = await appliance.load("nowhere", "1.2.3")
        ended = await appliance.ended(load["id"])
        self.assertEqual(ended["state"], "failed")
        self.assertIn("cannot reach nowhere (NOWHERE at 127.0.0.1:", ended["error"])
        code, error = await appliance.api("POST", "/api/loads", {"device": "elsewhere", "study": "1.2.3"})
        self.assertEqual(code, 404)
        self.assertIn("no device 'elsewhere'", error["error"])

    @deferred_test
    async def test_rejected(self):
        """The Disk-Server itself, called by a title it does not answer to: rejected, in PS3.8's words."""
        appliance = Appliance(self, devices={"wrong": {"ae_title": "NOT_THE_DISK", "host": "127.0.0.1",
                                                       "port": 0, "timeout": 5}} and {})
        appliance.manager.config.devices["wrong"] = appliance.manager.config.devices["disk_server"].__class__(
            name="wrong", ae_title="NOT_THE_DISK", host="127.0.0.1", port=appliance.disk_port, max_pdu=16384,
            timeout=5)
        load = appliance.manager.submit("wrong", "1.2.3")
        ended = await appliance.ended(load.id)
        self.assertIn("rejected the association", ended["error"])
        self.assertIn("called-AE-title-not-recognized", ended["error"])

    @deferred_test
    async def test_device_aborts_halfway(self):
        """A device that aborts the association in the middle of a C-MOVE: the load fails saying so."""
        listening = Listening(self, _aborting_archive(), reactor)
        appliance = Appliance(self, devices={"flaky": {"ae_title": "FLAKY", "host": "127.0.0.1",
                                                       "port": listening.number, "timeout": 5}})
        load = await appliance.load("flaky", "1.2.3")
        ended = await appliance.ended(load["id"])
        self.assertEqual(ended["state"], "failed")
        self.assertIn("the association with flaky (FLAKY at 127.0.0.1:", ended["error"])
        self.assertIn("aborted by the peer", ended["error"])


@implementer(IServiceClass)
class _AbortingMove:
    """A C-MOVE SCP that starts answering (one pending response), then aborts the association."""

    abstract_syntaxes = {STUDY_ROOT_MOVE: UNCOMPRESSED_TRANSFER_SYNTAXES}
    operations = frozenset({D.CommandField.C_MOVE_RQ})

    def open_data_set(self, request):
        from appliance.net.protocol import BufferedDataSet

        return BufferedDataSet(limit=1 << 16)

    def handle(self, request) -> None:
        request.respond(S.PENDING, NumberOfRemainingSuboperations=7, NumberOfCompletedSuboperations=0,
                        NumberOfFailedSuboperations=0, NumberOfWarningSuboperations=0)
        reactor.callLater(0, request.association.abort, "the test's archive gives up")

    def cancel(self, request) -> None:
        pass


def _aborting_archive() -> Factory:
    service = _AbortingMove()
    policy = AcceptorPolicy(ae_title="FLAKY", abstract_syntaxes=service.abstract_syntaxes, max_pdu=16384,
                            implementation_class_uid=IMPLEMENTATION_CLASS_UID, implementation_version_name="TESTS")
    return AcceptorFactory(policy, {STUDY_ROOT_MOVE: service}, reactor, Timeouts(artim=5, association=5, dimse=5,
                                                                                    idle=30), 4)


class DcmqrscpTests(unittest.TestCase):
    """Loads from DCMTK's dcmqrscp: a study and a series when it knows the Memory-Server, A801 when it does not."""

    timeout = 120
    skip = _need(DCMQRSCP, DCMQRIDX)

    async def start_dcmqrscp(self, port: int, files: Sequence[str], memory_port: Optional[int]) -> None:
        """dcmqrscp on ``port`` holding ``files``, knowing MEMORY_SERVER at ``memory_port`` (None: not at all)."""
        folder = os.path.abspath(self.mktemp())
        storage = os.path.join(folder, "QRSCP")
        os.makedirs(storage)
        out, err, code = await run_program(DCMQRIDX, [storage, *files])
        self.assertEqual(code, 0, out + err)
        hosts = f"memory = (MEMORY_SERVER, 127.0.0.1, {memory_port})\n" if memory_port else ""
        config = write_file(self, "NetworkTCPPort = 104\nMaxPDUSize = 16384\nMaxAssociations = 16\n"
                                  f"HostTable BEGIN\n{hosts}HostTable END\nVendorTable BEGIN\nVendorTable END\n"
                                  f"AETable BEGIN\nQRSCP {storage} RW (100, 100mb) ANY\nAETable END\n",
                            name="dcmqrscp.cfg")
        peer = spawn_peer(self, [DCMQRSCP, "-c", config, str(port)], path=folder)

        def connect():
            return requestor.connect(reactor, "127.0.0.1", port, "PROBE", "QRSCP",
                                     timeouts=Timeouts(artim=5.0, association=10.0, dimse=10.0, idle=None),
                                     implementation_class_uid=IMPLEMENTATION_CLASS_UID,
                                     implementation_version_name="TESTS")

        association = await connect_when_listening(reactor, connect, peer)
        await association.release()

    async def appliance_and_dcmqrscp(self, files: Sequence[str], knows_memory_server: bool,
                                     retrieve: str = "move") -> Appliance:
        port = free_port()
        appliance = Appliance(self, devices={"qrscp": {"ae_title": "QRSCP", "host": "127.0.0.1", "port": port,
                                                       "timeout": 20, "retrieve": retrieve}})
        await self.start_dcmqrscp(port, files, appliance.memory_port if knows_memory_server else None)
        return appliance

    @deferred_test
    async def test_study_and_series(self):
        study = "1.2.826.0.1.3680043.10.6"
        files = study_files(os.path.abspath(self.mktemp()), study, 2, 3)
        appliance = await self.appliance_and_dcmqrscp(files, True)
        load = await appliance.load("qrscp", study)
        ended = await appliance.ended(load["id"])
        self.assertEqual((ended["state"], ended["completed"], ended["failed"], ended["received"]), ("done", 6, 0, 6),
                         ended)
        held = appliance.held(study)
        self.assertEqual(sorted(held), sorted(os.path.basename(path)[:-4] for path in files))
        for path in files:  # in the transfer syntax the Memory-Server chose (Explicit VR Big Endian first)
            held_object = appliance.store.find(study, f"{study}.{path.split('.')[-3]}", os.path.basename(path)[:-4])
            ours = dcmread(BytesIO(part10_header(CT_IMAGE_STORAGE, "1.2.3", held_object.transfer_syntax, "1.2", None,
                                                 None) + bytes(held_object.data)))
            original = dcmread(path)
            self.assertEqual((ours.SOPInstanceUID, ours.PatientName), (original.SOPInstanceUID, original.PatientName))
            self.assertEqual(ours.pixel_array.tolist(), original.pixel_array.tolist())
        await appliance.api("DELETE", f"/api/memory/studies/{study}")
        load = await appliance.load("qrscp", study, series=f"{study}.1")
        ended = await appliance.ended(load["id"])
        self.assertEqual((ended["state"], ended["completed"]), ("done", 3), ended)

    @deferred_test
    async def test_a801_says_what_to_configure(self):
        study = "1.2.826.0.1.3680043.10.5"
        appliance = await self.appliance_and_dcmqrscp(study_files(os.path.abspath(self.mktemp()), study, 1, 2), False)
        load = await appliance.load("qrscp", study)
        ended = await appliance.ended(load["id"])
        self.assertEqual(ended["state"], "failed")
        for words in ("A801", "does not know the Memory-Server", "AE title MEMORY_SERVER", "host 127.0.0.1",
                      f"port {appliance.memory_port}", 'retrieve = "get"'):
            self.assertIn(words, ended["error"])

    @deferred_test
    async def test_get_from_an_archive_that_does_not_know_the_memory_server(self):
        """The A801 archive, loaded with retrieve = "get": the objects come back on the load's own association."""
        study = "1.2.826.0.1.3680043.10.7"
        files = study_files(os.path.abspath(self.mktemp()), study, 2, 2)
        appliance = await self.appliance_and_dcmqrscp(files, False, retrieve="get")
        load = await appliance.load("qrscp", study)
        ended = await appliance.ended(load["id"])
        self.assertEqual((ended["state"], ended["completed"], ended["failed"], ended["received"]), ("done", 4, 0, 4),
                         ended)
        self.assertEqual(sorted(appliance.held(study)), sorted(os.path.basename(path)[:-4] for path in files))
        load = await appliance.load("qrscp", study, series=f"{study}.2", instance=f"{study}.2.1")
        self.assertEqual((await appliance.ended(load["id"]))["state"], "done", "in memory already")
