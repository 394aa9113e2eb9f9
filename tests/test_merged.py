"""A crowned adapter merged into the base weights (serving/merged.py), for a champion engine
without LoRA: on the embedded model with a LoRA adapter trained a few steps, the merged
folder's logits are the base + adapter logits; the folder is whole, has the tokenizer, and
its name changes with the weights; bad adapters get a clear error and leave nothing."""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

import pytest

from prefloop.serving.merged import (
    MARKER,
    MergeError,
    ensure_merged,
    is_merged,
    main,
    merged_name,
    remove_unused,
)
from prefloop.trainer.settings import DEFAULT_TARGET_MODULES

pytestmark = pytest.mark.slow  # trains an adapter a few steps and merges in a subprocess

PROMPT = "The capital of France is Paris. The capital of Italy is"


def train_adapter(model_path: Path, out: Path, steps: int = 3):
    """Save at ``out`` a LoRA adapter (rank 8, the blocks' linear layers) on ``model_path``
    trained ``steps`` steps on one sentence, so that it differs from base; returns the
    sentence's token ids (1, T) and the logits (1, T, V) of base + adapter and of base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    ids = AutoTokenizer.from_pretrained(model_path)(PROMPT, return_tensors="pt").input_ids
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16,
                                            target_modules=list(DEFAULT_TARGET_MODULES)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        with_adapter = model(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
    model.save_pretrained(out)
    del model, base, optimizer
    gc.collect()
    return ids, with_adapter, plain


@pytest.fixture(scope="module")
def trained(embedded_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """The adapter of :func:`train_adapter` and what it returns."""
    adapter = tmp_path_factory.mktemp("adapters") / "v0001"
    return adapter, *train_adapter(embedded_model, adapter)


def test_the_merged_model_answers_as_base_plus_adapter(trained, embedded_model: Path,
                                                       tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter, ids, with_adapter, plain = trained
    # The adapter moved the logits well beyond the tolerance below, so equality means
    # something.
    assert (with_adapter - plain).abs().max() > 0.1
    merged_dir = tmp_path / "merged"
    out = ensure_merged("v0001", adapter, embedded_model, merged_dir)  # in a subprocess
    assert out.parent == merged_dir and out.name == merged_name("v0001", adapter, embedded_model)
    assert out.name.startswith("v0001-") and is_merged(out)
    assert not (out / "adapter_config.json").exists()  # a plain model folder
    assert (out / "tokenizer_config.json").is_file()
    assert AutoTokenizer.from_pretrained(out)(PROMPT).input_ids == ids[0].tolist()
    made = json.loads((out / MARKER).read_text())
    assert made["adapter"] == str(adapter.resolve()) and made["dtype"] == "float32"

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        logits = merged(input_ids=ids).logits
    assert (logits - with_adapter).abs().max() < 1e-3
    assert logits[0, -1].argmax() == with_adapter[0, -1].argmax()
    del merged
    gc.collect()

    # Made once: a second call finds the complete folder.
    stamp = (out / MARKER).stat().st_mtime_ns
    assert ensure_merged("v0001", adapter, embedded_model, merged_dir) == out
    assert (out / MARKER).stat().st_mtime_ns == stamp
    # Other weights, another name: a folder name never stands for two sets of weights.
    other = tmp_path / "other" / "v0001"
    shutil.copytree(adapter, other)
    weights = other / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last tensor
    weights.write_bytes(bytes(data))
    assert merged_name("v0001", other, embedded_model) != out.name
    # Clean-up keeps what is served.
    (merged_dir / ".v0002-abc.tmp-x").mkdir()  # a merge a crash cut short
    assert remove_unused(merged_dir, [out]) == [".v0002-abc.tmp-x"]
    assert is_merged(out)


def test_an_adapter_for_another_model_is_refused_and_nothing_is_written(
        trained, embedded_model: Path, tmp_path: Path) -> None:
    adapter = tmp_path / "v0002"
    shutil.copytree(trained[0], adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "/models/someone-else"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(MergeError, match="v0002 cannot be merged: the adapter was trained on"):
        ensure_merged("v0002", adapter, embedded_model, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_a_cut_short_adapter_is_refused(trained, embedded_model: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    adapter = tmp_path / "v0003"
    shutil.copytree(trained[0], adapter)
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(MergeError, match="cut short"):
        ensure_merged("v0003", adapter, embedded_model, tmp_path / "merged")
    out = tmp_path / "merged" / "v0003-x"
    assert main(["--base-model", str(embedded_model), "--adapter", str(adapter),
                 "--out", str(out)]) == 1
    assert "cut short" in capsys.readouterr().err and not out.exists()


def test_a_merge_that_fails_in_its_subprocess_says_why_and_leaves_nothing(
        trained, embedded_model: Path, tmp_path: Path) -> None:
    adapter = tmp_path / "v0004"
    shutil.copytree(trained[0], adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["target_modules"] = ["no_such_proj"]  # PEFT finds nothing to adapt
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    merged_dir = tmp_path / "merged"
    with pytest.raises(MergeError, match=r"(?s)merging v0004 failed.*no_such_proj"):
        ensure_merged("v0004", adapter, embedded_model, merged_dir)
    assert [p.suffix for p in merged_dir.iterdir()] == [".log"]  # its log, no folder
