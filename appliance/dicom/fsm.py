"""The DICOM Upper Layer state machine of PS3.8 section 9.2, as data.

``TRANSITIONS`` is PS3.8 Table 9-10 cell by cell: ``(state, event) -> action``.
``ACTIONS`` is Tables 9-6 to 9-9: what each action does and the state it
leads to.  Two actions choose between two next states (AE-6 on whether the
request is acceptable, AR-8 on which side of the release collision we are);
they list both.  Any pair not in ``TRANSITIONS`` is not defined by the
standard and is a protocol error, never a silent default.

The behaviour behind each action lives in :mod:`appliance.dicom.ul`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Dict, Tuple

__all__ = ["State", "Event", "Action", "ActionSpec", "ACTIONS", "TRANSITIONS", "next_states"]


class _Term(enum.Enum):
    """A member of the machine's vocabulary.  Members are singletons compared by identity, so they hash by
    identity: the machine looks ``(state, event)`` up for every PDU, and Enum's own hash is a call in Python."""

    __hash__ = object.__hash__


class State(_Term):
    """PS3.8 Table 9-2."""

    STA1 = "Idle"
    STA2 = "Transport connection open (awaiting A-ASSOCIATE-RQ PDU)"
    STA3 = "Awaiting local A-ASSOCIATE response primitive"
    STA4 = "Awaiting transport connection opening to complete"
    STA5 = "Awaiting A-ASSOCIATE-AC or A-ASSOCIATE-RJ PDU"
    STA6 = "Association established and ready for data transfer"
    STA7 = "Awaiting A-RELEASE-RP PDU"
    STA8 = "Awaiting local A-RELEASE response primitive"
    STA9 = "Release collision requestor side; awaiting A-RELEASE response primitive"
    STA10 = "Release collision acceptor side; awaiting A-RELEASE-RP PDU"
    STA11 = "Release collision requestor side; awaiting A-RELEASE-RP PDU"
    STA12 = "Release collision acceptor side; awaiting A-RELEASE response primitive"
    STA13 = "Awaiting Transport Connection Close Indication"

    @property
    def label(self) -> str:
        return "Sta" + self.name[3:]


class Event(_Term):
    """PS3.8 Table 9-9."""

    EVT1 = "A-ASSOCIATE request (local user)"
    EVT2 = "Transport connect confirmation (local transport service)"
    EVT3 = "A-ASSOCIATE-AC PDU (received on transport connection)"
    EVT4 = "A-ASSOCIATE-RJ PDU (received on transport connection)"
    EVT5 = "Transport connection indication (local transport service)"
    EVT6 = "A-ASSOCIATE-RQ PDU (received on transport connection)"
    EVT7 = "A-ASSOCIATE response primitive (accept)"
    EVT8 = "A-ASSOCIATE response primitive (reject)"
    EVT9 = "P-DATA request primitive"
    EVT10 = "P-DATA-TF PDU"
    EVT11 = "A-RELEASE request primitive"
    EVT12 = "A-RELEASE-RQ PDU (received on open transport connection)"
    EVT13 = "A-RELEASE-RP PDU (received on transport connection)"
    EVT14 = "A-RELEASE response primitive"
    EVT15 = "A-ABORT request primitive"
    EVT16 = "A-ABORT PDU (received on open transport connection)"
    EVT17 = "Transport connection closed indication (local transport service)"
    EVT18 = "ARTIM timer expired (Association reject/release timer)"
    EVT19 = "Unrecognized or invalid PDU received"

    @property
    def label(self) -> str:
        return "Evt" + self.name[3:]


class Action(_Term):
    """The actions of PS3.8 Tables 9-6 (AE), 9-7 (DT), 9-8 (AR) and 9-9 (AA)."""

    AE_1 = "AE-1"
    AE_2 = "AE-2"
    AE_3 = "AE-3"
    AE_4 = "AE-4"
    AE_5 = "AE-5"
    AE_6 = "AE-6"
    AE_7 = "AE-7"
    AE_8 = "AE-8"
    DT_1 = "DT-1"
    DT_2 = "DT-2"
    AR_1 = "AR-1"
    AR_2 = "AR-2"
    AR_3 = "AR-3"
    AR_4 = "AR-4"
    AR_5 = "AR-5"
    AR_6 = "AR-6"
    AR_7 = "AR-7"
    AR_8 = "AR-8"
    AR_9 = "AR-9"
    AR_10 = "AR-10"
    AA_1 = "AA-1"
    AA_2 = "AA-2"
    AA_3 = "AA-3"
    AA_4 = "AA-4"
    AA_5 = "AA-5"
    AA_6 = "AA-6"
    AA_7 = "AA-7"
    AA_8 = "AA-8"


@dataclass(frozen=True)
class ActionSpec:
    """What an action does (the standard's words) and where it may lead."""

    description: str
    next_states: Tuple[State, ...]


S = State
ACTIONS: Dict[Action, ActionSpec] = {
    Action.AE_1: ActionSpec("Issue TRANSPORT CONNECT request primitive to local transport service", (S.STA4,)),
    Action.AE_2: ActionSpec("Send A-ASSOCIATE-RQ-PDU", (S.STA5,)),
    Action.AE_3: ActionSpec("Issue A-ASSOCIATE confirmation (accept) primitive", (S.STA6,)),
    Action.AE_4: ActionSpec("Issue A-ASSOCIATE confirmation (reject) primitive and close transport connection", (S.STA1,)),
    Action.AE_5: ActionSpec("Issue Transport connection response primitive; start ARTIM timer", (S.STA2,)),
    Action.AE_6: ActionSpec(
        "Stop ARTIM timer and if A-ASSOCIATE-RQ acceptable by service-provider issue A-ASSOCIATE "
        "indication primitive, otherwise issue A-ASSOCIATE-RJ-PDU and start ARTIM timer",
        (S.STA3, S.STA13),
    ),
    Action.AE_7: ActionSpec("Send A-ASSOCIATE-AC PDU", (S.STA6,)),
    Action.AE_8: ActionSpec("Send A-ASSOCIATE-RJ PDU and start ARTIM timer", (S.STA13,)),
    Action.DT_1: ActionSpec("Send P-DATA-TF PDU", (S.STA6,)),
    Action.DT_2: ActionSpec("Send P-DATA indication primitive", (S.STA6,)),
    Action.AR_1: ActionSpec("Send A-RELEASE-RQ PDU", (S.STA7,)),
    Action.AR_2: ActionSpec("Issue A-RELEASE indication primitive", (S.STA8,)),
    Action.AR_3: ActionSpec("Issue A-RELEASE confirmation primitive, and close transport connection", (S.STA1,)),
    Action.AR_4: ActionSpec("Issue A-RELEASE-RP PDU and start ARTIM timer", (S.STA13,)),
    Action.AR_5: ActionSpec("Stop ARTIM timer", (S.STA1,)),
    Action.AR_6: ActionSpec("Issue P-DATA indication", (S.STA7,)),
    Action.AR_7: ActionSpec("Issue P-DATA-TF PDU", (S.STA8,)),
    Action.AR_8: ActionSpec(
        "Issue A-RELEASE indication (release collision): association-requestor goes to Sta9, acceptor to Sta10",
        (S.STA9, S.STA10),
    ),
    Action.AR_9: ActionSpec("Send A-RELEASE-RP PDU", (S.STA11,)),
    Action.AR_10: ActionSpec("Issue A-RELEASE confirmation primitive", (S.STA12,)),
    Action.AA_1: ActionSpec("Send A-ABORT PDU (service-user source) and start (or restart) ARTIM timer", (S.STA13,)),
    Action.AA_2: ActionSpec("Stop ARTIM timer if running. Close transport connection", (S.STA1,)),
    Action.AA_3: ActionSpec(
        "If service-user initiated abort, issue A-ABORT indication and close transport connection; "
        "otherwise issue A-P-ABORT indication and close transport connection",
        (S.STA1,),
    ),
    Action.AA_4: ActionSpec("Issue A-P-ABORT indication primitive", (S.STA1,)),
    Action.AA_5: ActionSpec("Stop ARTIM timer", (S.STA1,)),
    Action.AA_6: ActionSpec("Ignore PDU", (S.STA13,)),
    Action.AA_7: ActionSpec("Send A-ABORT PDU", (S.STA13,)),
    Action.AA_8: ActionSpec(
        "Send A-ABORT PDU (service-provider source), issue an A-P-ABORT indication, and start ARTIM timer",
        (S.STA13,),
    ),
}


def _row(event: Event, cells: Dict[int, Action]) -> Dict[Tuple[State, Event], Action]:
    return {(State[f"STA{number}"], event): action for number, action in cells.items()}


def _span(first: int, last: int, action: Action) -> Dict[int, Action]:
    return {number: action for number in range(first, last + 1)}


A = Action
E = Event
#: PS3.8 Table 9-10, one row per event, cells keyed by state number.
TRANSITIONS: Dict[Tuple[State, Event], Action] = {
    **_row(E.EVT1, {1: A.AE_1}),
    **_row(E.EVT2, {4: A.AE_2}),
    **_row(E.EVT3, {2: A.AA_1, 3: A.AA_8, 5: A.AE_3, **_span(6, 12, A.AA_8), 13: A.AA_6}),
    **_row(E.EVT4, {2: A.AA_1, 3: A.AA_8, 5: A.AE_4, **_span(6, 12, A.AA_8), 13: A.AA_6}),
    **_row(E.EVT5, {1: A.AE_5}),
    **_row(E.EVT6, {2: A.AE_6, 3: A.AA_8, 5: A.AA_8, **_span(6, 12, A.AA_8), 13: A.AA_7}),
    **_row(E.EVT7, {3: A.AE_7}),
    **_row(E.EVT8, {3: A.AE_8}),
    **_row(E.EVT9, {6: A.DT_1, 8: A.AR_7}),
    **_row(E.EVT10, {2: A.AA_1, 3: A.AA_8, 5: A.AA_8, 6: A.DT_2, 7: A.AR_6, **_span(8, 12, A.AA_8), 13: A.AA_6}),
    **_row(E.EVT11, {6: A.AR_1}),
    **_row(E.EVT12, {2: A.AA_1, 3: A.AA_8, 5: A.AA_8, 6: A.AR_2, 7: A.AR_8, **_span(8, 12, A.AA_8), 13: A.AA_6}),
    **_row(
        E.EVT13,
        {2: A.AA_1, 3: A.AA_8, 5: A.AA_8, 6: A.AA_8, 7: A.AR_3, 8: A.AA_8, 9: A.AA_8, 10: A.AR_10, 11: A.AR_3,
         12: A.AA_8, 13: A.AA_6},
    ),
    **_row(E.EVT14, {8: A.AR_4, 9: A.AR_9, 12: A.AR_4}),
    **_row(E.EVT15, {3: A.AA_1, 4: A.AA_2, **_span(5, 12, A.AA_1)}),
    **_row(E.EVT16, {2: A.AA_2, 3: A.AA_3, **_span(5, 12, A.AA_3), 13: A.AA_2}),
    **_row(E.EVT17, {2: A.AA_5, 3: A.AA_4, 4: A.AA_4, **_span(5, 12, A.AA_4), 13: A.AR_5}),
    **_row(E.EVT18, {2: A.AA_2, 13: A.AR_5}),
    **_row(E.EVT19, {2: A.AA_1, 3: A.AA_8, 5: A.AA_8, **_span(6, 12, A.AA_8), 13: A.AA_7}),
}
del A, E, S


def next_states(state: State, event: Event) -> Tuple[State, ...]:
    """The states that ``event`` in ``state`` may lead to, per the table."""
    return ACTIONS[TRANSITIONS[(state, event)]].next_states
