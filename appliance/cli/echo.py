"""``appliance-echo [--config PATH] DEVICE``: C-ECHO a configured device.

Exit status 0 when the device answered Success; otherwise non-zero with the
reason on standard error: 2 unknown device or bad configuration, 3 no
connection, 4 association rejected, 5 timeout, 6 aborted, 7 non-success status.

A device with ``tls = true`` is echoed over TLS: its certificate is verified
against ``ca_certificates`` and its host name or address, and the appliance's
certificate is presented.  A TLS file problem is a configuration error (2); a
failed handshake is no connection (3), with OpenSSL's reason.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .. import config as configuration
from ..dicom import status as S
from ..net import requestor
from ..net.tls import TLSContexts

EXIT_OK, EXIT_CONFIG, EXIT_CONNECT, EXIT_REJECTED, EXIT_TIMEOUT, EXIT_ABORTED, EXIT_STATUS = 0, 2, 3, 4, 5, 6, 7


async def echo(reactor, config: configuration.ApplianceConfig, device: configuration.DeviceConfig,
               contexts: Optional[TLSContexts] = None) -> int:
    if device.tls is not None and contexts is None:
        contexts = TLSContexts(config, listeners=False, devices=[device.name])
    association = await requestor.connect_device(
        reactor, device, config.ae_title,
        implementation_class_uid=config.implementation_class_uid,
        implementation_version_name=config.implementation_version_name,
        tls=contexts,
    )
    if association.negotiated.context_for(requestor.VERIFICATION) is None:
        association.abort("no Verification context accepted")
        raise requestor.AssociationError(
            f"{device.ae_title} accepted the association but not the Verification SOP class"
        )
    status = await association.echo()
    await association.release()
    return status


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="appliance-echo", description="C-ECHO a configured DICOM device.")
    parser.add_argument("--config", default=configuration.DEFAULT_CONFIG_PATH, help="configuration file (TOML)")
    parser.add_argument("device", help="name of a [devices.NAME] entry")
    args = parser.parse_args(argv)
    try:
        config = configuration.load(args.config)
        device = config.device(args.device)
        contexts = TLSContexts(config, listeners=False, devices=[device.name]) if device.tls is not None else None
    except configuration.ConfigError as error:
        print(f"appliance-echo: {error}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyError as error:
        print(f"appliance-echo: {error.args[0]}", file=sys.stderr)
        return EXIT_CONFIG

    from twisted.internet import defer, task

    if contexts is not None:
        for warning in contexts.warnings:
            print(f"appliance-echo: warning: {warning}", file=sys.stderr)

    async def run(reactor) -> None:
        code = await _report(reactor, config, device, contexts)
        if code != EXIT_OK:
            raise SystemExit(code)

    task.react(lambda reactor: defer.ensureDeferred(run(reactor)), [])
    return EXIT_OK  # pragma: no cover - react exits


async def _report(reactor, config: configuration.ApplianceConfig, device: configuration.DeviceConfig,
                  contexts: Optional[TLSContexts] = None) -> int:
    """Echo, print the outcome, and return the exit status."""
    where = f"{device.name} ({device.ae_title} at {device.host}:{device.port}{', TLS' if device.tls else ''})"
    failures = (
        (requestor.AssociationRejected, EXIT_REJECTED),
        (requestor.AssociationTimeout, EXIT_TIMEOUT),
        (requestor.ConnectionFailed, EXIT_CONNECT),
        (requestor.AssociationError, EXIT_ABORTED),
    )
    try:
        status = await echo(reactor, config, device, contexts)
    except requestor.AssociationError as error:
        print(f"appliance-echo: {where}: {error}", file=sys.stderr)
        return next(code for kind, code in failures if isinstance(error, kind))
    if status != S.SUCCESS:
        print(f"appliance-echo: {where}: C-ECHO answered {S.describe(status)}", file=sys.stderr)
        return EXIT_STATUS
    print(f"appliance-echo: {where}: C-ECHO {S.describe(status)}")
    return EXIT_OK


def entry_point() -> None:
    """The ``appliance-echo`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
