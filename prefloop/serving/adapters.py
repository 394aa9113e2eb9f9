"""Adapters in the running vLLM server: check a folder, load it, unload what nothing uses.

vLLM sees policy ``vNNNN`` as ``prefloop-vNNNN`` and ``base`` as itself. A name is never
loaded twice with different files (vLLM caches by name): every version has its own name.
Loading goes through vLLM's ``/v1/load_lora_adapter`` on loopback with the server's key; the
page and API never reach that endpoint. Requests already streaming keep their adapter until
they end: :meth:`AdapterPool.prune` unloads only adapters no request is using.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from prefloop.names import BASE
from prefloop.serving.vllm_server import Endpoint

log = logging.getLogger(__name__)

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


class AdapterError(RuntimeError):
    """An adapter folder cannot be served; the message says why."""


class ServerUnreachable(AdapterError):
    """The model server did not answer (e.g. it is restarting): the adapter may be fine."""


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
    """Which adapters vLLM has loaded, and which requests are using them.

    Thread-safe: rounds load from their thread, the page's requests mark use from the event
    loop, the vLLM watcher reloads after a restart.
    """

    def __init__(self, endpoint: Endpoint, base_model: Path | None, max_rank: int,
                 prefix: str = "prefloop", timeout: float = 120.0) -> None:
        self.endpoint = endpoint
        self.prefix = prefix  # several prefloops sharing one vLLM need different prefixes
        self.base_model = base_model
        self.max_rank = max_rank
        self._client = httpx.Client(
            base_url=endpoint.url.rstrip("/"), timeout=timeout,
            headers={"Authorization": f"Bearer {endpoint.api_key}"})
        self._lock = threading.Lock()
        self._loaded: dict[str, Path] = {}  # policy -> folder
        self._in_use: Counter[str] = Counter()

    def close(self) -> None:
        self._client.close()

    def served_name(self, policy: str) -> str:
        return served_name(policy, self.prefix)

    @property
    def loaded(self) -> dict[str, Path]:
        with self._lock:
            return dict(self._loaded)

    def is_ready(self, policy: str) -> bool:
        with self._lock:
            return policy == BASE or policy in self._loaded

    def load(self, policy: str, path: Path) -> None:
        """Check ``path`` and load it into vLLM as ``policy``; no-op if already loaded."""
        if policy == BASE or self.is_ready(policy):
            return
        check_adapter(path, self.base_model, self.max_rank)
        body = {"lora_name": self.served_name(policy), "lora_path": str(Path(path).resolve())}
        try:
            self._post("/v1/load_lora_adapter", body)
        except ServerUnreachable:
            raise
        except AdapterError:
            if body["lora_name"] not in self.served_models():
                raise
            # Left in an outside vLLM by an earlier run of this prefloop: load it afresh.
            self._post("/v1/unload_lora_adapter", {"lora_name": body["lora_name"]})
            self._post("/v1/load_lora_adapter", body)
        with self._lock:
            self._loaded[policy] = Path(path)
        log.info("adapter %s loaded from %s", policy, path)

    def unload(self, policy: str) -> None:
        with self._lock:
            if policy not in self._loaded:
                return
            del self._loaded[policy]
        try:
            self._post("/v1/unload_lora_adapter", {"lora_name": self.served_name(policy)})
        except AdapterError as exc:  # e.g. vLLM restarted and no longer has it
            log.warning("unloading %s: %s", policy, exc)

    def prune(self, keep: Iterable[str]) -> list[str]:
        """Unload loaded adapters not in ``keep`` that no request is using; returns them."""
        keep = set(keep)
        with self._lock:
            idle = [p for p in self._loaded if p not in keep and not self._in_use[p]]
        for policy in idle:
            self.unload(policy)
        return idle

    def reload(self, policies: dict[str, Path]) -> None:
        """After a vLLM restart: forget what was loaded and load ``policies`` again."""
        with self._lock:
            self._loaded.clear()
        for policy, path in policies.items():
            try:
                self.load(policy, path)
            except AdapterError as exc:
                log.error("could not load %s again after a vLLM restart: %s", policy, exc)

    @contextmanager
    def using(self, *policies: str) -> Iterator[None]:
        """Mark ``policies`` as in use by a request for the duration of the block."""
        with self._lock:
            self._in_use.update(policies)
        try:
            yield
        finally:
            with self._lock:
                self._in_use.subtract(policies)

    def served_models(self) -> set[str]:
        """The model names vLLM serves now, base and loaded adapters (``/v1/models``)."""
        try:
            response = self._client.get("/v1/models")
            response.raise_for_status()
            return {model["id"] for model in response.json()["data"]}
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            raise ServerUnreachable(f"the model server did not list its models: {exc}") \
                from None

    def _post(self, path: str, body: dict[str, str]) -> None:
        try:
            response = self._client.post(path, json=body)
        except httpx.HTTPError as exc:
            raise ServerUnreachable(f"the model server did not answer {path}: {exc}") from None
        if response.status_code != 200:
            raise AdapterError(f"the model server refused {body['lora_name']} "
                               f"({response.status_code}): {response.text[:300]}")
