"""Trust: deciding whether a device may install a bundle.

The hub is a TUF repository (root, targets, snapshot and timestamp roles, Ed25519
keys). Each bundle is a TUF *target*; its signed ``custom`` entry
(:class:`TargetCustom`) carries the bundle's identity and whether a downgrade to it was
explicitly allowed. Metadata is refreshed by :class:`tuf.ngclient.Updater` (which
performs every signature, threshold, version, expiry and rollback check of the TUF
specification) in a short-lived helper process, :mod:`agent.tufclient`;
:func:`lookup_target` runs it and fetches for it through the agent's own repository
client, normally the MQTT one in :mod:`agent.transfer`. The serving process never
imports python-tuf (docs/security.md, "Device trust").

The policy checks here are pure: they take metadata and bytes and return a verdict or
raise. IO happens around them.

Failure modes and what the agent does (it keeps serving its current model in all):

============================  ==================================================
unsigned / wrong-key metadata  :class:`~agent.errors.TrustError`
expired metadata               :class:`~agent.errors.ExpiredMetadataError`
tampered bundle                :class:`~agent.errors.TrustError` (hash/length)
lower version                  :class:`~agent.errors.DowngradeError`
repository unreachable         :class:`~agent.errors.TransportError`
TUF helper gave no verdict     :class:`~agent.errors.TransportError`
============================  ==================================================
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

import agent
from agent.bundle import Manifest, SemVer, file_sha256
from agent.errors import (
    DowngradeError,
    ExpiredMetadataError,
    TransferError,
    TransportError,
    TrustError,
)
from agent.pipes import read_message, send
from agent.transfer import HttpRepoClient, NotFound, RepoClient

__all__ = [
    "CUSTOM_KEY",
    "TargetCustom",
    "SignedTarget",
    "target_custom",
    "check_upgrade",
    "check_manifest_matches",
    "verify_target_file",
    "lookup_target",
    "target_path_for",
    "serve_path_for",
]

CUSTOM_KEY = "edgefleet"


class TargetCustom(BaseModel):
    """Signed facts about one bundle, stored in its TUF target entry."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    name: str
    version: str
    profile: str
    format: str
    precision: str
    allow_downgrade: bool = Field(
        False, description="An operator explicitly signed off installing this over newer ones."
    )

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


def target_path_for(bundle_sha256: str) -> str:
    """TUF target path of a bundle: content-addressed, so one path is one set of bytes."""
    return f"{bundle_sha256}.efb"


def serve_path_for(target_path: str) -> str:
    """Repository path (as requested over MQTT or HTTP) of a target's bytes."""
    return f"targets/{target_path}"


@dataclass(frozen=True)
class SignedTarget:
    """A target's entry in verified targets metadata: what the helper reports."""

    path: str
    length: int
    hashes: dict[str, str]
    custom: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_report(cls, path: str, raw: Any) -> SignedTarget:
        """Raises TrustError when the helper's report is not a target entry with a sha256."""
        if not isinstance(raw, dict):
            raise TrustError(f"target {path}: the TUF helper reported {type(raw).__name__}, not an object")
        length, hashes, custom = raw.get("length"), raw.get("hashes"), raw.get("custom") or {}
        if not isinstance(length, int) or isinstance(length, bool) or length < 0:
            raise TrustError(f"target {path}: signed length {length!r} is not a non-negative integer")
        if not isinstance(hashes, dict) or not all(isinstance(v, str) for v in hashes.values()):
            raise TrustError(f"target {path}: signed hashes {hashes!r} are not a name → hex map")
        if "sha256" not in hashes:
            raise TrustError(f"target {path}: no sha256 among its signed hashes {sorted(hashes)}")
        if not isinstance(custom, dict):
            raise TrustError(f"target {path}: signed custom metadata is not an object")
        return cls(path, length, dict(hashes), custom)


def target_custom(target: SignedTarget) -> TargetCustom:
    """The edgefleet entry of a target's signed custom metadata.

    Raises:
        TrustError: the target has no (valid) edgefleet entry.
    """
    raw = target.custom.get(CUSTOM_KEY)
    if raw is None:
        raise TrustError(f"target {target.path}: no '{CUSTOM_KEY}' custom metadata")
    try:
        return TargetCustom.model_validate(raw)
    except ValidationError as e:
        raise TrustError(f"target {target.path}: invalid custom metadata: {e.errors()[0]['msg']}") from e


def check_upgrade(
    custom: TargetCustom, current_name: str | None, current_version: str | None
) -> None:
    """Refuse to install an older version of the same model unless signed off.

    Installing the same version again is allowed (it is idempotent); a different
    model name is a replacement, not a downgrade.

    Raises:
        DowngradeError: ``custom.version`` is lower than the installed version and
            ``allow_downgrade`` is not set in the signed metadata.
    """
    if current_name is None or current_version is None or current_name != custom.name:
        return
    new, cur = SemVer.parse(custom.version), SemVer.parse(current_version)
    if new < cur and not custom.allow_downgrade:
        raise DowngradeError(
            f"{custom.ref} is older than installed {current_name}:{current_version}; "
            "a rollback must be explicitly signed (allow_downgrade)"
        )


def check_manifest_matches(custom: TargetCustom, manifest: Manifest, profile: str) -> None:
    """The bundle's own manifest must agree with the signed target entry and this device.

    Raises:
        TrustError: name, version, format or profile disagree.
    """
    for field in ("name", "version", "format", "profile", "precision"):
        if getattr(custom, field) != getattr(manifest, field):
            raise TrustError(
                f"bundle manifest {field}={getattr(manifest, field)!r} disagrees with signed "
                f"metadata {field}={getattr(custom, field)!r}"
            )
    if manifest.profile != profile:
        raise TrustError(f"bundle is for profile {manifest.profile!r}, this device is {profile!r}")


def verify_target_file(path: Path, length: int, sha256: str) -> None:
    """Check a downloaded target's length and sha256 against its signed entry.

    Raises:
        TrustError: length or hash mismatch (a tampered or corrupted bundle).
        OSError: the file cannot be read (FileNotFoundError when it is gone).
    """
    size = path.stat().st_size
    if size != length:
        more = "more than" if size > length else f"{size} bytes, not"
        raise TrustError(f"bundle {path.name} failed verification: {more} the {length} bytes signed for it")
    got = file_sha256(path)
    if got != sha256.lower():
        raise TrustError(f"bundle {path.name} failed verification: sha256 {got} is not the signed {sha256}")


def _helper_command(metadata_dir: Path, target_path: str) -> tuple[list[str], dict[str, str]]:
    """The helper's command line and environment.

    ``-P``: the working directory (the agent's data folder under systemd) is not on the
    helper's import path, so nothing in it can stand in for the helper. The helper imports
    this very package: its folder is added to ``PYTHONPATH`` unless this interpreter finds
    it on its own path anyway (an installed wheel), so a wheel's site-packages never comes
    before the standard library.
    """
    root = str(Path(agent.__file__).resolve().parent.parent)
    env = dict(os.environ)
    if root not in (str(Path(p).resolve()) for p in sys.path[1:] if p):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return [sys.executable, "-P", "-m", "agent.tufclient", str(metadata_dir), target_path], env


def lookup_target(
    metadata_dir: Path,
    target_path: str,
    client: RepoClient | HttpRepoClient,
    *,
    stop: threading.Event | None = None,
    timeout_s: float = 300.0,
    max_bytes: int = 4 << 20,
) -> SignedTarget:
    """Refresh trusted metadata and return the signed entry of ``target_path``.

    Runs ``python -m agent.tufclient`` and serves its fetches through ``client``. Only
    the helper's own verdict rejects a target; a helper that gave none (it could not
    start, was killed, crashed, wrote something unreadable or ran out of time, or the
    agent is stopping) is a transport failure, which the agent retries.

    Raises:
        ExpiredMetadataError: the newest metadata available has expired.
        TrustError: metadata does not verify, or the target is not listed.
        TransportError: the repository could not be reached, or the helper gave no
            verdict (why is in the message).
    """
    cmd, env = _helper_command(metadata_dir, target_path)
    with tempfile.TemporaryFile() as errors:
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=errors, env=env)
        except (OSError, ValueError) as e:
            raise TransportError(f"cannot start the TUF helper {cmd[0]}: {e}") from e
        done = threading.Event()
        why: list[str] = []
        deadline = time.monotonic() + timeout_s

        def watch() -> None:
            while not done.wait(0.1):
                if stop is not None and stop.is_set():
                    why.append("the agent is stopping")
                elif time.monotonic() > deadline:
                    why.append(f"the TUF lookup took longer than {timeout_s:g} s")
                else:
                    continue
                proc.kill()
                return

        watcher = threading.Thread(target=watch, name="tuf-watch", daemon=True)
        watcher.start()
        assert proc.stdin is not None and proc.stdout is not None
        try:
            return _serve_helper(proc.stdout, proc.stdin, target_path, client, max_bytes)
        except (TransferError, OSError) as e:
            # No verdict: the pipe broke or the helper wrote something unreadable.
            proc.kill()
            proc.wait()
            if stop is not None and stop.is_set():
                raise TransportError("the agent is stopping") from e
            if why:
                raise TransportError(why[0]) from e
            errors.seek(0)
            tail = errors.read()[-2000:].decode(errors="replace").strip().splitlines()
            raise TransportError(f"the TUF helper gave no verdict (exit status {proc.returncode}): {e}"
                                 + (f"; it said: {tail[-1]}" if tail else "")) from e
        finally:
            done.set()
            for f in (proc.stdin, proc.stdout):
                try:
                    f.close()
                except OSError:
                    pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _serve_helper(rx: IO[bytes], tx: IO[bytes], target_path: str,
                  client: RepoClient | HttpRepoClient, max_bytes: int) -> SignedTarget:
    errors = {"ExpiredMetadataError": ExpiredMetadataError, "TrustError": TrustError,
              "TransportError": TransportError}
    while True:
        msg = read_message(rx, "TUF helper")
        if "fetch" in msg:
            path, limit = msg.get("fetch"), msg.get("max")
            if not isinstance(path, str) or not isinstance(limit, int) or not 0 < limit <= max_bytes:
                raise TransferError(f"malformed fetch request {msg!r:.200}")
            try:
                data = client.fetch_bytes(path, limit)
            except NotFound as e:
                send(tx, {"not_found": str(e)})
            except Exception as e:  # noqa: BLE001 - as python-tuf's fetcher: any failure is a download error
                send(tx, {"error": f"{path}: {type(e).__name__}: {e}"})
            else:
                send(tx, {"ok": len(data)}, data)
        elif "target" in msg:
            return SignedTarget.from_report(target_path, msg["target"])
        elif "error" in msg:
            cls = errors.get(str(msg["error"]), TrustError)
            raise cls(str(msg.get("message", msg["error"])))
        else:
            raise TransferError(f"unexpected message with keys {sorted(msg)[:5]}")
