"""The Storage Service Class as SCP (PS3.4 Annex B), storing into an object sink.

One service for both AEs that store (the Disk-Server into its archive, the
Memory-Server into memory): the sink (:class:`appliance.interfaces.IObjectSink`)
keeps each data set, checks it (:mod:`appliance.dataset.checks`) and says
whether it kept it; the service checks the command's UIDs, bounds the data
set by ``max_object_size`` (the rest is drained, then refused), and answers:
Success, B000 for the statement's coercion (Pixel Data OW to OB when Bits
Allocated is 8), A700, A900, C000 or 0111 for the sink's refusals, each with
an Error Comment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Tuple

from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from ..dataset.checks import Kept, ObjectDescription, Refusal, Refused
from ..dicom import dimse as D
from ..dicom import status as S
from ..dicom.uids import is_received_uid
from ..interfaces import IDataSetConsumer, IObjectSink, IObjectWriter, IServiceClass
from ..logs import logger

__all__ = ["StorageService", "IncomingObject", "StoreResult", "DUPLICATE_REJECTED", "STATUSES"]

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


@implementer(IDataSetConsumer)
class IncomingObject:
    """One C-STORE data set on its way to the sink."""

    def __init__(self, service: "StorageService", request) -> None:
        self.service = service
        self.request = request
        command = request.command
        originator = command.MoveOriginatorApplicationEntityTitle
        self.description = ObjectDescription(command.AffectedSOPClassUID, command.AffectedSOPInstanceUID,
                                             request.context.transfer_syntax, request.association.record.calling,
                                             originator.strip() if originator else None,
                                             command.MoveOriginatorMessageID)
        self.refusal: Optional[Refused] = None
        self.writer: Optional[IObjectWriter] = None
        self._received = 0
        for keyword, uid in (("Affected SOP Instance UID", self.description.sop_instance_uid),
                             ("Affected SOP Class UID", self.description.sop_class_uid)):
            if not is_received_uid(uid or ""):
                self.refusal = Refused(Refusal.NOT_UNDERSTOOD, f"{keyword} is not a valid UID")
                return
        association = request.association
        self.writer = IObjectWriter(service.sink.open(self.description, association.pause_reading,
                                                      association.resume_reading))

    def write(self, data: bytes) -> None:
        if self.refusal is not None:
            return  # drained: the data set is read and dropped, then refused
        self._received += len(data)
        limits = self.service.sink.limits
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


@implementer(IServiceClass)
class StorageService:
    """C-STORE SCP storing into an object sink."""

    operations = frozenset({D.CommandField.C_STORE_RQ})

    def __init__(self, sink: IObjectSink, abstract_syntaxes: Mapping[str, Tuple[str, ...]]) -> None:
        self.sink = IObjectSink(sink)
        self.abstract_syntaxes = dict(abstract_syntaxes)

    def open_data_set(self, request) -> IncomingObject:
        return IncomingObject(self, request)

    def handle(self, request) -> None:
        result: StoreResult = request.data
        elements = {}
        if result.comment:
            elements["ErrorComment"] = result.comment.encode("ascii", "replace").decode("ascii")[:64]
        if S.category(result.status) == "failure":
            _log.warn("C-STORE of {sop} from {ae} answered {status}: {comment}", sop=self.sop_uid(request),
                      ae=request.association.record.calling, status=S.describe(result.status), comment=result.comment)
        request.respond(result.status, **elements)

    @staticmethod
    def sop_uid(request) -> str:
        return request.command.AffectedSOPInstanceUID or "?"

    def cancel(self, request) -> None:
        """C-CANCEL does not apply to C-STORE (PS3.7 9.3.1)."""
