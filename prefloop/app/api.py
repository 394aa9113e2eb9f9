"""The JSON API: ask for a pair, vote on it, check health. Documented at /docs (OpenAPI)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from prefloop.app.chat import ChatService, InputError
from prefloop.serving.context import ContextTooLong
from prefloop.serving.sampler import SamplingError
from prefloop.storage.store import Conflict, NotFound


class PairRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    message: StrictStr = Field(description="The user's new message.")
    conversation_id: StrictStr | None = Field(
        None, description="Continue this conversation; null starts a new one.")
    seed: int | None = Field(None, ge=0, lt=2**31 - 2,
                             description="Seed of answer A (B uses seed + 1); random if null.")


class AnswerOut(BaseModel):
    text: str
    policy: str | None = Field(description="Who wrote it; null in a duel until the vote.")
    finish_reason: str | None


class PairResponse(BaseModel):
    pair_id: str
    conversation_id: str
    kind: Literal["sample", "duel"] = Field(
        description="sample: both answers from the current model; duel: two models.")
    a: AnswerOut
    b: AnswerOut
    dropped_messages: int = Field(
        description="Oldest messages left out to fit the model's context window.")


class VoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pair_id: StrictStr
    choice: Literal["a", "b", "tie", "both_bad", "written"] | None = Field(
        None, description="Which answer is better; 'written' (or null) with `answer`.")
    answer: StrictStr | None = Field(None, description="A better answer written by the voter.")


class VoteResponse(BaseModel):
    pair_id: str
    choice: str
    stored: bool = True
    kind: str
    policy_a: str = Field(description="Who wrote answer A (revealed after the vote).")
    policy_b: str
    decision: str | None = Field(
        None, description="'promote' or 'reject' when this vote decided a candidate.")


class ErrorResponse(BaseModel):
    detail: str


ERRORS = {404: {"model": ErrorResponse}, 409: {"model": ErrorResponse},
          422: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}


def api_router(service: ChatService) -> APIRouter:
    router = APIRouter(prefix="/api/v1", tags=["arena"])

    @router.post("/pairs", response_model=PairResponse, responses=ERRORS)
    async def create_pair(body: PairRequest) -> PairResponse:
        """Two answers to `message`, stored as a pair that awaits one vote."""
        turn = await service.turn(body.message, body.conversation_id, seed=body.seed)
        progress = turn.progress
        hidden = turn.kind == "duel"
        return PairResponse(
            pair_id=turn.pair_id, conversation_id=turn.conversation_id, kind=turn.kind,
            a=AnswerOut(text=progress.a.text, policy=None if hidden else progress.a.policy,
                        finish_reason=progress.a.finish_reason),
            b=AnswerOut(text=progress.b.text, policy=None if hidden else progress.b.policy,
                        finish_reason=progress.b.finish_reason),
            dropped_messages=progress.dropped_messages)

    @router.post("/votes", response_model=VoteResponse, responses=ERRORS)
    def create_vote(body: VoteRequest) -> VoteResponse:
        """Record the vote on a pair. A 200 reply means it is on disk."""
        row = service.vote(body.pair_id, body.choice, body.answer)
        return VoteResponse(pair_id=row["pair_id"], choice=row["choice"], kind=row["kind"],
                            policy_a=row["policy_a"], policy_b=row["policy_b"],
                            decision=row["decision"])

    return router


def health_router(checks: Callable[[], Awaitable[dict[str, bool]]]) -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/healthz")
    async def healthz() -> JSONResponse:
        """200 when the database and the model server answer, 503 otherwise."""
        status = await checks()
        return JSONResponse(status, status_code=200 if all(status.values()) else 503)

    return router


def install_error_handlers(app: FastAPI) -> None:
    """Map library errors to HTTP statuses with a plain message, never a stack trace."""

    def handler(status: int, headers: dict[str, str] | None = None):
        async def handle(request: Request, exc: Exception) -> JSONResponse:
            return JSONResponse({"detail": str(exc)}, status_code=status, headers=headers)
        return handle

    app.add_exception_handler(NotFound, handler(404))
    app.add_exception_handler(Conflict, handler(409))
    app.add_exception_handler(InputError, handler(422))
    app.add_exception_handler(ContextTooLong, handler(422))
    app.add_exception_handler(SamplingError, handler(503, {"Retry-After": "5"}))
