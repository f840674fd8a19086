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

__all__ = ["Priority", "Record", "SchemaMismatch", "Spool"]

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


class SchemaMismatch(sqlite3.DatabaseError):
    """A readable SQLite file whose tables are not the spool's (a column missing, another
    layout): the agent cannot use it, so it is handled like a damaged file."""


# The columns the spool reads and writes. Others may exist if an insert can leave them out.
_RECORDS_COLUMNS = ("id", "priority", "topic", "payload", "retain", "size")
_COUNTERS_COLUMNS = ("name", "value")
# A record's size as the byte count takes it: a number, never negative (a row written by
# something else may hold text or NULL there).
_SIZE = "MAX(COALESCE(CAST(size AS INTEGER), 0), 0)"
_PEEK_BATCH = 64
_PRIORITIES = frozenset(int(p) for p in Priority)


def _check_schema(db: sqlite3.Connection) -> None:
    """Raise ``SchemaMismatch`` unless ``records`` and ``counters`` are usable."""
    for table, needed in (("records", _RECORDS_COLUMNS), ("counters", _COUNTERS_COLUMNS)):
        # (cid, name, type, notnull, default, pk) per column; no rows when there is no table
        cols = {r[1].lower(): r for r in db.execute(f"PRAGMA table_info({table})").fetchall()}
        if not cols:
            raise SchemaMismatch(f"no {table} table")
        missing = [c for c in needed if c not in cols]
        if missing:
            raise SchemaMismatch(f"{table} table has no column {', '.join(missing)}")
        extra = [n for n, r in cols.items() if n not in needed and r[3] and r[4] is None and not r[5]]
        if extra:
            raise SchemaMismatch(f"{table} table has a required column {', '.join(extra)} the spool does not fill")
        pk = [n for n, r in cols.items() if r[5]]
        key = "id" if table == "records" else "name"
        if pk != [key] or (table == "records" and str(cols["id"][2]).upper() != "INTEGER"):
            raise SchemaMismatch(f"{table} table is not keyed by {key}")


def _decode(row: tuple) -> Record:
    """A record from ``(id, priority, topic, payload, retain)``; ValueError when a value is
    not one the spool writes (a priority out of range, a topic that is not text, ...)."""
    rid, prio, topic, payload, retain = row
    if not isinstance(prio, int) or prio not in _PRIORITIES:
        raise ValueError(f"priority {prio!r}")
    if not isinstance(topic, str) or not topic:
        raise ValueError(f"topic {topic!r:.40}")
    if not isinstance(payload, bytes):
        raise ValueError(f"payload of type {type(payload).__name__}")
    if retain not in (0, 1):
        raise ValueError(f"retain {retain!r:.40}")
    return Record(rid, Priority(prio), topic, payload, bool(retain))


def _damaged(e: sqlite3.DatabaseError) -> bool:
    """True when SQLite says the file is not a database or is corrupt, or the file is a
    database whose tables are not the spool's (and only then)."""
    if isinstance(e, SchemaMismatch):
        return True
    code = getattr(e, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    text = str(e)
    return "not a database" in text or "malformed" in text


class Spool:
    """``reset_reason`` is set when the file on disk was not a readable spool (damaged, or
    a database with other tables than the spool's): it is then set aside (``spool.sqlite.unreadable-<unix time>``) and the spool starts empty,
    rather than keep the agent from starting."""

    def __init__(self, path: Path, max_bytes: int = 8 << 20, *, set_aside: bool = True):
        """``set_aside=False`` (readers such as ``edgefleet agent status``) raises
        ``sqlite3.DatabaseError`` (``SchemaMismatch`` for other tables) for a damaged file instead of moving it, and writes
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
        # Existing tables are kept as they are: check that they are the spool's before any
        # statement that needs their columns.
        _check_schema(self._db)
        if writer:
            # The spool's identity: a new one for every new file (53 bits, exact in JSON).
            # A lock held by another process or a full disk must not keep the agent from
            # starting: reports then go without an epoch (the hub compares seq as before).
            try:
                self._db.execute("INSERT OR IGNORE INTO counters(name, value) VALUES('spool.epoch', ?)",
                                 (secrets.randbits(53),))
            except sqlite3.OperationalError as e:
                log.warning("spool: no epoch written: %s", e)
        self._bytes = self._db.execute(f"SELECT COALESCE(SUM({_SIZE}), 0) FROM records").fetchone()[0]
        # The record peek() last handed to the sender: evicted last within its priority,
        # and if evicted all the same while it was being sent, its drop is taken back
        # when the broker acknowledges it (it was delivered, not lost).
        self._sending: int | None = None
        self._sending_dropped: str | None = None  # the counter its eviction bumped
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
                f"SELECT id, {_SIZE} FROM records WHERE priority = ? ORDER BY id = ?, id",
                (int(prio), -1 if self._sending is None else self._sending),
            ).fetchall()
            dropped = []
            for rid, size in rows:
                if self._bytes <= self.max_bytes:
                    break
                dropped.append(rid)
                self._bytes -= size
            if dropped:
                counter = f"dropped.{prio.name.lower()}"
                self._db.executemany("DELETE FROM records WHERE id = ?", [(r,) for r in dropped])
                self._bump(counter, len(dropped))
                if self._sending in dropped:
                    self._sending_dropped = counter
            if self._bytes <= self.max_bytes:
                return

    def peek(self) -> Record | None:
        """The oldest record, or None when empty.

        Rows that cannot be decoded (written by something else, or damaged in a way SQLite
        does not notice) are deleted on the way and counted as ``dropped.undecodable``:
        one such row must not stop every record behind it."""
        limit = 1  # the usual case: the oldest row decodes; batches only past bad ones
        with self._lock:
            while True:
                rows = self._db.execute(
                    f"SELECT id, priority, topic, payload, retain, {_SIZE} FROM records ORDER BY id LIMIT ?",
                    (limit,),
                ).fetchall()
                if not rows:
                    self.available.clear()
                    return None
                if limit == 1:
                    try:
                        rec = _decode(rows[0][:5])
                    except ValueError:
                        limit = _PEEK_BATCH  # read on in batches, dropping the bad rows together
                        continue
                    self._sending, self._sending_dropped = rec.id, None
                    return rec
                bad: list[tuple[int, int]] = []
                first_error = ""
                found: Record | None = None
                for row in rows:
                    try:
                        found = _decode(row[:5])
                        break
                    except ValueError as e:
                        bad.append((row[0], row[5]))
                        first_error = first_error or f"record {row[0]}: {e}"
                if bad:
                    self._drop_undecodable(bad, first_error)
                if found is not None:
                    self._sending, self._sending_dropped = found.id, None
                    return found

    def _drop_undecodable(self, bad: list[tuple[int, int]], first_error: str) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany("DELETE FROM records WHERE id = ?", [(rid,) for rid, _ in bad])
            self._bump("dropped.undecodable", len(bad))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._bytes = max(self._bytes - sum(size for _, size in bad), 0)
        log.warning("spool: dropped %d record(s) that could not be decoded (%s)", len(bad), first_error)

    def ack(self, record_id: int) -> None:
        """The broker has the record: delete it (and count it delivered)."""
        with self._lock:
            row = self._db.execute(f"SELECT {_SIZE} FROM records WHERE id = ?", (record_id,)).fetchone()
            if row is not None:
                self._db.execute("DELETE FROM records WHERE id = ?", (record_id,))
                self._bytes -= row[0]
                self._bump("delivered", 1)
            elif record_id == self._sending and self._sending_dropped is not None:
                # Evicted while it was being sent, and delivered all the same.
                self._bump(self._sending_dropped, -1)
                self._bump("delivered", 1)
            if record_id == self._sending:
                self._sending = self._sending_dropped = None

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
        return sum(v for k, v in self.counters().items() if k.startswith("dropped.") and isinstance(v, int))

    def size_bytes(self) -> int:
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM records").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
