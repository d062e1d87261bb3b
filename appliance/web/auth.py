"""Who may use the web pages: password hashes, sessions, sign-in attempts, without I/O.

* Passwords are kept as scrypt hashes (the standard library's ``hashlib.scrypt``) in the configuration's
  ``[web.users]``: ``scrypt$N$r$p$SALT$HASH`` (salt and hash in base64), made by ``appliance-passwd``.
  Checking one takes tens of milliseconds on purpose: the caller runs it on a worker thread.
* A session is a random token in a cookie (HttpOnly, SameSite=Strict, Secure under HTTPS) that ends
  ``lifetime`` seconds after sign-in, or at sign-out; each session has its own CSRF token, which every request
  that changes something must carry in ``X-CSRF-Token``.  Without users the pages are open (on a loopback
  interface only) and one CSRF token per process is handed to whoever asks from the appliance's own origin.
* Sign-in attempts are limited per client address: after ``MAX_FAILURES`` failures within ``WINDOW`` seconds,
  further attempts are refused until the oldest failure leaves the window (the answer says when).

The clock is passed in.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Deque, Dict, Mapping, Optional

__all__ = ["hash_password", "check_password", "parse_hash", "BadHash", "Session", "Sessions", "SignInLimiter",
           "MAX_FAILURES", "WINDOW"]

#: scrypt's cost: 16 MiB of memory and about 50 ms per check (RFC 7914's interactive figures).
SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_LENGTH = 1 << 14, 8, 1, 32
#: Failed sign-ins one address may make within WINDOW seconds.
MAX_FAILURES = 5
WINDOW = 300.0
#: Sessions kept at most (the oldest go first): a bound on memory whatever signs in.
MAX_SESSIONS = 1000
#: Addresses whose failures are remembered at most.
MAX_ADDRESSES = 10000

_HASH = re.compile(r"^scrypt\$(\d{1,7})\$(\d{1,3})\$(\d{1,3})\$([A-Za-z0-9+/=]{8,128})\$([A-Za-z0-9+/=]{16,256})$")


class BadHash(ValueError):
    """A configured hash that is not one appliance-passwd makes."""


@dataclass(frozen=True)
class _Hash:
    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes


def hash_password(password: str, salt: Optional[bytes] = None) -> str:
    """``scrypt$N$r$p$SALT$HASH`` of ``password`` (a fresh random salt unless given)."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                            dklen=SCRYPT_LENGTH, maxmem=64 * 1024 * 1024)
    return "$".join(("scrypt", str(SCRYPT_N), str(SCRYPT_R), str(SCRYPT_P), base64.b64encode(salt).decode("ascii"),
                     base64.b64encode(digest).decode("ascii")))


def parse_hash(text: str) -> _Hash:
    """The parts of a configured hash; BadHash saying what is wrong."""
    match = _HASH.match(text) if isinstance(text, str) else None
    if match is None:
        raise BadHash("must be a hash made by appliance-passwd (scrypt$N$r$p$SALT$HASH)")
    n, r, p = (int(match.group(index)) for index in (1, 2, 3))
    if n < 2 or n & (n - 1) or n > 1 << 20 or not 1 <= r <= 32 or not 1 <= p <= 16 or n * r * 128 > 256 << 20:
        raise BadHash(f"scrypt parameters N={n}, r={r}, p={p} are out of range (N a power of 2 up to 2^20)")
    try:
        salt = base64.b64decode(match.group(4), validate=True)
        digest = base64.b64decode(match.group(5), validate=True)
    except ValueError:
        raise BadHash("its salt or hash is not base64") from None
    return _Hash(n, r, p, salt, digest)


def check_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches the stored hash (compared in constant time).  Slow: run it on a worker."""
    parsed = parse_hash(stored)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=parsed.salt, n=parsed.n, r=parsed.r, p=parsed.p,
                            dklen=len(parsed.digest), maxmem=512 * 1024 * 1024)
    return hmac.compare_digest(digest, parsed.digest)


@dataclass(frozen=True)
class Session:
    user: str
    csrf: str
    expires: float


class Sessions:
    """Signed-in sessions by token, each ending ``lifetime`` seconds after sign-in."""

    def __init__(self, clock, lifetime: float) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self._sessions: "OrderedDict[str, Session]" = OrderedDict()
        #: the CSRF token of the open pages (no users configured)
        self.open_csrf = secrets.token_urlsafe(32)

    def create(self, user: str) -> tuple:
        """(token, Session) for ``user``, just signed in."""
        self._expire()
        while len(self._sessions) >= MAX_SESSIONS:
            self._sessions.popitem(last=False)
        token = secrets.token_urlsafe(32)
        session = Session(user, secrets.token_urlsafe(32), self.clock.seconds() + self.lifetime)
        self._sessions[token] = session
        return token, session

    def get(self, token: Optional[str]) -> Optional[Session]:
        if not token:
            return None
        session = self._sessions.get(token)
        if session is None:
            return None
        if session.expires <= self.clock.seconds():
            del self._sessions[token]
            return None
        return session

    def end(self, token: Optional[str]) -> None:
        if token:
            self._sessions.pop(token, None)

    def end_user(self, user: str) -> None:
        for token in [token for token, session in self._sessions.items() if session.user == user]:
            del self._sessions[token]

    def _expire(self) -> None:
        now = self.clock.seconds()
        for token in [token for token, session in self._sessions.items() if session.expires <= now]:
            del self._sessions[token]

    def __len__(self) -> int:
        return len(self._sessions)


class SignInLimiter:
    """Failed sign-ins per client address, within a sliding window; the checks under way count as failures
    until they end, so that attempts sent at once cannot pass the limit before any of them has failed."""

    def __init__(self, clock, max_failures: int = MAX_FAILURES, window: float = WINDOW) -> None:
        self.clock = clock
        self.max_failures = max_failures
        self.window = window
        self._failures: "OrderedDict[str, Deque[float]]" = OrderedDict()
        #: address -> password checks under way (a handful at most: the API runs few at once)
        self._checking: Dict[str, int] = {}

    def retry_after(self, address: str) -> Optional[float]:
        """Seconds until ``address`` may try again, or None if it may now."""
        failures = self._recent(address)
        if len(failures) + self._checking.get(address, 0) < self.max_failures:
            return None
        if len(failures) < self.max_failures:
            return 1.0  # checks under way would reach the limit if they fail: their answers come first
        return max(0.0, failures[0] + self.window - self.clock.seconds())

    def checking(self, address: str) -> None:
        """A password check for ``address`` has started (:meth:`checked` when it ends, whatever its answer)."""
        self._checking[address] = self._checking.get(address, 0) + 1

    def checked(self, address: str) -> None:
        left = self._checking.get(address, 0) - 1
        if left > 0:
            self._checking[address] = left
        else:
            self._checking.pop(address, None)

    def failed(self, address: str) -> None:
        failures = self._recent(address)
        failures.append(self.clock.seconds())
        self._failures[address] = failures
        self._failures.move_to_end(address)
        while len(self._failures) > MAX_ADDRESSES:
            self._failures.popitem(last=False)

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)

    def _recent(self, address: str) -> Deque[float]:
        failures = self._failures.get(address) or deque()
        cutoff = self.clock.seconds() - self.window
        while failures and failures[0] <= cutoff:
            failures.popleft()
        return failures


def users_from(table: Mapping[str, str]) -> Dict[str, str]:
    """The configured users (name -> hash), each hash checked (BadHash naming the user)."""
    users = {}
    for name, stored in table.items():
        try:
            parse_hash(stored)
        except BadHash as error:
            raise BadHash(f"{name}: {error}") from None
        users[name] = stored
    return users
