"""Reading an operator's TOML file (agent settings, firmware profiles) as untrusted input."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any


def read_toml(path: Path, max_bytes: int, error: type[Exception]) -> dict[str, Any]:
    """The TOML document in ``path``, read up to ``max_bytes`` only.

    Raises:
        error: the file is unreadable, over ``max_bytes``, not UTF-8, not TOML (nested too
            deeply, or an integer past Python's digit limit, included), or does not end
            with a newline: TOML has no end marker, and a file cut inside its last number
            would parse as another value ("10.0" as "1"). The message starts with the path.
    """
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            raw = fh.read(max_bytes + 1)  # never more than the limit, whatever the file is
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror})") from e
    if len(raw) > max_bytes:
        what = f"{size} bytes" if size > max_bytes else "more bytes than it says"
        raise error(f"{path}: {what}, over the {max_bytes}-byte limit")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise error(f"{path}: not valid TOML: not UTF-8 text: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise error(f"{path}: not valid TOML: {e}") from e
    except RecursionError as e:  # arrays or tables nested thousands deep
        raise error(f"{path}: not valid TOML: nested too deeply") from e
    except ValueError as e:  # an integer of thousands of digits (Python's conversion limit)
        raise error(f"{path}: not valid TOML: {e}") from e
    if raw and not raw.endswith(b"\n"):
        raise error(f"{path}: does not end with a newline; is it cut short?")
    return data
