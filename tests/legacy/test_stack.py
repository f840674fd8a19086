"""Which stack these tests run on, and that the agent announces its runtimes on it."""

from __future__ import annotations

import importlib.util

import numpy as np

from agent.runtimes.base import available_runtimes


def test_runtimes_announced_without_importing_them():
    ok, missing = available_runtimes()
    assert not missing, missing
    assert set(ok) == {"onnxruntime", "litert"}


def test_litert_library_matches_the_stack():
    from agent.runtimes import litert

    if importlib.util.find_spec("ai_edge_litert") is None:
        # The legacy stack: the fallback must be what runs, and numpy must be 1.x.
        assert litert._LIB == "tflite-runtime"
        assert int(np.__version__.split(".")[0]) < 2
        assert litert.LiteRtRuntime.library_version().startswith("2.14")
    else:
        assert litert._LIB == "ai-edge-litert"
