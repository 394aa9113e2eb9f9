"""One LoRA DPO round: preference pairs in, a PEFT adapter folder plus metrics out.

The reference model is the base model itself with the adapter switched off, so one model is
in memory. Its log-probs never change during a round, so they are computed once, before the
first step. The adapter folder is written beside ``out`` under a temporary name and renamed
into place when complete: an interrupted round leaves nothing at ``out``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import resource
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefloop.atomic import atomic_path
from prefloop.hardware import cpu_has_native_bf16
from prefloop.trainer.batch import (
    Batch,
    HeadMismatch,
    answer_logits,
    answer_logps,
    check_head,
    completion_logps,
    make_batches,
)
from prefloop.trainer.data import read_pairs
from prefloop.trainer.kl import KLEstimator, pair_token_kl
from prefloop.trainer.loss import preference_loss
from prefloop.trainer.settings import RoundConfig
from prefloop.trainer.tokenize import TokenizedPair, tokenize_pairs

Event = Callable[[dict[str, Any]], None]


class RoundError(RuntimeError):
    """The round cannot run or finish; the message says what to do."""


def run_round(config: RoundConfig, on_event: Event | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Train one round and write ``config.out``; return the metrics also saved there.

    ``on_event`` receives a dict per optimizer step (``{"event": "step", ...}``) and per
    held-out evaluation (``{"event": "eval", "when": "before" | "after", ...}``).
    """
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _run_round(config, on_event or (lambda _: None), progress)
    finally:
        torch.set_num_threads(threads)  # a caller in the same process keeps its setting


def _run_round(config: RoundConfig, emit: Event, progress: bool) -> dict[str, Any]:
    start = time.perf_counter()
    _check_paths(config)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    device, dtype, amp = pick_device(config.precision)

    tokenizer = AutoTokenizer.from_pretrained(str(config.model))
    pairs, data_stats = _load_pairs(config, tokenizer)
    train_index, val_index = split_indices(len(pairs), config.val_fraction, rng)
    checked = kl_check_indices(train_index, val_index, config.kl_pairs)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch_size = batch_size_for(config, len(train_index))
    train_batches = make_batches(pairs, train_index, batch_size, rng, pad_id,
                                 config.batch_order)
    val_batches = make_batches(pairs, val_index, batch_size, rng, pad_id)
    model = load_policy(config, device, dtype)
    try:  # before any work: a head prefloop gets wrong would train on wrong log-probs
        check_head(model, (train_batches + val_batches)[0].to(device))
    except HeadMismatch as exc:
        raise RoundError(str(exc)) from None
    loaded = time.perf_counter()

    # bf16 autocast (where the CPU or GPU multiplies bf16 natively) covers the reference and
    # the policy alike, so at step 1 they still agree exactly and the loss is log 2. No cast
    # cache: it would keep bf16 copies of the LoRA weights from before each optimizer step.
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None,
                        cache_enabled=False):
        kl = None if not config.max_kl else KLEstimator(
            [pairs[i] for i in checked], pad_id, device,
            chunk=config.micro_batch or config.batch_size)
        ref = reference_logps(model, train_batches + val_batches, len(pairs), device,
                              progress)
        referenced = time.perf_counter()
        held_out = {"before": evaluate(model, val_batches, ref, config, device)}
        emit({"event": "eval", "when": "before", **(held_out["before"] or {})})
        steps, kl_checks = train(model, train_batches, ref, config, device, rng, emit,
                                 progress, kl)
        held_out["after"] = evaluate(model, val_batches, ref, config, device)
        emit({"event": "eval", "when": "after", **(held_out["after"] or {})})
    trained = time.perf_counter()

    train_seconds = sum(step["seconds"] for step in steps)
    metrics = {
        "config": {k: str(v) if isinstance(v, Path) else v
                   for k, v in dataclasses.asdict(config).items()},
        "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "autocast": str(amp).removeprefix("torch.") if amp else None,
        "pairs": {**data_stats, "train": len(train_index), "held_out": len(val_index)},
        "batch_size": batch_size,
        "tokens": {"train": sum(step["tokens"] for step in steps),
                   "reference": sum(b.tokens for b in train_batches + val_batches)},
        "steps": steps,
        "held_out": held_out,
        "kl_checks": kl_checks,
        "kl_check_pairs": {"pairs": len(checked), "held_out": bool(val_index)} if kl else None,
        "stopped_early": kl_checks[-1]["over"] if kl_checks else False,
        "kl_backtracks": sum(check["over"] for check in kl_checks[:-1]) if kl_checks else 0,
        "pairs_per_s": sum(step["pairs"] for step in steps) / max(train_seconds, 1e-9),
        "seconds": {"load": loaded - start, "reference": referenced - loaded,
                    "train": train_seconds, "total": trained - start},
        "peak_memory_mb": peak_memory_mb(device),
    }
    save_adapter(model, metrics, config.out, config.model)
    return metrics


def _check_paths(config: RoundConfig) -> None:
    if config.out.exists():
        raise RoundError(f"{config.out} already exists; choose a new --out folder "
                         "(adapters are never overwritten)")
    if not (config.model / "config.json").is_file():
        raise RoundError(f"no Hugging Face model folder at {config.model} (config.json missing);"
                         " pass --model PATH or run `prefloop model prepare`")
    if config.init_adapter and not (config.init_adapter / "adapter_config.json").is_file():
        raise RoundError(f"{config.init_adapter} is not a PEFT adapter folder "
                         "(adapter_config.json missing)")


def _load_pairs(config: RoundConfig, tokenizer: Any) -> tuple[list[TokenizedPair], dict]:
    pairs_file = read_pairs(config.pairs, skip_invalid=config.skip_invalid)
    try:
        pairs, stats = tokenize_pairs(tokenizer, pairs_file.pairs, config.max_length)
    except ValueError as exc:
        raise RoundError(f"{config.model}: {exc}") from None
    if not pairs:
        raise RoundError(f"none of the {len(pairs_file.pairs)} pairs has anything left to train "
                         f"on within max_length={config.max_length}; raise --max-length")
    stats_dict = {"read": len(pairs_file.pairs), "skipped_invalid": pairs_file.skipped,
                  **dataclasses.asdict(stats)}
    stats_dict["used"] = stats_dict.pop("pairs")
    return pairs, stats_dict


def kl_check_indices(train_index: list[int], val_index: list[int], n: int) -> list[int]:
    """The (at most ``n``) pairs the round's KL check scores: held-out ones, which training does
    not fit (training pairs only when none is held out). On the pairs it trains on, the
    policy moves furthest: a check reading mostly those read 0.10 nats/token where the
    loop's probe read 0.016 (concise, docs/BENCHMARKS.md) and stopped rounds that had not
    spent their budget."""
    return (val_index or train_index)[:n]


def split_indices(n: int, val_fraction: float, rng: random.Random) -> tuple[list[int], list[int]]:
    """Shuffle 0..n-1 into (train, held-out); at least one held-out pair if asked for any."""
    order = list(range(n))
    rng.shuffle(order)
    n_val = min(n - 1, max(1, round(n * val_fraction))) if val_fraction > 0 else 0
    return sorted(order[n_val:]), sorted(order[:n_val])


def pick_device(precision: str = "auto") -> tuple[torch.device, torch.dtype,
                                                  torch.dtype | None]:
    """Device, dtype of the weights, and autocast dtype (None: none).

    CUDA: bf16 weights where the GPU has bf16. CPU: fp32, or with ``bf16`` fp32 weights under
    bf16 autocast. Measured here (docs/BENCHMARKS.md), bf16 autocast on an AMX CPU made a step
    1.4x faster but the loss fell about half as far per step, so ``auto`` stays in fp32.
    """
    if torch.cuda.is_available():
        bf16 = torch.cuda.is_bf16_supported() and precision != "fp32"
        return torch.device("cuda"), torch.bfloat16 if bf16 else torch.float32, None
    if precision == "bf16" and not cpu_has_native_bf16():
        # Refused, not warned: on such a CPU torch emulates bf16, slower than fp32, and even
        # where it is native it learned half as fast per step.
        raise RoundError("--precision bf16 needs a CPU with AVX512-BF16 or AMX (or a GPU); "
                         "this CPU would only emulate it, slower than fp32: use fp32 or auto")
    return torch.device("cpu"), torch.float32, torch.bfloat16 if precision == "bf16" else None


def load_policy(config: RoundConfig, device: torch.device, dtype: torch.dtype) -> PeftModel:
    """The base model wrapped with a trainable LoRA adapter (new, or warm-started)."""
    model = AutoModelForCausalLM.from_pretrained(
        str(config.model), dtype=dtype,
        attn_implementation="sdpa")  # takes the boolean 4D masks of batch.py as they are
    model.config.use_cache = False
    if config.init_adapter:
        # The adapter's own rank, alpha and target modules apply; training continues from it.
        model = PeftModel.from_pretrained(model, str(config.init_adapter), is_trainable=True)
    else:
        targets = config.target_modules
        lora = LoraConfig(task_type="CAUSAL_LM", r=config.lora_r, lora_alpha=config.lora_alpha,
                          lora_dropout=config.lora_dropout,
                          target_modules="all-linear" if targets == ("all-linear",)
                          else list(targets))
        try:
            model = get_peft_model(model, lora)
        except ValueError as exc:  # e.g. a target module the model does not have
            raise RoundError(f"cannot add LoRA to {config.model}: {exc}") from None
    return model.to(device)


@torch.no_grad()
def reference_logps(model: PeftModel, batches: Sequence[Batch], n_pairs: int,
                    device: torch.device, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Answer log-probs under the base model (adapter off), shape (n_pairs,) each."""
    chosen, rejected = torch.zeros(n_pairs), torch.zeros(n_pairs)
    model.eval()
    with model.disable_adapter():
        for batch in tqdm(batches, desc="reference", file=sys.stderr, disable=not progress,
                          leave=False):
            logps = completion_logps(model, batch.to(device)).cpu()  # (2B,)
            chosen[batch.index], rejected[batch.index] = logps[:batch.size], logps[batch.size:]
    return chosen, rejected


def _pair_stats(model: PeftModel, batch: Batch, ref: tuple[torch.Tensor, torch.Tensor],
                config: RoundConfig, device: torch.device) -> tuple[torch.Tensor, Counter]:
    """Per-pair losses (B,) for one batch, and sums of what is reported about them."""
    batch = batch.to(device)
    logits = answer_logits(model, batch)  # (M, V)
    logps = answer_logps(logits, batch)  # (2B,)
    policy_chosen, policy_rejected = logps[:batch.size], logps[batch.size:]  # (B,) each
    ref_chosen, ref_rejected = (r[batch.index].to(device) for r in ref)
    losses, chosen_rewards, rejected_rewards = preference_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected,
        loss=config.loss, beta=config.beta, label_smoothing=config.label_smoothing)
    extra = {}
    if config.sft_coef:
        nll = -policy_chosen / chosen_tokens(batch)  # (B,) nats per chosen answer token
        losses = losses + config.sft_coef * nll
        extra["nll_chosen"] = nll.detach().sum().item()
    if config.kl_coef:
        kl = pair_token_kl(model, batch, logits)  # (B,)
        losses = losses + config.kl_coef * kl
        extra["kl_per_token"] = kl.detach().sum().item()
    sums = Counter({
        "loss": losses.detach().sum().item(),
        "rewards_chosen": chosen_rewards.sum().item(),
        "rewards_rejected": rejected_rewards.sum().item(),
        "accuracy": (chosen_rewards > rejected_rewards).sum().item(),
        "margin": (chosen_rewards - rejected_rewards).sum().item(),
        "logps_chosen": policy_chosen.detach().sum().item(),
        "logps_rejected": policy_rejected.detach().sum().item(),
    } | extra)
    return losses, sums


def chosen_tokens(batch: Batch) -> torch.Tensor:
    """(B,) scored tokens of each pair's chosen answer."""
    return torch.bincount(batch.slots, minlength=2 * batch.size)[:batch.size].float()


@torch.no_grad()
def evaluate(model: PeftModel, batches: Sequence[Batch], ref: tuple[torch.Tensor, torch.Tensor],
             config: RoundConfig, device: torch.device) -> dict[str, float] | None:
    """Mean loss, rewards, reward accuracy and margin over the held-out pairs (None if none)."""
    if not batches:
        return None
    model.eval()
    total, n = Counter(), 0
    for batch in batches:
        total.update(_pair_stats(model, batch, ref, config, device)[1])
        n += batch.size
    return {key: value / n for key, value in total.items()} | {"pairs": n}


def batch_size_for(config: RoundConfig, pairs: int) -> int:
    """Pairs per batch for ``pairs`` training pairs: ``batch_size``, or fewer where that would
    make fewer than ``min_steps`` optimizer steps an epoch (at least one pair)."""
    if not config.min_steps:
        return config.batch_size
    return max(1, min(config.batch_size,
                      math.ceil(pairs / (config.min_steps * config.grad_accum))))


MIN_KL_CHECKS = 4
"""A round checks its KL at least this often (every step in a round of fewer than eight
steps): with few votes a round makes few steps, and a check over the budget only at the end
would put back the weights the round started from and leave it unlearned."""


KL_BACKTRACK_FACTOR = 0.5
"""After a check over the budget the learning rate is multiplied by this (Adam moves each
weight by about the learning rate, so the KL a step adds falls to about a quarter)."""


def _scale_lr(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
              factor: float) -> None:
    """Scale the learning rate from the next step on, the schedule's shape kept."""
    scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
    for group in optimizer.param_groups:
        group["lr"] *= factor


def train(model: PeftModel, batches: Sequence[Batch], ref: tuple[torch.Tensor, torch.Tensor],
          config: RoundConfig, device: torch.device, rng: random.Random, emit: Event,
          progress: bool, kl: KLEstimator | None = None, min_checks: int = MIN_KL_CHECKS,
          ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """AdamW over ``config.epochs`` passes; one optimizer step per ``grad_accum`` batches.

    With ``kl``, the KL from the base is checked before the first step, every
    ``kl_check_steps`` steps (more often in a round of few steps: at least ``min_checks``
    checks) and after the last. A check over ``max_kl`` puts back the weights of the last
    check under it (those it started from, if none was); then training goes on at half the
    learning rate, checked after every step, up to ``kl_backtracks`` times, and stops at the
    next over-budget check after that (or at one after the last step). Returns the steps
    taken and the checks.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    checks: list[dict[str, Any]] = []
    kept = _kl_check(model, kl, config, 0, checks, emit)
    if checks and checks[-1]["over"]:  # it starts over the budget: nothing to spend
        return [], checks
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    per_epoch = math.ceil(len(batches) / config.grad_accum)
    total = per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, linear_warmup_decay(int(config.warmup_ratio * total), total))
    every = min(config.kl_check_steps, max(1, total // min_checks))
    backtracks = 0
    steps: list[dict[str, Any]] = []
    bar = tqdm(total=total, desc="train", unit="step", file=sys.stderr, disable=not progress)
    model.train()
    for epoch in range(config.epochs):
        order = list(batches)
        if config.batch_order == "length":
            rng.shuffle(order)
        for k in range(0, len(order), config.grad_accum):
            group = order[k:k + config.grad_accum]
            step = {"step": len(steps) + 1, "of": total, "epoch": epoch + 1,
                    "lr": optimizer.param_groups[0]["lr"]}
            step |= _optimizer_step(model, params, optimizer, group, ref, config, device)
            scheduler.step()
            steps.append(step)
            emit({"event": "step", **step})
            bar.set_postfix(loss=f"{step['loss']:.4f}", acc=f"{step['accuracy']:.2f}")
            bar.update()
            if kl and (len(steps) % every == 0 or len(steps) == total):
                kept = _kl_check(model, kl, config, len(steps), checks, emit, kept)
                if checks[-1]["over"]:
                    if backtracks == config.kl_backtracks or len(steps) == total:
                        bar.close()
                        return steps, checks
                    backtracks += 1
                    _scale_lr(optimizer, scheduler, KL_BACKTRACK_FACTOR)
                    every = 1
                model.train()
    bar.close()
    return steps, checks


def _kl_check(model: PeftModel, kl: KLEstimator | None, config: RoundConfig, step: int,
              checks: list[dict[str, Any]], emit: Event,
              kept: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor] | None:
    """Measure the KL after ``step`` steps and record it. Under ``max_kl``: return a copy of
    the trainable weights (the ones to come back to). Over it: put ``kept`` back."""
    if kl is None:
        return None
    start = time.perf_counter()
    check = kl.measure(model)
    over = check.per_token > config.max_kl
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if over and kept is not None:
        with torch.no_grad():
            for name, p in trainable.items():
                p.copy_(kept[name])
    record = {"step": step, **check.as_dict(), "over": over,
              "kept_step": (checks[-1]["step"] if checks else None) if over else step,
              "seconds": time.perf_counter() - start}
    checks.append(record)
    emit({"event": "kl_check", **record})
    if over:
        return kept
    return {name: p.detach().clone() for name, p in trainable.items()}


def _optimizer_step(model: PeftModel, params: list[torch.nn.Parameter],
                    optimizer: torch.optim.Optimizer, group: Sequence[Batch],
                    ref: tuple[torch.Tensor, torch.Tensor], config: RoundConfig,
                    device: torch.device) -> dict[str, Any]:
    """Accumulate gradients over ``group`` and take one step; return the step's means."""
    start = time.perf_counter()
    n = sum(batch.size for batch in group)
    total = Counter()
    for batch in group:
        for chunk in batch.chunks(config.micro_batch):
            losses, sums = _pair_stats(model, chunk, ref, config, device)
            # The mean over all pairs of the step, whatever the sizes of its chunks.
            (losses.sum() / n).backward()
            total.update(sums)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm).item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    return {key: value / n for key, value in total.items()} | {
        "grad_norm": grad_norm, "pairs": n, "tokens": sum(b.tokens for b in group),
        "seconds": seconds, "pairs_per_s": n / seconds}


def linear_warmup_decay(warmup: int, total: int) -> Callable[[int], float]:
    """LR factor for step s (0-based): up linearly over ``warmup`` steps, then down to 1/n."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / (total - warmup))

    return factor


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """Peak resident memory of this process, plus CUDA's peak allocation on a GPU."""
    peak = {"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB on Linux
    if device.type == "cuda":
        peak["cuda_allocated"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peak


def save_adapter(model: PeftModel, metrics: dict[str, Any], out: Path, base_model: Path) -> None:
    """Write the adapter and metrics.json to a temporary folder, then rename it to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(out, folder=True, replace=False) as tmp:
            # vLLM loads the base model named here; make it the absolute path we trained on.
            model.peft_config[model.active_adapter].base_model_name_or_path = \
                str(base_model.resolve())
            model.save_pretrained(str(tmp))
            (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    except FileExistsError:
        raise RoundError(f"{out} appeared while training; the adapter was not written") \
            from None
