"""The Memory-Server's bound measured on a real appliance process.

"Memory bound: four studies of ~25 MB loaded into a 64 MiB memory_limit: all loads finish, resident
memory grows by less than ~100 MiB, the newest study is in memory and the oldest dropped."

The appliance runs as ``twistd -n --pidfile= appliance --config PATH`` in a child interpreter (this
one, with the checkout on PYTHONPATH), so the resident memory measured (``/proc/PID/status``) is the
appliance's own.  Its Disk-Server is the remote device: storescu fills it with four studies of five
5 MiB CT images, then the studies are loaded one after another through the HTTP API (C-MOVE from the
Disk-Server to the Memory-Server, in the same process).  VmRSS is sampled every 50 ms during the loads,
and VmHWM (reset before the first load through /proc/PID/clear_refs where the kernel allows it) gives
the peak between samples.  Every wait is an event (the appliance's own start-up lines, the API's
``?wait=``) bounded by a timeout; nothing sleeps.
"""

from __future__ import annotations

import json
import os
import re
import sys
from io import BytesIO
from typing import Dict, List, Optional, Tuple

from twisted.internet import defer, reactor, task
from twisted.logger import Logger
from twisted.trial import unittest
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from appliance.dicom.uids import EXPLICIT_VR_LITTLE_ENDIAN

from .support import ApplianceProcess, load_tool, deferred_test, free_port, run_program, subprocess_env
from .support_data import make_dataset, write_part10
from .test_interop_load import STORESCU, _need, _toml

_log = Logger(namespace="tests.memory_bound")

MIB = 1 << 20
#: The issue's figures.
MEMORY_LIMIT = 64 * MIB
STUDIES = 4
OBJECTS_PER_STUDY = 5
OBJECT_PIXELS = 5 * MIB
GROWTH_BOUND = 100 * MIB
#: RSS sampling period during the loads, in seconds.
SAMPLE_EVERY = 0.05
#: How long the appliance may take to start, in seconds.
START_LIMIT = 30.0


torture = load_tool("torture")


def proc_status(pid: int) -> Dict[str, int]:
    """The memory figures of /proc/PID/status (VmRSS, VmHWM, RssAnon...), in bytes."""
    figures = {}
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as handle:
        for line in handle:
            match = re.match(r"^(Vm\w+|Rss\w+):\s+(\d+) kB", line)
            if match:
                figures[match.group(1)] = int(match.group(2)) * 1024
    return figures


def reset_peak(pid: int) -> bool:
    """Reset the process's VmHWM to its current RSS (Linux 4.0+: ``5`` into clear_refs); False if refused."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def mib(size: int) -> str:
    return f"{size / MIB:.1f} MiB"


class HTTP:
    """The appliance's JSON API on 127.0.0.1:``port`` through twisted.web's client, on one persistent
    connection (closed in the test's cleanup)."""

    def __init__(self, testcase: unittest.TestCase, port: int) -> None:
        self.port = port
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 1
        testcase.addCleanup(self.pool.closeCachedConnections)
        self.agent = Agent(reactor, pool=self.pool)

    async def __call__(self, method: str, path: str, body=None) -> Tuple[int, Optional[dict]]:
        producer = None if body is None else FileBodyProducer(BytesIO(json.dumps(body).encode("utf-8")))
        response = await self.agent.request(method.encode("ascii"), f"http://127.0.0.1:{self.port}{path}".encode(),
                                            Headers({b"content-type": [b"application/json"]}), producer)
        data = await readBody(response)
        return response.code, json.loads(data) if data else None


def generate_studies(folder: str) -> List[Tuple[str, List[str]]]:
    """Four studies of five 5 MiB CT images each (Explicit VR Little Endian Part 10 files)."""
    studies = []
    for number in range(1, STUDIES + 1):
        study = f"1.2.826.0.1.3680043.10.77.{number}"
        series = f"{study}.1"
        study_folder = os.path.join(folder, f"study{number}")
        os.makedirs(study_folder)
        paths = []
        for instance in range(1, OBJECTS_PER_STUDY + 1):
            ds = make_dataset(study=study, series=series, sop=f"{series}.{instance}", pixels=bytes(OBJECT_PIXELS),
                              patient_id=f"PIDMB{number}")
            ds.InstanceNumber = instance
            paths.append(write_part10(os.path.join(study_folder, f"{ds.SOPInstanceUID}.dcm"), ds,
                                      EXPLICIT_VR_LITTLE_ENDIAN))
        studies.append((study, paths))
    return studies


class MemoryBoundTests(unittest.TestCase):
    """The appliance as a subprocess: four ~25 MiB studies loaded into a 64 MiB memory_limit."""

    timeout = 120
    skip = _need(STORESCU)

    async def start_appliance(self, root: str, web: Optional[dict] = None,
                              devices: Optional[dict] = None) -> Tuple[ApplianceProcess, int, int]:
        """twistd -n appliance on free ports (``web``: more [web] keys, ``devices``: more devices); returns once its
        three ports listen and its archive check logged (a port taken meanwhile: retried with others)."""
        problem = ""
        for attempt in range(3):
            disk_port, memory_port, web_port = free_port(), free_port(), free_port()
            tables = {
                "appliance": {"data_dir": os.path.join(root, "var")},
                "disk_server": {"interface": "127.0.0.1", "port": disk_port, "tls_port": 0, "min_free_space": 0,
                                "timeout": 20},
                "memory_server": {"interface": "127.0.0.1", "port": memory_port, "tls_port": 0, "timeout": 20,
                                  "memory_limit": "64 MiB"},
                "web": dict({"interface": "127.0.0.1", "port": web_port}, **(web or {})),
                "devices": dict({
                    "disk_server": {"ae_title": "DISK_SERVER", "host": "127.0.0.1", "port": disk_port,
                                    "timeout": 20},
                    "memory_server": {"ae_title": "MEMORY_SERVER", "host": "127.0.0.1", "port": memory_port,
                                      "timeout": 20},
                }, **(devices or {})),
            }
            config = os.path.join(root, f"appliance-{attempt}.toml")
            with open(config, "w", encoding="utf-8") as handle:
                handle.write(_toml(tables))
            appliance = ApplianceProcess([rf"starting on {disk_port}\b", rf"starting on {memory_port}\b",
                                          rf"starting on {web_port}\b", torture.RECONCILED.pattern])
            reactor.spawnProcess(appliance, sys.executable,
                                 [sys.executable] + torture.TWISTD + ["-n", "--pidfile=", "appliance", "--config",
                                                                      config],
                                 env=subprocess_env(PYTHONUNBUFFERED="1"), path=root)
            self.addCleanup(lambda appliance=appliance: defer.ensureDeferred(appliance.stop()))
            try:
                await appliance.ready.addTimeout(START_LIMIT, reactor)
                return appliance, disk_port, web_port
            except (AssertionError, defer.TimeoutError) as error:
                problem = f"{error}\n{appliance.text()[-3000:]}"
                await appliance.stop()
                if "already in use" not in problem:
                    break
        self.fail(f"the appliance did not start:\n{problem}")

    async def ended(self, api: HTTP, load_id: int) -> dict:
        """The load once it ended, followed with ?wait= (answered at each change)."""
        for _ in range(500):
            code, load = await api("GET", f"/api/loads/{load_id}?wait=30")
            self.assertEqual(code, 200, load)
            if load["state"] in ("done", "failed", "cancelled"):
                return load
        self.fail(f"load {load_id} did not end")

    @deferred_test
    async def test_four_studies_into_64_mib(self):
        """Four studies of 5 x 5 MiB loaded one after another into memory_limit = 64 MiB: every load ends done
        with its five objects, the appliance's resident memory grows by less than 100 MiB over what it was
        before the first load, the newest study is held and the oldest dropped, and the store holds at most
        64 MiB."""
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        studies = generate_studies(os.path.join(root, "files"))
        appliance, disk_port, web_port = await self.start_appliance(root)
        pid = appliance.pid
        out, err, code = await run_program(STORESCU, ["-to", "20", "-ta", "20", "-td", "20", "-aec", "DISK_SERVER",
                                                      "127.0.0.1", str(disk_port),
                                                      *[path for _, paths in studies for path in paths]])
        self.assertEqual(code, 0, out + err)
        api = HTTP(self, web_port)
        code, listed = await api("GET", "/api/memory/studies")  # the web API warmed up before the baseline
        self.assertEqual((code, listed["studies"]), (200, []), listed)

        before = proc_status(pid)
        baseline = before["VmRSS"]
        peak_reset = reset_peak(pid)
        samples: List[int] = [baseline]

        def sample() -> None:
            try:
                samples.append(proc_status(pid)["VmRSS"])
            except (OSError, KeyError):  # the process went away: the loads will say so
                pass

        sampler = task.LoopingCall(sample)
        sampler.start(SAMPLE_EVERY)
        try:
            ended = []
            for study, _ in studies:
                code, load = await api("POST", "/api/loads", {"device": "disk_server", "study": study})
                self.assertEqual(code, 202, load)
                ended.append(await self.ended(api, load["id"]))
                sample()
                _log.info("memory bound: load of study {study} ended {state}; RSS now {rss}", study=study,
                          state=ended[-1]["state"], rss=mib(samples[-1]))
        finally:
            sampler.stop()
        after = proc_status(pid)
        sampled_peak = max(samples)
        peak = max(sampled_peak, after["VmHWM"]) if peak_reset else sampled_peak
        growth = peak - baseline
        code, held = await api("GET", "/api/memory/studies")
        self.assertEqual(code, 200, held)
        held_uids = [entry["study"] for entry in held["studies"]]
        _log.info("memory bound ({python}): baseline RSS {baseline}, peak RSS {peak} (sampled {sampled} in "
                  "{count} samples, VmHWM {hwm}{reset}), growth {growth} (bound {bound}); RSS after the loads "
                  "{after}, RssAnon {anon}; store holds {size} of {limit} in {held}",
                  python=sys.version.split()[0], baseline=mib(baseline), peak=mib(peak), sampled=mib(sampled_peak),
                  count=len(samples), hwm=mib(after["VmHWM"]),
                  reset="" if peak_reset else " since start, not reset: not counted",
                  growth=mib(growth), bound=mib(GROWTH_BOUND), after=mib(after["VmRSS"]),
                  anon=mib(after.get("RssAnon", 0)), size=mib(held["size"]), limit=mib(held["limit"]),
                  held=held_uids)
        self.assertEqual([(load["state"], load["completed"], load["failed"], load["error"]) for load in ended],
                         [("done", OBJECTS_PER_STUDY, 0, None)] * STUDIES,
                         f"{ended}\nthe appliance's output ends:\n{appliance.text()[-3000:]}")
        self.assertLess(growth, GROWTH_BOUND,
                        f"resident memory grew by {mib(growth)}: from {mib(baseline)} before the first load to a "
                        f"peak of {mib(peak)}")
        newest, oldest = studies[-1][0], studies[0][0]
        self.assertIn(newest, held_uids)
        self.assertNotIn(oldest, held_uids)
        self.assertEqual(held["limit"], MEMORY_LIMIT)
        self.assertLessEqual(held["size"], MEMORY_LIMIT)
