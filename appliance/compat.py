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
