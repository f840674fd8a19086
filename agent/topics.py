"""The MQTT topic tree. Every topic string in edgefleet is built or parsed here.

::

    edgefleet/v1/devices/{device_id}/presence    device -> hub  QoS1 retained (last will)
    edgefleet/v1/devices/{device_id}/hello       device -> hub  QoS1 retained
    edgefleet/v1/devices/{device_id}/status      device -> hub  QoS1 retained
    edgefleet/v1/devices/{device_id}/telemetry   device -> hub  QoS1
    edgefleet/v1/devices/{device_id}/drift       device -> hub  QoS1 (agent.sketch.DriftSketch)
    edgefleet/v1/devices/{device_id}/feedback    device -> hub  QoS1 (labels that came back on the device)
    edgefleet/v1/devices/{device_id}/capture     device -> hub  QoS1 (opt-in sample frames, agent.capture)
    edgefleet/v1/devices/{device_id}/deploy      hub -> device  QoS1 retained (desired state)
    edgefleet/v1/devices/{device_id}/repo/get    device -> hub  QoS0 (agent retries)
    edgefleet/v1/devices/{device_id}/repo/data   hub -> device  QoS0 (binary chunk frames)

Device ids are 1-64 characters of ``[A-Za-z0-9_.-]``, so they can never contain an
MQTT wildcard or level separator.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "ROOT",
    "DeviceTopicKind",
    "DeviceTopic",
    "QOS",
    "RETAINED",
    "device_topic",
    "device_wildcard",
    "parse_device_topic",
    "valid_device_id",
]

ROOT: Final = "edgefleet/v1"
_DEVICE_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

DeviceTopicKind = Literal[
    "presence", "hello", "status", "telemetry", "drift", "feedback", "capture", "deploy",
    "repo/get", "repo/data",
]
_KINDS: Final[tuple[str, ...]] = (
    "presence", "hello", "status", "telemetry", "drift", "feedback", "capture", "deploy",
    "repo/get", "repo/data",
)

QOS: Final[dict[str, int]] = {
    "presence": 1,
    "hello": 1,
    "status": 1,
    "telemetry": 1,
    "drift": 1,
    "feedback": 1,
    "capture": 1,
    "deploy": 1,
    "repo/get": 0,
    "repo/data": 0,
}
RETAINED: Final[frozenset[str]] = frozenset({"presence", "hello", "status", "deploy"})


def valid_device_id(device_id: str) -> bool:
    return bool(_DEVICE_ID.fullmatch(device_id))


def device_topic(device_id: str, kind: DeviceTopicKind) -> str:
    """The topic for ``kind`` messages of one device.

    Raises:
        ValueError: ``device_id`` is not a valid device id, or ``kind`` is unknown.
    """
    if not valid_device_id(device_id):
        raise ValueError(f"invalid device id {device_id!r}")
    if kind not in _KINDS:
        raise ValueError(f"unknown topic kind {kind!r}")
    return f"{ROOT}/devices/{device_id}/{kind}"


def device_wildcard(kind: DeviceTopicKind) -> str:
    """Subscription filter for ``kind`` messages of every device."""
    if kind not in _KINDS:
        raise ValueError(f"unknown topic kind {kind!r}")
    return f"{ROOT}/devices/+/{kind}"


@dataclass(frozen=True)
class DeviceTopic:
    device_id: str
    kind: str


def parse_device_topic(topic: str) -> DeviceTopic | None:
    """Split a device topic into (device id, kind); None when it is not one of ours."""
    prefix = f"{ROOT}/devices/"
    if not topic.startswith(prefix):
        return None
    rest = topic[len(prefix):]
    device_id, sep, kind = rest.partition("/")
    if not sep or kind not in _KINDS or not valid_device_id(device_id):
        return None
    return DeviceTopic(device_id, kind)
