"""The web process: FastAPI with the JSON API and the Gradio page, and ``prefloop serve``."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import signal
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import httpx
import uvicorn
from fastapi import FastAPI

from prefloop.app.api import api_router, health_router, install_error_handlers
from prefloop.app.arena import ARENA_CSS, ArenaHandlers, build_arena
from prefloop.app.chat import ChatService
from prefloop.app.guard import ClientCookies
from prefloop.app.loop_api import loop_routers
from prefloop.app.loop_tabs import build_loop_tabs
from prefloop.app.metrics import Metrics
from prefloop.app.moderation import Moderator
from prefloop.app.privacy import load_terms
from prefloop.app.privacy_api import privacy_routers
from prefloop.config import Settings, admin_password
from prefloop.loop.controller import Loop
from prefloop.names import BASE
from prefloop.serving.adapters import AdapterPool
from prefloop.serving.champion import ChampionEngine
from prefloop.serving.merged import ensure_merged
from prefloop.serving.models import prepare_model
from prefloop.serving.replicas import Replica, Replicas
from prefloop.serving.sampler import PairSampler, Sampling
from prefloop.serving.vllm_server import Endpoint, VLLMServer, is_cpu_build, replica_env
from prefloop.storage.store import Store

log = logging.getLogger(__name__)
HEALTH_TIMEOUT_S = 1.5  # each check; /healthz answers within about that

INTRO = """# prefloop
Chat with the model. Every turn shows **two answers**: pick the better one (or call a tie,
say both are bad, or write a better answer). Your votes teach the model."""


def page_theme() -> gr.themes.Base:
    """Gradio's default theme, its semibold text drawn from the fonts' bold files.

    Gradio 6.31 ships SourceSansPro-SemiBold.woff2 (and IBMPlexMono-SemiBold.woff2) as a
    subset of a few glyphs: in "A is better" or "Answer B" the A and B came from it and every
    other letter from the browser's fallback font, at another size and weight. The bold
    files are whole; with no 600 face declared, the browser draws weight 600 with the 700 one.
    """
    whole = (400, 700)
    return gr.themes.Default(
        font=(gr.themes.LocalFont("Source Sans Pro", weights=whole), "ui-sans-serif",
              "system-ui", "sans-serif"),
        font_mono=(gr.themes.LocalFont("IBM Plex Mono", weights=whole), "ui-monospace",
                   "Consolas", "monospace"))


def build_page(service: ChatService, admin_password: str | None = None) -> gr.Blocks:
    # No analytics and no version check (both call Gradio's servers); the default theme's
    # fonts are served by the app itself, not by Google Fonts.
    with gr.Blocks(title="prefloop", analytics_enabled=False) as page:
        gr.Markdown(INTRO)
        with gr.Tabs():
            with gr.Tab("Arena", id="arena"):
                on_load = build_arena(ArenaHandlers(service))
            if service.loop is not None:
                build_loop_tabs(service.loop, admin_password, service.guard,
                                moderation=lambda: service.moderator.summary(
                                    service.store.count_withheld()))
        if on_load is not None:
            page.load(**on_load)
    page.queue(default_concurrency_limit=None)
    return page


def create_app(settings: Settings, store: Store, sampler: PairSampler,
               loop: Loop | None = None, admin_password: str | None = None,
               vllm_restarts: Callable[[], int | None] | None = None) -> FastAPI:
    """The whole web app over an open store and a sampler (and the loop, if it runs);
    starts nothing itself."""
    service = ChatService(settings, store, sampler, loop)
    champion = loop.pool.champion_engine if loop is not None else None
    metrics = Metrics(store, service.guard, vllm_restarts, service.moderator,
                      loop.pool.status if loop is not None else None,
                      champion.summary if champion is not None else None)
    service.on_pair.append(metrics.observe_pair)
    health = httpx.AsyncClient(timeout=1.5)

    async def database_ok() -> bool:
        # In a thread, with a deadline: a store busy with a slow commit must not hold the
        # health check (it waited 12 s under load in bench/load.py).
        try:
            await asyncio.wait_for(asyncio.to_thread(store.check), HEALTH_TIMEOUT_S)
            return True
        except TimeoutError:
            log.error("health check: the database did not answer within %g s",
                      HEALTH_TIMEOUT_S)
            return False
        except Exception:  # unhealthy, and the log says why
            log.exception("health check: the database failed")
            return False

    async def answers(url: str) -> bool:
        try:
            response = await asyncio.wait_for(health.get(url.rstrip("/") + "/health"),
                                              HEALTH_TIMEOUT_S)
            return response.status_code == 200
        except (httpx.HTTPError, TimeoutError):
            return False

    async def model_ok() -> bool:
        """True while some vLLM replica answers (pairs go to those that do)."""
        urls = [r.endpoint.url for r in sampler.replicas.replicas]
        return any(await asyncio.gather(*map(answers, urls)))

    async def checks() -> dict[str, bool]:
        db, model = await asyncio.gather(database_ok(), model_ok())
        return {"database": db, "model": model}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if not health.is_closed:  # Gradio runs it for its own app as well
            await sampler.close()
            await health.aclose()

    app = FastAPI(title="prefloop", version="0.1.0", lifespan=lifespan,
                  description="Chat with two answers per turn; votes train the model.")
    install_error_handlers(app)
    app.add_middleware(ClientCookies)
    app.include_router(api_router(service))
    for router in privacy_routers(service, admin_password, service.guard):
        app.include_router(router)
    app.include_router(health_router(checks))
    app.include_router(metrics.router())
    if loop is not None:
        for router in loop_routers(loop, admin_password, service.guard):
            app.include_router(router)
    app.state.service = service
    # Gradio replaces the app's lifespan with its own; given here, ours runs inside it.
    return gr.mount_gradio_app(app, build_page(service, admin_password), path="/",
                               show_error=False, theme=page_theme(), css=ARENA_CSS,
                               app_kwargs={"lifespan": lifespan})


@dataclass
class Runtime:
    """What ``prefloop serve`` started, to stop it again in reverse order."""

    store: Store
    endpoint: Endpoint  # the first replica's
    vllm: VLLMServer | None  # the first local replica, if any
    loop: Loop
    servers: tuple[VLLMServer, ...] = ()  # every local replica

    def close(self) -> None:
        """Stop in reverse order; the loop first, and its running round ends (recorded in
        the store) before the store closes."""
        self.loop.stop()
        if self.loop.pool.champion_engine is not None:  # its engines are its own
            self.loop.pool.champion_engine.close()
        self.loop.pool.close()  # the replicas' watcher first: it would see them stop
        for server in self.servers or ([self.vllm] if self.vllm else []):
            server.stop()
        self.store.close()

    @property
    def replicas(self) -> Replicas:
        return self.loop.pool.replicas

    def vllm_restarts(self) -> int | None:
        """Restarts of the local replicas, summed (None without a local one)."""
        servers = self.servers or ((self.vllm,) if self.vllm else ())
        return sum(s.restarts for s in servers) if servers else None


def start_runtime(settings: Settings, progress: Callable[[str], None] = print,
                  schedule: bool = True) -> Runtime:
    """Open the store, start the local vLLM replicas and connect to the external ones, then
    the loop (its schedule only with ``schedule``; without, rounds run when asked). Call
    from the main thread.

    The base model is prepared locally in every case: the trainer needs its files.
    """
    settings = resolve_settings(settings)
    store = Store(settings.db_path)
    servers: list[VLLMServer] = []
    pool: AdapterPool | None = None
    try:
        model_path = prepare_model(settings.model, settings.models_dir, progress)
        replicas: list[Replica] = []
        for i in range(settings.local_replicas):
            server = _vllm_server(settings, model_path, i)
            servers.append(server)  # stopped below if anything fails
            progress(f"starting vLLM (log: {server.log_path})")
            replicas.append(Replica(f"local-{i + 1}", server.start(), server))
        for i, (url, key) in enumerate(settings.external_vllms):
            replicas.append(Replica(f"external-{i + 1}", Endpoint(url, key)))
        # An outside server loaded the model from its own path: compare paths only when
        # every replica is ours.
        pool = AdapterPool(replicas, None if settings.vllm_url else model_path,
                           settings.lora_max_rank, settings.adapter_prefix)
        pool.replicas.start()
        for replica in pool.replicas.replicas:
            if replica.server is not None:  # vLLM forgot its adapters: reconcile, then use
                replica.server.on_restart.append(
                    functools.partial(pool.replicas.restarted, replica))
        loop = Loop(settings, store, pool, model_path)
        loop.start() if schedule else loop.recover()
        if settings.champion_engine == "merged":  # after recover(): the champion is known
            pool.champion_engine = _champion_engine(settings, model_path, store, pool)
            progress(f"starting the champion's engine without LoRA (log: "
                     f"{settings.logs_dir}/vllm-champion-*.log); the LoRA replicas answer "
                     "the champion until it is up")
            pool.champion_engine.start()
    except BaseException:
        if pool is not None and pool.champion_engine is not None:
            pool.champion_engine.close()
        for server in servers:
            server.stop()
        store.close()
        raise
    return Runtime(store, replicas[0].endpoint, servers[0] if servers else None, loop,
                   tuple(servers))


def resolve_settings(settings: Settings) -> Settings:
    """``champion_engine = "auto"`` made ``merged`` or ``lora`` for this machine's vLLM
    build and cores (:meth:`~prefloop.config.Settings.resolve_champion_engine`)."""
    return settings.resolve_champion_engine(cpu_build=is_cpu_build(),
                                            cores=len(os.sched_getaffinity(0)))


def _engine_env(settings: Settings, index: int) -> dict[str, str]:
    """The cores (CPU) or GPU of local engine ``index``: the replicas, then the champion
    engine (``champion_engine = "merged"``), each its own share."""
    return replica_env(index, settings.local_engines, cpu_build=is_cpu_build(),
                       cpus=sorted(os.sched_getaffinity(0)),
                       visible_gpus=os.environ.get("CUDA_VISIBLE_DEVICES"))


def _champion_engine(settings: Settings, model_path: Path, store: Store,
                     pool: AdapterPool) -> ChampionEngine:
    """The plain engine for the champion's own turns; not started."""
    env = _engine_env(settings, settings.local_replicas)  # the share after the replicas'

    def launch(model: Path, served: str, slot: str) -> VLLMServer:
        return VLLMServer(model, settings.logs_dir,
                          memory_fraction=settings.champion_memory_fraction,
                          max_model_len=settings.max_model_len,
                          start_timeout=settings.vllm_start_timeout, dtype=settings.serve_dtype,
                          lora=False, name=f"vllm-champion-{slot}", env=env, served_name=served)

    def model_for(policy: str) -> Path:
        if policy == BASE:
            return model_path
        return ensure_merged(policy, Path(store.adapter(policy)["path"]), model_path,
                             settings.merged_dir, max_rank=settings.lora_max_rank)

    return ChampionEngine(launch, store.champion, model_for, pool.served_name,
                          merged_dir=settings.merged_dir)


def _vllm_server(settings: Settings, model_path: Path, index: int = 0) -> VLLMServer:
    """Local replica ``index`` (0: the vLLM a single-replica prefloop has always started)."""
    count = settings.local_replicas
    cpu_build = is_cpu_build()
    env = _engine_env(settings, index)
    # On a CPU the memory fraction is of the host's memory, which the replicas share.
    fraction = settings.vllm_memory_fraction / (count if cpu_build else 1)
    return VLLMServer(model_path, settings.logs_dir,
                      port=settings.vllm_port + index if settings.vllm_port else 0,
                      memory_fraction=fraction, max_model_len=settings.max_model_len,
                      lora_max_rank=settings.lora_max_rank, lora_slots=settings.lora_slots,
                      start_timeout=settings.vllm_start_timeout, dtype=settings.serve_dtype,
                      name="vllm" if index == 0 else f"vllm-{index + 1}", env=env)


def make_sampler(settings: Settings, runtime: Runtime,
                 sampling: Sampling | None = None) -> PairSampler:
    return PairSampler(
        runtime.replicas, max_model_len=settings.max_model_len,
        system_prompt=settings.system_prompt,
        sampling=sampling or Sampling(settings.temperature, settings.top_p,
                                      settings.max_tokens, settings.pair_candidates),
        model_name=runtime.loop.pool.served_name, champion=runtime.loop.pool.champion_engine)


def check_app_settings(settings: Settings) -> None:
    """Load what the page will need from files and modules (the terms, a moderation
    function), so that a bad setting fails with a :class:`~prefloop.config.ConfigError` at
    once, not after vLLM has started."""
    load_terms(settings.terms_file)
    Moderator(settings)


def serve(settings: Settings, progress: Callable[[str], None] = print) -> None:
    """Run the page and API until SIGINT/SIGTERM, then stop vLLM; no process is left."""
    check_app_settings(settings)
    # SIGTERM while vLLM starts must still stop it: turn it into KeyboardInterrupt until
    # uvicorn installs its own handlers.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    runtime = start_runtime(settings, progress)
    try:
        sampler = make_sampler(settings, runtime)
        restarts = runtime.vllm_restarts if runtime.servers else None
        app = create_app(settings, runtime.store, sampler, runtime.loop, admin_password(),
                         vllm_restarts=restarts)
        # Everything built so far (the imports, the page) lives as long as the process: keep
        # it out of the garbage collector's full passes, which otherwise walk it all and
        # held the event loop for up to 0.9 s under load (bench/load.py).
        gc.collect()
        gc.freeze()
        progress(f"prefloop is up: http://{settings.host}:{settings.port}")
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning",
                    access_log=False)  # no addresses in logs
    except KeyboardInterrupt:
        pass
    finally:
        progress("stopping")
        runtime.close()
