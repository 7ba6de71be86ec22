"""spa: structured pruning of ONNX models, framework-agnostic (after "Structurally Prune Anything").

``spa.analyze``, ``spa.prune`` and the rest are imported on first use: ``import spa.cli`` (so every
command's start, ``spa --help`` and a usage error) loads no onnx, onnxruntime or numpy."""
from .errors import SpaError  # noqa: F401

__version__ = "0.1.0"

_API = ("Analysis", "PruneOptions", "PruneResult", "analyze", "prune", "profile_experts", "match_experts")
_IO = ("load_model", "save_model")


_LOADING = set()


def __getattr__(name):
    if name in _LOADING or name.startswith("__"):   # asked by the import below: not loaded yet
        raise AttributeError(f"module 'spa' has no attribute {name!r}")
    _LOADING.update(("api", "io"))
    try:
        from . import api, io
    finally:
        _LOADING.clear()
    if name in _API:
        return getattr(api, name)
    if name in _IO:
        return getattr(io, name)
    if name in globals():   # a subpackage the library imports (spa.io, spa.runtime...), as before
        return globals()[name]
    raise AttributeError(f"module 'spa' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API) | set(_IO))
