"""DIMSE command sets, fragmentation and reassembly: appliance.dicom.dimse."""

from __future__ import annotations

import struct

from twisted.trial import unittest

from appliance.dicom import dimse as D
from appliance.dicom import pdu as P
from appliance.dicom.errors import DimseDecodeError

VERIFICATION = "1.2.840.10008.1.1"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def element(element_number: int, value: bytes) -> bytes:
    """One Implicit VR Little Endian element of group 0000: tag, 4-byte length, value."""
    return struct.pack("<HHL", 0x0000, element_number, len(value)) + value


def pdus_to_pdvs(pdus):
    """Decode encoded P-DATA-TF PDUs and return all their PDVs in order."""
    pdvs = []
    for raw in pdus:
        pdvs.extend(P.PDataTF.decode(raw).pdvs)
    return pdvs


# C-ECHO-RQ, message 1, built by hand (PS3.7 9.3.5.1, Implicit VR Little Endian):
ECHO_RQ_BYTES = (
    # (0000,0000) Command Group Length, UL, length 4, value 56 = 26 + 10 + 10 + 10
    b"\x00\x00\x00\x00" b"\x04\x00\x00\x00" b"\x38\x00\x00\x00"
    # (0000,0002) Affected SOP Class UID, UI, 17 characters padded with one NUL to 18
    b"\x00\x00\x02\x00" b"\x12\x00\x00\x00" b"1.2.840.10008.1.1\x00"
    # (0000,0100) Command Field, US, 0x0030 C-ECHO-RQ
    b"\x00\x00\x00\x01" b"\x02\x00\x00\x00" b"\x30\x00"
    # (0000,0110) Message ID, US, 1
    b"\x00\x00\x10\x01" b"\x02\x00\x00\x00" b"\x01\x00"
    # (0000,0800) Command Data Set Type, US, 0x0101 (no data set)
    b"\x00\x00\x00\x08" b"\x02\x00\x00\x00" b"\x01\x01"
)

# C-STORE-RQ, message 7, on behalf of a C-MOVE, built by hand:
STORE_RQ_BYTES = (
    # (0000,0000) Command Group Length, UL, value 116 = 34 + 10 + 10 + 10 + 10 + 18 + 14 + 10
    b"\x00\x00\x00\x00" b"\x04\x00\x00\x00" b"\x74\x00\x00\x00"
    # (0000,0002) Affected SOP Class UID, UI, CT Image Storage: 25 characters + NUL = 26
    b"\x00\x00\x02\x00" b"\x1a\x00\x00\x00" b"1.2.840.10008.5.1.4.1.1.2\x00"
    # (0000,0100) Command Field, US, 0x0001 C-STORE-RQ
    b"\x00\x00\x00\x01" b"\x02\x00\x00\x00" b"\x01\x00"
    # (0000,0110) Message ID, US, 7
    b"\x00\x00\x10\x01" b"\x02\x00\x00\x00" b"\x07\x00"
    # (0000,0700) Priority, US, 0 MEDIUM
    b"\x00\x00\x00\x07" b"\x02\x00\x00\x00" b"\x00\x00"
    # (0000,0800) Command Data Set Type, US, 0x0000 (a data set follows)
    b"\x00\x00\x00\x08" b"\x02\x00\x00\x00" b"\x00\x00"
    # (0000,1000) Affected SOP Instance UID, UI, 9 characters + NUL = 10
    b"\x00\x00\x00\x10" b"\x0a\x00\x00\x00" b"1.2.3.4.5\x00"
    # (0000,1030) Move Originator Application Entity Title, AE, 5 characters + SPACE = 6
    b"\x00\x00\x30\x10" b"\x06\x00\x00\x00" b"MOVER "
    # (0000,1031) Move Originator Message ID, US, 3
    b"\x00\x00\x31\x10" b"\x02\x00\x00\x00" b"\x03\x00"
)


def echo_rq() -> D.Command:
    return D.Command(
        CommandField=D.CommandField.C_ECHO_RQ,
        MessageID=1,
        AffectedSOPClassUID=VERIFICATION,
        CommandDataSetType=D.NO_DATA_SET,
    )


def store_rq() -> D.Command:
    # keywords deliberately not in tag order: encode() sorts them
    return D.Command(
        MoveOriginatorMessageID=3,
        AffectedSOPInstanceUID="1.2.3.4.5",
        CommandField=D.CommandField.C_STORE_RQ,
        MoveOriginatorApplicationEntityTitle="MOVER",
        MessageID=7,
        Priority=D.Priority.MEDIUM,
        CommandDataSetType=0x0000,
        AffectedSOPClassUID=CT_STORAGE,
    )


class CommandEncodingTests(unittest.TestCase):
    """Command.encode() and Command.decode() against hand-built bytes."""

    def test_echo_rq_encodes_to_golden_bytes(self):
        """A C-ECHO-RQ encodes to the hand-built bytes: group length first, UI padded with NUL."""
        self.assertEqual(echo_rq().encode(), ECHO_RQ_BYTES)

    def test_store_rq_encodes_to_golden_bytes(self):
        """A C-STORE-RQ encodes in tag order, UI padded with NUL, AE padded with a space."""
        self.assertEqual(store_rq().encode(), STORE_RQ_BYTES)

    def test_explicit_group_length_is_recomputed(self):
        """A stale Command Group Length set by the caller is replaced by the real one."""
        command = echo_rq()
        command.CommandGroupLength = 9999
        self.assertEqual(command.encode(), ECHO_RQ_BYTES)

    def test_echo_rq_decodes(self):
        """The C-ECHO-RQ bytes decode to the values, padding stripped, group length included."""
        command = D.Command.decode(ECHO_RQ_BYTES)
        self.assertEqual(
            command.items(),
            [
                ("CommandGroupLength", 56),
                ("AffectedSOPClassUID", VERIFICATION),
                ("CommandField", 0x0030),
                ("MessageID", 1),
                ("CommandDataSetType", 0x0101),
            ],
        )
        self.assertEqual(command.command_field, D.CommandField.C_ECHO_RQ)
        self.assertFalse(command.has_data_set)

    def test_store_rq_decodes(self):
        """The C-STORE-RQ bytes decode with the UI's NUL and the AE's space removed."""
        command = D.Command.decode(STORE_RQ_BYTES)
        self.assertEqual(command.AffectedSOPClassUID, CT_STORAGE)
        self.assertEqual(command.AffectedSOPInstanceUID, "1.2.3.4.5")
        self.assertEqual(command.MoveOriginatorApplicationEntityTitle, "MOVER")
        self.assertEqual(command.MoveOriginatorMessageID, 3)
        self.assertEqual(command.MessageID, 7)
        self.assertEqual(command.Priority, 0)
        self.assertTrue(command.has_data_set)
        self.assertEqual(command.command_field, D.CommandField.C_STORE_RQ)

    def test_round_trip_reencodes_identically(self):
        """Decoding then encoding gives back the same bytes."""
        self.assertEqual(D.Command.decode(STORE_RQ_BYTES).encode(), STORE_RQ_BYTES)

    def test_missing_element_reads_none(self):
        """An element not in the command set reads as None; a non-command keyword is an AttributeError."""
        command = echo_rq()
        self.assertIsNone(command.Status)
        self.assertNotIn("Status", command)
        self.assertRaises(AttributeError, getattr, command, "PatientName")


class CommandDecodeErrorTests(unittest.TestCase):
    """Malformed command sets raise DimseDecodeError."""

    def test_element_outside_group_0000(self):
        """An element of group 0008 in a command set is refused."""
        data = element(0x0100, b"\x30\x00") + struct.pack("<HHL", 0x0008, 0x0016, 2) + b"1\x00"
        error = self.assertRaises(DimseDecodeError, D.Command.decode, data)
        self.assertIn("(0008,0016) outside group 0000", str(error))

    def test_length_overruns_command_set(self):
        """An element declaring more bytes than remain is refused."""
        data = element(0x0100, b"\x30\x00") + struct.pack("<HHL", 0, 0x0110, 100) + b"\x01\x00"
        error = self.assertRaises(DimseDecodeError, D.Command.decode, data)
        self.assertIn("length 100 overruns", str(error))

    def test_undefined_length_refused(self):
        """An element with undefined length (0xFFFFFFFF) is refused."""
        data = struct.pack("<HHL", 0, 0x0100, 0xFFFFFFFF) + b"\x30\x00"
        self.assertRaises(DimseDecodeError, D.Command.decode, data)

    def test_out_of_order(self):
        """Elements must come in ascending tag order."""
        data = element(0x0100, b"\x30\x00") + element(0x0002, b"1.2\x00")
        error = self.assertRaises(DimseDecodeError, D.Command.decode, data)
        self.assertIn("(0000,0002) is out of order", str(error))

    def test_repeated_element(self):
        """The same element twice is out of order."""
        data = element(0x0100, b"\x30\x00") + element(0x0100, b"\x30\x00")
        self.assertRaises(DimseDecodeError, D.Command.decode, data)

    def test_wrong_us_length(self):
        """A US element (Command Field) of length 4 is refused."""
        data = element(0x0100, b"\x30\x00\x00\x00")
        error = self.assertRaises(DimseDecodeError, D.Command.decode, data)
        self.assertIn("(0000,0100) (US) has length 4", str(error))

    def test_wrong_ul_length(self):
        """The UL Command Group Length of length 2 is refused."""
        self.assertRaises(DimseDecodeError, D.Command.decode, element(0x0000, b"\x00\x00"))

    def test_stray_trailing_bytes(self):
        """Fewer than 8 bytes after the last element are refused."""
        self.assertRaises(DimseDecodeError, D.Command.decode, ECHO_RQ_BYTES + b"\x00\x00\x00")


class FragmentTests(unittest.TestCase):
    """fragment(): P-DATA-TF PDUs within the peer's maximum length."""

    def parse(self, pdu: bytes):
        """(pdu length field, pdv length, context id, header byte, value) of a one-PDV P-DATA-TF."""
        pdu_type, length = struct.unpack_from(">BxL", pdu, 0)
        self.assertEqual(pdu_type, 0x04)
        self.assertEqual(length, len(pdu) - 6)
        pdv_length, context_id, header = struct.unpack_from(">LBB", pdu, 6)
        self.assertEqual(pdv_length, length - 4)
        return length, pdv_length, context_id, header, pdu[12:]

    def test_data_split_within_max_pdu(self):
        """250 bytes with max PDU 100 become values of 94, 94 and 62 bytes; the last bit only on the final one."""
        data = bytes(range(250))
        pdus = list(D.fragment(5, False, data, 100))
        parsed = [self.parse(p) for p in pdus]
        self.assertEqual([len(v) for *_, v in parsed], [94, 94, 62])
        for length, pdv_length, context_id, header, value in parsed:
            self.assertLessEqual(length, 100)
            self.assertEqual(pdv_length, len(value) + 2)
            self.assertEqual(context_id, 5)
        self.assertEqual([h for _, _, _, h, _ in parsed], [0x00, 0x00, 0x02])
        self.assertEqual(b"".join(v for *_, v in parsed), data)

    def test_command_bit(self):
        """Command fragments carry bit 0; the final one also bit 1."""
        pdus = list(D.fragment(1, True, bytes(30), 20))
        self.assertEqual([self.parse(p)[3] for p in pdus], [0x01, 0x01, 0x03])
        self.assertEqual([self.parse(p)[0] for p in pdus], [20, 20, 8])  # values of 14, 14 and 2 bytes

    def test_exact_fit_is_one_pdu(self):
        """A value exactly max_pdu - 6 long fits one PDU whose length field equals max_pdu."""
        (pdu,) = D.fragment(1, False, bytes(94), 100)
        self.assertEqual(self.parse(pdu)[0], 100)
        self.assertEqual(len(list(D.fragment(1, False, bytes(95), 100))), 2)

    def test_not_last(self):
        """With last=False no fragment carries the last bit (a streaming sender's middle chunk)."""
        pdus = list(D.fragment(3, False, bytes(50), 20, last=False))  # values of 14, 14, 14 and 8 bytes
        self.assertEqual([self.parse(p)[3] for p in pdus], [0x00, 0x00, 0x00, 0x00])

    def test_empty_data(self):
        """Empty data yields one PDU with an empty, last fragment."""
        (pdu,) = D.fragment(7, False, b"", 1000)
        self.assertEqual(pdu, bytes((0x04, 0, 0, 0, 0, 6, 0, 0, 0, 2, 7, 0x02)))
        (command_pdu,) = D.fragment(7, True, b"", 1000)
        self.assertEqual(self.parse(command_pdu)[3], 0x03)

    def test_decodes_as_pdata(self):
        """The PDUs decode with PDataTF into the PDVs expected."""
        pdvs = pdus_to_pdvs(D.fragment(9, True, ECHO_RQ_BYTES, 40))
        self.assertEqual(b"".join(p.data for p in pdvs), ECHO_RQ_BYTES)
        self.assertEqual([p.is_last for p in pdvs], [False] * (len(pdvs) - 1) + [True])
        self.assertTrue(all(p.is_command and p.context_id == 9 for p in pdvs))

    def test_max_pdu_too_small(self):
        """A maximum PDU length that leaves no room for a PDV value is refused."""
        self.assertRaises(ValueError, list, D.fragment(1, False, b"x", 7))


class MessageAssemblerTests(unittest.TestCase):
    """MessageAssembler: commands collected, data sets streamed."""

    def test_command_in_many_fragments(self):
        """A command split into many fragments yields one CommandReceived, only after the last."""
        pdvs = pdus_to_pdvs(D.fragment(3, True, STORE_RQ_BYTES, 16))
        self.assertGreater(len(pdvs), 10)
        assembler = D.MessageAssembler()
        for pdv in pdvs[:-1]:
            self.assertEqual(assembler.receive([pdv]), [])
            self.assertFalse(assembler.idle)
        (event,) = assembler.receive([pdvs[-1]])
        self.assertEqual(event, D.CommandReceived(3, D.Command.decode(STORE_RQ_BYTES)))
        self.assertTrue(assembler.expecting_data)

    def test_data_streamed_in_arrival_order(self):
        """Data set fragments come out one DataReceived per PDV, in order, not joined."""
        assembler = D.MessageAssembler()
        assembler.receive(pdus_to_pdvs(D.fragment(3, True, STORE_RQ_BYTES, 1000)))
        chunks = [b"first-", b"second-", b"third"]
        events = assembler.receive([P.PDV(3, False, False, chunks[0]), P.PDV(3, False, False, chunks[1])])
        events += assembler.receive([P.PDV(3, False, True, chunks[2])])
        self.assertEqual(
            events,
            [
                D.DataReceived(3, b"first-", False),
                D.DataReceived(3, b"second-", False),
                D.DataReceived(3, b"third", True),
            ],
        )
        self.assertTrue(assembler.idle)

    def test_next_message_after_data(self):
        """After the last data fragment the next command is taken."""
        assembler = D.MessageAssembler()
        assembler.receive(pdus_to_pdvs(D.fragment(3, True, STORE_RQ_BYTES, 1000)))
        assembler.receive([P.PDV(3, False, True, b"all")])
        (event,) = assembler.receive(pdus_to_pdvs(D.fragment(1, True, ECHO_RQ_BYTES, 1000)))
        self.assertEqual(event.context_id, 1)
        self.assertEqual(event.command.MessageID, 1)
        self.assertTrue(assembler.idle)

    def test_data_without_command(self):
        """A data fragment that no command announced is refused."""
        error = self.assertRaises(DimseDecodeError, D.MessageAssembler().receive, [P.PDV(1, False, True, b"x")])
        self.assertIn("no command announced", str(error))

    def test_data_after_command_without_data_set(self):
        """A data fragment after a command with Command Data Set Type 0x0101 is refused."""
        assembler = D.MessageAssembler()
        assembler.receive(pdus_to_pdvs(D.fragment(1, True, ECHO_RQ_BYTES, 1000)))
        self.assertRaises(DimseDecodeError, assembler.receive, [P.PDV(1, False, True, b"x")])

    def test_command_context_switch(self):
        """Command fragments switching presentation context mid-command are refused."""
        pdvs = pdus_to_pdvs(D.fragment(1, True, ECHO_RQ_BYTES, 40))
        assembler = D.MessageAssembler()
        assembler.receive([pdvs[0]])
        moved = P.PDV(3, True, pdvs[1].is_last, pdvs[1].data)
        error = self.assertRaises(DimseDecodeError, assembler.receive, [moved])
        self.assertIn("switched from presentation context 1 to 3", str(error))

    def test_data_context_switch(self):
        """A data set fragment on another context than its command is refused."""
        assembler = D.MessageAssembler()
        assembler.receive(pdus_to_pdvs(D.fragment(1, True, STORE_RQ_BYTES, 1000)))
        assembler.receive([P.PDV(1, False, False, b"part")])
        error = self.assertRaises(DimseDecodeError, assembler.receive, [P.PDV(3, False, True, b"rest")])
        self.assertIn("context 3, its command came on 1", str(error))

    def test_command_too_long(self):
        """A command set over max_command_length is refused before it is complete."""
        assembler = D.MessageAssembler(max_command_length=100)
        pdvs = pdus_to_pdvs(D.fragment(1, True, bytes(150), 66))  # 60-byte values
        self.assertEqual(assembler.receive([pdvs[0]]), [])
        error = self.assertRaises(DimseDecodeError, assembler.receive, [pdvs[1]])
        self.assertIn("exceeds 100 bytes", str(error))

    def test_command_while_data_incomplete(self):
        """A command fragment while the previous data set is incomplete is refused."""
        assembler = D.MessageAssembler()
        assembler.receive(pdus_to_pdvs(D.fragment(1, True, STORE_RQ_BYTES, 1000)))
        assembler.receive([P.PDV(1, False, False, b"part")])
        error = self.assertRaises(
            DimseDecodeError, assembler.receive, pdus_to_pdvs(D.fragment(1, True, ECHO_RQ_BYTES, 1000))
        )
        self.assertIn("data set was incomplete", str(error))

    def test_command_without_command_field(self):
        """A command set without (0000,0100) is refused."""
        data = D.Command(MessageID=1).encode()
        self.assertRaises(DimseDecodeError, D.MessageAssembler().receive, [P.PDV(1, True, True, data)])
