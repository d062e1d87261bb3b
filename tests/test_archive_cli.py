"""``appliance-archive`` against a real archive: list, protect, evict --dry-run, delete, verify.

Each test writes a configuration file in a temporary folder and fills its
archive through :class:`Archive` with synchronous runners, as the Disk-Server
would (temporary file, examine, commit), under a Clock so that the studies'
access order is known.  The command then runs in-process through
``appliance.cli.archive.main`` (and once as ``python -m``).
"""

from __future__ import annotations

import io
import os
import sys
from typing import Dict, List, Tuple

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from appliance import config as configuration
from appliance.archive.archive import Archive
from appliance.archive.index import ArchiveIndex
from appliance.archive.sink import examine
from appliance.archive.store import part10_header
from appliance.cli import archive as cli
from appliance.dicom.uids import EXPLICIT_VR_LITTLE_ENDIAN, IMPLEMENTATION_CLASS_UID
from appliance.net.threads import synchronous_runner

from .support import deferred_test, run_python
from .support_data import encode_dataset, make_dataset

#: Three studies, least recently accessed first: (study UID, patient ID, patient name, [(series, SOP)]).
STUDY_A = "1.2.826.0.1.4.1"
STUDY_B = "1.2.826.0.1.4.2"
STUDY_C = "1.2.826.0.1.4.3"
STUDIES = (
    (STUDY_A, "PID1", "Alpha^One", [(f"{STUDY_A}.1", f"{STUDY_A}.1.1"), (f"{STUDY_A}.1", f"{STUDY_A}.1.2"),
                                    (f"{STUDY_A}.2", f"{STUDY_A}.2.1")]),
    (STUDY_B, "PID2", "Beta^Two", [(f"{STUDY_B}.1", f"{STUDY_B}.1.1")]),
    (STUDY_C, "PID1", "Alpha^One", [(f"{STUDY_C}.1", f"{STUDY_C}.1.1"), (f"{STUDY_C}.1", f"{STUDY_C}.1.2")]),
)
UNKNOWN_STUDY = "1.2.826.0.1.4.99"


class ArchiveCliTests(unittest.TestCase):
    """appliance.cli.archive.main on a filled archive."""

    def setUp(self):
        self.folder = os.path.abspath(self.mktemp())
        os.makedirs(self.folder)
        self.config_path = self.write_config()
        config = configuration.load(self.config_path)
        self.archive_root = config.archive.path
        clock = Clock()
        clock.advance(1_700_000_000)
        archive = Archive(config.archive.path, config.archive.limits, config.archive.on_duplicate, clock,
                          synchronous_runner, synchronous_runner)
        try:
            for study, patient_id, patient, instances in STUDIES:
                clock.advance(60)
                for series, sop in instances:
                    ds = make_dataset(patient=patient, patient_id=patient_id, study=study, series=series, sop=sop,
                                      pixels=bytes(range(256)) * 2)
                    self.store(archive, ds)
        finally:
            archive.close()
        index = self.index()
        #: study UID -> size in bytes, and SOP UID -> path relative to the archive
        self.sizes: Dict[str, int] = {row.study_uid: row.size for row in index.studies()}
        self.paths: Dict[str, str] = {row.sop_uid: row.path for row in index.all_instances()}

    def write_config(self, **disk_server) -> str:
        """A configuration file in the test's folder with its archive under data/; returns its path."""
        settings = {"port": 0, "min_free_space": 0}
        settings.update(disk_server)
        lines = ["[appliance]", 'data_dir = "data"', "", "[disk_server]"]
        lines += [f"{key} = {value!r}".replace("'", '"') for key, value in settings.items()]
        path = os.path.join(self.folder, "appliance.toml")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")
        return path

    def store(self, archive: Archive, ds) -> None:
        """Receive and commit one object as the storage service does, without the network."""
        data = encode_dataset(ds, EXPLICIT_VR_LITTLE_ENDIAN)
        temp = self.successResultOf(archive.open_temp())
        header = part10_header(ds.SOPClassUID, ds.SOPInstanceUID, EXPLICIT_VR_LITTLE_ENDIAN,
                               IMPLEMENTATION_CLASS_UID, "T", "MODALITY")
        self.successResultOf(archive.write(temp, [header, data]))
        stored = examine(temp, len(header), ds.SOPClassUID, ds.SOPInstanceUID, EXPLICIT_VR_LITTLE_ENDIAN, "MODALITY")
        self.successResultOf(defer.ensureDeferred(archive.commit(stored)))

    def index(self) -> ArchiveIndex:
        index = ArchiveIndex(os.path.join(self.archive_root, "index.sqlite"))
        self.addCleanup(index.close)
        return index

    def absolute(self, sop_uid: str) -> str:
        return os.path.join(self.archive_root, self.paths[sop_uid])

    def run_cli(self, *argv: str) -> Tuple[int, str, str]:
        """main(['--config', CFG, *argv]); returns (exit status, output, standard error)."""
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stderr", err)
        code = cli.main(["--config", self.config_path, *argv], out=out)
        return code, out.getvalue(), err.getvalue()

    @staticmethod
    def listed_studies(output: str) -> List[str]:
        """The study UIDs an ``evict --dry-run`` lists, in its order."""
        return [line.split()[0] for line in output.splitlines() if line.startswith("  ")]

    @staticmethod
    def study_rows(output: str) -> Dict[str, List[str]]:
        """``list``'s rows by study UID: the columns, split on white space."""
        return {line.split()[0]: line.split() for line in output.splitlines() if line.startswith("1.2.826.0.1.4.")}

    # --- list ----------------------------------------------------------------------------------------

    def test_list_studies(self):
        """``list`` shows each study, most recently accessed first, with its patient, series and instance
        counts, and "no" under PROTECTED; then the totals."""
        code, output, _ = self.run_cli("list")
        self.assertEqual(code, 0)
        self.assertTrue(output.splitlines()[0].startswith("STUDY INSTANCE UID"))
        self.assertTrue(output.splitlines()[0].endswith("PROTECTED"))
        rows = self.study_rows(output)
        self.assertEqual(list(rows), [STUDY_C, STUDY_B, STUDY_A])
        self.assertEqual(rows[STUDY_A][:5], [STUDY_A, "PID1", "20240102", "2", "3"])
        self.assertEqual(rows[STUDY_B][:5], [STUDY_B, "PID2", "20240102", "1", "1"])
        self.assertEqual(rows[STUDY_C][:5], [STUDY_C, "PID1", "20240102", "1", "2"])
        self.assertEqual({uid: row[-1] for uid, row in rows.items()}, {STUDY_A: "no", STUDY_B: "no", STUDY_C: "no"})
        self.assertTrue(output.splitlines()[-1].startswith("2 patients, 3 studies, 4 series, 6 instances, "),
                        output)

    def test_list_patients(self):
        """``list --patients`` shows each patient once with the number of their studies and the names they carry."""
        code, output, _ = self.run_cli("list", "--patients")
        self.assertEqual(code, 0)
        lines = output.splitlines()
        self.assertTrue(lines[0].startswith("PATIENT ID"))
        self.assertEqual([line.split()[:3] + line.split()[-1:] for line in lines[1:]],
                         [["PID1", "-", "2", "Alpha^One"], ["PID2", "-", "1", "Beta^Two"]])

    # --- protect, unprotect, evict --dry-run -----------------------------------------------------------

    def test_protect_and_unprotect(self):
        """``protect`` shows as "yes" in ``list`` and takes the study out of what eviction would remove;
        ``unprotect`` puts it back; neither changes anything else."""
        code, output, _ = self.run_cli("evict", "--dry-run", "--bytes", "1")
        self.assertEqual(code, 0)
        self.assertIn("eviction would remove 1 studies", output)
        self.assertEqual(self.listed_studies(output), [STUDY_A])  # the least recently accessed
        code, output, _ = self.run_cli("protect", STUDY_A)
        self.assertEqual((code, output), (0, f"study {STUDY_A} protected\n"))
        self.assertEqual(self.study_rows(self.run_cli("list")[1])[STUDY_A][-1], "yes")
        code, output, _ = self.run_cli("evict", "--dry-run", "--bytes", "1")
        self.assertEqual(self.listed_studies(output), [STUDY_B])
        code, output, _ = self.run_cli("evict", "--dry-run", "--bytes", str(10**12))
        self.assertEqual(self.listed_studies(output), [STUDY_B, STUDY_C])  # protected: never listed
        self.assertIn("eviction would remove 2 studies", output)
        code, output, _ = self.run_cli("unprotect", STUDY_A)
        self.assertEqual((code, output), (0, f"study {STUDY_A} unprotected\n"))
        self.assertEqual(self.study_rows(self.run_cli("list")[1])[STUDY_A][-1], "no")
        code, output, _ = self.run_cli("evict", "--dry-run", "--bytes", str(self.sizes[STUDY_A] + 1))
        self.assertEqual(self.listed_studies(output), [STUDY_A, STUDY_B])
        self.assertEqual(self.index().counts(), (2, 3, 4, 6))  # a dry run removes nothing

    def test_protect_unknown_study(self):
        """``protect`` and ``unprotect`` of a study the archive does not hold exit 1 and say so."""
        for command in ("protect", "unprotect"):
            code, output, error = self.run_cli(command, UNKNOWN_STUDY)
            self.assertEqual((code, output), (1, ""))
            self.assertEqual(error, f"appliance-archive: no study {UNKNOWN_STUDY}\n")

    def test_evict_dry_run_within_limits(self):
        """Within its limits, ``evict --dry-run`` says so and lists the eviction order, least recently
        accessed first, without the protected study."""
        self.run_cli("protect", STUDY_B)
        code, output, _ = self.run_cli("evict", "--dry-run")
        self.assertEqual(code, 0)
        self.assertTrue(output.startswith("within limits ("), output)
        self.assertEqual(self.listed_studies(output), [STUDY_A, STUDY_C])

    def test_evict_dry_run_over_limit(self):
        """Over max_archive_size, ``evict --dry-run`` names the limit and the studies eviction would
        remove to reach the low-water mark: here the oldest study alone."""
        total = sum(self.sizes.values())
        self.assertGreater(self.sizes[STUDY_A], total * 0.1 + 1)  # enough to reach the low-water mark
        self.write_config(max_archive_size=total - 1, low_water=0.9)
        code, output, _ = self.run_cli("evict", "--dry-run")
        self.assertEqual(code, 0)
        self.assertIn(f"max_archive_size is {total - 1}", output)
        self.assertEqual(self.listed_studies(output), [STUDY_A])
        self.assertEqual(self.index().counts(), (2, 3, 4, 6))

    # --- delete -------------------------------------------------------------------------------------------

    def test_delete_study(self):
        """``delete`` removes the study's files and rows and exits 0; the other studies stay whole."""
        code, output, _ = self.run_cli("delete", STUDY_A)
        self.assertEqual(code, 0)
        self.assertTrue(output.startswith(f"deleted study {STUDY_A} ("), output)
        for sop in (f"{STUDY_A}.1.1", f"{STUDY_A}.1.2", f"{STUDY_A}.2.1"):
            self.assertFalse(os.path.exists(self.absolute(sop)), sop)
        index = self.index()
        self.assertEqual(index.study_instances(STUDY_A), [])
        self.assertEqual(index.counts(), (2, 2, 2, 3))
        self.assertEqual(sorted(row.study_uid for row in index.studies()), [STUDY_B, STUDY_C])
        for sop in (f"{STUDY_B}.1.1", f"{STUDY_C}.1.1", f"{STUDY_C}.1.2"):
            self.assertTrue(os.path.exists(self.absolute(sop)), sop)
        self.assertEqual(self.run_cli("verify")[0], 0)

    def test_delete_unknown_study(self):
        """``delete`` of a study the archive does not hold exits 1, says so, and removes nothing."""
        code, output, error = self.run_cli("delete", UNKNOWN_STUDY)
        self.assertEqual((code, output), (1, ""))
        self.assertEqual(error, f"appliance-archive: no study {UNKNOWN_STUDY}\n")
        self.assertEqual(self.index().counts(), (2, 3, 4, 6))

    # --- verify ----------------------------------------------------------------------------------------------

    def test_verify_clean(self):
        """``verify`` on an undamaged archive checks every instance and exits 0."""
        code, output, _ = self.run_cli("verify")
        self.assertEqual((code, output), (0, "verified 6 instances: 0 problems\n"))

    def assert_one_problem(self, prefix: str, subject: str) -> str:
        code, output, _ = self.run_cli("verify")
        lines = output.splitlines()
        self.assertEqual(code, 1, output)
        self.assertEqual(lines[-1], "verified 6 instances: 1 problems")
        self.assertEqual(len(lines), 2, output)
        self.assertTrue(lines[0].startswith(f"{prefix} {subject}"), lines[0])
        return lines[0]

    def test_verify_missing(self):
        """A stored file deleted behind the index's back: MISSING, exit 1."""
        os.unlink(self.absolute(f"{STUDY_A}.1.1"))
        self.assertEqual(self.assert_one_problem("MISSING ", f"{STUDY_A}.1.1:"),
                         f"MISSING  {STUDY_A}.1.1: {self.paths[f'{STUDY_A}.1.1']}")

    def test_verify_size(self):
        """A truncated file: SIZE with both sizes, exit 1."""
        path = self.absolute(f"{STUDY_B}.1.1")
        size = os.path.getsize(path)
        os.truncate(path, size - 100)
        line = self.assert_one_problem("SIZE    ", f"{STUDY_B}.1.1:")
        self.assertTrue(line.endswith(f"is {size - 100} bytes, index says {size}"), line)

    def test_verify_corrupt(self):
        """A file overwritten with garbage of the same size: CORRUPT, exit 1."""
        path = self.absolute(f"{STUDY_C}.1.2")
        size = os.path.getsize(path)
        with open(path, "wb") as handle:
            handle.write(b"\x5a" * size)
        self.assert_one_problem("CORRUPT ", f"{STUDY_C}.1.2:")

    def test_verify_orphan(self):
        """A .dcm file under objects/ that the index does not name: ORPHAN, exit 1."""
        relative = os.path.join("objects", "ff", "orphan.dcm")
        os.makedirs(os.path.join(self.archive_root, "objects", "ff"))
        with open(os.path.join(self.archive_root, relative), "wb") as handle:
            handle.write(b"never indexed")
        self.assertEqual(self.assert_one_problem("ORPHAN  ", relative), f"ORPHAN   {relative} (not in the index)")

    # --- configuration and the console entry ----------------------------------------------------------------

    def test_bad_configuration(self):
        """A configuration with an unknown key, or no configuration file, exits 2 naming the file."""
        with open(self.config_path, "a", encoding="utf-8") as handle:
            handle.write("no_such_key = 1\n")
        code, output, error = self.run_cli("list")
        self.assertEqual((code, output), (2, ""))
        self.assertIn(f"appliance-archive: {self.config_path}: [disk_server] no_such_key: unknown key", error)
        missing = os.path.join(self.folder, "missing.toml")
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stderr", err)
        self.assertEqual(cli.main(["--config", missing, "verify"], out=out), 2)
        self.assertEqual(err.getvalue(), f"appliance-archive: {missing}: no such file\n")

    @deferred_test
    async def test_console_entry(self):
        """``python -m appliance.cli.archive --config CFG list`` runs with the checkout on PYTHONPATH and
        lists the studies, exit 0."""
        out, err, code = await run_python(["-m", "appliance.cli.archive", "--config", self.config_path, "list"])
        self.assertEqual(code, 0, err)
        self.assertEqual(list(self.study_rows(out)), [STUDY_C, STUDY_B, STUDY_A])
        self.assertIn("2 patients, 3 studies, 4 series, 6 instances, ", out)
