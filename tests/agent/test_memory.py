"""agent.memory: the read-only file pages start-up touched are given back, and serving
goes on unchanged. The release itself runs in a child process, where ONNX Runtime is
imported fresh, so that its pages are this process's alone (the kernel leaves pages that
another process maps too)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from agent.memory import _file_pages, release_cold_pages
from tests.support import linear_onnx

ROOT = Path(__file__).resolve().parents[2]

MAPS = """\
55d0c0a00000-55d0c0a2c000 r--p 00000000 fd:01 1234                       /usr/bin/python3.11
55d0c0a2c000-55d0c0d00000 r-xp 0002c000 fd:01 1234                       /usr/bin/python3.11
55d0c0f00000-55d0c0f10000 rw-p 00300000 fd:01 1234                       /usr/bin/python3.11
55d0c1000000-55d0c2000000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0000100000 rw-p 00000000 00:00 0
7f0000100000-7f0000200000 r-xp 00000000 fd:01 99                         /opt/lib dir/libx.so (deleted)
7f0000200000-7f0000201000 ---p 00000000 fd:01 99                         /opt/lib dir/libx.so (deleted)
7f0000300000-7f0000301000 r--s 00000000 00:05 77                         /dev/shm/ring
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0                          [vdso]
7ffd00002000-7ffd00004000 r--p 00000000 00:00 0                          [vvar]
"""


def test_only_read_only_file_mappings_are_chosen():
    assert _file_pages(MAPS) == [
        (0x55D0C0A00000, 0x55D0C0A2C000),
        (0x55D0C0A2C000, 0x55D0C0D00000),
        (0x7F0000100000, 0x7F0000200000),  # a path with a space, deleted meanwhile: still the file's pages
    ]


def test_malformed_maps_lines_are_skipped():
    assert _file_pages("garbage\n\n7f00-7f01 r-xp 0 fd:01\n" + MAPS.splitlines()[1]) == [
        (0x55D0C0A2C000, 0x55D0C0D00000)]


CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    from agent.memory import release_cold_pages, rss_bytes
    from agent.profiles import RuntimeOptions
    from agent.runtimes.ort import OnnxRuntime

    rt = OnnxRuntime()
    rt.load(sys.argv[1], RuntimeOptions())
    x = {"input": np.arange(8, dtype=np.float32).reshape(2, 4)}
    before = rt.infer(x)["logits"]
    released = release_cold_pages()
    low = rss_bytes()
    after = rt.infer(x)["logits"]
    print(json.dumps({"before_rss": released.rss_before, "after_rss": released.rss_after, "low": low,
                      "mappings": released.mappings, "same": bool(np.array_equal(before, after)),
                      "out": after.tolist()}))
""")


def _kernel_has_pageout() -> bool:
    major, minor = (int(p) for p in os.uname().release.split(".")[:2])
    return (major, minor) >= (5, 4)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_PAGEOUT is Linux's")
def test_release_gives_back_onnxruntime_pages_and_inference_is_unchanged(tmp_path):
    assert _kernel_has_pageout(), "this test needs Linux 5.4 or later"
    w = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    b = np.array([0.5, -1.0, 2.0], dtype=np.float32)
    model = tmp_path / "m.onnx"
    model.write_bytes(linear_onnx(w, b))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", CHILD, str(model)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["mappings"] > 10
    # ONNX Runtime's import alone leaves 20 MiB or more of its code resident; most of it goes.
    assert got["before_rss"] - got["after_rss"] > 8 << 20, got
    assert got["same"]
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_allclose(np.array(got["out"]), x @ w + b, rtol=1e-6)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_PAGEOUT is Linux's")
def test_release_in_this_process_reports_what_it_did():
    r = release_cold_pages()
    assert r is not None
    assert r.mappings > 0 and r.rss_before > 0 and r.rss_after > 0
    assert r.freed == r.rss_before - r.rss_after
