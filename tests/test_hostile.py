"""A hostile peer on a real socket (issue 9): a table of malformed, oversized, out-of-order, coalesced and
trickled input against the Disk-Server listening on 127.0.0.1, port 0.

Each case sends raw bytes from a plain socket (in a thread, so the reactor
serves meanwhile) and reads what comes back: the PS3.8 answer (an A-ABORT
with its source and reason, an A-ASSOCIATE-RJ, or the connection closed).
After every case: no logged traceback, every connection closed and counted
out, and a good association (our requestor's C-ECHO) is still served.  The
longer runs (bytes one per second, churn of thousands of associations,
faults) are ``make torture``'s.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import List, Optional, Sequence, Tuple

from twisted.internet import reactor, threads
from twisted.trial import unittest

from appliance import config as configuration
from appliance.ae.listeners import acceptor_factory, disk_server_services
from appliance.archive.archive import Archive
from appliance.archive.eviction import StorageLimits
from appliance.dicom import dimse as D
from appliance.dicom import pdu as P
from appliance.dicom.negotiation import propose
from appliance.dicom.uids import IMPLEMENTATION_CLASS_UID, IMPLICIT_VR_LITTLE_ENDIAN, VERIFICATION
from appliance.net import requestor
from appliance.net.protocol import Timeouts
from appliance.net.threads import ThreadPoolService

from .support import Listening, capture_log, deferred_test

MAX_PDU = 16384


def abort(source: int, reason: int) -> bytes:
    return bytes((0x07, 0, 0, 0, 0, 4, 0, 0, source, reason))


def rj(result: int, source: int, reason: int) -> bytes:
    return bytes((0x03, 0, 0, 0, 0, 4, 0, result, source, reason))


def header(pdu_type: int, length: int) -> bytes:
    return bytes((pdu_type, 0)) + struct.pack(">L", length)


def rq(*contexts: Tuple[str, Sequence[str]], calling: str = "HOSTILE", max_pdu: int = MAX_PDU) -> bytes:
    contexts = contexts or ((VERIFICATION, (IMPLICIT_VR_LITTLE_ENDIAN,)),)
    return propose(calling, "DISK_SERVER", list(contexts), max_pdu, IMPLEMENTATION_CLASS_UID, "HOSTILE").encode()


def pdata(pdvs: bytes) -> bytes:
    return header(0x04, len(pdvs)) + pdvs


def pdv(context_id: int, control: int, data: bytes, declared: Optional[int] = None) -> bytes:
    length = len(data) + 2 if declared is None else declared
    return struct.pack(">LBB", length, context_id, control) + data


RELEASE_RQ = header(0x05, 4) + bytes(4)
RELEASE_RP = header(0x06, 4) + bytes(4)


def echo_message(message_id: int = 1) -> bytes:
    command = D.Command(CommandField=D.CommandField.C_ECHO_RQ, MessageID=message_id, AffectedSOPClassUID=VERIFICATION,
                        CommandDataSetType=D.NO_DATA_SET)
    return b"".join(D.fragment(1, True, command.encode(), MAX_PDU))


#: (name, the parts sent one after the other, what the peer receives first: a PDU's bytes, "AC" for an
#: A-ASSOCIATE-AC, or None for the connection closed with nothing sent)
CASES: List[Tuple[str, List[bytes], Optional[bytes]]] = [
    ("HTTP instead of DICOM", [b"GET / HTTP/1.1\r\nHost: appliance\r\n\r\n"], abort(2, 1)),
    ("unknown PDU type 0x08 first", [header(0x08, 4) + bytes(4)], abort(2, 1)),
    ("A-ASSOCIATE-RQ of length 0", [header(0x01, 0)], abort(2, 6)),
    ("A-ASSOCIATE-RQ of length 1", [header(0x01, 1) + b"\x00"], abort(2, 6)),
    ("A-ASSOCIATE-RQ cut short, then closed", [rq()[:40]], None),
    ("A-ASSOCIATE-RQ of length 0xFFFFFFFF", [header(0x01, 0xFFFFFFFF)], abort(2, 6)),
    ("A-ASSOCIATE-RQ just over 1 MiB", [header(0x01, 1024 * 1024 + 1)], abort(2, 6)),
    ("P-DATA-TF before any association", [pdata(pdv(1, 3, b"x"))], abort(2, 2)),
    ("A-RELEASE-RQ before any association", [RELEASE_RQ], abort(2, 2)),
    ("A-RELEASE-RP before any association", [RELEASE_RP], abort(2, 2)),
    ("a malformed A-ASSOCIATE-AC", [header(0x02, 4) + bytes(4)], abort(2, 6)),
    ("P-DATA-TF coalesced with the RQ", [rq() + echo_message()], abort(2, 2)),
    ("A-RELEASE-RQ coalesced with the RQ", [rq() + RELEASE_RQ], abort(2, 2)),
    ("a second RQ coalesced with the RQ", [rq() + rq()], abort(2, 2)),
    ("A-ABORT coalesced with the RQ", [rq() + abort(0, 0)], None),
    ("calling AE title with CR and ESC", [rq(calling="EVIL\r\x1b[31m")], rj(1, 1, 3)),
    ("maximum PDU length 1", [rq(max_pdu=1)], rj(1, 1, 1)),
]

#: cases on an established association: (name, parts sent after the A-ASSOCIATE-AC, what comes back first)
ASSOCIATED_CASES: List[Tuple[str, List[bytes], Optional[bytes]]] = [
    ("unknown PDU type 0x09", [header(0x09, 4) + bytes(4)], abort(2, 1)),
    ("P-DATA-TF of length 0", [header(0x04, 0)], abort(2, 6)),
    ("PDV of length 0", [pdata(struct.pack(">L", 0))], abort(2, 6)),
    ("PDV of length 1", [pdata(struct.pack(">LB", 1, 1))], abort(2, 6)),
    ("PDV longer than its PDU", [pdata(pdv(1, 3, b"xx", declared=100))], abort(2, 6)),
    ("P-DATA-TF longer than our maximum", [header(0x04, MAX_PDU + 1)], abort(2, 6)),
    ("P-DATA-TF of length 0xFFFFFFFF", [header(0x04, 0xFFFFFFFF)], abort(2, 6)),
    ("a second A-ASSOCIATE-RQ", [rq()], abort(2, 2)),
    ("A-RELEASE-RP never asked for", [RELEASE_RP], abort(2, 2)),
    ("PDV on a context never proposed", [pdata(pdv(9, 3, b"x" * 10))], abort(2, 6)),
    ("a response sent to the acceptor",
     [b"".join(D.fragment(1, True, D.Command(CommandField=0x8030, MessageIDBeingRespondedTo=1, Status=0,
                                              CommandDataSetType=D.NO_DATA_SET).encode(), MAX_PDU))], abort(2, 6)),
    ("a C-CANCEL announcing a data set",
     [b"".join(D.fragment(1, True, D.Command(CommandField=0x0FFF, MessageIDBeingRespondedTo=1,
                                              CommandDataSetType=0).encode(), MAX_PDU))], abort(2, 6)),
    ("a data set fragment nobody announced", [pdata(pdv(1, 2, b"x" * 10))], abort(2, 6)),
]


def _read_pdu(sock: socket.socket) -> bytes:
    """One whole PDU, or what came before the connection closed (b"" if nothing)."""
    data = b""
    while len(data) < 6 or len(data) < 6 + struct.unpack(">L", data[2:6])[0]:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    return data[: 6 + struct.unpack(">L", data[2:6])[0]]


def exchange(port: int, parts: Sequence[bytes], associate: bool = False, trickle: bool = False) -> Tuple[bytes, bytes]:
    """Thread: connect, (associate first), send ``parts``, read the first PDU back; returns (AC or b"", PDU)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        accepted = b""
        if associate:
            sock.sendall(rq())
            accepted = _read_pdu(sock)
        for part in parts:
            if trickle:
                for index in range(len(part)):
                    sock.sendall(part[index:index + 1])
            else:
                sock.sendall(part)
        answer = _read_pdu(sock)
        return accepted, answer
    finally:
        sock.close()


class HostilePeerTests(unittest.TestCase):
    """Each case of CASES and ASSOCIATED_CASES against one listening Disk-Server."""

    timeout = 120

    def setUp(self):
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        self.config = configuration.parse(
            {"appliance": {"data_dir": root},
             "disk_server": {"interface": "127.0.0.1", "port": 0, "min_free_space": 0, "artim_timeout": 2,
                             "timeout": 10}},
            os.path.join(root, "appliance.toml"))
        clock = reactor
        self.io = ThreadPoolService(reactor, "test-hostile-io", max_threads=2)
        self.io.startService()
        self.addCleanup(self.io.stopService)
        self.archive = Archive(self.config.archive.path, StorageLimits(min_free_space=0), "replace", clock,
                               self.io.runner, self.io.runner)
        self.addCleanup(self.archive.close)
        services = disk_server_services(self.config, self.archive, self.io.runner)
        self.factory = acceptor_factory(self.config.disk_server, self.config, services, reactor)
        self.listening = Listening(self, self.factory, reactor)
        self.port = self.listening.number
        self.events = capture_log(self, "info")

    async def good_echo(self) -> None:
        timeouts = Timeouts(artim=5.0, association=10.0, dimse=10.0, idle=None)
        association = await requestor.connect(reactor, "127.0.0.1", self.port, "GOODSCU", "DISK_SERVER",
                                              timeouts=timeouts, implementation_class_uid=IMPLEMENTATION_CLASS_UID,
                                              implementation_version_name="TESTS")
        self.assertEqual(await association.echo(), 0x0000)
        await association.release()

    async def settle(self) -> None:
        """Every connection so far closed (the listener waits for them) and counted out."""
        await self.listening.closed()
        self.assertEqual((self.factory.connections, self.factory.associations), (0, 0))

    def assertNoTraceback(self) -> None:
        failures = [event for event in self.events if event.get("log_failure") is not None]
        self.assertEqual(failures, [], [event.get("log_format") for event in failures])
        self.assertEqual(self.flushLoggedErrors(), [])

    async def run_case(self, name: str, parts, expected, associate: bool, trickle: bool = False) -> None:
        accepted, answer = await threads.deferToThread(exchange, self.port, parts, associate, trickle)
        if associate:
            self.assertEqual(accepted[:1], b"\x02", f"{name}: no A-ASSOCIATE-AC")
        self.assertEqual(answer, expected or b"", name)
        await self.settle()
        await self.good_echo()

    @deferred_test
    async def test_before_association(self):
        for name, parts, expected in CASES:
            with self.subTest(case=name):
                await self.run_case(name, parts, expected, associate=False)
        await self.settle()
        self.assertNoTraceback()

    @deferred_test
    async def test_on_an_association(self):
        for name, parts, expected in ASSOCIATED_CASES:
            with self.subTest(case=name):
                await self.run_case(name, parts, expected, associate=True)
        await self.settle()
        self.assertNoTraceback()

    @deferred_test
    async def test_trickled_one_byte_at_a_time(self):
        """A whole association sent one byte per segment: RQ, C-ECHO, release, each answered."""
        def trickled(port: int) -> List[bytes]:
            sock = socket.create_connection(("127.0.0.1", port), timeout=15)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                answers = []
                for message in (rq(), echo_message(), RELEASE_RQ):
                    for index in range(len(message)):
                        sock.sendall(message[index:index + 1])
                    answers.append(_read_pdu(sock))
                return answers
            finally:
                sock.close()

        accepted, echoed, released = await threads.deferToThread(trickled, self.port)
        self.assertEqual(accepted[:1], b"\x02")
        self.assertEqual(echoed[:1], b"\x04")
        self.assertEqual(released, RELEASE_RP)
        await self.settle()
        self.assertNoTraceback()

    @deferred_test
    async def test_hostile_commands_answered(self):
        """Commands that are answered rather than aborted: a C-STORE on Verification (0211), a UID with a byte
        over 0x7F (C000 without echoing it), then a good C-ECHO on the same association."""
        def session(port: int) -> List[bytes]:
            sock = socket.create_connection(("127.0.0.1", port), timeout=15)
            try:
                sock.sendall(rq())
                answers = [_read_pdu(sock)]
                store = D.Command(CommandField=D.CommandField.C_STORE_RQ, MessageID=1, Priority=0,
                                  AffectedSOPClassUID=VERIFICATION, AffectedSOPInstanceUID="1.2.3",
                                  CommandDataSetType=0)
                sock.sendall(b"".join(D.fragment(1, True, store.encode(), MAX_PDU))
                             + b"".join(D.fragment(1, False, b"x" * 50000, MAX_PDU)))
                answers.append(_read_pdu(sock))
                raw = bytearray(P.PDataTF.decode(echo_message(2)).pdvs[0].data)
                at = raw.index(VERIFICATION.encode())
                raw[at + 2] = 0xFF
                sock.sendall(b"".join(D.fragment(1, True, bytes(raw), MAX_PDU)))
                answers.append(_read_pdu(sock))
                sock.sendall(echo_message(3))
                answers.append(_read_pdu(sock))
                sock.sendall(RELEASE_RQ)
                answers.append(_read_pdu(sock))
                return answers
            finally:
                sock.close()

        accepted, stored, bad_uid, echoed, released = await threads.deferToThread(session, self.port)
        statuses = []
        for answer in (stored, bad_uid, echoed):
            command = D.Command.decode(P.PDataTF.decode(answer).pdvs[0].data)
            statuses.append((command.Status, command.AffectedSOPClassUID))
        self.assertEqual(statuses, [(0x0211, VERIFICATION), (0xC000, None), (0x0000, VERIFICATION)])
        self.assertEqual(released, RELEASE_RP)
        await self.settle()
        self.assertNoTraceback()
