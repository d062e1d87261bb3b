"""Tests for the PS3.8 Upper Layer state machine.

:mod:`appliance.dicom.fsm` holds PS3.8 Table 9-10 as data and
:mod:`appliance.dicom.ul` runs it.  These tests

* compare ``fsm.TRANSITIONS`` and the next states of ``fsm.ACTIONS`` with
  PS3.8 Tables 9-6 to 9-10 written out independently below;
* for every (state, event) pair of the table, drive a real
  :class:`~appliance.dicom.ul.UpperLayer` into the state through its public
  inputs, feed the event, and check the action, the next state, the outputs
  in order and the bytes of every PDU sent;
* check that undefined local primitives raise :class:`LocalProtocolError`
  and that an A-ABORT request where Evt15 is undefined is a no-op;
* run the release collision, AE-6 protocol version rejection, framing and
  ARTIM (on a Twisted :class:`~twisted.internet.task.Clock`) paths end to end.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from appliance.dicom import pdu as P
from appliance.dicom.errors import LocalProtocolError
from appliance.dicom.fsm import ACTIONS, TRANSITIONS, Action, Event, State
from appliance.dicom.ul import (
    HISTORY_LENGTH,
    AbortIndication,
    AssociateAccepted,
    AssociateIndication,
    AssociateRejected,
    CloseTransport,
    OpenTransport,
    PDataIndication,
    ProviderAbortIndication,
    ReleaseConfirmation,
    ReleaseIndication,
    Role,
    Send,
    StartARTIM,
    StopARTIM,
    UpperLayer,
)

# ---------------------------------------------------------------------------
# PS3.8 Table 9-10, written out from the standard, one row per event and one
# column per state (Sta1 ... Sta13); None where the standard leaves the cell
# empty.

_ = None
TABLE_9_10 = {
    #          Sta1    Sta2    Sta3    Sta4    Sta5    Sta6    Sta7    Sta8    Sta9    Sta10    Sta11   Sta12   Sta13
    "Evt1":  ("AE-1", _,      _,      _,      _,      _,      _,      _,      _,      _,       _,      _,      _),
    "Evt2":  (_,      _,      _,      "AE-2", _,      _,      _,      _,      _,      _,       _,      _,      _),
    "Evt3":  (_,      "AA-1", "AA-8", _,      "AE-3", "AA-8", "AA-8", "AA-8", "AA-8", "AA-8",  "AA-8", "AA-8", "AA-6"),
    "Evt4":  (_,      "AA-1", "AA-8", _,      "AE-4", "AA-8", "AA-8", "AA-8", "AA-8", "AA-8",  "AA-8", "AA-8", "AA-6"),
    "Evt5":  ("AE-5", _,      _,      _,      _,      _,      _,      _,      _,      _,       _,      _,      _),
    "Evt6":  (_,      "AE-6", "AA-8", _,      "AA-8", "AA-8", "AA-8", "AA-8", "AA-8", "AA-8",  "AA-8", "AA-8", "AA-7"),
    "Evt7":  (_,      _,      "AE-7", _,      _,      _,      _,      _,      _,      _,       _,      _,      _),
    "Evt8":  (_,      _,      "AE-8", _,      _,      _,      _,      _,      _,      _,       _,      _,      _),
    "Evt9":  (_,      _,      _,      _,      _,      "DT-1", _,      "AR-7", _,      _,       _,      _,      _),
    "Evt10": (_,      "AA-1", "AA-8", _,      "AA-8", "DT-2", "AR-6", "AA-8", "AA-8", "AA-8",  "AA-8", "AA-8", "AA-6"),
    "Evt11": (_,      _,      _,      _,      _,      "AR-1", _,      _,      _,      _,       _,      _,      _),
    "Evt12": (_,      "AA-1", "AA-8", _,      "AA-8", "AR-2", "AR-8", "AA-8", "AA-8", "AA-8",  "AA-8", "AA-8", "AA-6"),
    "Evt13": (_,      "AA-1", "AA-8", _,      "AA-8", "AA-8", "AR-3", "AA-8", "AA-8", "AR-10", "AR-3", "AA-8", "AA-6"),
    "Evt14": (_,      _,      _,      _,      _,      _,      _,      "AR-4", "AR-9", _,       _,      "AR-4", _),
    "Evt15": (_,      _,      "AA-1", "AA-2", "AA-1", "AA-1", "AA-1", "AA-1", "AA-1", "AA-1",  "AA-1", "AA-1", _),
    "Evt16": (_,      "AA-2", "AA-3", _,      "AA-3", "AA-3", "AA-3", "AA-3", "AA-3", "AA-3",  "AA-3", "AA-3", "AA-2"),
    "Evt17": (_,      "AA-5", "AA-4", "AA-4", "AA-4", "AA-4", "AA-4", "AA-4", "AA-4", "AA-4",  "AA-4", "AA-4", "AR-5"),
    "Evt18": (_,      "AA-2", _,      _,      _,      _,      _,      _,      _,      _,       _,      _,      "AR-5"),
    "Evt19": (_,      "AA-1", "AA-8", _,      "AA-8", "AA-8", "AA-8", "AA-8", "AA-8", "AA-8",  "AA-8", "AA-8", "AA-7"),
}
del _

#: PS3.8 Tables 9-6 to 9-9: the state(s) each action leads to.
ACTION_NEXT_STATES = {
    "AE-1": {4}, "AE-2": {5}, "AE-3": {6}, "AE-4": {1}, "AE-5": {2}, "AE-6": {3, 13}, "AE-7": {6}, "AE-8": {13},
    "DT-1": {6}, "DT-2": {6},
    "AR-1": {7}, "AR-2": {8}, "AR-3": {1}, "AR-4": {13}, "AR-5": {1}, "AR-6": {7}, "AR-7": {8}, "AR-8": {9, 10},
    "AR-9": {11}, "AR-10": {12},
    "AA-1": {13}, "AA-2": {1}, "AA-3": {1}, "AA-4": {1}, "AA-5": {1}, "AA-6": {13}, "AA-7": {13}, "AA-8": {13},
}


def _state(number: int) -> State:
    return State[f"STA{number}"]


def _event(label: str) -> Event:
    return Event[label.upper()]


def _action(label: str) -> Action:
    return Action[label.replace("-", "_")]


#: TABLE_9_10 as ``{(State, Event): Action}``.
EXPECTED_TRANSITIONS = {
    (_state(column + 1), _event(event)): _action(cell)
    for event, row in TABLE_9_10.items()
    for column, cell in enumerate(row)
    if cell is not None
}

# ---------------------------------------------------------------------------
# PDUs, and the bytes PS3.8 9.3 says the fixed-size ones encode to

MAX_PDATA = 16384
VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
USER_INFO = P.UserInformation(maximum_length=MAX_PDATA, implementation_class_uid="1.2.826.0.1.3680043.9.9999")

RQ = P.AssociateRQ(
    "STORESCP",
    "ECHOSCU",
    user_information=USER_INFO,
    presentation_contexts=(P.PresentationContextRQ(1, VERIFICATION, (IMPLICIT_LE,)),),
)
AC = P.AssociateAC(
    "STORESCP",
    "ECHOSCU",
    user_information=USER_INFO,
    presentation_contexts=(P.PresentationContextAC(1, P.PresentationContextAC.ACCEPTANCE, IMPLICIT_LE),),
)
#: rejected-permanent, service-user, called-AE-title-not-recognized
RJ = P.AssociateRJ(1, 1, 7)
PDATA = P.PDataTF((P.PDV(1, True, True, b"\x00\x00\x02\x00\x00\x00\x00\x00"),))

RQ_BYTES = RQ.encode()
AC_BYTES = AC.encode()
PDATA_BYTES = PDATA.encode()
RJ_BYTES = b"\x03\x00" b"\x00\x00\x00\x04" b"\x00\x01\x01\x07"
RELEASE_RQ_BYTES = b"\x05\x00" b"\x00\x00\x00\x04" b"\x00\x00\x00\x00"
RELEASE_RP_BYTES = b"\x06\x00" b"\x00\x00\x00\x04" b"\x00\x00\x00\x00"
#: A PDU of type 0x09, which PS3.8 Table 9-1 does not define.
UNKNOWN_PDU_BYTES = b"\x09\x00" b"\x00\x00\x00\x04" b"\x00\x00\x00\x00"

SERVICE_USER, SERVICE_PROVIDER = 0, 2
NOT_SPECIFIED, UNRECOGNIZED_PDU, UNEXPECTED_PDU, INVALID_PARAMETER = 0, 1, 2, 6


def abort_bytes(source: int, reason: int) -> bytes:
    """An A-ABORT PDU as PS3.8 9.3.8 lays it out."""
    return b"\x07\x00" b"\x00\x00\x00\x04" b"\x00\x00" + bytes((source, reason))


def send(data: bytes) -> Send:
    return Send(data, data[0])


#: How each event is fed through UpperLayer's public inputs.
EVENT_INPUTS = {
    Event.EVT1: lambda ul: ul.request_association(RQ),
    Event.EVT2: lambda ul: ul.transport_connected(),
    Event.EVT3: lambda ul: ul.receive_data(AC_BYTES),
    Event.EVT4: lambda ul: ul.receive_data(RJ_BYTES),
    Event.EVT5: lambda ul: ul.transport_connected(),
    Event.EVT6: lambda ul: ul.receive_data(RQ_BYTES),
    Event.EVT7: lambda ul: ul.accept(AC),
    Event.EVT8: lambda ul: ul.reject(RJ),
    Event.EVT9: lambda ul: ul.send_pdata(PDATA_BYTES),
    Event.EVT10: lambda ul: ul.receive_data(PDATA_BYTES),
    Event.EVT11: lambda ul: ul.request_release(),
    Event.EVT12: lambda ul: ul.receive_data(RELEASE_RQ_BYTES),
    Event.EVT13: lambda ul: ul.receive_data(RELEASE_RP_BYTES),
    Event.EVT14: lambda ul: ul.respond_release(),
    Event.EVT15: lambda ul: ul.abort(),
    Event.EVT16: lambda ul: ul.receive_data(abort_bytes(SERVICE_USER, NOT_SPECIFIED)),
    Event.EVT17: lambda ul: ul.transport_closed(),
    Event.EVT18: lambda ul: ul.artim_expired(),
    Event.EVT19: lambda ul: ul.receive_data(UNKNOWN_PDU_BYTES),
}

#: The events that are primitives of the local user or the local transport
#: service (everything except received PDUs, Evt15 and Evt17).
LOCAL_EVENTS = (
    Event.EVT1, Event.EVT2, Event.EVT5, Event.EVT7, Event.EVT8, Event.EVT9, Event.EVT11, Event.EVT14, Event.EVT18,
)

# ---------------------------------------------------------------------------
# Reaching each state through real inputs

S = State
_REQUESTOR_PATHS = {
    S.STA1: (),
    S.STA4: (Event.EVT1,),
    S.STA5: (Event.EVT1, Event.EVT2),
    S.STA6: (Event.EVT1, Event.EVT2, Event.EVT3),
    S.STA7: (Event.EVT1, Event.EVT2, Event.EVT3, Event.EVT11),
    S.STA8: (Event.EVT1, Event.EVT2, Event.EVT3, Event.EVT12),
    S.STA9: (Event.EVT1, Event.EVT2, Event.EVT3, Event.EVT11, Event.EVT12),
    S.STA11: (Event.EVT1, Event.EVT2, Event.EVT3, Event.EVT11, Event.EVT12, Event.EVT14),
    S.STA13: (Event.EVT1, Event.EVT2, Event.EVT3, Event.EVT12, Event.EVT14),
}
_ACCEPTOR_PATHS = {
    S.STA1: (),
    S.STA2: (Event.EVT5,),
    S.STA3: (Event.EVT5, Event.EVT6),
    S.STA6: (Event.EVT5, Event.EVT6, Event.EVT7),
    S.STA7: (Event.EVT5, Event.EVT6, Event.EVT7, Event.EVT11),
    S.STA8: (Event.EVT5, Event.EVT6, Event.EVT7, Event.EVT12),
    S.STA10: (Event.EVT5, Event.EVT6, Event.EVT7, Event.EVT11, Event.EVT12),
    S.STA12: (Event.EVT5, Event.EVT6, Event.EVT7, Event.EVT11, Event.EVT12, Event.EVT13),
    S.STA13: (Event.EVT5, Event.EVT6, Event.EVT8),
}
PATHS = {Role.REQUESTOR: _REQUESTOR_PATHS, Role.ACCEPTOR: _ACCEPTOR_PATHS}
del S


def roles_for(state: State, event: Event):
    """The roles a (state, event) pair is exercised in."""
    if state is State.STA1:
        return (Role.REQUESTOR,) if event is Event.EVT1 else (Role.ACCEPTOR,)
    return tuple(role for role in Role if state in PATHS[role])


def expected_next_state(action: Action, role: Role) -> State:
    """The next state: AE-6 with an acceptable request goes to Sta3; AR-8 by role."""
    if action is Action.AE_6:
        return State.STA3
    if action is Action.AR_8:
        return State.STA9 if role is Role.REQUESTOR else State.STA10
    (number,) = ACTION_NEXT_STATES[action.value]
    return _state(number)


def provider_abort(reason: int):
    """How :meth:`FSMTestMixin.normalise` shows a ProviderAbortIndication."""
    return ("A-P-ABORT", reason)


def expected_outputs(state: State, event: Event, action: Action) -> list:
    """The outputs of ``action`` run for ``event`` in ``state``, in order."""
    reason = UNRECOGNIZED_PDU if event is Event.EVT19 else UNEXPECTED_PDU
    provider_aborts = [send(abort_bytes(SERVICE_PROVIDER, reason)), provider_abort(reason), StartARTIM()]
    A = Action
    if action is A.AE_1:
        return [OpenTransport()]
    if action is A.AE_2:
        return [send(RQ_BYTES)]
    if action is A.AE_3:
        return [AssociateAccepted(AC)]
    if action is A.AE_4:
        return [AssociateRejected(RJ), CloseTransport()]
    if action is A.AE_5:
        return [StartARTIM()]
    if action is A.AE_6:
        return [StopARTIM(), AssociateIndication(RQ)]
    if action is A.AE_7:
        return [send(AC_BYTES)]
    if action is A.AE_8:
        return [send(RJ_BYTES), StartARTIM()]
    if action in (A.DT_1, A.AR_7):
        return [send(PDATA_BYTES)]
    if action in (A.DT_2, A.AR_6):
        return [PDataIndication(PDATA.pdvs)]
    if action is A.AR_1:
        return [send(RELEASE_RQ_BYTES)]
    if action is A.AR_2:
        return [ReleaseIndication(collision=False)]
    if action is A.AR_3:
        return [ReleaseConfirmation(), CloseTransport()]
    if action is A.AR_4:
        return [send(RELEASE_RP_BYTES), StartARTIM()]
    if action is A.AR_5:
        # Evt18: the peer did not close in time, so we close; Evt17: it closed.
        return [CloseTransport()] if event is Event.EVT18 else [StopARTIM()]
    if action is A.AR_8:
        return [ReleaseIndication(collision=True)]
    if action is A.AR_9:
        return [send(RELEASE_RP_BYTES)]
    if action is A.AR_10:
        return [ReleaseConfirmation()]
    if action is A.AA_1:
        if event is Event.EVT15:
            return [send(abort_bytes(SERVICE_USER, NOT_SPECIFIED)), StartARTIM()]
        return provider_aborts
    if action is A.AA_2:
        # Before an association exists the user still learns why the connection went.
        told = [provider_abort(NOT_SPECIFIED)] if state is State.STA2 else []
        return told + [StopARTIM(), CloseTransport()]
    if action is A.AA_3:
        return [AbortIndication(SERVICE_USER, NOT_SPECIFIED), CloseTransport()]
    if action is A.AA_4:
        return [StopARTIM(), provider_abort(NOT_SPECIFIED)]
    if action is A.AA_5:
        return [StopARTIM()]
    if action is A.AA_6:
        return []
    if action is A.AA_7:
        return [send(abort_bytes(SERVICE_PROVIDER, reason))]
    if action is A.AA_8:
        return provider_aborts
    raise AssertionError(f"no expectation for {action}")


class FSMTestMixin:
    """Helpers shared by the test cases."""

    def reach(self, state: State, role: Role) -> UpperLayer:
        """A new UpperLayer of ``role`` driven into ``state`` through its public inputs."""
        ul = UpperLayer(role, MAX_PDATA)
        for event in PATHS[role][state]:
            EVENT_INPUTS[event](ul)
        self.assertIs(ul.state, state)
        self.assertEqual([entry[1] for entry in ul.history], list(PATHS[role][state]))
        return ul

    def normalise(self, outputs: list) -> list:
        """The outputs, with each A-P-ABORT indication reduced to its reason (its message checked non-empty)."""
        result = []
        for output in outputs:
            if isinstance(output, ProviderAbortIndication):
                self.assertIsInstance(output.message, str)
                self.assertTrue(output.message)
                result.append(provider_abort(output.reason))
            else:
                result.append(output)
        return result

    def assertOutputs(self, outputs: list, expected: list) -> None:
        self.assertEqual(self.normalise(outputs), expected)


# ---------------------------------------------------------------------------


class TableTests(SynchronousTestCase):
    """fsm.py against PS3.8 Tables 9-6 to 9-10."""

    def test_transitions_are_table_9_10(self):
        """TRANSITIONS has exactly the cells of PS3.8 Table 9-10, each with its action."""
        missing = {pair: action for pair, action in EXPECTED_TRANSITIONS.items() if pair not in TRANSITIONS}
        extra = {pair: action for pair, action in TRANSITIONS.items() if pair not in EXPECTED_TRANSITIONS}
        wrong = {
            pair: (TRANSITIONS[pair], action)
            for pair, action in EXPECTED_TRANSITIONS.items()
            if pair in TRANSITIONS and TRANSITIONS[pair] is not action
        }
        self.assertEqual((missing, extra, wrong), ({}, {}, {}))
        self.assertEqual(TRANSITIONS, EXPECTED_TRANSITIONS)

    def test_table_size(self):
        """The written-out table has 19 events of 13 states and 123 defined cells."""
        self.assertEqual(len(TABLE_9_10), 19)
        self.assertEqual({len(row) for row in TABLE_9_10.values()}, {13})
        self.assertEqual(len(EXPECTED_TRANSITIONS), 123)

    def test_action_next_states(self):
        """Every action of Tables 9-6 to 9-9 is in ACTIONS and leads to the states the standard gives."""
        self.assertEqual({action.value for action in ACTIONS}, set(ACTION_NEXT_STATES))
        for action, spec in ACTIONS.items():
            self.assertEqual(
                set(spec.next_states), {_state(n) for n in ACTION_NEXT_STATES[action.value]}, action
            )

    def test_every_action_is_used(self):
        """Every action of Tables 9-6 to 9-9 appears in some cell of Table 9-10."""
        self.assertEqual(set(TRANSITIONS.values()), set(Action))

    def test_every_pair_has_a_generated_test(self):
        """Each (state, event) pair in TRANSITIONS has a generated transition test."""
        names = {name for name in dir(TransitionTests) if name.startswith("test_")}
        for state, event in TRANSITIONS:
            prefix = f"test_{state.label}_{event.label}_"
            self.assertTrue(any(name.startswith(prefix) for name in names), (state, event))


class TransitionTests(FSMTestMixin, SynchronousTestCase):
    """One generated test per (state, event, role) for every cell of Table 9-10."""

    def check_transition(self, state: State, event: Event, role: Role) -> None:
        action = EXPECTED_TRANSITIONS.get((state, event))
        self.assertIsNotNone(action, f"{state.label}/{event.label} is not a cell of PS3.8 Table 9-10")
        ul = self.reach(state, role)
        before = len(ul.history)
        outputs = EVENT_INPUTS[event](ul)
        after = expected_next_state(action, role)
        self.assertEqual(ul.history[before:], [(state, event, action, after)])
        self.assertIs(ul.state, after)
        self.assertIn(after, ACTIONS[action].next_states)
        self.assertOutputs(outputs, expected_outputs(state, event, action))


def _transition_test(state: State, event: Event, role: Role):
    action = EXPECTED_TRANSITIONS.get((state, event)) or TRANSITIONS.get((state, event))

    def test(self):
        self.check_transition(state, event, role)

    test.__doc__ = (
        f"{state.label} + {event.label} ({event.value}) as {role.value}: "
        f"{action.value if action else '?'} to the right state with the right outputs."
    )
    return test


for _state_, _event_ in sorted(
    set(EXPECTED_TRANSITIONS) | set(TRANSITIONS), key=lambda pair: (int(pair[0].label[3:]), int(pair[1].label[3:]))
):
    for _role_ in roles_for(_state_, _event_):
        _name = f"test_{_state_.label}_{_event_.label}_{_role_.value}"
        setattr(TransitionTests, _name, _transition_test(_state_, _event_, _role_))
del _state_, _event_, _role_, _name


class UndefinedPairTests(FSMTestMixin, SynchronousTestCase):
    """Local primitives the table does not allow raise; an undefined abort is a no-op."""

    def check_undefined(self, state: State, event: Event, role: Role) -> None:
        ul = self.reach(state, role)
        history = list(ul.history)
        self.assertNotIn((state, event), TRANSITIONS)
        self.assertRaises(LocalProtocolError, EVENT_INPUTS[event], ul)
        self.assertIs(ul.state, state)
        self.assertEqual(ul.history, history)

    def check_abort_noop(self, state: State, role: Role) -> None:
        ul = self.reach(state, role)
        history = list(ul.history)
        self.assertNotIn((state, Event.EVT15), TRANSITIONS)
        self.assertEqual(ul.abort(), [])
        self.assertEqual(ul.abort(P.AbortSource.SERVICE_PROVIDER, P.AbortReason.UNEXPECTED_PDU), [])
        self.assertIs(ul.state, state)
        self.assertEqual(ul.history, history)

    def test_data_in_sta1_ignored(self):
        """Bytes arriving in Sta1 (after the association ended) are ignored, not an error."""
        ul = self.reach(State.STA1, Role.ACCEPTOR)
        self.assertEqual(ul.receive_data(RQ_BYTES + UNKNOWN_PDU_BYTES), [])
        self.assertIs(ul.state, State.STA1)
        self.assertEqual(ul.history, [])

    def test_transport_closed_in_sta1_is_noop(self):
        """Evt17 in Sta1 (the close that follows our own CloseTransport) changes nothing."""
        ul = self.reach(State.STA5, Role.REQUESTOR)
        self.assertOutputs(ul.receive_data(RJ_BYTES), [AssociateRejected(RJ), CloseTransport()])
        self.assertIs(ul.state, State.STA1)
        self.assertEqual(ul.transport_closed(), [])
        self.assertIs(ul.state, State.STA1)
        self.assertEqual(len(ul.history), 3)

    def test_error_message_names_state_and_event(self):
        """The LocalProtocolError says which event was refused in which state."""
        ul = self.reach(State.STA7, Role.REQUESTOR)
        error = self.assertRaises(LocalProtocolError, ul.send_pdata, PDATA_BYTES)
        self.assertIn("Evt9", str(error))
        self.assertIn("Sta7", str(error))


def _undefined_test(state: State, event: Event, role: Role):
    def test(self):
        self.check_undefined(state, event, role)

    test.__doc__ = f"{event.label} ({event.value}) in {state.label} as {role.value} raises LocalProtocolError."
    return test


def _abort_noop_test(state: State, role: Role):
    def test(self):
        self.check_abort_noop(state, role)

    test.__doc__ = f"A-ABORT request in {state.label} as {role.value}, where Evt15 is undefined, returns []."
    return test


for _role_ in Role:
    for _state_ in PATHS[_role_]:
        for _event_ in LOCAL_EVENTS:
            if _event_ is Event.EVT2 and _role_ is not Role.REQUESTOR:
                continue  # an acceptor's transport_connected() is Evt5
            if _event_ is Event.EVT5 and _role_ is not Role.ACCEPTOR:
                continue  # a requestor's transport_connected() is Evt2
            if (_state_, _event_) in EXPECTED_TRANSITIONS:
                continue
            _name = f"test_{_state_.label}_{_event_.label}_{_role_.value}"
            setattr(UndefinedPairTests, _name, _undefined_test(_state_, _event_, _role_))
        if (_state_, Event.EVT15) not in EXPECTED_TRANSITIONS:
            _name = f"test_abort_noop_{_state_.label}_{_role_.value}"
            setattr(UndefinedPairTests, _name, _abort_noop_test(_state_, _role_))
del _role_, _state_, _event_, _name


class ActionDetailTests(FSMTestMixin, SynchronousTestCase):
    """The branches of actions the generated tests take only one way."""

    def test_ae6_rejects_protocol_version_without_bit_0(self):
        """AE-6: an A-ASSOCIATE-RQ with bit 0 of the protocol version clear gets A-ASSOCIATE-RJ (1, 2, 2) and Sta13."""
        ul = self.reach(State.STA2, Role.ACCEPTOR)
        request = P.AssociateRQ("STORESCP", "ECHOSCU", user_information=USER_INFO, protocol_version=2)
        outputs = ul.receive_data(request.encode())
        rejection = P.AssociateRJ(1, 2, 2)
        self.assertOutputs(
            outputs,
            [
                StopARTIM(),
                AssociateRejected(rejection, local=True),
                Send(b"\x03\x00\x00\x00\x00\x04\x00\x01\x02\x02", 0x03),
                StartARTIM(),
            ],
        )
        self.assertIs(ul.state, State.STA13)
        self.assertEqual(ul.history[-1], (State.STA2, Event.EVT6, Action.AE_6, State.STA13))

    def test_ae6_version_zero_rejected(self):
        """AE-6: protocol version 0 is rejected too."""
        ul = self.reach(State.STA2, Role.ACCEPTOR)
        request = P.AssociateRQ("STORESCP", "ECHOSCU", user_information=USER_INFO, protocol_version=0)
        ul.receive_data(request.encode())
        self.assertIs(ul.state, State.STA13)

    def test_ae6_tests_only_bit_0(self):
        """AE-6: other version bits set besides bit 0 are acceptable (PS3.8 9.3.2: test only bit 0)."""
        ul = self.reach(State.STA2, Role.ACCEPTOR)
        request = P.AssociateRQ("STORESCP", "ECHOSCU", user_information=USER_INFO, protocol_version=0x0003)
        self.assertOutputs(ul.receive_data(request.encode()), [StopARTIM(), AssociateIndication(request)])
        self.assertIs(ul.state, State.STA3)

    def test_ae6_rejection_then_peer_closes(self):
        """After the AE-6 rejection the peer's close (Evt17) is AR-5 and stops ARTIM."""
        ul = self.reach(State.STA2, Role.ACCEPTOR)
        ul.receive_data(P.AssociateRQ("A", "B", user_information=USER_INFO, protocol_version=2).encode())
        self.assertEqual(ul.transport_closed(), [StopARTIM()])
        self.assertIs(ul.state, State.STA1)
        self.assertEqual(ul.history[-1], (State.STA13, Event.EVT17, Action.AR_5, State.STA1))

    def test_aa1_user_abort_with_source_and_reason(self):
        """AA-1 for the user's Evt15 sends the source and reason passed to abort()."""
        ul = self.reach(State.STA6, Role.ACCEPTOR)
        outputs = ul.abort(P.AbortSource.SERVICE_PROVIDER, P.AbortReason.UNEXPECTED_PDU_PARAMETER)
        self.assertOutputs(outputs, [send(abort_bytes(SERVICE_PROVIDER, 5)), StartARTIM()])
        self.assertIs(ul.state, State.STA13)

    def test_aa1_in_sta2_for_bad_pdu_uses_decode_reason(self):
        """AA-1 in Sta2 for an invalid PDU sends a provider A-ABORT with the decode error's reason."""
        ul = self.reach(State.STA2, Role.ACCEPTOR)
        outputs = ul.receive_data(b"\x05\x00\x00\x00\x00\x06" + bytes(6))
        self.assertOutputs(
            outputs,
            [send(abort_bytes(SERVICE_PROVIDER, INVALID_PARAMETER)), provider_abort(INVALID_PARAMETER), StartARTIM()],
        )
        self.assertEqual(ul.history[-1], (State.STA2, Event.EVT19, Action.AA_1, State.STA13))

    def test_aa3_provider_source(self):
        """AA-3: an A-ABORT PDU with the service-provider source is an A-P-ABORT indication with its reason."""
        ul = self.reach(State.STA6, Role.REQUESTOR)
        outputs = ul.receive_data(abort_bytes(SERVICE_PROVIDER, INVALID_PARAMETER))
        self.assertOutputs(outputs, [provider_abort(INVALID_PARAMETER), CloseTransport()])
        self.assertIs(ul.state, State.STA1)
        self.assertEqual(ul.history[-1], (State.STA6, Event.EVT16, Action.AA_3, State.STA1))

    def test_aa3_user_source_keeps_reason(self):
        """AA-3: a service-user A-ABORT is an A-ABORT indication carrying the PDU's source and reason."""
        ul = self.reach(State.STA3, Role.ACCEPTOR)
        outputs = ul.receive_data(abort_bytes(SERVICE_USER, 3))
        self.assertOutputs(outputs, [AbortIndication(SERVICE_USER, 3), CloseTransport()])

    def test_aa8_bad_length_is_evt19(self):
        """A fixed-size PDU declaring a wrong length is Evt19: AA-8 with reason invalid-PDU-parameter-value."""
        ul = self.reach(State.STA7, Role.ACCEPTOR)
        outputs = ul.receive_data(b"\x06\x00\x00\x00\x00\x05" + bytes(5))
        self.assertOutputs(
            outputs,
            [send(abort_bytes(SERVICE_PROVIDER, INVALID_PARAMETER)), provider_abort(INVALID_PARAMETER), StartARTIM()],
        )
        self.assertEqual(ul.history[-1], (State.STA7, Event.EVT19, Action.AA_8, State.STA13))

    def test_oversized_pdata_refused_from_header(self):
        """A P-DATA-TF header declaring more than our maximum length is Evt19 before its body arrives."""
        ul = self.reach(State.STA6, Role.ACCEPTOR)
        header = b"\x04\x00" + (MAX_PDATA + 1).to_bytes(4, "big")
        outputs = ul.receive_data(header)
        self.assertOutputs(
            outputs,
            [send(abort_bytes(SERVICE_PROVIDER, INVALID_PARAMETER)), provider_abort(INVALID_PARAMETER), StartARTIM()],
        )
        self.assertIs(ul.state, State.STA13)

    def test_aa7_in_sta13_for_bad_pdu(self):
        """AA-7: an invalid PDU in Sta13 is answered with an A-ABORT carrying the decode reason, ARTIM untouched."""
        ul = self.reach(State.STA13, Role.ACCEPTOR)
        outputs = ul.receive_data(b"\x07\x00\x00\x00\x00\x03" + bytes(3))
        self.assertOutputs(outputs, [send(abort_bytes(SERVICE_PROVIDER, INVALID_PARAMETER))])
        self.assertIs(ul.state, State.STA13)

    def test_aa6_ignores_every_pdu_in_sta13(self):
        """AA-6: AC, RJ, P-DATA-TF, RELEASE-RQ and RELEASE-RP in Sta13 are ignored, in one call."""
        ul = self.reach(State.STA13, Role.REQUESTOR)
        before = len(ul.history)
        data = AC_BYTES + RJ_BYTES + PDATA_BYTES + RELEASE_RQ_BYTES + RELEASE_RP_BYTES
        self.assertEqual(ul.receive_data(data), [])
        self.assertEqual([entry[2] for entry in ul.history[before:]], [Action.AA_6] * 5)
        self.assertIs(ul.state, State.STA13)

    def test_data_transfer_both_ways(self):
        """DT-1 and DT-2 keep the association in Sta6 for any number of P-DATA."""
        ul = self.reach(State.STA6, Role.REQUESTOR)
        for _ in range(3):
            self.assertOutputs(ul.send_pdata(PDATA_BYTES), [send(PDATA_BYTES)])
            self.assertOutputs(ul.receive_data(PDATA_BYTES), [PDataIndication(PDATA.pdvs)])
        self.assertIs(ul.state, State.STA6)

    def test_history_bounded(self):
        """An association of many PDUs keeps the last transitions only, not one entry per PDU forever."""
        ul = self.reach(State.STA6, Role.ACCEPTOR)
        for _ in range(10 * HISTORY_LENGTH):
            ul.receive_data(PDATA_BYTES)
        self.assertLessEqual(len(ul.history), 2 * HISTORY_LENGTH)
        self.assertGreaterEqual(len(ul.history), HISTORY_LENGTH)
        self.assertEqual(ul.history[-1], (State.STA6, Event.EVT10, Action.DT_2, State.STA6))


class ReleaseTests(FSMTestMixin, SynchronousTestCase):
    """Normal release and release collision, end to end."""

    def run_inputs(self, ul: UpperLayer, steps) -> None:
        """Apply (input, expected outputs, expected state) steps in order."""
        for feed, expected, state in steps:
            self.assertOutputs(feed(ul), expected)
            self.assertIs(ul.state, state)

    def test_normal_release_requestor(self):
        """Requestor: Sta6 -AR-1-> Sta7 -AR-3-> Sta1."""
        ul = self.reach(State.STA6, Role.REQUESTOR)
        self.run_inputs(ul, [
            (lambda u: u.request_release(), [send(RELEASE_RQ_BYTES)], State.STA7),
            (lambda u: u.receive_data(PDATA_BYTES), [PDataIndication(PDATA.pdvs)], State.STA7),
            (lambda u: u.receive_data(RELEASE_RP_BYTES), [ReleaseConfirmation(), CloseTransport()], State.STA1),
            (lambda u: u.transport_closed(), [], State.STA1),
        ])

    def test_normal_release_acceptor(self):
        """Acceptor: Sta6 -AR-2-> Sta8 -AR-7-> Sta8 -AR-4-> Sta13 -AR-5-> Sta1."""
        ul = self.reach(State.STA6, Role.ACCEPTOR)
        self.run_inputs(ul, [
            (lambda u: u.receive_data(RELEASE_RQ_BYTES), [ReleaseIndication()], State.STA8),
            (lambda u: u.send_pdata(PDATA_BYTES), [send(PDATA_BYTES)], State.STA8),
            (lambda u: u.respond_release(), [send(RELEASE_RP_BYTES), StartARTIM()], State.STA13),
            (lambda u: u.transport_closed(), [StopARTIM()], State.STA1),
        ])

    def test_collision_requestor(self):
        """Requestor collision: Sta6 -> Sta7 -> Sta9 -> Sta11 -> Sta1."""
        ul = self.reach(State.STA6, Role.REQUESTOR)
        self.run_inputs(ul, [
            (lambda u: u.request_release(), [send(RELEASE_RQ_BYTES)], State.STA7),
            (lambda u: u.receive_data(RELEASE_RQ_BYTES), [ReleaseIndication(collision=True)], State.STA9),
            (lambda u: u.respond_release(), [send(RELEASE_RP_BYTES)], State.STA11),
            (lambda u: u.receive_data(RELEASE_RP_BYTES), [ReleaseConfirmation(), CloseTransport()], State.STA1),
        ])
        self.assertEqual(
            [entry[2] for entry in ul.history[-4:]], [Action.AR_1, Action.AR_8, Action.AR_9, Action.AR_3]
        )

    def test_collision_acceptor(self):
        """Acceptor collision: Sta6 -> Sta7 -> Sta10 -> Sta12 -> Sta13 -> Sta1."""
        ul = self.reach(State.STA6, Role.ACCEPTOR)
        self.run_inputs(ul, [
            (lambda u: u.request_release(), [send(RELEASE_RQ_BYTES)], State.STA7),
            (lambda u: u.receive_data(RELEASE_RQ_BYTES), [ReleaseIndication(collision=True)], State.STA10),
            (lambda u: u.receive_data(RELEASE_RP_BYTES), [ReleaseConfirmation()], State.STA12),
            (lambda u: u.respond_release(), [send(RELEASE_RP_BYTES), StartARTIM()], State.STA13),
            (lambda u: u.transport_closed(), [StopARTIM()], State.STA1),
        ])
        self.assertEqual(
            [entry[2] for entry in ul.history[-5:]], [Action.AR_1, Action.AR_8, Action.AR_10, Action.AR_4, Action.AR_5]
        )

    def test_collision_between_two_machines(self):
        """A requestor and an acceptor wired back to back release at once and both end in Sta1."""
        requestor = UpperLayer(Role.REQUESTOR, MAX_PDATA)
        acceptor = UpperLayer(Role.ACCEPTOR, MAX_PDATA)

        def sent(outputs):
            return b"".join(o.data for o in outputs if isinstance(o, Send))

        requestor.request_association(RQ)
        acceptor.transport_connected()
        indication = acceptor.receive_data(sent(requestor.transport_connected()))
        self.assertOutputs(indication, [StopARTIM(), AssociateIndication(RQ)])
        self.assertOutputs(requestor.receive_data(sent(acceptor.accept(AC))), [AssociateAccepted(AC)])
        self.assertEqual((requestor.state, acceptor.state), (State.STA6, State.STA6))

        to_acceptor = sent(requestor.request_release())
        to_requestor = sent(acceptor.request_release())
        self.assertOutputs(requestor.receive_data(to_requestor), [ReleaseIndication(collision=True)])
        self.assertOutputs(acceptor.receive_data(to_acceptor), [ReleaseIndication(collision=True)])
        self.assertEqual((requestor.state, acceptor.state), (State.STA9, State.STA10))

        self.assertOutputs(acceptor.receive_data(sent(requestor.respond_release())), [ReleaseConfirmation()])
        self.assertEqual((requestor.state, acceptor.state), (State.STA11, State.STA12))
        self.assertOutputs(
            requestor.receive_data(sent(acceptor.respond_release())), [ReleaseConfirmation(), CloseTransport()]
        )
        self.assertEqual((requestor.state, acceptor.state), (State.STA1, State.STA13))
        self.assertEqual(acceptor.transport_closed(), [StopARTIM()])
        self.assertEqual((requestor.state, acceptor.state), (State.STA1, State.STA1))


class FramingTests(FSMTestMixin, SynchronousTestCase):
    """How receive_data turns bytes into events."""

    def test_bytes_after_framing_error_ignored(self):
        """After Evt19 the rest of that call and every later call are ignored."""
        ul = self.reach(State.STA6, Role.REQUESTOR)
        outputs = ul.receive_data(UNKNOWN_PDU_BYTES + RELEASE_RQ_BYTES)
        self.assertOutputs(
            outputs,
            [send(abort_bytes(SERVICE_PROVIDER, UNRECOGNIZED_PDU)), provider_abort(UNRECOGNIZED_PDU), StartARTIM()],
        )
        self.assertIs(ul.state, State.STA13)
        history = list(ul.history)
        self.assertEqual(ul.receive_data(RELEASE_RQ_BYTES), [])
        self.assertEqual(ul.receive_data(RQ_BYTES + UNKNOWN_PDU_BYTES), [])
        self.assertEqual(ul.history, history)
        self.assertIs(ul.state, State.STA13)
        self.assertEqual(ul.transport_closed(), [StopARTIM()])
        self.assertIs(ul.state, State.STA1)

    def test_several_pdus_in_one_call(self):
        """AC, two P-DATA-TF and an A-RELEASE-RQ in one call are processed in order."""
        ul = self.reach(State.STA5, Role.REQUESTOR)
        second = P.PDataTF((P.PDV(1, False, True, b"second"),))
        outputs = ul.receive_data(AC_BYTES + PDATA_BYTES + second.encode() + RELEASE_RQ_BYTES)
        self.assertOutputs(
            outputs,
            [AssociateAccepted(AC), PDataIndication(PDATA.pdvs), PDataIndication(second.pdvs), ReleaseIndication()],
        )
        self.assertEqual(
            [entry[2] for entry in ul.history[-4:]], [Action.AE_3, Action.DT_2, Action.DT_2, Action.AR_2]
        )
        self.assertIs(ul.state, State.STA8)

    def test_bytes_after_closing_action_ignored(self):
        """PDUs after one that ends in Sta1 (AE-4) in the same call are not processed."""
        ul = self.reach(State.STA5, Role.REQUESTOR)
        outputs = ul.receive_data(RJ_BYTES + PDATA_BYTES + UNKNOWN_PDU_BYTES)
        self.assertOutputs(outputs, [AssociateRejected(RJ), CloseTransport()])
        self.assertIs(ul.state, State.STA1)
        self.assertEqual(len(ul.history), 3)

    def test_pdu_split_byte_by_byte(self):
        """An A-ASSOCIATE-RQ fed one byte at a time is processed once, when its last byte arrives."""
        ul = self.reach(State.STA2, Role.ACCEPTOR)
        for index in range(len(RQ_BYTES) - 1):
            self.assertEqual(ul.receive_data(RQ_BYTES[index : index + 1]), [])
            self.assertIs(ul.state, State.STA2)
        self.assertOutputs(ul.receive_data(RQ_BYTES[-1:]), [StopARTIM(), AssociateIndication(RQ)])
        self.assertIs(ul.state, State.STA3)
        self.assertEqual(len(ul.history), 2)

    def test_pdus_split_across_boundaries(self):
        """Two PDUs cut at arbitrary points give each PDU's outputs once it is complete."""
        ul = self.reach(State.STA6, Role.ACCEPTOR)
        data = PDATA_BYTES + RELEASE_RQ_BYTES
        cut1, cut2 = 3, len(PDATA_BYTES) + 7
        self.assertEqual(ul.receive_data(data[:cut1]), [])
        self.assertOutputs(ul.receive_data(data[cut1:cut2]), [PDataIndication(PDATA.pdvs)])
        self.assertIs(ul.state, State.STA6)
        self.assertOutputs(ul.receive_data(data[cut2:]), [ReleaseIndication()])
        self.assertIs(ul.state, State.STA8)


# ---------------------------------------------------------------------------
# ARTIM on a Twisted clock

ARTIM_TIMEOUT = 30.0


class ARTIMDriver:
    """The timer half of a transport adapter: StartARTIM/StopARTIM on a clock.

    Feeds ``artim_expired()`` back to the machine when the timer fires, and
    records what else the machine asked for.
    """

    def __init__(self, ul: UpperLayer, clock: Clock) -> None:
        self.ul = ul
        self.clock = clock
        self.timer = None
        self.sent: list = []
        self.closes = 0
        self.indications: list = []

    def perform(self, outputs: list) -> list:
        for output in outputs:
            if isinstance(output, StartARTIM):
                self._cancel()
                self.timer = self.clock.callLater(ARTIM_TIMEOUT, self._expired)
            elif isinstance(output, StopARTIM):
                self._cancel()
            elif isinstance(output, Send):
                self.sent.append(output.data)
            elif isinstance(output, CloseTransport):
                self.closes += 1
            else:
                self.indications.append(output)
        return outputs

    def _cancel(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def _expired(self) -> None:
        self.timer = None
        self.perform(self.ul.artim_expired())

    def __getattr__(self, name):
        """``driver.receive_data(...)`` etc.: call the machine and perform its outputs."""
        method = getattr(self.ul, name)
        return lambda *args: self.perform(method(*args))


class ARTIMTests(SynchronousTestCase):
    """ARTIM started, stopped and expiring on twisted.internet.task.Clock."""

    def setUp(self):
        self.clock = Clock()

    def driver(self, role: Role) -> ARTIMDriver:
        return ARTIMDriver(UpperLayer(role, MAX_PDATA), self.clock)

    def test_sta2_expiry_closes(self):
        """No A-ASSOCIATE-RQ within ARTIM in Sta2: AA-2 closes the connection and the timer is gone."""
        d = self.driver(Role.ACCEPTOR)
        d.transport_connected()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(ARTIM_TIMEOUT - 0.5)
        self.assertIs(d.ul.state, State.STA2)
        self.assertEqual(d.closes, 0)
        self.clock.advance(0.5)
        self.assertIs(d.ul.state, State.STA1)
        self.assertEqual(d.closes, 1)
        self.assertEqual(d.ul.history[-1], (State.STA2, Event.EVT18, Action.AA_2, State.STA1))
        self.assertEqual(d.transport_closed(), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_sta13_expiry_closes(self):
        """The peer does not close after our A-ASSOCIATE-RJ: on ARTIM expiry AR-5 closes it."""
        d = self.driver(Role.ACCEPTOR)
        d.transport_connected()
        d.receive_data(RQ_BYTES)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        d.reject(RJ)
        self.assertEqual(d.sent, [RJ_BYTES])
        self.assertIs(d.ul.state, State.STA13)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(ARTIM_TIMEOUT)
        self.assertIs(d.ul.state, State.STA1)
        self.assertEqual(d.closes, 1)
        self.assertEqual(d.ul.history[-1], (State.STA13, Event.EVT18, Action.AR_5, State.STA1))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_requestor_sta13_expiry_after_abort(self):
        """A requestor's abort (AA-1) starts ARTIM; if the peer never closes, AR-5 closes on expiry."""
        d = self.driver(Role.REQUESTOR)
        d.request_association(RQ)
        d.transport_connected()
        d.receive_data(AC_BYTES)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        d.abort()
        self.assertEqual(d.sent[-1], abort_bytes(SERVICE_USER, NOT_SPECIFIED))
        self.clock.advance(ARTIM_TIMEOUT)
        self.assertIs(d.ul.state, State.STA1)
        self.assertEqual(d.closes, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timers_cancelled_when_stopped(self):
        """StopARTIM cancels the pending call: AE-6 in Sta2 and AR-5 on Evt17 in Sta13 leave no timer behind."""
        d = self.driver(Role.ACCEPTOR)
        d.transport_connected()
        self.clock.advance(ARTIM_TIMEOUT / 2)
        d.receive_data(RQ_BYTES)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        d.accept(AC)
        d.receive_data(RELEASE_RQ_BYTES)
        d.respond_release()
        self.assertEqual(d.sent, [AC_BYTES, RELEASE_RP_BYTES])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(ARTIM_TIMEOUT / 2)
        d.transport_closed()
        self.assertIs(d.ul.state, State.STA1)
        self.clock.advance(ARTIM_TIMEOUT * 10)
        self.assertNotIn(Event.EVT18, [entry[1] for entry in d.ul.history])
        self.assertEqual(d.closes, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_aa1_restarts_timer(self):
        """AA-1 in Sta2 restarts ARTIM: one timer, due a full period after the restart, then AR-5."""
        d = self.driver(Role.ACCEPTOR)
        d.transport_connected()
        self.clock.advance(20)
        d.receive_data(RELEASE_RQ_BYTES)
        self.assertIs(d.ul.state, State.STA13)
        calls = self.clock.getDelayedCalls()
        self.assertEqual(len(calls), 1)
        self.assertEqual(calls[0].getTime(), 20 + ARTIM_TIMEOUT)
        self.clock.advance(ARTIM_TIMEOUT - 1)
        self.assertIs(d.ul.state, State.STA13)
        self.clock.advance(1)
        self.assertIs(d.ul.state, State.STA1)
        self.assertEqual(d.ul.history[-1], (State.STA13, Event.EVT18, Action.AR_5, State.STA1))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_peer_abort_in_sta2_stops_timer(self):
        """AA-2 for an A-ABORT PDU in Sta2 stops ARTIM and closes."""
        d = self.driver(Role.ACCEPTOR)
        d.transport_connected()
        d.receive_data(abort_bytes(SERVICE_USER, NOT_SPECIFIED))
        self.assertIs(d.ul.state, State.STA1)
        self.assertEqual(d.closes, 1)
        self.clock.advance(ARTIM_TIMEOUT * 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])
