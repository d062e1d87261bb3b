"""The acceptor's DIMSE provider (appliance/dicom/provider.py), without I/O: PDVs in, events and responses out.

Each PS3.7 rule the provider enforces is driven through encoded PDVs, the way
the adapter feeds it; the hostile cases of issue 9 (a C-CANCEL carrying a
data set re-running the request, non-ASCII bytes in a command's UID, data
reaching a finished request) are among them.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from appliance.dicom import dimse as D
from appliance.dicom import pdu as P
from appliance.dicom import provider as V
from appliance.dicom import status as S
from appliance.dicom.negotiation import ContextOutcome
from appliance.dicom.uids import IMPLICIT_VR_LITTLE_ENDIAN, STUDY_ROOT_FIND, VERIFICATION

CT = "1.2.840.10008.5.1.4.1.1.2"
ACCEPTED = {
    1: ContextOutcome(1, VERIFICATION, 0, IMPLICIT_VR_LITTLE_ENDIAN, ""),
    3: ContextOutcome(3, STUDY_ROOT_FIND, 0, IMPLICIT_VR_LITTLE_ENDIAN, ""),
    5: ContextOutcome(5, CT, 0, IMPLICIT_VR_LITTLE_ENDIAN, ""),
}
OPERATIONS = {VERIFICATION: frozenset({0x0030}), STUDY_ROOT_FIND: frozenset({0x0020}), CT: frozenset({0x0001})}


def pdvs(context_id: int, is_command: bool, data: bytes, last: bool = True):
    """The PDVs of one message part, as the UL hands them over."""
    out = []
    for encoded in D.fragment(context_id, is_command, data, 16384, last=last):
        out.extend(P.PDataTF.decode(encoded).pdvs)
    return out


def command_pdvs(context_id: int, command: D.Command):
    return pdvs(context_id, True, command.encode())


def echo(message_id: int = 1) -> D.Command:
    return D.Command(CommandField=0x0030, MessageID=message_id, AffectedSOPClassUID=VERIFICATION,
                     CommandDataSetType=D.NO_DATA_SET)


def find(message_id: int = 1) -> D.Command:
    return D.Command(CommandField=0x0020, MessageID=message_id, Priority=0, AffectedSOPClassUID=STUDY_ROOT_FIND,
                     CommandDataSetType=0x0000)


def cancel(message_id: int, data_set_type: int = D.NO_DATA_SET) -> D.Command:
    return D.Command(CommandField=0x0FFF, MessageIDBeingRespondedTo=message_id, CommandDataSetType=data_set_type)


class ProviderTests(SynchronousTestCase):

    def setUp(self):
        self.provider = V.DimseProvider(ACCEPTED, OPERATIONS)

    def receive(self, parts):
        return self.provider.receive(parts)

    def test_request_without_data_set(self):
        (event,) = self.receive(command_pdvs(1, echo(7)))
        self.assertIsInstance(event, V.RequestReceived)
        request = event.request
        self.assertEqual((request.message_id, request.problem, request.data_expected), (7, None, False))
        self.assertIs(self.provider.current, request)
        context_id, response = self.provider.respond(request, S.SUCCESS)
        self.assertEqual(context_id, 1)
        self.assertEqual(response, D.Command(CommandField=0x8030, MessageIDBeingRespondedTo=7, Status=0,
                                             AffectedSOPClassUID=VERIFICATION))
        self.assertIsNone(self.provider.current)
        self.assertIsNone(self.provider.respond(request, S.SUCCESS))  # answered once only

    def test_request_with_data_set_and_pendings(self):
        (received,) = self.receive(command_pdvs(3, find(2)))
        request = received.request
        self.assertTrue(request.data_expected)
        events = self.receive(pdvs(3, False, b"\x08\x00", last=False) + pdvs(3, False, b"\x52\x00"))
        self.assertEqual([(type(e), e.data, e.is_last) for e in events],
                         [(V.DataSetFragment, b"\x08\x00", False), (V.DataSetFragment, b"\x52\x00", True)])
        self.assertTrue(request.data_complete)
        self.assertIsNotNone(self.provider.respond(request, S.PENDING))
        self.assertIs(self.provider.current, request)  # pending: still in progress
        self.provider.respond(request, S.SUCCESS)
        self.assertIsNone(self.provider.current)

    def test_cancel_routes_to_the_request_in_progress(self):
        request = self.receive(command_pdvs(3, find(4)))[0].request
        self.receive(pdvs(3, False, b"\x00\x00"))
        self.assertEqual(self.receive(command_pdvs(3, cancel(3))), [])  # another message: ignored
        (event,) = self.receive(command_pdvs(3, cancel(4)))
        self.assertEqual(event, V.CancelRequested(request))
        self.provider.respond(request, S.CANCEL)
        self.assertEqual(self.receive(command_pdvs(3, cancel(4))), [])  # finished: ignored (PS3.7 9.3.2.3)
        self.assertFalse(self.provider.broken)

    def test_cancel_carrying_a_data_set_is_a_violation(self):
        """Issue 9: a C-CANCEL announcing a data set once re-ran the finished C-FIND with that data; now it
        aborts, and no fragment reaches any request."""
        request = self.receive(command_pdvs(3, find(5)))[0].request
        self.receive(pdvs(3, False, b"\x00\x00"))
        self.provider.respond(request, S.SUCCESS)
        (event,) = self.receive(command_pdvs(3, cancel(5, data_set_type=0x0000)))
        self.assertIsInstance(event, V.Violation)
        self.assertIn("C-CANCEL-RQ announcing a data set", event.reason)
        self.assertEqual(self.receive(pdvs(3, False, b"\x00\x00")), [])  # nothing more is decided

    def test_data_for_no_request_is_a_violation(self):
        request = self.receive(command_pdvs(1, echo(1)))[0].request
        self.provider.respond(request, S.SUCCESS)
        (event,) = self.receive(pdvs(1, False, b"late"))
        self.assertIsInstance(event, V.Violation)

    def test_second_request_while_one_is_outstanding(self):
        self.receive(command_pdvs(1, echo(1)))
        (event,) = self.receive(command_pdvs(1, echo(2)))
        self.assertEqual(event, V.Violation("C-ECHO-RQ arrived while message 1 was outstanding "
                                            "(asynchronous operations are not negotiated)"))

    def test_response_to_an_acceptor(self):
        (event,) = self.receive(command_pdvs(1, D.Command(CommandField=0x8030, MessageIDBeingRespondedTo=1,
                                                           Status=0, CommandDataSetType=D.NO_DATA_SET)))
        self.assertEqual(event, V.Violation("received a response (C-ECHO-RSP) as acceptor"))

    def test_pdv_on_a_context_not_accepted(self):
        (event,) = self.receive(command_pdvs(7, echo(1)))
        self.assertIn("presentation context 7, which was not accepted", event.reason)

    def test_malformed_command_set(self):
        (event,) = self.receive(pdvs(1, True, b"\x00\x00\x00\x00\x04\x00"))
        self.assertIsInstance(event, V.Violation)

    def test_operation_not_performed_on_the_context(self):
        """A C-STORE-RQ on the Verification context: answered 0211 once its data set is drained."""
        store = D.Command(CommandField=0x0001, MessageID=3, Priority=0, AffectedSOPClassUID=VERIFICATION,
                          AffectedSOPInstanceUID="1.2.3", CommandDataSetType=0)
        request = self.receive(command_pdvs(1, store))[0].request
        self.assertEqual(request.problem, (S.UNRECOGNIZED_OPERATION, "C-STORE-RQ is not performed on this context"))
        self.assertTrue(request.data_expected)
        self.assertEqual(len(self.receive(pdvs(1, False, b"x" * 100))), 1)
        self.assertEqual(self.provider.respond(request, *request.problem[:1])[1].Status, S.UNRECOGNIZED_OPERATION)

    def test_uid_that_is_not_one_is_refused_and_never_echoed(self):
        """Issue 9: a byte over 0x7F in a C-ECHO's Affected SOP Class UID crashed the response; now C000, and the
        response leaves the value out (encodes fine)."""
        raw = bytearray(echo(9).encode())
        at = raw.index(VERIFICATION.encode())
        raw[at + 2] = 0xE9
        command = D.Command.decode(bytes(raw))
        request = self.receive(pdvs(1, True, bytes(raw)))[0].request
        self.assertEqual(request.problem, (S.CANNOT_UNDERSTAND, "AffectedSOPClassUID is not a valid UID"))
        self.assertNotEqual(command.AffectedSOPClassUID, VERIFICATION)
        _, response = self.provider.respond(request, S.CANNOT_UNDERSTAND, ErrorComment="AffectedSOPClassUID \x00é")
        self.assertIsNone(response.AffectedSOPClassUID)
        self.assertEqual(response.ErrorComment, "AffectedSOPClassUID ??")
        D.Command.decode(response.encode())

    def test_missing_elements_and_wrong_sop_class(self):
        request = self.receive(command_pdvs(1, D.Command(CommandField=0x0030, MessageID=1,
                                                         CommandDataSetType=D.NO_DATA_SET)))[0].request
        self.assertEqual(request.problem, (S.CANNOT_UNDERSTAND, "missing AffectedSOPClassUID"))
        self.provider.respond(request, S.CANNOT_UNDERSTAND)
        wrong = echo(2)
        wrong.AffectedSOPClassUID = CT
        request = self.receive(command_pdvs(1, wrong))[0].request
        self.assertEqual(request.problem[0], S.CANNOT_UNDERSTAND)
        self.assertIn("is not context 1's", request.problem[1])

    def test_error_comment(self):
        self.assertEqual(V.error_comment("a\r\nb\x1b[31m" + "x" * 100), "a??b?[31m" + "x" * 55)

    def test_end(self):
        request = self.receive(command_pdvs(3, find(1)))[0].request
        self.assertIs(self.provider.end(), request)
        self.assertIsNone(self.provider.current)
        self.assertEqual(self.receive(command_pdvs(1, echo(2))), [])
