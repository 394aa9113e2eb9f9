"""The privacy part of the JSON API: the terms and their acceptance, a visitor's own data
(download, delete), and the same by client id for an admin."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from prefloop.app.api import ERRORS, request_client
from prefloop.app.chat import ChatService
from prefloop.app.guard import Guard
from prefloop.app.loop_api import admin_guard, check_client_id
from prefloop.app.privacy import DOWNLOAD_NAME, client_data, holds_anything
from prefloop.storage.store import NotFound


class ConsentStatus(BaseModel):
    required: bool = Field(description="Whether this server asks visitors to accept terms.")
    version: str | None = Field(description="The terms' version (a hash of the file).")
    terms: str | None = Field(description="The terms, in Markdown.")
    accepted: bool = Field(description="Whether this client accepted this version.")


class ConsentRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: StrictStr = Field(max_length=64,
                               description="The version of the terms you read and accept.")


class ConsentResponse(BaseModel):
    accepted: bool = True
    version: str
    accepted_at: str


class DeletedResponse(BaseModel):
    client_id: str
    deleted: dict[str, Any] = Field(
        description="Rows deleted (votes, messages, pairs, conversations, consent, "
                    "voter_flag) and checkpoint: whether the WAL was emptied at once.")


def download(data: dict[str, Any]) -> JSONResponse:
    return JSONResponse(data, headers={
        "Content-Disposition": f'attachment; filename="{DOWNLOAD_NAME}"',
        "Cache-Control": "no-store"})


def privacy_routers(service: ChatService, password: str | None,
                    guard: Guard | None = None) -> list[APIRouter]:
    """The visitor's routes, and the admin's behind the admin password."""
    router = APIRouter(prefix="/api/v1", tags=["privacy"])
    admin = APIRouter(prefix="/api/v1/admin", tags=["admin"],
                      dependencies=[Depends(admin_guard(password, guard))])
    consent, store = service.consent, service.store

    @router.get("/consent", response_model=ConsentStatus)
    def consent_status(request: Request) -> ConsentStatus:
        """The terms to accept before anything of yours is stored (`required` false: none)
        and whether you (your `prefloop_client` cookie) accepted their current version."""
        return ConsentStatus(**consent.status(request_client(service, request)))

    @router.post("/consent", response_model=ConsentResponse, responses=ERRORS)
    def accept(body: ConsentRequest, request: Request) -> ConsentResponse:
        """Accept the terms of `version` (from GET /api/v1/consent). 409 when that is not
        the version in force, 404 when this server asks for no consent."""
        return ConsentResponse(**consent.accept(request_client(service, request),
                                                body.version))

    @router.get("/me/data")
    def my_data(request: Request) -> JSONResponse:
        """Everything stored for your `prefloop_client` cookie, as a JSON download: consent,
        conversations with their messages, pairs, votes, voter flag."""
        return download(client_data(store, request_client(service, request).id))

    @router.delete("/me/data", response_model=DeletedResponse, responses=ERRORS)
    def delete_my_data(request: Request) -> DeletedResponse:
        """Delete everything stored for your cookie, for good (the database file and its WAL
        are cleared of it); later exports and training rounds do not have it. Models already
        trained on your votes are not retrained; exports already made are not recalled.
        Counts as a vote against the client's `votes_per_minute`."""
        client = request_client(service, request)
        service.guard.admit_vote(client)  # each deletion ends with a checkpoint: not free
        return DeletedResponse(client_id=client.id, deleted=store.delete_client_data(client.id))

    def stored(client_id: str) -> dict[str, Any]:
        data = client_data(store, check_client_id(client_id))
        if not holds_anything(data):
            raise NotFound(f"nothing is stored for client {client_id}")
        return data

    @admin.get("/clients/{client_id}/data")
    def client_data_for_admin(client_id: str) -> JSONResponse:
        """Everything stored for a client id, as the visitor would download it. 404 if
        nothing is."""
        return download(stored(client_id))

    @admin.delete("/clients/{client_id}/data", response_model=DeletedResponse,
                  responses=ERRORS)
    def delete_client_data(client_id: str) -> DeletedResponse:
        """Delete everything stored for a client id, as the visitor can. 404 if nothing is."""
        stored(client_id)
        return DeletedResponse(client_id=client_id,
                               deleted=store.delete_client_data(client_id))

    return [router, admin]
