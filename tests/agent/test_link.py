"""The MQTT link: a message the broker has not acknowledged is not published twice."""

from __future__ import annotations

import os
import signal
import time

import paho.mqtt.client as mqtt
import pytest

from agent.connection import UNACKED_WAITS, Link, parse_broker_url
from agent.errors import TransportError


@pytest.fixture
def link_and_copies(mosquitto):
    got: list[bytes] = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    sub.on_message = lambda c, u, m: got.append(bytes(m.payload))
    sub.connect("127.0.0.1", mosquitto.port)
    sub.subscribe("edgefleet/test/#", qos=1)
    sub.loop_start()
    link = Link("dev1", parse_broker_url(mosquitto.url))
    link.start()
    assert link.connected.wait(10)
    yield mosquitto, link, got
    os.kill(mosquitto.proc.pid, signal.SIGCONT)
    link.stop(graceful=False)
    sub.loop_stop()


def _stalled(broker, link: Link, key, payload: bytes) -> None:
    """Publish while the broker is stopped (no PUBACK comes), then let it go on."""
    os.kill(broker.proc.pid, signal.SIGSTOP)
    try:
        with pytest.raises(TransportError, match="not acknowledged"):
            link.publish_wait("edgefleet/test/t", payload, qos=1, timeout=0.3, key=key)
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)


def _settle(got: list[bytes], n: int) -> None:
    deadline = time.monotonic() + 10
    while len(got) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # a copy, if any, arrives meanwhile


def test_a_retry_with_the_same_key_waits_for_the_first_message(link_and_copies):
    broker, link, got = link_and_copies
    _stalled(broker, link, ("spool", 7), b"r7")
    link.publish_wait("edgefleet/test/t", b"r7", qos=1, timeout=10, key=("spool", 7))
    _settle(got, 1)
    assert got.count(b"r7") == 1


def test_without_a_key_a_retry_is_a_second_message(link_and_copies):
    # What the spool sender did before it passed a key: the broker got two copies.
    broker, link, got = link_and_copies
    _stalled(broker, link, None, b"r8")
    link.publish_wait("edgefleet/test/t", b"r8", qos=1, timeout=10)
    _settle(got, 2)
    assert got.count(b"r8") == 2


def test_after_the_waits_run_out_a_copy_is_sent(link_and_copies):
    broker, link, got = link_and_copies
    os.kill(broker.proc.pid, signal.SIGSTOP)
    try:
        for _ in range(UNACKED_WAITS):
            with pytest.raises(TransportError):
                link.publish_wait("edgefleet/test/t", b"r9", qos=1, timeout=0.2, key="k9")
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)
    link.publish_wait("edgefleet/test/t", b"r9", qos=1, timeout=10, key="k9")
    _settle(got, 2)
    assert got.count(b"r9") == 2  # the first message (paho delivers it) and the copy
