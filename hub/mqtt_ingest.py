"""The hub's MQTT transport: paho clients that ingest device messages, and publishing.

Threads, and why:

- paho's network thread only sorts incoming messages into two queues, so a slow
  database never stalls keepalives or chunk serving;
- receiving is the costliest part of ingestion in Python, so telemetry can be split
  over ``ingest_clients`` clients (env ``EDGEFLEET_HUB_INGEST_CLIENTS``; default 1,
  because on a 2-core machine that also runs the broker the extra clients only compete
  for the same CPU and the GIL) through an MQTT shared subscription, ``$share/<group>/edgefleet/v1/devices/+/telemetry``,
  the group being one per database (:func:`share_group`). Only telemetry is shared:
  a window is stored once per ``(device_id, seq)`` whatever client or order it comes
  by, while hello, presence, status, drift and repo/get stay on the primary client, in
  the order each device sent them. A broker without shared subscriptions (the
  embedded amqtt one) is detected with a probe message at connect, and the hub then
  keeps one client on a plain subscription;
- the *ingest worker* decodes hello/presence/status/telemetry/drift payloads and applies
  them to the database in batches (one transaction per batch, telemetry inserted with
  one statement), which is what lets the hub keep up with thousands of messages a
  second;
- the *repository server* answers ``repo/get`` requests with chunk frames read from
  the TUF repository.

Every payload is validated against its ``agent.protocol`` schema: first straight from
the bytes by pydantic (strict mode for telemetry), and anything that fails that goes
through :func:`agent.protocol.decode` (drift sketches through
:meth:`agent.sketch.DriftSketch.decode`), whose verdict stands. A malformed one is
logged at warning level with its device and topic, counted by kind
(:class:`PayloadErrorLog`, persisted in ``payload_error_count``), and dropped; nothing a
device sends can stop these threads. A telemetry payload that strict validation shows
to be exactly the validated document is stored as received rather than re-serialised
(:func:`_telemetry_as_received`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import queue
import secrets
import ssl
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, TypeVar, cast
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import BaseModel, ConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import col, select

from agent import protocol, topics
from agent.errors import PayloadError
from agent.sketch import DriftSketch
from hub import fleet
from hub.captures import CaptureArchive
from hub.db import Database
from hub.errors import BrokerUnavailable
from hub.models import Device
from hub.monitoring import InvalidFeedback, device_feedback, ingest_feedback
from hub.repository import Repository, RepositoryPathError
from hub.telemetry import (
    DriftIn,
    PayloadErrorTally,
    TelemetryIn,
    add_payload_errors,
    store_drift,
    store_telemetry,
    to_hub_clock,
)

__all__ = [
    "BrokerAddress",
    "parse_broker_url",
    "PayloadErrorLog",
    "MqttIngest",
    "SHARE_GROUP_PREFIX",
    "share_group",
    "INGEST_CLIENTS_ENV",
]

log = logging.getLogger(__name__)

_DECODERS: Final[dict[str, type[BaseModel]]] = {
    "hello": protocol.Hello,
    "presence": protocol.Presence,
    "status": protocol.StatusReport,
    "telemetry": protocol.Telemetry,
}
_SUBSCRIPTIONS: Final = ("hello", "presence", "status", "telemetry", "drift", "feedback", "capture", "repo/get")
# Stored one message per transaction, apart from the batched kinds: a rejected label
# batch or sample must never roll back other devices' telemetry.
_SINGLE_KINDS: Final = frozenset({"feedback", "capture"})
# Telemetry may be split across several clients: a window is stored once per
# (device_id, seq) whatever order or client it arrives by. hello/presence/status are
# order-sensitive (last writer wins, presence toggles) and stay on the primary client.
_SHARED_KIND: Final = "telemetry"
SHARE_GROUP_PREFIX: Final = "edgefleet-hub"
INGEST_CLIENTS_ENV: Final = "EDGEFLEET_HUB_INGEST_CLIENTS"
DEFAULT_INGEST_CLIENTS: Final = 1  # see docs/hub-benchmarks-results.md: no gain on 2 cores
_STOP: Final = object()
_KNOWN_DEVICES_TTL_S: Final = 300.0
M = TypeVar("M", bound=BaseModel)
# Chunk frame bytes the repository server may have queued in paho and not yet written
# to the socket (MqttIngest._make_room).
REPO_SEND_BUFFER: Final = 8 << 20


class _SentTelemetry(protocol.Telemetry):
    """``protocol.Telemetry`` that refuses fields it does not know: only a payload with
    none may be stored as received (:func:`_telemetry_as_received`)."""

    model_config = ConfigDict(extra="forbid")


# Longest telemetry payload stored as received (an agent's is 300-1,500 bytes); a
# longer one is stored re-serialised, so nothing a device pads into fields inside
# nested objects is kept beyond this.
_RAW_TELEMETRY_MAX: Final = 4096


def _telemetry_as_received(data: bytes) -> tuple[protocol.Telemetry, str | None] | None:
    """A telemetry payload validated in pydantic's strict mode, with the payload text
    to store as is when it says what the validated model says; None to let
    :func:`_fast_decode` and ``protocol.decode`` decide (every malformed payload goes
    that way, so its error kind is unchanged; so does one with an unknown top-level
    field, which is then stored re-serialised, without it).

    Strict mode converts nothing (no ``"5"`` for a number, no ``1.0`` for an integer),
    so the received values are the model's. The text is kept, saving a
    re-serialisation per message, only when, further, every top-level field was sent,
    it has no ``NaN``/``Infinity`` token (pydantic takes them, PostgreSQL's JSON type
    does not; the re-serialisation writes null) and it is at most
    ``_RAW_TELEMETRY_MAX`` bytes. Nested objects may leave out fields that have
    defaults or carry fields the schema ignores; readers parse the stored text with
    the same models, so they see the same values (a duplicated key: the last one, as
    here).
    """
    p = _fast_decode(_SentTelemetry, data, strict=True)
    if p is None:
        return None
    if (len(data) > _RAW_TELEMETRY_MAX or len(p.model_fields_set) != _TELEMETRY_FIELDS
            or b"NaN" in data or b"Infinity" in data):
        return p, None
    try:
        return p, data.decode()
    except UnicodeDecodeError:  # not reached: pydantic's JSON parser requires UTF-8
        return p, None


_TELEMETRY_FIELDS: Final = len(protocol.Telemetry.model_fields)


def _fast_decode(cls: type[M], data: bytes, *, strict: bool = False) -> M | None:
    """``cls`` parsed straight from JSON bytes (pydantic-core, about 3x cheaper than
    :func:`agent.protocol.decode`), or None to let ``protocol.decode`` decide.

    Only an outcome ``protocol.decode`` would also reach is returned: a payload within
    the size limit that validates and carries an explicit ``v`` (the schema's ``v`` is
    ``Literal[1]``, and pydantic would otherwise fill it in from the default). Anything
    else, every malformed payload included, goes the slow way so that the error kinds
    stay exactly those of ``protocol.decode``. ``strict``: pydantic's strict mode
    (nothing converted).
    """
    if len(data) > protocol.MAX_JSON_PAYLOAD:
        return None
    try:
        p = cls.model_validate_json(data, strict=strict)
    except ValueError:  # pydantic.ValidationError, including JSON syntax errors
        return None
    return p if "v" in p.model_fields_set else None


# An MQTT 3.1.1 PUBACK: command byte, remaining length 2, then the message id.
_PUBACK: Final = 0x40
_PUBACK_HEAD: Final = bytes((_PUBACK, 2))


class _BufferedClient(mqtt.Client):
    """A paho client that reads the socket in blocks of ``_READ_BLOCK`` bytes and
    acknowledges what one read brought in with one write.

    paho reads each packet with three ``recv`` calls (command byte, length bytes one
    by one, body) and one ``select`` per packet, and sends each PUBACK on its own
    (two system calls: a wake-up byte to its loop, then the 4-byte ``send``); at
    thousands of telemetry messages a second those system calls were most of the
    hub's receive cost. This serves paho's reads from one block read, keeps parsing
    while the block holds data, and queues the PUBACKs of the messages parsed
    meanwhile as one write, in the order the messages came (as MQTT requires), once
    their ``on_message`` calls have returned; a PUBACK is never sent earlier than
    paho would send it. It overrides private methods of paho-mqtt 2.2
    (``_sock_recv``, ``_sock_close``, ``_send_puback``), pinned in constraints.txt;
    TLS sockets keep paho's reads.
    """

    _rbuf: bytes = b""
    _rpos: int = 0
    _reading: int | None = None  # thread id of the loop_read in progress
    _acks: list[bytes] | None = None

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._rpos >= len(self._rbuf):
            if isinstance(self._sock, ssl.SSLSocket):
                return super()._sock_recv(bufsize)
            self._rbuf, self._rpos = super()._sock_recv(_READ_BLOCK), 0
            if not self._rbuf:
                return b""  # the broker closed the connection
        out = self._rbuf[self._rpos:self._rpos + bufsize]
        self._rpos += len(out)
        return out

    def loop_read(self, max_packets: int = 1) -> mqtt.MQTTErrorCode:
        self._reading, self._acks = threading.get_ident(), []
        try:
            rc = super().loop_read(max_packets)
            while rc == mqtt.MQTT_ERR_SUCCESS and self._sock is not None and self._rpos < len(self._rbuf):
                rc = super().loop_read(1)
        finally:
            self._reading = None
            acks, self._acks = self._acks, None
            if acks and self._sock is not None:
                # One queued "packet" holding every PUBACK: paho writes its bytes as
                # they are, and does nothing after writing a PUBACK.
                self._packet_queue(_PUBACK, b"".join(acks), 0, 1)
        return rc

    def _send_puback(self, mid: int) -> mqtt.MQTTErrorCode:
        # Only acks of the reading thread itself are batched (another thread's, e.g. a
        # manual ack, goes out on its own as paho sends it).
        if (self._reading == threading.get_ident() and self._acks is not None
                and self._protocol != mqtt.MQTTv5):
            self._acks.append(_PUBACK_HEAD + mid.to_bytes(2, "big"))
            return mqtt.MQTT_ERR_SUCCESS
        return super()._send_puback(mid)

    def _sock_close(self) -> None:
        self._rbuf, self._rpos = b"", 0
        super()._sock_close()


# Bytes per socket read of the hub's MQTT clients (_BufferedClient); 0 leaves reading
# and acknowledging to paho (for comparison: benchmarks/hub_ingest.py --read-block 0).
READ_BLOCK_ENV: Final = "EDGEFLEET_HUB_MQTT_READ_BLOCK"
_READ_BLOCK: Final = int(os.environ.get(READ_BLOCK_ENV, 65536))
# Only on the paho release whose private reads _BufferedClient was written against;
# any other release gets paho's own reading rather than a silent misparse.
_BUFFERED_OK: Final = importlib.metadata.version("paho-mqtt").startswith("2.2.") and all(
    callable(getattr(mqtt.Client, m, None))
    for m in ("_sock_recv", "_sock_close", "loop_read", "_send_puback", "_packet_queue")
)


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool = False

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """``mqtt://host[:port]`` (also ``tcp://``) or ``mqtts://host[:port]``.

    Raises:
        ValueError: another scheme, or no host.
    """
    parts = urlsplit(url if "://" in url else f"mqtt://{url}")
    if parts.scheme not in ("mqtt", "tcp", "mqtts", "ssl"):
        raise ValueError(f"broker URL must be mqtt://host:port or mqtts://host:port, got {url!r}")
    if not parts.hostname:
        raise ValueError(f"broker URL has no host: {url!r}")
    tls = parts.scheme in ("mqtts", "ssl")
    return BrokerAddress(parts.hostname, parts.port or (8883 if tls else 1883), tls)


def share_group(db_url: str) -> str:
    """The shared-subscription group of the hubs writing to the database ``db_url``.

    Hubs on one database split its telemetry between them (each window is stored once
    whichever writes it); hubs on different databases sharing a broker each still get
    every message.
    """
    safe = make_url(db_url).render_as_string(hide_password=True)
    return f"{SHARE_GROUP_PREFIX}-{hashlib.sha256(safe.encode()).hexdigest()[:12]}"


class PayloadErrorLog:
    """Counts malformed payloads; the ingest worker flushes them to the database."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str], PayloadErrorTally] = {}
        self.totals: Counter[str] = Counter()

    def record(self, topic_kind: str, device_id: str | None, err: PayloadError) -> None:
        log.warning("malformed %s payload from device %s (%s): %s", topic_kind, device_id, err.kind, err)
        with self._lock:
            self.totals[err.kind] += 1
            t = self._pending.get((topic_kind, err.kind))
            if t is None:
                self._pending[(topic_kind, err.kind)] = PayloadErrorTally(1, str(err), device_id)
            else:
                t.count, t.last_error, t.last_device_id = t.count + 1, str(err), device_id

    def drain(self) -> dict[tuple[str, str], PayloadErrorTally]:
        with self._lock:
            out, self._pending = self._pending, {}
            return out

    def restore(self, tallies: dict[tuple[str, str], PayloadErrorTally]) -> None:
        """Put back tallies whose flush failed, so they are written next time."""
        with self._lock:
            for key, t in tallies.items():
                cur = self._pending.get(key)
                if cur is None:
                    self._pending[key] = t
                else:
                    cur.count += t.count


@dataclass(frozen=True, slots=True)
class _Inbound:
    kind: str
    device_id: str
    payload: bytes
    received: datetime
    retained: bool = False


@dataclass(frozen=True, slots=True)
class _Decoded:
    item: _Inbound
    msg: BaseModel
    # Telemetry only: the payload text to store as received (_telemetry_as_received).
    text: str | None = None


class MqttIngest:
    """The hub's MQTT client: ingestion, repository serving, and :class:`Publisher`."""

    def __init__(
        self,
        broker_url: str,
        db: Database,
        repository: Repository,
        *,
        batch_size: int = 500,
        queue_size: int = 100_000,
        publish_timeout: float = 10.0,
        ingest_clients: int | None = None,
        captures: CaptureArchive | None = None,
    ) -> None:
        self.address = parse_broker_url(broker_url)
        self.db = db
        self.repository = repository
        self.captures = captures
        self.batch_size = batch_size
        self.publish_timeout = publish_timeout
        self.errors = PayloadErrorLog()
        self.client_id = f"edgefleet-hub-{secrets.token_hex(6)}"
        if ingest_clients is None:
            ingest_clients = int(os.environ.get(INGEST_CLIENTS_ENV, DEFAULT_INGEST_CLIENTS))
        if ingest_clients < 1:
            raise ValueError(f"ingest_clients must be at least 1, got {ingest_clients}")
        self.ingest_clients = ingest_clients
        # Set once the broker has shown it honours shared subscriptions; from then on
        # telemetry arrives through $share/<share_group>/... on every ingest client.
        self.shared = threading.Event()
        self._probe_topic = f"{topics.ROOT}/hub/{self.client_id}/probe"
        self._probe_filter = f"$share/{self.client_id}-probe/{self._probe_topic}"
        self.share_group = share_group(db.url)
        self._shared_filter = f"$share/{self.share_group}/{topics.device_wildcard(_SHARED_KIND)}"
        self._extra_clients: list[mqtt.Client] = []
        self._clients_lock = threading.Lock()
        self._stopping = False
        self._count_lock = threading.Lock()
        self.received: Counter[str] = Counter()
        self.received_by_client: Counter[str] = Counter()
        self.dropped = 0
        self.repo_superseded = 0  # repo/get requests skipped for a newer one (_repo_loop)
        self._ingest_q: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._repo_q: queue.Queue[Any] = queue.Queue(maxsize=10_000)
        # Chunk frames handed to paho and maybe not yet written (repository thread only).
        self._chunks_out: deque[tuple[mqtt.MQTTMessageInfo, int]] = deque()
        self._chunk_bytes_out = 0
        self._connected = threading.Event()
        self._threads: list[threading.Thread] = []
        self._idle = threading.Condition()
        self._in_flight = 0
        # Devices whose row this hub has seen committed, so a batch skips
        # fleet.ensure_devices for them (it was a third of the writer's time). Rows are
        # never deleted by the hub; the set is still forgotten every few minutes so
        # a row removed by hand comes back.
        self._known_devices: set[str] = set()
        self._known_since = time.monotonic()
        # Device clock offsets over the tolerance (hub.fleet docstring), by device;
        # loaded at start, updated by live hellos. Only the ingest worker writes it.
        self._skews: dict[str, float] = {}

        c = self._new_client(self.client_id)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        self._client = c

    def _new_client(self, client_id: str) -> mqtt.Client:
        c = (_BufferedClient if _READ_BLOCK > 0 and _BUFFERED_OK else mqtt.Client)(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=True,
            protocol=mqtt.MQTTv311,
        )
        if self.address.tls:
            c.tls_set_context(ssl.create_default_context())
        c.max_inflight_messages_set(1000)
        c.max_queued_messages_set(0)
        c.reconnect_delay_set(min_delay=1, max_delay=30)
        c.user_data_set(client_id)  # the ``userdata`` of callbacks: which client got it
        return c

    # ------------------------------------------------------------------ lifecycle

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self, connect_timeout: float = 10.0) -> bool:
        """Start the worker threads and connect; returns whether it connected in time.

        If the broker is not reachable yet the client keeps retrying in the background.
        """
        try:
            with self.db.session() as s:
                for device_id, offset in s.exec(
                    select(Device.device_id, Device.clock_offset_s).where(col(Device.clock_offset_s).is_not(None))
                ).all():
                    self._note_offset(device_id, offset)
        except SQLAlchemyError:
            log.exception("could not load device clock offsets; they are measured again on reconnect")
        for target, name in ((self._ingest_loop, "ingest"), (self._repo_loop, "repo")):
            t = threading.Thread(target=target, name=f"edgefleet-hub-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        self._client.connect_async(self.address.host, self.address.port, keepalive=30)
        self._client.loop_start()
        ok = self._connected.wait(connect_timeout)
        if not ok:
            log.warning("MQTT broker %s not reachable yet; retrying in the background", self.address.url)
        return ok

    def stop(self, timeout: float = 10.0) -> None:
        """Disconnect, then let the workers finish what is queued, and join them."""
        with self._clients_lock:
            self._stopping = True
            clients, self._extra_clients = [self._client, *self._extra_clients], []
        for c in clients:
            c.disconnect()
            c.loop_stop()
        self._connected.clear()
        self._ingest_q.put(_STOP)
        self._repo_q.put(_STOP)
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Block until every message received so far has been written (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._ingest_q.unfinished_tasks or self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, 0.05))
        return True

    # ------------------------------------------------------------------ paho callbacks

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.warning("MQTT connect to %s refused: %s", self.address.url, reason)
            return
        subs = [(topics.device_wildcard(k), topics.QOS[k]) for k in _SUBSCRIPTIONS]  # type: ignore[arg-type]
        if self.shared.is_set():
            subs = [(f, q) for f, q in subs if f != topics.device_wildcard(_SHARED_KIND)]
            subs.append((self._shared_filter, topics.QOS[_SHARED_KIND]))
        elif self.ingest_clients > 1:
            # Does this broker do shared subscriptions? (Mosquitto 2 does; the embedded
            # amqtt broker does not, and would silently deliver nothing.) Ask it with a
            # probe message to ourselves; telemetry stays on a plain subscription
            # until the answer comes (_on_probe), so nothing is missed meanwhile.
            subs.append((self._probe_filter, 1))
        client.subscribe(subs)
        if not self.shared.is_set() and self.ingest_clients > 1:
            client.publish(self._probe_topic, b"probe", qos=1)
        self._connected.set()
        log.info("hub connected to MQTT broker %s as %s", self.address.url, self.client_id)

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self._connected.clear()
        if reason.is_failure:
            log.warning("hub lost the MQTT broker %s: %s; reconnecting", self.address.url, reason)

    def _on_probe(self, client: mqtt.Client) -> None:
        """The broker delivered our probe through a shared subscription: split telemetry
        across ``ingest_clients`` clients of the group :func:`share_group`."""
        if self.shared.is_set():
            return
        client.unsubscribe(self._probe_filter)
        # Join the group before leaving the plain subscription; a message delivered to
        # both meanwhile is stored once (unique (device_id, seq)).
        client.subscribe(self._shared_filter, topics.QOS[_SHARED_KIND])
        client.unsubscribe(topics.device_wildcard(_SHARED_KIND))
        self.shared.set()
        with self._clients_lock:
            if self._stopping:
                return
            for k in range(1, self.ingest_clients):
                c = self._new_client(f"{self.client_id}-{k}")
                c.on_connect = self._on_connect_extra
                c.on_message = self._on_message
                c.connect_async(self.address.host, self.address.port, keepalive=30)
                c.loop_start()
                self._extra_clients.append(c)
        log.info("broker supports shared subscriptions: telemetry split across %d clients (%s)",
                 self.ingest_clients, self._shared_filter)

    def _on_connect_extra(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.warning("MQTT connect of an ingest client to %s refused: %s", self.address.url, reason)
            return
        client.subscribe(self._shared_filter, topics.QOS[_SHARED_KIND])

    def _on_message(self, client: mqtt.Client, userdata: str, msg: mqtt.MQTTMessage) -> None:
        dt = topics.parse_device_topic(msg.topic)
        if dt is None:
            if msg.topic == self._probe_topic:
                self._on_probe(client)
            return
        with self._count_lock:
            self.received[dt.kind] += 1
            self.received_by_client[userdata] += 1
        # bytes() of paho's bytes is the same object; the type says bytes | bytearray.
        item = _Inbound(dt.kind, dt.device_id, bytes(msg.payload), datetime.now(UTC), bool(msg.retain))
        q = self._repo_q if dt.kind == "repo/get" else self._ingest_q
        try:
            # Blocking briefly pushes back on the broker instead of losing QoS 1 messages.
            q.put(item, timeout=5.0)
        except queue.Full:
            self.dropped += 1
            log.error("hub overloaded: dropped a %s message from %s", dt.kind, dt.device_id)

    # ------------------------------------------------------------------ publishing

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool) -> None:
        """Publish; for QoS 1 and 2 wait for the broker's acknowledgement.

        Raises:
            BrokerUnavailable: not connected, or not acknowledged within the timeout.
        """
        (err,) = self.publish_many([(topic, payload)], qos=qos, retain=retain)
        if err is not None:
            raise err

    def publish_many(
        self, messages: Sequence[tuple[str, bytes]], *, qos: int, retain: bool
    ) -> list[BrokerUnavailable | None]:
        """Publish every ``(topic, payload)``, then wait for the acknowledgements
        (within ``publish_timeout`` for the lot). Waiting for each before sending the
        next cost a round trip per device: a 1,000-device wave took seconds to send.

        Returns, in order, None for each message the broker acknowledged and the error
        for each it did not; raises nothing.
        """
        if not self.connected:
            down = BrokerUnavailable(f"not connected to the MQTT broker {self.address.url}")
            return [down] * len(messages)
        sent = [(topic, self._client.publish(topic, payload, qos=qos, retain=retain))
                for topic, payload in messages]
        deadline = time.monotonic() + self.publish_timeout
        out: list[BrokerUnavailable | None] = []
        for topic, info in sent:
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                out.append(BrokerUnavailable(f"publish to {topic} failed: {mqtt.error_string(info.rc)}"))
                continue
            if qos > 0:
                try:
                    info.wait_for_publish(max(0.0, deadline - time.monotonic()))
                except (RuntimeError, ValueError) as e:
                    out.append(BrokerUnavailable(f"publish to {topic} failed: {e}"))
                    continue
                if not info.is_published():
                    out.append(BrokerUnavailable(
                        f"broker did not acknowledge {topic} within {self.publish_timeout:.0f}s"))
                    continue
            out.append(None)
        return out

    # ------------------------------------------------------------------ ingestion

    def _ingest_loop(self) -> None:
        stopping = False
        while not stopping:
            try:
                first = self._ingest_q.get(timeout=1.0)
            except queue.Empty:
                self._flush_errors()
                continue
            batch: list[_Inbound] = []
            items = [first]
            while len(items) < self.batch_size:
                try:
                    items.append(self._ingest_q.get_nowait())
                except queue.Empty:
                    break
            for it in items:
                if it is _STOP:
                    stopping = True
                else:
                    batch.append(it)
            with self._idle:
                self._in_flight += len(items)
            for _ in items:
                self._ingest_q.task_done()
            try:
                if batch:
                    self._apply(batch)
                self._flush_errors()
            except Exception:  # the thread outlives any one batch
                log.exception("ingest: a batch of %d messages failed", len(batch))
            finally:
                with self._idle:
                    self._in_flight -= len(items)
                    self._idle.notify_all()

    def _decode(self, item: _Inbound) -> _Decoded | None:
        try:
            if item.kind == "telemetry" and (t := _telemetry_as_received(item.payload)) is not None:
                return _Decoded(item, t[0], t[1])
            if item.kind == "drift":
                return _Decoded(item, DriftSketch.decode(item.payload))
            cls = _DECODERS[item.kind]
            payload = _fast_decode(cls, item.payload) or protocol.decode(cls, item.payload)
        except PayloadError as e:
            self.errors.record(item.kind, item.device_id, e)
            return None
        except Exception as e:  # a parser's own failure: counted, and it costs this message only
            log.warning("could not decode %s from %s: %s: %s", item.kind, item.device_id, type(e).__name__, e)
            self.errors.record(item.kind, item.device_id,
                               PayloadError(f"{item.kind}: unreadable ({type(e).__name__})", "not_json"))
            return None
        if isinstance(payload, protocol.Hello) and payload.device_id != item.device_id:
            self.errors.record(
                item.kind,
                item.device_id,
                PayloadError(
                    f"Hello: device_id {payload.device_id!r} does not match the topic", "device_mismatch"
                ),
            )
            return None
        return _Decoded(item, payload)

    def _apply(self, batch: list[_Inbound]) -> None:
        if any(it.kind in _SINGLE_KINDS for it in batch):
            for it in batch:
                if it.kind in _SINGLE_KINDS:
                    self._store_single(it)
            batch = [it for it in batch if it.kind not in _SINGLE_KINDS]
        decoded = [d for it in batch if (d := self._decode(it)) is not None]
        if not decoded:
            return
        # Not only SQLAlchemyError: SQLite's driver raises OverflowError for an integer
        # over 64 bits, unwrapped. One message the database refuses must cost only itself.
        try:
            self._write(decoded)
        except Exception:
            if len(decoded) == 1:
                it = decoded[0].item
                log.exception("could not store %s from %s; message dropped", it.kind, it.device_id)
                return
            log.exception("could not store a batch of %d messages; retrying one by one", len(decoded))
            for one in decoded:
                try:
                    self._write([one])
                except Exception:
                    log.exception("could not store %s from %s; message dropped", one.item.kind, one.item.device_id)

    def _note_offset(self, device_id: str, offset: float | None) -> None:
        if offset is not None and abs(offset) > fleet.CLOCK_SKEW_TOLERANCE_S:
            if device_id not in self._skews:
                log.warning("device %s clock is off by %.1f s; its timestamps are corrected", device_id, -offset)
            self._skews[device_id] = offset
        else:
            self._skews.pop(device_id, None)

    def _store_single(self, item: _Inbound) -> None:
        """Store one label batch or captured sample in its own transaction."""
        try:
            with self.db.session() as s:
                fleet.ensure_devices(s, {item.device_id} - self._known_devices, item.received)
                if item.kind == "feedback":
                    msg = protocol.decode(protocol.Feedback, item.payload)
                    batch = device_feedback(item.device_id, msg, self._skews.get(item.device_id, 0.0))
                    ingest_feedback(s, batch, item.received.timestamp())
                elif self.captures is None:
                    raise PayloadError("this hub does not accept captured samples", "not_accepted")
                else:
                    self.captures.store(s, item.device_id, bytes(item.payload), item.received,
                                        clock_offset=self._skews.get(item.device_id, 0.0))
        except PayloadError as e:
            self.errors.record(item.kind, item.device_id, e)
        except InvalidFeedback as e:
            self.errors.record(item.kind, item.device_id, PayloadError(str(e), e.kind))
        except Exception:  # SQLAlchemyError, OSError, OverflowError (SQLite): this message only
            log.exception("could not store %s from %s; message dropped", item.kind, item.device_id)
        else:
            self._known_devices.add(item.device_id)

    def _write(self, decoded: list[_Decoded]) -> None:
        now = datetime.now(UTC)
        tele: list[TelemetryIn] = []
        sketches: list[DriftIn] = []
        if time.monotonic() - self._known_since > _KNOWN_DEVICES_TTL_S:
            self._known_devices, self._known_since = set(), time.monotonic()
        new_ids = {d.item.device_id for d in decoded} - self._known_devices
        stateful = [d for d in decoded if d.item.kind in ("hello", "presence", "status")]
        with self.db.session() as s:
            fleet.ensure_devices(s, new_ids, now)
            rows = fleet.preload(  # noqa: F841 - held so the session keeps the rows
                s,
                {d.item.device_id for d in stateful},
                {(d.item.device_id, d.msg.deployment_id) for d in stateful  # type: ignore[attr-defined]
                 if d.item.kind == "status" and d.msg.deployment_id},  # type: ignore[attr-defined]
            )
            # Dispatch on the topic kind (_decode made ``msg`` of that kind's class):
            # isinstance on pydantic models goes through a slow metaclass check.
            skews = self._skews
            for d in decoded:
                it, p, kind = d.item, d.msg, d.item.kind
                skew = skews.get(it.device_id, 0.0) if skews else 0.0
                if kind == "telemetry":
                    t = cast(protocol.Telemetry, p)
                    if skew:  # timestamps corrected: store the corrected document
                        tele.append(TelemetryIn(it.device_id, to_hub_clock(t, skew), it.received))
                    else:
                        tele.append(TelemetryIn(it.device_id, t, it.received, d.text))
                elif kind == "drift":
                    sketches.append(DriftIn(it.device_id, to_hub_clock(cast(DriftSketch, p), skew), it.received))
                elif kind == "hello":
                    offset = fleet.apply_hello(s, it.device_id, p, it.received, live=not it.retained)  # type: ignore[arg-type]
                    if offset is not None:
                        self._note_offset(it.device_id, offset)
                elif kind == "presence":
                    fleet.apply_presence(s, it.device_id, p, it.received)  # type: ignore[arg-type]
                elif kind == "status":
                    fleet.apply_status(s, it.device_id, p, it.received)  # type: ignore[arg-type]
            if tele or sketches:
                s.flush()
                store_telemetry(s, tele)
                store_drift(s, sketches)
                fleet.touch_devices(s, [t.device_id for t in tele] + [d.device_id for d in sketches], now)
        self._known_devices |= new_ids  # committed: these rows exist

    def _flush_errors(self) -> None:
        tallies = self.errors.drain()
        if not tallies:
            return
        try:
            with self.db.session() as s:
                add_payload_errors(s, tallies, datetime.now(UTC))
        except SQLAlchemyError:
            log.exception("could not store payload error counters; will retry")
            self.errors.restore(tallies)

    # ------------------------------------------------------------------ repository

    def _repo_loop(self) -> None:
        """Serve repo/get requests in arrival order, skipping superseded ones.

        An agent asks again for a range it got no answer to within its transfer
        timeout, under a new request id, and forgets the old one. When a thousand
        devices start downloading together the queue can be longer than that timeout,
        and answering both copies would double the work exactly when the hub is
        behind. So each pass takes everything queued and serves, per device and
        range, only the newest request.
        """
        while True:
            items = [self._repo_q.get()]
            while True:
                try:
                    items.append(self._repo_q.get_nowait())
                except queue.Empty:
                    break
            stopping = any(it is _STOP for it in items)
            reqs: list[tuple[_Inbound, protocol.RepoRequest]] = []
            for it in items:
                if it is _STOP:
                    continue
                try:
                    reqs.append((it, protocol.decode(protocol.RepoRequest, it.payload)))
                except PayloadError as e:
                    self.errors.record(it.kind, it.device_id, e)
            newest = {(it.device_id, r.path, r.offset, r.length): k for k, (it, r) in enumerate(reqs)}
            for k, (it, r) in enumerate(reqs):
                if newest[(it.device_id, r.path, r.offset, r.length)] == k:
                    try:
                        self._serve(it, r)
                    except Exception:  # one bad answer must not stop every download
                        log.exception("could not answer %s's request for %s", it.device_id, r.path)
                else:
                    self.repo_superseded += 1
            if stopping:
                return

    def _serve(self, item: _Inbound, req: protocol.RepoRequest) -> None:
        header: protocol.ChunkHeader
        data = b""
        try:
            total, data, digest = self.repository.read_chunk(req.path, req.offset, req.length)
            header = protocol.ChunkHeader(rid=req.rid, path=req.path, offset=req.offset, total=total,
                                          sha256=digest)
        except RepositoryPathError as e:
            header = protocol.ChunkHeader(rid=req.rid, path=req.path, status="error", error=str(e))
        except FileNotFoundError:
            header = protocol.ChunkHeader(rid=req.rid, path=req.path, status="not_found")
        except OSError as e:
            log.warning("repository read of %s failed: %s", req.path, e)
            header = protocol.ChunkHeader(
                rid=req.rid, path=req.path, status="error", error=f"read failed: {e.strerror}"
            )
        topic = topics.device_topic(item.device_id, "repo/data")
        try:
            self._publish_chunk(topic, protocol.encode_frame(header, data))
        except BrokerUnavailable as e:
            log.info("could not answer %s's request for %s: %s", item.device_id, req.path, e)

    def _publish_chunk(self, topic: str, frame: bytes) -> None:
        """Queue one chunk frame (QoS 0), within the send buffer (:meth:`_make_room`).

        Raises:
            BrokerUnavailable: not connected, or paho refused the message.
        """
        if not self.connected:
            raise BrokerUnavailable(f"not connected to the MQTT broker {self.address.url}")
        self._make_room(len(frame))
        info = self._client.publish(topic, frame, qos=topics.QOS["repo/data"], retain=False)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise BrokerUnavailable(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        self._chunks_out.append((info, len(frame)))
        self._chunk_bytes_out += len(frame)

    def _make_room(self, size: int) -> None:
        """Wait until paho has written enough earlier chunk frames to the socket that
        this one keeps the unsent ones within ``REPO_SEND_BUFFER`` bytes.

        Chunks go out at QoS 0, so ``publish`` only queues them in paho's client; when a
        thousand devices download at once, the repository thread reads chunks faster
        than the socket drains, and without this bound the queue held hundreds of MB
        (hub RSS 670-870 MB after two 1,000-device rollouts of a 1 MB bundle), which the
        allocator then kept. A frame that is still unsent after ``publish_timeout`` (the
        connection is stuck or gone, and paho drops QoS 0 frames on reconnect) stops
        being counted.
        """
        out = self._chunks_out
        while out and self._chunk_bytes_out + size > REPO_SEND_BUFFER:
            info, n = out[0]
            try:
                if not info.is_published():
                    info.wait_for_publish(self.publish_timeout)
            except (RuntimeError, ValueError):
                pass  # paho dropped it (connection lost, queue reset): no longer queued
            out.popleft()
            self._chunk_bytes_out -= n
