#!/usr/bin/env python3
"""Load benchmark: a ~100 MB study moved into the Memory-Server, beside Orthanc -> storescp.

Usage (from the repository root; ``make bench`` runs it after store_bench.py and query_bench.py,
``make bench-load`` alone, options through ``BENCH_ARGS`` or ``LOAD_BENCH_ARGS``)::

    PYTHONPATH=. .venv/bin/python bench/load_bench.py [--repeat N] [--memory-limit SIZE] [--max-pdu N]
                                                      [--workdir DIR] [--profile DIR] [--py-spy DIR]

What it does:

* reuses query_bench's move corpus (``bench/.corpus/move/``, built once by
  store_bench's builder if missing): one study of 200 CT images of 512x512
  16-bit pixels, ~106 MB of Explicit VR Little Endian Part 10 files;
* starts, on 127.0.0.1 and free ports, as query_bench does: DCMTK ``storescp``
  (AE ``MOVESCP``, writing files, no fsync), Orthanc (Debian's package, its
  defaults but for the ports, C-FIND/C-MOVE allowed from any AE, ``StableAge``
  2 s, ``MOVESCP`` and ``MEMORY_SERVER`` in its ``DicomModalities``) and ONE
  appliance (twistd) with its Disk-Server, its Memory-Server
  (``memory_limit`` 2 GiB by default, every other key the shipped default:
  ``max_pdu`` a MiB, the transfer syntax priority) and its web API, whose
  configuration names its own Disk-Server (``[devices.disk_server]``), its own
  Memory-Server (``[devices.memory_server]``: the Disk-Server resolves the
  C-MOVE destination with it), storescp (``[devices.movescp]``) and Orthanc
  (``[devices.orthanc]``); every
  server with ``TCP_NODELAY=1`` for DCMTK's network layer (Orthanc's is DCMTK's);
* stores the study in the Disk-Server and in Orthanc with ``storescu``, waits
  for the appliance's start-up check and for the CPUs to be idle 3 s in a row
  (at most 2 minutes), then moves it once along each path, untimed (warm-up);
* per round (``--repeat``, default 5), the four paths in an order rotating
  from round to round, each moving the whole study:

  - ``disk->memory``: the appliance's Disk-Server to its Memory-Server, a load
    through the HTTP API (``POST /api/loads {"device": "disk_server", ...}``);
  - ``orthanc->memory``: Orthanc to the Memory-Server, a load through the API
    (``"device": "orthanc"``);
  - ``orthanc->storescp``: DCMTK ``movescu`` (Study Root, STUDY level) asking
    Orthanc to move the study to storescp, as query_bench's C-MOVE does: the
    baseline of the ratios;
  - ``disk->storescp``: ``movescu`` asking the Disk-Server to move it to
    storescp (``[devices.movescp]``).  Not part of the comparison: with it the
    two senders go into the two receivers, which tells the sender's share of
    a path's time from the receiver's.

  A load is timed from just before its POST to the answer that says ``done``,
  followed with ``GET /api/loads/N?wait=30`` (answered at the load's next
  change of state, or of counts at most every 0.25 s: no sleeps; the number of these requests is
  recorded, they are answered by the same reactor that receives the objects);
  ``movescu`` by the wall time of its process (start-up, association and
  release included; a load's time includes its association to the device too).
  The load's own duration as the appliance saw it (``ended - created``) is
  recorded beside it;
* while a move runs, a thread samples ``VmRSS`` (``/proc/PID/status``) of
  the receiving process (the appliance, or storescp) and of the sending one
  every 50 ms: peak, and growth over the RSS just before the move (``VmHWM``
  cannot be reset, so it would only show the first round); CPU seconds (user
  + system, all threads) of both processes over the move;
* checks every round: the load ends ``done`` with ``completed`` and
  ``received`` equal to the number of files, failed 0, and
  ``GET /api/memory/studies/UID`` holds that many objects, whose data sets
  add up to the files' data set bytes (the files less their File Meta
  Information and CT_small's trailing padding, which storescu does not send);
  storescp received that many files.  Then, untimed: every object held is
  fetched through the API and compared byte for byte with its file's data
  set, the study is freed (``DELETE /api/memory/studies/UID``) and nothing
  may be held after it; ``sync``;
* prints a table of medians (seconds, MB/s = study file bytes / 1e6 / s, ratio
  to Orthanc -> storescp, peak RSS and growth of the receiver, CPU) and writes
  everything as JSON to ``bench/results/load-<timestamp>.json``.

``--max-pdu N`` makes both receivers announce another maximum PDU length
(the Memory-Server's ``max_pdu`` and storescp's ``--max-pdu``, 4096 to
131072), to see what the PDU size costs; ``--memory-server-max-pdu N`` sets
the Memory-Server's alone.  ``--profile DIR`` runs the appliance under
twistd's cProfile (reactor thread only: the Memory-Server's checks of
objects over a MiB, on worker threads, are not in it) and prints its top functions at the
end; ``--py-spy DIR`` records the appliance with py-spy (``pip install
py-spy``; every thread, 250 samples/s, raw stacks in DIR) during each timed
load and prints, per path and thread, the milliseconds per load busy and the
functions they went to.  Both slow the appliance down: their times are not
the benchmark's.  Needs DCMTK (``storescu``, ``storescp``,
``movescu``, ``echoscu``) and Orthanc; ``make bench`` installs both.  Only
127.0.0.1 is ever contacted.  Every server is killed (its whole process group)
whatever happens.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional, Tuple
from urllib.parse import quote

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import query_bench as qb  # noqa: E402  (move corpus, Orthanc and storescp as C-MOVE peers, movescu, wait_idle)
import store_bench as sb  # noqa: E402  (servers, tools, run_guarded, results)
from store_bench import HOST, BenchError  # noqa: E402

RESULTS_DIR = sb.RESULTS_DIR
MEMORY_AET = "MEMORY_SERVER"
MANAGER_AET = "MEMORY_MANAGER"
DEFAULT_MEMORY_LIMIT = "2 GiB"
LOAD_TIMEOUT = 300            # seconds for one load, from its POST to its end
HTTP_TIMEOUT = 90             # seconds for one HTTP answer (?wait=30 answers within 30 s)
SAMPLE_INTERVAL = 0.05        # seconds between VmRSS samples
SPY_RATE = 250                # py-spy samples per second (--py-spy)

#: path -> (label, receiving process, sending process)
PATHS = {
    "disk->memory": ("appliance Disk-Server -> appliance Memory-Server (load through the API)", "appliance",
                     "appliance"),
    "orthanc->memory": ("Orthanc -> appliance Memory-Server (load through the API)", "appliance", "orthanc"),
    "orthanc->storescp": ("Orthanc -> DCMTK storescp (movescu)", "storescp", "orthanc"),
    # not asked for by the comparison, but it tells the sender's share from the receiver's: the same two
    # senders into the same two receivers
    "disk->storescp": ("appliance Disk-Server -> DCMTK storescp (movescu)", "storescp", "appliance"),
}
BASELINE = "orthanc->storescp"


# --------------------------------------------------------------------------- servers


class LoadAppliance(qb.QueryAppliance):
    """One appliance: Disk-Server, Memory-Server and web API; its devices its own two AEs, storescp and Orthanc.

    wait_listening() is QueryAppliance's: C-ECHO, then the end of the archive's start-up check.
    """

    def __init__(self, tools, workdir, memory_limit: str, profile: Optional[str] = None,
                 max_pdu: Optional[int] = None) -> None:
        super().__init__(tools, workdir, "appliance", move_port=0)
        self.profile = profile
        self.memory_limit = memory_limit
        self.max_pdu = max_pdu
        self.memory_port = sb.free_port()
        self.web_port = sb.free_port()
        self.orthanc_port: Optional[int] = None
        self._http: Optional[http.client.HTTPConnection] = None
        self.requests = 0

    def command(self) -> List[str]:
        if self.orthanc_port is None or not self.move_port:
            raise BenchError("the appliance needs Orthanc's and storescp's DICOM ports before it starts")
        return super().command()

    def config(self) -> str:
        """Its own whole configuration (QueryAppliance's adds only the C-MOVE destination, which this one has)."""
        return self.disk_server_config() + (
            "[memory_server]\n"
            f'ae_title = "{MEMORY_AET}"\n'
            f'interface = "{HOST}"\n'
            f"port = {self.memory_port}\n"
            f"memory_limit = {json.dumps(self.memory_limit)}\n"
            + (f"max_pdu = {self.max_pdu}\n" if self.max_pdu else "")
            + "timeout = 120\n"
            "[memory_manager]\n"
            f'ae_title = "{MANAGER_AET}"\n'
            "[web]\n"
            f'interface = "{HOST}"\n'
            f"port = {self.web_port}\n"
            "[devices.disk_server]\n"
            f'ae_title = "{self.aet}"\n'
            f'host = "{HOST}"\n'
            f"port = {self.port}\n"
            "timeout = 120\n"
            "[devices.memory_server]\n"
            f'ae_title = "{MEMORY_AET}"\n'
            f'host = "{HOST}"\n'
            f"port = {self.memory_port}\n"
            "timeout = 120\n"
            "[devices.movescp]\n"
            f'ae_title = "{qb.MOVE_DEST_AET}"\n'
            f'host = "{HOST}"\n'
            f"port = {self.move_port}\n"
            "timeout = 120\n"
            "[devices.orthanc]\n"
            f'ae_title = "{LoadOrthanc.aet}"\n'
            f'host = "{HOST}"\n'
            f"port = {self.orthanc_port}\n"
            "timeout = 120\n"
        )

    # --- the HTTP API (one kept-alive connection) ---------------------------------------------------------

    def api(self, method: str, path: str, body=None) -> Tuple[int, dict]:
        payload = json.dumps(body).encode("utf-8") if body is not None else None
        headers = {"content-type": "application/json"} if payload is not None else {}
        for attempt in (1, 2):
            if self._http is None:
                self._http = http.client.HTTPConnection(HOST, self.web_port, timeout=HTTP_TIMEOUT)
            try:
                self._http.request(method, path, body=payload, headers=headers)
                response = self._http.getresponse()
                data = response.read()
                break
            except (http.client.HTTPException, OSError) as error:  # OSError: refused, reset, timed out
                self._http.close()
                self._http = None
                if attempt == 2 or method == "POST":  # a POST is never sent twice
                    raise BenchError(f"appliance API {method} {path}: {error}\n" + self.log_tail()) from None
        self.requests += 1
        try:
            value = json.loads(data) if data else None
        except ValueError:
            raise BenchError(f"appliance API {method} {path}: {response.status}, not JSON: {data[:200]!r}") from None
        return response.status, value

    def stop(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None
        super().stop()


class LoadDestination(qb.MoveDestination):
    """query_bench's storescp (MOVESCP), optionally with another maximum PDU length than DCMTK's 16384."""

    def __init__(self, tools, workdir, max_pdu: Optional[int] = None) -> None:
        super().__init__(tools, workdir)
        self.max_pdu = max_pdu

    def command(self) -> List[str]:
        command = super().command()
        if self.max_pdu:
            command[1:1] = ["--max-pdu", str(self.max_pdu)]
        return command


class LoadOrthanc(qb.QueryOrthanc):
    """query_bench's Orthanc (storescp as MOVESCP), which also knows the appliance's Memory-Server."""

    aet = "ORTHANC"

    def __init__(self, tools, workdir, move_port: int, memory_port: int) -> None:
        super().__init__(tools, workdir, move_port)
        self.memory_port = memory_port

    def command(self) -> List[str]:
        command = super().command()
        path = command[-1]
        with open(path) as handle:
            config = json.load(handle)
        config["Name"] = "load-bench"
        config["DicomModalities"]["memory"] = [MEMORY_AET, HOST, self.memory_port]
        config["DicomModalities"]["manager"] = [MANAGER_AET, HOST, 104]
        with open(path, "w") as handle:
            json.dump(config, handle, indent=1)
        return command


# --------------------------------------------------------------------------- measuring


def vmrss_kib(pid: int) -> Optional[int]:
    """Resident set size of a process now, in KiB (``VmRSS``)."""
    return sb.proc_status_kib(pid, "VmRSS")


class RssSampler:
    """Samples VmRSS of some processes every ``interval`` seconds on a thread, from start() to stop()."""

    def __init__(self, pids: Dict[str, int], interval: float = SAMPLE_INTERVAL) -> None:
        self.pids = pids
        self.interval = interval
        self.before: Dict[str, Optional[int]] = {}
        self.peak: Dict[str, int] = {}
        self.after: Dict[str, Optional[int]] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _sample(self) -> Dict[str, Optional[int]]:
        values = {name: vmrss_kib(pid) for name, pid in self.pids.items()}
        for name, value in values.items():
            if value is not None and value > self.peak.get(name, 0):
                self.peak[name] = value
        self.samples += 1
        return values

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> "RssSampler":
        self.before = self._sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.after = self._sample()

    def of(self, name: str) -> dict:
        before, peak = self.before.get(name), self.peak.get(name)
        return {"before_kib": before, "peak_kib": peak, "after_kib": self.after.get(name),
                "growth_kib": peak - before if peak is not None and before is not None else None}


_ENDED = ("done", "failed", "cancelled")


def load_through_api(appliance: LoadAppliance, device: str, study_uid: str) -> Tuple[float, dict, int]:
    """POST a load, follow it with ?wait=30 to its end: (seconds from the POST to the end, the load, GETs)."""
    started = time.perf_counter()
    code, load = appliance.api("POST", "/api/loads", {"device": device, "study": study_uid})
    if code != 202:
        raise BenchError(f"POST /api/loads for {device}: {code} {load}")
    gets = 0
    while load["state"] not in _ENDED:
        if time.perf_counter() - started > LOAD_TIMEOUT:
            raise BenchError(f"load {load['id']} from {device} did not end in {LOAD_TIMEOUT} s: {load}\n"
                             + appliance.log_tail())
        code, load = appliance.api("GET", f"/api/loads/{load['id']}?wait=30")
        gets += 1
        if code != 200:
            raise BenchError(f"GET /api/loads/{load}: {code}")
    return time.perf_counter() - started, load, gets


def held_study(appliance: LoadAppliance, study_uid: str) -> Optional[dict]:
    code, value = appliance.api("GET", f"/api/memory/studies/{quote(study_uid, safe='')}")
    if code == 404:
        return None
    if code != 200:
        raise BenchError(f"GET /api/memory/studies/{study_uid}: {code} {value}")
    return value


def free_study(appliance: LoadAppliance, study_uid: str) -> int:
    code, value = appliance.api("DELETE", f"/api/memory/studies/{quote(study_uid, safe='')}")
    if code != 200:
        raise BenchError(f"DELETE /api/memory/studies/{study_uid}: {code} {value}")
    code, listing = appliance.api("GET", "/api/memory/studies")
    if code != 200 or listing["studies"]:
        raise BenchError(f"the Memory-Server still holds {listing} after freeing the study")
    return value["freed"]


def source_dataset(path: str) -> bytes:
    """A corpus file's data set as a sender puts it on the wire: the file less its preamble, "DICM" and File
    Meta Information (whose length its (0002,0000) element gives, as in every file pydicom writes), and less
    its trailing Data Set Trailing Padding (FFFC,FFFC) (CT_small's, which storescu does not send)."""
    with open(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 144 or raw[128:132] != b"DICM" or raw[132:138] != b"\x02\x00\x00\x00UL":
        raise BenchError(f"{path}: not a Part 10 file starting with (0002,0000)")
    data = raw[144 + int.from_bytes(raw[140:144], "little"):]
    from pydicom import dcmread

    padding = dcmread(path, specific_tags=["DataSetTrailingPadding"]).get("DataSetTrailingPadding")
    if padding is not None:
        size = 12 + len(padding)
        if data[-size:-size + 6] != b"\xfc\xff\xfc\xffOB":
            raise BenchError(f"{path}: the Data Set Trailing Padding is not the last element")
        data = data[:-size]
    return data


def dataset_bytes(corpus: dict) -> Tuple[int, Dict[str, Tuple[str, int]]]:
    """The corpus's data set bytes as sent (source_dataset), and SOP Instance UID -> (file, bytes)."""
    from pydicom import dcmread

    total = 0
    instances = {}
    for name in sorted(os.listdir(corpus["dir"])):
        path = os.path.join(corpus["dir"], name)
        size = len(source_dataset(path))
        instances[str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = (path, size)
        total += size
    return total, instances


def check_content(appliance: "LoadAppliance", study_uid: str, instances: Dict[str, Tuple[str, int]],
                  where: str) -> int:
    """Every object held, fetched through the API (Part 10), compared byte for byte with its source data set."""
    code, study = appliance.api("GET", f"/api/memory/studies/{quote(study_uid, safe='')}")
    if code != 200:
        raise BenchError(f"GET /api/memory/studies/{study_uid}: {code} {study}")
    checked = 0
    for series in study["series"]:
        for instance in series["instances"]:
            url = "/api/memory/studies/{}/series/{}/instances/{}".format(
                *(quote(uid, safe="") for uid in (study_uid, series["series"], instance["instance"])))
            connection = http.client.HTTPConnection(HOST, appliance.web_port, timeout=HTTP_TIMEOUT)
            try:
                connection.request("GET", url)
                response = connection.getresponse()
                part10 = response.read()
            finally:
                connection.close()
            path, _ = instances.get(instance["instance"], (None, 0))
            if response.status != 200 or path is None:
                raise BenchError(f"{where}: instance {instance['instance']}: HTTP {response.status}, "
                                 f"{'known' if path else 'not in the corpus'}")
            held = part10[144 + int.from_bytes(part10[140:144], "little"):]
            if held != source_dataset(path):
                raise BenchError(f"{where}: instance {instance['instance']} held differs from {path}")
            checked += 1
    return checked


def move_into_memory(appliance: LoadAppliance, device: str, study_uid: str, corpus: dict,
                     expected_bytes: int) -> dict:
    """One timed load into the Memory-Server, checked, then the study freed (untimed)."""
    if held_study(appliance, study_uid) is not None:
        raise BenchError(f"the study is in memory before the load from {device}: it would not be moved")
    requests_before = appliance.requests
    seconds, load, gets = load_through_api(appliance, device, study_uid)
    files = corpus["files"]
    if (load["state"] != "done" or load["completed"] != files or load["failed"] or load["received"] != files):
        raise BenchError(f"load from {device}: state {load['state']}, completed {load['completed']}, failed "
                         f"{load['failed']}, received {load['received']} of {files} (error: {load['error']})\n"
                         + appliance.log_tail())
    held = held_study(appliance, study_uid)
    if held is None or held["instance_count"] != files:
        raise BenchError(f"after the load from {device} the Memory-Server holds "
                         f"{held['instance_count'] if held else 0} of {files} objects")
    code, study = appliance.api("GET", f"/api/memory/studies/{quote(study_uid, safe='')}")
    data = sum(instance["bytes"] for series in study["series"] for instance in series["instances"])
    syntaxes = sorted({instance["transfer_syntax"] for series in study["series"] for instance in series["instances"]})
    if data != expected_bytes:
        raise BenchError(f"after the load from {device} the Memory-Server holds {data} data set bytes, the files "
                         f"{expected_bytes} (transfer syntaxes held: {syntaxes})")
    return {"seconds": seconds, "load_id": load["id"], "completed": load["completed"], "received": load["received"],
            "appliance_load_s": (load["ended"] - load["created"]) if load.get("ended") else None,
            "appliance_running_s": (load["ended"] - load["started"]) if load.get("started") else None,
            "wait_requests": gets, "held_objects": held["instance_count"], "held_bytes": held["bytes"],
            "held_transfer_syntaxes": syntaxes, "api_requests": appliance.requests - requests_before}


class PySpy:
    """py-spy recording one process (every thread, raw collapsed stacks) from start() to stop()."""

    def __init__(self, binary: str, pid: int, out: str, rate: int = SPY_RATE) -> None:
        self.command = [binary, "record", "-p", str(pid), "--threads", "-r", str(rate), "-f", "raw", "-o", out]
        self.log_path = out + ".log"
        self.process: Optional[subprocess.Popen] = None

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # attached once it says it is sampling
            with open(self.log_path, "rb") as log:
                if b"Sampling process" in log.read():
                    return
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        with open(self.log_path, "rb") as log:
            raise BenchError("py-spy did not start sampling: " + log.read().decode("utf-8", "replace")[-1000:])

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGINT)  # it writes its file on SIGINT
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


#: leaf frames of a thread that waits (py-spy samples some waits as active)
_SPY_IDLE = ("Condition.wait", "epollreactor.py:227")
#: folders left out of the file names shown
_SPY_FOLDERS = re.compile(r"\((?:" + re.escape(REPO + "/") + r"|/\S*?site-packages/|/\S*?/lib/python3\.\d+/)")


def spy_summary(files: List[str], loads: int, rate: int = SPY_RATE, top: int = 15) -> dict:
    """py-spy's samples of ``loads`` loads: per thread (numbers dropped from pool names), milliseconds per load
    busy, and the functions taking the most of it by own time and by inclusive time."""
    busy: Dict[str, int] = {}
    own: Dict[str, Dict[str, int]] = {}
    inclusive: Dict[str, Dict[str, int]] = {}
    for path in files:
        try:
            handle = open(path)
        except OSError:
            continue
        with handle:
            for line in handle:
                stack, _, count = line.rstrip().rpartition(" ")
                if not stack or not count.isdigit():
                    continue
                frames = stack.split(";")
                if len(frames) < 2 or any(mark in frames[-1] for mark in _SPY_IDLE):
                    continue
                thread = re.sub(r"-\d+$", "", re.sub(r"^thread \(\d+\): ", "", frames[0]))
                names = [_SPY_FOLDERS.sub("(", re.sub(r":\d+\)$", ")", frame)) for frame in frames[1:]]
                n = int(count)
                busy[thread] = busy.get(thread, 0) + n
                mine = own.setdefault(thread, {})
                mine[names[-1]] = mine.get(names[-1], 0) + n
                total = inclusive.setdefault(thread, {})
                for name in set(names):
                    total[name] = total.get(name, 0) + n
    ms = 1000.0 / rate / max(1, loads)

    def ranked(counts: Dict[str, int], only_ours: bool) -> List[Tuple[str, float]]:
        items = [(name, n) for name, n in counts.items()
                 if not only_ours or "appliance/" in name or "pydicom/" in name]
        return [(name, round(n * ms, 1)) for name, n in sorted(items, key=lambda item: -item[1])[:top]]

    return {thread: {"busy_ms_per_load": round(n * ms, 1), "own": ranked(own[thread], False),
                     "inclusive": ranked(inclusive[thread], True)}
            for thread, n in sorted(busy.items(), key=lambda item: -item[1])}


def report_spy(spy: dict) -> str:
    lines = []
    for path, threads in spy.items():
        lines.append(f"\n=== py-spy of the appliance during the {path} loads: per thread, ms per load ===")
        for thread, info in threads.items():
            if info["busy_ms_per_load"] < 5:
                continue
            lines.append(f"  {thread}: busy {info['busy_ms_per_load']:.0f} ms per load")
            lines.append("    own time:")
            lines.extend(f"      {ms:7.1f}  {name}" for name, ms in info["own"][:10])
            lines.append("    inclusive (appliance and pydicom functions):")
            lines.extend(f"      {ms:7.1f}  {name}" for name, ms in info["inclusive"][:12])
    return "\n".join(lines)


def measure(path: str, tools, servers: Dict[str, sb.Server], study_uid: str, corpus: dict,
            expected: Tuple[int, Dict[str, Tuple[str, int]]], spy_out: Optional[str] = None) -> dict:
    """One timed move along ``path``, with RSS and CPU of the receiving and the sending process (and the
    appliance recorded by py-spy into ``spy_out`` when it is the receiver and ``spy_out`` is given)."""
    _, receiver_name, sender_name = PATHS[path]
    receiver, sender = servers[receiver_name], servers[sender_name]
    pids = {"receiver": receiver.process.pid, "sender": sender.process.pid}
    spy = None
    if spy_out and receiver_name == "appliance":
        spy = PySpy(tools["py-spy"], receiver.process.pid, spy_out)
        spy.start()
    load_avg = os.getloadavg()[0]
    cpu_before = {role: sb.cpu_seconds(pid) for role, pid in pids.items()}
    sampler = RssSampler(pids).start()
    try:
        if receiver_name == "storescp":
            seconds = qb.move(tools, sender, receiver, study_uid, corpus["files"])
            run = {"seconds": seconds, "received": receiver.stored()}
        else:
            run = move_into_memory(receiver, "disk_server" if path == "disk->memory" else "orthanc", study_uid,
                                   corpus, expected[0])
    finally:
        sampler.stop()
        if spy is not None:
            spy.stop()
    cpu_after = {role: sb.cpu_seconds(pid) for role, pid in pids.items()}
    run.update(path=path, loadavg_1m_before=round(load_avg, 2), rss_samples=sampler.samples,
               receiver=receiver_name, sender=sender_name,
               receiver_rss=sampler.of("receiver"), sender_rss=sampler.of("sender"))
    for role in pids:
        before, after = cpu_before[role], cpu_after[role]
        run[f"{role}_cpu_s"] = round(after - before, 3) if before is not None and after is not None else None
    # untimed: check every object held byte for byte, then free what the move brought, so that the next
    # round moves it all again
    if receiver_name == "appliance":
        run["content_checked"] = check_content(receiver, study_uid, expected[1], path)
        run["freed_bytes"] = free_study(receiver, study_uid)
        run["receiver_rss"]["after_free_kib"] = vmrss_kib(receiver.process.pid)
    else:
        receiver.clear()
    os.sync()
    return run


# --------------------------------------------------------------------------- reporting


def summarise(result: dict) -> dict:
    corpus = result["corpus"]
    rows = {}
    for path in PATHS:
        runs = [r for r in result["runs"] if r["path"] == path]
        if not runs:
            continue
        times = [r["seconds"] for r in runs]
        median = statistics.median(times)

        def med(values):
            values = [v for v in values if v is not None]
            return statistics.median(values) if values else None

        rows[path] = {
            "median_s": median, "min_s": min(times), "max_s": max(times), "runs": len(runs),
            "mb_per_s": corpus["bytes"] / 1e6 / median,
            "receiver_peak_rss_kib": med([r["receiver_rss"]["peak_kib"] for r in runs]),
            "receiver_rss_growth_kib": med([r["receiver_rss"]["growth_kib"] for r in runs]),
            "receiver_rss_before_kib": med([r["receiver_rss"]["before_kib"] for r in runs]),
            "receiver_max_peak_rss_kib": max((r["receiver_rss"]["peak_kib"] or 0) for r in runs) or None,
            "sender_peak_rss_kib": med([r["sender_rss"]["peak_kib"] for r in runs]),
            "receiver_cpu_median_s": med([r["receiver_cpu_s"] for r in runs]),
            "sender_cpu_median_s": med([r["sender_cpu_s"] for r in runs]),
            "appliance_load_median_s": med([r.get("appliance_load_s") for r in runs]),
            "wait_requests_median": med([r.get("wait_requests") for r in runs]),
        }
    base = rows.get(BASELINE, {}).get("median_s")
    for row in rows.values():
        row["ratio_vs_orthanc_storescp"] = row["median_s"] / base if base else None
    return rows


def _mib(kib) -> str:
    return f"{kib / 1024:.1f} MiB" if kib is not None else "?"


def report(result: dict) -> str:
    corpus = result["corpus"]
    summary = result["summary"]
    lines = [f"\nstudy: {corpus['label']}, {corpus['files']} files, {corpus['bytes'] / 1e6:.1f} MB "
             f"({result['expected_dataset_bytes'] / 1e6:.1f} MB of data sets); median of "
             f"{result['config']['repeat']} rounds, paths interleaved, their order rotating",
             f"  {'path':<18} {'median s':>9} {'min s':>7} {'max s':>7} {'MB/s':>7} {'x O->scp':>8} "
             f"{'recv peak RSS':>13} {'growth':>11} {'recv CPU s':>10} {'send CPU s':>10}"]
    for path, row in summary.items():
        ratio = f"{row['ratio_vs_orthanc_storescp']:.2f}" if row["ratio_vs_orthanc_storescp"] else "-"
        recv_cpu = f"{row['receiver_cpu_median_s']:.2f}" if row["receiver_cpu_median_s"] is not None else "?"
        send_cpu = f"{row['sender_cpu_median_s']:.2f}" if row["sender_cpu_median_s"] is not None else "?"
        lines.append(f"  {path:<18} {row['median_s']:>9.3f} {row['min_s']:>7.3f} {row['max_s']:>7.3f} "
                     f"{row['mb_per_s']:>7.1f} {ratio:>8} {_mib(row['receiver_peak_rss_kib']):>13} "
                     f"{_mib(row['receiver_rss_growth_kib']):>11} {recv_cpu:>10} {send_cpu:>10}")
    lines.append("  (recv = the receiving process: the appliance for the loads, storescp for the movescu moves; for "
                 "disk->memory the appliance is the sender too; disk->storescp is there to tell the sender's share "
                 "from the receiver's)")
    for path in ("disk->memory", "orthanc->memory"):
        row = summary.get(path)
        if row and row["ratio_vs_orthanc_storescp"]:
            verdict = "faster" if row["ratio_vs_orthanc_storescp"] < 1 else "slower"
            lines.append(f"{path} / orthanc->storescp: {row['ratio_vs_orthanc_storescp']:.2f} ({verdict})")
    for sender in ("disk", "orthanc"):
        memory, storescp = summary.get(f"{sender}->memory"), summary.get(f"{sender}->storescp")
        if memory and storescp:
            ratio = memory["median_s"] / storescp["median_s"]
            lines.append(f"from the same sender ({sender}): Memory-Server / storescp {ratio:.2f} "
                         f"({memory['median_s'] - storescp['median_s']:+.3f} s)")
    for path in ("disk->memory", "orthanc->memory"):
        row = summary.get(path)
        if row and row["appliance_load_median_s"] is not None:
            lines.append(f"{path}: the appliance's own load time (created -> ended) median "
                         f"{row['appliance_load_median_s']:.3f} s; {row['wait_requests_median']:.0f} "
                         "?wait= requests per load (answered at a change of state, or of counts at most every 0.25 s)")
    syntaxes = sorted({s for r in result["runs"] for s in r.get("held_transfer_syntaxes", [])})
    if syntaxes:
        lines.append(f"transfer syntaxes the Memory-Server received: {', '.join(syntaxes)}")
    after_free = [r["receiver_rss"].get("after_free_kib") for r in result["runs"]
                  if r["receiver"] == "appliance" and r["receiver_rss"].get("after_free_kib")]
    idle = result.get("appliance_idle_rss_kib")
    peaks = [r["receiver_rss"]["peak_kib"] for r in result["runs"]
             if r["receiver"] == "appliance" and r["receiver_rss"]["peak_kib"]]
    if idle and peaks:
        lines.append(f"appliance RSS: idle after start-up {_mib(idle)}, peak during a load median "
                     f"{_mib(statistics.median(peaks))} ({_mib(statistics.median(peaks) - idle)} over idle, for "
                     f"{_mib(result['expected_dataset_bytes'] / 1024)} of data sets held)")
    if after_free:
        lines.append(f"appliance RSS after freeing the study: median {_mib(statistics.median(after_free))} "
                     "(the growth column is over the RSS just before each load, which keeps what the allocator "
                     "did not give back)")
    loads = [r["loadavg_1m_before"] for r in result["runs"]]
    if loads:
        lines.append(f"\n1-minute load average before the runs: min {min(loads):.2f}, median "
                     f"{statistics.median(loads):.2f}, max {max(loads):.2f} on {os.cpu_count()} CPUs"
                     + ("  (other work was competing: the numbers are noisy)" if max(loads) > 1.5 else ""))
    lines.append("storescp writes files (no fsync); the Memory-Server keeps the data sets in memory.  A load's time "
                 "runs from its POST to the API's answer that it is done; movescu's is its process's wall time.")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def find_tools(py_spy: bool = False) -> Dict[str, str]:
    tools = sb.find_tools(["appliance", "storescp", "orthanc"])
    tools["movescu"] = sb._which("movescu")
    if tools["movescu"] is None:
        raise BenchError("missing: movescu (Debian package dcmtk) -- `make bench` installs it")
    if py_spy:
        tools["py-spy"] = sb._which("py-spy", (os.path.dirname(sys.executable), "/usr/local/bin"))
        if tools["py-spy"] is None:
            raise BenchError("missing: py-spy (pip install py-spy) for --py-spy")
    return tools


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed rounds of the four paths (default 5)")
    parser.add_argument("--memory-limit", default=DEFAULT_MEMORY_LIMIT,
                        help=f"the Memory-Server's memory_limit (default {DEFAULT_MEMORY_LIMIT!r})")
    parser.add_argument("--max-pdu", type=int, default=None,
                        help="maximum PDU length the receivers announce, the Memory-Server's max_pdu and storescp's "
                             "--max-pdu alike (4096 to 131072; default: each its own, storescp 16384, the "
                             "Memory-Server a MiB)")
    parser.add_argument("--memory-server-max-pdu", type=int, default=None,
                        help="the Memory-Server's max_pdu alone (default: --max-pdu, else its configured default)")
    parser.add_argument("--workdir", default=None, help="where the servers' temporary storage goes (default $TMPDIR)")
    parser.add_argument("--profile", metavar="DIR", default=None,
                        help="run the appliance under cProfile (one .pstats file in DIR) and print its top functions")
    parser.add_argument("--py-spy", metavar="DIR", default=None, dest="py_spy",
                        help="record the appliance with py-spy (every thread; `pip install py-spy`) during each timed "
                             "load, raw stacks in DIR, and print where each thread spent its time per load")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.max_pdu is not None and not 4096 <= args.max_pdu <= 131072:
        parser.error("--max-pdu must be from 4096 to 131072 (storescp's range)")
    return sb.run_guarded("load_bench", _run, args)


def _run(args) -> int:
    if not sys.platform.startswith("linux"):
        raise BenchError("Linux only (RSS and CPU come from /proc)")
    tools = find_tools(bool(args.py_spy))
    corpus = qb.ensure_move_corpus()
    expected = dataset_bytes(corpus)
    files = sorted(os.listdir(corpus["dir"]))
    from pydicom import dcmread

    study_uid = str(dcmread(os.path.join(corpus["dir"], files[0]), stop_before_pixels=True).StudyInstanceUID)
    profile = None
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
        args.profile = os.path.abspath(args.profile)
        profile = os.path.join(args.profile, "appliance-load.pstats")
    if args.py_spy:
        os.makedirs(args.py_spy, exist_ok=True)
        args.py_spy = os.path.abspath(args.py_spy)
    started = datetime.datetime.now()
    result = {
        "timestamp": started.isoformat(timespec="seconds"),
        "host": {"cpus": os.cpu_count(), "kernel": os.uname().release, "machine": os.uname().machine},
        "versions": sb.versions(tools),
        "config": {"repeat": args.repeat, "memory_limit": args.memory_limit,
                   "profiled": bool(args.profile) or bool(args.py_spy),
                   "storescp_max_pdu": args.max_pdu or 16384,
                   "memory_server_max_pdu": args.memory_server_max_pdu or args.max_pdu or 1 << 20,
                   "paths": {name: label for name, (label, _, _) in PATHS.items()},
                   "load": "POST /api/loads {device, study}, then GET /api/loads/N?wait=30 until done; "
                           "one kept-alive HTTP connection",
                   "movescu": f"movescu -S -aet {qb.MOVE_AET} -aec ORTHANC|DISK_SERVER -aem {qb.MOVE_DEST_AET} "
                              "-k QueryRetrieveLevel=STUDY -k StudyInstanceUID=UID 127.0.0.1 PORT, TCP_NODELAY=1",
                   "rss_sample_interval_s": SAMPLE_INTERVAL},
        "corpus": dict(corpus, study_uid=study_uid),
        "expected_dataset_bytes": expected[0],
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="load-bench-", dir=args.workdir) as workdir, _servers_stopped():
        storescp = LoadDestination(tools, workdir, args.max_pdu)
        appliance = LoadAppliance(tools, workdir, args.memory_limit, profile, args.memory_server_max_pdu or args.max_pdu)
        orthanc = LoadOrthanc(tools, workdir, storescp.port, appliance.memory_port)
        appliance.orthanc_port = orthanc.port
        appliance.move_port = storescp.port
        servers = {"storescp": storescp, "orthanc": orthanc, "appliance": appliance}
        for server in servers.values():
            server.start()
        result["appliance_idle_rss_kib"] = vmrss_kib(appliance.process.pid)
        result["storing"] = {}
        for name in ("appliance", "orthanc"):
            seconds = qb.load(tools, servers[name], [corpus["dir"]], corpus["files"])
            held = servers[name].stored() if name == "appliance" else servers[name].counts()["CountInstances"]
            if held != corpus["files"]:
                raise BenchError(f"{name} holds {held} instances after storing {corpus['files']}:\n"
                                 + servers[name].log_tail())
            result["storing"][name] = seconds
            print(f"stored the study ({corpus['files']} images, {corpus['bytes'] / 1e6:.1f} MB) in {name} in "
                  f"{seconds:.1f} s", flush=True)
        os.sync()
        sb.warm_page_cache(corpus)
        result["settle_s"] = qb.wait_idle("the loads")
        print(f"CPUs idle after {result['settle_s']:.0f} s; warm-up (one untimed move along each path) ...",
              flush=True)
        for path in PATHS:
            warm = measure(path, tools, servers, study_uid, corpus, expected)
            print(f"  warm-up {path:<18} {warm['seconds']:8.3f} s", flush=True)
        names = list(PATHS)
        for rep in range(args.repeat):
            order = names[rep % len(names):] + names[:rep % len(names)]
            for path in order:
                spy_out = os.path.join(args.py_spy, f"{path.replace('->', '-to-')}-{rep + 1}.txt") \
                    if args.py_spy else None
                run = measure(path, tools, servers, study_uid, corpus, expected, spy_out)
                if spy_out and os.path.exists(spy_out):
                    run["py_spy"] = spy_out
                run["repetition"] = rep + 1
                result["runs"].append(run)
                rss = run["receiver_rss"]
                print(f"[{rep + 1}/{args.repeat}] {path:<18} {run['seconds']:8.3f} s "
                      f"{corpus['bytes'] / 1e6 / run['seconds']:7.1f} MB/s  {run['receiver']} RSS peak "
                      f"{_mib(rss['peak_kib'])} (+{_mib(rss['growth_kib'])})  CPU recv {run['receiver_cpu_s']} s "
                      f"send {run['sender_cpu_s']} s  load {run['loadavg_1m_before']}", flush=True)
        sb.stop_all()  # before the profile is read (twistd writes it at exit)
    result["summary"] = summarise(result)
    if args.py_spy:
        result["py_spy"] = {}
        for path in ("disk->memory", "orthanc->memory"):
            files = [r["py_spy"] for r in result["runs"] if r["path"] == path and r.get("py_spy")]
            result["py_spy"][path] = spy_summary(files, len(files))
    result["elapsed_s"] = (datetime.datetime.now() - started).total_seconds()
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"load-{started.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as handle:
        json.dump(result, handle, indent=1)
    print(report(result))
    print(f"\nelapsed {result['elapsed_s']:.0f} s; results: {os.path.relpath(path)}")
    if args.py_spy:
        print(report_spy(result["py_spy"]))
    if args.profile:
        sb.print_profiles(args.profile)
    return 0


@contextlib.contextmanager
def _servers_stopped():
    try:
        yield
    finally:
        sb.stop_all()


if __name__ == "__main__":
    sys.exit(main())
