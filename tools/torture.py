"""Crash-durability ("torture") test of the Disk-Server: kill -9 while storing, restart, check.

    python tools/torture.py [--rounds N] [--seed S] [--objects 200] [--studies 4] [--streams 2]
                            [--min-delay SECONDS] [--max-delay SECONDS] [--work DIR] [--keep]

The appliance runs as ``twistd -n --pidfile= appliance --config CFG`` under this
interpreter, with PYTHONPATH set to the checkout, on a data folder kept across
rounds.  One round:

1. ``--streams`` DCMTK ``storescu -v`` processes (TCP_NODELAY=1) each send every
   generated CT image, in an order of their own, to the running appliance;
2. after a random delay (seeded; logged) the appliance is killed with SIGKILL;
3. storescu's output tells which SOP instances were answered Success before
   the kill ("Sending file: F" followed by "Received Store Response (Success)");
4. the appliance is restarted on the same data folder; once it listens and its
   start-up reconciliation has logged, the archive is checked:

   - every instance acknowledged so far (this round or earlier) is in the index
     and its file holds exactly the data set bytes that were sent (lost / corrupt);
   - no index row names a missing file, and the restart's reconciliation found
     none to remove either (rows without files);
   - no file older than the restart is left in archive/tmp (leftovers);
   - every file under archive/objects is named by the index (orphans).

The restarted appliance is the one the next round kills.  The last line printed
is the summary, ``rounds: R, acknowledged: N, lost: L, orphans: O, corrupt: C,
rows without files: M, leftovers: T, errors: E, interrupted: I``: acknowledged
counts Success responses; errors counts tracebacks in a restarted appliance's
log, an appliance that would not restart, a storescu that outlived the kill by
30 s and a final ``appliance-archive verify`` that found problems; interrupted
counts the rounds whose kill cut a storescu stream short.  Exit status: 0 when
every check held, 1 when one failed, 2 when the run could not be set up (no
storescu, the appliance would not start).

Importable: the test suite uses :func:`generate_objects`, :func:`parse_storescu`,
:func:`data_set_bytes`, :func:`check_archive` and :func:`write_config`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

#: The checkout: the folder holding ``appliance``, ``tests`` and ``tools``.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"

#: twistd under this interpreter: ``python -m twisted`` is ``twist``, not twistd.
TWISTD = ["-c", "from twisted.scripts.twistd import run; run()"]

#: The line ArchiveService logs once the start-up reconciliation is done.
RECONCILED = re.compile(
    r"start-up check removed (\d+) unfinished temporary files, (\d+) never-indexed files, (\d+) rows without files"
)
#: storescu -v: "I: Sending file: PATH" ... "I: Received Store Response (STATUS)".
_SENDING = re.compile(r"Sending file: (.+?)\s*$")
_RESPONSE = re.compile(r"Received Store Response(?: \((.*)\))?\s*$")


# --- the objects ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GeneratedObject:
    """One generated Part 10 file."""

    path: str
    sop_uid: str
    study_uid: str
    series_uid: str
    study_index: int


def _uid(rng: random.Random, used: Set[str]) -> str:
    while True:
        uid = f"2.25.{rng.getrandbits(126)}"
        if uid not in used:
            used.add(uid)
            return uid


def generate_objects(
    folder: str,
    count: int = 200,
    studies: int = 4,
    seed: int = 0,
    matrices: Sequence[int] = (32, 64, 128, 256),
    series_per_study: int = 2,
) -> List[GeneratedObject]:
    """Write ``count`` small CT images (16-bit, Explicit VR Little Endian) into ``folder``.

    Study k holds the k-th contiguous block of objects (so the list is in
    study order); each image's matrix is drawn from ``matrices`` and its
    pixels are random, all from ``seed``: the same arguments give the same
    UIDs and bytes.  Works with pydicom 2.3 and 3.x.
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filewriter import dcmwrite

    rng = random.Random(seed)
    used: Set[str] = set()
    os.makedirs(folder, exist_ok=True)
    study_uids = [_uid(rng, used) for _ in range(studies)]
    series_uids = [[_uid(rng, used) for _ in range(series_per_study)] for _ in range(studies)]
    pydicom_major = int(pydicom.__version__.split(".")[0])
    objects: List[GeneratedObject] = []
    for number in range(count):
        study = number * studies // count
        series = number % series_per_study
        side = rng.choice(list(matrices))
        ds = Dataset()
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = _uid(rng, used)
        ds.StudyDate = "20240102"
        ds.StudyTime = f"{10 + study % 10:02d}1500"
        ds.AccessionNumber = f"TORTURE{study}"
        ds.Modality = "CT"
        ds.PatientName = f"Torture^Study{study}"
        ds.PatientID = f"TORTURE{study}"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study_uids[study]
        ds.SeriesInstanceUID = series_uids[study][series]
        ds.StudyID = str(study + 1)
        ds.SeriesNumber = series + 1
        ds.InstanceNumber = number + 1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = side
        ds.Columns = side
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.PixelData = rng.randbytes(side * side * 2)
        ds["PixelData"].VR = "OW"
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = EXPLICIT_VR_LITTLE_ENDIAN
        ds.file_meta = meta
        path = os.path.join(folder, f"ct{number:04d}.dcm")
        if pydicom_major >= 3:
            dcmwrite(path, ds, enforce_file_format=True)
        else:  # pydicom 2.x takes the encoding from the data set's flags
            ds.is_little_endian = True
            ds.is_implicit_VR = False
            ds.preamble = bytes(128)
            dcmwrite(path, ds, write_like_original=False)
        objects.append(GeneratedObject(path, str(ds.SOPInstanceUID), study_uids[study],
                                       series_uids[study][series], study))
    return objects


def data_set_bytes(path: str) -> bytes:
    """The bytes of a Part 10 file after its File Meta Information (group 0002, with its group length)."""
    with open(path, "rb") as handle:
        data = handle.read()
    if data[128:132] != b"DICM":
        raise ValueError(f"{path}: no DICM prefix")
    tag, vr, length = struct.unpack("<4s2sH", data[132:140])
    if tag != b"\x02\x00\x00\x00" or vr != b"UL" or length != 4:
        raise ValueError(f"{path}: File Meta Information does not start with its group length")
    group_length = struct.unpack("<L", data[140:144])[0]
    return data[144 + group_length:]


# --- storescu --------------------------------------------------------------------------------------


def parse_storescu(output: str) -> List[Tuple[str, Optional[str]]]:
    """(file, response status text or None) for every file storescu -v started to send, in order.

    A file whose "Sending file" line is not followed by a "Received Store
    Response" before the next file (or the end) got no response: None.
    """
    results: List[Tuple[str, Optional[str]]] = []
    current: Optional[str] = None
    for line in output.splitlines():
        sending = _SENDING.search(line)
        if sending:
            if current is not None:
                results.append((current, None))
            current = sending.group(1)
            continue
        response = _RESPONSE.search(line)
        if response and current is not None:
            results.append((current, response.group(1) or ""))
            current = None
    if current is not None:
        results.append((current, None))
    return results


def storescu_command(storescu: str, port: int, paths: Iterable[str], calling: str = "TORTURE",
                     halt: bool = True) -> List[str]:
    return [storescu, "-v", "-aet", calling, "-aec", "DISK_SERVER"] + ([] if halt else ["-nh"]) + \
        ["127.0.0.1", str(port)] + list(paths)


def storescu_env() -> Dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


# --- the appliance ---------------------------------------------------------------------------------


def write_config(path: str, data_dir: str, port: int, **disk_server: object) -> str:
    """A configuration for the Disk-Server alone on 127.0.0.1:``port`` over ``data_dir``.

    Explicit VR Little Endian is preferred so that stored data sets keep the
    bytes storescu sent; ``disk_server`` adds (or overrides) [disk_server] keys.
    """
    keys: Dict[str, object] = {
        "interface": "127.0.0.1",
        "port": port,
        "min_free_space": 0,
        "auto_delete": False,
        "transfer_syntax_priority": [EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN],
    }
    keys.update(disk_server)

    def toml(value: object) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (int, float)):
            return str(value)
        if isinstance(value, str):
            return json.dumps(value)  # a TOML basic string
        return "[" + ", ".join(toml(item) for item in value) + "]"  # type: ignore[union-attr]

    lines = ["[appliance]", f"data_dir = {toml(os.path.abspath(data_dir))}", "", "[disk_server]"]
    lines += [f"{key} = {toml(value)}" for key, value in keys.items()]
    lines += ["", "[memory_server]", "port = 0", "", "[web]", "port = 0", ""]
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines))
    return path


def free_port() -> int:
    """A TCP port nothing listens on now (bound to port 0, then closed: a small race, retried on start)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
    finally:
        probe.close()


def child_env() -> Dict[str, str]:
    env = dict(os.environ)
    inherited = env.get("PYTHONPATH")
    env["PYTHONPATH"] = ROOT + (os.pathsep + inherited if inherited else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("APPLIANCE_CONFIG", None)
    return env


class StartError(Exception):
    """The appliance did not come up."""


class Appliance:
    """One twistd process of the appliance, its output in ``log_path``."""

    def __init__(self, config: str, log_path: str, port: int) -> None:
        self.config = config
        self.log_path = log_path
        self.port = port
        self.started_at = time.time()
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable] + TWISTD + ["-n", "--pidfile=", "appliance", "--config", config],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=child_env(), cwd=ROOT,
        )

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def wait_listening(self, limit: float = 30.0) -> None:
        """Poll until the port accepts a connection (bounded); StartError if the process ends or time runs out."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise StartError(f"the appliance exited with status {self.process.returncode}:\n{self.log()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                    return
            except OSError:
                time.sleep(0.05)
        raise StartError(f"the appliance did not listen on port {self.port} within {limit} s:\n{self.log()[-2000:]}")

    def wait_reconciled(self, limit: float = 30.0) -> Tuple[int, int, int]:
        """Poll the log until the start-up reconciliation line appears (bounded); its three counts."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            text = self.log()
            match = RECONCILED.search(text)
            if match:
                return int(match.group(1)), int(match.group(2)), int(match.group(3))
            if "archive start-up check failed" in text or self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise StartError(f"no start-up reconciliation line in the appliance's log:\n{self.log()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL, then reap (bounded)."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        self._log.close()

    def stop(self, limit: float = 30.0) -> int:
        """SIGTERM (twistd shuts down cleanly), SIGKILL if it takes longer than ``limit``; the exit status."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=limit)
        self._log.close()
        return self.process.returncode


def start_appliance(folder: str, data_dir: str, name: str, attempts: int = 3, **disk_server: object) -> Appliance:
    """Start the appliance on a free port and wait until it listens (a port taken meanwhile: retried)."""
    problem = ""
    for attempt in range(attempts):
        port = free_port()
        config = write_config(os.path.join(folder, f"{name}.toml"), data_dir, port, **disk_server)
        appliance = Appliance(config, os.path.join(folder, f"{name}.log" if not attempt else f"{name}-{attempt}.log"),
                              port)
        try:
            appliance.wait_listening()
            return appliance
        except StartError as error:
            appliance.stop()
            problem = str(error)
            if "already in use" not in problem:
                break
    raise StartError(problem)


# --- checking the archive --------------------------------------------------------------------------


@dataclass
class Findings:
    """What one check of the archive found; every count but ``rows`` is a problem."""

    rows: int = 0
    lost: List[str] = field(default_factory=list)
    corrupt: List[str] = field(default_factory=list)
    rows_without_files: List[str] = field(default_factory=list)
    orphans: List[str] = field(default_factory=list)
    leftovers: List[str] = field(default_factory=list)

    def problems(self) -> List[str]:
        lines = []
        for title, items in (("lost (acknowledged, not in the index or without its file)", self.lost),
                             ("corrupt (indexed file differs from the data set sent)", self.corrupt),
                             ("index rows naming a missing file", self.rows_without_files),
                             ("orphans (files under archive/objects the index does not name)", self.orphans),
                             ("leftovers in archive/tmp older than the restart", self.leftovers)):
            for item in items:
                lines.append(f"{title}: {item}")
        return lines


def index_rows(archive_root: str) -> Dict[str, Tuple[str, int, str, str]]:
    """SOP Instance UID -> (path, size, transfer syntax, study UID), read from the index read-only."""
    path = os.path.join(archive_root, "index.sqlite")
    uri = "file:" + urllib.request.pathname2url(os.path.abspath(path)) + "?mode=ro"
    db = sqlite3.connect(uri, uri=True, timeout=30.0)
    try:
        rows = db.execute(
            """SELECT i.sop_uid, i.path, i.size, i.transfer_syntax, st.study_uid
               FROM instances i JOIN series se ON i.series_pk = se.pk JOIN studies st ON se.study_pk = st.pk"""
        ).fetchall()
    finally:
        db.close()
    return {sop: (relative, size, syntax, study) for sop, relative, size, syntax, study in rows}


def check_archive(archive_root: str, sent: Dict[str, bytes], acknowledged: Iterable[str],
                  restarted_at: float) -> Findings:
    """Check the archive at ``archive_root`` (data_dir/archive) against what was acknowledged.

    ``sent`` maps SOP Instance UIDs to the data set bytes sent; files in
    tmp/ last modified before ``restarted_at`` count as leftovers (pass
    ``float("inf")`` when nothing may be there at all), but for empty ones
    (the spare files a running appliance keeps).
    """
    findings = Findings()
    rows = index_rows(archive_root)
    findings.rows = len(rows)
    for sop, (relative, size, _, _) in sorted(rows.items()):
        if not os.path.isfile(os.path.join(archive_root, relative)):
            findings.rows_without_files.append(f"{sop} -> {relative}")
    for sop in sorted(set(acknowledged)):
        row = rows.get(sop)
        if row is None:
            findings.lost.append(f"{sop} (no index row)")
            continue
        relative, size, syntax, _ = row
        absolute = os.path.join(archive_root, relative)
        if not os.path.isfile(absolute):
            findings.lost.append(f"{sop} (file {relative} missing)")
            continue
        problem = ""
        if os.path.getsize(absolute) != size:
            problem = f"{os.path.getsize(absolute)} bytes, index says {size}"
        elif syntax != EXPLICIT_VR_LITTLE_ENDIAN:
            problem = f"stored in transfer syntax {syntax}, sent in Explicit VR Little Endian"
        else:
            try:
                if data_set_bytes(absolute) != sent[sop]:
                    problem = "data set bytes differ"
            except ValueError as error:
                problem = str(error)
        if problem:
            findings.corrupt.append(f"{sop} ({relative}: {problem})")
    named = {relative for relative, _, _, _ in rows.values()}
    for directory, _, files in os.walk(os.path.join(archive_root, "objects")):
        for name in files:
            relative = os.path.relpath(os.path.join(directory, name), archive_root)
            if relative not in named:
                findings.orphans.append(relative)
    tmp = os.path.join(archive_root, "tmp")
    for name in sorted(os.listdir(tmp)) if os.path.isdir(tmp) else []:
        try:
            stat = os.stat(os.path.join(tmp, name))
        except FileNotFoundError:
            continue
        # empty files are the spare temporary files a running appliance makes ahead of need (a store's file
        # starts with its File Meta Information at once)
        if stat.st_size and stat.st_mtime < restarted_at:
            findings.leftovers.append(name)
    return findings


# --- the run ---------------------------------------------------------------------------------------


@dataclass
class Totals:
    rounds: int = 0
    acknowledged: int = 0
    lost: int = 0
    corrupt: int = 0
    rows_without_files: int = 0
    orphans: int = 0
    leftovers: int = 0
    interrupted: int = 0
    reconciled_temps: int = 0
    reconciled_orphans: int = 0
    errors: int = 0

    def summary(self) -> str:
        return (f"rounds: {self.rounds}, acknowledged: {self.acknowledged}, lost: {self.lost}, "
                f"orphans: {self.orphans}, corrupt: {self.corrupt}, rows without files: {self.rows_without_files}, "
                f"leftovers: {self.leftovers}, errors: {self.errors}, interrupted: {self.interrupted}")

    def failed(self) -> bool:
        return bool(self.lost or self.corrupt or self.rows_without_files or self.orphans or self.leftovers
                    or self.errors)


def _say(text: str) -> None:
    print(text, flush=True)


def run(args: argparse.Namespace) -> int:
    storescu = shutil.which("storescu")
    if storescu is None:
        _say("torture: DCMTK's storescu is not installed")
        return 2
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    rng = random.Random(seed)
    work = os.path.abspath(args.work) if args.work else tempfile.mkdtemp(prefix="torture-")
    os.makedirs(work, exist_ok=True)
    data_dir = os.path.join(work, "data")
    logs = os.path.join(work, "logs")
    os.makedirs(logs, exist_ok=True)
    _say(f"seed: {seed}; work folder: {work}; rounds: {args.rounds}; objects: {args.objects} in {args.studies} "
         f"studies; streams: {args.streams}; kill delay {args.min_delay}-{args.max_delay} s")
    objects = generate_objects(os.path.join(work, "objects"), args.objects, args.studies, seed)
    by_path = {obj.path: obj for obj in objects}
    sent = {obj.sop_uid: data_set_bytes(obj.path) for obj in objects}
    totals = Totals()
    acknowledged_ever: Set[str] = set()
    starts = 0
    appliance: Optional[Appliance] = None
    try:
        try:
            appliance = start_appliance(logs, data_dir, f"appliance-{starts:03d}")
            appliance.wait_reconciled()
        except StartError as error:
            _say(f"torture: {error}")
            return 2
        for number in range(1, args.rounds + 1):
            streams = []
            for stream in range(args.streams):
                order = [obj.path for obj in objects]
                rng.shuffle(order)
                out_path = os.path.join(logs, f"round-{number:03d}-storescu-{stream}")
                out, err = open(out_path + ".out", "wb"), open(out_path + ".err", "wb")
                process = subprocess.Popen(storescu_command(storescu, appliance.port, order, f"TORTURE{stream}"),
                                           stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=storescu_env())
                streams.append((process, out, err, out_path, len(order)))
            delay = rng.uniform(args.min_delay, args.max_delay)
            time.sleep(delay)
            appliance.kill()
            round_acknowledged: Set[str] = set()
            responses = successes = 0
            interrupted = False
            other_statuses: Dict[str, int] = {}
            for process, out, err, out_path, sending in streams:
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=30)
                    _say(f"round {number}: storescu did not end within 30 s of the kill; killed")
                    totals.errors += 1
                out.close()
                err.close()
                with open(out_path + ".err", encoding="utf-8", errors="replace") as handle:
                    text = handle.read()
                if "Sending file:" not in text:  # a DCMTK logging to stdout
                    with open(out_path + ".out", encoding="utf-8", errors="replace") as handle:
                        text = handle.read()
                pairs = parse_storescu(text)
                answered = [(path, status) for path, status in pairs if status is not None]
                responses += len(answered)
                if len(answered) < sending:
                    interrupted = True
                for path, status in answered:
                    if status == "Success":
                        successes += 1
                        round_acknowledged.add(by_path[path].sop_uid)
                    else:
                        other_statuses[status] = other_statuses.get(status, 0) + 1
            acknowledged_ever |= round_acknowledged
            totals.acknowledged += successes
            totals.interrupted += interrupted
            starts += 1
            try:
                appliance = start_appliance(logs, data_dir, f"appliance-{starts:03d}")
                restarted_at = appliance.started_at
                temps, never_indexed, missing = appliance.wait_reconciled()
            except StartError as error:
                _say(f"round {number}: the appliance did not restart: {error}")
                totals.rounds = number
                totals.errors += 1
                appliance = None
                break
            totals.reconciled_temps += temps
            totals.reconciled_orphans += never_indexed
            findings = check_archive(os.path.join(data_dir, "archive"), sent, acknowledged_ever, restarted_at)
            rows_without_files = len(findings.rows_without_files) + missing
            if missing:  # rows whose files had vanished, removed at start-up: their objects are gone
                findings.rows_without_files.append(f"{missing} removed by the start-up reconciliation")
            totals.rounds = number
            totals.lost += len(findings.lost)
            totals.corrupt += len(findings.corrupt)
            totals.rows_without_files += rows_without_files
            totals.orphans += len(findings.orphans)
            totals.leftovers += len(findings.leftovers)
            others = "".join(f", {count} answered {status!r}" for status, count in sorted(other_statuses.items()))
            when = "mid-stream" if interrupted else "streams had ended"
            _say(f"round {number}: killed after {delay:.3f} s ({when}); "
                 f"{responses} responses, {successes} Success{others}; {len(acknowledged_ever)} distinct instances "
                 f"acknowledged so far, {findings.rows} indexed; restart removed {temps} temporary and "
                 f"{never_indexed} never-indexed files, {missing} rows without files; lost {len(findings.lost)}, "
                 f"corrupt {len(findings.corrupt)}, orphans {len(findings.orphans)}, "
                 f"leftovers {len(findings.leftovers)}")
            for line in findings.problems():
                _say(f"round {number}: {line}")
            if "Traceback" in appliance.log():
                totals.errors += 1
                _say(f"round {number}: the restarted appliance logged a traceback:\n{appliance.log()[-3000:]}")
        if appliance is not None:
            appliance_config = appliance.config
            status = appliance.stop()
            appliance = None
            if status not in (0, -signal.SIGTERM):  # twistd ends itself with the signal it stopped on
                _say(f"torture: the last appliance exited with status {status} on SIGTERM")
            verify = subprocess.run(
                [sys.executable, "-m", "appliance.cli.archive", "--config", appliance_config, "verify"],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env(), cwd=ROOT, timeout=300,
            )
            last = verify.stdout.decode("utf-8", "replace").strip().splitlines()[-1:] or ["(no output)"]
            _say(f"appliance-archive verify: {last[0]} (exit status {verify.returncode})")
            if verify.returncode != 0:
                _say(verify.stdout.decode("utf-8", "replace")[-3000:])
                totals.errors += 1
    finally:
        if appliance is not None:
            appliance.stop()
    _say(f"reconciliation removed {totals.reconciled_temps} unfinished temporary files and "
         f"{totals.reconciled_orphans} never-indexed files over {totals.rounds} restarts")
    if not args.keep and not totals.failed() and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    elif totals.failed():
        _say(f"kept the work folder for inspection: {work}")
    _say(totals.summary())
    return 1 if totals.failed() or totals.rounds < args.rounds else 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="torture", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=50, help="kill/restart rounds (default 50)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one, printed)")
    parser.add_argument("--objects", type=int, default=200, help="generated CT images (default 200)")
    parser.add_argument("--studies", type=int, default=4, help="studies they belong to (default 4)")
    parser.add_argument("--streams", type=int, default=2, help="storescu processes at once, each sending every "
                        "object in its own order (default 2)")
    parser.add_argument("--min-delay", type=float, default=0.05, help="shortest delay before the kill, seconds")
    parser.add_argument("--max-delay", type=float, default=1.5, help="longest delay before the kill, seconds")
    parser.add_argument("--work", default=None, help="work folder (default: a fresh temporary one, removed after "
                        "a clean run)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.objects < 1 or args.studies < 1 or args.streams < 1 or \
            not 0 <= args.min_delay <= args.max_delay:
        parser.error("rounds, objects, studies and streams must be positive, 0 <= min-delay <= max-delay")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
