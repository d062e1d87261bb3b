"""The Storage Service Class as SCP (PS3.4 Annex B), storing into an object sink.

One service for both AEs that store (the Disk-Server into its archive, the
Memory-Server into memory): each data set goes to the sink
(:class:`appliance.interfaces.IObjectSink`) through
:class:`appliance.net.incoming.IncomingObject`, which checks the command's
UIDs, bounds the data set and turns the sink's decision into the status
answered (Success, B000, A700, A900, C000, 0111, 0124, each with an Error
Comment).  Nothing here knows what the sink is.
"""

from __future__ import annotations

from typing import Mapping, Tuple

from zope.interface import implementer

from ..dicom import dimse as D
from ..interfaces import IObjectSink, IServiceClass
from ..net.incoming import (
    DUPLICATE_REJECTED,
    STATUSES,
    IncomingObject,
    StoreResult,
    describe_store,
    response_elements,
)

__all__ = ["StorageService", "IncomingObject", "StoreResult", "DUPLICATE_REJECTED", "STATUSES"]


@implementer(IServiceClass)
class StorageService:
    """C-STORE SCP storing into an object sink."""

    operations = frozenset({D.CommandField.C_STORE_RQ})

    def __init__(self, sink: IObjectSink, abstract_syntaxes: Mapping[str, Tuple[str, ...]]) -> None:
        self.sink = IObjectSink(sink)
        self.abstract_syntaxes = dict(abstract_syntaxes)

    def open_data_set(self, request) -> IncomingObject:
        association = request.association
        description = describe_store(request.command, request.context.transfer_syntax, association.record.calling)
        return IncomingObject(self.sink, description, association.pause_reading, association.resume_reading)

    def handle(self, request) -> None:
        result: StoreResult = request.data
        request.respond(result.status, **response_elements(result, self.sop_uid(request),
                                                           request.association.record.calling))

    @staticmethod
    def sop_uid(request) -> str:
        return request.command.AffectedSOPInstanceUID or "?"

    def cancel(self, request) -> None:
        """C-CANCEL does not apply to C-STORE (PS3.7 9.3.1)."""
