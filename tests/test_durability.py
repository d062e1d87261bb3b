"""Durability of the Disk-Server's archive against real processes and a real full file system.

- a short run of ``tools/torture.py``: storescu streams, kill -9, restart,
  check that every acknowledged object survived (``make torture`` runs it long);
- a tmpfs as the data folder, filled by storescu: A700 when it is full,
  nothing partial left, room again after ``appliance-archive delete``; and
  with auto_delete the least recently accessed studies make room.

The appliance runs as ``twistd -n appliance`` in a child interpreter; every
wait is bounded (attempts of 0.1 s, or trial's timeout).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from typing import Dict, List, Sequence

from twisted.internet import defer, reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from .support import ROOT, ApplianceProcess, load_tool, deferred_test, free_port, run_python, subprocess_env


torture = load_tool("torture")

STORESCU = shutil.which("storescu")
NO_STORESCU = None if STORESCU else "DCMTK's storescu is not installed"
MOUNT = shutil.which("mount")
UMOUNT = shutil.which("umount")

#: storescu -v's words for a C-STORE response of 0xA7xx.
REFUSED_OUT_OF_RESOURCES = "Refused: OutOfResources"
#: How long the appliance may take to start, in seconds.
START_LIMIT = 30.0


def _decode(result):
    out, err, code = result
    return out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), code


class TortureToolTests(unittest.TestCase):
    """tools/torture.py: its storescu parser, and a short run of it as a subprocess."""

    skip = NO_STORESCU
    timeout = 120

    def test_parse_storescu_pairs_each_file_with_its_response(self):
        """Each 'Sending file' is paired with the next 'Received Store Response'; a file cut off gets None."""
        output = "\n".join([
            "I: checking input files ...",
            "I: Requesting Association",
            "I: Association Accepted (Max Send PDV: 16372)",
            "I: Sending file: /data/a.dcm",
            "I: Converting transfer syntax: Little Endian Explicit -> Little Endian Explicit",
            "I: Sending Store Request (MsgID 1, CT)",
            "XMIT: .I: Received Store Response (Success)",
            "I: Sending file: /data/b.dcm",
            "I: Sending Store Request (MsgID 2, CT)",
            "I: Received Store Response (Refused: OutOfResources)",
            "I: Sending file: /data/c d.dcm",
            "I: Sending Store Request (MsgID 3, CT)",
            "E: Store Failed, file: /data/c d.dcm:",
            "E: 0006:0317 Peer aborted Association (or never connected)",
            "I: Sending file: /data/e.dcm",
        ])
        self.assertEqual(
            torture.parse_storescu(output),
            [("/data/a.dcm", "Success"), ("/data/b.dcm", REFUSED_OUT_OF_RESOURCES),
             ("/data/c d.dcm", None), ("/data/e.dcm", None)],
        )

    @deferred_test
    async def test_short_torture_run(self):
        """Three kill -9 rounds lose no acknowledged object and leave no orphan, leftover or dangling row."""
        work = os.path.abspath(self.mktemp())
        out, err, code = await run_python([
            os.path.join(ROOT, "tools", "torture.py"), "--rounds", "3", "--seed", "20240611", "--objects", "200",
            "--studies", "4", "--streams", "2", "--min-delay", "0.1", "--max-delay", "0.6", "--work", work,
        ])
        self.assertEqual(code, 0, out + err)
        lines = out.strip().splitlines()
        summary = re.fullmatch(
            r"rounds: 3, acknowledged: (\d+), lost: 0, orphans: 0, corrupt: 0, rows without files: 0, "
            r"leftovers: 0, errors: 0, interrupted: (\d+)",
            lines[-1],
        )
        self.assertIsNotNone(summary, out + err)
        acknowledged, interrupted = int(summary.group(1)), int(summary.group(2))
        self.assertGreater(acknowledged, 0, out)
        # at least one kill must land while objects were on their way, or nothing was tortured
        self.assertGreaterEqual(interrupted, 1, out)
        rounds = [line for line in lines if re.match(r"round \d+: killed after [0-9.]+ s", line)]
        self.assertEqual(len(rounds), 3, out)
        for line in rounds:  # each restart's reconciliation line was found and read
            self.assertRegex(line, r"restart removed \d+ temporary and \d+ never-indexed files, 0 rows without files")
        self.assertRegex(out, r"appliance-archive verify: verified \d+ instances: 0 problems \(exit status 0\)")


class DiskFullTests(unittest.TestCase):
    """A tmpfs as data_dir, filled for real by storescu against the appliance."""

    skip = NO_STORESCU
    timeout = 120

    async def mount_tmpfs(self, size: str) -> str:
        """Mount a tmpfs of ``size`` on a fresh folder (unmounted in cleanup); skip where that is not allowed."""
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        if MOUNT is None or UMOUNT is None:
            raise unittest.SkipTest("mount/umount are not installed")
        out, err, code = _decode(await getProcessOutputAndValue(
            MOUNT, ["-t", "tmpfs", "-o", f"size={size}", "tmpfs", folder], env=dict(os.environ)))
        if code != 0:
            reason = " ".join((out + err).split())
            raise unittest.SkipTest(f"cannot mount a tmpfs here (uid {os.geteuid()}): {reason}")
        self.addCleanup(self._unmount, folder)
        return folder

    async def _unmount_once(self, folder: str, *options: str):
        return _decode(await getProcessOutputAndValue(UMOUNT, list(options) + [folder], env=dict(os.environ)))

    @deferred_test
    async def _unmount(self, folder: str) -> None:
        out, err, code = await self._unmount_once(folder)
        if code != 0:  # busy: detach it now, it goes when the last user does
            lazy_out, lazy_err, lazy_code = await self._unmount_once(folder, "-l")
            self.assertEqual(lazy_code, 0, f"umount {folder}: {out}{err}; umount -l: {lazy_out}{lazy_err}")

    async def start_appliance(self, data_dir: str, **disk_server: object):
        """twistd -n appliance on ``data_dir``; waits until it listens and its start-up check logged."""
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        problem = ""
        for attempt in range(3):  # a free port can be taken before twistd binds it
            port = free_port()
            config = torture.write_config(os.path.join(folder, f"appliance-{attempt}.toml"), data_dir, port,
                                          **disk_server)
            appliance = ApplianceProcess([rf"starting on {port}\b", torture.RECONCILED.pattern])
            reactor.spawnProcess(
                appliance, sys.executable,
                [sys.executable] + torture.TWISTD + ["-n", "--pidfile=", "appliance", "--config", config],
                env=subprocess_env(PYTHONUNBUFFERED="1"), path=folder,
            )
            self.addCleanup(self.stop_appliance, appliance)
            try:
                await appliance.ready.addTimeout(START_LIMIT, reactor)
                return appliance, config, port
            except (AssertionError, defer.TimeoutError) as error:
                problem = f"{error}\n{appliance.text()[-3000:]}"
            await self.stop_appliance(appliance)
            if "already in use" not in problem:
                break
        self.fail(f"the appliance did not start:\n{problem}")

    @deferred_test
    async def stop_appliance(self, appliance: ApplianceProcess) -> None:
        """SIGTERM, and SIGKILL after 20 s; returns once the process is gone."""
        await appliance.stop()

    async def storescu(self, port: int, paths: Sequence[str]) -> List:
        """storescu -v -nh (go on after a refusal) of ``paths``; (file, status) for each file, in order."""
        out, err, code = _decode(await getProcessOutputAndValue(
            STORESCU, torture.storescu_command(STORESCU, port, paths, halt=False)[1:],
            env=torture.storescu_env(), path=ROOT))
        self.assertEqual(code, 0, out + err)
        pairs = torture.parse_storescu(err if "Sending file:" in err else out)
        self.assertEqual([path for path, _ in pairs], list(paths), out + err)
        return pairs

    @staticmethod
    def sent(objects) -> Dict[str, bytes]:
        return {obj.sop_uid: torture.data_set_bytes(obj.path) for obj in objects}

    def assertArchiveConsistent(self, archive: str, sent: Dict[str, bytes], acknowledged) -> "torture.Findings":
        """Every acknowledged object intact; no dangling row, orphan file or anything in tmp/."""
        findings = torture.check_archive(archive, sent, acknowledged, float("inf"))
        self.assertEqual(findings.problems(), [])
        tmp = os.path.join(archive, "tmp")  # none but the appliance's spare (empty) files
        self.assertEqual([name for name in os.listdir(tmp) if os.path.getsize(os.path.join(tmp, name))], [])
        return findings

    @deferred_test
    async def test_full_file_system_refuses_with_a700_and_delete_makes_room(self):
        """On a full 3 MiB tmpfs (no auto-delete) stores are refused with A700, nothing partial remains,
        earlier objects are intact, and once appliance-archive deleted a study the next store succeeds."""
        data_dir = await self.mount_tmpfs("3m")
        folder = os.path.abspath(self.mktemp())
        # 48 objects of 33 KiB (6 studies of 8) need more than 3 MiB with the index's write-ahead log
        objects = torture.generate_objects(os.path.join(folder, "small"), count=48, studies=6, seed=11,
                                           matrices=(128,))
        # one of 512 KiB that cannot fit into whatever room is left once the small ones were refused
        big = torture.generate_objects(os.path.join(folder, "big"), count=1, studies=1, seed=12, matrices=(512,))[0]
        sent = self.sent(objects + [big])
        appliance, config, port = await self.start_appliance(data_dir, min_free_space=0, auto_delete=False)
        archive = os.path.join(data_dir, "archive")

        pairs = await self.storescu(port, [obj.path for obj in objects])
        statuses = [status for _, status in pairs]
        self.assertEqual(set(statuses), {"Success", REFUSED_OUT_OF_RESOURCES},
                         f"expected Success until the tmpfs is full, then A700: {statuses}")
        first_refused = statuses.index(REFUSED_OUT_OF_RESOURCES)
        self.assertGreaterEqual(first_refused, 8, "the first study should fit entirely")
        refused = objects[first_refused]
        log = appliance.text()
        self.assertRegex(log, re.escape(f"C-STORE of {refused.sop_uid} from TORTURE answered 0xA700 Refused: "
                                        "out of resources: cannot write to the archive") +
                         r"('s index: database or disk is full|: No space left on device)")
        acknowledged = [obj.sop_uid for obj, status in zip(objects, statuses) if status == "Success"]
        findings = self.assertArchiveConsistent(archive, sent, acknowledged)
        self.assertEqual(findings.rows, len(acknowledged))  # no refused object is indexed

        # an object far larger than what is left fails in the file write itself (ENOSPC)
        [(_, status)] = await self.storescu(port, [big.path])
        self.assertEqual(status, REFUSED_OUT_OF_RESOURCES)
        self.assertIn(f"C-STORE of {big.sop_uid} from TORTURE answered 0xA700 Refused: out of resources: "
                      "cannot write to the archive: No space left on device", appliance.text())
        self.assertArchiveConsistent(archive, sent, acknowledged)
        self.assertEqual(torture.index_rows(archive).keys(), set(acknowledged))

        first_study = objects[0].study_uid
        out, err, code = await run_python(["-m", "appliance.cli.archive", "--config", config, "delete", first_study])
        self.assertEqual(code, 0, out + err)
        self.assertIn(f"deleted study {first_study}", out)
        remaining = [obj.sop_uid for obj, status in zip(objects, statuses)
                     if status == "Success" and obj.study_uid != first_study]
        self.assertEqual(len(remaining), len(acknowledged) - 8)

        [(_, status)] = await self.storescu(port, [refused.path])
        self.assertEqual(status, "Success")
        rows = torture.index_rows(archive)
        self.assertEqual(rows.keys(), set(remaining) | {refused.sop_uid})
        self.assertNotIn(first_study, {study for _, _, _, study in rows.values()})
        self.assertArchiveConsistent(archive, sent, remaining + [refused.sop_uid])

    @deferred_test
    async def test_read_only_file_system(self):
        """Issue 9: the archive's file system (its files and index) read-only at start-up, as after a kernel
        remounted it on errors: startup stops with one line naming the data folder and why, status 1; once
        writable again the appliance starts and every acknowledged object is intact."""
        data_dir = await self.mount_tmpfs("32m")
        folder = os.path.abspath(self.mktemp())
        objects = torture.generate_objects(os.path.join(folder, "objects"), count=16, studies=2, seed=17,
                                           matrices=(64,))
        sent = self.sent(objects)
        appliance, config, port = await self.start_appliance(data_dir, min_free_space=0)
        archive = os.path.join(data_dir, "archive")
        stored = await self.storescu(port, [obj.path for obj in objects])
        self.assertEqual({status for _, status in stored}, {"Success"})
        await self.stop_appliance(appliance)

        out, err, code = _decode(await getProcessOutputAndValue(
            MOUNT, ["-o", "remount,ro", data_dir], env=dict(os.environ)))
        self.assertEqual(code, 0, out + err)
        try:
            out, err, code = await run_python(torture.TWISTD + ["-n", "--pidfile=", "appliance", "--config", config])
        finally:
            remount = _decode(await getProcessOutputAndValue(MOUNT, ["-o", "remount,rw", data_dir],
                                                             env=dict(os.environ)))
        self.assertEqual(remount[2], 0, remount[0] + remount[1])
        self.assertEqual(code, 1, out + err)
        lines = [line for line in (out + err).splitlines() if line.strip()]
        self.assertEqual(len(lines), 1, out + err)
        self.assertIn("[appliance] data_dir: cannot open the archive", lines[0])
        self.assertRegex(lines[0], "read-only|readonly|Read-only")
        self.assertNotIn("Traceback", out + err)

        appliance, config, port = await self.start_appliance(data_dir, min_free_space=0)
        findings = self.assertArchiveConsistent(archive, sent, [obj.sop_uid for obj in objects])
        self.assertEqual(findings.rows, len(objects))

    @deferred_test
    async def test_auto_delete_evicts_least_recently_accessed_studies(self):
        """With auto_delete and min_free_space = 1 MiB on a small tmpfs, every store succeeds: the oldest
        studies are evicted, whole and in the order they were stored, and the newer ones stay intact."""
        # 16 MiB: the index's write-ahead log alone grows to about 4 MiB before SQLite checkpoints it
        data_dir = await self.mount_tmpfs("16m")
        folder = os.path.abspath(self.mktemp())
        studies, per_study = 16, 8
        # 128 objects of 129 KiB, 16.1 MiB in all, sent study after study
        objects = torture.generate_objects(os.path.join(folder, "objects"), count=studies * per_study,
                                           studies=studies, seed=13, matrices=(256,))
        sent = self.sent(objects)
        study_uids = [objects[number * per_study].study_uid for number in range(studies)]
        appliance, config, port = await self.start_appliance(data_dir, min_free_space=1024 * 1024, auto_delete=True)
        archive = os.path.join(data_dir, "archive")

        pairs = await self.storescu(port, [obj.path for obj in objects])
        self.assertEqual([status for _, status in pairs], ["Success"] * len(objects))

        rows = torture.index_rows(archive)
        kept = sorted({study_uids.index(study) for _, _, _, study in rows.values()})
        self.assertTrue(kept, "every study was evicted")
        oldest_kept = kept[0]
        self.assertEqual(kept, list(range(oldest_kept, studies)), "the kept studies are not the newest ones")
        self.assertGreaterEqual(oldest_kept, 1, "nothing was evicted: the tmpfs never filled")
        self.assertGreaterEqual(len(kept), 2)
        evicted_log = re.findall(r"study (\S+) evicted \(least recently accessed\): (\d+) instances", appliance.text())
        self.assertEqual([uid for uid, _ in evicted_log], study_uids[:oldest_kept])
        self.assertEqual({int(count) for _, count in evicted_log}, {per_study})
        kept_objects = [obj.sop_uid for obj in objects if obj.study_index >= oldest_kept]
        self.assertEqual(rows.keys(), set(kept_objects))
        self.assertArchiveConsistent(archive, sent, kept_objects)


class SoakTests(unittest.TestCase):
    """A short run of tools/soak.py (``make torture`` runs the long one): hostile PDUs, churn, floods, a trickled
    RQ, concurrent senders, kill -9 during C-MOVE and during eviction; it must report nothing lost, no failure."""

    timeout = 600
    skip = NO_STORESCU

    @deferred_test
    async def test_short_soak(self):
        out, err, code = await run_python([os.path.join(ROOT, "tools", "soak.py"), "--cycles", "300", "--senders",
                                           "20", "--kill-rounds", "1", "--quick", "--seed", "1"])
        self.assertEqual(code, 0, out[-4000:] + err[-4000:])
        self.assertRegex(out, r"report: \d+ hostile cases, .* 0 instances lost, .*; 0 failures")

