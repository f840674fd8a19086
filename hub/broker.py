"""The embedded MQTT broker: amqtt on 127.0.0.1, in a thread with its own event loop.

Used when the hub is started without ``--broker`` so that a new user needs nothing but
Python. It speaks MQTT 3.1.1 to paho-mqtt clients, including retained messages, last
will, QoS 1 and binary payloads of a few MiB (amqtt reads the packet's remaining
length as declared and imposes no size limit of its own; the agent and hub bound
every payload they read). For fleets, point the hub at Mosquitto or EMQX instead.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from amqtt.broker import Broker

__all__ = ["EmbeddedBroker", "BrokerStartError"]

log = logging.getLogger(__name__)


class _Broker(Broker):
    """amqtt's broker with one fix.

    amqtt 0.12, when a client connects, replays retained messages for *every* topic
    filter any session has subscribed to, not only the connecting session's own. On
    edgefleet's tree that would hand each device every other device's retained
    hello, status and deploy messages. Retained messages are therefore published only
    for filters the receiving session actually holds (which is what the connect-time
    replay is meant for: a persistent session's existing subscriptions).
    """

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Any
    ) -> None:
        holders = self._subscriptions.get(subscription[0], [])
        if not any(s.client_id == session.client_id for s, _ in holders):
            return
        await super()._publish_retained_messages_for_subscription(subscription, session)


class BrokerStartError(RuntimeError):
    """The embedded broker could not start (port taken, bind refused)."""


class EmbeddedBroker:
    """amqtt running on a private event loop in a daemon thread.

    ``port=0`` picks a free port; :attr:`port` holds the bound one after :meth:`start`.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Broker | None = None

    @property
    def url(self) -> str:
        """Where a client on this machine connects (loopback when listening on every address)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else "::1" if self.host == "::" else self.host
        return f"mqtt://[{host}]:{self.port}" if ":" in host else f"mqtt://{host}:{self.port}"

    def _config(self) -> dict[str, Any]:
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            # No $SYS publishing and no per-packet logging: both cost throughput.
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
            },
        }

    def start(self, timeout: float = 10.0) -> None:
        """Start the broker and wait until it listens.

        Raises:
            BrokerStartError: it did not start within ``timeout`` or failed to bind.
        """
        if self._thread is not None:
            return
        loop = asyncio.new_event_loop()
        started = threading.Event()
        failure: list[BaseException] = []

        async def _start() -> None:
            broker = _Broker(self._config(), loop=loop)
            # amqtt logs a failed start with a traceback; BrokerStartError carries the
            # same reason to the caller, which reports it once.
            amqtt_log = logging.getLogger("amqtt.broker")
            was_disabled, amqtt_log.disabled = amqtt_log.disabled, True
            try:
                await broker.start()
            finally:
                amqtt_log.disabled = was_disabled
            self._broker = broker
            server = broker._servers["default"].instance  # the asyncio.Server
            if server is not None and server.sockets:
                self.port = server.sockets[0].getsockname()[1]

        def _run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(_start())
            except BaseException as e:  # noqa: BLE001 - reported to the starting thread
                failure.append(e)
                started.set()
                loop.close()
                return
            started.set()
            loop.run_forever()
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=_run, name="edgefleet-broker", daemon=True)
        self._thread.start()
        if not started.wait(timeout):
            raise BrokerStartError(f"embedded broker did not start within {timeout:.0f}s")
        if failure:
            self._thread = None
            raise BrokerStartError(f"embedded broker failed to start: {failure[0]}") from failure[0]
        log.info("embedded MQTT broker listening on %s", self.url)

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the broker down, closing every client connection, and join its thread."""
        loop, thread, broker = self._loop, self._thread, self._broker
        if loop is None or thread is None:
            return
        if broker is not None and loop.is_running():
            fut = asyncio.run_coroutine_threadsafe(broker.shutdown(), loop)
            try:
                fut.result(timeout)
            except (TimeoutError, asyncio.CancelledError, OSError) as e:
                log.warning("embedded broker shutdown incomplete: %s", e)
        if loop.is_running():
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._thread = self._loop = self._broker = None

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
