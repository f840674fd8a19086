"""The TUF helper process and its pipe protocol.

``agent.trust.lookup_target`` runs ``python -m agent.tufclient`` against a real TUF
repository (the hub's), with the repository's files handed over by an in-process client
that has the same ``fetch_bytes`` as the MQTT and HTTP ones.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from tuf.api import exceptions as tuf_exc

from agent.errors import ExpiredMetadataError, TransferError, TransportError, TrustError
from agent.pipes import MAX_LINE, read_message, send
from agent.transfer import NotFound
from agent.trust import (
    SignedTarget,
    TargetCustom,
    _serve_helper,
    lookup_target,
    target_custom,
    verify_target_file,
)
from agent.tufclient import PipeFetcher
from hub.repository import Repository, RepositoryConfig
from tests.support import linear_bundle


class RepoFiles:
    """``fetch_bytes`` over a repository folder, as RepoClient offers it over MQTT."""

    def __init__(self, repo: Repository, *, delay_s: float = 0.0):
        self.repo, self.delay_s, self.paths = repo, delay_s, []

    def fetch_bytes(self, path: str, max_bytes: int) -> bytes:
        self.paths.append(path)
        time.sleep(self.delay_s)
        try:
            total, data = self.repo.read(path, 0, max_bytes + 1)
        except (FileNotFoundError, ValueError) as e:
            raise NotFound(f"repository has no {path}") from e
        if total > max_bytes:
            raise TransferError(f"{path} is {total} bytes, over the {max_bytes}-byte limit")
        return data


def _repo(tmp_path: Path, config: RepositoryConfig | None = None) -> tuple[Repository, str, Path]:
    repo = Repository(tmp_path / "repo", b"test-passphrase", config)
    repo.init()
    man, _, _, _ = linear_bundle(tmp_path / "b.efb", version="1.2.0")
    tp = repo.add_bundle(tmp_path / "b.efb", TargetCustom(
        name=man.name, version=man.version, profile=man.profile, format=man.format, precision=man.precision))
    trust = tmp_path / "trust"
    trust.mkdir()
    (trust / "root.json").write_bytes((repo.metadata_dir / "1.root.json").read_bytes())
    return repo, tp, trust


def test_lookup_returns_the_signed_entry_and_the_file_verifies(tmp_path: Path):
    repo, tp, trust = _repo(tmp_path)
    client = RepoFiles(repo)
    target = lookup_target(trust, tp, client)
    assert target.path == tp
    data = (tmp_path / "b.efb").read_bytes()
    assert target.length == len(data)
    assert target.hashes["sha256"] == hashlib.sha256(data).hexdigest()
    assert target_custom(target).ref == "lin:1.2.0"
    assert "metadata/timestamp.json" in client.paths
    # The helper kept the refreshed metadata for the next lookup.
    assert (trust / "timestamp.json").exists()
    verify_target_file(tmp_path / "b.efb", target.length, target.hashes["sha256"])


def test_an_unlisted_target_is_a_trust_error(tmp_path: Path):
    repo, _, trust = _repo(tmp_path)
    with pytest.raises(TrustError, match="not in signed targets metadata"):
        lookup_target(trust, "0" * 64 + ".efb", RepoFiles(repo))


def test_metadata_signed_by_another_repository_is_refused(tmp_path: Path):
    repo, tp, trust = _repo(tmp_path)
    other = Repository(tmp_path / "other", b"another-passphrase")
    other.init()
    (trust / "root.json").write_bytes((other.metadata_dir / "1.root.json").read_bytes())
    with pytest.raises(TrustError, match="repository metadata rejected"):
        lookup_target(trust, tp, RepoFiles(repo))


def test_expired_metadata_is_reported_as_such(tmp_path: Path):
    from datetime import timedelta

    repo, tp, trust = _repo(tmp_path, RepositoryConfig(timestamp_expiry=timedelta(seconds=1)))
    time.sleep(2.1)
    with pytest.raises(ExpiredMetadataError):
        lookup_target(trust, tp, RepoFiles(repo))


def test_an_unreachable_repository_is_a_transport_error(tmp_path: Path):
    _, tp, trust = _repo(tmp_path)

    class Down:
        def fetch_bytes(self, path: str, max_bytes: int) -> bytes:
            raise TransferError(f"no answer for {path}@0 after 3 tries")

    with pytest.raises(TransportError, match="repository unreachable.*no answer"):
        lookup_target(trust, tp, Down())


def test_an_unreadable_trusted_root_is_a_trust_error(tmp_path: Path):
    repo, tp, trust = _repo(tmp_path)
    (trust / "root.json").write_bytes(b"{not json")
    with pytest.raises(TrustError, match="metadata rejected: DeserializationError"):
        lookup_target(trust, tp, RepoFiles(repo))
    (trust / "root.json").unlink()
    with pytest.raises(TrustError, match="trusted metadata unusable.*root.json"):
        lookup_target(trust, tp, RepoFiles(repo))


def _fake_python(tmp_path: Path, monkeypatch, script: str) -> None:
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\n" + script)
    python.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(python))


def test_a_helper_that_dies_gives_no_verdict_and_says_why(tmp_path: Path, monkeypatch):
    repo, tp, trust = _repo(tmp_path)
    _fake_python(tmp_path, monkeypatch, "echo 'ImportError: no module named tuf' >&2\nexit 3\n")
    with pytest.raises(TransportError, match=r"no verdict \(exit status 3\).*pipe closed.*"
                                             r"said: ImportError: no module named tuf"):
        lookup_target(trust, tp, RepoFiles(repo))


def test_a_helper_that_cannot_start_gives_no_verdict(tmp_path: Path, monkeypatch):
    repo, tp, trust = _repo(tmp_path)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    with pytest.raises(TransportError, match="cannot start the TUF helper"):
        lookup_target(trust, tp, RepoFiles(repo))


def _helper_pid() -> int:
    import psutil

    for child in psutil.Process().children():
        if "agent.tufclient" in child.cmdline():
            return child.pid
    raise AssertionError("no TUF helper running")


def test_a_helper_killed_mid_lookup_gives_no_verdict(tmp_path: Path):
    repo, tp, trust = _repo(tmp_path)

    class KillsTheHelper(RepoFiles):
        def fetch_bytes(self, path: str, max_bytes: int) -> bytes:
            os.kill(_helper_pid(), signal.SIGKILL)
            time.sleep(0.2)
            return super().fetch_bytes(path, max_bytes)

    with pytest.raises(TransportError, match=r"no verdict \(exit status -9\)"):
        lookup_target(trust, tp, KillsTheHelper(repo))


def test_a_signal_to_agent_and_helper_at_once_is_a_stop_not_a_verdict(tmp_path: Path):
    # systemd's stop (and Ctrl-C) signals the whole group: the helper may die before the
    # agent's handler has set its stop event, and nothing about the target is known.
    repo, tp, trust = _repo(tmp_path)
    stop = threading.Event()

    class Stopping(RepoFiles):
        def fetch_bytes(self, path: str, max_bytes: int) -> bytes:
            os.kill(_helper_pid(), signal.SIGTERM)
            time.sleep(0.2)
            stop.set()
            return super().fetch_bytes(path, max_bytes)

    with pytest.raises(TransportError, match="the agent is stopping"):
        lookup_target(trust, tp, Stopping(repo), stop=stop)


def test_any_failure_of_the_agents_client_is_a_transport_error(tmp_path: Path):
    import http.client

    _, tp, trust = _repo(tmp_path)

    class Garbage:
        def fetch_bytes(self, path: str, max_bytes: int) -> bytes:
            raise http.client.BadStatusLine("garbage")

    with pytest.raises(TransportError, match="repository unreachable.*BadStatusLine: garbage"):
        lookup_target(trust, tp, Garbage())


def test_nothing_in_the_working_directory_stands_in_for_the_helper(tmp_path: Path, monkeypatch):
    repo, _, trust = _repo(tmp_path)
    fake = tmp_path / "cwd" / "agent"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "tufclient.py").write_text(
        'print(\'{"target":{"length":1,"hashes":{"sha256":"00"},"custom":{}}}\', flush=True)\n')
    monkeypatch.chdir(fake.parent)
    with pytest.raises(TrustError, match="not in signed targets metadata"):
        lookup_target(trust, "0" * 64 + ".efb", RepoFiles(repo))


def test_stop_ends_a_lookup_at_once(tmp_path: Path):
    repo, tp, trust = _repo(tmp_path)
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    t0 = time.monotonic()
    with pytest.raises(TransportError, match="stopping"):
        lookup_target(trust, tp, RepoFiles(repo, delay_s=2.0), stop=stop)
    assert time.monotonic() - t0 < 4.0


def test_a_lookup_over_its_deadline_is_a_transport_error(tmp_path: Path):
    repo, tp, trust = _repo(tmp_path)
    with pytest.raises(TransportError, match="longer than 1 s"):
        lookup_target(trust, tp, RepoFiles(repo, delay_s=3.0), timeout_s=1.0)


# verify_target_file ------------------------------------------------------------------

def test_verify_refuses_a_short_a_long_and_a_changed_file(tmp_path: Path):
    data = b"x" * 5000
    sha = hashlib.sha256(data).hexdigest()
    t = tmp_path / "t"

    def verify(content: bytes) -> None:
        t.write_bytes(content)
        verify_target_file(t, 5000, sha)

    verify(data)
    with pytest.raises(TrustError, match="failed verification: 4999 bytes, not the 5000"):
        verify(data[:-1])
    with pytest.raises(TrustError, match="failed verification: more than the 5000"):
        verify(data + b"y")
    with pytest.raises(TrustError, match="failed verification: sha256"):
        verify(b"y" + data[1:])


# the helper's report -----------------------------------------------------------------

@pytest.mark.parametrize("raw, what", [
    ([1, 2], "not an object"),
    ({"length": -1, "hashes": {"sha256": "ab"}}, "non-negative"),
    ({"length": True, "hashes": {"sha256": "ab"}}, "non-negative"),
    ({"length": 3, "hashes": {"sha512": "ab"}}, "no sha256"),
    ({"length": 3, "hashes": ["ab"]}, "name → hex"),
    ({"length": 3, "hashes": {"sha256": "ab"}, "custom": "x"}, "custom metadata is not an object"),
])
def test_a_malformed_target_report_is_refused(raw, what):
    with pytest.raises(TrustError, match=what):
        SignedTarget.from_report("t.efb", raw)


def _helper_says(*lines: bytes) -> tuple[io.BytesIO, io.BytesIO]:
    return io.BytesIO(b"".join(lines)), io.BytesIO()


class OneFile:
    def __init__(self, data: bytes):
        self.data = data

    def fetch_bytes(self, path: str, max_bytes: int) -> bytes:
        if path != "metadata/timestamp.json":
            raise NotFound(f"repository has no {path}")
        return self.data


def test_the_agent_answers_fetches_and_reads_the_report():
    report = {"target": {"length": 3, "hashes": {"sha256": "ab"}, "custom": {}}}
    rx, tx = _helper_says(b'{"fetch":"metadata/timestamp.json","max":100}\n',
                          b'{"fetch":"metadata/2.root.json","max":100}\n',
                          json.dumps(report).encode() + b"\n")
    got = _serve_helper(rx, tx, "t.efb", OneFile(b"abc"), 4 << 20)
    assert got == SignedTarget("t.efb", 3, {"sha256": "ab"}, {})
    assert tx.getvalue().startswith(b'{"ok":3}\nabc{"not_found":')


@pytest.mark.parametrize("line, error", [
    (b'{"fetch":"x","max":999999999999}\n', "malformed fetch request"),
    (b'{"fetch":7,"max":10}\n', "malformed fetch request"),
    (b'{"fetch":"x","max":0}\n', "malformed fetch request"),
    (b'{"hello":1}\n', "unexpected message"),
    (b'[1,2]\n', "not an object"),
    (b'{"target": {"len', "unterminated"),
    (b'not json\n', "not JSON"),
    (b"", "pipe closed"),
    (b"{" + b" " * MAX_LINE + b"}\n", f"over {MAX_LINE} bytes"),
])
def test_a_malformed_line_from_the_helper_is_an_error(line, error):
    rx, tx = _helper_says(line)
    with pytest.raises(TransferError, match=error):
        _serve_helper(rx, tx, "t.efb", OneFile(b""), 4 << 20)


def test_the_helpers_own_verdicts_keep_their_class():
    for name, cls in (("ExpiredMetadataError", ExpiredMetadataError), ("TransportError", TransportError),
                      ("TrustError", TrustError), ("SomethingElse", TrustError)):
        rx, tx = _helper_says(json.dumps({"error": name, "message": "why"}).encode() + b"\n")
        with pytest.raises(TrustError if cls is not TransportError else TransportError, match="why") as ei:
            _serve_helper(rx, tx, "t.efb", OneFile(b""), 4 << 20)
        assert type(ei.value) is cls, name


# the helper's side of the pipe ---------------------------------------------------------

def _fetcher(reply: bytes, max_bytes: int = 100) -> tuple[PipeFetcher, io.BytesIO]:
    tx = io.BytesIO()
    return PipeFetcher(io.BytesIO(reply), tx, max_bytes), tx


def test_the_helper_fetches_through_the_pipe():
    f, tx = _fetcher(b'{"ok":5}\nhello')
    assert b"".join(f.fetch("mqtt:metadata/1.root.json")) == b"hello"
    assert read_message(io.BytesIO(tx.getvalue()), "helper") == {"fetch": "metadata/1.root.json", "max": 100}


@pytest.mark.parametrize("reply, exc, what", [
    (b'{"ok":500}\n' + b"x" * 500, tuf_exc.DownloadError, "announced 500 bytes, limit 100"),
    (b'{"ok":-1}\n', tuf_exc.DownloadError, "announced -1"),
    (b'{"ok":5}\nhel', tuf_exc.DownloadError, "closed after 3 of 5"),
    (b'{"not_found":"no such"}\n', tuf_exc.DownloadHTTPError, "no such"),
    (b'{"error":"broker down"}\n', tuf_exc.DownloadError, "broker down"),
    (b'{"ok":', tuf_exc.DownloadError, "unterminated"),
    (b"", tuf_exc.DownloadError, "pipe closed"),
])
def test_a_bad_answer_from_the_agent_is_a_download_error(reply, exc, what):
    f, _ = _fetcher(reply)
    with pytest.raises(exc, match=what):
        b"".join(f.fetch("mqtt:metadata/timestamp.json"))


def test_send_then_read_round_trips_with_a_payload():
    buf = io.BytesIO()
    send(buf, {"ok": 3}, b"abc")
    buf.seek(0)
    assert read_message(buf, "x") == {"ok": 3}
    assert buf.read() == b"abc"
