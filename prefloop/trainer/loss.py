"""Preference losses as pure functions of four per-sequence log-prob tensors.

Notation, for a batch of B pairs (each tensor has shape (B,)):

    pi_c, pi_r    log p_policy(chosen | prompt), log p_policy(rejected | prompt)
    ref_c, ref_r  the same under the frozen reference model
    h = (pi_c - ref_c) - (pi_r - ref_r)      the difference of log-ratios
    r_c = beta * (pi_c - ref_c)              implicit reward of the chosen answer
    r_r = beta * (pi_r - ref_r)              implicit reward of the rejected answer

so ``beta * h = r_c - r_r`` is the reward margin. At the start of a round the policy equals
the reference, h = 0, and the DPO loss is log 2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prefloop.trainer.settings import LOSSES, check_loss_settings

__all__ = ["LOSSES", "check_loss_settings", "preference_loss"]


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    loss: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example losses and implicit rewards, each of shape (B,).

    With ``x = beta * h`` and ``eps = label_smoothing``:

    - ``sigmoid`` (DPO, arXiv 2305.18290):  ``-log sigmoid(x)``
    - ``cdpo`` (conservative DPO):          ``-(1 - eps) log sigmoid(x) - eps log sigmoid(-x)``
    - ``ipo`` (arXiv 2310.12036):           ``(h - 1 / (2 beta))^2``
    - ``hinge`` (SLiC, arXiv 2305.10425):   ``max(0, 1 - x)``
    - ``robust`` (rDPO, arXiv 2403.00409):
      ``(-(1 - eps) log sigmoid(x) + eps log sigmoid(-x)) / (1 - 2 eps)``

    The log-probs are whatever the caller passes; a round passes sums over answer tokens for
    every loss (TRL averages over tokens for IPO, which rescales its target margin).

    Returns ``(losses, chosen_rewards, rejected_rewards)``; the rewards are ``beta`` times the
    log-ratios, detached (they are reported, never trained on).
    """
    check_loss_settings(loss, beta, label_smoothing)
    chosen_logratios = policy_chosen - ref_chosen  # (B,)
    rejected_logratios = policy_rejected - ref_rejected  # (B,)
    h = chosen_logratios - rejected_logratios  # (B,)
    eps = label_smoothing

    if loss in ("sigmoid", "cdpo"):
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss == "hinge":
        losses = torch.relu(1 - beta * h)
    else:  # robust: unbiased under labels flipped with probability eps
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) \
            / (1 - 2 * eps)

    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards
