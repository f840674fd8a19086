"""Artifact and metadata transfer from the hub's repository over MQTT.

The agent asks for byte ranges (:class:`~agent.protocol.RepoRequest` on its
``repo/get`` topic) and the hub answers with chunk frames on ``repo/data``. Up to
``window`` requests are outstanding at once (flow control); a request that gets no
answer within ``timeout`` is sent again, so lost QoS0 messages, broker restarts and
disconnects only cost the chunks in flight.

Downloads are resumable across restarts: chunk data goes straight to ``<dest>.part``
at its offset and, once it is on disk (``fdatasync``), the chunk's index is appended to
``<dest>.part.done``. The journal starts with the chunk size and file length it was
written for; a journal for other ones (a changed ``chunk_size`` setting) is discarded,
and so is a last line cut short by power loss. On restart only the missing chunks are
requested. The whole file is then checked against signed TUF metadata by the caller,
which fetches it once more from scratch if it does not match. Memory stays bounded by
``window × chunk_size``.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, TextIO

from agent import topics
from agent.errors import DiskSpaceError, PayloadError, TransferError
from agent.protocol import ChunkHeader, RepoRequest, decode_frame, encode

__all__ = ["Publisher", "TransferSettings", "RepoClient", "HttpRepoClient", "NotFound"]

log = logging.getLogger(__name__)

# A journal line: a chunk index in ASCII digits. Twelve digits are far more chunks than
# any artifact has, and keep int() away from huge or non-ASCII ("²") digit strings.
_JOURNAL_LINE = re.compile(r"[0-9]{1,12}")
# A Content-Range answer to "Range: bytes=N-": "bytes START-END/TOTAL", TOTAL may be "*".
_CONTENT_RANGE = re.compile(r"bytes ([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19}|\*)")


def _journal_chunks(journal: Path, head: str, n_chunks: int) -> set[int]:
    """Chunks a resumable download's journal lists as written; empty when the journal is
    missing, unreadable, or was written for another chunk size or length. A line without
    its newline (cut short by power loss) does not count."""
    try:
        text = journal.read_text()
    except (OSError, UnicodeDecodeError):
        return set()
    if not text.startswith(head):
        return set()
    done: set[int] = set()
    for line in text[len(head):].splitlines(keepends=True):
        if line.endswith("\n") and _JOURNAL_LINE.fullmatch(line[:-1]) and int(line[:-1]) < n_chunks:
            done.add(int(line[:-1]))
    return done


def _restart_journal(journal: Path, head: str, done: set[int]) -> TextIO:
    """The journal, written anew from the chunks it listed and open for appending: a
    line cut short by power loss must not be continued by the next entry ("1" then
    "5\n" would list chunk 15)."""
    jfh = open(journal, "w")  # noqa: SIM115 - returned open, closed by the caller's with
    jfh.write(head + "".join(f"{i}\n" for i in sorted(done)))
    jfh.flush()
    return jfh


def _pause(seconds: float, cancel: threading.Event | None, path: str) -> None:
    """Sleep ``seconds`` in slices of at most a second, so that a stopping agent is not
    kept waiting by a bandwidth cap. Raises TransferError when ``cancel`` is set."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if cancel is None:
            time.sleep(min(left, 1.0))
        elif cancel.wait(min(left, 1.0)):
            raise TransferError(f"{path}: transfer cancelled")


def _check_content_range(path: str, value: str | None, start: int, length: int) -> None:
    """Check a 206 answer to ``Range: bytes=<start>-`` for a ``length``-byte file: its
    Content-Range must start at ``start`` and, where it gives one, name ``length`` as
    the file's size. Raises TransferError saying what the server sent instead."""
    m = _CONTENT_RANGE.fullmatch((value or "").strip())
    if m is None:
        raise TransferError(
            f"GET {path}: 206 answer to Range bytes={start}- has an unreadable Content-Range {value!r}"
        )
    first, last, total = int(m[1]), int(m[2]), m[3]
    if first != start:
        raise TransferError(
            f"GET {path}: asked for bytes {start}- but the server sent Content-Range {value!r}"
        )
    if total != "*" and int(total) != length:
        raise TransferError(
            f"GET {path}: Content-Range {value!r} is for a {total}-byte file, "
            f"not the {length} bytes signed for it"
        )
    if last < first or last >= length:
        raise TransferError(
            f"GET {path}: Content-Range {value!r} is not within the {length}-byte file"
        )


class Publisher(Protocol):
    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> object: ...


class NotFound(TransferError):
    """The repository does not have the requested path."""


@dataclass(frozen=True)
class TransferSettings:
    chunk_size: int = 256 * 1024
    window: int = 4
    timeout_s: float = 5.0
    max_attempts_per_chunk: int = 30
    bandwidth_bytes_per_s: float | None = None  # None: no cap


class RepoClient:
    """Request/response over MQTT for repository bytes. Thread-safe."""

    def __init__(self, device_id: str, publisher: Publisher, settings: TransferSettings | None = None):
        self.device_id = device_id
        self.publisher = publisher
        self.settings = settings or TransferSettings()
        self._waiters: dict[str, queue.Queue[tuple[ChunkHeader, bytes]]] = {}
        self._lock = threading.Lock()
        self.bytes_received = 0
        self.frames_rejected = 0

    # Called from the MQTT network thread for every repo/data message.
    def on_frame(self, payload: bytes) -> None:
        try:
            header, data = decode_frame(payload, limit=max(self.settings.chunk_size, 1 << 20))
        except PayloadError as e:
            self.frames_rejected += 1
            log.warning("rejected repository frame: %s", e)
            return
        self.bytes_received += len(data)
        with self._lock:
            q = self._waiters.get(header.rid)
        if q is not None:
            q.put((header, data))

    def _request(self, path: str, offset: int, length: int) -> tuple[str, queue.Queue]:
        rid = uuid.uuid4().hex[:16]
        q: queue.Queue[tuple[ChunkHeader, bytes]] = queue.Queue()
        with self._lock:
            self._waiters[rid] = q
        req = RepoRequest(rid=rid, path=path, offset=offset, length=length)
        topic = topics.device_topic(self.device_id, "repo/get")
        self.publisher.publish(topic, encode(req), qos=topics.QOS["repo/get"])
        return rid, q

    def _forget(self, rid: str) -> None:
        with self._lock:
            self._waiters.pop(rid, None)

    def fetch_range(self, path: str, offset: int, length: int) -> tuple[int, bytes]:
        """One range, retried on timeout. Returns (file size, data).

        Raises:
            NotFound: the repository has no such path.
            TransferError: no answer after ``max_attempts_per_chunk`` tries.
        """
        for _attempt in range(self.settings.max_attempts_per_chunk):
            rid, q = self._request(path, offset, length)
            deadline = time.monotonic() + self.settings.timeout_s
            try:
                while True:
                    header, data = q.get(timeout=max(0.0, deadline - time.monotonic()))
                    if self._answers(header, path, offset):
                        break
            except queue.Empty:
                continue
            finally:
                self._forget(rid)
            if header.status == "not_found":
                raise NotFound(f"repository has no {path}")
            if header.status != "ok":
                raise TransferError(f"repository error for {path}: {header.error}")
            return header.total, data
        raise TransferError(f"no answer for {path}@{offset} after {self.settings.max_attempts_per_chunk} tries")

    def _answers(self, header: ChunkHeader, path: str, offset: int) -> bool:
        """Whether a frame carrying our request id is for the path (and, with data, the
        offset) we asked for. One that is not is counted and dropped, so the range is asked
        for again after the timeout instead of landing at the wrong place in the file."""
        if header.path == path and (header.status != "ok" or header.offset == offset):
            return True
        self.frames_rejected += 1
        log.debug("dropped a frame for %s@%d answering a request for %s@%d",
                  header.path, header.offset, path, offset)
        return False

    def fetch_bytes(self, path: str, max_bytes: int) -> bytes:
        """A whole (small) file, e.g. metadata. Raises NotFound, TransferError."""
        total, data = self.fetch_range(path, 0, min(self.settings.chunk_size, max_bytes))
        if total > max_bytes:
            raise TransferError(f"{path} is {total} bytes, over the {max_bytes}-byte limit")
        parts = [data]
        got = len(data)
        while got < total:
            _, more = self.fetch_range(path, got, min(self.settings.chunk_size, total - got))
            if not more:
                raise TransferError(f"{path}: empty chunk at {got} of {total}")
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def download(
        self,
        path: str,
        dest: Path,
        length: int,
        *,
        progress: Callable[[int, int], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> Path:
        """Download ``length`` bytes of ``path`` to ``dest``, resuming a previous attempt.

        Raises:
            DiskSpaceError: not enough free space for ``length`` bytes.
            NotFound: the repository does not have ``path``.
            TransferError: the transfer stalled or the size disagrees with ``length``.
        """
        s = self.settings
        part = dest.with_name(dest.name + ".part")
        journal = dest.with_name(dest.name + ".part.done")
        dest.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(dest.parent).free
        already = part.stat().st_size if part.exists() else 0
        if free + already < length:
            raise DiskSpaceError(f"need {length} bytes for {path}, {free} free in {dest.parent}")

        n_chunks = max(1, -(-length // s.chunk_size))
        head = f"chunks {s.chunk_size} {length}\n"
        done = _journal_chunks(journal, head, n_chunks) if part.exists() else set()
        fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.ftruncate(fd, length)
            with _restart_journal(journal, head, done) as jfh:
                self._run_window(path, fd, jfh, length, n_chunks, done, progress, cancel)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(part, dest)
        journal.unlink(missing_ok=True)
        return dest

    def _run_window(self, path, fd, jfh, length, n_chunks, done, progress, cancel) -> None:
        s = self.settings
        pending = [i for i in range(n_chunks) if i not in done]
        inflight: dict[str, tuple[int, float, int]] = {}  # rid -> (chunk, sent_at, attempts)
        inbox: queue.Queue[tuple[ChunkHeader, bytes]] = queue.Queue()
        attempts: dict[int, int] = {}
        started = time.monotonic()
        received = 0

        def send(i: int) -> None:
            rid = uuid.uuid4().hex[:16]
            with self._lock:
                self._waiters[rid] = inbox
            attempts[i] = attempts.get(i, 0) + 1
            if attempts[i] > s.max_attempts_per_chunk:
                raise TransferError(f"{path}: chunk {i} unanswered after {s.max_attempts_per_chunk} tries")
            inflight[rid] = (i, time.monotonic(), attempts[i])
            off = i * s.chunk_size
            req = RepoRequest(rid=rid, path=path, offset=off, length=min(s.chunk_size, length - off))
            self.publisher.publish(
                topics.device_topic(self.device_id, "repo/get"), encode(req), qos=topics.QOS["repo/get"]
            )

        try:
            while pending or inflight:
                if cancel is not None and cancel.is_set():
                    raise TransferError(f"{path}: transfer cancelled")
                while pending and len(inflight) < s.window:
                    if s.bandwidth_bytes_per_s:
                        ahead = received - s.bandwidth_bytes_per_s * (time.monotonic() - started)
                        if ahead > 0:
                            time.sleep(min(ahead / s.bandwidth_bytes_per_s, 1.0))
                            break
                    send(pending.pop(0))
                try:
                    header, data = inbox.get(timeout=0.2)
                except queue.Empty:
                    header = None
                if header is not None:
                    slot = inflight.get(header.rid)
                    if slot is None:
                        self._forget(header.rid)
                        continue  # late duplicate of a chunk we re-requested
                    if not self._answers(header, path, slot[0] * s.chunk_size):
                        header = None  # stays in flight: asked for again when it times out
                if header is not None:
                    i = inflight.pop(header.rid)[0]
                    off = i * s.chunk_size
                    self._forget(header.rid)
                    if header.status == "not_found":
                        raise NotFound(f"repository has no {path}")
                    want = min(s.chunk_size, length - off)
                    if header.status != "ok" or header.total != length or len(data) != want:
                        raise TransferError(
                            f"{path}: chunk {i} bad (status={header.status}, total={header.total}, "
                            f"{len(data)} of {want} bytes); expected a {length}-byte file"
                        )
                    os.pwrite(fd, data, off)
                    # The chunk reaches the disk before the journal says so: after a power
                    # loss, a chunk the journal lists is whole.
                    os.fdatasync(fd)
                    jfh.write(f"{i}\n")
                    jfh.flush()
                    done.add(i)
                    received += len(data)
                    if progress is not None:
                        progress(len(done), n_chunks)
                now = time.monotonic()
                for rid, (i, sent, _n) in list(inflight.items()):
                    if now - sent > s.timeout_s:
                        inflight.pop(rid)
                        self._forget(rid)
                        pending.insert(0, i)
        finally:
            for rid in inflight:
                self._forget(rid)


class HttpRepoClient:
    """The same repository reads over HTTP(S) from the hub, with Range requests.

    ``base_url`` is the hub's repository root, e.g. ``http://hub:8080/api/v1/repository/``.
    Downloads resume from the length of ``<dest>.part`` after a disconnect or restart.
    """

    def __init__(self, base_url: str, settings: TransferSettings | None = None):
        self.base_url = base_url.rstrip("/") + "/"
        self.settings = settings or TransferSettings()
        self.bytes_received = 0

    def _open(self, path: str, start: int = 0):
        import urllib.error
        import urllib.request

        req = urllib.request.Request(self.base_url + path)
        if start:
            req.add_header("Range", f"bytes={start}-")
        try:
            return urllib.request.urlopen(req, timeout=self.settings.timeout_s * 4)
        except urllib.error.HTTPError as e:
            if e.code == 404:
                raise NotFound(f"repository has no {path}") from e
            raise TransferError(f"GET {path}: HTTP {e.code}") from e
        except (urllib.error.URLError, OSError) as e:
            raise TransferError(f"GET {path}: {e}") from e

    def fetch_bytes(self, path: str, max_bytes: int) -> bytes:
        """A whole (small) file. Raises NotFound, TransferError."""
        with self._open(path) as resp:
            try:
                data = resp.read(max_bytes + 1)
            except OSError as e:
                raise TransferError(f"GET {path}: {e}") from e
        if len(data) > max_bytes:
            raise TransferError(f"{path} is over the {max_bytes}-byte limit")
        self.bytes_received += len(data)
        return bytes(data)

    def download(self, path: str, dest: Path, length: int, *,
                 progress: Callable[[int, int], None] | None = None,
                 cancel: threading.Event | None = None) -> Path:
        """Download ``length`` bytes of ``path`` to ``dest``, resuming a previous attempt.

        Raises:
            DiskSpaceError, NotFound, TransferError: as :meth:`RepoClient.download`; also
                TransferError for a 206 answer whose Content-Range is not the range asked.
        """
        part = dest.with_name(dest.name + ".part")
        journal = dest.with_name(dest.name + ".part.done")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if journal.exists():  # chunks from an MQTT attempt are not contiguous: start over
            journal.unlink()
            part.unlink(missing_ok=True)
        have = part.stat().st_size if part.exists() else 0
        if have > length:
            part.unlink()
            have = 0
        if shutil.disk_usage(dest.parent).free < length - have:
            raise DiskSpaceError(f"need {length - have} more bytes for {path} in {dest.parent}")
        if have < length:
            with self._open(path, have) as resp:
                if have and resp.status == 200:
                    # No Range support: the body is the whole file, so it replaces the part.
                    log.info("GET %s: server answered bytes=%d- with the whole file; "
                             "starting over", path, have)
                    have = 0
                elif have and resp.status == 206:
                    _check_content_range(path, resp.headers.get("Content-Range"), have, length)
                elif resp.status != 200:
                    raise TransferError(f"GET {path}: unexpected HTTP {resp.status}")
                with open(part, "ab" if have else "wb") as out:
                    self._copy(path, resp, out, have, length, progress, cancel)
        if part.stat().st_size != length:
            raise TransferError(f"{path}: got {part.stat().st_size} of {length} bytes")
        os.replace(part, dest)
        return dest

    def _copy(self, path: str, resp: BinaryIO, out: BinaryIO, have: int, length: int,
              progress: Callable[[int, int], None] | None,
              cancel: threading.Event | None) -> None:
        """Append the response body to ``out`` (which holds ``have`` bytes), up to
        ``length`` bytes in all and within the bandwidth cap, then flush it to disk.
        Raises TransferError: a read failed, the body is too long, or ``cancel`` was set."""
        s = self.settings
        started, got = time.monotonic(), 0
        while True:
            if cancel is not None and cancel.is_set():
                raise TransferError(f"{path}: transfer cancelled")
            try:
                block = resp.read(s.chunk_size)
            except OSError as e:
                raise TransferError(f"GET {path}: {e}") from e
            if not block:
                break
            if have + got + len(block) > length:
                raise TransferError(f"{path} is longer than the {length} bytes signed for it")
            out.write(block)
            got += len(block)
            self.bytes_received += len(block)
            if progress is not None:
                progress(have + got, length)
            if s.bandwidth_bytes_per_s:
                ahead = got / s.bandwidth_bytes_per_s - (time.monotonic() - started)
                if ahead > 0:
                    _pause(ahead, cancel, path)
        out.flush()
        os.fsync(out.fileno())
