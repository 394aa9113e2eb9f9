"""KL(policy ‖ base) estimated inside a training round, so the round can stop in budget.

The loop's own probe (:mod:`prefloop.serving.kl_probe`) judges an adapter after its round,
through vLLM, on answers the adapter samples. Sampling inside the round would cost more than
the training steps it watches, so the round's check uses answers it already has: those of a
few of its held-out pairs (not trained on: on its training pairs the policy moves furthest),
sampled by the policy being served when the votes came in (the round starts from it). At
every answer position the check sums the exact KL between the policy's and the base model's
next-token distributions over the whole vocabulary, Σ_v π(v) (log π(v) − log π_base(v)),
and reports the mean per answer token, the unit of the loop's ``max_kl``. The base model is
the policy with its adapter switched off.

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

from prefloop.trainer.batch import Batch, answer_logits, collate
from prefloop.trainer.tokenize import TokenizedPair

CACHE_BYTES = 512 * 2**20
"""The base's log-probs at the check's answer positions are kept between checks (halving a
check's work) when their tables fit in this many bytes: 8 pairs of 40-token answers over
SmolLM2's 49k vocabulary take about 130 MB."""


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

    Pairs go through a few at a time, under the policy and then the base. The base's tables
    are kept for later checks when they fit in ``CACHE_BYTES``; otherwise each check makes
    them again and memory stays that of a few (positions x vocabulary) tables.
    """

    def __init__(self, pairs: Sequence[TokenizedPair], pad_id: int, device: torch.device,
                 chunk: int = 4) -> None:
        assert pairs and chunk >= 1
        self.batches = [collate(pairs, range(k, min(k + chunk, len(pairs))), pad_id).to(device)
                        for k in range(0, len(pairs), chunk)]
        self.base: list[torch.Tensor] | None = None  # per batch, made at the first measure

    @torch.no_grad()
    def measure(self, model: PeftModel) -> KLCheck:
        """The estimate for ``model`` as it is now (left in eval mode: the caller puts it
        back into training)."""
        model.eval()
        if self.base is None:  # the base never changes: its tables are made once, if small
            self.base = [base_log_softmax(model, batch) for batch in self.batches] \
                if self._table_bytes(model) <= CACHE_BYTES else []
        total, tokens, answers = 0.0, 0, 0
        for k, batch in enumerate(self.batches):
            policy = answer_logits(model, batch).float().log_softmax(-1)  # (M, V)
            base = self.base[k] if self.base else base_log_softmax(model, batch)
            total += token_kl(policy, base).sum().item()
            tokens += len(batch.targets)
            answers += 2 * batch.size
        return KLCheck(per_token=total / tokens, per_answer=total / answers, answers=answers,
                       tokens=tokens)

    def _table_bytes(self, model: PeftModel) -> int:
        vocab = model.get_base_model().get_output_embeddings().weight.shape[0]
        return 4 * vocab * sum(len(batch.targets) for batch in self.batches)


def base_log_softmax(model: PeftModel, batch: Batch) -> torch.Tensor:
    """The base model's next-token log-probs (M, V) at the answer positions, adapter off,
    without gradients."""
    with torch.no_grad(), model.disable_adapter():
        return answer_logits(model, batch).float().log_softmax(-1)


def token_kl(policy: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Σ_v π(v) (log π(v) − log π_base(v)) per position (M,), from log-probs (M, V)."""
    return (policy.exp() * (policy - base)).sum(-1)


def pair_token_kl(model: PeftModel, batch: Batch, logits: torch.Tensor) -> torch.Tensor:
    """KL(policy ‖ base) per answer token of each pair (B,), the loss's penalty: the exact
    KL at each answer position, averaged over the pair's answer tokens (both answers).
    ``logits`` (M, V) are the policy's at those positions, with their gradients."""
    per_position = token_kl(logits.float().log_softmax(-1), base_log_softmax(model, batch))
    rows = batch.slots % batch.size  # (M,) the pair each position belongs to
    zeros = torch.zeros(batch.size, device=logits.device)
    return zeros.index_add(0, rows, per_position) \
        / zeros.index_add(0, rows, torch.ones_like(per_position))
