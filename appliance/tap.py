"""The composition root: ``twistd appliance --config PATH`` builds every enabled AE here.

Each listening AE has a plain port and a DICOM-over-TLS port (``tls_port``),
either of which may be off; both serve the same factory.  The TLS contexts are
built once from the configuration (every file read and checked before anything
is bound) and reloaded on SIGHUP by :class:`appliance.net.tls.TLSService`.
"""

from __future__ import annotations

import errno
import os
import socket
import sqlite3
import sys
import tempfile
from typing import Optional
from functools import partial
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.python import usage

from . import config as configuration
from . import logs
from .ae.listeners import acceptor_factory, disk_server_services, memory_server_services, memory_sink
from .archive.archive import SPARE_FILES, Archive
from .archive.helper import InstallHelper
from .dataset.deflate import InflateLimits
from .ae.manager import MemoryManager
from .ae.web_queries import WebQueries
from .memory.store import MemoryStore
from .net.requestor import MessageIds, connect_device
from .web.api import ApiResource
from .web.server import ApplianceSite
from .net import tls
from .net.threads import ThreadPoolService

__all__ = ["Options", "makeService", "check_ports"]


class Options(usage.Options):
    synopsis = "[--config PATH]"
    longdesc = "Run the appliance's DICOM Application Entities as configured in PATH (TOML)."
    optParameters = [
        ["config", "c", configuration.DEFAULT_CONFIG_PATH, "The configuration file."],
    ]

    def postOptions(self) -> None:
        """Load the configuration, check its ports and read its TLS files, before anything is bound.

        Under twistd or twist (``self.parent`` is their command line) a
        problem ends the process at once with one line on standard error and
        exit status 1: twistd 22.4 would otherwise print its whole usage text
        and exit 0 on a UsageError.  Called directly, it raises UsageError.
        """
        try:
            config = configuration.load(self["config"])
            check_ports(config)
            contexts = tls.TLSContexts(config)
        except configuration.ConfigError as error:
            startup_failed(self, str(error))
        self["appliance"] = config
        self["tls"] = contexts


def startup_failed(options, message: str):
    """Stop startup: under twistd or twist one line on standard error and status 1; called directly
    (tests, tools), a UsageError."""
    if getattr(options, "parent", None) is not None:
        sys.stderr.write(f"appliance: {message}\n")
        sys.stderr.flush()
        raise SystemExit(1)
    raise usage.UsageError(message)


def _not_writable(folder: str) -> str:
    """Why nothing can be written under ``folder`` (the nearest existing one), or ""."""
    while folder and not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    try:
        with tempfile.TemporaryFile(dir=folder or "."):
            return ""
    except OSError as error:
        return f"; {folder} is not writable: {error.strerror}"


def data_owner_problem(data_dir: str, euid: Optional[int] = None) -> Optional[str]:
    """Why the appliance may not use ``data_dir`` as the user it runs as (its owner must be that user), or None.

    twistd's ``--uid`` switches user only after makeService, where the archive's folders and index are created
    and opened: started as root for another user, everything would be created as root.  So the appliance runs
    as the data directory's owner from the start (the systemd unit's User=), and says so otherwise."""
    euid = os.geteuid() if euid is None else euid
    try:
        owner = os.stat(data_dir).st_uid
    except FileNotFoundError:
        return None  # created now, by whoever runs it
    except OSError as error:
        return f"cannot look at {data_dir}: {error.strerror}"
    if owner == euid:
        return None
    return (f"{data_dir} belongs to {_user_name(owner)} (uid {owner}) and the appliance runs as {_user_name(euid)} "
            f"(uid {euid}): run it as {_user_name(owner)} (the systemd unit does); twistd --uid switches user only "
            f"after the archive is opened, so its files would belong to {_user_name(euid)}")


def _user_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"user {uid}"


class ArchiveService(Service):
    """Reconciles the archive at start-up and closes its index at shutdown."""

    _log = logs.logger("appliance.archive")

    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self.setName("archive")

    def startService(self) -> None:
        super().startService()
        self.archive.reconcile().addCallbacks(self._reconciled, self._failed)

    def _reconciled(self, result) -> None:
        if not self.running:
            return None  # stopped during the check: the index is closed, or about to be
        # objects indexed again count toward the archive's size
        return self.archive.db(self.archive.index.total_size).addCallback(self._report, result)

    def _report(self, size: int, result) -> None:
        self.archive.size = size
        self.archive.prepare()  # after the check, which removes the temporary files it finds
        self.archive.start_helper()  # so does its own spare files
        self._log.info(
            "archive {root}: {size} bytes; start-up check removed {temps} unfinished temporary files, "
            "{stale} never-indexed files, {missing} rows without files; indexed {reindexed} whole objects "
            "again, quarantined {quarantined}",
            root=self.archive.root, size=self.archive.size, temps=len(result.temps), stale=len(result.stale),
            missing=len(result.missing), reindexed=len(result.reindexed), quarantined=len(result.quarantined),
        )

    def _failed(self, failure) -> None:
        self._log.failure("archive start-up check failed", failure)

    def stopService(self):
        super().stopService()
        # on the index's own thread, after the jobs queued before: never while one of them uses it (closing an
        # SQLite connection another thread is using can crash the process); the worker threads stop after this
        return self.archive.db(self.archive.close)


class MemoryService(Service):
    """Drops the memory store's studies past their retention while nothing arrives, and says what it holds."""

    _log = logs.logger("appliance.memory")

    def __init__(self, store: MemoryStore, clock, interval: float = 60.0) -> None:
        self.store = store
        self.clock = clock
        self.interval = interval
        self._call = None
        self.setName("memory")

    def startService(self) -> None:
        super().startService()
        retention = "none" if self.store.retention is None else f"{self.store.retention:g} s"
        self._log.info("memory store: memory_limit {limit} bytes, retention {retention}", limit=self.store.limit,
                       retention=retention)
        if self.store.retention is not None:
            self._call = self.clock.callLater(self._interval(), self._expire)

    def _interval(self) -> float:
        return min(self.interval, max(self.store.retention / 10, 1.0))

    def _expire(self) -> None:
        self.store.expire()
        self._call = self.clock.callLater(self._interval(), self._expire)

    def stopService(self):
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


def check_ports(config: configuration.ApplianceConfig) -> None:
    """Fail with the file and key of a listener whose port cannot be bound, before any is bound for real."""
    for section, port_key, interface, port in configuration.listening_ports(config.listeners, config.web):
        family = socket.AF_INET6 if ":" in interface else socket.AF_INET
        probe = socket.socket(family, socket.SOCK_STREAM)
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((interface, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                problem = f"{interface}:{port} is already in use"
            elif error.errno == errno.EACCES:
                problem = f"permission denied binding {interface}:{port} (ports below 1024 need root)"
            elif error.errno == errno.EADDRNOTAVAIL:
                problem = f"interface {interface} is not an address of this machine"
            else:
                problem = f"cannot bind {interface}:{port}: {error.strerror}"
            key = port_key if error.errno != errno.EADDRNOTAVAIL else "interface"
            raise configuration.ConfigError(config.path, f"[{section}] {key}", problem) from None
        except socket.gaierror as error:
            raise configuration.ConfigError(config.path, f"[{section}] interface", f"{interface!r}: {error}") from None
        finally:
            probe.close()


def makeService(options, reactor=None) -> MultiService:
    """Every enabled AE as a child service of one MultiService."""
    if reactor is None:
        from twisted.internet import reactor
    config: configuration.ApplianceConfig = options["appliance"]
    logs.set_level(config.log_level)
    try:
        check_ports(config)
        contexts = options.get("tls") or tls.TLSContexts(config)
    except configuration.ConfigError as error:
        startup_failed(options, str(error))
    root = MultiService()
    # children start in this order and stop in reverse: worker threads first up and last down
    io = ThreadPoolService(reactor, "archive-io", max_threads=4)
    db = ThreadPoolService(reactor, "archive-db", max_threads=1)
    read = ThreadPoolService(reactor, "archive-read", max_threads=2)  # C-FIND queries, read-only connections
    check = ThreadPoolService(reactor, "memory-check", max_threads=2)  # parsing objects received into memory
    web = ThreadPoolService(reactor, "web-work", max_threads=2)  # the web API's parsing and rendering
    for pool in (io, db, read, check, web):
        pool.setServiceParent(root)
    problem = data_owner_problem(config.data_dir)
    if problem is not None:
        startup_failed(options, f"{config.path}: [appliance] data_dir: {problem}")
    try:
        archive = Archive(config.archive.path, config.archive.limits, config.archive.on_duplicate, reactor,
                          io.runner, db.runner, InflateLimits(config.archive.max_object_size,
                                                              config.archive.max_inflation_ratio),
                          helper=InstallHelper(config.archive.path, config.archive.on_duplicate, SPARE_FILES))
    except (OSError, RuntimeError, sqlite3.Error) as error:
        startup_failed(options, f"{config.path}: [appliance] data_dir: cannot open the archive: {error}"
                                f"{_not_writable(config.archive.path)}")
    ArchiveService(archive).setServiceParent(root)
    if contexts.active:
        # before the listeners: its start-up lines (and warnings) come first
        tls.TLSService(contexts, reactor).setServiceParent(root)
    memory = MemoryStore(config.memory.memory_limit, reactor, config.memory.retention)
    MemoryService(memory, reactor).setServiceParent(root)
    manager = MemoryManager(config, memory, reactor, partial(_connect_device, reactor, config, contexts,
                                                             config.manager.ae_title, MessageIds()))
    # the Web Software-Server: the pages' C-FIND and C-ECHO
    queries = WebQueries(config, reactor, partial(_connect_device, reactor, config, contexts, config.web.ae_title,
                                                  MessageIds()))
    # the Memory-Server's sink: C-STOREs from C-MOVE sub-associations, and the Memory-Manager's C-GETs
    manager.sink = memory_sink(config, memory, check.runner, loads=manager)
    # one builder per listening AE of configuration.LISTENERS: its services
    builders = {
        "disk_server": lambda: disk_server_services(config, archive, read.runner, tls=contexts),
        "memory_server": lambda: memory_server_services(config, manager.sink),
    }
    for section, listener in config.listeners.items():
        if not listener.port and not listener.tls_port:
            continue
        # one factory per AE: its plain and TLS ports share the association limit
        factory = acceptor_factory(listener, config, builders[section](), reactor)
        endpoint_class = TCP6ServerEndpoint if ":" in listener.interface else TCP4ServerEndpoint
        if listener.port:
            endpoint = endpoint_class(reactor, listener.port, backlog=128, interface=listener.interface)
            service = StreamServerEndpointService(endpoint, factory)
            service.setName(section)
            service.setServiceParent(root)
        if listener.tls_port:
            endpoint = endpoint_class(reactor, listener.tls_port, backlog=128, interface=listener.interface)
            service = StreamServerEndpointService(endpoint, tls.server_factory(contexts.servers[section], factory))
            service.setName(f"{section}_tls")
            service.setServiceParent(root)
    if config.web.port:
        site = ApplianceSite(ApiResource(config, manager, memory, web.runner, _renderer(), queries), reactor)
        if config.web.tls is not None:  # HTTPS with the [tls] certificate (swapped on reload like the others)
            site = tls.server_factory(contexts.servers[tls.WEB], site)
        endpoint_class = TCP6ServerEndpoint if ":" in config.web.interface else TCP4ServerEndpoint
        endpoint = endpoint_class(reactor, config.web.port, backlog=64, interface=config.web.interface)
        service = StreamServerEndpointService(endpoint, site)
        service.setName("web")
        service.setServiceParent(root)
    return root


def _connect_device(reactor, config: configuration.ApplianceConfig, contexts: tls.TLSContexts, calling: str,
                    message_ids: MessageIds, device: configuration.DeviceConfig, presentation_contexts, **options):
    """An association of one of the appliance's SCUs (the Memory-Manager, the Web Software-Server) to ``device``:
    its calling AE title, Message IDs and the TLS contexts."""
    return connect_device(reactor, device, calling, presentation_contexts,
                          implementation_class_uid=config.implementation_class_uid,
                          implementation_version_name=config.implementation_version_name, tls=contexts,
                          message_ids=message_ids, **options)


def _renderer():
    """The web API's PNG renderer, or None when numpy or Pillow is missing (rendering then answers 501)."""
    try:
        from .dataset.render import render_png
    except ImportError as error:
        logs.logger("appliance.web").warn("rendered images are not available: {error}", error=error)
        return None
    return render_png
