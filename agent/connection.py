"""The agent's MQTT link: presence by last will, reconnect with backoff and jitter.

The link never gives up: after a disconnect it retries forever, waiting
``min(max_delay, base * 2**n)`` seconds scaled by a random factor in [0.5, 1.0] (full
jitter keeps a fleet from reconnecting in lockstep after a broker restart).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from urllib.parse import urlparse

import paho.mqtt.client as mqtt

from agent import topics
from agent.errors import TransportError
from agent.protocol import Presence, encode

__all__ = ["BrokerAddress", "parse_broker_url", "Link"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None


def shown_url(url: str) -> str:
    """``url`` fit for a message: everything between the scheme and the last ``@``
    (user and password, whatever characters the password holds) replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    elif not sep and "@" in url:
        scheme, rest = "", "***@" + url.rsplit("@", 1)[1]
    return (f"{scheme}{sep}{rest}")[:200]


def parse_broker_url(url: str) -> BrokerAddress:
    """``mqtt://[user:pass@]host[:port]`` or ``mqtts://...``.

    Raises:
        ValueError: not an mqtt/mqtts URL with a host.
    """
    shown = shown_url(url)
    u = urlparse(url)
    if u.scheme not in ("mqtt", "mqtts", "tcp") or not u.hostname:
        raise ValueError(f"broker URL must look like mqtt://host:port or mqtts://host:port, got {shown!r}")
    try:
        port = u.port
    except ValueError:  # not urlparse's text: with a '/' in a password it quotes part of it
        hint = " (a password with '/', '?' or '#' in it must be percent-encoded)" if "@" in url else ""
        raise ValueError(f"broker URL {shown!r}: the port must be a number from 0 to 65535{hint}") from None
    tls = u.scheme == "mqtts"
    return BrokerAddress(u.hostname, port or (8883 if tls else 1883), tls, u.username, u.password)


Handler = Callable[[str, bytes], None]


LOOP_TIMEOUT_S = 1.0
"""Longest sleep of the network loop in ``select()`` (must stay well under keepalive)."""

UNACKED_WAITS = 3
"""Calls that wait for one unacknowledged message before ``publish_wait`` sends a copy."""


class Link:
    """One paho client for one device, with handlers per topic kind."""

    def __init__(
        self,
        device_id: str,
        broker: BrokerAddress,
        *,
        on_connect: Callable[[], None] | None = None,
        keepalive: int = 30,
        base_delay: float = 0.5,
        max_delay: float = 30.0,
    ):
        self.device_id = device_id
        self.broker = broker
        self._on_connect_cb = on_connect
        self._handlers: dict[str, Handler] = {}
        self.keepalive = keepalive
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reconnects = 0
        # Messages published with a key and not acknowledged yet: paho sends them again
        # itself after a reconnect, so a caller that retries waits for the same message
        # instead of publishing a copy (the broker would get both).
        self._unacked: dict[Hashable, tuple[mqtt.MQTTMessageInfo, int]] = {}
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"edgefleet-agent-{device_id}",
            clean_session=True,
            protocol=mqtt.MQTTv311,
        )
        if broker.username:
            c.username_pw_set(broker.username, broker.password)
        if broker.tls:
            c.tls_set()
        c.will_set(
            topics.device_topic(device_id, "presence"),
            encode(Presence(online=False)),
            qos=1,
            retain=True,
        )
        c.max_inflight_messages_set(64)
        c.max_queued_messages_set(0)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        self.client = c

    def on(self, kind: topics.DeviceTopicKind, handler: Handler) -> None:
        self._handlers[topics.device_topic(self.device_id, kind)] = handler

    # -------------------------------------------------------------- paho callbacks

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("broker refused connection: %s", reason_code)
            return
        for topic in self._handlers:
            kind = topic.rsplit("/", 1)[-1] if not topic.endswith("repo/data") else "repo/data"
            client.subscribe(topic, qos=topics.QOS.get(kind, 1))
        client.publish(
            topics.device_topic(self.device_id, "presence"),
            encode(Presence(online=True)),
            qos=1,
            retain=True,
        )
        self.connected.set()
        log.info("connected to %s:%s", self.broker.host, self.broker.port)
        if self._on_connect_cb is not None:
            self._on_connect_cb()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if not self._stop.is_set():
            log.warning("disconnected from broker: %s", reason_code)

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        handler = self._handlers.get(msg.topic)
        if handler is None:
            return
        try:
            handler(msg.topic, bytes(msg.payload))
        except Exception:  # noqa: BLE001 - a handler bug must not kill the network thread
            log.exception("handler for %s failed", msg.topic)

    # -------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mqtt-link", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                self.client.connect(self.broker.host, self.broker.port, keepalive=self.keepalive)
            except OSError as e:
                failures += 1
                delay = min(self.max_delay, self.base_delay * 2 ** min(failures, 16))
                delay *= random.uniform(0.5, 1.0)
                log.warning("broker %s:%s unreachable (%s); retrying in %.1fs",
                            self.broker.host, self.broker.port, e, delay)
                self._stop.wait(delay)
                continue
            failures = 0
            # Drive the network loop ourselves so that reconnects go through the
            # jittered backoff below rather than paho's fixed doubling. The timeout only
            # paces keepalive checks: paho wakes select() itself when another thread
            # publishes or disconnects, so a long one costs no latency, and an idle
            # device wakes once a second instead of five times.
            while not self._stop.is_set():
                rc = self.client.loop(timeout=LOOP_TIMEOUT_S)
                if rc != mqtt.MQTT_ERR_SUCCESS:
                    # paho skips on_disconnect for some losses (e.g. a socket select()
                    # cannot watch); say so, or reconnect loops stay silent
                    if self.connected.is_set():
                        log.warning("connection to %s:%s lost (%s); reconnecting",
                                    self.broker.host, self.broker.port, mqtt.error_string(rc))
                    self.connected.clear()
                    break
            if self._stop.is_set():
                break
            self.reconnects += 1
            failures += 1
            delay = min(self.max_delay, self.base_delay * 2 ** min(failures, 16))
            self._stop.wait(delay * random.uniform(0.5, 1.0))

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> mqtt.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=qos, retain=retain)

    def publish_wait(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                     timeout: float = 10.0, *, key: Hashable | None = None) -> None:
        """Publish and wait until the broker acknowledged (QoS1).

        ``key`` names the message across calls (e.g. a spool record's id): when an
        earlier call with the same key ended unacknowledged, this call waits for that
        message, which paho sends again after a reconnect, rather than publishing a copy.
        After ``UNACKED_WAITS`` such waits it publishes anew.

        Raises:
            TransportError: not connected, or no acknowledgement within ``timeout``.
        """
        if not self.connected.is_set():
            raise TransportError("not connected")
        info, waits = self._unacked.pop(key, (None, 0)) if key is not None else (None, 0)
        if info is None or waits >= UNACKED_WAITS:
            info, waits = self.client.publish(topic, payload, qos=qos, retain=retain), 0
            if info.rc == mqtt.MQTT_ERR_NO_CONN and qos > 0:
                # The connection dropped since the check: paho keeps the message and
                # sends it once connected again.
                self._remember(key, info, waits)
                raise TransportError("not connected")
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise TransportError(f"publish failed: {mqtt.error_string(info.rc)}")
        deadline = time.monotonic() + timeout
        while not info.is_published():
            left = deadline - time.monotonic()
            if left <= 0 or not self.connected.is_set():
                self._remember(key, info, waits)
                raise TransportError("publish not acknowledged")
            try:
                # woken by the network thread on PUBACK; the slice bounds how long a
                # lost connection goes unnoticed (polling every few ms cost CPU per message)
                info.wait_for_publish(min(0.5, left))
            except (RuntimeError, ValueError) as e:
                raise TransportError(f"publish failed: {e}") from e

    def _remember(self, key: Hashable | None, info: mqtt.MQTTMessageInfo, waits: int) -> None:
        if key is None:
            return
        while len(self._unacked) >= 16:  # keys whose caller gave up on them (a record evicted)
            self._unacked.pop(next(iter(self._unacked)))
        self._unacked[key] = (info, waits + 1)

    def stop(self, *, graceful: bool = True) -> None:
        # Say goodbye while the network loop still runs, then stop it.
        if graceful and self.connected.is_set():
            info = self.client.publish(
                topics.device_topic(self.device_id, "presence"),
                encode(Presence(online=False)), qos=1, retain=True,
            )
            deadline = time.monotonic() + 2
            while not info.is_published() and time.monotonic() < deadline and self.connected.is_set():
                time.sleep(0.01)
        self._stop.set()
        self.client.disconnect()
        if self._thread is not None:
            self._thread.join(timeout=5)
