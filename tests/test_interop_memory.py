"""The Memory-Server's C-STORE SCP against real peers on 127.0.0.1: pydicom's storage objects sent by DCMTK's
storescu and by pynetdicom are held in memory with exactly the data set bytes that went over the wire."""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Dict, List

from twisted.internet import reactor
from twisted.trial import unittest

from appliance import config as configuration
from appliance.ae.listeners import acceptor_factory, memory_server_services, memory_sink
from appliance.dicom.uids import EXPLICIT_VR_LITTLE_ENDIAN
from appliance.memory.store import OBJECT_OVERHEAD, MemoryStore
from appliance.net.threads import ThreadPoolService

from .support import Listening, deferred_test
from .support_data import make_dataset, write_part10
from .test_interop_storage import (
    CorpusCheck,
    WireRecorder,
    _need_storescu,
    pynetdicom,
    pynetdicom_corpus,
    storescu,
    storescu_corpus,
)


class MemoryServer:
    """The Memory-Server AE over a fresh MemoryStore, listening on 127.0.0.1 port 0 for one test."""

    def __init__(self, testcase: unittest.TestCase, **settings) -> None:
        self.root = os.path.abspath(testcase.mktemp())
        os.makedirs(self.root)
        table = {"interface": "127.0.0.1", "port": 0, "timeout": 20}
        table.update(settings)
        self.config = configuration.parse({"appliance": {"data_dir": self.root}, "memory_server": table},
                                          os.path.join(self.root, "appliance.toml"))
        self.check = ThreadPoolService(reactor, "test-memory-check", max_threads=2)
        self.check.startService()
        testcase.addCleanup(self.check.stopService)
        self.store = MemoryStore(self.config.memory.memory_limit, reactor, self.config.memory.retention)
        self.factory = acceptor_factory(self.config.memory_server, self.config,
                                        memory_server_services(self.config, memory_sink(self.config, self.store, self.check.runner)), reactor)
        self.wire = WireRecorder(self.factory)
        self.listening = Listening(testcase, self.factory, reactor)
        self.port = self.listening.number
        #: SOP Instance UID -> the data set bytes kept at each put of it, in order
        self.committed: Dict[str, List[bytes]] = defaultdict(list)
        put = self.store.put

        def record(metadata, transfer_syntax, data):
            self.committed[metadata.sop_instance_uid].append(bytes(data))
            return put(metadata, transfer_syntax, data)

        self.store.put = record

    def messages(self):
        return self.wire.messages()

    def held(self, sop_uid: str):
        for study in self.store.studies.values():
            for held in study.objects():
                if held.metadata.sop_instance_uid == sop_uid:
                    return held
        return None


class MemoryCorpusCheck(CorpusCheck):
    def check_kept(self) -> None:
        """The store holds the last version of each SOP instance sent, in its transfer syntax, counted exactly."""
        test, store = self.testcase, self.server.store
        for sop_uid, (item, expected) in self.last.items():
            held = self.server.held(sop_uid)
            test.assertIsNotNone(held, item.name)
            test.assertEqual((held.metadata.sop_class_uid, held.transfer_syntax), (item.sop_class, item.transfer_syntax),
                             item.name)
            test.assertEqual(bytes(held.data), expected, item.name)
        held = [obj for study in store.studies.values() for obj in study.objects()]
        test.assertEqual(len(held), len(self.last))
        test.assertEqual(store.size, sum(len(obj.data) + OBJECT_OVERHEAD for obj in held))
        test.assertEqual(store.reserved, 0)


class StorescuIntoMemoryTests(unittest.TestCase):
    timeout = 120
    skip = _need_storescu()

    @deferred_test
    async def test_pydicom_corpus(self):
        """Every storage object of pydicom's test files storescu sends is answered as by the Disk-Server and
        held with exactly the data set bytes sent (coerced where the statement says)."""
        server = MemoryServer(self)
        await storescu_corpus(self, server, MemoryCorpusCheck(self, server, "storescu"), called="MEMORY_SERVER")

    @deferred_test
    async def test_memory_limit_drops_oldest_study(self):
        """Six studies of 300 KiB into a 1 MiB memory_limit, one storescu run: every C-STORE succeeds, the
        oldest studies are dropped first, the newest three are held, within the limit."""
        server = MemoryServer(self, memory_limit="1 MiB")
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        files = []
        for number in range(6):
            ds = make_dataset(study=f"1.2.9.{number}", series=f"1.2.9.{number}.1", sop=f"1.2.9.{number}.1.1",
                              pixels=bytes(300 << 10))
            files.append(write_part10(os.path.join(folder, f"{number}.dcm"), ds, EXPLICIT_VR_LITTLE_ENDIAN))
        run = await storescu(server, files, called="MEMORY_SERVER")
        self.assertEqual(run.code, 0, run.tail())
        self.assertEqual([status for _, status in run.results], [0] * 6, run.tail())
        self.assertEqual(sorted(server.store.studies), ["1.2.9.3", "1.2.9.4", "1.2.9.5"])
        self.assertEqual([uid for uid, _ in server.store.dropped], ["1.2.9.0", "1.2.9.1", "1.2.9.2"])
        self.assertLessEqual(server.store.size, server.store.limit)
        self.assertEqual(server.store.reserved, 0)


class PynetdicomIntoMemoryTests(unittest.TestCase):
    timeout = 120
    skip = None if pynetdicom is not None else "pynetdicom is not installed"

    @deferred_test
    async def test_pydicom_corpus(self):
        server = MemoryServer(self)
        await pynetdicom_corpus(self, server, MemoryCorpusCheck(self, server, "pynetdicom"), called="MEMORY_SERVER")
