"""The preference losses against values worked out by hand.

The common case below: policy log-probs (-1, -3), reference (-2, -2), so the chosen log-ratio
is +1, the rejected -1 and h = 2. With beta = 0.5, x = beta * h = 1 and
log(1 + e^-1) = 0.3132616875182228, log(1 + e) = 1.3132616875182228.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from prefloop.trainer.loss import LOSSES, check_loss_settings, preference_loss

SOFTPLUS_NEG1 = 0.3132616875182228  # -log sigmoid(1)
SOFTPLUS_POS1 = 1.3132616875182228  # -log sigmoid(-1)


def _case() -> tuple[torch.Tensor, ...]:
    # (policy_chosen, policy_rejected, ref_chosen, ref_rejected), B = 1
    return tuple(torch.tensor([v]) for v in (-1.0, -3.0, -2.0, -2.0))


def _loss(loss: str, beta: float = 0.5, label_smoothing: float = 0.0) -> float:
    losses, _, _ = preference_loss(*_case(), loss=loss, beta=beta,
                                   label_smoothing=label_smoothing)
    return losses.item()


def test_dpo_is_log2_when_policy_equals_reference() -> None:
    logps = torch.tensor([-12.5, -3.0, -40.0])
    losses, chosen, rejected = preference_loss(logps, logps - 1, logps, logps - 1, beta=0.1)
    assert losses.shape == (3,)
    assert torch.allclose(losses, torch.full((3,), math.log(2)))
    assert torch.equal(chosen, torch.zeros(3)) and torch.equal(rejected, torch.zeros(3))


def test_sigmoid() -> None:
    assert _loss("sigmoid") == pytest.approx(SOFTPLUS_NEG1)


def test_rewards_are_beta_times_log_ratios() -> None:
    _, chosen, rejected = preference_loss(*_case(), beta=0.5)
    assert chosen.item() == pytest.approx(0.5) and rejected.item() == pytest.approx(-0.5)
    assert not chosen.requires_grad


def test_cdpo() -> None:
    # 0.9 * log(1 + e^-1) + 0.1 * log(1 + e)
    assert _loss("cdpo", label_smoothing=0.1) == pytest.approx(
        0.9 * SOFTPLUS_NEG1 + 0.1 * SOFTPLUS_POS1)
    assert _loss("cdpo", label_smoothing=0.0) == pytest.approx(SOFTPLUS_NEG1)


def test_ipo() -> None:
    assert _loss("ipo", beta=0.5) == pytest.approx((2 - 1) ** 2)
    assert _loss("ipo", beta=0.1) == pytest.approx((2 - 5) ** 2)


def test_hinge() -> None:
    assert _loss("hinge", beta=0.5) == pytest.approx(0.0)  # margin 1 reached
    assert _loss("hinge", beta=0.25) == pytest.approx(0.5)  # 1 - 0.25 * 2
    flipped = (torch.tensor([-3.0]), torch.tensor([-1.0]), torch.tensor([-2.0]),
               torch.tensor([-2.0]))
    assert preference_loss(*flipped, loss="hinge", beta=0.5)[0].item() == pytest.approx(2.0)


def test_robust() -> None:
    # (0.9 * log(1 + e^-1) - 0.1 * log(1 + e)) / 0.8
    assert _loss("robust", label_smoothing=0.1) == pytest.approx(
        (0.9 * SOFTPLUS_NEG1 - 0.1 * SOFTPLUS_POS1) / 0.8)
    assert _loss("robust", label_smoothing=0.0) == pytest.approx(SOFTPLUS_NEG1)


@pytest.mark.parametrize(("loss", "eps", "expected"), [
    ("sigmoid", 0.0, math.log(2)),
    ("cdpo", 0.2, math.log(2)),
    ("robust", 0.2, math.log(2)),
    ("ipo", 0.0, 25.0),  # (0 - 1 / (2 beta))^2 with beta = 0.1
    ("hinge", 0.0, 1.0),
])
def test_values_when_policy_equals_reference(loss: str, eps: float, expected: float) -> None:
    zero = torch.zeros(2)
    losses, _, _ = preference_loss(zero, zero, zero, zero, loss=loss, beta=0.1,
                                   label_smoothing=eps)
    assert torch.allclose(losses, torch.full((2,), expected))


def test_dpo_gradient_at_start() -> None:
    # d/d pi_c of -log sigmoid(beta * h) is -beta * sigmoid(-beta * h) = -beta / 2 at h = 0.
    policy_chosen = torch.zeros(1, requires_grad=True)
    losses, _, _ = preference_loss(policy_chosen, torch.zeros(1), torch.zeros(1),
                                   torch.zeros(1), beta=0.1)
    losses.sum().backward()
    assert policy_chosen.grad.item() == pytest.approx(-0.05)


def test_every_loss_prefers_the_chosen_answer() -> None:
    # Raising the chosen log-prob must lower every loss (gradient < 0).
    for loss in LOSSES:
        policy_chosen = torch.tensor([-2.0], requires_grad=True)
        eps = 0.1 if loss in ("cdpo", "robust") else 0.0
        losses, _, _ = preference_loss(policy_chosen, torch.tensor([-2.0]), torch.tensor([-2.0]),
                                       torch.tensor([-2.0]), loss=loss, beta=0.1,
                                       label_smoothing=eps)
        losses.sum().backward()
        assert policy_chosen.grad.item() < 0, loss


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"loss": "kto"}, "unknown loss 'kto'; choose one of: sigmoid, cdpo, ipo, hinge, robust"),
    ({"beta": 0.0}, "beta must be > 0"),
    ({"beta": -0.1}, "beta must be > 0"),
    ({"beta": float("nan")}, "beta must be > 0"),
    ({"loss": "cdpo", "label_smoothing": 0.5}, "label_smoothing must be in [0, 0.5)"),
    ({"loss": "robust", "label_smoothing": -0.1}, "label_smoothing must be in [0, 0.5)"),
    ({"loss": "sigmoid", "label_smoothing": 0.1}, "used only by the cdpo and robust losses"),
])
def test_bad_settings(kwargs: dict, message: str) -> None:
    settings = {"loss": "sigmoid", "beta": 0.1, "label_smoothing": 0.0} | kwargs
    with pytest.raises(ValueError, match=re.escape(message)):
        check_loss_settings(**settings)
    with pytest.raises(ValueError):
        preference_loss(*_case(), **settings)
