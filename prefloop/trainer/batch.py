"""Batches of tokenised pairs and the log-probability of their answers under a model.

A batch of B pairs is one tensor of 2B rows, chosen answers first, so that chosen and rejected
go through the model in one forward. Only answer tokens are scored, and the language-model
head runs on those positions alone: with a ~49k vocabulary, logits for every position of
every row would be most of the memory and time of a step.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from peft import PeftModel
from transformers import PreTrainedModel

from prefloop.trainer.tokenize import TokenizedPair


@dataclass(frozen=True)
class Batch:
    index: torch.Tensor  # (B,) positions of the pairs in the round's list (reference look-up)
    input_ids: torch.Tensor  # (2B, T) chosen rows then rejected rows, right-padded
    attention_mask: torch.Tensor  # (2B, T) 1 on real tokens
    completion_mask: torch.Tensor  # (2B, T) True on answer tokens, the ones scored
    tokens: int  # real (unpadded) tokens in the batch

    @property
    def size(self) -> int:
        return len(self.index)

    def chunks(self, size: int) -> list[Batch]:
        """This batch as batches of at most ``size`` pairs (``size`` 0: itself), each cut to
        its own longest row."""
        if size <= 0 or size >= self.size:
            return [self]
        out = []
        for start in range(0, self.size, size):
            rows = torch.cat([torch.arange(start, min(start + size, self.size)),
                              torch.arange(start, min(start + size, self.size)) + self.size])
            mask = self.attention_mask[rows]
            width = int(mask.sum(1).max())
            out.append(Batch(self.index[start:start + size], self.input_ids[rows, :width],
                             mask[:, :width], self.completion_mask[rows, :width],
                             int(mask.sum())))
        return out

    def to(self, device: torch.device) -> Batch:
        return Batch(self.index, self.input_ids.to(device), self.attention_mask.to(device),
                     self.completion_mask.to(device), self.tokens)


def collate(pairs: Sequence[TokenizedPair], index: Sequence[int], pad_id: int) -> Batch:
    """Pad the pairs at ``index`` into one batch of 2B rows."""
    rows = [(pairs[i].chosen_ids, pairs[i].chosen_start) for i in index]
    rows += [(pairs[i].rejected_ids, pairs[i].rejected_start) for i in index]
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for r, (ids, start) in enumerate(rows):
        assert 0 < start < len(ids), "every row needs a prompt token and an answer token"
        input_ids[r, :len(ids)] = torch.tensor(ids)
        attention_mask[r, :len(ids)] = 1
        completion_mask[r, start:len(ids)] = True
    return Batch(torch.tensor(list(index)), input_ids, attention_mask, completion_mask,
                 tokens=sum(len(ids) for ids, _ in rows))


def make_batches(pairs: Sequence[TokenizedPair], index: Sequence[int], batch_size: int,
                 rng: random.Random, pad_id: int) -> list[Batch]:
    """Batches of pairs of similar length (less padding), in random order.

    Pairs are sorted by length with random tie-breaks and cut into consecutive batches, so
    each batch pads to nearly its own longest row.
    """
    order = sorted(index, key=lambda i: (pairs[i].length, rng.random()))
    batches = [collate(pairs, order[k:k + batch_size], pad_id)
               for k in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def completion_logps(model: PreTrainedModel | PeftModel, batch: Batch) -> torch.Tensor:
    """Sum of log p(answer token | everything before it) for each row: shape (2B,).

    The backbone gives hidden states; the head is applied only where the next token is an
    answer token, and log-softmax is taken as ``logit[target] - logsumexp(logits)`` on those
    M rows only, so no (2B, T, V) tensor is ever built.
    """
    causal_lm = model.get_base_model() if isinstance(model, PeftModel) else model
    hidden = causal_lm.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                  use_cache=False).last_hidden_state  # (2B, T, C)
    # Position t predicts token t + 1: score the positions right before each answer token.
    rows, cols = batch.completion_mask[:, 1:].nonzero(as_tuple=True)  # (M,), (M,)
    logits = _head_logits(causal_lm.get_output_embeddings(), hidden[rows, cols])  # (M, V)
    cap = getattr(causal_lm.config, "final_logit_softcapping", None)
    if cap:  # models such as Gemma 2 squash logits inside their own forward
        logits = torch.tanh(logits / cap) * cap
    targets = batch.input_ids[rows, cols + 1]  # (M,)
    token_logps = logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)  # (M,)
    sums = torch.zeros(batch.input_ids.shape[0], device=token_logps.device)  # (2B,)
    return sums.index_add(0, rows, token_logps)


def _head_logits(head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """fp32 logits (M, V) for hidden states (M, C).

    A bf16 logit near 20 is off by up to 0.06, about the size of the log-ratios DPO learns
    from, so a plain linear head is applied in fp32, also under bf16 autocast.
    """
    with torch.autocast(hidden.device.type, enabled=False):  # fp32 even inside autocast
        if type(head) is torch.nn.Linear:
            bias = None if head.bias is None else head.bias.float()
            return torch.nn.functional.linear(hidden.float(), head.weight.float(), bias)
        return head(hidden.float()).float()  # e.g. a LoRA-wrapped head
