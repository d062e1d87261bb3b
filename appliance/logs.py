"""The appliance's loggers and its one log level setting.

twistd writes every event it is given, debug ones too; the appliance's
loggers therefore publish through one level filter (``[appliance]
log_level``, ``"info"`` by default), so that debug lines, and the patient
data some of them carry (the values of a patient attribute conflict), appear
only when an administrator asks for them.
"""

from __future__ import annotations

from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
)

__all__ = ["logger", "set_level", "LEVELS"]

#: the names ``[appliance] log_level`` takes, most verbose first
LEVELS = ("debug", "info", "warn", "error", "critical")

_levels = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)


def _publish(event) -> None:
    # looked up at each event: tests may replace the global publisher's observers, never the publisher
    globalLogPublisher(event)


_observer = FilteringLogObserver(_publish, [_levels])


def logger(namespace: str) -> Logger:
    """A logger whose events pass the appliance's level filter."""
    return Logger(namespace=namespace, observer=_observer)


def set_level(level: str) -> None:
    """Publish events of ``level`` (one of :data:`LEVELS`) and above from now on."""
    _levels.setLogLevelForNamespace("appliance", LogLevel.levelWithName(level))
