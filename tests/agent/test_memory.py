"""agent.memory: clean, read-only file pages are given back where the kernel allows it,
and serving goes on unchanged.

The mechanism is checked on a file that only a child process maps, so that no other
process (this one included) shares its pages: the kernel leaves shared pages alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from agent.bundle import Bundle, unpack
from agent.memory import Mapping, _file_mappings, _file_page_runs, release_cold_pages
from agent.profiles import RuntimeOptions
from agent.runtimes.base import load_bundle
from tests.support import linear_bundle, linear_onnx, owns_installed_libraries

ROOT = Path(__file__).resolve().parents[2]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_PAGEOUT is Linux's")
owner_only = pytest.mark.skipif(
    not owns_installed_libraries(),
    reason="the kernel pages out only files the process owns; these libraries belong to another user")
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

SMAPS = """\
55d0c0a00000-55d0c0a2c000 r--p 00000000 fd:01 1234                       /usr/bin/python3.11
Size:                176 kB
Rss:                 176 kB
Anonymous:             0 kB
55d0c0a2c000-55d0c0d00000 r-xp 0002c000 fd:01 1234                       /usr/bin/python3.11
Rss:                1200 kB
Anonymous:             0 kB
55d0c0e00000-55d0c0e10000 r--p 00300000 fd:01 1234                       /usr/bin/python3.11
Rss:                  64 kB
Anonymous:            60 kB
55d0c0f00000-55d0c0f10000 rw-p 00300000 fd:01 1234                       /usr/bin/python3.11
Anonymous:             8 kB
55d0c1000000-55d0c2000000 rw-p 00000000 00:00 0                          [heap]
Anonymous:          4000 kB
7f0000000000-7f0000100000 rw-p 00000000 00:00 0
Anonymous:          1024 kB
7f0000100000-7f0000200000 r-xp 00000000 fd:01 99                         /opt/lib dir/libx.so (deleted)
Anonymous:             0 kB
7f0000300000-7f0000301000 r--s 00000000 00:05 77                         /dev/shm/ring
Anonymous:             0 kB
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0                          [vdso]
Anonymous:             0 kB
"""


def test_only_private_read_only_file_mappings_are_chosen():
    got = [(m.start, m.end, m.path, m.anonymous_kb) for m in _file_mappings(SMAPS)]
    assert got == [
        (0x55D0C0A00000, 0x55D0C0A2C000, "/usr/bin/python3.11", 0),
        (0x55D0C0A2C000, 0x55D0C0D00000, "/usr/bin/python3.11", 0),
        # relocated data (read-only, but written before): its written pages are found per page
        (0x55D0C0E00000, 0x55D0C0E10000, "/usr/bin/python3.11", 60),
        (0x7F0000100000, 0x7F0000200000, "/opt/lib dir/libx.so (deleted)", 0),
    ]


@pytest.mark.parametrize("text", [
    "",
    "garbage\n\n",
    "zz-yy r-xp 0 fd:01 5 /lib/x.so\nAnonymous: 0 kB\n",  # addresses that are not hex
    "7f00-7f01 r-xp 0 fd:01\nAnonymous: 0 kB\n",  # no path
    "7f00-7f01 r-xp 0 fd:01 5 /lib/x.so\n",  # truncated before its Anonymous line
    "7f00-7f01 r-xp 0 fd:01 5 /lib/x.so\nAnonymous:\n",  # no value
    "7f00-7f01 rx 0 fd:01 5 /lib/x.so\nAnonymous: 0 kB\n",  # odd permissions
])
def test_malformed_smaps_text_chooses_nothing(text):
    assert _file_mappings(text) == []


PRESENT, FILE = 1 << 63, 1 << 61


def _runs(tmp_path: Path, entries: list[int], start_page: int = 3, pages: int | None = None) -> list[tuple[int, int]]:
    """_file_page_runs over a fake pagemap whose entries for ``start_page`` on are ``entries``."""
    n = len(entries) if pages is None else pages
    path = tmp_path / "pagemap"
    path.write_bytes(bytes(8 * start_page) + np.array(entries, dtype="<u8").tobytes())
    fd = os.open(path, os.O_RDONLY)
    try:
        return _file_page_runs(fd, Mapping(start_page * PAGE, (start_page + n) * PAGE, "/lib/x.so"))
    finally:
        os.close(fd)


def _pages(runs: list[tuple[int, int]], start_page: int = 3) -> list[tuple[int, int]]:
    return [(a // PAGE - start_page, b // PAGE - start_page) for a, b in runs]


W, F, ABSENT = PRESENT, PRESENT | FILE, 0  # written (anonymous), file page, not present


@pytest.mark.parametrize(("entries", "want"), [
    ([F, F, F, F], [(0, 4)]),
    ([W, F, F, F], [(1, 4)]),  # written first page
    ([F, F, F, W], [(0, 3)]),  # written last page
    ([F, W, F, W, F], [(0, 1), (2, 3), (4, 5)]),
    ([W, W, W], []),  # all written
    ([ABSENT, W, ABSENT], [(0, 1), (2, 3)]),  # pages not present do no harm in a range
    ([FILE, W], [(0, 1)]),  # the file bit without the present bit: not present
])
def test_file_page_runs_leave_out_exactly_the_written_pages(tmp_path, entries, want):
    assert _pages(_runs(tmp_path, entries)) == want


def test_file_page_runs_stop_where_a_short_pagemap_read_ends(tmp_path):
    # a mapping of 6 pages whose pagemap holds 3 entries: the range ends at the last one read
    assert _pages(_runs(tmp_path, [F, F, F], pages=6)) == [(0, 3)]


CHILD = textwrap.dedent("""
    import ctypes, json, mmap, os, sys
    from agent.memory import release_cold_pages

    path, mode = sys.argv[1], sys.argv[2]
    size = os.path.getsize(path)
    page = mmap.PAGESIZE
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fd = os.open(path, os.O_RDONLY)
    if mode.isdigit():  # become another user, who does not own the file (opened above, read-only)
        uid = int(mode)
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        libc.prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: a process that changed user may read its own /proc again
    written = (3, 7) if mode == "cow" else ()
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if written else 0)
    addr = libc.mmap(None, size, prot, mmap.MAP_PRIVATE, fd, 0)
    assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
    data = ctypes.string_at(addr, size)  # touches every page
    for i in written:  # as a loader writes relocations, then makes them read-only
        ctypes.memset(addr + i * page, 0xAB, page)
    if written:
        assert libc.mprotect(addr, size, mmap.PROT_READ) == 0

    def resident():
        cur, kb = None, 0
        for line in open("/proc/self/smaps"):
            if line[0] in "0123456789abcdef" and "-" in line.split()[0]:
                cur = line.split()[0]
            elif cur and line.startswith("Rss:") and int(cur.split("-")[0], 16) == addr:
                kb += int(line.split()[1])
        return kb * 1024

    before = resident()
    r = release_cold_pages()
    after = resident()
    now = ctypes.string_at(addr, size)  # the pages come back with the file's bytes, or the written ones
    want = bytearray(data)
    for i in written:
        want[i * page:(i + 1) * page] = bytes([0xAB]) * page
    print(json.dumps({"before": before, "after": after, "page": page, "ranges": r.ranges,
                      "not_owned": r.not_owned, "same": now == bytes(want)}))
""")


def _run_child(path: Path, mode: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), mode], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _payload(tmp_path: Path) -> Path:
    path = tmp_path / "payload.bin"
    path.write_bytes(np.random.default_rng(0).bytes(16 << 20))
    path.chmod(0o644)
    return path


@linux_only
def test_pages_of_a_file_the_process_owns_are_given_back_and_read_the_same(tmp_path):
    got = _run_child(_payload(tmp_path), "own")
    assert got["before"] >= 15 << 20, got
    assert got["after"] <= 1 << 20, got
    assert got["same"] and got["ranges"] > 0


@linux_only
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to run a child as another user")
def test_pages_of_a_file_another_user_owns_stay_and_are_counted(tmp_path):
    # The kernel pages out only files the caller owns or may write (can_do_file_pageout):
    # a service user over a root-owned virtual environment releases nothing.
    got = _run_child(_payload(tmp_path), "65534")
    assert got["not_owned"] > 0
    assert got["before"] >= 15 << 20 and got["after"] >= 15 << 20, got
    assert got["same"]


@linux_only
def test_written_pages_of_a_read_only_mapping_stay_and_its_file_pages_go(tmp_path):
    got = _run_child(_payload(tmp_path), "cow")
    assert got["before"] >= 8 << 20, got
    # the two written pages stay; the file's go (a large page-cache folio the kernel could
    # not split would keep a little more)
    assert 2 * got["page"] <= got["after"] < 4 << 20, got
    assert got["same"]


ORT_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    from agent.memory import release_cold_pages
    from agent.profiles import RuntimeOptions
    from agent.runtimes.ort import OnnxRuntime

    rt = OnnxRuntime()
    rt.load(sys.argv[1], RuntimeOptions())
    x = {"input": np.arange(8, dtype=np.float32).reshape(2, 4)}
    before = rt.infer(x)["logits"]
    r = release_cold_pages()
    after = rt.infer(x)["logits"]
    print(json.dumps({"ranges": r.ranges, "same": bool(np.array_equal(before, after)), "out": after.tolist()}))
""")


@linux_only
@owner_only
def test_onnxruntime_answers_the_same_after_a_release(tmp_path):
    w = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    b = np.array([0.5, -1.0, 2.0], dtype=np.float32)
    model = tmp_path / "m.onnx"
    model.write_bytes(linear_onnx(w, b))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", ORT_CHILD, str(model)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["ranges"] > 10 and got["same"]
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_allclose(np.array(got["out"]), x @ w + b, rtol=1e-6)


@linux_only
@owner_only
def test_release_in_this_process_reports_what_it_did():
    r = release_cold_pages()
    assert r is not None
    assert r.ranges > 0 and r.rss_before > 0 and r.rss_after > 0
    assert r.freed == r.rss_before - r.rss_after


def _loaded(tmp_path: Path):
    linear_bundle(tmp_path / "b.efb")
    bundle: Bundle = unpack(tmp_path / "b.efb", tmp_path / "b")
    return load_bundle(bundle, RuntimeOptions(), "a")


def test_warm_runs_the_warm_up_on_a_serving_model(tmp_path, monkeypatch):
    lm = _loaded(tmp_path)
    seen = []
    monkeypatch.setattr(lm.runtime, "warmup", lambda inputs: seen.append({k: v.shape for k, v in inputs.items()}))
    assert lm.warm()
    assert seen == [{"input": (1, 4)}]
    assert lm.inflight == 0


def test_warm_that_fails_is_reported_not_raised(tmp_path, caplog):
    lm = _loaded(tmp_path)
    (lm.bundle.root / "selftest.npz").unlink()
    assert not lm.warm()
    assert "warm-up after releasing memory failed" in caplog.text
    assert lm.inflight == 0
    x = np.zeros((1, 4), np.float32)
    assert lm.runtime.infer({"input": x})["logits"].shape == (1, 3)


def test_warm_skips_a_retired_model(tmp_path):
    lm = _loaded(tmp_path)
    lm.retire()
    assert not lm.warm()
