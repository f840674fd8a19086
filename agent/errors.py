"""The agent's error tree.

Two roots, as in python-tuf: :class:`DataError` for bad data (the input is wrong and
retrying will not help) and :class:`TransportError` for failures to move data (a retry
may succeed). Everything edgefleet raises on purpose derives from :class:`EdgefleetError`.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "first_error",
    "EdgefleetError",
    "DataError",
    "BundleError",
    "ManifestError",
    "PayloadError",
    "ProfileError",
    "TrustError",
    "DowngradeError",
    "ExpiredMetadataError",
    "RuntimeLoadError",
    "SelfTestError",
    "TransportError",
    "TransferError",
    "DiskSpaceError",
]


class EdgefleetError(Exception):
    """Root of every error edgefleet raises deliberately."""


class DataError(EdgefleetError):
    """Input data is malformed, unsigned, tampered, or otherwise unacceptable."""


class BundleError(DataError):
    """A bundle file is truncated, corrupt, oversized or unsafe to unpack."""


class ManifestError(BundleError):
    """A bundle manifest does not match the schema or the bundle's contents."""


class PayloadError(DataError):
    """An MQTT payload is not valid JSON, too large, truncated or of an unknown version.

    ``kind`` is a short machine-readable reason used for counting
    (``oversized``, ``not_json``, ``version``, ``schema``, ``not_frame``, ``chunk_hash``).
    """

    def __init__(self, message: str, kind: str = "schema") -> None:
        super().__init__(message)
        self.kind = kind


class ProfileError(DataError):
    """A firmware profile file does not match the profile schema."""


class TrustError(DataError):
    """Signed metadata or a target failed verification (signature, hash, length)."""


class DowngradeError(TrustError):
    """A deployment would install an older version without a signed rollback."""


class ExpiredMetadataError(TrustError):
    """Repository metadata has expired; the device keeps what it has."""


class RuntimeLoadError(DataError):
    """A runtime could not load a model, or the runtime is not available here."""


class SelfTestError(DataError):
    """A model produced outputs outside the bundle's self-test tolerance."""


class TransportError(EdgefleetError):
    """Moving data failed (broker gone, request timed out); a retry may succeed."""


class TransferError(TransportError):
    """An artifact transfer did not complete."""


class DiskSpaceError(TransportError):
    """Not enough free disk space to receive or install an artifact."""


def first_error(e: Any) -> str:
    """``"where: what"`` for the first error of a pydantic ``ValidationError``
    (``where`` is the field path, ``(root)`` for a check across fields)."""
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(root)"
    return f"{loc}: {err['msg']}"
