"""The JSON API: ask for a pair, vote on it, check health. Documented at /docs (OpenAPI)."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from prefloop.app.chat import ChatService, Forbidden, InputError
from prefloop.app.guard import COOKIE, Client, Refused
from prefloop.app.moderation import Flagged
from prefloop.app.privacy import ConsentRequired
from prefloop.serving.context import ContextTooLong
from prefloop.serving.sampler import SEED_LIMIT, SamplingError
from prefloop.storage.store import Conflict, NotFound


class PairRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    message: StrictStr = Field(description="The user's new message.")
    conversation_id: StrictStr | None = Field(
        None, description="Continue this conversation; null starts a new one.")
    seed: int | None = Field(
        None, ge=0, lt=SEED_LIMIT,
        description="Seed of answer A (B uses seed + 1; with pair_candidates n, the n "
                    "answers use seed to seed + n - 1); random if null.")


class AnswerOut(BaseModel):
    text: str = Field(description="The answer; empty when moderation withheld it.")
    policy: str | None = Field(description="Who wrote it; null in a duel until the vote.")
    finish_reason: str | None
    withheld: str | None = Field(
        None, description="Why moderation withheld this answer (null: it is shown).")


class PairResponse(BaseModel):
    pair_id: str
    conversation_id: str
    kind: Literal["sample", "duel"] = Field(
        description="sample: both answers from the current model; duel: two models.")
    a: AnswerOut
    b: AnswerOut
    dropped_messages: int = Field(
        description="Oldest messages left out to fit the model's context window.")
    votable: bool = Field(
        True, description="False when moderation withheld an answer: the pair takes no vote "
                          "(and never trains); send the next message instead.")


class VoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pair_id: StrictStr
    conversation_id: StrictStr | None = Field(
        None, description="If given, the pair must belong to this conversation.")
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


class UndoResponse(BaseModel):
    pair_id: str
    choice: str = Field(description="The vote that was taken back.")
    undone: bool = True


class ErrorResponse(BaseModel):
    detail: str


ERRORS = {status: {"model": ErrorResponse} for status in (403, 404, 409, 422, 429, 503)}
log = logging.getLogger(__name__)


def request_client(service: ChatService, request: Request) -> Client:
    """The client behind a request: the id :class:`~prefloop.app.guard.ClientCookies` put in
    its cookies, and its address hashed."""
    client_id = request.cookies.get(COOKIE)
    if client_id is None:  # only without the middleware, e.g. a bare router in a test
        raise Forbidden(f"no {COOKIE} cookie")
    return service.guard.client(client_id, request.client.host if request.client else None)


def api_router(service: ChatService) -> APIRouter:
    router = APIRouter(prefix="/api/v1", tags=["arena"])

    @router.post("/pairs", response_model=PairResponse, responses=ERRORS)
    async def create_pair(body: PairRequest, request: Request) -> PairResponse:
        """Two answers to `message`, stored as a pair that awaits one vote.

        Keep the `prefloop_client` cookie of the reply: the vote and the next turn must
        carry it. 403 until the client accepted the terms (when the server asks for
        consent); 422 for a message moderation flagged; an answer it flagged comes back
        empty with `withheld` set, and the pair is not `votable`."""
        turn = await service.turn(body.message, body.conversation_id,
                                  request_client(service, request), seed=body.seed)
        hidden = turn.kind == "duel"
        a, b = (AnswerOut(text=side.text, policy=None if hidden else side.policy,
                          finish_reason=side.finish_reason, withheld=turn.withheld.get(name))
                for name, side in (("a", turn.progress.a), ("b", turn.progress.b)))
        return PairResponse(
            pair_id=turn.pair_id, conversation_id=turn.conversation_id, kind=turn.kind,
            a=a, b=b, dropped_messages=turn.progress.dropped_messages,
            votable=not turn.withheld)

    @router.post("/votes", response_model=VoteResponse, responses=ERRORS)
    def create_vote(body: VoteRequest, request: Request) -> VoteResponse:
        """Record the vote on a pair. A 200 reply means it is on disk."""
        row = service.vote(body.pair_id, body.choice, body.answer,
                           request_client(service, request), body.conversation_id)
        return VoteResponse(pair_id=row["pair_id"], choice=row["choice"], kind=row["kind"],
                            policy_a=row["policy_a"], policy_b=row["policy_b"],
                            decision=row["decision"])

    @router.delete("/votes/{pair_id}", response_model=UndoResponse, responses=ERRORS)
    def undo_vote(pair_id: str, request: Request) -> UndoResponse:
        """Take back your vote on a pair within `undo_seconds` of casting it: it is deleted
        and never trains; the pair can be voted again. 409 says why when it is too late."""
        row = service.undo_vote(pair_id, request_client(service, request))
        return UndoResponse(pair_id=row["pair_id"], choice=row["choice"])

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

    async def refused(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, Refused)
        return JSONResponse({"detail": str(exc)}, status_code=exc.status,
                            headers={"Retry-After": str(exc.retry_after)})

    async def database(request: Request, exc: Exception) -> JSONResponse:
        # Locked past the busy timeout, disk full, I/O error: nothing was written.
        log.error("database error on %s: %s", request.url.path, exc)
        return JSONResponse({"detail": f"the database could not be written ({exc}); nothing "
                                       "was saved, try again"},
                            status_code=503, headers={"Retry-After": "5"})

    async def invalid(request: Request, exc: Exception) -> JSONResponse:
        # FastAPI's default echoes the input back, which fails to encode (a 500) when it
        # holds a lone surrogate, and can be large: say what is wrong and where, not what.
        assert isinstance(exc, RequestValidationError)
        errors = [{"type": e.get("type"), "loc": list(e.get("loc", ())),
                   "msg": e.get("msg")} for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(Refused, refused)
    app.add_exception_handler(sqlite3.Error, database)
    app.add_exception_handler(Forbidden, handler(403))
    app.add_exception_handler(ConsentRequired, handler(403))
    app.add_exception_handler(NotFound, handler(404))
    app.add_exception_handler(Conflict, handler(409))
    app.add_exception_handler(InputError, handler(422))
    app.add_exception_handler(Flagged, handler(422))
    app.add_exception_handler(ContextTooLong, handler(422))
    app.add_exception_handler(SamplingError, handler(503, {"Retry-After": "5"}))
