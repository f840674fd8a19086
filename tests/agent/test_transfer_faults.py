"""Transfers against repositories that answer wrongly: HTTP servers that ignore or
misreport Range requests, MQTT frames for another range, damaged resume journals, and
a bandwidth cap that must not keep a stopping agent waiting."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from agent.errors import TransferError
from agent.protocol import ChunkHeader, encode_frame
from agent.transfer import HttpRepoClient, RepoClient, TransferSettings, _journal_chunks

BODY = os.urandom(300_000)
HAVE = 100_000  # bytes an earlier, interrupted attempt left in the .part file


class RangeServer:
    """A real HTTP server for ``BODY``; ``mode`` says how it answers a Range request:
    ``ok`` (206 with the asked range), ``ignore`` (200 with the whole file), or
    ``content_range`` (206 with the asked bytes but ``content_range`` as its header,
    ``None`` for no header)."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.content_range: str | None = None
        self.ranges: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                rng = self.headers.get("Range")
                server.ranges.append(rng)
                if rng is None or server.mode == "ignore":
                    body = BODY
                    self.send_response(200)
                else:
                    start = int(rng.removeprefix("bytes=").rstrip("-"))
                    body = BODY[start:]
                    self.send_response(206)
                    if server.mode == "ok":
                        self.send_header("Content-Range", f"bytes {start}-{len(BODY) - 1}/{len(BODY)}")
                    elif server.content_range is not None:
                        self.send_header("Content-Range", server.content_range)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:  # the client gave up (a cancelled download)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/repository/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[RangeServer]:
    s = RangeServer()
    yield s
    s.close()


def _interrupted(tmp_path: Path, prefix: bytes = BODY[:HAVE]) -> Path:
    dest = tmp_path / "m.efb"
    (tmp_path / "m.efb.part").write_bytes(prefix)
    return dest


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# -- HttpRepoClient -------------------------------------------------------------------


def test_http_resume_answered_with_the_whole_file_starts_the_part_over(tmp_path, server):
    server.mode = "ignore"
    dest = _interrupted(tmp_path, b"\xff" * HAVE)  # bytes that must not survive
    client = HttpRepoClient(server.url, TransferSettings(timeout_s=1))
    client.download("targets/m.efb", dest, len(BODY))
    assert server.ranges == [f"bytes={HAVE}-"]
    assert _sha(dest) == hashlib.sha256(BODY).hexdigest()
    assert not (tmp_path / "m.efb.part").exists()


def test_http_whole_file_answer_is_still_bounded_by_the_signed_length(tmp_path, server):
    server.mode = "ignore"
    dest = _interrupted(tmp_path)
    client = HttpRepoClient(server.url, TransferSettings(timeout_s=1))
    with pytest.raises(TransferError, match="longer than the 200000 bytes"):
        client.download("targets/m.efb", dest, 200_000)
    assert not dest.exists()


def test_http_resume_with_a_matching_content_range_fetches_only_the_rest(tmp_path, server):
    dest = _interrupted(tmp_path)
    client = HttpRepoClient(server.url, TransferSettings(timeout_s=1))
    client.download("targets/m.efb", dest, len(BODY))
    assert _sha(dest) == hashlib.sha256(BODY).hexdigest()
    assert client.bytes_received == len(BODY) - HAVE


@pytest.mark.parametrize("content_range, match", [
    (f"bytes 0-{len(BODY) - HAVE - 1}/{len(BODY)}", "asked for bytes 100000- but the server sent"),
    (f"bytes {HAVE + 1}-{len(BODY) - 1}/{len(BODY)}", "asked for bytes 100000- but the server sent"),
    (f"bytes {HAVE}-{len(BODY) - 1}/999999", "for a 999999-byte file, not the 300000 bytes"),
    (f"bytes {HAVE}-{len(BODY)}/{len(BODY)}", "not within the 300000-byte file"),
    ("bytes */300000", "unreadable Content-Range"),
    (None, "unreadable Content-Range None"),
])
def test_http_206_for_another_range_is_refused(tmp_path, server, content_range, match):
    server.mode = "content_range"
    server.content_range = content_range
    dest = _interrupted(tmp_path)
    client = HttpRepoClient(server.url, TransferSettings(timeout_s=1))
    with pytest.raises(TransferError, match=match):
        client.download("targets/m.efb", dest, len(BODY))
    assert not dest.exists()
    assert (tmp_path / "m.efb.part").read_bytes() == BODY[:HAVE]  # nothing appended


def test_http_bandwidth_cap_gives_way_to_cancel(tmp_path, server):
    """At 1000 B/s the first 256 KiB block "owes" minutes of sleep; a stop must not wait."""
    client = HttpRepoClient(server.url, TransferSettings(timeout_s=1, bandwidth_bytes_per_s=1000.0))
    cancel = threading.Event()
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            client.download("targets/m.efb", tmp_path / "m.efb", len(BODY), cancel=cancel)
        except TransferError as e:
            outcome["error"] = str(e)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    time.sleep(0.3)
    cancelled_at = time.monotonic()
    cancel.set()
    worker.join(4)
    assert not worker.is_alive(), "download still sleeping 4 s after cancel"
    assert time.monotonic() - cancelled_at < 1.5
    assert outcome == {"error": "targets/m.efb: transfer cancelled"}


def test_http_bandwidth_cap_still_paces_a_download(tmp_path, server):
    settings = TransferSettings(timeout_s=1, chunk_size=64 * 1024, bandwidth_bytes_per_s=600_000.0)
    client = HttpRepoClient(server.url, settings)
    t0 = time.monotonic()
    client.download("targets/m.efb", tmp_path / "m.efb", len(BODY))
    assert time.monotonic() - t0 >= 0.4  # 300 kB at 600 kB/s, less the first block
    assert _sha(tmp_path / "m.efb") == hashlib.sha256(BODY).hexdigest()


# -- RepoClient (MQTT) ----------------------------------------------------------------

SMALL = os.urandom(5 * 1024 + 100)
CS = 1024


class FakeHub:
    """Answers each repo/get by handing a chunk frame to the client's ``on_frame`` on
    another thread, as the MQTT network thread does. ``misroute`` maps an offset to the
    (offset, path) the first answer for it claims; later answers are right."""

    def __init__(self, misroute: dict[int, tuple[int, str]] | None = None) -> None:
        self.misroute = dict(misroute or {})
        self.offsets: list[int] = []
        self.client: RepoClient | None = None

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        req = json.loads(payload)
        self.offsets.append(req["offset"])
        off, path = self.misroute.pop(req["offset"], (req["offset"], req["path"]))
        frame = encode_frame(
            ChunkHeader(rid=req["rid"], path=path, offset=off, total=len(SMALL)),
            SMALL[off: off + req["length"]],
        )
        assert self.client is not None
        threading.Thread(target=self.client.on_frame, args=(frame,), daemon=True).start()


def _mqtt_client(hub: FakeHub) -> RepoClient:
    hub.client = RepoClient("dev1", hub, TransferSettings(chunk_size=CS, timeout_s=0.3))
    return hub.client


@pytest.mark.parametrize("claims", [
    (0, "targets/x.efb"),  # our rid, but the bytes of offset 0
    (2 * CS, "targets/other.efb"),  # our rid and offset, but another file
])
def test_mqtt_chunk_frame_for_another_range_is_dropped_and_asked_again(tmp_path, claims):
    hub = FakeHub({2 * CS: claims})
    client = _mqtt_client(hub)
    dest = tmp_path / "x.efb"
    client.download("targets/x.efb", dest, len(SMALL))
    assert _sha(dest) == hashlib.sha256(SMALL).hexdigest()
    assert hub.offsets.count(2 * CS) == 2  # re-requested after the timeout
    assert client.frames_rejected == 1


def test_mqtt_fetch_bytes_drops_a_frame_for_another_offset(tmp_path):
    hub = FakeHub({CS: (0, "targets/x.efb")})
    client = _mqtt_client(hub)
    assert client.fetch_bytes("targets/x.efb", len(SMALL)) == SMALL
    assert hub.offsets.count(CS) == 2
    assert client.frames_rejected == 1


@pytest.mark.parametrize("line", [
    "9" * 5000,  # past int()'s 4300-digit limit
    "\u00b2",  # superscript two: str.isdigit() but not int()
    "\u0661",  # Arabic-Indic one: int() reads it, but no agent writes it
    "0" * 12 + "3",  # thirteen digits
])
def test_mqtt_resume_ignores_journal_lines_that_are_not_chunk_indices(tmp_path, line):
    head = f"chunks {CS} {len(SMALL)}\n"
    journal = tmp_path / "x.efb.part.done"
    journal.write_text(f"{head}0\n1\n{line}\n", encoding="utf-8")
    assert _journal_chunks(journal, head, 6) == {0, 1}
    (tmp_path / "x.efb.part").write_bytes(SMALL[: 2 * CS])
    hub = FakeHub()
    dest = tmp_path / "x.efb"
    _mqtt_client(hub).download("targets/x.efb", dest, len(SMALL))
    assert _sha(dest) == hashlib.sha256(SMALL).hexdigest()
    assert sorted(hub.offsets) == [2 * CS, 3 * CS, 4 * CS, 5 * CS]  # 0 and 1 kept
