"""``spa.zoo``, the models spa fetches from PyPI packages, is ``spa.io.zoo`` (tools and users import
it by this name; this module is that one, so that setting its attributes sets the real ones)."""
import sys

from .io import zoo

sys.modules[__name__] = zoo
