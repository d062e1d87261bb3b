"""The DICOM Upper Layer protocol data units of PS3.8 section 9.3, without I/O.

Every PDU and item is an immutable value with ``encode() -> bytes``; the
module-level :func:`decode_pdu` turns one whole PDU (header included) back into
a value.  :class:`PDUFramer` cuts a byte stream into PDUs, refusing lengths
above the limits it is given before it buffers them.

Decoding follows the standard's robustness rules: reserved fields are not
checked, unrecognised items are skipped (PS3.8 9.3.1, 9.3.2 and 9.3.3, and
D.3.3 for user information sub-items), and every length is checked against
the space its parent leaves before anything is read.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Tuple, TypeVar, Union

from .errors import PDUDecodeError

__all__ = [
    "PDUType",
    "ItemType",
    "AbortSource",
    "AbortReason",
    "PresentationContextRQ",
    "PresentationContextAC",
    "RoleSelection",
    "AsyncOperationsWindow",
    "SOPClassExtended",
    "SOPClassCommonExtended",
    "UserIdentityRQ",
    "UserIdentityAC",
    "UserInformation",
    "AssociateRQ",
    "AssociateAC",
    "AssociateRJ",
    "PDV",
    "PDataTF",
    "ReleaseRQ",
    "ReleaseRP",
    "Abort",
    "decode_pdu",
    "PDUFramer",
    "DICOM_APPLICATION_CONTEXT",
]

#: The only application context name PS3.7 Annex A defines.
DICOM_APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"

T = TypeVar("T")

_HEADER = struct.Struct(">BxL")
_ITEM_HEADER = struct.Struct(">BxH")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">L")


class PDUType(enum.IntEnum):
    """PS3.8 Table 9-1 PDU types."""

    A_ASSOCIATE_RQ = 0x01
    A_ASSOCIATE_AC = 0x02
    A_ASSOCIATE_RJ = 0x03
    P_DATA_TF = 0x04
    A_RELEASE_RQ = 0x05
    A_RELEASE_RP = 0x06
    A_ABORT = 0x07


class ItemType(enum.IntEnum):
    """Item and sub-item types of PS3.8 9.3 and PS3.7 Annex D."""

    APPLICATION_CONTEXT = 0x10
    PRESENTATION_CONTEXT_RQ = 0x20
    PRESENTATION_CONTEXT_AC = 0x21
    ABSTRACT_SYNTAX = 0x30
    TRANSFER_SYNTAX = 0x40
    USER_INFORMATION = 0x50
    MAXIMUM_LENGTH = 0x51
    IMPLEMENTATION_CLASS_UID = 0x52
    ASYNC_OPERATIONS_WINDOW = 0x53
    ROLE_SELECTION = 0x54
    IMPLEMENTATION_VERSION_NAME = 0x55
    SOP_CLASS_EXTENDED = 0x56
    SOP_CLASS_COMMON_EXTENDED = 0x57
    USER_IDENTITY_RQ = 0x58
    USER_IDENTITY_AC = 0x59


class AbortSource(enum.IntEnum):
    """PS3.8 Table 9-26 A-ABORT source."""

    SERVICE_USER = 0
    RESERVED = 1
    SERVICE_PROVIDER = 2


class AbortReason(enum.IntEnum):
    """PS3.8 Table 9-26 A-ABORT reason/diag (significant for provider source)."""

    NOT_SPECIFIED = 0
    UNRECOGNIZED_PDU = 1
    UNEXPECTED_PDU = 2
    RESERVED = 3
    UNRECOGNIZED_PDU_PARAMETER = 4
    UNEXPECTED_PDU_PARAMETER = 5
    INVALID_PDU_PARAMETER_VALUE = 6


# ---------------------------------------------------------------------------
# small helpers


def _item(item_type: int, body: bytes) -> bytes:
    if len(body) > 0xFFFF:
        raise ValueError(f"item 0x{item_type:02X} body of {len(body)} bytes exceeds 65535")
    return _ITEM_HEADER.pack(item_type, len(body)) + body


def _uid_bytes(uid: str) -> bytes:
    raw = uid.encode("ascii")
    if not raw or len(raw) > 64:
        raise ValueError(f"UID {uid!r} must be 1 to 64 characters")
    return raw


def _decode_text(raw: bytes, what: str) -> str:
    """Decode a UID or name: ISO 646, trailing NUL/space padding removed."""
    try:
        return raw.decode("ascii").rstrip("\x00 ")
    except UnicodeDecodeError:
        raise PDUDecodeError(
            f"{what} is not ISO 646 text: {raw[:64]!r}",
            AbortReason.INVALID_PDU_PARAMETER_VALUE,
        ) from None


def _ae_title_bytes(title: str) -> bytes:
    raw = title.encode("ascii")
    if len(raw) > 16:
        raise ValueError(f"AE title {title!r} is longer than 16 characters")
    return raw.ljust(16, b" ")


def _iter_items(data: bytes, start: int, end: int, where: str) -> Iterator[Tuple[int, int, int]]:
    """Yield ``(item_type, body_start, body_end)`` for the items in ``data[start:end]``."""
    offset = start
    while offset < end:
        if end - offset < 4:
            raise PDUDecodeError(
                f"{where}: {end - offset} trailing bytes are too few for an item header",
                AbortReason.INVALID_PDU_PARAMETER_VALUE,
            )
        item_type, length = _ITEM_HEADER.unpack_from(data, offset)
        body = offset + 4
        if body + length > end:
            raise PDUDecodeError(
                f"{where}: item 0x{item_type:02X} declares {length} bytes but only "
                f"{end - body} remain",
                AbortReason.INVALID_PDU_PARAMETER_VALUE,
            )
        yield item_type, body, body + length
        offset = body + length


def _read_u16_field(data: bytes, offset: int, end: int, what: str) -> Tuple[bytes, int]:
    """Read a 2-byte length followed by that many bytes; return (bytes, next offset)."""
    if offset + 2 > end:
        raise PDUDecodeError(f"{what}: length field overruns its item", AbortReason.INVALID_PDU_PARAMETER_VALUE)
    (length,) = _U16.unpack_from(data, offset)
    offset += 2
    if offset + length > end:
        raise PDUDecodeError(
            f"{what}: {length} bytes declared, {end - offset} available",
            AbortReason.INVALID_PDU_PARAMETER_VALUE,
        )
    return bytes(data[offset : offset + length]), offset + length


# ---------------------------------------------------------------------------
# presentation context items


@dataclass(frozen=True)
class PresentationContextRQ:
    """Presentation context item of an A-ASSOCIATE-RQ (PS3.8 9.3.2.2)."""

    id: int
    abstract_syntax: str
    transfer_syntaxes: Tuple[str, ...]

    def encode(self) -> bytes:
        body = bytes((self.id, 0, 0, 0))
        body += _item(ItemType.ABSTRACT_SYNTAX, _uid_bytes(self.abstract_syntax))
        for ts in self.transfer_syntaxes:
            body += _item(ItemType.TRANSFER_SYNTAX, _uid_bytes(ts))
        return _item(ItemType.PRESENTATION_CONTEXT_RQ, body)

    @classmethod
    def decode(cls, data: bytes, start: int, end: int) -> "PresentationContextRQ":
        if end - start < 4:
            raise PDUDecodeError("presentation context item shorter than 4 bytes", AbortReason.INVALID_PDU_PARAMETER_VALUE)
        context_id = data[start]
        abstract: Optional[str] = None
        transfer: List[str] = []
        where = f"presentation context {context_id}"
        for item_type, b, e in _iter_items(data, start + 4, end, where):
            if item_type == ItemType.ABSTRACT_SYNTAX:
                if abstract is not None:
                    raise PDUDecodeError(f"{where}: more than one abstract syntax", AbortReason.UNEXPECTED_PDU_PARAMETER)
                abstract = _decode_text(data[b:e], "abstract syntax name")
            elif item_type == ItemType.TRANSFER_SYNTAX:
                transfer.append(_decode_text(data[b:e], "transfer syntax name"))
            # other sub-items are not defined here: skipped (PS3.8 9.3.2.2)
        if abstract is None:
            raise PDUDecodeError(f"{where}: no abstract syntax sub-item", AbortReason.INVALID_PDU_PARAMETER_VALUE)
        return cls(context_id, abstract, tuple(transfer))


@dataclass(frozen=True)
class PresentationContextAC:
    """Presentation context item of an A-ASSOCIATE-AC (PS3.8 9.3.3.2).

    ``result`` is 0 acceptance, 1 user-rejection, 2 no-reason (provider
    rejection), 3 abstract-syntax-not-supported, 4 transfer-syntaxes-not-supported.
    ``transfer_syntax`` is only significant on acceptance; a rejected context is
    encoded with an empty transfer syntax sub-item, which every peer accepts.
    """

    id: int
    result: int
    transfer_syntax: Optional[str] = None

    ACCEPTANCE = 0
    USER_REJECTION = 1
    NO_REASON = 2
    ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
    TRANSFER_SYNTAXES_NOT_SUPPORTED = 4

    def encode(self) -> bytes:
        body = bytes((self.id, 0, self.result, 0))
        ts = self.transfer_syntax.encode("ascii") if self.transfer_syntax else b""
        body += _item(ItemType.TRANSFER_SYNTAX, ts)
        return _item(ItemType.PRESENTATION_CONTEXT_AC, body)

    @classmethod
    def decode(cls, data: bytes, start: int, end: int) -> "PresentationContextAC":
        if end - start < 4:
            raise PDUDecodeError("presentation context item shorter than 4 bytes", AbortReason.INVALID_PDU_PARAMETER_VALUE)
        context_id = data[start]
        result = data[start + 2]
        transfer: Optional[str] = None
        for item_type, b, e in _iter_items(data, start + 4, end, f"presentation context {context_id}"):
            # not significant, and not tested, unless accepted (PS3.8 Table 9-18)
            if item_type == ItemType.TRANSFER_SYNTAX and result == cls.ACCEPTANCE:
                transfer = _decode_text(data[b:e], "transfer syntax name") or None
        if result == cls.ACCEPTANCE and transfer is None:
            raise PDUDecodeError(
                f"accepted presentation context {context_id} has no transfer syntax",
                AbortReason.INVALID_PDU_PARAMETER_VALUE,
            )
        return cls(context_id, result, transfer if result == cls.ACCEPTANCE else None)


# ---------------------------------------------------------------------------
# user information sub-items (PS3.7 Annex D, PS3.8 Annex D)


@dataclass(frozen=True)
class RoleSelection:
    """SCP/SCU role selection sub-item (PS3.7 D.3.3.4)."""

    sop_class_uid: str
    scu_role: bool
    scp_role: bool

    def encode(self) -> bytes:
        uid = _uid_bytes(self.sop_class_uid)
        return _item(ItemType.ROLE_SELECTION, _U16.pack(len(uid)) + uid + bytes((int(self.scu_role), int(self.scp_role))))

    @classmethod
    def decode(cls, data: bytes, start: int, end: int) -> "RoleSelection":
        raw, offset = _read_u16_field(data, start, end, "role selection SOP class UID")
        if offset + 2 > end:
            raise PDUDecodeError("role selection item lacks its role bytes", AbortReason.INVALID_PDU_PARAMETER_VALUE)
        return cls(_decode_text(raw, "role selection UID"), bool(data[offset]), bool(data[offset + 1]))


@dataclass(frozen=True)
class AsyncOperationsWindow:
    """Asynchronous operations window sub-item (PS3.7 D.3.3.3)."""

    invoked: int
    performed: int

    def encode(self) -> bytes:
        return _item(ItemType.ASYNC_OPERATIONS_WINDOW, struct.pack(">HH", self.invoked, self.performed))

    @classmethod
    def decode(cls, data: bytes, start: int, end: int) -> "AsyncOperationsWindow":
        if end - start != 4:
            raise PDUDecodeError("asynchronous operations window item must be 4 bytes", AbortReason.INVALID_PDU_PARAMETER_VALUE)
        invoked, performed = struct.unpack_from(">HH", data, start)
        return cls(invoked, performed)


@dataclass(frozen=True)
class SOPClassExtended:
    """SOP class extended negotiation sub-item (PS3.7 D.3.3.5)."""

    sop_class_uid: str
    application_information: bytes

    def encode(self) -> bytes:
        uid = _uid_bytes(self.sop_class_uid)
        return _item(ItemType.SOP_CLASS_EXTENDED, _U16.pack(len(uid)) + uid + self.application_information)

    @classmethod
    def decode(cls, data: bytes, start: int, end: int) -> "SOPClassExtended":
        raw, offset = _read_u16_field(data, start, end, "SOP class extended UID")
        return cls(_decode_text(raw, "SOP class extended UID"), bytes(data[offset:end]))


@dataclass(frozen=True)
class SOPClassCommonExtended:
    """SOP class common extended negotiation sub-item (PS3.7 D.3.3.6)."""

    sop_class_uid: str
    service_class_uid: str
    related_general_sop_classes: Tuple[str, ...] = ()

    def encode(self) -> bytes:
        sop = _uid_bytes(self.sop_class_uid)
        service = _uid_bytes(self.service_class_uid)
        related = b"".join(_U16.pack(len(u)) + u for u in map(_uid_bytes, self.related_general_sop_classes))
        body = _U16.pack(len(sop)) + sop + _U16.pack(len(service)) + service + _U16.pack(len(related)) + related
        # the reserved byte of the header carries the sub-item version, 0
        return _item(ItemType.SOP_CLASS_COMMON_EXTENDED, body)

    @classmethod
    def decode(cls, data: bytes, start: int, end: int) -> "SOPClassCommonExtended":
        what = "SOP class common extended negotiation"
        sop, offset = _read_u16_field(data, start, end, what)
        service, offset = _read_u16_field(data, offset, end, what)
        related_raw, offset = _read_u16_field(data, offset, end, what)
        related: List[str] = []
        inner = 0
        while inner < len(related_raw):
            uid, inner = _read_u16_field(related_raw, inner, len(related_raw), what)
            related.append(_decode_text(uid, "related general SOP class UID"))
        return cls(_decode_text(sop, what), _decode_text(service, what), tuple(related))


@dataclass(frozen=True)
class UserIdentityRQ:
    """User identity negotiation sub-item, requestor side (PS3.7 D.3.3.7.1).

    ``identity_type``: 1 username, 2 username and passcode, 3 Kerberos,
    4 SAML, 5 JWT.
    """

    identity_type: int
    positive_response_requested: bool
    primary_field: bytes
    secondary_field: bytes = b""

    def encode(self) -> bytes:
        body = bytes((self.identity_type, int(self.positive_response_requested)))
        body += _U16.pack(len(self.primary_field)) + self.primary_field
        body += _U16.pack(len(self.secondary_field)) + self.secondary_field
        return _item(ItemType.USER_IDENTITY_RQ, body)

    @classmethod
    def decode(cls, data: bytes, start: int, end: int) -> "UserIdentityRQ":
        if end - start < 2:
            raise PDUDecodeError("user identity item too short", AbortReason.INVALID_PDU_PARAMETER_VALUE)
        identity_type, positive = data[start], data[start + 1]
        primary, offset = _read_u16_field(data, start + 2, end, "user identity primary field")
        secondary, offset = _read_u16_field(data, offset, end, "user identity secondary field")
        return cls(identity_type, bool(positive), primary, secondary)

    def __repr__(self) -> str:  # never log credentials
        return f"UserIdentityRQ(type={self.identity_type}, positive_response_requested={self.positive_response_requested})"


@dataclass(frozen=True)
class UserIdentityAC:
    """User identity negotiation sub-item, acceptor side (PS3.7 D.3.3.7.2)."""

    server_response: bytes

    def encode(self) -> bytes:
        return _item(ItemType.USER_IDENTITY_AC, _U16.pack(len(self.server_response)) + self.server_response)

    @classmethod
    def decode(cls, data: bytes, start: int, end: int) -> "UserIdentityAC":
        response, _ = _read_u16_field(data, start, end, "user identity server response")
        return cls(response)


@dataclass(frozen=True)
class UserInformation:
    """User information item (PS3.8 9.3.2.3 and Annex D) with its sub-items."""

    maximum_length: Optional[int] = None
    implementation_class_uid: Optional[str] = None
    implementation_version_name: Optional[str] = None
    async_operations_window: Optional[AsyncOperationsWindow] = None
    role_selections: Tuple[RoleSelection, ...] = ()
    sop_class_extended: Tuple[SOPClassExtended, ...] = ()
    sop_class_common_extended: Tuple[SOPClassCommonExtended, ...] = ()
    user_identity_rq: Optional[UserIdentityRQ] = None
    user_identity_ac: Optional[UserIdentityAC] = None

    def encode(self) -> bytes:
        parts: List[bytes] = []
        if self.maximum_length is not None:
            parts.append(_item(ItemType.MAXIMUM_LENGTH, _U32.pack(self.maximum_length)))
        if self.implementation_class_uid is not None:
            parts.append(_item(ItemType.IMPLEMENTATION_CLASS_UID, _uid_bytes(self.implementation_class_uid)))
        if self.async_operations_window is not None:
            parts.append(self.async_operations_window.encode())
        parts.extend(role.encode() for role in self.role_selections)
        if self.implementation_version_name is not None:
            parts.append(_item(ItemType.IMPLEMENTATION_VERSION_NAME, self.implementation_version_name.encode("ascii")))
        parts.extend(ext.encode() for ext in self.sop_class_extended)
        parts.extend(ext.encode() for ext in self.sop_class_common_extended)
        if self.user_identity_rq is not None:
            parts.append(self.user_identity_rq.encode())
        if self.user_identity_ac is not None:
            parts.append(self.user_identity_ac.encode())
        return _item(ItemType.USER_INFORMATION, b"".join(parts))

    @classmethod
    def decode(cls, data: bytes, start: int, end: int) -> "UserInformation":
        values: dict = {}
        roles: List[RoleSelection] = []
        extended: List[SOPClassExtended] = []
        common: List[SOPClassCommonExtended] = []
        for item_type, b, e in _iter_items(data, start, end, "user information"):
            if item_type == ItemType.MAXIMUM_LENGTH:
                if e - b != 4:
                    raise PDUDecodeError("maximum length sub-item must be 4 bytes", AbortReason.INVALID_PDU_PARAMETER_VALUE)
                (values["maximum_length"],) = _U32.unpack_from(data, b)
            elif item_type == ItemType.IMPLEMENTATION_CLASS_UID:
                values["implementation_class_uid"] = _decode_text(data[b:e], "implementation class UID")
            elif item_type == ItemType.IMPLEMENTATION_VERSION_NAME:
                values["implementation_version_name"] = _decode_text(data[b:e], "implementation version name")
            elif item_type == ItemType.ASYNC_OPERATIONS_WINDOW:
                values["async_operations_window"] = AsyncOperationsWindow.decode(data, b, e)
            elif item_type == ItemType.ROLE_SELECTION:
                roles.append(RoleSelection.decode(data, b, e))
            elif item_type == ItemType.SOP_CLASS_EXTENDED:
                extended.append(SOPClassExtended.decode(data, b, e))
            elif item_type == ItemType.SOP_CLASS_COMMON_EXTENDED:
                common.append(SOPClassCommonExtended.decode(data, b, e))
            elif item_type == ItemType.USER_IDENTITY_RQ:
                values["user_identity_rq"] = UserIdentityRQ.decode(data, b, e)
            elif item_type == ItemType.USER_IDENTITY_AC:
                values["user_identity_ac"] = UserIdentityAC.decode(data, b, e)
            # unknown sub-items are ignored (PS3.7 D.3.3)
        return cls(
            role_selections=tuple(roles),
            sop_class_extended=tuple(extended),
            sop_class_common_extended=tuple(common),
            **values,
        )


# ---------------------------------------------------------------------------
# the PDUs


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return _HEADER.pack(pdu_type, len(body)) + body


@dataclass(frozen=True)
class _AssociateBase:
    called_ae_title: str
    calling_ae_title: str
    application_context: str = DICOM_APPLICATION_CONTEXT
    user_information: UserInformation = field(default_factory=UserInformation)
    protocol_version: int = 1

    _pdu_type = 0
    _context_type = 0

    def _contexts(self) -> tuple:
        raise NotImplementedError

    def encode(self) -> bytes:
        body = _U16.pack(self.protocol_version) + b"\x00\x00"
        body += _ae_title_bytes(self.called_ae_title) + _ae_title_bytes(self.calling_ae_title)
        body += bytes(32)
        body += _item(ItemType.APPLICATION_CONTEXT, _uid_bytes(self.application_context))
        body += b"".join(context.encode() for context in self._contexts())
        body += self.user_information.encode()
        return _pdu(self._pdu_type, body)

    @classmethod
    def _decode_fields(cls, data: bytes, context_cls) -> dict:
        if len(data) < 6 + 68:
            raise PDUDecodeError(
                f"{cls.__name__} of {len(data) - 6} bytes is shorter than its 68-byte fixed part",
                AbortReason.INVALID_PDU_PARAMETER_VALUE,
            )
        (version,) = _U16.unpack_from(data, 6)
        if cls._pdu_type == PDUType.A_ASSOCIATE_AC:
            # reserved echoes of the request's fields, not tested (PS3.8 Table 9-17)
            called = data[10:26].decode("ascii", "replace").rstrip("\x00 ").strip()
            calling = data[26:42].decode("ascii", "replace").rstrip("\x00 ").strip()
        else:
            called = _decode_text(data[10:26], "called AE title").strip()
            calling = _decode_text(data[26:42], "calling AE title").strip()
        application_context: Optional[str] = None
        contexts = []
        user_info: Optional[UserInformation] = None
        for item_type, b, e in _iter_items(data, 74, len(data), cls.__name__):
            if item_type == ItemType.APPLICATION_CONTEXT:
                application_context = _decode_text(data[b:e], "application context name")
            elif item_type == context_cls._item_type:
                contexts.append(context_cls.decode(data, b, e))
            elif item_type == ItemType.USER_INFORMATION:
                user_info = UserInformation.decode(data, b, e)
            # unrecognised items are skipped (PS3.8 9.3.2, 9.3.3)
        if application_context is None:
            raise PDUDecodeError(f"{cls.__name__} has no application context item", AbortReason.INVALID_PDU_PARAMETER_VALUE)
        if user_info is None:
            raise PDUDecodeError(f"{cls.__name__} has no user information item", AbortReason.INVALID_PDU_PARAMETER_VALUE)
        return dict(
            called_ae_title=called,
            calling_ae_title=calling,
            application_context=application_context,
            user_information=user_info,
            protocol_version=version,
            presentation_contexts=tuple(contexts),
        )


PresentationContextRQ._item_type = ItemType.PRESENTATION_CONTEXT_RQ  # type: ignore[attr-defined]
PresentationContextAC._item_type = ItemType.PRESENTATION_CONTEXT_AC  # type: ignore[attr-defined]


@dataclass(frozen=True)
class AssociateRQ(_AssociateBase):
    """A-ASSOCIATE-RQ PDU (PS3.8 9.3.2)."""

    presentation_contexts: Tuple[PresentationContextRQ, ...] = ()

    _pdu_type = PDUType.A_ASSOCIATE_RQ

    def _contexts(self) -> tuple:
        return self.presentation_contexts

    @classmethod
    def decode(cls, data: bytes) -> "AssociateRQ":
        return cls(**cls._decode_fields(data, PresentationContextRQ))


@dataclass(frozen=True)
class AssociateAC(_AssociateBase):
    """A-ASSOCIATE-AC PDU (PS3.8 9.3.3); the AE title fields echo the request's."""

    presentation_contexts: Tuple[PresentationContextAC, ...] = ()

    _pdu_type = PDUType.A_ASSOCIATE_AC

    def _contexts(self) -> tuple:
        return self.presentation_contexts

    @classmethod
    def decode(cls, data: bytes) -> "AssociateAC":
        return cls(**cls._decode_fields(data, PresentationContextAC))


@dataclass(frozen=True)
class AssociateRJ:
    """A-ASSOCIATE-RJ PDU (PS3.8 9.3.4).

    result: 1 rejected-permanent, 2 rejected-transient.
    source: 1 service-user, 2 service-provider (ACSE), 3 service-provider (presentation).
    reason: depends on source, see :mod:`appliance.dicom.negotiation`.
    """

    result: int
    source: int
    reason: int

    def encode(self) -> bytes:
        return _pdu(PDUType.A_ASSOCIATE_RJ, bytes((0, self.result, self.source, self.reason)))

    @classmethod
    def decode(cls, data: bytes) -> "AssociateRJ":
        _fixed_length(data, 4, "A-ASSOCIATE-RJ")
        return cls(data[7], data[8], data[9])


@dataclass(frozen=True)
class PDV:
    """One presentation data value item (PS3.8 9.3.5.1, Annex E.2)."""

    context_id: int
    is_command: bool
    is_last: bool
    data: bytes

    def encode(self) -> bytes:
        header = (0x01 if self.is_command else 0) | (0x02 if self.is_last else 0)
        return _U32.pack(len(self.data) + 2) + bytes((self.context_id, header)) + self.data


@dataclass(frozen=True)
class PDataTF:
    """P-DATA-TF PDU (PS3.8 9.3.5)."""

    pdvs: Tuple[PDV, ...]

    def encode(self) -> bytes:
        return _pdu(PDUType.P_DATA_TF, b"".join(pdv.encode() for pdv in self.pdvs))

    @classmethod
    def decode(cls, data: bytes) -> "PDataTF":
        view = memoryview(data)
        offset, end = 6, len(data)
        pdvs: List[PDV] = []
        while offset < end:
            if end - offset < 6:
                raise PDUDecodeError("P-DATA-TF: a PDV item header is cut short", AbortReason.INVALID_PDU_PARAMETER_VALUE)
            (length,) = _U32.unpack_from(data, offset)
            if length < 2 or offset + 4 + length > end:
                raise PDUDecodeError(
                    f"P-DATA-TF: PDV item length {length} does not fit the {end - offset - 4} bytes left",
                    AbortReason.INVALID_PDU_PARAMETER_VALUE,
                )
            context_id, header = data[offset + 4], data[offset + 5]
            if context_id % 2 == 0:
                raise PDUDecodeError(
                    f"P-DATA-TF: presentation context ID {context_id} is not odd",
                    AbortReason.INVALID_PDU_PARAMETER_VALUE,
                )
            pdvs.append(
                PDV(context_id, bool(header & 0x01), bool(header & 0x02), bytes(view[offset + 6 : offset + 4 + length]))
            )
            offset += 4 + length
        if not pdvs:
            raise PDUDecodeError("P-DATA-TF holds no PDV item", AbortReason.INVALID_PDU_PARAMETER_VALUE)
        return cls(tuple(pdvs))


def _fixed_length(data: bytes, length: int, name: str) -> None:
    if len(data) - 6 != length:
        raise PDUDecodeError(
            f"{name} length is {len(data) - 6}, not {length}", AbortReason.INVALID_PDU_PARAMETER_VALUE
        )


@dataclass(frozen=True)
class ReleaseRQ:
    """A-RELEASE-RQ PDU (PS3.8 9.3.6)."""

    def encode(self) -> bytes:
        return _pdu(PDUType.A_RELEASE_RQ, bytes(4))

    @classmethod
    def decode(cls, data: bytes) -> "ReleaseRQ":
        _fixed_length(data, 4, "A-RELEASE-RQ")
        return cls()


@dataclass(frozen=True)
class ReleaseRP:
    """A-RELEASE-RP PDU (PS3.8 9.3.7)."""

    def encode(self) -> bytes:
        return _pdu(PDUType.A_RELEASE_RP, bytes(4))

    @classmethod
    def decode(cls, data: bytes) -> "ReleaseRP":
        _fixed_length(data, 4, "A-RELEASE-RP")
        return cls()


@dataclass(frozen=True)
class Abort:
    """A-ABORT PDU (PS3.8 9.3.8)."""

    source: int = AbortSource.SERVICE_USER
    reason: int = AbortReason.NOT_SPECIFIED

    def encode(self) -> bytes:
        return _pdu(PDUType.A_ABORT, bytes((0, 0, self.source, self.reason)))

    @classmethod
    def decode(cls, data: bytes) -> "Abort":
        _fixed_length(data, 4, "A-ABORT")
        return cls(data[8], data[9])


PDU = Union[AssociateRQ, AssociateAC, AssociateRJ, PDataTF, ReleaseRQ, ReleaseRP, Abort]

_DECODERS = {
    PDUType.A_ASSOCIATE_RQ: AssociateRQ.decode,
    PDUType.A_ASSOCIATE_AC: AssociateAC.decode,
    PDUType.A_ASSOCIATE_RJ: AssociateRJ.decode,
    PDUType.P_DATA_TF: PDataTF.decode,
    PDUType.A_RELEASE_RQ: ReleaseRQ.decode,
    PDUType.A_RELEASE_RP: ReleaseRP.decode,
    PDUType.A_ABORT: Abort.decode,
}


def decode_pdu(data: bytes) -> PDU:
    """Decode one whole PDU, header included (bytes, or a memoryview that is not kept: what is decoded holds
    bytes of its own).

    Raises :class:`PDUDecodeError` with the A-ABORT reason to send.
    """
    if len(data) < 6:
        raise PDUDecodeError("PDU shorter than its 6-byte header", AbortReason.INVALID_PDU_PARAMETER_VALUE)
    pdu_type, length = _HEADER.unpack_from(data, 0)
    if length != len(data) - 6:
        raise PDUDecodeError(
            f"PDU length field says {length} but {len(data) - 6} bytes follow",
            AbortReason.INVALID_PDU_PARAMETER_VALUE,
        )
    decoder = _DECODERS.get(pdu_type)
    if decoder is None:
        raise PDUDecodeError(f"unrecognised PDU type 0x{pdu_type:02X}", AbortReason.UNRECOGNIZED_PDU)
    if pdu_type != PDUType.P_DATA_TF and type(data) is not bytes:
        data = bytes(data)  # the association PDUs' decoders slice and decode text: give them bytes
    return decoder(data)


class PDUFramer:
    """Cuts a byte stream into whole PDUs.

    One buffer and an offset; the header's length is checked against the
    per-type limit before the body is waited for, so a hostile length never
    makes us allocate.  ``max_pdata_length`` is the maximum length we
    announced for P-DATA-TF PDUs (0 would mean unlimited in DICOM; callers
    always pass a bound).
    """

    #: Association PDUs carry at most a few hundred contexts; 1 MiB is generous.
    MAX_ASSOCIATE_LENGTH = 1024 * 1024

    def __init__(self, max_pdata_length: int) -> None:
        self._buffer = bytearray()
        self._offset = 0
        self.max_pdata_length = max_pdata_length

    def _limit(self, pdu_type: int) -> int:
        if pdu_type == PDUType.P_DATA_TF:
            return self.max_pdata_length
        if pdu_type in (PDUType.A_ASSOCIATE_RQ, PDUType.A_ASSOCIATE_AC):
            return self.MAX_ASSOCIATE_LENGTH
        return 4

    def feed(self, data: bytes) -> None:
        """Append received bytes."""
        self._buffer += data

    def next_pdu(self) -> Optional[bytes]:
        """Return the next whole PDU (header included), or None if incomplete.

        Raises :class:`PDUDecodeError` for an unknown type or a length over
        the limit; the stream cannot be resynchronised after that.
        """
        span = self._next_span()
        if span is None:
            return None
        with memoryview(self._buffer) as view:
            return bytes(view[span[0]:span[1]])

    def next_decoded(self, decode: Callable[[memoryview], T]) -> Optional[T]:
        """``decode`` of the next whole PDU read where it lies in the buffer (no copy of it), or None if
        incomplete.  ``decode`` must not keep the view it is given (the buffer cannot grow while it lives):
        :func:`decode_pdu` keeps nothing of it.  Raises as :meth:`next_pdu` does, and what ``decode`` raises."""
        span = self._next_span()
        if span is None:
            return None
        with memoryview(self._buffer) as whole, whole[span[0]:span[1]] as view:
            return decode(view)

    def _next_span(self) -> Optional[Tuple[int, int]]:
        """Where the next whole PDU lies in the buffer (consumed from it), or None if incomplete."""
        available = len(self._buffer) - self._offset
        if available < 6:
            self._compact()
            return None
        pdu_type, length = _HEADER.unpack_from(self._buffer, self._offset)
        if pdu_type not in _DECODERS:
            raise PDUDecodeError(f"unrecognised PDU type 0x{pdu_type:02X}", AbortReason.UNRECOGNIZED_PDU)
        limit = self._limit(pdu_type)
        if length > limit:
            raise PDUDecodeError(
                f"{PDUType(pdu_type).name} declares {length} bytes, over the limit of {limit}",
                AbortReason.INVALID_PDU_PARAMETER_VALUE,
            )
        if available < 6 + length:
            self._compact()
            return None
        start = self._offset
        self._offset += 6 + length
        return start, self._offset

    def _compact(self) -> None:
        if self._offset:
            del self._buffer[: self._offset]
            self._offset = 0

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a PDU."""
        return len(self._buffer) - self._offset
