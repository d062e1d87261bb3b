"""The fuzz targets of ``make fuzz`` (tools/fuzz.py) run on their seed corpus without atheris, so they cannot rot:
every kept input, and each of its prefixes, goes through its target without an exception; and the data-set
target's comparisons do report a disagreement."""

from __future__ import annotations

import os
import sys

from twisted.trial.unittest import SynchronousTestCase

from appliance.dataset import fastscan

from .support import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))
import fuzz  # noqa: E402


class FuzzTargetTests(SynchronousTestCase):

    def test_targets_on_their_corpus(self):
        makers = {"pdu": fuzz._pdu_target, "command": fuzz._command_target, "dataset": fuzz._dataset_target}
        self.assertEqual(set(makers), set(fuzz.TARGETS))
        for target, make in makers.items():
            run = make()
            folder = os.path.join(fuzz.CORPUS, target)
            names = sorted(os.listdir(folder))
            self.assertTrue(names, f"no corpus for {target}")
            for name in names:
                with open(os.path.join(folder, name), "rb") as handle:
                    data = handle.read()
                for cut in range(0, len(data) + 1, max(1, len(data) // 50)):
                    run(data[:cut])

    def test_dataset_target_reports_a_disagreement(self):
        """A scanner answering differently from the pydicom path (its Pixel Data offset one byte off) is a
        finding: the target raises Disagreement on a seed it passes otherwise."""
        run = fuzz._dataset_target()
        with open(os.path.join(fuzz.CORPUS, "dataset", "image-0"), "rb") as handle:
            seed = handle.read()
        run(seed)
        scan = fastscan.scan

        def off_by_one(*args, **kwargs):
            answer = scan(*args, **kwargs)
            return None if answer is None else (answer[0], answer[1] + 1, answer[2])

        self.patch(fastscan, "scan", off_by_one)
        with self.assertRaises(fuzz.Disagreement) as caught:
            run(seed)
        self.assertIn("the pydicom path", str(caught.exception))
