"""The Disk-Server's Study Root C-FIND SCP against real peers on 127.0.0.1: DCMTK's findscu,
pynetdicom as SCU, and DCMTK's dcmqrscp as a reference answering the same queries.

The Disk-Server runs in-process on port 0 over a copy of a prepared archive
(tests/support_query.py), its queries on a real worker thread pool; peers run as
subprocesses (findscu, dcmqrscp) or in a thread (pynetdicom).  Nothing sleeps: every wait is a
Deferred, and the peers have timeouts of their own.

findscu is run with ``-v``: it prints each response as "Find Response: N (status)" and a dump
of the identifier, one "(gggg,eeee) VR [value]" line per element, then "Received Final Find
Response (status)".  Those printed lines are what these tests check.
"""

from __future__ import annotations

import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

from pydicom import dcmread
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from twisted.internet import defer, reactor, threads
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from appliance import config as configuration
from appliance.ae.listeners import acceptor_factory, disk_server_services
from appliance.ae.query import FindService
from appliance.dicom.uids import IMPLEMENTATION_CLASS_UID, STUDY_ROOT_FIND
from appliance.net import requestor
from appliance.net.protocol import Timeouts
from appliance.net.threads import ThreadPoolService

from .support import (WAIT_LIMIT, Listening, connect_when_listening, deferred_test, free_port,
                      keep_pynetdicom_reactor_off_responses, spawn_peer, write_file)
from .support_data import write_part10
from .support_query import (
    CONFLICT_STUDIES,
    ROOT,
    archive_copy,
    conflict_corpus,
    corpus,
    fill_charsets,
    fill_conflicts,
    fill_corpus,
    fill_long_names,
    fill_many,
    series_uid,
    sop_uid,
    study_uid,
)

try:
    import pynetdicom
except ImportError:
    pynetdicom = None

DCMTK = "/usr/bin"
FINDSCU = os.path.join(DCMTK, "findscu")
DCMQRSCP = os.path.join(DCMTK, "dcmqrscp")
DCMQRIDX = os.path.join(DCMTK, "dcmqridx")


def _need(*programs: str) -> Optional[str]:
    missing = [program for program in programs if not os.access(program, os.X_OK)]
    return f"DCMTK not installed ({', '.join(missing)} missing)" if missing else None


# --- the Disk-Server, in-process ------------------------------------------------------------------------


class QueryServer:
    """The Disk-Server AE over a copy of a prepared archive, on 127.0.0.1 port 0, for one test.

    Its C-FIND queries run on a real two-thread pool, as in the appliance.  Cleanups (last
    added, first run): stop listening and wait for every connection to close, stop the
    threads, close the index.
    """

    def __init__(self, testcase: unittest.TestCase, *fillers, **settings) -> None:
        self.root = os.path.abspath(testcase.mktemp())
        os.makedirs(self.root)
        table = {"interface": "127.0.0.1", "port": 0, "timeout": 20, "min_free_space": 0}
        table.update(settings)
        self.config = configuration.parse({"appliance": {"data_dir": self.root}, "disk_server": table},
                                          os.path.join(self.root, "appliance.toml"))
        self.archive = archive_copy(self.config.archive.path, *fillers)
        testcase.addCleanup(self.archive.close)
        self.read = ThreadPoolService(reactor, "test-query-read", max_threads=2)
        self.read.startService()
        testcase.addCleanup(self.read.stopService)
        self.runner = self.read.runner
        self.services = disk_server_services(self.config, self.archive, lambda *a, **k: self.runner(*a, **k))
        self.find_service = next(service for service in self.services if isinstance(service, FindService))
        factory = acceptor_factory(self.config.disk_server, self.config, self.services, reactor)
        self.listening = Listening(testcase, factory, reactor)
        self.port = self.listening.number


# --- findscu ------------------------------------------------------------------------------------------------


#: "Find Response: N (status)" with -v, "Received Find Response N (status)" with -X, "Received Find
#: Response N" with -d (the status on a debug line)
_RESPONSE = re.compile(r"^I: (?:Find Response: \d+ \((.*)\)|Received Find Response \d+(?: \((.*)\))?)$")
_FINAL = re.compile(r"^I: Received Final Find Response(?: \((.*)\))?$")
_ELEMENT = re.compile(r"^[ID]: \(([0-9a-f]{4}),([0-9a-f]{4})\) (\w\w) (?:\[(.*?)\]|\(no value available\)|=\w*)")
_STATUS = re.compile(r"DIMSE Status\s*: 0x([0-9a-f]{4})")
_COMMENT = re.compile(r"\(0000,0902\) LO \[(.*?) *\]")


class FindscuRun:
    """One findscu run: its output, exit code, the printed responses and statuses."""

    def __init__(self, output: str, code: int) -> None:
        self.output = output
        self.code = code
        #: each pending response's identifier as printed: keyword -> value (padding stripped)
        self.responses: List[Dict[str, str]] = []
        #: with -v: the text findscu prints for each pending status, e.g. "Pending" or
        #: "Pending: WarningUnsupportedOptionalKeys" (with -d: "", the status is in ``statuses``)
        self.pending: List[str] = []
        self.final: Optional[str] = None
        #: with -d: every DIMSE status (pendings and the final one), and the Error Comment
        self.statuses = [int(found, 16) for found in _STATUS.findall(output)]
        comment = _COMMENT.search(output)
        self.error_comment = comment.group(1) if comment else None
        current: Optional[Dict[str, str]] = None
        for line in output.splitlines():
            response = _RESPONSE.match(line)
            if response:
                current = {}
                self.responses.append(current)
                self.pending.append(response.group(1) or response.group(2) or "")
                continue
            final = _FINAL.match(line)
            if final:
                self.final = final.group(1) or ""
                current = None
                continue
            element = _ELEMENT.match(line)
            if element and current is not None:
                tag = int(element.group(1) + element.group(2), 16)
                # values as printed, without their padding (space, or NUL after a UID)
                current[keyword_for_tag(tag) or f"{tag:08X}"] = (element.group(4) or "").strip(" \x00")

    def values(self, *keys: str) -> List[Tuple[str, ...]]:
        """The printed values of ``keys`` in each response, sorted (the order of matches is not defined)."""
        return sorted(tuple(response.get(key) for key in keys) for response in self.responses)

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.output.splitlines()[-lines:])


async def findscu(port: int, keys: Sequence[str], called: str = "DISK_SERVER", *options: str,
                  folder: Optional[str] = None) -> FindscuRun:
    """findscu -S (Study Root) with ``-k`` for each of ``keys``; keys may be bytes (already encoded)."""
    args: List = ["-v", "-S", "-to", "20", "-ta", "20", "-td", "20", *options, "-aec", called]
    for key in keys:
        args += ["-k", key]
    args += ["127.0.0.1", str(port)]
    out, err, code = await getProcessOutputAndValue(FINDSCU, args, env=dict(os.environ), path=folder)
    return FindscuRun(out.decode("utf-8", "replace") + err.decode("utf-8", "replace"), code)


STUDY_KEYS = ("AccessionNumber", "PatientName", "PatientID", "StudyDate", "StudyTime", "StudyInstanceUID")


class FindscuTests(unittest.TestCase):
    """findscu against the Disk-Server at each level, with wildcards, ranges and lists."""

    timeout = 60
    skip = _need(FINDSCU)

    def setUp(self):
        self.server = QueryServer(self, fill_corpus)

    async def study(self, *keys: str) -> FindscuRun:
        run = await findscu(self.server.port, ["QueryRetrieveLevel=STUDY", *keys])
        self.assertEqual((run.code, run.final), (0, "Success"), run.tail())
        return run

    @deferred_test
    async def test_study_level_wildcard(self):
        """PatientName=Doe* finds Doe^John's and Doe^Jane's four studies; each printed response holds
        the keys asked and the Query/Retrieve Level, nothing else."""
        run = await self.study("PatientName=Doe*", "AccessionNumber", "StudyDate", "StudyInstanceUID")
        self.assertEqual(run.pending, ["Pending"] * 4)
        self.assertEqual(run.values("AccessionNumber", "PatientName", "StudyDate", "StudyInstanceUID"), [
            ("ACC1001", "Doe^John", "20230105", study_uid(0)),
            ("ACC1002", "Doe^John", "20230610", study_uid(1)),
            ("ACC1003", "Doe^Jane", "20231231", study_uid(2)),
            ("ACC1004", "Doe^Jane", "20240101", study_uid(3)),
        ])
        for response in run.responses:
            self.assertEqual(set(response), {"AccessionNumber", "PatientName", "StudyDate", "StudyInstanceUID",
                                             "QueryRetrieveLevel"})
            self.assertEqual(response["QueryRetrieveLevel"], "STUDY")

    @deferred_test
    async def test_study_level_question_mark_and_case(self):
        """'?' matches one character; names match with their case."""
        run = await self.study("PatientName=?oe^Ja??", "AccessionNumber")
        self.assertEqual(run.values("AccessionNumber"), [("ACC1003",), ("ACC1004",)])
        run = await self.study("PatientName=doe*", "AccessionNumber")
        self.assertEqual(run.responses, [])

    @deferred_test
    async def test_date_and_time_ranges(self):
        """Closed and open-ended date ranges, and a time range, as findscu prints them."""
        closed = await self.study("StudyDate=20240101-20240301", "AccessionNumber")
        self.assertEqual(closed.values("AccessionNumber"), [("ACC1004",), ("ACC1005",), ("ACC1006",), ("ACC1007",)])
        before = await self.study("StudyDate=-20231231", "AccessionNumber")
        self.assertEqual(before.values("AccessionNumber"), [("ACC1001",), ("ACC1002",), ("ACC1003",)])
        after = await self.study("StudyDate=20240415-", "AccessionNumber", "StudyTime=120000-")
        self.assertEqual(after.values("AccessionNumber", "StudyTime"), [("ACC1008", "170000")])

    @deferred_test
    async def test_uid_list(self):
        """A list of Study Instance UIDs finds those studies."""
        run = await self.study(f"StudyInstanceUID={study_uid(0)}\\{study_uid(8)}", "AccessionNumber")
        self.assertEqual(run.values("AccessionNumber", "StudyInstanceUID"),
                         [("ACC1001", study_uid(0)), ("ACC1009", study_uid(8))])

    @deferred_test
    async def test_series_level(self):
        """SERIES level within one study: Modality=MR finds two of its three series."""
        run = await findscu(self.server.port, ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study_uid(5)}",
                                               "SeriesInstanceUID", "Modality=MR", "SeriesNumber",
                                               "NumberOfSeriesRelatedInstances"])
        self.assertEqual(run.final, "Success", run.tail())
        self.assertEqual(run.values("SeriesInstanceUID", "Modality", "SeriesNumber", "NumberOfSeriesRelatedInstances"),
                         [(series_uid(5, 0), "MR", "1", "3"), (series_uid(5, 1), "MR", "2", "2")])

    @deferred_test
    async def test_image_level(self):
        """IMAGE level within one series: a multi-valued Image Type matches on one of its values."""
        run = await findscu(self.server.port, ["QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study_uid(5)}",
                                               f"SeriesInstanceUID={series_uid(5, 0)}", "SOPInstanceUID",
                                               "ImageType=AXIAL", "InstanceNumber"])
        self.assertEqual(run.final, "Success", run.tail())
        self.assertEqual(run.values("SOPInstanceUID", "ImageType", "InstanceNumber"), [
            (sop_uid(5, 0, 0), "ORIGINAL\\PRIMARY\\AXIAL", "1"),
            (sop_uid(5, 0, 2), "ORIGINAL\\PRIMARY\\AXIAL", "3"),
        ])

    @deferred_test
    async def test_statuses_and_error_comments(self):
        """findscu -d shows FF01 for an unsupported key (left out of the response), and A900 with
        our Error Comment for PATIENT level and for SERIES level without a Study Instance UID."""
        keys = ["QueryRetrieveLevel=STUDY", "AccessionNumber=ACC1001", "Manufacturer"]
        run = await findscu(self.server.port, keys, "DISK_SERVER", "-d")
        self.assertEqual(run.statuses, [0xFF01, 0x0000], run.tail())
        self.assertEqual(run.responses, [{"AccessionNumber": "ACC1001", "QueryRetrieveLevel": "STUDY"}])
        run = await findscu(self.server.port, keys)
        self.assertEqual(run.pending, ["Pending: WarningUnsupportedOptionalKeys"], run.tail())
        patient = await findscu(self.server.port, ["QueryRetrieveLevel=PATIENT", "PatientName"], "DISK_SERVER", "-d")
        self.assertEqual((patient.statuses, patient.error_comment),
                         ([0xA900], "Study Root has no PATIENT level (use STUDY)"), patient.tail())
        series = await findscu(self.server.port, ["QueryRetrieveLevel=SERIES", "Modality"], "DISK_SERVER", "-d")
        self.assertEqual((series.statuses, series.error_comment),
                         ([0xA900], "SERIES level needs a single StudyInstanceUID (unique key above)"), series.tail())


class FindscuLimitsTests(unittest.TestCase):
    """max_results and C-CANCEL as findscu sees them."""

    timeout = 60
    skip = _need(FINDSCU)

    @deferred_test
    async def test_max_results(self):
        """With max_results = 5, a query matching 9 studies gets 5 pendings and A700 with its comment."""
        server = QueryServer(self, fill_corpus, max_results=5)
        run = await findscu(server.port, ["QueryRetrieveLevel=STUDY", "AccessionNumber"], "DISK_SERVER", "-d")
        self.assertEqual(run.statuses, [0xFF00] * 5 + [0xA700], run.tail())
        self.assertEqual(run.error_comment, "more than max_results=5 matches; narrow the query")
        self.assertEqual(len(run.responses), 5)

    @deferred_test
    async def test_cancel(self):
        """findscu --cancel 1 sends a C-CANCEL-RQ after the first of 150 responses: the C-FIND ends
        with FE00 after the first batch.  (The second fetch waits until the cancel has arrived, so
        the outcome does not depend on how fast each side is.)"""
        server = QueryServer(self, fill_many)
        arrived = defer.Deferred()
        original_cancel = server.find_service.cancel

        def cancel(request):
            original_cancel(request)
            if not arrived.called:
                arrived.callback(None)

        server.find_service.cancel = cancel
        threaded = server.runner
        fetches = []

        def runner(function, *args, **kwargs):
            if function.__name__ != "fetch":
                return threaded(function, *args, **kwargs)
            fetches.append(function)
            if len(fetches) == 1:
                return threaded(function, *args, **kwargs)
            waited = arrived.addTimeout(WAIT_LIMIT, reactor) if not arrived.called else defer.succeed(None)
            return waited.addCallback(lambda _: threaded(function, *args, **kwargs))

        server.runner = runner
        run = await findscu(server.port, ["QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={ROOT}.99",
                                          f"SeriesInstanceUID={ROOT}.99.1", "SOPInstanceUID"],
                            "DISK_SERVER", "-d", "--cancel", "1")
        self.assertEqual(run.statuses, [0xFF00] * 64 + [0xFE00], run.tail())
        self.assertEqual(len(fetches), 2)


class CharacterSetInteropTests(unittest.TestCase):
    """findscu queries in UTF-8 and Latin-1 find pydicom's character-set files; the extracted
    responses decode, with pydicom, to the stored names."""

    timeout = 60
    skip = _need(FINDSCU)

    async def extract(self, server: QueryServer, keys: Sequence) -> List[Dataset]:
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        run = await findscu(server.port, keys, "DISK_SERVER", "-X", "-od", folder, folder=folder)
        self.assertEqual(run.final, "Success", run.tail())
        found = []
        for name in sorted(os.listdir(folder)):
            ds = dcmread(os.path.join(folder, name))
            ds.decode()
            found.append(ds)
        self.assertEqual(len(found), len(run.responses))
        return found

    @deferred_test
    async def test_utf8_and_latin1_queries(self):
        """'Buc^Jérôme' sent in ISO_IR 192 and in ISO_IR 100 finds chrFren's patient (answered in the
        request's character set); '=山田^太郎' in ISO_IR 192 finds chrH31's and chrH32's."""
        server = QueryServer(self, fill_charsets)
        utf8 = await self.extract(server, ["QueryRetrieveLevel=STUDY", "SpecificCharacterSet=ISO_IR 192",
                                           "PatientName=Buc^Jérôme".encode("utf-8")])
        self.assertEqual([(str(ds.PatientName), ds.SpecificCharacterSet) for ds in utf8], [("Buc^Jérôme", "ISO_IR 192")])
        latin1 = await self.extract(server, ["QueryRetrieveLevel=STUDY", "SpecificCharacterSet=ISO_IR 100",
                                             "PatientName=Buc^Jérôme".encode("latin-1")])
        self.assertEqual([(str(ds.PatientName), ds.SpecificCharacterSet) for ds in latin1], [("Buc^Jérôme", "ISO_IR 100")])
        japanese = await self.extract(server, ["QueryRetrieveLevel=STUDY", "SpecificCharacterSet=ISO_IR 192",
                                               "PatientName==山田^太郎".encode("utf-8")])
        self.assertEqual(sorted(str(ds.PatientName) for ds in japanese),
                         ["Yamada^Tarou=山田^太郎=やまだ^たろう", "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"])


# --- pynetdicom ------------------------------------------------------------------------------------------------


class FindscuHostileWildcardTests(unittest.TestCase):
    """Issue 9: wildcards that make a backtracking matcher run for minutes (the audit's query took 12 s on one
    name and froze the reactor) are answered at once, and the AE keeps answering others meanwhile."""

    timeout = 60
    skip = _need(FINDSCU)

    @deferred_test
    async def test_echo_answered_during_a_hostile_find(self):
        server = QueryServer(self, fill_long_names)
        hostile = "x\\" + "*a" * 12 + "*b"  # several names: no single SQL prefix; every long name a candidate
        finding = defer.ensureDeferred(findscu(server.port, ["QueryRetrieveLevel=STUDY", f"PatientName={hostile}",
                                                             "StudyInstanceUID"]))
        timeouts = Timeouts(artim=5.0, association=10.0, dimse=10.0, idle=None)
        association = await requestor.connect(reactor, "127.0.0.1", server.port, "ECHOER", "DISK_SERVER",
                                              timeouts=timeouts, implementation_class_uid=IMPLEMENTATION_CLASS_UID,
                                              implementation_version_name="TESTS")
        self.assertEqual(await association.echo(), 0x0000)
        await association.release()
        run = await finding
        self.assertEqual((run.final, run.responses), ("Success", []), run.tail())
        grouped = await findscu(server.port, ["QueryRetrieveLevel=STUDY", "PatientName=" + "*a" * 14 + "=*a*a*a*b",
                                              "StudyInstanceUID"])
        self.assertEqual((grouped.final, grouped.responses), ("Success", []), grouped.tail())


class FindscuConflictTests(unittest.TestCase):
    """findscu on studies of one Patient ID whose objects carry different names (issue 8): each study is
    matched on, and answered with, its own objects' patient attributes, at every level."""

    timeout = 60
    skip = _need(FINDSCU)

    @deferred_test
    async def test_each_study_answers_its_own_name(self):
        server = QueryServer(self, fill_conflicts)
        first, second = CONFLICT_STUDIES[:2]
        keys = ("QueryRetrieveLevel=STUDY", "StudyInstanceUID", "PatientName", "PatientBirthDate",
                "NumberOfPatientRelatedStudies")
        by_id = await findscu(server.port, [*keys, "PatientID=PIDC01"])
        self.assertEqual(by_id.final, "Success", by_id.tail())
        self.assertEqual(by_id.values("StudyInstanceUID", "PatientName", "PatientBirthDate",
                                      "NumberOfPatientRelatedStudies"),
                         [(first.uid, first.name, first.birth_date, "2"), (second.uid, second.name, second.birth_date, "2")])
        for study in (first, second):
            by_name = await findscu(server.port, [*keys, f"PatientName={study.name}", "PatientID"])
            self.assertEqual(by_name.values("StudyInstanceUID", "PatientName", "PatientBirthDate"),
                             [(study.uid, study.name, study.birth_date)])
            series = await findscu(server.port, ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study.uid}",
                                                 "SeriesInstanceUID", "PatientName"])
            self.assertEqual({response["PatientName"] for response in series.responses}, {study.name})
            images = await findscu(server.port, ["QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study.uid}",
                                                 f"SeriesInstanceUID={study.uid}.1", "SOPInstanceUID",
                                                 "PatientName", "PatientBirthDate"])
            self.assertEqual({(r["PatientName"], r["PatientBirthDate"]) for r in images.responses},
                             {(study.name, study.birth_date)})
            self.assertEqual(len(images.responses), 2)


def _pynetdicom_find(port: int, queries: Sequence[Dataset], combined: bool = False) -> Tuple[Optional[bytes], list]:
    """pynetdicom's blocking C-FIND SCU (run in a thread): one association, the queries in turn.

    Returns the SOP class extended negotiation reply (None if none) and, per query, the list of
    (status, identifier or None).
    """
    from pynetdicom import AE
    from pynetdicom.pdu_primitives import SOPClassExtendedNegotiation

    ae = AE(ae_title="PYNETDICOM")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(STUDY_ROOT_FIND)
    extended = []
    if combined:
        item = SOPClassExtendedNegotiation()
        item.sop_class_uid = STUDY_ROOT_FIND
        item.service_class_application_information = b"\x00\x01"
        extended.append(item)
    assoc = ae.associate("127.0.0.1", port, ae_title="DISK_SERVER", ext_neg=extended or None)
    if not assoc.is_established:
        raise AssertionError("pynetdicom's association was not established")
    keep_pynetdicom_reactor_off_responses(assoc)
    try:
        reply = assoc.acceptor.sop_class_extended.get(STUDY_ROOT_FIND)
        results = []
        for query in queries:
            results.append([(int(status.Status), identifier)
                            for status, identifier in assoc.send_c_find(query, STUDY_ROOT_FIND)])
    finally:
        assoc.release()
    return reply, results


class PynetdicomTests(unittest.TestCase):
    """pynetdicom as the C-FIND SCU (the PyPI run; Debian does not package pynetdicom)."""

    timeout = 60
    skip = None if pynetdicom is not None else "pynetdicom is not installed"

    @deferred_test
    async def test_levels_and_matching(self):
        """STUDY, SERIES and IMAGE queries from pynetdicom get the expected pendings and Success."""
        server = QueryServer(self, fill_corpus)
        study = Dataset()
        study.QueryRetrieveLevel = "STUDY"
        study.PatientName = "Smith*"
        study.StudyDate = "20240201-"
        study.AccessionNumber = ""
        study.ModalitiesInStudy = ""
        series = Dataset()
        series.QueryRetrieveLevel = "SERIES"
        series.StudyInstanceUID = study_uid(0)
        series.SeriesInstanceUID = ""
        series.NumberOfSeriesRelatedInstances = ""
        image = Dataset()
        image.QueryRetrieveLevel = "IMAGE"
        image.StudyInstanceUID = study_uid(0)
        image.SeriesInstanceUID = series_uid(0, 1)
        image.SOPInstanceUID = f"{sop_uid(0, 1, 0)}\\{sop_uid(0, 1, 2)}"
        reply, (studies, serieses, images) = await threads.deferToThread(
            _pynetdicom_find, server.port, [study, series, image])
        self.assertIsNone(reply)
        self.assertEqual([status for status, _ in studies], [0xFF00] * 3 + [0x0000])
        self.assertEqual(sorted((str(ds.AccessionNumber), tuple(ds["ModalitiesInStudy"].value if ds["ModalitiesInStudy"].VM > 1
                                                                else [ds.ModalitiesInStudy])) for _, ds in studies[:-1]),
                         [("ACC1005", ("US",)), ("ACC1006", ("MR", "SR")), ("ACC1007", ("CT",))])
        self.assertEqual(sorted((ds.SeriesInstanceUID, int(ds.NumberOfSeriesRelatedInstances)) for _, ds in serieses[:-1]),
                         [(series_uid(0, 0), 1), (series_uid(0, 1), 3)])
        self.assertEqual(sorted(ds.SOPInstanceUID for _, ds in images[:-1]), [sop_uid(0, 1, 0), sop_uid(0, 1, 2)])
        self.assertEqual([studies[-1][0], serieses[-1][0], images[-1][0]], [0, 0, 0])

    @deferred_test
    async def test_combined_date_time(self):
        """pynetdicom proposing combined date-time matching gets byte 2 = 1 back, and Study Date and
        Time ranges then match as one date-time range."""
        server = QueryServer(self, fill_corpus)
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyDate = "20231231-20240101"
        query.StudyTime = "2300-0100"
        query.AccessionNumber = ""
        reply, (found,) = await threads.deferToThread(_pynetdicom_find, server.port, [query], True)
        self.assertEqual(reply, b"\x00\x01")
        self.assertEqual(sorted(str(ds.AccessionNumber) for _, ds in found[:-1]), ["ACC1003", "ACC1004"])
        reply, (separate,) = await threads.deferToThread(_pynetdicom_find, server.port, [query], False)
        self.assertIsNone(reply)
        self.assertEqual(separate, [(0, None)])

    @deferred_test
    async def test_conflicting_patient_names(self):
        """pynetdicom's queries by name and by Patient ID on studies whose objects carry different names for
        one Patient ID: each study answers with its own name, at STUDY and SERIES level."""
        server = QueryServer(self, fill_conflicts)
        first, second = CONFLICT_STUDIES[:2]
        queries = []
        for keys in ({"PatientName": "Smith*"}, {"PatientID": "PIDC01"}):
            query = Dataset()
            query.QueryRetrieveLevel = "STUDY"
            query.StudyInstanceUID = query.PatientName = query.PatientID = query.PatientBirthDate = ""
            for keyword, value in keys.items():
                setattr(query, keyword, value)
            queries.append(query)
        series = Dataset()
        series.QueryRetrieveLevel = "SERIES"
        series.StudyInstanceUID = first.uid
        series.SeriesInstanceUID = series.PatientName = ""
        _, (smiths, by_id, first_series) = await threads.deferToThread(_pynetdicom_find, server.port,
                                                                       [*queries, series])
        own = {study.uid: (study.name, study.birth_date) for study in CONFLICT_STUDIES}
        self.assertEqual({str(ds.StudyInstanceUID) for _, ds in smiths[:-1]},
                         {study.uid for study in CONFLICT_STUDIES if study.name.startswith("Smith")})
        for status, ds in smiths[:-1] + by_id[:-1]:
            self.assertEqual((str(ds.PatientName), ds.PatientBirthDate), own[str(ds.StudyInstanceUID)])
        self.assertEqual(sorted(str(ds.StudyInstanceUID) for _, ds in by_id[:-1]), sorted([first.uid, second.uid]))
        self.assertEqual([str(ds.PatientName) for _, ds in first_series[:-1]], [first.name])
        self.assertEqual([smiths[-1][0], by_id[-1][0], first_series[-1][0]], [0, 0, 0])

    @deferred_test
    async def test_japanese_query(self):
        """A query in ISO 2022 IR 87 from pynetdicom finds chrX1's name (stored in UTF-8) and gets
        it back in ISO 2022 IR 87."""
        server = QueryServer(self, fill_charsets)
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
        query.PatientName = "Wang^XiaoDong=王^小東"
        _, (found,) = await threads.deferToThread(_pynetdicom_find, server.port, [query])
        self.assertEqual([status for status, _ in found], [0xFF00, 0x0000])
        identifier = found[0][1]
        self.assertEqual(list(identifier.SpecificCharacterSet), ["", "ISO 2022 IR 87"])
        identifier.decode()
        self.assertEqual(str(identifier.PatientName), "Wang^XiaoDong=王^小東")


# --- dcmqrscp as a reference ----------------------------------------------------------------------------------


#: findscu queries sent to both dcmqrscp and the Disk-Server, with the keys whose returned values
#: are compared.  Left out, because the two legitimately differ:
#: - keys dcmqrscp does not support, which it ignores instead of matching: ModalitiesInStudy,
#:   ImageType, SeriesDate/SeriesTime, the Number of ... Related ... counters (it returns none);
#: - non-unique keys above the query level (PatientName at SERIES level): dcmqrscp returns them
#:   without matching them, the Disk-Server matches them;
#: - a partial time as a single value (StudyTime=10): dcmqrscp compares it as 10:00:00 exactly,
#:   the Disk-Server as the whole hour (PS3.5 partial times);
#: - several values in a non-UID key (AccessionNumber=A\B): dcmqrscp matches the whole string,
#:   the Disk-Server any of the values (PS3.4 C.2.2.2.8);
#: - SERIES or IMAGE level without the unique keys above: dcmqrscp answers C000-class "unable
#:   to process", the Disk-Server A900 (identifier does not match SOP class).
#: Both match person names case-sensitively, which is compared ("doe*" finds nothing).
DIFFERENTIAL_QUERIES: List[Tuple[Tuple[str, ...], Tuple[str, ...]]] = [
    (("QueryRetrieveLevel=STUDY", "PatientName=Doe*"), STUDY_KEYS),
    (("QueryRetrieveLevel=STUDY", "PatientName=doe*"), STUDY_KEYS),
    (("QueryRetrieveLevel=STUDY", "PatientName=?oe^Ja*", "PatientID=PID00?"), STUDY_KEYS),
    (("QueryRetrieveLevel=STUDY", "PatientName=Smith*"), STUDY_KEYS),
    (("QueryRetrieveLevel=STUDY", "PatientName=Smith^*"), STUDY_KEYS),
    (("QueryRetrieveLevel=STUDY", "PatientName=O'Brien^Pat"), STUDY_KEYS),
    (("QueryRetrieveLevel=STUDY", "PatientName=*"), STUDY_KEYS),
    (("QueryRetrieveLevel=STUDY", "PatientName=*^J*"), STUDY_KEYS),
    (("QueryRetrieveLevel=STUDY", "StudyDate=20240101-20240301"), STUDY_KEYS),
    (("QueryRetrieveLevel=STUDY", "StudyDate=-20231231"), STUDY_KEYS),
    (("QueryRetrieveLevel=STUDY", "StudyDate=20240415-"), STUDY_KEYS),
    (("QueryRetrieveLevel=STUDY", "StudyDate=20240229"), STUDY_KEYS),
    (("QueryRetrieveLevel=STUDY", "StudyTime=0800-1000"), STUDY_KEYS),
    (("QueryRetrieveLevel=STUDY", "StudyTime=-080000"), STUDY_KEYS),
    (("QueryRetrieveLevel=STUDY", "StudyTime=120000-"), STUDY_KEYS),
    (("QueryRetrieveLevel=STUDY", "StudyDate=20231231-20240101", "StudyTime=2300-0100"), STUDY_KEYS),
    (("QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study_uid(0)}\\{study_uid(8)}\\{ROOT}.404"), STUDY_KEYS),
    (("QueryRetrieveLevel=STUDY", "AccessionNumber=ACC100?"), STUDY_KEYS),
    (("QueryRetrieveLevel=STUDY", "AccessionNumber=ACC1005"), STUDY_KEYS),
    (("QueryRetrieveLevel=STUDY", "ReferringPhysicianName=House*", "StudyDescription"),
     STUDY_KEYS + ("ReferringPhysicianName", "StudyDescription")),
    (("QueryRetrieveLevel=STUDY", "StudyDescription=*ABDOMEN"), STUDY_KEYS + ("StudyDescription",)),
    (("QueryRetrieveLevel=STUDY", "PatientBirthDate=19700101-19791231", "PatientSex"),
     STUDY_KEYS + ("PatientBirthDate", "PatientSex")),
    (("QueryRetrieveLevel=STUDY", "PatientSex=F", "StudyID"), STUDY_KEYS + ("PatientSex", "StudyID")),
    (("QueryRetrieveLevel=STUDY", "StudyID=S1*"), STUDY_KEYS + ("StudyID",)),
    (("QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study_uid(5)}", "SeriesInstanceUID", "Modality=MR",
      "SeriesNumber"), ("StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber")),
    (("QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study_uid(3)}", "SeriesInstanceUID", "Modality",
      "SeriesNumber=2"), ("StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber")),
    (("QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study_uid(0)}", "SeriesInstanceUID", "Modality=C?"),
     ("StudyInstanceUID", "SeriesInstanceUID", "Modality")),
    (("QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study_uid(5)}",
      f"SeriesInstanceUID={series_uid(5, 0)}\\{series_uid(5, 2)}", "Modality"),
     ("StudyInstanceUID", "SeriesInstanceUID", "Modality")),
    (("QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study_uid(5)}", f"SeriesInstanceUID={series_uid(5, 0)}",
      "SOPInstanceUID", "InstanceNumber"), ("SeriesInstanceUID", "SOPInstanceUID", "InstanceNumber")),
    (("QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study_uid(5)}", f"SeriesInstanceUID={series_uid(5, 0)}",
      "SOPInstanceUID", "InstanceNumber=2"), ("SeriesInstanceUID", "SOPInstanceUID", "InstanceNumber")),
    (("QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study_uid(3)}", f"SeriesInstanceUID={series_uid(3, 1)}",
      f"SOPInstanceUID={sop_uid(3, 1, 0)}\\{sop_uid(3, 1, 2)}", "InstanceNumber"),
     ("SeriesInstanceUID", "SOPInstanceUID", "InstanceNumber")),
]


#: findscu queries on the conflict corpus (tests/support_query.py: one Patient ID, two studies under different
#: names and birth dates, and more such pairs): issue 8's queries, compared as above.
CONFLICT_QUERIES: List[Tuple[Tuple[str, ...], Tuple[str, ...]]] = [
    (("QueryRetrieveLevel=STUDY", "PatientName=Smith*"), STUDY_KEYS + ("PatientBirthDate",)),
    (("QueryRetrieveLevel=STUDY", "PatientName=Jone?^Pat0001*"), STUDY_KEYS + ("PatientBirthDate",)),
    (("QueryRetrieveLevel=STUDY", "PatientName=Rossi*"), STUDY_KEYS + ("PatientBirthDate",)),
    (("QueryRetrieveLevel=STUDY", "PatientName=*^Pat000?"), STUDY_KEYS + ("PatientBirthDate",)),
    (("QueryRetrieveLevel=STUDY", "PatientName=Jones^Mary"), STUDY_KEYS + ("PatientBirthDate",)),
    (("QueryRetrieveLevel=STUDY", "PatientName=Smith^Mary"), STUDY_KEYS + ("PatientBirthDate",)),
    (("QueryRetrieveLevel=STUDY", "PatientID=PIDC01"), STUDY_KEYS + ("PatientBirthDate",)),
    (("QueryRetrieveLevel=STUDY", "PatientID=PIDX0?"), STUDY_KEYS + ("PatientBirthDate",)),
    (("QueryRetrieveLevel=STUDY", "PatientBirthDate=19800101"), STUDY_KEYS + ("PatientBirthDate",)),
    (("QueryRetrieveLevel=STUDY", "PatientBirthDate=19500101-19541231"), STUDY_KEYS + ("PatientBirthDate",)),
    (("QueryRetrieveLevel=STUDY", "PatientName=Novak*", "PatientBirthDate=-19591231"),
     STUDY_KEYS + ("PatientBirthDate",)),
]


class DcmqrscpDifferentialTests(unittest.TestCase):
    """The same corpus in dcmqrscp and in the Disk-Server; the same findscu queries to both; the
    same sets of returned key values."""

    timeout = 120
    skip = _need(FINDSCU, DCMQRSCP, DCMQRIDX)

    async def start_dcmqrscp(self, datasets: Sequence[Dataset]) -> int:
        """dcmqrscp with ``datasets`` indexed by dcmqridx into its storage area; returns its port."""
        folder = os.path.abspath(self.mktemp())
        storage = os.path.join(folder, "QRSCP")
        files = os.path.join(folder, "files")
        os.makedirs(storage)
        os.makedirs(files)
        paths = [write_part10(os.path.join(files, f"{ds.SOPInstanceUID}.dcm"), ds, "1.2.840.10008.1.2.1")
                 for ds in datasets]
        out, err, code = await getProcessOutputAndValue(DCMQRIDX, [storage, *paths], env=dict(os.environ), path=folder)
        self.assertEqual(code, 0, (out + err).decode("utf-8", "replace"))
        port = free_port()
        config = write_file(self, "NetworkTCPPort = 104\nMaxPDUSize = 16384\nMaxAssociations = 16\n"
                                  "HostTable BEGIN\nHostTable END\nVendorTable BEGIN\nVendorTable END\n"
                                  f"AETable BEGIN\nQRSCP {storage} RW (100, 100mb) ANY\nAETable END\n",
                            name="dcmqrscp.cfg")
        # --fork (the default): dcmqrscp 3.6.7's --single-process crashes after an association
        peer = spawn_peer(self, [DCMQRSCP, "-c", config, str(port)], path=folder)
        timeouts = Timeouts(artim=5.0, association=10.0, dimse=10.0, idle=None)

        def connect():
            return requestor.connect(reactor, "127.0.0.1", port, "APPLIANCE", "QRSCP", timeouts=timeouts,
                                     implementation_class_uid=IMPLEMENTATION_CLASS_UID,
                                     implementation_version_name="TESTS")

        association = await connect_when_listening(reactor, connect, peer)
        await association.release()
        return port

    async def compare(self, datasets: Sequence[Dataset], filler, queries) -> None:
        """Every query of ``queries`` returns the same set of key values from both, and each is answered
        Success by both."""
        reference = await self.start_dcmqrscp(datasets)
        server = QueryServer(self, filler)
        nonempty = 0
        for keys, compared in queries:
            asked = list(keys) + [key for key in compared if not any(k.split("=")[0] == key for k in keys)]
            ours, theirs = await defer.gatherResults([
                defer.ensureDeferred(findscu(server.port, asked)),
                defer.ensureDeferred(findscu(reference, asked, "QRSCP")),
            ], consumeErrors=True)
            with self.subTest(query=keys):
                self.assertEqual((ours.final, theirs.final), ("Success", "Success"), ours.tail() + theirs.tail())
                self.assertEqual(ours.values(*compared), theirs.values(*compared), f"{keys}")
            nonempty += bool(ours.responses)
        self.assertGreaterEqual(nonempty, len(queries) - 3)

    @deferred_test
    async def test_same_answers(self):
        await self.compare(corpus(), fill_corpus, DIFFERENTIAL_QUERIES)

    @deferred_test
    async def test_same_answers_when_one_patient_id_has_two_names(self):
        """Issue 8: studies of one Patient ID under different names are matched and answered as dcmqrscp does,
        each with its own objects' name and birth date."""
        await self.compare(conflict_corpus(), fill_conflicts, CONFLICT_QUERIES)


class RequestorFindMoveTests(unittest.TestCase):
    """The requestor's find() and move() (what the Memory-Manager and the web pages use) against the Disk-Server,
    with connect_device() and Message IDs unique across the associations of one AE."""

    timeout = 60

    def device(self, port: int, **extra):
        table = {"ae_title": "DISK_SERVER", "host": "127.0.0.1", "port": port, "timeout": 10}
        table.update(extra)
        return configuration.parse({"devices": {"archive": table}}, "/x.toml").devices["archive"]

    async def open(self, server: QueryServer, message_ids=None):
        from appliance.dicom.uids import STUDY_ROOT_MOVE, UNCOMPRESSED_TRANSFER_SYNTAXES

        return await requestor.connect_device(
            reactor, self.device(server.port), "FINDER",
            [(STUDY_ROOT_FIND, UNCOMPRESSED_TRANSFER_SYNTAXES), (STUDY_ROOT_MOVE, UNCOMPRESSED_TRANSFER_SYNTAXES)],
            implementation_class_uid=IMPLEMENTATION_CLASS_UID, implementation_version_name="TESTS",
            message_ids=message_ids)

    @deferred_test
    async def test_find_move_and_message_ids(self):
        server = QueryServer(self, fill_corpus)
        ids = requestor.MessageIds()
        first, second = await self.open(server, ids), await self.open(server, ids)
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.PatientName = "Doe*"
        query.AccessionNumber = ""
        stream = first.find(query)
        responses = [response async for response in stream]
        self.assertEqual([r.status for r in responses], [0xFF00] * 4 + [0x0000])
        self.assertEqual(responses[0].command.MessageIDBeingRespondedTo, 1)
        move = Dataset()
        move.QueryRetrieveLevel = "STUDY"
        move.StudyInstanceUID = study_uid(0)
        final = await second.move(move, "NOWHERE").final()
        self.assertEqual((final.status, final.command.MessageIDBeingRespondedTo), (0xA801, 2))
        self.assertEqual((await first.find(query).final()).command.MessageIDBeingRespondedTo, 3)
        await first.release()
        await second.release()

    @deferred_test
    async def test_find_cancelled(self):
        server = QueryServer(self, fill_many)
        association = await self.open(server)
        query = Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        query.StudyInstanceUID = f"{ROOT}.99"
        query.SeriesInstanceUID = f"{ROOT}.99.1"
        query.SOPInstanceUID = ""
        stream = association.find(query)
        statuses = []
        try:
            async for response in stream:
                statuses.append(response.status)
                if len(statuses) == 1:
                    stream.cancel()
        finally:
            await association.release()
        # the cancel races the last batches: either it stopped the query, or every match was sent before it came
        if statuses[-1] == 0xFE00:
            self.assertLess(len(statuses), 151)
        else:
            self.assertEqual((statuses[-1], len(statuses)), (0x0000, 151))
        self.assertEqual(set(statuses[:-1]), {0xFF00})

    @deferred_test
    async def test_device_with_tls_but_no_context(self):
        import dataclasses

        device = dataclasses.replace(self.device(1), tls=configuration.TLSConfig())  # tls = true, no context built
        with self.assertRaises(requestor.AssociationError) as raised:
            await requestor.connect_device(reactor, device, "FINDER", implementation_class_uid=IMPLEMENTATION_CLASS_UID,
                                           implementation_version_name="TESTS")
        self.assertIn("no TLS context for device 'archive'", str(raised.exception))
