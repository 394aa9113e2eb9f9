"""The privacy part of the JSON API: the terms and their acceptance."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from prefloop.app.api import ERRORS, request_client
from prefloop.app.chat import ChatService


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


def privacy_router(service: ChatService) -> APIRouter:
    router = APIRouter(prefix="/api/v1", tags=["privacy"])
    consent = service.consent

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

    return router
