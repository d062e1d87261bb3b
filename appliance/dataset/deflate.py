"""Deflated Explicit VR Little Endian data sets (PS3.5 A.5), read as a stream in bounded memory.

pydicom inflates a deflated data set whole, in memory: 400 KB on the wire
can become gigabytes (a deflate bomb).  Here the deflate stream is inflated
one bounded piece at a time: the first :data:`PREFIX` inflated bytes are
kept for the attribute scan, the rest is only counted (or, when the
attributes before the pixel data do not fit in the prefix, spilled to a
temporary file that pydicom reads up to the pixel data).  The inflated size
is capped (:class:`InflateLimits`), absolutely and relative to the
compressed size; past either, :class:`TooLarge` is raised as soon as the cap
is crossed, having held at most one piece.

The archive stores deflated objects as received; this module only reads them.
Blocking: called from worker threads and tools.
"""

from __future__ import annotations

import io
import tempfile
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Optional, Tuple

from pydicom.filereader import read_dataset

from .fastscan import scan
from .metadata import ObjectMetadata, extract

__all__ = ["DEFLATED", "InflateLimits", "TooLarge", "NotInflatable", "inflate", "read_deflated"]

DEFLATED = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"

#: Compressed bytes read, and inflated bytes produced, per step.
PIECE = 256 * 1024
#: Inflated bytes kept in memory for the attribute scan.
PREFIX = 4 * 1024 * 1024


class TooLarge(Exception):
    """The data set inflates past a limit (the caller answers A700)."""


class NotInflatable(Exception):
    """Not a whole deflate stream (the caller answers C000)."""


@dataclass(frozen=True)
class InflateLimits:
    """How far a deflated data set may inflate.

    ``max_size``: inflated bytes at most.  ``max_ratio``: inflated bytes per
    compressed byte at most, once more than ``ratio_floor`` bytes are
    inflated (small, very regular data sets legitimately compress far).
    """

    max_size: int = 4 << 30
    max_ratio: float = 200.0
    ratio_floor: int = 16 << 20
    #: the configuration key that sets ``max_size``, for error comments
    name: str = "max_object_size"

    def check(self, inflated: int, compressed: int) -> None:
        # short enough for an Error Comment (64 characters), the key named first
        if inflated > self.max_size:
            raise TooLarge(f"deflated data set inflates past {self.name}={self.max_size}")
        if inflated > self.ratio_floor and inflated > self.max_ratio * max(compressed, 1):
            raise TooLarge(f"deflated data set inflates over max_inflation_ratio={self.max_ratio:g} times")


def inflate(source: BinaryIO, limits: InflateLimits, keep: int = PREFIX,
            sink: Optional[BinaryIO] = None) -> Tuple[bytes, int, int]:
    """Inflate the raw deflate stream read from ``source`` to its end.

    Returns (the first ``keep`` inflated bytes, the inflated size, the
    compressed bytes read).  Every inflated byte also goes to ``sink`` if
    given.  At most one :data:`PIECE` of input and of output is held at a
    time.  Raises :class:`TooLarge` past a limit, :class:`NotInflatable`
    for data that is not a whole deflate stream.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    kept = bytearray()
    inflated = compressed = 0
    try:
        while not inflater.eof:
            data = source.read(PIECE)
            if not data:
                raise NotInflatable("the deflated data set ends before its deflate stream does")
            compressed += len(data)
            while True:
                out = inflater.decompress(data, PIECE)
                data = inflater.unconsumed_tail
                inflated += len(out)
                limits.check(inflated, compressed)
                if len(kept) < keep:
                    kept += out[: keep - len(kept)]
                if sink is not None and out:
                    sink.write(out)
                if inflater.eof or (not data and len(out) < PIECE):
                    break  # this input is used up (an output piece of PIECE may leave more pending)
    except zlib.error as error:
        raise NotInflatable(f"not a deflate stream: {error}") from None
    return bytes(kept), inflated, compressed


def _at_pixel_data(tag, vr, length) -> bool:
    return tag == 0x7FE00010


def read_deflated(handle: BinaryIO, offset: int, limits: InflateLimits,
                  spill_dir: Optional[str] = None) -> Tuple[ObjectMetadata, int]:
    """The index attributes of the deflated data set starting at ``offset`` in ``handle``, and its inflated size.

    One pass inflates it all (checking the limits and that the stream is
    whole) keeping the first :data:`PREFIX` bytes; the attributes come from
    those by :func:`.fastscan.scan` or pydicom.  In the rare data set whose
    attributes before the pixel data do not fit in the prefix, a second pass
    inflates into a temporary file in ``spill_dir`` that pydicom reads up to
    the pixel data.  Raises :class:`TooLarge`, :class:`NotInflatable`, or
    ValueError (from :func:`.metadata.extract`) when UIDs are missing.
    """
    handle.seek(offset)
    prefix, size, _ = inflate(handle, limits)
    if size <= len(prefix):  # the whole data set is in memory
        fast = scan(prefix, 0, EXPLICIT_VR_LITTLE_ENDIAN)
        if fast is not None:
            return fast[0], size
        return extract(read_dataset(io.BytesIO(prefix), False, True, stop_when=_at_pixel_data)), size
    fast = scan(prefix, 0, EXPLICIT_VR_LITTLE_ENDIAN)
    if fast is not None and fast[2][:4] == b"\xe0\x7f\x10\x00":
        return fast[0], size  # the scan reached the pixel data inside the prefix
    with tempfile.TemporaryFile(dir=spill_dir) as spill:
        handle.seek(offset)
        inflate(handle, limits, keep=0, sink=spill)
        spill.seek(0)
        return extract(read_dataset(spill, False, True, stop_when=_at_pixel_data)), size


