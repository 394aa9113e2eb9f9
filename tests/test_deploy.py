"""deploy/compose.yaml agrees with prefloop (Docker itself is not run here: docs/DEPLOY.md):
the replicas come from vLLM's image at the version the `gpu` extra pins, with the flags the
vLLM prefloop starts itself has, runtime LoRA updating and an API key from the environment;
they publish no port and sit on an internal network only; they read the adapters at the path
prefloop writes them; prefloop names every replica."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from prefloop.config import Settings
from prefloop.names import EMBEDDED_NAME
from prefloop.trainer.settings import DEFAULT_TARGET_MODULES

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())


def replicas(compose: dict) -> dict[str, dict]:
    return {name: s for name, s in compose["services"].items()
            if s.get("image", "").startswith("vllm/vllm-openai:")}


def flag(command: list[str], name: str) -> str:
    return next(a.split("=", 1)[1] for a in command if a.startswith(f"--{name}="))


def test_the_replicas_run_vllms_image_as_prefloop_runs_vllm(compose: dict) -> None:
    pinned = re.search(r'"vllm==([\d.]+)"', (REPO / "pyproject.toml").read_text())[1]
    vllms = replicas(compose)
    assert len(vllms) >= 2
    defaults = Settings()
    for service in vllms.values():
        assert service["image"] == f"vllm/vllm-openai:v{pinned}"
        command = service["command"]
        assert "--enable-lora" in command and flag(command, "served-model-name") == "base"
        assert int(flag(command, "max-lora-rank")) == defaults.lora_max_rank
        assert int(flag(command, "max-loras")) == defaults.lora_slots
        assert int(flag(command, "max-model-len")) == defaults.max_model_len
        start = command.index("--lora-target-modules") + 1
        assert tuple(command[start:start + len(DEFAULT_TARGET_MODULES)]) \
            == DEFAULT_TARGET_MODULES
        env = service["environment"]
        assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
        assert env["VLLM_API_KEY"].startswith("${VLLM_API_KEY:?")


def test_the_replicas_are_reachable_from_prefloop_alone(compose: dict) -> None:
    assert compose["networks"]["vllm"]["internal"] is True
    vllms = replicas(compose)
    for service in vllms.values():
        assert "ports" not in service and service["networks"] == ["vllm"]
    prefloop = compose["services"]["prefloop"]
    assert "vllm" in prefloop["networks"]
    assert all(p.startswith("127.0.0.1:") for p in prefloop["ports"])  # TLS proxy in front
    urls = prefloop["environment"]["PREFLOOP_VLLM_URL"].split(",")
    assert urls == [f"http://{name}:8000" for name in vllms]
    assert prefloop["environment"]["PREFLOOP_VLLM_API_KEY"] \
        == next(iter(vllms.values()))["environment"]["VLLM_API_KEY"]


def test_the_replicas_read_adapters_where_prefloop_writes_them(compose: dict) -> None:
    prefloop = compose["services"]["prefloop"]
    data_dir = prefloop["environment"]["PREFLOOP_DATA_DIR"]
    assert f"prefloop-data:{data_dir}" in prefloop["volumes"]
    for service in replicas(compose).values():
        assert f"prefloop-data:{data_dir}:ro" in service["volumes"]
        assert flag(service["command"], "model").endswith(
            f"/data/models/{EMBEDDED_NAME}}}")  # the embedded model's folder
        assert service["depends_on"]["prepare"]["condition"] \
            == "service_completed_successfully"
