"""The hub's TUF repository: keys, signed metadata and stored bundles.

Layout under ``root_dir``::

    keys/{root,targets,snapshot,timestamp}.pem   Ed25519 private keys, PKCS#8,
                                                 encrypted with the hub passphrase
    metadata/1.root.json, root.json              root (consistent snapshots on)
    metadata/N.targets.json, N.snapshot.json     targets and snapshot, by version
    metadata/timestamp.json                      timestamp (re-signed before expiry)
    targets/<sha256>.efb                         bundles, content-addressed

Every write goes to a temp file in the same folder and is ``os.replace``\\ d into
place, metadata in dependency order (targets, snapshot, timestamp), so a reader
never sees a timestamp that points at metadata not yet written.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner, SSlibKey
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from agent.bundle import file_sha256
from agent.slots import atomic_write as _atomic_write
from agent.trust import CUSTOM_KEY, TargetCustom, target_path_for

__all__ = ["RepositoryConfig", "Repository", "RepositoryPathError", "ROLES"]

ROLES = ("root", "targets", "snapshot", "timestamp")
_SERVE_PATH = re.compile(r"^(metadata/(?:\d+\.)?(?:root|targets|snapshot|timestamp)\.json|targets/[0-9a-f]{64}\.efb)$")


_CHUNK_CACHE_BYTES = 16 << 20  # Repository.read_chunk


class RepositoryPathError(ValueError):
    """A requested repository path is not one the hub serves."""


@dataclass(frozen=True)
class RepositoryConfig:
    root_expiry: timedelta = timedelta(days=365)
    targets_expiry: timedelta = timedelta(days=90)
    snapshot_expiry: timedelta = timedelta(days=7)
    timestamp_expiry: timedelta = timedelta(days=1)


class Repository:
    """A single-writer TUF repository. Thread-safe for concurrent readers and writers."""

    def __init__(self, root_dir: Path, passphrase: bytes, config: RepositoryConfig | None = None):
        self.root_dir = root_dir
        self.keys_dir = root_dir / "keys"
        self.metadata_dir = root_dir / "metadata"
        self.targets_dir = root_dir / "targets"
        self.config = config or RepositoryConfig()
        self._passphrase = passphrase
        self._lock = threading.RLock()
        self._signers: dict[str, CryptoSigner] = {}
        self._serializer = JSONSerializer(compact=True)
        self._chunks: OrderedDict[tuple[str, int, int], tuple[tuple[int, int, int], int, bytes, str]] = OrderedDict()
        self._chunk_bytes = 0
        self._chunks_lock = threading.Lock()

    # ------------------------------------------------------------------ keys

    def _load_or_create_key(self, role: str) -> CryptoSigner:
        path = self.keys_dir / f"{role}.pem"
        if path.exists():
            key = serialization.load_pem_private_key(path.read_bytes(), password=self._passphrase)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError(f"{path}: not an Ed25519 key")
        else:
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(self._passphrase),
            )
            _atomic_write(path, pem)
            path.chmod(0o600)
        return CryptoSigner(key, SSlibKey.from_crypto(key.public_key()))

    def _now(self) -> datetime:
        return datetime.now(UTC).replace(microsecond=0)

    # ------------------------------------------------------------------ setup

    def init(self) -> None:
        """Create keys and initial metadata, or load existing ones."""
        with self._lock:
            for d in (self.keys_dir, self.metadata_dir, self.targets_dir):
                d.mkdir(parents=True, exist_ok=True)
            self.keys_dir.chmod(0o700)
            for role in ROLES:
                self._signers[role] = self._load_or_create_key(role)
            if (self.metadata_dir / "root.json").exists():
                self.refresh_timestamp()
                return
            root = Root(expires=self._now() + self.config.root_expiry, consistent_snapshot=True)
            for role in ROLES:
                root.add_key(self._signers[role].public_key, role)
            root_md = Metadata(root)
            root_md.sign(self._signers["root"])
            self._write_root(root_md)
            targets_md = Metadata(Targets(expires=self._now() + self.config.targets_expiry))
            self._publish(targets_md)

    def _write_root(self, md: Metadata[Root]) -> None:
        data = md.to_bytes(self._serializer)
        _atomic_write(self.metadata_dir / f"{md.signed.version}.root.json", data)
        _atomic_write(self.metadata_dir / "root.json", data)

    def root_json(self) -> bytes:
        """The current root metadata: what a device is provisioned with."""
        return (self.metadata_dir / "root.json").read_bytes()

    # ------------------------------------------------------------------ publishing

    def _load(self, role: str) -> Metadata:
        if role == "timestamp":
            return Metadata.from_file(str(self.metadata_dir / "timestamp.json"))
        ts = Metadata[Timestamp].from_file(str(self.metadata_dir / "timestamp.json"))
        snap_v = ts.signed.snapshot_meta.version
        if role == "snapshot":
            return Metadata.from_file(str(self.metadata_dir / f"{snap_v}.snapshot.json"))
        snap = Metadata[Snapshot].from_file(str(self.metadata_dir / f"{snap_v}.snapshot.json"))
        tv = snap.signed.meta["targets.json"].version
        return Metadata.from_file(str(self.metadata_dir / f"{tv}.targets.json"))

    def _publish(self, targets_md: Metadata[Targets]) -> None:
        """Sign and write targets, then a new snapshot, then a new timestamp."""
        now = self._now()
        targets_md.signed.expires = now + self.config.targets_expiry
        targets_md.signatures.clear()
        targets_md.sign(self._signers["targets"])
        tv = targets_md.signed.version
        _atomic_write(self.metadata_dir / f"{tv}.targets.json", targets_md.to_bytes(self._serializer))

        snap_path = self.metadata_dir / "timestamp.json"
        snap_version = 1
        if snap_path.exists():
            snap_version = self._load("snapshot").signed.version + 1
        snap_md = Metadata(
            Snapshot(
                version=snap_version,
                expires=now + self.config.snapshot_expiry,
                meta={"targets.json": MetaFile(version=tv)},
            )
        )
        snap_md.sign(self._signers["snapshot"])
        _atomic_write(
            self.metadata_dir / f"{snap_version}.snapshot.json", snap_md.to_bytes(self._serializer)
        )
        self._write_timestamp(snap_version)

    def _write_timestamp(self, snap_version: int) -> None:
        ts_path = self.metadata_dir / "timestamp.json"
        version = 1
        if ts_path.exists():
            version = Metadata[Timestamp].from_file(str(ts_path)).signed.version + 1
        ts_md = Metadata(
            Timestamp(
                version=version,
                expires=self._now() + self.config.timestamp_expiry,
                snapshot_meta=MetaFile(version=snap_version),
            )
        )
        ts_md.sign(self._signers["timestamp"])
        _atomic_write(ts_path, ts_md.to_bytes(self._serializer))

    def refresh_timestamp(self, *, force: bool = False) -> bool:
        """Re-sign the timestamp (and snapshot/targets) when less than half their life is left.

        Returns whether anything was re-signed.
        """
        with self._lock:
            now = self._now()
            targets = self._load("targets")
            snapshot = self._load("snapshot")
            ts = self._load("timestamp")

            def stale(md: Metadata, life: timedelta) -> bool:
                return force or md.signed.expires - now < life / 2

            if stale(targets, self.config.targets_expiry) or stale(
                snapshot, self.config.snapshot_expiry
            ):
                targets.signed.version += 1
                self._publish(targets)
                return True
            if stale(ts, self.config.timestamp_expiry):
                self._write_timestamp(snapshot.signed.version)
                return True
            return False

    def add_bundle(self, bundle_file: Path, custom: TargetCustom) -> str:
        """Store a bundle and publish it as a signed target. Returns its target path.

        Adding the same bundle twice is a no-op that returns the same path.
        """
        with self._lock:
            sha = file_sha256(bundle_file)
            target_path = target_path_for(sha)
            stored = self.targets_dir / f"{sha}.efb"
            if not stored.exists():
                fd, tmp = tempfile.mkstemp(dir=self.targets_dir, suffix=".tmp")
                os.close(fd)
                shutil.copyfile(bundle_file, tmp)
                os.replace(tmp, stored)
            targets: Metadata[Targets] = self._load("targets")
            existing = targets.signed.targets.get(target_path)
            if existing is not None and existing.custom.get(CUSTOM_KEY) == custom.model_dump():
                return target_path
            tf = TargetFile.from_file(target_path, str(stored), ["sha256"])
            tf.unrecognized_fields["custom"] = {CUSTOM_KEY: custom.model_dump()}
            targets.signed.targets[target_path] = tf
            targets.signed.version += 1
            self._publish(targets)
            return target_path

    def set_allow_downgrade(self, target_path: str, allow: bool) -> None:
        """Sign (or withdraw) an operator's permission to install this target over newer ones.

        Raises:
            KeyError: no such target.
        """
        with self._lock:
            targets: Metadata[Targets] = self._load("targets")
            tf = targets.signed.targets[target_path]
            custom = dict(tf.custom[CUSTOM_KEY])
            if bool(custom.get("allow_downgrade")) == allow:
                return
            custom["allow_downgrade"] = allow
            tf.unrecognized_fields["custom"] = {CUSTOM_KEY: custom}
            targets.signed.version += 1
            self._publish(targets)

    def target_custom(self, target_path: str) -> TargetCustom | None:
        targets: Metadata[Targets] = self._load("targets")
        tf = targets.signed.targets.get(target_path)
        return None if tf is None else TargetCustom.model_validate(tf.custom[CUSTOM_KEY])

    # ------------------------------------------------------------------ serving

    def resolve(self, path: str) -> Path:
        """Map a served path (``metadata/...`` or ``targets/<sha>.efb``) to a file.

        Raises:
            RepositoryPathError: the path is not one the repository serves.
            FileNotFoundError: it would be, but does not exist.
        """
        f = self._served(path)
        if not f.is_file():
            raise FileNotFoundError(path)
        return f

    def _served(self, path: str) -> Path:
        """Where a served path would be (not checked to exist).

        Raises:
            RepositoryPathError: the path is not one the repository serves.
        """
        if not _SERVE_PATH.fullmatch(path):
            raise RepositoryPathError(f"not a repository path: {path!r}")
        return self.root_dir / path

    def read(self, path: str, offset: int, length: int) -> tuple[int, bytes]:
        """Read ``length`` bytes at ``offset`` of a served file; returns (total size, data)."""
        with open(self.resolve(path), "rb") as fh:
            total = os.fstat(fh.fileno()).st_size
            fh.seek(offset)
            return total, fh.read(length)

    def read_chunk(self, path: str, offset: int, length: int) -> tuple[int, bytes, str]:
        """:meth:`read`, plus the data's sha256, from a small cache of recent chunks.

        A rollout sends the same few chunks to every device; reading and hashing each
        copy again was a file read and a hash per request on the hub's single
        repository thread. An entry is used only while the file's inode, size and
        mtime are unchanged (metadata is replaced with ``os.replace``, so a new
        version is a new inode); the cache holds at most ``_CHUNK_CACHE_BYTES``.

        Raises:
            RepositoryPathError, FileNotFoundError, OSError: as :meth:`read`.
        """
        f = self._served(path)
        st = os.stat(f)
        if not stat.S_ISREG(st.st_mode):
            raise FileNotFoundError(path)
        key = (path, offset, length)
        with self._chunks_lock:
            hit = self._chunks.get(key)
            if hit is not None and hit[0] == (st.st_ino, st.st_size, st.st_mtime_ns):
                self._chunks.move_to_end(key)
                return hit[1], hit[2], hit[3]
        with open(f, "rb") as fh:  # what is read is cached under the opened file's identity
            st = os.fstat(fh.fileno())
            fh.seek(offset)
            data = fh.read(length)
        total, ident = st.st_size, (st.st_ino, st.st_size, st.st_mtime_ns)
        digest = hashlib.sha256(data).hexdigest()
        with self._chunks_lock:
            old = self._chunks.pop(key, None)
            if old is not None:
                self._chunk_bytes -= len(old[2])
            self._chunks[key] = (ident, total, data, digest)
            self._chunk_bytes += len(data)
            while self._chunk_bytes > _CHUNK_CACHE_BYTES and self._chunks:
                _, evicted = self._chunks.popitem(last=False)
                self._chunk_bytes -= len(evicted[2])
        return total, data, digest
