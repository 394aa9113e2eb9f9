"""Which policies answer a turn: two samples of the champion, or a duel of two policies.

Whether a duel's winner is really better is the promotion test's business (``gate.py``)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from prefloop.names import BASE, PairKind


@dataclass(frozen=True)
class TurnPlan:
    kind: PairKind  # sample: both answers from the champion; duel: two policies
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
    elif champion != BASE and duel_share <= draw < duel_share + baseline_share:
        opponents = (champion, BASE)
    if opponents is None:
        return TurnPlan(PairKind.SAMPLE, champion, champion)
    a, b = opponents if rng.random() < 0.5 else opponents[::-1]
    return TurnPlan(PairKind.DUEL, a, b)
