"""Who is asking and how much they may ask: client cookies, rate limits, generation caps.

Clients are told apart by a random id in the ``prefloop_client`` cookie, set on the first
response. IP addresses are never stored: where a limit counts them they are kept in memory as
a keyed hash whose key is random per process.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from typing import Any

from prefloop.config import Settings
from prefloop.names import is_hex_id

COOKIE = "prefloop_client"
COOKIE_MAX_AGE = 365 * 86400


class Refused(Exception):
    """A request turned away for now; the client may retry after ``retry_after`` seconds."""

    status = 429

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = max(1, math.ceil(retry_after))


class TooMany(Refused):
    """This client asked for more than its share (HTTP 429)."""


class Busy(Refused):
    """The server is at capacity for everyone (HTTP 503)."""

    status = 503


@dataclass(frozen=True)
class Client:
    """One visitor: its cookie id, and its address as a salted hash (``None`` if unknown)."""

    id: str
    ip_hash: str | None = None


def parse_client_id(cookie_header: str) -> str | None:
    """The client id in a ``Cookie`` header, if there is a well-formed one."""
    cookies: SimpleCookie = SimpleCookie()
    try:
        cookies.load(cookie_header)
    except CookieError:
        return None
    morsel = cookies.get(COOKIE)
    if morsel is None or not is_hex_id(morsel.value):
        return None
    return morsel.value


class ClientCookies:
    """ASGI middleware: every HTTP request carries a client id in its cookies.

    A request without a valid ``prefloop_client`` cookie gets a new random id, added to the
    request's own ``Cookie`` header (so the page and the API see it at once) and set on the
    response. Pure ASGI, so streamed responses pass through untouched.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = list(scope["headers"])
        sent = b"; ".join(value for name, value in headers if name == b"cookie")
        if parse_client_id(sent.decode("latin-1")) is not None:
            await self.app(scope, receive, send)
            return
        client_id = secrets.token_hex(16)
        pair = f"{COOKIE}={client_id}".encode()
        headers = [(n, v) for n, v in headers if n != b"cookie"]
        headers.append((b"cookie", sent + b"; " + pair if sent else pair))
        set_cookie = (f"{COOKIE}={client_id}; Path=/; Max-Age={COOKIE_MAX_AGE}; HttpOnly; "
                      "SameSite=Lax").encode()

        async def send_with_cookie(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message,
                           "headers": [*message.get("headers", []), (b"set-cookie", set_cookie)]}
            await send(message)

        await self.app({**scope, "headers": headers}, receive, send_with_cookie)


class Window:
    """At most ``limit`` events per ``period`` seconds for each key (a sliding window).

    Memory is bounded: past ``max_keys`` keys the least recently seen are forgotten.
    """

    def __init__(self, limit: int, period: float = 60.0, *, max_keys: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.period, self.max_keys, self.clock = limit, period, max_keys, clock
        self._events: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def hit(self, key: str) -> float | None:
        """Count one event for ``key``; ``None`` if allowed, else seconds until it would be."""
        now = self.clock()
        with self._lock:
            events = self._events.get(key)
            if events is None:
                events = self._events[key] = deque()
                while len(self._events) > self.max_keys:
                    self._events.popitem(last=False)
            self._events.move_to_end(key)
            while events and events[0] <= now - self.period:
                events.popleft()
            if len(events) >= self.limit:
                return events[0] + self.period - now
            events.append(now)
            return None

    def wait(self, key: str) -> float | None:
        """Seconds until ``key`` may have another event (``None``: now); counts nothing."""
        now = self.clock()
        with self._lock:
            events = self._events.get(key)
            live = [t for t in events or () if t > now - self.period]
            return live[0] + self.period - now if len(live) >= self.limit else None


class Guard:
    """The limits of :class:`Settings` applied to clients (``None``: an internal caller such
    as the simulator, held only to the overall cap)."""

    BUSY_RETRY_S = 5.0
    ADMIN_GUESSES_PER_MINUTE = 10

    def __init__(self, settings: Settings, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings

        def window(limit: int) -> Window | None:
            return Window(limit, clock=clock) if limit > 0 else None

        self._pairs = window(settings.pairs_per_minute)
        self._votes = window(settings.votes_per_minute)
        self._ip_pairs = window(settings.ip_pairs_per_minute)
        self._admin_misses = Window(self.ADMIN_GUESSES_PER_MINUTE, clock=clock)
        self._salt = secrets.token_bytes(32)  # in memory only: the hashes die with the process
        self._lock = threading.Lock()
        self._running: Counter[str] = Counter()
        self.running = 0
        self.refused: Counter[str] = Counter()  # by reason, for /metrics

    def client(self, client_id: str, host: str | None) -> Client:
        return Client(client_id, self.hash_ip(host) if host else None)

    def hash_ip(self, host: str) -> str:
        return hmac.new(self._salt, host.encode(), hashlib.sha256).hexdigest()[:32]

    def _refuse(self, error: Refused, reason: str) -> Refused:
        with self._lock:
            self.refused[reason] += 1
        return error

    def admin_blocked(self, host: str | None) -> int | None:
        """Seconds an admin attempt from ``host`` must wait: past 10 wrong passwords a
        minute from one address, every attempt waits (so at most 10 guesses a minute).
        ``None``: go ahead."""
        wait = self._admin_misses.wait(self.hash_ip(host or "unknown"))
        return None if wait is None else max(1, math.ceil(wait))

    def admin_missed(self, host: str | None) -> None:
        self._admin_misses.hit(self.hash_ip(host or "unknown"))
        with self._lock:
            self.refused["admin_password"] += 1

    def admit_vote(self, client: Client | None) -> None:
        if client is None or self._votes is None:
            return
        if (wait := self._votes.hit(client.id)) is not None:
            raise self._refuse(TooMany(
                f"too many votes: at most {self.settings.votes_per_minute} a minute; try again "
                f"in {max(1, round(wait))} s", wait), "votes_per_minute")

    @contextmanager
    def generation(self, client: Client | None) -> Iterator[None]:
        """Hold one of the generation slots while a pair is written (:class:`TooMany` or
        :class:`Busy` if none is free, :class:`TooMany` past the client's pair rate)."""
        s = self.settings
        with self._lock:
            if client is not None and self._running[client.id] >= s.client_generations:
                self.refused["client_generations"] += 1
                raise TooMany(f"you already have {s.client_generations} pairs being written; "
                              "wait for them to finish", 2.0)
            if self.running >= s.max_generations:
                self.refused["max_generations"] += 1
                raise Busy("the server is writing as many answers as it can; try again in "
                           f"{self.BUSY_RETRY_S:g} s", self.BUSY_RETRY_S)
            if client is not None:
                for window, key, setting in ((self._pairs, client.id, "pairs_per_minute"),
                                             (self._ip_pairs, client.ip_hash,
                                              "ip_pairs_per_minute")):
                    if window is None or key is None:
                        continue
                    if (wait := window.hit(key)) is not None:
                        self.refused[setting] += 1
                        raise TooMany(f"too many messages: at most {window.limit} a minute "
                                      f"({setting}); try again in {max(1, round(wait))} s",
                                      wait)
                self._running[client.id] += 1
            self.running += 1
        try:
            yield
        finally:
            with self._lock:
                self.running -= 1
                if client is not None:
                    self._running[client.id] -= 1
                    if self._running[client.id] <= 0:
                        del self._running[client.id]
