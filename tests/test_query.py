"""Study Root C-FIND: build_query and QueryRun on an archive's index, and the FindService driven
through an in-memory association (StringTransport, synchronous runners, a Clock).

The archives are filled through :class:`appliance.archive.archive.Archive` with synchronous
runners (tests/support_query.py): the generated corpus (9 studies of 5 patients, 13 series,
27 instances), pydicom's character-set files, or 150 instances of one series.
"""

from __future__ import annotations

import os
from typing import Dict, List, NamedTuple, Optional
from typing import Sequence as Seq

from pydicom.charset import python_encoding
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.sequence import Sequence
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from appliance import config as configuration
from appliance.ae.listeners import acceptor_factory, disk_server_services
from appliance.ae.query import BATCH, find_extended_negotiation, response_character_set
from appliance.archive import query as query_module
from appliance.archive.query import QueryError, QueryRun, build_query
from appliance.dicom import dimse as D
from appliance.dicom import pdu as P
from appliance.dicom.uids import (
    EXPLICIT_VR_BIG_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    STUDY_ROOT_FIND,
)
from appliance.net.threads import synchronous_runner

from .support import capture_log
from .support_data import encode_dataset, make_dataset
from .support_query import (
    ROOT,
    SOP_CLASSES,
    archive_copy,
    charset_files,
    fill_charsets,
    fill_corpus,
    fill_many,
    series_uid,
    sop_uid,
    store_dataset,
    study_uid,
)
from .support_scu import MemorySCU

MAX_PDU = 16384
PENDING, PENDING_WARNING, SUCCESS, CANCEL = 0xFF00, 0xFF01, 0x0000, 0xFE00
OUT_OF_RESOURCES, DOES_NOT_MATCH, CANNOT_UNDERSTAND = 0xA700, 0xA900, 0xC000


def identifier(level: Optional[str], **keys) -> Dataset:
    """A C-FIND identifier: Query/Retrieve Level (None: none) and keys by keyword (value '' = return key)."""
    ds = Dataset()
    if level is not None:
        ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def accessions(results) -> set:
    """The Accession Numbers of query results (DICOM JSON dicts or Datasets)."""
    found = set()
    for result in results:
        ds = Dataset.from_json(result) if isinstance(result, dict) else result
        found.add(str(ds.AccessionNumber))
    return found


def run_query(archive, ds: Dataset, **options) -> List[dict]:
    """build_query + QueryRun on ``archive``'s index, every match (DICOM JSON), in small batches."""
    run = QueryRun(archive.index_path, build_query(ds, **options))
    results = []
    try:
        while not run.done:
            results.extend(run.fetch(5))
    finally:
        run.close()
    return results


# --- an in-memory Disk-Server ------------------------------------------------------------------------


class Response(NamedTuple):
    """One C-FIND-RSP: its command set, its identifier as pydicom reads it, and the identifier's bytes."""

    command: D.Command
    identifier: Optional[Dataset]
    raw: Optional[bytes]

    @property
    def status(self) -> int:
        return self.command.Status


def decode_identifier(data: bytes, transfer_syntax: str) -> Dataset:
    """A response identifier read by pydicom itself; its text values decode with its own character set."""
    ds = read_dataset(DicomBytesIO(data), transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN,
                      transfer_syntax != EXPLICIT_VR_BIG_ENDIAN)
    ds.decode()
    return ds


class SteppedRunner:
    """The query runner of a test: runs work at once, but holds each ``fetch`` result until the
    test releases it, so a test can act between batches (cancel, pause, abort)."""

    def __init__(self) -> None:
        self.calls: List[str] = []
        self.held: List[tuple] = []
        self.hold = True

    def __call__(self, function, *args, **kwargs) -> defer.Deferred:
        self.calls.append(function.__name__)
        if function.__name__ != "fetch" or not self.hold:
            return defer.maybeDeferred(function, *args, **kwargs)
        gate = defer.Deferred()
        self.held.append((gate, function(*args, **kwargs)))
        return gate

    def release(self) -> None:
        gate, value = self.held.pop(0)
        gate.callback(value)


class FindHarness:
    """The Disk-Server's services over a copy of a prepared archive, one association at a time."""

    def __init__(self, test: SynchronousTestCase, *fillers, read=synchronous_runner, **settings) -> None:
        self.test = test
        root = os.path.abspath(test.mktemp())
        os.makedirs(root)
        self.clock = Clock()
        self.clock.advance(1_000_000)
        table = {"min_free_space": 0}
        table.update(settings)
        self.config = configuration.parse({"appliance": {"data_dir": root}, "disk_server": table},
                                          os.path.join(root, "appliance.toml"))
        self.archive = archive_copy(self.config.archive.path, *fillers)
        test.addCleanup(self.archive.close)
        self.services = disk_server_services(self.config, self.archive, read)
        self.factory = acceptor_factory(self.config.disk_server, self.config, self.services, self.clock)
        self.message_id = 0

    def associate(self, transfer_syntax: str = EXPLICIT_VR_LITTLE_ENDIAN, extended: Optional[bytes] = None):
        """Open an association proposing Study Root FIND (with SOP class extended negotiation
        ``extended`` if given); returns the A-ASSOCIATE-AC."""
        self.scu = MemorySCU(self.test, self.factory, calling="FINDSCU", max_pdu=MAX_PDU)
        items = () if extended is None else (P.SOPClassExtended(STUDY_ROOT_FIND, extended),)
        accept = self.scu.associate([(STUDY_ROOT_FIND, (transfer_syntax,))], items)
        self.protocol, self.transport = self.scu.protocol, self.scu.transport
        self.test.assertEqual(accept.presentation_contexts[0].result, 0)
        self.transfer_syntax = transfer_syntax
        return accept

    def send_find(self, ds: Dataset, data: Optional[bytes] = None) -> int:
        """Send a C-FIND-RQ with ``ds`` (or raw ``data``) as identifier; returns its Message ID."""
        self.message_id += 1
        command = D.Command(CommandField=D.CommandField.C_FIND_RQ, MessageID=self.message_id, Priority=0,
                            AffectedSOPClassUID=STUDY_ROOT_FIND)
        self.scu.send(command, encode_dataset(ds, self.transfer_syntax) if data is None else data)
        return self.message_id

    def send_cancel(self, message_id: int) -> None:
        self.scu.send(D.Command(CommandField=D.CommandField.C_CANCEL_RQ, MessageIDBeingRespondedTo=message_id))

    def responses(self) -> List[Response]:
        """The responses written since the last call, decoded."""
        found = []
        for message in self.scu.messages():
            self.test.assertEqual(message.command.CommandField, D.CommandField.C_FIND_RSP)
            identifier = None if message.data is None else decode_identifier(message.data, self.transfer_syntax)
            found.append(Response(message.command, identifier, message.data))
        return found

    def find(self, ds: Dataset) -> List[Response]:
        """One whole C-FIND: its responses, the final one last (checked to be the last)."""
        message_id = self.send_find(ds)
        found = self.responses()
        self.test.assertTrue(found, "no response at all")
        for response in found:
            self.test.assertEqual(response.command.MessageIDBeingRespondedTo, message_id)
            self.test.assertEqual(response.command.AffectedSOPClassUID, STUDY_ROOT_FIND)
        self.test.assertEqual([r.status in (PENDING, PENDING_WARNING) for r in found[:-1]], [True] * (len(found) - 1))
        self.test.assertNotIn(found[-1].status, (PENDING, PENDING_WARNING))
        return found


def identifiers(responses: Seq[Response]) -> List[Dataset]:
    return [response.identifier for response in responses if response.identifier is not None]


def keywords(ds: Dataset) -> set:
    return {element.keyword for element in ds}


# --- build_query: the information model --------------------------------------------------------------


class BuildQueryTests(SynchronousTestCase):
    """build_query refuses identifiers that break the Study Root model with QueryError(A900, comment)."""

    def refusal(self, ds: Dataset) -> QueryError:
        with self.assertRaises(QueryError) as caught:
            build_query(ds)
        self.assertEqual(caught.exception.status, DOES_NOT_MATCH)
        self.assertLessEqual(len(caught.exception.comment), 64)  # an Error Comment is LO
        return caught.exception

    def test_patient_level_refused(self):
        """PATIENT is no level of the Study Root model."""
        self.assertIn("no PATIENT level", self.refusal(identifier("PATIENT", PatientName="Doe*")).comment)

    def test_missing_and_unknown_level(self):
        """No Query/Retrieve Level, an empty one, or an unknown one is refused, naming the key."""
        self.assertIn("no Query/Retrieve Level", self.refusal(identifier(None, PatientName="Doe*")).comment)
        self.assertIn("no Query/Retrieve Level", self.refusal(identifier("", PatientName="Doe*")).comment)
        self.assertIn("FRAME is not STUDY/SERIES/IMAGE", self.refusal(identifier("FRAME")).comment)

    def test_series_needs_one_study_uid(self):
        """SERIES level without a Study Instance UID, with two, or with a wildcard is refused."""
        for value in ("", f"{study_uid(0)}\\{study_uid(1)}", f"{ROOT}.*"):
            with self.subTest(value=value):
                comment = self.refusal(identifier("SERIES", StudyInstanceUID=value, Modality="")).comment
                self.assertEqual(comment, "SERIES level needs a single StudyInstanceUID (unique key above)")
        comment = self.refusal(identifier("SERIES", Modality="CT")).comment
        self.assertIn("StudyInstanceUID", comment)

    def test_image_needs_study_and_series_uid(self):
        """IMAGE level needs one Study and one Series Instance UID."""
        self.assertIn("StudyInstanceUID", self.refusal(identifier("IMAGE", SeriesInstanceUID=series_uid(0, 0))).comment)
        comment = self.refusal(identifier("IMAGE", StudyInstanceUID=study_uid(0), SOPInstanceUID="")).comment
        self.assertEqual(comment, "IMAGE level needs a single SeriesInstanceUID (unique key above)")

    def test_each_level_accepted(self):
        """STUDY, SERIES and IMAGE identifiers with their unique keys above are planned at their level."""
        self.assertEqual(build_query(identifier("STUDY")).level, "STUDY")
        self.assertEqual(build_query(identifier("SERIES", StudyInstanceUID=study_uid(0))).level, "SERIES")
        image = identifier("IMAGE", StudyInstanceUID=study_uid(0), SeriesInstanceUID=series_uid(0, 0))
        self.assertEqual(build_query(image).level, "IMAGE")

    def test_unsupported_keys_listed(self):
        """Keys the index does not keep, private ones, and keys below the level are unsupported."""
        ds = identifier("STUDY", PatientName="", Manufacturer="", SOPInstanceUID="", Modality="")
        ds.add_new(0x00091010, "LO", "x")
        self.assertEqual(build_query(ds).unsupported, ["00080018", "00080060", "00080070", "00091010"])
        self.assertEqual(build_query(identifier("STUDY", PatientName="")).unsupported, [])
        # (retired) group lengths, as some requestors still send, are no keys: not a reason for FF01
        with_lengths = identifier("STUDY", PatientName="")
        with_lengths.add_new(0x00080000, "UL", 16)
        with_lengths.add_new(0x00100000, "UL", 8)
        self.assertEqual(build_query(with_lengths).unsupported, [])

    def test_values_are_parameters(self):
        """Key values never enter the SQL text: they are parameters."""
        hostile = "' OR 1=1 --"
        query = build_query(identifier("STUDY", PatientID=hostile, AccessionNumber="A*", StudyDate="20240101-",
                                       StudyInstanceUID="1.2\\1.3", PatientName="x'; DROP TABLE patients; --"))
        self.assertNotIn("OR 1=1", query.sql)
        self.assertNotIn("DROP", query.sql)
        self.assertIn(hostile, query.params)
        self.assertIn("x'; DROP TABLE patients; --", query.params)

    def test_long_uid_list_not_pushed_to_sql(self):
        """A UID list longer than MAX_SQL_LIST is matched in Python only (SQLite limits parameters)."""
        uids = "\\".join(f"1.2.3.{n}" for n in range(query_module.MAX_SQL_LIST + 1))
        query = build_query(identifier("STUDY", StudyInstanceUID=uids))
        self.assertEqual(query.params, [])
        self.assertNotIn("WHERE", query.sql)

    def test_combined_date_time_only_when_negotiated(self):
        """Study Date and Time ranges are one date-time range only with combined_date_time."""
        ds = identifier("STUDY", StudyDate="20231231-20240101", StudyTime="2300-0100")
        self.assertEqual(build_query(ds).combined, [])
        combined = build_query(ds, combined_date_time=True).combined
        self.assertEqual([(date, time) for date, time, _ in combined], [("StudyDate", "StudyTime")])
        single = identifier("STUDY", StudyDate="20240101", StudyTime="2300-0100")
        self.assertEqual(build_query(single, combined_date_time=True).combined, [])


# --- QueryRun on the generated corpus ---------------------------------------------------------------------


class QueryRunTests(SynchronousTestCase):
    """Matching types of PS3.4 C.2.2.2 on the corpus, through build_query and QueryRun."""

    def setUp(self):
        self.archive = archive_copy(os.path.abspath(self.mktemp()), fill_corpus)
        self.addCleanup(self.archive.close)

    def study(self, **keys) -> set:
        """The Accession Numbers of the studies matching ``keys``."""
        keys.setdefault("AccessionNumber", "")
        return accessions(run_query(self.archive, identifier("STUDY", **keys)))

    def test_corpus_counts(self):
        """The corpus is what the other tests assume: 5 patients, 9 studies, 13 series, 27 instances."""
        self.assertEqual(self.archive.index.counts(), (5, 9, 13, 27))

    def test_universal_matching(self):
        """An empty value and "*" match every study, and return the key."""
        every = {f"ACC100{n}" for n in range(1, 10)}
        self.assertEqual(self.study(), every)
        self.assertEqual(self.study(PatientName="*"), every)
        self.assertEqual(self.study(PatientName="", StudyDate="", ModalitiesInStudy="*"), every)

    def test_single_value_matching(self):
        """Single values match exactly, case included, on text, dates and numbers."""
        self.assertEqual(self.study(PatientID="PID003"), {"ACC1005", "ACC1006"})
        self.assertEqual(self.study(PatientName="Doe^Jane"), {"ACC1003", "ACC1004"})
        self.assertEqual(self.study(PatientName="DOE^JANE"), set())
        self.assertEqual(self.study(StudyDate="20240229"), {"ACC1006"})
        self.assertEqual(self.study(StudyID="S7"), {"ACC1007"})
        self.assertEqual(self.study(PatientSex="O"), {"ACC1008", "ACC1009"})
        self.assertEqual(self.study(StudyDescription="CT"), set())

    def test_uid_list_matching(self):
        """A list of UIDs matches any of them, at each level."""
        self.assertEqual(self.study(StudyInstanceUID=f"{study_uid(0)}\\{study_uid(8)}\\1.2.3.4"),
                         {"ACC1001", "ACC1009"})
        series = run_query(self.archive, identifier("SERIES", StudyInstanceUID=study_uid(5),
                                                    SeriesInstanceUID=f"{series_uid(5, 0)}\\{series_uid(5, 2)}"))
        self.assertEqual({Dataset.from_json(r).SeriesInstanceUID for r in series}, {series_uid(5, 0), series_uid(5, 2)})
        images = run_query(self.archive, identifier("IMAGE", StudyInstanceUID=study_uid(5), SeriesInstanceUID=series_uid(5, 0),
                                                    SOPInstanceUID=f"{sop_uid(5, 0, 0)}\\{sop_uid(5, 0, 2)}"))
        self.assertEqual({Dataset.from_json(r).SOPInstanceUID for r in images}, {sop_uid(5, 0, 0), sop_uid(5, 0, 2)})

    def test_wildcard_matching(self):
        """* matches any run of characters and ? exactly one, anywhere in the value."""
        self.assertEqual(self.study(PatientName="Doe*"), {"ACC1001", "ACC1002", "ACC1003", "ACC1004"})
        self.assertEqual(self.study(PatientName="Smith*"), {"ACC1005", "ACC1006", "ACC1007"})
        self.assertEqual(self.study(PatientName="Smith^*"), {"ACC1005", "ACC1006"})
        self.assertEqual(self.study(PatientName="?oe^Ja??"), {"ACC1003", "ACC1004"})
        self.assertEqual(self.study(PatientName="?oe^Ja?"), set())
        self.assertEqual(self.study(PatientName="*^J*"), {"ACC1001", "ACC1002", "ACC1003", "ACC1004", "ACC1007"})
        self.assertEqual(self.study(PatientName="O'Brien*"), {"ACC1008", "ACC1009"})
        self.assertEqual(self.study(StudyDescription="*ABDOMEN"), {"ACC1004", "ACC1005"})
        self.assertEqual(self.study(ReferringPhysicianName="House*"), {"ACC1001", "ACC1003", "ACC1009"})
        self.assertEqual(self.study(AccessionNumber="ACC100?"), {f"ACC100{n}" for n in range(1, 10)})

    def test_date_range_matching(self):
        """DA ranges: closed, open at either end, across a year end; bounds included."""
        self.assertEqual(self.study(StudyDate="20240101-20240301"), {"ACC1004", "ACC1005", "ACC1006", "ACC1007"})
        self.assertEqual(self.study(StudyDate="-20231231"), {"ACC1001", "ACC1002", "ACC1003"})
        self.assertEqual(self.study(StudyDate="20240415-"), {"ACC1008", "ACC1009"})
        self.assertEqual(self.study(StudyDate="20231231-20240101"), {"ACC1003", "ACC1004"})
        self.assertEqual(self.study(PatientBirthDate="19700101-19791231"), {"ACC1001", "ACC1002", "ACC1003", "ACC1004"})
        self.assertEqual(self.study(StudyDate="20250101-"), set())

    def test_time_range_matching(self):
        """TM ranges, open at either end; a partial time covers its whole span."""
        self.assertEqual(self.study(StudyTime="0800-1000"), {"ACC1001", "ACC1007"})
        self.assertEqual(self.study(StudyTime="-080000"), {"ACC1004", "ACC1009"})
        self.assertEqual(self.study(StudyTime="120000-"), {"ACC1002", "ACC1003", "ACC1006", "ACC1008"})
        self.assertEqual(self.study(StudyTime="10"), {"ACC1005"})  # 10:00:00 to 10:59:59.999999
        self.assertEqual(self.study(StudyTime="2300-0100"), set())  # low above high: nothing

    def test_date_time_range_matching(self):
        """DT ranges on Acquisition DateTime: fractions, open ends, UTC offsets (not compared)."""
        def images(value):
            found = run_query(self.archive, identifier("IMAGE", StudyInstanceUID=study_uid(5),
                                                       SeriesInstanceUID=series_uid(5, 0), SOPInstanceUID="",
                                                       AcquisitionDateTime=value))
            return {Dataset.from_json(r).SOPInstanceUID for r in found}

        first, second, third = (sop_uid(5, 0, n) for n in range(3))  # acquired at 12:00:00.0, .1 and .2
        self.assertEqual(images("20240229120000.1-"), {second, third})
        self.assertEqual(images("-20240229120000.05"), {first})
        self.assertEqual(images("20240229120000.1+0100-20240229120000.2+0100"), {second, third})
        self.assertEqual(images("20240229120000.1-0500-20240229120000.1-0500"), {second})
        self.assertEqual(images("2024-2024"), {first, second, third})
        self.assertEqual(images("20240229"), {first, second, third})
        self.assertEqual(images("20240301-"), set())

    def test_combined_date_time_matching(self):
        """With combined date-time matching, Study Date and Time ranges are one range (PS3.4
        C.2.2.2.5.1): 2023-12-31 23:00 to 2024-01-01 01:00 finds the studies at 23:59:59 and
        00:00:01, which separate matching (times 23:00 to 01:00) does not."""
        keys = dict(StudyDate="20231231-20240101", StudyTime="2300-0100")
        self.assertEqual(self.study(**keys), set())
        found = accessions(run_query(self.archive, identifier("STUDY", AccessionNumber="", **keys),
                                     combined_date_time=True))
        self.assertEqual(found, {"ACC1003", "ACC1004"})
        # from 2024-04-15 12:00 on: 2024-04-16 07:15 too, which separate matching (times from 12:00) drops
        self.assertEqual(self.study(StudyDate="20240415-", StudyTime="1200-"), {"ACC1008"})
        after = accessions(run_query(self.archive, identifier("STUDY", AccessionNumber="", StudyDate="20240415-",
                                                              StudyTime="1200-"), combined_date_time=True))
        self.assertEqual(after, {"ACC1008", "ACC1009"})
        before = accessions(run_query(self.archive, identifier("STUDY", AccessionNumber="", StudyDate="-20230610",
                                                               StudyTime="-1200"), combined_date_time=True))
        self.assertEqual(before, {"ACC1001"})  # 2023-06-10 14:30 is after 12:00 that day

    def test_multi_valued_attributes_match_any_value(self):
        """Image Type (stored multi-valued) matches on any of its values; Modalities in Study too."""
        def images(value):
            found = run_query(self.archive, identifier("IMAGE", StudyInstanceUID=study_uid(5),
                                                       SeriesInstanceUID=series_uid(5, 0), SOPInstanceUID="",
                                                       ImageType=value))
            return {Dataset.from_json(r).SOPInstanceUID: list(Dataset.from_json(r).ImageType) for r in found}

        self.assertEqual(images("AXIAL"), {sop_uid(5, 0, 0): ["ORIGINAL", "PRIMARY", "AXIAL"],
                                           sop_uid(5, 0, 2): ["ORIGINAL", "PRIMARY", "AXIAL"]})
        self.assertEqual(set(images("SECONDARY")), {sop_uid(5, 0, 1)})
        self.assertEqual(set(images("*ARY")), {sop_uid(5, 0, n) for n in range(3)})
        self.assertEqual(self.study(ModalitiesInStudy="SR"), {"ACC1004", "ACC1006", "ACC1009"})
        self.assertEqual(self.study(ModalitiesInStudy="CT\\US"), {"ACC1001", "ACC1004", "ACC1005", "ACC1007"})
        self.assertEqual(self.study(ModalitiesInStudy="?R"), {"ACC1002", "ACC1003", "ACC1004", "ACC1006", "ACC1008", "ACC1009"})

    def test_multiple_values_in_a_text_key(self):
        """A backslash-separated value matches any of its values (PS3.4 C.2.2.2.8)."""
        self.assertEqual(self.study(AccessionNumber="ACC1001\\ACC1009"), {"ACC1001", "ACC1009"})
        self.assertEqual(self.study(PatientName="Doe^John\\O'Brien^Pat"), {"ACC1001", "ACC1002", "ACC1008", "ACC1009"})

    def test_computed_study_attributes(self):
        """Number of Study Related Series/Instances, Modalities and SOP Classes in Study are computed."""
        (result,) = run_query(self.archive, identifier(
            "STUDY", AccessionNumber="ACC1006", NumberOfStudyRelatedSeries="", NumberOfStudyRelatedInstances="",
            ModalitiesInStudy="", SOPClassesInStudy=""))
        ds = Dataset.from_json(result)
        self.assertEqual((ds.NumberOfStudyRelatedSeries, ds.NumberOfStudyRelatedInstances), (3, 6))
        self.assertEqual(list(ds.ModalitiesInStudy), ["MR", "SR"])
        self.assertEqual(list(ds.SOPClassesInStudy), sorted([SOP_CLASSES["MR"], SOP_CLASSES["SR"]]))
        counts = {}
        for result in run_query(self.archive, identifier("STUDY", AccessionNumber="", NumberOfStudyRelatedInstances="")):
            ds = Dataset.from_json(result)
            counts[str(ds.AccessionNumber)] = int(ds.NumberOfStudyRelatedInstances)
        self.assertEqual(counts, {"ACC1001": 4, "ACC1002": 2, "ACC1003": 3, "ACC1004": 4, "ACC1005": 2,
                                  "ACC1006": 6, "ACC1007": 1, "ACC1008": 2, "ACC1009": 3})

    def test_series_level_and_its_computed_attribute(self):
        """SERIES level within one study: Modality, Series Number and Number of Series Related Instances."""
        found = run_query(self.archive, identifier("SERIES", StudyInstanceUID=study_uid(5), SeriesInstanceUID="",
                                                   Modality="", SeriesNumber="", NumberOfSeriesRelatedInstances=""))
        rows = sorted((int(ds.SeriesNumber), str(ds.Modality), int(ds.NumberOfSeriesRelatedInstances))
                      for ds in map(Dataset.from_json, found))
        self.assertEqual(rows, [(1, "MR", 3), (2, "MR", 2), (3, "SR", 1)])
        mr = run_query(self.archive, identifier("SERIES", StudyInstanceUID=study_uid(5), SeriesInstanceUID="",
                                                Modality="MR"))
        self.assertEqual({Dataset.from_json(r).SeriesInstanceUID for r in mr}, {series_uid(5, 0), series_uid(5, 1)})
        self.assertEqual(run_query(self.archive, identifier("SERIES", StudyInstanceUID=f"{ROOT}.404", Modality="")), [])

    def test_image_level(self):
        """IMAGE level within one series: Instance Number, SOP Class UID, Content Date and Time."""
        found = run_query(self.archive, identifier("IMAGE", StudyInstanceUID=study_uid(5), SeriesInstanceUID=series_uid(5, 0),
                                                   SOPInstanceUID="", InstanceNumber="2", SOPClassUID="", ContentDate="",
                                                   ContentTime="120000"))
        (ds,) = map(Dataset.from_json, found)
        self.assertEqual((ds.SOPInstanceUID, ds.SOPClassUID, ds.ContentDate), (sop_uid(5, 0, 1), SOP_CLASSES["MR"], "20240229"))
        # a series of another study named with this study's UID matches nothing: no relational search
        self.assertEqual(run_query(self.archive, identifier("IMAGE", StudyInstanceUID=study_uid(0),
                                                            SeriesInstanceUID=series_uid(5, 0))), [])

    def test_sequence_matching(self):
        """A sequence key with one item matches the items whose non-empty keys match, and returns the
        item with the asked keys only; a zero-item sequence is universal."""
        def code(value, meaning=""):
            item = Dataset()
            item.CodeValue = value
            item.CodeMeaning = meaning
            return Sequence([item])

        (match,) = run_query(self.archive, identifier("STUDY", AccessionNumber="", ProcedureCodeSequence=code("CTCHEST")))
        ds = Dataset.from_json(match)
        self.assertEqual(ds.AccessionNumber, "ACC1007")
        (item,) = ds.ProcedureCodeSequence
        self.assertEqual(keywords(item), {"CodeValue", "CodeMeaning"})
        self.assertEqual((item.CodeValue, item.CodeMeaning), ("CTCHEST", "CT CHEST"))
        self.assertEqual(self.study(ProcedureCodeSequence=code("CT*")), {"ACC1001", "ACC1007"})
        self.assertEqual(self.study(ProcedureCodeSequence=code("MRKNEE")), set())
        everything = run_query(self.archive, identifier("STUDY", AccessionNumber="", ProcedureCodeSequence=Sequence([])))
        self.assertEqual(len(everything), 9)
        with_codes = {str(ds.AccessionNumber): len(ds.ProcedureCodeSequence) for ds in map(Dataset.from_json, everything)}
        self.assertEqual(with_codes["ACC1001"], 1)
        self.assertEqual(with_codes["ACC1002"], 0)

    def test_returns_exactly_the_keys_asked(self):
        """A result holds the keys asked for, and only those (empty when the object has no value)."""
        (result,) = run_query(self.archive, identifier("STUDY", AccessionNumber="ACC1004", PatientName="",
                                                       ReferringPhysicianName="", StudyDescription=""))
        ds = Dataset.from_json(result)
        self.assertEqual(keywords(ds), {"AccessionNumber", "PatientName", "ReferringPhysicianName", "StudyDescription"})
        self.assertEqual(ds.ReferringPhysicianName, "")  # ACC1004 has none
        self.assertEqual((ds.PatientName, ds.StudyDescription), ("Doe^Jane", "CT ABDOMEN"))

    def test_sql_injection_and_like_characters_match_literally(self):
        """' OR 1=1 --, %, _ and [ in key values match only values holding them literally."""
        for value in ("' OR 1=1 --", "%", "PID00_", "_", "[P]ID001", "PID[0-9]*", "' OR ''='"):
            with self.subTest(value=value):
                self.assertEqual(self.study(PatientID=value), set())
                self.assertEqual(self.study(PatientName=value), set())
                self.assertEqual(self.study(AccessionNumber=value), set())
        # no '=' in the name: '=' separates component groups, which the SQL prefilter leaves alone
        literal = make_dataset(patient="100%_[x]^Y' OR ''--", patient_id="%_[1]", study=f"{ROOT}.50",
                               series=f"{ROOT}.50.1", sop=f"{ROOT}.50.1.1")
        literal.AccessionNumber = "A[1]%"
        store_dataset(self.archive, literal)
        self.assertEqual(self.study(PatientName="100%_[x]^Y' OR ''--"), {"A[1]%"})
        self.assertEqual(self.study(PatientName="100%_[x]^Y"), set())
        self.assertEqual(self.study(PatientName="100%_[x]*"), {"A[1]%"})
        self.assertEqual(self.study(PatientName="100%_[?]^Y*"), {"A[1]%"})
        self.assertEqual(self.study(PatientID="%_[1]"), {"A[1]%"})
        self.assertEqual(self.study(PatientID="%_[?]"), {"A[1]%"})
        self.assertEqual(self.study(AccessionNumber="A[1]%"), {"A[1]%"})
        self.assertEqual(self.study(PatientID="%_[2]"), set())
        self.assertEqual(self.archive.index.counts(), (6, 10, 14, 28))  # nothing was changed by a query

    def test_sql_prefilter_never_drops_a_match(self):
        """For many queries the SQL conditions select a superset: the results equal those of the
        Python matchers alone (no SQL condition at all)."""
        queries = [
            identifier("STUDY", AccessionNumber="", PatientName="Doe*"),
            identifier("STUDY", AccessionNumber="", PatientName="Smith^Anna"),
            identifier("STUDY", AccessionNumber="", PatientID="PID00?", StudyDate="20230101-20240101"),
            identifier("STUDY", AccessionNumber="", StudyInstanceUID=f"{study_uid(1)}\\{study_uid(2)}"),
            identifier("STUDY", AccessionNumber="ACC100*", ModalitiesInStudy="SR\\US"),
            identifier("STUDY", AccessionNumber="", PatientBirthDate="-19751231", PatientSex="F"),
            identifier("STUDY", AccessionNumber="", PatientName="Doe^Jane\\Smith*"),
            identifier("STUDY", AccessionNumber="", PatientName="Doe*=\\O'Brien^Pat"),
            identifier("STUDY", AccessionNumber="", PatientName="*=\\Smithers*"),
            identifier("SERIES", StudyInstanceUID=study_uid(5), SeriesInstanceUID="", Modality="M?", SeriesNumber="1\\3"),
            identifier("IMAGE", StudyInstanceUID=study_uid(5), SeriesInstanceUID=series_uid(5, 0), SOPInstanceUID="",
                       SOPClassUID=SOP_CLASSES["MR"], InstanceNumber="3"),
        ]
        for ds in queries:
            with self.subTest(query=str(ds)):
                with_sql = run_query(self.archive, ds)
                self.assertTrue(with_sql, "a query of this test must match something")
                original = query_module._pushdown
                query_module._pushdown = lambda *args: None
                try:
                    without = run_query(self.archive, ds)
                finally:
                    query_module._pushdown = original
                self.assertEqual(sorted(map(repr, with_sql)), sorted(map(repr, without)))

    def test_names_with_several_values_or_groups_use_the_index(self):
        """Person names with a backslash (several names) or '=' (component groups) are prefiltered in SQL too:
        the audit's query ``x\\*a*a*...*b`` over every stored name no longer reaches Python for each study."""
        query = build_query(identifier("STUDY", PatientName="x\\*a*a*a*a*a*a*a*b"))
        self.assertIn("study_names", query.sql)
        self.assertEqual(query.params, ["x", "*a*a*a*a*a*a*a*b"])
        grouped = build_query(identifier("STUDY", PatientName="*=山田^*"))
        self.assertEqual(grouped.params, ["山田^*"])
        self.assertNotIn("study_names", build_query(identifier("STUDY", PatientName="Doe\\*")).sql)

    def test_fetch_decides_a_bounded_slice(self):
        """A query whose candidates all fail comes back in slices of at most max_rows candidates, each with no
        match, until done: no fetch holds its worker thread over the whole index."""
        archive = archive_copy(os.path.abspath(self.mktemp()), fill_many)
        self.addCleanup(archive.close)
        run = QueryRun(archive.index_path, build_query(identifier("IMAGE", StudyInstanceUID=f"{ROOT}.99",
                                                                    SeriesInstanceUID=f"{ROOT}.99.1",
                                                                    ImageType="NONE")))
        self.addCleanup(run.close)
        calls = 0
        while not run.done:
            self.assertEqual(run.fetch(64, max_rows=10), [])
            calls += 1
        self.assertEqual(calls, 16)  # 150 candidates, 10 at a time, then the empty fetch that ends it

    def test_legacy_dotted_date_found_by_range(self):
        """A stored YYYY.MM.DD Study Date (old ACR-NEMA style) is found by a DA range: the SQL
        prefilter checks the dotted bounds too."""
        old = make_dataset(study=f"{ROOT}.60", series=f"{ROOT}.60.1", sop=f"{ROOT}.60.1.1")
        old.StudyDate = "1993.05.17"
        old.AccessionNumber = "OLD1"
        store_dataset(self.archive, old)
        self.assertEqual(self.study(StudyDate="19930101-19931231"), {"OLD1"})
        self.assertEqual(self.study(StudyDate="19940101-"), {f"ACC100{n}" for n in range(1, 10)})

    def test_query_run_on_a_path_needing_quoting(self):
        """The read-only connection opens an index whose folder name holds '?', '#' and '%'."""
        folder = os.path.join(os.path.abspath(self.mktemp()), "a?b#c%20d")
        archive = archive_copy(folder, fill_corpus)
        self.addCleanup(archive.close)
        self.assertEqual(len(run_query(archive, identifier("STUDY", AccessionNumber=""))), 9)


# --- FindService over an association ---------------------------------------------------------------------


class FindServiceTests(SynchronousTestCase):
    """C-FIND requests and responses on an in-memory association."""

    def setUp(self):
        self.harness = FindHarness(self, fill_corpus)
        self.harness.associate()

    def test_study_level_responses(self):
        """Every match is one pending response holding exactly the keys asked plus the Query/Retrieve
        Level (no Specific Character Set: every value is ASCII and none was asked); then Success."""
        found = self.harness.find(identifier("STUDY", PatientName="Doe*", StudyInstanceUID="", AccessionNumber="",
                                             StudyDate=""))
        self.assertEqual([r.status for r in found], [PENDING] * 4 + [SUCCESS])
        for ds in identifiers(found):
            self.assertEqual(keywords(ds), {"QueryRetrieveLevel", "PatientName", "StudyInstanceUID", "AccessionNumber",
                                            "StudyDate"})
            self.assertEqual(ds.QueryRetrieveLevel, "STUDY")
        self.assertEqual(accessions(identifiers(found)), {"ACC1001", "ACC1002", "ACC1003", "ACC1004"})
        self.assertIsNone(found[-1].identifier)

    def test_no_match_is_success_alone(self):
        """A query matching nothing is answered with Success and no pending response."""
        found = self.harness.find(identifier("STUDY", PatientName="Nobody*"))
        self.assertEqual([r.status for r in found], [SUCCESS])

    def test_series_and_image_levels(self):
        """SERIES and IMAGE level queries answer the objects of the level, with the unique keys above."""
        series = self.harness.find(identifier("SERIES", StudyInstanceUID=study_uid(3), SeriesInstanceUID="",
                                              Modality="", NumberOfSeriesRelatedInstances=""))
        rows = {(str(ds.Modality), int(ds.NumberOfSeriesRelatedInstances)) for ds in identifiers(series)}
        self.assertEqual(rows, {("CT", 1), ("SR", 3)})
        self.assertEqual({ds.StudyInstanceUID for ds in identifiers(series)}, {study_uid(3)})
        self.assertEqual({ds.QueryRetrieveLevel for ds in identifiers(series)}, {"SERIES"})
        images = self.harness.find(identifier("IMAGE", StudyInstanceUID=study_uid(3), SeriesInstanceUID=series_uid(3, 1),
                                              SOPInstanceUID="", InstanceNumber=""))
        self.assertEqual([r.status for r in images], [PENDING] * 3 + [SUCCESS])
        self.assertEqual({(ds.SOPInstanceUID, int(ds.InstanceNumber)) for ds in identifiers(images)},
                         {(sop_uid(3, 1, n), n + 1) for n in range(3)})

    def test_unsupported_keys_left_out_with_ff01(self):
        """Keys the Disk-Server does not support are left out and every pending status is FF01."""
        ds = identifier("STUDY", AccessionNumber="ACC1007", Manufacturer="", InstitutionName="", PatientName="")
        ds.add_new(0x00091010, "LO", "")
        found = self.harness.find(ds)
        self.assertEqual([r.status for r in found], [PENDING_WARNING, SUCCESS])
        self.assertEqual(keywords(found[0].identifier), {"QueryRetrieveLevel", "AccessionNumber", "PatientName"})
        self.assertNotIn(0x00091010, found[0].identifier)

    def test_information_model_errors_answered_a900(self):
        """A missing level, PATIENT, and SERIES/IMAGE without the unique keys above are answered A900
        with an Error Comment; the association serves the next request."""
        cases = [
            (identifier(None, PatientName="*"), "no Query/Retrieve Level (0008,0052): STUDY, SERIES or IMAGE"),
            (identifier("PATIENT", PatientName="*"), "Study Root has no PATIENT level (use STUDY)"),
            (identifier("SERIES", Modality=""), "SERIES level needs a single StudyInstanceUID (unique key above)"),
            (identifier("IMAGE", StudyInstanceUID=study_uid(0)),
             "IMAGE level needs a single SeriesInstanceUID (unique key above)"),
        ]
        for ds, comment in cases:
            with self.subTest(comment=comment):
                (response,) = self.harness.find(ds)
                self.assertEqual(response.status, DOES_NOT_MATCH)
                self.assertEqual(response.command.ErrorComment, comment)
                self.assertIsNone(response.identifier)
        self.assertEqual(len(self.harness.find(identifier("STUDY", PatientName="Doe^Jane"))), 3)

    def test_undecodable_identifier_answered_c000(self):
        """An identifier pydicom cannot read is answered C000 with an Error Comment; the association lives."""
        # Query/Retrieve Level, then a Procedure Code Sequence of undefined length cut off in its
        # first item (pydicom reads a plain value cut short as a shorter value, so a sequence it is)
        data = b"\x08\x00\x52\x00CS\x06\x00STUDY \x08\x00\x32\x10SQ\x00\x00\xff\xff\xff\xff\xfe\xff\x00\xe0\xff\x00\x00\x00"
        self.harness.send_find(None, data=data)
        (response,) = self.harness.responses()
        self.assertEqual(response.status, CANNOT_UNDERSTAND)
        self.assertIn("cannot decode identifier", response.command.ErrorComment)
        self.assertEqual(self.harness.find(identifier("STUDY", AccessionNumber="ACC1001"))[-1].status, SUCCESS)

    def test_long_uid_list(self):
        """A list of 600 Study Instance UIDs (past the SQL parameter list) finds the two stored ones."""
        uids = [f"{ROOT}.7.{n}" for n in range(598)] + [study_uid(2), study_uid(7)]
        found = self.harness.find(identifier("STUDY", StudyInstanceUID="\\".join(uids), AccessionNumber=""))
        self.assertEqual(accessions(identifiers(found)), {"ACC1003", "ACC1008"})
        self.assertEqual(found[-1].status, SUCCESS)

    def test_oversized_identifier(self):
        """An identifier over 1 MiB is not kept: C000 naming the limit, one warning line and no traceback (an
        expected input error); the association lives."""
        events = capture_log(self, "info")
        big = identifier("STUDY", PatientName="*")
        big.add_new(0x00091010, "UT", "x" * (1 << 20))
        self.harness.send_find(big)
        (response,) = self.harness.responses()
        self.assertEqual(response.status, CANNOT_UNDERSTAND)
        self.assertEqual(response.command.ErrorComment, "data set of over 1048576 bytes")
        self.assertEqual([e for e in events if e.get("log_failure") is not None], [])
        warnings = [e for e in events if e["log_level"].name == "warn"]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(self.harness.find(identifier("STUDY", AccessionNumber="ACC1001"))[-1].status, SUCCESS)

    def test_computed_attributes_answered_when_asked(self):
        """Computed attributes come back when asked; Retrieve AE Title is this AE's, every study ONLINE."""
        (pending, final) = self.harness.find(identifier(
            "STUDY", AccessionNumber="ACC1004", ModalitiesInStudy="", SOPClassesInStudy="",
            NumberOfStudyRelatedSeries="", NumberOfStudyRelatedInstances="", RetrieveAETitle="",
            NumberOfPatientRelatedStudies="", InstanceAvailability=""))
        ds = pending.identifier
        self.assertEqual((ds.NumberOfPatientRelatedStudies, ds.InstanceAvailability), (2, "ONLINE"))
        self.assertEqual(list(ds.ModalitiesInStudy), ["CT", "SR"])
        self.assertEqual(list(ds.SOPClassesInStudy), sorted([SOP_CLASSES["CT"], SOP_CLASSES["SR"]]))
        self.assertEqual((ds.NumberOfStudyRelatedSeries, ds.NumberOfStudyRelatedInstances), (2, 4))
        self.assertEqual(ds.RetrieveAETitle, "DISK_SERVER")
        self.assertEqual(final.status, SUCCESS)

    def test_each_transfer_syntax(self):
        """Identifiers are read and answered in the context's transfer syntax, implicit and big endian too."""
        expected = {"ACC1005", "ACC1006", "ACC1007"}
        for syntax in (IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN):
            with self.subTest(syntax=syntax):
                self.harness.associate(transfer_syntax=syntax)
                found = self.harness.find(identifier("STUDY", PatientName="Smith*", AccessionNumber="",
                                                     StudyDate="20240101-", NumberOfStudyRelatedInstances=""))
                self.assertEqual(accessions(identifiers(found)), expected)
                counts = {int(ds.NumberOfStudyRelatedInstances) for ds in identifiers(found)}
                self.assertEqual(counts, {2, 6, 1})

    def test_completion_logged_without_error(self):
        """Each C-FIND ends with one debug line naming level and count, and no logged failure."""
        events = capture_log(self)
        self.harness.find(identifier("STUDY", PatientName="Doe*"))
        lines = [event for event in events if event.get("log_namespace") == "appliance.find"]
        self.assertEqual([(e.get("query_level"), e.get("count")) for e in lines], [("STUDY", 4)])
        self.assertEqual([e for e in events if e.get("log_failure") is not None], [])


class CombinedDateTimeNegotiationTests(SynchronousTestCase):
    """Combined date-time matching through SOP class extended negotiation (PS3.4 C.5.1.1)."""

    def test_reply_to_extended_negotiation(self):
        """Byte 2 (combined date-time) is agreed when proposed; relational, fuzzy names and timezone
        adjustment (bytes 1, 3, 4) are not; nothing proposed, nothing answered."""
        self.assertEqual(find_extended_negotiation(b"\x00\x01"), b"\x00\x01")
        self.assertEqual(find_extended_negotiation(b"\x01\x01\x01\x01"), b"\x00\x01\x00\x00")
        self.assertEqual(find_extended_negotiation(b"\x01"), b"\x00")
        self.assertEqual(find_extended_negotiation(b"\x00\x00"), b"\x00\x00")
        self.assertIsNone(find_extended_negotiation(b""))

    def test_association_answers_and_applies_it(self):
        """Proposing byte 2 = 1 gets it back in the A-ASSOCIATE-AC, and Study Date and Time ranges then
        match as one range; without the item, the AC has none and they match separately."""
        harness = FindHarness(self, fill_corpus)
        keys = dict(AccessionNumber="", StudyDate="20231231-20240101", StudyTime="2300-0100")
        accept = harness.associate(extended=b"\x00\x01")
        self.assertEqual(accept.user_information.sop_class_extended, (P.SOPClassExtended(STUDY_ROOT_FIND, b"\x00\x01"),))
        self.assertEqual(accessions(identifiers(harness.find(identifier("STUDY", **keys)))), {"ACC1003", "ACC1004"})
        accept = harness.associate()
        self.assertEqual(accept.user_information.sop_class_extended, ())
        self.assertEqual(accessions(identifiers(harness.find(identifier("STUDY", **keys)))), set())
        accept = harness.associate(extended=b"\x00\x00")
        self.assertEqual(accept.user_information.sop_class_extended, (P.SOPClassExtended(STUDY_ROOT_FIND, b"\x00\x00"),))
        self.assertEqual(accessions(identifiers(harness.find(identifier("STUDY", **keys)))), set())


class PersonNameMatchingTests(SynchronousTestCase):
    """pn_matching: case-sensitive by default, case- and accent-insensitive when configured."""

    def names(self, harness, query: str, charset: Optional[str] = "ISO_IR 192") -> set:
        keys = dict(PatientName=query)
        if charset:
            keys["SpecificCharacterSet"] = charset
        return {str(ds.PatientName) for ds in identifiers(harness.find(identifier("STUDY", **keys)))}

    def test_sensitive_by_default(self):
        """By default a name matches with its case and accents only."""
        harness = FindHarness(self, fill_charsets)
        harness.associate()
        self.assertEqual(harness.config.archive.pn_matching, "sensitive")
        self.assertEqual(self.names(harness, "Buc*"), {"Buc^Jérôme"})
        for query in ("buc*", "BUC^JÉRÔME", "Buc^Jerome", "*jérôme", "äneas*"):
            with self.subTest(query=query):
                self.assertEqual(self.names(harness, query), set())

    def test_insensitive(self):
        """pn_matching = "insensitive": case and accents are ignored on both sides, in every group."""
        harness = FindHarness(self, fill_charsets, pn_matching="insensitive")
        harness.associate()
        cases = {
            "buc*": {"Buc^Jérôme"},
            "BUC^JEROME": {"Buc^Jérôme"},
            "buc^jérôme": {"Buc^Jérôme"},
            "*jerome": {"Buc^Jérôme"},
            "*^J?ROME": {"Buc^Jérôme"},
            "aneas^rudiger": {"Äneas^Rüdiger"},
            "ÄNEAS*": {"Äneas^Rüdiger"},
            "ΔΙΟΝΥΣΙΟΣ": {"Διονυσιος"},  # final sigma folds like any sigma
            "wang^xiaodong": {"Wang^XiaoDong=王^小東", "Wang^XiaoDong=王^小东"},
            "yamada^tarou=山田^太郎": {"Yamada^Tarou=山田^太郎=やまだ^たろう"},
            "김?중": {"김희중"},  # '?' is one syllable (the index keeps names folded into jamo)
            "*^r?diger": {"Äneas^Rüdiger"},
            "nobody*": set(),
        }
        for query, expected in cases.items():
            with self.subTest(query=query):
                self.assertEqual(self.names(harness, query), expected)
        # ISO_IR 100 carries the accented query as well
        self.assertEqual(self.names(harness, "*^JÉRÔME", charset="ISO_IR 100"), {"Buc^Jérôme"})


# --- character sets ------------------------------------------------------------------------------------


class CharsetCase(NamedTuple):
    """A stored file's name queried in one character set, and what must come back."""

    file: str
    request_charset: tuple  # Specific Character Set of the request
    query: str  # the Patient's Name key (Unicode)
    #: file name -> the Specific Character Set its response must carry
    expected: Dict[str, tuple]
    patient_id: str = ""  # a Patient ID key value too


JIS = ("", "ISO 2022 IR 87")
UTF8 = ("ISO_IR 192",)

#: Each stored name queried in another encoding than its file's (and some in their own, for contrast).
CHARSET_CASES = [
    # Japanese: ISO 2022 IR 87 and UTF-8; chrX1 (UTF-8) queried in JIS X 0208
    CharsetCase("chrH31.dcm", JIS, "Yamada^Tarou=山田^太郎=やまだ^たろう", {"chrH31.dcm": JIS}),
    CharsetCase("chrH31.dcm", UTF8, "Yamada^Tarou=山田^太郎=やまだ^たろう", {"chrH31.dcm": UTF8}),
    CharsetCase("chrX1.dcm", JIS, "Wang^XiaoDong=王^小東", {"chrX1.dcm": JIS}),
    CharsetCase("chrX1.dcm", UTF8, "Wang^XiaoDong=王^小東", {"chrX1.dcm": UTF8}),
    # the ideographic group alone finds both H31 and H32; H32's half-width katakana is not in
    # JIS X 0208, so its response comes in UTF-8
    CharsetCase("chrH32.dcm", JIS, "=山田^太郎", {"chrH31.dcm": JIS, "chrH32.dcm": UTF8}),
    CharsetCase("chrH32.dcm", UTF8, "ﾔﾏﾀﾞ^ﾀﾛｳ", {"chrH32.dcm": UTF8}),
    # a name without '=' matches any group: H31's and H32's phonetic groups are this name too
    CharsetCase("chrJapMulti.dcm", JIS, "やまだ^たろう", {"chrJapMulti.dcm": JIS, "chrH31.dcm": JIS, "chrH32.dcm": UTF8}),
    CharsetCase("chrJapMulti.dcm", UTF8, "やまだ^たろう", {"chrJapMulti.dcm": UTF8, "chrH31.dcm": UTF8, "chrH32.dcm": UTF8}),
    # Latin-1 names in ISO_IR 100 and UTF-8
    CharsetCase("chrFren.dcm", ("ISO_IR 100",), "Buc^Jérôme", {"chrFren.dcm": ("ISO_IR 100",)}),
    CharsetCase("chrFren.dcm", UTF8, "Buc^Jérôme", {"chrFren.dcm": UTF8}),
    CharsetCase("chrGerm.dcm", ("ISO_IR 100",), "Äneas^Rüdiger", {"chrGerm.dcm": ("ISO_IR 100",)}),
    CharsetCase("chrGerm.dcm", UTF8, "Äneas^Rüdiger", {"chrGerm.dcm": UTF8}),
    # the other ISO 8859 parts, in their own part and in UTF-8
    CharsetCase("chrGreek.dcm", ("ISO_IR 126",), "Διονυσιος", {"chrGreek.dcm": ("ISO_IR 126",)}),
    CharsetCase("chrGreek.dcm", UTF8, "Διονυσιος", {"chrGreek.dcm": UTF8}),
    CharsetCase("chrRuss.dcm", ("ISO_IR 144",), "Люкceмбypг", {"chrRuss.dcm": ("ISO_IR 144",)}),
    CharsetCase("chrRuss.dcm", UTF8, "Люкceмбypг", {"chrRuss.dcm": UTF8}),
    CharsetCase("chrArab.dcm", ("ISO_IR 127",), "قباني^لنزار", {"chrArab.dcm": ("ISO_IR 127",)}),
    CharsetCase("chrArab.dcm", UTF8, "قباني^لنزار", {"chrArab.dcm": UTF8}),
    CharsetCase("chrHbrw.dcm", ("ISO_IR 138",), "שרון^דבורה", {"chrHbrw.dcm": ("ISO_IR 138",)}),
    CharsetCase("chrHbrw.dcm", UTF8, "שרון^דבורה", {"chrHbrw.dcm": UTF8}),
    # Korean and Chinese, in UTF-8 (and Korean in ISO 2022 IR 149)
    CharsetCase("chrI2.dcm", UTF8, "Hong^Gildong=洪^吉洞=홍^길동", {"chrI2.dcm": UTF8}),
    CharsetCase("chrI2.dcm", ("", "ISO 2022 IR 149"), "=洪^吉洞", {"chrI2.dcm": ("", "ISO 2022 IR 149")}),
    CharsetCase("chrKoreanMulti.dcm", UTF8, "김희중", {"chrKoreanMulti.dcm": UTF8}),
    CharsetCase("chrX2.dcm", UTF8, "Wang^XiaoDong=王^小东", {"chrX2.dcm": UTF8}),
    CharsetCase("chrX2.dcm", ("GB18030",), "Wang^XiaoDong=王^小东", {"chrX2.dcm": ("GB18030",)}),
    # a Latin-1 request (by Patient ID) for a Cyrillic name: the answer cannot be Latin-1
    CharsetCase("chrRuss.dcm", ("ISO_IR 100",), "*", {"chrRuss.dcm": UTF8}, patient_id="SCSRUSS"),
    CharsetCase("chrGerm.dcm", ("ISO_IR 100",), "*", {"chrGerm.dcm": ("ISO_IR 100",)}, patient_id="SCSGERM"),
]


class CharacterSetTests(SynchronousTestCase):
    """Specific Character Set in both directions, on pydicom's own character-set files."""

    def setUp(self):
        self.harness = FindHarness(self, fill_charsets)
        self.harness.associate()
        self.files = {item.name: item for item in charset_files()}

    def test_every_file_stored(self):
        """Every file with its UIDs is stored; the two without any are refused with A900, and files
        sharing a SOP Instance UID leave one instance each (13 in all)."""
        refused = fill_charsets(archive_copy(os.path.abspath(self.mktemp())))
        self.assertEqual(sorted(refused), ["chrSQEncoding.dcm", "chrSQEncoding1.dcm"])
        self.assertTrue(all(reason.startswith("A900 ") for reason in refused.values()), refused)
        self.assertEqual(self.harness.archive.index.counts()[3], 13)

    def test_each_name_found_in_another_encoding(self):
        """Each stored name, sent in another encoding, finds its object; the response identifiers decode
        to the stored Unicode name, in the request's character set when it can carry the name, else in
        ISO_IR 192."""
        covered = set()
        for case in CHARSET_CASES:
            with self.subTest(file=case.file, charset=case.request_charset, query=case.query):
                ds = identifier("STUDY", PatientName=case.query, PatientID=case.patient_id, StudyInstanceUID="")
                ds.SpecificCharacterSet = list(case.request_charset) if len(case.request_charset) > 1 else case.request_charset[0]
                found = self.harness.find(ds)
                self.assertEqual(found[-1].status, SUCCESS)
                by_file = {}
                for response in found[:-1]:
                    name = str(response.identifier.PatientName)
                    matches = [f for f, item in self.files.items() if item.patient_name == name and f in case.expected]
                    self.assertTrue(matches, f"{case}: unexpected name {name!r}")
                    charset = response.identifier.SpecificCharacterSet
                    charset = tuple(charset) if not isinstance(charset, str) else (charset,)
                    by_file[matches[0]] = charset
                self.assertEqual(by_file, case.expected, str(case))
                self.assertEqual(len(found), len(case.expected) + 1, str(case))
                covered.update(by_file)
        stored_names = {item.name for item in self.files.values() if item.sop_uid}
        # chrFrenMulti and chrJapMultiExplicitIR6 repeat chrFren's and chrJapMulti's instance and name
        self.assertEqual(stored_names - covered, {"chrFrenMulti.dcm", "chrJapMultiExplicitIR6.dcm"})

    def test_response_bytes_in_iso_2022(self):
        """A response in ISO 2022 IR 87 carries the ideographic group after ESC $ B and returns to
        ASCII, the groups separated by '='."""
        ds = identifier("STUDY", PatientName="Wang^XiaoDong=王^小東", SpecificCharacterSet=list(JIS))
        pending = self.harness.find(ds)[0]
        expected = b"Wang^XiaoDong=\x1b$B" + "王".encode("iso2022_jp")[3:-3] + b"\x1b(B^\x1b$B" \
            + "小東".encode("iso2022_jp")[3:-3] + b"\x1b(B"
        self.assertIn(expected, pending.raw)

    def test_unknown_character_set_not_echoed(self):
        """A request naming a character set that is no defined term gets responses without it when
        the values are ASCII, and in ISO_IR 192 when they are not."""
        ds = identifier("STUDY", PatientName="Buc*", SpecificCharacterSet="ISO_IR 999")
        (pending, final) = self.harness.find(ds)
        self.assertEqual(pending.identifier.SpecificCharacterSet, "ISO_IR 192")
        self.assertEqual(str(pending.identifier.PatientName), "Buc^Jérôme")
        ds = identifier("STUDY", PatientID="X1EXAMPLE", SpecificCharacterSet="ISO_IR 999")
        (pending, final) = self.harness.find(ds)
        self.assertNotIn("SpecificCharacterSet", pending.identifier)

    def test_response_character_set_rules(self):
        """response_character_set: none for ASCII without a request's, the request's when it can carry
        every value (sequences included), else ISO_IR 192."""
        ascii_only = Dataset()
        ascii_only.PatientName = "Doe^John"
        self.assertIsNone(response_character_set(ascii_only, None))
        self.assertEqual(response_character_set(ascii_only, ["ISO_IR 100"]), ["ISO_IR 100"])
        latin = Dataset()
        latin.PatientName = "Buc^Jérôme"
        self.assertEqual(response_character_set(latin, None), ["ISO_IR 192"])
        self.assertEqual(response_character_set(latin, ["ISO_IR 100"]), ["ISO_IR 100"])
        self.assertEqual(response_character_set(latin, ["ISO_IR 144"]), ["ISO_IR 192"])
        nested = Dataset()
        item = Dataset()
        item.CodeMeaning = "Lungenröntgen"
        nested.ProcedureCodeSequence = Sequence([item])
        self.assertEqual(response_character_set(nested, ["ISO_IR 126"]), ["ISO_IR 192"])
        self.assertEqual(response_character_set(nested, ["ISO_IR 100"]), ["ISO_IR 100"])
        self.assertEqual(response_character_set(ascii_only, ["ISO_IR 999"]), None)
        self.assertTrue(all(term in python_encoding for term in ("ISO_IR 100", "ISO_IR 192", "ISO 2022 IR 87")))


# --- streaming, max_results, cancel -----------------------------------------------------------------------


class StreamingTests(SynchronousTestCase):
    """Large results stream in batches; max_results; C-CANCEL; a vanished peer."""

    def many(self, **settings) -> FindHarness:
        harness = FindHarness(self, fill_many, read=self.runner, **settings)
        harness.associate()
        return harness

    def setUp(self):
        self.runner = SteppedRunner()
        self.query = identifier("IMAGE", StudyInstanceUID=f"{ROOT}.99", SeriesInstanceUID=f"{ROOT}.99.1",
                                SOPInstanceUID="", InstanceNumber="")

    def test_results_stream_batch_by_batch(self):
        """150 matches come as pending responses one batch at a time: each fetch's matches are on
        the wire before the next fetch; the statuses end with one Success."""
        harness = self.many()
        harness.send_find(self.query)
        self.assertEqual(harness.responses(), [])  # the first batch is still being fetched
        self.runner.release()
        first = harness.responses()
        self.assertEqual(len(first), BATCH)
        self.assertEqual(self.runner.calls.count("fetch"), 2)  # the second fetch started after they were sent
        self.runner.release()
        second = harness.responses()
        self.assertEqual(len(second), BATCH)
        self.runner.release()
        rest = harness.responses()
        self.assertEqual([r.status for r in rest], [PENDING] * (150 - 2 * BATCH) + [SUCCESS])
        numbers = sorted(int(ds.InstanceNumber) for ds in identifiers(first + second + rest))
        self.assertEqual(numbers, list(range(1, 151)))
        self.assertEqual(self.runner.calls[-1], "close")

    def test_waits_while_the_peer_does_not_read(self):
        """While the transport asks us to pause (its buffer is full), no further batch is fetched."""
        harness = self.many()
        harness.send_find(self.query)
        self.runner.release()
        self.assertEqual(len(harness.responses()), BATCH)
        harness.transport.producer.pauseProducing()
        self.runner.release()
        self.assertEqual(len(harness.responses()), BATCH)
        self.assertEqual(self.runner.calls.count("fetch"), 2)
        self.assertEqual(self.runner.held, [])
        harness.transport.producer.resumeProducing()
        self.assertEqual(self.runner.calls.count("fetch"), 3)
        self.runner.release()
        self.assertEqual(harness.responses()[-1].status, SUCCESS)

    def test_cancel_in_the_middle(self):
        """A C-CANCEL-RQ after the first batch ends the C-FIND with FE00 after those 64 pendings; the
        rest is never sent, the query is closed, and the association serves the next request."""
        harness = self.many()
        message_id = harness.send_find(self.query)
        self.runner.release()
        self.assertEqual([r.status for r in harness.responses()], [PENDING] * BATCH)
        harness.send_cancel(message_id)
        self.assertEqual(harness.responses(), [])  # the answer comes once the running fetch returns
        self.runner.release()
        (final,) = harness.responses()
        self.assertEqual((final.status, final.command.MessageIDBeingRespondedTo), (CANCEL, message_id))
        self.assertEqual(self.runner.calls.count("fetch"), 2)
        self.assertEqual(self.runner.calls[-1], "close")
        self.runner.hold = False
        found = harness.find(identifier("IMAGE", StudyInstanceUID=f"{ROOT}.99", SeriesInstanceUID=f"{ROOT}.99.1",
                                        InstanceNumber="7"))
        self.assertEqual([r.status for r in found], [PENDING, SUCCESS])

    def test_cancel_for_another_message_ignored(self):
        """A C-CANCEL-RQ naming another Message ID does not stop the C-FIND."""
        harness = self.many()
        message_id = harness.send_find(self.query)
        harness.send_cancel(message_id + 5)
        self.runner.hold = False
        self.runner.release()
        statuses = [r.status for r in harness.responses()]
        self.assertEqual(statuses, [PENDING] * 150 + [SUCCESS])

    def test_max_results(self):
        """max_results = N: a query with more matches gets N pendings then A700 naming the limit; one
        with exactly N matches is answered in full."""
        self.runner.hold = False
        harness = self.many(max_results=100)
        found = harness.find(self.query)
        self.assertEqual([r.status for r in found], [PENDING] * 100 + [OUT_OF_RESOURCES])
        self.assertEqual(found[-1].command.ErrorComment, "more than max_results=100 matches; narrow the query")
        exactly = identifier("IMAGE", StudyInstanceUID=f"{ROOT}.99", SeriesInstanceUID=f"{ROOT}.99.1",
                             SOPInstanceUID="\\".join(f"{ROOT}.99.1.{n}" for n in range(1, 101)))
        self.assertEqual([r.status for r in harness.find(exactly)], [PENDING] * 100 + [SUCCESS])
        self.assertEqual(self.runner.calls.count("close"), 2)

    def test_index_error_answered_c000(self):
        """An error reading the index after some matches ends the C-FIND with C000 and the error in the
        Error Comment (logged, with the query closed); the association serves the next request."""
        import sqlite3

        harness = self.many()
        self.runner.hold = False
        fetch = query_module.QueryRun.fetch
        fetched = []

        def failing(run, count):
            fetched.append(count)
            if len(fetched) == 2:
                raise sqlite3.OperationalError("disk I/O error")
            return fetch(run, count)

        self.patch(query_module.QueryRun, "fetch", failing)
        found = harness.find(self.query)
        self.assertEqual([r.status for r in found], [PENDING] * BATCH + [CANNOT_UNDERSTAND])
        self.assertEqual(found[-1].command.ErrorComment, "unable to process: disk I/O error")
        self.assertEqual(len(self.flushLoggedErrors(sqlite3.OperationalError)), 1)
        self.assertEqual(self.runner.calls[-1], "close")
        self.assertEqual(harness.find(identifier("IMAGE", StudyInstanceUID=f"{ROOT}.99", SeriesInstanceUID=f"{ROOT}.99.1",
                                                 InstanceNumber="150"))[-1].status, SUCCESS)

    def test_peer_gone_stops_the_query(self):
        """When the connection is lost mid-find, no further batch is fetched and the query is closed."""
        harness = self.many()
        harness.send_find(self.query)
        self.runner.release()
        self.assertEqual(len(harness.responses()), BATCH)
        harness.protocol.connectionLost(None)
        self.runner.release()
        self.assertEqual(self.runner.calls.count("fetch"), 2)
        self.assertEqual(self.runner.calls[-1], "close")
        self.assertEqual(harness.transport.value(), b"")
