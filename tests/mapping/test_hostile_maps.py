"""``spa apply-map`` on hostile maps and names files: every one ends in one line and exit 2, fast,
with nothing written (``spa.mapping.schema``).  The map and the checkpoint are made by hand: a map
that a prune wrote is checked by tests/mapping/test_mapping.py."""
from __future__ import annotations

import copy
import json
import time

import numpy as np
import pytest
from click.testing import CliRunner

from spa.cli import cli
from spa.mapping import schema

KEPT = [0, 2, 5]
BASE = {
    "format": "spa-map", "version": 1,
    "tensors": {
        "w": {"shape": [8, 4], "new_shape": [3, 4], "kept": {"0": KEPT},
              "framework": [{"name": "w_alias", "transposed": False}]},
        "b": {"shape": [8], "new_shape": [3], "kept": {"0": KEPT}, "folded": "bn"},
        "s": {"shape": [1, 8, 1, 1], "new_shape": [1, 3, 1, 1], "kept": {"0": [0], "1": KEPT}},
        "c": {"shape": [5]},
    },
    "folded": {"bn.weight": {"shape": [8], "from": "w", "new_shape": [3], "kept": {"0": KEPT}}},
    "compensated": ["w"],
    "layers": [{"layer": 0, "projections": {"fc": {"before": [8, 4], "after": [3, 4], "out": [8, 3]}},
                "intermediate_size": [8, 3]}],
}
#: the time any refusal may take (the huge index list among them): no hang, no quadratic check
SECONDS = 15


@pytest.fixture
def files(tmp_path):
    ck = {"w": np.arange(32, dtype=np.float32).reshape(8, 4), "b": np.arange(8, dtype=np.float32),
          "s": np.arange(8, dtype=np.float32), "c": np.ones(5, np.float32), "bn.weight": np.arange(8.0)}
    np.savez(tmp_path / "ck.npz", **ck)
    return tmp_path


def run_apply_map(tmp_path, text, *extra):
    path = tmp_path / "map.json"
    path.write_text(text) if isinstance(text, str) else path.write_bytes(text)
    t0 = time.perf_counter()
    res = CliRunner().invoke(cli, ["apply-map", str(path), str(tmp_path / "ck.npz"), "-o", str(tmp_path / "out.npz"),
                                   *extra])
    return res, time.perf_counter() - t0


def test_the_base_map_applies(files):
    res, _ = run_apply_map(files, json.dumps(BASE))
    assert res.exit_code == 0, res.output
    out = dict(np.load(files / "out.npz"))
    assert out["w"].shape == (3, 4) and out["b"].tolist() == [0, 2, 5] and out["s"].tolist() == [0, 2, 5]
    assert out["bn.weight"].tolist() == [0, 2, 5] and out["c"].shape == (5,)


def _set(path, value):
    """A mutation of BASE: ``path`` a tuple of keys into the document; ``value`` ``DELETE`` removes it."""
    def mutate(doc):
        *parents, last = path
        for key in parents:
            doc = doc[key]
        if value is DELETE:
            del doc[last]
        else:
            doc[last] = value
    return mutate


DELETE = object()
W_KEPT = ("tensors", "w", "kept", "0")

HOSTILE = {
    # indices
    "index out of range": (_set(W_KEPT, [0, 2, 8]), "outside the axis of size 8"),
    "index negative": (_set(W_KEPT, [-1, 2]), "outside the axis"),
    "index huge": (_set(W_KEPT, [0, 10 ** 30]), "outside the axis"),
    "index a string": (_set(W_KEPT, ["0", 2]), "must be an integer"),
    "index null": (_set(W_KEPT, [None]), "must be an integer, got null"),
    "index nested list": (_set(W_KEPT, [[0], 2]), "must be an integer"),
    "index a dict": (_set(W_KEPT, [{"a": 1}]), "must be an integer"),
    "index a float": (_set(W_KEPT, [0.0, 2]), "must be an integer"),
    "index a boolean": (_set(W_KEPT, [True, 2]), "must be an integer"),
    "indices repeated": (_set(W_KEPT, [0, 0, 2]), "unique and ascending"),
    "indices unordered": (_set(W_KEPT, [2, 0]), "unique and ascending"),
    "indices empty": (_set(W_KEPT, []), "keeps no position"),
    "indices longer than the axis": (_set(W_KEPT, list(range(9))), "9 kept positions on an axis of size 8"),
    "indices huge list": (_set(W_KEPT, list(range(2_000_000))), "2000000 kept positions on an axis of size 8"),
    "indices a scalar": (_set(W_KEPT, 3), "expected a list of kept positions"),
    "indices a dict": (_set(W_KEPT, {"0": 1}), "expected a list of kept positions"),
    "indices null": (_set(W_KEPT, None), "expected a list of kept positions, got null"),
    # axes
    "axis out of range": (_set(("tensors", "w", "kept"), {"2": [0]}), "not an axis"),
    "axis negative": (_set(("tensors", "w", "kept"), {"-1": [0]}), "not an axis"),
    "axis not an integer": (_set(("tensors", "w", "kept"), {"a": [0]}), "not an axis"),
    "axis a float": (_set(("tensors", "w", "kept"), {"1.0": [0]}), "not an axis"),
    "axis with a leading zero": (_set(("tensors", "w", "kept"), {"00": [0]}), "not an axis"),
    "axis of 5000 digits": (_set(("tensors", "w", "kept"), {"9" * 5000: [0]}), "not an axis"),
    # the keys' types
    "kept a list": (_set(("tensors", "w", "kept"), [KEPT]), "kept: expected an object"),
    "kept a string": (_set(("tensors", "w", "kept"), "0"), "kept: expected an object"),
    "shape a string": (_set(("tensors", "w", "shape"), "8,4"), "shape: expected a list of dims"),
    "shape null": (_set(("tensors", "w", "shape"), None), "shape: expected a list of dims, got null"),
    "shape of floats": (_set(("tensors", "w", "shape"), [8.0, 4]), "a dim must be an integer"),
    "shape negative": (_set(("tensors", "w", "shape"), [-8, 4]), "a dim must be an integer"),
    "shape of 100 dims": (_set(("tensors", "c", "shape"), [1] * 100), "more than 64"),
    "shape missing": (_set(("tensors", "w", "shape"), DELETE), "no 'shape'"),
    "new_shape disagrees": (_set(("tensors", "w", "new_shape"), [4, 4]), "keeps 3 positions but new_shape says 4"),
    "new_shape of another rank": (_set(("tensors", "w", "new_shape"), [3]), "1 dims where 'shape' has 2"),
    "framework a string": (_set(("tensors", "w", "framework"), "w_alias"), "framework: expected a list"),
    "framework of strings": (_set(("tensors", "w", "framework"), ["w_alias"]), "framework[0]: expected an object"),
    "framework name a number": (_set(("tensors", "w", "framework"), [{"name": 3}]), "expected a checkpoint name"),
    "framework transposed a string": (_set(("tensors", "w", "framework"), [{"name": "x", "transposed": "yes"}]),
                                      "expected true or false"),
    "folded a number": (_set(("tensors", "b", "folded"), 3), "expected the folded BatchNorm's module name"),
    "folded section a list": (_set(("folded",), ["bn.weight"]), "folded: expected an object"),
    "folded entry without shape": (_set(("folded", "bn.weight", "shape"), DELETE), "no 'shape'"),
    "folded from a number": (_set(("folded", "bn.weight", "from"), 3), "expected an initializer name"),
    "folded index out of range": (_set(("folded", "bn.weight", "kept", "0"), [9]), "outside the axis"),
    "compensated a string": (_set(("compensated",), "w"), "compensated: expected a list of names"),
    "compensated of numbers": (_set(("compensated",), [1]), "expected a name"),
    "layers an object": (_set(("layers",), {"0": {}}), "layers: expected a list"),
    "layer number a string": (_set(("layers", 0, "layer"), "0"), "layer: expected an integer"),
    "layer size a scalar": (_set(("layers", 0, "intermediate_size"), 5), "expected [before, after]"),
    "layer projection out missing": (_set(("layers", 0, "projections", "fc", "out"), DELETE),
                                     "expected [before, after]"),
    # the document
    "tensors missing": (_set(("tensors",), DELETE), "no 'tensors'"),
    "tensors a list": (_set(("tensors",), [1, 2]), "tensors: expected an object"),
    "tensor entry a scalar": (_set(("tensors", "w"), 3), "expected an object"),
    "tensor entry null": (_set(("tensors", "w"), None), "expected an object, got null"),
    "format missing": (_set(("format",), DELETE), "not a map written by"),
    "version missing": (_set(("version",), DELETE), "map version null"),
    "version true": (_set(("version",), True), "map version true"),
    "version a string": (_set(("version",), "1"), "map version the string '1'"),
    "a name with a newline": (_set(("tensors", "w\nx"), {"shape": "bad"}), "tensors['w\\nx'].shape"),
    # the checkpoint's shapes
    "shape not the checkpoint's": (_set(("tensors", "w"), {"shape": [6, 4], "new_shape": [3, 4], "kept": {"0": KEPT}}),
                                   "checkpoint tensor 'w' has the shape [8, 4]"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_map_is_refused_in_one_line(files, case):
    mutate, message = HOSTILE[case]
    doc = copy.deepcopy(BASE)
    mutate(doc)
    assert_refused(*run_apply_map(files, json.dumps(doc)), message, files)


def assert_refused(res, seconds, message, tmp_path):
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert isinstance(res.exception, SystemExit), res.exception
    lines = [line for line in res.output.splitlines() if not line.startswith("spa: [")]   # progress lines
    assert len(lines) == 1 and lines[0].startswith("spa: error: "), res.output
    assert "Traceback" not in res.output and message in lines[0], lines[0]
    assert len(lines[0]) < 600
    assert seconds < SECONDS
    assert not (tmp_path / "out.npz").exists()


RAW = {
    "truncated": ('{"format": "spa-map", "version": 1, "tensors": {', "not a JSON file"),
    "an index of 5000 digits": (json.dumps(BASE).replace("[0, 2, 5]", "[0, 2, " + "5" * 5000 + "]", 1),
                                "holds a value no map has"),
    "a shape of 5000 digits": (json.dumps(BASE).replace("[8, 4]", "[" + "8" * 5000 + ", 4]", 1),
                               "holds a value no map has"),
    "NaN": (json.dumps(BASE).replace("[0, 2, 5]", "[0, 2, NaN]", 1), "NaN is not a JSON number"),
    "Infinity": (json.dumps(BASE).replace("[8, 4]", "[Infinity, 4]", 1), "Infinity is not a JSON number"),
    "nested a million deep": ("[" * 1_000_000 + "]" * 1_000_000, "nested too deeply"),
    "not UTF-8": (b'{"format": "spa-map", "\xff": 1}', "not a JSON file"),
    "a list": ("[1, 2, 3]", "not a map written by"),
    "a scalar": ("7", "not a map written by"),
    "null": ("null", "not a map written by"),
    "empty": ("", "not a JSON file"),
}


@pytest.mark.parametrize("case", list(RAW))
def test_hostile_map_file_is_refused_in_one_line(files, case):
    text, message = RAW[case]
    assert_refused(*run_apply_map(files, text), message, files)


def test_a_map_over_the_size_limit_is_refused_before_it_is_read(files, monkeypatch):
    monkeypatch.setattr(schema, "MAX_JSON_BYTES", 1000)
    doc = copy.deepcopy(BASE)
    doc["tensors"]["c"]["note"] = "x" * 2000
    assert_refused(*run_apply_map(files, json.dumps(doc)), "more than the 1000 bytes", files)


@pytest.mark.parametrize("names, message", [
    ("[1]", "expected a JSON object"),
    ('{"w": 3}', "expected a JSON object"),
    ('{"w": null}', "expected a JSON object"),
    ('{"w": ' + "1" * 5000 + "}", "holds a value no map has"),
    ('{"w": ', "not a JSON file"),
])
def test_hostile_names_file_is_refused_in_one_line(files, names, message):
    (files / "names.json").write_text(names)
    assert_refused(*run_apply_map(files, json.dumps(BASE), "--names", str(files / "names.json")), message, files)


def test_a_fifo_map_is_refused_not_waited_on(files):
    import os
    fifo = files / "fifo.json"
    os.mkfifo(fifo)
    t0 = time.perf_counter()
    res = CliRunner().invoke(cli, ["apply-map", str(fifo), str(files / "ck.npz"), "-o", str(files / "out.npz")])
    assert_refused(res, time.perf_counter() - t0, "not a regular file", files)
