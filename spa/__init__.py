"""spa: structured pruning of ONNX models, framework-agnostic (after "Structurally Prune Anything")."""
from .api import Analysis, PruneOptions, PruneResult, analyze, prune  # noqa: F401
from .errors import SpaError  # noqa: F401
from .io import load_model, save_model  # noqa: F401

__version__ = "0.1.0"
