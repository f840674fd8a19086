"""The model registry: accepting bundles, signing them into the repository, listing them.

A bundle is accepted only after it has been fully unpacked and checked
(:func:`agent.bundle.unpack`: member names, types, byte limits and every member hash
against the manifest), so a truncated or tampered upload never reaches the signed
repository. Versions are immutable: the same (name, version, profile, format,
precision) can only ever name one set of bytes.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from agent.bundle import BundleLimits, Manifest, SemVer, unpack
from agent.errors import BundleError
from agent.trust import TargetCustom
from hub.errors import BundleConflict, InvalidBundle, ModelNotFound
from hub.models import (
    Bundle,
    BundlePublic,
    ModelPublic,
    ModelVersion,
    ModelVersionPublic,
)
from hub.repository import Repository

__all__ = [
    "add_bundle",
    "list_models",
    "get_model",
    "get_model_version",
    "bundles_for",
    "is_selected",
]

log = logging.getLogger(__name__)


def is_selected(manifest: Manifest) -> bool:
    """Whether the compiler marked this candidate as the one to ship for its profile.

    The compiler records its choice as ``lineage.settings["selected"] = true``.
    """
    return manifest.lineage.settings.get("selected") is True


def _public(b: Bundle) -> BundlePublic:
    return BundlePublic.model_validate(b, from_attributes=True)


def add_bundle(
    session: Session,
    repository: Repository,
    path: Path,
    *,
    filename: str = "bundle",
    max_bytes: int = 1 << 30,
) -> tuple[BundlePublic, bool]:
    """Verify a bundle file, sign it into the repository and record it.

    Uploading the same bytes again is a no-op. Returns the bundle and whether it is new.

    Raises:
        InvalidBundle: not a bundle, truncated, corrupt, over ``max_bytes``, or its
            members do not match the manifest. The message names what is wrong.
        BundleConflict: a different bundle with the same name, version, profile,
            format and precision is already registered.
    """
    limits = BundleLimits(max_bundle_bytes=max_bytes, max_model_bytes=max_bytes)
    with tempfile.TemporaryDirectory(prefix=".verify-", dir=path.parent) as tmp:
        try:
            checked = unpack(path, Path(tmp) / "b", limits)
        except BundleError as e:
            detail = str(e).replace(str(path), filename)
            if not detail.startswith(filename):
                detail = f"{filename}: {detail}"
            raise InvalidBundle(f"invalid bundle {detail}") from e
    manifest, sha = checked.manifest, checked.sha256

    existing = session.get(Bundle, sha)
    if existing is not None:
        return _public(existing), False
    clash = session.exec(
        select(Bundle).where(
            Bundle.name == manifest.name,
            Bundle.version == manifest.version,
            Bundle.profile == manifest.profile,
            Bundle.format == manifest.format,
            Bundle.precision == manifest.precision,
        )
    ).first()
    if clash is not None:
        raise BundleConflict(
            f"{manifest.ref} for profile {manifest.profile} ({manifest.format}, "
            f"{manifest.precision}) is already registered with different content "
            f"(sha256 {clash.sha256[:12]}); versions are immutable, publish a new version"
        )

    custom = TargetCustom(
        name=manifest.name,
        version=manifest.version,
        profile=manifest.profile,
        format=manifest.format,
        precision=manifest.precision,
    )
    target_path = repository.add_bundle(path, custom)

    mv = session.exec(
        select(ModelVersion).where(
            ModelVersion.name == manifest.name, ModelVersion.version == manifest.version
        )
    ).first()
    if mv is None:
        mv = ModelVersion(name=manifest.name, version=manifest.version)
        session.add(mv)
        session.flush()
    assert mv.id is not None
    row = Bundle(
        sha256=sha,
        model_version_id=mv.id,
        name=manifest.name,
        version=manifest.version,
        profile=manifest.profile,
        format=manifest.format,
        precision=manifest.precision,
        runtime=manifest.runtime,
        size_bytes=path.stat().st_size,
        target_path=target_path,
        selected=is_selected(manifest),
        manifest=manifest.model_dump(mode="json"),
    )
    session.add(row)
    try:
        session.commit()
    except IntegrityError as e:
        # A concurrent upload of the same identity won the race.
        session.rollback()
        raise BundleConflict(f"{manifest.ref} for {manifest.profile} was registered concurrently") from e
    log.info("registered bundle %s %s %s/%s as %s", manifest.ref, manifest.profile,
             manifest.format, manifest.precision, target_path)
    return _public(row), True


def _versions(session: Session, name: str | None = None) -> list[ModelVersionPublic]:
    q = select(ModelVersion)
    if name is not None:
        q = q.where(ModelVersion.name == name)
    versions = session.exec(q).all()
    bq = select(Bundle).order_by(col(Bundle.profile), col(Bundle.precision))
    if name is not None:
        bq = bq.where(Bundle.name == name)
    by_mv: dict[int, list[BundlePublic]] = {}
    for b in session.exec(bq).all():
        by_mv.setdefault(b.model_version_id, []).append(_public(b))
    out = [
        ModelVersionPublic(
            name=v.name, version=v.version, created=v.created, bundles=by_mv.get(v.id or -1, [])
        )
        for v in versions
    ]
    out.sort(key=lambda v: (v.name, _semver_key(v.version)), reverse=True)
    return out


def _semver_key(version: str) -> SemVer:
    return SemVer.parse(version)


def list_models(session: Session) -> list[ModelPublic]:
    """Every model with its versions (newest first) and their bundles."""
    grouped: dict[str, list[ModelVersionPublic]] = {}
    for v in _versions(session):
        grouped.setdefault(v.name, []).append(v)
    return [
        ModelPublic(name=name, latest=vs[0].version, versions=vs)
        for name, vs in sorted(grouped.items())
    ]


def get_model(session: Session, name: str) -> ModelPublic:
    """One model with all its versions.

    Raises:
        ModelNotFound: no version of ``name`` was ever uploaded.
    """
    vs = _versions(session, name)
    if not vs:
        raise ModelNotFound(f"no model named {name!r}")
    return ModelPublic(name=name, latest=vs[0].version, versions=vs)


def get_model_version(session: Session, name: str, version: str) -> ModelVersionPublic:
    """One model version with its bundles.

    Raises:
        ModelNotFound: no such model version.
    """
    for v in _versions(session, name):
        if v.version == version:
            return v
    raise ModelNotFound(f"no model {name}:{version}")


def bundles_for(session: Session, name: str, version: str) -> list[Bundle]:
    """All bundles of one model version (any profile)."""
    return list(
        session.exec(select(Bundle).where(Bundle.name == name, Bundle.version == version)).all()
    )
