"""Data sets made by the tests, and pydicom's own test files."""

from __future__ import annotations

import io
import os
import struct

import pydicom
from pydicom.dataset import Dataset
from pydicom.filewriter import write_dataset

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

TEST_FILES = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files")
CHARSET_FILES = os.path.join(os.path.dirname(pydicom.__file__), "data", "charset_files")


def make_dataset(
    patient: str = "Test^Patient",
    patient_id: str = "PID1",
    study: str = "1.2.826.0.1.1",
    series: str = "1.2.826.0.1.1.1",
    sop: str = "1.2.826.0.1.1.1.1",
    sop_class: str = CT_IMAGE_STORAGE,
    modality: str = "CT",
    pixels: bytes = b"\x00\x01" * 16,
    bits_allocated: int = 16,
) -> Dataset:
    """A small image data set with the attributes the index keeps."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACC1"
    ds.Modality = modality
    ds.PatientName = patient
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Columns = min(512, len(pixels) // (bits_allocated // 8))
    ds.Rows = len(pixels) // (ds.Columns * (bits_allocated // 8))
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_allocated
    ds.HighBit = bits_allocated - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels
    ds["PixelData"].VR = "OW" if bits_allocated == 16 else "OB"
    return ds


def encode_dataset(ds: Dataset, transfer_syntax: str) -> bytes:
    """The data set's bytes in one of the three uncompressed transfer syntaxes."""
    buffer = pydicom.filebase.DicomBytesIO()
    buffer.is_little_endian = transfer_syntax != "1.2.840.10008.1.2.2"
    buffer.is_implicit_VR = transfer_syntax == "1.2.840.10008.1.2"
    write_dataset(buffer, ds)
    return buffer.getvalue()


def file_meta_bytes(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """Preamble, 'DICM' and a File Meta Information (with its group length) written by pydicom."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = UID(PYDICOM_IMPLEMENTATION_UID)
    buffer = io.BytesIO()
    buffer.write(bytes(128) + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return buffer.getvalue()


def part10_bytes(ds: Dataset, transfer_syntax: str) -> bytes:
    """``ds`` as a Part 10 file in ``transfer_syntax`` (uncompressed), by pydicom."""
    return file_meta_bytes(ds.SOPClassUID, ds.SOPInstanceUID, transfer_syntax) + encode_dataset(ds, transfer_syntax)


def write_part10(path: str, ds: Dataset, transfer_syntax: str) -> str:
    """Write ``ds`` as a Part 10 file at ``path``; return the path."""
    with open(path, "wb") as handle:
        handle.write(part10_bytes(ds, transfer_syntax))
    return path


_LONG_VRS = (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV")


def dataset_offset(data: bytes) -> int:
    """Where the data set of a Part 10 file starts: after 'DICM' and the File Meta Information.

    Computed from the File Meta Information Group Length (0002,0000) when the
    file has one, else by walking the group 0002 elements (explicit VR little
    endian, PS3.10 7.1).
    """
    if data[128:132] != b"DICM":
        raise ValueError("not a Part 10 file: no 'DICM' at byte 128")
    position = 132
    if data[position:position + 6] == b"\x02\x00\x00\x00UL":
        (length,) = struct.unpack("<H", data[position + 6:position + 8])
        (group_length,) = struct.unpack("<L", data[position + 8:position + 8 + length])
        return position + 8 + length + group_length
    while data[position:position + 2] == b"\x02\x00":
        vr = data[position + 4:position + 6]
        if vr in _LONG_VRS:
            (length,) = struct.unpack("<L", data[position + 8:position + 12])
            position += 12 + length
        else:
            (length,) = struct.unpack("<H", data[position + 6:position + 8])
            position += 8 + length
    return position


def dataset_bytes(path: str) -> bytes:
    """The data set bytes of the Part 10 file at ``path`` (what follows its File Meta Information)."""
    with open(path, "rb") as handle:
        data = handle.read()
    return data[dataset_offset(data):]
