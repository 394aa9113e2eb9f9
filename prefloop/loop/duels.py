"""Which policies answer a turn, and when a candidate has won (or lost) its duels."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from prefloop.loop.ratings import duel_score


@dataclass(frozen=True)
class TurnPlan:
    kind: str  # "sample": both answers from the champion; "duel": two policies
    policy_a: str
    policy_b: str


def plan_turn(champion: str, candidate: str | None, duel_share: float,
              baseline_share: float, rng: random.Random) -> TurnPlan:
    """Draw the kind of a new turn: candidate vs champion (``duel_share``, while a candidate
    exists), champion vs base (``baseline_share``, while the champion is not base), or two
    samples from the champion. Duel sides are shuffled."""
    draw = rng.random()
    opponents = None
    if candidate is not None and draw < duel_share:
        opponents = (candidate, champion)
    elif champion != "base" and duel_share <= draw < duel_share + baseline_share:
        opponents = (champion, "base")
    if opponents is None:
        return TurnPlan("sample", champion, champion)
    a, b = opponents if rng.random() < 0.5 else opponents[::-1]
    return TurnPlan("duel", a, b)


@dataclass(frozen=True)
class DuelRecord:
    votes: int
    score: float  # the candidate's wins, ties and both-bad counting half

    @property
    def winrate(self) -> float | None:
        return self.score / self.votes if self.votes else None


def duel_record(votes: Sequence[dict], candidate: str, champion: str) -> DuelRecord:
    """The candidate's record in its duels against ``champion`` (rows of
    :meth:`Store.duel_votes`)."""
    n, score = 0, 0.0
    for row in votes:
        if {row["policy_a"], row["policy_b"]} != {candidate, champion}:
            continue
        result = duel_score(row["choice"])
        if result is None:  # a written answer says nothing about which side was better
            continue
        n += 1
        score += result if row["policy_a"] == candidate else 1.0 - result
    return DuelRecord(n, score)


def verdict(record: DuelRecord, min_votes: int, winrate: float, max_votes: int) -> str:
    """``promote``, ``reject`` or ``wait``.

    Promote at ``min_votes`` or more with a win-rate of at least ``winrate``; reject as soon
    as winning every duel left before ``max_votes`` could no longer reach ``winrate``.
    """
    if record.votes >= min_votes and record.score >= winrate * record.votes - 1e-9:
        return "promote"
    remaining = max(0, max_votes - record.votes)
    best = (record.score + remaining) / max(max_votes, record.votes)
    if best < winrate - 1e-9 or record.votes >= max_votes:
        return "reject"
    return "wait"
