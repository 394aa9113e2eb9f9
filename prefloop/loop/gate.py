"""The promotion test: a truncated sequential probability ratio test on duel votes.

Checked after every vote, it keeps its error rate (a fixed-sample test checked after every
vote does not: the old rule "promote at 20 votes with a win-rate of 0.55" crowned a
no-better candidate 57% of the time; docs/BENCHMARKS.md).

Each decisive duel vote (``a`` or ``b``) is a Bernoulli trial in which the challenger wins
with probability p. Ties and both-bad say nothing about which side is better: they are left
out of the test, but they spend the vote budget. Wald's SPRT (Wald 1945, "Sequential tests
of statistical hypotheses") weighs H0: p = 1/2 (no better) against H1: p = p1 (the smallest
improvement worth finding, ``effect``) by the log-likelihood ratio after w wins and l losses

    LLR = w·log(2·p1) + l·log(2·(1 − p1))

and stops at the first vote where LLR >= upper (H1: promote) or LLR <= lower (H0: reject),
or, truncated, when ``max_votes`` duel votes are spent (``exhausted``: not shown better, not
promoted). ``lower = log(β / (1 − α))`` as Wald set it, β the miss rate at p1. Wald's
``upper = log((1 − β) / α)`` is conservative; :func:`thresholds` instead finds, by exact
dynamic programming over the (wins, losses) lattice of the truncated test, the smallest
``upper`` with P(promote | p = 1/2) <= α, all votes decisive (ties only make promotion
rarer). P(promote | p) rises with p, so a candidate worse than the champion is promoted
less often still.

The same test, mirrored, guards the champion: its duels against ``base`` since it was
crowned, with ``base`` as the challenger; ``base`` "promoted" means the champion is worse
than ``base`` and is rolled back (a false rollback has the same rate α).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache

import numpy as np

DECISIVE = {"a", "b"}
DRAWS = {"tie", "both_bad"}  # count against the budget, not in the test


class Outcome(StrEnum):
    PROMOTE = "promote"  # the challenger is better (LLR reached upper)
    REJECT = "reject"  # the challenger is no better (LLR reached lower)
    EXHAUSTED = "exhausted"  # the vote budget is spent without a decision: not promoted
    WAIT = "wait"


@dataclass(frozen=True)
class GateConfig:
    """Error rates and budget of the test. ``effect`` is p1, the challenger's win-rate over
    decisive duel votes that the test should find with probability 1 − ``miss_rate``."""

    false_rate: float = 0.05
    effect: float = 0.65
    miss_rate: float = 0.2
    max_votes: int = 150

    def __post_init__(self) -> None:
        checks = [(0 < self.false_rate < 0.5, "false_rate must be between 0 and 0.5"),
                  (0.5 < self.effect < 1, "effect must be a win-rate between 0.5 and 1"),
                  (0 < self.miss_rate < 0.5, "miss_rate must be between 0 and 0.5"),
                  (self.max_votes >= 1, "max_votes must be at least 1")]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message}, got {self}")

    @property
    def steps(self) -> tuple[float, float]:
        """The LLR added by a win and by a loss."""
        return math.log(2 * self.effect), math.log(2 * (1 - self.effect))


@dataclass(frozen=True)
class Tally:
    """The challenger's duel votes against the holder."""

    wins: int = 0
    losses: int = 0
    draws: int = 0  # ties and both-bad

    @property
    def votes(self) -> int:
        return self.wins + self.losses + self.draws

    @property
    def winrate(self) -> float | None:
        """Over decisive votes; None before the first."""
        decisive = self.wins + self.losses
        return self.wins / decisive if decisive else None

    def add(self, won: bool | None) -> Tally:
        """One more vote: True a win, False a loss, None a draw."""
        if won is None:
            return Tally(self.wins, self.losses, self.draws + 1)
        return Tally(self.wins + won, self.losses + (not won), self.draws)


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    tally: Tally
    llr: float
    upper: float
    lower: float

    def summary(self, challenger: str, holder: str) -> str:
        """What was decided and on what evidence, for the adapter's reason."""
        t = self.tally
        rate = f"{t.winrate:.2f}" if t.winrate is not None else "n/a"
        return (f"{challenger} vs {holder}: {t.wins} wins, {t.losses} losses, {t.draws} "
                f"ties or both-bad over {t.votes} duel votes (win-rate {rate}); "
                f"SPRT log-likelihood ratio {self.llr:+.2f}, promote at {self.upper:+.2f}, "
                f"reject at {self.lower:+.2f}")


def tally(votes: Iterable[Mapping[str, str]], challenger: str, holder: str) -> Tally:
    """The challenger's record over vote rows (``policy_a``, ``policy_b``, ``choice``) of
    duels between exactly these two policies; written answers are no duel result."""
    wins = losses = draws = 0
    for row in votes:
        sides = (row["policy_a"], row["policy_b"])
        if set(sides) != {challenger, holder} or challenger == holder:
            continue
        choice = row["choice"]
        if choice in DRAWS:
            draws += 1
        elif choice in DECISIVE:
            won = (choice == "a") == (sides[0] == challenger)
            wins, losses = wins + won, losses + (not won)
    return Tally(wins, losses, draws)


def decide(t: Tally, config: GateConfig) -> Decision:
    """Promote, reject, exhausted or wait, for the votes so far."""
    upper, lower = thresholds(config)
    win, loss = config.steps
    llr = t.wins * win + t.losses * loss
    if llr >= upper:
        outcome = Outcome.PROMOTE
    elif llr <= lower:
        outcome = Outcome.REJECT
    elif t.votes >= config.max_votes:
        outcome = Outcome.EXHAUSTED
    else:
        outcome = Outcome.WAIT
    return Decision(outcome, t, llr, upper, lower)


@lru_cache(maxsize=32)
def thresholds(config: GateConfig) -> tuple[float, float]:
    """(upper, lower): ``lower`` is Wald's; ``upper`` the smallest with P(promote | p = 1/2)
    <= ``false_rate`` in the truncated test (found by bisection over exact probabilities)."""
    lower = math.log(config.miss_rate / (1 - config.false_rate))
    lo, hi = 0.0, math.log((1 - config.miss_rate) / config.false_rate) + 1.0
    assert operating_point(config, 0.5, hi, lower).promote <= config.false_rate
    for _ in range(60):
        mid = (lo + hi) / 2
        if operating_point(config, 0.5, mid, lower).promote > config.false_rate:
            lo = mid
        else:
            hi = mid
    return hi, lower


@dataclass(frozen=True)
class OperatingPoint:
    """Exact probabilities of each end for a challenger of true win-rate p with ties."""

    promote: float
    reject: float
    exhausted: float
    median_votes: int  # votes (ties included) until half of the runs had decided or ended


def operating_point(config: GateConfig, p: float, upper: float | None = None,
                    lower: float | None = None, ties: float = 0.0) -> OperatingPoint:
    """P(promote), P(reject), P(exhausted) and the median number of votes, exactly, by
    dynamic programming over (wins, losses): each vote is a win with probability
    p·(1 − ties), a loss with (1 − p)·(1 − ties), a draw with ``ties``."""
    if upper is None or lower is None:
        upper, lower = thresholds(config)
    win, loss = config.steps
    n = config.max_votes
    # alive[w, l]: probability of w wins and l losses with the test still running.
    alive = np.zeros((n + 2, n + 2))
    alive[0, 0] = 1.0
    llr = np.add.outer(np.arange(n + 2) * win, np.arange(n + 2) * loss)
    up, down = llr >= upper, llr <= lower
    promote = reject = 0.0
    median = n
    pw, pl = p * (1 - ties), (1 - p) * (1 - ties)
    for votes in range(1, n + 1):
        step = alive * ties
        step[1:, :] += alive[:-1, :] * pw
        step[:, 1:] += alive[:, :-1] * pl
        promote += step[up].sum()
        reject += step[down].sum()
        step[up | down] = 0.0
        alive = step
        if promote + reject >= 0.5 and median == n:
            median = votes
    return OperatingPoint(promote, reject, float(alive.sum()), median)
