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
later) to reclaim them: the file pages of private, read-only file mappings (pages the
process wrote before the mapping was made read-only, such as relocated data, are left
alone, found from ``/proc/self/pagemap``; so are the heap and every writable mapping).
The agent calls it once serving has started and after deployments that grew it
(``agent.daemon.RELEASE_DELAY_S`` after the last of them), then runs its models' warm-up
again, so the
pages inference needs are back before the next request. A page used later comes back
on its first touch, as any page of a program does. Then ``malloc_trim`` hands free heap
pages back (glibc only).

Two rules of the kernel decide what is given back:

* Only pages of files this process owns, or could open for writing, are paged out; for
  other files the call succeeds and does nothing (mm/madvise.c, ``can_do_file_pageout``:
  paging out someone else's file would be a side channel). An agent that runs as a
  service user over a virtual environment owned by root releases nothing; see
  docs/operations.md "Memory". Such mappings are counted in :attr:`Released.not_owned`
  and not advised.
* A page another process maps too is left alone.

What it saves and costs on the reference model is in docs/benchmarks.md.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import sys
from dataclasses import dataclass

__all__ = ["Released", "release_cold_pages", "rss_bytes"]

log = logging.getLogger(__name__)

MADV_PAGEOUT = 21  # linux/mman-common.h, since Linux 5.4
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass(frozen=True)
class Released:
    """What one call did: RSS before and after, the address ranges advised, and the
    mappings left out because their file belongs to another user (the kernel would
    ignore them)."""

    rss_before: int
    rss_after: int
    ranges: int
    not_owned: int = 0

    @property
    def freed(self) -> int:
        return self.rss_before - self.rss_after


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    path: str
    anonymous_kb: int = 0  # pages the process wrote (copy-on-write), e.g. relocated data


def rss_bytes() -> int:
    """This process's resident set size, bytes (from ``/proc/self/statm``)."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    """The C library, through the process's own symbols (``dlopen(NULL)``): glibc and
    musl alike, without ``ctypes.util.find_library`` (which runs ``ldconfig``)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    if not hasattr(libc, "madvise"):
        return None
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    return libc


def _file_mappings(smaps: str) -> list[Mapping]:
    """The private, read-only, file-backed mappings in ``/proc/self/smaps`` text, with
    how much of each the process wrote before it was made read-only (``Anonymous``).

    A mapping starts with ``start-end perms offset dev inode [path]``, followed by
    ``Key: value`` lines. Left out: writable mappings, whose contents are the process's
    own; shared ones (another process's business); anonymous ones and the kernel's
    (``[vdso]``: inode 0); and any without a readable ``Anonymous`` line. A path may
    contain spaces and end in `` (deleted)``.
    """
    out: list[Mapping] = []
    cur: tuple[int, int, str] | None = None
    for line in smaps.splitlines():
        head, _, rest = line.partition(" ")
        if head.endswith(":"):
            if cur is not None and head == "Anonymous:":
                value = rest.split()[:1]
                if value and value[0].isdigit():
                    out.append(Mapping(*cur, anonymous_kb=int(value[0])))
                cur = None
            continue
        cur = None
        parts = line.split(maxsplit=5)
        if len(parts) < 6:
            continue
        start, dash, end = parts[0].partition("-")
        if not dash or not parts[5].startswith("/") or parts[4] == "0":
            continue
        perms = parts[1]
        if len(perms) != 4 or perms[0] != "r" or perms[1] == "w" or perms[3] != "p":
            continue
        try:
            cur = (int(start, 16), int(end, 16), parts[5])
        except ValueError:
            continue
    return out


def _file_page_runs(pagemap: int, m: Mapping) -> list[tuple[int, int]]:
    """The address ranges of ``m`` without pages the process wrote, from
    ``/proc/self/pagemap`` (one 64-bit entry per page: bit 63 present, bit 61 a file
    page). Paging out a written page would only move it to swap, where there is swap,
    and relocated data (vtables, the GOT) is read on every call: it stays."""
    first, n = m.start // _PAGE, (m.end - m.start) // _PAGE
    raw = os.pread(pagemap, n * 8, first * 8)
    entries = memoryview(raw[: len(raw) // 8 * 8]).cast("Q")
    runs: list[tuple[int, int]] = []
    begin: int | None = None
    for i, e in enumerate(entries):
        written = e >> 63 and not (e >> 61) & 1
        if written:
            if begin is not None:
                runs.append((m.start + begin * _PAGE, m.start + i * _PAGE))
                begin = None
        elif begin is None:
            begin = i
    if begin is not None:
        runs.append((m.start + begin * _PAGE, m.start + len(entries) * _PAGE))
    return runs


def _owned(path: str, cache: dict[str, bool]) -> bool:
    """Whether the kernel will page out this file's pages for us: we own it or may
    write it (the rule of ``can_do_file_pageout``). A file gone from its path (replaced
    or deleted since it was mapped) cannot be checked and counts as not owned."""
    got = cache.get(path)
    if got is None:
        try:
            got = os.stat(path).st_uid == os.geteuid() or os.access(path, os.W_OK)
        except OSError:
            got = False
        cache[path] = got
    return got


def release_cold_pages() -> Released | None:
    """Ask the kernel to reclaim this process's clean, read-only file pages, then trim
    the heap.

    Returns what was done, or None where this cannot work (not Linux, no C library
    with ``madvise``, a kernel without ``MADV_PAGEOUT``); the reason is logged at debug
    level. Never raises: the agent serves the same either way.
    """
    if not sys.platform.startswith("linux"):
        return None
    libc = _libc()
    if libc is None:
        log.debug("memory release: no C library with madvise")
        return None
    try:
        before = rss_bytes()
        with open("/proc/self/smaps", "rb") as f:
            smaps = f.read().decode("utf-8", "surrogateescape")
    except OSError as e:
        log.debug("memory release: cannot read /proc/self: %s", e)
        return None
    advised = refused = not_owned = 0
    owned: dict[str, bool] = {}
    pagemap: int | None = None
    try:
        for m in _file_mappings(smaps):
            if not _owned(m.path, owned):
                not_owned += 1
                continue
            if m.anonymous_kb == 0:
                runs = [(m.start, m.end)]
            else:
                try:
                    if pagemap is None:
                        pagemap = os.open("/proc/self/pagemap", os.O_RDONLY)
                    runs = _file_page_runs(pagemap, m)
                except OSError as e:  # no pagemap (some sandboxes): leave this mapping
                    log.debug("memory release: %s: pagemap unreadable: %s", m.path, e)
                    continue
            for start, end in runs:
                if libc.madvise(start, end - start, MADV_PAGEOUT) == 0:
                    advised += 1
                elif ctypes.get_errno() == errno.EINVAL:
                    # No MADV_PAGEOUT in this kernel, or a locked (mlock) or special mapping.
                    refused += 1
                # Any other error (ENOMEM: the mapping went away meanwhile) skips that range.
    finally:
        if pagemap is not None:
            os.close(pagemap)
    if refused and not advised:
        log.debug("memory release: the kernel refused MADV_PAGEOUT on every mapping (older than 5.4?)")
        return None
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)
    return Released(before, rss_bytes(), advised, not_owned)
