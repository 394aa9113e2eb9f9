"""Export -> train -> serve: votes stored here train an adapter that the real vLLM loads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from prefloop.cli import main
from prefloop.storage.store import Answer, Store
from prefloop.trainer.round import run_round
from prefloop.trainer.settings import RoundConfig

pytestmark = pytest.mark.slow

TOPICS = ["boil an egg", "learn to swim", "fix a bike", "bake bread", "plant a tree",
          "tie a tie", "save money", "sleep better", "write a poem", "start running",
          "clean a window", "brew tea", "fold a shirt", "paint a wall", "read faster",
          "learn chess"]


def chat(server, model: str, prompt: str, seed: int) -> str:
    response = httpx.post(server.endpoint.v1 + "/chat/completions", timeout=120, headers={
        "Authorization": f"Bearer {server.api_key}"}, json={
        "model": model, "messages": [{"role": "user", "content": prompt}], "seed": seed,
        "temperature": 0.0, "max_tokens": 24})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def answer_logprob(server, model: str, prompt: str, answer: str) -> float:
    """log p(answer | prompt) under ``model``, from vLLM's echoed prompt log-probs."""
    def total(text: str) -> float:
        response = httpx.post(server.endpoint.v1 + "/completions", timeout=120, headers={
            "Authorization": f"Bearer {server.api_key}"}, json={
            "model": model, "prompt": text, "max_tokens": 1, "echo": True, "logprobs": 0})
        assert response.status_code == 200, response.text
        return sum(lp for lp in response.json()["choices"][0]["logprobs"]["token_logprobs"]
                   if lp is not None)
    rendered = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    return total(rendered + answer + "<|im_end|>") - total(rendered)


def test_exported_votes_train_an_adapter_that_vllm_serves(tmp_path: Path, embedded_model: Path,
                                                          vllm_server):
    data_dir = tmp_path / "data"
    with Store(data_dir / "prefloop.db") as store:
        for i, topic in enumerate(TOPICS):
            conversation = store.create_conversation()
            context = [{"role": "user", "content": f"How do I {topic}?"}]
            kind = f"Happy to help you {topic}! Have a nice day."
            rude = "Figure it out yourself."
            pair = store.add_pair(conversation, context, Answer("base", kind, 1),
                                  Answer("base", rude, 2))
            # Half the votes prefer A, half prefer B: the export must sort out which is which.
            if i % 2:
                store.db["pairs"].update(pair, {"text_a": rude, "text_b": kind})
                store.vote(pair, "b")
            else:
                store.vote(pair, "a")

    exported = tmp_path / "pairs.jsonl"
    result = CliRunner().invoke(main, ["export", "--out", str(exported), "--data-dir",
                                       str(data_dir)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in exported.read_text().splitlines()]
    assert len(rows) == 16 and all("nice day" in r["chosen"][0]["content"] for r in rows)

    out = tmp_path / "adapters" / "v0001"
    metrics = run_round(RoundConfig(pairs=exported, model=embedded_model, out=out, lr=5e-4,
                                    epochs=2, batch_size=4, val_fraction=0.25, max_length=128,
                                    warmup_ratio=0.0, threads=1), progress=False)
    assert metrics["steps"][0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert metrics["held_out"]["after"]["accuracy"] > metrics["held_out"]["before"]["accuracy"]

    headers = {"Authorization": f"Bearer {vllm_server.api_key}"}
    response = httpx.post(vllm_server.endpoint.url + "/v1/load_lora_adapter", headers=headers,
                          json={"lora_name": "prefloop-v0001", "lora_path": str(out)},
                          timeout=120)
    assert response.status_code == 200, response.text
    try:
        models = httpx.get(vllm_server.endpoint.v1 + "/models", headers=headers).json()
        assert "prefloop-v0001" in {m["id"] for m in models["data"]}
        prompts = ["How do I learn to cook?", "How do I wake up early?"]
        base = [chat(vllm_server, "base", p, seed=5) for p in prompts]
        tuned = [chat(vllm_server, "prefloop-v0001", p, seed=5) for p in prompts]
        assert all(tuned) and tuned != base
        # What the votes preferred became more likely under the served adapter.
        kind = "Happy to help you learn to cook! Have a nice day."
        rude = "Figure it out yourself."
        prompt = prompts[0]
        margin_base = (answer_logprob(vllm_server, "base", prompt, kind)
                       - answer_logprob(vllm_server, "base", prompt, rude))
        margin_tuned = (answer_logprob(vllm_server, "prefloop-v0001", prompt, kind)
                        - answer_logprob(vllm_server, "prefloop-v0001", prompt, rude))
        assert margin_tuned > margin_base + 1.0, (margin_base, margin_tuned)
    finally:
        httpx.post(vllm_server.endpoint.url + "/v1/unload_lora_adapter", headers=headers,
                   json={"lora_name": "prefloop-v0001"}, timeout=60)
