"""The requestor side: open an association to a remote AE and use it from SCU code.

``yield connect(...)`` / ``await connect(...)`` gives an :class:`Association`
once the peer accepted; requests return a :class:`ResponseStream` whose
responses (pending ones included) arrive as Deferreds or through
``async for``.  Rejections, aborts and timeouts arrive as the exceptions
below, each saying why in words.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Deque, Optional, Sequence, Tuple

from twisted.internet import defer, error as net_error
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory

from ..dicom import dimse as D
from ..dicom import pdu as P
from ..dicom import status as S
from ..dicom import ul
from ..dicom.negotiation import Negotiated, describe_rejection, negotiate_as_requestor, propose
from ..dicom.provider import command_name
from ..compat import encode_dataset
from ..dicom.uids import STUDY_ROOT_FIND, STUDY_ROOT_MOVE, UNCOMPRESSED_TRANSFER_SYNTAXES, VERIFICATION
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

    def __init__(self, association: "Association", message_id: int, command_field: int = 0) -> None:
        self.association = association
        self.message_id = message_id
        #: the request's Command Field: its responses carry it with bit 15 set
        self.command_field = command_field
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
        context, stream = self._begin(abstract_syntax, transfer_syntax, command)
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

    def _begin(self, abstract_syntax: str, transfer_syntax: Optional[str], command: D.Command):
        context = self.negotiated.context_for(abstract_syntax, transfer_syntax)
        if context is None:
            raise AssociationError(f"no accepted presentation context for {abstract_syntax}")
        if not self.is_open:
            raise AssociationError(f"the association is not open ({self._protocol.record.outcome})")
        if self._protocol.outstanding is not None:
            raise AssociationError("one request is outstanding already (no asynchronous operations)")
        message_id = self._message_ids()
        command.MessageID = message_id
        stream = ResponseStream(self, message_id, command.CommandField or 0)
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
        self.record.calling = request.calling_ae_title
        self.record.called = request.called_ae_title
        self.record.outcome = "connection closed before the A-ASSOCIATE-AC"
        self._process(self.ul.request_association(request))

    def send_message(self, context_id: int, command: D.Command, data: Optional[bytes] = None) -> None:
        if command.CommandField != D.CommandField.C_CANCEL_RQ:
            self.outstanding_context = context_id
        super().send_message(context_id, command, data)

    # --- indications ---

    def role_indication(self, output: Any) -> None:
        kind = type(output)
        if kind is ul.AssociateAccepted:
            self.negotiated = negotiate_as_requestor(self.request, output.response)
            self.record.note_contexts(self.negotiated.contexts)
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
            self.outstanding = None
            self._cancel_dimse_timer()
        else:
            self.start_dimse_timer()
        stream._push(response)

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
) -> defer.Deferred:
    """Open an association; fires with an :class:`Association` or fails with an :class:`AssociationError`.

    ``endpoint`` replaces the plain TCP endpoint (TLS, or a test's in-memory one); ``message_ids`` is the
    calling AE's source of Message IDs (a fresh one by default).
    """
    request = propose(calling_ae_title, called_ae_title, contexts, max_pdu, implementation_class_uid,
                      implementation_version_name)
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
) -> defer.Deferred:
    """An association to a configured device (appliance.config.DeviceConfig): its address, maximum PDU and
    timeout, over TLS when it says ``tls = true`` (``tls``: the TLSContexts holding its context; its
    certificate verified against ca_certificates and its host), calling as ``calling_ae_title``.

    ``opener`` replaces :func:`connect` without its reactor (a test's); the rest is passed on to it.
    """
    timeouts = Timeouts(artim=device.timeout, association=device.timeout, dimse=device.timeout, idle=None)
    options = {}
    if device.tls is not None:
        if tls is None or device.name not in tls.clients:
            return defer.fail(AssociationError(f"no TLS context for device {device.name!r} ({device.ae_title})"))
        options["endpoint"] = tls.client_endpoint(reactor, device, device.timeout)
    if message_ids is not None:
        options["message_ids"] = message_ids
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
