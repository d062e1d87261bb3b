"""The Memory-Server: its store (bounded, least recently used studies dropped, pins, retention) and its C-STORE
SCP into that store, driven in memory."""

from __future__ import annotations

import os
import zlib

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from appliance import config as configuration
from appliance.ae.listeners import acceptor_factory, memory_server_services, memory_sink
from appliance.dataset.checks import Kept, ObjectDescription, Refusal, Refused
from appliance.dataset.deflate import DEFLATED
from appliance.dataset.metadata import extract
from appliance.dicom import dimse as D
from appliance.dicom.uids import EXPLICIT_VR_BIG_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN
from appliance.interfaces import ILoadTracker
from appliance.memory.sink import MemorySink
from appliance.memory.store import OBJECT_OVERHEAD, MemoryStore, NoRoom
from appliance.net.threads import synchronous_runner
from appliance.tap import MemoryService

from .support_data import CT_IMAGE_STORAGE, encode_dataset, make_dataset
from .support_scu import MemorySCU

KIB = 1024


def metadata(study: str, series: str = "1.9.1", sop: str = "1.9.1.1"):
    return extract(make_dataset(study=study, series=series, sop=sop))


class MemoryStoreTests(SynchronousTestCase):
    """The store alone: accounting, least recently used studies dropped for room, pins, retention."""

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        self.store = MemoryStore(limit=100 * KIB, clock=self.clock)

    def put(self, study: str, size: int, sop: str = None, series: str = "1.9.1") -> None:
        """Keep an object of ``size`` data set bytes, reserving it first as the sink does."""
        sop = sop or f"{study}.{len(list(self.store.studies.get(study).objects())) if study in self.store.studies else 0}"
        self.store.reserve(size + OBJECT_OVERHEAD)
        self.store.put(metadata(study, series, sop), EXPLICIT_VR_LITTLE_ENDIAN, bytes(size))
        self.store.release(size + OBJECT_OVERHEAD)

    def test_sizes_counted_in_bytes_held(self):
        self.put("1.1", 10 * KIB)
        self.put("1.1", 5 * KIB, series="1.9.2")
        self.put("1.2", 1 * KIB)
        self.assertEqual(self.store.size, 16 * KIB + 3 * OBJECT_OVERHEAD)
        self.assertEqual(self.store.studies["1.1"].size, 15 * KIB + 2 * OBJECT_OVERHEAD)
        self.assertEqual(self.store.studies["1.1"].count, 2)
        self.assertEqual(self.store.reserved, 0)

    def test_replacing_an_instance_counts_once(self):
        self.put("1.1", 10 * KIB, sop="1.1.7")
        self.put("1.1", 4 * KIB, sop="1.1.7")
        self.assertEqual(self.store.size, 4 * KIB + OBJECT_OVERHEAD)
        self.assertEqual(self.store.studies["1.1"].count, 1)
        self.assertEqual(len(self.store.find("1.1").data), 4 * KIB)

    def test_least_recently_used_study_dropped_for_room(self):
        """Studies are dropped oldest use first, only as many as needed; a touched study counts as recent."""
        for index, study in enumerate(("1.1", "1.2", "1.3")):
            self.clock.advance(10)
            self.put(study, 25 * KIB)
        self.clock.advance(10)
        self.store.touch("1.1")  # now 1.2 is the least recently used
        self.put("1.4", 25 * KIB)
        self.assertEqual(sorted(self.store.studies), ["1.1", "1.3", "1.4"])
        self.assertEqual(self.store.dropped, [("1.2", "dropped for room (least recently used)")])
        self.assertLessEqual(self.store.size, self.store.limit)

    def test_pinned_study_never_dropped(self):
        self.put("1.1", 50 * KIB)
        self.clock.advance(10)
        self.put("1.2", 20 * KIB)
        self.store.pin("1.1")
        self.clock.advance(10)
        self.put("1.3", 10 * KIB)  # fits without dropping
        with self.assertRaises(NoRoom) as raised:
            self.store.reserve(50 * KIB)  # 1.2 and 1.3 together are not enough; 1.1 is pinned
        self.assertIn("memory_limit=102400", str(raised.exception))
        self.assertEqual(sorted(self.store.studies), ["1.1", "1.2", "1.3"], "nothing dropped when it cannot help")
        self.assertEqual(self.store.reserved, 0)
        self.store.unpin("1.1")
        self.store.reserve(50 * KIB)
        self.assertNotIn("1.1", self.store.studies)

    def test_reservations_count_toward_the_limit(self):
        """Bytes promised to objects still arriving are room already taken."""
        self.store.reserve(90 * KIB)
        with self.assertRaises(NoRoom):
            self.store.reserve(20 * KIB)
        self.store.release(90 * KIB)
        self.store.reserve(20 * KIB)
        self.assertEqual(self.store.reserved, 20 * KIB)

    def test_pin_of_a_study_not_held_yet(self):
        """A load pins its study before anything arrives; unpinned with nothing received, it is gone."""
        self.store.pin("1.5")
        self.assertIsNone(self.store.find("1.5"))
        self.store.unpin("1.5")
        self.assertNotIn("1.5", self.store.studies)
        self.store.pin("1.6")
        self.put("1.6", KIB)
        self.store.unpin("1.6")
        self.assertIsNotNone(self.store.find("1.6"))

    def test_retention_drops_unused_studies(self):
        store = MemoryStore(limit=100 * KIB, clock=self.clock, retention=3600)
        self.store = store
        self.put("1.1", KIB)
        self.clock.advance(1800)
        self.put("1.2", KIB)
        self.clock.advance(1801)
        store.expire()
        self.assertEqual(sorted(store.studies), ["1.2"])
        self.assertEqual(store.dropped, [("1.1", "past its retention (3600 s unused)")])
        store.pin("1.2")
        self.clock.advance(7200)
        store.expire()
        self.assertIn("1.2", store.studies, "a pinned study outlives its retention")

    def test_find_and_drop(self):
        self.put("1.1", KIB, sop="1.1.1", series="1.9.1")
        self.put("1.1", KIB, sop="1.1.2", series="1.9.2")
        self.assertEqual(self.store.find("1.1", "1.9.2", "1.1.2").metadata.sop_instance_uid, "1.1.2")
        self.assertIsNone(self.store.find("1.1", "1.9.2", "1.1.1"))
        self.assertIsNone(self.store.find("1.7"))
        self.assertEqual(self.store.drop("1.1"), 2 * (KIB + OBJECT_OVERHEAD))
        self.assertEqual((self.store.size, self.store.drop("1.1")), (0, 0))

    def test_remove_last_instance_removes_study(self):
        self.put("1.1", KIB, sop="1.1.1")
        self.assertTrue(self.store.remove_instance("1.1.1"))
        self.assertEqual((self.store.studies, self.store.size), ({}, 0))
        self.assertFalse(self.store.remove_instance("1.1.1"))


class MemoryServerHarness:
    """An in-memory Memory-Server over a real MemoryStore."""

    def __init__(self, test, memory=None, loads=None):
        self.test = test
        root = test.mktemp()
        self.clock = Clock()
        self.clock.advance(1000)
        self.config = configuration.parse({"appliance": {"data_dir": root}, "memory_server": memory or {}},
                                          os.path.join(root, "x.toml"))
        self.store = MemoryStore(self.config.memory.memory_limit, self.clock, self.config.memory.retention)
        services = memory_server_services(self.config, memory_sink(self.config, self.store, synchronous_runner, loads))
        self.factory = acceptor_factory(self.config.memory_server, self.config, services, self.clock)
        self.message_id = 0

    def store_object(self, data: bytes, sop: str, syntax: str = EXPLICIT_VR_LITTLE_ENDIAN, sop_class=CT_IMAGE_STORAGE,
                     max_pdu: int = 16384, **command_elements) -> D.Command:
        scu = MemorySCU(self.test, self.factory, calling="ARCHIVE", called="MEMORY_SERVER", max_pdu=max_pdu)
        accept = scu.associate([(sop_class, (syntax,))])
        self.test.assertEqual(accept.presentation_contexts[0].result, 0)
        self.message_id += 1
        command = D.Command(CommandField=D.CommandField.C_STORE_RQ, MessageID=self.message_id, Priority=0,
                            AffectedSOPClassUID=sop_class, AffectedSOPInstanceUID=sop, **command_elements)
        (response,) = scu.request(command, data)
        scu.release()
        return response.command


class MemoryServerStoreTests(SynchronousTestCase):
    """C-STORE into memory: what is kept, and what each refusal is answered with."""

    def setUp(self):
        self.harness = MemoryServerHarness(self, {"memory_limit": "1 MiB"})
        self.store = self.harness.store

    def test_kept_as_received_in_each_uncompressed_syntax(self):
        for index, syntax in enumerate((IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN)):
            sop = f"1.2.3.{index}"
            data = encode_dataset(make_dataset(sop=sop), syntax)
            response = self.harness.store_object(data, sop, syntax)
            self.assertEqual((response.Status, response.AffectedSOPInstanceUID), (0, sop))
            held = self.store.find("1.2.826.0.1.1", "1.2.826.0.1.1.1", sop)
            self.assertEqual((held.data, held.transfer_syntax), (data, syntax))
            self.assertEqual(held.metadata.patient_name, "Test^Patient")
        self.assertEqual(self.store.size, sum(len(h.data) + OBJECT_OVERHEAD for h in self.store.studies[
            "1.2.826.0.1.1"].objects()))
        self.assertEqual(self.store.reserved, 0)

    def test_an_image_in_one_pdu(self):
        """The Memory-Server announces a MiB: a 0.5 MB image comes in one P-DATA-TF PDU."""
        harness = MemoryServerHarness(self)
        self.assertEqual(harness.config.memory_server.max_pdu, 1 << 20)
        data = encode_dataset(make_dataset(sop="1.2.3.9", pixels=bytes(512 * KIB)), EXPLICIT_VR_LITTLE_ENDIAN)
        self.assertEqual(len(list(D.fragment(1, False, data, 1 << 20))), 1)
        self.assertEqual(harness.store_object(data, "1.2.3.9", max_pdu=1 << 20).Status, 0)
        self.assertEqual(harness.store.find("1.2.826.0.1.1", "1.2.826.0.1.1.1", "1.2.3.9").data, data)

    def test_coercion_answered_b000_and_applied_to_the_held_bytes(self):
        ds = make_dataset(sop="1.2.4.1", pixels=bytes(range(32)), bits_allocated=8)
        ds["PixelData"].VR = "OW"
        response = self.harness.store_object(encode_dataset(ds, EXPLICIT_VR_LITTLE_ENDIAN), "1.2.4.1")
        self.assertEqual(response.Status, 0xB000)
        self.assertIn("OW to OB", response.ErrorComment)
        held = self.store.find("1.2.826.0.1.1", "1.2.826.0.1.1.1", "1.2.4.1")
        self.assertIn(b"\xe0\x7f\x10\x00OB\x00\x00", held.data)

    def test_uid_mismatch_a900(self):
        data = encode_dataset(make_dataset(sop="1.2.5.1"), EXPLICIT_VR_LITTLE_ENDIAN)
        response = self.harness.store_object(data, "1.2.5.2")
        self.assertEqual(response.Status, 0xA900)
        self.assertEqual((self.store.studies, self.store.size, self.store.reserved), ({}, 0, 0))

    def test_garbage_c000(self):
        response = self.harness.store_object(b"\x08\x00\x16\x00\xff\xff\xff\x7fxx", "1.2.6.1")
        self.assertEqual(response.Status, 0xC000)
        self.assertTrue(response.ErrorComment)
        self.assertEqual((self.store.studies, self.store.reserved), ({}, 0))

    def test_deflated_kept_deflated(self):
        plain = encode_dataset(make_dataset(sop="1.2.7.1"), EXPLICIT_VR_LITTLE_ENDIAN)
        packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = packer.compress(plain) + packer.flush()
        response = self.harness.store_object(data, "1.2.7.1", DEFLATED)
        self.assertEqual(response.Status, 0)
        held = self.store.find("1.2.826.0.1.1", "1.2.826.0.1.1.1", "1.2.7.1")
        self.assertEqual((held.data, held.transfer_syntax), (data, DEFLATED))

    def test_deflated_garbage_and_bomb(self):
        """A deflated data set that is no deflate stream: C000; one inflating past memory_limit: A700 naming it."""
        response = self.harness.store_object(b"\xff\xfe not deflate at all", "1.2.7.2", DEFLATED)
        self.assertEqual(response.Status, 0xC000)
        packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        plain = encode_dataset(make_dataset(sop="1.2.7.3", pixels=bytes(2 << 20)), EXPLICIT_VR_LITTLE_ENDIAN)
        bomb = packer.compress(plain) + packer.flush()
        self.assertLess(len(bomb), 64 << 10)
        response = self.harness.store_object(bomb, "1.2.7.3", DEFLATED)
        self.assertEqual(response.Status, 0xA700)
        self.assertIn("memory_limit", response.ErrorComment)
        self.assertEqual((self.store.studies, self.store.reserved), ({}, 0))

    def test_larger_than_memory_limit_a700(self):
        big = encode_dataset(make_dataset(sop="1.2.8.1", pixels=bytes(2 << 20)), EXPLICIT_VR_LITTLE_ENDIAN)
        response = self.harness.store_object(big, "1.2.8.1")
        self.assertEqual(response.Status, 0xA700)
        self.assertIn("memory_limit", response.ErrorComment)
        self.assertEqual((self.store.size, self.store.reserved), (0, 0))

    def test_full_of_pinned_studies_a700_then_room_once_unpinned(self):
        """Memory full and nothing droppable: A700 naming the limit; the same object fits once the pin goes."""
        first = make_dataset(study="1.5", series="1.5.1", sop="1.5.1.1", pixels=bytes(600 * KIB))
        self.assertEqual(self.harness.store_object(encode_dataset(first, EXPLICIT_VR_LITTLE_ENDIAN), "1.5.1.1").Status,
                         0)
        self.store.pin("1.5")
        second = encode_dataset(make_dataset(study="1.6", series="1.6.1", sop="1.6.1.1", pixels=bytes(600 * KIB)),
                                EXPLICIT_VR_LITTLE_ENDIAN)
        response = self.harness.store_object(second, "1.6.1.1")
        self.assertEqual(response.Status, 0xA700)
        self.assertIn("memory full", response.ErrorComment)
        self.assertEqual(sorted(self.store.studies), ["1.5"])
        self.assertEqual(self.store.reserved, 0)
        self.store.unpin("1.5")
        self.assertEqual(self.harness.store_object(second, "1.6.1.1").Status, 0)
        self.assertEqual(sorted(self.store.studies), ["1.6"])
        self.assertEqual(self.store.dropped[-1], ("1.5", "dropped for room (least recently used)"))

    def test_conformance_classes_only(self):
        harness = MemoryServerHarness(self, {"sop_classes": "conformance"})
        scu = MemorySCU(self, harness.factory, calling="ARCHIVE", called="MEMORY_SERVER")
        accept = scu.associate([(CT_IMAGE_STORAGE, (EXPLICIT_VR_LITTLE_ENDIAN,)),
                                ("1.2.840.10008.5.1.4.1.1.88.11", (EXPLICIT_VR_LITTLE_ENDIAN,))])
        self.assertEqual([c.result for c in accept.presentation_contexts], [0, 3])


class CheckPlacementTests(SynchronousTestCase):
    """Where an object is checked: where it arrived when small and not deflated, else by the sink's runner."""

    def setUp(self):
        self.store = MemoryStore(16 << 20, Clock())
        self.ran = []

        def runner(f, *args):
            self.ran.append(args[1].sop_instance_uid)
            return synchronous_runner(f, *args)

        self.sink = MemorySink(self.store, runner, inline_limit=64 * KIB)

    def receive(self, sop: str, data: bytes, syntax: str = EXPLICIT_VR_LITTLE_ENDIAN):
        writer = self.sink.open(ObjectDescription(CT_IMAGE_STORAGE, sop, syntax, "ARCHIVE"), None, None)
        for start in range(0, len(data), 16 * KIB):
            writer.write(data[start:start + 16 * KIB])
        return self.successResultOf(writer.finish())

    def test_small_objects_checked_inline_large_and_deflated_by_the_runner(self):
        small = encode_dataset(make_dataset(sop="1.2.9.1", pixels=bytes(32 * KIB)), EXPLICIT_VR_LITTLE_ENDIAN)
        large = encode_dataset(make_dataset(sop="1.2.9.2", pixels=bytes(96 * KIB)), EXPLICIT_VR_LITTLE_ENDIAN)
        packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        deflated = packer.compress(encode_dataset(make_dataset(sop="1.2.9.3"), EXPLICIT_VR_LITTLE_ENDIAN))
        deflated += packer.flush()
        self.assertLess(len(small), 64 * KIB)
        self.assertGreater(len(large), 64 * KIB)
        for sop, data, syntax in (("1.2.9.1", small, EXPLICIT_VR_LITTLE_ENDIAN),
                                  ("1.2.9.2", large, EXPLICIT_VR_LITTLE_ENDIAN), ("1.2.9.3", deflated, DEFLATED)):
            self.assertIsInstance(self.receive(sop, data, syntax), Kept)
            self.assertEqual(self.store.find("1.2.826.0.1.1", "1.2.826.0.1.1.1", sop).data, data)
        self.assertEqual(self.ran, ["1.2.9.2", "1.2.9.3"])
        self.assertEqual(self.store.reserved, 0)

    def test_one_fragment_kept_as_it_came_unless_coerced(self):
        """A data set in one fragment (one PDU) is held as those very bytes; a coerced one is a changed copy."""
        data = encode_dataset(make_dataset(sop="1.2.9.5", pixels=bytes(16)), EXPLICIT_VR_LITTLE_ENDIAN)
        writer = self.sink.open(ObjectDescription(CT_IMAGE_STORAGE, "1.2.9.5", EXPLICIT_VR_LITTLE_ENDIAN, "ARCHIVE"),
                                None, None)
        writer.write(data)
        self.successResultOf(writer.finish())
        self.assertIs(self.store.find("1.2.826.0.1.1", "1.2.826.0.1.1.1", "1.2.9.5").data, data)
        ds = make_dataset(sop="1.2.9.6", pixels=bytes(range(32)), bits_allocated=8)
        ds["PixelData"].VR = "OW"
        coerced = encode_dataset(ds, EXPLICIT_VR_LITTLE_ENDIAN)
        writer = self.sink.open(ObjectDescription(CT_IMAGE_STORAGE, "1.2.9.6", EXPLICIT_VR_LITTLE_ENDIAN, "ARCHIVE"),
                                None, None)
        writer.write(coerced)
        self.assertEqual(self.successResultOf(writer.finish()).coerced, True)
        held = self.store.find("1.2.826.0.1.1", "1.2.826.0.1.1.1", "1.2.9.6").data
        self.assertIn(b"\xe0\x7f\x10\x00OB\x00\x00", held)
        self.assertIn(b"\xe0\x7f\x10\x00OW\x00\x00", coerced, "the received bytes are not changed")

    def test_inline_refusal_is_the_same_refusal(self):
        broken = encode_dataset(make_dataset(sop="1.2.9.4"), EXPLICIT_VR_LITTLE_ENDIAN)[:-3]
        writer = self.sink.open(ObjectDescription(CT_IMAGE_STORAGE, "1.2.9.4", EXPLICIT_VR_LITTLE_ENDIAN, "ARCHIVE"),
                                None, None)
        writer.write(broken)
        failure = self.failureResultOf(writer.finish(), Refused)
        self.assertEqual(failure.value.kind, Refusal.NOT_UNDERSTOOD)
        self.assertEqual((self.ran, self.store.studies, self.store.reserved), ([], {}, 0))


class ArrivalTests(SynchronousTestCase):
    """An object's head checked as its first fragments arrive, the rest copied into a buffer of the size its
    Pixel Data declares; whatever does not fit that pattern is checked whole, with the same answers."""

    def setUp(self):
        self.store = MemoryStore(16 << 20, Clock())
        self.sink = MemorySink(self.store, synchronous_runner)

    def writer(self, sop: str, syntax: str = EXPLICIT_VR_LITTLE_ENDIAN):
        return self.sink.open(ObjectDescription(CT_IMAGE_STORAGE, sop, syntax, "ARCHIVE"), None, None)

    def arrive(self, writer, data: bytes, fragment: int = 16 * KIB):
        for start in range(0, len(data), fragment):
            writer.write(data[start:start + fragment])
        return writer.finish()

    def held(self, sop: str):
        return self.store.find("1.2.826.0.1.1", "1.2.826.0.1.1.1", sop)

    def test_sized_from_the_head_in_each_syntax(self):
        total = 0
        for index, syntax in enumerate((EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN)):
            sop = f"1.2.10.{index}"
            data = encode_dataset(make_dataset(sop=sop, pixels=bytes(range(256)) * 1024), syntax)
            writer = self.writer(sop, syntax)
            writer.write(data[:16 * KIB])
            self.assertIsNotNone(writer.head, syntax)
            self.assertEqual(len(writer.buffer), len(data), "sized as the Pixel Data element declares")
            self.assertEqual(writer.chunks, [])
            self.assertIsInstance(self.successResultOf(self.arrive(writer, data[16 * KIB:])), Kept)
            self.assertEqual(self.held(sop).data, data)
            metadata = self.held(sop).metadata  # the study level (the listing shows it), not the archive's others
            self.assertIn('"00080020"', metadata.study_json)
            self.assertEqual((metadata.patient_json, metadata.series_json, metadata.instance_json), (None,) * 3)
            total += len(data) + OBJECT_OVERHEAD
        self.assertEqual((self.store.reserved, self.store.size), (0, total))

    def test_elements_after_pixel_data_grow_the_buffer(self):
        ds = make_dataset(sop="1.2.10.5", pixels=bytes(64 * KIB))
        ds.add_new(0xFFFAFFFA, "SQ", [])  # Digital Signatures Sequence, after Pixel Data
        data = encode_dataset(ds, EXPLICIT_VR_LITTLE_ENDIAN) + b"\xfc\xff\xfc\xffOB\x00\x00\x04\x00\x00\x00pad."
        self.assertIsInstance(self.successResultOf(self.arrive(self.writer("1.2.10.5"), data)), Kept)
        self.assertEqual(self.held("1.2.10.5").data, data)

    def test_shorter_than_declared_not_whole(self):
        data = encode_dataset(make_dataset(sop="1.2.10.6", pixels=bytes(64 * KIB)), EXPLICIT_VR_LITTLE_ENDIAN)
        failure = self.failureResultOf(self.arrive(self.writer("1.2.10.6"), data[:-1000]), Refused)
        self.assertEqual(failure.value.kind, Refusal.NOT_UNDERSTOOD)
        self.assertIn("not whole", failure.value.comment)
        self.assertEqual((self.store.studies, self.store.reserved), ({}, 0))

    def test_uids_refused_from_the_head_and_the_rest_drained(self):
        data = encode_dataset(make_dataset(sop="1.2.10.7", pixels=bytes(64 * KIB)), EXPLICIT_VR_LITTLE_ENDIAN)
        writer = self.writer("1.2.10.8")  # the command names another instance
        writer.write(data[:16 * KIB])
        self.assertEqual(writer.refusal.kind, Refusal.NOT_MATCHING)
        self.assertEqual((writer.buffer, writer.chunks, self.store.reserved), (None, [], 0))
        failure = self.failureResultOf(self.arrive(writer, data[16 * KIB:]), Refused)
        self.assertIn("SOP Instance UID", failure.value.comment)
        self.assertEqual((self.store.studies, self.store.reserved), ({}, 0))

    def test_coercion_applied_to_the_sized_buffer(self):
        ds = make_dataset(sop="1.2.10.9", pixels=bytes(range(256)) * 256, bits_allocated=8)
        ds["PixelData"].VR = "OW"
        data = encode_dataset(ds, EXPLICIT_VR_LITTLE_ENDIAN)
        kept = self.successResultOf(self.arrive(self.writer("1.2.10.9"), data))
        self.assertTrue(kept.coerced)
        held = self.held("1.2.10.9").data
        self.assertEqual(held, data.replace(b"\xe0\x7f\x10\x00OW", b"\xe0\x7f\x10\x00OB"))

    def test_a_long_head_checked_whole(self):
        """A head longer than the fragments looked at (a large private element before Pixel Data): no buffer
        sized early, the object checked whole at the end, the same answer."""
        ds = make_dataset(sop="1.2.10.10", pixels=bytes(16 * KIB))
        ds.add_new(0x00091010, "OB", bytes(100 * KIB))
        ds.add_new(0x00090010, "LO", "PRIVATE")
        data = encode_dataset(ds, EXPLICIT_VR_LITTLE_ENDIAN)
        writer = self.writer("1.2.10.10")
        kept = self.successResultOf(self.arrive(writer, data, fragment=8 * KIB))
        self.assertIsInstance(kept, Kept)
        self.assertIsNone(writer.head)
        self.assertEqual(self.held("1.2.10.10").data, data)

    def test_room_not_reserved_for_a_bogus_declared_length(self):
        """A Pixel Data header declaring more than memory holds: no buffer of that size, and the object, short
        of what it declares, is answered not whole."""
        data = bytearray(encode_dataset(make_dataset(sop="1.2.10.11", pixels=bytes(64 * KIB)),
                                        EXPLICIT_VR_LITTLE_ENDIAN))
        at = data.index(b"\xe0\x7f\x10\x00OB") if b"\xe0\x7f\x10\x00OB" in data else data.index(b"\xe0\x7f\x10\x00OW")
        data[at + 8:at + 12] = (0x7FFFFFF0).to_bytes(4, "little")
        writer = self.writer("1.2.10.11")
        writer.write(bytes(data[:16 * KIB]))
        self.assertIsNone(writer.buffer)
        failure = self.failureResultOf(self.arrive(writer, bytes(data[16 * KIB:])), Refused)
        self.assertEqual(failure.value.kind, Refusal.NOT_UNDERSTOOD)
        self.assertEqual(self.store.reserved, 0)


class UnsolicitedTests(SynchronousTestCase):
    """accept_unsolicited: an object no load asked for is kept (default) or refused with 0124."""

    def data(self, sop):
        return encode_dataset(make_dataset(sop=sop), EXPLICIT_VR_LITTLE_ENDIAN)

    def test_kept_by_default(self):
        harness = MemoryServerHarness(self)
        self.assertEqual(harness.store_object(self.data("1.3.1"), "1.3.1").Status, 0)

    def test_refused_when_not_accepted(self):
        loads = RecordingTracker(lambda d: d.move_originator == "MEMORY_MANAGER")
        harness = MemoryServerHarness(self, {"accept_unsolicited": False}, loads=loads)
        response = harness.store_object(self.data("1.3.2"), "1.3.2")
        self.assertEqual(response.Status, 0x0124)
        self.assertIn("accept_unsolicited", response.ErrorComment)
        self.assertEqual(harness.store.studies, {})
        self.assertEqual(loads.refusals, [], "an object no load asked for is none of the loads' business")
        response = harness.store_object(self.data("1.3.3"), "1.3.3", MoveOriginatorApplicationEntityTitle="MEMORY_MANAGER",
                                        MoveOriginatorMessageID=7)
        self.assertEqual(response.Status, 0)
        seen = loads.asked[-1]
        self.assertEqual((seen.move_originator, seen.move_message_id, seen.source_ae), ("MEMORY_MANAGER", 7, "ARCHIVE"))
        self.assertEqual([d.sop_instance_uid for d in loads.kept_objects], ["1.3.3"])

    def test_refusals_of_wanted_objects_reported(self):
        """An object a load asked for and memory cannot keep: the load hears why."""
        loads = RecordingTracker(lambda d: True)
        harness = MemoryServerHarness(self, {"memory_limit": "1 MiB"}, loads=loads)
        big = encode_dataset(make_dataset(sop="1.3.4", pixels=bytes(2 << 20)), EXPLICIT_VR_LITTLE_ENDIAN)
        self.assertEqual(harness.store_object(big, "1.3.4").Status, 0xA700)
        bad = encode_dataset(make_dataset(sop="1.3.5"), EXPLICIT_VR_LITTLE_ENDIAN)
        self.assertEqual(harness.store_object(bad, "1.3.6").Status, 0xA900)
        harness.store.pin("1.9.9")
        harness.store.reserve(1020 * KIB)  # memory taken by objects still arriving: nothing can be dropped
        self.assertEqual(harness.store_object(bad, "1.3.5").Status, 0xA700)
        self.assertEqual([(d.sop_instance_uid, r.kind.name) for d, r in loads.refusals],
                         [("1.3.6", "NOT_MATCHING"), ("1.3.5", "OUT_OF_RESOURCES")])
        self.assertIn("memory full", loads.refusals[-1][1].comment)
        # the one too large is refused by the service before the sink decides: the load learns it from the
        # sub-operation counts the archive reports
        self.assertEqual(loads.kept_objects, [])


@implementer(ILoadTracker)
class RecordingTracker:
    def __init__(self, wants):
        self.wants = wants
        self.asked, self.kept_objects, self.refusals = [], [], []

    def expects(self, description):
        self.asked.append(description)
        return self.wants(description)

    def kept(self, description):
        self.kept_objects.append(description)

    def refused(self, description, refused):
        self.refusals.append((description, refused))


class MemoryConfigTests(SynchronousTestCase):
    def parse(self, memory):
        return configuration.parse({"appliance": {"data_dir": "/tmp/x"}, "memory_server": memory}, "/etc/a.toml")

    def test_defaults(self):
        memory = self.parse({}).memory
        self.assertEqual((memory.memory_limit, memory.retention, memory.accept_unsolicited, memory.sop_classes),
                         (1 << 30, None, True, "all"))

    def test_sizes_and_durations(self):
        self.assertEqual(self.parse({"memory_limit": "512 MiB"}).memory.memory_limit, 512 << 20)
        self.assertEqual(self.parse({"memory_limit": "2 GiB"}).memory.memory_limit, 2 << 30)
        for written, seconds in (("8 h", 28800), ("30 min", 1800), ("2 d", 172800), (90, 90), ("45s", 45)):
            self.assertEqual(self.parse({"retention": written}).memory.retention, seconds)

    def test_bad_values_name_file_and_key(self):
        for key, value, words in (("memory_limit", "12 KiB", "[memory_server] memory_limit"),
                                  ("memory_limit", "lots", "[memory_server] memory_limit"),
                                  ("retention", "8 weeks", "[memory_server] retention"),
                                  ("retention", 0, "[memory_server] retention"),
                                  ("retention", True, "[memory_server] retention"),
                                  ("accept_unsolicited", "yes", "[memory_server] accept_unsolicited"),
                                  ("memory_limt", "1 GiB", "memory_limt")):
            with self.assertRaises(configuration.ConfigError) as raised:
                self.parse({key: value})
            self.assertIn("/etc/a.toml", str(raised.exception))
            self.assertIn(words, str(raised.exception))


class MemoryServiceTests(SynchronousTestCase):
    def test_retention_applied_while_nothing_arrives(self):
        clock = Clock()
        store = MemoryStore(1 << 20, clock, retention=600)
        store.reserve(KIB + OBJECT_OVERHEAD)
        store.put(metadata("1.1"), EXPLICIT_VR_LITTLE_ENDIAN, bytes(KIB))
        store.release(KIB + OBJECT_OVERHEAD)
        service = MemoryService(store, clock)
        service.startService()
        clock.advance(590)
        self.assertIn("1.1", store.studies)
        clock.advance(70)
        self.assertNotIn("1.1", store.studies)
        service.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])
