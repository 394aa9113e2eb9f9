"""What a training round is told, checked before anything heavy is loaded.

Kept free of torch so the command line can show its help and reject bad flags at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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


@dataclass(frozen=True)
class RoundConfig:
    """Everything one round is told. Bad values raise ValueError on construction.

    The defaults suit the embedded SmolLM2-135M-Instruct on a CPU.
    """

    pairs: Path  # JSONL preference file (TRL conversational or standard format)
    out: Path  # adapter folder to create; must not exist
    model: Path  # base model, a local Hugging Face folder
    init_adapter: Path | None = None  # continue training this adapter instead of a new one
    loss: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    lr: float = 1e-4
    epochs: int = 1
    batch_size: int = 8  # pairs per batch (2x that many sequences)
    grad_accum: int = 1  # batches per optimizer step
    # Pairs per forward/backward pass: a batch goes through in chunks of this many pairs, its
    # gradients summed, so the activations kept for backward are those of one chunk (0: the
    # whole batch at once). The maths of the step does not change.
    micro_batch: int = 4
    # "length": batches of pairs of similar length (less padding), shuffled each epoch;
    # "file": consecutive pairs in file order, every epoch the same (to replay a given order).
    batch_order: str = "length"
    precision: str = "auto"
    max_length: int = 512  # tokens per sequence, prompt plus answer
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES  # or ("all-linear",)
    val_fraction: float = 0.1  # pairs held out to measure before and after training
    seed: int = 0
    warmup_ratio: float = 0.1  # share of the steps over which the learning rate ramps up
    max_grad_norm: float = 1.0
    skip_invalid: bool = False  # skip (and count) bad lines instead of failing
    # CPU threads for torch (None: torch's default, one per core). Where a busy vLLM server
    # shares the cores, fewer threads than cores avoids threads spinning while they wait for
    # each other: measured here, 2 threads beside busy vLLM on 2 cores ran 5-7x slower than 1.
    threads: int | None = None

    def __post_init__(self) -> None:
        check_loss_settings(self.loss, self.beta, self.label_smoothing)
        checks = [
            (self.lr > 0, "lr must be > 0 (try 1e-4)"),
            (self.epochs >= 1, "epochs must be at least 1"),
            (self.batch_size >= 1, "batch_size must be at least 1"),
            (self.grad_accum >= 1, "grad_accum must be at least 1"),
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
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
