"""``prefloop train`` / ``python -m prefloop.trainer``: one LoRA DPO round from a pairs file.

Heavy imports (torch, transformers) wait until the command runs, so ``--help`` is instant.
"""

from __future__ import annotations

import json
import signal
from dataclasses import fields
from pathlib import Path
from types import FrameType
from typing import Any

import click

from prefloop.trainer.settings import (
    BATCH_ORDERS,
    DEFAULT_TARGET_MODULES,
    LOSSES,
    PRECISIONS,
    RoundConfig,
)

EMBEDDED_NAME = "SmolLM2-135M-Instruct"  # folder name `prefloop model prepare` writes


def _default(name: str) -> Any:
    return {f.name: f.default for f in fields(RoundConfig)}[name]


def default_model() -> Path:
    """The embedded model's folder under the configured data directory."""
    from prefloop.config import load_settings

    return load_settings().models_dir / EMBEDDED_NAME


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # SystemExit unwinds through the round's cleanup; the default action would skip it.
    raise SystemExit(128 + signum)


@click.command("train")
@click.option("--pairs", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True, help="Preference pairs, JSONL (TRL conversational or standard).")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Adapter folder to create (must not exist).")
@click.option("--init-adapter", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="Continue training this adapter instead of a new one.")
@click.option("--model", type=click.Path(path_type=Path), default=None,
              help="Base model, a local Hugging Face folder [default: the embedded model "
                   "under the data directory].")
@click.option("--loss", type=click.Choice(LOSSES), default=_default("loss"), show_default=True,
              help="Preference loss.")
@click.option("--beta", type=float, default=_default("beta"), show_default=True,
              help="Strength of the pull towards the reference model.")
@click.option("--label-smoothing", type=float, default=_default("label_smoothing"),
              show_default=True, help="Assumed share of flipped labels (cdpo, robust).")
@click.option("--lr", type=float, default=_default("lr"), show_default=True,
              help="Peak learning rate.")
@click.option("--epochs", type=int, default=_default("epochs"), show_default=True,
              help="Passes over the pairs.")
@click.option("--batch-size", type=int, default=_default("batch_size"), show_default=True,
              help="Pairs per forward.")
@click.option("--micro-batch", type=int, default=_default("micro_batch"), show_default=True,
              help="Pairs per forward/backward pass (less memory; 0: whole batch).")
@click.option("--batch-order", type=click.Choice(BATCH_ORDERS),
              default=_default("batch_order"), show_default=True,
              help="length: similar lengths together, shuffled; file: the file's order.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=_default("precision"),
              show_default=True,
              help="auto: bf16 on a GPU that has it, else fp32 (bf16 on CPU: autocast).")
@click.option("--grad-accum", type=int, default=_default("grad_accum"), show_default=True,
              help="Forwards per optimizer step.")
@click.option("--max-length", type=int, default=_default("max_length"), show_default=True,
              help="Most tokens per sequence (prompt + answer).")
@click.option("--lora-r", type=int, default=_default("lora_r"), show_default=True,
              help="LoRA rank.")
@click.option("--lora-alpha", type=int, default=_default("lora_alpha"), show_default=True,
              help="LoRA scale numerator (scale = alpha / r).")
@click.option("--lora-dropout", type=float, default=_default("lora_dropout"), show_default=True,
              help="Dropout on the LoRA input.")
@click.option("--target-modules", default=",".join(DEFAULT_TARGET_MODULES), show_default=True,
              help="Comma-separated module names LoRA wraps, or 'all-linear'.")
@click.option("--val-fraction", type=float, default=_default("val_fraction"), show_default=True,
              help="Share of pairs held out to measure before and after training.")
@click.option("--warmup-ratio", type=float, default=_default("warmup_ratio"), show_default=True,
              help="Share of steps over which the learning rate ramps up.")
@click.option("--seed", type=int, default=_default("seed"), show_default=True,
              help="Seed for the split, batch order, LoRA init and dropout.")
@click.option("--threads", type=int, default=None,
              help="CPU threads [default: one per core; use fewer beside a busy vLLM server].")
@click.option("--skip-invalid", is_flag=True, help="Skip and count bad lines instead of failing.")
@click.option("--json", "json_lines", is_flag=True,
              help="Print one JSON line per step and evaluation, and a final one, on stdout.")
def train_command(json_lines: bool, model: Path | None, target_modules: str,
                  **options: Any) -> None:
    """Train one LoRA DPO round on a preference file and write the adapter to --out."""
    try:
        config = RoundConfig(model=model or default_model(),
                             target_modules=tuple(t.strip() for t in target_modules.split(",")
                                                  if t.strip()),
                             **options)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None

    from prefloop.trainer.data import PairsFileError
    from prefloop.trainer.round import RoundError, run_round

    def emit(event: dict[str, Any]) -> None:
        if json_lines:
            click.echo(json.dumps(event))

    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        metrics = run_round(config, on_event=emit, progress=True)
    except (PairsFileError, RoundError) as exc:
        raise click.ClickException(str(exc)) from None
    if json_lines:
        emit({"event": "done", "out": str(config.out), **_summary(metrics)})
    else:
        _print_summary(config.out, metrics)


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    last = metrics["steps"][-1]
    return {"pairs": metrics["pairs"], "steps": len(metrics["steps"]), "final_loss": last["loss"],
            "held_out": metrics["held_out"], "pairs_per_s": metrics["pairs_per_s"],
            "seconds": metrics["seconds"]["total"], "peak_memory_mb": metrics["peak_memory_mb"]}


def _print_summary(out: Path, metrics: dict[str, Any]) -> None:
    pairs, steps = metrics["pairs"], metrics["steps"]
    click.echo(f"adapter written to {out}")
    click.echo(f"pairs: {pairs['used']} used ({pairs['train']} train, {pairs['held_out']} held "
               f"out), {pairs['dropped']} dropped, {pairs['skipped_invalid']} invalid skipped")
    click.echo(f"{len(steps)} steps, loss {steps[0]['loss']:.4f} -> {steps[-1]['loss']:.4f}, "
               f"{metrics['pairs_per_s']:.2f} pairs/s, {metrics['seconds']['total']:.0f} s, "
               f"peak {metrics['peak_memory_mb']['rss']:.0f} MB")
    before, after = metrics["held_out"]["before"], metrics["held_out"]["after"]
    if before and after:
        click.echo(f"held out: accuracy {before['accuracy']:.2f} -> {after['accuracy']:.2f}, "
                   f"margin {before['margin']:.3f} -> {after['margin']:.3f}")
