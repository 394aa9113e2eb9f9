"""Adapters in the running vLLM replicas: check a folder, load it, unload what nothing uses.

vLLM sees policy ``vNNNN`` as ``prefloop-vNNNN`` and ``base`` as itself. A name is never
loaded twice with different files (vLLM caches by name): every version has its own name.
Loading goes through vLLM's ``/v1/load_lora_adapter`` on loopback with the server's key; the
page and API never reach that endpoint. Requests already streaming keep their adapter until
they end: :meth:`AdapterPool.prune` unloads only adapters no request is using. With several
replicas (``serving/replicas.py``) an adapter is loaded on every one that is up before
:meth:`AdapterPool.load` returns, and a replica that comes back gets it by reconciliation.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from prefloop.names import BASE
from prefloop.serving.replicas import AdapterError, Replica, Replicas, ServerUnreachable
from prefloop.serving.vllm_server import Endpoint

if TYPE_CHECKING:  # champion.py imports merged.py, which imports this module
    from prefloop.serving.champion import ChampionEngine

__all__ = ["AdapterError", "AdapterPool", "ServerUnreachable", "check_adapter", "served_name"]

log = logging.getLogger(__name__)

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def served_name(policy: str, prefix: str = "prefloop") -> str:
    """The model name vLLM knows ``policy`` by."""
    return BASE if policy == BASE else f"{prefix}-{policy}"


def check_safetensors(path: Path) -> None:
    """Raise :class:`AdapterError` unless ``path`` is a whole safetensors file: a JSON header
    whose tensors end exactly where the file does (a cut-short copy fails here, before vLLM
    ever reads it)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 2 <= length <= min(size - 8, 100_000_000):
                raise AdapterError(f"{path} is not a safetensors file (bad header length)")
            header = json.loads(f.read(length))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{path} cannot be read as safetensors: {exc}") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{path} is not a safetensors file (header is not a table)")
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"
            and isinstance(t, dict) and isinstance(t.get("data_offsets"), list)
            and len(t["data_offsets"]) == 2 and isinstance(t["data_offsets"][1], int)]
    if len(ends) != len(header) - ("__metadata__" in header) or not ends:
        raise AdapterError(f"{path} is not a safetensors file (bad tensor entries)")
    if 8 + length + max(ends) != size:
        raise AdapterError(f"{path} is cut short or padded: {size:,} bytes, the header "
                           f"describes {8 + length + max(ends):,}")


def check_adapter(path: Path, base_model: Path | None, max_rank: int) -> None:
    """Raise :class:`AdapterError` unless ``path`` is a complete PEFT LoRA folder made for
    ``base_model`` (None: do not check the base) with a rank vLLM accepts."""
    config_file = Path(path) / "adapter_config.json"
    if not config_file.is_file():
        raise AdapterError(f"{path} has no adapter_config.json")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{config_file} cannot be read as JSON: {exc}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise AdapterError(f"{config_file} does not describe a LoRA adapter")
    if not any((Path(path) / name).is_file() for name in WEIGHT_FILES):
        raise AdapterError(f"{path} has no adapter weights ({' or '.join(WEIGHT_FILES)})")
    safetensors = Path(path) / "adapter_model.safetensors"
    if safetensors.is_file():
        check_safetensors(safetensors)
    rank = config.get("r")
    if not isinstance(rank, int) or not 1 <= rank <= max_rank:
        raise AdapterError(f"LoRA rank {rank!r} is outside 1..{max_rank} (lora_max_rank)")
    if base_model is not None:
        named = config.get("base_model_name_or_path")
        if not named or Path(named).resolve() != Path(base_model).resolve():
            raise AdapterError(f"the adapter was trained on {named!r}, not on the served "
                               f"model {str(base_model)!r}")


class AdapterPool:
    """Which adapters the vLLM replicas serve, and which requests are using them.

    Built on one :class:`Endpoint` (one vLLM, as before replicas) or on several
    :class:`Replica` engines, watched once :meth:`Replicas.start` is called. Thread-safe:
    rounds load from their thread, the page's requests mark use from the event loop, the
    replicas' watcher reconciles.
    """

    def __init__(self, engines: Endpoint | Sequence[Replica], base_model: Path | None,
                 max_rank: int, prefix: str = "prefloop", timeout: float = 120.0, *,
                 watch_every: float = 2.0) -> None:
        self.prefix = prefix  # several prefloops sharing one vLLM need different prefixes
        self.base_model = base_model
        self.max_rank = max_rank
        self.replicas = Replicas(engines, self.owns, watch_every=watch_every) \
            if not isinstance(engines, Endpoint) \
            else Replicas.single(engines, self.owns, timeout=timeout)
        self._lock = threading.Lock()
        self._in_use: Counter[str] = Counter()
        # The plain engine for the champion's own turns (champion_engine = "merged"), shown
        # in status beside the replicas; set by whoever starts it.
        self.champion_engine: ChampionEngine | None = None

    def owns(self, name: str) -> bool:
        """True for the served names of this prefloop's adapters."""
        return name.startswith(self.prefix + "-")

    @property
    def endpoint(self) -> Endpoint:
        """A replica's endpoint that is up (the first one when none is)."""
        return self.replicas.first_up().endpoint

    def endpoint_for(self, policy: str) -> Endpoint:
        """A replica's endpoint that is up and serves ``policy`` (for the KL probe)."""
        return self.replicas.first_up({self.served_name(policy)}).endpoint

    def close(self) -> None:
        self.replicas.close()

    def served_name(self, policy: str) -> str:
        return served_name(policy, self.prefix)

    @property
    def loaded(self) -> dict[str, Path]:
        """The wanted adapters that some replica serves now: policy -> folder."""
        start = len(self.prefix) + 1
        return {name[start:]: path for name, path in self.replicas.wanted.items()
                if self.replicas.serving(name)}

    def is_ready(self, policy: str) -> bool:
        """True when a request for ``policy`` can be routed now (``base``: always)."""
        return policy == BASE or (self.served_name(policy) in self.replicas.wanted
                                  and self.replicas.serving(self.served_name(policy)))

    def load(self, policy: str, path: Path) -> None:
        """Check ``path`` and load it as ``policy`` on every replica that is up; no-op if
        it is on all of them. :class:`AdapterError` when a replica refuses it (it is then
        wanted nowhere), :class:`ServerUnreachable` when no replica answered (it stays
        wanted: a replica that comes back gets it)."""
        name = self.served_name(policy)
        if policy == BASE or (name in self.replicas.wanted and self.replicas.everywhere(name)):
            return
        check_adapter(path, self.base_model, self.max_rank)
        self.replicas.want(name, path)
        refused, unreachable = self.replicas.sync()
        reasons = [why[name] for why in refused.values() if name in why]
        if reasons:
            self.replicas.unwant([name])
            self.replicas.sync()  # off the replicas that took it
            raise AdapterError(reasons[0])
        if not self.replicas.serving(name):
            raise ServerUnreachable(f"the model server did not answer ({', '.join(unreachable)} "
                                    f"of {len(self.replicas.replicas)} replicas tried)")
        log.info("adapter %s loaded from %s", policy, path)

    def unload(self, policy: str) -> None:
        self.replicas.unwant([self.served_name(policy)])
        _, unreachable = self.replicas.sync()
        if unreachable:  # e.g. restarting: it comes back without the adapter anyway
            log.warning("unloading %s: %s did not answer", policy, ", ".join(unreachable))

    def prune(self, keep: Iterable[str]) -> list[str]:
        """Unload loaded adapters not in ``keep`` that no request is using; returns them."""
        keep = set(keep)
        start = len(self.prefix) + 1
        with self._lock:
            idle = [name[start:] for name in self.replicas.wanted
                    if name[start:] not in keep and not self._in_use[name[start:]]]
            self.replicas.unwant(self.served_name(p) for p in idle)
        if idle:
            self.replicas.sync()
        return idle

    def reload(self, policies: dict[str, Path]) -> None:
        """Serve exactly ``policies`` from now on (at start: nothing else of ours)."""
        self.replicas.unwant([n for n in self.replicas.wanted])
        for policy, path in policies.items():
            try:
                self.load(policy, path)
            except AdapterError as exc:
                log.error("could not load %s again: %s", policy, exc)

    @contextmanager
    def using(self, *policies: str) -> Iterator[None]:
        """Mark ``policies`` as in use by a request for the duration of the block."""
        with self._lock:
            self._in_use.update(policies)
        try:
            yield
        finally:
            self.release(*policies)

    def hold(self, *policies: str) -> bool:
        """Mark ``policies`` in use if every one is ready now, in one step with the check (a
        :meth:`prune` sees either the mark or no adapter to route to); True when held:
        :meth:`release` them when the request ends."""
        with self._lock:
            if not all(self.is_ready(p) for p in policies):
                return False
            self._in_use.update(policies)
            return True

    def release(self, *policies: str) -> None:
        with self._lock:
            self._in_use.subtract(policies)

    def served_models(self, replica: Replica | None = None) -> set[str]:
        """The model names a replica serves now, base and loaded adapters (``/v1/models``)."""
        replica = replica or self.replicas.first_up()
        return set(replica.models(self.replicas.probe_timeout))

    def status(self) -> list[dict]:
        """Each replica: up or down, its adapters (as policies), requests in flight; then
        each champion engine (kind ``champion``: its policy, start time and memory)."""
        start = len(self.prefix) + 1
        rows = [{**row, "adapters": [n[start:] for n in row["adapters"] if self.owns(n)]}
                for row in self.replicas.status()]
        return rows + (self.champion_engine.rows() if self.champion_engine else [])
