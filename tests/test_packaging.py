"""The distribution ships every package of the source tree."""

from __future__ import annotations

import configparser
import os

from twisted.trial.unittest import SynchronousTestCase

from .support import ROOT


class PackagesTests(SynchronousTestCase):
    """setup.cfg lists packages by hand (twisted.plugins must not have an __init__.py)."""

    def test_every_package_listed(self):
        """Every folder of appliance/ with an __init__.py is in setup.cfg's packages, and twisted.plugins too."""
        parser = configparser.ConfigParser()
        parser.read(os.path.join(ROOT, "setup.cfg"))
        listed = {line.strip() for line in parser["options"]["packages"].splitlines() if line.strip()}
        found = set()
        for directory, _, files in os.walk(os.path.join(ROOT, "appliance")):
            if "__init__.py" in files:
                found.add(os.path.relpath(directory, ROOT).replace(os.sep, "."))
        self.assertEqual(listed - {"twisted.plugins"}, found)
        self.assertIn("twisted.plugins", listed)
        self.assertFalse(os.path.exists(os.path.join(ROOT, "twisted", "plugins", "__init__.py")))

    def test_the_pages_are_package_data(self):
        """The web pages' files are installed with appliance.web (setup.cfg's package_data)."""
        parser = configparser.ConfigParser()
        parser.read(os.path.join(ROOT, "setup.cfg"))
        self.assertEqual(parser["options.package_data"]["appliance.web"].strip(), "static/*")
        static = os.path.join(ROOT, "appliance", "web", "static")
        self.assertIn("index.html", os.listdir(static))
        self.assertFalse([name for name in os.listdir(static) if os.path.isdir(os.path.join(static, name))],
                         "static/* would not take a folder's files")

