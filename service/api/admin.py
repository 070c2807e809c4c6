"""Operator routes: ``POST /admin/reload`` switches to a new checkpoint without a restart.

The route needs the server to run with ``--api-key`` (the gate middleware checks the key); without
one it answers 403, so an open server never lets anyone swap its weights. The work is done by
``service.reload.Reloader`` (the same path ``--watch`` takes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict

from service.api.errors import APIError, not_ready
from service.api.protocol import ErrorResponse
from service.api.state import ServerState, server_state
from service.reload import ReloadError

router = APIRouter()
StateDep = Annotated[ServerState, Depends(server_state)]


class ReloadRequest(BaseModel):
    """Optional body: another checkpoint to serve (default: re-read the current one's folder)."""

    model_config = ConfigDict(extra="forbid")
    checkpoint: str | None = None


class ReloadResponse(BaseModel):
    status: str  # "reloaded", or "unchanged" when the folder holds the live checkpoint already
    model: dict


@router.post(
    "/admin/reload",
    response_model=ReloadResponse,
    responses={s: {"model": ErrorResponse} for s in (400, 401, 403, 409, 503)},
    summary="Load a checkpoint beside the live model and switch to it (needs --api-key)",
)
async def reload_checkpoint(
    request: Request, state: StateDep, body: ReloadRequest | None = None
) -> ReloadResponse:
    if state.settings.api_key is None:
        raise APIError(
            403,
            "POST /admin/reload is disabled: start the server with --api-key",
            code="admin_disabled",
        )
    if state.settings.api_servers > 1:
        raise APIError(
            409,
            "POST /admin/reload needs --api-servers 1: live reload switches one front end's "
            "engine, and this server runs several",
            code="reload_unsupported",
        )
    if state.draining or not state.has_engine:
        raise not_ready()
    target = Path(body.checkpoint) if body is not None and body.checkpoint else None
    try:
        outcome = await request.app.state.reloader.reload(target)
    except ReloadError as err:
        raise APIError(
            err.status,
            f"checkpoint refused, the old model keeps serving: {err}",
            param="checkpoint",
            code=err.code,
        ) from None
    return ReloadResponse(status=outcome.status, model=outcome.model.to_dict())
