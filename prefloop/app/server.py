"""The web process: FastAPI with the JSON API and the Gradio page, and ``prefloop serve``."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import gradio as gr
import httpx
import uvicorn
from fastapi import FastAPI

from prefloop.app.api import api_router, health_router, install_error_handlers
from prefloop.app.arena import ArenaHandlers, build_arena
from prefloop.app.chat import ChatService
from prefloop.config import Settings
from prefloop.serving.models import prepare_model
from prefloop.serving.sampler import PairSampler, Sampling
from prefloop.serving.vllm_server import Endpoint, VLLMServer
from prefloop.storage.store import Store

log = logging.getLogger(__name__)

INTRO = """# prefloop
Chat with the model. Every turn shows **two answers**: pick the better one (or call a tie,
say both are bad, or write a better answer). Your votes teach the model."""


def build_page(service: ChatService) -> gr.Blocks:
    with gr.Blocks(title="prefloop") as page:
        gr.Markdown(INTRO)
        with gr.Tabs():
            with gr.Tab("Arena", id="arena"):
                build_arena(ArenaHandlers(service))
    page.queue(default_concurrency_limit=None)
    return page


def create_app(settings: Settings, store: Store, sampler: PairSampler) -> FastAPI:
    """The whole web app over an open store and a sampler; starts nothing itself."""
    service = ChatService(settings, store, sampler)
    health = httpx.AsyncClient(timeout=2.0)

    async def checks() -> dict[str, bool]:
        try:
            store.check()
            db_ok = True
        except Exception:
            db_ok = False
        try:
            response = await health.get(sampler.endpoint.url.rstrip("/") + "/health")
            model_ok = response.status_code == 200
        except httpx.HTTPError:
            model_ok = False
        return {"database": db_ok, "model": model_ok}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await sampler.close()
        await health.aclose()

    app = FastAPI(title="prefloop", version="0.1.0", lifespan=lifespan,
                  description="Chat with two answers per turn; votes train the model.")
    install_error_handlers(app)
    app.include_router(api_router(service))
    app.include_router(health_router(checks))
    app.state.service = service
    return gr.mount_gradio_app(app, build_page(service), path="/", show_error=False)


@dataclass
class Runtime:
    """What ``prefloop serve`` started, to stop it again in reverse order."""

    store: Store
    endpoint: Endpoint
    vllm: VLLMServer | None

    def close(self) -> None:
        if self.vllm is not None:
            self.vllm.stop()
        self.store.close()


def start_runtime(settings: Settings, progress: Callable[[str], None] = print) -> Runtime:
    """Open the store and start (or connect to) vLLM. Call from the main thread."""
    store = Store(settings.db_path)
    if settings.vllm_url:
        return Runtime(store, Endpoint(settings.vllm_url, settings.vllm_api_key or "none"),
                       None)
    try:
        model_path = prepare_model(settings.model, settings.models_dir, progress)
        vllm = VLLMServer(model_path, settings.logs_dir, port=settings.vllm_port,
                          memory_fraction=settings.vllm_memory_fraction,
                          max_model_len=settings.max_model_len,
                          lora_max_rank=settings.lora_max_rank, lora_slots=settings.lora_slots,
                          start_timeout=settings.vllm_start_timeout)
        progress(f"starting vLLM (log: {vllm.log_path})")
        endpoint = vllm.start()
    except BaseException:
        store.close()
        raise
    return Runtime(store, endpoint, vllm)


def serve(settings: Settings, progress: Callable[[str], None] = print) -> None:
    """Run the page and API until SIGINT/SIGTERM, then stop vLLM; no process is left."""
    # SIGTERM while vLLM starts must still stop it: turn it into KeyboardInterrupt until
    # uvicorn installs its own handlers.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    runtime = start_runtime(settings, progress)
    try:
        sampler = PairSampler(
            runtime.endpoint, max_model_len=settings.max_model_len,
            system_prompt=settings.system_prompt,
            sampling=Sampling(settings.temperature, settings.top_p, settings.max_tokens))
        app = create_app(settings, runtime.store, sampler)
        progress(f"prefloop is up: http://{settings.host}:{settings.port}")
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
    except KeyboardInterrupt:
        pass
    finally:
        progress("stopping")
        runtime.close()
