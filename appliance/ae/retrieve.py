"""Study Root Query/Retrieve Information Model - MOVE as SCP (PS3.4 C.4.2) over the archive.

A C-MOVE names studies, series or images by their unique keys only (no
relational retrieve, statement 3.1.3.3.2.1).  The instances are looked up in
the index, their studies pinned against eviction and marked accessed, and the
Disk-Server opens ONE association to the Move Destination (an AE title of the
configured devices) and sends every instance over it as a C-STORE
sub-operation, as the statement's sections 3.1.2 and 3.1.3.3 describe:

* **Contexts.** For each SOP class, one context per transfer syntax its files
  are stored in (that syntax alone), and one with the three uncompressed
  syntaxes.  When that is more than PS3.8's 128, the exact contexts of
  uncompressed syntaxes are dropped (the uncompressed context covers them),
  then each class gets a single context listing its stored syntaxes and the
  uncompressed ones; classes beyond 128 (fewest instances first) get none.
* **Sending.** A file's data set, after its File Meta Information, goes out
  verbatim through the association's pull producer: read one PDU at a time as
  the destination takes it, so a slow destination never makes us hold the
  study.  When the destination accepted only another *uncompressed* syntax, the
  object is re-encoded on the archive's I/O threads into a temporary file as a
  stream (attributes by pydicom, pixel data copied a piece at a time, byte
  order of OW/OF/OL/OD/OV values swapped when the endianness changes), and
  that is sent.  A compressed object is never decoded:
  without a context in its own syntax its sub-operation fails.
* **Statuses** (PS3.4 C.4.2.1.5).  Pending (FF00) after each sub-operation with the
  four counts (in moves of more than ``pending_every`` instances at most one per
  ``pending_interval`` seconds of the injected clock).  Final: 0000 all
  completed; B000 some completed with warnings, or could not be sent (no
  suitable context, file unreadable); A702 a C-STORE answered with a failure
  status or the sub-association was lost: the sub-association is ended at once
  (the statement's policy) and the sub-operations not attempted count as
  failed; FE00 after a C-CANCEL, once the sub-operation in flight is done.
  A801 only for a Move Destination that is not a configured device (nothing is
  connected); a destination that cannot be reached or rejects the association
  is C000 ("unable to process") with the reason as Error Comment, because the
  destination is known and PS3.4 has no refused-by-destination status.  A900
  for an identifier that is not a Study Root retrieve identifier (level, keys,
  UIDs), C000 for one that cannot be decoded.  Every final response after a
  failed sub-operation carries the Failed SOP Instance UID List (0008,0058).
"""

from __future__ import annotations

import array
import io
import os
import struct
import tempfile
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.filewriter import correct_ambiguous_vr
from twisted.internet import defer
from zope.interface import implementer

from ..archive.archive import Archive
from ..archive.index import InstanceRow
from ..archive.store import data_set_offset, open_stored_data_set
from ..compat import decode_dataset, encode_dataset
from ..config import ApplianceConfig, DeviceConfig
from ..dicom import dimse as D
from ..dicom import status as S
from ..dicom.negotiation import Negotiated, describe_rejection
from ..dicom.uids import (
    EXPLICIT_VR_BIG_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    STUDY_ROOT_MOVE,
    UNCOMPRESSED_TRANSFER_SYNTAXES,
    is_received_uid,
)
from ..interfaces import IServiceClass
from ..logs import logger
from ..net import requestor
from ..net.protocol import BufferedDataSet

__all__ = [
    "RetrieveService",
    "RetrieveKeys",
    "IdentifierError",
    "parse_identifier",
    "propose_contexts",
    "choose_context",
    "convert_stored_data_set",
    "failed_uid_list",
    "MAX_CONTEXTS",
    "UNABLE_TO_PROCESS",
]

_log = logger("appliance.retrieve")

#: PS3.8 9.3.2.2: presentation context IDs are odd numbers 1..255.
MAX_CONTEXTS = 128
#: An identifier is a handful of UIDs; a larger one is refused (C000) without being held.
IDENTIFIER_LIMIT = 1024 * 1024
#: Failure "unable to process" (PS3.4 C.4.2.1.5 Cxxx): undecodable identifier, destination unreachable or refusing.
UNABLE_TO_PROCESS = 0xC000
#: Our preference among the uncompressed syntaxes for the fallback context.
_FALLBACK_SYNTAXES = (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN)
#: VRs whose values are arrays of binary words (their byte order follows the transfer syntax).
_WORD_VRS = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
_LEVELS = ("STUDY", "SERIES", "IMAGE")

_QUERY_RETRIEVE_LEVEL = 0x00080052
_STUDY_UID, _SERIES_UID, _SOP_UID = 0x0020000D, 0x0020000E, 0x00080018


def _comment(text: str) -> str:
    """An Error Comment (LO): at most 64 characters of ISO 646."""
    return text.encode("ascii", "replace").decode("ascii")[:64]


# --- the identifier ------------------------------------------------------------------------------------


class IdentifierError(Exception):
    """The identifier cannot be served: the status to answer, and why."""

    def __init__(self, status: int, comment: str, offending: Optional[int] = None) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment
        self.offending = offending


@dataclass(frozen=True)
class RetrieveKeys:
    """The unique keys of a Study Root retrieve identifier (PS3.4 C.4.2.2.1)."""

    level: str
    study_uids: Tuple[str, ...]
    series_uids: Tuple[str, ...] = ()
    sop_uids: Tuple[str, ...] = ()


def _uid_values(ds: Dataset, tag: int) -> Optional[List[str]]:
    """The UIDs of a key: None when absent, [] when empty (universal matching)."""
    if tag not in ds:
        return None
    value = ds[tag].value
    if value is None or value == "":
        return []
    values = [value] if isinstance(value, (str, bytes)) else list(value)
    found = []
    for item in values:
        text = item.decode("ascii", "replace") if isinstance(item, bytes) else str(item)
        text = text.strip().rstrip("\x00").strip()
        if text:
            found.append(text)
    return found


def parse_identifier(data: bytes, transfer_syntax: str) -> RetrieveKeys:
    """Decode a C-MOVE identifier in the context's transfer syntax and check it is a Study Root
    retrieve at STUDY, SERIES or IMAGE level; raise :class:`IdentifierError` otherwise."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's notes on odd values: we judge them ourselves
            ds = decode_dataset(data, transfer_syntax)
            level_value = ds[_QUERY_RETRIEVE_LEVEL].value if _QUERY_RETRIEVE_LEVEL in ds else None
            keys = {tag: _uid_values(ds, tag) for tag in (_STUDY_UID, _SERIES_UID, _SOP_UID)}
    except Exception as error:  # pydicom raises many kinds on bytes that are no data set
        raise IdentifierError(UNABLE_TO_PROCESS, f"cannot decode the identifier: {error}") from None
    level = str(level_value or "").strip().upper()
    if not level:
        raise IdentifierError(S.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "no Query/Retrieve Level (0008,0052)",
                              _QUERY_RETRIEVE_LEVEL)
    if level not in _LEVELS:
        raise IdentifierError(S.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
                              f"Query/Retrieve Level {level} is not STUDY, SERIES or IMAGE", _QUERY_RETRIEVE_LEVEL)
    depth = _LEVELS.index(level)
    names = {_STUDY_UID: "Study Instance UID", _SERIES_UID: "Series Instance UID", _SOP_UID: "SOP Instance UID"}
    found: List[Tuple[str, ...]] = []
    for position, tag in enumerate((_STUDY_UID, _SERIES_UID, _SOP_UID)):
        values = keys[tag]
        if position > depth:
            if values:  # a key below the level: that would be a relational retrieve
                raise IdentifierError(S.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
                                      f"{names[tag]} below the {level} level (no relational retrieve)", tag)
            continue
        if not values:
            raise IdentifierError(S.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, f"{names[tag]} is required at {level} level",
                                  tag)
        if position < depth and len(values) != 1:
            raise IdentifierError(S.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
                                  f"one {names[tag]} above the {level} level, not {len(values)}", tag)
        for uid in values:
            if not is_received_uid(uid):
                raise IdentifierError(S.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, f"{names[tag]} is not a UID", tag)
        found.append(tuple(dict.fromkeys(values)))
    return RetrieveKeys(level, *found)


# --- presentation contexts --------------------------------------------------------------------------------


def propose_contexts(rows: Sequence[InstanceRow]) -> List[Tuple[str, Tuple[str, ...]]]:
    """The presentation contexts of the sub-association for these instances (see the module docstring)."""
    by_class: Dict[str, Dict[str, int]] = {}
    for row in rows:
        counts = by_class.setdefault(row.sop_class, {})
        counts[row.transfer_syntax] = counts.get(row.transfer_syntax, 0) + 1
    classes = sorted(by_class)
    contexts = []
    for sop_class in classes:
        contexts += [(sop_class, (ts,)) for ts in sorted(by_class[sop_class])]
        contexts.append((sop_class, _FALLBACK_SYNTAXES))
    if len(contexts) <= MAX_CONTEXTS:
        return contexts
    contexts = []
    for sop_class in classes:
        contexts += [(sop_class, (ts,)) for ts in sorted(by_class[sop_class]) if ts not in UNCOMPRESSED_TRANSFER_SYNTAXES]
        contexts.append((sop_class, _FALLBACK_SYNTAXES))
    if len(contexts) <= MAX_CONTEXTS:
        return contexts
    ranked = sorted(classes, key=lambda c: (-sum(by_class[c].values()), c))[:MAX_CONTEXTS]
    merged = []
    for sop_class in sorted(ranked):
        stored = sorted(by_class[sop_class], key=lambda ts: (-by_class[sop_class][ts], ts))
        merged.append((sop_class, tuple(dict.fromkeys(stored + list(_FALLBACK_SYNTAXES)))))
    return merged


def choose_context(negotiated: Negotiated, sop_class: str, transfer_syntax: str) -> Optional[Tuple[str, bool]]:
    """(transfer syntax to send in, whether to convert) for an object, or None if it cannot be sent.

    The stored syntax itself when any context of the class was accepted in
    it; otherwise, for an uncompressed object, another uncompressed syntax
    accepted for the class (the same byte order first), converted.
    """
    accepted = [c.transfer_syntax for c in negotiated.contexts if c.accepted and c.abstract_syntax == sop_class]
    if transfer_syntax in accepted:
        return transfer_syntax, False
    if transfer_syntax not in UNCOMPRESSED_TRANSFER_SYNTAXES:
        return None
    big = transfer_syntax == EXPLICIT_VR_BIG_ENDIAN
    candidates = [ts for ts in _FALLBACK_SYNTAXES if ts in accepted]
    candidates.sort(key=lambda ts: (ts == EXPLICIT_VR_BIG_ENDIAN) != big)
    return (candidates[0], True) if candidates else None


# --- the archive's files (worker threads) --------------------------------------------------------------


def _swap_words(ds: Dataset) -> None:
    """Reverse the byte order of every OW/OF/OL/OD/OV value, nested ones too."""
    for element in ds:
        vr = str(element.VR)
        if vr == "SQ":
            for item in element.value or ():
                _swap_words(item)
        elif vr in _WORD_VRS and isinstance(element.value, (bytes, bytearray)):
            size = _WORD_VRS[vr]
            value = bytearray(element.value)
            usable = len(value) - len(value) % size
            for index in range(size):
                value[index:usable:size] = element.value[size - 1 - index:usable:size]
            element.value = bytes(value)


#: Attributes before (or after) the pixel data that conversion holds in memory at most.
MAX_CONVERTED_HEAD = 64 * 1024 * 1024
#: Pixel data is copied (and its words swapped) this much at a time.
CONVERT_CHUNK = 1024 * 1024


def _at_pixel_data(tag, vr, length) -> bool:
    return tag == 0x7FE00010


def _convert_attributes(ds: Dataset, stored_little: bool, target: str) -> bytes:
    """Attributes (no pixel data) re-encoded by pydicom in the uncompressed syntax ``target``."""
    if stored_little != (target != EXPLICIT_VR_BIG_ENDIAN):
        correct_ambiguous_vr(ds, stored_little)
        _swap_words(ds)
    return encode_dataset(ds, target)


def convert_stored_data_set(path: str, stored: str, target: str, tmp_dir: Optional[str] = None):
    """I/O thread: the stored object in another uncompressed transfer syntax, as (temporary file positioned
    at 0, length).  Only uncompressed objects are converted.

    As a stream, in bounded memory: the attributes before the pixel data (at
    most :data:`MAX_CONVERTED_HEAD`) are re-encoded by pydicom; the Pixel
    Data element gets a header in the target syntax and its value is copied
    :data:`CONVERT_CHUNK` at a time (its 16-bit words swapped when the byte
    order changes and it is OW); what follows it is re-encoded by pydicom.
    """
    if stored not in UNCOMPRESSED_TRANSFER_SYNTAXES or target not in UNCOMPRESSED_TRANSFER_SYNTAXES:
        raise ValueError(f"cannot convert {stored} to {target}: only uncompressed syntaxes are converted")
    implicit, little = stored == IMPLICIT_VR_LITTLE_ENDIAN, stored != EXPLICIT_VR_BIG_ENDIAN
    target_implicit, target_little = target == IMPLICIT_VR_LITTLE_ENDIAN, target != EXPLICIT_VR_BIG_ENDIAN
    spool = tempfile.TemporaryFile(dir=tmp_dir)
    try:
        with open(path, "rb") as source:
            start = data_set_offset(source)
            end = os.fstat(source.fileno()).st_size
            source.seek(start)
            head = read_dataset(source, implicit, little, stop_when=_at_pixel_data)
            pixel_at = source.tell()
            if pixel_at - start > MAX_CONVERTED_HEAD:
                raise ValueError(f"over {MAX_CONVERTED_HEAD} bytes of attributes before the pixel data")
            spool.write(_convert_attributes(head, little, target))
            if pixel_at < end:
                _copy_pixel_data(source, spool, head, implicit, little, target_implicit, target_little)
                rest = end - source.tell()
                if rest > MAX_CONVERTED_HEAD:
                    raise ValueError(f"over {MAX_CONVERTED_HEAD} bytes of attributes after the pixel data")
                if rest:
                    tail = read_dataset(io.BytesIO(source.read(rest)), implicit, little)
                    spool.write(_convert_attributes(tail, little, target))
        length = spool.tell()
        spool.seek(0)
    except BaseException:
        spool.close()
        raise
    return spool, length


def _copy_pixel_data(source, sink, head: Dataset, implicit: bool, little: bool, target_implicit: bool,
                     target_little: bool) -> None:
    """The top-level Pixel Data element at ``source``'s position, written to ``sink`` in the target syntax."""
    order = "<" if little else ">"
    header = source.read(8)
    if len(header) < 8:
        raise ValueError("the data set ends inside the Pixel Data element's header")
    if implicit:
        (length,) = struct.unpack(order + "L", header[4:8])
        vr = "OW" if int(head.get("BitsAllocated", 16) or 16) > 8 else "OB"
    else:
        vr = header[4:6].decode("ascii", "replace")
        extra = source.read(4)
        if len(extra) < 4:
            raise ValueError("the data set ends inside the Pixel Data element's header")
        (length,) = struct.unpack(order + "L", extra)
    if length == 0xFFFFFFFF:
        raise ValueError("encapsulated pixel data in an uncompressed transfer syntax")
    target_order = "<" if target_little else ">"
    tag = struct.pack(target_order + "HH", 0x7FE0, 0x0010)
    if target_implicit:
        sink.write(tag + struct.pack(target_order + "L", length))
    else:
        sink.write(tag + vr.encode("ascii") + b"\x00\x00" + struct.pack(target_order + "L", length))
    swap = vr == "OW" and little != target_little
    left = length
    while left:
        chunk = source.read(min(CONVERT_CHUNK, left))
        if not chunk:
            raise ValueError(f"the Pixel Data element ends {left} bytes short of its length")
        left -= len(chunk)
        if swap:
            words = array.array("H", chunk[: len(chunk) // 2 * 2])
            words.byteswap()
            chunk = words.tobytes() + chunk[len(chunk) // 2 * 2:]
        sink.write(chunk)


def failed_uid_list(uids: Sequence[str], transfer_syntax: str) -> Tuple[bytes, int]:
    """The identifier of a final response: Failed SOP Instance UID List (0008,0058), encoded in
    ``transfer_syntax``; returns (bytes, number of UIDs listed).  In explicit VR a UI value
    holds at most 65534 bytes, so a longer list is cut there."""
    listed = list(uids)
    if transfer_syntax != IMPLICIT_VR_LITTLE_ENDIAN:
        total = -1
        for count, uid in enumerate(listed):
            total += len(uid) + 1
            if total + (total % 2) > 0xFFFE:
                listed = listed[:count]
                break
    ds = Dataset()
    ds.FailedSOPInstanceUIDList = listed if len(listed) != 1 else listed[0]
    return encode_dataset(ds, transfer_syntax), len(listed)


# --- the service -------------------------------------------------------------------------------------------


@dataclass
class _Move:
    """One C-MOVE being served: counts and what the final response says."""

    request: object
    destination: str
    started: float
    rows: List[InstanceRow] = field(default_factory=list)
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: List[str] = field(default_factory=list)
    cancelled: bool = False
    last_pending: float = 0.0

    @property
    def remaining(self) -> int:
        return len(self.rows) - self.completed - self.failed - self.warning

    def counts(self, with_remaining: bool) -> Dict[str, int]:
        counts = {
            "NumberOfCompletedSuboperations": self.completed,
            "NumberOfFailedSuboperations": self.failed,
            "NumberOfWarningSuboperations": self.warning,
        }
        if with_remaining:
            counts["NumberOfRemainingSuboperations"] = self.remaining
        return counts


class _SubOperationFailed(Exception):
    """A sub-operation that could not be attempted (no context, unreadable file): the move goes on."""


#: ``connect(host, port, calling, called, contexts, *, max_pdu, timeouts, implementation_class_uid,
#: implementation_version_name[, endpoint]) -> Deferred[Association]``: :func:`appliance.net.requestor.connect`
#: bound to a reactor, or a test's in-memory association.  ``endpoint`` is passed only for a destination
#: with ``tls = true`` (TCP then TLS, from :meth:`appliance.net.tls.TLSContexts.client_endpoint`).
Connect = Callable[..., defer.Deferred]


@implementer(IServiceClass)
class RetrieveService:
    """The Disk-Server's Study Root C-MOVE SCP."""

    operations = frozenset({D.CommandField.C_MOVE_RQ})

    def __init__(
        self,
        config: ApplianceConfig,
        archive: Archive,
        *,
        reactor=None,
        connect: Optional[Connect] = None,
        clock=None,
        pending_interval: float = 0.5,
        pending_every: int = 100,
        tls=None,
    ) -> None:
        self.archive = archive
        #: TLSContexts: the contexts of destinations with ``tls = true``
        self.tls = tls
        self.ae_title = config.disk_server.ae_title
        self.implementation_class_uid = config.implementation_class_uid
        self.implementation_version_name = config.implementation_version_name
        self.devices: Dict[str, DeviceConfig] = {}
        for device in config.devices.values():
            self.devices.setdefault(device.ae_title, device)  # the first device configured for a title
        # in the appliance the archive's clock is the reactor (tap.py)
        self.clock = clock if clock is not None else archive.clock
        self.reactor = reactor if reactor is not None else archive.clock
        self.connect: Connect = connect if connect is not None else partial(requestor.connect, self.reactor)
        self.pending_interval = pending_interval
        self.pending_every = pending_every
        self.abstract_syntaxes: Mapping[str, Tuple[str, ...]] = {STUDY_ROOT_MOVE: UNCOMPRESSED_TRANSFER_SYNTAXES}
        self._moves: Dict[int, _Move] = {}
        #: the Disk-Server's Message IDs as requestor, unique across its sub-associations
        self.message_ids = requestor.MessageIds()

    # --- IServiceClass ---

    def open_data_set(self, request) -> BufferedDataSet:
        return BufferedDataSet(limit=IDENTIFIER_LIMIT)

    def handle(self, request):
        destination = (request.command.MoveDestination or "").strip()
        move = _Move(request, destination, self.clock.seconds())
        move.last_pending = move.started
        self._moves[id(request)] = move
        d = defer.ensureDeferred(self._serve(move))

        def forget(result):
            self._moves.pop(id(request), None)
            return result

        return d.addBoth(forget)

    def cancel(self, request) -> None:
        """C-CANCEL: stop after the sub-operation in flight and answer FE00 (PS3.4 C.4.2.3.2)."""
        move = self._moves.get(id(request))
        if move is not None and not move.cancelled:
            move.cancelled = True
            _log.debug("C-MOVE {message_id} to {destination}: C-CANCEL received", message_id=request.message_id,
                       destination=move.destination)

    # --- serving a move ---

    async def _serve(self, move: _Move) -> None:
        request = move.request
        device = self.devices.get(move.destination)
        if device is None:
            self._finish(move, S.MOVE_DESTINATION_UNKNOWN, f"move destination {move.destination!r} is unknown",
                         counts=False)
            return
        try:
            keys = parse_identifier(request.data or b"", request.context.transfer_syntax)
        except IdentifierError as error:
            extra = {"OffendingElement": error.offending} if error.offending is not None else {}
            self._finish(move, error.status, error.comment, counts=False, **extra)
            return
        pinned = list(keys.study_uids)
        for study_uid in pinned:
            self.archive.pin(study_uid)
        try:
            rows = await self.archive.db(
                self.archive.index.retrieve_instances, keys.study_uids, keys.series_uids, keys.sop_uids)
            # a study whose deletion began before our pin is going away: its instances no longer match
            move.rows = [row for row in rows if not self.archive.being_deleted(row.study_uid)]
            if not move.rows:
                self._finish(move, S.SUCCESS, f"{keys.level}: nothing matched")
                return
            await self.archive.touch(sorted({row.study_uid for row in move.rows}))
            await self._transfer(move, device)
        finally:
            for study_uid in pinned:
                self.archive.unpin(study_uid)

    async def _transfer(self, move: _Move, device: DeviceConfig) -> None:
        if move.cancelled or not self._still_wanted(move):
            self._finish(move, S.CANCEL, None if move.cancelled else "the C-MOVE association ended")
            return
        where = f"{device.ae_title} at {device.host}:{device.port}"
        if device.tls is not None and (self.tls is None or device.name not in self.tls.clients):
            self._fail_all(move, move.rows)
            _log.error("C-MOVE to {where}: [devices.{name}] has tls = true but no TLS context was built",
                       where=where, name=device.name)
            self._finish(move, UNABLE_TO_PROCESS, f"no TLS context for {device.ae_title}")
            return
        try:
            association = await requestor.connect_device(
                self.reactor, device, self.ae_title, propose_contexts(move.rows),
                implementation_class_uid=self.implementation_class_uid,
                implementation_version_name=self.implementation_version_name,
                tls=self.tls, message_ids=self.message_ids, opener=self.connect,
            )
        except requestor.AssociationError as error:
            self._fail_all(move, move.rows)
            if isinstance(error, requestor.AssociationRejected):
                rejection = error.rejection
                why = describe_rejection(rejection).split(": ", 1)[-1].split(" (")[0]
                comment = (f"association rejected ({rejection.result},{rejection.source},{rejection.reason}) "
                           f"by {device.ae_title}: {why}")
            elif isinstance(error, (requestor.ConnectionFailed, requestor.AssociationTimeout)):
                # the destination first: the Error Comment keeps 64 characters (a TLS failure names no address)
                text = str(error)
                comment = text if device.ae_title in text[:64] else f"{device.ae_title}: {text}"
            else:
                comment = f"{device.ae_title}: {error}"
            _log.warn("C-MOVE to {where}: no sub-association: {error}", where=where, error=error)
            self._finish(move, UNABLE_TO_PROCESS, comment)
            return
        try:
            await self._sub_operations(move, device, association)
        except BaseException:
            association.abort("C-MOVE ended by an internal error")
            raise

    async def _sub_operations(self, move: _Move, device: DeviceConfig, association) -> None:
        rows = move.rows
        #: the next sub-operation's object, opened on an I/O thread while the current one is sent (the hand-off
        #: to a thread and back no longer waits between two sub-operations)
        following: Optional[defer.Deferred] = None
        try:
            for index, row in enumerate(rows):
                if move.cancelled or not self._still_wanted(move):
                    break
                opening, following = following or self._open(association, row), None
                if index + 1 < len(rows):
                    following = self._open(association, rows[index + 1])
                try:
                    response = await self._store(move, association, row, opening)
                except _SubOperationFailed as error:
                    move.failed += 1
                    move.failed_uids.append(row.sop_uid)
                    _log.warn("C-MOVE to {destination}: sub-operation for {sop} failed: {why}",
                              destination=device.ae_title, sop=row.sop_uid, why=error)
                    self._maybe_pending(move)
                    continue
                except requestor.AssociationError as error:
                    move.failed += 1
                    move.failed_uids.append(row.sop_uid)
                    self._fail_all(move, rows[index + 1:])
                    _log.warn("C-MOVE to {destination}: sub-association lost during the C-STORE of {sop}: {error}",
                              destination=device.ae_title, sop=row.sop_uid, error=error)
                    await self._end(association, device)  # in case it is still open
                    self._finish(move, S.SUBOPERATIONS_FAILED, f"sub-association to {device.ae_title} lost: {error}")
                    return
                category = S.category(response.status)
                if category == "success":
                    move.completed += 1
                elif category == "warning":
                    move.warning += 1
                else:
                    move.failed += 1
                    move.failed_uids.append(row.sop_uid)
                    self._fail_all(move, rows[index + 1:])
                    comment = response.command.ErrorComment
                    _log.warn("C-MOVE to {destination}: C-STORE of {sop} answered {status}{comment}; "
                              "sub-association ended, {rest} remaining sub-operations failed",
                              destination=device.ae_title, sop=row.sop_uid, status=S.describe(response.status),
                              comment=f" ({comment})" if comment else "", rest=len(rows) - index - 1)
                    await self._end(association, device)
                    self._finish(move, S.SUBOPERATIONS_FAILED,
                                 f"{device.ae_title} answered a C-STORE 0x{response.status:04X}; sub-association ended")
                    return
                self._maybe_pending(move)
        finally:
            if following is not None:  # opened for a sub-operation that will not be: closed
                following.addCallbacks(lambda opened: opened[0].close(), lambda failure: None)
        await self._end(association, device)
        if move.cancelled:
            self._finish(move, S.CANCEL, None)
        elif not self._still_wanted(move):
            self._finish(move, S.CANCEL, "the C-MOVE association ended")
        elif move.failed and not move.completed and not move.warning:  # PS3.4 C.4.2.3.1: all unsuccessful
            self._finish(move, S.SUBOPERATIONS_FAILED,
                         f"none of the {move.failed} sub-operations succeeded (the Failed SOP Instance UID List "
                         f"names them; the log says why each failed)")
        elif move.failed or move.warning:
            self._finish(move, S.WARNING, None)
        else:
            self._finish(move, S.SUCCESS, None)

    def _open(self, association, row: InstanceRow) -> defer.Deferred:
        """The object of one sub-operation opened (converted if the destination needs another syntax) on an I/O
        thread: fires with (file, length, transfer syntax), or fails with _SubOperationFailed."""
        choice = choose_context(association.negotiated, row.sop_class, row.transfer_syntax)
        if choice is None:
            compressed = row.transfer_syntax not in UNCOMPRESSED_TRANSFER_SYNTAXES
            return defer.fail(_SubOperationFailed(
                f"the destination accepted no context for {row.sop_class} in {row.transfer_syntax}"
                + (" (compressed, never decoded: only its own syntax will do)" if compressed
                   else " or another uncompressed syntax")
            ))
        transfer_syntax, convert = choice
        try:
            path = self.archive.store.absolute(row.path)
        except Exception as error:
            return defer.fail(_SubOperationFailed(f"cannot read the stored object: {type(error).__name__}: {error}"))
        if convert:
            opening = self.archive.io(convert_stored_data_set, path, row.transfer_syntax, transfer_syntax,
                                      self.archive.store.tmp)
        else:
            opening = self.archive.io(open_stored_data_set, path)

        def failed(failure):
            raise _SubOperationFailed(f"cannot read the stored object: {failure.type.__name__}: "
                                      f"{failure.getErrorMessage()}")

        return opening.addCallbacks(lambda opened: (opened[0], opened[1], transfer_syntax), failed)

    async def _store(self, move: _Move, association, row: InstanceRow, opening: defer.Deferred
                     ) -> requestor.Response:
        """One C-STORE sub-operation of the object ``opening`` gives; raises _SubOperationFailed when it cannot be
        attempted."""
        source, length, transfer_syntax = await opening
        request = move.request
        command = D.Command(
            CommandField=D.CommandField.C_STORE_RQ,
            AffectedSOPClassUID=row.sop_class,
            AffectedSOPInstanceUID=row.sop_uid,
            Priority=request.command.Priority or 0,  # prioritisation is not supported: passed on
            MoveOriginatorApplicationEntityTitle=request.association.record.calling,
            MoveOriginatorMessageID=request.message_id,
        )
        try:
            stream = association.request_from_file(row.sop_class, command, source, length, transfer_syntax)
            return await defer.ensureDeferred(stream.final())
        finally:
            source.close()

    async def _end(self, association, device: DeviceConfig) -> None:
        """Release the sub-association; abort it when the release is not confirmed in time."""
        if not association.is_open:
            return
        released = association.release()
        released.addTimeout(device.timeout, self.clock)
        try:
            await released
        except Exception as error:
            association.abort(f"A-RELEASE not confirmed: {error}")

    # --- responses ---

    def _still_wanted(self, move: _Move) -> bool:
        """False once the C-MOVE's own association ended (nobody would read the responses)."""
        return move.request.association.current is move.request

    @staticmethod
    def _fail_all(move: _Move, rows: Sequence[InstanceRow]) -> None:
        move.failed += len(rows)
        move.failed_uids.extend(row.sop_uid for row in rows)

    def _maybe_pending(self, move: _Move) -> None:
        """A pending response after each sub-operation; in moves of more than ``pending_every``
        sub-operations, at most one per ``pending_interval`` seconds.  None after the last one:
        the final response follows at once."""
        now = self.clock.seconds()
        if not move.remaining:
            return
        if len(move.rows) <= self.pending_every or now - move.last_pending >= self.pending_interval:
            move.last_pending = now
            move.request.respond(S.PENDING, **move.counts(with_remaining=True))

    def _finish(self, move: _Move, status: int, comment: Optional[str], counts: bool = True, **extra) -> None:
        """The final response, and the move's one log line."""
        request = move.request
        elements = dict(extra)
        if counts:
            elements.update(move.counts(with_remaining=status == S.CANCEL))
        if comment and S.category(status) not in ("success", "pending"):
            elements["ErrorComment"] = _comment(comment)
        data = None
        listed = 0
        if move.failed_uids:
            data, listed = failed_uid_list(move.failed_uids, request.context.transfer_syntax)
        request.respond(status, data, **elements)
        duration = self.clock.seconds() - move.started
        _log.info(
            "C-MOVE {message_id} from {calling} to {destination}: {status}{comment}; {total} matched, "
            "{completed} completed, {failed} failed, {warned} warning, {remaining} not attempted; {duration:.3f} s"
            "{cut}",
            message_id=request.message_id,
            calling=request.association.record.calling,
            destination=move.destination or "''",
            status=S.describe(status),
            comment=f" ({comment})" if comment else "",
            total=len(move.rows),
            completed=move.completed,
            failed=move.failed,
            warned=move.warning,  # not 'warning': trial's log observer takes that for a Python warning
            remaining=move.remaining,
            duration=duration,
            cut=(f"; Failed SOP Instance UID List cut to {listed} of {len(move.failed_uids)}"
                 if listed < len(move.failed_uids) else ""),
        )
