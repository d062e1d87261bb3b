"""Our C-GET SCU (Association.get) against pynetdicom's Study Root C-GET SCP on 127.0.0.1, port 0.

pynetdicom runs in its own threads, its EVT_C_GET handler yielding the
study's data sets; our requestor proposes what a C-GET load proposes
(appliance.dicom.negotiation.get_proposal) through connect_device() to a
device with ``retrieve = "get"``, and keeps what comes back in a
MemoryStore through the Memory-Server's sink.  Nothing sleeps: every wait is
a Deferred, bounded by the device's timeout.
"""

from __future__ import annotations

import os
import threading
from typing import List, Optional

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from twisted.internet import reactor, threads
from twisted.trial import unittest

from appliance.compat import decode_dataset
from appliance.config import DeviceConfig
from appliance.dicom.negotiation import get_proposal
from appliance.dicom.uids import (
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    IMPLICIT_VR_LITTLE_ENDIAN,
    STUDY_ROOT_GET,
)
from appliance.memory.sink import MemorySink
from appliance.memory.store import MemoryStore
from appliance.net import requestor
from appliance.net.threads import synchronous_runner

from .support import connect_when_listening, deferred_test, free_port, run_program, spawn_peer, write_file
from .support_data import SECONDARY_CAPTURE, make_dataset, write_part10

try:
    import pynetdicom
except ImportError:
    pynetdicom = None

STUDY = "1.2.826.0.1.3680043.9.7201"
SERIES = f"{STUDY}.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
JPEG_2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
DCMQRSCP = "/usr/bin/dcmqrscp"
DCMQRIDX = "/usr/bin/dcmqridx"


def in_study(ds: Dataset, series: str = SERIES) -> Dataset:
    """``ds`` moved into STUDY (its own SOP Instance UID, pixel data and transfer syntax kept)."""
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = series
    return ds


def generated(number: int, size: int = 4096, sop_class: str = SECONDARY_CAPTURE) -> Dataset:
    ds = make_dataset(study=STUDY, series=f"{STUDY}.2", sop=f"{STUDY}.2.{number}", sop_class=sop_class,
                      modality="OT", pixels=bytes((number * 7 + i) % 251 for i in range(size)))
    ds.InstanceNumber = number
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = EXPLICIT_VR_LITTLE_ENDIAN
    return ds


def pydicom_study() -> List[Dataset]:
    """Three objects: pydicom's CT_small (explicit VR little endian), MR_small_jp2klossless (JPEG 2000 lossless:
    it must come on our compressed MR context, as it is) and a generated Secondary Capture."""
    return [
        in_study(dcmread(get_testdata_file("CT_small.dcm"))),
        in_study(dcmread(get_testdata_file("MR_small_jp2klossless.dcm"))),
        generated(3),
    ]


class GetSCP:
    """pynetdicom's AE PYGETSCP on 127.0.0.1, port 0: Study Root GET, and CT, MR, SC storage as SCU by role
    selection (``roles``: SOP class -> (scu_role, scp_role) as pynetdicom's add_supported_context takes them)."""

    def __init__(self, testcase: unittest.TestCase, datasets: List[Dataset], roles: Optional[dict] = None) -> None:
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

        self.datasets = datasets
        self.identifiers: List[Dataset] = []
        self.cancelled = threading.Event()
        roles = roles if roles is not None else {}
        ae = AE(ae_title="PYGETSCP")
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
        syntaxes = [EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN, JPEG_2000_LOSSLESS]
        for sop_class in (CT_IMAGE_STORAGE, MR_IMAGE_STORAGE, SECONDARY_CAPTURE):
            scu_role, scp_role = roles.get(sop_class, (True, True))
            ae.add_supported_context(sop_class, syntaxes, scu_role=scu_role, scp_role=scp_role)
        server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_GET, self._get)])
        testcase.addCleanup(threads.deferToThread, ae.shutdown)
        self.port = server.server_address[1]
        self.device = DeviceConfig(name="pyget", ae_title="PYGETSCP", host="127.0.0.1", port=self.port,
                                   max_pdu=16384, timeout=10.0, retrieve="get")

    def _get(self, event):
        """pynetdicom's thread: the number of sub-operations, then each data set as a pending status."""
        self.identifiers.append(event.identifier)
        yield len(self.datasets)
        for ds in self.datasets:
            if event.is_cancelled:
                self.cancelled.set()
                yield 0xFE00, None
                return
            yield 0xFF00, ds


def study_identifier() -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = STUDY
    return identifier


def sent_bytes(ds: Dataset) -> bytes:
    """The data set as pynetdicom encodes it for a C-STORE-RQ (explicit VR little endian, compressed or not)."""
    from pynetdicom.dsutils import encode

    return encode(ds, False, True)


class PynetdicomGetTests(unittest.TestCase):
    """A Memory-Manager's C-GET load, against pynetdicom's C-GET SCP."""

    timeout = 60
    skip = None if pynetdicom is not None else "pynetdicom is not installed (it is in .venv, from PyPI)"

    def setUp(self):
        self.store = MemoryStore(64 * 1024 * 1024, reactor)
        self.sink = MemorySink(self.store, synchronous_runner)

    async def connect(self, scp: GetSCP) -> requestor.Association:
        contexts, roles = get_proposal()
        return await requestor.connect_device(
            reactor, scp.device, "MANAGER", contexts, roles=roles,
            implementation_class_uid=IMPLEMENTATION_CLASS_UID, implementation_version_name=IMPLEMENTATION_VERSION_NAME,
        )

    async def get(self, scp: GetSCP):
        association = await self.connect(scp)
        stream = association.get(study_identifier(), self.sink)
        responses = [response async for response in stream]
        await association.release()
        return association, stream, responses

    @deferred_test
    async def test_study_of_three(self):
        """Three objects kept exactly as pynetdicom sent them (the JPEG 2000 one still compressed, on our compressed
        MR context); pynetdicom got our identifier; final 0000 with completed 3."""
        datasets = pydicom_study()
        scp = GetSCP(self, datasets)
        association, stream, responses = await self.get(scp)
        accepted = {(c.abstract_syntax, c.transfer_syntax) for c in association.negotiated.contexts
                    if c.accepted and c.requestor_scp}
        self.assertEqual(accepted, {(CT_IMAGE_STORAGE, EXPLICIT_VR_LITTLE_ENDIAN),
                                    (MR_IMAGE_STORAGE, EXPLICIT_VR_LITTLE_ENDIAN),
                                    (MR_IMAGE_STORAGE, JPEG_2000_LOSSLESS),
                                    (CT_IMAGE_STORAGE, JPEG_2000_LOSSLESS),
                                    (SECONDARY_CAPTURE, EXPLICIT_VR_LITTLE_ENDIAN),
                                    (SECONDARY_CAPTURE, JPEG_2000_LOSSLESS)})
        self.assertEqual([ds.StudyInstanceUID for ds in scp.identifiers], [STUDY])
        self.assertEqual([ds.QueryRetrieveLevel for ds in scp.identifiers], ["STUDY"])

        final = responses[-1]
        self.assertEqual(final.status, 0x0000)
        self.assertEqual((final.command.NumberOfCompletedSuboperations, final.command.NumberOfFailedSuboperations,
                          final.command.NumberOfWarningSuboperations), (3, 0, 0))
        # a pending response after each sub-operation, with the counts so far
        self.assertEqual([(r.status, r.command.NumberOfRemainingSuboperations, r.command.NumberOfCompletedSuboperations)
                          for r in responses[:-1]], [(0xFF00, 2, 1), (0xFF00, 1, 2), (0xFF00, 0, 3)])
        self.assertEqual(stream.received, [(ds.SOPInstanceUID, 0x0000) for ds in datasets])

        for ds in datasets:
            held = self.store.find(STUDY, ds.SeriesInstanceUID, ds.SOPInstanceUID)
            self.assertIsNotNone(held, ds.SOPInstanceUID)
            self.assertEqual(held.transfer_syntax, ds.file_meta.TransferSyntaxUID)
            self.assertEqual(held.data, sent_bytes(ds))
            decoded = decode_dataset(held.data, held.transfer_syntax)
            self.assertEqual(decoded.SOPInstanceUID, ds.SOPInstanceUID)
            self.assertEqual(decoded.PixelData, ds.PixelData)
        self.assertEqual(self.store.studies[STUDY].count, 3)
        self.assertEqual(self.store.reserved, 0)

    @deferred_test
    async def test_one_refused_by_the_sink(self):
        """The memory store has no room for the third object: we answer A700, pynetdicom counts it failed and
        ends with B000, the counts and its Failed SOP Instance UID List; the other two are kept."""
        datasets = [generated(1), generated(2), generated(3, size=256 * 1024)]
        self.store.limit = 128 * 1024
        self.store.pin(STUDY)  # as a load does: the study is never dropped to make room for itself
        scp = GetSCP(self, datasets)
        association, stream, responses = await self.get(scp)
        final = responses[-1]
        self.assertEqual(final.status, 0xB000)
        self.assertEqual((final.command.NumberOfCompletedSuboperations, final.command.NumberOfFailedSuboperations,
                          final.command.NumberOfWarningSuboperations), (2, 1, 0))
        failed = decode_dataset(final.data, IMPLICIT_VR_LITTLE_ENDIAN)
        self.assertEqual(failed.FailedSOPInstanceUIDList, datasets[2].SOPInstanceUID)
        self.assertEqual(stream.received, [(datasets[0].SOPInstanceUID, 0x0000), (datasets[1].SOPInstanceUID, 0x0000),
                                           (datasets[2].SOPInstanceUID, 0xA700)])
        kept = sorted(held.metadata.sop_instance_uid for held in self.store.studies[STUDY].objects())
        self.assertEqual(kept, sorted(ds.SOPInstanceUID for ds in datasets[:2]))
        self.assertEqual(self.store.reserved, 0)

    @deferred_test
    async def test_role_selection_ignored_for_one_class(self):
        """pynetdicom keeps the default roles for MR (it does not answer the item): our MR contexts say no C-STORE
        can be received on them, pynetdicom cannot send the MR image and counts it failed; the others come."""
        datasets = pydicom_study()
        scp = GetSCP(self, datasets, roles={MR_IMAGE_STORAGE: (None, None)})
        association, stream, responses = await self.get(scp)
        mr = [c for c in association.negotiated.contexts if c.abstract_syntax == MR_IMAGE_STORAGE and c.accepted]
        self.assertTrue(mr)
        for context in mr:
            self.assertFalse(context.requestor_scp)
            self.assertIn("did not answer our role selection", context.reason)
        final = responses[-1]
        self.assertEqual(final.status, 0xB000)
        self.assertEqual((final.command.NumberOfCompletedSuboperations, final.command.NumberOfFailedSuboperations),
                         (2, 1))
        self.assertEqual(decode_dataset(final.data, IMPLICIT_VR_LITTLE_ENDIAN).FailedSOPInstanceUIDList,
                         datasets[1].SOPInstanceUID)
        self.assertEqual([uid for uid, _ in stream.received], [datasets[0].SOPInstanceUID, datasets[2].SOPInstanceUID])
        self.assertIsNone(self.store.find(STUDY, SERIES, datasets[1].SOPInstanceUID))

    @deferred_test
    async def test_scp_role_refused_for_every_class(self):
        """pynetdicom refuses our SCP role for every storage class: get() says so at once and sends nothing; the
        association is still usable and released."""
        refused = {uid: (False, False) for uid in (CT_IMAGE_STORAGE, MR_IMAGE_STORAGE, SECONDARY_CAPTURE)}
        scp = GetSCP(self, pydicom_study(), roles=refused)
        association = await self.connect(scp)
        self.assertFalse(any(c.requestor_scp for c in association.negotiated.contexts))
        self.assertIsNotNone(association.negotiated.context_for(STUDY_ROOT_GET))
        error = self.assertRaises(requestor.AssociationError, association.get, study_identifier(), self.sink)
        self.assertIn("agreed to our SCP role on no presentation context", str(error))
        self.assertTrue(association.is_open)
        await association.release()
        self.assertEqual(scp.identifiers, [])
        self.assertEqual(self.store.studies, {})


def _need(*programs: str) -> Optional[str]:
    missing = [program for program in programs if not os.access(program, os.X_OK)]
    return f"DCMTK not installed ({', '.join(missing)} missing)" if missing else None


class DcmqrscpGetTests(unittest.TestCase):
    """The same load against DCMTK's dcmqrscp (a subprocess), on both Pythons: its C-GET SCP answers our role
    selection and stores the study into us."""

    timeout = 60
    skip = _need(DCMQRSCP, DCMQRIDX)

    @deferred_test
    async def test_study_of_three(self):
        """Three objects indexed by dcmqridx come back whole into the memory store; final 0000, completed 3."""
        datasets = [generated(number, size=2048 * number) for number in (1, 2, 3)]
        folder = os.path.abspath(self.mktemp())
        storage, files = os.path.join(folder, "QRSCP"), os.path.join(folder, "files")
        os.makedirs(storage)
        os.makedirs(files)
        paths = [write_part10(os.path.join(files, f"{ds.SOPInstanceUID}.dcm"), ds, EXPLICIT_VR_LITTLE_ENDIAN)
                 for ds in datasets]
        out, err, code = await run_program(DCMQRIDX, [storage, *paths])
        self.assertEqual(code, 0, out + err)
        port = free_port()
        config = write_file(self, "NetworkTCPPort = 104\nMaxPDUSize = 16384\nMaxAssociations = 4\n"
                                  "HostTable BEGIN\nHostTable END\nVendorTable BEGIN\nVendorTable END\n"
                                  f"AETable BEGIN\nQRSCP {storage} RW (10, 10mb) ANY\nAETable END\n",
                            name="dcmqrscp.cfg")
        # --fork (the default): dcmqrscp 3.6.7's --single-process crashes after an association
        peer = spawn_peer(self, [DCMQRSCP, "-c", config, str(port)], path=folder)
        device = DeviceConfig(name="qrscp", ae_title="QRSCP", host="127.0.0.1", port=port, max_pdu=16384,
                              timeout=10.0, retrieve="get")
        contexts, roles = get_proposal()

        def connect():
            return requestor.connect_device(reactor, device, "MANAGER", contexts, roles=roles,
                                            implementation_class_uid=IMPLEMENTATION_CLASS_UID,
                                            implementation_version_name=IMPLEMENTATION_VERSION_NAME)

        association = await connect_when_listening(reactor, connect, peer)
        store = MemoryStore(64 * 1024 * 1024, reactor)
        stream = association.get(study_identifier(), MemorySink(store, synchronous_runner))
        responses = [response async for response in stream]
        await association.release()
        final = responses[-1]
        self.assertEqual(final.status, 0x0000, peer.text())
        self.assertEqual(final.command.NumberOfCompletedSuboperations, 3)
        self.assertEqual(sorted(uid for uid, status in stream.received if status == 0),
                         sorted(ds.SOPInstanceUID for ds in datasets))
        for ds in datasets:
            held = store.find(STUDY, ds.SeriesInstanceUID, ds.SOPInstanceUID)
            self.assertIsNotNone(held, ds.SOPInstanceUID)
            decoded = decode_dataset(held.data, held.transfer_syntax)
            self.assertEqual((decoded.SOPInstanceUID, decoded.PixelData), (ds.SOPInstanceUID, ds.PixelData))
