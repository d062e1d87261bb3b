"""Loads over DICOM TLS: "over TLS when the device says tls = true, like C-MOVE sub-operations".

The whole appliance runs in-process (tap.makeService, as tests/test_interop_load.py's rig) with ``[tls]``
from a throwaway PKI (tests/support_tls.py): its Disk-Server listens on a plain port (storescu fills it)
and a TLS port, its Memory-Server on a TLS port only.  ``[devices.disk_tls]`` is the Disk-Server at its
TLS port with ``tls = true``; ``[devices.memory_server]``, the C-MOVE destination the Disk-Server looks up,
is the Memory-Server's TLS port with ``tls = true``, so the sub-operations go over TLS too.  The
association log lines (namespace appliance.association, written when each association ends) tell which
associations were TLS, on both ends.  Waits are the API's ``?wait=`` and Deferreds fired by log events,
each bounded; nothing sleeps.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional

from twisted.internet import defer, reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest


from .support import WAIT_LIMIT, deferred_test, free_port
from .support_tls import Certificates
from .test_interop_load import STORESCU, Appliance, _need, study_files

#: "; TLS: TLSv1.2 ECDHE-..." or "; TLS: TLSv1.3 TLS_AES_256_GCM_SHA384, peer CN=localhost,O=Appliance Tests"
TLS_SESSION = r"; TLS: TLSv1\.[23] \S+, peer CN=localhost"


class AssociationLog:
    """The association log lines (appliance.association) of one test; ``wait_for`` fires once a line matching
    a predicate has been logged (at once if it already was), or fails after WAIT_LIMIT seconds."""

    def __init__(self, testcase: unittest.TestCase) -> None:
        self.lines: List[str] = []
        self._waiting: List[tuple] = []
        globalLogPublisher.addObserver(self._observe)
        testcase.addCleanup(globalLogPublisher.removeObserver, self._observe)

    def _observe(self, event) -> None:
        if event.get("log_namespace") != "appliance.association":
            return
        line = formatEvent(event)
        self.lines.append(line)
        waiting, self._waiting = self._waiting, []
        for predicate, d in waiting:
            if d.called:
                continue
            if predicate(line):
                d.callback(line)
            else:
                self._waiting.append((predicate, d))

    def wait_for(self, predicate: Callable[[str], bool], what: str) -> defer.Deferred:
        for line in self.lines:
            if predicate(line):
                return defer.succeed(line)
        d = defer.Deferred()
        self._waiting.append((predicate, d))

        def timed_out(failure):
            failure.trap(defer.TimeoutError)
            raise AssertionError(f"no association log line {what} within {WAIT_LIMIT:g} s; logged:\n"
                                 + "\n".join(self.lines))

        return d.addTimeout(WAIT_LIMIT, reactor).addErrback(timed_out)

    def line(self, role: str, calling: str, called: str, peer_port: Optional[int] = None) -> defer.Deferred:
        """The first line of a ``role`` association ``calling``->``called`` (with the peer on ``peer_port``)."""
        peer = f" 127.0.0.1:{peer_port} " if peer_port is not None else " "

        def matches(line: str) -> bool:
            return line.startswith(f"{role}{peer}") and f" {calling}->{called}: " in line

        return self.wait_for(matches, f"'{role}{peer}... {calling}->{called}'")


class TLSAppliance(Appliance):
    """tests.test_interop_load.Appliance with ``[tls]``: the Disk-Server on a plain and a TLS port, the
    Memory-Server on a TLS port only; the devices ``memory_server`` (the Disk-Server's C-MOVE destination)
    and ``disk_tls``, both reached over TLS (``memory_device`` overrides keys of the first), and the devices
    ``devices(self)`` gives (it may use the ports chosen)."""

    def __init__(self, testcase: unittest.TestCase, pki: Certificates,
                 devices: Optional[Callable[["TLSAppliance"], Dict[str, dict]]] = None,
                 memory_device: Optional[dict] = None) -> None:
        self.testcase = testcase
        self.pki = pki
        self.root = os.path.abspath(testcase.mktemp())
        os.makedirs(self.root)
        self.disk_port, self.disk_tls_port = free_port(), free_port()
        self.memory_port, self.memory_tls_port = 0, free_port()
        self.web_port = free_port()
        tables = {
            "appliance": {"data_dir": os.path.join(self.root, "var")},
            "tls": pki.tls_table(),
            "disk_server": {"interface": "127.0.0.1", "port": self.disk_port, "tls_port": self.disk_tls_port,
                            "min_free_space": 0, "timeout": 20},
            "memory_server": {"interface": "127.0.0.1", "port": 0, "tls_port": self.memory_tls_port, "timeout": 20},
            "web": {"interface": "127.0.0.1", "port": self.web_port},
            "devices": dict({
                "memory_server": dict({"ae_title": "MEMORY_SERVER", "host": "127.0.0.1",
                                       "port": self.memory_tls_port, "tls": True, "timeout": 20},
                                      **(memory_device or {})),
                "disk_tls": {"ae_title": "DISK_SERVER", "host": "127.0.0.1", "port": self.disk_tls_port,
                             "tls": True, "timeout": 20},
            }, **(devices(self) if devices is not None else {})),
        }
        self.start(tables)


class LoadOverTLSTests(unittest.TestCase):
    """A load from a device with tls = true, its sub-operations to the Memory-Server over TLS too."""

    timeout = 90
    skip = _need(STORESCU)

    def setUp(self):
        self.pki = Certificates(os.path.abspath(self.mktemp()))
        self.log = AssociationLog(self)

    async def filled(self, appliance: TLSAppliance, study: str, series_count: int = 2, per_series: int = 2):
        files = study_files(os.path.join(appliance.root, "files"), study, series_count, per_series, pixels=64 * 1024)
        await appliance.storescu(files)
        return files

    @deferred_test
    async def test_study_over_tls(self):
        """The load ends done with the study's four objects (held in memory), and the association log shows TLS
        (TLS 1.2 or 1.3, the peer's certificate) at both ends of the load's association (MEMORY_MANAGER ->
        DISK_SERVER at its TLS port) and of the C-MOVE's sub-association (DISK_SERVER -> MEMORY_SERVER at its
        TLS port)."""
        appliance = TLSAppliance(self, self.pki)
        study = "1.2.826.0.1.3680043.10.91"
        files = await self.filled(appliance, study)
        load = await appliance.load("disk_tls", study)
        ended = await appliance.ended(load["id"])
        self.assertEqual((ended["state"], ended["completed"], ended["failed"], ended["received"], ended["error"]),
                         ("done", 4, 0, 4, None), ended)
        self.assertEqual(sorted(appliance.held(study)), sorted(os.path.basename(path)[:-4] for path in files))
        # the load's association: our requestor to the Disk-Server's TLS port, and the Disk-Server's acceptor
        requested = await self.log.line("requestor", "MEMORY_MANAGER", "DISK_SERVER", appliance.disk_tls_port)
        accepted = await self.log.line("acceptor", "MEMORY_MANAGER", "DISK_SERVER")
        # the C-MOVE's sub-association: the Disk-Server to the Memory-Server's TLS port, and its acceptor
        sub_requested = await self.log.line("requestor", "DISK_SERVER", "MEMORY_SERVER", appliance.memory_tls_port)
        sub_accepted = await self.log.line("acceptor", "DISK_SERVER", "MEMORY_SERVER")
        for line in (requested, accepted, sub_requested, sub_accepted):
            self.assertRegex(line, r": released(?: by the peer)?;", line)
            self.assertRegex(line, TLS_SESSION, line)
        self.assertIn("Study Root Query/Retrieve Information Model - MOVE accepted", requested)
        self.assertIn("CT Image Storage accepted", sub_requested)
        # the one association in the clear is storescu's fill, on the Disk-Server's plain port
        plain = [line for line in self.log.lines if "; TLS: " not in line]
        self.assertEqual(len(plain), 1, "\n".join(self.log.lines))
        self.assertIn(" STORESCU->DISK_SERVER: released;", plain[0])

    def untrusting(self, **keys) -> Callable[[TLSAppliance], Dict[str, dict]]:
        """A device ``untrusting``: the Disk-Server at its TLS port, tls = true, with ``keys`` besides."""
        return lambda appliance: {"untrusting": dict({
            "ae_title": "DISK_SERVER", "host": "127.0.0.1", "port": appliance.disk_tls_port, "tls": True,
            "timeout": 20}, **keys)}

    def assertNoTraceback(self, error: str) -> None:
        for words in ("Traceback", "internal error", "Error(", "[('"):
            self.assertNotIn(words, error)

    @deferred_test
    async def test_device_certificate_not_trusted(self):
        """A device whose ca_certificates is another CA: the Disk-Server's certificate does not verify, the load
        fails saying the TLS handshake failed and why (OpenSSL's words), with no traceback; no association was
        established, and the Disk-Server's own log line says the handshake failed."""
        appliance = TLSAppliance(self, self.pki, devices=self.untrusting(
            ca_certificates=self.pki.rogue_ca.certificate_path))
        study = "1.2.826.0.1.3680043.10.92"
        await self.filled(appliance, study, 1, 1)
        load = await appliance.load("untrusting", study)
        ended = await appliance.ended(load["id"])
        self.assertEqual(ended["state"], "failed", ended)
        error = ended["error"]
        self.assertIn(f"cannot reach untrusting (DISK_SERVER at 127.0.0.1:{appliance.disk_tls_port})", error)
        # OpenSSL's reason, and where in the chain (the wording depends on OpenSSL's version)
        self.assertRegex(error, r"TLS handshake failed: certificate verify failed: [^;]+ \(depth \d: CN=")
        self.assertNoTraceback(error)
        self.assertEqual((ended["completed"], ended["received"]), (0, 0))
        self.assertEqual(appliance.held(study), {})
        requested = await self.log.line("requestor", "MEMORY_MANAGER", "DISK_SERVER", appliance.disk_tls_port)
        self.assertIn("TLS handshake failed", requested)
        accepted = await self.log.wait_for(lambda line: line.startswith("acceptor") and "TLS" in line,
                                           "of the Disk-Server's TLS acceptor")
        self.assertIn("TLS handshake failed", accepted)
        self.assertFalse([line for line in self.log.lines if "DISK_SERVER->MEMORY_SERVER" in line])

    @deferred_test
    async def test_our_certificate_not_trusted_by_the_device(self):
        """A device that does not trust the certificate the Memory-Manager presents (one issued by another CA):
        the Disk-Server refuses the handshake; the load fails saying the TLS handshake failed, no traceback."""
        appliance = TLSAppliance(self, self.pki, devices=self.untrusting(
            certificate=self.pki.untrusted.certificate_path, private_key=self.pki.untrusted.key_path))
        study = "1.2.826.0.1.3680043.10.93"
        await self.filled(appliance, study, 1, 1)
        load = await appliance.load("untrusting", study)
        ended = await appliance.ended(load["id"])
        self.assertEqual(ended["state"], "failed", ended)
        error = ended["error"]
        self.assertIn(f"cannot reach untrusting (DISK_SERVER at 127.0.0.1:{appliance.disk_tls_port}): TLS handshake "
                      f"failed: ", error)
        self.assertIn("unknown ca", error)  # the Disk-Server's alert
        self.assertNoTraceback(error)
        self.assertEqual(appliance.held(study), {})
        accepted = await self.log.wait_for(lambda line: line.startswith("acceptor") and "TLS" in line,
                                           "of the Disk-Server's TLS acceptor")
        self.assertIn("TLS handshake failed: certificate verify failed: unable to get local issuer certificate",
                      accepted)

    @deferred_test
    async def test_sub_association_not_trusted(self):
        """The Disk-Server does not trust the Memory-Server's certificate ([devices.memory_server] with another
        CA): the load's own association is TLS and fine, the C-MOVE's sub-association fails its handshake, the
        Disk-Server answers C000 naming the TLS failure, and the load fails saying so."""
        appliance = TLSAppliance(self, self.pki, memory_device={"ca_certificates": self.pki.rogue_ca.certificate_path})
        study = "1.2.826.0.1.3680043.10.94"
        await self.filled(appliance, study, 1, 2)
        load = await appliance.load("disk_tls", study)
        ended = await appliance.ended(load["id"])
        self.assertEqual(ended["state"], "failed", ended)
        error = ended["error"]
        self.assertIn("disk_tls answered", error)
        self.assertIn("C000", error)
        self.assertIn("(MEMORY_SERVER: TLS handshake failed", error, "the comment names the destination first")
        self.assertNoTraceback(error)
        self.assertEqual((ended["completed"], ended["received"]), (0, 0), ended)
        self.assertEqual(appliance.held(study), {})
        requested = await self.log.line("requestor", "MEMORY_MANAGER", "DISK_SERVER", appliance.disk_tls_port)
        self.assertRegex(requested, TLS_SESSION)
        sub_requested = await self.log.line("requestor", "DISK_SERVER", "MEMORY_SERVER", appliance.memory_tls_port)
        self.assertIn("TLS handshake failed: certificate verify failed", sub_requested)
