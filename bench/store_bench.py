#!/usr/bin/env python3
"""Storage benchmark: C-STORE throughput of the Disk-Server against DCMTK storescp and Orthanc.

Usage (from the repository root; ``make bench`` runs it with the defaults, ``make bench
BENCH_ARGS="--repeat 3"`` passes options)::

    PYTHONPATH=. .venv/bin/python bench/store_bench.py [--repeat N] [--servers appliance,storescp,orthanc,memory-server]
                                                       [--corpora small,large] [--senders 1,2,4,8]
                                                       [--large-senders 1] [--no-memory] [--profile DIR]

What it does:

* builds, once, three corpora under ``bench/.corpus/`` from pydicom's own
  ``CT_small.dcm`` (read from the installed package folder, never downloaded):
  ``small`` 1,000 CT images of ~39 KB in 10 studies, ``large`` 200 CT images
  of 512x512 16-bit pixels (~0.5 MB) in 4 studies, and ``huge`` one object
  with ~100 MB of pixel data, all Explicit VR Little Endian Part 10 files
  with new UIDs;
* workloads: the ``small`` corpus sent by 1, 2, 4 and 8 senders at once
  (``--senders``) and the ``large`` one by 1 (``--large-senders``); N senders
  are N DCMTK ``storescu`` processes started together, each sending its own
  consecutive 1/N of the corpus's files on one association of its own (as N
  modalities would), timed from the first start to the last exit;
* for each repetition (``--repeat``, default 5), each workload and each
  server, starts the server afresh on an empty temporary storage folder and
  a free port on 127.0.0.1 (so that nobody is timed on duplicates), waits for
  it to answer C-ECHO (bounded number of attempts), times the senders
  (``time.perf_counter``, ``TCP_NODELAY=1``), checks that the server holds
  every object, and kills it.
  The servers' order rotates from one repetition to the next so that noise
  and order effects hit them all alike; ``sync`` runs between measurements;
* servers: ``appliance`` (twistd, our Disk-Server), ``storescp`` (DCMTK,
  plain, writes files without fsync: the floor) and ``orthanc`` (Debian's
  package, its own SQLite index and storage area, ``SyncStorageArea`` on
  where the version has it, no plugins), and ``memory-server`` (the
  appliance's Memory-Server: the same network, DICOM and checking code, the
  objects held in memory, no file, no fsync, no index, PDUs of 16 KiB as the
  Disk-Server's: what is left of the appliance's time without the durable
  archive); storescp and Orthanc run with
  ``TCP_NODELAY=1`` too, since their network layer is DCMTK's (without it
  Orthanc 1.10 waits for a delayed ACK on every object, ~50 ms each);
* records each server's CPU time (user + system, all threads, from
  ``/proc/PID/stat``) during the storescu run and the load average before it;
* reads the appliance's peak RSS (``VmHWM`` in ``/proc/PID/status``) at the
  end of every run, and in one more fresh appliance reads it when idle,
  after the small corpus and after one ~100 MB object, to show that memory
  stays flat as objects grow;
* prints a table of medians per workload (seconds, images/s, MB/s, ratios to
  storescp and to Orthanc), the appliance's throughput as senders grow, and
  writes everything as JSON to ``bench/results/store-<timestamp>.json``.

``--profile DIR`` runs the appliance under twistd's cProfile (reactor thread
only: work on the archive's I/O and database threads is not in it) and prints
its top functions.  Needs DCMTK (``storescu``, ``storescp``, ``echoscu``) and,
for the Orthanc column, the ``Orthanc`` binary; ``make bench`` installs both.
Only 127.0.0.1 is ever contacted (the appliance listens on it alone; storescp
and Orthanc 1.10 have no option to bind one address, so they listen on every
interface for the seconds a run lasts).  Every server is killed (its whole
process group) whatever happens.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import pstats
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from array import array
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CORPUS_DIR = os.path.join(HERE, ".corpus")
RESULTS_DIR = os.path.join(HERE, "results")
CORPUS_VERSION = 1

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
HOST = "127.0.0.1"
WAIT_ATTEMPTS = 150       # C-ECHO attempts while a server starts, WAIT_INTERVAL apart
WAIT_INTERVAL = 0.2
STORE_TIMEOUT = 900       # seconds for one storescu run
SERVERS = ("appliance", "storescp", "orthanc", "memory-server")

#: name -> (number of images, studies, rows/columns or None for CT_small's own pixels)
CORPORA = {
    "small": dict(count=1000, studies=10, size=None, label="1,000 CT 128x128 (~39 KB)"),
    "large": dict(count=200, studies=4, size=(512, 512), label="200 CT 512x512 (~0.5 MB)"),
    "huge": dict(count=1, studies=1, size=(7240, 7240), label="1 CT 7240x7240 (~100 MB)"),
}


class BenchError(Exception):
    """Something the benchmark needs is missing or misbehaved: printed without a traceback."""


# --------------------------------------------------------------------------- corpora


def _ct_small_path() -> str:
    import pydicom

    path = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files", "CT_small.dcm")
    if not os.path.isfile(path):
        raise BenchError(f"{path} is missing: the installed pydicom does not ship its test files")
    return path


def _pixels(rows: int, columns: int) -> bytes:
    """A 12-bit gradient pattern as little endian 16-bit words (no numpy needed)."""
    size = 512
    tile = array("H", ((x * 7 + y * 13) & 0x0FFF for y in range(size) for x in range(size)))
    if sys.byteorder == "big":
        tile.byteswap()
    raw = tile.tobytes()
    wanted = rows * columns * 2
    return (raw * (wanted // len(raw) + 1))[:wanted]


def _write(ds, path: str) -> None:
    import pydicom

    if int(pydicom.__version__.split(".")[0]) >= 3:
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.save_as(path, write_like_original=False)


def _build_corpus(name: str, spec: dict, target: str) -> None:
    import pydicom
    from pydicom.uid import UID, generate_uid

    template = pydicom.dcmread(_ct_small_path())
    template.file_meta.TransferSyntaxUID = UID(EXPLICIT_VR_LITTLE_ENDIAN)
    base_pixels = None
    if spec["size"] is not None:
        rows, columns = spec["size"]
        template.Rows, template.Columns = rows, columns
        for keyword in ("SmallestImagePixelValue", "LargestImagePixelValue"):
            if keyword in template:
                delattr(template, keyword)
        base_pixels = _pixels(rows, columns)
    staging = target + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    count, studies = spec["count"], spec["studies"]
    per_study = -(-count // studies)
    ds = copy.deepcopy(template)
    for index in range(count):
        study, number = divmod(index, per_study)
        if number == 0:
            ds.StudyInstanceUID = generate_uid()
            ds.SeriesInstanceUID = generate_uid()
            ds.PatientID = f"BENCH{name.upper()}{study:02d}"
            ds.PatientName = f"BENCH^{name.upper()}^{study:02d}"
            ds.StudyID = str(study + 1)
            ds.AccessionNumber = f"B{study:05d}"
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = number + 1
        if base_pixels is not None:
            shift = (index * 1031 * 2) % len(base_pixels)  # every image a little different
            ds.PixelData = base_pixels[shift:] + base_pixels[:shift]
        _write(ds, os.path.join(staging, f"{index:05d}.dcm"))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)


def _corpus_stats(directory: str) -> dict:
    files = sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".dcm"))
    total = sum(os.path.getsize(f) for f in files)
    return {"dir": directory, "files": len(files), "bytes": total}


def ensure_corpora(names: List[str]) -> Dict[str, dict]:
    """Build the corpora that are missing or stale; return their descriptions."""
    os.makedirs(CORPUS_DIR, exist_ok=True)
    manifest_path = os.path.join(CORPUS_DIR, "manifest.json")
    try:
        with open(manifest_path) as handle:
            manifest = json.load(handle)
    except (OSError, ValueError):
        manifest = {}
    if manifest.get("version") != CORPUS_VERSION:
        manifest = {"version": CORPUS_VERSION, "corpora": {}}
    result = {}
    for name in names:
        spec = CORPORA[name]
        directory = os.path.join(CORPUS_DIR, name)
        known = manifest["corpora"].get(name)
        if known is None or not os.path.isdir(directory) or _corpus_stats(directory) != known["stats"]:
            print(f"building corpus {name!r}: {spec['label']} into {directory} ...", flush=True)
            started = time.perf_counter()
            _build_corpus(name, spec, directory)
            known = {"label": spec["label"], "stats": _corpus_stats(directory)}
            manifest["corpora"][name] = known
            with open(manifest_path + ".tmp", "w") as handle:
                json.dump(manifest, handle, indent=1)
            os.replace(manifest_path + ".tmp", manifest_path)
            print(f"  built in {time.perf_counter() - started:.1f} s", flush=True)
        result[name] = dict(known["stats"], label=spec["label"])
    return result


def warm_page_cache(corpus: dict) -> None:
    for name in os.listdir(corpus["dir"]):
        with open(os.path.join(corpus["dir"], name), "rb") as handle:
            while handle.read(1 << 20):
                pass


# --------------------------------------------------------------------------- tools


def _which(name: str, extra_dirs=("/usr/sbin", "/usr/local/sbin")) -> Optional[str]:
    found = shutil.which(name)
    if found:
        return found
    for directory in extra_dirs:
        path = os.path.join(directory, name)
        if os.access(path, os.X_OK):
            return path
    return None


def find_tools(servers: List[str]) -> Dict[str, str]:
    tools = {}
    missing = []
    for name in ("storescu", "echoscu") + (("storescp",) if "storescp" in servers else ()):
        tools[name] = _which(name)
        if tools[name] is None:
            missing.append(f"{name} (Debian package dcmtk)")
    if "orthanc" in servers:
        tools["Orthanc"] = _which("Orthanc")
        if tools["Orthanc"] is None:
            missing.append("Orthanc (Debian package orthanc)")
    if "appliance" in servers or "memory-server" in servers:
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        if not os.access(twistd, os.X_OK):
            missing.append(f"{twistd} (run this script with the virtualenv's python: make venv)")
        tools["twistd"] = twistd
    if missing:
        raise BenchError("missing: " + "; ".join(missing) + " -- `make bench` installs them")
    return tools


def _first_line(command: List[str]) -> str:
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = [line.strip() for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    return lines[0] if lines else "?"


def versions(tools: Dict[str, str]) -> dict:
    import pydicom
    import twisted

    info = {
        "python": platform.python_version(),
        "pydicom": pydicom.__version__,
        "twisted": twisted.__version__,
        "dcmtk": _first_line([tools["storescu"], "--version"]),
    }
    if "Orthanc" in tools:
        info["orthanc"] = _first_line([tools["Orthanc"], "--version"])
    try:
        info["appliance_commit"] = subprocess.run(
            ["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip() or "?"
    except OSError:
        info["appliance_commit"] = "?"
    return info


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def dcmtk_env() -> dict:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def cpu_seconds(pid: int) -> Optional[float]:
    """User plus system CPU time of a process and all its threads so far (``/proc/PID/stat``)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_status_kib(pid: int, field: str) -> Optional[int]:
    """A figure of /proc/PID/status in KiB (``VmHWM``, ``VmRSS``...); None if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def vmhwm_kib(pid: int) -> Optional[int]:
    """Peak resident set size of a process, in KiB (``VmHWM``)."""
    return proc_status_kib(pid, "VmHWM")


def process_tree(pid: int) -> List[int]:
    """A process and its descendants alive now (``/proc/PID/task/TID/children``): the appliance's install
    helper counts as the appliance."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    pending.extend(int(child) for child in handle.read().split())
            except OSError:
                continue
    return found


def _tree_sum(pid: int, measure) -> Optional[float]:
    figures = [measure(member) for member in process_tree(pid)]
    return None if figures[0] is None else sum(figure for figure in figures if figure is not None)


# --------------------------------------------------------------------------- servers


class Server:
    """One server process on a fresh temporary folder; always killed by :meth:`stop`."""

    name = "?"
    aet = "?"

    def __init__(self, tools: Dict[str, str], workdir: str, profile: Optional[str] = None) -> None:
        self.tools = tools
        self.dir = tempfile.mkdtemp(prefix=f"{self.name}-", dir=workdir)
        self.port = free_port()
        self.process: Optional[subprocess.Popen] = None
        self.log_path = os.path.join(self.dir, "server.log")
        self.profile = profile

    def command(self) -> List[str]:
        raise NotImplementedError

    def env(self) -> dict:
        return dict(os.environ)

    def start(self) -> None:
        log = open(self.log_path, "wb")
        try:
            self.process = subprocess.Popen(
                self.command(), cwd=self.dir, env=self.env(), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        finally:
            log.close()
        _RUNNING.append(self)
        self.wait_listening()

    def wait_listening(self) -> None:
        for _ in range(WAIT_ATTEMPTS):
            if self.process.poll() is not None:
                raise BenchError(f"{self.name} exited with status {self.process.returncode} while starting:\n"
                                 + self.log_tail())
            echo = subprocess.run(
                [self.tools["echoscu"], "-to", "5", "-aec", self.aet, HOST, str(self.port)],
                env=dcmtk_env(), stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
            )
            if echo.returncode == 0:
                return
            time.sleep(WAIT_INTERVAL)
        raise BenchError(f"{self.name} did not answer C-ECHO on {HOST}:{self.port} after {WAIT_ATTEMPTS} attempts:\n"
                         + self.log_tail())

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, "rb") as handle:
                return b"\n".join(handle.read().splitlines()[-lines:]).decode("utf-8", "replace")
        except OSError:
            return "(no log)"

    def cpu_s(self) -> Optional[float]:
        """CPU time of the server and of the processes it started (the appliance's install helper)."""
        return _tree_sum(self.process.pid, cpu_seconds) if self.process is not None else None

    def peak_rss_kib(self) -> Optional[int]:
        """Peak RSS of the server plus that of each process it started (their peaks added: an upper bound)."""
        return _tree_sum(self.process.pid, vmhwm_kib) if self.process is not None else None

    def stored(self) -> int:
        raise NotImplementedError

    def stop(self) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            for sig, wait in ((signal.SIGTERM, 30 if self.profile else 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    process.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if process is not None:
            try:  # anything else left in its group
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self in _RUNNING:
            _RUNNING.remove(self)

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class ApplianceServer(Server):
    name = "appliance"
    aet = "DISK_SERVER"

    def config(self) -> str:
        """The appliance.toml it runs on."""
        return self.disk_server_config() + "[memory_server]\nport = 0\n[web]\nport = 0\n"

    def disk_server_config(self) -> str:
        """Its [appliance] and [disk_server] sections: the archive in its folder, the Disk-Server on our port."""
        return (
            "[appliance]\n"
            f"data_dir = {json.dumps(os.path.join(self.dir, 'data'))}\n"
            "[disk_server]\n"
            f'ae_title = "{self.aet}"\n'
            f'interface = "{HOST}"\n'
            f"port = {self.port}\n"
            'min_free_space = "1 MiB"\n'
            "timeout = 120\n"
        )

    def command(self) -> List[str]:
        config = os.path.join(self.dir, "appliance.toml")
        with open(config, "w") as handle:
            handle.write(self.config())
        command = [self.tools["twistd"], "-n", "--pidfile="]
        if self.profile:
            command += [f"--profile={self.profile}", "--profiler=cprofile", "--savestats"]
        return command + ["appliance", "--config", config]

    def wait_listening(self) -> None:
        """C-ECHO answered, then the install helper up (it starts after the archive's start-up check): what it
        does while starting is not timed as storing."""
        super().wait_listening()
        deadline = time.monotonic() + WAIT_ATTEMPTS * WAIT_INTERVAL
        while time.monotonic() < deadline:
            with open(self.log_path, "rb") as handle:
                log = handle.read()
            if b"install helper started" in log or b"groups are installed by this process" in log:
                return
            if self.process.poll() is not None:
                raise BenchError(f"{self.name} exited while starting:\n" + self.log_tail())
            time.sleep(WAIT_INTERVAL)
        raise BenchError(f"{self.name}: its install helper did not start:\n" + self.log_tail())

    def env(self) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return env

    def stored(self) -> int:
        objects = os.path.join(self.dir, "data", "archive", "objects")
        return sum(1 for _, _, files in os.walk(objects) for f in files if f.endswith(".dcm"))


class MemoryServerServer(ApplianceServer):
    """The appliance's Memory-Server: the same network, DICOM and checking code as the Disk-Server, the objects
    held in memory (no file, no fsync, no index), received in PDUs of at most 16 KiB as the Disk-Server's are (the
    statement's; its own default is a MiB).  Beside the Disk-Server it says what the durable archive costs,
    beside storescp what the rest does."""

    name = "memory-server"
    aet = "MEMORY_SERVER"

    def config(self) -> str:
        self.http_port = free_port()  # its web API says what it holds (stored)
        return (
            "[appliance]\n"
            f"data_dir = {json.dumps(os.path.join(self.dir, 'data'))}\n"
            "[disk_server]\n"
            "port = 0\n"
            "[memory_server]\n"
            f'ae_title = "{self.aet}"\n'
            f'interface = "{HOST}"\n'
            f"port = {self.port}\n"
            'memory_limit = "2 GiB"\n'
            "max_pdu = 16384\n"
            "timeout = 120\n"
            "[web]\n"
            f'interface = "{HOST}"\n'
            f"port = {self.http_port}\n"
        )

    def stored(self) -> int:
        url = f"http://{HOST}:{self.http_port}/api/memory/studies"
        with urllib.request.urlopen(url, timeout=30) as response:
            return sum(study["instance_count"] for study in json.load(response)["studies"])


class StorescpServer(Server):
    name = "storescp"
    aet = "STORESCP"

    def command(self) -> List[str]:
        os.makedirs(os.path.join(self.dir, "out"))
        return [self.tools["storescp"], "-aet", self.aet, "-od", os.path.join(self.dir, "out"), str(self.port)]

    def env(self) -> dict:
        return dcmtk_env()

    def stored(self) -> int:
        return len(os.listdir(os.path.join(self.dir, "out")))


class OrthancServer(Server):
    name = "orthanc"
    aet = "ORTHANC"

    def command(self) -> List[str]:
        self.http_port = free_port()
        config = {
            "Name": "store-bench",
            "StorageDirectory": os.path.join(self.dir, "storage"),
            "IndexDirectory": os.path.join(self.dir, "index"),
            "StorageCompression": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.port,
            "DicomCheckCalledAet": False,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [],
            "DicomModalities": {},
            "OrthancPeers": {},
        }
        if orthanc_has_option(self.tools["Orthanc"], "SyncStorageArea"):
            config["SyncStorageArea"] = True
        path = os.path.join(self.dir, "orthanc.json")
        with open(path, "w") as handle:
            json.dump(config, handle, indent=1)
        return [self.tools["Orthanc"], path]

    def stored(self) -> int:
        url = f"http://{HOST}:{self.http_port}/statistics"
        with urllib.request.urlopen(url, timeout=30) as response:
            return int(json.load(response)["CountInstances"])

    def env(self) -> dict:
        # Orthanc's DICOM network layer is DCMTK's: without this every PDU may wait for a delayed ACK
        return dcmtk_env()


_ORTHANC_OPTIONS: Dict[str, str] = {}


def orthanc_has_option(binary: str, option: str) -> bool:
    """Whether this Orthanc's default configuration (``Orthanc --config=FILE``) names the option."""
    if binary not in _ORTHANC_OPTIONS:
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "default.json")
            subprocess.run([binary, f"--config={path}"], cwd=directory, capture_output=True, timeout=60)
            try:
                with open(path) as handle:
                    _ORTHANC_OPTIONS[binary] = handle.read()
            except OSError:
                _ORTHANC_OPTIONS[binary] = ""
    return f'"{option}"' in _ORTHANC_OPTIONS[binary]


SERVER_CLASSES = {"appliance": ApplianceServer, "storescp": StorescpServer, "orthanc": OrthancServer,
                  "memory-server": MemoryServerServer}
_RUNNING: List[Server] = []


def stop_all() -> None:
    for server in list(_RUNNING):
        server.stop()


# --------------------------------------------------------------------------- measuring


def shards(corpus: dict, senders: int) -> List[List[str]]:
    """The corpus's files in ``senders`` consecutive runs of (nearly) equal length, one per sender."""
    files = sorted(os.path.join(corpus["dir"], name) for name in os.listdir(corpus["dir"]) if name.endswith(".dcm"))
    size, extra = divmod(len(files), senders)
    result, start = [], 0
    for index in range(senders):
        end = start + size + (1 if index < extra else 0)
        result.append(files[start:end])
        start = end
    return [files for files in result if files]


def run_senders(server: Server, commands: List[List[str]], timeout: float) -> float:
    """Run DCMTK sender commands at once (each in a session of its own); the wall-clock seconds from the first
    start to the last exit.  A sender failing, or all not done within ``timeout`` s, is a BenchError; none
    outlives the call."""
    outputs = [tempfile.TemporaryFile() for _ in commands]
    processes = []
    started = time.perf_counter()
    try:
        for command, output in zip(commands, outputs):
            processes.append(subprocess.Popen(command, env=dcmtk_env(), stdin=subprocess.DEVNULL,
                                              stdout=output, stderr=subprocess.STDOUT, start_new_session=True))
        deadline = started + timeout
        for process in processes:
            try:
                process.wait(max(0.0, deadline - time.perf_counter()))
            except subprocess.TimeoutExpired:
                raise BenchError(f"sending to {server.name} took more than {timeout:g} s") from None
        elapsed = time.perf_counter() - started
        for process, output in zip(processes, outputs):
            if process.returncode != 0:
                output.seek(0)
                raise BenchError(f"{os.path.basename(process.args[0])} to {server.name} failed with status "
                                 f"{process.returncode}:\n" + output.read().decode("utf-8", "replace")[-2000:]
                                 + "\nserver log:\n" + server.log_tail())
        return elapsed
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for output in outputs:
            output.close()


def store(tools: Dict[str, str], server: Server, corpus: dict, senders: int = 1) -> float:
    """Send the corpus with ``senders`` storescu processes at once, one association each; return the wall-clock
    seconds from the first start to the last exit."""
    commands = [[tools["storescu"], "-aec", server.aet, HOST, str(server.port)] + files
                for files in shards(corpus, senders)]
    return run_senders(server, commands, STORE_TIMEOUT)


def measure(tools, name: str, corpus: dict, workdir: str, profile: Optional[str] = None, senders: int = 1) -> dict:
    server = SERVER_CLASSES[name](tools, workdir, profile)
    try:
        server.start()
        load = os.getloadavg()[0]
        cpu_before = server.cpu_s()
        seconds = store(tools, server, corpus, senders)
        cpu_after = server.cpu_s()
        peak = server.peak_rss_kib()
        stored = server.stored()
        if stored != corpus["files"]:
            raise BenchError(f"{name} holds {stored} objects after storing {corpus['files']}:\n" + server.log_tail())
        cpu = round(cpu_after - cpu_before, 2) if cpu_before is not None and cpu_after is not None else None
        return {"seconds": seconds, "server_cpu_s": cpu, "vmhwm_kib": peak, "loadavg_1m_before": round(load, 2)}
    finally:
        server.stop()
        server.cleanup()
        os.sync()


def memory_growth(tools, corpora: Dict[str, dict], workdir: str) -> dict:
    """One fresh appliance: VmHWM idle, after the small corpus, after one ~100 MB object."""
    server = ApplianceServer(tools, workdir)
    result = {}
    try:
        server.start()
        result["idle_kib"] = server.peak_rss_kib()
        result["small_seconds"] = store(tools, server, corpora["small"])
        result["after_small_kib"] = server.peak_rss_kib()
        result["huge_seconds"] = store(tools, server, corpora["huge"])
        result["after_huge_kib"] = server.peak_rss_kib()
        result["huge_bytes"] = corpora["huge"]["bytes"]
        expected = corpora["small"]["files"] + corpora["huge"]["files"]
        if server.stored() != expected:
            raise BenchError(f"appliance holds {server.stored()} objects, expected {expected}:\n" + server.log_tail())
        return result
    finally:
        server.stop()
        server.cleanup()
        os.sync()


def workload_name(corpus: str, senders: int) -> str:
    return f"{corpus} x{senders}"


def summarise(runs: List[dict], corpora: Dict[str, dict], servers: List[str],
              workloads: List[Tuple[str, int]]) -> dict:
    """Per workload ("small x4"...), per server: medians, throughput, ratios to storescp and to Orthanc."""
    summary = {}
    for corpus, senders in workloads:
        rows = {}
        for server in servers:
            mine = [r for r in runs if r["server"] == server and r["corpus"] == corpus and r["senders"] == senders]
            times = [r["seconds"] for r in mine]
            peaks = [r["vmhwm_kib"] for r in mine if r["vmhwm_kib"]]
            cpus = [r["server_cpu_s"] for r in mine if r["server_cpu_s"] is not None]
            if not times:
                continue
            median = statistics.median(times)
            rows[server] = {
                "median_s": median,
                "min_s": min(times),
                "max_s": max(times),
                "images_per_s": corpora[corpus]["files"] / median,
                "mb_per_s": corpora[corpus]["bytes"] / 1e6 / median,
                "vmhwm_median_kib": int(statistics.median(peaks)) if peaks else None,
                "server_cpu_median_s": statistics.median(cpus) if cpus else None,
                "runs": len(times),
            }
        for other in ("storescp", "orthanc"):
            base = rows.get(other, {}).get("median_s")
            for row in rows.values():
                row[f"ratio_vs_{other}"] = row["median_s"] / base if base else None
        summary[workload_name(corpus, senders)] = dict(corpus=corpus, senders=senders, servers=rows)
    return summary


def _mib(kib: Optional[int]) -> str:
    return f"{kib / 1024:.1f} MiB" if kib else "?"


def _ratio(value: Optional[float]) -> str:
    return f"{value:.2f}" if value else "-"


def report(result: dict) -> str:
    lines = []
    for name, workload in result["summary"].items():
        info = result["corpora"][workload["corpus"]]
        senders = workload["senders"]
        lines.append(f"\n{name}: {info['label']}, {info['files']} files, {info['bytes'] / 1e6:.1f} MB, "
                     f"{senders} association{'s' if senders > 1 else ''} at once, "
                     f"median of {result['config']['repeat']} runs")
        lines.append(f"  {'server':<13} {'median s':>9} {'min s':>8} {'max s':>8} {'images/s':>9} {'MB/s':>7} "
                     f"{'x storescp':>10} {'x Orthanc':>9} {'server CPU s':>12} {'peak RSS':>11}")
        for server, row in workload["servers"].items():
            cpu = f"{row['server_cpu_median_s']:.2f}" if row["server_cpu_median_s"] is not None else "?"
            lines.append(f"  {server:<13} {row['median_s']:>9.3f} {row['min_s']:>8.3f} {row['max_s']:>8.3f} "
                         f"{row['images_per_s']:>9.1f} {row['mb_per_s']:>7.1f} {_ratio(row['ratio_vs_storescp']):>10} "
                         f"{_ratio(row['ratio_vs_orthanc']):>9} {cpu:>12} {_mib(row['vmhwm_median_kib']):>11}")
    scaling = {}
    for workload in result["summary"].values():
        if workload["corpus"] == "small":
            for server, row in workload["servers"].items():
                scaling.setdefault(server, {})[workload["senders"]] = row["images_per_s"]
    if any(len(by_senders) > 1 for by_senders in scaling.values()):
        counts = sorted({n for by_senders in scaling.values() for n in by_senders})
        lines.append("\nsmall corpus, images/s by number of senders:")
        lines.append("  " + f"{'server':<13}" + "".join(f"{n:>9}" for n in counts))
        for server, by_senders in scaling.items():
            lines.append("  " + f"{server:<13}" + "".join(
                f"{by_senders[n]:>9.1f}" if n in by_senders else f"{'-':>9}" for n in counts))
    memory = result.get("memory")
    if memory:
        large = result["summary"].get("large x1", {}).get("servers", {}).get("appliance", {}).get("vmhwm_median_kib")
        lines.append("\nappliance peak RSS (VmHWM):")
        lines.append(f"  large corpus run (median over runs) {_mib(large)}")
        lines.append(f"  one fresh process: idle {_mib(memory['idle_kib'])}, after the small corpus "
                     f"{_mib(memory['after_small_kib'])}, after one {memory['huge_bytes'] / 1e6:.0f} MB object "
                     f"{_mib(memory['after_huge_kib'])} (stored in {memory['huge_seconds']:.2f} s)")
    loads = [r["loadavg_1m_before"] for r in result["runs"]]
    if loads:
        lines.append(f"\n1-minute load average before the runs: min {min(loads):.2f}, median "
                     f"{statistics.median(loads):.2f}, max {max(loads):.2f} on {os.cpu_count()} CPUs"
                     + ("  (other work was competing: the numbers are noisy)" if max(loads) > 1.5 else ""))
    lines.append("\nstorescp writes without fsync; the appliance and Orthanc (SyncStorageArea) fsync each object "
                 "before answering; memory-server is the appliance's Memory-Server (objects held in memory: no "
                 "file, no fsync, no index; PDUs of 16 KiB, as the Disk-Server's). Server CPU and peak RSS include "
                 "the processes a server started (the appliance's install helper; the peaks added).")
    return "\n".join(lines)


def print_profiles(directory: str, top: int = 30) -> None:
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".pstats"):
            continue
        print(f"\n=== cProfile of the reactor thread: {name} (top {top} by own time) ===")
        stats = pstats.Stats(os.path.join(directory, name))
        stats.sort_stats("tottime").print_stats(top)
        print(f"=== {name}: top {top} by cumulative time ===")
        stats.sort_stats("cumulative").print_stats(top)


# --------------------------------------------------------------------------- main


def _names(text: str, known, what: str) -> List[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(unknown) or '(none)'}; known: {', '.join(known)}")
    return names


def _counts(text: str) -> List[int]:
    try:
        counts = [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not counts or any(not 1 <= n <= 64 for n in counts):
        raise argparse.ArgumentTypeError(f"numbers of senders are 1 to 64: {text!r}")
    return sorted(set(counts))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="measurements of each (server, corpus) (default 5)")
    parser.add_argument("--servers", type=lambda t: _names(t, SERVERS, "server"), default=list(SERVERS))
    parser.add_argument("--corpora", type=lambda t: _names(t, ("small", "large"), "corpus"), default=["small", "large"])
    parser.add_argument("--senders", type=_counts, default=[1, 2, 4, 8],
                        help="numbers of senders at once for the small corpus (default 1,2,4,8)")
    parser.add_argument("--large-senders", type=_counts, default=[1],
                        help="numbers of senders at once for the large corpus (default 1)")
    parser.add_argument("--no-memory", action="store_true", help="skip the 100 MB object memory measurement")
    parser.add_argument("--workdir", default=None, help="where the servers' temporary storage goes (default $TMPDIR)")
    parser.add_argument("--profile", metavar="DIR", default=None,
                        help="run the appliance under cProfile, one .pstats file per run in DIR, and print them")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    return run_guarded("store_bench", _run, args)


def run_guarded(name: str, run, args) -> int:
    """Run a benchmark so that no server outlives it: signals end it, servers are stopped in every case."""

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)
    try:
        return run(args)
    except BenchError as error:
        print(f"{name}: {error}", file=sys.stderr)
        return 2
    finally:
        stop_all()


def _run(args) -> int:
    if not sys.platform.startswith("linux"):
        raise BenchError("Linux only (peak RSS comes from /proc)")
    tools = find_tools(args.servers)
    names = list(args.corpora)
    needed = names + (["small", "huge"] if not args.no_memory and "appliance" in args.servers else [])
    corpora = ensure_corpora(sorted(set(needed), key=list(CORPORA).index))
    for corpus in corpora.values():
        warm_page_cache(corpus)
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
        args.profile = os.path.abspath(args.profile)
    started = datetime.datetime.now()
    result = {
        "timestamp": started.isoformat(timespec="seconds"),
        "host": {"cpus": os.cpu_count(), "kernel": platform.release(), "machine": platform.machine()},
        "versions": versions(tools),
        "config": {"repeat": args.repeat, "servers": args.servers, "corpora": names,
                   "orthanc_sync_storage_area": ("orthanc" in args.servers
                                                 and orthanc_has_option(tools["Orthanc"], "SyncStorageArea")),
                   "storescu": "N x storescu -aec AET 127.0.0.1 PORT FILES..., TCP_NODELAY=1, one association each",
                   "profiled": bool(args.profile)},
        "corpora": corpora,
        "runs": [],
    }
    servers = list(args.servers)
    workloads = [(corpus, n) for corpus in names for n in (args.senders if corpus == "small" else args.large_senders)]
    result["config"]["workloads"] = [workload_name(*w) for w in workloads]
    with tempfile.TemporaryDirectory(prefix="store-bench-", dir=args.workdir) as workdir:
        for rep in range(args.repeat):
            order = servers[rep % len(servers):] + servers[:rep % len(servers)]
            for corpus, senders in workloads:
                for server in order:
                    profile = None
                    if args.profile and server == "appliance":
                        profile = os.path.join(args.profile, f"appliance-{corpus}-x{senders}-{rep + 1}.pstats")
                    run = measure(tools, server, corpora[corpus], workdir, profile, senders)
                    run.update(server=server, corpus=corpus, senders=senders, repetition=rep + 1)
                    result["runs"].append(run)
                    print(f"[{rep + 1}/{args.repeat}] {workload_name(corpus, senders):<9} {server:<9} "
                          f"{run['seconds']:8.3f} s {corpora[corpus]['files'] / run['seconds']:8.1f} images/s  "
                          f"server CPU {run['server_cpu_s']} s  peak RSS {_mib(run['vmhwm_kib'])}  "
                          f"load {run['loadavg_1m_before']}", flush=True)
        if not args.no_memory and "appliance" in servers:
            print("memory: one appliance, small corpus then one ~100 MB object ...", flush=True)
            result["memory"] = memory_growth(tools, corpora, workdir)
    result["summary"] = summarise(result["runs"], corpora, servers, workloads)
    result["elapsed_s"] = (datetime.datetime.now() - started).total_seconds()
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"store-{started.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as handle:
        json.dump(result, handle, indent=1)
    print(report(result))
    print(f"\nresults: {os.path.relpath(path)}")
    if args.profile:
        print_profiles(args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
