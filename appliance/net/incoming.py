"""Receiving one C-STORE data set into an object sink, and the status it is answered with.

What a C-STORE SCP does with each data set, wherever the C-STORE-RQ comes
from: an association a peer opened (the Storage SCP, appliance.ae.storage)
or the C-GET sub-operations on one we opened (appliance.net.requestor).
The command's UIDs are checked, the data set is bounded by the sink's
``limits`` (the rest drained, then refused) and streamed into the sink
(:class:`appliance.interfaces.IObjectSink`), whose decision becomes a
status: Success, B000 for the statement's coercion (Pixel Data OW to OB
when Bits Allocated is 8), A700, A900, C000, 0111 or 0124 for its refusals
(:class:`appliance.dataset.checks.Refusal`), each with an Error Comment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from ..dataset.checks import Kept, ObjectDescription, Refusal, Refused
from ..dicom import dimse as D
from ..dicom import status as S
from ..dicom.uids import is_received_uid
from ..interfaces import IDataSetConsumer, IObjectSink, IObjectWriter
from ..logs import logger

__all__ = ["IncomingObject", "StoreResult", "DUPLICATE_REJECTED", "STATUSES", "describe_store", "response_elements"]

_log = logger("appliance.storage")

#: PS3.7 C.4 "Duplicate SOP instance", answered when on_duplicate = "reject".
DUPLICATE_REJECTED = 0x0111

#: The status each refusal is answered with (PS3.4 B.2.3).
STATUSES = {
    Refusal.OUT_OF_RESOURCES: S.OUT_OF_RESOURCES,
    Refusal.NOT_MATCHING: 0xA900,
    Refusal.NOT_UNDERSTOOD: S.CANNOT_UNDERSTAND,
    Refusal.DUPLICATE: DUPLICATE_REJECTED,
    Refusal.NOT_WANTED: 0x0124,  # PS3.7 C.5: refused, not authorized
    Refusal.FAILED: 0xC001,
}


@dataclass(frozen=True)
class StoreResult:
    status: int
    comment: Optional[str] = None


def describe_store(command: D.Command, transfer_syntax: str, source_ae: str) -> ObjectDescription:
    """What a C-STORE-RQ's command says of its data set, arriving on a context of ``transfer_syntax`` from the
    AE titled ``source_ae``."""
    originator = command.MoveOriginatorApplicationEntityTitle
    return ObjectDescription(command.AffectedSOPClassUID, command.AffectedSOPInstanceUID, transfer_syntax,
                             source_ae, originator.strip() if originator else None, command.MoveOriginatorMessageID)


@implementer(IDataSetConsumer)
class IncomingObject:
    """One C-STORE data set on its way to ``sink``; :meth:`finish` fires with its :class:`StoreResult`.

    ``pause()`` and ``resume()`` stop and restart reading from the peer, for the sink's flow control.
    """

    def __init__(self, sink: IObjectSink, description: ObjectDescription, pause: Callable[[], None],
                 resume: Callable[[], None]) -> None:
        self.sink = sink
        self.description = description
        self.refusal: Optional[Refused] = None
        self.writer: Optional[IObjectWriter] = None
        self._received = 0
        for keyword, uid in (("Affected SOP Instance UID", self.description.sop_instance_uid),
                             ("Affected SOP Class UID", self.description.sop_class_uid)):
            if not is_received_uid(uid or ""):
                self.refusal = Refused(Refusal.NOT_UNDERSTOOD, f"{keyword} is not a valid UID")
                return
        self.writer = IObjectWriter(sink.open(description, pause, resume))

    def write(self, data: bytes) -> None:
        if self.refusal is not None:
            return  # drained: the data set is read and dropped, then refused
        self._received += len(data)
        limits = self.sink.limits
        if self._received > limits.max_size:
            self.refusal = Refused(Refusal.OUT_OF_RESOURCES,
                                   f"data set larger than {limits.name}={limits.max_size}")
            self.writer.abandon("larger than max_object_size")
            return
        self.writer.write(data)

    def finish(self) -> defer.Deferred:
        if self.refusal is not None:
            return defer.succeed(_refused(self.refusal))
        return self.writer.finish().addCallbacks(_kept, self._not_kept)

    def _not_kept(self, failure: Failure) -> StoreResult:
        if failure.check(Refused):
            return _refused(failure.value)
        _log.failure("keeping SOP instance {sop} failed", failure, sop=self.description.sop_instance_uid)
        return StoreResult(STATUSES[Refusal.FAILED], f"internal error: {failure.getErrorMessage()}")

    def abandon(self, reason: str) -> None:
        if self.writer is not None:
            self.writer.abandon(reason)


def _kept(kept: Kept) -> StoreResult:
    if kept.coerced:
        return StoreResult(S.WARNING, "Pixel Data coerced from OW to OB (Bits Allocated 8)")
    return StoreResult(S.SUCCESS)


def _refused(refused: Refused) -> StoreResult:
    return StoreResult(STATUSES[refused.kind], refused.comment)


def response_elements(result: StoreResult, sop_instance_uid: Optional[str], source_ae: str) -> Dict[str, str]:
    """The C-STORE-RSP's elements beside its Status for ``result``: the Error Comment, if any (LO: 64 characters
    of ISO 646).  A failure is logged (SOP instance, source AE, status, why)."""
    elements = {}
    if result.comment:
        elements["ErrorComment"] = result.comment.encode("ascii", "replace").decode("ascii")[:64]
    if S.category(result.status) == "failure":
        _log.warn("C-STORE of {sop} from {ae} answered {status}: {comment}",
                  sop=sop_instance_uid or "?", ae=source_ae,
                  status=S.describe(result.status), comment=result.comment)
    return elements
