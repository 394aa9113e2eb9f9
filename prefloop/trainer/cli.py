"""``prefloop train`` / ``python -m prefloop.trainer``: one LoRA DPO round from a pairs file.

Heavy imports (torch, transformers) wait until the command runs, so ``--help`` is instant.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from dataclasses import MISSING, Field, fields
from pathlib import Path
from types import FrameType
from typing import Any

import click

from prefloop.names import EMBEDDED_NAME
from prefloop.trainer.settings import RoundConfig, option_name


def default_model() -> Path:
    """The embedded model's folder under the configured data directory."""
    from prefloop.config import load_settings

    return load_settings().models_dir / EMBEDDED_NAME


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # SystemExit unwinds through the round's cleanup; the default action would skip it.
    raise SystemExit(128 + signum)


# What click checks of the path options before a round starts.
_PATHS = {"pairs": click.Path(exists=True, dir_okay=False, path_type=Path),
          "out": click.Path(path_type=Path),
          "init_adapter": click.Path(exists=True, file_okay=False, path_type=Path),
          "model": click.Path(path_type=Path)}
_TYPES = {"int": int, "float": float, "str": str, "int | None": int}


def _split_modules(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in value.split(",") if t.strip())


def _option(f: Field) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The command-line option for one :class:`RoundConfig` field, from its type, default,
    help and choices."""
    help, choices = f.metadata["help"], f.metadata["choices"]
    name = option_name(f.name)
    if f.name == "model":  # not required here: the embedded model is the default
        return click.option(name, type=_PATHS["model"], default=None,
                            help=help[:-1] + " [default: the embedded model under the data "
                                             "directory].")
    if f.default is MISSING:
        return click.option(name, type=_PATHS[f.name], required=True, help=help)
    if f.type == "bool":
        return click.option(name, is_flag=True, help=help)
    if f.name in _PATHS:
        return click.option(name, type=_PATHS[f.name], default=None, help=help)
    if f.type == "tuple[str, ...]":
        return click.option(name, default=",".join(f.default), show_default=True,
                            callback=_split_modules, help=help)
    kind = click.Choice(choices) if choices else _TYPES[str(f.type)]
    return click.option(name, type=kind, default=f.default, show_default=f.default is not None,
                        help=help)


def _round_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Every :class:`RoundConfig` field as an option, in the order of its fields."""
    for f in reversed(fields(RoundConfig)):
        command = _option(f)(command)
    return command


@click.command("train")
@_round_options
@click.option("--json", "json_lines", is_flag=True,
              help="Print one JSON line per step and evaluation, and a final one, on stdout.")
def train_command(json_lines: bool, model: Path | None, **options: Any) -> None:
    """Train one LoRA DPO round on a preference file and write the adapter to --out."""
    try:
        config = RoundConfig(model=model or default_model(), **options)
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
    steps = metrics["steps"]  # none when the round started over its KL budget
    return {"pairs": metrics["pairs"], "steps": len(steps),
            "final_loss": steps[-1]["loss"] if steps else None,
            "stopped_early": metrics["stopped_early"], "kl_backtracks": metrics["kl_backtracks"],
            "held_out": metrics["held_out"], "pairs_per_s": metrics["pairs_per_s"],
            "seconds": metrics["seconds"]["total"], "peak_memory_mb": metrics["peak_memory_mb"]}


def _print_summary(out: Path, metrics: dict[str, Any]) -> None:
    pairs, steps = metrics["pairs"], metrics["steps"]
    click.echo(f"adapter written to {out}")
    click.echo(f"pairs: {pairs['used']} used ({pairs['train']} train, {pairs['held_out']} held "
               f"out), {pairs['dropped']} dropped, {pairs['skipped_invalid']} invalid skipped")
    loss = f", loss {steps[0]['loss']:.4f} -> {steps[-1]['loss']:.4f}" if steps else ""
    click.echo(f"{len(steps)} steps{loss}, "
               f"{metrics['pairs_per_s']:.2f} pairs/s, {metrics['seconds']['total']:.0f} s, "
               f"peak {metrics['peak_memory_mb']['rss']:.0f} MB")
    if metrics["kl_backtracks"]:
        click.echo(f"went over --max-kl {metrics['config']['max_kl']:g} "
                   f"{metrics['kl_backtracks']} time(s) and went on from the weights kept, "
                   "at half the learning rate each time")
    if metrics["stopped_early"]:
        check = metrics["kl_checks"][-1]
        click.echo(f"stopped at step {check['step']}: KL {check['kl_per_token']:.4f} nats/token "
                   f"over --max-kl {metrics['config']['max_kl']:g}; kept the weights of step "
                   f"{check['kept_step'] if check['kept_step'] is not None else 0}")
    before, after = metrics["held_out"]["before"], metrics["held_out"]["after"]
    if before and after:
        click.echo(f"held out: accuracy {before['accuracy']:.2f} -> {after['accuracy']:.2f}, "
                   f"margin {before['margin']:.3f} -> {after['margin']:.3f}")
