"""A spool file that SQLite reads but the agent cannot use, and what it must not cost:
the agent starts, the records behind a bad row are delivered, the sender keeps going."""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from agent.daemon import Agent
from agent.spool import Priority, SchemaMismatch, Spool


def _insert(path: Path, sql: str, *args: object) -> None:
    db = sqlite3.connect(str(path))
    db.execute(sql, args)
    db.commit()
    db.close()


@pytest.mark.parametrize("schema", [
    # the reviewer's file: no size column
    "CREATE TABLE records(id INTEGER PRIMARY KEY, priority INT, topic TEXT, payload BLOB, retain INT)",
    # another table altogether
    "CREATE TABLE records(k TEXT, v TEXT)",
    # a column the spool does not fill, required
    "CREATE TABLE records(id INTEGER PRIMARY KEY, priority INT, topic TEXT, payload BLOB,"
    " retain INT, size INT, origin TEXT NOT NULL)",
])
def test_a_spool_file_with_another_schema_is_set_aside_and_the_spool_starts_empty(tmp_path, caplog, schema):
    path = tmp_path / "spool.sqlite"
    _insert(path, schema)
    with pytest.raises(SchemaMismatch):  # readers (agent status) report it and move nothing
        Spool(path, set_aside=False).close()
    assert path.exists() and not list(tmp_path.glob("spool.sqlite.unreadable-*"))

    with caplog.at_level(logging.ERROR, logger="agent.spool"):
        sp = Spool(path)
    assert sp.reset_reason is not None and "set aside" in sp.reset_reason
    assert any("set aside" in r.getMessage() for r in caplog.records)
    aside = list(tmp_path.glob("spool.sqlite.unreadable-*"))
    assert [p.name for p in aside if not p.name.endswith(("-wal", "-shm"))]  # kept for diagnosis
    assert len(sp) == 0 and sp.size_bytes() == 0 and sp.epoch is not None
    sp.push(Priority.STATUS, "t", b"hello")
    rec = sp.peek()
    assert rec is not None and rec.payload == b"hello"
    sp.close()
    again = Spool(path)  # the new file is the spool's: kept on the next start
    assert again.reset_reason is None and len(again) == 1
    again.close()


@pytest.mark.parametrize("bad", [
    (9, "x", b"\x00", 0),  # the reviewer's row: a priority out of range
    (-1, "x", b"\x00", 0),
    ("status", "x", b"\x00", 0),
    (2, b"x", b"\x00", 0),  # a topic that is not text
    (2, "", b"\x00", 0),
    (2, "x", "text, not bytes", 0),
    (2, "x", 5, 0),
    (2, "x", b"\x00", 7),  # retain that is not a flag
])
def test_a_row_that_cannot_be_decoded_is_dropped_and_counted(tmp_path, caplog, bad):
    path = tmp_path / "spool.sqlite"
    sp = Spool(path)
    sp.push(Priority.METRICS, "first", b"1")
    sp.close()
    # Rows written around the spool (another program, a bit flip SQLite does not see).
    db = sqlite3.connect(str(path))
    for _ in range(3):
        db.execute("INSERT INTO records(priority, topic, payload, retain, size) VALUES (?,?,?,?,40)", bad)
    db.commit()
    db.close()
    sp = Spool(path)
    sp.push(Priority.STATUS, "last", b"2")
    before = sp.size_bytes()

    rec = sp.peek()
    assert rec is not None and rec.topic == "first"
    sp.ack(rec.id)
    with caplog.at_level(logging.WARNING, logger="agent.spool"):
        rec = sp.peek()
    assert rec is not None and (rec.topic, rec.payload, rec.priority) == ("last", b"2", Priority.STATUS)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "decoded" in r.getMessage()]
    assert len(warnings) == 1  # once for the batch, not once a row
    assert sp.counters()["dropped.undecodable"] == 3 and sp.dropped() == 3
    assert len(sp) == 1
    assert sp.size_bytes() == before - 3 * 40 - (len("first") + 1 + 32)
    sp.ack(rec.id)
    assert sp.peek() is None and sp.size_bytes() == 0
    sp.close()
    # gone for good: the next start does not meet them again
    again = Spool(path)
    assert len(again) == 0 and again.dropped() == 3
    again.close()


def test_a_spool_of_only_bad_rows_longer_than_a_batch_comes_out_empty(tmp_path):
    path = tmp_path / "spool.sqlite"
    Spool(path).close()
    db = sqlite3.connect(str(path))
    db.executemany("INSERT INTO records(priority, topic, payload, retain, size) VALUES (9, 'x', x'00', 0, 'junk')",
                   [()] * 150)
    db.commit()
    db.close()
    sp = Spool(path)
    sp.available.set()
    assert sp.peek() is None and not sp.available.is_set()
    assert sp.dropped() == 150 and len(sp) == 0 and sp.size_bytes() == 0
    sp.close()


class _Link:
    def __init__(self) -> None:
        self.connected = threading.Event()
        self.connected.set()
        self.sent: list[tuple[str, bytes]] = []
        self.got = threading.Event()

    def publish_wait(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, *, key=None) -> None:
        self.sent.append((topic, payload))
        self.got.set()


def _run_sender(spool: object, link: _Link) -> tuple[threading.Event, threading.Thread]:
    stop = threading.Event()
    fake = SimpleNamespace(_stop=stop, link=link, spool=spool, _upload_capture=lambda: False)
    t = threading.Thread(target=Agent._sender_loop, args=(fake,), daemon=True)
    t.start()
    return stop, t


def test_the_sender_survives_an_unexpected_error_and_delivers_what_follows(tmp_path, caplog):
    sp = Spool(tmp_path / "spool.sqlite")
    sp.push(Priority.STATUS, "t/status", b"hello")
    real_peek, calls = sp.peek, []

    def peek():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real_peek()

    sp.peek = peek  # type: ignore[method-assign]
    link = _Link()
    with caplog.at_level(logging.ERROR, logger="agent.daemon"):
        stop, t = _run_sender(sp, link)
        try:
            assert link.got.wait(5.0), "the sender died on the first error"
            assert t.is_alive()
        finally:
            stop.set()
            sp.available.set()
            t.join(5.0)
    assert not t.is_alive()  # stop() still ends it
    assert link.sent == [("t/status", b"hello")] and len(sp) == 0
    errors = [r for r in caplog.records if "boom" in str(r.exc_info and r.exc_info[1])]
    assert len(errors) == 1
    sp.close()


def test_the_sender_delivers_past_a_bad_row(tmp_path):
    """The reviewer's case end to end at the sender: a row with priority 9 first."""
    path = tmp_path / "spool.sqlite"
    Spool(path).close()
    _insert(path, "INSERT INTO records(priority, topic, payload, retain, size) VALUES (9, 'x', x'00', 0, 40)")
    sp = Spool(path)
    sp.push(Priority.STATUS, "t/status", b"hello")
    link = _Link()
    stop, t = _run_sender(sp, link)
    try:
        assert link.got.wait(5.0)
        assert t.is_alive()
    finally:
        stop.set()
        sp.available.set()
        t.join(5.0)
    assert link.sent == [("t/status", b"hello")] and sp.dropped() == 1
    sp.close()


def test_an_agent_whose_spool_has_another_schema_starts_and_serves(bench):
    """The reviewer's r_spool_schema.sh: ``agent run`` must not die at spool open."""
    from agent.daemon import status_from_disk

    tp, man, *_ = bench.bundle("1.0.0")
    a = bench.agent("schema")
    bench.deploy("schema", "d1", tp, man.ref)
    assert bench.wait_for(a, "d1") == "installed"
    a.stop()
    bench.agents.remove(a)
    spool = a.settings.data_dir / "spool.sqlite"
    for p in spool.parent.glob("spool.sqlite*"):
        p.unlink()
    _insert(spool, "CREATE TABLE records(id INTEGER PRIMARY KEY, priority INT, topic TEXT, payload BLOB, retain INT)")
    st = status_from_disk(a.settings.data_dir)  # a reader reports it and moves nothing
    assert "unreadable" in st["spool_error"] and not list(spool.parent.glob("spool.sqlite.unreadable-*"))
    a = bench.agent("schema")
    assert a.model_ref == man.ref
    assert "spool_reset" in a._conditions
    assert list(spool.parent.glob("spool.sqlite.unreadable-*"))


def _counts(sp: Spool) -> dict[str, int]:
    return {k: v for k, v in sp.counters().items() if k.startswith(("dropped.", "delivered"))}


def test_the_record_being_sent_is_evicted_last_in_its_priority(tmp_path):
    sp = Spool(tmp_path / "spool.sqlite", max_bytes=1000)
    sp.push(Priority.METRICS, "t", b"a" * 400)
    sp.push(Priority.METRICS, "t", b"b" * 400)
    rec = sp.peek()  # the sender has "a" on its way to the broker
    sp.push(Priority.METRICS, "t", b"c" * 400)  # over the bound: one record must go
    sp.ack(rec.id)
    assert _counts(sp) == {"dropped.metrics": 1, "delivered": 1}  # "b" went, not the one in flight
    assert sp.peek().payload == b"c" * 400


def test_a_record_evicted_while_being_sent_and_then_acknowledged_counts_as_delivered(tmp_path):
    # Before: it counted as dropped and the broker had it all the same (review).
    sp = Spool(tmp_path / "spool.sqlite", max_bytes=500)
    sp.push(Priority.METRICS, "t", b"a" * 400)
    rec = sp.peek()
    sp.push(Priority.STATUS, "t", b"s" * 400)  # only "a" can make room for it
    assert sp.counters().get("dropped.metrics") == 1
    sp.ack(rec.id)
    assert _counts(sp) == {"dropped.metrics": 0, "delivered": 1}
    assert sp.peek().payload == b"s" * 400
