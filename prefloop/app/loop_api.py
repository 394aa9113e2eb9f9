"""The loop's JSON API: adapters, rounds, leaderboard, stats; admin actions behind a password.

Admin requests carry ``Authorization: Bearer <PREFLOOP_ADMIN_PASSWORD>``. Without a password
configured, admin is off and every admin request gets 403 saying so.
"""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, ConfigDict, StrictStr

from prefloop.app.chat import InputError
from prefloop.app.guard import Guard
from prefloop.loop.controller import Loop, LoopError, check_policy_name
from prefloop.loop.reports import round_summaries
from prefloop.names import is_hex_id
from prefloop.storage.store import Conflict, Store


class PromoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    policy: StrictStr


def password_matches(given: str | bytes, password: str) -> bool:
    """The one admin password check (API and page): constant time, so response times say
    nothing about the password. Text is compared as UTF-8; bytes (a header as the client sent
    it) as they are, so a non-ASCII password typed in a UTF-8 terminal matches."""
    sent = given if isinstance(given, bytes) else _utf8(given)
    return hmac.compare_digest(sent, _utf8(password))


def _utf8(text: str) -> bytes:
    # surrogatepass: text from a page or the environment may hold lone surrogates; such a
    # password is compared, never a reason for a 500.
    return text.encode("utf-8", "surrogatepass")


def admin_guard(password: str | None, guard: Guard | None = None):
    """A FastAPI dependency that lets a request through only with the admin password
    (and, with a ``guard``, slows wrong guesses to 10 a minute per address)."""

    def check(request: Request) -> None:
        if not password:
            raise HTTPException(403, "admin is disabled: set PREFLOOP_ADMIN_PASSWORD and "
                                     "restart prefloop to enable it")
        host = request.client.host if request.client else None
        if guard is not None and (wait := guard.admin_blocked(host)) is not None:
            raise HTTPException(429, f"too many wrong admin passwords from this address; "
                                     f"try again in {wait} s", headers={"Retry-After": str(wait)})
        try:
            _check_password(request, password)
        except HTTPException:
            if guard is not None:
                guard.admin_missed(host)
            raise

    return check


def _check_password(request: Request, password: str) -> None:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise HTTPException(401, "admin actions need 'Authorization: Bearer <password>'",
                            headers={"WWW-Authenticate": "Bearer"})
    # Starlette decodes header bytes as latin-1: encoding back gives the bytes as sent.
    if not password_matches(given.encode("latin-1", "replace"), password):
        raise HTTPException(401, "wrong admin password",
                            headers={"WWW-Authenticate": "Bearer"})


def loop_routers(loop: Loop, password: str | None,
                 guard: Guard | None = None) -> list[APIRouter]:
    router = APIRouter(prefix="/api/v1", tags=["loop"])
    admin = APIRouter(prefix="/api/v1/admin", tags=["admin"],
                      dependencies=[Depends(admin_guard(password, guard))])
    store = loop.store

    @router.get("/adapters")
    def adapters() -> dict[str, Any]:
        """Every adapter version with its state and KL from base (``kl_per_token``, the unit
        of ``max_kl``, and ``kl_per_answer``; null where not measured); the champion and the
        candidate."""
        return {"champion": store.champion(), "candidate": store.candidate(),
                "adapters": store.adapters()}

    @router.get("/rounds")
    def rounds(limit: int = Query(50, ge=1, le=1000)) -> dict[str, Any]:
        """The latest training rounds, newest first."""
        return {"rounds": round_summaries(store, limit)}

    @router.get("/leaderboard")
    def leaderboard() -> dict[str, Any]:
        """Bradley-Terry ratings (Elo scale, base = 1000) over all duel votes, with 95%
        bootstrap intervals, win-rate against base and vote counts."""
        return {"standings": loop.reports.leaderboard(),
                "over_time": loop.reports.ratings_over_time()}

    @router.get("/stats")
    def stats() -> dict[str, Any]:
        """Counts, votes by choice and per hour, and what the loop is doing."""
        return loop.reports.stats()

    @admin.post("/rounds")
    def start_round() -> dict[str, Any]:
        """Start a training round now; returns its id."""
        try:
            return {"round_id": loop.start_round("admin")}
        except LoopError as exc:
            raise Conflict(str(exc)) from None

    @admin.post("/promote")
    def promote(body: PromoteRequest) -> dict[str, Any]:
        """Make a policy champion now: a newer adapter, an earlier one, or `base` (rollback)."""
        try:
            policy = check_policy_name(body.policy)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        try:
            old = loop.promote(policy, "admin")
        except LoopError as exc:
            raise Conflict(str(exc)) from None
        return {"champion": policy, "previous": old}

    @admin.post("/pause")
    def pause() -> dict[str, Any]:
        """Stop scheduled rounds (a running round finishes)."""
        loop.pause()
        return {"paused": True}

    @admin.post("/resume")
    def resume() -> dict[str, Any]:
        loop.resume()
        return {"paused": False}

    client_flag_routes(admin, store)
    return [router, admin]


def check_client_id(client_id: str) -> str:
    """A client id as the ``prefloop_client`` cookie holds it (32 lowercase hex digits)."""
    if not is_hex_id(client_id):
        raise InputError("a client id is 32 lowercase hex digits (the prefloop_client "
                         "cookie; flagged ones are listed at GET "
                         "/api/v1/admin/clients/flagged)")
    return client_id


def client_flag_routes(admin: APIRouter, store: Store) -> None:
    """Admin routes for flagged voters (loop/voters.py): list them, clear one."""

    @admin.get("/clients/flagged")
    def flagged_clients() -> dict[str, Any]:
        """Clients whose votes are held back from training and the promotion gate, with the
        reasons and how many votes each has."""
        return {"clients": store.flagged_clients()}

    @admin.post("/clients/{client_id}/clear")
    def clear_client(client_id: str) -> dict[str, Any]:
        """Clear a flagged client: its votes count again, and only votes it casts from now
        on can flag it again. 404 if it is not flagged."""
        store.clear_client(check_client_id(client_id), by="admin (API)")
        return {"client_id": client_id, "cleared": True}
