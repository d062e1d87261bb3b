"""A DICOM network appliance: Disk-Server, Memory-Server, Web Software-Server and Memory-Manager."""

__version__ = "0.1.0"
