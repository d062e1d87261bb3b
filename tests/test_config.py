"""appliance.config: the shipped file, defaults, relative paths, and one error per kind of mistake.

Every error must be a ConfigError whose message names the file, the
``[section] key`` and the problem.
"""

from __future__ import annotations

import os

from twisted.trial import unittest

from appliance import config as configuration
from appliance.config import ConfigError
from appliance.dicom.uids import DEFAULT_TRANSFER_SYNTAX_PRIORITY, IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

from .support import SHIPPED_CONFIG, write_file


class ShippedConfigTests(unittest.SynchronousTestCase):
    """The configuration in etc/appliance.toml."""

    def test_loads(self):
        """The shipped file loads, with the AE titles, ports and devices it documents."""
        config = configuration.load(SHIPPED_CONFIG)
        self.assertEqual(config.path, SHIPPED_CONFIG)
        self.assertEqual(config.ae_title, "APPLIANCE")
        self.assertEqual((config.disk_server.ae_title, config.disk_server.port), ("DISK_SERVER", 11112))
        self.assertEqual((config.memory_server.ae_title, config.memory_server.port), ("MEMORY_SERVER", 11113))
        self.assertEqual(config.disk_server.interface, "0.0.0.0")
        self.assertEqual(config.disk_server.allowed_calling_aets, ())
        self.assertEqual(sorted(config.devices), ["disk_server", "memory_server"])
        self.assertEqual(config.device("memory_server").port, 11113)

    def test_data_dir_relative_to_file(self):
        """The shipped data_dir '../var' is the checkout's var folder, whatever the working directory."""
        config = configuration.load(SHIPPED_CONFIG)
        expected = os.path.normpath(os.path.join(os.path.dirname(SHIPPED_CONFIG), "..", "var"))
        self.assertEqual(config.data_dir, expected)


class DefaultsTests(unittest.SynchronousTestCase):
    """What an empty or sparse file means."""

    def test_empty_file(self):
        """An empty file gives the documented defaults for every setting."""
        path = write_file(self, "")
        config = configuration.load(path)
        self.assertEqual(config.ae_title, "APPLIANCE")
        self.assertEqual(config.implementation_class_uid, IMPLEMENTATION_CLASS_UID)
        self.assertEqual(config.implementation_version_name, IMPLEMENTATION_VERSION_NAME)
        self.assertEqual(config.data_dir, os.path.join(os.path.dirname(os.path.abspath(path)), "var"))
        self.assertEqual(dict(config.devices), {})
        disk, memory = config.disk_server, config.memory_server
        self.assertEqual((disk.ae_title, disk.port), ("DISK_SERVER", 11112))
        self.assertEqual((memory.ae_title, memory.port), ("MEMORY_SERVER", 11113))
        self.assertEqual((disk.max_pdu, memory.max_pdu), (16384, 1 << 20))  # the statement's 16K; configurable
        for listener in (disk, memory):
            self.assertEqual(listener.interface, "0.0.0.0")
            self.assertEqual(listener.max_associations, 64)
            self.assertEqual(listener.timeout, 30.0)
            self.assertEqual(listener.artim_timeout, 30.0)
            self.assertEqual(listener.idle_timeout, 300.0)
            self.assertEqual(listener.allowed_calling_aets, ())
            self.assertEqual(listener.transfer_syntax_priority, DEFAULT_TRANSFER_SYNTAX_PRIORITY)

    def test_timeouts_follow_timeout(self):
        """The ARTIM timeout defaults to the listener's timeout; idle to at least 300 s."""
        config = configuration.load(write_file(self, "[disk_server]\ntimeout = 5\n[memory_server]\ntimeout = 600\n"))
        self.assertEqual((config.disk_server.artim_timeout, config.disk_server.idle_timeout), (5.0, 300.0))
        self.assertEqual(config.memory_server.idle_timeout, 600.0)

    def test_device_defaults(self):
        """A device needs ae_title, host and port; max_pdu and timeout default to 16384 and 30 s."""
        config = configuration.load(
            write_file(self, '[devices.pacs]\nae_title = "PACS"\nhost = "pacs.example"\nport = 104\n')
        )
        device = config.device("pacs")
        self.assertEqual(
            (device.name, device.ae_title, device.host, device.port, device.max_pdu, device.timeout),
            ("pacs", "PACS", "pacs.example", 104, 16384, 30.0),
        )

    def test_unknown_device(self):
        """Asking for a device not configured raises KeyError naming it, the file and the known devices."""
        path = write_file(self, '[devices.pacs]\nae_title = "PACS"\nhost = "h"\nport = 104\n')
        config = configuration.load(path)
        with self.assertRaises(KeyError) as caught:
            config.device("nope")
        message = caught.exception.args[0]
        self.assertIn("'nope'", message)
        self.assertIn(path, message)
        self.assertIn("configured devices: pacs", message)

    def test_boundaries_accepted(self):
        """The limits themselves are valid: max_pdu 2048, port 65535, a 16-character AE title."""
        config = configuration.load(
            write_file(self, '[disk_server]\nmax_pdu = 2048\nport = 65535\nae_title = "ABCDEFGHIJKLMNOP"\n')
        )
        self.assertEqual(
            (config.disk_server.max_pdu, config.disk_server.port, config.disk_server.ae_title),
            (2048, 65535, "ABCDEFGHIJKLMNOP"),
        )

    def test_port_zero_disables(self):
        """Port 0 is valid for a listener (it disables it), and both may be 0 without conflicting."""
        config = configuration.load(write_file(self, "[disk_server]\nport = 0\n[memory_server]\nport = 0\n"))
        self.assertEqual((config.disk_server.port, config.memory_server.port), (0, 0))


class DataDirTests(unittest.SynchronousTestCase):
    """data_dir: relative paths resolve against the configuration file's folder."""

    def test_relative(self):
        """A relative data_dir is joined to the file's folder, not to the working directory."""
        path = write_file(self, '[appliance]\ndata_dir = "x"\n')
        config = configuration.load(path)
        self.assertEqual(config.data_dir, os.path.join(os.path.dirname(os.path.abspath(path)), "x"))

    def test_relative_with_parent(self):
        """'../store' names a sibling of the file's folder."""
        path = write_file(self, '[appliance]\ndata_dir = "../store"\n')
        folder = os.path.dirname(os.path.abspath(path))
        self.assertEqual(configuration.load(path).data_dir, os.path.join(os.path.dirname(folder), "store"))

    def test_relative_path_to_file(self):
        """Loading through a relative path to the file still anchors data_dir at the file's folder."""
        path = write_file(self, '[appliance]\ndata_dir = "d"\n')
        relative = os.path.relpath(path)
        config = configuration.load(relative)
        self.assertEqual(config.data_dir, os.path.join(os.path.dirname(os.path.abspath(path)), "d"))

    def test_absolute(self):
        """An absolute data_dir is used as it is."""
        path = write_file(self, '[appliance]\ndata_dir = "/srv/appliance"\n')
        self.assertEqual(configuration.load(path).data_dir, "/srv/appliance")


class ErrorTests(unittest.SynchronousTestCase):
    """Each mistake gives a ConfigError naming the file, the [section] key and the problem."""

    def assertConfigError(self, text: str, key: str, *problem: str) -> ConfigError:
        path = write_file(self, text)
        with self.assertRaises(ConfigError) as caught:
            configuration.load(path)
        error = caught.exception
        message = str(error)
        self.assertTrue(message.startswith(f"{path}: "), message)
        self.assertIn(f": {key}: ", message)
        self.assertEqual((error.path, error.key), (path, key))
        for words in problem:
            self.assertIn(words, message)
        return error

    def test_unknown_section(self):
        """A misspelt section is an error listing the known sections."""
        error = self.assertConfigError("[disk_servr]\nport = 1\n", "[disk_servr]", "unknown section")
        self.assertIn("disk_server", error.problem)

    def test_unknown_key(self):
        """A misspelt key is an error listing the section's known keys."""
        error = self.assertConfigError("[disk_server]\nprot = 104\n", "[disk_server] prot", "unknown key")
        self.assertIn("port", error.problem)

    def test_listener_dimse_timeout_refused(self):
        """dimse_timeout in a listener's section (documented once, never read) is an error saying where the wait
        it meant is set, in both listening AEs' sections."""
        for section in ("disk_server", "memory_server"):
            self.assertConfigError(f"[{section}]\ndimse_timeout = 60\n", f"[{section}] dimse_timeout",
                                   "is not a setting of a listening AE", "[devices.NAME] timeout")

    def test_unknown_key_in_appliance(self):
        """Unknown keys of [appliance] are errors too."""
        self.assertConfigError('[appliance]\ndatadir = "x"\n', "[appliance] datadir", "unknown key")

    def test_log_level(self):
        """log_level is one of the appliance's level names."""
        self.assertConfigError('[appliance]\nlog_level = "verbose"\n', "[appliance] log_level", "must be one of",
                               "'debug'")

    def test_unknown_key_in_device(self):
        """Unknown keys of a [devices.NAME] table name that table."""
        self.assertConfigError(
            '[devices.pacs]\nae_title = "P"\nhost = "h"\nport = 1\naet = "P"\n', "[devices.pacs] aet", "unknown key"
        )

    def test_string_for_port(self):
        """A string where an integer belongs is an error quoting the value."""
        self.assertConfigError('[disk_server]\nport = "104"\n', "[disk_server] port", "must be an integer", "'104'")

    def test_bool_for_int(self):
        """true is not an integer, although Python's bool is an int."""
        self.assertConfigError(
            "[memory_server]\nmax_associations = true\n", "[memory_server] max_associations", "must be an integer", "True"
        )

    def test_float_for_int(self):
        """A float is not an integer."""
        self.assertConfigError("[disk_server]\nmax_pdu = 16384.0\n", "[disk_server] max_pdu", "must be an integer")

    def test_port_too_high(self):
        """Port 65536 is out of range."""
        self.assertConfigError("[disk_server]\nport = 65536\n", "[disk_server] port", "from 0 to 65535", "65536")

    def test_port_negative(self):
        """A negative port is out of range."""
        self.assertConfigError("[memory_server]\nport = -1\n", "[memory_server] port", "from 0 to 65535", "-1")

    def test_device_port_zero(self):
        """A device's port must be a real port: 0 is out of range there."""
        self.assertConfigError(
            '[devices.pacs]\nae_title = "P"\nhost = "h"\nport = 0\n', "[devices.pacs] port", "from 1 to 65535"
        )

    def test_ae_title_too_long(self):
        """A 17-character AE title is refused."""
        self.assertConfigError(
            '[disk_server]\nae_title = "ABCDEFGHIJKLMNOPQ"\n', "[disk_server] ae_title", "1 to 16 characters"
        )

    def test_ae_title_empty(self):
        """An empty AE title is refused."""
        self.assertConfigError('[memory_server]\nae_title = ""\n', "[memory_server] ae_title", "1 to 16 characters")

    def test_ae_title_backslash(self):
        """A backslash (the DICOM value separator) is refused in an AE title."""
        self.assertConfigError(
            '[disk_server]\nae_title = "DISK\\\\SERVER"\n', "[disk_server] ae_title", "other than backslash"
        )

    def test_ae_title_control_character(self):
        """A control character (here a tab) is refused in an AE title."""
        self.assertConfigError('[appliance]\nae_title = "APP\\tX"\n', "[appliance] ae_title", "printable ISO 646")

    def test_ae_title_non_ascii(self):
        """A character outside ISO 646 is refused in an AE title."""
        self.assertConfigError('[appliance]\nae_title = "APPLIANCÉ"\n', "[appliance] ae_title", "printable ISO 646")

    def test_ae_title_leading_space(self):
        """A leading space is refused: DICOM ignores it, so the title would not match."""
        self.assertConfigError('[disk_server]\nae_title = " DISK"\n', "[disk_server] ae_title", "leading or trailing")

    def test_ae_title_not_string(self):
        """A number is not an AE title."""
        self.assertConfigError("[disk_server]\nae_title = 5\n", "[disk_server] ae_title", "must be a string")

    def test_bad_allowed_calling_aet(self):
        """Each entry of allowed_calling_aets is checked as an AE title."""
        self.assertConfigError(
            '[disk_server]\nallowed_calling_aets = ["OK", "ABCDEFGHIJKLMNOPQ"]\n',
            "[disk_server] allowed_calling_aets",
            "1 to 16 characters",
        )

    def test_allowed_calling_aets_not_list(self):
        """allowed_calling_aets must be a list, not a single string."""
        self.assertConfigError(
            '[disk_server]\nallowed_calling_aets = "OK"\n', "[disk_server] allowed_calling_aets", "must be a list"
        )

    def test_device_bad_ae_title(self):
        """A device's AE title is checked too."""
        self.assertConfigError(
            '[devices.pacs]\nae_title = "A\\\\B"\nhost = "h"\nport = 104\n', "[devices.pacs] ae_title", "backslash"
        )

    def test_max_pdu_under_2048(self):
        """max_pdu 2047 is under the minimum of 2048."""
        self.assertConfigError("[disk_server]\nmax_pdu = 2047\n", "[disk_server] max_pdu", "from 2048", "2047")

    def test_device_max_pdu_under_2048(self):
        """A device's max_pdu has the same minimum."""
        self.assertConfigError(
            '[devices.pacs]\nae_title = "P"\nhost = "h"\nport = 104\nmax_pdu = 1024\n',
            "[devices.pacs] max_pdu",
            "from 2048",
        )

    def test_bad_uid_leading_zero(self):
        """A UID component with a leading zero is invalid."""
        self.assertConfigError(
            '[appliance]\nimplementation_class_uid = "1.2.03.4"\n',
            "[appliance] implementation_class_uid",
            "'1.2.03.4' is not a valid UID",
        )

    def test_bad_uid_letters(self):
        """A UID with letters is invalid."""
        self.assertConfigError(
            '[appliance]\nimplementation_class_uid = "1.2.abc"\n', "[appliance] implementation_class_uid", "not a valid UID"
        )

    def test_bad_uid_too_long(self):
        """A UID of 65 characters is invalid."""
        uid = "1." + "2" * 63
        self.assertEqual(len(uid), 65)
        self.assertConfigError(
            f'[appliance]\nimplementation_class_uid = "{uid}"\n', "[appliance] implementation_class_uid", "not a valid UID"
        )

    def test_bad_uid_empty_component(self):
        """A UID with an empty component ('1..2') or a trailing dot is invalid."""
        self.assertConfigError(
            '[appliance]\nimplementation_class_uid = "1..2"\n', "[appliance] implementation_class_uid", "not a valid UID"
        )

    def test_bad_transfer_syntax_uid(self):
        """Every UID of transfer_syntax_priority is checked."""
        self.assertConfigError(
            '[disk_server]\ntransfer_syntax_priority = ["1.2.840.10008.1.2", "big-endian"]\n',
            "[disk_server] transfer_syntax_priority",
            "'big-endian' is not a valid UID",
        )

    def test_empty_transfer_syntax_priority(self):
        """An empty transfer_syntax_priority is refused."""
        self.assertConfigError(
            "[disk_server]\ntransfer_syntax_priority = []\n", "[disk_server] transfer_syntax_priority", "must not be empty"
        )

    def test_version_name_too_long(self):
        """implementation_version_name holds at most 16 characters."""
        self.assertConfigError(
            '[appliance]\nimplementation_version_name = "ABCDEFGHIJKLMNOPQ"\n',
            "[appliance] implementation_version_name",
            "1 to 16",
        )

    def test_device_missing_host(self):
        """A device without host names the missing key."""
        self.assertConfigError('[devices.pacs]\nae_title = "PACS"\nport = 104\n', "[devices.pacs] host", "is required")

    def test_device_missing_port(self):
        """A device without port names the missing key."""
        self.assertConfigError('[devices.pacs]\nae_title = "PACS"\nhost = "h"\n', "[devices.pacs] port", "is required")

    def test_device_missing_ae_title(self):
        """A device without ae_title names the missing key."""
        self.assertConfigError('[devices.pacs]\nhost = "h"\nport = 104\n', "[devices.pacs] ae_title", "is required")

    def test_devices_not_tables(self):
        """devices must be a table of tables."""
        self.assertConfigError('devices = "pacs"\n', "[devices]", "must be a table")

    def test_device_not_table(self):
        """Each devices.NAME must be a table."""
        self.assertConfigError("[devices]\npacs = 104\n", "[devices.pacs]", "must be a table")

    def test_section_not_table(self):
        """A listener section given as a value is refused."""
        self.assertConfigError("disk_server = 11112\n", "[disk_server]", "must be a table")

    def test_timeout_zero(self):
        """A timeout must be above 0."""
        self.assertConfigError("[disk_server]\ntimeout = 0\n", "[disk_server] timeout", "above 0")

    def test_timeout_bool(self):
        """true is not a number of seconds."""
        self.assertConfigError("[devices.p]\nae_title='P'\nhost='h'\nport=1\ntimeout = true\n", "[devices.p] timeout", "seconds")

    def test_empty_host(self):
        """A blank host is refused."""
        self.assertConfigError('[devices.pacs]\nae_title = "P"\nhost = " "\nport = 104\n', "[devices.pacs] host", "non-empty")

    def test_same_port_both_listeners(self):
        """The Memory-Server may not take the Disk-Server's port on the same interface."""
        self.assertConfigError(
            "[disk_server]\nport = 4242\n[memory_server]\nport = 4242\n",
            "[memory_server] port",
            "4242 is the Disk-Server's port too",
        )

    def test_same_port_wildcard_and_address(self):
        """The same port on 0.0.0.0 and on 127.0.0.1 conflicts too: the wildcard covers every address."""
        self.assertConfigError(
            '[disk_server]\nport = 4242\n[memory_server]\nport = 4242\ninterface = "127.0.0.1"\n',
            "[memory_server] port",
            "4242 is the Disk-Server's port too",
        )

    def test_same_port_ipv6_wildcard_and_ipv4(self):
        """'::' takes IPv4 connections too (dual stack), so it conflicts with an IPv4 address on the same port."""
        self.assertConfigError(
            '[disk_server]\nport = 4242\ninterface = "::"\n[memory_server]\nport = 4242\ninterface = "127.0.0.1"\n',
            "[memory_server] port",
            "4242 is the Disk-Server's port too",
        )

    def test_same_port_two_addresses_allowed(self):
        """The same port on two specific addresses is no conflict."""
        config = configuration.load(
            write_file(
                self,
                '[disk_server]\nport = 4242\ninterface = "127.0.0.1"\n'
                '[memory_server]\nport = 4242\ninterface = "127.0.0.2"\n',
            )
        )
        self.assertEqual((config.disk_server.port, config.memory_server.port), (4242, 4242))

    def test_same_port_ipv4_wildcard_and_ipv6_address(self):
        """0.0.0.0 covers IPv4 only, so the same port on ::1 is no conflict."""
        config = configuration.load(
            write_file(self, '[disk_server]\nport = 4242\n[memory_server]\nport = 4242\ninterface = "::1"\n')
        )
        self.assertEqual((config.disk_server.interface, config.memory_server.interface), ("0.0.0.0", "::1"))


class FileErrorTests(unittest.SynchronousTestCase):
    """Errors about the file itself, before any key is read."""

    def test_invalid_toml(self):
        """Broken TOML is an error naming the file and saying it is not valid TOML, with the parser's reason."""
        path = write_file(self, "[disk_server\nport = 1\n")
        with self.assertRaises(ConfigError) as caught:
            configuration.load(path)
        message = str(caught.exception)
        self.assertTrue(message.startswith(f"{path}: not valid TOML: "), message)
        self.assertIn("line 1", message)

    def test_duplicate_key(self):
        """A key given twice is invalid TOML."""
        path = write_file(self, "[disk_server]\nport = 1\nport = 2\n")
        with self.assertRaises(ConfigError) as caught:
            configuration.load(path)
        self.assertIn("not valid TOML", str(caught.exception))

    def test_missing_file(self):
        """A file that does not exist is an error naming it."""
        path = os.path.join(self.mktemp(), "absent.toml")
        with self.assertRaises(ConfigError) as caught:
            configuration.load(path)
        self.assertEqual(str(caught.exception), f"{path}: no such file")

    def test_directory(self):
        """A directory given as the file is an error naming it."""
        folder = self.mktemp()
        os.makedirs(folder)
        with self.assertRaises(ConfigError) as caught:
            configuration.load(folder)
        self.assertEqual(str(caught.exception), f"{folder}: is a directory, not a configuration file")

    def test_parse_names_given_path(self):
        """parse() reports the path it was given, for documents that did not come from load()."""
        with self.assertRaises(ConfigError) as caught:
            configuration.parse({"disk_server": {"port": "x"}}, "/srv/appliance/appliance.toml")
        self.assertTrue(str(caught.exception).startswith("/srv/appliance/appliance.toml: [disk_server] port: "))


class LogLevelTests(unittest.SynchronousTestCase):
    """[appliance] log_level: info by default; the appliance's debug events pass only when asked for."""

    def test_default_and_debug(self):
        self.assertEqual(configuration.parse({}, "/nowhere/appliance.toml").log_level, "info")
        self.assertEqual(configuration.parse({"appliance": {"log_level": "debug"}}, "/x.toml").log_level, "debug")

    def test_filter(self):
        from twisted.logger import globalLogPublisher

        from appliance import logs

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.addCleanup(logs.set_level, "info")
        log = logs.logger("appliance.test")
        log.debug("hidden at info")
        log.info("shown at info")
        logs.set_level("debug")
        log.debug("shown at debug")
        logs.set_level("error")
        log.warn("hidden at error")
        self.assertEqual([event["log_format"] for event in events if event.get("log_namespace") == "appliance.test"],
                         ["shown at info", "shown at debug"])
