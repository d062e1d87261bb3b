"""Part 10 files (PS3.10 7.1): the preamble, 'DICM' and the File Meta Information written before a received
data set, by the archive when it stores one and by the web API when it serves one from memory."""

from __future__ import annotations

import struct
from typing import Optional

__all__ = ["part10_header"]


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"OW", b"UN", b"UT", b"SQ"):
        return struct.pack("<HH2sHL", 0x0002, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def part10_header(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax: str,
    implementation_class_uid: str,
    implementation_version_name: Optional[str],
    source_ae_title: Optional[str],
) -> bytes:
    """Preamble, 'DICM' and the File Meta Information (PS3.10 7.1) for a received object.

    Encoded directly (Explicit VR Little Endian, group length first): it is
    written for every object received, and this is a tenth of pydicom's cost.
    """
    body = _meta_element(0x0001, b"OB", b"\x00\x01")
    body += _meta_element(0x0002, b"UI", _padded(sop_class_uid, b"\x00"))
    body += _meta_element(0x0003, b"UI", _padded(sop_instance_uid, b"\x00"))
    body += _meta_element(0x0010, b"UI", _padded(transfer_syntax, b"\x00"))
    body += _meta_element(0x0012, b"UI", _padded(implementation_class_uid, b"\x00"))
    if implementation_version_name:
        body += _meta_element(0x0013, b"SH", _padded(implementation_version_name, b" "))
    if source_ae_title:
        body += _meta_element(0x0016, b"AE", _padded(source_ae_title, b" "))
    return bytes(128) + b"DICM" + _meta_element(0x0000, b"UL", struct.pack("<L", len(body))) + body
