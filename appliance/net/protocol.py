"""Twisted adapters for the DICOM Upper Layer: thin, and the only place bytes meet sockets.

:class:`DicomProtocol` feeds received bytes to the sans-IO
:class:`~appliance.dicom.ul.UpperLayer`, performs its transport requests in
order (write, close, ARTIM via the injected ``IReactorTime``) and hands its
indications to the role-specific subclass:

* :class:`AcceptorProtocol` negotiates with the AE's policy and dispatches
  DIMSE requests to the AE's :class:`~appliance.interfaces.IServiceClass`
  providers, one operation at a time.
* :class:`RequestorProtocol` (in :mod:`appliance.net.requestor`) proposes
  contexts and exposes the association to SCU code.

Each association ends with one log line: peer, AE titles, contexts accepted
and rejected with reasons, outcome, duration and bytes, and over TLS the
protocol version, cipher suite and peer certificate subject.  A TLS handshake
that fails ends the line with the peer and OpenSSL's reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from twisted.internet import defer
from twisted.internet.interfaces import IHandshakeListener, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from ..dicom import dimse as D
from ..dicom import pdu as P
from ..dicom import provider, ul
from ..dicom import status as S
from ..dicom.errors import DimseDecodeError
from ..dicom.negotiation import (
    Acceptance,
    AcceptorPolicy,
    ContextOutcome,
    Negotiated,
    describe_rejection,
    negotiate_as_acceptor,
)
from ..interfaces import IDataSetConsumer, IServiceClass
from ..logs import logger
from . import tls

__all__ = [
    "Timeouts",
    "DicomProtocol",
    "AcceptorProtocol",
    "AcceptorFactory",
    "DimseRequest",
    "BufferedDataSet",
    "DataSetTooLarge",
]

_log = logger("appliance.association")

#: When the peer announces no limit (0), we still send PDUs of at most this size.
UNLIMITED_PDU_SEND_SIZE = 256 * 1024


@dataclass(frozen=True)
class Timeouts:
    """Seconds; ``None`` disables a timer.

    ``artim``: waiting for the A-ASSOCIATE-RQ, and for the peer to close after
    a release or abort.  ``association``: a requestor waiting for connection
    and A-ASSOCIATE-AC.  ``dimse``: a requestor waiting for a response.
    ``idle``: an established association on which nothing is received or
    sent, whatever operation is in progress (a C-STORE-RQ whose data set
    never comes holds nothing for longer).
    """

    artim: float = 30.0
    association: float = 30.0
    dimse: Optional[float] = 30.0
    idle: Optional[float] = 300.0


class DataSetTooLarge(Exception):
    """A buffered data set exceeded its bound."""


@implementer(IDataSetConsumer)
@dataclass
class BufferedDataSet:
    """An :class:`IDataSetConsumer` that keeps a small data set (an identifier) in memory, bounded."""

    limit: int
    parts: List[bytes] = field(default_factory=list)
    size: int = 0
    overflowed: bool = False

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            self.overflowed = True
            self.parts.clear()
        elif not self.overflowed:
            self.parts.append(data)

    def finish(self) -> bytes:
        if self.overflowed:
            raise DataSetTooLarge(f"data set of over {self.limit} bytes")
        return b"".join(self.parts)

    def abandon(self, reason: str) -> None:
        self.parts.clear()


@dataclass
class AssociationRecord:
    """What the end-of-association log line says."""

    peer: str = "?"
    calling: str = "?"
    called: str = "?"
    accepted: List[str] = field(default_factory=list)
    rejected: List[str] = field(default_factory=list)
    outcome: str = "connection closed before an A-ASSOCIATE-RQ"
    started: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    messages: int = 0
    notes: List[str] = field(default_factory=list)
    #: over TLS, once the handshake completed: "TLSv1.3 TLS_AES_256_GCM_SHA384, peer CN=..."
    tls: Optional[str] = None

    #: contexts listed one by one up to this many (accepted, and rejected), then counted
    ACCEPTED_SHOWN = 8
    REJECTED_SHOWN = 32

    def note_contexts(self, contexts) -> None:
        accepted = [c for c in contexts if c.accepted]
        self.accepted = [c.describe() for c in accepted[: self.ACCEPTED_SHOWN]]
        if len(accepted) > self.ACCEPTED_SHOWN:
            self.accepted.append(f"and {len(accepted) - self.ACCEPTED_SHOWN} more")
        rejected = [c for c in contexts if not c.accepted]
        self.rejected = [c.describe() for c in rejected[: self.REJECTED_SHOWN]]
        if len(rejected) > self.REJECTED_SHOWN:
            self.rejected.append(f"and {len(rejected) - self.REJECTED_SHOWN} more")


@implementer(IHandshakeListener)
class DicomProtocol(Protocol):
    """Common adapter for both roles; subclasses handle the indications.

    Over TLS (Twisted's TLSMemoryBIOProtocol is the transport) the connection
    is made before the handshake: what is written waits for it, and ARTIM
    bounds a handshake that never ends.
    """

    role: ul.Role

    def __init__(self, clock: IReactorTime, timeouts: Timeouts, max_pdu: int) -> None:
        self.clock = clock
        self.timeouts = timeouts
        self.max_pdu = max_pdu
        self.ul = ul.UpperLayer(self.role, max_pdu)
        self.assembler = D.MessageAssembler()
        self.negotiated: Optional[Negotiated] = None
        self.record = AssociationRecord()
        self._artim = None
        self._idle = None
        self._closed = False
        self._finished_log = False
        self._write_monitor: Optional["_WriteMonitor"] = None
        #: the write monitor is writable()'s own, registered for one producer of responses at a time
        self._monitor_temporary = False
        #: why reading from the peer is paused (it resumes when there is no reason left)
        self._read_pauses: set = set()

    # --- Twisted's side ----------------------------------------------------

    def connectionMade(self) -> None:
        self.record.started = self.clock.seconds()
        peer = self.transport.getPeer()
        self.record.peer = f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            # without it every small PDU waits ~40 ms for a delayed ACK
            set_no_delay(True)
        self._process(self.ul.transport_connected())

    def dataReceived(self, data: bytes) -> None:
        self.record.bytes_in += len(data)
        self._touch_idle()
        self._process(self.ul.receive_data(data))

    def handshakeCompleted(self) -> None:
        """IHandshakeListener: the TLS handshake is done; record version, cipher and peer certificate."""
        try:
            self.record.tls = tls.describe_session(self.transport)
        except Exception as error:  # a description must never break the association
            self.record.tls = f"(no description: {error!r})"

    def connectionLost(self, reason: Failure = None) -> None:
        self._closed = True
        self._cancel_idle()
        self._process(self.ul.transport_closed())
        self._cancel_artim()
        if tls.is_tls(self.transport):
            self._note_tls_end(reason)
        self.association_ended()
        self._log_summary()

    def _note_tls_end(self, reason: Optional[Failure]) -> None:
        """A TLS connection ended: before an association, say why the handshake failed (OpenSSL's reason)."""
        why = tls.handshake_failure(self.transport, reason)
        outcome = self.record.outcome
        if why is not None:
            if self.negotiated is None and not outcome.startswith("aborted by us"):
                self.record.outcome = f"TLS handshake failed: {why}"
            else:
                self.record.notes.append(f"TLS error: {why}")
        elif self.record.tls is None:
            if outcome.startswith("connection closed"):
                self.record.outcome = "connection closed during the TLS handshake"
            else:  # e.g. ARTIM expired during it
                self.record.notes.append("the TLS handshake did not complete")

    # --- performing the core's outputs --------------------------------------

    def _process(self, outputs: List[Any]) -> None:
        for output in outputs:
            kind = type(output)
            if kind is ul.Send:
                if not self._closed:
                    self.record.bytes_out += len(output.data)
                    self.transport.write(output.data)
                    self._touch_idle()
            elif kind is ul.CloseTransport:
                if not self._closed:
                    self.transport.loseConnection()
            elif kind is ul.StartARTIM:
                self._cancel_artim()
                self._artim = self.clock.callLater(self.timeouts.artim, self._artim_fired)
            elif kind is ul.StopARTIM:
                self._cancel_artim()
            elif kind is ul.OpenTransport:
                pass  # the endpoint is already connecting: this protocol exists because of it
            else:
                self._indication(output)

    def _artim_fired(self) -> None:
        self._artim = None
        if self.ul.state is ul.State.STA2:
            self.record.outcome = f"no A-ASSOCIATE-RQ within {self.timeouts.artim:g} s (ARTIM expired)"
        elif self.ul.state is ul.State.STA13 and "ARTIM" not in self.record.outcome:
            self.record.notes.append("peer did not close the connection before ARTIM expired")
        self._process(self.ul.artim_expired())

    def _cancel_artim(self) -> None:
        if self._artim is not None and self._artim.active():
            self._artim.cancel()
        self._artim = None

    def _touch_idle(self) -> None:
        if self.timeouts.idle is None or self.ul.state is not ul.State.STA6:
            return
        if self._idle is not None and self._idle.active():
            self._idle.reset(self.timeouts.idle)
        else:
            self._idle = self.clock.callLater(self.timeouts.idle, self._idle_fired)

    def _cancel_idle(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None

    def _idle_fired(self) -> None:
        """Nothing received or sent for ``idle`` seconds: A-ABORT, whatever is in progress."""
        self._idle = None
        doing = self.operation_in_progress()
        self.abort(f"idle for {self.timeouts.idle:g} s: nothing received or sent"
                   + (f" while {doing} was in progress" if doing else ""))

    # --- primitives for the user ---------------------------------------------

    def abort(self, why: str) -> None:
        """Send an A-ABORT (service-user source) and close once the peer closes or ARTIM fires."""
        if self.ul.state in (ul.State.STA1, ul.State.STA13):
            return
        self.record.outcome = f"aborted by us: {why}"
        self._cancel_idle()
        self._process(self.ul.abort())

    def writable(self) -> defer.Deferred:
        """Fires once the transport's write buffer has drained below its limit.

        For producers of many responses (C-FIND): they wait on this between
        batches, so a slow reader does not make us buffer the result set.
        Uses the connection's write monitor, or registers one while in use;
        call :meth:`done_writing` at the end.
        """
        if self._write_monitor is None:
            self._write_monitor = _WriteMonitor()
            self._monitor_temporary = True
            self.transport.registerProducer(self._write_monitor, True)
        return self._write_monitor.when_writable()

    def done_writing(self) -> None:
        if self._write_monitor is not None and self._monitor_temporary:
            monitor, self._write_monitor = self._write_monitor, None
            self._monitor_temporary = False
            monitor.resumeProducing()
            if not self._closed:
                self.transport.unregisterProducer()

    def watch_writes(self) -> None:
        """For the connection's life: while the peer does not read what we send (the transport's write buffer
        is full), do not read what it sends either, so that answers to it never pile up in memory."""
        self._write_monitor = _WriteMonitor(lambda: self.pause_reading("the peer is not reading"),
                                            lambda: self.resume_reading("the peer is not reading"))
        self.transport.registerProducer(self._write_monitor, True)

    def pause_reading(self, why: str = "a consumer is behind") -> None:
        """Stop reading from the peer (flow control), until :meth:`resume_reading` for every ``why`` given."""
        if not self._read_pauses and not self._closed:
            self.transport.pauseProducing()
        self._read_pauses.add(why)

    def resume_reading(self, why: str = "a consumer is behind") -> None:
        if why not in self._read_pauses:
            return
        self._read_pauses.discard(why)
        if not self._read_pauses and not self._closed:
            self.transport.resumeProducing()

    def send_message(self, context_id: int, command: D.Command, data: Optional[bytes] = None) -> None:
        """Send a DIMSE message: the command set, then the data set if any."""
        if data is None:
            command.CommandDataSetType = D.NO_DATA_SET
        elif command.CommandDataSetType in (None, D.NO_DATA_SET):
            command.CommandDataSetType = 0x0000
        max_pdu = self.send_pdu_size()
        for encoded in D.fragment(context_id, True, command.encode(), max_pdu):
            self._process(self.ul.send_pdata(encoded))
        if data is not None:
            for encoded in D.fragment(context_id, False, data, max_pdu):
                self._process(self.ul.send_pdata(encoded))
        self.record.messages += 1

    def send_message_from_file(self, context_id: int, command: D.Command, source, length: int) -> defer.Deferred:
        """Send a command and a data set of ``length`` bytes read from the file object ``source``.

        The data set is read one PDU at a time, only when the transport asks
        for more (a pull producer), so a slow peer never makes us hold more
        than one PDU of it.  Fires once the last fragment is written; fails
        if the association ends first or the file is shorter than ``length``.
        """
        command.CommandDataSetType = 0x0000
        max_pdu = self.send_pdu_size()
        for encoded in D.fragment(context_id, True, command.encode(), max_pdu):
            self._process(self.ul.send_pdata(encoded))
        self.record.messages += 1
        sender = _DataSetSender(self, context_id, source, length, D.fragment_sizes(max_pdu))
        self.transport.registerProducer(sender, False)
        return sender.done

    def send_pdu_size(self) -> int:
        peer = self.negotiated.peer_max_pdu if self.negotiated else 0
        return peer if peer else UNLIMITED_PDU_SEND_SIZE

    # --- indications ----------------------------------------------------------

    def _indication(self, output: Any) -> None:
        kind = type(output)
        if kind is ul.PDataIndication:
            self.pdata_indication(output.pdvs)
        elif kind is ul.AbortIndication:
            self.record.outcome = f"aborted by the peer (A-ABORT source {output.source}, reason {output.reason})"
        elif kind is ul.ProviderAbortIndication:
            if not self.record.outcome.startswith("aborted by us"):
                self.record.outcome = f"provider abort: {output.message}"
        else:
            self.role_indication(output)

    def _protocol_violation(self, why: str) -> None:
        """The peer broke DIMSE rules: A-ABORT with provider source, reason 'invalid PDU parameter value'."""
        self.record.outcome = f"aborted by us: {why}"
        if self.ul.state in (ul.State.STA1, ul.State.STA13):
            return
        self._cancel_idle()
        self._process(self.ul.abort(P.AbortSource.SERVICE_PROVIDER, P.AbortReason.INVALID_PDU_PARAMETER_VALUE))

    # --- for subclasses ---------------------------------------------------------

    def pdata_indication(self, pdvs) -> None:
        """The PDVs of a P-DATA-TF PDU: reassembled into messages for :meth:`command_received` and
        :meth:`data_received` (the acceptor has a DIMSE provider of its own instead)."""
        try:
            events = self.assembler.receive(pdvs)
            for pdv in pdvs:
                if self.negotiated is None or pdv.context_id not in self.negotiated.accepted:
                    raise DimseDecodeError(f"PDV on presentation context {pdv.context_id}, which was not accepted")
        except DimseDecodeError as error:
            self._protocol_violation(str(error))
            return
        for event in events:
            if self.ul.state not in (ul.State.STA6, ul.State.STA7):
                break
            if type(event) is D.CommandReceived:
                self.command_received(event.context_id, event.command)
            else:
                self.data_received(event.context_id, event.data, event.is_last)

    def role_indication(self, output: Any) -> None:
        raise NotImplementedError

    def command_received(self, context_id: int, command: D.Command) -> None:
        raise NotImplementedError

    def data_received(self, context_id: int, data: bytes, is_last: bool) -> None:
        raise NotImplementedError

    def operation_in_progress(self) -> Optional[str]:
        """What operation is in progress, in words (None: none)."""
        return None

    def association_ended(self) -> None:
        """The transport is gone; release whatever the association held."""

    def _log_summary(self) -> None:
        if self._finished_log:
            return
        self._finished_log = True
        record = self.record
        duration = self.clock.seconds() - record.started if record.started else 0.0
        # peer text (AE titles, UIDs, reasons quoting them) escaped: nothing the peer sends reaches the log raw
        _log.info(
            "{role} {peer} {calling}->{called}: {outcome}; accepted [{accepted}]; rejected [{rejected}]; "
            "{messages} messages, {bytes_in} bytes in, {bytes_out} bytes out, {duration:.3f} s{tls}{notes}",
            role=self.role.value,
            peer=printable(record.peer),
            calling=printable(record.calling),
            called=printable(record.called),
            outcome=printable(record.outcome),
            accepted=printable("; ".join(record.accepted)),
            rejected=printable("; ".join(record.rejected)),
            messages=record.messages,
            bytes_in=record.bytes_in,
            bytes_out=record.bytes_out,
            duration=duration,
            tls=printable(f"; TLS: {record.tls}") if record.tls else "",
            notes=printable("".join(f"; {note}" for note in record.notes)),
        )


#: Longest text from one field of an association's log line (a hostile RQ could make megabytes of it).
MAX_LOGGED_FIELD = 4096


def printable(text: str) -> str:
    """``text`` for a log line: characters outside printable ISO 646 as ``\\xNN`` escapes, at most
    :data:`MAX_LOGGED_FIELD` characters."""
    if len(text) > MAX_LOGGED_FIELD:
        text = text[:MAX_LOGGED_FIELD] + f"... ({len(text) - MAX_LOGGED_FIELD} more characters)"
    if text.isascii() and text.isprintable():
        return text
    return "".join(char if " " <= char <= "~" else char.encode("unicode_escape").decode("ascii") for char in text)


class _WriteMonitor:
    """A streaming producer that records whether the transport wants us to pause, and says so."""

    def __init__(self, on_pause: Optional[Callable[[], None]] = None,
                 on_resume: Optional[Callable[[], None]] = None) -> None:
        self.paused = False
        self._waiters: List[defer.Deferred] = []
        self._on_pause, self._on_resume = on_pause, on_resume

    def when_writable(self) -> defer.Deferred:
        if not self.paused:
            return defer.succeed(None)
        waiter = defer.Deferred()
        self._waiters.append(waiter)
        return waiter

    def pauseProducing(self) -> None:
        if not self.paused and self._on_pause is not None:
            self._on_pause()
        self.paused = True

    def resumeProducing(self) -> None:
        was_paused, self.paused = self.paused, False
        if was_paused and self._on_resume is not None:
            self._on_resume()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def stopProducing(self) -> None:
        self.resumeProducing()


#: How much of a data set the sender reads and writes per turn of the event loop.
SEND_BLOCK = 256 * 1024


class _DataSetSender:
    """A pull producer writing one block of a data set (as many PDUs as fit) per ``resumeProducing``.

    The transport asks for more only when its buffer has drained, so at most
    one block is held; a block of several PDUs per turn keeps the event loop's
    cost per byte low (a 16 KB PDU per turn made each turn the bottleneck).
    """

    def __init__(self, protocol: DicomProtocol, context_id: int, source, length: int, chunk: int) -> None:
        self.protocol = protocol
        self.context_id = context_id
        self.source = source
        self.remaining = length
        self.chunk = chunk
        self.block = max(chunk, SEND_BLOCK // chunk * chunk)
        self.done: defer.Deferred = defer.Deferred()

    def resumeProducing(self) -> None:
        if self.done.called:
            return
        if self.protocol.ul.state not in (ul.State.STA6, ul.State.STA8):
            self._finish(ConnectionError(f"association ended while sending: {self.protocol.record.outcome}"))
            return
        size = min(self.block, self.remaining)
        data = self.source.read(size) if size else b""
        if len(data) != size:
            self._finish(EOFError(f"data set source ended {self.remaining - len(data)} bytes early"))
            self.protocol.abort("data set source ended early")
            return
        self.remaining -= size
        last = self.remaining == 0
        for encoded in D.fragment(self.context_id, False, data, self.chunk + 6, last=last):
            self.protocol._process(self.protocol.ul.send_pdata(encoded))
        if last:
            self._finish(None)

    def stopProducing(self) -> None:
        self._finish(ConnectionError("transport closed while sending a data set"))

    def pauseProducing(self) -> None:  # only called on push producers; harmless here
        pass

    def _finish(self, error: Optional[Exception]) -> None:
        if self.done.called:
            return
        try:
            self.protocol.transport.unregisterProducer()
        except Exception:  # the transport may already be gone
            pass
        if error is None:
            self.done.callback(None)
        else:
            self.done.errback(error)


@dataclass
class DimseRequest:
    """One DIMSE request received by an acceptor, with what its service needs to answer it."""

    association: "AcceptorProtocol"
    #: the provider's request (appliance.dicom.provider.Request): context, command, problem, progress
    dimse: provider.Request
    service: Any
    data: Any = None
    consumer: Any = None
    finished: bool = False

    @property
    def context(self) -> ContextOutcome:
        return self.dimse.context

    @property
    def command(self) -> D.Command:
        return self.dimse.command

    @property
    def message_id(self) -> int:
        return self.dimse.message_id

    def respond(self, status: int, data: Optional[bytes] = None, **elements: Any) -> None:
        """Send a response; a non-pending status ends the operation."""
        self.association.respond(self, status, data, **elements)


class AcceptorProtocol(DicomProtocol):
    """An association accepted by one of our listening AEs."""

    role = ul.Role.ACCEPTOR

    def __init__(self, factory: "AcceptorFactory") -> None:
        super().__init__(factory.clock, factory.timeouts, factory.policy.max_pdu)
        self.factory = factory
        #: the DIMSE provider, once the association is accepted
        self.dimse: Optional[provider.DimseProvider] = None
        self.current: Optional[DimseRequest] = None
        self.record.called = factory.policy.ae_title

    def connectionMade(self) -> None:
        self.factory.connections += 1
        #: bytes of a partial A-ASSOCIATE-RQ this connection holds, counted in factory.pending_bytes
        self._pending = 0
        super().connectionMade()
        self.host = getattr(self.transport.getPeer(), "host", "?")
        self.watch_writes()

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if self.negotiated is None and not self._closed:
            self._count_pending(self.ul.buffered)
            if self.factory.pending_bytes > MAX_PENDING_BYTES and self._pending:
                self.record.outcome = (f"closed: {self.factory.pending_bytes} bytes of partial A-ASSOCIATE-RQs "
                                       f"waiting in connections without an association (at most {MAX_PENDING_BYTES})")
                self._count_pending(0)
                self.transport.abortConnection()

    def _count_pending(self, buffered: int) -> None:
        self.factory.pending_bytes += buffered - self._pending
        self._pending = buffered

    def association_ended(self) -> None:
        self.factory.connections -= 1
        self._count_pending(0)
        if self.negotiated is not None:
            self.factory.associations -= 1
            self.factory.host_associations[self.host] -= 1
            if not self.factory.host_associations[self.host]:
                del self.factory.host_associations[self.host]
        if self.dimse is not None:
            self.dimse.end()
        request, self.current = self.current, None
        if request is not None and request.consumer is not None and not request.finished:
            request.consumer.abandon(f"association ended: {self.record.outcome}")

    def operation_in_progress(self) -> Optional[str]:
        request = self.current
        if request is None:
            return None
        return f"{provider.command_name(request.command.CommandField)} message {request.message_id}"

    def role_indication(self, output: Any) -> None:
        kind = type(output)
        if kind is ul.AssociateIndication:
            self._associate_indication(output.request)
        elif kind is ul.AssociateRejected:  # our provider refused the protocol version
            self.record.outcome = f"rejected: {describe_rejection(output.rejection)}"
        elif kind is ul.ReleaseIndication:
            if self.current is not None:
                self.record.notes.append("release requested while an operation was in progress")
            self.record.outcome = "released"
            self._cancel_idle()
            self._process(self.ul.respond_release())
        else:
            self.record.notes.append(f"unexpected {kind.__name__}")

    def _associate_indication(self, request: P.AssociateRQ) -> None:
        self.record.calling = request.calling_ae_title
        self.record.called = request.called_ae_title
        if self.ul.state is not ul.State.STA3:
            # PDUs that came right behind the RQ, before our answer, already ended it (PS3.8 Table 9-10, Sta3)
            self.record.notes.append("the peer sent more PDUs before our answer to its A-ASSOCIATE-RQ")
            return
        if self.factory.associations >= self.factory.max_associations:
            rejection = P.AssociateRJ(2, 3, 2)
            self.record.outcome = (
                f"rejected: {describe_rejection(rejection)}; {self.factory.associations} of "
                f"max_associations={self.factory.max_associations} in use"
            )
            self._process(self.ul.reject(rejection))
            return
        from_host = self.factory.host_associations.get(self.host, 0)
        if from_host >= self.factory.max_associations_per_host:
            rejection = P.AssociateRJ(2, 3, 2)
            self.record.outcome = (
                f"rejected: {describe_rejection(rejection)}; {from_host} associations from {self.host} of "
                f"max_associations_per_host={self.factory.max_associations_per_host} in use"
            )
            self._process(self.ul.reject(rejection))
            return
        decision = negotiate_as_acceptor(request, self.factory.policy)
        if not isinstance(decision, Acceptance):
            self.record.outcome = f"rejected: {describe_rejection(decision.rejection)}; {decision.reason}"
            self._process(self.ul.reject(decision.rejection))
            return
        binding = self.factory.certificate_binding
        if binding is not None and tls.is_tls(self.transport):
            problem = binding.check(request.calling_ae_title, tls.peer_certificate(self.transport))
            if problem is not None:
                rejection = P.AssociateRJ(1, 1, 3)  # calling AE title not recognized
                self.record.outcome = f"rejected: {describe_rejection(rejection)}; {problem}"
                self._process(self.ul.reject(rejection))
                return
        self.negotiated = decision.negotiated
        self._count_pending(0)
        self.dimse = provider.DimseProvider(decision.negotiated.accepted, self.factory.operations)
        self.factory.associations += 1
        self.factory.host_associations[self.host] = self.factory.host_associations.get(self.host, 0) + 1
        self.record.note_contexts(decision.negotiated.contexts)
        self.record.notes.extend(decision.negotiated.notes)
        self.record.outcome = "aborted before release"
        self._process(self.ul.accept(decision.response))
        self._touch_idle()

    # --- DIMSE dispatch ----------------------------------------------------------

    def pdata_indication(self, pdvs) -> None:
        for event in self.dimse.receive(pdvs):
            if self.ul.state not in (ul.State.STA6, ul.State.STA7):
                break
            kind = type(event)
            if kind is provider.RequestReceived:
                self._request_received(event.request)
            elif kind is provider.DataSetFragment:
                self._fragment(event.data, event.is_last)
            elif kind is provider.CancelRequested:
                if self.current is not None and self.current.dimse is event.request:
                    self.current.service.cancel(self.current)
            else:
                self._protocol_violation(event.reason)

    def _request_received(self, dimse: provider.Request) -> None:
        service = self.factory.services.get(dimse.context.abstract_syntax)
        request = DimseRequest(self, dimse, service)
        self.current = request
        if not dimse.data_expected:
            self._dispatch(request)
            return
        if dimse.problem is None:
            try:
                request.consumer = IDataSetConsumer(service.open_data_set(request))
            except Exception:
                _log.failure("{command}: the service could not take its data set", command=dimse.name)
                dimse.problem = (0xC001, "internal error: the service could not take the data set")
        if request.consumer is None:
            request.consumer = _Drain()  # read and dropped, then answered with the problem

    def _fragment(self, data: bytes, is_last: bool) -> None:
        request = self.current
        request.consumer.write(data)
        if is_last:
            request.finished = True
            d = defer.maybeDeferred(request.consumer.finish)
            d.addCallbacks(self._data_complete, self._data_failed, callbackArgs=(request,), errbackArgs=(request,))

    def _data_complete(self, result: Any, request: DimseRequest) -> None:
        request.data = result
        self._dispatch(request)

    def _data_failed(self, failure: Failure, request: DimseRequest) -> None:
        if request.dimse.problem is not None:
            self._dispatch(request)
            return
        if failure.check(DataSetTooLarge):  # an expected refusal: one line, no traceback
            request.dimse.problem = (S.CANNOT_UNDERSTAND, failure.getErrorMessage())
            self._dispatch(request)
            return
        _log.failure("data set of {command} could not be taken", failure, command=request.dimse.name)
        request.respond(S.CANNOT_UNDERSTAND, ErrorComment=failure.getErrorMessage())

    def _dispatch(self, request: DimseRequest) -> None:
        problem = request.dimse.problem
        if problem is not None:
            status, why = problem
            _log.warn("{command} message {message_id} from {calling} answered {status}: {why}",
                      command=request.dimse.name, message_id=request.message_id,
                      calling=self.record.calling, status=S.describe(status), why=why)
            request.respond(status, ErrorComment=why)
            return
        d = defer.maybeDeferred(request.service.handle, request)
        d.addErrback(self._service_failed, request)

    def _service_failed(self, failure: Failure, request: DimseRequest) -> None:
        _log.failure(
            "{command} (message {message_id}) failed in its service",
            failure,
            command=request.dimse.name,
            message_id=request.message_id,
        )
        if self.current is request and self.ul.state is ul.State.STA6:
            request.respond(0xC001, ErrorComment=f"internal error: {failure.getErrorMessage()}")

    def respond(self, request: DimseRequest, status: int, data: Optional[bytes] = None, **elements: Any) -> None:
        """Send a response to ``request``; a final status ends the operation."""
        if self.current is not request or self.dimse is None:
            return  # the association ended, or this request was already answered
        answer = self.dimse.respond(request.dimse, status, **elements)
        if answer is None:
            return
        if S.category(status) != "pending":
            self.current = None
        if self.ul.state in (ul.State.STA6, ul.State.STA8):
            context_id, response = answer
            self.send_message(context_id, response, data)


@implementer(IDataSetConsumer)
class _Drain:
    """Takes the data set of a request that cannot be served, and drops it."""

    def write(self, data: bytes) -> None:
        pass

    def finish(self) -> None:
        return None

    def abandon(self, reason: str) -> None:
        pass


#: Connections of one listening AE that may be open without an association (negotiating, or hostile).
MAX_UNASSOCIATED = 128
#: Bytes of partial A-ASSOCIATE-RQs (up to 1 MiB each) all of one AE's connections without an association may
#: hold; past it, the connection that brought more is closed.
MAX_PENDING_BYTES = 8 * 1024 * 1024


class AcceptorFactory(Factory):
    """Builds an :class:`AcceptorProtocol` per connection for one listening AE."""

    protocol = AcceptorProtocol
    noisy = False  # the association log line says what matters

    def __init__(
        self,
        policy: AcceptorPolicy,
        services: Dict[str, Any],
        clock: IReactorTime,
        timeouts: Timeouts,
        max_associations: int,
        certificate_binding: Optional["tls.CertificateBinding"] = None,
        max_associations_per_host: Optional[int] = None,
    ) -> None:
        for service in set(services.values()):
            IServiceClass(service)  # adapt or fail loudly
        self.policy = policy
        self.services = services
        #: the requests each abstract syntax's service performs (anything else is answered 0211)
        self.operations = {abstract: frozenset(service.operations) for abstract, service in services.items()}
        self.clock = clock
        self.timeouts = timeouts
        self.max_associations = max_associations
        #: established associations from one peer address at most (one host cannot take every slot)
        self.max_associations_per_host = max_associations_per_host or max_associations
        #: over TLS with bind_aet_to_certificate: who may call with which certificate
        self.certificate_binding = certificate_binding
        #: open transport connections, and established associations among them
        self.connections = 0
        self.associations = 0
        #: established associations by peer address
        self.host_associations: Dict[str, int] = {}
        #: connections closed at once because too many had no association yet
        self.refused_connections = 0
        #: bytes of partial A-ASSOCIATE-RQs held by connections without an association
        self.pending_bytes = 0
        self._refusal_logged = float("-inf")

    def buildProtocol(self, addr) -> Optional[AcceptorProtocol]:
        """A protocol for a new connection; None (Twisted closes it at once) when :data:`MAX_UNASSOCIATED`
        connections are still without an association: each may hold a partial A-ASSOCIATE-RQ (up to 1 MiB)
        until ARTIM, so they are counted and capped from the first byte."""
        if self.connections - self.associations >= MAX_UNASSOCIATED:
            self.refused_connections += 1
            now = self.clock.seconds()
            if now - self._refusal_logged >= 60:
                self._refusal_logged = now
                _log.warn("{ae}: refused a connection from {peer}: {pending} connections have no association yet "
                          "(at most {limit}); {refused} refused so far", ae=self.policy.ae_title,
                          peer=printable(str(getattr(addr, "host", addr))), pending=self.connections - self.associations,
                          limit=MAX_UNASSOCIATED, refused=self.refused_connections)
            return None
        protocol = self.protocol(self)
        protocol.factory = self
        return protocol
