"""One typed settings object: defaults < TOML file < PREFLOOP_* environment < CLI flags.

Every setting has an environment variable named ``PREFLOOP_`` + its name in upper case
(``data_dir`` -> ``PREFLOOP_DATA_DIR``) and a CLI flag (``--data-dir``). Unknown keys and bad
values raise :class:`ConfigError` naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from prefloop.hardware import NO_NATIVE_BF16_ENV, SERVE_DTYPES
from prefloop.trainer.settings import RoundConfig

ENV_PREFIX = "PREFLOOP_"
DEFAULT_CONFIG_FILE = "prefloop.toml"
CHAMPION_ENGINES = ("auto", "lora", "merged")  # where the champion's own turns are answered
CHAMPION_MEMORY_LIMIT = 0.95  # replicas + two champion engines, as a fraction of memory


class ConfigError(ValueError):
    """A setting is unknown or has a value outside what is allowed."""


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(base) / "prefloop"


def _setting(default: Any, help: str, *, lo: float | None = None, hi: float | None = None,
             choices: tuple[str, ...] | None = None, factory: Any = None) -> Any:
    meta = {"help": help, "lo": lo, "hi": hi, "choices": choices, "round": None}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


ROUND_FIELDS = {f.name: f for f in dataclasses.fields(RoundConfig)}


def _knob(name: str, help: str, *, lo: float | None = None, hi: float | None = None,
          default: Any = None) -> Any:
    """A setting that sets the trainer's ``RoundConfig.<name>`` in every round of the loop:
    the trainer's default and choices unless ``default`` is given."""
    knob = ROUND_FIELDS[name]
    meta = {"help": help, "lo": lo, "hi": hi, "choices": knob.metadata["choices"],
            "round": name}
    return field(default=knob.default if default is None else default, metadata=meta)


@dataclass(frozen=True)
class Settings:
    """Everything prefloop can be told. Field metadata carries help text and bounds."""

    model: str = _setting("embedded",
                          "Model SPEC: 'embedded', a Hugging Face id, or a local folder.")
    data_dir: Path = _setting(None, "Folder for the database, model files, adapters and logs.",
                              factory=_default_data_dir)
    host: str = _setting("127.0.0.1", "Address the page and API listen on (loopback by default).")
    port: int = _setting(7860, "Port of the page and API.", lo=1, hi=65535)
    vllm_url: tuple[str, ...] = _setting(
        (), "Use this running OpenAI-compatible vLLM server (e.g. http://127.0.0.1:8000); "
            "repeat the flag (a list in TOML, commas in the environment) for several "
            "replicas. With a URL, prefloop starts no vLLM of its own unless vllm_replicas "
            "says so.")
    vllm_api_key: tuple[str, ...] = _setting(
        (), "API key for --vllm-url: one for every URL, or one per URL in the same order.")
    vllm_replicas: int | None = _setting(
        None, "vLLM replicas prefloop starts and supervises, beside any --vllm-url "
              "(none: 1, or 0 with --vllm-url). On a CPU they split its cores; on a GPU "
              "machine replica i gets GPU i.", lo=0, hi=64)
    vllm_port: int = _setting(0, "Loopback port for the vLLM server prefloop starts (0: any free; "
                                 "with several replicas the first of consecutive ports).",
                              lo=0, hi=65535)
    vllm_memory_fraction: float = _setting(0.3, "Fraction of (GPU or, on CPU, host) memory vLLM "
                                                "may reserve (on CPU shared by the local "
                                                "replicas).", lo=0.01, hi=0.99)
    champion_engine: str = _setting(
        "auto", "Where the champion's own turns (both answers from the champion) are "
                "answered. lora: on the LoRA replicas, like duels. merged: on one more local "
                "vLLM without LoRA that serves base as it is, or the champion's adapter "
                "merged into the weights, switched blue-green when the champion changes "
                "(on a CPU it takes a share of the cores; needs memory for two such engines "
                "during a switch). auto: merged on vLLM's CPU build when prefloop starts its "
                "own replicas and a core is left for it, else lora (a GPU's LoRA kernels are "
                "cheap; external replicas are not prefloop's to add to).",
        choices=CHAMPION_ENGINES)
    champion_memory_fraction: float = _setting(
        0.1, "Fraction of (GPU or, on CPU, host) memory each champion engine may reserve "
             "(champion_engine = merged; two run at once during a switch).",
        lo=0.01, hi=0.49)
    vllm_start_timeout: float = _setting(600.0, "Seconds to wait for vLLM to become healthy.",
                                         lo=1, hi=7200)
    max_model_len: int = _setting(2048, "Context window in tokens (prompt + answer).",
                                  lo=128, hi=1_048_576)
    serve_dtype: str = _setting(
        "auto", "Precision vLLM serves in. auto: on a CPU, bfloat16 where it is native "
                "(AVX512-BF16 or AMX), else float32 (3x faster on an AVX2 CPU); on a GPU, "
                "vLLM's own choice.", choices=SERVE_DTYPES)
    lora_max_rank: int = _setting(16, "Largest LoRA rank vLLM accepts.", lo=1, hi=512)
    lora_slots: int = _setting(4, "Adapters vLLM keeps loaded at once.", lo=1, hi=64)
    adapter_prefix: str = _setting("prefloop", "vLLM serves adapter vNNNN as PREFIX-vNNNN; "
                                               "give each prefloop sharing one vLLM its own.")
    temperature: float = _setting(0.8, "Sampling temperature.", lo=0.0, hi=2.0)
    top_p: float = _setting(0.95, "Nucleus sampling threshold.", lo=0.01, hi=1.0)
    max_tokens: int = _setting(128, "Most tokens in one answer.", lo=1, hi=32768)
    pair_candidates: int = _setting(
        2, "Answers sampled for each of an adapter champion's own turns; the visitor sees "
           "the two its implicit reward (log-prob under it minus under base) ranks furthest "
           "apart, so that a vote says more. 2: the two sampled, streamed as they are "
           "written. More: the pair appears whole once all are written and scored (no "
           "streaming; n/2 times the generation and 2n scorings: at 4 on a CPU, 5x the time "
           "a pair takes). base's turns and duels always stream two. Measured at 4: a young "
           "champion learns its own quirks faster (docs/BENCHMARKS.md).", lo=2, hi=16)
    system_prompt: str = _setting("", "System prompt put before every conversation ('' for none).")
    max_message_chars: int = _setting(4000, "Most characters in one user message.",
                                      lo=1, hi=1_000_000)
    max_answer_chars: int = _setting(8000, "Most characters in a written better answer.",
                                     lo=1, hi=1_000_000)
    max_turns: int = _setting(50, "Most user turns in one conversation.", lo=1, hi=10_000)
    undo_seconds: float = _setting(
        30.0, "Seconds after a vote in which its voter may take it back (0: no undo). An "
              "undo is refused once a training round has used the vote or the conversation "
              "went on, and for duel votes (the reply named the models).", lo=0, hi=86_400)
    terms_file: Path | None = _setting(
        None, "Markdown file of the terms visitors must accept before anything of theirs is "
              "stored (none: private use, no terms asked). Its hash is the terms' version, "
              "stored with every pair; a changed file asks every visitor again.")
    moderation: str = _setting(
        "off", "Check every message, answer and written answer: 'off', 'builtin' (a short "
               "built-in list of phrases: a floor, not a filter for a public demo), the URL "
               "of an OpenAI-compatible moderation endpoint (http://HOST/v1/moderations), or "
               "module:function (path/to/file.py:function) called with the text and returning "
               "a reason (or True) when it is flagged.")
    moderation_fail: str = _setting(
        "closed", "When the moderation check fails (its service down, an error): closed: "
                  "refuse the message or answer (503, try again); open: let it through "
                  "unchecked. Counted either way.", choices=("closed", "open"))
    moderation_timeout: float = _setting(5.0, "Seconds to wait for a moderation URL.",
                                         lo=0.1, hi=600)
    moderation_api_key: str | None = _setting(None, "API key sent to the moderation URL "
                                                    "(Authorization: Bearer).")
    moderation_model: str | None = _setting(None, "Model named to the moderation URL (none: "
                                                  "the service's default).")
    # -- limits: a public demo meets crowds -------------------------------------------------
    pairs_per_minute: int = _setting(20, "Pairs one client may ask for per minute (0: no "
                                         "limit).", lo=0, hi=1_000_000)
    votes_per_minute: int = _setting(60, "Votes one client may send per minute (0: no limit).",
                                     lo=0, hi=1_000_000)
    ip_pairs_per_minute: int = _setting(
        0, "Pairs one IP address may ask for per minute, counted by salted hash, never "
           "stored (0: off; behind a reverse proxy every visitor shares its address).",
        lo=0, hi=1_000_000)
    client_generations: int = _setting(2, "Pairs one client may have being written at once.",
                                       lo=1, hi=1024)
    max_generations: int = _setting(32, "Pairs being written at once over all clients; more "
                                        "get 503 with Retry-After.", lo=1, hi=100_000)
    # -- the online loop -------------------------------------------------------------------
    train_every: float = _setting(10.0, "Minutes between checks for a training round.",
                                  lo=0.05, hi=10_080)
    min_new_pairs: int = _setting(32, "New trainable votes needed before a scheduled round.",
                                  lo=1, hi=1_000_000)
    max_pairs_per_round: int = _setting(512, "Most pairs one round trains on (new + replay).",
                                        lo=1, hi=1_000_000)
    # 0: a round trains on its new votes only; the champion it starts from has learned the
    # older ones. Replaying them trains the same pairs again, which spent KL and won less
    # (docs/BENCHMARKS.md, "The loop on many seeds").
    replay_ratio: float = _setting(0.0, "Older pairs replayed per new pair in a round.",
                                   lo=0.0, hi=100.0)
    train_from: str = _setting(
        "champion", "Where a round starts: champion (its adapter trained further on the new "
                    "pairs and any replay) or base (a new adapter fitted afresh to them, so a "
                    "round does not inherit the KL its parent spent; with replay_ratio above "
                    "0, or a round learns only its own votes).",
        choices=("champion", "base"))
    duel_share: float = _setting(0.5, "Share of new turns that duel candidate vs champion "
                                      "while a candidate exists.", lo=0.0, hi=1.0)
    baseline_share: float = _setting(0.1, "Share of new turns that duel the champion against "
                                          "base.", lo=0.0, hi=1.0)
    promote: str = _setting("duel", "duel: promote a candidate that wins its duels; immediate: "
                                    "every new adapter becomes champion.",
                            choices=("duel", "immediate"))
    promote_false_rate: float = _setting(
        0.05, "Chance that the promotion test crowns a candidate no better than the "
              "champion (and that a champion no worse than base is rolled back).",
        lo=0.001, hi=0.3)
    promote_effect: float = _setting(
        0.65, "The candidate's win-rate over decisive duel votes that the test should find "
              "(the smallest improvement worth a promotion).", lo=0.51, hi=0.95)
    promote_miss_rate: float = _setting(
        0.2, "Chance that the test misses a candidate as good as promote_effect.",
        lo=0.01, hi=0.49)
    max_duel_votes: int = _setting(150, "Duel votes (ties included) a candidate may take; "
                                        "one not shown better by then is not promoted.",
                                   lo=1, hi=1_000_000)
    # The loop's training knobs: each sets the RoundConfig field named first (its default
    # and allowed values come from there unless given here); see loop.rounds.round_config.
    train_lr: float = _knob("lr", "Learning rate of a round.", lo=1e-8, hi=1.0, default=1e-3)
    train_beta: float = _knob("beta", "DPO beta of a round.", lo=1e-4, hi=100.0)
    train_epochs: int = _knob("epochs", "Passes over a round's pairs.", lo=1, hi=100, default=2)
    train_batch_size: int = _knob("batch_size", "Pairs per optimizer step (a round of 64 pairs "
                                                "makes 4 steps an epoch at 16).", lo=1, hi=4096,
                                  default=16)
    train_min_steps: int = _knob("min_steps", "Fewest optimizer steps an epoch of a round "
                                              "takes: a round with fewer than batch size x "
                                              "this many pairs (most votes ties or both bad) "
                                              "makes smaller batches instead of one or two "
                                              "steps (0: always train_batch_size; measured "
                                              "at 4 on one seed, not better).",
                                 lo=0, hi=4096)
    train_lora_rank: int = _knob("lora_r", "LoRA rank of a round's new adapter (alpha is twice "
                                           "the rank; at most lora_max_rank). Later rounds keep "
                                           "their parent's rank.", lo=1, hi=512)
    train_loss: str = _knob("loss", "DPO loss of a round.")
    train_kl_coef: float = _knob("kl_coef", "Weight of the token-level KL(policy ‖ base) "
                                            "penalty in a round's loss (0: none).",
                                 lo=0.0, hi=100.0)
    train_sft_coef: float = _knob("sft_coef", "Weight of the chosen answer's negative "
                                              "log-likelihood per token in a round's loss, "
                                              "beside DPO (RPO; 0: none).",
                                  lo=0.0, hi=100.0)
    train_kl_backtracks: int = _knob("kl_backtracks", "Times a round whose KL check reads over "
                                                      "its limit goes on from the last weights "
                                                      "under it at half the learning rate "
                                                      "(0: it stops there).", lo=0, hi=100)
    trainer_threads: int = _knob("threads", "CPU threads of the trainer (0: one per core).",
                                 lo=0, hi=1024, default=1)
    trainer_timeout: float = _setting(3600.0, "Seconds a round may train before it is "
                                              "stopped and failed.", lo=1, hi=7 * 86400)
    max_kl: float = _setting(
        0.2, "KL budget of a new adapter, in nats per answer TOKEN: KL(adapter ‖ base) "
             "measured on the KL probe's prompts after its round; an adapter above it is "
             "rejected and never reaches visitors (0: no budget, the KL is only recorded).",
        lo=0.0, hi=100.0)
    min_relevance: float = _setting(
        0.5, "Relevance floor of a new adapter, as a share of base's: the KL probe scores "
             "each answer under base after its own prompt and after another, and an adapter "
             "whose answers depend on their question less than this share of base's own "
             "(answers that would do for any question) is rejected like one over max_kl "
             "(0: no floor, the relevance is only recorded).", lo=0.0, hi=10.0)
    kl_probe_prompts: int = _setting(
        16, "Built-in prompts the KL probe answers with each new adapter, one sample each "
            "(beyond the built-in ones they repeat with new seeds; 0: no probe, then "
            "max_kl must be 0).", lo=0, hi=4096)
    dataset_license: str = _setting(
        "unknown", "License named in the dataset card of `prefloop export --format hf`: a "
                   "Hugging Face license id such as cc-by-4.0, or 'other' or 'unknown' "
                   "(the visitors' terms decide what may be published).")
    rating_resamples: int = _setting(100, "Bootstrap resamples of the rating intervals.",
                                     lo=0, hi=100_000)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_value(f, getattr(self, f.name), f.name)
        if self.max_tokens >= self.max_model_len:
            raise ConfigError(f"max_tokens ({self.max_tokens}) must be smaller than "
                              f"max_model_len ({self.max_model_len})")
        if not re.fullmatch(r"[A-Za-z0-9_]{1,40}", self.adapter_prefix):
            raise ConfigError("adapter_prefix: 1 to 40 letters, digits or underscores, got "
                              f"{self.adapter_prefix!r}")
        if self.duel_share + self.baseline_share > 1:
            raise ConfigError(f"duel_share ({self.duel_share}) + baseline_share "
                              f"({self.baseline_share}) must be at most 1")
        if self.lora_max_rank not in LORA_RANKS:
            raise ConfigError(f"lora_max_rank: must be one of {', '.join(map(str, LORA_RANKS))} "
                              f"(vLLM's allowed ranks), got {self.lora_max_rank}")
        if self.train_lora_rank > self.lora_max_rank:
            raise ConfigError(f"train_lora_rank ({self.train_lora_rank}) must be at most "
                              f"lora_max_rank ({self.lora_max_rank}): vLLM would refuse the "
                              "adapter")
        if not re.fullmatch(r"[a-z0-9][a-z0-9.+-]{0,63}", self.dataset_license):
            raise ConfigError("dataset_license: a Hugging Face license id in lower case "
                              "(e.g. cc-by-4.0, apache-2.0, other, unknown), got "
                              f"{self.dataset_license!r}")
        _check_moderation(self)
        _check_replicas(self)
        _check_champion_engine(self)
        if self.max_kl > 0 and self.kl_probe_prompts == 0:
            raise ConfigError(f"max_kl ({self.max_kl:g}) needs the KL probe: set "
                              "kl_probe_prompts above 0, or max_kl = 0 for no KL budget")
        if self.min_relevance > 0 and self.kl_probe_prompts < 2:
            raise ConfigError(f"min_relevance ({self.min_relevance:g}) needs the KL probe with "
                              "two prompts or more (an answer's relevance is measured against "
                              "another prompt): set kl_probe_prompts to 2 or more, or "
                              "min_relevance = 0 for no relevance floor")

    @property
    def local_replicas(self) -> int:
        """vLLM replicas prefloop starts: ``vllm_replicas``, else 1 without a URL, else 0."""
        if self.vllm_replicas is not None:
            return self.vllm_replicas
        return 0 if self.vllm_url else 1

    @property
    def local_engines(self) -> int:
        """vLLM engines prefloop starts, the champion engine included (``auto`` counted as
        :meth:`resolve_champion_engine` makes it): on a CPU they split its cores."""
        return self.local_replicas + (self.champion_engine == "merged")

    def resolve_champion_engine(self, *, cpu_build: bool, cores: int) -> Settings:
        """These settings with ``champion_engine = "auto"`` made ``merged`` or ``lora``.

        ``merged`` where it pays and fits: vLLM's CPU build (an engine with LoRA enabled
        answers base 1.4x and an adapter 2.8x slower than a plain one; on a GPU the LoRA
        kernels cost little), replicas that prefloop starts itself (at least one, and the
        champion engine is one more local process, which a deployment on external replicas
        did not ask for), a core for each engine, and memory for the replicas and two champion
        engines (old and new during a switch). Anything else: ``lora``."""
        if self.champion_engine != "auto":
            return self
        merged = (cpu_build and self.local_replicas >= 1 and cores >= self.local_replicas + 1
                  and self.champion_memory <= CHAMPION_MEMORY_LIMIT)
        return dataclasses.replace(self, champion_engine="merged" if merged else "lora")

    @property
    def champion_memory(self) -> float:
        """The memory fraction of the local replicas and two champion engines (old and new,
        during a switch): at most ``CHAMPION_MEMORY_LIMIT`` for ``merged``."""
        return self.vllm_memory_fraction + 2 * self.champion_memory_fraction

    @property
    def external_vllms(self) -> list[tuple[str, str]]:
        """(URL, API key) of each ``vllm_url`` ("none" where no key is given)."""
        keys = self.vllm_api_key or ("none",)
        if len(keys) == 1:
            keys = keys * len(self.vllm_url)
        return list(zip(self.vllm_url, keys, strict=True))

    @property
    def db_path(self) -> Path:
        return self.data_dir / "prefloop.db"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def adapters_dir(self) -> Path:
        return self.data_dir / "adapters"

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def merged_dir(self) -> Path:
        """Champions merged into the base weights (``champion_engine = "merged"``)."""
        return self.data_dir / "merged"


LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
MODERATION_WORDS = ("off", "builtin")


def moderation_kind(spec: str) -> str:
    """What a ``moderation`` setting names: off, builtin, url or function (ConfigError when
    it is none of them; a function's module is imported only when the app starts)."""
    if spec in MODERATION_WORDS:
        return spec
    if spec.startswith(("http://", "https://")):
        url = urlsplit(spec)
        if not url.hostname or not url.path.rstrip("/").endswith("/moderations"):
            raise ConfigError("moderation: a URL must be the whole address of an "
                              "OpenAI-compatible moderation endpoint, ending in /moderations "
                              f"(e.g. http://127.0.0.1:8000/v1/moderations), got {spec!r}")
        return "url"
    where, colon, name = spec.rpartition(":")
    if colon and where and name.isidentifier():
        return "function"
    raise ConfigError("moderation: expected off, builtin, an OpenAI-compatible moderation URL "
                      "(http://HOST/v1/moderations) or module:function "
                      f"(path/to/file.py:function), got {spec!r}")


def _check_moderation(settings: Settings) -> None:
    kind = moderation_kind(settings.moderation)
    for key in ("moderation_api_key", "moderation_model"):
        if getattr(settings, key) and kind != "url":
            raise ConfigError(f"{key} applies to a moderation URL only, and moderation is "
                              f"{settings.moderation!r}")

def _check_replicas(settings: Settings) -> None:
    urls, keys = settings.vllm_url, settings.vllm_api_key
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname \
                or parts.path.rstrip("/") or parts.query:
            raise ConfigError("vllm_url: the address of a vLLM OpenAI server without a path "
                              f"(e.g. http://127.0.0.1:8000), got {url!r}")
    if len(set(urls)) != len(urls):
        raise ConfigError(f"vllm_url: each server once, got {list(urls)}")
    if urls and len(keys) not in (0, 1, len(urls)):
        raise ConfigError(f"vllm_api_key: {len(keys)} keys for {len(urls)} URLs; give one key "
                          "for every URL, or one per URL in the same order")
    if settings.local_replicas == 0 and not urls:
        raise ConfigError("vllm_replicas = 0 and no vllm_url: there is no vLLM to answer; "
                          "start at least one replica or give a --vllm-url")
    last_port = settings.vllm_port + settings.local_replicas - 1
    if settings.vllm_port and last_port > 65535:
        raise ConfigError(f"vllm_port {settings.vllm_port}: {settings.local_replicas} "
                          f"replicas need ports up to {last_port}, above 65535")


def _check_champion_engine(settings: Settings) -> None:
    if settings.champion_engine != "merged" or settings.local_replicas == 0:
        return
    lora, plain = settings.vllm_memory_fraction, settings.champion_memory_fraction
    if settings.champion_memory > CHAMPION_MEMORY_LIMIT:
        raise ConfigError(
            f"champion_engine = \"merged\": vllm_memory_fraction ({lora:g}) + 2 x "
            f"champion_memory_fraction ({plain:g}) is {settings.champion_memory:g}, above "
            f"{CHAMPION_MEMORY_LIMIT:g}: the "
            "local replicas and two champion engines (old and new, during a switch) would "
            "not fit; lower one of them")


REMOVED = {
    "promote_min_votes": "the promotion test has no minimum: set max_duel_votes (the most "
                         "duel votes to spend) and promote_false_rate",
    "promote_winrate": "the promotion test asks for promote_effect (the win-rate worth "
                       "finding, e.g. 0.65) and promote_false_rate (e.g. 0.05)",
}
"""Settings that no longer exist, with what replaced them (the error names both)."""


def _removed(key: str, where: str) -> ConfigError:
    return ConfigError(f"{where}: {key} was removed: {REMOVED[key]}")


ADMIN_PASSWORD_ENV = ENV_PREFIX + "ADMIN_PASSWORD"


def admin_password(env: Mapping[str, str] | None = None) -> str | None:
    """The admin password, from the environment only (never a flag or a file, so it stays out
    of process lists and config backups); None or empty: admin is off."""
    env = os.environ if env is None else env
    return env.get(ADMIN_PASSWORD_ENV) or None


def setting_fields() -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(Settings)


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper()


def _base_type(f: dataclasses.Field) -> tuple[type, bool]:
    """The field's Python type (``tuple`` for a list of strings) and whether it may be
    None."""
    annotation = str(f.type)
    optional = "None" in annotation
    name = annotation.replace("| None", "").strip()
    return {"str": str, "int": int, "float": float, "bool": bool, "Path": Path,
            "tuple[str, ...]": tuple}[name], optional


def _describe(f: dataclasses.Field) -> str:
    typ, optional = _base_type(f)
    meta = f.metadata
    if meta["choices"]:
        text = "one of " + ", ".join(meta["choices"])
    elif typ in (int, float) and meta["lo"] is not None:
        kind = "an integer" if typ is int else "a number"
        text = f"{kind} from {meta['lo']:g} to {meta['hi']:g}"
    else:
        names = {str: "a string", bool: "true or false",
                 tuple: "a string or a list of strings (or empty for none)",
                 Path: "a file path" if f.name.endswith("_file") else "a folder path"}
        text = names.get(typ, typ.__name__)
    return text + (" (or empty for none)" if optional else "")


def _check_value(f: dataclasses.Field, value: Any, where: str) -> None:
    typ, optional = _base_type(f)
    if value is None and optional:
        return
    ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
    if ok and typ is tuple:
        ok = all(isinstance(item, str) and item.strip() for item in value)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if ok and typ in (int, float):
        lo, hi = f.metadata["lo"], f.metadata["hi"]
        ok = math.isfinite(value) and (lo is None or lo <= value <= hi)
    if ok and f.metadata["choices"]:
        ok = value in f.metadata["choices"]
    if not ok:
        raise ConfigError(f"{where}: expected {_describe(f)}, got {value!r}")


def _parse_text(f: dataclasses.Field, text: str, where: str) -> Any:
    """Turn an environment or CLI string into the field's type."""
    typ, optional = _base_type(f)
    if optional and text == "":
        return None
    try:
        if typ is bool:
            lowered = text.strip().lower()
            if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(text)
            value: Any = lowered in ("1", "true", "yes", "on")
        elif typ is tuple:  # the environment's form of a list: comma-separated
            value = tuple(item.strip() for item in text.split(",")) if text.strip() else ()
        elif typ is Path:
            if not text.strip():  # Path("") is the current folder: never what was meant
                raise ValueError(text)
            value = Path(text).expanduser()
        else:
            value = typ(text)
    except ValueError:
        raise ConfigError(f"{where}: expected {_describe(f)}, got {text!r}") from None
    # Check bounds here too, so the error names the variable or flag that was given.
    _check_value(f, value, where)
    return value


def _coerce(f: dataclasses.Field, value: Any, where: str) -> Any:
    """Check a value from a TOML file or Python, converting only where lossless."""
    typ, optional = _base_type(f)
    if optional and value == "":  # TOML has no null: "" means none, as in the environment
        return None
    if typ is tuple and isinstance(value, str):  # one item, or "" for none
        value = (value,) if value else ()
    elif typ is tuple and isinstance(value, list):
        value = tuple(value)
    if typ is Path and isinstance(value, str) and value.strip():
        value = Path(value).expanduser()
    elif typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    _check_value(f, value, where)
    return value


def read_toml(path: Path) -> dict[str, Any]:
    """Settings from a TOML file: a flat table, optionally under ``[prefloop]``."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:  # a folder, no permission, ...
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    if set(data) == {"prefloop"} and isinstance(data["prefloop"], dict):
        data = data["prefloop"]
    return data


def load_settings(config_file: Path | None = None, env: Mapping[str, str] | None = None,
                  overrides: Mapping[str, Any] | None = None) -> Settings:
    """Merge defaults, the TOML file, the environment and explicit overrides (CLI flags).

    Without ``config_file``, ``./prefloop.toml`` is read when it exists. ``overrides`` values
    that are None are ignored (a CLI flag that was not given).
    """
    env = os.environ if env is None else env
    fields = {f.name: f for f in setting_fields()}
    values: dict[str, Any] = {}

    if config_file is None and env.get(ENV_PREFIX + "CONFIG"):
        config_file = Path(env[ENV_PREFIX + "CONFIG"])
    if config_file is None and Path(DEFAULT_CONFIG_FILE).is_file():
        config_file = Path(DEFAULT_CONFIG_FILE)
    if config_file is not None:
        for key, value in read_toml(Path(config_file)).items():
            if key in REMOVED:
                raise _removed(key, str(config_file))
            if key not in fields:
                raise ConfigError(f"{config_file}: unknown setting {key!r}; known settings: "
                                  + ", ".join(fields))
            values[key] = _coerce(fields[key], value, f"{config_file}: {key}")

    known_env = {env_name(name) for name in fields} | {ENV_PREFIX + "CONFIG",
                                                       ADMIN_PASSWORD_ENV, NO_NATIVE_BF16_ENV}
    for var, text in env.items():
        if not var.startswith(ENV_PREFIX):
            continue
        if var[len(ENV_PREFIX):].lower() in REMOVED:
            raise _removed(var[len(ENV_PREFIX):].lower(), var)
        if var not in known_env:
            raise ConfigError(f"unknown environment variable {var}; known: "
                              + ", ".join(sorted(known_env)))
        name = var[len(ENV_PREFIX):].lower()
        if name in fields:
            values[name] = _parse_text(fields[name], text, var)

    for key, value in (overrides or {}).items():
        if key in REMOVED:
            raise _removed(key, "--" + key.replace("_", "-"))
        if key not in fields:
            raise ConfigError(f"unknown setting {key!r}")
        if value is None:
            continue
        where = "--" + key.replace("_", "-")
        value = _parse_text(fields[key], value, where) if isinstance(value, str) \
            else _coerce(fields[key], value, where)
        values[key] = value

    return Settings(**values)
