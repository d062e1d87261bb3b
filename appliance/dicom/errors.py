"""Exceptions of the protocol core.

Remote protocol errors (the peer sent something wrong) and local ones (our
caller asked for something the protocol does not allow) are distinct types, as
in h11, so that adapters answer the first with an A-ABORT and surface the second
as a programming error.
"""

from __future__ import annotations


class DicomError(Exception):
    """Base of every error raised by :mod:`appliance.dicom`."""


class RemoteProtocolError(DicomError):
    """The peer broke PS3.8 or PS3.7; ``abort_reason`` is the A-ABORT reason to send."""

    def __init__(self, message: str, abort_reason: int = 0) -> None:
        super().__init__(message)
        self.abort_reason = abort_reason


class PDUDecodeError(RemoteProtocolError):
    """A PDU or item could not be decoded."""


class DimseDecodeError(RemoteProtocolError):
    """A DIMSE command set or message fragment sequence is malformed."""


class LocalProtocolError(DicomError):
    """The local user asked for something the current state does not allow."""
