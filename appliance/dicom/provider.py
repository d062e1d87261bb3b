"""The acceptor's DIMSE service provider for one association (PS3.7 section 9), without I/O.

:class:`DimseProvider` takes the PDVs of received P-DATA-TF PDUs and says
what they mean, as events; the adapter (``net/protocol.py``) opens data set
consumers, calls services and aborts when told to:

* :class:`RequestReceived`: a request's command set is whole.  Its
  :attr:`Request.problem`, when set, is the status and reason it gets once
  its data set (if any) has been drained: an operation the context's
  service does not perform (0211), a command set that breaks PS3.7 9.3
  (C000: a mandatory element missing, a UID that is not one, a SOP class
  other than the context's).
* :class:`DataSetFragment`: the next fragment of that request's data set.
* :class:`CancelRequested`: a C-CANCEL-RQ for the request in progress.
* :class:`Violation`: the peer broke the rules (a PDV on a context that was
  not accepted, a response sent to an acceptor, a second request while one
  is outstanding, a C-CANCEL-RQ announcing a data set, a data set fragment
  no request takes): the adapter sends an A-ABORT, and nothing more is decided.

One operation is in progress at a time (no asynchronous operations window
is negotiated); it ends with its final response, which :meth:`DimseProvider.respond`
builds.  No data set fragment ever reaches a request once it is answered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import FrozenSet, List, Mapping, Optional, Sequence, Tuple, Union

from . import pdu as P
from . import status as S
from .dimse import NO_DATA_SET, Command, CommandField, CommandReceived, MessageAssembler, request_problem
from .errors import DimseDecodeError
from .negotiation import ContextOutcome
from .uids import is_received_uid

__all__ = [
    "Request",
    "RequestReceived",
    "DataSetFragment",
    "CancelRequested",
    "Violation",
    "DimseProvider",
    "command_name",
    "error_comment",
]

#: Command elements holding UIDs; a value that is not a UID makes the request C000 and is never echoed.
_UID_ELEMENTS = ("AffectedSOPClassUID", "AffectedSOPInstanceUID", "RequestedSOPClassUID", "RequestedSOPInstanceUID")


def command_name(value: Optional[int]) -> str:
    """"C-STORE-RQ", or "command 0x1234" for a value PS3.7 does not define."""
    try:
        return CommandField(value).label
    except (ValueError, TypeError):
        return f"command 0x{value or 0:04X}"


def error_comment(text: str) -> str:
    """An Error Comment (LO): at most 64 characters of printable ISO 646."""
    printable = "".join(char if " " <= char <= "~" else "?" for char in text)
    return printable[:64]


@dataclass(eq=False)
class Request:
    """A request received on an accepted presentation context."""

    context: ContextOutcome
    command: Command
    #: (status, reason) it is answered with once its data set is drained, when it cannot be served
    problem: Optional[Tuple[int, str]]
    #: a data set follows the command
    data_expected: bool
    data_complete: bool = False
    answered: bool = False

    @property
    def message_id(self) -> int:
        return self.command.MessageID or 0

    @property
    def name(self) -> str:
        return command_name(self.command.CommandField)


@dataclass(frozen=True)
class RequestReceived:
    request: Request


@dataclass(frozen=True)
class DataSetFragment:
    request: Request
    data: bytes
    is_last: bool


@dataclass(frozen=True)
class CancelRequested:
    request: Request


@dataclass(frozen=True)
class Violation:
    """Abort: the peer broke PS3.7 or PS3.8; ``reason`` says how, for the log."""

    reason: str


Event = Union[RequestReceived, DataSetFragment, CancelRequested, Violation]


class DimseProvider:
    """One association's DIMSE layer as acceptor.

    ``contexts``: the accepted presentation contexts by ID.  ``operations``:
    for each abstract syntax, the request command fields its service performs.
    """

    def __init__(self, contexts: Mapping[int, ContextOutcome], operations: Mapping[str, FrozenSet[int]]) -> None:
        self.contexts = contexts
        self.operations = operations
        self._assembler = MessageAssembler()
        #: the operation in progress, until its final response
        self.current: Optional[Request] = None
        #: a violation was reported: nothing more is decided
        self.broken = False

    # --- received ------------------------------------------------------------------

    def receive(self, pdvs: Sequence[P.PDV]) -> List[Event]:
        """The events of one P-DATA-TF PDU's PDVs; a :class:`Violation` is always the last event."""
        if self.broken:
            return []
        for pdv in pdvs:
            if pdv.context_id not in self.contexts:
                return self._violation(f"PDV on presentation context {pdv.context_id}, which was not accepted")
        try:
            messages = self._assembler.receive(pdvs)
        except DimseDecodeError as error:
            return self._violation(str(error))
        events: List[Event] = []
        for message in messages:
            if type(message) is CommandReceived:
                events.extend(self._command(message.context_id, message.command))
            else:
                events.extend(self._fragment(message.data, message.is_last))
            if self.broken:
                break
        return events

    def _violation(self, reason: str) -> List[Event]:
        self.broken = True
        return [Violation(reason)]

    def _command(self, context_id: int, command: Command) -> List[Event]:
        field = command.CommandField
        if field == CommandField.C_CANCEL_RQ:
            return self._cancel(command)
        if field & 0x8000:
            return self._violation(f"received a response ({command_name(field)}) as acceptor")
        if self.current is not None:
            return self._violation(
                f"{command_name(field)} arrived while message {self.current.message_id} was outstanding "
                "(asynchronous operations are not negotiated)"
            )
        context = self.contexts[context_id]
        request = Request(context, command, self._problem(context, command), command.has_data_set)
        self.current = request
        return [RequestReceived(request)]

    def _cancel(self, command: Command) -> List[Event]:
        if command.CommandDataSetType != NO_DATA_SET:
            return self._violation("C-CANCEL-RQ announcing a data set (PS3.7 9.3.2.3: Command Data Set Type 0101)")
        if "MessageIDBeingRespondedTo" not in command:
            return self._violation("C-CANCEL-RQ without Message ID Being Responded To")
        current = self.current
        if current is not None and command.MessageIDBeingRespondedTo == current.message_id:
            return [CancelRequested(current)]
        return []  # a C-CANCEL for an operation already finished is ignored (PS3.7 9.3.2.3)

    def _problem(self, context: ContextOutcome, command: Command) -> Optional[Tuple[int, str]]:
        """Why the request cannot be served (status, reason), or None."""
        field = command.CommandField
        if field not in self.operations.get(context.abstract_syntax, frozenset()):
            return S.UNRECOGNIZED_OPERATION, f"{command_name(field)} is not performed on this context"
        problem = request_problem(command)
        if problem is not None:
            return S.CANNOT_UNDERSTAND, problem
        for keyword in _UID_ELEMENTS:
            value = getattr(command, keyword)
            if value is not None and not is_received_uid(value):
                return S.CANNOT_UNDERSTAND, f"{keyword} is not a valid UID"
        if command.AffectedSOPClassUID not in (None, context.abstract_syntax):
            return S.CANNOT_UNDERSTAND, f"SOP class is not context {context.id}'s {context.abstract_syntax}"
        return None

    def _fragment(self, data: bytes, is_last: bool) -> List[Event]:
        request = self.current
        if request is None or not request.data_expected or request.data_complete:
            return self._violation("data set fragment with no request to take it")
        if is_last:
            request.data_complete = True
        return [DataSetFragment(request, data, is_last)]

    # --- sent ------------------------------------------------------------------------

    def respond(self, request: Request, status: int, **elements) -> Optional[Tuple[int, Command]]:
        """(context ID, response command set) answering ``request``, or None when it is no longer in progress.

        A final (non-pending) status ends the operation.  The request's UIDs
        are echoed only when they are UIDs; an Error Comment is cut to LO.
        """
        if request is not self.current or request.answered:
            return None
        rq = request.command
        response = Command(
            CommandField=(rq.CommandField or 0) | 0x8000,
            MessageIDBeingRespondedTo=request.message_id,
            Status=status,
        )
        sop_class = rq.AffectedSOPClassUID or rq.RequestedSOPClassUID
        if sop_class is not None and is_received_uid(sop_class):
            response.AffectedSOPClassUID = sop_class
        if rq.AffectedSOPInstanceUID is not None and is_received_uid(rq.AffectedSOPInstanceUID):
            response.AffectedSOPInstanceUID = rq.AffectedSOPInstanceUID
        for keyword, value in elements.items():
            setattr(response, keyword, error_comment(value) if keyword == "ErrorComment" else value)
        if S.category(status) != "pending":
            request.answered = True
            self.current = None
        return request.context.id, response

    def end(self) -> Optional[Request]:
        """The association is over: the request that was in progress, if any."""
        request, self.current = self.current, None
        self.broken = True
        return request
