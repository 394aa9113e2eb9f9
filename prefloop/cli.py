"""The ``prefloop`` command: a thin layer over importable functions.

Library errors become ``click.ClickException`` here, at the edge, so people see one clear
line instead of a traceback.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from prefloop.config import ConfigError, Settings, env_name, load_settings, setting_fields
from prefloop.loop.voters import CHECKS
from prefloop.serving.models import ModelError, is_prepared, model_dir_for, prepare_model
from prefloop.serving.vllm_server import VLLMError
from prefloop.sim.crowd import KINDS as VOTER_KINDS
from prefloop.sim.crowd import NoiseError, parse_noise
from prefloop.storage.exchange import EXPORT_FORMATS, FORMATS
from prefloop.trainer.cli import train_command


def settings_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--config`` and one flag per setting; pass the merged :class:`Settings` on."""

    @functools.wraps(func)
    def wrapper(config: Path | None, **kwargs: Any) -> Any:
        names = {f.name for f in setting_fields()}
        # A repeatable flag not given comes as (): not given, like None for the others.
        overrides = {k: v if v != () else None for k, v in kwargs.items() if k in names}
        rest = {k: v for k, v in kwargs.items() if k not in names}
        try:
            settings = load_settings(config, overrides=overrides)
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
        return func(settings, **rest)

    for f in reversed(setting_fields()):
        flag = "--" + f.name.replace("_", "-")
        repeated = str(f.type).startswith("tuple[")  # a list setting: the flag repeats
        wrapper = click.option(flag, f.name, default=None, type=str, metavar="VALUE",
                               multiple=repeated,
                               help=f"{f.metadata['help']} [env: {env_name(f.name)}]")(wrapper)
    return click.option("--config", type=click.Path(path_type=Path), default=None,
                        help="TOML settings file (default: ./prefloop.toml if present).")(wrapper)


@click.group()
@click.version_option(package_name="prefloop")
@click.option("-v", "--verbose", is_flag=True, help="Log more.")
def main(verbose: bool) -> None:
    """prefloop: chat with two answers per turn; the votes train the model."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.command()
@settings_options
def serve(settings: Settings) -> None:
    """Start vLLM and the page and API (http://127.0.0.1:7860 by default)."""
    from prefloop.app.server import serve as run

    try:
        run(settings, progress=click.echo)
    except (ConfigError, ModelError, VLLMError, OSError) as exc:
        raise click.ClickException(str(exc)) from None


@main.group()
def model() -> None:
    """Model files: prepare the embedded default, a Hugging Face id, or a local folder."""


@model.command("prepare")
@settings_options
def model_prepare(settings: Settings) -> None:
    """Prepare --model (default: embedded SmolLM2-135M-Instruct) for serving and training."""
    try:
        path = prepare_model(settings.model, settings.models_dir, progress=click.echo)
    except ModelError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(str(path))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@settings_options
def status(settings: Settings, as_json: bool) -> None:
    """Show the settings, the model, the database and whether the server answers."""
    import httpx

    from prefloop.storage.store import Store

    info: dict[str, Any] = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in
                                         dataclasses.asdict(settings).items()}}
    for secret in ("vllm_api_key", "moderation_api_key"):
        info["settings"][secret] = "***" if getattr(settings, secret) else None
    try:
        model_path = model_dir_for(settings.model, settings.models_dir)
        info["model"] = {"path": str(model_path), "prepared": is_prepared(model_path)}
    except ModelError as exc:
        info["model"] = {"error": str(exc)}
    if settings.db_path.exists():
        store = Store(settings.db_path)
        info["database"] = {"path": str(settings.db_path), **store.counts()}
        info["loop"] = {"champion": store.champion(), "candidate": store.candidate(),
                        "paused": store.get_state("paused") == "1"}
        store.close()
    else:
        info["database"] = {"path": str(settings.db_path), "exists": False}
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address goes in brackets in a URL
    try:
        response = httpx.get(f"http://{host}:{settings.port}/healthz", timeout=3)
        info["server"] = {"running": True, "health": response.json()}
    except (httpx.HTTPError, httpx.InvalidURL, ValueError):
        info["server"] = {"running": False}
    else:  # each vLLM replica: up or down, its adapters, requests in flight
        try:
            stats = httpx.get(f"http://{host}:{settings.port}/api/v1/stats", timeout=3)
            loop = stats.json()["loop"]
            info["server"]["replicas"] = loop["replicas"]
            if loop.get("champion_engine"):  # champion_engine = "merged"
                info["server"]["champion_engine"] = loop["champion_engine"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            pass  # an older server, or one without the loop
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for section, values in info.items():
        click.echo(f"{section}:")
        for key, value in values.items():
            click.echo(f"  {key}: {value}")


@main.command("export")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="JSONL file to write, or the folder for --format hf (replaced if it "
                   "exists).")
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), default="trl",
              show_default=True,
              help="trl: conversational prompt/chosen/rejected; hh: HH-RLHF transcripts; hf: "
                   "a Hugging Face dataset folder (parquet train/test splits and a dataset "
                   "card; flagged voters' votes left out, client ids hashed).")
@click.option("--since", default=None, metavar="DATE",
              help="Only votes at or after this ISO date or time (UTC), e.g. 2026-11-01.")
@click.option("--with-client-ids", is_flag=True,
              help="Add each voter's random client id (left out unless asked for).")
@settings_options
def export_command(settings: Settings, out: Path, fmt: str, since: str | None,
                   with_client_ids: bool) -> None:
    """Write the stored votes as preference pairs (ties and both-bad are left out; in JSONL,
    pairs voted by a flagged client are kept and marked "flagged_client": true)."""
    from prefloop.storage.exchange import EmptyExport, write_export, write_hf_dataset
    from prefloop.storage.store import Store

    if since is not None:
        try:
            since = datetime.fromisoformat(since).isoformat()
        except ValueError:
            raise click.ClickException(f"--since: {since!r} is not an ISO date or time "
                                       "(e.g. 2026-11-01 or 2026-11-01T12:00)") from None
    if not settings.db_path.exists():
        raise click.ClickException(f"no database at {settings.db_path}; check --data-dir")
    store = Store(settings.db_path)
    try:
        if fmt == "hf":
            rows = write_hf_dataset(store, out, settings.dataset_license, since,
                                    with_client_ids)
            count = sum(rows.values())
        else:
            count = write_export(store, out, fmt, since, with_client_ids)
    except OSError as exc:
        raise click.ClickException(f"cannot write {out}: {exc.strerror or exc}") from None
    except EmptyExport as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        store.close()
    split = f" (train {rows['train']}, test {rows['test']})" if fmt == "hf" else ""
    click.echo(f"wrote {count} pairs{split} to {out}")


@main.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="trl", show_default=True,
              help="trl: prompt/chosen/rejected (conversational or strings); hh: HH-RLHF.")
@click.option("--skip-invalid", is_flag=True, help="Skip and count bad lines instead of failing.")
@settings_options
def import_command(settings: Settings, file: Path, fmt: str, skip_invalid: bool) -> None:
    """Seed the store with a preference file; pairs already stored are skipped."""
    from prefloop.storage.exchange import FileFormatError, import_preferences
    from prefloop.storage.store import Store
    from prefloop.trainer.data import PairsFileError

    try:
        prefs, skipped = read_preferences(file, fmt, skip_invalid)
    except (PairsFileError, FileFormatError) as exc:
        raise click.ClickException(str(exc)) from None
    store = Store(settings.db_path)
    try:
        added, duplicates = import_preferences(store, prefs)
    finally:
        store.close()
    click.echo(f"imported {added} pairs, {duplicates} already stored, {skipped} invalid "
               "lines skipped")


def read_preferences(file: Path, fmt: str, skip_invalid: bool) -> tuple[list, int]:
    """Preferences from a TRL or HH file; a bad line raises an error naming it."""
    from prefloop.storage.exchange import Preference, read_hh
    from prefloop.trainer.data import read_pairs

    if fmt == "hh":
        return read_hh(file, skip_invalid)
    pairs = read_pairs(file, skip_invalid)
    return [Preference([m.as_dict() for m in p.prompt], p.chosen, p.rejected)
            for p in pairs.pairs], pairs.skipped


main.add_command(train_command)


MIN_CHECKED_VOTES = min(CHECKS.min_decisive, CHECKS.min_timed, CHECKS.min_comparable)


def _noise_option(ctx: click.Context, param: click.Parameter,
                  value: str | None) -> dict[str, float]:
    """``--noise random:0.3,side:0.1`` read strictly, before anything starts."""
    if value is None:
        return {}
    try:
        return parse_noise(value)
    except NoiseError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


@main.command()
@click.option("--oracle", "oracle_spec", required=True,
              help="sentiment | concise | judge | random | module:function | "
                   "path/to/file.py:function")
@click.option("--rounds", type=click.IntRange(1, 1000), default=3, show_default=True,
              help="Training rounds to run.")
@click.option("--pairs-per-round", type=click.IntRange(1, 1_000_000), default=64,
              show_default=True, help="Pairs the oracle votes on before each round.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("simulation-report"), show_default=True,
              help="Folder for report.json, report.md and the plots.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the prompt split, the prompts drawn and the sampling seeds.")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Your own prompts (one a line, or .jsonl with {\"prompt\": ...}).")
@click.option("--eval-prompts", type=click.IntRange(1), default=None,
              help="Held-out prompts to measure on (default: all of them).")
@click.option("--concurrency", type=click.IntRange(1, 256), default=4, show_default=True,
              help="Pairs asked for at once (vLLM batches them).")
@click.option("--base-samples", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Base's answers per held-out prompt (sampled once) that each champion "
                   "answer is compared with.")
@click.option("--voters", type=click.IntRange(1, 100_000), default=8, show_default=True,
              help="Simulated voters, each its own client; each pair goes to one at random. "
                   f"The voter checks need {MIN_CHECKED_VOTES} votes of a client: keep "
                   "rounds × pairs per round / voters above that for them to see anything.")
@click.option("--noise", callback=_noise_option, metavar="KIND:SHARE,...",
              help="Voters that are not honest, as shares of --voters, e.g. "
                   "random:0.3,side:0.1 (the rest vote as the oracle does). "
                   + "; ".join(f"{name}: {kind.help}" for name, kind in VOTER_KINDS.items())
                   + ".")
@click.option("--judge-url", help="OpenAI-compatible server of the judge oracle (…/v1).")
@click.option("--judge-model", help="Model name of the judge oracle; key from $JUDGE_API_KEY.")
@settings_options
def simulate(settings: Settings, oracle_spec: str, rounds: int, pairs_per_round: int,
             report_dir: Path, seed: int, prompts_file: Path | None, eval_prompts: int | None,
             concurrency: int, base_samples: int, voters: int, noise: dict[str, float],
             judge_url: str | None, judge_model: str | None) -> None:
    """Run the real loop with an oracle voting instead of people, and report what it learned.

    Without --data-dir the simulation gets a fresh folder (never your own data folder).
    """
    import tempfile

    from prefloop.config import _default_data_dir
    from prefloop.sim.crowd import crowd_sizes
    from prefloop.sim.oracles import OracleError, load_oracle
    from prefloop.sim.prompts import PROMPTS, PromptError, read_prompts, split_prompts
    from prefloop.sim.report import crowd_line
    from prefloop.sim.simulate import SimulationPlan, run_simulation

    try:
        sizes = crowd_sizes(noise, voters)
    except NoiseError as exc:
        raise click.BadParameter(f"{exc} (--voters {voters})", param_hint="'--noise'") \
            from None
    judge = {k: v for k, v in (("url", judge_url), ("model", judge_model)) if v}
    try:
        oracle = load_oracle(oracle_spec, seed=seed, **judge)
        prompts = read_prompts(prompts_file) if prompts_file else PROMPTS
        train, held_out = split_prompts(prompts, seed=seed)
    except (OracleError, PromptError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    if settings.data_dir == _default_data_dir():
        settings = dataclasses.replace(
            settings, data_dir=Path(tempfile.mkdtemp(prefix="prefloop-sim-")))
    click.echo(f"data folder: {settings.data_dir}")
    click.echo(f"voters: {crowd_line(sizes, noise)}")
    if rounds * pairs_per_round < voters * MIN_CHECKED_VOTES:
        click.echo(f"note: ~{rounds * pairs_per_round / voters:.0f} votes per voter; the voter "
                   f"checks need {MIN_CHECKED_VOTES} of a client, so few if any will be flagged "
                   "(use fewer --voters or more pairs)")
    plan = SimulationPlan(rounds, pairs_per_round, train, held_out[:eval_prompts], seed,
                          concurrency, base_samples, voters, noise)
    try:
        run_simulation(settings, plan, oracle, report_dir)
    except (ModelError, VLLMError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"report: {report_dir / 'report.md'}")


if __name__ == "__main__":  # after every command is registered
    main()
