"""C-STORE SCP over the archive, driven in memory: statuses, coercion, hostile input, full disks."""

from __future__ import annotations

import errno
import os

from pydicom import dcmread
from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from appliance import config as configuration
from appliance.ae.listeners import acceptor_factory, disk_server_services, storage_syntaxes
from appliance.archive import sink as storage_module
from appliance.archive.archive import Archive
from appliance.archive.eviction import StorageLimits
from appliance.dataset.deflate import InflateLimits
from appliance.dicom import dimse as D
from appliance.dicom.uids import (
    CONFORMANCE_STORAGE_CLASSES,
    EXPLICIT_VR_BIG_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
)
from appliance.net.threads import synchronous_runner

from .support_data import CT_IMAGE_STORAGE, encode_dataset, make_dataset
from .support_scu import MemorySCU

MAX_PDU = 16384


class StorageHarness:
    """An in-memory Disk-Server with a real archive in a temporary folder."""

    def __init__(self, test: SynchronousTestCase, limits=StorageLimits(min_free_space=0), on_duplicate="replace",
                 sop_classes="all", inflate_limits=InflateLimits()):
        self.test = test
        root = test.mktemp()
        self.clock = Clock()
        self.clock.advance(1000)
        self.config = configuration.parse(
            {"appliance": {"data_dir": root}, "disk_server": {"sop_classes": sop_classes}}, os.path.join(root, "x.toml")
        )
        self.archive = Archive(self.config.archive.path, limits, on_duplicate, self.clock, synchronous_runner,
                               synchronous_runner, inflate_limits)
        test.addCleanup(self.archive.close)
        self.factory = acceptor_factory(
            self.config.disk_server, self.config, disk_server_services(self.config, self.archive), self.clock
        )
        self.message_id = 0

    def associate(self, contexts):
        """A new association proposing ``contexts``: (protocol, transport, A-ASSOCIATE-AC)."""
        self.scu = MemorySCU(self.test, self.factory, calling="MODALITY")
        accept = self.scu.associate(contexts)
        return self.scu.protocol, self.scu.transport, accept

    def store(self, ds_bytes, sop_class, sop_uid, transfer_syntax=EXPLICIT_VR_LITTLE_ENDIAN, protocol=None):
        """C-STORE one data set (on a new association unless ``protocol``); returns the response command."""
        if protocol is None:
            _, _, accept = self.associate([(sop_class, (transfer_syntax,))])
            self.test.assertEqual(accept.presentation_contexts[0].result, 0)
        self.message_id += 1
        command = D.Command(CommandField=D.CommandField.C_STORE_RQ, MessageID=self.message_id, Priority=0,
                            AffectedSOPClassUID=sop_class, AffectedSOPInstanceUID=sop_uid)
        (response,) = self.scu.request(command, ds_bytes)
        return response.command


class StoreStatusTests(SynchronousTestCase):
    """What each kind of C-STORE gets as an answer."""

    def setUp(self):
        self.harness = StorageHarness(self)

    def stored_files(self):
        store = self.harness.archive.store
        found = [os.path.join(store.tmp, name) for name in store.leftovers()]  # not the spare (empty) ones
        for directory, _, files in os.walk(store.objects):
            found += [os.path.join(directory, f) for f in files if f.endswith(".dcm")]
        return found

    def test_success_in_each_uncompressed_syntax(self):
        """A CT image in each uncompressed transfer syntax is stored byte for byte and answered 0x0000."""
        for index, syntax in enumerate((IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN)):
            sop = f"1.2.3.{index}"
            ds = make_dataset(sop=sop)
            data = encode_dataset(ds, syntax)
            response = self.harness.store(data, CT_IMAGE_STORAGE, sop, syntax)
            self.assertEqual((response.Status, response.AffectedSOPInstanceUID), (0, sop))
            row = self.harness.archive.index.lookup(sop)
            self.assertEqual(row.transfer_syntax, syntax)
            with open(self.harness.archive.store.absolute(row.path), "rb") as handle:
                self.assertTrue(handle.read().endswith(data))
            self.assertEqual(dcmread(self.harness.archive.store.absolute(row.path)).file_meta.SourceApplicationEntityTitle,
                             "MODALITY")

    def test_coercion_ow_to_ob_little_endian(self):
        """Pixel Data OW with Bits Allocated 8 becomes OB (bytes unchanged) and the answer is B000."""
        pixels = bytes(range(32))
        ds = make_dataset(sop="1.2.4.1", pixels=pixels, bits_allocated=8)
        ds["PixelData"].VR = "OW"
        data = encode_dataset(ds, EXPLICIT_VR_LITTLE_ENDIAN)
        self.assertIn(b"\xe0\x7f\x10\x00OW", data)
        response = self.harness.store(data, CT_IMAGE_STORAGE, "1.2.4.1")
        self.assertEqual(response.Status, 0xB000)
        self.assertIn("OW to OB", response.ErrorComment)
        path = self.harness.archive.store.absolute(self.harness.archive.index.lookup("1.2.4.1").path)
        with open(path, "rb") as handle:
            content = handle.read()
        self.assertIn(b"\xe0\x7f\x10\x00OB\x00\x00", content)
        self.assertTrue(content.endswith(pixels))
        self.assertEqual(dcmread(path).PixelData, pixels)

    def test_coercion_ow_to_ob_big_endian_swaps_words(self):
        """In big endian, 8-bit pixels carried as OW words come out as OB in their plain byte order."""
        pixels = bytes(range(32))
        # PS3.5 8.1.1: pixel 0 is the low byte of word 0, so big endian OW puts pixel 1 first
        swapped = bytearray(pixels)
        swapped[0::2], swapped[1::2] = pixels[1::2], pixels[0::2]
        ds = make_dataset(sop="1.2.4.2", pixels=bytes(swapped), bits_allocated=8)
        ds["PixelData"].VR = "OW"
        data = encode_dataset(ds, EXPLICIT_VR_BIG_ENDIAN)
        response = self.harness.store(data, CT_IMAGE_STORAGE, "1.2.4.2", EXPLICIT_VR_BIG_ENDIAN)
        self.assertEqual(response.Status, 0xB000)
        path = self.harness.archive.store.absolute(self.harness.archive.index.lookup("1.2.4.2").path)
        stored = dcmread(path)
        self.assertEqual(stored["PixelData"].VR, "OB")
        self.assertEqual(stored.PixelData, pixels)

    def test_no_coercion_for_16_bit(self):
        """16-bit OW pixel data is left alone and answered 0x0000."""
        ds = make_dataset(sop="1.2.4.3")
        response = self.harness.store(encode_dataset(ds, EXPLICIT_VR_LITTLE_ENDIAN), CT_IMAGE_STORAGE, "1.2.4.3")
        self.assertEqual(response.Status, 0)

    def test_instance_uid_mismatch(self):
        """A data set whose SOP Instance UID differs from the command's is refused with A900 and not stored."""
        ds = make_dataset(sop="1.2.5.1")
        response = self.harness.store(encode_dataset(ds, EXPLICIT_VR_LITTLE_ENDIAN), CT_IMAGE_STORAGE, "1.2.5.2")
        self.assertEqual(response.Status, 0xA900)
        self.assertIn("SOP Instance UID differs", response.ErrorComment)
        self.assertEqual(self.stored_files(), [])

    def test_series_of_another_study(self):
        """Issue 9: an object whose series belongs to another study is refused with A900 naming both; the
        association goes on and the other study is intact."""
        first = make_dataset(study="1.2.9.1", series="1.2.9.1.1", sop="1.2.9.1.1.1")
        self.assertEqual(self.harness.store(encode_dataset(first, EXPLICIT_VR_LITTLE_ENDIAN), CT_IMAGE_STORAGE,
                                            "1.2.9.1.1.1").Status, 0)
        odd = make_dataset(study="1.2.9.2", series="1.2.9.1.1", sop="1.2.9.2.1.1")
        response = self.harness.store(encode_dataset(odd, EXPLICIT_VR_LITTLE_ENDIAN), CT_IMAGE_STORAGE,
                                      "1.2.9.2.1.1", protocol=True)
        self.assertEqual((response.Status, response.ErrorComment),
                         (0xA900, "series 1.2.9.1.1 belongs to study 1.2.9.1"))
        self.assertEqual(self.harness.archive.index.counts(), (1, 1, 1, 1))
        self.assertEqual(len(self.stored_files()), 1)

    def test_class_uid_mismatch(self):
        """A data set of another SOP class than the command says is refused with A900."""
        ds = make_dataset(sop="1.2.5.3", sop_class="1.2.840.10008.5.1.4.1.1.4")
        response = self.harness.store(encode_dataset(ds, EXPLICIT_VR_LITTLE_ENDIAN), CT_IMAGE_STORAGE, "1.2.5.3")
        self.assertEqual(response.Status, 0xA900)

    def test_unparseable_data_set(self):
        """Bytes that are no data set are refused with C000, nothing written, and the association still works."""
        response = self.harness.store(b"\xff" * 1000, CT_IMAGE_STORAGE, "1.2.6.1")
        # pydicom reads most garbage as some data set; it then lacks the SOP class (A900)
        self.assertIn(response.Status, (0xA900, 0xC000))
        self.assertEqual(self.stored_files(), [])
        ds = make_dataset(sop="1.2.6.2")
        again = self.harness.store(encode_dataset(ds, EXPLICIT_VR_LITTLE_ENDIAN), CT_IMAGE_STORAGE, "1.2.6.2",
                                   protocol=True)
        self.assertEqual(again.Status, 0)

    def test_missing_required_uid_in_data_set(self):
        """A data set without a Study Instance UID is refused with A900."""
        ds = make_dataset(sop="1.2.6.3")
        del ds.StudyInstanceUID
        response = self.harness.store(encode_dataset(ds, EXPLICIT_VR_LITTLE_ENDIAN), CT_IMAGE_STORAGE, "1.2.6.3")
        self.assertEqual(response.Status, 0xA900)
        self.assertIn("StudyInstanceUID", response.ErrorComment)

    def test_hostile_uids(self):
        """UIDs that are paths, too long or hold NUL are refused with C000; nothing lands outside the archive."""
        parent = os.path.dirname(self.harness.archive.root)
        before = sorted(os.listdir(parent))
        for uid in ("../../x", "..", "/etc/passwd", "1" * 65, "1.2\x00.3", "1.2.a"):
            ds = make_dataset(sop="9.9.9")
            ds.SOPInstanceUID = uid
            response = self.harness.store(encode_dataset(ds, EXPLICIT_VR_LITTLE_ENDIAN), CT_IMAGE_STORAGE, uid,
                                          protocol=None if uid == "../../x" else True)
            self.assertEqual(response.Status & 0xF000, 0xC000, uid)
        self.assertEqual(sorted(os.listdir(parent)), before)
        self.assertEqual(self.stored_files(), [])

    def test_hostile_study_uid_in_data_set(self):
        """A study UID like ../../x inside the data set is refused with A900; file names never use UIDs anyway."""
        ds = make_dataset(sop="1.2.7.1", study="../../x")
        response = self.harness.store(encode_dataset(ds, EXPLICIT_VR_LITTLE_ENDIAN), CT_IMAGE_STORAGE, "1.2.7.1")
        self.assertEqual(response.Status, 0xA900)
        self.assertEqual(self.stored_files(), [])


class ConformanceClassesTests(SynchronousTestCase):
    """sop_classes = "conformance" restricts to the statement's table."""

    def test_conformance_list(self):
        """Only Table 7's classes, only uncompressed; registry mode is a superset with compressed syntaxes."""
        conformance = storage_syntaxes("conformance")
        self.assertEqual(set(conformance), set(CONFORMANCE_STORAGE_CLASSES))
        self.assertIn("1.2.840.10008.5.1.4.1.1.12.1", conformance)  # XA, the erratum's correct UID
        self.assertNotIn("1.2.840.10008.5.1.4.1.1.7.12.1", conformance)
        everything = storage_syntaxes("all")
        self.assertTrue(set(conformance) < set(everything))
        self.assertIn("1.2.840.10008.1.2.4.50", everything[CT_IMAGE_STORAGE])
        self.assertNotIn("1.2.840.10008.1.2.4.50", conformance[CT_IMAGE_STORAGE])

    def test_unlisted_class_rejected_in_conformance_mode(self):
        """An Enhanced CT context is refused (abstract syntax not supported) when only the statement's list is on."""
        harness = StorageHarness(self, sop_classes="conformance")
        _, _, accept = harness.associate([("1.2.840.10008.5.1.4.1.1.2.1", (EXPLICIT_VR_LITTLE_ENDIAN,)),
                                          (CT_IMAGE_STORAGE, (EXPLICIT_VR_LITTLE_ENDIAN,))])
        self.assertEqual([c.result for c in accept.presentation_contexts], [3, 0])


class FullArchiveTests(SynchronousTestCase):
    """A700 when there is no room, and nothing partial left."""

    def test_out_of_space_refuses_with_a700(self):
        """max_archive_size reached with auto_delete off: A700 naming the cause, no file left."""
        harness = StorageHarness(self, limits=StorageLimits(max_archive_size=100, min_free_space=0, auto_delete=False))
        ds = make_dataset(sop="1.3.1")
        response = harness.store(encode_dataset(ds, EXPLICIT_VR_LITTLE_ENDIAN), CT_IMAGE_STORAGE, "1.3.1")
        self.assertEqual(response.Status, 0xA700)
        self.assertIn("auto_delete is off", response.ErrorComment)
        self.assertEqual(harness.archive.store.leftovers(), [])
        self.assertEqual(harness.archive.index.counts(), (0, 0, 0, 0))

    def test_streamed_object_out_of_space_leaves_no_file(self):
        """A large object, already partly written to its temporary file when the archive finds no room for it:
        A700, and that file is removed."""
        harness = StorageHarness(self, limits=StorageLimits(max_archive_size=100, min_free_space=0, auto_delete=False))
        ds = make_dataset(sop="1.3.4", pixels=b"\x01\x02" * 600000)  # streamed: more than two chunks
        response = harness.store(encode_dataset(ds, EXPLICIT_VR_LITTLE_ENDIAN), CT_IMAGE_STORAGE, "1.3.4")
        self.assertEqual(response.Status, 0xA700)
        self.assertIn("auto_delete is off", response.ErrorComment)
        self.assertEqual(harness.archive.store.leftovers(), [])
        self.assertEqual(harness.archive.index.counts(), (0, 0, 0, 0))

    def test_enospc_while_writing(self):
        """A real 'no space left on device' while writing gives A700, the temporary file is removed."""
        harness = StorageHarness(self)
        store = harness.archive.store
        original = store.write

        def full(temp, chunks, writeback=False):
            if temp.size > 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return original(temp, chunks, writeback)

        store.write = full
        ds = make_dataset(sop="1.3.2", pixels=b"\x01\x02" * 600000)  # streamed: more than two chunks
        response = harness.store(encode_dataset(ds, EXPLICIT_VR_LITTLE_ENDIAN), CT_IMAGE_STORAGE, "1.3.2")
        self.assertEqual(response.Status, 0xA700)
        self.assertIn("No space left on device", response.ErrorComment)
        self.assertEqual(store.leftovers(), [])
        store.write = original
        again = harness.store(encode_dataset(make_dataset(sop="1.3.3"), EXPLICIT_VR_LITTLE_ENDIAN),
                              CT_IMAGE_STORAGE, "1.3.3", protocol=True)
        self.assertEqual(again.Status, 0)

    def test_abandoned_store_leaves_nothing(self):
        """A peer that disconnects mid data set leaves no temporary file."""
        harness = StorageHarness(self)
        protocol, transport, _ = harness.associate([(CT_IMAGE_STORAGE, (EXPLICIT_VR_LITTLE_ENDIAN,))])
        command = D.Command(CommandField=D.CommandField.C_STORE_RQ, MessageID=1, Priority=0,
                            AffectedSOPClassUID=CT_IMAGE_STORAGE, AffectedSOPInstanceUID="1.3.4", CommandDataSetType=0)
        for encoded in D.fragment(1, True, command.encode(), MAX_PDU):
            protocol.dataReceived(encoded)
        data = encode_dataset(make_dataset(sop="1.3.4", pixels=b"\x00" * 600000), EXPLICIT_VR_LITTLE_ENDIAN)
        pdus = list(D.fragment(1, False, data, MAX_PDU))
        for encoded in pdus[: len(pdus) // 2]:
            protocol.dataReceived(encoded)
        protocol.connectionLost(None)
        self.assertEqual(harness.archive.store.leftovers(), [])
        self.assertEqual(harness.archive.index.counts(), (0, 0, 0, 0))


class FlowControlTests(SynchronousTestCase):
    """The association stops reading while too much waits to be written."""

    def test_reading_paused_while_writes_lag(self):
        """With writes that never complete, reading pauses after about 1 MiB is in flight."""
        from twisted.internet import defer

        harness = StorageHarness(self)
        pending = []
        harness.archive.io = lambda f, *a, **k: (defer.maybeDeferred(f, *a, **k) if f.__name__ != "write"
                                                 else pending.append(defer.Deferred()) or pending[-1])
        protocol, transport, _ = harness.associate([(CT_IMAGE_STORAGE, (EXPLICIT_VR_LITTLE_ENDIAN,))])
        command = D.Command(CommandField=D.CommandField.C_STORE_RQ, MessageID=1, Priority=0,
                            AffectedSOPClassUID=CT_IMAGE_STORAGE, AffectedSOPInstanceUID="1.4.1", CommandDataSetType=0)
        for encoded in D.fragment(1, True, command.encode(), MAX_PDU):
            protocol.dataReceived(encoded)
        data = encode_dataset(make_dataset(sop="1.4.1", pixels=b"\x00" * 4_000_000), EXPLICIT_VR_LITTLE_ENDIAN)
        fed = 0
        for encoded in D.fragment(1, False, data, MAX_PDU):
            if transport.producerState == "paused":
                break
            protocol.dataReceived(encoded)
            fed += len(encoded)
        self.assertEqual(transport.producerState, "paused")
        self.assertLess(fed, 2 * 1024 * 1024)
        self.assertGreater(fed, 1024 * 1024)


class StreamedObjectTests(SynchronousTestCase):
    """Objects larger than one chunk: written as they arrive, their head checked from the first fragments."""

    def setUp(self):
        self.harness = StorageHarness(self)
        self.calls = []
        for name in ("check_head", "examine", "refuse_unless_whole_file"):
            original = getattr(storage_module, name)

            def recording(*args, _original=original, _name=name):
                result = _original(*args)
                self.calls.append((_name, result is not None))
                return result

            self.patch(storage_module, name, recording)

    def stored(self, sop):
        row = self.harness.archive.index.lookup(sop)
        return dcmread(self.harness.archive.store.absolute(row.path))

    def test_first_chunk_reaching_pixel_data_is_enough(self):
        """A 1 MB image is checked from its first fragment, and once whole only its size is compared with what
        its Pixel Data declares: the file is not read back."""
        ds = make_dataset(sop="1.6.1", patient="Big^Image", pixels=b"\x01\x02" * 500_000)
        response = self.harness.store(encode_dataset(ds, EXPLICIT_VR_LITTLE_ENDIAN), CT_IMAGE_STORAGE, "1.6.1")
        self.assertEqual(response.Status, 0)
        self.assertEqual(self.calls, [("check_head", True)])
        self.assertEqual(str(self.stored("1.6.1").PatientName), "Big^Image")
        self.assertEqual(self.harness.archive.index.studies()[0].patient_name, "Big^Image")

    def test_attributes_beyond_the_first_chunk_read_back_from_the_file(self):
        """When the attributes before the pixel data outgrow the first chunk, the whole file decides."""
        ds = make_dataset(sop="1.6.2", patient="Long^Header", pixels=b"\x00\x01" * 1000)
        ds.ImageComments = "x" * (storage_module.CHUNK + 100_000)  # (0020,4000) LT, before the pixel data
        response = self.harness.store(encode_dataset(ds, EXPLICIT_VR_LITTLE_ENDIAN), CT_IMAGE_STORAGE, "1.6.2")
        self.assertEqual(response.Status, 0)
        names = [name for name, _ in self.calls]
        self.assertEqual(names[-1], "examine")
        self.assertNotIn(("check_head", True), self.calls)
        self.assertLessEqual(names.count("check_head"), storage_module.HEAD_TRIES)
        self.assertEqual(self.harness.archive.index.lookup("1.6.2").sop_uid, "1.6.2")

    def test_chunks_written_back_as_they_come(self):
        """Each chunk of a streamed object starts its way to disk when written (POSIX_FADV_DONTNEED, not waited
        for), so that the fsync at the end waits for the last part only."""
        from appliance.archive import store as store_module

        if store_module._FADVISE is None:
            raise SkipTest("no posix_fadvise on this platform")
        advised = []
        self.patch(store_module, "_FADVISE", lambda fd, offset, length, advice: advised.append(advice))
        ds = make_dataset(sop="1.6.8", pixels=b"\x01\x02" * 600_000)
        response = self.harness.store(encode_dataset(ds, EXPLICIT_VR_LITTLE_ENDIAN), CT_IMAGE_STORAGE, "1.6.8")
        self.assertEqual(response.Status, 0)
        # the chunks before the last (which the head says fits one chunk: written with the fsync, at the end)
        chunks = (1_200_000 - 1) // storage_module.CHUNK - 1
        self.assertEqual(advised, [os.POSIX_FADV_DONTNEED] * chunks)
        self.assertEqual(self.stored("1.6.8").PixelData, b"\x01\x02" * 600_000)

    def test_elements_after_the_pixel_data_walked_in_the_file(self):
        """An object with elements after its Pixel Data (here Data Set Trailing Padding) is walked whole in its
        file, then stored."""
        ds = make_dataset(sop="1.6.6", pixels=b"\x00\x01" * 300_000)
        ds.add_new(0xFFFCFFFC, "OB", b"\x00" * 64)
        response = self.harness.store(encode_dataset(ds, EXPLICIT_VR_LITTLE_ENDIAN), CT_IMAGE_STORAGE, "1.6.6")
        self.assertEqual(response.Status, 0)
        self.assertEqual(self.calls, [("check_head", True), ("refuse_unless_whole_file", False)])
        self.assertEqual(self.stored("1.6.6").PixelData, b"\x00\x01" * 300_000)

    def test_more_than_the_head_declares_still_streams(self):
        """An object that goes on well past where its Pixel Data ends (1.5 MB of trailing padding) is still written
        as it comes: never more than two chunks held."""
        store = self.harness.archive.store
        written = []
        write = store.write

        def recording(temp, chunks, writeback=False):
            written.append(sum(len(chunk) for chunk in chunks))
            return write(temp, chunks, writeback)

        self.patch(store, "write", recording)
        ds = make_dataset(sop="1.6.9", pixels=b"\x00\x01" * 150_000)
        ds.add_new(0xFFFCFFFC, "OB", b"\x00" * 1_500_000)
        response = self.harness.store(encode_dataset(ds, EXPLICIT_VR_LITTLE_ENDIAN), CT_IMAGE_STORAGE, "1.6.9")
        self.assertEqual(response.Status, 0)
        self.assertGreater(len(written), 3)
        self.assertLessEqual(max(written), 2 * storage_module.CHUNK + MAX_PDU + 1024)  # (+ our File Meta Information)
        self.assertEqual(len(self.stored("1.6.9").DataSetTrailingPadding), 1_500_000)

    def test_pixel_data_shorter_than_declared_refused(self):
        """A streamed object whose Pixel Data declares more than was sent is not whole: C000, nothing kept."""
        data = encode_dataset(make_dataset(sop="1.6.7", pixels=b"\x00\x01" * 300_000), EXPLICIT_VR_LITTLE_ENDIAN)
        response = self.harness.store(data[:-1000], CT_IMAGE_STORAGE, "1.6.7")
        self.assertEqual(response.Status, 0xC000)
        self.assertIn("not whole", response.ErrorComment)
        self.assertEqual(self.harness.archive.store.leftovers(), [])
        self.assertEqual(self.harness.archive.index.counts(), (0, 0, 0, 0))

    def test_streamed_coercion(self):
        """A large 8-bit image sent as OW is coerced to OB after streaming (B000), pixels intact."""
        pixels = bytes(range(256)) * 2048
        ds = make_dataset(sop="1.6.3", pixels=pixels, bits_allocated=8)
        ds["PixelData"].VR = "OW"
        response = self.harness.store(encode_dataset(ds, EXPLICIT_VR_LITTLE_ENDIAN), CT_IMAGE_STORAGE, "1.6.3")
        self.assertEqual(response.Status, 0xB000)
        stored = self.stored("1.6.3")
        self.assertEqual(stored["PixelData"].VR, "OB")
        self.assertEqual(stored.PixelData, pixels)

    def test_streamed_mismatch_refused(self):
        """A large object whose SOP Instance UID differs from the command's is refused (A900) from its head, the
        rest drained and never written: nothing kept."""
        ds = make_dataset(sop="1.6.4", pixels=b"\x00\x01" * 400_000)
        opened = []
        self.patch(self.harness.archive.store, "open_temp", lambda *args: opened.append(args))
        response = self.harness.store(encode_dataset(ds, EXPLICIT_VR_LITTLE_ENDIAN), CT_IMAGE_STORAGE, "1.6.5")
        self.assertEqual(response.Status, 0xA900)
        self.assertEqual(opened, [])
        self.assertEqual(self.harness.archive.store.leftovers(), [])
        self.assertEqual(self.harness.archive.index.counts(), (0, 0, 0, 0))
