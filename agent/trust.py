"""Trust: deciding whether a device may install a bundle.

The hub is a TUF repository (root, targets, snapshot and timestamp roles, Ed25519
keys). Each bundle is a TUF *target*; its signed ``custom`` entry
(:class:`TargetCustom`) carries the bundle's identity and whether a downgrade to it was
explicitly allowed. The agent refreshes metadata with :class:`tuf.ngclient.Updater`
(which performs every signature, threshold, version, expiry and rollback check of the
TUF specification) over whatever :class:`~tuf.ngclient.FetcherInterface` it is given,
normally the MQTT fetcher in :mod:`agent.transfer`.

The policy checks here are pure: they take metadata objects and bytes and return a
verdict or raise. IO happens around them.

Failure modes and what the agent does (it keeps serving its current model in all):

============================  ==================================================
unsigned / wrong-key metadata  :class:`~agent.errors.TrustError`
expired metadata               :class:`~agent.errors.ExpiredMetadataError`
tampered bundle                :class:`~agent.errors.TrustError` (hash/length)
lower version                  :class:`~agent.errors.DowngradeError`
repository unreachable         :class:`~agent.errors.TransportError`
============================  ==================================================
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import IO

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import TargetFile
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from agent.bundle import Manifest, SemVer
from agent.errors import (
    DowngradeError,
    ExpiredMetadataError,
    TransferError,
    TransportError,
    TrustError,
)
from agent.transfer import HttpRepoClient, NotFound, RepoClient

__all__ = [
    "CUSTOM_KEY",
    "TargetCustom",
    "target_custom",
    "check_upgrade",
    "check_manifest_matches",
    "verify_target_file",
    "TrustedRepository",
    "target_path_for",
    "RepoFetcher",
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


def target_custom(target: TargetFile) -> TargetCustom:
    """The edgefleet entry of a target's signed custom metadata.

    Raises:
        TrustError: the target has no (valid) edgefleet entry.
    """
    raw = (target.custom or {}).get(CUSTOM_KEY)
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


def verify_target_file(target: TargetFile, fh: IO[bytes]) -> None:
    """Check length and hashes of a downloaded target against signed metadata.

    Raises:
        TrustError: length or hash mismatch (a tampered or corrupted bundle).
    """
    try:
        target.verify_length_and_hashes(fh)
    except tuf_exc.LengthOrHashMismatchError as e:
        raise TrustError(f"bundle {target.path} failed verification: {e}") from e


class TrustedRepository:
    """TUF client state for one device: trusted metadata on disk plus a fetcher.

    ``metadata_dir`` must hold a trusted ``root.json`` (provisioned with the device,
    or pinned on first contact; see docs/security.md).
    """

    def __init__(self, metadata_dir: Path, fetcher: FetcherInterface, *, max_bytes: int = 4 << 20):
        self.metadata_dir = metadata_dir
        self.fetcher = fetcher
        self.config = UpdaterConfig(
            root_max_length=max_bytes,
            timestamp_max_length=64 * 1024,
            snapshot_max_length=max_bytes,
            targets_max_length=max_bytes,
        )

    def _updater(self) -> Updater:
        return Updater(
            metadata_dir=str(self.metadata_dir),
            metadata_base_url="mqtt:metadata/",
            target_base_url="mqtt:targets/",
            fetcher=self.fetcher,
            config=self.config,
            bootstrap=None,
        )

    def lookup(self, target_path: str) -> TargetFile:
        """Refresh metadata and return the signed entry for ``target_path``.

        Raises:
            ExpiredMetadataError: the newest metadata available has expired.
            TrustError: signatures, thresholds or versions do not verify, or the
                target is not listed.
            TransportError: the repository could not be reached.
        """
        try:
            updater = self._updater()
            updater.refresh()
            target = updater.get_targetinfo(target_path)
        except tuf_exc.ExpiredMetadataError as e:
            raise ExpiredMetadataError(f"repository metadata expired: {e}") from e
        except tuf_exc.DownloadError as e:
            raise TransportError(f"repository unreachable: {e}") from e
        except tuf_exc.RepositoryError as e:
            raise TrustError(f"repository metadata rejected: {type(e).__name__}: {e}") from e
        except (OSError, ValueError) as e:
            # Unreadable local trusted metadata, or undecodable remote metadata.
            raise TrustError(f"trusted metadata unusable: {e}") from e
        if target is None:
            raise TrustError(f"target {target_path} is not in signed targets metadata")
        return target


class RepoFetcher(FetcherInterface):
    """python-tuf fetcher reading ``mqtt:<path>`` URLs through a repository client
    (:class:`~agent.transfer.RepoClient` over MQTT, or
    :class:`~agent.transfer.HttpRepoClient` over HTTP)."""

    def __init__(self, client: RepoClient | HttpRepoClient, max_bytes: int = 4 << 20):
        self.client = client
        self.max_bytes = max_bytes

    def _fetch(self, url: str) -> Iterator[bytes]:
        if not url.startswith("mqtt:"):
            raise tuf_exc.DownloadError(f"unsupported URL {url}")
        try:
            data = self.client.fetch_bytes(url[len("mqtt:"):], self.max_bytes)
        except NotFound as e:
            raise tuf_exc.DownloadHTTPError(str(e), 404) from e
        except TransferError as e:
            raise tuf_exc.DownloadError(str(e)) from e
        return iter([data])
