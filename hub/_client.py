"""A small typed HTTP client of the hub's REST API, used by the CLI."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import httpx

__all__ = ["DEFAULT_HUB", "HubClient", "HubClientError", "HubUnreachable", "HubRequestError"]

DEFAULT_HUB = "http://127.0.0.1:8080"


class HubClientError(Exception):
    """Root of the client's errors; the message is fit to show a user."""


class HubUnreachable(HubClientError):
    """No HTTP answer from the hub (connection refused, timeout, DNS)."""


class HubRequestError(HubClientError):
    """The hub answered with an error status."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"hub answered {status}: {detail}")
        self.status = status
        self.detail = detail


def default_hub_url() -> str:
    return os.environ.get("EDGEFLEET_HUB", DEFAULT_HUB)


class _ProgressReader:
    """A file wrapper that reports bytes read (httpx streams multipart files by read())."""

    def __init__(self, fh: IO[bytes], on_read: Callable[[int], None]) -> None:
        self._fh = fh
        self._on_read = on_read
        self.name = getattr(fh, "name", "bundle")

    def read(self, n: int = -1) -> bytes:
        data = self._fh.read(n)
        self._on_read(len(data))
        return data

    def seek(self, *args: Any) -> int:
        return self._fh.seek(*args)

    def tell(self) -> int:
        return self._fh.tell()


class HubClient:
    def __init__(self, base_url: str, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> HubClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kw: Any) -> Any:
        """Send one request and return its JSON.

        Raises:
            HubUnreachable: no answer from the hub.
            HubRequestError: an error status.
        """
        return self._send(method, path, **kw).json()

    def _send(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """Send one request and return the response (raises as :meth:`_request`)."""
        try:
            r = self._http.request(method, path, **kw)
        except httpx.TransportError as e:
            raise HubUnreachable(f"cannot reach the hub at {self.base_url}: {e}") from e
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            if isinstance(detail, list):  # FastAPI validation errors
                detail = "; ".join(
                    f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in detail
                )
            raise HubRequestError(r.status_code, str(detail))
        return r

    def upload(self, path: Path, on_progress: Callable[[int], None] | None = None) -> dict[str, Any]:
        with open(path, "rb") as fh:
            src: Any = _ProgressReader(fh, on_progress) if on_progress else fh
            return self._request(  # type: ignore[no-any-return]
                "POST", "/api/v1/models", files={"bundle": (path.name, src, "application/octet-stream")},
                timeout=None,
            )

    def models(self) -> list[dict[str, Any]]:
        return self._request("GET", "/api/v1/models")  # type: ignore[no-any-return]

    def devices(self, select: str | None = None) -> list[dict[str, Any]]:
        params = {"select": select} if select is not None else None
        return self._request("GET", "/api/v1/devices", params=params)  # type: ignore[no-any-return]

    def create_campaign(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._request("POST", "/api/v1/campaigns", json=body)  # type: ignore[no-any-return]

    def campaigns(self) -> list[dict[str, Any]]:
        return self._request("GET", "/api/v1/campaigns")  # type: ignore[no-any-return]

    def campaign(self, campaign_id: str) -> dict[str, Any]:
        return self._request("GET", f"/api/v1/campaigns/{campaign_id}")  # type: ignore[no-any-return]

    def campaign_command(self, campaign_id: str, command: str, actor: str,
                         reason: str | None = None) -> dict[str, Any]:
        return self._request(  # type: ignore[no-any-return]
            "POST", f"/api/v1/campaigns/{campaign_id}/{command}", json={"actor": actor, "reason": reason}
        )

    def audit(self, **filters: Any) -> list[dict[str, Any]]:
        params = {k: v for k, v in filters.items() if v is not None}
        return self._request("GET", "/api/v1/audit", params=params)  # type: ignore[no-any-return]

    def device(self, device_id: str) -> dict[str, Any]:
        return self._request("GET", f"/api/v1/devices/{device_id}")  # type: ignore[no-any-return]

    def deploy(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._request("POST", "/api/v1/deployments", json=body)  # type: ignore[no-any-return]

    def deployment(self, deployment_id: str) -> dict[str, Any]:
        return self._request("GET", f"/api/v1/deployments/{deployment_id}")  # type: ignore[no-any-return]
