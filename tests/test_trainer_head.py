"""The trainer applies the output head itself: its log-probs against the model's own forward,
on tiny randomly initialised models of several families, built here from their configs (no
download).

A freshly initialised head gives logits near zero, where a scale or a cap changes almost
nothing; the heads here are scaled up so that logits spread over tens of nats, as a trained
model's do, and a transform left out shows.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    CohereConfig,
    Gemma2Config,
    GraniteConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
)

from prefloop.trainer import batch as batch_module
from prefloop.trainer.batch import HeadMismatch, check_head, collate, completion_logps
from prefloop.trainer.tokenize import TokenizedPair

SIZES = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
         "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
FAMILIES = {
    "llama": lambda: LlamaConfig(**SIZES),
    "gemma2": lambda: Gemma2Config(**SIZES, head_dim=8, final_logit_softcapping=5.0,
                                   attn_implementation="sdpa"),  # as a round loads it
    "cohere": lambda: CohereConfig(**SIZES, logit_scale=0.0625),
    "granite": lambda: GraniteConfig(**SIZES, logits_scaling=8.0),
}
PAIRS = [TokenizedPair([5, 6, 7, 8, 9, 10], 3, [5, 6, 7, 11, 12], 3),
         TokenizedPair([13, 14, 15, 16], 2, [13, 14, 17, 18, 19, 20], 2)]


def tiny(config: PretrainedConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(100.0)  # logits of a trained model's size
    return model.eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_log_probs_match_the_models_own_forward(family: str) -> None:
    """Llama (plain head), Gemma 2 (soft-capped), Cohere (logit_scale) and Granite
    (logits_scaling): the check passes, and the log-probs equal the plain way's."""
    model = tiny(FAMILIES[family]())
    batch = collate(PAIRS, [0, 1], pad_id=0)
    assert check_head(model, batch) <= 1e-3
    with torch.no_grad():
        fast = completion_logps(model, batch)  # (4,)
        for r, (ids, start) in enumerate([(p.chosen_ids, p.chosen_start) for p in PAIRS]
                                         + [(p.rejected_ids, p.rejected_start) for p in PAIRS]):
            logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)  # (T, V)
            expected = sum(logp[t - 1, ids[t]] for t in range(start, len(ids)))
            assert fast[r].item() == pytest.approx(expected.item(), abs=1e-3), family


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bf16_weights_pass_and_a_missing_transform_still_shows(
        family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With bf16 weights (a GPU round) the model's own head rounds its logits, so only the
    mean difference is held; the families still pass, and a transform left out is still
    refused."""
    model = tiny(FAMILIES[family]()).to(torch.bfloat16)
    batch = collate(PAIRS, [0, 1], pad_id=0)
    assert check_head(model, batch) <= 0.05
    monkeypatch.setattr(batch_module, "output_logits", lambda causal_lm, hidden:
                        batch_module._head_logits(causal_lm.get_output_embeddings(), hidden))
    if family != "llama":
        with pytest.raises(HeadMismatch, match=rf"\({family}, bfloat16\) differ"):
            check_head(model, batch)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_head_that_ignores_the_transform_is_refused(family: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer as it was before it knew Cohere's and Granite's scales (and with Gemma 2's
    cap left out too): the check refuses those families, and Llama still passes."""
    monkeypatch.setattr(batch_module, "output_logits", lambda causal_lm, hidden:
                        batch_module._head_logits(causal_lm.get_output_embeddings(), hidden))
    model = tiny(FAMILIES[family]())
    batch = collate(PAIRS, [0, 1], pad_id=0)
    if family == "llama":
        assert check_head(model, batch) <= 1e-3
    else:
        with pytest.raises(HeadMismatch, match=rf"\({family}, float32\) differ"):
            check_head(model, batch)


class ScaledLlama(LlamaForCausalLM):
    """A family prefloop does not know: it doubles its logits inside its own forward."""

    def forward(self, *args, **kwargs):
        output = super().forward(*args, **kwargs)
        output.logits = output.logits * 2.0
        return output


def test_an_unknown_logit_transform_is_refused_with_the_reason() -> None:
    torch.manual_seed(0)
    model = ScaledLlama(LlamaConfig(**SIZES))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(100.0)
    with pytest.raises(HeadMismatch, match=r"\(llama, float32\) differ from the model's own "
                                           r"forward by .* nats per token on average"):
        check_head(model.train(), collate(PAIRS, [0], pad_id=0))
    assert model.training  # the check puts the model back in the mode it found it in


def test_attention_that_breaks_the_packed_row_is_refused() -> None:
    """Gemma 2 under eager attention reads the boolean 4D mask of a packed row wrongly (a
    round loads models with sdpa, which reads it right): the check compares with each
    sequence alone, so it refuses that too."""
    config = Gemma2Config(**SIZES, head_dim=8, attn_implementation="eager")
    with pytest.raises(HeadMismatch, match=r"\(gemma2, float32\) differ"):
        check_head(tiny(config), collate(PAIRS, [0, 1], pad_id=0))
