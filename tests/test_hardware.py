"""What the CPU does natively, and the precision vLLM serves in because of it."""

from __future__ import annotations

from pathlib import Path

import pytest

from prefloop.config import ConfigError, load_settings
from prefloop.hardware import (
    NO_NATIVE_BF16_ENV,
    cpu_flags,
    cpu_has_native_bf16,
    serving_dtype,
)
from prefloop.serving.vllm_server import VLLMServer, is_cpu_build

AVX2 = frozenset({"sse2", "avx", "avx2", "fma"})
ZEN4 = AVX2 | {"avx512f", "avx512_bf16"}
SAPPHIRE = AVX2 | {"avx512f", "amx_bf16", "amx_tile"}


def test_native_bf16_needs_avx512_bf16_or_amx() -> None:
    assert not cpu_has_native_bf16({}, AVX2)
    assert cpu_has_native_bf16({}, ZEN4) and cpu_has_native_bf16({}, SAPPHIRE)


@pytest.mark.parametrize("value", ["1", "true", "YES", " on "])
def test_the_override_hides_native_bf16(value: str) -> None:
    assert not cpu_has_native_bf16({NO_NATIVE_BF16_ENV: value}, SAPPHIRE)


@pytest.mark.parametrize("value", ["", "0", "false", "no"])
def test_the_override_off_changes_nothing(value: str) -> None:
    assert cpu_has_native_bf16({NO_NATIVE_BF16_ENV: value}, SAPPHIRE)


def test_cpu_flags_read_the_flags_line(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC avx512_bf16\n"
                    "flags\t\t: fpu sse2 avx2\n\nprocessor\t: 1\nflags\t\t: fpu sse2 avx2\n")
    assert cpu_flags(info) == {"fpu", "sse2", "avx2"}  # not the model name's words
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_this_machine_has_flags() -> None:
    assert "sse2" in cpu_flags()  # every x86-64 CPU; a wrong parse would miss it


@pytest.mark.parametrize(("setting", "cpu", "native", "expected"), [
    ("auto", True, True, "bfloat16"),
    ("auto", True, False, "float32"),
    ("auto", False, False, "auto"),  # a GPU: vLLM's own choice
    ("float32", True, True, "float32"),
    ("bfloat16", True, False, "bfloat16"),  # asked for: served (with a warning)
    ("float16", False, True, "float16"),
])
def test_serving_dtype(setting: str, cpu: bool, native: bool, expected: str) -> None:
    assert serving_dtype(setting, cpu_build=cpu, native_bf16=native) == expected


def test_serving_dtype_refuses_unknown_values() -> None:
    with pytest.raises(ValueError, match="serve_dtype must be one of"):
        serving_dtype("fp8", cpu_build=True, native_bf16=True)


def test_serve_dtype_setting_is_checked() -> None:
    assert load_settings(env={}).serve_dtype == "auto"
    assert load_settings(env={"PREFLOOP_SERVE_DTYPE": "float32"}).serve_dtype == "float32"
    with pytest.raises(ConfigError, match="PREFLOOP_SERVE_DTYPE: expected one of auto"):
        load_settings(env={"PREFLOOP_SERVE_DTYPE": "half"})
    # The rehearsal override is a known variable, not an unknown-setting error.
    load_settings(env={NO_NATIVE_BF16_ENV: "1"})


def test_vllm_gets_the_dtype_this_cpu_runs_fastest(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    server = VLLMServer(tmp_path / "model", tmp_path / "run")
    command = server.command()
    expected = ("bfloat16" if cpu_has_native_bf16() else "float32") if is_cpu_build() \
        else "auto"
    assert command[command.index("--dtype") + 1] == expected
    monkeypatch.setenv(NO_NATIVE_BF16_ENV, "1")
    server = VLLMServer(tmp_path / "model", tmp_path / "run")
    assert server.dtype == ("float32" if is_cpu_build() else "auto")
    server = VLLMServer(tmp_path / "model", tmp_path / "run", dtype="bfloat16")
    assert server.dtype == "bfloat16"
