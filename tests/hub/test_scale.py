"""What keeps the hub and the fleet simulator working at 1,000 devices (issue #4):
sim process sizing, repository chunk caching and superseded chunk requests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent import protocol, topics
from hub.db import Database
from hub.mqtt_ingest import _STOP, REPO_SEND_BUFFER, MqttIngest, _Inbound
from hub.repository import Repository
from hub.sim import SimConfig, process_count


@pytest.mark.parametrize(
    ("devices", "processes", "per_process", "want"),
    [(50, 2, 25, 2), (1000, 4, 25, 40), (1000, 4, 100, 10), (3, 8, 25, 3), (1, 2, 25, 1), (101, 1, 100, 2)],
)
def test_process_count_keeps_agents_per_process_bounded(devices: int, processes: int, per_process: int,
                                                        want: int) -> None:
    cfg = SimConfig(broker_url="mqtt://x", devices=devices, data_dir=Path("."), processes=processes,
                    max_agents_per_process=per_process)
    assert process_count(cfg) == want


def test_read_chunk_caches_and_sees_replaced_files(tmp_path: Path) -> None:
    repo = Repository(tmp_path / "repo", b"pw")
    f = tmp_path / "repo" / "metadata" / "timestamp.json"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(b"first version")
    total, data, digest = repo.read_chunk("metadata/timestamp.json", 0, 5)
    assert (total, data) == (13, b"first")
    assert repo.read_chunk("metadata/timestamp.json", 0, 5) == (total, data, digest)
    tmp = f.with_suffix(".tmp")
    tmp.write_bytes(b"second, longer")
    os.replace(tmp, f)  # how the repository writes metadata: a new inode
    total2, data2, digest2 = repo.read_chunk("metadata/timestamp.json", 0, 5)
    assert (total2, data2) == (14, b"secon") and digest2 != digest
    with pytest.raises(FileNotFoundError):
        repo.read_chunk("metadata/snapshot.json", 0, 5)


def test_repo_loop_answers_only_the_newest_request_per_range(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'hub.db'}")
    db.migrate()
    repo = Repository(tmp_path / "repo", b"pw")
    f = tmp_path / "repo" / "metadata" / "timestamp.json"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(b"0123456789")
    ing = MqttIngest("mqtt://127.0.0.1:1", db, repo)
    sent: list[tuple[str, protocol.ChunkHeader, bytes]] = []
    ing._publish_chunk = lambda topic, frame: sent.append((topic, *protocol.decode_frame(frame)))  # type: ignore[method-assign]

    def req(device: str, rid: str, offset: int) -> _Inbound:
        body = protocol.encode(protocol.RepoRequest(rid=rid, path="metadata/timestamp.json", offset=offset, length=4))
        return _Inbound("repo/get", device, body, None)  # type: ignore[arg-type]

    for item in (req("d1", "old", 0), req("d2", "other", 0), req("d1", "d1-second", 4), req("d1", "new", 0),
                 _STOP):
        ing._repo_q.put(item)
    ing._repo_loop()
    got = [(t.split("/")[3], h.rid, h.offset, d) for t, h, d in sent]
    assert got == [("d2", "other", 0, b"0123"), ("d1", "d1-second", 4, b"4567"), ("d1", "new", 0, b"0123")]
    assert ing.repo_superseded == 1
    assert all(t == topics.device_topic(t.split("/")[3], "repo/data") for t, _, _ in sent)


class _QueuedFrame:
    """paho's MQTTMessageInfo as _make_room uses it: written to the socket or not."""

    def __init__(self, log: list[str], name: str, written: bool = False):
        self.log, self.name, self.written = log, name, written

    def is_published(self) -> bool:
        return self.written

    def wait_for_publish(self, timeout: float | None = None) -> None:
        self.log.append(f"wait {self.name}")
        self.written = True


class _LostFrame(_QueuedFrame):
    """A frame paho dropped when its connection was lost: it raises, as paho 2.2 does."""

    def is_published(self) -> bool:
        raise RuntimeError("Message publish failed: The connection was lost.")


def test_chunk_frames_queued_in_paho_stay_within_the_send_buffer(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'hub.db'}")
    ing = MqttIngest("mqtt://127.0.0.1:1", db, Repository(tmp_path / "repo", b"pw"))
    waits: list[str] = []
    quarter = REPO_SEND_BUFFER // 4
    for name, written in (("a", True), ("b", False), ("c", False)):
        ing._chunks_out.append((_QueuedFrame(waits, name, written), quarter))  # type: ignore[arg-type]
        ing._chunk_bytes_out += quarter
    ing._make_room(quarter)  # fits beside a, b and c: nothing waits
    assert waits == [] and len(ing._chunks_out) == 3
    ing._make_room(3 * quarter)  # a is written already; b must be written first
    assert waits == ["wait b"] and [f.name for f, _ in ing._chunks_out] == ["c"]  # type: ignore[attr-defined]
    assert ing._chunk_bytes_out == quarter


def test_frames_lost_with_a_connection_are_dropped_from_the_send_buffer(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'hub.db'}")
    ing = MqttIngest("mqtt://127.0.0.1:1", db, Repository(tmp_path / "repo", b"pw"))
    half = REPO_SEND_BUFFER // 2
    ing._chunks_out.append((_LostFrame([], "lost"), half))  # type: ignore[arg-type]
    ing._chunk_bytes_out = half
    ing._make_room(REPO_SEND_BUFFER)  # the repository thread must survive this
    assert not ing._chunks_out and ing._chunk_bytes_out == 0
