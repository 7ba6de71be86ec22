import importlib.util
import os
import sys
import tempfile
from pathlib import Path

# fetched and exported test models go to a cache of the test run's own (set SPA_CACHE to share one),
# not to the user's ~/.cache/spa/models (a test run used to leave ~700 MB there)
os.environ.setdefault("SPA_CACHE", os.path.join(tempfile.gettempdir(), "spa-test-cache"))

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tools"))

if importlib.util.find_spec("torchvision") is not None:   # beside a CPU torch too (export_torchvision)
    from export_torchvision import import_torchvision
    import_torchvision()

#: the exactness bar of DESIGN.md
EXACT = 1e-5
