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



class DebianTests(SynchronousTestCase):
    """What debian/ ships: a configuration fit for a box, a hardened unit (the package itself is built, installed,
    run, upgraded and purged by tools/package_test.sh, which make test runs)."""

    def test_packaged_configuration(self):
        from appliance import config as configuration
        from appliance.compat import tomllib

        with open(os.path.join(ROOT, "debian", "appliance.toml"), "rb") as handle:
            config = configuration.parse(tomllib.load(handle), "/etc/dicom-appliance/appliance.toml")
        self.assertEqual(config.data_dir, "/var/lib/dicom-appliance")
        self.assertEqual((config.disk_server.interface, config.disk_server.port, config.disk_server.tls_port),
                         ("0.0.0.0", 104, 0))
        self.assertEqual((config.memory_server.port, config.memory_server.tls_port), (11113, 0))
        self.assertEqual((config.web.interface, config.web.port, config.web.tls), ("127.0.0.1", 8080, None))

    def test_unit(self):
        with open(os.path.join(ROOT, "debian", "dicom-appliance.service"), encoding="utf-8") as handle:
            lines = {line.split("=", 1)[0]: line.strip().split("=", 1)[1] for line in handle
                     if "=" in line and not line.startswith("#")}
        self.assertEqual(lines["ExecStart"], "/usr/bin/twistd3 --nodaemon --pidfile= appliance --config "
                                             "/etc/dicom-appliance/appliance.toml")
        self.assertEqual((lines["User"], lines["AmbientCapabilities"]), ("dicom-appliance", "CAP_NET_BIND_SERVICE"))
        for key, value in (("ProtectSystem", "strict"), ("ReadWritePaths", "/var/lib/dicom-appliance"),
                           ("NoNewPrivileges", "yes"), ("PrivateTmp", "yes"), ("ProtectHome", "yes"),
                           ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"), ("Restart", "on-failure")):
            self.assertEqual(lines[key], value, key)
        self.assertIn("kill -HUP", lines["ExecReload"])

    def test_console_scripts_and_man_pages(self):
        parser = configparser.ConfigParser()
        parser.read(os.path.join(ROOT, "setup.cfg"))
        scripts = {line.split("=")[0].strip() for line in parser["options.entry_points"]["console_scripts"].splitlines()
                   if line.strip()}
        self.assertEqual(scripts, {"appliance-echo", "appliance-archive", "appliance-passwd"})
        with open(os.path.join(ROOT, "debian", "dicom-appliance.manpages"), encoding="utf-8") as handle:
            pages = {os.path.basename(line.strip())[:-2] for line in handle if line.strip()}
        self.assertEqual(pages, scripts)
