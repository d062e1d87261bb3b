"""Data sets made by the tests, and pydicom's own test files."""

from __future__ import annotations

import io
import os

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
