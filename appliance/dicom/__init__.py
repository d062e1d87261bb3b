"""The DICOM protocol core, without I/O: PDUs, the PS3.8 state machine, negotiation and DIMSE.

Nothing in this package imports twisted, socket or time: bytes and events go
in, bytes and events (timer requests included) come out.
"""
