"""The Web Software-Server's queries: QIDO-RS parameters to a C-FIND identifier (appliance/web/qido.py), C-FIND and
C-ECHO one association per device at a time (appliance/ae/web_queries.py), and the API's routes over HTTP parsing
(device failures in words, warnings, hostile parameters)."""

from __future__ import annotations

import json
from typing import List, Optional

from pydicom.dataset import Dataset
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from appliance import config as configuration
from appliance.ae.web_queries import DeviceFailure, UnknownDevice, WebQueries
from appliance.compat import encode_dataset
from appliance.dicom import dimse as D
from appliance.dicom import pdu as P
from appliance.dicom.uids import IMPLICIT_VR_LITTLE_ENDIAN, STUDY_ROOT_FIND, VERIFICATION
from appliance.net.requestor import (AssociationAborted, AssociationRejected, ConnectionFailed, MessageIds, Response,
                                     ResponseStream)
from appliance.web.api import ApiResource
from appliance.web.qido import QueryError, parse_query, to_json
from appliance.web.server import ApplianceSite

from .test_manager import ManagerHarness
from .test_web import Reply, WebHarness

STUDY = "1.2.826.0.1.3680043.2.7"
SERIES = "1.2.826.0.1.3680043.2.7.1"


class QidoTests(SynchronousTestCase):
    """Parameters checked before anything is sent; the identifier each level sends."""

    def test_study_identifier(self):
        query = parse_query({"PatientName": ["Sm?th*"], "StudyDate": ["20200101-20201231"],
                             "ModalitiesInStudy": ["CT"], "00100020": ["PID7"], "includefield": ["StudyTime,00081032"],
                             "limit": ["20"], "offset": ["5"]}, "STUDY")
        ds = query.identifier
        self.assertEqual((ds.QueryRetrieveLevel, ds.PatientName, ds.StudyDate, ds.ModalitiesInStudy, ds.PatientID),
                         ("STUDY", "Sm?th*", "20200101-20201231", "CT", "PID7"))
        for keyword in ("StudyInstanceUID", "StudyDescription", "NumberOfStudyRelatedInstances", "PatientBirthDate",
                        "ProcedureCodeSequence"):
            self.assertIn(keyword, ds)
            self.assertIn(ds[keyword].value, (None, "", []), keyword)
        self.assertEqual((query.limit, query.offset, query.warnings), (20, 5, []))
        self.assertNotIn("SpecificCharacterSet", [e.keyword for e in ds if e.value])

    def test_series_and_instance_levels_take_the_path_uids(self):
        series = parse_query({}, "SERIES", {"StudyInstanceUID": STUDY}).identifier
        self.assertEqual((series.QueryRetrieveLevel, series.StudyInstanceUID), ("SERIES", STUDY))
        self.assertIn("NumberOfSeriesRelatedInstances", series)
        images = parse_query({"InstanceNumber": ["3"]}, "IMAGE",
                             {"StudyInstanceUID": STUDY, "SeriesInstanceUID": SERIES}).identifier
        self.assertEqual((images.SeriesInstanceUID, images.InstanceNumber), (SERIES, "3"))
        with self.assertRaises(QueryError) as raised:
            parse_query({"StudyInstanceUID": [STUDY]}, "SERIES", {"StudyInstanceUID": STUDY})
        self.assertIn("given by the path", str(raised.exception))

    def test_uid_lists_and_character_set(self):
        query = parse_query({"StudyInstanceUID": [f"{STUDY},{STUDY}.2"], "PatientName": ["Müller^*"]}, "STUDY")
        self.assertEqual(query.identifier.StudyInstanceUID, [STUDY, f"{STUDY}.2"])
        self.assertEqual(query.identifier.SpecificCharacterSet, "ISO_IR 192")
        encode_dataset(query.identifier, IMPLICIT_VR_LITTLE_ENDIAN)  # encodes in UTF-8

    def test_fuzzy_matching_warned(self):
        self.assertEqual(parse_query({"fuzzymatching": ["true"]}, "STUDY").warnings,
                         ["fuzzymatching is not supported: the query matched exactly"])
        self.assertEqual(parse_query({"fuzzymatching": ["false"]}, "STUDY").warnings, [])

    def test_refused_parameters(self):
        cases = [
            ({"StudyDate": ["2020-01-01"]}, "StudyDate must be a date"),
            ({"StudyDate": ["20200230"]}, "20200230 is not a date"),
            ({"StudyDate": ["20200101-20200201-20200301"]}, "StudyDate must be a date"),
            ({"StudyTime": ["25"]}, None),
            ({"StudyTime": ["12a"]}, "StudyTime must be a time"),
            ({"PatientNmae": ["x"]}, "unknown attribute 'PatientNmae'"),
            ({"0011ABCD": ["x"]}, "unknown attribute"),
            ({"PixelData": ["x"]}, "PixelData cannot be queried"),
            ({"00020010": ["1.2"]}, "cannot be queried"),
            ({"ReferencedSeriesSequence": ["x"]}, "cannot be a matching key"),
            ({"StudyInstanceUID": ["1.2.x"]}, "must be a UID"),
            ({"PatientID": ["a\\b"]}, "single value"),
            ({"PatientID": ["a\x00b"]}, "control characters"),
            ({"PatientID": ["x" * 65]}, "longer than its VR (LO) allows"),
            ({"NumberOfStudyRelatedInstances": ["many"]}, "whole number"),
            ({"PatientID": ["a", "b"]}, "given 2 times"),
            ({"limit": ["0"]}, "limit must be from 1"),
            ({"limit": ["-1"]}, "limit must be a whole number"),
            ({"offset": ["x"]}, "offset must be a whole number"),
            ({"offset": ["450"], "limit": ["100"]}, "max_results = 500"),
            ({"includefield": ["PixelData"]}, "cannot be"),
            ({"includefield": [""]}, "names no attribute"),
            ({"fuzzymatching": ["maybe"]}, "true or false"),
            ({"QueryRetrieveLevel": ["PATIENT"]}, "set by the server"),
            ({"SpecificCharacterSet": ["ISO_IR 100"]}, "set by the server"),
            # values of binary and numeric VRs: numbers in the VR's range, or refused before anything is sent
            ({"Rows": ["65536"]}, "Rows must be a whole number from 0 to 65535 (US)"),
            ({"00280010": ["-1"]}, "from 0 to 65535"),
            ({"SelectorFDValue": ["abc"]}, "SelectorFDValue must be a decimal number (FD)"),
            ({"SelectorFDValue": ["inf"]}, "decimal number"),
            ({"PatientWeight": ["abc"]}, "PatientWeight must be a decimal number (DS)"),
            ({"NumberOfStudyRelatedInstances": ["99999999999"]}, "from -2147483648 to 2147483647 (IS)"),
            ({"60003000": ["x"]}, "(OB or OW) cannot be a matching key"),
            ({"LUTData": ["1"]}, "cannot be a matching key"),
            ({"SelectorATValue": ["00100010"]}, "(AT) cannot be matched on"),
            # digits of other scripts (which int() reads) and a value ending in a newline
            ({"StudyTime": ["\u0663\u0663"]}, "StudyTime must be a time"),
            ({"StudyDate": ["\u0663\u0663\u0663\u0663\u0660\u0661\u0660\u0661"]}, "StudyDate must be a date"),
            ({"AcquisitionDateTime": ["\u0663\u0663\u0663\u0663"]}, "must be a date-time"),
            ({"limit": ["5\n"]}, "limit must be a whole number"),
            ({"limit": ["\u0663"]}, "limit must be a whole number"),
            # names that are not keywords
            ({"": ["1"]}, "unknown attribute ''"),
            ({"PatientID ": ["1"]}, "unknown attribute"),
        ]
        for arguments, reason in cases:
            if reason is None:
                parse_query(arguments, "STUDY")  # an hour of 25 is the device's business: its syntax is fine
                continue
            with self.assertRaises(QueryError, msg=arguments) as raised:
                parse_query(arguments, "STUDY")
            self.assertIn(reason, str(raised.exception), arguments)

    def test_numeric_keys_sent_as_numbers(self):
        """Binary VRs carry numbers (the text given would not encode), decimal and integer strings their text."""
        identifier = parse_query({"Rows": ["512"], "SelectorFDValue": ["2.5"], "PatientWeight": ["70.5"],
                                  "SelectorSLValue": ["-3"]}, "IMAGE").identifier
        self.assertEqual((identifier.Rows, identifier.SelectorFDValue, identifier.SelectorSLValue), (512, 2.5, -3))
        self.assertEqual(str(identifier.PatientWeight), "70.5")
        encode_dataset(identifier, IMPLICIT_VR_LITTLE_ENDIAN)

    def test_answer_as_dicom_json(self):
        answer = Dataset()
        answer.SpecificCharacterSet = "ISO_IR 100"
        answer.QueryRetrieveLevel = "STUDY"
        answer.PatientName = "Müller^Hans"
        answer.StudyInstanceUID = STUDY
        answer.ModalitiesInStudy = ["CT", "MR"]
        decoded = D  # noqa: F841 (keep the module import used in this file's other tests)
        from appliance.compat import decode_dataset
        value = to_json(decode_dataset(encode_dataset(answer, IMPLICIT_VR_LITTLE_ENDIAN), IMPLICIT_VR_LITTLE_ENDIAN))
        self.assertEqual(value["00100010"], {"vr": "PN", "Value": [{"Alphabetic": "Müller^Hans"}]})
        self.assertEqual(value["00080061"]["Value"], ["CT", "MR"])
        self.assertNotIn("00080052", value)
        self.assertNotIn("00080005", value)


class _Context:
    transfer_syntax = IMPLICIT_VR_LITTLE_ENDIAN


class _Negotiated:
    def __init__(self, accepted):
        self.accepted = accepted

    def context_for(self, abstract_syntax, transfer_syntax=None):
        return _Context() if abstract_syntax in self.accepted else None


class FindAssociation:
    """A device's side of one association as the requestor presents it: the test pushes the C-FIND answers."""

    def __init__(self, accepted=(STUDY_ROOT_FIND, VERIFICATION)) -> None:
        self.negotiated = _Negotiated(accepted)
        self.message_ids = MessageIds()
        self.identifiers: List[Dataset] = []
        self.stream: Optional[ResponseStream] = None
        self.cancels: List[int] = []
        self.released = False
        self.aborted: Optional[str] = None
        self.echo_answer = defer.Deferred()

    def find(self, identifier):
        self.identifiers.append(identifier)
        self.stream = ResponseStream(self, self.message_ids(), D.CommandField.C_FIND_RQ)
        return self.stream

    def echo(self):
        return self.echo_answer

    def cancel(self, message_id):
        self.cancels.append(message_id)

    def release(self):
        self.released = True
        return defer.succeed(None)

    def abort(self, why):
        self.aborted = why
        if self.stream is not None:
            self.stream._push(AssociationAborted(f"aborted by us: {why}"))

    def match(self, **attributes) -> None:
        answer = Dataset()
        answer.QueryRetrieveLevel = "STUDY"
        for keyword, value in attributes.items():
            setattr(answer, keyword, value)
        command = D.Command(CommandField=D.CommandField.C_FIND_RSP, MessageIDBeingRespondedTo=self.stream.message_id,
                            Status=0xFF00, CommandDataSetType=0)
        self.stream._push(Response(command, encode_dataset(answer, IMPLICIT_VR_LITTLE_ENDIAN)))

    def end(self, status=0x0000, comment=None) -> None:
        command = D.Command(CommandField=D.CommandField.C_FIND_RSP, MessageIDBeingRespondedTo=self.stream.message_id,
                            Status=status, ErrorComment=comment)
        self.stream._push(Response(command))


class QueriesHarness(ManagerHarness):
    def __init__(self, test, web=None, **options):
        super().__init__(test, devices={"pacs": {"ae_title": "PACS", "host": "10.0.0.5", "port": 104},
                                        "other": {"ae_title": "OTHER", "host": "10.0.0.6", "port": 104}}, **options)
        if web:
            self.config = configuration.parse(
                {"appliance": {"data_dir": self.config.data_dir}, "web": {"port": 0, **web},
                 "devices": {"pacs": {"ae_title": "PACS", "host": "10.0.0.5", "port": 104}}},
                self.config.path)
        self.queries = WebQueries(self.config, self.clock, self.connect)

    def establish(self, index: int = -1, association=None):
        association = association or FindAssociation()
        self.connections[index][2].callback(association)
        return association


def study_query(**arguments) -> Dataset:
    return parse_query({key: [value] for key, value in arguments.items()}, "STUDY").identifier


class WebQueriesTests(SynchronousTestCase):
    def setUp(self):
        self.h = QueriesHarness(self)
        self.queries = self.h.queries

    def test_devices_begin_with_the_local_archive(self):
        names = [(d.name, d.ae_title, d.host, d.port) for d in self.queries.devices()]
        self.assertEqual(names, [("local", "DISK_SERVER", "127.0.0.1", 11112), ("pacs", "PACS", "10.0.0.5", 104),
                                 ("other", "OTHER", "10.0.0.6", 104)])
        with self.assertRaises(UnknownDevice):
            self.queries.device("nope")

    def test_find_collects_matches_and_releases(self):
        found = self.queries.find("pacs", study_query(PatientName="Sm*"))
        (name, contexts, _), = self.h.connections
        self.assertEqual((name, contexts[0][0]), ("pacs", STUDY_ROOT_FIND))
        association = self.h.establish()
        self.assertEqual(association.identifiers[0].PatientName, "Sm*")
        association.match(PatientName="Smith^A", StudyInstanceUID=STUDY)
        association.match(PatientName="Smyth^B", StudyInstanceUID=STUDY + ".2")
        association.end()
        result = self.successResultOf(found)
        self.assertEqual([str(m.PatientName) for m in result.matches], ["Smith^A", "Smyth^B"])
        self.assertEqual((result.truncated, association.released, association.cancels), (False, True, []))

    def test_one_association_per_device_at_a_time(self):
        first = self.queries.find("pacs", study_query())
        second = self.queries.find("pacs", study_query(PatientID="2"))
        elsewhere = self.queries.find("other", study_query())
        self.assertEqual([c[0] for c in self.h.connections], ["pacs", "other"], "the second query to pacs waits")
        self.assertEqual(self.queries.waiting("pacs"), 1)
        association = self.h.establish(0)
        association.end()
        self.successResultOf(first)
        self.assertEqual([c[0] for c in self.h.connections], ["pacs", "other", "pacs"])
        self.h.establish(2).end()
        self.assertEqual(self.successResultOf(second).matches, [])
        self.h.establish(1).end()
        self.successResultOf(elsewhere)

    def test_two_device_entries_for_one_ae_share_its_association(self):
        """Two names for one AE (same AE title, host and port) wait for each other: one association per AE."""
        h = QueriesHarness(self)
        h.config = configuration.parse(
            {"appliance": {"data_dir": h.config.data_dir}, "web": {"port": 0},
             "devices": {"pacs": {"ae_title": "PACS", "host": "10.0.0.5", "port": 104},
                         "pacs_again": {"ae_title": "PACS", "host": "10.0.0.5", "port": 104},
                         "pacs_elsewhere": {"ae_title": "PACS", "host": "10.0.0.7", "port": 104}}},
            h.config.path)
        queries = WebQueries(h.config, h.clock, h.connect)
        first = queries.find("pacs", study_query())
        second = queries.echo("pacs_again")
        third = queries.find("pacs_elsewhere", study_query())
        self.assertEqual([c[0] for c in h.connections], ["pacs", "pacs_elsewhere"], "pacs_again waits for pacs")
        self.assertEqual((queries.waiting("pacs"), queries.waiting("pacs_again")), (1, 1))
        h.establish(0).end()
        self.successResultOf(first)
        self.assertEqual([c[0] for c in h.connections], ["pacs", "pacs_elsewhere", "pacs_again"])
        self.assertEqual(queries.waiting("pacs_again"), 0)
        h.connections[2][2].errback(ConnectionFailed("test: refused"))
        self.failureResultOf(second, DeviceFailure)
        h.establish(1).end()
        self.successResultOf(third)

    def test_a_long_line_of_stopped_queries_does_not_stop_the_line(self):
        """Hundreds of queries stopped while they waited (clients gone) end one after the other when the device
        frees, and the next query is asked (the line stood still past Python's recursion limit before)."""
        from appliance.ae import web_queries as module
        self.patch(module, "MAX_WAITING", 1000)  # the line may be long (a client that stays waits in it)
        runs = [self.queries.start("pacs", study_query()) for _ in range(400)]
        for run in runs:
            run.stop()
        self.assertEqual(self.queries.waiting("pacs"), 399)
        self.h.connections[0][2].errback(AssociationAborted("test: the device went away"))
        self.assertEqual(sum(run.done.called for run in runs), 400)
        self.failureResultOf(runs[0].done, DeviceFailure)
        self.assertTrue(all(self.successResultOf(run.done).stopped for run in runs[1:]))
        found = self.queries.find("pacs", study_query())
        self.assertEqual(len(self.h.connections), 2)
        self.h.establish().end()
        self.successResultOf(found)

    def test_an_error_here_aborts_the_association(self):
        """A query that fails on our side once its association is open (the identifier will not encode, say)
        aborts that association at once rather than leaving it to the device's idle timeout, and the next
        query to the device goes ahead."""
        class Broken(FindAssociation):
            def find(self, identifier):
                raise OSError("With tag (0028,0010) got exception: required argument is not an integer")

        found = self.queries.find("pacs", study_query())
        following = self.queries.find("pacs", study_query())
        broken = self.h.establish(0, Broken())
        self.failureResultOf(found, OSError)
        self.assertEqual((broken.aborted, broken.released), ("the query failed here: OSError", False))
        self.h.establish(1).end()
        self.successResultOf(following)

    def test_line_bounded(self):
        """MAX_WAITING requests waiting for one AE: the next is answered busy at once, other AEs are not held."""
        from appliance.ae import web_queries as module
        self.patch(module, "MAX_WAITING", 2)
        runs = [self.queries.find("pacs", study_query()) for _ in range(3)]
        busy = self.queries.echo("pacs")
        failure = self.failureResultOf(busy, DeviceFailure).value
        self.assertEqual(failure.kind, "busy")
        self.assertIn("2 requests to PACS at 10.0.0.5:104 wait already", failure.reason)
        self.queries.find("other", study_query())
        self.assertEqual([c[0] for c in self.h.connections], ["pacs", "other"])
        self.h.establish(0).end()
        self.successResultOf(runs[0])
        self.assertNoResult(self.queries.echo("pacs"))

    def test_past_max_results_cancelled(self):
        found = self.queries.find("pacs", study_query(), wanted=3)
        association = self.h.establish()
        for n in range(3):
            association.match(StudyInstanceUID=f"{STUDY}.{n}")
        self.assertEqual(association.cancels, [association.stream.message_id])
        association.match(StudyInstanceUID=f"{STUDY}.9")  # already on its way: not kept
        association.end(0xFE00)
        result = self.successResultOf(found)
        self.assertEqual((len(result.matches), result.truncated), (3, True))

    def test_failures_in_words(self):
        found = self.queries.find("pacs", study_query())
        self.h.establish().end(0xA700, "out of memory")
        failure = self.failureResultOf(found, DeviceFailure).value
        self.assertEqual((failure.kind, failure.status, failure.comment), ("status", 0xA700, "out of memory"))
        self.assertIn("PACS answered the query 0xA700", failure.reason)

        found = self.queries.find("pacs", study_query())
        self.h.connections[-1][2].errback(AssociationRejected(P.AssociateRJ(1, 1, 7)))
        failure = self.failureResultOf(found, DeviceFailure).value
        self.assertEqual(failure.kind, "rejected")
        self.assertIn("called-AE-title-not-recognized", failure.reason)

        found = self.queries.find("pacs", study_query())
        association = self.h.establish(association=FindAssociation(accepted=(VERIFICATION,)))
        failure = self.failureResultOf(found, DeviceFailure).value
        self.assertEqual(failure.kind, "refused")
        self.assertIn("not Study Root C-FIND", failure.reason)
        self.assertIsNotNone(association.aborted)

        found = self.queries.find("pacs", study_query())
        association = self.h.establish()
        association.abort("the device went away")
        self.assertEqual(self.failureResultOf(found, DeviceFailure).value.kind, "aborted")

    def test_cancelled_find_stops_with_c_cancel(self):
        found = self.queries.find("pacs", study_query())
        association = self.h.establish()
        association.match(StudyInstanceUID=STUDY)
        found.cancel()
        self.failureResultOf(found, defer.CancelledError)
        self.assertEqual(association.cancels, [association.stream.message_id])
        self.assertIsNone(association.aborted)
        following = self.queries.find("pacs", study_query())
        self.assertEqual(len(self.h.connections), 1, "the device is busy until it answers the C-CANCEL")
        association.match(StudyInstanceUID=STUDY + ".2")  # on its way before the cancel: dropped
        association.end(0xFE00)
        self.assertTrue(association.released)
        self.assertEqual(len(self.h.connections), 2)
        self.h.establish().end()
        self.successResultOf(following)

    def test_stopped_while_waiting_asks_nothing(self):
        first = self.queries.find("pacs", study_query())
        run = self.queries.start("pacs", study_query(PatientID="2"))
        run.stop()
        self.h.establish(0).end()
        self.successResultOf(first)
        result = self.successResultOf(run.done)
        self.assertTrue(result.stopped)
        self.assertEqual(len(self.h.connections), 1, "no association for a query stopped before its turn")

    def test_matches_as_they_arrive(self):
        seen = []
        run = self.queries.start("pacs", study_query(), on_match=lambda match: seen.append(match.StudyInstanceUID))
        association = self.h.establish()
        association.match(StudyInstanceUID=STUDY)
        self.assertEqual(seen, [STUDY])
        association.match(StudyInstanceUID=STUDY + ".2")
        self.assertEqual(seen, [STUDY, STUDY + ".2"])
        association.end()
        self.assertEqual(len(self.successResultOf(run.done).matches), 2)

    def test_echo(self):
        echoed = self.queries.echo("local")
        (name, contexts, _), = self.h.connections
        self.assertEqual((name, contexts[0][0]), ("local", VERIFICATION))
        association = self.h.establish()
        self.h.clock.advance(0.25)
        association.echo_answer.callback(0)
        result = self.successResultOf(echoed)
        self.assertEqual((result.status, result.seconds, association.released), (0, 0.25, True))


class QueryHarness(WebHarness):
    def __init__(self, test, **options):
        super().__init__(test, **options)
        self.queries = WebQueries(self.config, self.clock, self.connect)
        self.api = ApiResource(self.config, self.manager, self.store, self.runner, None, self.queries)
        self.site = ApplianceSite(self.api, self.clock)
        self.channels = []

    @staticmethod
    def runner(f, *args):
        return defer.maybeDeferred(f, *args)

    def begin(self, path: str, method: str = "GET", headers: str = ""):
        """Send a request without waiting for its answer: its transport (``headers``: more header lines)."""
        from twisted.internet.testing import StringTransport
        channel = self.site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n{headers}Connection: close\r\n\r\n"
                             .encode())
        self.channels.append(channel)
        return transport

    def establish(self, index: int = -1, association=None):
        association = association or FindAssociation()
        self.connections[index][2].callback(association)
        return association


class QueryApiTests(SynchronousTestCase):
    def setUp(self):
        self.h = QueryHarness(self)

    def test_devices_listed_with_the_local_archive(self):
        devices = self.h.request("GET", "/api/devices").json()["devices"]
        self.assertEqual([(d["name"], d["label"]) for d in devices], [("local", "Local archive"), ("pacs", "pacs")])

    def test_studies_as_dicom_json(self):
        transport = self.h.begin("/api/devices/pacs/studies?PatientName=Sm*&limit=1&offset=1")
        association = self.h.establish()
        association.match(PatientName="Smith^A", StudyInstanceUID=STUDY)
        association.match(PatientName="<script>alert(1)</script>^&amp;", StudyInstanceUID=STUDY + ".2")
        self.assertEqual(association.cancels, [association.stream.message_id], "offset + limit taken: cancelled")
        association.match(PatientName="Smith^C", StudyInstanceUID=STUDY + ".3")
        association.end(0xFE00)
        reply = Reply(transport.value())
        self.assertEqual((reply.status, reply.headers["content-type"]), (200, "application/dicom+json"))
        self.assertEqual((reply.headers["x-matches"], reply.headers["x-truncated"]), ("2", "true"))
        self.assertIn("offset=2", reply.headers["warning"])
        self.assertNotIn(b"<script", reply.body)  # escaped in the JSON itself
        self.assertNotIn(b"&amp;", reply.body)
        (answer,) = reply.json()
        self.assertEqual(answer["00100010"]["Value"][0]["Alphabetic"], "<script>alert(1)</script>^&amp;")
        self.assertEqual(answer["0020000D"]["Value"], [STUDY + ".2"])

    def test_series_and_instances_paths(self):
        transport = self.h.begin(f"/api/devices/pacs/studies/{STUDY}/series")
        association = self.h.establish()
        self.assertEqual((association.identifiers[0].QueryRetrieveLevel, association.identifiers[0].StudyInstanceUID),
                         ("SERIES", STUDY))
        association.end()
        self.assertEqual(Reply(transport.value()).json(), [])
        transport = self.h.begin(f"/api/devices/pacs/studies/{STUDY}/series/{SERIES}/instances")
        association = self.h.establish()
        self.assertEqual((association.identifiers[0].QueryRetrieveLevel,
                          association.identifiers[0].SeriesInstanceUID), ("IMAGE", SERIES))
        association.end()
        self.assertEqual(Reply(transport.value()).status, 200)

    def test_truncated_said_in_a_warning(self):
        self.h.queries.max_results = 2
        transport = self.h.begin("/api/devices/pacs/studies")
        association = self.h.establish()
        for n in range(2):
            association.match(StudyInstanceUID=f"{STUDY}.{n}")
        association.end(0xFE00)
        reply = Reply(transport.value())
        self.assertEqual((reply.status, reply.headers["x-truncated"], len(reply.json())), (200, "true", 2))
        self.assertIn("max_results = 2); narrow it", reply.headers["warning"])

    def test_device_failures(self):
        transport = self.h.begin("/api/devices/pacs/studies")
        self.h.establish().end(0xC001, "index broken")
        reply = Reply(transport.value())
        self.assertEqual(reply.status, 502)
        self.assertEqual({k: reply.json()[k] for k in ("kind", "status", "comment")},
                         {"kind": "status", "status": "0xC001", "comment": "index broken"})
        transport = self.h.begin("/api/devices/pacs/studies")
        self.h.connections[-1][2].errback(AssociationRejected(P.AssociateRJ(1, 1, 3)))
        reply = Reply(transport.value())
        self.assertEqual((reply.status, reply.json()["kind"]), (502, "rejected"))
        self.assertIn("calling-AE-title-not-recognized", reply.json()["error"])

    def test_busy_device_is_503(self):
        from appliance.ae import web_queries as module
        self.patch(module, "MAX_WAITING", 0)
        reply = self.h.request("GET", "/api/devices/pacs/studies")
        self.assertEqual((reply.status, reply.headers["retry-after"], reply.json()["kind"]), (503, "5", "busy"))
        self.assertEqual(self.h.connections, [])

    def test_bad_requests(self):
        cases = [
            ("/api/devices/nope/studies", 404, "no device 'nope'"),
            ("/api/devices/bad%20name/studies", 400, "device name"),
            ("/api/devices/pacs/studies?StudyDate=yesterday", 400, "StudyDate must be a date"),
            ("/api/devices/pacs/studies?Nonsense=1", 400, "unknown attribute"),
            ("/api/devices/pacs/studies/1.2.x/series", 400, "must be a UID"),
            ("/api/devices/pacs/studies?PatientName=%ff", 400, "UTF-8"),
            ("/api/devices/pacs/studies?limit=1000000", 400, "limit must be"),
            ("/api/devices/pacs/studies?Rows=1x", 400, "Rows must be a whole number"),
            ("/api/devices/pacs/studies?=1", 400, "unknown attribute"),
            ("/api/devices/pacs/studies?SliceThickness=abc", 400, "decimal number"),
        ]
        for path, status, reason in cases:
            reply = self.h.request("GET", path)
            self.assertEqual(reply.status, status, path)
            self.assertIn(reason, reply.json()["error"], path)
        self.assertEqual(self.h.connections, [], "nothing was sent to a device")
        self.assertEqual(self.h.request("DELETE", "/api/devices/pacs/studies").status, 405)

    def test_echo(self):
        transport = self.h.begin("/api/devices/local/echo", "POST",
                                 "Content-Length: 0\r\nContent-Type: application/json\r\n")
        association = self.h.establish()
        self.h.clock.advance(0.003)
        association.echo_answer.callback(0)
        reply = Reply(transport.value())
        self.assertEqual(reply.status, 200)
        body = reply.json()
        self.assertEqual((body["device"], body["status"], body["ok"], body["milliseconds"]), ("local", "0x0000", True, 3.0))
        json.dumps(body)

    def test_streamed_as_ndjson(self):
        transport = self.h.begin("/api/devices/pacs/studies?offset=1", headers="Accept: application/x-ndjson\r\n")
        association = self.h.establish()
        association.match(StudyInstanceUID=STUDY)
        self.assertEqual(transport.value(), b"", "nothing before the first match shown (offset 1)")
        association.match(StudyInstanceUID=STUDY + ".2", PatientName="<b>x</b>")
        self.assertIn(b'"0020000D"', transport.value(), "a match is written as soon as it arrives")
        self.assertNotIn(b"<b>", transport.value())
        association.end()
        head, _, body = transport.value().partition(b"\r\n\r\n")
        self.assertIn(b"application/x-ndjson", head)
        decoded = b"".join(line for line in body.split(b"\r\n") if line.startswith(b"{") or line.startswith(b'"'))
        lines = [json.loads(line) for line in decoded.split(b"\n") if line.strip()]
        self.assertEqual(lines[0]["0020000D"]["Value"], [STUDY + ".2"])
        self.assertEqual(lines[-1]["end"]["count"], 1)
        self.assertEqual(lines[-1]["end"]["matches"], 2)

    def test_streamed_failure_before_any_match_is_502(self):
        transport = self.h.begin("/api/devices/pacs/studies", headers="Accept: application/x-ndjson\r\n")
        self.h.establish().end(0xA700, "full")
        reply = Reply(transport.value())
        self.assertEqual((reply.status, reply.json()["status"]), (502, "0xA700"))

    def test_client_going_away_stops_with_c_cancel(self):
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        self.h.begin("/api/devices/pacs/studies")
        association = self.h.establish()
        association.match(StudyInstanceUID=STUDY)
        self.h.channels[-1].connectionLost(Failure(ConnectionDone("the page went away")))
        self.assertEqual(association.cancels, [association.stream.message_id])
        association.end(0xFE00)
        self.assertTrue(association.released)
        self.assertIsNone(association.aborted)

