"""Listening AEs: the Disk-Server and the Memory-Server as Twisted factories."""

from __future__ import annotations

from typing import Dict, Iterable, Optional

from ..archive.archive import Archive, Runner
from ..archive.sink import ArchiveSink
from ..config import ApplianceConfig, ListenerConfig
from ..dataset.deflate import InflateLimits
from ..dicom.negotiation import AcceptorPolicy
from ..dicom.uids import (
    CONFORMANCE_STORAGE_CLASSES,
    STORAGE_TRANSFER_SYNTAXES,
    UNCOMPRESSED_TRANSFER_SYNTAXES,
    registry_storage_classes,
)
from ..memory.sink import MemorySink, Runner as MemoryRunner
from ..memory.store import MemoryStore
from ..net.protocol import AcceptorFactory, Timeouts
from ..net.tls import CertificateBinding, TLSContexts
from .query import FindService
from .retrieve import RetrieveService
from .storage import StorageService
from .verification import VerificationService

__all__ = ["acceptor_factory", "disk_server_services", "memory_server_services", "memory_sink", "storage_syntaxes"]


def storage_syntaxes(sop_classes: str) -> Dict[str, tuple]:
    """Abstract syntax -> transfer syntaxes for the storage SOP classes.

    ``"conformance"``: the statement's Table 7, uncompressed only.  ``"all"``:
    every Storage SOP Class pydicom's registry knows, and the compressed
    transfer syntaxes too (stored as received, never decoded).
    """
    if sop_classes == "conformance":
        return {uid: UNCOMPRESSED_TRANSFER_SYNTAXES for uid in CONFORMANCE_STORAGE_CLASSES}
    return {uid: STORAGE_TRANSFER_SYNTAXES for uid in registry_storage_classes()}


def disk_server_services(config: ApplianceConfig, archive: Archive, read: Optional[Runner] = None,
                         tls: Optional[TLSContexts] = None) -> list:
    """The Disk-Server's service classes; ``read`` runs C-FIND queries (default: the archive's database runner);
    ``tls`` holds the contexts of devices with ``tls = true`` (C-MOVE destinations)."""
    return [
        VerificationService(),
        StorageService(
            ArchiveSink(archive, config.implementation_class_uid, config.implementation_version_name),
            storage_syntaxes(config.archive.sop_classes),
        ),
        FindService(
            archive,
            read or archive.db,
            config.disk_server.ae_title,
            insensitive_names=config.archive.pn_matching == "insensitive",
            max_results=config.archive.max_results,
        ),
        RetrieveService(config, archive, tls=tls),
    ]


def memory_sink(config: ApplianceConfig, store: MemoryStore, runner: MemoryRunner, loads=None) -> MemorySink:
    """Where the Memory-Server's objects go: ``store``, checked by ``runner``; ``loads`` (an ILoadTracker: the
    Memory-Manager) says which objects its loads asked for (None: no loads)."""
    memory = config.memory
    return MemorySink(store, runner, InflateLimits(max_size=memory.memory_limit, name="memory_limit"),
                      accept_unsolicited=memory.accept_unsolicited, loads=loads)


def memory_server_services(config: ApplianceConfig, sink: MemorySink) -> list:
    """The Memory-Server's service classes: C-ECHO, and C-STORE into ``sink``."""
    return [VerificationService(), StorageService(sink, storage_syntaxes(config.memory.sop_classes))]


def acceptor_factory(
    listener: ListenerConfig,
    config: ApplianceConfig,
    services: Iterable,
    clock,
) -> AcceptorFactory:
    """An :class:`AcceptorFactory` for one listening AE, from its configuration and services."""
    by_syntax: Dict[str, object] = {}
    abstract_syntaxes: Dict[str, tuple] = {}
    extended: Dict[str, object] = {}
    for service in services:
        for abstract, transfers in service.abstract_syntaxes.items():
            by_syntax[abstract] = service
            abstract_syntaxes[abstract] = tuple(transfers)
        extended.update(getattr(service, "extended_negotiation", {}))
    policy = AcceptorPolicy(
        ae_title=listener.ae_title,
        abstract_syntaxes=abstract_syntaxes,
        max_pdu=listener.max_pdu,
        implementation_class_uid=config.implementation_class_uid,
        implementation_version_name=config.implementation_version_name,
        transfer_syntax_priority=listener.transfer_syntax_priority,
        allowed_calling_aets=frozenset(listener.allowed_calling_aets),
        extended_negotiation=extended,
    )
    timeouts = Timeouts(
        artim=listener.artim_timeout,
        association=listener.timeout,
        dimse=None,  # an acceptor waits for no response
        idle=listener.idle_timeout,
    )
    binding = None
    if listener.tls is not None and listener.tls.bind_aet_to_certificate:
        binding = CertificateBinding(config.devices.values())
    return AcceptorFactory(policy, by_syntax, clock, timeouts, listener.max_associations, binding,
                           max_associations_per_host=listener.max_associations_per_host)
