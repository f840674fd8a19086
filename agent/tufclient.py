"""The TUF client, run in a short-lived helper process.

``python -m agent.tufclient METADATA_DIR TARGET_PATH`` refreshes the device's trusted
metadata with :class:`tuf.ngclient.Updater` and prints the signed entry of one target.
The agent starts it for each deployment (:func:`agent.trust.lookup_target`) and answers
its fetches over the helper's stdin and stdout; the helper never opens a connection of
its own. Why a separate process: python-tuf, securesystemslib and cryptography add about
10 MiB to a process that imports them, which Python never gives back, and a device
verifies metadata a few times a day. Parsing metadata from the network in a process that
exits afterwards is also one less thing the serving process has to trust.

Wire between agent and helper (both ours; each side still checks what it reads):

- helper → agent, one JSON object per line, at most :data:`agent.pipes.MAX_LINE` bytes:
  ``{"fetch": PATH, "max": N}``, then ``{"target": {"length", "hashes", "custom"}}`` or
  ``{"error": CLASS, "message": TEXT}`` as the last line.
- agent → helper, for each fetch: ``{"ok": N}`` followed by N raw bytes,
  ``{"not_found": TEXT}`` or ``{"error": TEXT}``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import TargetFile
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from agent.errors import ExpiredMetadataError, TransferError, TransportError, TrustError
from agent.pipes import read_message, send

__all__ = ["lookup", "PipeFetcher", "main"]

METADATA_MAX_BYTES = 4 << 20


def lookup(metadata_dir: Path, target_path: str, fetcher: FetcherInterface,
           max_bytes: int = METADATA_MAX_BYTES) -> TargetFile:
    """Refresh the trusted metadata in ``metadata_dir`` (which must hold a trusted
    ``root.json``, see docs/security.md) and return the signed entry for ``target_path``.

    Raises:
        ExpiredMetadataError: the newest metadata available has expired.
        TrustError: signatures, thresholds or versions do not verify, or the
            target is not listed.
        TransportError: the repository could not be reached.
    """
    config = UpdaterConfig(root_max_length=max_bytes, timestamp_max_length=64 * 1024,
                           snapshot_max_length=max_bytes, targets_max_length=max_bytes)
    try:
        updater = Updater(metadata_dir=str(metadata_dir), metadata_base_url="mqtt:metadata/",
                          target_base_url="mqtt:targets/", fetcher=fetcher, config=config, bootstrap=None)
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


class PipeFetcher(FetcherInterface):
    """python-tuf fetcher asking the agent, over the helper's pipes, for each
    ``mqtt:<path>`` URL."""

    def __init__(self, rx: IO[bytes], tx: IO[bytes], max_bytes: int = METADATA_MAX_BYTES):
        self.rx, self.tx, self.max_bytes = rx, tx, max_bytes

    def _fetch(self, url: str) -> Iterator[bytes]:
        if not url.startswith("mqtt:"):
            raise tuf_exc.DownloadError(f"unsupported URL {url}")
        path = url[len("mqtt:"):]
        try:
            send(self.tx, {"fetch": path, "max": self.max_bytes})
            reply = read_message(self.rx, "agent")
        except (OSError, TransferError) as e:
            raise tuf_exc.DownloadError(f"{path}: {e}") from e
        if "ok" in reply:
            n = reply["ok"]
            if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= self.max_bytes:
                raise tuf_exc.DownloadError(f"{path}: the agent announced {n!r} bytes, limit {self.max_bytes}")
            data = self.rx.read(n)
            if len(data) != n:
                raise tuf_exc.DownloadError(f"{path}: the agent's pipe closed after {len(data)} of {n} bytes")
            return iter([data])
        if "not_found" in reply:
            raise tuf_exc.DownloadHTTPError(str(reply["not_found"]), 404)
        raise tuf_exc.DownloadError(f"{path}: {reply.get('error', f'unexpected reply {sorted(reply)[:5]}')}")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m agent.tufclient METADATA_DIR TARGET_PATH", file=sys.stderr)
        return 2
    # The protocol owns fd 1; anything a library prints goes to stderr instead.
    tx = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    rx = sys.stdin.buffer
    try:
        target = lookup(Path(args[0]), args[1], PipeFetcher(rx, tx))
    except (ExpiredMetadataError, TrustError, TransportError) as e:
        send(tx, {"error": type(e).__name__, "message": str(e)})
        return 0
    send(tx, {"target": {"length": target.length, "hashes": target.hashes,
                         "custom": target.custom}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
