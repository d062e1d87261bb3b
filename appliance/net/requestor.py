"""The requestor side: open an association to a remote AE and use it from SCU code.

``yield connect(...)`` / ``await connect(...)`` gives an :class:`Association`
once the peer accepted; requests return a :class:`ResponseStream` whose
responses (pending ones included) arrive as Deferreds or through
``async for``.  Rejections, aborts and timeouts arrive as the exceptions
below, each saying why in words.

A C-GET (:meth:`Association.get`) is the one request the peer answers with
requests of its own: C-STORE sub-operations on this association, on the
contexts where it agreed to our SCP role (``connect(..., roles=...)``).
Each is streamed into an object sink fragment by fragment and answered with
the status the sink decided, exactly as the C-STORE SCP answers
(:mod:`appliance.net.incoming`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Deque, List, Optional, Sequence, Tuple

from twisted.internet import defer, error as net_error
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from ..dicom import dimse as D
from ..dicom import pdu as P
from ..dicom import status as S
from ..dicom import ul
from .incoming import IncomingObject, StoreResult, describe_store, response_elements
from ..dicom.negotiation import ContextOutcome, Negotiated, Roles, describe_rejection, negotiate_as_requestor, propose
from ..dicom.provider import command_name, error_comment
from ..compat import encode_dataset
from ..dicom.uids import (
    STUDY_ROOT_FIND,
    STUDY_ROOT_GET,
    STUDY_ROOT_MOVE,
    UNCOMPRESSED_TRANSFER_SYNTAXES,
    VERIFICATION,
    is_received_uid,
)
from ..interfaces import IObjectSink
from ..logs import logger
from .protocol import BufferedDataSet, DicomProtocol, Timeouts

__all__ = [
    "AssociationError",
    "AssociationRejected",
    "AssociationAborted",
    "AssociationTimeout",
    "ConnectionFailed",
    "Response",
    "ResponseStream",
    "Association",
    "RequestorProtocol",
    "MessageIds",
    "connect",
    "connect_device",
]

_log = logger("appliance.requestor")

#: Why reading from the peer is paused while a C-GET's object sink is behind.
_SINK_BEHIND = "the object sink is behind"


class AssociationError(Exception):
    """Base of the requestor's errors; ``str()`` says what happened."""


class AssociationRejected(AssociationError):
    def __init__(self, rejection: P.AssociateRJ) -> None:
        super().__init__(f"association rejected: {describe_rejection(rejection)}")
        self.rejection = rejection


class AssociationAborted(AssociationError):
    pass


class AssociationTimeout(AssociationError):
    pass


class ConnectionFailed(AssociationError):
    pass


@dataclass(frozen=True)
class Response:
    """One DIMSE response: its command set and data set (bytes) if any."""

    command: D.Command
    data: Optional[bytes] = None

    @property
    def status(self) -> int:
        return self.command.Status

    @property
    def pending(self) -> bool:
        return S.category(self.status) == "pending"


#: Requests answered with pending responses before their final one (PS3.4 C.4).
_MAY_BE_PENDING = frozenset({D.CommandField.C_FIND_RQ, D.CommandField.C_MOVE_RQ, D.CommandField.C_GET_RQ})


class ResponseStream:
    """The responses to one request, pending ones first, the final one last.

    ``async for response in stream`` or ``yield stream.next()``; ``final()``
    collects them all and fires with the final response.
    """

    def __init__(self, association: "Association", message_id: int, command_field: int = 0,
                 sink: Optional[IObjectSink] = None) -> None:
        self.association = association
        self.message_id = message_id
        #: the request's Command Field: its responses carry it with bit 15 set
        self.command_field = command_field
        #: a C-GET's: where the objects of its C-STORE sub-operations go
        self.sink = sink
        #: a C-GET's C-STORE sub-operations as answered: (Affected SOP Instance UID, the status we answered)
        self.received: List[Tuple[Optional[str], int]] = []
        self._queue: Deque[Any] = deque()
        self._waiters: Deque[defer.Deferred] = deque()
        self.done = False
        self._ended = False

    def _push(self, item: Any) -> None:
        """A Response, or an exception ending the stream."""
        if self._ended:
            return
        if isinstance(item, Exception) or not item.pending:
            self._ended = True
        if self._waiters:
            waiter = self._waiters.popleft()
            if isinstance(item, Exception):
                waiter.errback(item)
            else:
                waiter.callback(item)
        else:
            self._queue.append(item)
        if self._ended:
            while self._waiters:
                self._waiters.popleft().errback(StopAsyncIteration())

    def next(self) -> defer.Deferred:
        """Fires with the next response; errbacks StopAsyncIteration after the final one."""
        if self._queue:
            item = self._queue.popleft()
            if isinstance(item, Exception):
                return defer.fail(item)
            return defer.succeed(item)
        if self._ended:
            return defer.fail(StopAsyncIteration())
        waiter = defer.Deferred()
        self._waiters.append(waiter)
        return waiter

    def __aiter__(self) -> "ResponseStream":
        return self

    def __anext__(self) -> defer.Deferred:
        return self.next()

    def cancel(self) -> None:
        """Send a C-CANCEL-RQ for this request."""
        self.association.cancel(self.message_id)

    async def final(self) -> Response:
        last: Optional[Response] = None
        async for response in self:
            last = response
        assert last is not None
        return last


class MessageIds:
    """Message IDs for the requests of one AE, unique across all its associations (1 to 65535, then again).

    C-STORE sub-operations name the C-MOVE that caused them by Move
    Originator AE Title and Message ID (0000,1030)/(0000,1031): an AE with
    several moves at once tells them apart only if no two of its requests
    share an ID.
    """

    def __init__(self) -> None:
        self._next = 1

    def __call__(self) -> int:
        message_id = self._next
        self._next = message_id % 0xFFFF + 1
        return message_id


class Association:
    """An established association, as seen by SCU code."""

    def __init__(self, protocol: "RequestorProtocol", message_ids: Optional[MessageIds] = None) -> None:
        self._protocol = protocol
        self._message_ids = message_ids if message_ids is not None else MessageIds()

    @property
    def negotiated(self) -> Negotiated:
        return self._protocol.negotiated

    @property
    def peer_max_pdu(self) -> int:
        return self.negotiated.peer_max_pdu

    @property
    def is_open(self) -> bool:
        return self._protocol.ul.state is ul.State.STA6

    def request(self, abstract_syntax: str, command: D.Command, data: Optional[bytes] = None,
                transfer_syntax: Optional[str] = None) -> ResponseStream:
        """Send a request on the first context accepted for ``abstract_syntax``."""
        return self._send(abstract_syntax, command, data, transfer_syntax)

    def _send(self, abstract_syntax: str, command: D.Command, data: Optional[bytes], transfer_syntax: Optional[str],
              sink: Optional[IObjectSink] = None) -> ResponseStream:
        context, stream = self._begin(abstract_syntax, transfer_syntax, command, sink)
        self._protocol.send_message(context.id, command, data)
        self._protocol.start_dimse_timer()
        return stream

    def request_from_file(self, abstract_syntax: str, command: D.Command, source, length: int,
                          transfer_syntax: Optional[str] = None) -> ResponseStream:
        """Like :meth:`request`, the data set being ``length`` bytes read from the file object ``source``
        only as the transport asks for more (:meth:`DicomProtocol.send_message_from_file`).

        The DIMSE timeout restarts with every chunk read, so it bounds a peer
        that stops reading, not the time a large data set takes.  A send that
        fails ends the association, which ends the stream with the error.
        """
        context, stream = self._begin(abstract_syntax, transfer_syntax, command)
        protocol = self._protocol
        protocol.outstanding_context = context.id
        protocol.start_dimse_timer()
        sent = protocol.send_message_from_file(context.id, command, _TimedSource(source, protocol), length)
        # the association's end (abort or close) already reports a failed send to the stream
        sent.addCallbacks(lambda _: protocol.start_dimse_timer() if protocol.outstanding is stream else None,
                          lambda _: None)
        return stream

    def _begin(self, abstract_syntax: str, transfer_syntax: Optional[str], command: D.Command,
               sink: Optional[IObjectSink] = None):
        context = self.negotiated.context_for(abstract_syntax, transfer_syntax)
        if context is None:
            raise AssociationError(f"no accepted presentation context for {abstract_syntax}")
        if not self.is_open:
            raise AssociationError(f"the association is not open ({self._protocol.record.outcome})")
        if self._protocol.outstanding is not None:
            raise AssociationError("one request is outstanding already (no asynchronous operations)")
        message_id = self._message_ids()
        command.MessageID = message_id
        stream = ResponseStream(self, message_id, command.CommandField or 0, sink)
        self._protocol.outstanding = stream
        return context, stream

    def echo(self) -> defer.Deferred:
        """C-ECHO; fires with the response status."""
        command = D.Command(CommandField=D.CommandField.C_ECHO_RQ, AffectedSOPClassUID=VERIFICATION)
        stream = self.request(VERIFICATION, command)
        return defer.ensureDeferred(stream.final()).addCallback(lambda response: response.status)

    def _identifier(self, abstract_syntax: str, identifier) -> Tuple[bytes, str]:
        """An identifier (a pydicom Dataset, or bytes already encoded) as bytes in the transfer syntax of the
        first context accepted for ``abstract_syntax``."""
        context = self.negotiated.context_for(abstract_syntax)
        if context is None:
            raise AssociationError(f"no accepted presentation context for {abstract_syntax}")
        if isinstance(identifier, (bytes, bytearray)):
            return bytes(identifier), context.transfer_syntax
        return encode_dataset(identifier, context.transfer_syntax), context.transfer_syntax

    def find(self, identifier, sop_class: str = STUDY_ROOT_FIND, priority: int = 0) -> ResponseStream:
        """C-FIND: a stream of the pending responses (each with its identifier) and the final one;
        ``stream.cancel()`` sends C-CANCEL.  The identifiers are in the context's transfer syntax."""
        data, syntax = self._identifier(sop_class, identifier)
        command = D.Command(CommandField=D.CommandField.C_FIND_RQ, AffectedSOPClassUID=sop_class, Priority=priority)
        return self.request(sop_class, command, data, syntax)

    def move(self, identifier, destination: str, sop_class: str = STUDY_ROOT_MOVE,
             priority: int = 0) -> ResponseStream:
        """C-MOVE to the AE titled ``destination``: a stream of the pending responses (with their counts) and the
        final one; ``stream.cancel()`` sends C-CANCEL."""
        data, syntax = self._identifier(sop_class, identifier)
        command = D.Command(CommandField=D.CommandField.C_MOVE_RQ, AffectedSOPClassUID=sop_class, Priority=priority,
                            MoveDestination=destination)
        return self.request(sop_class, command, data, syntax)

    def get(self, identifier, store, sop_class: str = STUDY_ROOT_GET, priority: int = 0) -> ResponseStream:
        """C-GET (PS3.4 C.4.3): the peer sends the objects back as C-STORE sub-operations on this association,
        each streamed into ``store`` (an :class:`~appliance.interfaces.IObjectSink`, as the C-STORE SCP's) and
        answered with the status it decided.  A stream of the pending responses (with their counts) and the
        final one, which comes once every sub-operation is answered; ``stream.cancel()`` sends C-CANCEL.

        The peer can only store on contexts where it agreed to our SCP role (``connect(..., roles=...)``,
        :func:`appliance.dicom.negotiation.get_proposal`); with none, AssociationError and nothing is sent.
        """
        sink = IObjectSink(store)
        if not any(context.accepted and context.requestor_scp for context in self.negotiated.contexts):
            raise AssociationError("the peer agreed to our SCP role on no presentation context: a C-GET could not "
                                   "deliver any object (propose storage classes with roles=..., or retrieve by C-MOVE)")
        data, syntax = self._identifier(sop_class, identifier)
        command = D.Command(CommandField=D.CommandField.C_GET_RQ, AffectedSOPClassUID=sop_class, Priority=priority)
        return self._send(sop_class, command, data, syntax, sink)

    def cancel(self, message_id: int) -> None:
        stream = self._protocol.outstanding
        if stream is None or stream.message_id != message_id or not self.is_open:
            return
        context_id = self._protocol.outstanding_context
        self._protocol.send_message(
            context_id, D.Command(CommandField=D.CommandField.C_CANCEL_RQ, MessageIDBeingRespondedTo=message_id)
        )

    def release(self) -> defer.Deferred:
        """A-RELEASE; fires when the peer confirmed and the connection closed."""
        return self._protocol.release()

    def abort(self, why: str = "aborted by the local user") -> None:
        self._protocol.abort(why)


class _TimedSource:
    """A file object whose every read restarts the requestor's DIMSE timer (progress, not a deadline)."""

    def __init__(self, source, protocol: "RequestorProtocol") -> None:
        self._source = source
        self._protocol = protocol

    def read(self, size: int) -> bytes:
        data = self._source.read(size)
        if self._protocol.outstanding is not None:
            self._protocol.start_dimse_timer()
        return data


@dataclass(eq=False)
class _SubOperation:
    """A C-STORE-RQ the peer sent during our C-GET, until we answer it."""

    context: ContextOutcome
    command: D.Command
    #: (status, reason) it is answered with, its data set drained, when it cannot be served
    problem: Optional[Tuple[int, str]]
    #: takes the data set: an IncomingObject into the C-GET's sink (None: drained)
    consumer: Optional[IncomingObject] = None
    data_complete: bool = False
    #: the sink asked us to stop reading
    paused: bool = False


def _store_problem(context: ContextOutcome, command: D.Command) -> Optional[Tuple[int, str]]:
    """Why a C-STORE-RQ received on ``context`` cannot be served (status, reason), or None: the C-STORE SCP's
    checks of the command (PS3.7 9.3.1), and our SCP role on the context."""
    if not context.requestor_scp:
        return S.UNRECOGNIZED_OPERATION, f"C-STORE-RQ on context {context.id}, where we are not SCP"
    problem = D.request_problem(command)
    if problem is not None:
        return S.CANNOT_UNDERSTAND, problem
    for keyword in ("AffectedSOPClassUID", "AffectedSOPInstanceUID"):
        value = getattr(command, keyword)
        if not is_received_uid(value or ""):
            return S.CANNOT_UNDERSTAND, f"{keyword} is not a valid UID"
    if command.AffectedSOPClassUID != context.abstract_syntax:
        return S.CANNOT_UNDERSTAND, f"SOP class is not context {context.id}'s {context.abstract_syntax}"
    return None


def _store_response(command: D.Command, status: int, comment: Optional[str]) -> D.Command:
    """The C-STORE-RSP answering ``command``; its UIDs echoed only when they are UIDs."""
    response = D.Command(CommandField=D.CommandField.C_STORE_RSP, MessageIDBeingRespondedTo=command.MessageID or 0,
                         Status=status)
    for keyword in ("AffectedSOPClassUID", "AffectedSOPInstanceUID"):
        value = getattr(command, keyword)
        if value is not None and is_received_uid(value):
            setattr(response, keyword, value)
    if comment:
        response.ErrorComment = error_comment(comment)
    return response


class RequestorProtocol(DicomProtocol):
    """Our side of an association we requested."""

    role = ul.Role.REQUESTOR

    def __init__(self, clock: IReactorTime, timeouts: Timeouts, request: P.AssociateRQ, max_pdu: int,
                 message_ids: Optional[MessageIds] = None) -> None:
        super().__init__(clock, timeouts, max_pdu)
        self.request = request
        self.message_ids = message_ids
        self.established: defer.Deferred = defer.Deferred()
        self.closed: defer.Deferred = defer.Deferred()
        self.association: Optional[Association] = None
        self.outstanding: Optional[ResponseStream] = None
        self.outstanding_context: Optional[int] = None
        self._response: Optional[D.Command] = None
        self._response_data: Optional[BufferedDataSet] = None
        self._dimse_timer = None
        self._release_waiter: Optional[defer.Deferred] = None
        #: the C-STORE sub-operation of our C-GET in progress, until answered
        self._incoming: Optional[_SubOperation] = None
        #: the C-GET's final response, when it came before the sub-operation in progress was answered
        self._held_final: Optional[Response] = None
        self.record.calling = request.calling_ae_title
        self.record.called = request.called_ae_title
        self.record.outcome = "connection closed before the A-ASSOCIATE-AC"
        self._process(self.ul.request_association(request))

    def send_message(self, context_id: int, command: D.Command, data: Optional[bytes] = None) -> None:
        field_value = command.CommandField or 0
        if not field_value & 0x8000 and field_value != D.CommandField.C_CANCEL_RQ:
            self.outstanding_context = context_id
        super().send_message(context_id, command, data)

    # --- indications ---

    def role_indication(self, output: Any) -> None:
        kind = type(output)
        if kind is ul.AssociateAccepted:
            self.negotiated = negotiate_as_requestor(self.request, output.response)
            self.record.note_contexts(self.negotiated.contexts)
            self.record.notes.extend(self.negotiated.notes)
            self.record.outcome = "aborted before release"
            self.association = Association(self, self.message_ids)
            self._touch_idle()
            self._fire(self.established, self.association)
        elif kind is ul.AssociateRejected:
            self.record.outcome = f"rejected: {describe_rejection(output.rejection)}"
            self._fire(self.established, AssociationRejected(output.rejection))
        elif kind is ul.ReleaseConfirmation:
            self.record.outcome = "released"
        elif kind is ul.ReleaseIndication:
            if output.collision:
                # requestor side of a collision: answer the peer's request (AR-9 on Evt14 in Sta9)
                self._process(self.ul.respond_release())
            else:
                self.record.notes.append("peer requested release")
                self.record.outcome = "released by the peer"
                self._process(self.ul.respond_release())

    def command_received(self, context_id: int, command: D.Command) -> None:
        if not (command.CommandField or 0) & 0x8000:
            self._request_received(context_id, command)
            return
        if self._held_final is not None:
            self._protocol_violation(f"a {command_name(command.CommandField)} after the final response to message "
                                     f"{self.outstanding.message_id}")
            return
        stream = self.outstanding
        if stream is None or command.MessageIDBeingRespondedTo != stream.message_id or not command.CommandField & 0x8000:
            self._protocol_violation(f"unexpected {command.CommandField!r} message from the peer")
            return
        if stream.command_field and command.CommandField != stream.command_field | 0x8000:
            self._protocol_violation(f"a {command_name(command.CommandField)} answering a "
                                     f"{command_name(stream.command_field)}")
            return
        if command.Status is None:
            self._protocol_violation("response without a Status (0000,0900)")
            return
        if stream.command_field not in _MAY_BE_PENDING and S.category(command.Status) == "pending":
            # a C-STORE or C-ECHO has one response: a pending one would keep the request alive forever
            self._protocol_violation(f"pending status 0x{command.Status:04X} answering a "
                                     f"{command_name(stream.command_field)}, which has no pending responses")
            return
        if command.has_data_set:
            self._response = command
            self._response_data = BufferedDataSet(limit=16 * 1024 * 1024)
            return
        self._deliver(Response(command))

    def data_received(self, context_id: int, data: bytes, is_last: bool) -> None:
        sub = self._incoming
        if sub is not None and not sub.data_complete:
            self._store_fragment(sub, data, is_last)
            return
        if self._response_data is None:
            self._protocol_violation("data set fragment with no response to take it")
            return
        self._response_data.write(data)
        if is_last:
            buffered, command = self._response_data, self._response
            self._response_data = self._response = None
            try:
                payload = buffered.finish()
            except Exception as error:
                self.abort(f"response data set refused: {error}")
                return
            self._deliver(Response(command, payload))

    def _deliver(self, response: Response) -> None:
        stream = self.outstanding
        if not response.pending:
            if self._incoming is not None:
                # the C-GET ends once its sub-operation in progress is answered: the final response says the
                # objects are kept, so it must not come before the sink decided
                self._held_final = response
                self._progress()
                return
            self.outstanding = None
            self._cancel_dimse_timer()
        else:
            self._progress()
        stream._push(response)

    # --- a C-GET's C-STORE sub-operations ---

    def _request_received(self, context_id: int, command: D.Command) -> None:
        """A request from the peer: only a C-STORE-RQ, only while our C-GET is outstanding, one at a time."""
        name = command_name(command.CommandField)
        stream = self.outstanding
        if command.CommandField != D.CommandField.C_STORE_RQ:
            self._protocol_violation(f"a {name} from the peer (a requestor is sent no request but a C-GET's "
                                     "C-STORE sub-operations)")
            return
        if stream is None or stream.sink is None or self._held_final is not None:
            self._protocol_violation(f"a {name} from the peer while no C-GET of ours is outstanding")
            return
        if self._incoming is not None:
            self._protocol_violation(f"{name} message {command.MessageID} arrived before we answered message "
                                     f"{self._incoming.command.MessageID} (asynchronous operations are not negotiated)")
            return
        context = self.negotiated.accepted[context_id]
        sub = _SubOperation(context, command, _store_problem(context, command))
        self._incoming = sub
        self._progress()
        if not command.has_data_set:  # a problem already: a C-STORE-RQ without a data set is not one
            self._store_decided(None, sub)
            return
        if sub.problem is None:
            description = describe_store(command, context.transfer_syntax, self.negotiated.called_ae_title)
            try:
                sub.consumer = IncomingObject(stream.sink, description, partial(self._sink_pause, sub),
                                              partial(self._sink_resume, sub))
            except Exception:
                _log.failure("C-STORE sub-operation {sop}: the object sink could not take it",
                             sop=command.AffectedSOPInstanceUID)
                sub.problem = (0xC001, "internal error: the object sink could not take the data set")

    def _store_fragment(self, sub: _SubOperation, data: bytes, is_last: bool) -> None:
        """The next fragment of a sub-operation's data set, straight into its writer (never held here)."""
        if sub.consumer is not None:
            sub.consumer.write(data)
        if not is_last:
            self._progress()  # each fragment is progress: a large object does not time out
            return
        sub.data_complete = True
        self._progress()  # the sink decides now: the DIMSE timer waits for the peer, not for us
        if sub.consumer is None:
            self._store_decided(None, sub)
            return
        d = defer.maybeDeferred(sub.consumer.finish)
        d.addCallbacks(self._store_decided, self._store_failed, callbackArgs=(sub,), errbackArgs=(sub,))

    def _store_decided(self, result: Optional[StoreResult], sub: _SubOperation) -> None:
        command = sub.command
        if sub.problem is not None:
            status, why = sub.problem
            _log.warn("C-STORE-RQ message {message_id} from {peer} answered {status}: {why}",
                      message_id=command.MessageID, peer=self.record.called, status=S.describe(status), why=why)
            self._answer(sub, status, why)
            return
        elements = response_elements(result, command.AffectedSOPInstanceUID, self.record.called)
        self._answer(sub, result.status, elements.get("ErrorComment"))

    def _store_failed(self, failure: Failure, sub: _SubOperation) -> None:
        _log.failure("C-STORE sub-operation {sop} could not be kept", failure, sop=sub.command.AffectedSOPInstanceUID)
        self._answer(sub, 0xC001, f"internal error: {failure.getErrorMessage()}")

    def _answer(self, sub: _SubOperation, status: int, comment: Optional[str]) -> None:
        """Send the C-STORE-RSP; then a final C-GET-RSP that waited for it is delivered."""
        if sub is not self._incoming or self.ul.state is not ul.State.STA6:
            return  # the association ended meanwhile
        self._sink_resume(sub)
        self._incoming = None
        self.send_message(sub.context.id, _store_response(sub.command, status, comment))
        stream = self.outstanding
        if stream is not None:
            stream.received.append((sub.command.AffectedSOPInstanceUID, status))
        final, self._held_final = self._held_final, None
        if final is not None:
            self._deliver(final)
        else:
            self._progress()

    def _sink_pause(self, sub: _SubOperation) -> None:
        if sub is self._incoming and not sub.paused:
            sub.paused = True
            self.pause_reading(_SINK_BEHIND)
            self._progress()

    def _sink_resume(self, sub: _SubOperation) -> None:
        if sub.paused:
            sub.paused = False
            self.resume_reading(_SINK_BEHIND)
            self._progress()

    def _waiting_for_peer(self) -> bool:
        """Whether the next step of the outstanding request is the peer's (not the object sink's)."""
        if self.outstanding is None or self._held_final is not None:
            return False
        sub = self._incoming
        return sub is None or not (sub.data_complete or sub.paused)

    def _progress(self) -> None:
        """The request moved on: the DIMSE timer restarts while we wait for the peer, and stops while we wait
        for ourselves (a sink that paused reading, or is deciding on an object)."""
        if self._waiting_for_peer():
            self.start_dimse_timer()
        else:
            self._cancel_dimse_timer()

    # --- timers ---

    def start_dimse_timer(self) -> None:
        """Start the DIMSE timer, or restart it if it runs (resetting is cheaper than a new call)."""
        if self.timeouts.dimse is None:
            return
        if self._dimse_timer is not None and self._dimse_timer.active():
            self._dimse_timer.reset(self.timeouts.dimse)
        else:
            self._dimse_timer = self.clock.callLater(self.timeouts.dimse, self._dimse_expired)

    def _cancel_dimse_timer(self) -> None:
        if self._dimse_timer is not None and self._dimse_timer.active():
            self._dimse_timer.cancel()
        self._dimse_timer = None

    def _dimse_expired(self) -> None:
        self._dimse_timer = None
        self.abort(f"no response within {self.timeouts.dimse:g} s (DIMSE timeout)")

    def operation_in_progress(self) -> Optional[str]:
        return "a request" if self.outstanding is not None else None

    def abort(self, why: str) -> None:
        """A-ABORT; an outstanding request fails at once rather than when the connection closes."""
        super().abort(why)
        self._fail_outstanding(why)

    def _protocol_violation(self, why: str) -> None:
        super()._protocol_violation(why)
        self._fail_outstanding(why)

    def _fail_outstanding(self, why: str) -> None:
        self._held_final = None
        if self.outstanding is not None:
            stream, self.outstanding = self.outstanding, None
            self._cancel_dimse_timer()
            stream._push(AssociationAborted(f"aborted by us: {why}"))

    # --- release and the end ---

    def release(self) -> defer.Deferred:
        if self.ul.state is not ul.State.STA6:
            return defer.fail(AssociationError(f"cannot release: association is {self.ul.state.value}"))
        if self.outstanding is not None:
            return defer.fail(AssociationError("cannot release while a request is outstanding"))
        self._release_waiter = defer.Deferred()
        self._cancel_idle()
        self._process(self.ul.request_release())
        return self._release_waiter

    def association_ended(self) -> None:
        self._cancel_dimse_timer()
        outcome = self.record.outcome
        sub, self._incoming, self._held_final = self._incoming, None, None
        if sub is not None and sub.consumer is not None and not sub.data_complete:
            sub.consumer.abandon(f"association ended: {outcome}")
        if outcome.startswith("aborted") or outcome.startswith("provider abort"):
            error: AssociationError = AssociationAborted(outcome)
        elif outcome == "released" or outcome == "released by the peer":
            error = AssociationAborted(f"association {outcome}")
        else:
            error = ConnectionFailed(outcome)
        if not self.established.called:
            self._fire(self.established, error)
        if self.outstanding is not None:
            stream, self.outstanding = self.outstanding, None
            stream._push(error)
        if self._release_waiter is not None and not self._release_waiter.called:
            if outcome == "released":
                self._release_waiter.callback(None)
            else:
                self._release_waiter.errback(error)
        self.closed.callback(outcome)

    @staticmethod
    def _fire(d: defer.Deferred, result: Any) -> None:
        if d.called:
            return
        if isinstance(result, Exception):
            d.errback(result)
        else:
            d.callback(result)


class _RequestorFactory(Factory):
    noisy = False

    def __init__(self, protocol: RequestorProtocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr) -> RequestorProtocol:
        self._protocol.factory = self
        return self._protocol


def connect(
    reactor,
    host: str,
    port: int,
    calling_ae_title: str,
    called_ae_title: str,
    contexts: Sequence[Tuple[str, Sequence[str]]] = ((VERIFICATION, UNCOMPRESSED_TRANSFER_SYNTAXES),),
    *,
    max_pdu: int = 16384,
    timeouts: Timeouts = Timeouts(),
    implementation_class_uid: str,
    implementation_version_name: Optional[str],
    endpoint=None,
    message_ids: Optional[MessageIds] = None,
    roles: Optional[Roles] = None,
) -> defer.Deferred:
    """Open an association; fires with an :class:`Association` or fails with an :class:`AssociationError`.

    ``endpoint`` replaces the plain TCP endpoint (TLS, or a test's in-memory one); ``message_ids`` is the
    calling AE's source of Message IDs (a fresh one by default); ``roles`` proposes SCP/SCU role selection
    (SOP class UID -> (SCU, SCP), :func:`appliance.dicom.negotiation.propose`), as a C-GET needs.
    """
    request = propose(calling_ae_title, called_ae_title, contexts, max_pdu, implementation_class_uid,
                      implementation_version_name, roles)
    protocol = RequestorProtocol(reactor, timeouts, request, max_pdu, message_ids)
    if endpoint is None:
        endpoint = HostnameEndpoint(reactor, host, port, timeout=timeouts.association)
    connecting = endpoint.connect(_RequestorFactory(protocol))
    where = f"{called_ae_title} at {host}:{port}"

    def connect_failed(failure):
        if failure.check(net_error.ConnectionRefusedError):
            raise ConnectionFailed(f"connection to {where} refused")
        if failure.check(net_error.TimeoutError, defer.CancelledError):
            raise AssociationTimeout(f"no connection to {where} within {timeouts.association:g} s")
        if failure.check(net_error.DNSLookupError):
            raise ConnectionFailed(f"cannot resolve host {host!r}")
        raise ConnectionFailed(f"cannot connect to {where}: {failure.getErrorMessage()}")

    connecting.addErrback(connect_failed)

    timer = reactor.callLater(timeouts.association, lambda: _association_timeout(protocol, connecting, where, timeouts))

    def connected(_):
        return protocol.established

    def stop_timer(result):
        if timer.active():
            timer.cancel()
        if isinstance(result, Failure) and result.check(defer.CancelledError) and protocol.transport is not None:
            # no longer wanted while the A-ASSOCIATE-AC was awaited: A-ABORT, then closed (the peer, or ARTIM),
            # rather than a connection left open with no timer to end it
            protocol.abort(f"the association to {where} was no longer wanted")
        return result

    return connecting.addCallback(connected).addBoth(stop_timer)


def connect_device(
    reactor,
    device,
    calling_ae_title: str,
    contexts: Sequence[Tuple[str, Sequence[str]]] = ((VERIFICATION, UNCOMPRESSED_TRANSFER_SYNTAXES),),
    *,
    implementation_class_uid: str,
    implementation_version_name: Optional[str],
    tls=None,
    message_ids: Optional[MessageIds] = None,
    opener: Optional[Callable[..., defer.Deferred]] = None,
    roles: Optional[Roles] = None,
) -> defer.Deferred:
    """An association to a configured device (appliance.config.DeviceConfig): its address, maximum PDU and
    timeout, over TLS when it says ``tls = true`` (``tls``: the TLSContexts holding its context; its
    certificate verified against ca_certificates and its host), calling as ``calling_ae_title``.

    ``opener`` replaces :func:`connect` without its reactor (a test's); the rest is passed on to it
    (``roles`` only when given).
    """
    timeouts = Timeouts(artim=device.timeout, association=device.timeout, dimse=device.timeout, idle=None)
    options = {}
    if device.tls is not None:
        if tls is None or device.name not in tls.clients:
            return defer.fail(AssociationError(f"no TLS context for device {device.name!r} ({device.ae_title})"))
        options["endpoint"] = tls.client_endpoint(reactor, device, device.timeout)
    if message_ids is not None:
        options["message_ids"] = message_ids
    if roles is not None:
        options["roles"] = roles
    if opener is None:
        opener = partial(connect, reactor)
    return opener(device.host, device.port, calling_ae_title, device.ae_title, contexts, max_pdu=device.max_pdu,
                  timeouts=timeouts, implementation_class_uid=implementation_class_uid,
                  implementation_version_name=implementation_version_name, **options)


def _association_timeout(protocol: RequestorProtocol, connecting: defer.Deferred, where: str, timeouts: Timeouts) -> None:
    if protocol.established.called:
        return
    if not connecting.called:
        connecting.cancel()
        return
    protocol.record.outcome = f"aborted by us: no A-ASSOCIATE-AC from {where} within {timeouts.association:g} s"
    protocol._fire(protocol.established, AssociationTimeout(f"no A-ASSOCIATE-AC from {where} within {timeouts.association:g} s"))
    protocol._process(protocol.ul.abort())
