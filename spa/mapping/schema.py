"""The map document checked before ``spa apply-map`` does any work (docs/map.md, "The map document").

A map is data from outside: a hand-edited, truncated or hostile file must end in one line and exit 2,
never in a traceback, a hang or a checkpoint sliced along the wrong axis.  :func:`read_json` bounds the
file (``MAX_JSON_BYTES``, a regular file, UTF-8, no ``NaN``/``Infinity``, no number too long to convert,
no nesting deeper than the parser allows); :func:`check_map` checks every key apply-map reads against
the schema below, and every index list against the axis it indexes, in one pass over the document:

* ``format`` is ``"spa-map"``, ``version`` the integer 1, ``tensors`` an object of entries;
* an entry (of ``tensors`` or ``folded``) has ``shape``: a list of at most ``MAX_RANK`` integers in
  [0, 2**62]; optional ``new_shape`` of the same length; optional ``kept``: an object whose keys are
  axes of ``shape`` written as decimal integers (``"0"``, not ``"00"`` or ``"-1"``) and whose values are
  non-empty lists of integers (not booleans, not floats), strictly ascending (so unique), in
  ``[0, shape[axis])`` (so no longer than the axis), with ``new_shape[axis]`` their count;
* ``tensors.*.framework`` a list of ``{"name": string, "transposed": boolean}``, ``tensors.*.folded``
  and ``folded.*.from`` strings, ``compensated`` a list of strings, ``layers`` a list of objects with
  an integer ``layer`` and the ``[before, after]`` pairs the summary prints.

The checkpoint's side is checked where a map entry meets its checkpoint tensor
(``spa.mapping.mapfile.plan``: the shapes must correspond, or the entry is refused by name).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from ..errors import SpaError

FORMAT = "spa-map"
VERSION = 1
#: the largest map (or --names file) read: a 70B-parameter decoder's map, every projection sliced on
#: both axes, is about 130 MB of JSON
MAX_JSON_BYTES = 256 * 2 ** 20
#: the most axes a tensor of the map may have (ONNX tensors in practice have at most 8)
MAX_RANK = 64
MAX_DIM = 2 ** 62
_AXIS_KEY = re.compile(r"0|[1-9][0-9]{0,2}")
#: the config keys of a ``layers`` entry the summary prints, each ``[before, after]``
LAYER_PAIRS = ("num_attention_heads", "num_key_value_heads", "head_dim", "v_head_dim", "intermediate_size")
FIX = "write the map again with `spa prune --map` (apply-map reads only the maps spa writes)"


def show(name, limit=60) -> str:
    """A name from the file, quoted on one line and cut to ``limit`` characters."""
    text = str(name)
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _no_constant(token):
    raise ValueError(f"{token} is not a JSON number")


def read_json(path, what, max_bytes=None):
    """The JSON value of file ``path`` (``what`` names it in errors: "MAP", "--names"), bounded."""
    limit = MAX_JSON_BYTES if max_bytes is None else max_bytes
    p = Path(path)
    if not p.is_file():
        raise SpaError(f"{what} {p}: no such file" if not p.exists() else f"{what} {p}: not a regular file")
    try:
        size = p.stat().st_size
        if size > limit:
            raise SpaError(f"{what} {p}: {size} bytes, more than the {limit} bytes a map or names file may have; "
                           "is this the right file?")
        with open(p, "rb") as fh:
            data = fh.read(limit + 1)
        if len(data) > limit:
            raise SpaError(f"{what} {p}: more than the {limit} bytes a map or names file may have; is this the right file?")
        return json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpaError(f"{what} {p}: not a JSON file ({str(exc).splitlines()[0][:200]})") from None
    except RecursionError:
        raise SpaError(f"{what} {p}: nested too deeply to be a {what.lower().strip('-')} file") from None
    except ValueError as exc:   # a number of more than 4300 digits, NaN or Infinity
        first = str(exc).splitlines()[0][:120]
        raise SpaError(f"{what} {p}: holds a value no map has ({first})") from None


class _Checker:
    def __init__(self, path):
        self.path = path

    def fail(self, where, problem):
        raise SpaError(f"MAP {self.path}: {where}: {problem}; {FIX}")

    def obj(self, value, where):
        if not isinstance(value, dict):
            self.fail(where, f"expected an object, got {_kind(value)}")
        return value

    def strings(self, value, where):
        if not isinstance(value, list):
            self.fail(where, f"expected a list of names, got {_kind(value)}")
        for i, v in enumerate(value):
            if not isinstance(v, str):
                self.fail(f"{where}[{i}]", f"expected a name (a string), got {_kind(v)}")

    def shape(self, value, where):
        if not isinstance(value, list):
            self.fail(where, f"expected a list of dims, got {_kind(value)}")
        if len(value) > MAX_RANK:
            self.fail(where, f"{len(value)} dims, more than {MAX_RANK}")
        for i, s in enumerate(value):
            if type(s) is not int or not 0 <= s <= MAX_DIM:
                self.fail(f"{where}[{i}]", f"a dim must be an integer in [0, 2**62], got {_value(s)}")
        return value

    def entry(self, e, where):
        """A tensor entry: shape, new_shape, kept (see the module doc)."""
        self.obj(e, where)
        if "shape" not in e:
            self.fail(where, "no 'shape'")
        shape = self.shape(e["shape"], f"{where}.shape")
        new = e.get("new_shape")
        if new is not None:
            self.shape(new, f"{where}.new_shape")
            if len(new) != len(shape):
                self.fail(f"{where}.new_shape", f"{len(new)} dims where 'shape' has {len(shape)}")
        kept = e.get("kept")
        if kept is None:
            return
        self.obj(kept, f"{where}.kept")
        for key, k in kept.items():
            at = f"{where}.kept[{show(key, 12)}]"
            if not _AXIS_KEY.fullmatch(key) or int(key) >= len(shape):
                self.fail(at, f"not an axis of a tensor of shape {shape} (axes are written \"0\" to "
                              f"\"{max(len(shape) - 1, 0)}\")")
            size = shape[int(key)]
            self.indices(k, size, at)
            if new is not None and new[int(key)] != len(k):
                self.fail(at, f"keeps {len(k)} positions but new_shape says {new[int(key)]}")
        if new is not None:
            for d, (s, n) in enumerate(zip(shape, new)):
                if str(d) not in kept and s != n:
                    self.fail(f"{where}.new_shape[{d}]", f"{n} differs from shape's {s} on an axis nothing is kept on")

    def indices(self, k, size, at):
        """``k``: the kept positions of an axis of ``size``: a non-empty, strictly ascending list of
        integers in [0, size); checked in this order so that a huge list costs one length test."""
        if not isinstance(k, list):
            self.fail(at, f"expected a list of kept positions, got {_kind(k)}")
        if not k:
            self.fail(at, "keeps no position (a prune keeps at least one channel of every group)")
        if len(k) > size:
            self.fail(at, f"{len(k)} kept positions on an axis of size {size}")
        bad = next((i for i, v in enumerate(k) if type(v) is not int), None)
        if bad is not None:
            self.fail(f"{at}[{bad}]", f"a position must be an integer, got {_value(k[bad])}")
        lo, hi = min(k), max(k)
        if lo < 0 or hi >= size:
            v = lo if lo < 0 else hi
            self.fail(at, f"position {_value(v)} is outside the axis of size {size}")
        steps = np.diff(np.asarray(k, np.int64))
        if steps.size and steps.min() <= 0:
            i = int(np.argmax(steps <= 0)) + 1
            self.fail(f"{at}[{i}]", f"position {k[i]} after {k[i - 1]}: kept positions are unique and ascending")

    def framework(self, hints, where):
        if not isinstance(hints, list):
            self.fail(where, f"expected a list of {{\"name\", \"transposed\"}} objects, got {_kind(hints)}")
        for i, h in enumerate(hints):
            self.obj(h, f"{where}[{i}]")
            if not isinstance(h.get("name"), str):
                self.fail(f"{where}[{i}].name", f"expected a checkpoint name (a string), got {_kind(h.get('name'))}")
            if not isinstance(h.get("transposed", False), bool):
                self.fail(f"{where}[{i}].transposed", f"expected true or false, got {_kind(h['transposed'])}")

    def layers(self, layers):
        if not isinstance(layers, list):
            self.fail("layers", f"expected a list, got {_kind(layers)}")
        for i, e in enumerate(layers):
            at = f"layers[{i}]"
            self.obj(e, at)
            if type(e.get("layer")) is not int:
                self.fail(f"{at}.layer", f"expected an integer, got {_kind(e.get('layer'))}")
            for key in LAYER_PAIRS:
                if key in e:
                    self.pair(e[key], f"{at}.{key}")
            for name, p in self.obj(e.get("projections", {}), f"{at}.projections").items():
                self.obj(p, f"{at}.projections[{show(name)}]")
                self.pair(p.get("out"), f"{at}.projections[{show(name)}].out")

    def pair(self, v, at):
        if not isinstance(v, list) or len(v) != 2 or not all(x is None or type(x) is int for x in v):
            self.fail(at, f"expected [before, after] integers, got {_kind(v)}")


def check_map(doc, path) -> dict:
    """``doc`` if it is a map apply-map can use, else a one-line :class:`SpaError` (module doc)."""
    c = _Checker(path)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise SpaError(f"MAP {path}: not a map written by `spa prune --map`")
    version = doc.get("version")
    if type(version) is not int or version != VERSION:
        raise SpaError(f"MAP {path}: map version {_value(version)}; this spa reads version {VERSION}")
    if "tensors" not in doc:
        c.fail("the document", "no 'tensors'")
    for name, e in c.obj(doc["tensors"], "tensors").items():
        where = f"tensors[{show(name)}]"
        c.entry(e, where)
        if "framework" in e:
            c.framework(e["framework"], f"{where}.framework")
        if "folded" in e and not isinstance(e["folded"], str):
            c.fail(f"{where}.folded", f"expected the folded BatchNorm's module name, got {_kind(e['folded'])}")
    for name, e in c.obj(doc.get("folded") or {}, "folded").items():
        where = f"folded[{show(name)}]"
        c.entry(e, where)
        if "from" in e and not isinstance(e["from"], str):
            c.fail(f"{where}.from", f"expected an initializer name, got {_kind(e['from'])}")
    if doc.get("compensated") is not None:
        c.strings(doc["compensated"], "compensated")
    if doc.get("layers") is not None:
        c.layers(doc["layers"])
    return doc


def check_names(names, path) -> dict:
    """The ``--names`` document: ``{ONNX initializer name: checkpoint name}``, strings only."""
    if not isinstance(names, dict) or not all(isinstance(v, str) for v in names.values()):
        raise SpaError(f"--names {path}: expected a JSON object {{ONNX initializer name: checkpoint name}} "
                       "of strings")
    return names


def _kind(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return _value(v)
    if isinstance(v, str):
        return f"the string {show(v, 24)}"
    if isinstance(v, list):
        return f"a list of {len(v)}"
    return {dict: "an object"}.get(type(v), type(v).__name__)


def _value(v) -> str:
    """A JSON value for a message, short: a 4000-digit integer shows its first digits and its length."""
    if isinstance(v, bool) or v is None or not isinstance(v, (int, float)):
        return _kind(v)
    text = repr(v)
    return text if len(text) <= 24 else f"{text[:12]}... ({len(text)} digits)"
