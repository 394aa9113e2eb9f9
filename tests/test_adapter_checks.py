"""Adapter folders are checked before vLLM sees them: a cut-short or garbled weights file is
refused with a reason (vLLM is never asked to read it)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save_file

from prefloop.serving.adapters import AdapterError, AdapterPool, check_adapter, check_safetensors
from prefloop.serving.vllm_server import Endpoint


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    folder = tmp_path / "v0001"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 8, "base_model_name_or_path": str(tmp_path / "base")}))
    save_file({"a.lora_A.weight": torch.ones(8, 16), "a.lora_B.weight": torch.zeros(16, 8)},
              str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def test_a_whole_adapter_passes(adapter: Path, tmp_path: Path) -> None:
    check_adapter(adapter, tmp_path / "base", 16)
    check_safetensors(adapter / "adapter_model.safetensors")


def rewrite(path: Path, change) -> None:
    path.write_bytes(change(path.read_bytes()))


@pytest.mark.parametrize("case, change, reason", [
    ("cut short", lambda b: b[:-100], "cut short"),
    ("padded", lambda b: b + b"\0" * 10, "cut short or padded"),
    ("empty", lambda b: b"", "bad header length"),
    ("header length beyond the file", lambda b: (10**6).to_bytes(8, "little") + b[8:],
     "bad header length"),
    ("header not JSON", lambda b: b[:8] + b"{" * (len(b) - 8), "cannot be read"),
    ("header not a table", lambda b: (2).to_bytes(8, "little") + b"[]", "not a table"),
    ("random bytes", lambda b: bytes(range(256)) * 4, "bad header length"),
])
def test_garbled_weights_are_refused(adapter: Path, tmp_path: Path, case, change,
                                     reason: str) -> None:
    rewrite(adapter / "adapter_model.safetensors", change)
    with pytest.raises(AdapterError, match=reason):
        check_adapter(adapter, tmp_path / "base", 16)


def test_bad_tensor_entries_are_refused(adapter: Path, tmp_path: Path) -> None:
    header = json.dumps({"x": {"dtype": "F32", "shape": [1], "data_offsets": "0-4"}}).encode()
    (adapter / "adapter_model.safetensors").write_bytes(
        len(header).to_bytes(8, "little") + header + b"\0" * 4)
    with pytest.raises(AdapterError, match="bad tensor entries"):
        check_adapter(adapter, tmp_path / "base", 16)


class FakeVLLM:
    """vLLM's adapter endpoints as a fake at the process boundary: a name already loaded is
    refused with an error text that says nothing of it (the pool must ask /v1/models)."""

    def __init__(self, loaded: set[str]) -> None:
        self.loaded = set(loaded)
        self.calls: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls.append(request.url.path)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": n} for n in ["base", *self.loaded]]})
        name = json.loads(request.content)["lora_name"]
        if request.url.path == "/v1/unload_lora_adapter":
            self.loaded.discard(name)
            return httpx.Response(200, text="ok")
        if name in self.loaded or name.endswith("bad"):
            return httpx.Response(400, json={"error": {"message": "refused"}})
        self.loaded.add(name)
        return httpx.Response(200, text="ok")


def _pool(fake: FakeVLLM, base: Path) -> AdapterPool:
    pool = AdapterPool(Endpoint("http://vllm.test", "key"), base, 16)
    [replica] = pool.replicas.replicas
    replica._http = httpx.Client(base_url="http://vllm.test",
                                 transport=httpx.MockTransport(fake))
    return pool


def test_an_adapter_left_loaded_in_an_outside_vllm_is_loaded_afresh(adapter: Path,
                                                                   tmp_path: Path) -> None:
    fake = FakeVLLM({"prefloop-v0001"})
    pool = _pool(fake, tmp_path / "base")
    pool.load("v0001", adapter)
    assert pool.is_ready("v0001")
    # Listed under our name but from unknown files (no root): unloaded, loaded from ours.
    assert fake.calls == ["/v1/models", "/v1/unload_lora_adapter", "/v1/load_lora_adapter"]


def test_a_refused_adapter_that_is_not_loaded_stays_refused(adapter: Path,
                                                            tmp_path: Path) -> None:
    fake = FakeVLLM(set())
    pool = _pool(fake, tmp_path / "base")
    with pytest.raises(AdapterError, match="refused prefloop-vbad"):
        pool.load("vbad", adapter)
    assert not pool.is_ready("vbad")
    assert fake.calls == ["/v1/models", "/v1/load_lora_adapter", "/v1/models"]
