"""Ratings over duel votes: Bradley-Terry on the Elo scale, bootstrap intervals, a leaderboard.

A vote on a pair is a duel between the two policies that wrote its answers. With ratings R on
the Elo scale, policy a beats policy b with probability

    p_ab = 1 / (1 + 10 ** ((R_b - R_a) / scale)) = sigmoid(theta_a - theta_b),
    theta = R * ln(10) / scale    (the log-strengths the fit works in),

and a tie counts as half a win for each side: a duel with score s (1 a won, 0 b won, 0.5 tie)
adds ``s log p_ab + (1 - s) log p_ba`` to the log-likelihood. The ratings maximise it, shifted
so that the anchor policy (``base``) sits at 1000; only differences mean anything.

The prior: a policy that won (or lost) every one of its duels has no finite maximum, its rating
runs off to infinity. So each pair of policies that met gets ``prior`` virtual ties (0.01 of a
duel by default). Two policies with score S in n duels then have p = (S + prior/2) / (n + prior):
3 wins of 4 give 1190.27 instead of 1190.85, 4 of 4 give 2161.45 instead of infinity.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from prefloop.names import BASE

LN10 = math.log(10)
SCORES = {"a": 1.0, "b": 0.0, "tie": 0.5, "both_bad": 0.5}
"""Score of side a for each vote choice that is a duel result (``both_bad`` is a tie)."""


@dataclass(frozen=True)
class Duel:
    """One duel vote: policies ``a`` and ``b`` and the score of a (1 won, 0 lost, 0.5 tie)."""

    a: str
    b: str
    score_a: float

    def __post_init__(self) -> None:
        if self.a == self.b:
            raise ValueError(f"a duel of {self.a!r} against itself: leave out pairs whose two "
                             "answers come from one policy, they say nothing about ratings")
        if not 0.0 <= self.score_a <= 1.0:
            raise ValueError(f"score_a must be in [0, 1], got {self.score_a}")


def duel_score(choice: str) -> float | None:
    """Side a's score for a vote ``choice``; None for ``written``.

    A written answer says the person's own answer beats both, not which of the two is better,
    so it is no duel result and the caller skips it.
    """
    if choice == "written":
        return None
    if choice not in SCORES:
        raise ValueError(f"unknown vote choice {choice!r}: expected one of "
                         f"{', '.join(SCORES)} or written")
    return SCORES[choice]


def duels_of(votes: Iterable[Mapping[str, str]]) -> list[Duel]:
    """The duel results among vote rows (``policy_a``, ``policy_b``, ``choice``), in order;
    written answers are none (:func:`duel_score`)."""
    return [Duel(row["policy_a"], row["policy_b"], score) for row in votes
            if (score := duel_score(row["choice"])) is not None]


def fit_bradley_terry(duels: Sequence[Duel], anchor: str = BASE, anchor_rating: float = 1000.0,
                      scale: float = 400.0, prior: float = 0.01, iterations: int = 100,
                      tol: float = 1e-6) -> dict[str, float]:
    """Maximum-likelihood Bradley-Terry ratings on the Elo scale, ties half a win each.

    ``prior`` is the number of virtual ties per pair that met (module docstring); it must be
    positive, and 1e-9 gives the plain maximum likelihood wherever that is finite. The fit is
    Newton's method on the log-likelihood, stopped once no rating moves by more than ``tol``
    Elo points.

    Policies are compared only within a connected component of the graph of pairs that met.
    The component holding ``anchor`` puts it at ``anchor_rating``; any other component (all of
    them when ``anchor`` is in no duel) has its mean put at ``anchor_rating``, so its ratings
    are relative to each other only. No duels give no ratings: ``{}``.
    """
    if prior <= 0:
        raise ValueError(f"prior must be > 0 (virtual ties per pair), got {prior}; a policy "
                         "that won every duel has no finite rating without it")
    if not duels:
        return {}
    names, i, j, n, score = _pair_totals(duels)
    theta = _newton(len(names), i, j, n + prior, score + prior / 2, iterations,
                    tol * LN10 / scale)
    ratings = theta * scale / LN10
    labels = _components(len(names), i, j)
    for label in np.unique(labels):
        members = labels == label
        at_anchor = anchor in names and labels[names.index(anchor)] == label
        zero = ratings[names.index(anchor)] if at_anchor else ratings[members].mean()
        ratings[members] = ratings[members] - zero + anchor_rating  # the anchor: exactly
    return dict(zip(names, ratings.tolist(), strict=True))


def rating_intervals(duels: Sequence[Duel], resamples: int = 100, seed: int = 0,
                     level: float = 0.95, **fit_kwargs: float | str | int
                     ) -> dict[str, tuple[float, float]]:
    """Percentile-bootstrap intervals of the :func:`fit_bradley_terry` ratings.

    Draws the duels with replacement ``resamples`` times (from ``seed``: the same seed gives
    the same intervals), refits each draw with ``fit_kwargs``, and takes the (1 - level) / 2
    and 1 - (1 - level) / 2 percentiles of each policy's ratings. The anchor's interval is its
    fixed rating. A draw without the anchor is anchored at its mean, which widens the intervals
    when the anchor has few duels; a policy in no draw at all gets (nan, nan).
    """
    if resamples < 1 or not 0 < level < 1:
        raise ValueError(f"need resamples >= 1 and 0 < level < 1, got {resamples} and {level}")
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = defaultdict(list)
    for _ in range(resamples):
        picked = rng.integers(0, len(duels), size=len(duels))
        for name, rating in fit_bradley_terry([duels[k] for k in picked], **fit_kwargs).items():
            draws[name].append(rating)
    tail = 100 * (1 - level) / 2
    intervals = {}
    for name in {d.a for d in duels} | {d.b for d in duels}:
        low, high = np.percentile(draws[name], [tail, 100 - tail]) if draws[name] else (
            math.nan, math.nan)
        intervals[name] = (float(low), float(high))
    return intervals


@dataclass(frozen=True)
class Standing:
    """One policy's line on the leaderboard."""

    policy: str
    rating: float
    low: float                      # the bootstrap interval (95%)
    high: float
    votes: int                      # duel votes the policy took part in
    wins: float                     # its score summed over those duels (ties half)
    winrate_vs_base: float | None   # its score share in duels against the anchor, if any
    votes_vs_base: int


def leaderboard(duels: Sequence[Duel], anchor: str = BASE, resamples: int = 100,
                seed: int = 0) -> list[Standing]:
    """Every policy in ``duels`` with rating, 95% interval and counts, highest rating first."""
    ratings = fit_bradley_terry(duels, anchor=anchor)
    intervals = rating_intervals(duels, resamples=resamples, seed=seed, anchor=anchor)
    votes: Counter[str] = Counter()
    wins: defaultdict[str, float] = defaultdict(float)
    votes_vs: Counter[str] = Counter()
    wins_vs: defaultdict[str, float] = defaultdict(float)
    for duel in duels:
        sides = ((duel.a, duel.b, duel.score_a), (duel.b, duel.a, 1 - duel.score_a))
        for me, other, score in sides:
            votes[me] += 1
            wins[me] += score
            if other == anchor:
                votes_vs[me] += 1
                wins_vs[me] += score
    standings = [
        Standing(name, rating, *intervals[name], votes[name], wins[name],
                 wins_vs[name] / votes_vs[name] if votes_vs[name] else None, votes_vs[name])
        for name, rating in ratings.items()
    ]
    return sorted(standings, key=lambda s: (-s.rating, s.policy))


def _pair_totals(duels: Sequence[Duel]
                 ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Duels summed per pair that met: sorted policy names and (P,) arrays i < j (indices into
    the names), n (duels) and score (i's score summed over them)."""
    names = sorted({d.a for d in duels} | {d.b for d in duels})
    index = {name: k for k, name in enumerate(names)}
    a = np.array([index[d.a] for d in duels])  # (D,)
    b = np.array([index[d.b] for d in duels])
    s = np.array([d.score_a for d in duels])
    i, j = np.minimum(a, b), np.maximum(a, b)
    s = np.where(a < b, s, 1.0 - s)  # now the score of i
    keys, pair = np.unique(i * len(names) + j, return_inverse=True)
    n = np.bincount(pair).astype(float)  # (P,)
    score = np.bincount(pair, weights=s)
    return names, keys // len(names), keys % len(names), n, score


def _log_likelihood(theta: np.ndarray, i: np.ndarray, j: np.ndarray, n: np.ndarray,
                    score: np.ndarray) -> float:
    d = theta[i] - theta[j]  # (P,); log sigmoid(d) = -logaddexp(0, -d), stable for large |d|
    return float(-(score * np.logaddexp(0, -d) + (n - score) * np.logaddexp(0, d)).sum())


def _newton(k: int, i: np.ndarray, j: np.ndarray, n: np.ndarray, score: np.ndarray,
            iterations: int, tol: float) -> np.ndarray:
    """Log-strengths (k,) maximising the log-likelihood of the pair totals, each component's
    mean at 0.

    The Hessian is minus a weighted graph Laplacian, singular along a shift of any connected
    component. Least-squares steps have minimum norm, so they never move a component's mean;
    step halving keeps each step from lowering the likelihood.
    """
    theta = np.zeros(k)
    for _ in range(iterations):
        p = np.exp(-np.logaddexp(0, theta[j] - theta[i]))  # (P,) P(i beats j)
        residual = score - n * p
        gradient = np.bincount(i, residual, k) - np.bincount(j, residual, k)  # (k,)
        w = n * p * (1 - p)
        laplacian = np.zeros((k, k))
        np.add.at(laplacian, (i, i), w)
        np.add.at(laplacian, (j, j), w)
        np.add.at(laplacian, (i, j), -w)
        np.add.at(laplacian, (j, i), -w)
        step = np.linalg.lstsq(laplacian, gradient, rcond=None)[0]
        before = _log_likelihood(theta, i, j, n, score)
        for _ in range(30):
            if _log_likelihood(theta + step, i, j, n, score) >= before:
                break
            step /= 2
        theta += step
        if np.abs(step).max() < tol:
            return theta
    raise RuntimeError(f"Bradley-Terry fit did not converge in {iterations} iterations; "
                       "raise iterations or prior")


def _components(k: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """A label (k,) per policy, equal for policies joined by a chain of pairs that met."""
    parent = list(range(k))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in zip(i.tolist(), j.tolist(), strict=True):
        parent[root(a)] = root(b)
    return np.array([root(x) for x in range(k)])
