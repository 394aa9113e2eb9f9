"""The set of vLLM engines prefloop answers with: their health, the adapters on each, routing.

Each :class:`Replica` is one vLLM OpenAI server, supervised (a :class:`VLLMServer`) or
external (a URL). :class:`Replicas` keeps the set of adapters the loop wants served and brings
every engine to it by reconciliation: it lists what an engine serves (``GET /v1/models``),
loads what is missing and unloads what is ours but no longer wanted, through vLLM's runtime
LoRA endpoints (loopback or a private network only: they load files from any path). The
same listing is the health check; a watcher thread runs it every ``watch_every`` seconds.

A replica that fails (a refused connection, a broken stream, a 5xx, a listing that times
out) is taken out at once; when it answers again it is reconciled first and only then used.
A request goes to the least-busy replica that is up and has all its adapters.

Built from a bare :class:`Endpoint` (:meth:`Replicas.single`), the set is one replica that is
never taken out and is assumed to serve whatever it is asked for: the behaviour of a single
vLLM before replicas existed (nothing would watch it and bring it back).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from prefloop.names import BASE
from prefloop.serving.vllm_server import Endpoint, VLLMServer

log = logging.getLogger(__name__)


class AdapterError(RuntimeError):
    """An adapter folder cannot be served; the message says why."""


class ServerUnreachable(AdapterError):
    """The model server did not answer (e.g. it is restarting): the adapter may be fine."""


class NoReplica(RuntimeError):
    """No replica that is up serves every policy a request needs."""


@dataclass(eq=False)
class Replica:
    """One vLLM OpenAI server and what prefloop knows of it."""

    name: str  # local-1, external-1, …: never its address (shown on public pages)
    endpoint: Endpoint
    server: VLLMServer | None = None  # supervised by prefloop, else external
    timeout: float = 120.0  # seconds for a load or unload (vLLM reads the files)
    up: bool = False
    loaded: dict[str, str] = field(default_factory=dict)  # served name -> path it came from
    in_flight: int = 0  # requests streaming from it now
    error: str | None = None  # why it was last taken out, or an adapter it refused
    since: float = field(default_factory=time.monotonic)  # when `up` last changed
    lock: threading.Lock = field(default_factory=threading.Lock)  # one reconcile at a time

    def __post_init__(self) -> None:
        self._http = httpx.Client(base_url=self.endpoint.url.rstrip("/"), timeout=self.timeout,
                                  headers={"Authorization": f"Bearer {self.endpoint.api_key}"})

    def close(self) -> None:
        self._http.close()

    def models(self, timeout: float) -> dict[str, str | None]:
        """Served name -> path (``root``) of everything it serves (``GET /v1/models``)."""
        try:
            response = self._http.get("/v1/models", timeout=timeout)
            response.raise_for_status()
            return {model["id"]: model.get("root") for model in response.json()["data"]}
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            raise ServerUnreachable(f"{self.name} did not list its models: {exc!r}") from None

    def load(self, name: str, path: str) -> None:
        self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})

    def unload(self, name: str) -> None:
        self._post("/v1/unload_lora_adapter", {"lora_name": name})

    def _post(self, path: str, body: dict[str, str]) -> None:
        try:
            response = self._http.post(path, json=body)
        except httpx.HTTPError as exc:
            raise ServerUnreachable(f"{self.name} did not answer {path}: {exc!r}") from None
        if response.status_code in (502, 503, 504):  # a proxy or server with nothing behind
            raise ServerUnreachable(f"{self.name} answered {path} with "
                                    f"{response.status_code}")
        if response.status_code != 200:
            raise AdapterError(f"the model server {self.name} refused {body['lora_name']} "
                               f"({response.status_code}): {response.text[:300]}")

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "local" if self.server else "external",
                "up": self.up, "adapters": sorted(n for n in self.loaded if n != BASE),
                "in_flight": self.in_flight, "error": self.error,
                "restarts": self.server.restarts if self.server else None}


class Replicas:
    """vLLM engines kept serving the wanted adapters; routing and failover between them.

    Thread-safe: the web event loop routes and reports failures, round threads want and
    unwant adapters, the watcher thread reconciles. ``owns(name)`` says which served names
    are this prefloop's (only those are ever unloaded: others may share the engine).
    """

    def __init__(self, replicas: Iterable[Replica], owns: Callable[[str], bool], *,
                 watch_every: float = 2.0, probe_timeout: float = 10.0,
                 static: bool = False) -> None:
        self.replicas = list(replicas)
        assert self.replicas and len({r.name for r in self.replicas}) == len(self.replicas)
        assert not static or len(self.replicas) == 1
        self.owns = owns
        self.watch_every = watch_every
        self.probe_timeout = probe_timeout
        self.static = static
        self.reconciles = 0  # finished reconcile passes (tests wait on it)
        self._wanted: dict[str, Path] = {}  # served name -> adapter folder
        self._lock = threading.Lock()
        self._turn = itertools.count()  # spreads ties between equally busy replicas
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        if static:
            self.replicas[0].up = True

    @classmethod
    def single(cls, endpoint: Endpoint, owns: Callable[[str], bool],
               timeout: float = 120.0) -> Replicas:
        """One engine, never taken out, routing every request: one vLLM as before."""
        return cls([Replica("local-1", endpoint, timeout=timeout)], owns, static=True)

    # -- the wanted set ---------------------------------------------------------------------

    @property
    def wanted(self) -> dict[str, Path]:
        with self._lock:
            return dict(self._wanted)

    def want(self, name: str, path: Path) -> None:
        """Serve ``name`` from ``path`` on every replica from now on. A name is never given
        other files (vLLM caches by name): :class:`AdapterError` if it was."""
        path = Path(path).resolve()
        with self._lock:
            if self._wanted.get(name, path) != path:
                raise AdapterError(f"{name} is served from {self._wanted[name]}; a name is "
                                   f"never reused for other files ({path})")
            self._wanted[name] = path

    def unwant(self, names: Iterable[str]) -> None:
        with self._lock:
            for name in names:
                self._wanted.pop(name, None)

    def serving(self, name: str) -> bool:
        """True when some replica that is up has ``name`` (``base``: any replica up)."""
        with self._lock:
            return any(r.up and (name == BASE or name in r.loaded) for r in self.replicas)

    def everywhere(self, name: str) -> bool:
        """True when every replica that is up has ``name``, and one is up."""
        with self._lock:
            up = [r for r in self.replicas if r.up]
            return bool(up) and all(name in r.loaded for r in up)

    # -- reconciliation ---------------------------------------------------------------------

    def reconcile(self, replica: Replica) -> dict[str, str]:
        """Bring ``replica`` to the wanted set; it is up afterwards if it answered. Returns
        the adapters it refused, with why. :class:`ServerUnreachable` when it did not answer
        (it is then down, unless the set is static)."""
        with replica.lock:
            try:
                refused = self._reconcile(replica)
            except ServerUnreachable as exc:
                self.failed(replica, str(exc))
                raise
            with self._lock:
                if not replica.up:
                    log.warning("replica %s is up (adapters: %s)", replica.name,
                                ", ".join(sorted(set(replica.loaded) - {BASE})) or "none")
                    replica.up, replica.since = True, time.monotonic()
                replica.error = "; ".join(refused.values()) or None
                self.reconciles += 1
            return refused

    def _reconcile(self, replica: Replica) -> dict[str, str]:
        listed = replica.models(self.probe_timeout)
        wanted = self.wanted
        with self._lock:  # what it really serves; routing sees only that
            replica.loaded = {n: root or "" for n, root in listed.items()}
        refused: dict[str, str] = {}
        for name, path in wanted.items():
            root = listed.get(name)
            if name in listed and root == str(path):
                continue
            if name in listed:  # our name, other files: left by an earlier run; never serve it
                self._drop(replica, name)
            try:
                replica.load(name, str(path))
            except ServerUnreachable:
                raise
            except AdapterError as exc:
                refused[name] = str(exc)
                log.error("replica %s refused %s: %s", replica.name, name, exc)
                continue
            with self._lock:
                replica.loaded[name] = str(path)
        for name in listed:
            if self.owns(name) and name not in wanted:
                self._drop(replica, name)
        return refused

    def _drop(self, replica: Replica, name: str) -> None:
        with self._lock:  # out of routing before vLLM forgets it
            replica.loaded.pop(name, None)
        try:
            replica.unload(name)
        except ServerUnreachable:
            raise
        except AdapterError as exc:  # gone already (e.g. it restarted meanwhile)
            log.warning("unloading %s from %s: %s", name, replica.name, exc)

    def sync(self) -> tuple[dict[str, dict[str, str]], list[str]]:
        """Reconcile every replica now (those down too: one may be back). Returns, per
        replica, the adapters it refused, and the replicas that did not answer."""
        refused: dict[str, dict[str, str]] = {}
        unreachable: list[str] = []
        for replica in self.replicas:
            try:
                refused[replica.name] = self.reconcile(replica)
            except ServerUnreachable:
                unreachable.append(replica.name)
        return refused, unreachable

    def restarted(self, replica: Replica) -> None:
        """A supervised replica came back (an empty vLLM): reconcile it before it is used."""
        self.failed(replica, "restarted")
        try:
            self.reconcile(replica)
        except ServerUnreachable as exc:
            log.error("replica %s restarted but does not answer: %s", replica.name, exc)

    # -- routing ----------------------------------------------------------------------------

    def acquire(self, names: set[str], exclude: Iterable[Replica] = ()) -> Replica:
        """The least-busy replica that is up and serves every name in ``names``, its
        request counted until :meth:`release`. :class:`NoReplica` when there is none."""
        exclude = set(exclude)
        needed = names - {BASE}
        with self._lock:
            able = [r for r in self.replicas if r.up and r not in exclude
                    and (self.static or needed <= r.loaded.keys())]
            if not able:
                up = sum(r.up for r in self.replicas)
                raise NoReplica(f"no replica serves {', '.join(sorted(names))} now "
                                f"({up} of {len(self.replicas)} up)")
            least = min(r.in_flight for r in able)
            ties = [r for r in able if r.in_flight == least]
            replica = ties[next(self._turn) % len(ties)]
            replica.in_flight += 1
            return replica

    def release(self, replica: Replica) -> None:
        with self._lock:
            replica.in_flight -= 1

    def failed(self, replica: Replica, why: str) -> None:
        """Take ``replica`` out at once (the watcher brings it back once it answers and is
        reconciled). A static set never takes its one replica out."""
        if self.static:
            return
        with self._lock:
            was_up, replica.up, replica.error = replica.up, False, why
            if was_up:
                replica.since = time.monotonic()
        if was_up:
            log.error("replica %s taken out: %s", replica.name, why)

    def lost(self, replica: Replica, name: str) -> None:
        """``replica`` said it does not serve ``name`` (vLLM's 404): route around it until
        the next reconcile loads it again."""
        with self._lock:
            replica.loaded.pop(name, None)

    def others_up(self, replica: Replica) -> bool:
        with self._lock:
            return any(r.up for r in self.replicas if r is not replica)

    # -- the watcher ------------------------------------------------------------------------

    def start(self) -> None:
        """Reconcile every replica once, then every ``watch_every`` seconds in a thread."""
        assert not self.static, "a static replica set is not watched"
        self.sync()
        self._watcher = threading.Thread(target=self._watch, name="vllm-replicas",
                                         daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while not self._stop.wait(self.watch_every):
            for replica in self.replicas:
                if self._stop.is_set():
                    return
                try:
                    self.reconcile(replica)
                except ServerUnreachable:
                    pass  # down; reported when it was taken out
                except Exception:  # the watcher must outlive any one replica's surprise
                    log.exception("reconciling replica %s failed", replica.name)

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(timeout=self.probe_timeout + 5)
        for replica in self.replicas:
            replica.close()

    def status(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r.status() for r in self.replicas]

    def first_up(self, names: set[str] = frozenset()) -> Replica:
        """A replica that is up and has ``names`` (for work outside routing, e.g. the KL
        probe); the first replica when none is."""
        try:
            replica = self.acquire(set(names))
        except NoReplica:
            return self.replicas[0]
        self.release(replica)
        return replica
