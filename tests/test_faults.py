"""Fault drills on the real loop (real vLLM, the real trainer): a trainer killed mid-round or
while saving, out of memory, or out of disk; an adapter folder that is corrupt. Each time the
round fails with its reason, serving goes on, and the adapters folder holds nothing
half-written. (vLLM and ``prefloop serve`` killed: test_lifecycle.py; database locked or full:
test_guard.py.)

The faults are injected into the real trainer by a wrapper command that patches one thing and
then runs ``python -m prefloop.trainer`` as usual.
"""

from __future__ import annotations

import shutil
import signal
import sys
from pathlib import Path

import psutil
import pytest

from prefloop.loop.controller import LoopError
from tests.conftest import ROUND_TIMEOUT, lora_adapter, wait_for
from tests.test_loop import LoopRig, vote_pairs

pytestmark = pytest.mark.slow


def wrapped_trainer(setup: str) -> tuple[str, ...]:
    """The real trainer, after ``setup`` (Python source) has run in its process."""
    return (sys.executable, "-c", setup + (
        "\nimport runpy, sys\nsys.argv = ['prefloop.trainer', *sys.argv[1:]]\n"
        "runpy.run_module('prefloop.trainer', run_name='__main__', alter_sys=True)\n"))


def adapter_folder_entries(rig: LoopRig) -> list[str]:
    folder = rig.settings.adapters_dir
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def assert_failed_cleanly(rig: LoopRig, round_id: int, *reasons: str) -> None:
    row = rig.store.round(round_id)
    assert row["status"] == "failed", row
    for reason in reasons:
        assert reason in row["error"], row["error"]
    assert rig.store.adapters() == [] and rig.store.champion() == "base"
    assert adapter_folder_entries(rig) == []  # no adapter, no temporary folder
    assert rig.turn("Still there?").pair_id is not None  # serving is unaffected


@pytest.fixture
def rig(tmp_path: Path, vllm_server, embedded_model: Path):
    rig = LoopRig(tmp_path / "data", vllm_server, embedded_model)
    vote_pairs(rig.store, 4)
    yield rig
    rig.close()


def test_trainer_killed_mid_round(rig: LoopRig) -> None:
    round_id = rig.loop.start_round("admin")

    def stepped() -> bool:
        row = rig.store.round(round_id)
        assert row["status"] == "running", row
        return (row["progress"] or {}).get("event") == "step"

    wait_for(stepped, ROUND_TIMEOUT, "the trainer to report a step")
    trainers = [p for p in psutil.Process().children(recursive=True)
                if "prefloop.trainer" in " ".join(p.cmdline())]
    assert len(trainers) == 1
    trainers[0].send_signal(signal.SIGKILL)
    rig.loop.wait_for_round(60)
    assert_failed_cleanly(rig, round_id, "exited with code -9")


def test_trainer_killed_while_saving_leaves_no_partial_adapter(rig: LoopRig) -> None:
    # The adapter is written in full to a temporary folder; the trainer dies before the
    # rename that would make it an adapter.
    rig.loop.trainer_command = wrapped_trainer(
        "import os, signal\n"
        "def dying(real):\n"
        "    def rename(src, dst, *args, **kwargs):\n"
        "        if '.tmp-' in str(src):\n"
        "            os.kill(os.getpid(), signal.SIGKILL)\n"
        "        return real(src, dst, *args, **kwargs)\n"
        "    return rename\n"
        "os.rename, os.replace = dying(os.rename), dying(os.replace)\n")
    assert_failed_cleanly(rig, rig.loop.run_round("admin"), "exited with code -9")


def test_trainer_out_of_memory(rig: LoopRig) -> None:
    rig.loop.trainer_command = wrapped_trainer(
        "import prefloop.trainer.round as r\n"
        "def step(*args, **kwargs):\n"
        "    raise MemoryError('cannot allocate 1073741824 bytes (injected)')\n"
        "r._optimizer_step = step\n")
    assert_failed_cleanly(rig, rig.loop.run_round("admin"), "exited with code 1",
                          "MemoryError")


def test_disk_full_while_writing_the_adapter(rig: LoopRig) -> None:
    # A file-size limit of 1 MB: the adapter's weights (several MB) cannot be written, and
    # the write fails as on a full disk (EFBIG instead of ENOSPC).
    rig.loop.trainer_command = wrapped_trainer(
        "import resource, signal\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n")
    assert_failed_cleanly(rig, rig.loop.run_round("admin"), "exited with code 1",
                          "File too large")


def test_recovery_removes_what_a_crash_left_half_written(rig: LoopRig) -> None:
    partial = rig.settings.adapters_dir / ".v0001.tmp-abc123"
    partial.mkdir(parents=True)
    (partial / "adapter_model.safetensors").write_bytes(b"\0" * 100)
    rig.loop.recover()
    assert adapter_folder_entries(rig) == []


def test_a_corrupt_adapter_is_refused_with_its_reason_and_the_champion_stays(
        rig: LoopRig, embedded_model: Path) -> None:
    # A good adapter to stand as champion: a real PEFT one made here (a trained round adds
    # nothing to this drill but minutes; test_loop.py promotes trained ones).
    good = "v0001"
    rig.store.add_adapter(good, lora_adapter(embedded_model, rig.settings.adapters_dir / good),
                          None, "base")
    rig.loop.promote(good)
    assert rig.store.champion() == good
    source = Path(rig.store.adapter(good)["path"])
    cases = {
        "weights cut short": lambda d: (d / "adapter_model.safetensors").write_bytes(
            (source / "adapter_model.safetensors").read_bytes()[:4096]),
        "weights missing": lambda d: (d / "adapter_model.safetensors").unlink(),
        "config not JSON": lambda d: (d / "adapter_config.json").write_text("{nope"),
        "another base model": lambda d: (d / "adapter_config.json").write_text(
            (source / "adapter_config.json").read_text().replace(
                str(rig.loop.base_model), "/models/another")),
    }
    for number, (case, corrupt) in enumerate(cases.items(), start=2):
        name = f"v{number:04d}"
        folder = rig.settings.adapters_dir / name
        shutil.copytree(source, folder)
        corrupt(folder)
        rig.store.add_adapter(name, folder, None, good)
        with pytest.raises(LoopError, match=f"{name} cannot be served") as refused:
            rig.loop.promote(name)
        assert str(refused.value).split(": ", 1)[1], case  # a reason follows
        assert rig.store.champion() == good, case
        assert name not in rig.pool.loaded, case
    assert rig.turn("Hello again?").progress.a.policy == good
