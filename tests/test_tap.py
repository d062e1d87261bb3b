"""appliance.tap and the twistd plugin: options, service composition, ports checked before binding."""

from __future__ import annotations

import os
import socket
import sys

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IServiceMaker, MultiService
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial import unittest

from appliance import config as configuration
from appliance import tap
from appliance.net.protocol import AcceptorFactory

from .support import ROOT, deferred_test, free_port, run_python, write_file

#: twistd as a module: ``python -m twisted`` is ``twist``, not twistd, on every Twisted version.
TWISTD = ["-c", "from twisted.scripts.twistd import run; run()"]


def _listener_config(disk_port: int, memory_port: int, extra: str = "") -> str:
    return (
        f'[disk_server]\ninterface = "127.0.0.1"\nport = {disk_port}\n'
        f'[memory_server]\ninterface = "127.0.0.1"\nport = {memory_port}\n[web]\nport = 0\n' + extra
    )


class OptionsTests(unittest.SynchronousTestCase):
    """tap.Options: --config loads and validates the file."""

    def test_config_loaded(self):
        """--config PATH gives the parsed configuration under 'appliance'."""
        path = write_file(self, '[appliance]\nae_title = "ME"\n[disk_server]\nport = 4104\n')
        options = tap.Options()
        options.parseOptions(["--config", path])
        config = options["appliance"]
        self.assertIsInstance(config, configuration.ApplianceConfig)
        self.assertEqual((config.path, config.ae_title, config.disk_server.port), (path, "ME", 4104))

    def test_short_option(self):
        """-c is --config."""
        path = write_file(self, "[memory_server]\nport = 4105\n")
        options = tap.Options()
        options.parseOptions(["-c", path])
        self.assertEqual(options["appliance"].memory_server.port, 4105)

    def test_default_config(self):
        """Without --config the shipped (default) configuration is loaded."""
        options = tap.Options()
        options.parseOptions([])
        self.assertEqual(options["config"], configuration.DEFAULT_CONFIG_PATH)
        self.assertEqual(options["appliance"].path, configuration.DEFAULT_CONFIG_PATH)

    def test_bad_config(self):
        """A bad value is a UsageError naming the file, the [section] key and the problem."""
        path = write_file(self, "[disk_server]\nport = 70000\n")
        with self.assertRaises(usage.UsageError) as caught:
            tap.Options().parseOptions(["--config", path])
        self.assertEqual(str(caught.exception), f"{path}: [disk_server] port: must be from 0 to 65535, not 70000")

    def test_unknown_key(self):
        """An unknown key is a UsageError naming it."""
        path = write_file(self, '[memory_server]\naetitle = "X"\n')
        with self.assertRaises(usage.UsageError) as caught:
            tap.Options().parseOptions(["--config", path])
        self.assertIn(f"{path}: [memory_server] aetitle: unknown key", str(caught.exception))

    def test_missing_file(self):
        """A missing file is a UsageError naming it."""
        path = os.path.join(self.mktemp(), "nowhere.toml")
        with self.assertRaises(usage.UsageError) as caught:
            tap.Options().parseOptions(["--config", path])
        self.assertEqual(str(caught.exception), f"{path}: no such file")


def _listeners(root: MultiService) -> dict:
    """The root's listening children by name (it may hold other services too: thread pools, archive)."""
    return {service.name: service for service in root if isinstance(service, StreamServerEndpointService)}


class MakeServiceTests(unittest.SynchronousTestCase):
    """tap.makeService: one named child service per enabled listener, ports checked first."""

    def options_for(self, text: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions(["--config", write_file(self, text)])
        return options

    def unchecked_options_for(self, text: str) -> tap.Options:
        """Options as if the ports were free when they were parsed (makeService checks them again)."""
        options = tap.Options()
        options["config"] = write_file(self, text)
        options["appliance"] = configuration.load(options["config"])
        return options

    def make_service(self, options: tap.Options, reactor) -> MultiService:
        """makeService, with whatever it opened (an archive index) closed after the test."""
        root = tap.makeService(options, reactor)

        def close_archive():
            for service in root:
                archive = getattr(service, "archive", None)
                if archive is not None:
                    archive.close()

        self.addCleanup(close_archive)
        return root

    def test_both_listeners(self):
        """Both listeners become named StreamServerEndpointService children of a MultiService."""
        disk_port, memory_port = free_port(), free_port()
        reactor = MemoryReactorClock()
        root = self.make_service(self.options_for(_listener_config(disk_port, memory_port)), reactor)
        self.assertIsInstance(root, MultiService)
        self.assertEqual(sorted(_listeners(root)), ["disk_server", "memory_server"])
        self.assertIsInstance(root.getServiceNamed("disk_server"), StreamServerEndpointService)
        self.assertIsInstance(root.getServiceNamed("memory_server"), StreamServerEndpointService)
        self.assertEqual(reactor.tcpServers, [], "makeService must not listen; startService does")

    def test_start_listens_as_configured(self):
        """Starting the listener services listens on each configured port and interface with the AE's factory."""
        disk_port, memory_port = free_port(), free_port()
        reactor = MemoryReactorClock()
        root = self.make_service(self.options_for(_listener_config(disk_port, memory_port)), reactor)
        for service in _listeners(root).values():
            service.startService()
            self.addCleanup(service.stopService)
        listening = {(port, interface): factory for port, factory, backlog, interface in reactor.tcpServers}
        self.assertEqual(sorted(listening), sorted([(disk_port, "127.0.0.1"), (memory_port, "127.0.0.1")]))
        disk_factory = listening[(disk_port, "127.0.0.1")]
        memory_factory = listening[(memory_port, "127.0.0.1")]
        self.assertIsInstance(disk_factory, AcceptorFactory)
        self.assertEqual(disk_factory.policy.ae_title, "DISK_SERVER")
        self.assertEqual(memory_factory.policy.ae_title, "MEMORY_SERVER")
        # the Memory-Server stores: C-ECHO and every storage class, into the memory store of [memory_server]
        self.assertIn("1.2.840.10008.1.1", memory_factory.policy.abstract_syntaxes)
        self.assertIn("1.2.840.10008.5.1.4.1.1.2", memory_factory.policy.abstract_syntaxes)
        self.assertNotIn("1.2.840.10008.5.1.4.1.2.2.1", memory_factory.policy.abstract_syntaxes)
        memory = root.getServiceNamed("memory").store
        self.assertEqual((memory.limit, memory.retention), (1 << 30, None))

    def test_port_zero_omits_listener(self):
        """A listener with port = 0 gets no service at all."""
        disk_port = free_port()
        root = self.make_service(self.options_for(_listener_config(disk_port, 0)), MemoryReactorClock())
        self.assertEqual(list(_listeners(root)), ["disk_server"])
        self.assertRaises(KeyError, root.getServiceNamed, "memory_server")

    def test_both_disabled(self):
        """With both ports 0 the MultiService has no listening child."""
        root = self.make_service(self.options_for(_listener_config(0, 0)), MemoryReactorClock())
        self.assertEqual(_listeners(root), {})

    def test_port_in_use(self):
        """A port already bound makes makeService raise a UsageError naming '[disk_server] port' and
        'already in use', before anything is listened on."""
        busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        busy_port = busy.getsockname()[1]
        options = self.unchecked_options_for(_listener_config(busy_port, free_port()))
        reactor = MemoryReactorClock()
        with self.assertRaises(usage.UsageError) as caught:
            tap.makeService(options, reactor)
        message = str(caught.exception)
        self.assertEqual(
            message, f"{options['config']}: [disk_server] port: 127.0.0.1:{busy_port} is already in use"
        )
        self.assertEqual(reactor.tcpServers, [])

    def test_memory_port_in_use(self):
        """The Memory-Server's port is checked the same way, and named as its own key."""
        busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        options = self.unchecked_options_for(_listener_config(free_port(), busy.getsockname()[1]))
        with self.assertRaises(usage.UsageError) as caught:
            tap.makeService(options, MemoryReactorClock())
        self.assertIn("[memory_server] port", str(caught.exception))
        self.assertIn("already in use", str(caught.exception))

    def test_interface_not_local(self):
        """An interface that is no address of this machine is named as '[disk_server] interface'."""
        # 192.0.2.0/24 is TEST-NET-1 (RFC 5737): never assigned to a host
        options = self.unchecked_options_for(
            f'[disk_server]\ninterface = "192.0.2.1"\nport = {free_port()}\n[memory_server]\nport = 0\n'
        )
        with self.assertRaises(usage.UsageError) as caught:
            tap.makeService(options, MemoryReactorClock())
        self.assertIn(f"{options['config']}: [disk_server] interface: ", str(caught.exception))
        self.assertIn("192.0.2.1", str(caught.exception))


class PluginTests(unittest.SynchronousTestCase):
    """The twistd plugin in twisted/plugins/appliance_plugin.py."""

    def test_discoverable(self):
        """getPlugins(IServiceMaker) finds tapname 'appliance', wired to appliance.tap."""
        self.assertIn(ROOT, [os.path.abspath(entry or os.curdir) for entry in sys.path])
        makers = {maker.tapname: maker for maker in getPlugins(IServiceMaker)}
        self.assertIn("appliance", makers)
        maker = makers["appliance"]
        self.assertIs(maker.options, tap.Options)
        self.assertIs(maker.makeService, tap.makeService)


class TwistdTests(unittest.TestCase):
    """twistd itself, as a subprocess of this interpreter."""

    timeout = 60

    @deferred_test
    async def test_plugin_found_through_pythonpath(self):
        """A fresh interpreter run elsewhere, with only PYTHONPATH pointing at the checkout, finds 'appliance'."""
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        script = (
            "from twisted.plugin import getPlugins\n"
            "from twisted.application.service import IServiceMaker\n"
            "print(' '.join(sorted(maker.tapname + '=' + maker.module for maker in getPlugins(IServiceMaker))))\n"
        )
        out, err, code = await run_python(["-c", script], path=folder)
        self.assertEqual(code, 0, err)
        self.assertIn("appliance=appliance.tap", out.split())

    @deferred_test
    async def test_twistd_bad_config(self):
        """`twistd -n appliance --config BAD` stops with the file, key and problem in its output
        (and, where Twisted's twistd reports usage errors by status, a non-zero exit)."""
        path = write_file(self, "[disk_server]\nport = 70000\n")
        out, err, code = await run_python(TWISTD + ["-n", "--pidfile=", "appliance", "--config", path],
                                          path=os.path.dirname(path))
        output = out + err
        self.assertEqual(err.strip(), f"appliance: {path}: [disk_server] port: must be from 0 to 65535, not 70000")
        self.assertNotIn("Traceback", output)
        self.assertFalse(os.path.exists(os.path.join(os.path.dirname(path), "twistd.pid")))
        self.assertEqual(code, 1, output)

    @deferred_test
    async def test_twistd_port_in_use(self):
        """`twistd -n appliance` with a port in use stops with status 1 and one line naming the file and key."""
        busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        path = write_file(self, _listener_config(port, free_port()))
        out, err, code = await run_python(TWISTD + ["-n", "--pidfile=", "appliance", "--config", path],
                                          path=os.path.dirname(path))
        output = out + err
        self.assertEqual(err.strip(), f"appliance: {path}: [disk_server] port: 127.0.0.1:{port} is already in use")
        self.assertEqual(code, 1, output)

    @deferred_test
    async def test_twist_bad_config(self):
        """`python -m twisted appliance --config BAD` (twist) exits 1 with one line naming file and key."""
        path = write_file(self, '[memory_server]\nae_title = "ABCDEFGHIJKLMNOPQ"\n')
        out, err, code = await run_python(["-m", "twisted", "appliance", "--config", path],
                                          path=os.path.dirname(path))
        output = out + err
        self.assertEqual(code, 1, output)
        self.assertNotIn("Traceback", output)
        self.assertIn(f"{path}: [memory_server] ae_title: AE title 'ABCDEFGHIJKLMNOPQ' must be 1 to 16 characters",
                      output)


class ArchiveServiceTests(unittest.SynchronousTestCase):
    """The archive's index is closed on its own thread after the jobs queued before, never beside one."""

    def test_close_queued_behind_the_index_jobs(self):
        from twisted.internet import defer

        jobs = []
        reconciling = defer.Deferred()

        class Archive:
            def reconcile(self):
                return reconciling

            def db(self, function, *args):
                jobs.append(function)
                return defer.Deferred()

            def close(self):
                raise AssertionError("closed outside the index's thread")

            index = type("Index", (), {"total_size": lambda self: 0})()

        archive = Archive()
        service = tap.ArchiveService(archive)
        service.startService()
        service.stopService()
        self.assertEqual(jobs, [archive.close], "the close is a job of the index's thread")
        reconciling.callback(type("Result", (), {})())
        self.assertEqual(jobs, [archive.close], "a check ending after the stop queues nothing more")


class InstalledSystemTests(unittest.SynchronousTestCase):
    """What an installed appliance needs: its configuration where the package puts it, data outside /etc and
    /usr, and its data directory used only by its owner."""

    def test_default_configuration_path(self):
        self.assertEqual(configuration.default_config_path({"APPLIANCE_CONFIG": "/tmp/x.toml"}), "/tmp/x.toml")
        self.assertEqual(configuration.default_config_path({}), os.path.join(ROOT, "etc", "appliance.toml"),
                         "in a checkout: its own etc/appliance.toml")
        self.assertEqual(configuration.INSTALLED_CONFIG_PATH, "/etc/dicom-appliance/appliance.toml")

    def test_data_under_etc_or_usr_refused(self):
        for tables, where in (({"appliance": {"data_dir": "../var"}}, "/etc/var"),
                              ({"appliance": {"data_dir": "/usr/share/appliance"}}, "/usr/share/appliance"),
                              ({"appliance": {"data_dir": "/etc"}}, "/etc")):
            with self.assertRaises(configuration.ConfigError) as raised:
                configuration.parse(tables, "/etc/dicom-appliance/appliance.toml")
            self.assertEqual(raised.exception.key, "[appliance] data_dir")
            self.assertIn(where, str(raised.exception))
        config = configuration.parse({"appliance": {"data_dir": "/var/lib/dicom-appliance"}},
                                     "/etc/dicom-appliance/appliance.toml")
        self.assertEqual(config.data_dir, "/var/lib/dicom-appliance")
        self.assertEqual(configuration.parse({}, "/srv/x/appliance.toml").data_dir, "/srv/x/var")

    def test_data_directory_of_another_user_refused(self):
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        self.assertIsNone(tap.data_owner_problem(folder))
        self.assertIsNone(tap.data_owner_problem(os.path.join(folder, "not yet")))
        owner = os.stat(folder).st_uid
        problem = tap.data_owner_problem(folder, euid=owner + 4242)
        self.assertIn(f"uid {owner}", problem)
        self.assertIn(f"uid {owner + 4242}", problem)
        self.assertIn("twistd --uid switches user only after the archive is opened", problem)

    def test_makeservice_refuses_a_data_directory_of_another_user(self):
        if os.geteuid() != 0:
            raise unittest.SkipTest("giving a folder to another user needs root")
        root = os.path.abspath(self.mktemp())
        data = os.path.join(root, "var")
        os.makedirs(data)
        os.chown(data, 4242, 4242)
        path = write_file(self, f'[appliance]\ndata_dir = "{data}"\n[disk_server]\nport = 0\n[memory_server]\n'
                                f"port = 0\n[web]\nport = 0\n")
        options = tap.Options()
        options.parseOptions(["--config", path])
        with self.assertRaises(usage.UsageError) as raised:
            tap.makeService(options, MemoryReactorClock())
        self.assertIn("[appliance] data_dir", str(raised.exception))
        self.assertIn("uid 4242", str(raised.exception))
        self.assertEqual(os.listdir(data), [], "nothing was created in it")
