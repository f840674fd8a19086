"""edgefleet compiler: per-profile model optimisation, measurement, bundling and selection.

Entry points: :func:`compiler.pipeline.compile_model` (library) and the
``edgefleet compile`` command (:data:`compiler.cli.compile_command`).
"""

__all__: list[str] = []
