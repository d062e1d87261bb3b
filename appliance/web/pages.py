"""The web pages: plain HTML, CSS and JavaScript modules served as they are (no build step, nothing from elsewhere).

The files of ``appliance/web/static`` are read once, when the server is built: a request names one of them
exactly (``/static/NAME``), so no path reaches the file system.  Every answer of the web port carries the
security headers of :data:`SECURITY_HEADERS`: a Content-Security-Policy allowing scripts, styles, images and
requests from the appliance only (no inline script or style, no plugin, no framing).
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

__all__ = ["Pages", "SECURITY_HEADERS", "CONTENT_SECURITY_POLICY"]

#: Where the pages' files are.
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")

CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                           "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")

#: Headers on every answer of the web port.
SECURITY_HEADERS = {
    b"content-security-policy": CONTENT_SECURITY_POLICY.encode("ascii"),
    b"x-content-type-options": b"nosniff",
    b"x-frame-options": b"DENY",
    b"referrer-policy": b"no-referrer",
    b"cross-origin-opener-policy": b"same-origin",
    b"cross-origin-resource-policy": b"same-origin",
}

_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}


class Pages:
    """The static files, by name: (content type, bytes)."""

    def __init__(self, folder: str = STATIC_DIR) -> None:
        self.files: Dict[str, Tuple[str, bytes]] = {}
        for name in sorted(os.listdir(folder)):
            content_type = _TYPES.get(os.path.splitext(name)[1])
            path = os.path.join(folder, name)
            if content_type is None or not os.path.isfile(path):
                continue
            with open(path, "rb") as handle:
                self.files[name] = (content_type, handle.read())

    def get(self, name: str) -> Optional[Tuple[str, bytes]]:
        return self.files.get(name)

    @property
    def index(self) -> Tuple[str, bytes]:
        return self.files["index.html"]
