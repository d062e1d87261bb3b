"""The Disk-Server's C-MOVE SCP against real peers on 127.0.0.1: DCMTK's movescu and storescp, and pynetdicom.

The Disk-Server runs in-process on port 0 over a fresh archive with real
worker threads; the move destination is DCMTK's storescp (a subprocess, with
``+B``: it writes each data set exactly as received) or pynetdicom's storage
SCP (in its own threads), configured as a device.  Nothing sleeps: every wait
is a Deferred, bounded by the peers' own timeouts or a count of attempts.
"""

from __future__ import annotations

import os
import re
import threading
import warnings
from typing import Dict, List, Optional

from pydicom import dcmread
from pydicom.dataset import Dataset
from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from appliance import config as configuration
from appliance.ae.listeners import acceptor_factory, disk_server_services
from appliance.archive.archive import Archive
from appliance.archive.sink import examine
from appliance.archive.store import part10_header
from appliance.dicom.uids import (
    EXPLICIT_VR_BIG_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    IMPLICIT_VR_LITTLE_ENDIAN,
    STUDY_ROOT_MOVE,
)
from appliance.net import requestor
from appliance.net.protocol import Timeouts
from appliance.net.threads import ThreadPoolService

from .support import (Listening, connect_when_listening, deferred_test, free_port, keep_pynetdicom_reactor_off_responses,
                      run_program, spawn_peer)
from .support_data import dataset_bytes, encode_dataset, make_dataset

try:
    import pynetdicom
except ImportError:
    pynetdicom = None

MOVESCU = "/usr/bin/movescu"
STORESCP = "/usr/bin/storescp"
STUDY = "1.2.826.0.1.3680043.9.7001"
SERIES_A, SERIES_B = f"{STUDY}.1", f"{STUDY}.2"


def _need(*programs: str) -> Optional[str]:
    missing = [program for program in programs if not os.access(program, os.X_OK)]
    return f"DCMTK not installed ({', '.join(missing)} missing)" if missing else None


class DiskServer:
    """The Disk-Server AE over a fresh archive, listening on 127.0.0.1 port 0, with ``devices`` configured.

    Cleanups (last added, first run): stop listening and wait for every
    connection to close, stop the worker threads, close the index.
    """

    def __init__(self, testcase: unittest.TestCase, devices: Dict[str, dict]) -> None:
        self.root = os.path.abspath(testcase.mktemp())
        os.makedirs(self.root)
        self.config = configuration.parse(
            {
                "appliance": {"data_dir": self.root},
                "disk_server": {"interface": "127.0.0.1", "port": 0, "timeout": 20, "min_free_space": 0},
                "devices": devices,
            },
            os.path.join(self.root, "appliance.toml"),
        )
        self.io = ThreadPoolService(reactor, "test-archive-io", max_threads=4)
        self.db = ThreadPoolService(reactor, "test-archive-db", max_threads=1)
        self.io.startService()
        self.db.startService()
        self.archive = Archive(self.config.archive.path, self.config.archive.limits,
                               self.config.archive.on_duplicate, reactor, self.io.runner, self.db.runner)
        testcase.addCleanup(self.archive.close)
        testcase.addCleanup(self.db.stopService)
        testcase.addCleanup(self.io.stopService)
        self.factory = acceptor_factory(self.config.disk_server, self.config,
                                        disk_server_services(self.config, self.archive), reactor)
        self.listening = Listening(testcase, self.factory, reactor)
        self.port = self.listening.number

    async def store(self, ds: Dataset, transfer_syntax: str = EXPLICIT_VR_LITTLE_ENDIAN) -> str:
        """Store ``ds`` through the archive as the C-STORE SCP would; returns the stored file's path."""
        archive = self.archive
        header = part10_header(ds.SOPClassUID, ds.SOPInstanceUID, transfer_syntax, IMPLEMENTATION_CLASS_UID, "T",
                               "MODALITY")
        temp = await archive.open_temp()
        await archive.write(temp, [header, encode_dataset(ds, transfer_syntax)])
        stored = await archive.io(examine, temp, len(header), ds.SOPClassUID, ds.SOPInstanceUID, transfer_syntax,
                                  "MODALITY")
        await archive.commit(stored)
        row = await archive.db(archive.index.lookup, ds.SOPInstanceUID)
        return archive.store.absolute(row.path)

    async def fill(self) -> Dict[str, str]:
        """Three CT images in two series of STUDY; SOP Instance UID -> stored file."""
        paths = {}
        for number, series in enumerate((SERIES_A, SERIES_A, SERIES_B), 1):
            ds = make_dataset(study=STUDY, series=series, sop=f"{series}.{number}",
                              pixels=bytes(range(256)) * 64 * number)
            ds.InstanceNumber = number
            paths[ds.SOPInstanceUID] = await self.store(ds)
        return paths


def _connect(port: int, called: str) -> defer.Deferred:
    return requestor.connect(
        reactor, "127.0.0.1", port, "PROBE", called,
        timeouts=Timeouts(artim=5.0, association=10.0, dimse=10.0, idle=None),
        implementation_class_uid=IMPLEMENTATION_CLASS_UID, implementation_version_name=IMPLEMENTATION_VERSION_NAME,
    )


def received_files(folder: str) -> Dict[str, str]:
    """SOP Instance UID -> path of each file storescp wrote in ``folder``."""
    found = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found[str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = path
    return found


class MovescuRun:
    """One movescu run (``-d``): output, exit code, and the C-MOVE responses it printed."""

    _BLOCK = re.compile(r"INCOMING DIMSE MESSAGE =+\n(.*?)END DIMSE MESSAGE", re.S)
    _FIELD = re.compile(r"^D: (Message Type|DIMSE Status|Remaining Suboperations|Completed Suboperations|"
                        r"Failed Suboperations|Warning Suboperations)\s*: (\S+)", re.M)

    def __init__(self, output: str, code: int) -> None:
        self.output = output
        self.code = code
        #: per C-MOVE-RSP: {"status": int, "Remaining": int or None, "Completed": ..., "Failed": ..., "Warning": ...}
        self.responses: List[dict] = []
        for block in self._BLOCK.findall(output):
            fields = dict(self._FIELD.findall(block))
            if fields.get("Message Type") != "C-MOVE":
                continue
            response = {"status": int(fields["DIMSE Status"].rstrip(":"), 16)}
            for name in ("Remaining", "Completed", "Failed", "Warning"):
                value = fields.get(f"{name} Suboperations", "none")
                response[name] = None if value == "none" else int(value)
            self.responses.append(response)

    @property
    def statuses(self) -> List[int]:
        return [response["status"] for response in self.responses]

    @property
    def final(self) -> dict:
        if not self.responses or self.responses[-1]["status"] == 0xFF00:
            raise AssertionError(f"no final C-MOVE response in movescu's output:\n{self.output}")
        return self.responses[-1]


async def movescu(server: DiskServer, destination: str, level: str, **keys: str) -> MovescuRun:
    """movescu (Study Root, debug output) against the Disk-Server, moving to ``destination``."""
    args = ["-d", "-S", "-to", "20", "-ta", "20", "-td", "60", "-aet", "MOVESCU", "-aec", "DISK_SERVER",
            "-aem", destination, "-k", f"QueryRetrieveLevel={level}"]
    for keyword, value in keys.items():
        args += ["-k", f"{keyword}={value}"]
    out, err, code = await run_program(MOVESCU, args + ["127.0.0.1", str(server.port)])
    return MovescuRun(out + err, code)


class MovescuStorescpTests(unittest.TestCase):
    """DCMTK movescu asks the Disk-Server to move to DCMTK storescp."""

    timeout = 90
    skip = _need(MOVESCU, STORESCP)

    async def _storescp(self, *options: str):
        """A storescp (AE title DEST, bit-preserving) on a free port, listening; returns (server, folder)."""
        port = free_port()
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        server = DiskServer(self, {"dest": {"ae_title": "DEST", "host": "127.0.0.1", "port": port, "timeout": 20}})
        peer = spawn_peer(self, [STORESCP, "+B", "-aet", "DEST", "-od", folder, *options, str(port)], path=folder)
        if "--refuse" not in options:
            probe = await connect_when_listening(reactor, lambda: _connect(port, "DEST"), peer)
            await probe.release()
        else:
            with self.assertRaises(requestor.AssociationRejected):
                await connect_when_listening(reactor, lambda: _connect(port, "DEST"), peer)
        return server, folder, peer

    @deferred_test
    async def test_study_moved_byte_identical(self):
        """A STUDY-level move: storescp receives every instance with the stored data set bytes, and movescu
        sees pending responses and a final Success with 3 completed."""
        server, folder, peer = await self._storescp()
        paths = await server.fill()
        run = await movescu(server, "DEST", "STUDY", StudyInstanceUID=STUDY)
        self.assertEqual(run.code, 0, run.output)
        self.assertEqual(run.statuses, [0xFF00, 0xFF00, 0x0000], run.output)
        self.assertEqual([r["Remaining"] for r in run.responses], [2, 1, None])
        final = run.final
        self.assertEqual((final["Completed"], final["Failed"], final["Warning"]), (3, 0, 0))
        received = received_files(folder)
        self.assertEqual(sorted(received), sorted(paths), peer.text())
        for sop, path in paths.items():
            self.assertEqual(dataset_bytes(received[sop]), dataset_bytes(path), sop)
        self.assertEqual(server.archive.pins.counts, {})

    @deferred_test
    async def test_conversion_for_implicit_only_destination(self):
        """storescp accepting implicit VR little endian only (+xi) gets the series converted, each data set as
        pydicom writes it in that syntax."""
        server, folder, peer = await self._storescp("+xi")
        paths = await server.fill()
        run = await movescu(server, "DEST", "SERIES", StudyInstanceUID=STUDY, SeriesInstanceUID=SERIES_A)
        self.assertEqual(run.final["status"], 0x0000, run.output)
        self.assertEqual(run.final["Completed"], 2)
        received = received_files(folder)
        self.assertEqual(sorted(received), [f"{SERIES_A}.1", f"{SERIES_A}.2"], peer.text())
        for sop in received:
            self.assertEqual(str(dcmread(received[sop]).file_meta.TransferSyntaxUID), IMPLICIT_VR_LITTLE_ENDIAN)
            self.assertEqual(dataset_bytes(received[sop]), encode_dataset(dcmread(paths[sop]), IMPLICIT_VR_LITTLE_ENDIAN))

    @deferred_test
    async def test_unknown_destination(self):
        """A Move Destination that is no configured device: movescu reports A801, storescp gets nothing."""
        server, folder, peer = await self._storescp()
        await server.fill()
        run = await movescu(server, "NOBODY", "STUDY", StudyInstanceUID=STUDY)
        self.assertEqual(run.statuses, [0xA801], run.output)
        self.assertIn("move destination 'NOBODY' is unknown", run.output)
        self.assertEqual(os.listdir(folder), [])

    @deferred_test
    async def test_destination_refuses(self):
        """storescp --refuse rejects the sub-association: movescu gets a C000 failure with the reason."""
        server, folder, peer = await self._storescp("--refuse")
        await server.fill()
        run = await movescu(server, "DEST", "STUDY", StudyInstanceUID=STUDY)
        self.assertEqual(run.statuses, [0xC000], run.output)
        self.assertIn("association rejected", run.output)
        self.assertEqual((run.final["Completed"], run.final["Failed"]), (0, 3))
        self.assertEqual(os.listdir(folder), [])
        self.assertEqual(server.archive.pins.counts, {})


def _pynetdicom_destination(statuses: Dict[str, int]):
    """pynetdicom's storage SCP (AE PYDEST) on 127.0.0.1, port 0; returns (ae, port, received list)."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    received: List[dict] = []
    lock = threading.Lock()

    def on_store(event):
        request = event.request
        with lock:
            received.append({
                "sop": str(request.AffectedSOPInstanceUID),
                "data": request.DataSet.getvalue(),
                "syntax": str(event.context.transfer_syntax),
                "originator": request.MoveOriginatorApplicationEntityTitle,
                "originator_id": request.MoveOriginatorMessageID,
                "calling": event.assoc.requestor.ae_title,
            })
        return statuses.get(str(request.AffectedSOPInstanceUID), 0x0000)

    ae = AE(ae_title="PYDEST")
    ae.supported_contexts = AllStoragePresentationContexts
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    return ae, server.server_address[1], received


def _pynetdicom_move(port: int, destination: str, identifier: Dataset) -> List[dict]:
    """pynetdicom's C-MOVE SCU (run in a thread): every response's status, counts and identifier."""
    from pynetdicom import AE

    ae = AE(ae_title="PYMOVESCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(STUDY_ROOT_MOVE, [EXPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN])
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="DISK_SERVER")
        if not assoc.is_established:
            raise AssertionError("pynetdicom's association was not established")
        keep_pynetdicom_reactor_off_responses(assoc)
        responses = []
        for status, ds in assoc.send_c_move(identifier, destination, STUDY_ROOT_MOVE):
            responses.append({
                "status": getattr(status, "Status", None),
                "completed": status.get("NumberOfCompletedSuboperations"),
                "failed": status.get("NumberOfFailedSuboperations"),
                "warning": status.get("NumberOfWarningSuboperations"),
                "remaining": status.get("NumberOfRemainingSuboperations"),
                "comment": status.get("ErrorComment"),
                "failed_uids": (None if ds is None or "FailedSOPInstanceUIDList" not in ds
                                else list(ds.FailedSOPInstanceUIDList)
                                if ds["FailedSOPInstanceUIDList"].VM > 1 else [ds.FailedSOPInstanceUIDList]),
            })
        assoc.release()
        return responses
    finally:
        ae.shutdown()


class PynetdicomMoveTests(unittest.TestCase):
    """pynetdicom as C-MOVE SCU, pynetdicom as the move destination."""

    timeout = 90
    skip = None if pynetdicom is not None else "pynetdicom is not installed"

    def _destination(self, statuses=None):
        ae, port, received = _pynetdicom_destination(statuses or {})
        self.addCleanup(threads.deferToThread, ae.shutdown)
        return port, received

    @deferred_test
    async def test_study_moved(self):
        """Pending responses with counts, final Success; the destination gets every data set byte for byte
        (negotiated in its stored syntax) with the Move Originator's AE title and Message ID."""
        port, received = self._destination()
        server = DiskServer(self, {"py": {"ae_title": "PYDEST", "host": "127.0.0.1", "port": port}})
        paths = await server.fill()
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = STUDY
        responses = await threads.deferToThread(_pynetdicom_move, server.port, "PYDEST", identifier)
        self.assertEqual([r["status"] for r in responses], [0xFF00, 0xFF00, 0x0000])
        self.assertEqual([r["remaining"] for r in responses[:2]], [2, 1])
        self.assertEqual((responses[-1]["completed"], responses[-1]["failed"], responses[-1]["warning"]), (3, 0, 0))
        self.assertEqual([item["sop"] for item in received], list(paths))
        for item in received:
            self.assertEqual(item["data"], dataset_bytes(paths[item["sop"]]), item["sop"])
            self.assertEqual(item["syntax"], EXPLICIT_VR_LITTLE_ENDIAN)
            self.assertEqual((item["originator"], item["calling"]), ("PYMOVESCU", "DISK_SERVER"))
            self.assertIsInstance(item["originator_id"], int)
        self.assertEqual(server.archive.pins.counts, {})

    @deferred_test
    async def test_failed_store_ends_move(self):
        """The destination answers the second C-STORE with A700: pynetdicom gets A702, the counts, and the
        Failed SOP Instance UID List; the third instance is never sent."""
        port, received = self._destination({f"{SERIES_A}.2": 0xA700})
        server = DiskServer(self, {"py": {"ae_title": "PYDEST", "host": "127.0.0.1", "port": port}})
        await server.fill()
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "IMAGE"
        identifier.StudyInstanceUID = STUDY
        identifier.SeriesInstanceUID = SERIES_A
        identifier.SOPInstanceUID = [f"{SERIES_A}.1", f"{SERIES_A}.2"]
        responses = await threads.deferToThread(_pynetdicom_move, server.port, "PYDEST", identifier)
        final = responses[-1]
        self.assertEqual(final["status"], 0xA702)
        self.assertEqual((final["completed"], final["failed"], final["warning"]), (1, 1, 0))
        self.assertEqual(final["failed_uids"], [f"{SERIES_A}.2"])
        self.assertIn("0xA700", final["comment"])
        self.assertEqual([item["sop"] for item in received], [f"{SERIES_A}.1", f"{SERIES_A}.2"])

    @deferred_test
    async def test_unknown_destination(self):
        """A destination pynetdicom names but the Disk-Server does not know: A801."""
        port, received = self._destination()
        server = DiskServer(self, {"py": {"ae_title": "PYDEST", "host": "127.0.0.1", "port": port}})
        await server.fill()
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = STUDY
        responses = await threads.deferToThread(_pynetdicom_move, server.port, "ELSEWHERE", identifier)
        self.assertEqual([r["status"] for r in responses], [0xA801])
        self.assertEqual(received, [])
