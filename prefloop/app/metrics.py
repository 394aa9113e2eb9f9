"""``GET /metrics`` in Prometheus' text format.

Counts that live in the database (pairs, votes, rounds, adapters) are read from it at each
scrape, so they are right across restarts; latencies and refusals are counted in memory since
the process started.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from prefloop.app.guard import Guard
from prefloop.app.moderation import Moderator
from prefloop.serving.sampler import PairProgress
from prefloop.storage.store import Store

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class StoreCollector(Collector):
    """What the database, the guard and the vLLM supervisor say, at scrape time."""

    def __init__(self, store: Store, guard: Guard,
                 vllm_restarts: Callable[[], int | None] | None,
                 moderator: Moderator | None = None,
                 replicas: Callable[[], list[dict[str, Any]]] | None = None,
                 champion: Callable[[], dict[str, Any]] | None = None) -> None:
        self.store, self.guard, self.vllm_restarts = store, guard, vllm_restarts
        self.moderator = moderator
        self.replicas = replicas  # each vLLM replica's state (AdapterPool.status)
        self.champion = champion  # the champion engine's (ChampionEngine.summary)

    def collect(self) -> Iterator[Metric]:
        counts = self.store.counts()
        # Deleted data is counted as it goes (undone votes and visitors' deleted data), so
        # that these counters count what was made and never go down.
        deleted = self.store.deleted_counts()
        yield CounterMetricFamily("prefloop_conversations", "Conversations started (deleted "
                                  "ones included).",
                                  value=counts["conversations"] + deleted.get("conversations", 0))
        yield CounterMetricFamily("prefloop_pairs", "Answer pairs stored (deleted ones "
                                  "included).", value=counts["pairs"] + deleted.get("pairs", 0))
        votes = CounterMetricFamily("prefloop_votes", "Votes cast, by choice (undone and "
                                    "deleted ones included: a counter never goes down).",
                                    labels=["choice"])
        undone = CounterMetricFamily("prefloop_votes_undone", "Votes taken back, by choice.",
                                     labels=["choice"])
        removed = CounterMetricFamily("prefloop_votes_deleted", "Votes deleted with their "
                                      "client's data, by choice.", labels=["choice"])
        taken_back = self.store.votes_undone()
        for choice, n in self.store.votes_by_choice().items():
            gone = deleted.get(f"votes.{choice}", 0)
            votes.add_metric([choice], n + taken_back[choice] + gone)
            undone.add_metric([choice], taken_back[choice])
            removed.add_metric([choice], gone)
        yield votes
        yield undone
        yield removed
        rounds = GaugeMetricFamily("prefloop_rounds", "Training rounds, by status.",
                                   labels=["status"])
        for status, n in self.store.rounds_by_status().items():
            rounds.add_metric([status], n)
        yield rounds
        policy = GaugeMetricFamily("prefloop_policy", "1 for the current champion and "
                                   "candidate.", labels=["role", "policy"])
        policy.add_metric(["champion", self.store.champion()], 1)
        if (candidate := self.store.candidate()) is not None:
            policy.add_metric(["candidate", candidate], 1)
        yield policy
        yield GaugeMetricFamily("prefloop_generations_running", "Pairs being written now.",
                                value=self.guard.running)
        yield _by_label("prefloop_refused_requests", "Requests turned away (429/503), by the "
                        "limit that did it.", "limit", self.guard.refused)
        if self.moderator is not None and self.moderator.active:
            yield _by_label("prefloop_moderation_flagged", "Texts moderation flagged since "
                            "the start: messages and written answers refused, answers "
                            "withheld.", "what", self.moderator.flagged)
            yield _by_label("prefloop_moderation_failures", "Moderation checks that failed "
                            "since the start, by what became of the text (moderation_fail).",
                            "outcome", self.moderator.failures)
            yield GaugeMetricFamily("prefloop_pairs_withheld", "Pairs stored with an answer "
                                    "moderation withheld.", value=self.store.count_withheld())
        if self.replicas is not None:
            yield from replica_metrics(self.replicas())
        if self.champion is not None:
            yield from champion_metrics(self.champion())
        if self.vllm_restarts is not None:
            yield CounterMetricFamily("prefloop_vllm_restarts", "Times the supervisor "
                                      "restarted vLLM after it died (and loaded the "
                                      "adapters again).",
                                      value=self.vllm_restarts())


def replica_metrics(rows: list[dict[str, Any]]) -> Iterator[Metric]:
    """Each vLLM replica: up or down, requests in flight, the adapters it serves."""
    up = GaugeMetricFamily("prefloop_replica_up", "1 while a vLLM replica is in use, 0 while "
                           "it is taken out (down, or not yet reconciled).",
                           labels=["replica", "kind"])
    busy = GaugeMetricFamily("prefloop_replica_requests_in_flight", "Requests streaming from "
                             "a vLLM replica now.", labels=["replica"])
    adapters = GaugeMetricFamily("prefloop_replica_adapter", "1 for each adapter a vLLM "
                                 "replica serves.", labels=["replica", "policy"])
    for row in rows:
        up.add_metric([row["name"], row["kind"]], int(row["up"]))
        busy.add_metric([row["name"]], row["in_flight"])
        for policy in row["adapters"]:
            adapters.add_metric([row["name"], policy], 1)
    yield from (up, busy, adapters)


def champion_metrics(summary: dict[str, Any]) -> Iterator[Metric]:
    """The champion engine: switches done and failed, each engine's start time and memory
    (its replica row, ``kind="champion"``, says up and requests in flight)."""
    yield CounterMetricFamily("prefloop_champion_engine_switches", "Blue-green switches of "
                              "the champion engine that took the traffic.",
                              value=summary["switches"])
    yield CounterMetricFamily("prefloop_champion_engine_failed_switches", "Champion engines "
                              "that did not start or answer (the traffic stayed where it "
                              "was).", value=summary["failed_switches"])
    start = GaugeMetricFamily("prefloop_champion_engine_start_seconds", "Seconds from the "
                              "switch's start (merge included) to the engine's first answer.",
                              labels=["replica", "policy"])
    memory = GaugeMetricFamily("prefloop_champion_engine_memory_bytes", "Resident memory of "
                               "a champion engine's processes.", labels=["replica", "policy"])
    for row in summary["engines"]:
        start.add_metric([row["name"], row["policy"]], row["start_seconds"])
        if row["memory_bytes"] is not None:
            memory.add_metric([row["name"], row["policy"]], row["memory_bytes"])
    yield from (start, memory)


class Metrics:
    """One registry per app (tests build many apps in one process)."""

    def __init__(self, store: Store, guard: Guard,
                 vllm_restarts: Callable[[], int | None] | None = None,
                 moderator: Moderator | None = None,
                 replicas: Callable[[], list[dict[str, Any]]] | None = None,
                 champion: Callable[[], dict[str, Any]] | None = None) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(StoreCollector(store, guard, vllm_restarts, moderator,
                                              replicas, champion))
        self.first_token = Histogram(
            "prefloop_first_token_seconds", "Time to the first token of a pair (the faster "
            "answer's: whichever side streams first).", ["kind"], buckets=LATENCY_BUCKETS,
            registry=self.registry)
        self.pair_time = Histogram(
            "prefloop_pair_seconds", "Time to write both answers of a pair.", ["kind"],
            buckets=LATENCY_BUCKETS, registry=self.registry)

    def observe_pair(self, kind: str, progress: PairProgress) -> None:
        if progress.first_token_ms is not None:
            self.first_token.labels(kind).observe(progress.first_token_ms / 1000)
        if progress.total_ms is not None:
            self.pair_time.labels(kind).observe(progress.total_ms / 1000)

    def router(self) -> APIRouter:
        router = APIRouter(tags=["health"])

        @router.get("/metrics", response_class=Response)
        def metrics() -> Response:
            """Prometheus text format: pairs, votes, rounds, policies, latencies, refusals."""
            return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

        return router


def _by_label(name: str, help: str, label: str, counts: Mapping[str, int]) -> CounterMetricFamily:
    """A counter with one sample per ``label`` value, in sorted order."""
    family = CounterMetricFamily(name, help, labels=[label])
    for value, n in sorted(counts.items()):
        family.add_metric([value], n)
    return family
