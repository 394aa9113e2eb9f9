"""What a training round is told, checked before anything heavy is loaded.

Kept free of torch so the command line can show its help and reject bad flags at once.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

LOSSES = ("sigmoid", "cdpo", "ipo", "hinge", "robust")
# auto: bf16 on a GPU that has it, fp32 on a CPU; bf16 on a CPU means bf16 autocast (needs
# AVX512-BF16 or AMX), faster per step but slower to learn here (see round.pick_device).
PRECISIONS = ("auto", "fp32", "bf16")
BATCH_ORDERS = ("length", "file")
# Losses that read label_smoothing (the assumed probability that a label is flipped).
SMOOTHED_LOSSES = ("cdpo", "robust")
# Every linear layer of a Llama-style block; lm_head stays frozen (tied to the embeddings).
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                          "down_proj")


def check_loss_settings(loss: str, beta: float, label_smoothing: float = 0.0) -> None:
    """Raise ValueError, saying what to do, when the loss settings make no sense."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of: {', '.join(LOSSES)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0 (try 0.1), got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) (try 0.1), got {label_smoothing}")
    if label_smoothing > 0 and loss not in SMOOTHED_LOSSES:
        raise ValueError(f"label_smoothing is used only by the {' and '.join(SMOOTHED_LOSSES)} "
                         f"losses; pick one of them or set label_smoothing to 0 for {loss!r}")


def knob(default: Any, help: str, *, choices: tuple[str, ...] | None = None) -> Any:
    """A :class:`RoundConfig` field with its help text (and allowed values): the trainer's
    command line and the loop's ``train_*`` settings are made from these."""
    return field(default=default, metadata={"help": help, "choices": choices})


_REQUIRED: Any = MISSING  # a knob with no default: the command line requires it


@dataclass(frozen=True)
class RoundConfig:
    """Everything one round is told: the one definition of the trainer's knobs. The trainer's
    options (:mod:`prefloop.trainer.cli`), the argv that runs it (:func:`arguments`) and the
    loop's ``train_*`` settings derive from these fields. Bad values raise ValueError on
    construction.

    The defaults suit the embedded SmolLM2-135M-Instruct on a CPU.
    """

    pairs: Path = knob(_REQUIRED, "Preference pairs, JSONL (TRL conversational or standard).")
    out: Path = knob(_REQUIRED, "Adapter folder to create (must not exist).")
    model: Path = knob(_REQUIRED, "Base model, a local Hugging Face folder.")
    init_adapter: Path | None = knob(None, "Continue training this adapter instead of a new one.")
    loss: str = knob("sigmoid", "Preference loss.", choices=LOSSES)
    beta: float = knob(0.05, "Strength of the pull towards the reference model.")
    label_smoothing: float = knob(0.0, "Assumed share of flipped labels (cdpo, robust).")
    lr: float = knob(5e-4, "Peak learning rate.")
    epochs: int = knob(1, "Passes over the pairs.")
    batch_size: int = knob(4, "Pairs per batch (2x that many sequences); an optimizer step "
                              "takes --grad-accum batches.")
    grad_accum: int = knob(1, "Batches per optimizer step.")
    # For a round of few pairs (most votes ties or both bad), which at batch_size takes a
    # step or two. Measured at 4 on concise: the small batches overshot the KL budget, so the
    # loop leaves it off (docs/BENCHMARKS.md, "Rounds of few pairs").
    min_steps: int = knob(0, "Fewest optimizer steps an epoch takes: with fewer training "
                             "pairs than --batch-size x this, batches get smaller (0: always "
                             "--batch-size).")
    # A batch goes through in chunks of this many pairs, its gradients summed, so the
    # activations kept for backward are those of one chunk. The maths of the step does not
    # change.
    micro_batch: int = knob(4, "Pairs per forward/backward pass (less memory; 0: whole batch).")
    # "file" replays a given order: consecutive pairs, every epoch the same.
    batch_order: str = knob("length", "length: similar lengths together, shuffled each epoch; "
                                      "file: the file's order.", choices=BATCH_ORDERS)
    precision: str = knob("auto", "auto: bf16 on a GPU that has it, else fp32 (bf16 on CPU: "
                                  "autocast).", choices=PRECISIONS)
    max_length: int = knob(512, "Most tokens per sequence (prompt + answer).")
    lora_r: int = knob(8, "LoRA rank.")
    lora_alpha: int = knob(16, "LoRA scale numerator (scale = alpha / r).")
    lora_dropout: float = knob(0.05, "Dropout on the LoRA input.")
    target_modules: tuple[str, ...] = knob(DEFAULT_TARGET_MODULES, "Comma-separated module "
                                           "names LoRA wraps, or 'all-linear'.")
    val_fraction: float = knob(0.1, "Share of pairs held out to measure before and after "
                                    "training.")
    seed: int = knob(0, "Seed for the split, batch order, LoRA init and dropout.")
    warmup_ratio: float = knob(0.1, "Share of steps over which the learning rate ramps up.")
    max_grad_norm: float = knob(1.0, "Gradients are clipped to this norm.")
    # The round's own KL check (prefloop.trainer.kl): the loop sets max_kl to a share of its
    # budget, so its probe, on other samples, finds the adapter under the budget.
    max_kl: float = knob(0.0, "Stop training before the policy's KL from the base model "
                              "passes this many nats per answer token, keeping the last "
                              "weights under it (0: no check).")
    kl_check_steps: int = knob(4, "Optimizer steps between KL checks (with --max-kl); a "
                                  "round of fewer than 4x that many steps checks at least "
                                  "4 times.")
    # A backtracking line search: an overshoot is often one step too large (from an adapter
    # trained twice, a fresh AdamW's first step moved concise's check from 0.13 to 0.33-0.47
    # nats/token where the round before moved 0.01-0.03 a step, and the round was lost).
    # Measured at 3 on concise (docs/BENCHMARKS.md): the rounds then spent the budget, 0.89
    # at 0.156 nats/token against 0.86 at 0.081, with less fluent answers; so it is off.
    kl_backtracks: int = knob(0, "When a KL check reads over --max-kl: put back the last "
                                 "weights under it, halve the learning rate, check after "
                                 "every step and go on, at most this many times (0: stop at "
                                 "the first).")
    kl_pairs: int = knob(8, "Held-out pairs whose answers each KL check scores (training "
                            "pairs only when none is held out).")
    # A term of the loss itself (token-level KL, as in TDPO, arXiv 2404.11999): DPO only sees
    # the log-ratio of the two sampled answers, so mass it moves between tokens nobody sampled
    # (the policy sharpening) is free to it but spends the KL budget.
    kl_coef: float = knob(0.0, "Weight of a KL(policy ‖ base) penalty in the loss: the exact "
                                "per-token KL at every answer position of the batch, in nats "
                                "per answer token (0: none).")
    # RPO (arXiv 2404.19733): the chosen answer's negative log-likelihood beside the
    # preference loss. DPO alone may lower both answers' likelihood and move the mass to
    # answers nobody sampled; this term keeps it on the chosen ones.
    sft_coef: float = knob(0.0, "Weight of the chosen answer's negative log-likelihood per "
                                "answer token in the loss (0: none).")
    skip_invalid: bool = knob(False, "Skip and count bad lines instead of failing.")
    # Where a busy vLLM server shares the cores, fewer threads than cores avoids threads
    # spinning while they wait for each other: measured here, 2 threads beside busy vLLM on
    # 2 cores ran 5-7x slower than 1.
    threads: int | None = knob(None, "CPU threads [default: one per core; use fewer beside a "
                                     "busy vLLM server].")

    def __post_init__(self) -> None:
        check_loss_settings(self.loss, self.beta, self.label_smoothing)
        checks = [
            (self.lr > 0, "lr must be > 0 (try 1e-4)"),
            (self.epochs >= 1, "epochs must be at least 1"),
            (self.batch_size >= 1, "batch_size must be at least 1"),
            (self.grad_accum >= 1, "grad_accum must be at least 1"),
            (self.min_steps >= 0, "min_steps must be 0 (no minimum) or more"),
            (self.micro_batch >= 0, "micro_batch must be 0 (whole batch) or more"),
            (self.batch_order in BATCH_ORDERS,
             f"batch_order must be one of {', '.join(BATCH_ORDERS)}"),
            (self.precision in PRECISIONS,
             f"precision must be one of {', '.join(PRECISIONS)}"),
            (self.max_length >= 2, "max_length must be at least 2 tokens (try 512)"),
            (self.lora_r >= 1, "lora_r must be at least 1 (try 16)"),
            (self.lora_alpha > 0, "lora_alpha must be > 0 (try twice lora_r)"),
            (0 <= self.lora_dropout < 1, "lora_dropout must be in [0, 1) (try 0.05)"),
            (len(self.target_modules) > 0, "target_modules must name at least one module"),
            (0 <= self.val_fraction < 1, "val_fraction must be in [0, 1) (try 0.1)"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1) (try 0.1)"),
            (self.max_grad_norm > 0, "max_grad_norm must be > 0 (try 1.0)"),
            (self.threads is None or self.threads >= 1, "threads must be at least 1"),
            (self.max_kl >= 0, "max_kl must be >= 0 (0: no KL check; try 0.15)"),
            (self.kl_check_steps >= 1, "kl_check_steps must be at least 1"),
            (self.kl_backtracks >= 0, "kl_backtracks must be 0 (stop at once) or more"),
            (self.kl_pairs >= 1, "kl_pairs must be at least 1 (try 16)"),
            (self.kl_coef >= 0, "kl_coef must be >= 0 (0: no KL penalty; try 1)"),
            (self.sft_coef >= 0, "sft_coef must be >= 0 (0: no NLL term; try 1)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def option_name(name: str) -> str:
    """The trainer's command-line option for a :class:`RoundConfig` field."""
    return "--" + name.replace("_", "-")


def arguments(config: RoundConfig) -> list[str]:
    """The trainer's command line that rebuilds ``config`` (the inverse of its options)."""
    args: list[str] = []
    for f in fields(config):
        value = getattr(config, f.name)
        if value is None or value is False:
            continue  # the option's default: no init adapter, torch's threads, a plain flag
        if value is True:
            args.append(option_name(f.name))
            continue
        if isinstance(value, tuple):
            value = ",".join(value)
        args += [option_name(f.name), repr(value) if isinstance(value, float) else str(value)]
    return args
