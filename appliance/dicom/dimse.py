"""DIMSE messages (PS3.7 section 9 and Annex E), without I/O.

* :class:`Command` is a command set: group 0000 elements, always encoded in
  Implicit VR Little Endian with its Command Group Length first.  Element
  VRs come from pydicom's data dictionary.
* :func:`fragment` cuts an encoded command or data set into P-DATA-TF PDUs
  that fit the peer's maximum PDU length.
* :class:`MessageAssembler` takes the PDVs of received P-DATA-TF PDUs and
  yields :class:`CommandReceived` once a command set is whole, then the data
  set as :class:`DataReceived` fragments *as they arrive*, so a consumer can
  stream a data set of any size without it being held in memory.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from . import pdu as P
from .errors import DimseDecodeError

__all__ = [
    "CommandField",
    "Priority",
    "NO_DATA_SET",
    "Command",
    "fragment",
    "fragment_sizes",
    "CommandReceived",
    "DataReceived",
    "MessageAssembler",
    "REQUIRED_ELEMENTS",
    "request_problem",
]

#: Command Data Set Type value meaning "no data set follows" (PS3.7 E.1).
NO_DATA_SET = 0x0101
#: A command set is a few hundred bytes; a larger one is hostile.
MAX_COMMAND_LENGTH = 64 * 1024


class CommandField(enum.IntEnum):
    """PS3.7 E.1 Command Field values."""

    C_STORE_RQ = 0x0001
    C_STORE_RSP = 0x8001
    C_GET_RQ = 0x0010
    C_GET_RSP = 0x8010
    C_FIND_RQ = 0x0020
    C_FIND_RSP = 0x8020
    C_MOVE_RQ = 0x0021
    C_MOVE_RSP = 0x8021
    C_ECHO_RQ = 0x0030
    C_ECHO_RSP = 0x8030
    N_EVENT_REPORT_RQ = 0x0100
    N_EVENT_REPORT_RSP = 0x8100
    N_GET_RQ = 0x0110
    N_GET_RSP = 0x8110
    N_SET_RQ = 0x0120
    N_SET_RSP = 0x8120
    N_ACTION_RQ = 0x0130
    N_ACTION_RSP = 0x8130
    N_CREATE_RQ = 0x0140
    N_CREATE_RSP = 0x8140
    N_DELETE_RQ = 0x0150
    N_DELETE_RSP = 0x8150
    C_CANCEL_RQ = 0x0FFF

    @property
    def label(self) -> str:
        return self.name.replace("_", "-", 1).replace("_RQ", "-RQ").replace("_RSP", "-RSP")


class Priority(enum.IntEnum):
    MEDIUM = 0x0000
    HIGH = 0x0001
    LOW = 0x0002


#: Elements PS3.7 section 9.3 makes mandatory in each request (M in its tables).
REQUIRED_ELEMENTS: Dict[int, Tuple[str, ...]] = {
    0x0001: ("AffectedSOPClassUID", "MessageID", "Priority", "CommandDataSetType", "AffectedSOPInstanceUID"),
    0x0020: ("AffectedSOPClassUID", "MessageID", "Priority", "CommandDataSetType"),
    0x0021: ("AffectedSOPClassUID", "MessageID", "Priority", "CommandDataSetType", "MoveDestination"),
    0x0010: ("AffectedSOPClassUID", "MessageID", "Priority", "CommandDataSetType"),
    0x0030: ("AffectedSOPClassUID", "MessageID", "CommandDataSetType"),
    0x0FFF: ("MessageIDBeingRespondedTo", "CommandDataSetType"),
}
#: Requests that must carry a data set (an identifier, or the object to store).
REQUIRES_DATA_SET = frozenset({0x0001, 0x0020, 0x0021, 0x0010})


def request_problem(command: "Command") -> Optional[str]:
    """Why ``command`` is not a well-formed request of its kind (PS3.7 9.3), or None."""
    field_value = command.CommandField
    required = REQUIRED_ELEMENTS.get(field_value)
    if required is None:
        return None
    missing = [keyword for keyword in required if keyword not in command]
    if missing:
        return "missing " + ", ".join(missing)
    if field_value in REQUIRES_DATA_SET and not command.has_data_set:
        return "no data set announced"
    if field_value == 0x0030 and command.has_data_set:
        return "C-ECHO-RQ must not carry a data set"
    return None


_UL = struct.Struct("<L")
_US = struct.Struct("<H")
_ELEMENT_HEADER = struct.Struct("<HHL")

_TEXT_VRS = {"UI": b"\x00", "AE": b" ", "LO": b" ", "SH": b" ", "CS": b" ", "ST": b" "}
_VR_CACHE: Dict[int, str] = {}


def _vr(tag: int) -> str:
    vr = _VR_CACHE.get(tag)
    if vr is None:
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            vr = "UN"
        _VR_CACHE[tag] = vr
    return vr


def _encode_value(tag: int, value) -> bytes:
    vr = _vr(tag)
    if vr == "US":
        return _US.pack(value)
    if vr == "UL":
        return _UL.pack(value)
    if vr == "AT":
        tags = value if isinstance(value, (list, tuple)) else [value]
        return b"".join(struct.pack("<HH", t >> 16, t & 0xFFFF) for t in tags)
    if vr in _TEXT_VRS:
        raw = value.encode("ascii") if isinstance(value, str) else bytes(value)
        return raw + _TEXT_VRS[vr] if len(raw) % 2 else raw
    if isinstance(value, (bytes, bytearray)):
        return bytes(value) + (b"\x00" if len(value) % 2 else b"")
    raise ValueError(f"cannot encode command element ({tag >> 16:04X},{tag & 0xFFFF:04X}) of VR {vr}")


def _decode_value(tag: int, raw: bytes):
    vr = _vr(tag)
    if vr == "US":
        if len(raw) != 2:
            raise DimseDecodeError(f"command element {_tag_text(tag)} (US) has length {len(raw)}")
        return _US.unpack(raw)[0]
    if vr == "UL":
        if len(raw) != 4:
            raise DimseDecodeError(f"command element {_tag_text(tag)} (UL) has length {len(raw)}")
        return _UL.unpack(raw)[0]
    if vr == "AT":
        if len(raw) % 4:
            raise DimseDecodeError(f"command element {_tag_text(tag)} (AT) has length {len(raw)}")
        tags = [(g << 16) | e for g, e in struct.iter_unpack("<HH", raw)]
        return tags[0] if len(tags) == 1 else tags
    if vr in _TEXT_VRS:
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        return text.rstrip("\x00 ") if vr == "UI" else text.strip(" \x00")
    return bytes(raw)


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


#: command element keywords already looked up in pydicom's dictionary, and their tags
_COMMAND_TAGS: Dict[str, int] = {}


class Command:
    """A DIMSE command set: an ordered mapping of group 0000 tags to values.

    Elements are read and written by pydicom keyword
    (``command.MessageID``); missing elements read as ``None``.
    """

    __slots__ = ("_elements",)

    def __init__(self, **elements) -> None:
        object.__setattr__(self, "_elements", {})
        for keyword, value in elements.items():
            setattr(self, keyword, value)

    @staticmethod
    def _tag(keyword: str) -> int:
        tag = _COMMAND_TAGS.get(keyword)
        if tag is None:
            tag = tag_for_keyword(keyword)
            if tag is None or tag >> 16 != 0:
                raise AttributeError(f"{keyword} is not a command element")
            _COMMAND_TAGS[keyword] = tag  # (a few dozen command elements exist: bounded)
        return tag

    def __getattr__(self, keyword: str):
        if keyword.startswith("_"):
            raise AttributeError(keyword)
        return self._elements.get(self._tag(keyword))

    def __setattr__(self, keyword: str, value) -> None:
        tag = self._tag(keyword)
        if value is None:
            self._elements.pop(tag, None)
        else:
            self._elements[tag] = value

    def __contains__(self, keyword: str) -> bool:
        return self._tag(keyword) in self._elements

    def __eq__(self, other) -> bool:
        return isinstance(other, Command) and self._elements == other._elements

    def items(self) -> List[Tuple[str, object]]:
        return [(keyword_for_tag(tag) or _tag_text(tag), value) for tag, value in sorted(self._elements.items())]

    def __repr__(self) -> str:
        fields = ", ".join(f"{keyword}={value!r}" for keyword, value in self.items())
        return f"Command({fields})"

    @property
    def command_field(self) -> Optional[CommandField]:
        value = self.CommandField
        try:
            return CommandField(value) if value is not None else None
        except ValueError:
            return None

    @property
    def has_data_set(self) -> bool:
        value = self.CommandDataSetType
        return value is not None and value != NO_DATA_SET

    def encode(self) -> bytes:
        """Implicit VR Little Endian bytes, Command Group Length first."""
        body = bytearray()
        for tag in sorted(self._elements):
            if tag == 0x00000000:
                continue
            value = _encode_value(tag, self._elements[tag])
            body += _ELEMENT_HEADER.pack(0, tag & 0xFFFF, len(value)) + value
        return _ELEMENT_HEADER.pack(0, 0, 4) + _UL.pack(len(body)) + bytes(body)

    @classmethod
    def decode(cls, data: bytes) -> "Command":
        """Decode an Implicit VR Little Endian command set; raise :class:`DimseDecodeError` if malformed."""
        command = cls()
        offset, end = 0, len(data)
        previous = -1
        while offset < end:
            if end - offset < 8:
                raise DimseDecodeError(f"command set has {end - offset} stray bytes at offset {offset}")
            group, element, length = _ELEMENT_HEADER.unpack_from(data, offset)
            offset += 8
            if group != 0:
                raise DimseDecodeError(f"command set holds element ({group:04X},{element:04X}) outside group 0000")
            if length == 0xFFFFFFFF or offset + length > end:
                raise DimseDecodeError(f"command element (0000,{element:04X}) length {length} overruns the command set")
            if element <= previous:
                raise DimseDecodeError(f"command element (0000,{element:04X}) is out of order")
            previous = element
            command._elements[element] = _decode_value(element, bytes(data[offset : offset + length]))
            offset += length
        return command


def fragment_sizes(max_pdu: int) -> int:
    """The largest PDV value that fits a P-DATA-TF PDU of ``max_pdu`` bytes (one PDV per PDU)."""
    return max_pdu - 6


def fragment(context_id: int, is_command: bool, data: bytes, max_pdu: int, last: bool = True) -> Iterator[bytes]:
    """Encoded P-DATA-TF PDUs carrying ``data``, one PDV each, each within ``max_pdu``.

    ``last`` says whether the final fragment ends the command or data set;
    a streaming sender passes ``False`` for all but its final chunk.
    """
    if max_pdu < 8:
        raise ValueError(f"maximum PDU length {max_pdu} cannot carry a PDV")
    room = fragment_sizes(max_pdu)
    header_base = 0x01 if is_command else 0x00
    view = memoryview(data)
    total = len(data)
    offset = 0
    while True:
        chunk = view[offset : offset + room]
        offset += len(chunk)
        final = offset >= total
        header = header_base | (0x02 if final and last else 0)
        length = len(chunk) + 2
        # one copy of the chunk into the PDU (bytes(chunk) + header copied it twice)
        yield b"".join((struct.pack(">BxLLBB", P.PDUType.P_DATA_TF, length + 4, length, context_id, header), chunk))
        if final:
            return


@dataclass(frozen=True)
class CommandReceived:
    """A whole command set arrived on ``context_id``."""

    context_id: int
    command: Command


@dataclass(frozen=True)
class DataReceived:
    """A fragment of the data set that follows the last command; ``is_last`` ends it."""

    context_id: int
    data: bytes
    is_last: bool


class MessageAssembler:
    """Reassembles DIMSE messages from PDVs (PS3.7 section 9.1, PS3.8 Annex E).

    Command fragments are collected (a command set is small and capped);
    data set fragments are passed on as they come.  Breaking the rules (a
    data fragment where none is expected, a message switching presentation
    context, a command that is too long) raises :class:`DimseDecodeError`.
    """

    def __init__(self, max_command_length: int = MAX_COMMAND_LENGTH) -> None:
        self._command = bytearray()
        self._command_context: Optional[int] = None
        #: context of the data set being received, when one is expected
        self._data_context: Optional[int] = None
        self.max_command_length = max_command_length

    @property
    def expecting_data(self) -> bool:
        return self._data_context is not None

    @property
    def idle(self) -> bool:
        """True between messages."""
        return self._data_context is None and self._command_context is None

    def receive(self, pdvs: Sequence[P.PDV]) -> List[Union[CommandReceived, DataReceived]]:
        events: List[Union[CommandReceived, DataReceived]] = []
        for pdv in pdvs:
            if pdv.is_command:
                events.extend(self._command_fragment(pdv))
            else:
                events.append(self._data_fragment(pdv))
        return events

    def _command_fragment(self, pdv: P.PDV) -> List[CommandReceived]:
        if self._data_context is not None:
            raise DimseDecodeError("a command fragment arrived while the previous message's data set was incomplete")
        if self._command_context is None:
            self._command_context = pdv.context_id
        elif pdv.context_id != self._command_context:
            raise DimseDecodeError(
                f"command fragments switched from presentation context {self._command_context} to {pdv.context_id}"
            )
        if len(self._command) + len(pdv.data) > self.max_command_length:
            raise DimseDecodeError(f"command set exceeds {self.max_command_length} bytes")
        self._command += pdv.data
        if not pdv.is_last:
            return []
        command = Command.decode(bytes(self._command))
        context_id = self._command_context
        self._command.clear()
        self._command_context = None
        if command.CommandField is None:
            raise DimseDecodeError("command set has no Command Field (0000,0100)")
        if command.has_data_set:
            self._data_context = context_id
        return [CommandReceived(context_id, command)]

    def _data_fragment(self, pdv: P.PDV) -> DataReceived:
        if self._data_context is None:
            raise DimseDecodeError("a data set fragment arrived that no command announced")
        if pdv.context_id != self._data_context:
            raise DimseDecodeError(
                f"data set fragment on presentation context {pdv.context_id}, its command came on {self._data_context}"
            )
        context_id = self._data_context
        if pdv.is_last:
            self._data_context = None
        return DataReceived(context_id, pdv.data, pdv.is_last)
