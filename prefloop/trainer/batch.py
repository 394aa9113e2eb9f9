"""Batches of tokenised pairs and the log-probability of their answers under a model.

A pair is one row: the prompt once, then the chosen answer, then the rejected answer. A
4D attention mask lets the rejected answer see the prompt but not the chosen answer, and
position ids restart the rejected answer where the prompt ends, so each answer is scored
exactly as if it followed the prompt alone. The prompt, about 40% of the tokens in a typical
pair, goes through the model once instead of twice, and the two answers pad nothing against
each other. Only answer tokens are scored, and the language-model head runs on those
positions alone: with a ~49k vocabulary, logits for every position of every row would be
most of the memory and time of a step.
"""

from __future__ import annotations

import math
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
    input_ids: torch.Tensor  # (B, T) shared prompt, chosen tail, rejected tail, padding
    position_ids: torch.Tensor  # (B, T) the rejected tail restarts after the shared prompt
    lengths: torch.Tensor  # (B,) real tokens of each row
    # One entry per scored answer token (M of them): row, position that predicts it, the
    # token, and its output slot (0..B-1 chosen answers, B..2B-1 rejected answers).
    score_rows: torch.Tensor  # (M,)
    score_cols: torch.Tensor  # (M,)
    targets: torch.Tensor  # (M,)
    slots: torch.Tensor  # (M,)
    shared: torch.Tensor  # (B,) tokens of each row both answers see (the prompt)
    chosen_end: torch.Tensor  # (B,) where each row's rejected tail starts
    tokens: int  # real (unpadded) tokens in the batch

    @property
    def size(self) -> int:
        return len(self.index)

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, 1, T, T) bool, True where a query position may see a key position."""
        width = self.input_ids.shape[1]
        pos = torch.arange(width)
        query, key = pos[:, None], pos[None, :]  # (T, 1), (1, T)
        shared = self.shared[:, None, None]  # (B, 1, 1)
        chosen_end = self.chosen_end[:, None, None]  # (B, 1, 1)
        real = (query < self.lengths[:, None, None]) & (key <= query)  # causal, no padding
        # A rejected token sees the prompt and the rejected tail, never the chosen tail.
        hidden_chosen = (query >= chosen_end) & (key >= shared) & (key < chosen_end)
        mask = (real & ~hidden_chosen) | (query == key)  # padding sees itself: no empty row
        return mask[:, None]

    def chunks(self, size: int) -> list[Batch]:
        """This batch as batches of at most ``size`` pairs (``size`` 0: itself), each cut to
        its own longest row."""
        if size <= 0 or size >= self.size:
            return [self]
        out = []
        for start in range(0, self.size, size):
            stop = min(start + size, self.size)
            n = stop - start
            keep = (self.score_rows >= start) & (self.score_rows < stop)
            slots = self.slots[keep]
            rejected = slots >= self.size
            slots = torch.where(rejected, slots - self.size + n, slots) - start
            width = int(self.lengths[start:stop].max())
            out.append(Batch(self.index[start:stop], self.input_ids[start:stop, :width],
                             self.position_ids[start:stop, :width], self.lengths[start:stop],
                             self.score_rows[keep] - start, self.score_cols[keep],
                             self.targets[keep], slots, self.shared[start:stop],
                             self.chosen_end[start:stop],
                             int(self.lengths[start:stop].sum())))
        return out

    def to(self, device: torch.device) -> Batch:
        return Batch(self.index, self.input_ids.to(device), self.position_ids.to(device),
                     self.lengths, self.score_rows.to(device), self.score_cols.to(device),
                     self.targets.to(device), self.slots.to(device), self.shared,
                     self.chosen_end, self.tokens)


def shared_prefix(pair: TokenizedPair) -> int:
    """Leading tokens both sequences have before either answer starts (the prompt)."""
    limit = min(pair.chosen_start, pair.rejected_start)
    n = 0
    while n < limit and pair.chosen_ids[n] == pair.rejected_ids[n]:
        n += 1
    return n


def row_length(pair: TokenizedPair) -> int:
    return len(pair.chosen_ids) + len(pair.rejected_ids) - shared_prefix(pair)


def collate(pairs: Sequence[TokenizedPair], index: Sequence[int], pad_id: int) -> Batch:
    """Lay out the pairs at ``index`` as one row each (see the module docstring)."""
    chosen_slots, rejected_slots = [], []  # (row, col, target, slot) per scored token
    rows, positions, shared_lens = [], [], []
    size = len(index)
    for r, i in enumerate(index):
        pair = pairs[i]
        assert 0 < pair.chosen_start < len(pair.chosen_ids) \
            and 0 < pair.rejected_start < len(pair.rejected_ids), \
            "every answer needs a prompt token before it and a token of its own"
        shared = shared_prefix(pair)
        chosen, rejected = pair.chosen_ids, pair.rejected_ids
        tail = rejected[shared:]
        rows.append(chosen + tail)
        positions.append(list(range(len(chosen))) + list(range(shared, len(rejected))))
        shared_lens.append(shared)
        for t in range(pair.chosen_start, len(chosen)):  # token t predicted at t - 1
            chosen_slots.append((r, t - 1, chosen[t], r))
        for t in range(pair.rejected_start, len(rejected)):
            col = t - 1 if t - 1 < shared else len(chosen) + (t - 1 - shared)
            rejected_slots.append((r, col, rejected[t], size + r))
    width = max(len(row) for row in rows)
    input_ids = torch.full((size, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((size, width), dtype=torch.long)
    for r, (row, pos) in enumerate(zip(rows, positions, strict=True)):
        input_ids[r, :len(row)] = torch.tensor(row)
        position_ids[r, :len(pos)] = torch.tensor(pos)
    scored = torch.tensor(chosen_slots + rejected_slots, dtype=torch.long)  # (M, 4)
    lengths = torch.tensor([len(row) for row in rows])
    return Batch(torch.tensor(list(index)), input_ids, position_ids, lengths,
                 scored[:, 0], scored[:, 1], scored[:, 2], scored[:, 3],
                 torch.tensor(shared_lens), torch.tensor([len(pairs[i].chosen_ids) for i in index]),
                 tokens=int(lengths.sum()))


def make_batches(pairs: Sequence[TokenizedPair], index: Sequence[int], batch_size: int,
                 rng: random.Random, pad_id: int, order: str = "length") -> list[Batch]:
    """Batches of pairs of similar length (less padding), in random order; or with
    ``order="file"`` consecutive pairs of ``index`` as they come.

    Pairs are sorted by row length with random tie-breaks and cut into consecutive batches,
    so each batch pads to nearly its own longest row.
    """
    if order == "file":
        return [collate(pairs, index[k:k + batch_size], pad_id)
                for k in range(0, len(index), batch_size)]
    by_length = sorted(index, key=lambda i: (row_length(pairs[i]), rng.random()))
    batches = [collate(pairs, by_length[k:k + batch_size], pad_id)
               for k in range(0, len(by_length), batch_size)]
    rng.shuffle(batches)
    return batches


def completion_logps(model: PreTrainedModel | PeftModel, batch: Batch) -> torch.Tensor:
    """Sum of log p(answer token | prompt and the answer before it) per answer: shape (2B,),
    chosen answers first."""
    return answer_logps(answer_logits(model, batch), batch)


def answer_logps(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """:func:`completion_logps` from the answer logits (M, V) already computed."""
    token_logps = target_logps(logits, batch)  # (M,)
    sums = torch.zeros(2 * batch.size, device=token_logps.device)  # (2B,)
    return sums.index_add(0, batch.slots, token_logps)


def answer_token_logps(model: PreTrainedModel | PeftModel, batch: Batch) -> torch.Tensor:
    """log p of each scored answer token (M,), in the order of ``batch.targets``.

    The backbone gives hidden states; the head is applied only at the M positions that
    predict an answer token, and log-softmax is taken as ``logit[target] - logsumexp(logits)``
    on those rows only, so no (B, T, V) tensor is ever built.
    """
    return target_logps(answer_logits(model, batch), batch)


def target_logps(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """log p of each scored token (M,) from the answer logits (M, V)."""
    return logits.gather(-1, batch.targets[:, None]).squeeze(-1) - logits.logsumexp(-1)


def answer_logits(model: PreTrainedModel | PeftModel, batch: Batch) -> torch.Tensor:
    """Output logits (M, V) at the M positions that predict an answer token."""
    causal_lm = model.get_base_model() if isinstance(model, PeftModel) else model
    device = batch.input_ids.device
    hidden = causal_lm.base_model(input_ids=batch.input_ids,
                                  attention_mask=batch.attention_mask.to(device),
                                  position_ids=batch.position_ids,
                                  use_cache=False).last_hidden_state  # (B, T, C)
    return output_logits(causal_lm, hidden[batch.score_rows, batch.score_cols])


def output_logits(causal_lm: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """fp32 logits (M, V) for final hidden states (M, C), as the model's own forward makes
    them: its output layer, then what some families do to the logits inside that forward.
    A family that does something else is caught by :func:`check_head`."""
    logits = _head_logits(causal_lm.get_output_embeddings(), hidden)
    config = causal_lm.config
    if (scale := getattr(config, "logit_scale", None)) is not None:  # Cohere multiplies
        logits = logits * scale
    if (scaling := getattr(config, "logits_scaling", None)) is not None:  # Granite divides
        logits = logits / scaling
    if cap := getattr(config, "final_logit_softcapping", None):  # Gemma 2 squashes
        logits = torch.tanh(logits / cap) * cap
    return logits


class HeadMismatch(ValueError):
    """prefloop's log-probs differ from the model's own: it cannot train this model."""


# Differences allowed between prefloop's log-probs and the model's own, per answer token in
# nats, (mean, largest). Measured on the embedded model (a 75-token pair): fp32 agrees to
# 7e-6 on average, 2e-5 at most; with bf16 weights the model's own head rounds its logits
# and packed and unpacked rows round differently: 0.033 on average, 0.27 at most, so only
# the mean is held there. A logit scale off by 20% costs 0.45 on average, 2.5 at most.
HEAD_TOLERANCE = {torch.float32: (1e-3, 1e-2), torch.float64: (1e-3, 1e-2)}
HALF_PRECISION_TOLERANCE = (0.15, math.inf)


@torch.no_grad()
def head_differences(model: PreTrainedModel | PeftModel, batch: Batch) -> torch.Tensor:
    """|:func:`answer_token_logps` - the model's own| for each scored token (M,) of the first
    pair of ``batch``; the model's own: its forward on each of the pair's two sequences alone
    (``model(ids).logits``, log-softmax), no packing, no head of prefloop's."""
    pair = batch.chunks(1)[0]
    row = pair.input_ids[0, :int(pair.lengths[0])]  # (T,) prompt, chosen tail, rejected tail
    shared, chosen_end = int(pair.shared[0]), int(pair.chosen_end[0])
    sequences = (row[:chosen_end], torch.cat([row[:shared], row[chosen_end:]]))
    rejected = pair.slots >= pair.size  # (M,)
    # Where each scored token's predicting position is in its own sequence (collate's map,
    # inverted).
    positions = torch.where(rejected & (pair.score_cols >= shared),
                            pair.score_cols - chosen_end + shared, pair.score_cols)  # (M,)
    training = model.training
    model.eval()  # no dropout: both ways must see the same network
    try:
        ours = answer_token_logps(model, pair)  # (M,)
        theirs = torch.empty_like(ours)
        for side, ids in zip((~rejected, rejected), sequences, strict=True):
            logits = model(input_ids=ids[None], use_cache=False).logits[0]  # (T', V)
            logps = logits.float().log_softmax(-1)
            theirs[side] = logps[positions[side], pair.targets[side]]
    finally:
        model.train(training)
    return (ours - theirs).abs()


def check_head(model: PreTrainedModel | PeftModel, batch: Batch) -> float:
    """Check prefloop's log-probs against the model's own (:func:`head_differences`) on the
    first pair of ``batch``: returns the mean difference per token, or raises
    :class:`HeadMismatch` past the tolerance of the head's dtype.

    prefloop applies the output head itself (:func:`output_logits`) and packs a pair into
    one row behind a 4D mask, so a model family that transforms its logits, or masks
    attention, in a way it does not know would get wrong log-probs silently.
    """
    differences = head_differences(model, batch)
    causal_lm = model.get_base_model() if isinstance(model, PeftModel) else model
    dtype = causal_lm.get_output_embeddings().weight.dtype
    mean_tolerance, max_tolerance = HEAD_TOLERANCE.get(dtype, HALF_PRECISION_TOLERANCE)
    mean, largest = float(differences.mean()), float(differences.max())
    if not (mean <= mean_tolerance and largest <= max_tolerance):  # also NaN
        raise HeadMismatch(
            f"the answer log-probs prefloop computes for this model "
            f"({causal_lm.config.model_type}, {str(dtype).removeprefix('torch.')}) differ "
            f"from the model's own forward by {mean:.3g} nats per token on average, "
            f"{largest:.3g} at most (allowed: {mean_tolerance:g} and {max_tolerance:g}): its "
            "family changes its logits (or masks attention) in a way prefloop's trainer does "
            "not know (it knows Gemma-2's soft-capping, Cohere's logit_scale and Granite's "
            "logits_scaling), so a round would train on wrong log-probs. Use another base "
            "model, or teach prefloop/trainer/batch.py what this family does.")
    return mean


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
