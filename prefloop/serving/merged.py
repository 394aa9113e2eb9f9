"""A crowned adapter merged into the base weights: a plain model folder a vLLM without LoRA
serves at the speed of the base model (``champion_engine = "merged"``, serving/champion.py).

The merge is PEFT's ``merge_and_unload`` (W + scale·B·A in every adapted layer), written
whole or not at all (``prefloop/atomic.py``) under ``<data_dir>/merged/`` with the base's
tokenizer. A folder is named for the policy and a digest of what went into it (the adapter's
files and the base model's path), so a name never stands for other weights.

It runs in a subprocess (``python -m prefloop.serving.merged``): the web process never
imports torch, and the memory of a loaded model returns when the merge ends.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

from prefloop.atomic import atomic_path
from prefloop.serving.adapters import AdapterError, check_adapter
from prefloop.serving.vllm_server import die_with_parent, tail

log = logging.getLogger(__name__)

MARKER = "prefloop-merged.json"  # what a merged folder was made from
DTYPES = ("float32", "bfloat16", "float16")


class MergeError(RuntimeError):
    """An adapter could not be merged; the message says why. Nothing was written."""


def merged_name(policy: str, adapter: Path, base_model: Path) -> str:
    """``vNNNN-<digest>``: the digest covers the adapter's config and weights and the base
    model's path, so other weights never get the same folder name."""
    digest = hashlib.sha256(str(Path(base_model).resolve()).encode())
    for path in sorted(Path(adapter).iterdir()):
        if path.name.startswith("adapter_") and path.is_file():
            digest.update(path.name.encode() + b"\0")
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return f"{policy}-{digest.hexdigest()[:12]}"


def is_merged(path: Path) -> bool:
    """True for a complete merged folder (the marker is written last, inside the atomic
    rename, so its presence means the whole folder is there)."""
    return (path / MARKER).is_file() and (path / "config.json").is_file()


def merge_adapter(base_model: Path, adapter: Path, out: Path, *, max_rank: int = 512,
                  dtype: str = "float32") -> Path:
    """Merge the LoRA ``adapter`` into ``base_model`` and save the result with the base's
    tokenizer as a model folder at ``out`` (atomically; an existing complete ``out`` is
    kept). In-process: it imports torch. Raises :class:`MergeError`.

    ``dtype``: of the saved weights. float32 by default: an adapter's delta is often below
    bf16's resolution of the weight it is added to, and rounding the sum would lose part of
    what was trained; vLLM casts to the dtype it serves in when it loads the folder.
    """
    if dtype not in DTYPES:
        raise MergeError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    try:
        check_adapter(adapter, base_model, max_rank)
    except AdapterError as exc:
        raise MergeError(f"{adapter} cannot be merged: {exc}") from None
    if is_merged(out):
        return out
    if not (Path(base_model) / "config.json").is_file():
        raise MergeError(f"{base_model} is not a model folder (no config.json)")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        # fp32 for the sum itself, whatever the files hold.
        model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        model = model.to(getattr(torch, dtype))
        tokenizer = AutoTokenizer.from_pretrained(base_model)
        with atomic_path(out, folder=True, replace=False) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / MARKER).write_text(json.dumps({
                "adapter": str(Path(adapter).resolve()),
                "base_model": str(Path(base_model).resolve()), "dtype": dtype}) + "\n")
    except FileExistsError:  # another merge of the same weights finished first
        if not is_merged(out):
            raise MergeError(f"{out} exists but is not a complete merged model") from None
    except (OSError, ValueError, RuntimeError) as exc:
        raise MergeError(f"merging {adapter} into {base_model} failed: {exc}") from exc
    return out


def ensure_merged(policy: str, adapter: Path, base_model: Path, merged_dir: Path, *,
                  max_rank: int = 512, timeout: float = 3600.0,
                  log_path: Path | None = None) -> Path:
    """The merged folder of ``policy`` (made once, in a subprocess at nice 10 that dies with
    this process). Raises :class:`MergeError` with the end of its log."""
    try:
        check_adapter(adapter, base_model, max_rank)  # a clear error before any subprocess
        out = Path(merged_dir) / merged_name(policy, adapter, base_model)
    except (AdapterError, OSError) as exc:
        raise MergeError(f"{policy} cannot be merged: {exc}") from None
    if is_merged(out):
        return out
    Path(merged_dir).mkdir(parents=True, exist_ok=True)
    log_path = log_path or Path(merged_dir) / f"{out.name}.log"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "prefloop.serving.merged", "--base-model",
               str(base_model), "--adapter", str(adapter), "--out", str(out),
               "--max-rank", str(max_rank)]
    with open(log_path, "ab") as logfile:
        try:
            done = subprocess.run(command, stdout=logfile, stderr=subprocess.STDOUT, env=env,
                                  stdin=subprocess.DEVNULL, timeout=timeout,
                                  preexec_fn=_background)
        except subprocess.TimeoutExpired:
            raise MergeError(f"merging {policy} took over {timeout:g} s; log: "
                             f"{log_path}") from None
    if done.returncode != 0 or not is_merged(out):
        raise MergeError(f"merging {policy} failed (exit code {done.returncode}); last lines "
                         f"of {log_path}:\n{tail(log_path, 10)}")
    log.info("merged %s into %s", policy, out)
    return out


def remove_unused(merged_dir: Path, keep: Iterable[Path]) -> list[str]:
    """Delete merged folders other than ``keep`` (with their merge logs), and half-written
    ones a crash left; returns their names. Call only when no engine serves from them and
    no merge is running (the champion engine's one thread does both)."""
    merged_dir = Path(merged_dir)
    if not merged_dir.is_dir():
        return []
    kept = {Path(p).name for p in keep}
    removed = []
    for path in merged_dir.iterdir():
        name = path.name.removesuffix(".log") if path.is_file() else path.name
        if name in kept:
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
        else:
            path.unlink(missing_ok=True)
    return sorted(removed)


def _background() -> None:
    """In the merge's child: below the web process and vLLM in priority, and gone with us."""
    die_with_parent()
    os.nice(10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prefloop.serving.merged",
                                     description="Merge a LoRA adapter into its base model "
                                                 "and save a model folder.")
    parser.add_argument("--base-model", type=Path, required=True, help="base model folder")
    parser.add_argument("--adapter", type=Path, required=True, help="PEFT LoRA adapter folder")
    parser.add_argument("--out", type=Path, required=True, help="folder to write (atomically)")
    parser.add_argument("--max-rank", type=int, default=512, help="largest rank accepted")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="dtype of the saved weights")
    args = parser.parse_args(argv)
    try:
        merge_adapter(args.base_model, args.adapter, args.out, max_rank=args.max_rank,
                      dtype=args.dtype)
    except MergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"merged into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
