"""Which two of several sampled answers a visitor sees (``pair_candidates``).

A vote between two answers that differ in nothing a visitor cares about says little. With
``pair_candidates`` n > 2, the champion's own turns sample n answers and show the two its
implicit reward ranks furthest apart: r(y) = log π(y | x) − log π_base(y | x), summed over
the answer's tokens (DPO's reward up to β and a term that depends on x alone; the same
sequence log-ratio the KL probe averages). The answer the champion likes most then meets the
one it likes least, and the vote says whether what it has learned so far is what visitors
want. This is how iterative DPO pairs its samples, best against worst of n under a reward
model (Dong et al. 2024, "RLHF Workflow"; DICE, arXiv 2406.09760, ranks by the same implicit
reward); here the reward only chooses the pair, the visitor still decides which is better.

base has no implicit reward of its own (r = 0 for every answer), so its turns sample two
answers and stream them as usual; duels (two policies) are never chosen among.
"""

from __future__ import annotations

from collections.abc import Sequence


def furthest_apart(rewards: Sequence[float]) -> tuple[int, int]:
    """The indices (i, j), i < j, of the highest and the lowest of ``rewards``; the first
    two when all are equal (nothing to choose by). Equal highs or lows: the earliest."""
    assert len(rewards) >= 2, "two answers at least"
    best = max(range(len(rewards)), key=lambda k: (rewards[k], -k))
    worst = min(range(len(rewards)), key=lambda k: (rewards[k], k))
    if best == worst:  # all equal
        return 0, 1
    return min(best, worst), max(best, worst)
