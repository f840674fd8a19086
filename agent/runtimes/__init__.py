"""Inference runtimes behind one small interface, one module per runtime.

Each runtime module defines a class implementing :class:`~agent.runtimes.base.Runtime`
and registers it under its key. A runtime whose library cannot be imported on this
device is recorded as unavailable with the reason; it is never fatal.
"""

from agent.runtimes.base import (
    LoadedModel,
    Runtime,
    available_runtimes,
    create_runtime,
    register,
)

__all__ = ["Runtime", "LoadedModel", "register", "create_runtime", "available_runtimes"]
