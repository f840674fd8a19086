"""Reading ``.npz`` archives that come from outside (bundles' self-test data, capture
samples) without trusting their sizes.

``numpy.load`` allocates what an array's header declares before it reads a byte, so a
250-byte archive that declares a 4 TiB array ends in ``MemoryError``, and a well
compressed one (a zip bomb) unpacks to whatever its creator likes. Here every member's
unpacked size is bounded first (``zipfile`` reads no more than a member declares), and
every array's declared shape must fit the bytes its member holds.
"""

from __future__ import annotations

import io
import math
import zipfile
import zlib

import numpy as np

__all__ = ["load_npz_bounded"]


def load_npz_bounded(data: bytes, max_unpacked: int, max_arrays: int = 256) -> dict[str, np.ndarray]:
    """The arrays of the ``.npz`` in ``data``, by name, never unpickling.

    Raises:
        ValueError: not an npz; more than ``max_arrays`` arrays or ``max_unpacked`` bytes
            once unpacked; an array whose header declares more data than its member
            holds, an object array, or a corrupt member. The message names the array.
    """
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise ValueError(f"not a valid npz archive ({e})") from e
    out: dict[str, np.ndarray] = {}
    with zf:
        infos = zf.infolist()
        if len(infos) > max_arrays:
            raise ValueError(f"{len(infos)} arrays exceed {max_arrays}")
        unpacked = sum(i.file_size for i in infos)
        if unpacked > max_unpacked:
            raise ValueError(f"its arrays unpack to {unpacked} bytes, over {max_unpacked}, the limit once unpacked")
        for info in infos:
            if not info.filename.endswith(".npy"):
                raise ValueError(f"member {info.filename[:100]!r} is not an .npy array")
            name = info.filename[: -len(".npy")]
            try:
                with zf.open(info) as fh:
                    version = np.lib.format.read_magic(fh)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
                    elif version == (2, 0):
                        shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
                    else:
                        raise ValueError(f"array {name!r} is in .npy format {version}, which is not read here")
                    if dtype.hasobject:
                        raise ValueError(f"array {name!r} holds Python objects")
                    declared = math.prod(shape) * dtype.itemsize
                    if declared > info.file_size:
                        raise ValueError(f"array {name!r} declares shape {tuple(shape)} ({declared} bytes) "
                                         f"but its member holds {info.file_size}")
                with zf.open(info) as fh:
                    out[name] = np.lib.format.read_array(fh, allow_pickle=False)
            except ValueError as e:
                if str(e).startswith(f"array {name!r}"):
                    raise
                raise ValueError(f"array {name!r} is corrupt: {e}") from e
            except (OSError, EOFError, zipfile.BadZipFile, zlib.error, MemoryError) as e:
                raise ValueError(f"array {name!r} is corrupt: {e}") from e
    return out
