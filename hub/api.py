"""The REST API under ``/api/v1``: thin routes that translate HTTP to service calls.

Every deliberate error is a :class:`hub.errors.HubError` that carries its HTTP status;
one handler turns it into ``{"detail": "..."}``. Routes hold no logic of their own.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, SQLModel
from starlette.concurrency import run_in_threadpool

from hub import audit, campaigns, deployments, fleet, registry, telemetry
from hub._upload import receive_bundle
from hub.api_monitoring import router as monitoring_router
from hub.app import Hub
from hub.campaigns import CampaignCreate, CampaignPublic, CampaignSummary, CommandRequest
from hub.errors import HubError, NotFound
from hub.models import (
    AuditEntryPublic,
    BundlePublic,
    DeploymentCreate,
    DeploymentPublic,
    DevicePublic,
    ModelPublic,
    ModelVersionPublic,
    PayloadErrorsPublic,
    TelemetryPublic,
)
from hub.repository import RepositoryPathError

__all__ = ["install", "UploadResult", "Health"]


def get_hub(request: Request) -> Hub:
    hub: Hub = request.app.state.hub
    return hub


HubDep = Annotated[Hub, Depends(get_hub)]


def get_session(hub: HubDep) -> Iterator[Session]:
    with hub.db.session() as s:
        yield s


SessionDep = Annotated[Session, Depends(get_session)]


class UploadResult(SQLModel):
    created: bool
    bundle: BundlePublic


class Health(SQLModel):
    status: str
    database: bool
    broker_connected: bool
    broker_url: str


router = APIRouter(prefix="/api/v1")

_UPLOAD_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["bundle"],
                    "properties": {"bundle": {"type": "string", "format": "binary"}},
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@router.post(
    "/models",
    response_model=UploadResult,
    status_code=201,
    tags=["models"],
    summary="Upload a bundle (201 when new, 200 when these bytes were already registered)",
    openapi_extra=_UPLOAD_DOC,
)
async def upload_model(request: Request, hub: HubDep) -> Response:
    path, filename = await receive_bundle(request, hub.uploads_dir, hub.settings.max_bundle_bytes)
    try:
        def _register() -> UploadResult:
            with hub.db.session() as s:
                b, created = registry.add_bundle(
                    s, hub.repository, path, filename=filename,
                    max_bytes=hub.settings.max_bundle_bytes,
                )
                return UploadResult(created=created, bundle=b)

        result = await run_in_threadpool(_register)
    finally:
        path.unlink(missing_ok=True)
    return JSONResponse(result.model_dump(mode="json"), status_code=201 if result.created else 200)


@router.get("/models", response_model=list[ModelPublic], tags=["models"])
def list_models(session: SessionDep) -> list[ModelPublic]:
    return registry.list_models(session)


@router.get("/models/{name}", response_model=ModelPublic, tags=["models"])
def show_model(name: str, session: SessionDep) -> ModelPublic:
    return registry.get_model(session, name)


@router.get("/models/{name}/{version}", response_model=ModelVersionPublic, tags=["models"])
def show_model_version(name: str, version: str, session: SessionDep) -> ModelVersionPublic:
    return registry.get_model_version(session, name, version)


@router.get("/devices", response_model=list[DevicePublic], tags=["devices"])
def list_devices(
    session: SessionDep,
    select: Annotated[str | None, Query(max_length=2000, description="Selector: profile=P,tag=T,id=D or all.")] = None,
) -> list[DevicePublic]:
    return fleet.list_devices(session, select)


@router.get("/devices/{device_id}", response_model=DevicePublic, tags=["devices"])
def show_device(device_id: str, session: SessionDep) -> DevicePublic:
    return fleet.get_device(session, device_id)


@router.post("/deployments", response_model=DeploymentPublic, status_code=201, tags=["deployments"])
def create_deployment(body: DeploymentCreate, hub: HubDep, session: SessionDep) -> DeploymentPublic:
    return deployments.create_deployment(
        session, hub.repository, hub.mqtt, body,
        health_window_s=hub.settings.deployment_health_window_s,
    )


@router.get("/deployments", response_model=list[DeploymentPublic], tags=["deployments"])
def list_deployments(
    session: SessionDep, limit: Annotated[int, Query(ge=1, le=1000)] = 50
) -> list[DeploymentPublic]:
    return deployments.list_deployments(session, limit)


@router.get("/deployments/{deployment_id}", response_model=DeploymentPublic, tags=["deployments"])
def show_deployment(deployment_id: str, session: SessionDep) -> DeploymentPublic:
    return deployments.get_deployment(session, deployment_id)


@router.post("/campaigns", response_model=CampaignPublic, status_code=201, tags=["campaigns"])
def create_campaign(body: CampaignCreate, hub: HubDep, session: SessionDep) -> CampaignPublic:
    with hub.campaigns.lock:
        cid = campaigns.create_campaign(session, body)
    return campaigns.get_campaign(session, cid)


@router.get("/campaigns", response_model=list[CampaignSummary], tags=["campaigns"])
def list_campaigns(
    session: SessionDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> list[CampaignSummary]:
    return campaigns.list_campaigns(session, limit)


@router.get("/campaigns/{campaign_id}", response_model=CampaignPublic, tags=["campaigns"])
def show_campaign(campaign_id: str, session: SessionDep) -> CampaignPublic:
    return campaigns.get_campaign(session, campaign_id)


@router.post("/campaigns/{campaign_id}/{command}", response_model=CampaignPublic, tags=["campaigns"],
             summary="pause, resume, approve, abort or rollback (idempotent)")
def campaign_command(
    campaign_id: str, command: str, hub: HubDep, session: SessionDep, body: CommandRequest | None = None,
) -> CampaignPublic:
    with hub.campaigns.lock:
        campaigns.run_command(session, campaign_id, command, body or CommandRequest())
    return campaigns.get_campaign(session, campaign_id)


@router.get("/audit", response_model=list[AuditEntryPublic], tags=["audit"])
def list_audit(
    session: SessionDep,
    campaign_id: str | None = None,
    action: str | None = None,
    actor: str | None = None,
    since: datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> list[AuditEntryPublic]:
    return audit.query(session, campaign_id=campaign_id, action=action, actor=actor, since=since, limit=limit)


@router.get("/telemetry", response_model=list[TelemetryPublic], tags=["telemetry"])
def list_telemetry(
    session: SessionDep,
    device_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> list[TelemetryPublic]:
    return telemetry.query_telemetry(session, device_id, limit)


@router.get("/stats/payload-errors", response_model=PayloadErrorsPublic, tags=["stats"])
def payload_errors(session: SessionDep) -> PayloadErrorsPublic:
    return telemetry.payload_errors(session)


@router.get("/repository/root.json", tags=["repository"], summary="Trusted root to provision devices with")
def root_json(hub: HubDep) -> Response:
    return Response(hub.repository.root_json(), media_type="application/json")


@router.get(
    "/repository/{path:path}",
    tags=["repository"],
    summary="Repository file (metadata/... or targets/<sha256>.efb); Range supported",
)
def repository_file(path: str, hub: HubDep) -> FileResponse:
    try:
        f = hub.repository.resolve(path)
    except (RepositoryPathError, FileNotFoundError) as e:
        raise NotFound(f"no repository file {path!r}") from e
    media = "application/json" if path.endswith(".json") else "application/octet-stream"
    return FileResponse(f, media_type=media)


def _health(hub: Hub) -> Health:
    try:
        with hub.db.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        db_ok = True
    except SQLAlchemyError:
        db_ok = False
    ok = db_ok and hub.mqtt.connected
    return Health(
        status="ok" if ok else "degraded",
        database=db_ok,
        broker_connected=hub.mqtt.connected,
        broker_url=hub.broker_url,
    )


def install(app: FastAPI) -> None:
    """Add the routes and the one error handler to ``app``."""

    @app.exception_handler(HubError)
    async def _hub_error(_request: Request, exc: HubError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status_code)

    @app.get("/healthz", response_model=Health, tags=["health"])
    def healthz(hub: HubDep) -> JSONResponse:
        h = _health(hub)
        return JSONResponse(h.model_dump(), status_code=200 if h.status == "ok" else 503)

    app.include_router(router)
    app.include_router(monitoring_router)
