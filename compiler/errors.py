"""The compiler's error tree.

Everything derives from :class:`agent.errors.EdgefleetError`. Bad user input (data
files, model files, profile names, settings) derives from
:class:`agent.errors.DataError`; a technique that fails on a valid input is a
:class:`TechniqueError`, which the pipeline records as a rejection reason instead of
aborting the whole compile.
"""

from __future__ import annotations

from agent.errors import DataError, EdgefleetError

__all__ = [
    "CompilerError",
    "CompilerInputError",
    "DataFileError",
    "ModelLoadError",
    "TechniqueError",
]


class CompilerError(EdgefleetError):
    """Root of the errors the compiler raises deliberately."""


class CompilerInputError(CompilerError, DataError):
    """An input to ``edgefleet compile`` is unusable; retrying will not help."""


class DataFileError(CompilerInputError):
    """A calibration/eval/train ``.npz`` is unreadable, lacks ``x``, or has the wrong shape."""


class ModelLoadError(CompilerInputError):
    """The model file cannot be read, parsed, or converted to ONNX."""


class TechniqueError(CompilerError):
    """An optimisation technique failed on this model; the candidate is rejected."""
