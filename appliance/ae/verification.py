"""The Verification SOP Class as SCP (PS3.4 Annex A): C-ECHO answered with Success."""

from __future__ import annotations

from typing import Mapping, Tuple

from zope.interface import implementer

from ..dicom import dimse as D
from ..dicom import status as S
from ..dicom.uids import UNCOMPRESSED_TRANSFER_SYNTAXES, VERIFICATION
from ..interfaces import IServiceClass
from ..logs import logger

__all__ = ["VerificationService"]


@implementer(IServiceClass)
class VerificationService:
    """C-ECHO SCP."""

    operations = frozenset({D.CommandField.C_ECHO_RQ})

    _log = logger("appliance.verification")

    def __init__(self, transfer_syntaxes: Tuple[str, ...] = UNCOMPRESSED_TRANSFER_SYNTAXES) -> None:
        self.abstract_syntaxes: Mapping[str, Tuple[str, ...]] = {VERIFICATION: transfer_syntaxes}

    def open_data_set(self, request):
        # never called: a C-ECHO-RQ announcing a data set is refused by the DIMSE provider (its data set drained)
        raise AssertionError("a C-ECHO-RQ carries no data set")

    def handle(self, request) -> None:
        self._log.debug("C-ECHO from {calling}", calling=request.association.record.calling)
        request.respond(S.SUCCESS)

    def cancel(self, request) -> None:
        """A C-ECHO is answered at once; there is nothing to cancel."""
