"""The appliance's configuration: TOML in, frozen and validated objects out.

Every problem is reported as a :class:`ConfigError` naming the file, the key
and what is wrong with it; keys the appliance does not know are errors, not
silently ignored, so a typo never passes for a setting.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from .archive.eviction import StorageLimits
from .compat import tomllib
from .dicom.uids import (
    DEFAULT_TRANSFER_SYNTAX_PRIORITY,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    is_valid_uid,
)
from .logs import LEVELS as LOG_LEVELS

__all__ = [
    "ConfigError",
    "TLSConfig",
    "ListenerConfig",
    "DeviceConfig",
    "ApplianceConfig",
    "load",
    "parse",
    "DEFAULT_CONFIG_PATH",
    "TLS_VERSIONS",
    "BCP195_CIPHERS",
    "LEGACY_CIPHERS",
    "LOCAL_ARCHIVE",
]

#: The shipped configuration, used when no --config is given.
#: Where an installed appliance reads its configuration (the Debian package's conffile).
INSTALLED_CONFIG_PATH = "/etc/dicom-appliance/appliance.toml"


def default_config_path(environ=os.environ) -> str:
    """The configuration read when none is named: ``$APPLIANCE_CONFIG``; in a checkout (``setup.cfg`` beside the
    package) its ``etc/appliance.toml``; installed, :data:`INSTALLED_CONFIG_PATH`."""
    if environ.get("APPLIANCE_CONFIG"):
        return environ["APPLIANCE_CONFIG"]
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.exists(os.path.join(checkout, "setup.cfg")) and os.path.exists(os.path.join(checkout, "etc",
                                                                                             "appliance.toml")):
        return os.path.join(checkout, "etc", "appliance.toml")
    return INSTALLED_CONFIG_PATH


DEFAULT_CONFIG_PATH = default_config_path()

#: Folders where data must never go: a data directory under one is refused, naming the key.
SYSTEM_FOLDERS = ("/etc", "/usr")

MIN_PDU = 2048
MAX_PDU = 4 * 1024 * 1024


#: The TLS versions ``minimum_version`` may name.  "1.0" and "1.1" only when set explicitly (PS3.15 retired them).
TLS_VERSIONS = ("1.0", "1.1", "1.2", "1.3")

#: TLS 1.2 cipher suites of the BCP 195 profile (RFC 9325 4.2; PS3.15 Annex B): ECDHE key exchange with an AEAD
#: cipher only -- no RSA key exchange, no CBC, no 3DES, no NULL.  TLS 1.3 suites are OpenSSL's own (all AEAD).
BCP195_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
))

#: The default for a context that allows TLS 1.0/1.1: the BCP 195 suites first, then the CBC suites those
#: versions have (ECDHE, then RSA key exchange as in the retired "AES TLS Secure Transport Connection Profile").
LEGACY_CIPHERS = BCP195_CIPHERS + ":" + ":".join((
    "ECDHE-ECDSA-AES128-SHA",
    "ECDHE-RSA-AES128-SHA",
    "ECDHE-ECDSA-AES256-SHA",
    "ECDHE-RSA-AES256-SHA",
    "AES128-SHA",
    "AES256-SHA",
))


class ConfigError(Exception):
    """A configuration problem: ``path: [section] key: problem``."""

    def __init__(self, path: str, key: str, problem: str) -> None:
        self.path, self.key, self.problem = path, key, problem
        super().__init__(f"{path}: {key}: {problem}" if key else f"{path}: {problem}")


@dataclass(frozen=True)
class TLSConfig:
    """The TLS settings of one listener or one device: ``[tls]`` with that table's overrides.

    Paths are absolute.  ``origin`` maps each key to the table it was read
    from (``"[tls]"``, ``"[disk_server]"``, ``"[devices.ct]"``), so that a
    problem found when the files are read names the key where it was set.
    """

    certificate: Optional[str] = None
    private_key: Optional[str] = None
    private_key_password_file: Optional[str] = None
    ca_certificates: Tuple[str, ...] = ()
    require_client_certificate: bool = True
    minimum_version: str = "1.2"
    #: an OpenSSL cipher string for TLS 1.2 and below; None: the default for ``minimum_version``
    ciphers: Optional[str] = None
    bind_aet_to_certificate: bool = False
    origin: Mapping[str, str] = field(default_factory=dict, compare=False)

    @property
    def legacy(self) -> bool:
        """Whether TLS 1.0 or 1.1 is allowed (explicitly: the default is 1.2)."""
        return self.minimum_version in ("1.0", "1.1")

    @property
    def cipher_string(self) -> str:
        if self.ciphers is not None:
            return self.ciphers
        return LEGACY_CIPHERS if self.legacy else BCP195_CIPHERS

    def key(self, name: str) -> str:
        """``[table] name``: where ``name`` was set (or would be, for a key left to its default)."""
        return f"{self.origin.get(name, '[tls]')} {name}"


@dataclass(frozen=True)
class ListenerConfig:
    """A listening AE: the Disk-Server or the Memory-Server."""

    ae_title: str
    interface: str
    port: int
    max_pdu: int
    max_associations: int
    timeout: float
    artim_timeout: float
    idle_timeout: float
    allowed_calling_aets: Tuple[str, ...]
    transfer_syntax_priority: Tuple[str, ...]
    #: the DICOM-over-TLS port; 0 when disabled or when no certificate is configured
    tls_port: int = 0
    #: the TLS listener's settings; None when it is off
    tls: Optional[TLSConfig] = None
    #: established associations from one peer address at most
    max_associations_per_host: int = 32


@dataclass(frozen=True)
class DeviceConfig:
    """A remote AE of the AE title / presentation address map."""

    name: str
    ae_title: str
    host: str
    port: int
    max_pdu: int
    timeout: float
    #: TLS for associations to this device (``tls = true``); None: plain TCP
    tls: Optional[TLSConfig] = None
    #: names one of which a certificate presented under this device's AE title must carry
    #: (bind_aet_to_certificate); empty: the device's host
    certificate_names: Tuple[str, ...] = ()
    #: how the Memory-Manager loads from it: "move" (Study Root C-MOVE to the Memory-Server, the statement's)
    #: or "get" (Study Root C-GET, the objects coming back on the same association)
    retrieve: str = "move"

    @property
    def identities(self) -> Tuple[str, ...]:
        """The names a certificate calling with this device's AE title must carry one of."""
        return self.certificate_names or (self.host,)


@dataclass(frozen=True)
class ArchiveConfig:
    """The Disk-Server's archive and storage management ([disk_server] keys)."""

    path: str
    sop_classes: str
    on_duplicate: str
    limits: StorageLimits
    pn_matching: str = "sensitive"
    max_results: int = 0
    #: a received data set, or a deflated one inflated, may be at most this large (bytes)
    max_object_size: int = 4 << 30
    #: a deflated data set may inflate at most this many times its size (beyond 16 MiB)
    max_inflation_ratio: float = 200.0


@dataclass(frozen=True)
class MemoryConfig:
    """The Memory-Server's store ([memory_server] keys)."""

    sop_classes: str = "all"
    #: bytes of objects held at most (data sets plus a fixed allowance each)
    memory_limit: int = 1 << 30
    #: seconds a study may stay unused before it is dropped; None: until freed or dropped for room
    retention: Optional[float] = None
    #: keep objects no load asked for (a C-STORE another SCU sends)
    accept_unsolicited: bool = True


@dataclass(frozen=True)
class ManagerConfig:
    """The Memory-Manager ([memory_manager]): the C-MOVE SCU loading remote images into the Memory-Server."""

    ae_title: str = "MEMORY_MANAGER"
    #: loads running at once, one association each; more wait in a queue
    max_parallel_loads: int = 4
    #: seconds one load may take in all; None: no limit beyond the DIMSE timeout between responses
    load_timeout: Optional[float] = None
    #: loads kept for GET /api/loads after they ended (the oldest ended are forgotten first)
    keep_finished: int = 1000


@dataclass(frozen=True)
class WebConfig:
    """The HTTP server of the web pages and their API ([web]), and the Web Software-Server's C-FIND SCU."""

    interface: str = "127.0.0.1"
    #: 0 disables it
    port: int = 8080
    #: calling AE title of the queries (C-FIND) and C-ECHOs the pages send to devices
    ae_title: str = "WEB_SERVER"
    #: matches one query takes from a device before it cancels the rest (C-FIND has no paging)
    max_results: int = 500
    #: who may sign in ([web.users]: name -> scrypt hash made by appliance-passwd); none: the pages are open
    users: Mapping[str, str] = field(default_factory=dict)
    #: seconds a session lasts after sign-in
    session_lifetime: float = 8 * 3600.0
    #: HTTPS ([web] tls = true): the [tls] certificate and key, TLS version and ciphers; browsers present no
    #: certificate, so none is asked for.  None: plain HTTP (loopback only)
    tls: Optional[TLSConfig] = None


@dataclass(frozen=True)
class ApplianceConfig:
    path: str
    data_dir: str
    ae_title: str
    implementation_class_uid: str
    implementation_version_name: str
    #: every listening AE's configuration, by section name, in the order of :data:`LISTENERS`
    listeners: Mapping[str, ListenerConfig]
    archive: ArchiveConfig
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    manager: ManagerConfig = field(default_factory=ManagerConfig)
    web: WebConfig = field(default_factory=WebConfig)
    devices: Mapping[str, DeviceConfig] = field(default_factory=dict)
    #: the [tls] section as written (listeners and devices hold their merged settings)
    tls: TLSConfig = field(default_factory=TLSConfig)
    #: the least severe log events written (appliance.logs.LEVELS)
    log_level: str = "info"

    @property
    def disk_server(self) -> ListenerConfig:
        return self.listeners["disk_server"]

    @property
    def memory_server(self) -> ListenerConfig:
        return self.listeners["memory_server"]

    @property
    def local_archive(self) -> Optional[DeviceConfig]:
        """The appliance's own Disk-Server as a device the pages query (named :data:`LOCAL_ARCHIVE`), reached on
        the loopback interface; None when its plain port is off."""
        disk = self.disk_server
        if not disk.port:
            return None
        host = "::1" if ":" in disk.interface else "127.0.0.1"
        if disk.interface not in ("0.0.0.0", "::"):
            host = disk.interface
        return DeviceConfig(name=LOCAL_ARCHIVE, ae_title=disk.ae_title, host=host, port=disk.port,
                            max_pdu=disk.max_pdu, timeout=disk.timeout)

    @property
    def remote_devices(self) -> Mapping[str, DeviceConfig]:
        """The devices the pages query and the Memory-Manager loads from: the Local archive, then [devices.*]."""
        local = self.local_archive
        return {**({LOCAL_ARCHIVE: local} if local is not None else {}), **self.devices}

    def device(self, name: str) -> DeviceConfig:
        try:
            return self.devices[name]
        except KeyError:
            known = ", ".join(sorted(self.devices)) or "none"
            raise KeyError(f"unknown device {name!r} in {self.path} (configured devices: {known})") from None


# --- value checkers: each returns the clean value or raises ValueError(problem) ----


def _integer(low: int, high: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer from {low} to {high}, not {value!r}")
        if not low <= value <= high:
            raise ValueError(f"must be from {low} to {high}, not {value}")
        return value

    return check


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 86400:
        raise ValueError(f"must be a number of seconds above 0 and at most 86400, not {value!r}")
    return float(value)


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be a non-empty string, not {value!r}")
    return value


def ae_title(value: Any) -> str:
    """PS3.5 AE VR: 1 to 16 characters of ISO 646 without control characters or backslash."""
    if not isinstance(value, str):
        raise ValueError(f"must be a string, not {value!r}")
    if not 0 < len(value) <= 16:
        raise ValueError(f"AE title {value!r} must be 1 to 16 characters")
    if value != value.strip(" "):
        raise ValueError(f"AE title {value!r} has leading or trailing spaces, which DICOM ignores")
    if any(not (0x20 <= ord(c) < 0x7F) or c == "\\" for c in value):
        raise ValueError(f"AE title {value!r} may hold only printable ISO 646 characters other than backslash")
    return value


def _uid(value: Any) -> str:
    if not isinstance(value, str) or not is_valid_uid(value):
        raise ValueError(f"{value!r} is not a valid UID (1 to 64 digits and dots, no leading zeros)")
    return value


def _version_name(value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 16 or not value.isascii() or not value.isprintable():
        raise ValueError(f"must be 1 to 16 printable ISO 646 characters, not {value!r}")
    return value


_UNITS = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}


def byte_size(value: Any) -> int:
    """An integer number of bytes, or a string such as "64 MiB", "50 GiB" or "2 GB"."""
    if isinstance(value, bool):
        raise ValueError(f"must be a size in bytes or a string like \"50 GiB\", not {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"must not be negative, not {value}")
        return value
    if isinstance(value, str):
        text = value.strip().replace("_", "")
        number = text.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ").strip()
        unit = text[len(number):].strip().lower()
        try:
            amount = float(number)
        except ValueError:
            amount = -1.0
        if amount >= 0 and unit in _UNITS:
            return int(amount * _UNITS[unit])
    raise ValueError(f"must be a size in bytes or a string like \"50 GiB\" (units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), not {value!r}")


def _fraction(value: Any) -> float:
    """A fraction between 0 and 1 exclusive, or a percentage string such as "90%"."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            value = float(value.strip()[:-1]) / 100
        except ValueError:
            raise ValueError(f"must be a fraction such as 0.9 or a percentage such as \"90%\", not {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"must be a fraction between 0 and 1 such as 0.9, or \"90%\", not {value!r}")
    return float(value)


def _at_least(low: int, check: Callable[[Any], int]) -> Callable[[Any], int]:
    def run(value: Any) -> int:
        result = check(value)
        if result < low:
            raise ValueError(f"must be at least {low} bytes, not {value!r}")
        return result

    return run


def _ratio(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= value <= 100000:
        raise ValueError(f"must be a number from 1 to 100000, not {value!r}")
    return float(value)


_DURATION_UNITS = {"s": 1, "sec": 1, "second": 1, "seconds": 1, "min": 60, "minute": 60, "minutes": 60,
                   "h": 3600, "hour": 3600, "hours": 3600, "d": 86400, "day": 86400, "days": 86400}


def _duration(value: Any) -> float:
    """A duration: a number of seconds, or a string such as "30 min", "8 h" or "2 d"."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    if isinstance(value, str):
        number = value.strip().rstrip("abcdefghijklmnopqrstuvwxyz").strip()
        unit = value.strip()[len(number):].strip().lower()
        try:
            amount = float(number)
        except ValueError:
            amount = 0.0
        if amount > 0 and unit in _DURATION_UNITS:
            return amount * _DURATION_UNITS[unit]
    raise ValueError(f"must be a number of seconds above 0 or a string like \"8 h\" (units s, min, h, d), "
                     f"not {value!r}")


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, not {value!r}")
    return value


def _choice(*options: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in options:
            raise ValueError(f"must be one of {', '.join(repr(o) for o in options)}, not {value!r}")
        return value

    return check


def _list_of(check: Callable[[Any], Any]) -> Callable[[Any], tuple]:
    def run(value: Any) -> tuple:
        if not isinstance(value, list):
            raise ValueError(f"must be a list, not {value!r}")
        return tuple(check(item) for item in value)

    return run


def _non_empty(check: Callable[[Any], tuple]) -> Callable[[Any], tuple]:
    def run(value: Any) -> tuple:
        result = check(value)
        if not result:
            raise ValueError("must not be empty")
        return result

    return run


class _Section:
    """Reads one TOML table, remembering which keys were used."""

    def __init__(self, path: str, name: str, table: Any) -> None:
        self.path, self.name = path, name
        if not isinstance(table, dict):
            raise ConfigError(path, f"[{name}]", f"must be a table, not {table!r}")
        self.table = table
        self.used: set = set()

    def get(self, key: str, check: Callable[[Any], Any], default: Any = ..., fallback_key: Optional[str] = None) -> Any:
        self.used.add(key)
        if key not in self.table:
            if default is ...:
                raise ConfigError(self.path, f"[{self.name}] {key}", "is required")
            return default
        try:
            return check(self.table[key])
        except ValueError as error:
            raise ConfigError(self.path, f"[{self.name}] {key}", str(error)) from None

    def done(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise ConfigError(
                self.path,
                f"[{self.name}] {unknown[0]}",
                f"unknown key (known keys: {', '.join(sorted(self.used))})",
            )


def _memory(section: "_Section", data_dir: str) -> MemoryConfig:
    """The storage keys of [memory_server]."""
    return MemoryConfig(
        sop_classes=section.get("sop_classes", _choice("all", "conformance"), "all"),
        memory_limit=section.get("memory_limit", _at_least(1 << 20, byte_size), 1 << 30),
        retention=section.get("retention", _duration, None),
        accept_unsolicited=section.get("accept_unsolicited", _boolean, True),
    )


def _archive(section: "_Section", data_dir: str) -> ArchiveConfig:
    """The storage keys of [disk_server]."""
    return ArchiveConfig(
        path=os.path.join(data_dir, "archive"),
        sop_classes=section.get("sop_classes", _choice("all", "conformance"), "all"),
        on_duplicate=section.get("on_duplicate", _choice("replace", "keep", "reject"), "replace"),
        limits=StorageLimits(
            max_archive_size=section.get("max_archive_size", byte_size, 0),
            min_free_space=section.get("min_free_space", byte_size, 1024**3),
            low_water=section.get("low_water", _fraction, 0.9),
            auto_delete=section.get("auto_delete", _boolean, True),
        ),
        pn_matching=section.get("pn_matching", _choice("sensitive", "insensitive"), "sensitive"),
        max_results=section.get("max_results", _integer(0, 10**9), 0),
        max_object_size=section.get("max_object_size", _at_least(1 << 20, byte_size), 4 << 30),
        max_inflation_ratio=section.get("max_inflation_ratio", _ratio, 200.0),
    )


@dataclass(frozen=True)
class ListenerSpec:
    """A listening AE of the appliance: its section, its name in words, its defaults."""

    section: str
    name: str
    ae_title: str
    port: int
    #: 2762 is IANA's "dicom-tls"; used once a certificate is configured
    tls_port: int
    #: reads the section's own keys beyond a listener's (the Disk-Server's storage keys): (section, data_dir)
    extra: Optional[Callable[["_Section", str], Any]] = None
    #: the maximum PDU length it announces unless configured
    max_pdu: int = 16384


#: The name of the appliance's own Disk-Server among the devices the web pages query ("Local archive"); no
#: [devices.*] may take it.
LOCAL_ARCHIVE = "local"

#: The appliance's listening AEs, in the order they start: the one table configuration, TLS and the
#: composition root (appliance/tap.py) read.  A new listener is an entry here and a builder there.
LISTENERS: Tuple[ListenerSpec, ...] = (
    ListenerSpec("disk_server", "Disk-Server", "DISK_SERVER", 11112, 2762, extra=_archive),
    # the statement fixes the Disk-Server's PDUs at 16K and leaves the Memory-Server's to the configuration:
    # a MiB, as a receiver that keeps what it receives in memory costs least per PDU (a 0.5 MB image in one
    # PDU instead of 33; at most one PDU is buffered per association)
    ListenerSpec("memory_server", "Memory-Server", "MEMORY_SERVER", 11113, 2763, extra=_memory, max_pdu=1 << 20),
)
_SPECS = {spec.section: spec for spec in LISTENERS}


def _listener(path: str, name: str, table: Any, extra: Optional[Callable[["_Section"], Any]] = None,
              tls: Optional[TLSConfig] = None, base: str = "."):
    spec = _SPECS[name]
    default_title, default_port, default_tls_port = spec.ae_title, spec.port, spec.tls_port
    section = _Section(path, name, table)
    extra_result = extra(section) if extra is not None else None
    timeout = section.get("timeout", _seconds, 30.0)
    if "dimse_timeout" in section.table:
        raise ConfigError(path, f"[{name}] dimse_timeout",
                          "is not a setting of a listening AE: it waits for no DIMSE response (idle_timeout bounds "
                          "its associations), and the Disk-Server's C-MOVE sub-associations wait for each response "
                          "as long as the destination's [devices.NAME] timeout says; remove the key")
    tls_port = section.get("tls_port", _integer(0, 65535), default_tls_port)
    listener_tls = _merged_tls(section, tls if tls is not None else TLSConfig(), base, _SERVER_TLS_KEYS)
    if listener_tls.certificate is None:
        if "tls_port" in section.table and tls_port:
            raise ConfigError(path, f"[{name}] tls_port",
                              "DICOM over TLS needs a certificate: set certificate and private_key in [tls] "
                              f"(or in [{name}]), or tls_port = 0")
        tls_port = 0
    if not tls_port:
        listener_tls = None
    else:
        _check_tls(path, listener_tls, server=True)
    config = ListenerConfig(
        ae_title=section.get("ae_title", ae_title, default_title),
        interface=section.get("interface", _text, "0.0.0.0"),
        port=section.get("port", _integer(0, 65535), default_port),
        max_pdu=section.get("max_pdu", _integer(MIN_PDU, MAX_PDU), spec.max_pdu),
        max_associations=section.get("max_associations", _integer(1, 100000), 64),
        max_associations_per_host=section.get("max_associations_per_host", _integer(1, 100000), 32),
        timeout=timeout,
        artim_timeout=section.get("artim_timeout", _seconds, timeout),
        idle_timeout=section.get("idle_timeout", _seconds, max(timeout, 300.0)),
        allowed_calling_aets=section.get("allowed_calling_aets", _list_of(ae_title), ()),
        transfer_syntax_priority=section.get(
            "transfer_syntax_priority", _non_empty(_list_of(_uid)), DEFAULT_TRANSFER_SYNTAX_PRIORITY
        ),
        tls_port=tls_port,
        tls=listener_tls,
    )
    section.done()
    return config if extra is None else (config, extra_result)


def _device(path: str, name: str, table: Any, tls: Optional[TLSConfig] = None, base: str = ".") -> DeviceConfig:
    section = _Section(path, f"devices.{name}", table)
    use_tls = section.get("tls", _boolean, False)
    device_tls: Optional[TLSConfig] = _merged_tls(section, tls if tls is not None else TLSConfig(), base,
                                                  _CLIENT_TLS_KEYS)
    if use_tls:
        _check_tls(path, device_tls, server=False, device=name)
    else:
        overridden = sorted(key for key in _CLIENT_TLS_KEYS if key in section.table)
        if overridden:
            raise ConfigError(path, f"[devices.{name}] {overridden[0]}",
                              "is a TLS setting, and this device does not use TLS (set tls = true)")
        device_tls = None
    device = DeviceConfig(
        name=name,
        ae_title=section.get("ae_title", ae_title),
        host=section.get("host", _text),
        port=section.get("port", _integer(1, 65535)),
        max_pdu=section.get("max_pdu", _integer(MIN_PDU, MAX_PDU), 16384),
        timeout=section.get("timeout", _seconds, 30.0),
        tls=device_tls,
        certificate_names=section.get("certificate_names", _list_of(_text), ()),
        retrieve=section.get("retrieve", _choice("move", "get"), "move"),
    )
    section.done()
    return device


# --- TLS ------------------------------------------------------------------------------------------------

#: keys of [tls] that a device may override (the client side of a connection)
_CLIENT_TLS_KEYS = ("certificate", "private_key", "private_key_password_file", "ca_certificates",
                    "minimum_version", "ciphers")
#: keys of [tls] that a listener may override (all of them)
_SERVER_TLS_KEYS = _CLIENT_TLS_KEYS + ("require_client_certificate", "bind_aet_to_certificate")


def _tls_version(value: Any) -> str:
    if isinstance(value, float):  # minimum_version = 1.2 written as a TOML float
        value = f"{value:.1f}"
    if value not in TLS_VERSIONS:
        raise ValueError(f"must be one of {', '.join(repr(v) for v in TLS_VERSIONS)}, not {value!r}")
    return value


def _cipher_string(value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or not value.isascii() or any(c.isspace() for c in value):
        raise ValueError(f"must be an OpenSSL cipher string such as \"ECDHE-RSA-AES128-GCM-SHA256\" "
                         f"(names joined by ':', no spaces), not {value!r}")
    return value


def _file(base: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        return os.path.normpath(os.path.join(base, _text(value)))

    return check


def _files(base: str) -> Callable[[Any], Tuple[str, ...]]:
    single = _file(base)

    def check(value: Any) -> Tuple[str, ...]:
        if isinstance(value, list):
            if not value:
                raise ValueError("must name at least one PEM file")
            return tuple(single(item) for item in value)
        return (single(value),)

    return check


def _tls_checks(base: str) -> Dict[str, Callable[[Any], Any]]:
    return {
        "certificate": _file(base),
        "private_key": _file(base),
        "private_key_password_file": _file(base),
        "ca_certificates": _files(base),
        "minimum_version": _tls_version,
        "ciphers": _cipher_string,
        "require_client_certificate": _boolean,
        "bind_aet_to_certificate": _boolean,
    }


def _merged_tls(section: "_Section", inherited: TLSConfig, base: str, keys: Tuple[str, ...]) -> TLSConfig:
    """``inherited`` with the keys of ``section`` that override it (paths resolved against ``base``)."""
    checks = _tls_checks(base)
    values: Dict[str, Any] = {}
    for key in keys:
        value = section.get(key, checks[key], None)
        if value is not None:
            values[key] = value
    if not values:
        return inherited
    origin = dict(inherited.origin)
    origin.update((key, f"[{section.name}]") for key in values)
    return replace(inherited, origin=origin, **values)


def _tls(path: str, table: Any, base: str) -> TLSConfig:
    section = _Section(path, "tls", table)
    config = _merged_tls(section, TLSConfig(), base, _SERVER_TLS_KEYS)
    section.done()
    if config.private_key is not None and config.certificate is None:
        raise ConfigError(path, config.key("certificate"), "is required with private_key")
    return config


def _check_tls(path: str, tls: TLSConfig, server: bool, device: str = "") -> None:
    """The settings a TLS listener (``server``) or a device's TLS connections need, present together."""
    if tls.certificate is not None and tls.private_key is None:
        raise ConfigError(path, tls.key("private_key"), f"is required with certificate ({tls.certificate})")
    if tls.private_key is not None and tls.certificate is None:
        raise ConfigError(path, tls.key("certificate"), "is required with private_key")
    if server and tls.require_client_certificate and not tls.ca_certificates:
        raise ConfigError(path, tls.key("ca_certificates"),
                          "is required to verify client certificates (require_client_certificate = true): "
                          "set the trust roots, or require_client_certificate = false")
    if not server and not tls.ca_certificates:
        raise ConfigError(path, tls.key("ca_certificates"),
                          f"is required with [devices.{device}] tls = true: the trust roots that verify "
                          "the device's certificate")


def _interfaces_overlap(a: str, b: str) -> bool:
    """Whether listening on one port at both interfaces conflicts: same address, or a wildcard covers the other."""
    if a == b:
        return True
    if (":" in a) == (":" in b):
        return a in ("0.0.0.0", "::") or b in ("0.0.0.0", "::")
    return "::" in (a, b)  # an IPv6 wildcard socket takes IPv4 connections too (dual stack)


def listening_ports(listeners: Mapping[str, ListenerConfig], web: WebConfig) -> List[Tuple[str, str, str, int]]:
    """(section, key, interface, port) of every port to listen on: each AE's plain and TLS ports, the web port."""
    ports = []
    for name, listener in listeners.items():
        for key, port in (("port", listener.port), ("tls_port", listener.tls_port)):
            if port:
                ports.append((name, key, listener.interface, port))
    if web.port:
        ports.append(("web", "port", web.interface, web.port))
    return ports


def _check_port_conflicts(path: str, ports: List[Tuple[str, str, str, int]]) -> None:
    """No two enabled listening ports (plain or TLS, of any AE, or the web port) may take the same port on one
    interface."""
    taken: List[Tuple[str, str, str, int]] = []
    for name, key, interface, port in ports:
        for other_name, other_key, other_interface, other_port in taken:
            if port == other_port and _interfaces_overlap(other_interface, interface):
                if (other_key, key) == ("port", "port") and other_name in _SPECS:
                    problem = f"{port} is the {_SPECS[other_name].name}'s port too"
                else:
                    problem = f"{port} is [{other_name}] {other_key} too"
                raise ConfigError(path, f"[{name}] {key}", problem)
        taken.append((name, key, interface, port))


def _manager(path: str, table: Any) -> ManagerConfig:
    section = _Section(path, "memory_manager", table)
    manager = ManagerConfig(
        ae_title=section.get("ae_title", ae_title, "MEMORY_MANAGER"),
        max_parallel_loads=section.get("max_parallel_loads", _integer(1, 64), 4),
        load_timeout=section.get("load_timeout", _duration, None),
        keep_finished=section.get("keep_finished", _integer(10, 100000), 1000),
    )
    section.done()
    return manager


def _web(path: str, table: Any, tls: Optional[TLSConfig] = None) -> WebConfig:
    section = _Section(path, "web", table)
    web = WebConfig(
        interface=section.get("interface", _text, "127.0.0.1"),
        port=section.get("port", _integer(0, 65535), 8080),
        ae_title=section.get("ae_title", ae_title, "WEB_SERVER"),
        max_results=section.get("max_results", _integer(1, 100000), 500),
        users=_web_users(path, section.get("users", lambda value: value, {})),
        session_lifetime=section.get("session_lifetime", _duration, 8 * 3600.0),
    )
    if section.get("tls", _boolean, False):
        inherited = tls if tls is not None else TLSConfig()
        if inherited.certificate is None:
            raise ConfigError(path, "[web] tls", "HTTPS needs a certificate: set certificate and private_key in [tls]")
        web = replace(web, tls=replace(inherited, require_client_certificate=False, bind_aet_to_certificate=False))
        _check_tls(path, web.tls, server=True)
    section.done()
    if web.port and not _is_loopback(web.interface):
        if web.tls is None or not web.users:
            raise ConfigError(path, "[web] interface", f"{web.interface!r} is not a loopback address: the pages "
                              f"listen on another interface only over HTTPS ([web] tls = true) and with users to sign "
                              f"in ([web.users]), so that nobody uses them unasked and passwords and sessions never "
                              f"cross a network in clear (or set port = 0)")
    return web


def _web_users(path: str, table: Any) -> Dict[str, str]:
    """[web.users]: NAME = "scrypt$..." (appliance-passwd's line), each checked."""
    from .web.auth import BadHash, parse_hash

    if not isinstance(table, dict):
        raise ConfigError(path, "[web.users]", "must be a table of NAME = \"hash made by appliance-passwd\"")
    users = {}
    for name, stored in table.items():
        if not re.match(r"^[A-Za-z0-9_.@-]{1,64}$", name):
            raise ConfigError(path, f"[web.users] {name[:64]}", "a user name is 1-64 letters, digits, '.', '_', "
                              "'@' or '-'")
        try:
            parse_hash(stored)
        except BadHash as error:
            raise ConfigError(path, f"[web.users] {name}", str(error)) from None
        users[name] = stored
    return users


def _is_loopback(interface: str) -> bool:
    """Whether ``interface`` is a loopback address literal (127.0.0.0/8, ::1)."""
    try:
        return ipaddress.ip_address(interface).is_loopback
    except ValueError:
        return False


def parse(data: Mapping[str, Any], path: str) -> ApplianceConfig:
    """Validate a parsed TOML document; ``path`` names it in errors and anchors relative paths."""
    known_sections = {"appliance", "devices", "tls", "memory_manager", "web"} | set(_SPECS)
    for key in data:
        if key not in known_sections:
            raise ConfigError(path, f"[{key}]", f"unknown section (known sections: {', '.join(sorted(known_sections))})")
    base = os.path.dirname(os.path.abspath(path))
    appliance = _Section(path, "appliance", data.get("appliance", {}))
    data_dir = appliance.get("data_dir", _text, "var")
    data_dir = os.path.normpath(os.path.join(base, data_dir))
    for folder in SYSTEM_FOLDERS:
        if data_dir == folder or data_dir.startswith(folder + os.sep):
            raise ConfigError(path, "[appliance] data_dir", f"{data_dir} is under {folder}, which holds no data "
                              f"(a relative path resolves against the configuration's folder, {base}): give an "
                              "absolute path such as /var/lib/dicom-appliance")
    config_values = dict(
        path=path,
        data_dir=data_dir,
        ae_title=appliance.get("ae_title", ae_title, "APPLIANCE"),
        implementation_class_uid=appliance.get("implementation_class_uid", _uid, IMPLEMENTATION_CLASS_UID),
        implementation_version_name=appliance.get(
            "implementation_version_name", _version_name, IMPLEMENTATION_VERSION_NAME
        ),
        log_level=appliance.get("log_level", _choice(*LOG_LEVELS), "info"),
    )
    appliance.done()
    tls = _tls(path, data.get("tls", {}), base)
    listeners: Dict[str, ListenerConfig] = {}
    extras: Dict[str, Any] = {}
    for spec in LISTENERS:
        extra = None
        if spec.extra is not None:
            extra = (lambda read: lambda section: read(section, config_values["data_dir"]))(spec.extra)
        parsed = _listener(path, spec.section, data.get(spec.section, {}), extra, tls=tls, base=base)
        if spec.extra is not None:
            parsed, extras[spec.section] = parsed
        listeners[spec.section] = parsed
    devices_table = data.get("devices", {})
    if not isinstance(devices_table, dict):
        raise ConfigError(path, "[devices]", "must be a table of [devices.NAME] tables")
    if LOCAL_ARCHIVE in devices_table:
        raise ConfigError(path, f"[devices.{LOCAL_ARCHIVE}]", f"the name {LOCAL_ARCHIVE!r} is the appliance's own "
                          "Disk-Server (the pages' \"Local archive\"): give this device another name")
    devices = {name: _device(path, name, table, tls=tls, base=base) for name, table in devices_table.items()}
    manager = _manager(path, data.get("memory_manager", {}))
    web = _web(path, data.get("web", {}), tls)
    _check_port_conflicts(path, listening_ports(listeners, web))
    return ApplianceConfig(listeners=listeners, archive=extras["disk_server"], memory=extras["memory_server"],
                           manager=manager, web=web, devices=devices, tls=tls, **config_values)


def load(path: str) -> ApplianceConfig:
    """Read and validate the configuration file at ``path``."""
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(path, "", "no such file") from None
    except PermissionError:
        raise ConfigError(path, "", "permission denied") from None
    except IsADirectoryError:
        raise ConfigError(path, "", "is a directory, not a configuration file") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(path, "", f"not valid TOML: {error}") from None
    return parse(data, path)
