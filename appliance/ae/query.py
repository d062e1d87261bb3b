"""Study Root Query/Retrieve Information Model - FIND as SCP (PS3.4 C.4.1) over the archive's index.

The identifier is decoded with its own Specific Character Set; the query
runs on a read-only database connection in a worker thread and its matches
come back in batches, each answered as a pending response (FF00, or FF01
when some keys asked for are not supported) as soon as it is ready.  Between
batches the service waits for the association's write buffer to drain, and
checks for a C-CANCEL (answered FE00).  Responses are encoded in the
request's character set when it can carry every value, otherwise in UTF-8
(ISO_IR 192).

Each match is encoded on the worker thread that fetched it, in the same job
(:func:`response_encoder`): written straight from its DICOM JSON by
:func:`appliance.archive.encode.encode_identifier`, or, when that declines
(sequences with items, other character sets...), by pydicom
(:meth:`FindService._encode`), which gives the same bytes.  The reactor only
sends them.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Union

from pydicom.charset import convert_encodings
from pydicom.dataset import Dataset
from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from ..archive.archive import Archive, Runner
from ..archive.encode import encode_identifier, known_character_set
from ..archive.query import QueryError, QueryRun, build_query
from ..compat import can_encode_text, decode_dataset, encode_dataset
from ..dicom import dimse as D
from ..dicom import status as S
from ..dicom.uids import STUDY_ROOT_FIND, UNCOMPRESSED_TRANSFER_SYNTAXES
from ..interfaces import IServiceClass
from ..logs import logger
from ..net.protocol import BufferedDataSet

__all__ = ["FindService", "find_extended_negotiation", "known_character_set", "response_character_set",
           "response_encoder"]

_log = logger("appliance.find")

#: An identifier is a few KB; this bounds what one C-FIND-RQ may make us hold.
MAX_IDENTIFIER = 1024 * 1024
BATCH = 64
_TEXT_VRS = {"PN", "LO", "SH", "ST", "LT", "UC", "UT"}


def find_extended_negotiation(proposed: bytes) -> Optional[bytes]:
    """Our reply to Q/R FIND extended negotiation (PS3.4 C.5.1.1).

    Byte 1 relational queries: not supported (0).  Byte 2 combined date-time
    matching: supported when asked.  Bytes 3 and 4 (fuzzy person names,
    timezone adjustment): not supported.
    """
    if not proposed:
        return None
    reply = bytearray(min(len(proposed), 4))
    if len(proposed) >= 2 and proposed[1] == 1:
        reply[1] = 1
    return bytes(reply)


def _text_values(ds: Dataset):
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                yield from _text_values(item)
        elif element.VR in _TEXT_VRS and element.value not in (None, ""):
            value = element.value
            values = value if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]
            for single in values:
                yield str(single)


def response_character_set(ds: Dataset, requested: Optional[List[str]]) -> Optional[List[str]]:
    """The Specific Character Set for a response: the request's if it carries every value, else UTF-8.

    A request's character set that is not a defined term is never echoed:
    plain ASCII values then go without one, others in UTF-8.
    """
    if requested and not known_character_set(requested):
        requested = None
    texts = list(_text_values(ds))
    if all(text.isascii() for text in texts):
        return requested or None
    if requested:
        # encode_string would warn and substitute where the character set cannot carry a value
        encodings = convert_encodings(requested)
        if all(can_encode_text(text, encodings) for text in texts):
            return requested
    return ["ISO_IR 192"]


def response_encoder(level: str, requested: Optional[List[str]],
                     transfer_syntax: str) -> Callable[[dict], Union[bytes, Failure]]:
    """The function turning a match (DICOM JSON) into its response identifier's bytes, on a worker thread.

    The fast path when it answers, pydicom otherwise (the same bytes).  A match that cannot be encoded
    gives the Failure, raised when its turn to be sent comes, so that the matches before it are answered
    as they were when the reactor encoded them.
    """
    def encode(result: dict) -> Union[bytes, Failure]:
        try:
            data = encode_identifier(result, level, requested, transfer_syntax)
            if data is None:
                data = FindService._encode(result, level, requested, transfer_syntax)
            return data
        except Exception:
            return Failure()

    return encode


@implementer(IServiceClass)
class FindService:
    """C-FIND SCP for the Study Root information model."""

    operations = frozenset({D.CommandField.C_FIND_RQ})

    def __init__(
        self,
        archive: Archive,
        read: Runner,
        ae_title: str,
        insensitive_names: bool = False,
        max_results: int = 0,
    ) -> None:
        self.archive = archive
        self.read = read
        self.ae_title = ae_title
        self.insensitive_names = insensitive_names
        self.max_results = max_results
        self.abstract_syntaxes = {STUDY_ROOT_FIND: UNCOMPRESSED_TRANSFER_SYNTAXES}
        self.extended_negotiation = {STUDY_ROOT_FIND: find_extended_negotiation}
        self._cancelled: Dict[int, bool] = {}

    def open_data_set(self, request) -> BufferedDataSet:
        return BufferedDataSet(limit=MAX_IDENTIFIER)

    def cancel(self, request) -> None:
        if id(request) in self._cancelled:
            self._cancelled[id(request)] = True

    def handle(self, request):
        return defer.ensureDeferred(self._find(request))

    async def _find(self, request) -> None:
        transfer_syntax = request.context.transfer_syntax
        try:
            identifier = decode_dataset(request.data, transfer_syntax)
            requested = identifier.get("SpecificCharacterSet")
            requested_charsets = (
                [str(v) for v in requested] if isinstance(requested, (list, tuple)) or type(requested).__name__ == "MultiValue"
                else ([str(requested)] if requested else None)
            )
            identifier.decode()  # apply the identifier's own character set to its text values
        except Exception as error:  # any decoding problem is the requestor's
            request.respond(S.CANNOT_UNDERSTAND, ErrorComment=_comment(f"cannot decode identifier: {error}"))
            return
        extended = request.association.negotiated.extended.get(STUDY_ROOT_FIND, b"")
        try:
            query = build_query(
                identifier,
                insensitive_names=self.insensitive_names,
                combined_date_time=len(extended) >= 2 and extended[1] == 1,
                retrieve_ae_title=self.ae_title,
            )
        except QueryError as error:
            request.respond(error.status, ErrorComment=_comment(error.comment))
            return
        pending = S.PENDING_WARNING if query.unsupported else S.PENDING
        key = id(request)
        self._cancelled[key] = False
        run: Optional[QueryRun] = None
        sent = 0
        try:
            encoder = response_encoder(query.level, requested_charsets, transfer_syntax)
            run = await self.read(QueryRun, self.archive.index_path, query, encoder)
            while True:
                if _ended(request):
                    return  # the association ended (aborted, closed): no one to answer
                if self._cancelled[key]:
                    request.respond(S.CANCEL)
                    return
                batch = await self.read(run.fetch, BATCH)  # matching and encoding, on a worker thread
                for data in batch:
                    if self._cancelled[key] or _ended(request):
                        break
                    if self.max_results and sent >= self.max_results:
                        request.respond(
                            S.OUT_OF_RESOURCES,
                            ErrorComment=_comment(f"more than max_results={self.max_results} matches; narrow the query"),
                        )
                        return
                    if isinstance(data, Failure):
                        data.raiseException()  # a stored value pydicom could not encode
                    request.respond(pending, data)
                    sent += 1
                if run.done and not self._cancelled[key]:
                    break
                await request.association.writable()
            request.respond(S.SUCCESS)
        except Exception as error:  # the index could not be read, or a stored value not answered
            _log.failure("C-FIND at {query_level} level failed after {count} matches", query_level=query.level,
                         count=sent)
            request.respond(S.CANNOT_UNDERSTAND, ErrorComment=_comment(f"unable to process: {error}"))
        finally:
            del self._cancelled[key]
            request.association.done_writing()
            if run is not None:
                self.read(run.close)
            # not "level": Logger.emit takes that argument itself
            _log.debug("C-FIND at {query_level} level from {ae}: {count} matches", query_level=query.level,
                       ae=request.association.record.calling, count=sent)

    @staticmethod
    def _encode(result: dict, level: str, requested: Optional[List[str]], transfer_syntax: str) -> bytes:
        """A match's response identifier by pydicom: what :func:`encode_identifier` gives when it answers."""
        ds = Dataset.from_json(result)
        charset = response_character_set(ds, requested)
        response = Dataset()
        if charset:
            response.SpecificCharacterSet = charset if len(charset) > 1 else charset[0]
        response.QueryRetrieveLevel = level
        for element in ds:
            response.add(element)
        return encode_dataset(response, transfer_syntax)


def _ended(request) -> bool:
    """Whether the request's association has ended (it no longer waits for this request's answers)."""
    return request.association.current is not request


def _comment(text: str) -> str:
    return text.encode("ascii", "replace").decode("ascii")[:64]
