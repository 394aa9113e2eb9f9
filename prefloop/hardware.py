"""What this machine's CPU multiplies natively, and the precision that follows from it.

Imports nothing of prefloop: the trainer (a subprocess of its own) and the server both ask.

On x86-64, bf16 matrix products are native only with AVX512-BF16 or AMX. A CPU with AVX2
and nothing newer (e.g. many AMD EPYC machines) emulates them: vLLM served the embedded
model 3.3x slower in bf16 than in fp32 there (docs/BENCHMARKS.md), so such a CPU serves and
trains in fp32. ``PREFLOOP_NO_NATIVE_BF16=1`` makes the code see a CPU without native bf16,
to rehearse such a machine on a faster one (``make test-avx2``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

NO_NATIVE_BF16_ENV = "PREFLOOP_NO_NATIVE_BF16"
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
SERVE_DTYPES = ("auto", "bfloat16", "float32", "float16")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo cannot be read)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def cpu_has_native_bf16(env: Mapping[str, str] | None = None,
                        flags: frozenset[str] | None = None) -> bool:
    """True where the CPU multiplies bf16 natively (AVX512-BF16 or AMX), unless
    ``PREFLOOP_NO_NATIVE_BF16`` is set to a true value."""
    env = os.environ if env is None else env
    if env.get(NO_NATIVE_BF16_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    return bool(NATIVE_BF16_FLAGS & (cpu_flags() if flags is None else flags))


def serving_dtype(setting: str, *, cpu_build: bool, native_bf16: bool) -> str:
    """The ``--dtype`` vLLM gets for the ``serve_dtype`` setting.

    ``auto`` on vLLM's CPU build: bf16 where the CPU has it natively, else fp32. ``auto`` on
    a GPU: vLLM's own ``auto`` (the model's bf16, or fp16 on GPUs without bf16). Any other
    value is passed as it is.
    """
    if setting not in SERVE_DTYPES:
        raise ValueError(f"serve_dtype must be one of {', '.join(SERVE_DTYPES)}, "
                         f"got {setting!r}")
    if setting != "auto" or not cpu_build:
        return setting
    return "bfloat16" if native_bf16 else "float32"
