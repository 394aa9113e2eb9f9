"""The loop's read side: leaderboard, stats and round views, for the pages and the JSON API.

:class:`~prefloop.loop.controller.Loop` makes the decisions; this module only reads. The
leaderboard is the costly report (a Bradley-Terry fit, ``rating_resamples`` bootstrap refits
and a refit per point of the ratings over time), and ``GET /api/v1/leaderboard`` needs no
login: its fits are cached until the duel votes that count change
(:meth:`~prefloop.storage.store.Store.duel_votes_key`).
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prefloop.loop.ratings import Standing, duel_score, duels_of, fit_bradley_terry, leaderboard
from prefloop.names import BASE, AdapterState
from prefloop.storage.store import Store

if TYPE_CHECKING:
    from prefloop.loop.controller import Loop

OVER_TIME_POINTS = 20  # refits shown in the ratings-over-time plot


@dataclass(frozen=True)
class Ratings:
    """The fits behind the leaderboard, for one state of the duel votes."""

    standings: list[Standing]
    over_time: list[dict[str, Any]]  # duel_votes, voted_at, policy, rating


def fit_ratings(votes: list[dict[str, Any]], resamples: int,
                points: int = OVER_TIME_POINTS) -> Ratings:
    """Standings with bootstrap intervals over duel vote rows (oldest first), and the
    ratings refitted on the first k of them for ``points`` values of k."""
    results = [row for row in votes if duel_score(row["choice"]) is not None]
    duels = duels_of(results)
    over_time = []
    for k in sorted({max(1, round(len(duels) * i / points)) for i in range(1, points + 1)}
                    if duels else ()):
        for policy, rating in fit_bradley_terry(duels[:k]).items():
            over_time.append({"duel_votes": k, "voted_at": results[k - 1]["voted_at"],
                              "policy": policy, "rating": rating})
    return Ratings(leaderboard(duels, resamples=resamples), over_time)


class Reports:
    """What the pages and the API show about a :class:`Loop`."""

    def __init__(self, loop: Loop) -> None:
        self.loop = loop
        self._lock = threading.Lock()  # one fit at a time; a second request waits for it
        self._cached: tuple[Hashable, Ratings] | None = None

    @property
    def store(self) -> Store:
        return self.loop.store

    def ratings(self) -> Ratings:
        """The fits over the duel votes that count now, refitted only when those changed."""
        with self._lock:
            # The key first: a vote that lands before the votes are read makes the next
            # request refit once more, and a stale fit is never kept.
            key = self.store.duel_votes_key()
            if self._cached is None or self._cached[0] != key:
                self._cached = key, fit_ratings(self.store.duel_votes(),
                                                self.loop.settings.rating_resamples)
            return self._cached[1]

    def leaderboard(self) -> list[dict[str, Any]]:
        """Every policy in a duel: rating, 95% interval, counts, state and KL from base."""
        adapters = self.store.adapters()
        states = {a["name"]: a["state"] for a in adapters}
        states[BASE] = AdapterState.CHAMPION if self.store.champion() == BASE else BASE
        kl = {a["name"]: a["kl_per_token"] for a in adapters} | {BASE: 0.0}
        return [{**vars(s), "state": states.get(s.policy, ""), "kl_per_token": kl.get(s.policy)}
                for s in self.ratings().standings]

    def ratings_over_time(self) -> list[dict[str, Any]]:
        """Ratings refitted on the first k duel votes, for :data:`OVER_TIME_POINTS` values
        of k."""
        return [dict(row) for row in self.ratings().over_time]

    def status(self) -> dict[str, Any]:
        """What the loop is doing: state, champion, candidate, running round, progress
        towards the next round and the candidate's verdict."""
        loop, store, s = self.loop, self.store, self.loop.settings
        running = next((r for r in store.rounds(limit=5) if r["status"] == "running"), None)
        return {"state": "training" if running else "paused" if loop.paused else "running",
                "champion": store.champion(), "candidate": store.candidate(),
                "round": running, "loaded": sorted(loop.pool.loaded),
                "replicas": loop.pool.status(),
                "champion_engine": (loop.pool.champion_engine.summary()
                                    if loop.pool.champion_engine is not None else None),
                "new_trainable_votes": store.count_trainable(store.last_trained_vote()),
                "min_new_pairs": s.min_new_pairs,
                "train_every_minutes": s.train_every,
                "promote": s.promote,
                "candidate_duel_votes": self.candidate_duel_votes(),
                "max_duel_votes": s.max_duel_votes,
                "waiting_for_verdict": loop.judging()}

    def candidate_duel_votes(self) -> int:
        """Duel votes the candidate has had against the current champion."""
        candidate = self.store.candidate_adapter()
        if candidate is None:
            return 0
        return len(self.store.duel_votes(between=(candidate["name"], self.store.champion()),
                                         since=candidate["created_at"]))

    def stats(self) -> dict[str, Any]:
        """Counts, votes by choice and per hour, and :meth:`status`."""
        return {"counts": self.store.counts(), "votes_by_choice": self.store.votes_by_choice(),
                "votes_per_hour": self.store.votes_per_hour(), "loop": self.status()}


# -- round views ------------------------------------------------------------------------------


def round_summaries(store: Store, limit: int) -> list[dict[str, Any]]:
    """The latest rounds, newest first, each with what became of its adapter."""
    adapters = {a["name"]: a for a in store.adapters()}
    return [round_summary(r, adapters.get(r["adapter"])) for r in store.rounds(limit)]


def round_summary(row: dict[str, Any], adapter: dict[str, Any] | None = None) -> dict[str, Any]:
    """A round without the per-step detail of its metrics (kept: losses per step), and its
    adapter's state and the reason for it (promoted, rejected, rolled back: the gate's
    evidence)."""
    metrics = row.get("metrics") or {}
    steps = metrics.get("steps") or []
    return {key: row[key] for key in ("id", "trigger", "status", "started_at", "ended_at",
                                      "pairs", "new_pairs", "parent", "adapter", "error")} | {
        "adapter_state": adapter["state"] if adapter else None,
        "adapter_reason": adapter["reason"] if adapter else None,
        "progress": row.get("progress") or None,
        "losses": [step["loss"] for step in steps],
        "held_out": metrics.get("held_out"),
        "seconds": (metrics.get("seconds") or {}).get("total"),
        "kl": kl_summary(row.get("kl")),
    }


def kl_summary(report: dict[str, Any] | None) -> dict[str, Any] | None:
    """The KL probe's report on a round without its answers (``GET /api/v1/rounds``)."""
    return None if report is None else {k: v for k, v in report.items() if k != "samples"}
