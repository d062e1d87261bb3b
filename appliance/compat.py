"""The one place where library versions differ.

The appliance runs on the versions Debian 12 packages (Python 3.11,
Twisted 22.4, pydicom 2.3, pyOpenSSL 23, service-identity 18), on Debian 13's,
and on the newest releases from PyPI.  Anything that has to know which one is
loaded lives here.
"""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Debian 12 and later ship Python 3.11+
    import tomli as tomllib

import pydicom

__all__ = [
    "tomllib",
    "PYDICOM_VERSION",
    "decode_dataset",
    "encode_dataset",
    "pydicom_reads_by_default",
    "pydicom_converts_json_by_default",
    "can_encode_text",
    "certificate_validity",
    "peer_certificate",
    "verify_error_text",
    "image_dataset",
    "pixel_decoders",
    "missing_decoders",
    "encapsulated_frame",
    "encapsulate_frame",
    "decode_frame",
    "apply_color_lut",
]

PYDICOM_VERSION = tuple(int(part) for part in pydicom.__version__.split(".")[:2] if part.isdigit())


def _syntax_flags(transfer_syntax: str):
    """(implicit VR, little endian) of an uncompressed transfer syntax."""
    if transfer_syntax == "1.2.840.10008.1.2":
        return True, True
    if transfer_syntax == "1.2.840.10008.1.2.2":
        return False, False
    return False, True


def decode_dataset(data: bytes, transfer_syntax: str):
    """A data set (a C-FIND or C-MOVE identifier) from its bytes in an uncompressed transfer syntax."""
    from io import BytesIO

    from pydicom.filereader import read_dataset

    implicit, little = _syntax_flags(transfer_syntax)
    return read_dataset(BytesIO(data), implicit, little)


def encode_dataset(dataset, transfer_syntax: str) -> bytes:
    """A data set's bytes in an uncompressed transfer syntax (pydicom 2.3 and 3.x alike)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    implicit, little = _syntax_flags(transfer_syntax)
    buffer = DicomBytesIO()
    buffer.is_implicit_VR = implicit
    buffer.is_little_endian = little
    write_dataset(buffer, dataset)
    return buffer.getvalue()


def pydicom_reads_by_default() -> bool:
    """Whether pydicom converts raw elements exactly as its defaults say (what the ingest's fast path mimics).

    False when an application or test changed a setting that alters decoded
    values: validation that raises, numpy or Decimal numbers, date/time
    objects, None for empty text, a raw element callback, or (pydicom 3)
    replaced conversion hooks.
    """
    from pydicom import config

    if (config.datetime_conversion or config.use_none_as_empty_text_VR_value or config.use_DS_numpy
            or config.use_IS_numpy or config.use_DS_decimal or config.data_element_callback is not None
            or config.settings.reading_validation_mode == config.RAISE):
        return False
    try:
        from pydicom import hooks
    except ImportError:  # pydicom 2: no hooks
        return True
    return (hooks.hooks.raw_element_vr is hooks.raw_element_vr
            and hooks.hooks.raw_element_value is hooks.raw_element_value
            and not hooks.hooks.raw_element_kwargs)


def pydicom_converts_json_by_default() -> bool:
    """Whether pydicom turns DICOM JSON into bytes exactly as its defaults say (what the C-FIND responses'
    fast path, :mod:`appliance.archive.encode`, mimics).

    False when an application or test changed a setting that alters the values
    ``Dataset.from_json`` makes or what ``write_dataset`` does with them:
    Decimal or numpy numbers, date/time objects, None for empty text,
    validation that raises (reading: on conversion; writing: pydicom 2.3
    validates encoded text).
    """
    from pydicom import config

    settings = config.settings
    return not (config.datetime_conversion or config.use_none_as_empty_text_VR_value or config.use_DS_decimal
                or config.use_DS_numpy or config.use_IS_numpy
                or settings.reading_validation_mode == config.RAISE
                or settings.writing_validation_mode == config.RAISE)


def can_encode_text(text: str, encodings) -> bool:
    """Whether ``pydicom.charset.encode_string(text, encodings)`` encodes ``text`` without replacing any
    character, for Python ``encodings`` as ``convert_encodings`` makes them.

    encode_string's own steps, in its order (each encoding alone with its escape sequences, then the
    string split between them), stopping where it would warn and substitute; any error on the way is a
    no, as it was when this was encode_string under ``warnings.simplefilter("error")``.  No warning
    filter is touched: ``warnings.catch_warnings`` is process-wide and not thread-safe, and this runs
    on worker threads.  The helpers are private to pydicom, the same in 2.3 and 3.x.
    """
    from pydicom.charset import (
        _encode_string_impl,
        _encode_string_parts,
        _get_escape_sequence_for_encoding,
        handled_encodings,
        need_tail_escape_sequence_encodings,
    )

    try:
        for index, encoding in enumerate(encodings):
            try:
                encoded = _encode_string_impl(text, encoding)
                if index > 0 and encoding not in handled_encodings:
                    _get_escape_sequence_for_encoding(encoding, encoded=encoded)
                if encoding in need_tail_escape_sequence_encodings:
                    _get_escape_sequence_for_encoding(encodings[0])
                return True
            except UnicodeError:
                continue
        if len(encodings) > 1:
            try:
                _encode_string_parts(text, encodings)
                return True
            except ValueError:
                pass
        return False
    except (UnicodeError, LookupError, ValueError):
        return False


# --- Pixel data: pydicom 2.3 (pixel_data_handlers) and 3.x (pixels) ------------------------------------------
#
# pydicom 2.3 decodes through handler modules listed in config.pixel_data_handlers and returns arrays in the
# data set's colour space (JPEG YBR stays YBR); pydicom 3 has one Decoder per transfer syntax with plugins,
# decodes one frame on request and converts YBR_FULL and YBR_FULL_422 to RGB, saying so in what it returns.

_JPEG_2000 = frozenset(("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
                        "1.2.840.10008.1.2.4.92", "1.2.840.10008.1.2.4.93"))


def image_dataset(data: bytes, encoding: str, pixel_syntax: str):
    """The data set in ``data`` (encoded as the uncompressed ``encoding``) ready for pixel decoding: its
    file meta says ``pixel_syntax``, and (pydicom 2) its byte order is set where the LUT helpers read it."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID

    ds = decode_dataset(data, encoding)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(pixel_syntax)
    if PYDICOM_VERSION < (3, 0):
        implicit, little = _syntax_flags(encoding)
        ds.is_implicit_VR, ds.is_little_endian = implicit, little
    return ds


def _transfer_syntaxes():
    from pydicom.uid import AllTransferSyntaxes

    return list(AllTransferSyntaxes)


def pixel_decoders():
    """Transfer syntax UID -> whether pydicom can decode its pixel data here, for every syntax pydicom knows."""
    if PYDICOM_VERSION >= (3, 0):
        from pydicom.pixels import get_decoder

        found = {}
        for uid in _transfer_syntaxes():
            try:
                found[str(uid)] = bool(get_decoder(uid).is_available)
            except NotImplementedError:
                found[str(uid)] = False
        return found
    from pydicom import config

    return {str(uid): any(handler.is_available() and handler.supports_transfer_syntax(uid)
                          for handler in config.pixel_data_handlers)
            for uid in _transfer_syntaxes()}


def missing_decoders(transfer_syntax: str) -> str:
    """pydicom's words on what this machine lacks to decode ``transfer_syntax``."""
    from pydicom.uid import UID

    uid = UID(transfer_syntax)
    if PYDICOM_VERSION >= (3, 0):
        from pydicom.pixels import get_decoder

        try:
            decoder = get_decoder(uid)
        except NotImplementedError as error:
            return str(error)
        return "; ".join(decoder.missing_dependencies) or "no decoding plugin is available"
    from importlib.util import find_spec

    from pydicom import config

    wanting = [handler for handler in config.pixel_data_handlers
               if handler.supports_transfer_syntax(uid) and not handler.is_available()]
    if not wanting:
        return f"no pixel data handler supports '{uid.name}'"
    def lacking(handler):
        names = [name for module, (_, name) in handler.DEPENDENCIES.items() if find_spec(module) is None]
        return " and ".join(names) or f"{handler.HANDLER_NAME} with a plugin for it"

    return "; ".join(f"{handler.HANDLER_NAME} - requires {lacking(handler)}" for handler in wanting)


def encapsulated_frame(ds, index: int, number_of_frames: int) -> bytes:
    """The compressed bytes of frame ``index`` of ``ds``'s encapsulated Pixel Data (PS3.5 A.4): by the Basic
    Offset Table, pydicom 3 also by the Extended Offset Table, else one fragment per frame or JPEG markers."""
    if PYDICOM_VERSION >= (3, 0):
        from pydicom.encaps import get_frame

        offsets = None
        if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
            offsets = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
        return get_frame(ds.PixelData, index, extended_offsets=offsets, number_of_frames=number_of_frames)
    from pydicom.encaps import generate_pixel_data_frame

    for position, frame in enumerate(generate_pixel_data_frame(ds.PixelData, number_of_frames)):
        if position == index:
            return frame
    raise ValueError(f"the encapsulated Pixel Data ends before frame {index}")


def encapsulate_frame(ds, frame: bytes) -> None:
    """Make ``ds`` a single-frame data set whose encapsulated Pixel Data is ``frame`` (the same in 2.3 and 3.x)."""
    from pydicom.encaps import encapsulate

    for keyword in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].is_undefined_length = True
    ds.NumberOfFrames = 1


def decode_frame(ds, transfer_syntax: str, index: int):
    """(frame ``index`` of ``ds``'s pixel data as an array, the photometric interpretation of that array).

    pydicom 3: the decoder's own answer (it converts YBR_FULL and YBR_FULL_422 to RGB and says so).
    pydicom 2.3: the array is in the data set's photometric interpretation after decoding (a handler that
    converts says so by changing it), except JPEG 2000's YBR_ICT and YBR_RCT, whose component transform
    every JPEG 2000 decoder reverses (PS3.5 8.2.4): those arrays are RGB.
    """
    if PYDICOM_VERSION >= (3, 0):
        from pydicom.pixels import get_decoder

        array, properties = get_decoder(transfer_syntax).as_array(ds, index=index)
        interpretation = properties.get("photometric_interpretation", ds.PhotometricInterpretation)
        return array, str(getattr(interpretation, "value", interpretation))
    array = ds.pixel_array
    frames = ds.get("NumberOfFrames") or 1
    if int(frames) > 1:
        array = array[index]
    interpretation = str(ds.PhotometricInterpretation)
    if interpretation in ("YBR_ICT", "YBR_RCT") and transfer_syntax in _JPEG_2000:
        interpretation = "RGB"
    return array, interpretation


def apply_color_lut(array, ds):
    """pydicom's Palette Color lookup (PS3.3 C.7.6.3.1.5, segmented ones C.7.9.2) of ``array``."""
    try:
        from pydicom.pixels import apply_color_lut as apply
    except ImportError:
        from pydicom.pixel_data_handlers.util import apply_color_lut as apply
    return apply(array, ds)


# --- TLS: pyOpenSSL 23 / cryptography 38 (Debian 12) and the newest releases -------------------------------


def certificate_validity(certificate):
    """(not before, not after) of a ``cryptography`` certificate, as timezone-aware UTC datetimes.

    cryptography 42 added the ``*_utc`` properties and deprecated the naive
    ones; Debian 12's cryptography 38 has only the naive ones.
    """
    from datetime import timezone

    if hasattr(certificate, "not_valid_after_utc"):
        return certificate.not_valid_before_utc, certificate.not_valid_after_utc
    return (certificate.not_valid_before.replace(tzinfo=timezone.utc),
            certificate.not_valid_after.replace(tzinfo=timezone.utc))


def peer_certificate(connection):
    """The peer's certificate of an ``OpenSSL.SSL.Connection`` as a ``cryptography`` certificate, or None.

    pyOpenSSL 24.3 added ``as_cryptography=True``; before, the X509 wrapper converts.
    """
    try:
        return connection.get_peer_certificate(as_cryptography=True)
    except TypeError:
        x509 = connection.get_peer_certificate()
        return x509.to_cryptography() if x509 is not None else None


def verify_error_text(code: int) -> str:
    """OpenSSL's words for an X.509 verification error code (X509_verify_cert_error_string)."""
    try:
        from OpenSSL._util import ffi, lib

        return ffi.string(lib.X509_verify_cert_error_string(code)).decode("ascii", "replace")
    except Exception:  # pragma: no cover - a binding without the function
        return f"X.509 verification error {code}"
