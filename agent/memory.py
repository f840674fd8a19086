"""Giving back the pages the agent touched once, at start-up, and will not touch again.

Importing ONNX Runtime runs the static initialisers of its 36 MB extension module. They
are spread across the module's code, and for each page touched the kernel maps the 64 KiB
around it that it already holds in the page cache (fault-around), so after the import
about 22 MiB of that code is resident, while a small model's inference runs a few MiB of
it. numpy, pydantic-core, LiteRT and the interpreter do the same on a smaller scale. Those
pages are clean copies of files on disk; they stay mapped (and counted in the agent's RSS)
until memory runs short, and on a device whose other work never makes it run short, they
stay for the agent's whole life.

:func:`release_cold_pages` asks the kernel (``madvise(MADV_PAGEOUT)``, Linux 5.4 and
later) to reclaim the read-only file-backed pages mapped into this process; the agent
calls it once serving has started and after each deployment ends, then runs its models'
warm-up again, so the pages inference needs are back before the next request. A page
used later comes back on its first touch, from the page cache or the disk, as any page
of a program does. Pages written since they were mapped (relocated data, the heap, model
weights in ONNX Runtime's buffers) are never touched by this: they are not file pages.
A page another process maps too is left alone by the kernel.

Then ``malloc_trim`` hands free heap pages back (glibc only).

What it saves and costs on the reference model is in docs/benchmarks.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Released", "release_cold_pages", "rss_bytes"]

log = logging.getLogger(__name__)

MADV_PAGEOUT = 21  # linux/mman-common.h, since Linux 5.4
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass(frozen=True)
class Released:
    """What one call gave back: RSS before and after, and the mappings advised."""

    rss_before: int
    rss_after: int
    mappings: int

    @property
    def freed(self) -> int:
        return self.rss_before - self.rss_after


def rss_bytes() -> int:
    """This process's resident set size, bytes (from ``/proc/self/statm``)."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    return libc


def _file_pages(maps: str) -> list[tuple[int, int]]:
    """The read-only, file-backed mappings in ``/proc/self/maps`` text, as (start, end).

    A line is ``start-end perms offset dev inode [path]``. Writable mappings are left
    out (their written pages are the process's own, not the file's), and so are
    anonymous ones and the kernel's (``[vdso]``, ``[vvar]``: inode 0).
    """
    spans = []
    for line in maps.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or not parts[5].startswith("/") or parts[4] == "0":
            continue
        perms = parts[1]
        if len(perms) != 4 or perms[0] != "r" or perms[1] == "w" or perms[3] != "p":
            continue
        start, _, end = parts[0].partition("-")
        spans.append((int(start, 16), int(end, 16)))
    return spans


def release_cold_pages() -> Released | None:
    """Ask the kernel to reclaim this process's read-only file pages, then trim the heap.

    Returns what was released, or None where this cannot work (not Linux, no libc,
    a kernel without ``MADV_PAGEOUT``); the reason is logged at debug level. Never
    raises: the agent serves the same either way.
    """
    if not sys.platform.startswith("linux"):
        return None
    libc = _libc()
    if libc is None:
        log.debug("memory release: no C library found")
        return None
    try:
        before = rss_bytes()
        maps = Path("/proc/self/maps").read_text()
    except OSError as e:
        log.debug("memory release: cannot read /proc/self: %s", e)
        return None
    advised = 0
    for start, end in _file_pages(maps):
        if libc.madvise(start, end - start, MADV_PAGEOUT) == 0:
            advised += 1
            continue
        err = ctypes.get_errno()
        if err == 22 and advised == 0:  # EINVAL on the first one: the kernel has no MADV_PAGEOUT
            log.debug("memory release: this kernel does not support MADV_PAGEOUT")
            return None
        # Other errors (a mapping that went away meanwhile: ENOMEM) only skip that mapping.
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)
    return Released(before, rss_bytes(), advised)
