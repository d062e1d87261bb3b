"""DIMSE status codes (PS3.7 Annex C, PS3.4 service classes) and their meaning."""

from __future__ import annotations

__all__ = [
    "SUCCESS",
    "PENDING",
    "PENDING_WARNING",
    "CANCEL",
    "WARNING",
    "OUT_OF_RESOURCES",
    "OUT_OF_RESOURCES_SUBOPERATIONS",
    "SUBOPERATIONS_FAILED",
    "MOVE_DESTINATION_UNKNOWN",
    "DATA_SET_DOES_NOT_MATCH_SOP_CLASS",
    "IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS",
    "CANNOT_UNDERSTAND",
    "UNRECOGNIZED_OPERATION",
    "SOP_CLASS_NOT_SUPPORTED",
    "category",
    "describe",
]

SUCCESS = 0x0000
PENDING = 0xFF00
PENDING_WARNING = 0xFF01  # C-FIND: optional keys not supported
CANCEL = 0xFE00
WARNING = 0xB000  # coercion of data elements / sub-operations complete with failures
OUT_OF_RESOURCES = 0xA700
OUT_OF_RESOURCES_SUBOPERATIONS = 0xA701
SUBOPERATIONS_FAILED = 0xA702  # C-MOVE: out of resources, unable to perform sub-operations
MOVE_DESTINATION_UNKNOWN = 0xA801
DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
UNRECOGNIZED_OPERATION = 0x0211
SOP_CLASS_NOT_SUPPORTED = 0x0122

_MEANINGS = {
    SUCCESS: "Success",
    PENDING: "Pending",
    PENDING_WARNING: "Pending (optional keys not supported)",
    CANCEL: "Cancel",
    WARNING: "Warning",
    OUT_OF_RESOURCES: "Refused: out of resources",
    OUT_OF_RESOURCES_SUBOPERATIONS: "Refused: out of resources, unable to calculate number of matches",
    SUBOPERATIONS_FAILED: "Refused: out of resources, unable to perform sub-operations",
    MOVE_DESTINATION_UNKNOWN: "Refused: move destination unknown",
    0xA900: "Error: data set or identifier does not match SOP class",
    UNRECOGNIZED_OPERATION: "Failure: unrecognized operation",
    SOP_CLASS_NOT_SUPPORTED: "Failure: SOP class not supported",
    0x0110: "Failure: processing failure",
    0x0111: "Failure: duplicate SOP instance",
    0x0117: "Failure: invalid object instance",
    0x0210: "Failure: duplicate invocation",
    0x0212: "Failure: mistyped argument",
    0x0213: "Failure: resource limitation",
    0x0124: "Refused: not authorized",
}


def category(status: int) -> str:
    """'success', 'pending', 'cancel', 'warning' or 'failure' (PS3.7 C.1)."""
    if status == SUCCESS:
        return "success"
    if status in (PENDING, PENDING_WARNING):
        return "pending"
    if status == CANCEL:
        return "cancel"
    if status in (0x0001, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF:
        return "warning"
    return "failure"


def describe(status: int) -> str:
    """'0xA700 Refused: out of resources' and the like."""
    meaning = _MEANINGS.get(status)
    if meaning is None:
        if 0xC000 <= status <= 0xCFFF:
            meaning = "Failure: unable to process"
        elif 0xA700 <= status <= 0xA7FF:
            meaning = "Refused: out of resources"
        else:
            meaning = category(status).capitalize()
    return f"0x{status:04X} {meaning}"
