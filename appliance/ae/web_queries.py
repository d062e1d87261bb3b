"""The Web Software-Server's SCU side (statement 2.2.3, 3.3): Study Root C-FIND and C-ECHO to a configured device,
for the pages.

* One association per device at a time (statement 3.3.1.2): queries and echoes to one device wait for each
  other in order; different devices are queried in parallel.
* A query takes at most ``max_results`` matches (``[web] max_results``) and then sends C-CANCEL: C-FIND has no
  paging, so a query that matches too much says so (``truncated``) instead of fetching a whole archive.
* Every failure is a :class:`DeviceFailure` in words: unreachable, the TLS handshake, the association
  rejected (PS3.8's reason), no Study Root C-FIND context accepted, a timeout, an abort, or the device's
  failure status and Error Comment.

The devices are ``[devices.*]`` and the appliance's own Disk-Server (:data:`appliance.config.LOCAL_ARCHIVE`).
The clock and the way to open an association are passed in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

from pydicom.dataset import Dataset
from twisted.internet import defer

from ..compat import decode_dataset
from ..config import ApplianceConfig, DeviceConfig
from ..dicom import status as S
from ..dicom.uids import STUDY_ROOT_FIND, UNCOMPRESSED_TRANSFER_SYNTAXES, VERIFICATION
from ..logs import logger
from ..net import requestor
from .turns import Turns

__all__ = ["WebQueries", "QueryRun", "DeviceFailure", "UnknownDevice", "Found", "Echoed"]

_log = logger("appliance.web.queries")

#: ``connect(device, contexts) -> Deferred[Association]``: an association to a device, calling as the Web
#: Software-Server (appliance.net.requestor.connect_device with the reactor, TLS contexts and AE title bound).
Connect = Callable[[DeviceConfig, List[Tuple[str, Tuple[str, ...]]]], defer.Deferred]


class UnknownDevice(KeyError):
    """No device of that name (the API answers 404)."""

    def __str__(self) -> str:
        return str(self.args[0])


class DeviceFailure(Exception):
    """The device could not answer: ``kind`` (unreachable, tls, rejected, timeout, aborted, refused, status, busy)
    and the reason in words; a failure status with its Error Comment."""

    def __init__(self, kind: str, reason: str, status: Optional[int] = None, comment: Optional[str] = None) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.status = status
        self.comment = comment


@dataclass
class Found:
    """A query's answers, as the device gave them (pydicom data sets), in the order they came."""

    matches: List[Dataset] = field(default_factory=list)
    #: more matched than were taken: the query was cancelled after ``max_results``
    truncated: bool = False
    #: stopped by the one who asked (C-CANCEL)
    stopped: bool = False
    #: matches whose identifier could not be decoded (left out)
    undecodable: int = 0
    seconds: float = 0.0


class QueryRun:
    """One C-FIND under way (:meth:`WebQueries.start`)."""

    def __init__(self, limit: int, on_match: Optional[Callable[[Dataset], None]]) -> None:
        self.limit = limit
        self.on_match = on_match
        self.found = Found()
        self.stream = None
        self.stopped = False
        #: fires with the Found, or fails with a DeviceFailure
        self.done: Optional[defer.Deferred] = None

    def answer(self) -> defer.Deferred:
        """A Deferred of the outcome whose cancellation stops the query (C-CANCEL) rather than breaking it off:
        the device's association is released once it has answered the cancel."""
        answered = defer.Deferred(lambda _: self.stop())

        def forward(result):
            if not answered.called:  # not cancelled meanwhile
                answered.callback(result)

        self.done.addBoth(forward)
        return answered

    def stop(self) -> None:
        """End the query: C-CANCEL if it is under way (the device's answer ends it), nothing asked if not yet."""
        if self.stopped or self.found.truncated:
            return
        self.stopped = True
        self.found.stopped = True
        if self.stream is not None:
            self.stream.cancel()

    async def collect(self, syntax: str):
        """The matches as they come, until the final response (returned)."""
        found = self.found
        async for response in self.stream:
            if not response.pending:
                return response
            if found.truncated or self.stopped:
                continue  # after our C-CANCEL: what was on its way
            if response.data is None:
                continue
            try:
                match = decode_dataset(response.data, syntax)
            except Exception:  # pydicom raises many kinds on garbage: one match lost, said so
                found.undecodable += 1
                continue
            found.matches.append(match)
            if self.on_match is not None:
                self.on_match(match)
            if len(found.matches) >= self.limit:
                found.truncated = True
                self.stream.cancel()
        return None


@dataclass
class Echoed:
    device: str
    status: int
    seconds: float


def _failure(error: Exception, device: DeviceConfig) -> DeviceFailure:
    """A requestor's error as the pages say it."""
    where = f"{device.ae_title} at {device.host}:{device.port}"
    if isinstance(error, requestor.AssociationRejected):
        return DeviceFailure("rejected", f"{where}: {error}")
    if isinstance(error, requestor.AssociationTimeout):
        return DeviceFailure("timeout", f"{where}: {error}")
    if isinstance(error, requestor.ConnectionFailed):
        text = str(error)
        kind = "tls" if "TLS" in text or "certificate" in text else "unreachable"
        return DeviceFailure(kind, f"{where}: {text}")
    if isinstance(error, requestor.AssociationAborted):
        return DeviceFailure("aborted", f"{where}: {error}")
    return DeviceFailure("failed", f"{where}: {error}")


def remote_ae(device: DeviceConfig) -> Tuple[str, str, int]:
    """The AE a device names: its AE title at its address.  Two device entries for one AE are one AE."""
    return device.ae_title, device.host, device.port


#: Requests waiting for one remote AE's association at most; more are answered at once (busy).
MAX_WAITING = 32


class WebQueries:
    """The pages' C-FIND and C-ECHO, one association per remote AE at a time (statement 3.3.1.2), whichever device
    entry names it."""

    def __init__(self, config: ApplianceConfig, clock, connect: Connect) -> None:
        self.config = config
        self.clock = clock
        self.connect = connect
        self.max_results = config.web.max_results
        #: each remote_ae()'s associations, one at a time
        self._turns = Turns()

    def devices(self) -> List[DeviceConfig]:
        """The appliance's own Disk-Server first (when it listens), then [devices.*] in their order."""
        return list(self.config.remote_devices.values())

    def device(self, name: str) -> DeviceConfig:
        for device in self.devices():
            if device.name == name:
                return device
        raise UnknownDevice(f"no device {name!r} (configured: {', '.join(d.name for d in self.devices()) or 'none'})")

    def waiting(self, name: str) -> int:
        """Requests to that device's AE waiting for its association (the one running not counted)."""
        return self._turns.waiting(remote_ae(self.device(name)))

    def _run(self, device: DeviceConfig, work) -> defer.Deferred:
        key = remote_ae(device)
        if self._turns.waiting(key) >= MAX_WAITING:
            return defer.fail(DeviceFailure("busy", f"{MAX_WAITING} requests to {device.ae_title} at {device.host}:"
                                                    f"{device.port} wait already: try again shortly"))
        return self._turns.run(key, work)

    # --- C-ECHO -------------------------------------------------------------------------------------------------

    def echo(self, name: str) -> defer.Deferred:
        """Fires with an :class:`Echoed` (any status: the caller says what a non-success means), or fails with a
        :class:`DeviceFailure`."""
        device = self.device(name)

        async def work():
            started = self.clock.seconds()
            association = await self._associate(device, [(VERIFICATION, UNCOMPRESSED_TRANSFER_SYNTAXES)],
                                                VERIFICATION, "the Verification SOP class")
            try:
                status = await association.echo()
            except requestor.AssociationError as error:
                raise _failure(error, device) from None
            except defer.CancelledError:
                association.abort("the echo's HTTP request was cancelled")
                raise
            except BaseException as error:  # a failure here: the association is not left to the idle timeout
                association.abort(f"the echo failed here: {type(error).__name__}")
                raise
            seconds = self.clock.seconds() - started
            await _release(association)
            return Echoed(device.name, status, seconds)

        return self._run(device, work)

    # --- C-FIND -------------------------------------------------------------------------------------------------

    def find(self, name: str, identifier: Dataset, wanted: Optional[int] = None) -> defer.Deferred:
        """Fires with a :class:`Found` of at most ``wanted`` (default and at most ``max_results``) matches, or
        fails with a :class:`DeviceFailure`; cancelling it stops the query (C-CANCEL)."""
        return self.start(name, identifier, wanted).answer()

    def start(self, name: str, identifier: Dataset, wanted: Optional[int] = None,
              on_match: Optional[Callable[[Dataset], None]] = None) -> "QueryRun":
        """A query under way: ``on_match`` gets each match as it arrives (and :class:`Found` keeps them too),
        ``run.stop()`` ends it early with C-CANCEL, ``run.done`` fires as :meth:`find`'s Deferred does."""
        device = self.device(name)
        run = QueryRun(min(wanted or self.max_results, self.max_results), on_match)

        async def work():
            if run.stopped:  # stopped while it waited for the device: nothing is asked
                return Found(stopped=True)
            started = self.clock.seconds()
            association = await self._associate(device, [(STUDY_ROOT_FIND, UNCOMPRESSED_TRANSFER_SYNTAXES)],
                                                STUDY_ROOT_FIND, "Study Root C-FIND")
            try:
                syntax = association.negotiated.context_for(STUDY_ROOT_FIND).transfer_syntax
                run.stream = association.find(identifier)
                if run.stopped:
                    run.stream.cancel()
                final = await run.collect(syntax)
            except requestor.AssociationError as error:
                raise _failure(error, device) from None
            except BaseException as error:  # the identifier would not encode, say: not left to the idle timeout
                association.abort(f"the query failed here: {type(error).__name__}")
                raise
            await _release(association)
            found = run.found
            found.seconds = self.clock.seconds() - started
            status = final.status if final is not None else None
            if status is not None and S.category(status) == "failure":
                comment = final.command.ErrorComment
                raise DeviceFailure("status", f"{device.ae_title} answered the query {S.describe(status)}"
                                    + (f": {comment}" if comment else ""), status, comment)
            if status == S.CANCEL and not (found.truncated or found.stopped):
                raise DeviceFailure("status", f"{device.ae_title} ended the query as cancelled (FE00)", status)
            return found

        run.done = self._run(device, work)
        return run

    async def _associate(self, device: DeviceConfig, contexts, abstract_syntax: str, what: str):
        try:
            association = await self.connect(device, contexts)
        except requestor.AssociationError as error:
            raise _failure(error, device) from None
        if association.negotiated.context_for(abstract_syntax) is None:
            association.abort(f"no {what} context accepted")
            raise DeviceFailure("refused", f"{device.ae_title} accepted the association but not {what}")
        return association


async def _release(association) -> None:
    try:
        await association.release()
    except requestor.AssociationError:
        pass  # the answers are in; a peer that will not release costs nothing more
