"""The outbound spool: SQLite-backed, bounded in bytes, delivered in order.

Everything the agent reports (status, drift, metrics) goes through the spool, so a
device that is offline for hours loses nothing it has room for, and a restart loses
nothing at all. Records are delivered in the order they were written. When the spool
is over its byte bound, the oldest records of the lowest priority are dropped first
(metrics, then drift; lifecycle status last), and every drop is counted.
"""

from __future__ import annotations

import logging
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from agent.slots import set_aside_unreadable

__all__ = ["Priority", "Record", "Spool"]

log = logging.getLogger(__name__)


class Priority(IntEnum):
    METRICS = 0
    DRIFT = 1
    STATUS = 2


@dataclass(frozen=True)
class Record:
    id: int
    priority: Priority
    topic: str
    payload: bytes
    retain: bool


_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26


def _damaged(e: sqlite3.DatabaseError) -> bool:
    """True when SQLite says the file is not a database or is corrupt (and only then)."""
    code = getattr(e, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    text = str(e)
    return "not a database" in text or "malformed" in text


class Spool:
    """``reset_reason`` is set when the file on disk was not a readable spool: it is then
    set aside (``spool.sqlite.unreadable-<unix time>``) and the spool starts empty,
    rather than keep the agent from starting."""

    def __init__(self, path: Path, max_bytes: int = 8 << 20, *, set_aside: bool = True):
        """``set_aside=False`` (readers such as ``edgefleet agent status``) raises
        ``sqlite3.DatabaseError`` for a damaged file instead of moving it, and writes
        nothing. Errors other than damage (the database locked by another process, a
        full disk, I/O) are raised either way: the file may be fine."""
        self.path = path
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self.reset_reason: str | None = None
        try:
            self._open(writer=set_aside)
        except sqlite3.DatabaseError as e:
            db = getattr(self, "_db", None)
            if db is not None:
                db.close()
            if not set_aside or not _damaged(e):
                raise
            aside = set_aside_unreadable(path, "-wal", "-shm")
            self.reset_reason = f"{path.name} was unreadable ({e}); set aside as {aside.name}, started empty"
            log.error("spool: %s", self.reset_reason)
            self._open(writer=True)
        self.available = threading.Event()
        if self._bytes:
            self.available.set()

    def _open(self, *, writer: bool) -> None:
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        if writer:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS records (id INTEGER PRIMARY KEY AUTOINCREMENT,"
                " priority INTEGER NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL,"
                " retain INTEGER NOT NULL DEFAULT 0, size INTEGER NOT NULL)"
            )
            self._db.execute("CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER)")
            # The spool's identity: a new one for every new file (53 bits, exact in JSON).
            # A lock held by another process or a full disk must not keep the agent from
            # starting: reports then go without an epoch (the hub compares seq as before).
            try:
                self._db.execute("INSERT OR IGNORE INTO counters(name, value) VALUES('spool.epoch', ?)",
                                 (secrets.randbits(53),))
            except sqlite3.OperationalError as e:
                log.warning("spool: no epoch written: %s", e)
        self._bytes = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM records").fetchone()[0]
        row = self._db.execute("SELECT value FROM counters WHERE name = 'spool.epoch'").fetchone()
        self.epoch: int | None = None if row is None else row[0]

    def _bump(self, name: str, n: int) -> None:
        self._db.execute(
            "INSERT INTO counters(name, value) VALUES(?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            (name, n),
        )

    def push(self, priority: Priority, topic: str, payload: bytes, *, retain: bool = False) -> None:
        size = len(payload) + len(topic) + 32
        with self._lock:
            before = self._bytes
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO records(priority, topic, payload, retain, size) VALUES(?,?,?,?,?)",
                    (int(priority), topic, payload, int(retain), size),
                )
                self._bytes += size
                if self._bytes > self.max_bytes:
                    self._evict()
                self._db.execute("COMMIT")
            except BaseException:
                self._bytes = before  # the byte count follows the rows, which rolled back
                self._db.execute("ROLLBACK")
                raise
        self.available.set()

    def _evict(self) -> None:
        for prio in sorted(Priority):
            rows = self._db.execute(
                "SELECT id, size FROM records WHERE priority = ? ORDER BY id", (int(prio),)
            ).fetchall()
            dropped = []
            for rid, size in rows:
                if self._bytes <= self.max_bytes:
                    break
                dropped.append(rid)
                self._bytes -= size
            if dropped:
                self._db.executemany("DELETE FROM records WHERE id = ?", [(r,) for r in dropped])
                self._bump(f"dropped.{prio.name.lower()}", len(dropped))
            if self._bytes <= self.max_bytes:
                return

    def peek(self) -> Record | None:
        """The oldest record, or None when empty."""
        with self._lock:
            row = self._db.execute(
                "SELECT id, priority, topic, payload, retain FROM records ORDER BY id LIMIT 1"
            ).fetchone()
            if row is None:
                self.available.clear()
                return None
        return Record(row[0], Priority(row[1]), row[2], bytes(row[3]), bool(row[4]))

    def ack(self, record_id: int) -> None:
        with self._lock:
            row = self._db.execute("SELECT size FROM records WHERE id = ?", (record_id,)).fetchone()
            if row is not None:
                self._db.execute("DELETE FROM records WHERE id = ?", (record_id,))
                self._bytes -= row[0]
                self._bump("delivered", 1)

    def next_seq(self, name: str) -> int:
        """A persisted, strictly increasing counter (survives restarts) that never falls
        behind the wall clock in milliseconds: each number is the larger of the last
        one + 1 and the clock.

        The hub drops a device's status reports whose ``seq`` is not above the last it
        stored for the same spool (``epoch``), and stores a telemetry window once per
        ``seq``. Following the clock keeps numbers above those already sent when the
        last commits were lost to a power cut (``synchronous=NORMAL``) and while the
        device sends fewer reports than milliseconds pass. A clock that starts behind
        (a board without a real-time clock, before NTP) is caught up with as soon as
        it is set. A new spool file (a new SD card, a reset, an unreadable spool set
        aside) has a new ``epoch``, which tells the hub to start counting again."""
        with self._lock:
            # Two statements, not RETURNING: SQLite before 3.35 (Debian 11) lacks it.
            self._db.execute(
                "INSERT INTO counters(name, value) VALUES(?, ?) "
                "ON CONFLICT(name) DO UPDATE SET value = MAX(value + 1, excluded.value)",
                (name, int(time.time() * 1000)),
            )
            return self._db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()[0]

    def counters(self) -> dict[str, int]:
        with self._lock:
            return dict(self._db.execute("SELECT name, value FROM counters").fetchall())

    def dropped(self) -> int:
        return sum(v for k, v in self.counters().items() if k.startswith("dropped."))

    def size_bytes(self) -> int:
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM records").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
