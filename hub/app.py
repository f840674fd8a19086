"""Assembling the hub: database, repository, broker, MQTT ingest and the REST API.

:func:`create_app` returns a FastAPI app whose lifespan starts, in order: the database
migrations, the TUF repository, the embedded broker (only when no ``broker_url`` is
set), the MQTT ingest client, a periodic task that re-signs expiring metadata and
prunes old telemetry, and the campaign engine's loop (:mod:`hub.campaigns`).
Shutdown runs the same steps in reverse.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fastapi import FastAPI
from sqlalchemy.exc import SQLAlchemyError

from hub.broker import EmbeddedBroker
from hub.campaigns import CampaignEngine
from hub.captures import CaptureArchive
from hub.config import HubSettings
from hub.db import Database
from hub.mqtt_ingest import MqttIngest
from hub.repository import Repository, RepositoryConfig
from hub.telemetry import prune_telemetry

__all__ = ["Hub", "create_app", "start_hub", "stop_hub"]

log = logging.getLogger(__name__)


@dataclass
class Hub:
    """The running hub's parts, shared by routes (``app.state.hub``)."""

    settings: HubSettings
    db: Database
    repository: Repository
    mqtt: MqttIngest
    broker_url: str
    campaigns: CampaignEngine
    captures: CaptureArchive
    broker: EmbeddedBroker | None = None
    started: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def uploads_dir(self) -> Path:
        return self.settings.data_dir / "uploads"

    @property
    def root_json_path(self) -> Path:
        return self.repository.metadata_dir / "root.json"

    def maintain(self) -> None:
        """Re-sign metadata close to expiry and drop telemetry past retention."""
        if self.repository.refresh_timestamp():
            log.info("re-signed repository metadata before expiry")
        try:
            with self.db.session() as s:
                n = prune_telemetry(
                    s, datetime.now(UTC), timedelta(seconds=self.settings.telemetry_retention_s)
                )
            if n:
                log.info("pruned %d telemetry rows past retention", n)
        except SQLAlchemyError:
            log.exception("telemetry pruning failed; will retry")


def start_hub(settings: HubSettings) -> Hub:
    """Start every part of the hub (blocking); :func:`stop_hub` undoes it.

    Raises:
        hub.broker.BrokerStartError: the embedded broker could not start.
        sqlalchemy.exc.SQLAlchemyError: the database is unreachable or migration failed.
        ValueError: bad broker URL or passphrase.
        OSError: the data folder is not writable.
    """
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.database_url)
    db.migrate()
    repo = Repository(
        settings.data_dir / "repository",
        settings.resolve_passphrase(),
        RepositoryConfig(timestamp_expiry=timedelta(seconds=settings.timestamp_expiry_s)),
    )
    repo.init()
    broker: EmbeddedBroker | None = None
    broker_url = settings.broker_url
    if broker_url is None:
        broker = EmbeddedBroker(settings.embedded_broker_host, settings.embedded_broker_port)
        broker.start()
        broker_url = broker.url
    captures = CaptureArchive(settings.data_dir / "captures", settings.capture_max_bytes)
    ingest = MqttIngest(
        broker_url,
        db,
        repo,
        captures=captures,
        batch_size=settings.ingest_batch_size,
        queue_size=settings.ingest_queue_size,
    )
    ingest.start()
    engine = CampaignEngine(db, repo, ingest, health_window_s=settings.deployment_health_window_s,
                            report_timeout_s=settings.report_timeout_s)
    return Hub(settings, db, repo, ingest, broker_url, engine, captures, broker)


def stop_hub(hub: Hub) -> None:
    hub.mqtt.stop()
    if hub.broker is not None:
        hub.broker.stop()
    hub.db.dispose()


async def _maintenance(hub: Hub) -> None:
    while True:
        await asyncio.sleep(hub.settings.timestamp_refresh_s)
        await asyncio.to_thread(hub.maintain)


async def _campaign_loop(hub: Hub) -> None:
    """Advance campaigns forever; a failing tick is logged and retried (it is idempotent)."""
    while True:
        try:
            await asyncio.to_thread(hub.campaigns.tick)
        except Exception:  # any error: a loop that ends would stop every campaign until a restart
            log.exception("campaign engine tick failed; retrying")
        await asyncio.sleep(hub.settings.campaign_tick_s)


def create_app(
    settings: HubSettings, *, on_ready: Callable[[Hub], None] | None = None, started: Hub | None = None
) -> FastAPI:
    """The hub as an ASGI app; its lifespan owns every background part (``started``: a
    hub already started with :func:`start_hub`, which the lifespan then stops)."""
    from hub.api import install

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        hub = started if started is not None else await asyncio.to_thread(start_hub, settings)
        app.state.hub = hub
        tasks = [asyncio.create_task(_maintenance(hub)), asyncio.create_task(_campaign_loop(hub))]
        if on_ready is not None:
            on_ready(hub)
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await asyncio.to_thread(stop_hub, hub)

    app = FastAPI(
        title="edgefleet hub",
        version="0.1.0",
        description="Edge ML fleet manager: model registry, devices, deployments, telemetry.",
        lifespan=lifespan,
    )
    install(app)
    return app
