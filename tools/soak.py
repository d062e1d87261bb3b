"""Robustness run against a real ``twistd appliance`` (issue 9), with a report: ``make torture`` runs it.

    python tools/soak.py [--cycles 10000] [--senders 50] [--kill-rounds 5] [--work DIR] [--keep] [--quick]

Phases, each on the same running appliance unless it says otherwise, its
resident memory (VmRSS of the process) read before and after:

1. **hostile**: every case of ``tests/test_hostile.py`` (malformed,
   oversized, out-of-order and coalesced PDUs, hostile commands) over a raw
   socket; each answered as PS3.8 says, then a good C-ECHO association;
2. **churn**: ``--cycles`` associate/release and as many associate/abort
   cycles over raw sockets;
3. **floods**: 60 connections each holding a partial 1 MiB A-ASSOCIATE-RQ
   (at most 8 MiB of them are kept), and 24 MB of C-ECHO-RQs sent by a peer that never
   reads the answers (reading stops while our answers wait);
4. **trickle**: an A-ASSOCIATE-RQ sent one byte per second (``--quick``: a
   tenth of a second), closed by ARTIM (5 s here) if it is not whole by then;
5. **senders**: ``--senders`` storescu processes at once, each sending its
   own study; nothing lost, the index consistent;
6. **kill -9 during C-MOVE** and **during eviction** (``--kill-rounds``
   each): a move of every study to DCMTK's storescp, or stores into an
   archive kept at its size limit, killed at a random moment, restarted, the
   archive checked: every acknowledged object intact (or, with eviction,
   gone with its whole study), no orphan, no row without its file.

The last lines are the report: cases, associations, instances, faults
injected, instances lost (must be 0), peak memory (VmHWM). Exit status 0
when every check held, 1 otherwise, 2 when the run could not be set up.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "tools")):
    if path not in sys.path:
        sys.path.insert(0, path)

import torture  # noqa: E402
from tests import test_hostile as hostile  # noqa: E402


def _status(pid: int, field: str) -> Optional[int]:
    """A ``/proc/PID/status`` field in KiB (VmRSS, VmHWM)."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _mib(kib: Optional[int]) -> str:
    return "?" if kib is None else f"{kib / 1024:.1f} MiB"


class Report:
    def __init__(self) -> None:
        self.lines: List[str] = []
        self.failures: List[str] = []
        self.cases = self.associations = self.instances = self.faults = self.lost = 0
        self.peak_kib = 0

    def note(self, line: str) -> None:
        print(line, flush=True)
        self.lines.append(line)

    def fail(self, line: str) -> None:
        self.note("FAILED: " + line)
        self.failures.append(line)

    def peak(self, appliance: torture.Appliance) -> None:
        self.peak_kib = max(self.peak_kib, _status(appliance.process.pid, "VmHWM") or 0)


def good_echo(port: int) -> bool:
    """A whole association by raw socket: RQ, AC, C-ECHO, its success, release."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    try:
        sock.sendall(hostile.rq())
        if hostile._read_pdu(sock)[:1] != b"\x02":
            return False
        sock.sendall(hostile.echo_message())
        answer = hostile._read_pdu(sock)
        sock.sendall(hostile.RELEASE_RQ)
        return answer[:1] == b"\x04" and hostile._read_pdu(sock) == hostile.RELEASE_RP
    finally:
        sock.close()


def phase_hostile(appliance: torture.Appliance, report: Report) -> None:
    before = _status(appliance.process.pid, "VmRSS")
    tried = 0
    for cases, associate in ((hostile.CASES, False), (hostile.ASSOCIATED_CASES, True)):
        for name, parts, expected in cases:
            tried += 1
            try:
                accepted, answer = hostile.exchange(appliance.port, parts, associate)
            except OSError as error:
                report.fail(f"hostile case {name!r}: {error}")
                continue
            if answer != (expected or b""):
                report.fail(f"hostile case {name!r}: answered {answer[:16]!r}, expected {expected!r}")
            if not good_echo(appliance.port):
                report.fail(f"hostile case {name!r}: the next association was not served")
            report.associations += 2
    report.cases += tried
    after = _status(appliance.process.pid, "VmRSS")
    report.note(f"hostile: {tried} cases, each answered as PS3.8 says and followed by a served association; "
                f"RSS {_mib(before)} -> {_mib(after)}")


def phase_churn(appliance: torture.Appliance, report: Report, cycles: int) -> None:
    before = _status(appliance.process.pid, "VmRSS")
    started = time.monotonic()
    for number in range(cycles):
        for ending in (hostile.RELEASE_RQ, hostile.abort(0, 0)):
            sock = socket.create_connection(("127.0.0.1", appliance.port), timeout=15)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.sendall(hostile.rq())
                if hostile._read_pdu(sock)[:1] != b"\x02":
                    report.fail(f"churn: cycle {number} not accepted")
                    return
                sock.sendall(ending)
                if ending == hostile.RELEASE_RQ and hostile._read_pdu(sock) != hostile.RELEASE_RP:
                    report.fail(f"churn: cycle {number} not released")
                    return
            finally:
                sock.close()
        if number == cycles // 10:
            warm = _status(appliance.process.pid, "VmRSS")
    after = _status(appliance.process.pid, "VmRSS")
    report.associations += 2 * cycles
    report.note(f"churn: {cycles} associate/release and {cycles} associate/abort cycles in "
                f"{time.monotonic() - started:.0f} s; RSS {_mib(before)} -> {_mib(warm)} after a tenth -> "
                f"{_mib(after)} at the end")
    if before and after and after - warm > 16 * 1024:
        report.fail(f"churn: resident memory grew by {_mib(after - warm)} after warming up")


def phase_floods(appliance: torture.Appliance, report: Report) -> None:
    pid = appliance.process.pid
    before = _status(pid, "VmRSS")
    held = []
    refused = 0
    partial = struct.pack(">BBL", 1, 0, 1024 * 1024) + bytes(900 * 1024)
    for _ in range(60):
        sock = socket.create_connection(("127.0.0.1", appliance.port), timeout=15)
        held.append(sock)
        try:
            sock.sendall(partial)
        except OSError:
            refused += 1
    time.sleep(1.0)  # let the appliance read what it takes
    during = _status(pid, "VmRSS")
    for sock in held:
        sock.close()
    report.associations += 60
    report.note(f"flood of 60 connections with partial 1 MiB RQs: RSS {_mib(before)} -> {_mib(during)} "
                f"(the audit: +74 MB); {refused} closed as they sent (8 MiB of partial RQs at most)")
    if before and during and during - before > 40 * 1024:
        report.fail(f"flood: resident memory grew by {_mib(during - before)}")
    time.sleep(6.0)  # ARTIM (5 s) closes what is left
    before = _status(pid, "VmRSS")
    sock = socket.create_connection(("127.0.0.1", appliance.port), timeout=15)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sent = 0
    try:
        sock.sendall(hostile.rq())
        hostile._read_pdu(sock)
        echoes = b"".join(hostile.echo_message(n % 65535 + 1) for n in range(1000))
        sock.settimeout(5.0)
        while sent < 24 * 1024 * 1024:
            try:
                sock.sendall(echoes)
            except OSError:  # socket.timeout: the appliance stopped reading, as it should
                break
            sent += len(echoes)
        during = _status(pid, "VmRSS")
    finally:
        sock.close()
    report.associations += 1
    report.note(f"a peer sending C-ECHO-RQs without reading the answers: {sent / 1e6:.1f} MB taken before the "
                f"appliance stopped reading; RSS {_mib(before)} -> {_mib(during)} (the audit: 24 MB sent, +62 MB)")
    if before and during and during - before > 32 * 1024:
        report.fail(f"echo flood: resident memory grew by {_mib(during - before)}")
    if not good_echo(appliance.port):
        report.fail("floods: the next association was not served")


def phase_trickle(appliance: torture.Appliance, report: Report, interval: float) -> None:
    message = hostile.rq()
    sock = socket.create_connection(("127.0.0.1", appliance.port), timeout=30)
    started = time.monotonic()
    sent = 0
    closed_by_artim = False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for index in range(len(message)):
            try:
                sock.sendall(message[index:index + 1])
            except OSError:
                closed_by_artim = True
                break
            sent += 1
            time.sleep(interval)
            if time.monotonic() - started > 8:
                break
        sock.settimeout(10)
        try:
            answer = sock.recv(100)
            closed_by_artim = closed_by_artim or answer == b""
        except OSError:
            closed_by_artim = True
    finally:
        sock.close()
    report.associations += 1
    report.note(f"trickle: an A-ASSOCIATE-RQ one byte every {interval:g} s; {sent} of {len(message)} bytes "
                f"sent in {time.monotonic() - started:.0f} s; closed by ARTIM: {closed_by_artim}")
    if not closed_by_artim:
        report.fail("trickle: a trickled RQ outlived ARTIM")
    if not good_echo(appliance.port):
        report.fail("trickle: the next association was not served")


def phase_senders(appliance: torture.Appliance, report: Report, work: str, senders: int, storescu: str) -> None:
    archive = os.path.join(work, "data", "archive")
    objects = torture.generate_objects(os.path.join(work, "senders"), count=senders * 4, studies=senders, seed=5,
                                       matrices=(32, 64))
    per_study: Dict[int, List[torture.GeneratedObject]] = {}
    for obj in objects:
        per_study.setdefault(obj.study_index, []).append(obj)
    processes = []
    before = _status(appliance.process.pid, "VmRSS")
    started = time.monotonic()
    for study, items in per_study.items():
        log = tempfile.TemporaryFile()
        processes.append((subprocess.Popen(torture.storescu_command(storescu, appliance.port,
                                                                     [o.path for o in items], f"SENDER{study}"),
                                           stdout=log, stderr=subprocess.STDOUT, env=torture.storescu_env()), log))
    acknowledged = []
    for process, log in processes:
        process.wait(timeout=300)
        log.seek(0)
        acknowledged += [path for path, status in torture.parse_storescu(log.read().decode("utf-8", "replace"))
                         if status == "Success"]
        log.close()
    elapsed = time.monotonic() - started
    by_path = {obj.path: obj.sop_uid for obj in objects}
    sent = {obj.sop_uid: torture.data_set_bytes(obj.path) for obj in objects}
    findings = torture.check_archive(archive, sent, [by_path[p] for p in acknowledged], float("inf"))
    report.instances += len(acknowledged)
    report.associations += len(processes)
    report.note(f"senders: {len(processes)} storescu at once, {len(acknowledged)} of {len(objects)} instances "
                f"acknowledged in {elapsed:.1f} s, every one intact, the index consistent; "
                f"RSS {_mib(before)} -> {_mib(_status(appliance.process.pid, 'VmRSS'))}")
    if len(acknowledged) != len(objects):
        report.fail(f"senders: {len(objects) - len(acknowledged)} instances not acknowledged")
    for problem in findings.problems():
        report.fail(f"senders: {problem}")
    report.lost += len(findings.lost)


def phase_kills(work: str, report: Report, rounds: int, storescu: str, movescu: str, storescp: str,
                rng: random.Random) -> None:
    """kill -9 during C-MOVE and during eviction, restart, check."""
    # during C-MOVE: the archive holds the objects; each round moves everything and is killed mid-way
    data_dir = os.path.join(work, "move-data")
    objects = torture.generate_objects(os.path.join(work, "move-objects"), count=120, studies=4, seed=9,
                                       matrices=(256,))
    sent = {obj.sop_uid: torture.data_set_bytes(obj.path) for obj in objects}
    destination = os.path.join(work, "storescp")
    os.makedirs(destination, exist_ok=True)
    scp_port = torture.free_port()
    scp = subprocess.Popen([storescp, "-aet", "MOVESCP", "-od", destination, str(scp_port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=torture.storescu_env())
    appliance = None
    try:
        appliance = _restart(work, data_dir, "move-0", scp_port)
        out = subprocess.run(torture.storescu_command(storescu, appliance.port, [o.path for o in objects]),
                             capture_output=True, text=True, env=torture.storescu_env())
        acknowledged = [o.sop_uid for o in objects
                        if (o.path, "Success") in torture.parse_storescu(out.stdout + out.stderr)]
        report.instances += len(acknowledged)
        for number in range(rounds):
            studies = sorted({o.study_uid for o in objects})
            move = subprocess.Popen([movescu, "-S", "-aet", "MOVESCU", "-aec", "DISK_SERVER", "-aem", "MOVESCP",
                                     "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID=" + "\\".join(studies),
                                     "127.0.0.1", str(appliance.port)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=torture.storescu_env())
            time.sleep(rng.uniform(0.05, 1.0))
            appliance.kill()
            report.faults += 1
            try:
                move.wait(timeout=30)
            except subprocess.TimeoutExpired:
                move.kill()
            appliance = _restart(work, data_dir, f"move-{number + 1}", scp_port)
            findings = torture.check_archive(os.path.join(data_dir, "archive"), sent, acknowledged, appliance.started_at)
            for problem in findings.problems():
                report.fail(f"kill during C-MOVE, round {number + 1}: {problem}")
            report.lost += len(findings.lost)
            report.peak(appliance)
        report.note(f"kill -9 during C-MOVE: {rounds} rounds, {len(acknowledged)} instances checked after each; "
                    f"{len(os.listdir(destination))} files reached storescp meanwhile")
    finally:
        if appliance is not None:
            appliance.stop()
        scp.kill()
        scp.wait()

    # during eviction: every store past the size limit evicts the least recently stored studies
    data_dir = os.path.join(work, "evict-data")
    sent: Dict[str, bytes] = {}
    study_of: Dict[str, str] = {}
    study_order: List[str] = []  # studies in the order their first instance was acknowledged
    acknowledged: List[str] = []
    limit = 0
    appliance = None
    try:
        for number in range(rounds):
            objects = torture.generate_objects(os.path.join(work, f"evict-objects-{number}"), count=60, studies=6,
                                               seed=100 + number, matrices=(128,))
            for obj in objects:
                sent[obj.sop_uid] = torture.data_set_bytes(obj.path)
                study_of[obj.sop_uid] = obj.study_uid
            if appliance is None:
                limit = sum(len(sent[o.sop_uid]) for o in objects) * 3 // 2  # a round and a half of objects
                appliance = torture.start_appliance(work, data_dir, "evict-0", max_archive_size=limit,
                                                    auto_delete=True)
            store = subprocess.Popen(torture.storescu_command(storescu, appliance.port, [o.path for o in objects]),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=torture.storescu_env())
            time.sleep(rng.uniform(0.3, 1.5))
            appliance.kill()
            report.faults += 1
            output = store.communicate(timeout=60)[0]
            by_path = {o.path: o.sop_uid for o in objects}
            for path, status in torture.parse_storescu(output):
                if status == "Success":
                    acknowledged.append(by_path[path])
                    if study_of[by_path[path]] not in study_order:
                        study_order.append(study_of[by_path[path]])
            appliance = torture.start_appliance(work, data_dir, f"evict-{number + 1}", max_archive_size=limit,
                                                auto_delete=True)
            appliance.wait_reconciled()
            archive = os.path.join(data_dir, "archive")
            rows = torture.index_rows(archive)
            present = [sop for sop in set(acknowledged) if sop in rows]
            findings = torture.check_archive(archive, sent, present, appliance.started_at)
            for problem in findings.problems():
                report.fail(f"kill during eviction, round {number + 1}: {problem}")
            # eviction goes least recently stored first: no acknowledged instance is missing from a study newer
            # than a study that kept all of its own (the one being evicted at the kill may be half gone)
            missing = {study_of[sop] for sop in set(acknowledged) if sop not in rows}
            complete = [study for study in study_order if study not in missing]
            newest_missing = max((study_order.index(study) for study in missing), default=-1)
            out_of_order = [study for study in complete if study_order.index(study) < newest_missing
                            and any(study_of[sop] == study for sop in rows)]
            if out_of_order:
                report.fail(f"kill during eviction, round {number + 1}: newer studies lost instances while older "
                            f"studies kept theirs: {out_of_order[:3]}")
                report.lost += len(out_of_order)
            report.peak(appliance)
        report.instances += len(set(acknowledged))
        report.note(f"kill -9 during eviction: {rounds} rounds, archive limit {limit / 1e6:.1f} MB, "
                    f"{len(set(acknowledged))} instances acknowledged, the oldest studies evicted first, what is "
                    f"kept intact, nothing orphaned")
    finally:
        if appliance is not None:
            appliance.stop()


def _restart(work: str, data_dir: str, name: str, scp_port: int) -> torture.Appliance:
    """The appliance on ``data_dir`` with the C-MOVE destination configured; waits for its start-up check."""
    for attempt in range(3):
        port = torture.free_port()
        config = torture.write_config(os.path.join(work, f"{name}.toml"), data_dir, port)
        with open(config, "a") as handle:
            handle.write(f'\n[devices.movescp]\nae_title = "MOVESCP"\nhost = "127.0.0.1"\nport = {scp_port}\n')
        appliance = torture.Appliance(config, os.path.join(work, f"{name}-{attempt}.log"), port)
        try:
            appliance.wait_listening()
            appliance.wait_reconciled()
            return appliance
        except torture.StartError:
            appliance.stop()
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=10000, help="associate/release and associate/abort cycles")
    parser.add_argument("--senders", type=int, default=50, help="storescu processes at once")
    parser.add_argument("--kill-rounds", type=int, default=5, help="kill -9 rounds during C-MOVE and eviction")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--work", default=None)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--quick", action="store_true", help="short trickle interval (0.1 s) for a quick run")
    args = parser.parse_args(argv)
    tools = {name: shutil.which(name) for name in ("storescu", "movescu", "storescp")}
    if not all(tools.values()):
        print(f"soak: DCMTK is missing: {[n for n, p in tools.items() if not p]}", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    work = args.work or tempfile.mkdtemp(prefix="soak-")
    os.makedirs(work, exist_ok=True)
    report = Report()
    report.note(f"soak: seed {seed}, work folder {work}")
    appliance = None
    try:
        appliance = torture.start_appliance(work, os.path.join(work, "data"), "main", artim_timeout=5,
                                            idle_timeout=30, max_associations=64, max_associations_per_host=64)
        appliance.wait_reconciled()
        phase_hostile(appliance, report)
        phase_churn(appliance, report, args.cycles)
        phase_floods(appliance, report)
        phase_trickle(appliance, report, 0.1 if args.quick else 1.0)
        phase_senders(appliance, report, work, args.senders, tools["storescu"])
        report.peak(appliance)
        if "Traceback" in appliance.log():
            report.fail("a traceback in the appliance's log")
        appliance.stop()
        appliance = None
        phase_kills(work, report, args.kill_rounds, tools["storescu"], tools["movescu"], tools["storescp"], rng)
    except torture.StartError as error:
        report.fail(f"the appliance did not start: {error}")
        return 2
    finally:
        if appliance is not None:
            appliance.stop()
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    report.note("")
    report.note(f"report: {report.cases} hostile cases, {report.associations} associations, {report.instances} "
                f"instances, {report.faults} faults injected (kill -9), {report.lost} instances lost, peak memory "
                f"{_mib(report.peak_kib)}; {len(report.failures)} failures")
    return 1 if report.failures or report.lost else 0


if __name__ == "__main__":
    sys.exit(main())
