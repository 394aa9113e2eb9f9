"""The champion's own turns on a vLLM engine without LoRA, switched blue-green
(``champion_engine = "merged"``).

On vLLM's CPU build an engine with LoRA enabled answers base 1.6x slower than one without,
and an adapter 3x slower (docs/BENCHMARKS.md). Most turns are the champion's own (a sample
pair: both answers from it), so :class:`ChampionEngine` keeps one more vLLM, started with no
``--enable-lora``, that serves the champion alone: the base model folder as it is for
``base``, the adapter merged into the weights (``serving/merged.py``) for ``vNNNN``. It
serves it under the policy's served name, so a request meant for another policy can never
be answered by it (vLLM says 404). Duels, candidates and the KL probe stay on the LoRA
replicas (``serving/replicas.py``), which also take the champion's turns whenever this
engine is not serving the champion: while a new one starts, after a failed start, while it
is down.

The switch is blue-green, in two slots: the new engine starts in the free slot, passes
vLLM's health check and answers one request, and only then takes the champion's traffic;
the old one drains (the streams it has finish) and stops. A switch waits for the previous
drain, so at most two plain engines run at once. A failed start leaves traffic where it
was; the error shows in the status and ``/metrics``, and the switch is tried again after
``retry_after`` seconds (doubling).

One thread does all of it (reconcile: health, drains, switches), and it is the thread that
starts the engines: a child told to die with its parent (``PR_SET_PDEATHSIG``) dies when the
thread that started it ends, so that thread must live as long as the engines.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx

from prefloop.serving.merged import remove_unused
from prefloop.serving.replicas import Replica, ServerUnreachable
from prefloop.serving.vllm_server import Endpoint, group_rss

log = logging.getLogger(__name__)

SLOTS = ("blue", "green")


class Engine(Protocol):
    """A vLLM server that :meth:`start` blocks on until it is healthy (a
    :class:`~prefloop.serving.vllm_server.VLLMServer` with ``lora=False``)."""

    def start(self) -> Endpoint: ...

    def stop(self) -> None: ...

    @property
    def pid(self) -> int | None: ...


# (model folder, served name, slot) -> an engine not started yet
Launch = Callable[[Path, str, str], Engine]


@dataclass(eq=False)
class PlainEngine:
    """One engine without LoRA serving one policy."""

    policy: str
    served: str  # the name vLLM serves it under: the policy's served name
    model: Path
    engine: Engine
    replica: Replica  # its endpoint, up, requests in flight
    start_seconds: float  # from the switch's start (merge included) to its first answer
    draining_since: float | None = None

    def row(self) -> dict[str, Any]:
        """A row like :meth:`Replica.status`'s, with what the plain engine adds."""
        pid = self.engine.pid
        return {"name": self.replica.name, "kind": "champion", "up": self.replica.up,
                "adapters": [], "in_flight": self.replica.in_flight,
                "error": self.replica.error,
                "restarts": getattr(self.engine, "restarts", None), "policy": self.policy,
                "draining": self.draining_since is not None,
                "start_seconds": round(self.start_seconds, 2),
                "memory_bytes": group_rss(pid) if pid else None}


class ChampionEngine:
    """The plain engine serving the champion, kept in step with ``champion()``.

    ``model_for(policy)`` gives the folder to serve (the base model, or the merged one; it
    may take minutes and may raise), ``served_name(policy)`` the name to serve it under,
    ``launch`` builds the engine. Thread-safe: the event loop acquires and releases, the
    engine's thread switches and drains.
    """

    def __init__(self, launch: Launch, champion: Callable[[], str],
                 model_for: Callable[[str], Path], served_name: Callable[[str], str], *,
                 watch_every: float = 2.0, drain_timeout: float = 300.0,
                 retry_after: float = 60.0, probe_timeout: float = 10.0,
                 answer_timeout: float = 120.0, merged_dir: Path | None = None) -> None:
        self.launch = launch
        self.champion = champion
        self.model_for = model_for
        self.served_name = served_name
        self.watch_every = watch_every
        self.drain_timeout = drain_timeout  # then it stops, streams or not (request timeout)
        self.retry_after = retry_after
        self.probe_timeout = probe_timeout
        self.answer_timeout = answer_timeout
        self.merged_dir = merged_dir  # merged folders no engine serves are removed from it
        self.current: PlainEngine | None = None
        self.draining: list[PlainEngine] = []
        self.switching: str | None = None  # the policy a new engine is starting for
        self.switches = 0  # switches done
        self.failures = 0  # switches that failed (the engine did not start or answer)
        self.error: str | None = None  # why the last switch failed, until one succeeds
        self.passes = 0  # finished reconcile passes (tests wait on it)
        self._retry: dict[str, tuple[float, float]] = {}  # policy -> (next try, pause)
        self._starting: Engine | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- routing ------------------------------------------------------------------------------

    def acquire(self, served: str, exclude: Iterable[Replica] = ()) -> Replica | None:
        """The engine serving ``served`` with its request counted until :meth:`release`,
        or None (then the LoRA replicas answer)."""
        exclude = set(exclude)
        with self._lock:
            current = self.current
            if current is None or current.served != served or not current.replica.up \
                    or current.replica in exclude:
                return None
            current.replica.in_flight += 1
            return current.replica

    def owns(self, replica: Replica) -> bool:
        """True for the replica of a plain engine (current or draining)."""
        with self._lock:
            return any(e.replica is replica for e in self._engines())

    def release(self, replica: Replica) -> None:
        with self._lock:
            replica.in_flight -= 1

    def failed(self, replica: Replica, why: str) -> None:
        """Take the engine out of routing until its health check passes again."""
        with self._lock:
            was_up, replica.up, replica.error = replica.up, False, why
        if was_up:
            log.error("champion engine %s taken out: %s", replica.name, why)

    def _engines(self) -> list[PlainEngine]:
        return ([self.current] if self.current else []) + self.draining

    # -- the engine's thread ------------------------------------------------------------------

    def start(self) -> None:
        """Bring the engine to the champion now and every ``watch_every`` seconds, in a
        thread (start it from a thread that lives as long as prefloop: this one is)."""
        self._thread = threading.Thread(target=self._watch, name="champion-engine",
                                        daemon=True)
        self._thread.start()

    def poke(self) -> None:
        """Reconcile now (e.g. the champion just changed) rather than at the next pass."""
        self._wake.set()

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                self.reconcile()
            except Exception:  # the thread must outlive any surprise; the engine stays
                log.exception("champion engine: reconcile failed")
            self._wake.wait(self.watch_every)
            self._wake.clear()

    def reconcile(self) -> None:
        """One pass: health of the current engine, drains that are done, then a switch if
        the champion is not what the current engine serves."""
        self._check_health()
        self._finish_drains()
        wanted = self.champion()
        with self._lock:
            current, draining = self.current, bool(self.draining)
        serving = current is not None and current.policy == wanted
        # A switch waits for the previous drain (two slots) and for its retry time.
        waiting = draining or time.monotonic() < self._retry.get(wanted, (0.0, 0.0))[0]
        if not serving and not waiting and not self._stop.is_set():
            self.switch(wanted)
        self.passes += 1

    def _check_health(self) -> None:
        with self._lock:
            current = self.current
        if current is None:
            return
        replica = current.replica
        try:
            listed = replica.models(self.probe_timeout)
        except ServerUnreachable as exc:
            self.failed(replica, str(exc))
            return
        if current.served not in listed:
            self.failed(replica, f"it does not list {current.served}")
            return
        with self._lock:
            if not replica.up:
                log.warning("champion engine %s is back", replica.name)
                replica.up, replica.error = True, None

    def _finish_drains(self) -> None:
        now = time.monotonic()
        with self._lock:
            done = [e for e in self.draining if e.replica.in_flight == 0
                    or now - (e.draining_since or now) > self.drain_timeout]
            self.draining = [e for e in self.draining if e not in done]
            in_use = [e.model for e in self._engines()]
        for engine in done:
            if engine.replica.in_flight:
                log.warning("champion engine %s stops with %d requests still streaming "
                            "after %g s", engine.replica.name, engine.replica.in_flight,
                            self.drain_timeout)
            self._stop_engine(engine)
            log.info("champion engine %s (%s) drained and stopped", engine.replica.name,
                     engine.policy)
        if done and self.merged_dir is not None:
            remove_unused(self.merged_dir, in_use)

    def switch(self, policy: str) -> bool:
        """Start an engine for ``policy`` in the free slot; once it is healthy and has
        answered, it takes the champion's traffic and the old one drains. False (and the
        traffic where it was) when it fails."""
        served = self.served_name(policy)
        with self._lock:
            used = {e.replica.name for e in self._engines()}
            slot = next(s for s in SLOTS if f"champion-{s}" not in used)
            self.switching = policy
        began = time.monotonic()
        engine: Engine | None = None
        replica: Replica | None = None
        try:
            model = self.model_for(policy)
            engine = self._starting = self.launch(model, served, slot)
            endpoint = engine.start()
            replica = Replica(f"champion-{slot}", endpoint, timeout=self.answer_timeout)
            self._check_answers(replica, served)
            if self._stop.is_set():
                raise RuntimeError("prefloop is stopping")
        except Exception as exc:  # whatever the new engine did, the current one stays
            if engine is not None:
                _quietly(engine.stop)
            if replica is not None:
                replica.close()
            with self._lock:
                self.failures += 1
                self.error = f"{policy}: {_short(str(exc) or repr(exc))}"
                self.switching, self._starting = None, None
            pause = min(self._retry.get(policy, (0.0, self.retry_after / 2))[1] * 2, 3600.0)
            self._retry[policy] = (time.monotonic() + pause, pause)
            log.error("champion engine for %s did not start; traffic stays where it was, "
                      "next try in %g s: %s", policy, pause, exc)
            return False
        new = PlainEngine(policy, served, model, engine, replica, time.monotonic() - began)
        replica.up = True
        with self._lock:
            old, self.current = self.current, new
            if old is not None:
                old.draining_since = time.monotonic()
                self.draining.append(old)
            self.switching, self._starting, self.error = None, None, None
            self.switches += 1
        self._retry.pop(policy, None)
        log.info("champion engine %s serves %s (started in %.1f s)%s", replica.name, policy,
                 new.start_seconds, f"; {old.replica.name} drains" if old else "")
        return True

    def _check_answers(self, replica: Replica, served: str) -> None:
        """One short request: healthy is not yet answering (the model may fail to run)."""
        endpoint = replica.endpoint
        response = httpx.post(endpoint.v1 + "/chat/completions", timeout=self.answer_timeout,
                              headers={"Authorization": f"Bearer {endpoint.api_key}"},
                              json={"model": served, "max_tokens": 1, "temperature": 0,
                                    "seed": 0,
                                    "messages": [{"role": "user", "content": "Hello"}]})
        try:
            answered = response.status_code == 200 and bool(response.json()["choices"])
        except (ValueError, KeyError, TypeError):
            answered = False
        if not answered:
            raise RuntimeError(f"its first request failed ({response.status_code}): "
                               f"{response.text[:200]}")

    def _stop_engine(self, engine: PlainEngine) -> None:
        _quietly(engine.engine.stop)
        engine.replica.close()

    def close(self) -> None:
        """Stop the thread (and an engine it is starting), then every engine."""
        self._stop.set()
        self._wake.set()
        if (starting := self._starting) is not None:
            _quietly(starting.stop)  # its start() then fails at once
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=60)
        with self._lock:
            engines, self.current, self.draining = self._engines(), None, []
        for engine in engines:
            self._stop_engine(engine)

    # -- what shows it ------------------------------------------------------------------------

    def rows(self) -> list[dict[str, Any]]:
        """Each plain engine as a replica row (``kind`` champion), for status and metrics."""
        with self._lock:
            engines = self._engines()
        return [e.row() for e in engines]

    def summary(self) -> dict[str, Any]:
        """What it serves, a switch under way, switches done and failed, the last error."""
        with self._lock:
            current = self.current
            summary = {"policy": current.policy if current else None,
                       "up": bool(current and current.replica.up),
                       "switching_to": self.switching, "switches": self.switches,
                       "failed_switches": self.failures, "error": self.error}
        return {**summary, "engines": self.rows()}


def _quietly(action: Callable[[], object]) -> None:
    try:
        action()
    except Exception:  # cleaning up after a failure: the first error is the one reported
        log.exception("champion engine: clean-up failed")


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + "…"
