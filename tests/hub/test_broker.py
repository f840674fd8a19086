"""The embedded broker with paho-mqtt 2 clients: retained, last will, QoS 1, 1 MiB binary."""

from __future__ import annotations

import os
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from hub.broker import EmbeddedBroker


def _client(port: int, cid: str, sink: list[mqtt.MQTTMessage] | None = None, will: bool = False) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid)
    if will:
        c.will_set("t/presence", b"offline", qos=1, retain=True)
    if sink is not None:
        c.on_message = lambda _c, _u, m: sink.append(m)
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c


def _wait(pred, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_embedded_broker_with_paho() -> None:
    big = os.urandom(1 << 20)
    with EmbeddedBroker() as broker:
        assert broker.port > 0
        pub = _client(broker.port, "pub", will=True)
        pub.publish("t/retained", b"desired", qos=1, retain=True).wait_for_publish(5)

        got: list[mqtt.MQTTMessage] = []
        sub = _client(broker.port, "sub", got)
        subscribed = threading.Event()
        sub.on_subscribe = lambda *_a: subscribed.set()
        sub.subscribe("t/#", qos=1)
        assert subscribed.wait(5)
        _wait(lambda: any(m.topic == "t/retained" for m in got))
        assert next(m for m in got if m.topic == "t/retained").retain

        pub.publish("t/big", big, qos=1).wait_for_publish(10)
        _wait(lambda: any(m.topic == "t/big" for m in got))
        assert next(m for m in got if m.topic == "t/big").payload == big

        pub._sock.close()  # type: ignore[union-attr]  # vanish without DISCONNECT: the will fires
        _wait(lambda: any(m.topic == "t/presence" for m in got), timeout=10)

        late: list[mqtt.MQTTMessage] = []
        late_sub = _client(broker.port, "late", late)
        late_sub.subscribe("t/presence", qos=1)
        _wait(lambda: bool(late))  # the will was retained
        time.sleep(0.3)
        # Only what "late" subscribed to: amqtt 0.12 alone would also replay "t/retained"
        # because another client holds "t/#" (see hub.broker._Broker).
        assert [(m.topic, m.payload, m.retain) for m in late] == [("t/presence", b"offline", True)]
        for c in (pub, sub, late_sub):
            c.loop_stop()
        sub.disconnect()
        late_sub.disconnect()
    port = broker.port
    probe = mqtt.Client(CallbackAPIVersion.VERSION2)
    try:
        probe.connect("127.0.0.1", port)
        raise AssertionError("broker still listening after stop")
    except OSError:
        pass
