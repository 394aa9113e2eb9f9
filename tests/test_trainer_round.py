"""One LoRA DPO round: log-prob maths, output folder, interruption, CLI, and a real round.

Most tests use a tiny random Llama with the embedded model's tokenizer (seconds); the ones
marked slow train the embedded model itself or start the trainer as a subprocess.
"""

from __future__ import annotations

import ast
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from prefloop.hardware import NO_NATIVE_BF16_ENV, cpu_has_native_bf16
from prefloop.trainer.batch import collate, completion_logps
from prefloop.trainer.cli import train_command
from prefloop.trainer.round import (
    RoundError,
    linear_warmup_decay,
    load_policy,
    run_round,
    save_adapter,
    split_indices,
)
from prefloop.trainer.settings import RoundConfig
from prefloop.trainer.tokenize import TokenizedPair

STEP_FIELDS = {"step", "epoch", "lr", "loss", "rewards_chosen", "rewards_rejected", "accuracy",
               "margin", "logps_chosen", "logps_rejected", "grad_norm", "pairs", "tokens",
               "seconds", "pairs_per_s"}
TOPICS = ["boil an egg", "learn to swim", "fix a bike", "bake bread", "plant a tree",
          "tie a tie", "save money", "sleep better", "write a poem", "start running",
          "clean a window", "brew tea", "fold a shirt", "paint a wall", "read faster",
          "learn chess", "cook rice", "wash a car", "sharpen a knife", "make friends"]


@pytest.fixture(scope="module")
def tiny_model(embedded_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama with the embedded tokenizer: a whole round in seconds."""
    path = tmp_path_factory.mktemp("tiny-model")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(embedded_model).save_pretrained(path)
    return path


def _write_pairs(path: Path, n: int) -> Path:
    """n easy pairs: a friendly answer that closes with a fixed phrase, against a rude one."""
    with path.open("w") as f:
        for i in range(n):
            topic = TOPICS[i % len(TOPICS)]
            f.write(json.dumps({
                # A short system message: SmolLM's default one would double every sequence.
                "prompt": [{"role": "system", "content": "Be kind."},
                           {"role": "user", "content": f"How do I {topic}?"}],
                "chosen": [{"role": "assistant",
                            "content": f"Happy to help you {topic}! Have a nice day."}],
                "rejected": [{"role": "assistant", "content": "Figure it out yourself."}],
            }) + "\n")
    return path


def _config(tmp_path: Path, model: Path, n_pairs: int = 8, **kwargs) -> RoundConfig:
    tmp_path.mkdir(parents=True, exist_ok=True)
    pairs = _write_pairs(tmp_path / "pairs.jsonl", n_pairs)
    settings = {"out": tmp_path / "adapters" / "v0001", "batch_size": 4, "val_fraction": 0.25,
                "max_length": 128} | kwargs
    return RoundConfig(pairs=pairs, model=model, **settings)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_completion_logps_match_full_log_softmax(tiny_model: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    pairs = [TokenizedPair([5, 6, 7, 8, 9], 2, [5, 6, 7, 10], 3),
             TokenizedPair([11, 12, 13], 1, [11, 12, 14, 15, 16, 17], 2)]
    batch = collate(pairs, [0, 1], pad_id=2)
    # One row a pair: the shared prompt once, then both answers' own tokens.
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 7, 10, 2],
                                        [11, 12, 13, 12, 14, 15, 16, 17]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 3, 0], [0, 1, 2, 1, 2, 3, 4, 5]]
    assert batch.tokens == 7 + 8
    with torch.no_grad():
        fast = completion_logps(model, batch)  # (4,)
        # The plain way: logits for every position, then log-softmax over the vocabulary.
        rows = [pairs[0].chosen_ids, pairs[1].chosen_ids, pairs[0].rejected_ids,
                pairs[1].rejected_ids]
        starts = [2, 1, 3, 2]
        for r, (ids, start) in enumerate(zip(rows, starts, strict=True)):
            logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)  # (T, V)
            expected = sum(logp[t - 1, ids[t]] for t in range(start, len(ids)))
            assert fast[r].item() == pytest.approx(expected.item(), abs=1e-4)


def test_reference_is_the_model_with_its_adapter_off(tiny_model: Path, tmp_path: Path) -> None:
    config = _config(tmp_path, tiny_model)
    policy = load_policy(config, torch.device("cpu"), torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    batch = collate([TokenizedPair([5, 6, 7, 8], 2, [5, 6, 9, 10], 2)], [0], pad_id=2)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_()  # a trained adapter: the policy now differs from the base
        policy.eval()
        with policy.disable_adapter():
            reference = completion_logps(policy, batch)
        assert torch.allclose(reference, completion_logps(base, batch), atol=1e-5)
        assert not torch.allclose(completion_logps(policy, batch), reference, atol=1e-3)


def test_round_writes_adapter_and_metrics(tiny_model: Path, tmp_path: Path) -> None:
    config = _config(tmp_path, tiny_model, epochs=2)
    events: list[dict] = []
    metrics = run_round(config, on_event=events.append, progress=False)

    out = config.out
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json",
                                               "adapter_model.safetensors", "metrics.json"}
    assert _leftovers(out.parent) == ["v0001"]  # no temporary folder left beside it
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_model.resolve())
    assert adapter_config["r"] == 8 and set(adapter_config["target_modules"]) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert saved["pairs"] == {"read": 8, "skipped_invalid": 0, "used": 8, "dropped": 0,
                              "train": 6, "held_out": 2, "prompts_truncated": 0,
                              "answers_truncated": 0, "boundary_merges": 0}
    assert len(saved["steps"]) == 4  # 2 batches (4 + 2 pairs) x 2 epochs
    assert all(STEP_FIELDS <= set(step) for step in saved["steps"])
    assert saved["steps"][0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert saved["held_out"]["before"]["accuracy"] == 0.0  # policy == reference: no margin
    assert set(saved["held_out"]["after"]) >= {"accuracy", "margin", "loss", "pairs"}
    assert saved["tokens"]["train"] > 0 and saved["pairs_per_s"] > 0
    assert saved["peak_memory_mb"]["rss"] > 0 and saved["seconds"]["total"] > 0
    assert [e["event"] for e in events] == ["eval", "step", "step", "step", "step", "eval"]

    # The saved adapter loads, and it is the trained one (LoRA B starts at zero).
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out)
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert len(lora_b) == 2 * 7 and all(p.abs().sum() > 0 for p in lora_b)


def test_round_is_repeatable(tiny_model: Path, tmp_path: Path) -> None:
    first = run_round(_config(tmp_path / "a", tiny_model, seed=3), progress=False)
    second = run_round(_config(tmp_path / "b", tiny_model, seed=3), progress=False)
    assert [s["loss"] for s in first["steps"]] == [s["loss"] for s in second["steps"]]
    assert first["held_out"] == second["held_out"]


def test_warm_start_continues_from_the_adapter(tiny_model: Path, tmp_path: Path) -> None:
    first = run_round(_config(tmp_path, tiny_model, epochs=2), progress=False)
    config = _config(tmp_path, tiny_model, init_adapter=tmp_path / "adapters" / "v0001",
                     out=tmp_path / "adapters" / "v0002")
    second = run_round(config, progress=False)
    # Same pairs and seed give the same held-out split; the reference is still the base model,
    # so the second round starts where the first one ended.
    before, ended = second["held_out"]["before"], first["held_out"]["after"]
    assert before["margin"] == pytest.approx(ended["margin"], abs=1e-4)
    assert before["accuracy"] == ended["accuracy"]
    assert second["steps"][0]["loss"] != pytest.approx(math.log(2), abs=1e-4)


def test_existing_out_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    config = _config(tmp_path, tiny_model)
    config.out.mkdir(parents=True)
    with pytest.raises(RoundError, match="already exists; choose a new --out"):
        run_round(config, progress=False)


def test_crash_mid_training_leaves_nothing(tiny_model: Path, tmp_path: Path) -> None:
    config = _config(tmp_path, tiny_model, epochs=3)

    def crash(event: dict) -> None:
        if event["event"] == "step" and event["step"] == 2:
            raise RuntimeError("injected")

    with pytest.raises(RuntimeError, match="injected"):
        run_round(config, on_event=crash, progress=False)
    assert not config.out.exists() and _leftovers(config.out.parent) == []


def test_crash_while_saving_leaves_nothing(tiny_model: Path, tmp_path: Path) -> None:
    model = load_policy(_config(tmp_path, tiny_model), torch.device("cpu"), torch.float32)
    out = tmp_path / "adapters" / "v0002"

    def half_write(path: str, **_: object) -> None:
        (Path(path) / "adapter_config.json").write_text("{}")
        raise KeyboardInterrupt  # as SIGINT would, halfway through the files

    model.save_pretrained = half_write
    with pytest.raises(KeyboardInterrupt):
        save_adapter(model, {}, out, tiny_model)
    assert _leftovers(out.parent) == []


def test_split_and_schedule() -> None:
    train, val = split_indices(16, 0.1, random.Random(0))
    assert len(val) == 2 and sorted(train + val) == list(range(16))
    assert split_indices(5, 0.1, random.Random(0))[1] != []  # asked for some: gets one
    assert split_indices(5, 0.0, random.Random(0))[1] == []
    factor = linear_warmup_decay(warmup=2, total=6)
    assert [round(factor(s), 3) for s in range(6)] == [0.333, 0.667, 1.0, 0.75, 0.5, 0.25]


def test_cli_help_and_bad_settings(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(train_command, ["--help"])
    assert result.exit_code == 0
    assert "--pairs" in result.output and "--init-adapter" in result.output
    pairs = _write_pairs(tmp_path / "p.jsonl", 2)
    result = runner.invoke(train_command, ["--pairs", str(pairs), "--out", str(tmp_path / "o"),
                                           "--model", str(tmp_path), "--beta", "0"])
    assert result.exit_code == 1 and "beta must be > 0" in result.output
    result = runner.invoke(train_command, ["--pairs", str(pairs), "--out", str(tmp_path / "o"),
                                           "--model", str(tmp_path)])
    assert result.exit_code == 1 and "no Hugging Face model folder" in result.output


def test_cli_json_lines(tiny_model: Path, tmp_path: Path) -> None:
    pairs = _write_pairs(tmp_path / "p.jsonl", 6)
    args = ["--pairs", str(pairs), "--out", str(tmp_path / "out"), "--model", str(tiny_model),
            "--batch-size", "2", "--val-fraction", "0.3", "--json"]
    result = CliRunner().invoke(train_command, args)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["event"] for e in lines] == ["eval", "step", "step", "eval", "done"]
    assert lines[-1]["out"] == str(tmp_path / "out") and lines[-1]["pairs"]["held_out"] == 2


@pytest.mark.slow
def test_real_round_learns_the_preference(embedded_model: Path, tmp_path: Path) -> None:
    # One thread: beside a busy vLLM server (other tests, other work) on a 2-core machine, two
    # torch threads spend most of their time waiting for each other.
    config = _config(tmp_path, embedded_model, n_pairs=16, lr=5e-4, epochs=2, warmup_ratio=0.0,
                     threads=1)
    start = time.perf_counter()
    metrics = run_round(config, progress=False)
    print(f"\nreal round: {time.perf_counter() - start:.1f} s, "
          f"{metrics['pairs_per_s']:.2f} pairs/s, peak {metrics['peak_memory_mb']['rss']:.0f} MB")
    for step in metrics["steps"]:
        print({k: round(v, 3) for k, v in step.items()})
    print(metrics["held_out"], metrics["seconds"])

    before, after = metrics["held_out"]["before"], metrics["held_out"]["after"]
    assert metrics["pairs"]["held_out"] == 4
    assert after["accuracy"] > before["accuracy"] and after["accuracy"] >= 0.75
    assert after["margin"] > before["margin"] + 0.1
    steps = metrics["steps"]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert steps[-1]["loss"] < steps[0]["loss"]
    adapter_config = json.loads((config.out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(embedded_model.resolve())
    assert (config.out / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_sigterm_leaves_nothing(tiny_model: Path, tmp_path: Path) -> None:
    pairs = _write_pairs(tmp_path / "p.jsonl", 64)
    out = tmp_path / "adapters" / "v0001"
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefloop.trainer", "--pairs", str(pairs), "--out", str(out),
         "--model", str(tiny_model), "--batch-size", "1", "--epochs", "100", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env=os.environ | {"PYTHONUNBUFFERED": "1"})
    try:
        for line in proc.stdout:  # wait until training is under way
            if json.loads(line)["event"] == "step":
                break
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not out.exists() and _leftovers(out.parent) == []


def test_trainer_imports_neither_app_nor_serving() -> None:
    package = Path(__file__).resolve().parent.parent / "prefloop" / "trainer"
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert not name.startswith(("prefloop.app", "prefloop.serving")), path.name


def test_micro_batches_change_memory_not_maths(tiny_model: Path, tmp_path: Path) -> None:
    whole = run_round(_config(tmp_path / "a", tiny_model, micro_batch=0, precision="fp32",
                              lora_dropout=0.0, epochs=2), progress=False)
    split = run_round(_config(tmp_path / "b", tiny_model, micro_batch=1, precision="fp32",
                              lora_dropout=0.0, epochs=2), progress=False)
    for a, b in zip(whole["steps"], split["steps"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert whole["held_out"]["after"]["margin"] == pytest.approx(
        split["held_out"]["after"]["margin"], abs=1e-5)


def test_chunks_keep_rows_paired_and_trim_padding() -> None:
    pairs = [TokenizedPair([5, 6, 7, 8, 9, 10, 11], 2, [5, 6, 7], 2),
             TokenizedPair([11, 12, 13], 1, [11, 12, 14], 2)]
    batch = collate(pairs, [0, 1], pad_id=2)
    first, second = batch.chunks(1)
    assert first.index.tolist() == [0] and second.index.tolist() == [1]
    assert first.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, 7]]
    assert second.input_ids.tolist() == [[11, 12, 13, 12, 14]]  # cut to its own width
    assert first.tokens + second.tokens == batch.tokens
    assert sorted(first.slots.tolist()) == [0] * 5 + [1]  # chosen slot 0, rejected slot 1
    assert sorted(second.slots.tolist()) == [0, 0, 1]
    assert batch.chunks(0) == [batch] and batch.chunks(5) == [batch]


def test_bf16_autocast_round_where_the_cpu_has_it(tiny_model: Path, tmp_path: Path) -> None:
    """Native bf16 (AVX512-BF16, AMX, a GPU): the round runs under autocast. Without it
    (an AVX2-only CPU, or the rehearsal override): a clear refusal, nothing written."""
    config = _config(tmp_path, tiny_model, precision="bf16")
    if not (torch.cuda.is_available() or cpu_has_native_bf16()):
        with pytest.raises(RoundError, match="AVX512-BF16 or AMX.*use fp32"):
            run_round(config, progress=False)
        assert not config.out.exists()
        return
    metrics = run_round(config, progress=False)
    assert metrics["autocast"] == "bfloat16" and metrics["dtype"] == "float32"
    assert metrics["steps"][0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    fp32 = run_round(_config(tmp_path / "fp32", tiny_model, precision="fp32"), progress=False)
    assert fp32["autocast"] is None


def test_bf16_is_refused_on_a_cpu_without_it(tiny_model: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(NO_NATIVE_BF16_ENV, "1")  # any machine rehearses an AVX2-only CPU
    config = _config(tmp_path, tiny_model, precision="bf16")
    with pytest.raises(RoundError, match="AVX512-BF16 or AMX"):
        run_round(config, progress=False)
    assert not config.out.exists()
    assert run_round(_config(tmp_path / "auto", tiny_model, precision="auto"),
                     progress=False)["autocast"] is None
