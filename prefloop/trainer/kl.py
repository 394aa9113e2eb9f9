"""KL(policy ‖ base) estimated inside a training round, so the round can stop in budget.

The loop's own probe (:mod:`prefloop.serving.kl_probe`) judges an adapter after its round,
through vLLM, on answers the adapter samples. Sampling inside the round would cost more than
the training steps it watches, so the round's check uses answers it already has: those of a
few of its own pairs, sampled by the policy being served when the votes came in (the round
starts from it). At every answer position the check sums the exact KL between the policy's
and the base model's next-token distributions over the whole vocabulary,
Σ_v π(v) (log π(v) − log π_base(v)), and reports the mean per answer token, the unit of the
loop's ``max_kl``. The base model is the policy with its adapter switched off.

On answers the policy sampled itself this is KL(π ‖ π_base) per token with less variance
than the probe's sampled log-ratio. Once training moves the policy, its own answers drift
from those it is checked on, towards where it changed most, so the check tends to read
lower than the probe: the loop lets the trainer spend only part of the budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from peft import PeftModel

from prefloop.trainer.batch import answer_logits, collate
from prefloop.trainer.tokenize import TokenizedPair


@dataclass(frozen=True)
class KLCheck:
    """One estimate: nats per answer token and per answer, over ``answers`` answers."""

    per_token: float
    per_answer: float
    answers: int
    tokens: int

    def as_dict(self) -> dict[str, float | int]:
        return {"kl_per_token": self.per_token, "kl_per_answer": self.per_answer,
                "answers": self.answers, "tokens": self.tokens}


class KLEstimator:
    """KL(policy ‖ base) on the answers of fixed pairs: :meth:`measure` after any step.

    Pairs go through a few at a time, under the policy and then the base, so memory stays
    that of a few (positions x vocabulary) tables whatever ``pairs`` holds.
    """

    def __init__(self, pairs: Sequence[TokenizedPair], pad_id: int, device: torch.device,
                 chunk: int = 4) -> None:
        assert pairs and chunk >= 1
        self.batches = [collate(pairs, range(k, min(k + chunk, len(pairs))), pad_id).to(device)
                        for k in range(0, len(pairs), chunk)]

    @torch.no_grad()
    def measure(self, model: PeftModel) -> KLCheck:
        """The estimate for ``model`` as it is now (left in eval mode: the caller puts it
        back into training)."""
        model.eval()
        total, tokens, answers = 0.0, 0, 0
        for batch in self.batches:
            policy = answer_logits(model, batch).float().log_softmax(-1)  # (M, V)
            with model.disable_adapter():
                base = answer_logits(model, batch).float().log_softmax(-1)  # (M, V)
            total += (policy.exp() * (policy - base)).sum().item()
            tokens += len(batch.targets)
            answers += 2 * batch.size
        return KLCheck(per_token=total / tokens, per_answer=total / answers, answers=answers,
                       tokens=tokens)
