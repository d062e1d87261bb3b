"""The Disk-Server's C-STORE SCP against real peers on 127.0.0.1: DCMTK's storescu and pynetdicom.

The Disk-Server runs in-process on port 0 with a real archive in a temporary
folder and real worker threads; peers run as subprocesses (storescu) or in a
thread (pynetdicom) while trial's reactor runs.  Nothing sleeps: every wait is
a Deferred, and the peers have timeouts of their own.

Two things the peers do shape these tests:

- storescu's ``-R`` does not propose a file's own transfer syntax (it proposes
  the uncompressed ones, converts to them, and cannot be combined with a
  configuration file).  So each storescu run proposes, through an association
  profile (``-xf``), one presentation context per (SOP class, transfer syntax)
  of its files, with that transfer syntax alone: every data set travels in
  the encoding of its file.
- Neither peer sends a file's data set bytes verbatim: both re-encode what
  they parsed.  DCMTK writes sequences with explicit lengths, recomputes group
  lengths, drops Data Set Trailing Padding and re-deflates; pydicom fixes odd
  lengths.  The Disk-Server's promise is to store the data set as received, so
  the bytes each C-STORE carried are taken from the TCP stream the Disk-Server
  received (parsed here, independently of the appliance's own PDU code) and
  the stored file must hold exactly those; where the peer sent the file's own
  bytes, that is also a comparison with the original file.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import struct
import time
import warnings
from collections import defaultdict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from pydicom import dcmread
from twisted.internet import defer, reactor, threads
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import Logger
from twisted.trial import unittest

from appliance import config as configuration
from appliance.ae.listeners import acceptor_factory, disk_server_services, storage_syntaxes
from appliance.archive import sink as storage_module
from appliance.archive.archive import Archive
from appliance.dataset import structure
from appliance.dataset.deflate import DEFLATED
from appliance.dicom.uids import EXPLICIT_VR_BIG_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN
from appliance.net.threads import ThreadPoolService

from .support import WAIT_LIMIT, Listening, deferred_test, keep_pynetdicom_reactor_off_responses
from .support_data import TEST_FILES, dataset_bytes, dataset_offset, file_meta_bytes, make_dataset, write_part10

try:
    import pynetdicom
except ImportError:
    pynetdicom = None

STORESCU = "/usr/bin/storescu"
_log = Logger(namespace="tests.interop_storage")

SUCCESS, COERCED, OUT_OF_RESOURCES, DUPLICATE, DOES_NOT_MATCH = 0x0000, 0xB000, 0xA700, 0x0111, 0xA900
CANNOT_UNDERSTAND = 0xC000
#: pydicom's test files whose data sets are cut short (a value declared longer than what follows it): sent as
#: the file's own bytes, they are answered C000 (issue 9); a peer that re-encodes them sends whole data sets
TRUNCATED_FILES = {"MR_truncated.dcm", "rtplan_truncated.dcm"}

#: The corpus tests fail when fewer pydicom files than this were stored.
MIN_STORED = 30
#: ... or when fewer than this were sent as the file's own bytes, and so compared with the file itself.
MIN_VERBATIM = 20

_PIXEL_DATA_TAG = {True: b"\xe0\x7f\x10\x00", False: b"\x7f\xe0\x00\x10"}  # keyed by little endian


def _need_storescu() -> Optional[str]:
    return None if os.access(STORESCU, os.X_OK) else f"DCMTK not installed ({STORESCU} missing)"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- what went over the wire -----------------------------------------------------------------------------


def _affected_sop_instance(command: bytes) -> str:
    """(0000,1000) of a command set (Implicit VR Little Endian, PS3.7 6.3.1)."""
    position = 0
    while position + 8 <= len(command):
        group, element, length = struct.unpack("<HHL", command[position:position + 8])
        value = command[position + 8:position + 8 + length]
        if (group, element) == (0x0000, 0x1000):
            return value.rstrip(b"\x00 ").decode("ascii")
        position += 8 + length
    raise ValueError("command set without Affected SOP Instance UID")


def wire_messages(stream: bytes) -> List[Tuple[str, bytes]]:
    """(Affected SOP Instance UID, data set bytes) of each DIMSE message with a data set in the
    requestor-to-acceptor byte stream of one association (PS3.8 9.3.5 P-DATA-TF, E.2 PDVs)."""
    messages: List[Tuple[str, bytes]] = []
    command, data = bytearray(), bytearray()
    sop_uid: Optional[str] = None
    position = 0
    while position + 6 <= len(stream):
        kind = stream[position]
        (length,) = struct.unpack(">L", stream[position + 2:position + 6])
        body = stream[position + 6:position + 6 + length]
        position += 6 + length
        if kind != 0x04:
            continue
        offset = 0
        while offset < len(body):
            (item_length,) = struct.unpack(">L", body[offset:offset + 4])
            control = body[offset + 5]
            fragment = body[offset + 6:offset + 4 + item_length]
            offset += 4 + item_length
            if control & 0x01:
                command += fragment
                if control & 0x02:
                    sop_uid = _affected_sop_instance(bytes(command))
                    command = bytearray()
            else:
                data += fragment
                if control & 0x02:
                    messages.append((sop_uid, bytes(data)))
                    data = bytearray()
    return messages


def stored_form(sent: bytes, transfer_syntax: str) -> Tuple[bytes, bool]:
    """The data set the Disk-Server must store for ``sent`` received in ``transfer_syntax``, and
    whether that is coerced: the statement's one coercion turns a top-level Pixel Data of VR OW
    with Bits Allocated 8 (explicit VR) into OB, swapping each word's bytes back in big endian."""
    if transfer_syntax not in (EXPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN):
        return sent, False
    header = file_meta_bytes("1.2.3", "1.2.3.4", transfer_syntax)
    ds = dcmread(io.BytesIO(header + sent))
    if ds.get("BitsAllocated") != 8 or 0x7FE00010 not in ds:
        return sent, False
    little = transfer_syntax == EXPLICIT_VR_LITTLE_ENDIAN
    start = ds.get_item(0x7FE00010).value_tell - 12 - len(header)  # the element's tag
    element = sent[start:start + 12]
    if element[:4] != _PIXEL_DATA_TAG[little] or element[4:6] != b"OW":
        return sent, False
    (length,) = struct.unpack("<L" if little else ">L", element[8:12])
    value = bytearray(sent[start + 12:start + 12 + length])
    if not little:
        value[0::2], value[1::2] = value[1::2], value[0::2]
    return sent[:start + 4] + b"OB" + sent[start + 6:start + 12] + bytes(value) + sent[start + 12 + length:], True


# --- the Disk-Server, in-process --------------------------------------------------------------------


class WireRecorder:
    """Keeps every byte the acceptor ``factory`` receives, connection by connection."""

    def __init__(self, factory) -> None:
        self.received: List[bytearray] = []
        self._waiting: List[Tuple[int, defer.Deferred]] = []
        build = factory.buildProtocol

        def build_and_record(addr):
            built = build(addr)
            stream = bytearray()
            self.received.append(stream)
            data_received = built.dataReceived

            def record(data):
                stream.extend(data)
                return data_received(data)

            built.dataReceived = record
            for waiter in [waiter for waiter in self._waiting if waiter[0] <= len(self.received)]:
                self._waiting.remove(waiter)
                waiter[1].callback(None)
            return built

        factory.buildProtocol = build_and_record

    def connections(self, count: int) -> defer.Deferred:
        """Fires once ``count`` connections were accepted (fails after WAIT_LIMIT seconds)."""
        if len(self.received) >= count:
            return defer.succeed(None)
        waiter = defer.Deferred()
        self._waiting.append((count, waiter))
        return waiter.addTimeout(WAIT_LIMIT, reactor)

    def messages(self) -> List[Tuple[str, bytes]]:
        """Every C-STORE data set received, as (SOP Instance UID, bytes), connection by connection."""
        return [message for stream in self.received for message in wire_messages(bytes(stream))]


class DiskServer:
    """The Disk-Server AE over a fresh archive, listening on 127.0.0.1 port 0 for one test.

    Cleanups (last added, first run): stop listening and wait for every
    connection to close, stop the worker threads, close the index.  Every
    byte the Disk-Server receives is kept, per connection.
    """

    def __init__(self, testcase: unittest.TestCase, **settings) -> None:
        self.root = os.path.abspath(testcase.mktemp())
        os.makedirs(self.root)
        table = {"interface": "127.0.0.1", "port": 0, "timeout": 20, "min_free_space": 0}
        table.update(settings)
        self.config = configuration.parse(
            {"appliance": {"data_dir": self.root}, "disk_server": table}, os.path.join(self.root, "appliance.toml")
        )
        self.io = ThreadPoolService(reactor, "test-archive-io", max_threads=4)
        self.db = ThreadPoolService(reactor, "test-archive-db", max_threads=1)
        self.io.startService()
        self.db.startService()
        self.archive = Archive(self.config.archive.path, self.config.archive.limits, self.config.archive.on_duplicate,
                               reactor, self.io.runner, self.db.runner)
        testcase.addCleanup(self.archive.close)
        testcase.addCleanup(self.db.stopService)
        testcase.addCleanup(self.io.stopService)
        self.factory = acceptor_factory(self.config.disk_server, self.config,
                                        disk_server_services(self.config, self.archive), reactor)
        self.wire = WireRecorder(self.factory)
        self.received = self.wire.received
        self.listening = Listening(testcase, self.factory, reactor)
        self.port = self.listening.number
        #: SOP Instance UID -> the stored file's data set bytes after each commit of it, in order
        self.committed: Dict[str, List[bytes]] = defaultdict(list)

    def connections(self, count: int) -> defer.Deferred:
        return self.wire.connections(count)

    def messages(self) -> List[Tuple[str, bytes]]:
        return self.wire.messages()

    def record_commits(self) -> None:
        """After every commit, read the stored file back (before the C-STORE is answered).

        pydicom's test files include several with one SOP Instance UID; with
        on_duplicate = replace each replaces the one before, so what each
        store wrote is read back right after its commit.
        """
        archive = self.archive
        original = archive.commit

        async def commit(obj):
            outcome = await original(obj)
            sop_uid = obj.metadata.sop_instance_uid
            row = await archive.db(archive.index.lookup, sop_uid)
            self.committed[sop_uid].append(await archive.io(dataset_bytes, archive.store.absolute(row.path)))
            return outcome

        archive.commit = commit

    def stored_dataset(self, sop_uid: str) -> bytes:
        row = self.archive.index.lookup(sop_uid)
        if row is None:
            raise AssertionError(f"SOP instance {sop_uid} is not in the index")
        return dataset_bytes(self.archive.store.absolute(row.path))

    def files_under(self, folder: str) -> List[str]:
        found = []
        for directory, _, names in os.walk(os.path.join(self.archive.root, folder)):
            found += [os.path.join(directory, name) for name in names]
        return sorted(found)


# --- storescu -----------------------------------------------------------------------------------------


def file_syntaxes(path: str) -> Tuple[str, str]:
    """(Media Storage SOP Class UID, Transfer Syntax UID) of a Part 10 file."""
    meta = dcmread(path, stop_before_pixels=True).file_meta
    return str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)


def association_profile(folder: str, pairs: Iterable[Tuple[str, str]]) -> str:
    """A storescu association configuration file (``-xf PATH Corpus``) proposing one
    presentation context per (SOP class, transfer syntax), with that transfer syntax only."""
    pairs = sorted(set(pairs))
    if not 0 < len(pairs) <= 128:
        raise ValueError(f"{len(pairs)} presentation contexts: storescu proposes 1 to 128")
    syntaxes = sorted({syntax for _, syntax in pairs})
    lines = ["[[TransferSyntaxes]]"]
    for number, syntax in enumerate(syntaxes):
        lines += [f"[Syntax{number}]", f"TransferSyntax1 = {syntax}"]
    lines += ["[[PresentationContexts]]", "[Corpus]"]
    for number, (sop_class, syntax) in enumerate(pairs, 1):
        lines.append(f"PresentationContext{number} = {sop_class}\\Syntax{syntaxes.index(syntax)}")
    lines += ["[[Profiles]]", "[Corpus]", "PresentationContexts = Corpus"]
    path = os.path.join(folder, f"storescu-{sha256(repr(pairs).encode())[:12]}.cfg")
    with open(path, "w", encoding="ascii") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


class StorescuRun:
    """One storescu run (``-d``): its output, exit code, and per file what happened."""

    _SENDING = re.compile(r"^I: Sending file: (.*)$")
    _STATUS = re.compile(r"DIMSE Status\s*: 0x([0-9A-Fa-f]{4})")

    def __init__(self, files: Sequence[str], output: str, code: int) -> None:
        self.files = list(files)
        self.output = output
        self.code = code
        #: (file, status) in the order sent; a file listed twice appears twice
        self.results: List[Tuple[str, int]] = []
        #: file -> the first error line of storescu naming it (why it would not send a file it did not)
        self.refused: Dict[str, str] = {}
        current: Optional[str] = None
        for line in output.splitlines():
            sending = self._SENDING.match(line)
            if sending:
                current = sending.group(1).strip()
                continue
            status = self._STATUS.search(line)
            if status and current is not None:
                self.results.append((current, int(status.group(1), 16)))
                current = None
                continue
            if line.startswith(("E: ", "F: ")):
                for path in self.files:
                    if path in line and path not in self.refused:
                        self.refused[path] = line[3:].strip()

    def statuses(self, path: str) -> List[int]:
        return [status for sent, status in self.results if sent == path]

    def status(self, path: str) -> int:
        found = self.statuses(path)
        if len(found) != 1:
            raise AssertionError(f"{path} answered {len(found)} times, not once:\n{self.tail()}")
        return found[0]

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.output.splitlines()[-lines:])


async def storescu(server: DiskServer, files: Sequence[str], *options: str, called: str = "DISK_SERVER") -> StorescuRun:
    """Send ``files`` in one storescu run (TCP_NODELAY=1), each in its own transfer syntax."""
    profile = association_profile(server.root, (file_syntaxes(path) for path in files))
    args = ["-d", "-nh", "-to", "20", "-ta", "20", "-td", "60", "-xf", profile, "Corpus", *options,
            "-aec", called, "127.0.0.1", str(server.port), *files]
    env = dict(os.environ, TCP_NODELAY="1")
    out, err, code = await getProcessOutputAndValue(STORESCU, args, env=env, path=server.root)
    return StorescuRun(files, out.decode("utf-8", "replace") + err.decode("utf-8", "replace"), code)


# --- the pydicom corpus ----------------------------------------------------------------------------------


class CorpusFile:
    """One storage object of pydicom's test files."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.name = os.path.basename(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's notes on the deliberately odd files
            ds = dcmread(path, stop_before_pixels=True)
        self.sop_class = str(ds.file_meta.MediaStorageSOPClassUID)
        self.transfer_syntax = str(ds.file_meta.TransferSyntaxUID)
        self.sop_uid = str(ds.SOPInstanceUID)
        with open(path, "rb") as handle:
            data = handle.read()
        #: the file's data set bytes, after its File Meta Information
        self.dataset = data[dataset_offset(data):]
        missing = [keyword for keyword in ("StudyInstanceUID", "SeriesInstanceUID")
                   if not str(ds.get(keyword, "") or "").strip()]
        #: README, Statuses: a data set without its study or series UID is answered A900
        self.refusal = f"the data set has no {missing[0]}" if missing else None


def storage_corpus(accepted_only: bool = False) -> List[CorpusFile]:
    """pydicom's test files that are storage objects: readable, with a File Meta Information whose
    SOP class is a storage SOP class, and with a SOP Instance UID (``accepted_only``: in a transfer
    syntax the Disk-Server accepts)."""
    syntaxes = storage_syntaxes("all")
    corpus = []
    for name in sorted(os.listdir(TEST_FILES)):
        path = os.path.join(TEST_FILES, name)
        if not os.path.isfile(path):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pydicom's notes on the deliberately odd files
                ds = dcmread(path, stop_before_pixels=True)
        except Exception:  # not DICOM, or no meta and no recognisable data set: not a storage object
            continue
        meta = getattr(ds, "file_meta", None)
        sop_class = meta.get("MediaStorageSOPClassUID") if meta is not None else None
        if sop_class not in syntaxes or not str(ds.get("SOPInstanceUID", "") or ""):
            continue
        if accepted_only and meta.get("TransferSyntaxUID") not in syntaxes[sop_class]:
            continue
        corpus.append(CorpusFile(path))
    return corpus


class CorpusCheck:
    """The verdicts on one corpus run: what was stored, sent verbatim, coerced, or not stored and why."""

    def __init__(self, testcase: unittest.TestCase, server: DiskServer, peer: str) -> None:
        self.testcase = testcase
        self.server = server
        self.peer = peer
        self.stored: List[str] = []
        self.verbatim: List[str] = []
        self.coerced: List[str] = []
        self.reencoded: Dict[str, str] = {}
        self.not_stored: Dict[str, str] = {}
        self.last: Dict[str, Tuple[CorpusFile, bytes]] = {}

    def sent(self, item: CorpusFile, sop_uid: str, data: bytes, status: int) -> None:
        """``item`` went over the wire as (``sop_uid``, ``data``) and was answered ``status``."""
        test = self.testcase
        test.assertEqual(sop_uid, item.sop_uid, f"{item.name}: the C-STORE carried another SOP instance")
        expected, coerced = stored_form(data, item.transfer_syntax)
        cut_short = None if item.transfer_syntax == DEFLATED else structure.problem(
            data, 0, len(data), item.transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN,
            item.transfer_syntax != EXPLICIT_VR_BIG_ENDIAN)
        if item.name in TRUNCATED_FILES and data == item.dataset:
            test.assertIsNotNone(cut_short, f"{item.name} is cut short")
        wanted = DOES_NOT_MATCH if item.refusal else CANNOT_UNDERSTAND if cut_short else COERCED if coerced else SUCCESS
        test.assertEqual(status, wanted, f"{item.name}: answered 0x{status:04X}, expected 0x{wanted:04X}")
        if item.refusal:
            self.not_stored[item.name] = f"answered A900: {item.refusal}"
            return
        if cut_short:
            self.not_stored[item.name] = f"answered C000: not whole: {cut_short}"
            return
        versions = self.server.committed.get(item.sop_uid, [])
        test.assertTrue(any(version == expected for version in versions),
                        f"{item.name}: no stored version of {item.sop_uid} holds the {len(data)} data set bytes "
                        f"{self.peer} sent (stored versions: {[len(version) for version in versions]} bytes)")
        self.stored.append(item.name)
        if coerced:
            self.coerced.append(item.name)
        if data == item.dataset:
            self.verbatim.append(item.name)
        else:
            self.reencoded[item.name] = f"{self.peer} re-encoded it: {len(data)} bytes sent, {len(item.dataset)} in the file"
        self.last[item.sop_uid] = (item, expected)

    def finish(self) -> None:
        """What was kept is the last version of each SOP instance sent, and enough of the corpus was stored."""
        self.check_kept()
        self.report()

    def check_kept(self) -> None:
        """The index names the last version of each SOP instance sent (on_duplicate = replace),
        nothing is left in tmp/."""
        test, archive = self.testcase, self.server.archive
        for sop_uid, (item, expected) in self.last.items():
            row = archive.index.lookup(sop_uid)
            test.assertIsNotNone(row, item.name)
            test.assertEqual((row.sop_class, row.transfer_syntax), (item.sop_class, item.transfer_syntax), item.name)
            test.assertEqual(self.server.stored_dataset(sop_uid), expected, item.name)
        test.assertEqual(archive.index.counts()[3], len(self.last))
        test.assertEqual(len(self.server.files_under("objects")), len(self.last))
        test.assertEqual(self.server.archive.store.leftovers(), [])

    def report(self) -> None:
        test = self.testcase
        for name, reason in sorted(self.not_stored.items()):
            _log.info("pydicom test file {name} not stored ({peer}): {reason}", name=name, peer=self.peer,
                      reason=reason)
        for name, reason in sorted(self.reencoded.items()):
            _log.info("pydicom test file {name}: {reason}", name=name, reason=reason)
        _log.info("{peer}: {stored} pydicom files stored, {verbatim} of them sent as the file's own bytes; "
                  "coerced from OW to OB: {coerced}", peer=self.peer, stored=len(self.stored),
                  verbatim=len(self.verbatim), coerced=", ".join(self.coerced) or "none")
        test.assertGreaterEqual(len(self.stored), MIN_STORED, f"stored {self.stored}; not stored: {self.not_stored}")
        test.assertGreaterEqual(len(self.verbatim), MIN_VERBATIM, f"sent verbatim: {self.verbatim}")


# --- the tests -----------------------------------------------------------------------------------------------


class StorescuCorpusTests(unittest.TestCase):
    """Every storage object of pydicom's test files, sent with DCMTK's storescu."""

    timeout = 120
    skip = _need_storescu()

    @deferred_test
    async def test_pydicom_corpus(self):
        """All of pydicom's storage objects in one storescu run: each one storescu sends is answered
        0000 (B000 when its 8-bit pixel data is OW, A900 when it lacks its study or series UID) and
        stored with exactly the data set bytes sent, which are the file's own where storescu did
        not re-encode; the only others are files storescu itself refuses to send."""
        server = DiskServer(self)
        server.record_commits()
        await storescu_corpus(self, server, CorpusCheck(self, server, "storescu"))


async def storescu_corpus(test: unittest.TestCase, server, check: "CorpusCheck", called: str = "DISK_SERVER") -> None:
    """pydicom's storage objects in one storescu run to ``server``; each one sent checked by ``check``."""
    corpus = {item.path: item for item in storage_corpus()}
    run = await storescu(server, list(corpus), called=called)
    test.assertEqual(run.code, 0, run.tail())
    messages = server.messages()
    test.assertEqual(len(messages), len(run.results), run.tail())
    for (path, status), (sop_uid, data) in zip(run.results, messages):
        check.sent(corpus[path], sop_uid, data, status)
    sent = {path for path, _ in run.results}
    for path, item in corpus.items():
        if path not in sent:
            test.assertIn(path, run.refused, f"{item.name} was neither sent nor refused by storescu")
            check.not_stored[item.name] = f"storescu will not send it: {run.refused[path]}"
    test.assertEqual(len(sent), len(run.results), "a file was sent twice")
    check.finish()


class _Said(logging.Handler):
    """What pynetdicom logs at WARNING or above, kept until taken (why a C-STORE got no status, say)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def take(self) -> str:
        lines, self.lines = self.lines, []
        return "; ".join(lines) or "nothing logged"


def _pynetdicom_store(port: int, files: Sequence[CorpusFile],
                      called: str = "DISK_SERVER") -> List[Tuple[str, Optional[int], Optional[str], str]]:
    """pynetdicom's blocking SCU (run in a thread): one association, one C-STORE per file.

    Returns (file name, status or None, why it was not sent or None, what pynetdicom logged meanwhile) per file.
    """
    from pynetdicom import AE

    said = _Said()
    pynetdicom_log = logging.getLogger("pynetdicom")
    pynetdicom_log.addHandler(said)
    try:
        ae = AE(ae_title="PYNETDICOM")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
        for sop_class, syntax in sorted({(item.sop_class, item.transfer_syntax) for item in files}):
            ae.add_requested_context(sop_class, syntax)
        assoc = ae.associate("127.0.0.1", port, ae_title=called)
        if not assoc.is_established:
            raise AssertionError(f"pynetdicom's association was not established: {said.take()}")
        keep_pynetdicom_reactor_off_responses(assoc)
        results = []
        try:
            for item in files:
                ds = dcmread(item.path)
                started = time.monotonic()
                try:
                    status = assoc.send_c_store(ds)
                except Exception as error:  # pynetdicom cannot encode or send this data set
                    results.append((item.name, None, f"{type(error).__name__}: {error}", said.take()))
                    continue
                answer = int(status.Status) if "Status" in status else None
                results.append((item.name, answer, None,
                                f"{said.take()} ({time.monotonic() - started:.1f} s after the request)"))
        finally:
            assoc.release()
    finally:
        pynetdicom_log.removeHandler(said)
    return results


class PynetdicomCorpusTests(unittest.TestCase):
    """pydicom's storage objects in the transfer syntaxes the Disk-Server accepts, sent with pynetdicom."""

    timeout = 120
    skip = None if pynetdicom is not None else "pynetdicom is not installed"

    @deferred_test
    async def test_pydicom_corpus(self):
        """pynetdicom's C-STORE of each file read by dcmread is answered 0000 (B000 for 8-bit OW pixel
        data, A900 without a study or series UID), and the stored data set is the bytes pynetdicom
        sent, which are the file's own where pydicom did not re-encode."""
        server = DiskServer(self)
        server.record_commits()
        await pynetdicom_corpus(self, server, CorpusCheck(self, server, "pynetdicom"))


async def pynetdicom_corpus(test: unittest.TestCase, server, check: "CorpusCheck", called: str = "DISK_SERVER") -> None:
    """pydicom's storage objects that ``server`` accepts, sent by pynetdicom; each one sent checked by ``check``."""
    corpus = storage_corpus(accepted_only=True)
    results = await threads.deferToThread(_pynetdicom_store, server.port, corpus, called)
    test.assertEqual([name for name, _, _, _ in results], [item.name for item in corpus])
    sent = [(item, status, said) for item, (_, status, problem, said) in zip(corpus, results) if problem is None]
    for item, (_, _, problem, said) in zip(corpus, results):
        if problem is not None:
            check.not_stored[item.name] = f"pynetdicom did not send it: {problem} (pynetdicom: {said})"
    messages = server.messages()
    test.assertEqual(len(messages), len(sent))
    for (item, status, said), (sop_uid, data) in zip(sent, messages):
        test.assertIsNotNone(status, f"{item.name}: pynetdicom got no status back (pynetdicom: {said})")
        check.sent(item, sop_uid, data, status)
    check.finish()


class StorescuStatusTests(unittest.TestCase):
    """Statuses and archive states storescu sees: coercion, duplicates, a full archive."""

    timeout = 60
    skip = _need_storescu()

    def part10(self, ds, name=None) -> str:
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        return write_part10(os.path.join(folder, name or f"{ds.SOPInstanceUID}.dcm"), ds, EXPLICIT_VR_LITTLE_ENDIAN)

    @deferred_test
    async def test_coercion_ow_to_ob(self):
        """An 8-bit image whose Pixel Data is OW, in Explicit VR Little Endian, gets B000 as storescu
        reports it, and is stored with OB and its pixel bytes unchanged."""
        server = DiskServer(self)
        pixels = bytes(range(256)) * 4
        ds = make_dataset(study="1.2.826.0.1.3.1", series="1.2.826.0.1.3.1.1", sop="1.2.826.0.1.3.1.1.1",
                          pixels=pixels, bits_allocated=8)
        ds["PixelData"].VR = "OW"
        path = self.part10(ds)
        original = dataset_bytes(path)
        self.assertEqual(original.count(b"\xe0\x7f\x10\x00OW\x00\x00"), 1)
        run = await storescu(server, [path])
        self.assertEqual(run.results, [(path, COERCED)], run.tail())
        self.assertIn("DIMSE Status                  : 0xb000: Warning: Coercion of Data Elements", run.output)
        self.assertIn("Pixel Data coerced from OW to OB", run.output)  # the Error Comment storescu shows
        stored_path = server.archive.store.absolute(server.archive.index.lookup(ds.SOPInstanceUID).path)
        stored = dcmread(stored_path)
        self.assertEqual(stored["PixelData"].VR, "OB")
        self.assertEqual(stored.PixelData, pixels)
        self.assertEqual(server.stored_dataset(ds.SOPInstanceUID),
                         original.replace(b"\xe0\x7f\x10\x00OW", b"\xe0\x7f\x10\x00OB"))

    async def _duplicates(self, on_duplicate: str) -> Tuple[StorescuRun, str, str]:
        """Store one version of a SOP instance, then send the same file and another version of it;
        the first copy must be the one in the archive afterwards."""
        server = DiskServer(self, on_duplicate=on_duplicate)
        sop = "1.2.826.0.1.3.2.1.1"
        first = make_dataset(patient="First^Copy", study="1.2.826.0.1.3.2", series="1.2.826.0.1.3.2.1", sop=sop)
        second = make_dataset(patient="Second^Copy", study="1.2.826.0.1.3.2", series="1.2.826.0.1.3.2.1", sop=sop)
        first_path = self.part10(first, name="first.dcm")
        second_path = self.part10(second, name="second.dcm")
        once = await storescu(server, [first_path])
        self.assertEqual(once.results, [(first_path, SUCCESS)], once.tail())
        stored_path = server.archive.index.lookup(sop).path
        again = await storescu(server, [first_path, second_path])
        self.assertEqual(server.archive.index.lookup(sop).path, stored_path)  # the first copy's own file
        self.assertEqual(server.stored_dataset(sop), dataset_bytes(first_path))
        self.assertEqual(str(dcmread(server.archive.store.absolute(stored_path)).PatientName), "First^Copy")
        self.assertEqual(server.archive.index.counts(), (1, 1, 1, 1))
        self.assertEqual(server.archive.store.leftovers(), [])
        self.assertEqual(len(server.files_under("objects")), 1)
        return again, first_path, second_path

    @deferred_test
    async def test_duplicate_rejected(self):
        """on_duplicate = reject: the SOP instance sent again (the same file, then another version)
        gets 0111 both times, and the first copy stays."""
        again, first_path, second_path = await self._duplicates("reject")
        self.assertEqual(again.results, [(first_path, DUPLICATE), (second_path, DUPLICATE)], again.tail())

    @deferred_test
    async def test_duplicate_kept(self):
        """on_duplicate = keep: the SOP instance sent again succeeds both times, and the first copy is
        the one kept."""
        again, first_path, second_path = await self._duplicates("keep")
        self.assertEqual(again.results, [(first_path, SUCCESS), (second_path, SUCCESS)], again.tail())

    @deferred_test
    async def test_full_archive(self):
        """With max_archive_size a few KB and auto_delete off, an object that does not fit gets A700,
        the one stored before stays, and nothing partial is left in archive/tmp or objects/."""
        server = DiskServer(self, max_archive_size="6 KiB", auto_delete=False)
        small = make_dataset(study="1.2.826.0.1.3.3", series="1.2.826.0.1.3.3.1", sop="1.2.826.0.1.3.3.1.1")
        large = make_dataset(study="1.2.826.0.1.3.4", series="1.2.826.0.1.3.4.1", sop="1.2.826.0.1.3.4.1.1",
                             pixels=b"\x01\x02" * 4096)
        small_path, large_path = self.part10(small), self.part10(large)
        run = await storescu(server, [small_path, large_path])
        self.assertEqual(run.results, [(small_path, SUCCESS), (large_path, OUT_OF_RESOURCES)], run.tail())
        self.assertIn("0xa700: Refused: Out of resources", run.output)
        self.assertIn("auto_delete is off", run.output)  # the Error Comment storescu shows
        self.assertIsNone(server.archive.index.lookup(large.SOPInstanceUID))
        self.assertEqual(server.stored_dataset(small.SOPInstanceUID), dataset_bytes(small_path))
        self.assertEqual(server.archive.store.leftovers(), [])
        objects = server.files_under("objects")
        self.assertEqual(len(objects), 1)
        self.assertEqual(server.archive.size, os.path.getsize(objects[0]))


class StorescuLargeAndConcurrentTests(unittest.TestCase):
    """A 50 MiB object, and three storescu processes storing into one study at once."""

    timeout = 120
    skip = _need_storescu()

    @deferred_test
    async def test_fifty_megabytes_streamed(self):
        """A 50 MiB image is stored intact (same SHA-256 of its data set), written to the archive as
        it arrives in many chunks of at most 256 KiB plus one PDU, never whole."""
        server = DiskServer(self)
        writes: List[int] = []
        store = server.archive.store
        write = store.write

        def counting_write(temp, chunks, writeback=False):
            writes.append(sum(len(chunk) for chunk in chunks))
            return write(temp, chunks, writeback)

        store.write = counting_write  # every write to a temporary file goes through ObjectStore.write
        size = 50 * 1024 * 1024
        ds = make_dataset(study="1.2.826.0.1.3.5", series="1.2.826.0.1.3.5.1", sop="1.2.826.0.1.3.5.1.1",
                          pixels=os.urandom(size))
        ds.Columns, ds.Rows = 1024, size // (1024 * 2)  # 25600 rows of 1024 16-bit pixels: both fit US
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        path = write_part10(os.path.join(folder, "large.dcm"), ds, EXPLICIT_VR_LITTLE_ENDIAN)
        del ds
        original = sha256(dataset_bytes(path))
        run = await storescu(server, [path])
        self.assertEqual(run.results, [(path, SUCCESS)], run.tail())
        stored = server.stored_dataset("1.2.826.0.1.3.5.1.1")
        self.assertEqual(sha256(stored), original)
        row = server.archive.index.lookup("1.2.826.0.1.3.5.1.1")
        self.assertEqual(row.size, os.path.getsize(server.archive.store.absolute(row.path)))
        # the first write carries our File Meta Information with the first chunk; the rest streams
        header = os.path.getsize(server.archive.store.absolute(row.path)) - len(stored)
        chunk_limit = storage_module.CHUNK + server.config.disk_server.max_pdu
        self.assertEqual(sum(writes), header + len(stored))
        self.assertLessEqual(writes[0], header + chunk_limit)
        self.assertLessEqual(max(writes[1:-1]), chunk_limit)
        # the last chunk, held until the end and written with the fsync: less than two
        self.assertLessEqual(writes[-1], 2 * storage_module.CHUNK)
        self.assertGreaterEqual(len(writes), len(stored) // chunk_limit)
        self.assertEqual(server.archive.store.leftovers(), [])

    @deferred_test
    async def test_three_storescu_into_one_study(self):
        """Three storescu processes at once, four instances each, into one study and two series:
        all 12 are stored as sent and the study's and series' counters are exact.  No commit
        happens before all three associations are open, so their stores do overlap."""
        server = DiskServer(self)
        commit = server.archive.commit

        async def commit_once_all_connected(obj):
            await server.connections(3)
            return await commit(obj)

        server.archive.commit = commit_once_all_connected
        study = "1.2.826.0.1.3.6"
        series = (f"{study}.1", f"{study}.2")
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        batches = []
        for process in range(3):
            batch = []
            for number in range(4):
                ds = make_dataset(study=study, series=series[number % 2], sop=f"{study}.9.{process}.{number}",
                                  pixels=bytes([process, number]) * 512)
                batch.append(write_part10(os.path.join(folder, f"{process}-{number}.dcm"), ds,
                                          EXPLICIT_VR_LITTLE_ENDIAN))
            batches.append(batch)
        runs = await defer.gatherResults([defer.ensureDeferred(storescu(server, batch)) for batch in batches],
                                         consumeErrors=True)
        for batch, run in zip(batches, runs):
            self.assertEqual(run.results, [(path, SUCCESS) for path in batch], run.tail())
        self.assertEqual(len(server.received), 3)
        index = server.archive.index
        self.assertEqual(index.counts(), (1, 1, 2, 12))
        (row,) = index.studies()
        self.assertEqual((row.study_uid, row.num_series, row.num_instances), (study, 2, 12))
        counts = dict(index.db.execute("SELECT series_uid, num_instances FROM series").fetchall())
        self.assertEqual(counts, {series[0]: 6, series[1]: 6})
        files = server.files_under("objects")
        self.assertEqual(len(files), 12)
        self.assertEqual(row.size, sum(os.path.getsize(path) for path in files))
        self.assertEqual(server.archive.size, row.size)
        for process, batch in enumerate(batches):
            for number, path in enumerate(batch):
                self.assertEqual(server.stored_dataset(f"{study}.9.{process}.{number}"), dataset_bytes(path))


class SocketOptionTests(unittest.TestCase):
    """Every DICOM connection the appliance accepts runs with TCP_NODELAY (a peer's small PDUs would otherwise
    wait for delayed ACKs, ~40 ms each)."""

    timeout = 30

    @deferred_test
    async def test_accepted_connection_has_no_delay(self):
        import socket

        server = DiskServer(self)
        connected = defer.Deferred()
        build = server.factory.buildProtocol

        def building(address):
            protocol = build(address)
            made = protocol.connectionMade

            def connection_made():
                made()
                connected.callback(protocol)

            protocol.connectionMade = connection_made
            return protocol

        server.factory.buildProtocol = building
        client = socket.create_connection(("127.0.0.1", server.port))
        self.addCleanup(client.close)
        protocol = await connected.addTimeout(WAIT_LIMIT, reactor)
        handle = protocol.transport.getHandle()
        self.assertNotEqual(handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 0)
        client.close()
