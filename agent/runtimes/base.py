"""The runtime interface and registry."""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable
from typing import ClassVar, Protocol, runtime_checkable

import numpy as np

from agent.bundle import Bundle, TensorSpec
from agent.errors import RuntimeLoadError
from agent.profiles import RuntimeOptions

__all__ = ["Runtime", "LoadedModel", "register", "create_runtime", "available_runtimes"]

log = logging.getLogger(__name__)

# Runtime modules, imported lazily so that a missing library only disables its runtime.
_MODULES: dict[str, str] = {
    "onnxruntime": "agent.runtimes.ort",
    "litert": "agent.runtimes.litert",
}
_REGISTRY: dict[str, type[Runtime]] = {}


@runtime_checkable
class Runtime(Protocol):
    """One loaded model in one inference library."""

    key: ClassVar[str]

    @classmethod
    def library_version(cls) -> str:
        """Version of the underlying library; raises ImportError when it is absent."""
        ...

    def load(self, model_path: str, options: RuntimeOptions) -> None:
        """Load the model. Raises RuntimeLoadError."""
        ...

    @property
    def inputs(self) -> list[TensorSpec]: ...

    @property
    def outputs(self) -> list[TensorSpec]: ...

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch. Raises ValueError for inputs of the wrong name/shape/dtype."""
        ...

    def warmup(self, inputs: dict[str, np.ndarray] | None = None) -> None: ...

    def unload(self) -> None: ...


def register(cls: type[Runtime]) -> type[Runtime]:
    _REGISTRY[cls.key] = cls
    return cls


def _runtime_class(key: str) -> type[Runtime]:
    if key not in _REGISTRY:
        module = _MODULES.get(key)
        if module is None:
            raise RuntimeLoadError(f"unknown runtime {key!r}")
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise RuntimeLoadError(f"runtime {key!r} is not available on this device: {e}") from e
    return _REGISTRY[key]


# The distributions that provide each runtime, in order of preference. Availability is
# read from installed metadata so that announcing a runtime does not load it.
_DISTRIBUTIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "onnxruntime": (("onnxruntime", "onnxruntime"), ("onnxruntime-gpu", "onnxruntime")),
    "litert": (("ai-edge-litert", "ai_edge_litert"), ("tflite-runtime", "tflite_runtime")),
}


def available_runtimes() -> tuple[dict[str, str], dict[str, str]]:
    """(runtime -> library version, runtime -> reason it is unavailable).

    Cheap: looks at installed distributions without importing the libraries. A library
    that is installed but broken is found out when a model is loaded (RuntimeLoadError).
    """
    import importlib.util
    from importlib.metadata import PackageNotFoundError, version

    ok: dict[str, str] = {}
    missing: dict[str, str] = {}
    for key, dists in _DISTRIBUTIONS.items():
        for dist, module in dists:
            try:
                v = version(dist)
            except PackageNotFoundError:
                continue
            if importlib.util.find_spec(module) is not None:
                ok[key] = v
                break
        else:
            missing[key] = f"none of {', '.join(d for d, _ in dists)} is installed"
            log.warning("runtime %s unavailable: %s", key, missing[key])
    return ok, missing


def create_runtime(key: str) -> Runtime:
    """A fresh, unloaded runtime instance. Raises RuntimeLoadError."""
    return _runtime_class(key)()


class LoadedModel:
    """A bundle loaded in a runtime, with in-flight accounting for hot swaps.

    ``acquire``/``release`` bracket each request; :meth:`retire` unloads the model
    once the last in-flight request has finished, so a swap never cuts one short.

    The request path takes no lock: in-flight requests are tokens in a list, and
    ``list.append``/``list.pop`` are atomic. A request adds its token *before* it looks
    at the retired flag, and :meth:`retire` sets the flag *before* it counts tokens, so
    either the request sees the flag (and backs out) or ``retire`` sees the token (and
    leaves the unload to the request's ``release``). Unloading itself runs once, under
    a lock.
    """

    def __init__(self, bundle: Bundle, runtime: Runtime, slot: str):
        self.bundle = bundle
        self.runtime = runtime
        self.slot = slot
        self._lock = threading.Lock()
        self._inflight: list[None] = []
        self._retired = False
        self._unloaded = False

    @property
    def ref(self) -> str:
        return self.bundle.manifest.ref

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    @property
    def retired(self) -> bool:
        """Retired: :meth:`acquire` refuses from now on."""
        return self._retired

    def acquire(self) -> bool:
        self._inflight.append(None)
        if self._retired:
            self.release()
            return False
        return True

    def release(self) -> None:
        inflight = self._inflight
        inflight.pop()
        if self._retired and not inflight:
            self._unload_once()

    def retire(self) -> None:
        self._retired = True
        if not self._inflight:
            self._unload_once()

    def warm(self) -> bool:
        """Run the warm-up again on a model that is serving (after
        :func:`agent.memory.release_cold_pages`, so that the pages inference needs are
        back before the next request). False when it did not run: the model is retired,
        or its self-test inputs no longer read or fit (logged; serving goes on as before).
        """
        if not self.acquire():
            return False
        try:
            self.runtime.warmup(_first_rows(self.bundle))
            return True
        except Exception as e:  # the same warm-up passed at load; serving goes on either way
            log.warning("%s: warm-up after releasing memory failed: %s", self.ref, e)
            return False
        finally:
            self.release()

    def _unload_once(self) -> None:
        with self._lock:
            if self._unloaded:
                return
            self._unloaded = True
        self.runtime.unload()


def _first_rows(bundle: Bundle) -> dict[str, np.ndarray]:
    """The first row of each self-test input: what a warm-up runs."""
    return {k: v[:1] for k, v in bundle.selftest().inputs.items()}


def load_bundle(
    bundle: Bundle, options: RuntimeOptions, slot: str, *, warmup: bool = True
) -> LoadedModel:
    """Load a bundle in its runtime and warm it up with its self-test inputs.

    Raises:
        RuntimeLoadError: the runtime is unavailable or refused the model.
    """
    runtime = create_runtime(bundle.manifest.runtime)
    runtime.load(str(bundle.model_path), options)
    if warmup:
        try:
            runtime.warmup(_first_rows(bundle))
        except ValueError as e:
            runtime.unload()
            raise RuntimeLoadError(f"{bundle.manifest.ref}: warm-up failed: {e}") from e
    return LoadedModel(bundle, runtime, slot)


Loader = Callable[[Bundle, RuntimeOptions, str], LoadedModel]
