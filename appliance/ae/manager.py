"""The Memory-Manager (statement 2.1.4, 3.4): loads images from configured devices into the Memory-Server.

A load names a device and a study (optionally a series, or one instance of
it).  It waits in a queue until one of ``max_parallel_loads`` slots is free
(statement 3.4.1.2: one association per load, processed in parallel), then
opens an association to the device and asks it for a Study Root C-MOVE with
the Memory-Server as destination; the device's C-STORE sub-operations arrive
at the Memory-Server, which tells this manager about them (ILoadTracker), and
its pending C-MOVE responses carry the counts.  A device configured with
``retrieve = "get"`` is asked for a C-GET instead, the objects coming back on
the same association.

Every way a load can end is in its state, in words a PACS administrator can
act on: unknown or unreachable device, association rejected (PS3.8's
reason), the device's statuses (A801: it does not know the Memory-Server,
and what to configure there), partial failures with counts and the failed
instances, timeouts, memory full.  While a load runs its study is pinned in
the memory store, so that the objects already received are not dropped for
those still arriving.

The clock, the store and the way to open an association are passed in.
"""

from __future__ import annotations

import enum
import itertools
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from typing import Callable, Deque, Dict, List, Optional, Tuple

from pydicom.dataset import Dataset
from twisted.internet import defer
from zope.interface import implementer

from ..compat import decode_dataset
from ..config import ApplianceConfig, DeviceConfig
from ..dataset.checks import ObjectDescription, Refusal, Refused
from ..dicom import status as S
from ..dicom.negotiation import get_proposal
from ..dicom.uids import STUDY_ROOT_GET, STUDY_ROOT_MOVE, UNCOMPRESSED_TRANSFER_SYNTAXES
from ..interfaces import ILoadTracker, IObjectSink
from ..logs import logger
from ..memory.store import MemoryStore
from ..net.requestor import (
    Association,
    AssociationAborted,
    AssociationError,
    AssociationRejected,
    AssociationTimeout,
    ConnectionFailed,
    Response,
)

__all__ = ["MemoryManager", "Load", "LoadState", "UnknownDevice", "UnknownLoad"]

_log = logger("appliance.manager")

#: ``connect(device, contexts) -> Deferred[Association]``: an association to a configured device, calling as the
#: Memory-Manager (appliance.net.requestor.connect_device with the reactor, TLS contexts and AE title bound).
Connect = Callable[[DeviceConfig, List[Tuple[str, Tuple[str, ...]]]], defer.Deferred]

#: Failed SOP instances named in a load's error, at most (the list itself keeps them all).
_NAMED_FAILURES = 5

#: Those waiting for a load's next change hear of new counts at most this often, in seconds (a change of state,
#: such as its end, at once).  A progress bar needs no more, and each answer costs a request: a study of small
#: images would otherwise wake every waiter once per image.
PROGRESS_INTERVAL = 0.25


class UnknownDevice(Exception):
    """No [devices.NAME] of that name (the API answers 404)."""


class UnknownLoad(Exception):
    """No load with that id (the API answers 404)."""


class QueueFull(Exception):
    """MAX_QUEUED loads wait already (the API answers 503)."""


#: Loads waiting at most; more are refused until some have started (each waiting load is a few hundred bytes
#: and a line in every listing of the loads: 20,000 queued made a 5.8 MB answer).
MAX_QUEUED = 1000


class LoadState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


_ENDED = (LoadState.DONE, LoadState.FAILED, LoadState.CANCELLED)


@dataclass
class Load:
    """One request to bring a study, series or instance of a device into memory."""

    id: int
    device: str
    study: str
    series: Optional[str] = None
    instance: Optional[str] = None
    state: LoadState = LoadState.QUEUED
    #: sub-operation counts, as the device's latest C-MOVE (or C-GET) response gave them
    remaining: Optional[int] = None
    completed: int = 0
    failed: int = 0
    warning: int = 0
    #: objects the Memory-Server kept for this load as they arrived
    received: int = 0
    error: Optional[str] = None
    #: Failed SOP Instance UID List (0008,0058) of the final response
    failed_instances: List[str] = field(default_factory=list)
    #: refusals of this load's objects by the Memory-Server, the last few (why a sub-operation failed)
    refusals: List[str] = field(default_factory=list)
    created: float = 0.0
    started: Optional[float] = None
    ended: Optional[float] = None
    message_id: Optional[int] = None
    #: the device's AE title, to recognise its sub-associations when it names no move originator
    device_ae_title: str = ""
    #: why the Memory-Server refused this load's objects for want of memory, if it did
    memory_full: Optional[str] = None
    #: the transfer syntax of the retrieve context (of the final response's identifier)
    transfer_syntax: Optional[str] = None
    cancel_requested: bool = False
    timed_out: bool = False
    association: Optional[Association] = None
    stream: object = None
    timer: object = None
    #: Deferreds of those waiting for its next change of state (MemoryManager.changed)
    watchers: List[defer.Deferred] = field(default_factory=list)
    #: when the watchers were last told, and the call that will tell them of counts that changed since
    notified: Optional[float] = None
    progress_call: object = None

    @property
    def level(self) -> str:
        return "IMAGE" if self.instance else "SERIES" if self.series else "STUDY"

    def as_json(self) -> dict:
        return {
            "id": self.id, "device": self.device, "study": self.study, "series": self.series,
            "instance": self.instance, "state": self.state.value, "remaining": self.remaining,
            "completed": self.completed, "failed": self.failed, "warning": self.warning, "received": self.received,
            "error": self.error, "failed_instances": list(self.failed_instances), "created": self.created,
            "started": self.started, "ended": self.ended,
        }


@implementer(ILoadTracker)
class MemoryManager:
    """The loads: queued, running (at most ``max_parallel_loads``), and the last ``keep_finished`` that ended."""

    def __init__(self, config: ApplianceConfig, store: MemoryStore, clock, connect: Connect, sink=None) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.connect = connect
        #: where a C-GET's objects go: the Memory-Server's sink (IObjectSink), set by the composition root
        self.sink = sink
        self.ae_title = config.manager.ae_title
        self.max_parallel = config.manager.max_parallel_loads
        self.loads: "OrderedDict[int, Load]" = OrderedDict()
        self.queue: Deque[Load] = deque()
        self.running: Dict[int, Load] = {}
        self._ids = itertools.count(1)
        #: True while _next's loop runs (a load ending inside it does not start another loop)
        self._starting = False

    # --- the API's operations ----------------------------------------------------------------------------

    def submit(self, device: str, study: str, series: Optional[str] = None, instance: Optional[str] = None) -> Load:
        """A new load (UIDs already checked by the caller); UnknownDevice if ``device`` is not configured."""
        configured = self.config.remote_devices.get(device)
        if configured is None:
            raise UnknownDevice(f"no device {device!r} (configured: "
                                f"{', '.join(self.config.remote_devices) or 'none'})")
        if instance is not None and series is None:
            raise ValueError("an instance is loaded with its series")
        if len(self.queue) >= MAX_QUEUED:
            raise QueueFull(f"{len(self.queue)} loads are waiting already (at most {MAX_QUEUED}): try again once "
                            f"some have started")
        load = Load(next(self._ids), device, study, series, instance, created=self.clock.seconds(),
                    device_ae_title=configured.ae_title)
        self.loads[load.id] = load
        self._forget_old()
        if self._in_memory(load):
            self.store.touch(study)
            load.remaining = 0
            self._end(load, LoadState.DONE, None)
            _log.info("load {id}: {scope} {uid} from {device} is in memory already", id=load.id, scope=load.level.lower(),
                      uid=load.instance or load.series or load.study, device=device)
            return load
        self.queue.append(load)
        _log.info("load {id}: {scope} {uid} from {device} queued", id=load.id, scope=load.level.lower(),
                  uid=load.instance or load.series or load.study, device=device)
        self._next()
        return load

    def get(self, load_id: int) -> Load:
        load = self.loads.get(load_id)
        if load is None:
            raise UnknownLoad(f"no load {load_id}")
        return load

    def changed(self, load_id: int) -> defer.Deferred:
        """Fires with the load at its next change: of state at once (at once if it ended already), of counts at
        most every PROGRESS_INTERVAL."""
        load = self.get(load_id)
        if load.state in _ENDED:
            return defer.succeed(load)
        waiting = defer.Deferred(lambda d: load.watchers.remove(d) if d in load.watchers else None)
        load.watchers.append(waiting)
        return waiting

    def _set_state(self, load: Load, state: LoadState) -> None:
        load.state = state
        self._changed(load)

    def _changed(self, load: Load) -> None:
        """Tell the watchers now (a change of state, or counts due)."""
        if load.progress_call is not None:
            if load.progress_call.active():
                load.progress_call.cancel()
            load.progress_call = None
        load.notified = self.clock.seconds()
        watchers, load.watchers = load.watchers, []
        for waiting in watchers:
            waiting.callback(load)

    def _progressed(self, load: Load) -> None:
        """The counts changed: the watchers hear of it now, or PROGRESS_INTERVAL after they last heard."""
        if not load.watchers or load.progress_call is not None:
            return
        since = None if load.notified is None else self.clock.seconds() - load.notified
        if since is None or since >= PROGRESS_INTERVAL:
            self._changed(load)
        else:
            load.progress_call = self.clock.callLater(PROGRESS_INTERVAL - since, self._changed, load)

    def cancel(self, load_id: int) -> Load:
        """Drop a queued load, or send C-CANCEL for a running one (its state follows the device's answer)."""
        load = self.get(load_id)
        if load.state is LoadState.QUEUED:
            self.queue.remove(load)
            self._end(load, LoadState.CANCELLED, "cancelled before it started")
        elif load.state is LoadState.RUNNING and not load.cancel_requested:
            load.cancel_requested = True
            if load.stream is not None:
                load.stream.cancel()
        return load

    # --- the Memory-Server's objects (ILoadTracker) ---------------------------------------------------------------

    def _load_for(self, description: ObjectDescription) -> Optional[Load]:
        if description.move_originator == self.ae_title and description.move_message_id is not None:
            for load in self.running.values():
                if load.message_id == description.move_message_id:
                    return load
        for load in self.running.values():  # a device that does not name the originator: its AE title tells
            if load.device_ae_title == description.source_ae:
                return load
        return None

    def expects(self, description: ObjectDescription) -> bool:
        return self._load_for(description) is not None

    def kept(self, description: ObjectDescription) -> None:
        load = self._load_for(description)
        if load is not None:
            load.received += 1

    def refused(self, description: ObjectDescription, refused: Refused) -> None:
        load = self._load_for(description)
        if load is not None:
            load.refusals = (load.refusals + [f"{description.sop_instance_uid}: {refused.comment}"])[-_NAMED_FAILURES:]
            if refused.kind is Refusal.OUT_OF_RESOURCES:
                load.memory_full = refused.comment

    # --- running ------------------------------------------------------------------------------------------

    def _in_memory(self, load: Load) -> bool:
        if load.instance is not None:
            return self.store.find(load.study, load.series, load.instance) is not None
        return self.store.is_complete(load.study, load.series)

    def _next(self) -> None:
        """Start queued loads while slots are free.  A load that ends as it starts (refused at once) calls this
        again from within; that call leaves the starting to this loop, so a long queue of such loads is a long
        loop and never as deep a chain of calls (which would break off at Python's recursion limit)."""
        if self._starting:
            return
        self._starting = True
        try:
            while self.queue and len(self.running) < self.max_parallel:
                load = self.queue.popleft()
                self.running[load.id] = load
                defer.ensureDeferred(self._run(load)).addErrback(self._crashed, load)
        finally:
            self._starting = False

    def _crashed(self, failure, load: Load) -> None:
        _log.failure("load {id} failed unexpectedly", failure, id=load.id)
        self._finish(load, LoadState.FAILED, f"internal error: {failure.getErrorMessage()}")

    async def _run(self, load: Load) -> None:
        self._set_state(load, LoadState.RUNNING)
        device = self.config.remote_devices[load.device]
        load.started = self.clock.seconds()
        self.store.pin(load.study)
        timeout = self.config.manager.load_timeout
        if timeout is not None:
            load.timer = self.clock.callLater(timeout, self._timed_out, load)
        try:
            state, error = await self._retrieve(load, device)
        except AssociationError as error_:
            state, error = LoadState.FAILED, self._association_failure(load, device, error_)
        self._finish(load, state, error)

    async def _retrieve(self, load: Load, device: DeviceConfig) -> Tuple[LoadState, Optional[str]]:
        if device.retrieve == "get":
            if self.sink is None:
                return LoadState.FAILED, "C-GET loads need the Memory-Server's store, and none is configured"
            sop_class = STUDY_ROOT_GET
            contexts, roles = get_proposal()
            association = await self.connect(device, list(contexts), roles=roles)
        else:
            destination = self.config.memory_server
            if not destination.port and not destination.tls_port:
                return LoadState.FAILED, ("the Memory-Server is not listening ([memory_server] port = 0): a C-MOVE "
                                          "has nowhere to send the images (or set retrieve = \"get\" for the device)")
            sop_class = STUDY_ROOT_MOVE
            association = await self.connect(device, [(STUDY_ROOT_MOVE, UNCOMPRESSED_TRANSFER_SYNTAXES)])
        load.association = association
        if load.cancel_requested or load.timed_out:
            await self._release(association)
            return (LoadState.CANCELLED, "cancelled before it was sent") if load.cancel_requested else \
                (LoadState.FAILED, self._timeout_text(load))
        load.transfer_syntax = association.negotiated.context_for(sop_class).transfer_syntax
        if sop_class == STUDY_ROOT_GET:
            stream = association.get(self._identifier(load), _LoadSink(self.sink, self.ae_title, load))
        else:
            stream = association.move(self._identifier(load), self.config.memory_server.ae_title)
        load.stream = stream
        load.message_id = stream.message_id
        final: Optional[Response] = None
        async for response in stream:
            self._count(load, response)
            if response.pending:
                self._progressed(load)
            final = response
        await self._release(association)
        return self._outcome(load, device, final)

    @staticmethod
    async def _release(association: Association) -> None:
        try:
            await association.release()
        except AssociationError:
            pass  # the load's outcome is known; a peer that will not release costs nothing more

    @staticmethod
    def _identifier(load: Load) -> Dataset:
        identifier = Dataset()
        identifier.QueryRetrieveLevel = load.level
        identifier.StudyInstanceUID = load.study
        if load.series:
            identifier.SeriesInstanceUID = load.series
        if load.instance:
            identifier.SOPInstanceUID = load.instance
        return identifier

    @staticmethod
    def _count(load: Load, response: Response) -> None:
        command = response.command
        if command.NumberOfRemainingSuboperations is not None:
            load.remaining = command.NumberOfRemainingSuboperations
        elif not response.pending:
            load.remaining = 0
        for attribute, keyword in (("completed", "NumberOfCompletedSuboperations"),
                                   ("failed", "NumberOfFailedSuboperations"),
                                   ("warning", "NumberOfWarningSuboperations")):
            value = getattr(command, keyword)
            if value is not None:
                setattr(load, attribute, value)
        if not response.pending and response.data:
            load.failed_instances = _failed_instances(response.data, load.transfer_syntax)

    def _outcome(self, load: Load, device: DeviceConfig, final: Response) -> Tuple[LoadState, Optional[str]]:
        status = final.status
        comment = final.command.ErrorComment
        said = f"{device.name} answered {S.describe(status)}" + (f" ({comment.strip()})" if comment else "")
        if status == S.CANCEL:
            return LoadState.CANCELLED, f"cancelled: {load.completed} objects had arrived"
        if status == S.MOVE_DESTINATION_UNKNOWN:
            return LoadState.FAILED, self._destination_unknown(device, said)
        category = S.category(status)
        if category == "success" and load.failed == 0:
            if load.completed == 0 and load.received == 0:
                return LoadState.FAILED, f"{device.name} found nothing to send for {load.level.lower()} " \
                                         f"{load.instance or load.series or load.study}"
            if load.instance is None:
                self.store.mark_complete(load.study, load.series)
            return LoadState.DONE, None
        if category in ("success", "warning") or status == S.SUBOPERATIONS_FAILED:
            total = load.completed + load.failed + load.warning
            return LoadState.FAILED, self._partial(load, said, total)
        return LoadState.FAILED, said

    def _partial(self, load: Load, said: str, total: int) -> str:
        text = f"{said}: {load.failed} of {total} objects failed"
        if load.memory_full:
            text += f"; the Memory-Server refused them: {load.memory_full}"
        elif load.refusals:
            text += f"; the Memory-Server refused: {'; '.join(load.refusals)}"
        if load.failed_instances:
            named = ", ".join(load.failed_instances[:_NAMED_FAILURES])
            more = len(load.failed_instances) - _NAMED_FAILURES
            text += f"; failed instances: {named}" + (f" and {more} more" if more > 0 else "")
        return text

    def _destination_unknown(self, device: DeviceConfig, said: str) -> str:
        server = self.config.memory_server
        host = server.interface if server.interface not in ("0.0.0.0", "::") else "this machine's address"
        ports = f"port {server.port}" if server.port else f"TLS port {server.tls_port}"
        return (f"{said}: {device.name} does not know the Memory-Server as a C-MOVE destination. Configure on "
                f"{device.name} ({device.ae_title} at {device.host}:{device.port}) a remote AE with AE title "
                f"{server.ae_title}, host {host}, {ports}; or set retrieve = \"get\" for this device")

    def _association_failure(self, load: Load, device: DeviceConfig, error: AssociationError) -> str:
        where = f"{device.name} ({device.ae_title} at {device.host}:{device.port})"
        if load.timed_out:
            return self._timeout_text(load)
        if isinstance(error, AssociationRejected):
            return f"{where} rejected the association: {error}".replace(": association rejected:", ":")
        if isinstance(error, ConnectionFailed):
            return f"cannot reach {where}: {error}"
        if isinstance(error, AssociationTimeout):
            return f"timeout: {error}"
        if isinstance(error, AssociationAborted):
            return f"the association with {where} ended after {load.completed} objects: {error}"
        return f"{where}: {error}"

    def _timed_out(self, load: Load) -> None:
        load.timer = None
        if load.state is not LoadState.RUNNING:
            return
        load.timed_out = True
        if load.association is not None:
            load.association.abort(f"load_timeout ({self.config.manager.load_timeout:g} s) reached")

    def _timeout_text(self, load: Load) -> str:
        return (f"load_timeout ({self.config.manager.load_timeout:g} s) reached after {load.completed} objects; "
                f"the association was aborted")

    def _finish(self, load: Load, state: LoadState, error: Optional[str]) -> None:
        if load.state in _ENDED:
            return
        self.running.pop(load.id, None)
        self.store.unpin(load.study)
        if load.timer is not None and load.timer.active():
            load.timer.cancel()
        load.timer = None
        load.association = load.stream = None
        self._end(load, state, error)
        self._next()

    def _end(self, load: Load, state: LoadState, error: Optional[str]) -> None:
        load.error = error
        load.ended = self.clock.seconds()
        if state is LoadState.DONE:
            _log.info("load {id} done: {completed} objects from {device}", id=load.id, completed=load.completed,
                      device=load.device)
        else:
            _log.warn("load {id} {state}: {error}", id=load.id, state=state.value, error=error)
        self._set_state(load, state)

    def _forget_old(self) -> None:
        ended = [load for load in self.loads.values() if load.state in _ENDED]
        for load in ended[:max(0, len(ended) - self.config.manager.keep_finished)]:
            del self.loads[load.id]


@implementer(IObjectSink)
class _LoadSink:
    """The Memory-Server's sink as one C-GET load's: its objects are described as this load's (as a C-MOVE's
    sub-operations name their move), so that the load counts them and hears of their refusals."""

    def __init__(self, sink, ae_title: str, load: Load) -> None:
        self.sink = IObjectSink(sink)
        self.limits = self.sink.limits
        self.ae_title = ae_title
        self.load = load

    def open(self, description: ObjectDescription, pause, resume):
        tagged = replace(description, move_originator=self.ae_title, move_message_id=self.load.message_id)
        return self.sink.open(tagged, pause, resume)


def _failed_instances(data: bytes, transfer_syntax: Optional[str]) -> List[str]:
    """The Failed SOP Instance UID List (0008,0058) of a final response's identifier."""
    try:
        value = decode_dataset(data, transfer_syntax).get("FailedSOPInstanceUIDList")
    except Exception:  # a device's malformed identifier: the counts still tell
        return []
    if value is None:
        return []
    values = [value] if isinstance(value, str) else list(value)
    return [str(uid) for uid in values if str(uid)]
