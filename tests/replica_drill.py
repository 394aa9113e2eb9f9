"""A ``prefloop serve`` with real vLLM replicas, seen from outside, for
``tests/test_replicas_vllm.py`` and ``bench/replicas.py``.

- :class:`Engine`: one vLLM OpenAI server (its address and API key): what it serves, its
  counters. A local replica's address and key are read from its own process
  (:func:`local_replica`): the serve shows neither, by design.
- :class:`Burst`: visitors asking for a pair and voting on it without pause, from threads,
  with every request's outcome logged.
- :func:`new_adapter`: an adapter folder that appears complete at once, as a round's does.
"""

from __future__ import annotations

import math
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import metric_sum

CHAT = "/v1/chat/completions"


@dataclass(frozen=True)
class Engine:
    """One vLLM OpenAI server."""

    url: str  # http://127.0.0.1:PORT (no /v1)
    api_key: str

    def models(self, timeout: float = 30.0) -> dict[str, str | None]:
        """Served name -> path (``root``) of everything it serves (``GET /v1/models``)."""
        response = httpx.get(self.url + "/v1/models", timeout=timeout,
                             headers={"Authorization": f"Bearer {self.api_key}"})
        response.raise_for_status()
        return {model["id"]: model.get("root") for model in response.json()["data"]}

    def lists(self, name: str, path: Path | str) -> bool:
        """True when it serves ``name`` from ``path``; False also when it does not answer."""
        try:
            return self.models().get(name) == str(path)
        except httpx.HTTPError:
            return False

    def unload(self, name: str) -> None:
        """Unload an adapter by hand, as its operator might (or a restart would)."""
        response = httpx.post(self.url + "/v1/unload_lora_adapter", json={"lora_name": name},
                              headers={"Authorization": f"Bearer {self.api_key}"}, timeout=120)
        response.raise_for_status()

    def metric(self, name: str, **labels: str) -> float:
        """A counter of its ``/metrics`` (no key needed), summed over the samples with these
        labels; 0 before the first."""
        page = httpx.get(self.url + "/metrics", timeout=30).text
        try:
            return metric_sum(page, name, **labels)
        except KeyError:
            return 0.0

    def tokens(self) -> float:
        """Tokens it has generated so far."""
        return self.metric("vllm:generation_tokens_total")

    def chats(self, status: str = "2xx") -> float:
        """Chat completion requests it has answered with ``status`` (``2xx``, ``4xx``, …:
        the class its HTTP instrumentation counts by)."""
        return self.metric("http_requests_total", handler=CHAT, status=status)


def pid_file(data_dir: Path, index: int) -> Path:
    """Local replica ``index``'s pid file, named as ``app/server._vllm_server`` names its
    log: ``vllm`` for the first, then ``vllm-2``, ``vllm-3``, …"""
    return data_dir / "logs" / ("vllm.pid" if index == 0 else f"vllm-{index + 1}.pid")


def local_replica(data_dir: Path, index: int) -> tuple[int, Engine]:
    """Local replica ``index`` (0: ``local-1``) of the serve on ``data_dir``: the process
    group to kill it with, and its endpoint from its leader's command line."""
    pgid = int(pid_file(data_dir, index).read_text())
    argv = Path(f"/proc/{pgid}/cmdline").read_bytes().decode().split("\0")
    port, key = argv[argv.index("--port") + 1], argv[argv.index("--api-key") + 1]
    return pgid, Engine(f"http://127.0.0.1:{port}", key)


def process_env(pid: int) -> dict[str, str]:
    """The environment a process was started with."""
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


def new_adapter(source: Path, adapters_dir: Path, name: str) -> Path:
    """``source``'s files as adapter ``name`` in ``adapters_dir``: copied beside it and
    renamed into place, so that the folder appears complete at once, as a round's trainer
    writes it (a ``.vNNNN.tmp-*`` folder is never served). Returns its resolved path."""
    adapters_dir.mkdir(parents=True, exist_ok=True)
    tmp = adapters_dir / f".{name}.tmp-drill"
    shutil.copytree(source, tmp)
    tmp.rename(adapters_dir / name)
    return (adapters_dir / name).resolve()


def replica_rows(url: str) -> dict[str, dict[str, Any]]:
    """Each replica as the serve at ``url`` reports it (``/api/v1/stats``), by name
    (``local-1``, ``external-1``, …): up, adapters (policies), in_flight, error, restarts."""
    stats = httpx.get(url + "/api/v1/stats", timeout=60).json()
    return {row["name"]: row for row in stats["loop"]["replicas"]}


@dataclass
class Request:
    """One request of a :class:`Burst` and what came of it (times: ``time.monotonic``)."""

    kind: str  # "pair" or "vote"
    client: int
    start: float
    end: float = math.nan
    status: int | None = None  # None: no HTTP answer at all (a dropped connection)
    retry_after: str | None = None
    error: str | None = None  # the connection error, or the reply's body when not 200
    pair_id: str | None = None  # the pair asked for, or voted on
    policy: str | None = None  # a pair's answer A policy (a sample pair's both)

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def turned_away(self) -> bool:
        """429 or 503 with ``Retry-After``: come back later (e.g. a pair whose replica died
        while it streamed)."""
        return self.status in (429, 503) and bool(self.retry_after)

    @property
    def server_error(self) -> bool:
        """A failure that tells the visitor nothing to do: a 5xx without ``Retry-After``,
        or no answer at all."""
        return self.status is None or (self.status >= 500 and not self.turned_away)


class Burst:
    """``clients`` visitors of the serve at ``url``, each with its own cookie (client id),
    each asking for a pair in a new conversation and voting ``choice`` on it, without pause,
    until :meth:`stop` (or the ``with`` block ends). A visitor turned away waits as told."""

    def __init__(self, url: str, clients: int, *, choice: str = "a",
                 timeout: float = 300.0) -> None:
        self.url, self.choice, self.timeout = url, choice, timeout
        self._log: list[Request] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._visit, args=(k,), daemon=True,
                                          name=f"visitor-{k}") for k in range(clients)]

    def __enter__(self) -> Burst:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop asking; returns once every visitor's last request has its answer."""
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 30)

    def log(self) -> list[Request]:
        """Every request with an answer (or none) so far, in the order they ended."""
        with self._lock:
            return list(self._log)

    def pairs(self, since: float = -math.inf, policy: str | None = None) -> list[Request]:
        """Pairs answered (200) that were asked for at or after ``since``, by ``policy`` if
        given."""
        return [r for r in self.log() if r.kind == "pair" and r.ok and r.start >= since
                and policy in (None, r.policy)]

    def acknowledged(self) -> list[str]:
        """The pairs whose vote was acknowledged (200)."""
        return [r.pair_id for r in self.log() if r.kind == "vote" and r.ok and r.pair_id]

    def _visit(self, k: int) -> None:
        with httpx.Client(base_url=self.url, timeout=self.timeout) as http:
            http.get("/healthz")  # the middleware gives this visitor its client id
            i = 0
            while not self._stop.is_set():
                i += 1
                pair = self._send(http, k, "pair", "/api/v1/pairs",
                                  {"message": f"Name a fruit and say why you like it ({k}.{i})."})
                if pair.ok:
                    self._send(http, k, "vote", "/api/v1/votes",
                               {"pair_id": pair.pair_id, "choice": self.choice})
                elif pair.turned_away:
                    self._stop.wait(float(pair.retry_after or 1))
                else:  # logged; do not hammer a server that fails
                    self._stop.wait(1.0)

    def _send(self, http: httpx.Client, k: int, kind: str, path: str,
              body: dict[str, str]) -> Request:
        entry = Request(kind, k, time.monotonic(), pair_id=body.get("pair_id"))
        try:
            response = http.post(path, json=body)
        except httpx.HTTPError as exc:
            entry.error = repr(exc)
        else:
            entry.status = response.status_code
            entry.retry_after = response.headers.get("Retry-After")
            if response.status_code == 200 and kind == "pair":
                reply = response.json()
                entry.pair_id, entry.policy = reply["pair_id"], reply["a"]["policy"]
            elif response.status_code != 200:
                entry.error = response.text[:300]
        entry.end = time.monotonic()
        with self._lock:
            self._log.append(entry)
        return entry
