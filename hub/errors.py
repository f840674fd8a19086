"""The hub's error tree. Each error carries the HTTP status the REST layer answers with.

Two branches, as in the agent: :class:`HubDataError` for requests that are wrong
(retrying will not help) and :class:`HubTransportError` for failures to reach
something the hub depends on (a retry may succeed). One FastAPI handler in
:mod:`hub.api` maps every :class:`HubError` to ``{"detail": message}`` with its status.
"""

from __future__ import annotations

__all__ = [
    "HubError",
    "HubDataError",
    "InvalidRequest",
    "InvalidBundle",
    "NotFound",
    "ModelNotFound",
    "DeviceNotFound",
    "DeploymentNotFound",
    "CampaignNotFound",
    "InvalidSelector",
    "InvalidCampaign",
    "CommandRefused",
    "Conflict",
    "BundleConflict",
    "DowngradeRefused",
    "HubTransportError",
    "BrokerUnavailable",
]


class HubError(Exception):
    """Root of every error the hub raises on purpose."""

    status_code: int = 500


class HubDataError(HubError):
    """The request or the data it carries is unacceptable."""

    status_code = 400


class InvalidRequest(HubDataError):
    """A request is malformed (bad model reference, bad range, missing field)."""


class InvalidSelector(InvalidRequest):
    """A device selector expression does not parse."""


class InvalidCampaign(InvalidRequest):
    """A campaign's waves, gates or options are invalid."""


class InvalidBundle(HubDataError):
    """An uploaded bundle is not a bundle, is truncated, corrupt, or over the size limit."""


class NotFound(HubDataError):
    status_code = 404


class ModelNotFound(NotFound):
    """No such model, model version, or bundle."""


class DeviceNotFound(NotFound):
    """No device with this id has ever connected."""


class DeploymentNotFound(NotFound):
    """No deployment with this id."""


class CampaignNotFound(NotFound):
    """No campaign with this id."""


class Conflict(HubDataError):
    status_code = 409


class CommandRefused(Conflict):
    """A campaign command does not apply in the campaign's current state."""


class BundleConflict(Conflict):
    """A different bundle with the same name, version, profile, format and precision exists."""


class DowngradeRefused(Conflict):
    """Deploying would install an older version on some device without allow_downgrade."""


class HubTransportError(HubError):
    """Something the hub relies on could not be reached."""

    status_code = 503


class BrokerUnavailable(HubTransportError):
    """The MQTT broker is not connected, or did not acknowledge a publish in time."""
