"""The DICOM Upper Layer service provider (PS3.8 section 9), without I/O.

Bytes, transport notices and user primitives go in; a list of outputs comes
back from every call.  Outputs are either *requests to the transport*
(:class:`Send`, :class:`OpenTransport`, :class:`CloseTransport`,
:class:`StartARTIM`, :class:`StopARTIM`) or *indications to the user*
(:class:`AssociateIndication`, :class:`PDataIndication`, ...).  The adapter in
:mod:`appliance.net.protocol` performs the first kind in order and hands the
second kind to the application.

Every transition is looked up in :data:`appliance.dicom.fsm.TRANSITIONS`;
each action method below names its row of PS3.8 Tables 9-6 to 9-9.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Union

from . import pdu as P
from .errors import LocalProtocolError, PDUDecodeError
from .fsm import ACTIONS, TRANSITIONS, Action, Event, State

__all__ = [
    "Role",
    "UpperLayer",
    "Send",
    "OpenTransport",
    "CloseTransport",
    "StartARTIM",
    "StopARTIM",
    "AssociateIndication",
    "AssociateAccepted",
    "AssociateRejected",
    "PDataIndication",
    "ReleaseIndication",
    "ReleaseConfirmation",
    "AbortIndication",
    "ProviderAbortIndication",
]


class Role(enum.Enum):
    REQUESTOR = "requestor"
    ACCEPTOR = "acceptor"


# --- transport requests ------------------------------------------------------


@dataclass(frozen=True)
class Send:
    """Write these bytes (one whole PDU) to the transport."""

    data: bytes
    pdu_type: int


@dataclass(frozen=True)
class OpenTransport:
    """Open the transport connection to the peer (AE-1)."""


@dataclass(frozen=True)
class CloseTransport:
    """Close the transport connection once what was sent is flushed."""


@dataclass(frozen=True)
class StartARTIM:
    """Start, or restart, the ARTIM timer; call :meth:`UpperLayer.artim_expired` when it fires."""


@dataclass(frozen=True)
class StopARTIM:
    """Stop the ARTIM timer if it runs."""


# --- user indications ---------------------------------------------------------


@dataclass(frozen=True)
class AssociateIndication:
    """A-ASSOCIATE indication: the peer asks for an association (acceptor)."""

    request: P.AssociateRQ


@dataclass(frozen=True)
class AssociateAccepted:
    """A-ASSOCIATE confirmation (accept) (requestor)."""

    response: P.AssociateAC


@dataclass(frozen=True)
class AssociateRejected:
    """A-ASSOCIATE confirmation (reject): by the peer, or by our provider (``local``)."""

    rejection: P.AssociateRJ
    local: bool = False


@dataclass(frozen=True)
class PDataIndication:
    """P-DATA indication: the PDVs of one P-DATA-TF PDU."""

    pdvs: tuple


@dataclass(frozen=True)
class ReleaseIndication:
    """A-RELEASE indication; ``collision`` when both sides asked at once."""

    collision: bool = False


@dataclass(frozen=True)
class ReleaseConfirmation:
    """A-RELEASE confirmation: the association is released."""


@dataclass(frozen=True)
class AbortIndication:
    """A-ABORT indication: the peer's service user aborted."""

    source: int
    reason: int


@dataclass(frozen=True)
class ProviderAbortIndication:
    """A-P-ABORT indication: a provider aborted (the peer's, ours, or the transport).

    ``reason`` is the A-ABORT reason (PS3.8 Table 9-26); ``message`` says why in words.
    """

    reason: int
    message: str


Output = Union[
    Send, OpenTransport, CloseTransport, StartARTIM, StopARTIM,
    AssociateIndication, AssociateAccepted, AssociateRejected, PDataIndication,
    ReleaseIndication, ReleaseConfirmation, AbortIndication, ProviderAbortIndication,
]

#: Transitions an UpperLayer remembers, at least (between HISTORY_LENGTH and twice as many).
HISTORY_LENGTH = 64

_PDU_EVENTS = {
    P.AssociateAC: Event.EVT3,
    P.AssociateRJ: Event.EVT4,
    P.AssociateRQ: Event.EVT6,
    P.PDataTF: Event.EVT10,
    P.ReleaseRQ: Event.EVT12,
    P.ReleaseRP: Event.EVT13,
    P.Abort: Event.EVT16,
}


class UpperLayer:
    """One association's Upper Layer state machine.

    ``max_pdata_length`` is the largest P-DATA-TF PDU we accept, i.e. the
    maximum length we announce (or will announce) to the peer; longer PDUs are
    refused before they are buffered.
    """

    def __init__(self, role: Role, max_pdata_length: int) -> None:
        self.role = role
        self.state = State.STA1
        self._framer = P.PDUFramer(max_pdata_length)
        self._stream_broken = False
        self._pending_rq: Optional[P.AssociateRQ] = None
        #: The last PDU (or decode error) received, for the action that handles it.
        self._pdu: Optional[P.PDU] = None
        self._decode_error: Optional[PDUDecodeError] = None
        #: The primitive's argument for user-initiated events.
        self._argument: object = None
        #: (state, event, action, next state) of the transitions, the last HISTORY_LENGTH at least, for tests and
        #: logs.
        self.history: List[tuple] = []
        self._actions: Dict[Action, Callable[[Event], List[Output]]] = {
            action: getattr(self, "_" + action.name.lower()) for action in Action
        }

    @property
    def max_pdata_length(self) -> int:
        return self._framer.max_pdata_length

    @max_pdata_length.setter
    def max_pdata_length(self, value: int) -> None:
        self._framer.max_pdata_length = value

    @property
    def buffered(self) -> int:
        """Bytes received and held until their PDU is whole."""
        return self._framer.buffered

    # --- the one place transitions happen ---------------------------------

    def _handle(self, event: Event) -> List[Output]:
        action = TRANSITIONS.get((self.state, event))
        if action is None:
            raise LocalProtocolError(
                f"{event.label} ({event.value}) is not allowed in {self.state.label} ({self.state.value})"
            )
        before = self.state
        outputs, after = self._run(action, event)
        assert after in ACTIONS[action].next_states, (action, after)
        self.state = after
        history = self.history
        history.append((before, event, action, after))
        if len(history) > 2 * HISTORY_LENGTH:  # an association of a million PDUs keeps the last ones only
            del history[:-HISTORY_LENGTH]
        return outputs

    def _run(self, action: Action, event: Event):
        result = self._actions[action](event)
        if isinstance(result, tuple):
            return result
        return result, ACTIONS[action].next_states[0]

    # --- inputs from the transport -----------------------------------------

    def transport_connected(self) -> List[Output]:
        """The transport connection is open: Evt2 for a requestor, Evt5 for an acceptor."""
        return self._handle(Event.EVT2 if self.role is Role.REQUESTOR else Event.EVT5)

    def transport_closed(self) -> List[Output]:
        """Evt17; a no-op once the machine is idle again."""
        if self.state is State.STA1:
            return []
        return self._handle(Event.EVT17)

    def artim_expired(self) -> List[Output]:
        """Evt18."""
        return self._handle(Event.EVT18)

    def receive_data(self, data: bytes) -> List[Output]:
        """Feed received bytes; return the outputs of every whole PDU in them."""
        if self._stream_broken or self.state is State.STA1:
            return []
        self._framer.feed(data)
        outputs: List[Output] = []
        while not self._stream_broken and self.state is not State.STA1:
            try:
                pdu = self._framer.next_decoded(P.decode_pdu)  # decoded in place: its bytes copied once
                if pdu is None:
                    break
            except PDUDecodeError as error:
                # the framer cannot find the next PDU boundary after an error
                self._stream_broken = True
                self._decode_error = error
                outputs += self._handle(Event.EVT19)
                break
            self._pdu = pdu
            outputs += self._handle(_PDU_EVENTS[type(pdu)])
        return outputs

    # --- primitives from the local user --------------------------------------

    def request_association(self, request: P.AssociateRQ) -> List[Output]:
        """A-ASSOCIATE request (Evt1)."""
        self._pending_rq = request
        return self._handle(Event.EVT1)

    def accept(self, response: P.AssociateAC) -> List[Output]:
        """A-ASSOCIATE response, accept (Evt7)."""
        self._argument = response
        return self._handle(Event.EVT7)

    def reject(self, rejection: P.AssociateRJ) -> List[Output]:
        """A-ASSOCIATE response, reject (Evt8)."""
        self._argument = rejection
        return self._handle(Event.EVT8)

    def send_pdata(self, encoded_pdu: bytes) -> List[Output]:
        """P-DATA request (Evt9) with an encoded P-DATA-TF PDU."""
        self._argument = encoded_pdu
        return self._handle(Event.EVT9)

    def request_release(self) -> List[Output]:
        """A-RELEASE request (Evt11)."""
        return self._handle(Event.EVT11)

    def respond_release(self) -> List[Output]:
        """A-RELEASE response (Evt14)."""
        return self._handle(Event.EVT14)

    def abort(
        self,
        source: int = P.AbortSource.SERVICE_USER,
        reason: int = P.AbortReason.NOT_SPECIFIED,
    ) -> List[Output]:
        """A-ABORT request (Evt15); a no-op where there is nothing left to abort.

        The user aborts with the service-user source by default; an adapter
        that found the peer breaking DIMSE rules aborts as the provider and
        says why (PS3.8 Table 9-26).
        """
        if (self.state, Event.EVT15) not in TRANSITIONS:
            return []
        self._argument = P.Abort(source, reason)
        return self._handle(Event.EVT15)

    # --- helpers ------------------------------------------------------------

    @staticmethod
    def _send(pdu) -> Send:
        data = pdu.encode()
        return Send(data, data[0])

    def _abort_reason(self, event: Event) -> int:
        if event is Event.EVT19 and self._decode_error is not None:
            return self._decode_error.abort_reason
        return P.AbortReason.UNEXPECTED_PDU

    def _abort_message(self, event: Event) -> str:
        if event is Event.EVT19 and self._decode_error is not None:
            return f"invalid PDU received: {self._decode_error}"
        return f"unexpected {event.value} in {self.state.label} ({self.state.value})"

    # --- PS3.8 Table 9-6: association establishment ---------------------------

    def _ae_1(self, event: Event):
        """AE-1: issue TRANSPORT CONNECT request primitive to local transport service."""
        return [OpenTransport()]

    def _ae_2(self, event: Event):
        """AE-2: send A-ASSOCIATE-RQ-PDU."""
        assert self._pending_rq is not None
        return [self._send(self._pending_rq)]

    def _ae_3(self, event: Event):
        """AE-3: issue A-ASSOCIATE confirmation (accept) primitive."""
        return [AssociateAccepted(self._pdu)]

    def _ae_4(self, event: Event):
        """AE-4: issue A-ASSOCIATE confirmation (reject) primitive and close transport connection."""
        return [AssociateRejected(self._pdu), CloseTransport()]

    def _ae_5(self, event: Event):
        """AE-5: issue transport connection response primitive; start ARTIM timer."""
        return [StartARTIM()]

    def _ae_6(self, event: Event):
        """AE-6: stop ARTIM; indicate an acceptable A-ASSOCIATE-RQ, otherwise reject it.

        The provider itself only judges the protocol version (PS3.8 9.3.2:
        bit 0 set for version 1); everything else is the user's decision.
        """
        request = self._pdu
        assert isinstance(request, P.AssociateRQ)
        if not request.protocol_version & 0x0001:
            rejection = P.AssociateRJ(result=1, source=2, reason=2)
            return [StopARTIM(), AssociateRejected(rejection, local=True), self._send(rejection), StartARTIM()], State.STA13
        return [StopARTIM(), AssociateIndication(request)], State.STA3

    def _ae_7(self, event: Event):
        """AE-7: send A-ASSOCIATE-AC PDU."""
        return [self._send(self._argument)]

    def _ae_8(self, event: Event):
        """AE-8: send A-ASSOCIATE-RJ PDU and start ARTIM timer."""
        return [self._send(self._argument), StartARTIM()]

    # --- PS3.8 Table 9-7: data transfer ----------------------------------------

    def _dt_1(self, event: Event):
        """DT-1: send P-DATA-TF PDU."""
        return [Send(self._argument, P.PDUType.P_DATA_TF)]

    def _dt_2(self, event: Event):
        """DT-2: send P-DATA indication primitive."""
        return [PDataIndication(self._pdu.pdvs)]

    # --- PS3.8 Table 9-8: association release -----------------------------------

    def _ar_1(self, event: Event):
        """AR-1: send A-RELEASE-RQ PDU."""
        return [self._send(P.ReleaseRQ())]

    def _ar_2(self, event: Event):
        """AR-2: issue A-RELEASE indication primitive."""
        return [ReleaseIndication()]

    def _ar_3(self, event: Event):
        """AR-3: issue A-RELEASE confirmation primitive, and close transport connection."""
        return [ReleaseConfirmation(), CloseTransport()]

    def _ar_4(self, event: Event):
        """AR-4: issue A-RELEASE-RP PDU and start ARTIM timer."""
        return [self._send(P.ReleaseRP()), StartARTIM()]

    def _ar_5(self, event: Event):
        """AR-5: stop ARTIM timer.

        On ARTIM expiry (Evt18) the peer has not closed the connection within
        the timer: we close it ourselves, as every implementation does.
        """
        if event is Event.EVT18:
            return [CloseTransport()]
        return [StopARTIM()]

    def _ar_6(self, event: Event):
        """AR-6: issue P-DATA indication."""
        return [PDataIndication(self._pdu.pdvs)]

    def _ar_7(self, event: Event):
        """AR-7: issue P-DATA-TF PDU."""
        return [Send(self._argument, P.PDUType.P_DATA_TF)]

    def _ar_8(self, event: Event):
        """AR-8: issue A-RELEASE indication (release collision); requestor to Sta9, acceptor to Sta10."""
        next_state = State.STA9 if self.role is Role.REQUESTOR else State.STA10
        return [ReleaseIndication(collision=True)], next_state

    def _ar_9(self, event: Event):
        """AR-9: send A-RELEASE-RP PDU."""
        return [self._send(P.ReleaseRP())]

    def _ar_10(self, event: Event):
        """AR-10: issue A-RELEASE confirmation primitive."""
        return [ReleaseConfirmation()]

    # --- PS3.8 Table 9-9: association abort -------------------------------------

    def _aa_1(self, event: Event):
        """AA-1: send A-ABORT PDU and start (or restart) ARTIM timer.

        For the user's A-ABORT request the source is the service user; when a
        PDU arrives that Sta2 cannot take, the abort is the provider's and
        says why.
        """
        if event is Event.EVT15:
            return [self._send(self._argument), StartARTIM()]
        reason = self._abort_reason(event)
        return [
            self._send(P.Abort(P.AbortSource.SERVICE_PROVIDER, reason)),
            ProviderAbortIndication(reason, self._abort_message(event)),
            StartARTIM(),
        ]

    def _aa_2(self, event: Event):
        """AA-2: stop ARTIM timer if running; close transport connection."""
        outputs: List[Output] = [StopARTIM(), CloseTransport()]
        if event is Event.EVT18:
            outputs.insert(0, ProviderAbortIndication(P.AbortReason.NOT_SPECIFIED, "ARTIM timer expired before an A-ASSOCIATE-RQ arrived"))
        elif event is Event.EVT16 and self.state is State.STA2:
            outputs.insert(0, ProviderAbortIndication(P.AbortReason.NOT_SPECIFIED, "peer aborted before requesting an association"))
        return outputs

    def _aa_3(self, event: Event):
        """AA-3: issue A-ABORT (service-user source) or A-P-ABORT indication; close transport."""
        abort = self._pdu
        assert isinstance(abort, P.Abort)
        if abort.source == P.AbortSource.SERVICE_USER:
            indication: Output = AbortIndication(abort.source, abort.reason)
        else:
            indication = ProviderAbortIndication(abort.reason, f"peer's provider aborted (source {abort.source}, reason {abort.reason})")
        return [indication, CloseTransport()]

    def _aa_4(self, event: Event):
        """AA-4: issue A-P-ABORT indication primitive (the transport closed)."""
        return [StopARTIM(), ProviderAbortIndication(P.AbortReason.NOT_SPECIFIED, "transport connection closed")]

    def _aa_5(self, event: Event):
        """AA-5: stop ARTIM timer."""
        return [StopARTIM()]

    def _aa_6(self, event: Event):
        """AA-6: ignore PDU."""
        return []

    def _aa_7(self, event: Event):
        """AA-7: send A-ABORT PDU."""
        return [self._send(P.Abort(P.AbortSource.SERVICE_PROVIDER, self._abort_reason(event)))]

    def _aa_8(self, event: Event):
        """AA-8: send A-ABORT PDU (service-provider source), issue A-P-ABORT indication, start ARTIM."""
        reason = self._abort_reason(event)
        return [
            self._send(P.Abort(P.AbortSource.SERVICE_PROVIDER, reason)),
            ProviderAbortIndication(reason, self._abort_message(event)),
            StartARTIM(),
        ]
