"""The one place where library versions differ.

The appliance runs on the versions Debian 12 packages (Python 3.11,
Twisted 22.4, pydicom 2.3, pyOpenSSL 23, service-identity 18), on Debian 13's,
and on the newest releases from PyPI.  Anything that has to know which one is
loaded lives here.
"""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Debian 12 and later ship Python 3.11+
    import tomli as tomllib

import pydicom

__all__ = ["tomllib", "PYDICOM_VERSION"]

PYDICOM_VERSION = tuple(int(part) for part in pydicom.__version__.split(".")[:2] if part.isdigit())
