"""Voter quality per client (cookie id): can this client's votes be trusted?

Three signals, each an exact binomial test at level ``alpha`` over one client's votes:

- position bias: one side chosen far beyond chance (sides carry no information: a duel's
  sides are shuffled, a sample pair's two answers come from the same policy);
- too fast: votes cast before the answers could have been read;
- against the consensus: in duels, the client's winner disagrees with what the other
  clients clearly prefer far more often than an honest voter would (after Chatbot Arena's
  anomalous-user test, ``outlier_detect`` in FastChat's ``fastchat/serve/monitor/
  elo_analysis.py``; here one binomial test against the others' majority instead of a
  product of per-vote p-values).

Each ``*_verdict`` function decides from counts; the row functions count; :func:`review`
runs all three; :func:`review_client` runs them on the store and flags the client. A flagged
client's votes stay stored but count neither for training nor for the promotion gate until
an admin clears it (:meth:`Store.clear_client`); docs/DEVELOPMENT.md gives the error rates.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from prefloop.storage.store import Store

Vote = Mapping[str, Any]  # a row of Store.client_votes
Consensus = Mapping[tuple[str, str], tuple[int, int]]  # (lo, hi) -> (lo wins, hi wins)


@dataclass(frozen=True)
class VoterChecks:
    """Thresholds of the signals. ``alpha`` is each test's false-flag rate for an honest
    voter at one look (the review looks after every vote: see docs/DEVELOPMENT.md)."""

    alpha: float = 0.001
    # Position bias: decisive votes (a or b) needed before the test may fire.
    min_decisive: int = 20
    # Too fast: a vote is too fast when the answers were on screen for less than the shorter
    # answer's length at this speed (50 characters a second is ~500 words a minute,
    # skimming), or less than the floor. Honest voters may do that now and then (an
    # obviously broken answer): the test fires when the share of such votes is significantly
    # above ``honest_fast_share``.
    chars_per_second: float = 50.0
    min_read_seconds: float = 1.0
    honest_fast_share: float = 0.2
    min_timed: int = 20
    # Consensus: a policy pair counts once the other clients cast ``min_others`` decisive
    # votes on it and their majority is clear (its Wilson lower bound at ``consensus_z``
    # is above one half); the test needs ``min_comparable`` such votes of the client.
    min_others: int = 10
    consensus_z: float = 1.96
    min_comparable: int = 20

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1 or not 0 < self.honest_fast_share < 1:
            raise ValueError("alpha and honest_fast_share must lie strictly between 0 and 1")
        if min(self.min_decisive, self.min_timed, self.min_others, self.min_comparable) < 1:
            raise ValueError("the minimum vote counts must be at least 1")


CHECKS = VoterChecks()


# -- exact binomial tails ---------------------------------------------------------------------


def _log_pmf(k: int, n: int, p: float) -> float:
    return math.log(math.comb(n, k)) + k * math.log(p) + (n - k) * math.log1p(-p)


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed exactly in log space (no scipy)."""
    assert 0 < p < 1 and n >= 0
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return min(1.0, math.fsum(math.exp(_log_pmf(i, n, p)) for i in range(k + 1)))


def binomial_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    return binomial_cdf(n - k, n, 1 - p)


def two_sided_half(k: int, n: int) -> float:
    """Exact two-sided binomial p-value of ``k`` successes in ``n`` against p = 1/2 (the
    distribution is symmetric, so twice the smaller tail)."""
    return min(1.0, 2 * binomial_cdf(min(k, n - k), n, 0.5)) if n else 1.0


def wilson_lower(k: int, n: int, z: float) -> float:
    """Wilson score lower bound of a proportion ``k / n``."""
    if n == 0:
        return 0.0
    p, z2 = k / n, z * z
    centre = p + z2 / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return (centre - spread) / (1 + z2 / n)


# -- verdicts from counts -----------------------------------------------------------------------


def position_verdict(a: int, n: int, checks: VoterChecks = CHECKS) -> str | None:
    """Side A chosen in ``a`` of ``n`` decisive votes. Fires when ``n >= min_decisive`` and the
    exact two-sided binomial test against 1/2 gives p < ``alpha``; an honest voter (either
    side equally likely) is flagged at one look with probability below ``alpha``."""
    if n < checks.min_decisive:
        return None
    p = two_sided_half(a, n)
    if p >= checks.alpha:
        return None
    return (f"position bias: chose A in {a} of {n} decisive votes ({a / n:.0%}); two-sided "
            f"binomial test against 50%: p = {p:.1e} < {checks.alpha:g}")


def speed_verdict(fast: int, n: int, checks: VoterChecks = CHECKS) -> str | None:
    """``fast`` of ``n`` votes cast before the answers could be read. Fires when
    ``n >= min_timed`` and P(Binomial(n, honest_fast_share) >= fast) < ``alpha``: a voter whose
    votes are each too fast with probability at most ``honest_fast_share`` is flagged at one
    look with probability below ``alpha``."""
    if n < checks.min_timed:
        return None
    p = binomial_sf(fast, n, checks.honest_fast_share)
    if p >= checks.alpha:
        return None
    return (f"too fast: {fast} of {n} votes ({fast / n:.0%}) came before the shorter answer "
            f"could be read (at {checks.chars_per_second:g} characters a second, at least "
            f"{checks.min_read_seconds:g} s); binomial test against an honest "
            f"{checks.honest_fast_share:.0%}: p = {p:.1e} < {checks.alpha:g}")


def consensus_verdict(agree: int, n: int, expected: float,
                      checks: VoterChecks = CHECKS) -> str | None:
    """Agreed with the others' clear majority in ``agree`` of ``n`` duel votes, where an honest
    voter agrees with probability at least ``expected`` on average. Fires when
    ``n >= min_comparable`` and P(Binomial(n, expected) <= agree) < ``alpha``. Per vote the
    agreement probabilities differ; a sum of such Bernoullis has a lower tail no heavier than
    the binomial with their mean (Hoeffding 1956, for ``agree <= n * expected - 1``), so the
    false-flag rate at one look stays below ``alpha``."""
    if n < checks.min_comparable:
        return None
    p = binomial_cdf(agree, n, expected)
    if p >= checks.alpha:
        return None
    return (f"against the consensus: agreed with the other voters' clear majority in {agree} "
            f"of {n} duel votes ({agree / n:.0%}); an honest voter agrees at least "
            f"{expected:.0%}: binomial p = {p:.1e} < {checks.alpha:g}")


# -- signals over vote rows ---------------------------------------------------------------------


def position_bias(votes: Iterable[Vote], checks: VoterChecks = CHECKS) -> str | None:
    """:func:`position_verdict` over a client's decisive votes (duels and samples alike)."""
    choices = [v["choice"] for v in votes if v["choice"] in ("a", "b")]
    return position_verdict(choices.count("a"), len(choices), checks)


def seconds_on_screen(vote: Vote) -> float | None:
    """How long the answers were shown before the vote. The page streams both answers, so
    the time counts from the first token (``total_ms - first_token_ms`` before the pair was
    stored), not from the stored pair: reading while the text streams in is reading. A pair
    without timings counts from its storing only (a stricter bound)."""
    if not vote.get("voted_at") or not vote.get("pair_at"):
        return None
    seconds = (datetime.fromisoformat(vote["voted_at"])
               - datetime.fromisoformat(vote["pair_at"])).total_seconds()
    if vote.get("total_ms") is not None and vote.get("first_token_ms") is not None:
        seconds += max(0.0, vote["total_ms"] - vote["first_token_ms"]) / 1000
    return seconds


def reading_seconds(vote: Vote, checks: VoterChecks = CHECKS) -> float:
    """The least time needed to read the shorter answer of the pair."""
    shorter = min(vote["chars_a"] or 0, vote["chars_b"] or 0)
    return max(checks.min_read_seconds, shorter / checks.chars_per_second)


def too_fast(votes: Iterable[Vote], checks: VoterChecks = CHECKS) -> str | None:
    """:func:`speed_verdict` over a client's votes of any choice that have timings."""
    timed = [(s, reading_seconds(v, checks)) for v in votes
             if (s := seconds_on_screen(v)) is not None]
    return speed_verdict(sum(s < bound for s, bound in timed), len(timed), checks)


def consensus_agreement(votes: Iterable[Vote], consensus: Consensus,
                        checks: VoterChecks = CHECKS) -> tuple[int, int, float]:
    """(agreed, comparable votes, expected agreement of an honest voter) over the client's
    decisive duel votes on policy pairs where the others (``consensus``: decisive votes of
    other clients per sorted policy pair) have a clear majority. The expected agreement is the
    mean of the majorities' Wilson lower bounds: conservative, as the others' share is an
    estimate."""
    agree = n = 0
    expected = 0.0
    for v in votes:
        if v["kind"] != "duel" or v["choice"] not in ("a", "b"):
            continue
        lo, hi = sorted((v["policy_a"], v["policy_b"]))
        lo_wins, hi_wins = consensus.get((lo, hi), (0, 0))
        others = lo_wins + hi_wins
        if others < checks.min_others:
            continue
        bound = wilson_lower(max(lo_wins, hi_wins), others, checks.consensus_z)
        if bound <= 0.5:  # no clear majority: nothing to disagree with
            continue
        majority = lo if lo_wins > hi_wins else hi
        winner = v["policy_a"] if v["choice"] == "a" else v["policy_b"]
        agree += winner == majority
        n += 1
        expected += bound
    return agree, n, expected / n if n else 0.0


def contrarian(votes: Iterable[Vote], consensus: Consensus,
               checks: VoterChecks = CHECKS) -> str | None:
    """:func:`consensus_verdict` over a client's duel votes (see :func:`consensus_agreement`)."""
    agree, n, expected = consensus_agreement(votes, consensus, checks)
    return consensus_verdict(agree, n, expected, checks) if n else None


def review(votes: list[Vote], consensus: Consensus, checks: VoterChecks = CHECKS) -> list[str]:
    """The reasons, one per signal that fires, to distrust a client with these votes."""
    found = (position_bias(votes, checks), too_fast(votes, checks),
             contrarian(votes, consensus, checks))
    return [reason for reason in found if reason is not None]


def review_client(store: Store, client_id: str | None,
                  checks: VoterChecks = CHECKS) -> list[str]:
    """Review one client's votes and flag it in ``store`` when a signal fires; returns the
    reasons (empty: in good standing).

    Only votes after an admin last cleared the client count, so cleared evidence never flags
    it again: a new flag needs enough new votes to fire on their own. A client flagged already
    is not reviewed again (its stored reasons are returned) until an admin clears it. No client
    id (imports, internal callers) is never reviewed.
    """
    if client_id is None:
        return []
    flag = store.client_flag(client_id)
    if flag is not None and flag["cleared_at"] is None:
        return flag["reasons"]
    votes = store.client_votes(client_id, after_vote=flag["cleared_through"] if flag else 0)
    duels = any(v["kind"] == "duel" for v in votes)
    reasons = review(votes, store.duel_consensus(client_id) if duels else {}, checks)
    if reasons:
        store.flag_client(client_id, reasons)
    return reasons
