"""Graph surgery: remove the planned channels from a model (onnx-graphsurgeon).

Every constant axis that carries a removed atom is sliced; parameters that encode sizes or
positions (Conv ``group``, Reshape targets, Split sizes, Slice bounds, Gather indices, Resize sizes,
Expand shapes) are rewritten from the kept counts; stale shape information is dropped.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

# onnx-graphsurgeon warns on stderr about types it has no numpy name for (bfloat16) and about the
# optional 'colored' package: neither concerns spa's users
gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR

from ..io import weights
from ..errors import SpaError
from ..ops.registry import REWRITES as FAMILY_REWRITES

INT64_MAX = np.iinfo(np.int64).max


def apply(proto: onnx.ModelProto, cm, probe, removed_units) -> onnx.ModelProto:
    """A complete new model without the atoms of ``removed_units`` (proto is not changed)."""
    return weights.full_model(*cut(proto, cm, probe, removed_units))


def cut(proto: onnx.ModelProto, cm, probe, removed_units) -> tuple[onnx.ModelProto, dict]:
    """``(model, weights)`` without the atoms of ``removed_units`` (proto is not changed): big
    weights stay out of the proto (``spa.io.weights`` stubs; ``weights`` holds their arrays, the
    untouched ones shared with ``cm.consts``)."""
    mask = cm.removed_atoms(removed_units)
    graph = gs.import_onnx(proto)
    tensors = graph.tensors()

    def kept(axis):
        return cm.keep(mask, axis)

    def new_size(name, d):
        k = kept((name, d))
        return int(probe.shapes[name][d]) if k is None else len(k)

    for axis in cm.axis_index:
        k = kept(axis)
        if k is None:
            continue
        if len(k) == 0:
            raise SpaError(f"internal: the plan would empty {axis[0]}[{axis[1]}]; please report this model")
    # 1. slice constants (big ones into new arrays behind stubs, never into the proto)
    out_weights = {}
    for name, value in cm.consts.items():
        t = tensors.get(name)
        if not isinstance(t, gs.Constant):
            continue
        arr = None
        for d in range(value.ndim):
            k = kept((name, d))
            if k is not None:
                arr = np.take(value if arr is None else arr, k, axis=d)
        stub = isinstance(t._values, LazyValues) and weights.is_stub(t._values.tensor)
        if arr is None:
            if stub:
                out_weights[name] = value
            continue
        arr = np.ascontiguousarray(arr)
        if value.nbytes > weights.RELEASE_ABOVE:  # the original's pages: read once, not kept
            weights.release_pages([value])
        if stub or arr.size > weights.STUB_ABOVE:
            t._values = LazyValues(weights.stub_like(onnx.TensorProto(
                name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(arr.dtype)), arr.shape))
            out_weights[name] = arr
        else:
            t.values = arr
    # 2. rewrite parameters
    nodes = {n.name: n for n in graph.nodes}
    new = _New(graph)
    for node_name, items in cm.rewrites.items():
        node = nodes[node_name]
        for kind, info in items:
            _REWRITE[kind](node, info, kept, new_size, probe, new)
    graph.cleanup().toposort()
    out = gs.export_onnx(graph, do_type_check=False)
    # inputs and outputs keep their names, types and dims, except the channel dims the channel
    # model let shrink (``prune_io``); intermediate shapes are stale: drop them
    del out.graph.value_info[:]
    for field in ("input", "output"):
        del getattr(out.graph, field)[:]
        getattr(out.graph, field).extend(getattr(proto.graph, field))
        for vi in getattr(out.graph, field):
            for d, dim in enumerate(vi.type.tensor_type.shape.dim):
                k = kept((vi.name, d))
                if k is not None:
                    dim.dim_value = len(k)
    out.ir_version = proto.ir_version
    del out.opset_import[:]
    out.opset_import.extend(proto.opset_import)
    out.producer_name = proto.producer_name
    out.producer_version = proto.producer_version
    del out.metadata_props[:]
    out.metadata_props.extend(proto.metadata_props)
    live = {t.name for t in out.graph.initializer}
    return out, {k: v for k, v in out_weights.items() if k in live}


class _New:
    """Makes the tensors and nodes surgery adds, under names the graph does not hold yet (a model
    pruned twice already has ``{node}__spa_shape``)."""

    def __init__(self, graph):
        self.graph = graph
        self.taken = set(graph.tensors()) | {n.name for n in graph.nodes}

    def name(self, base):
        name, k = base, 1
        while name in self.taken:
            k += 1
            name = f"{base}_{k}"
        self.taken.add(name)
        return name

    def const(self, node, tag, values, dtype=np.int64):
        return gs.Constant(self.name(f"{node.name}__spa_{tag}"), np.asarray(values, dtype))

    def op(self, node, tag, op, inputs, **attrs):
        """A new int64 node computing from ``inputs``; returns its output."""
        out = gs.Variable(self.name(f"{node.name}__spa_{tag}_{op.lower()}"), dtype=np.int64)
        self.graph.nodes.append(gs.Node(op, self.name(f"{node.name}__spa_{tag}_{op}"), attrs, inputs, [out]))
        return out


def rw_group(node, info, kept, new_size, probe, new):
    k = kept(info["virtual"])
    if k is not None:
        node.attrs["group"] = int(len(k))


class _Sizes:
    """Builds a 1-D int64 shape tensor piece by piece: constants, and sizes read from a tensor's
    shape at run time (one ``Shape`` node per tensor)."""

    def __init__(self, node, tag, new):
        self.node, self.tag, self.new, self.pieces, self.shape_of = node, tag, new, [], {}
        self.live = False

    def _op(self, op, inputs, **attrs):
        return self.new.op(self.node, self.tag, op, inputs, **attrs)

    def _const(self, values):
        return self.new.const(self.node, self.tag, values)

    def const(self, n):
        self.pieces.append(int(n))

    def element(self, vec, i):
        """Element i of a 1-D int64 tensor, as a piece."""
        self.live = True
        self.pieces.append(self._op("Gather", [vec, self._const([i])], axis=0))

    def product_of_dims(self, tensor, dims, divide_by=1):
        """prod(tensor.shape[dims]) // divide_by, as a piece."""
        self.live = True
        if tensor.name not in self.shape_of:
            self.shape_of[tensor.name] = self._op("Shape", [tensor])
        value = self._op("Gather", [self.shape_of[tensor.name], self._const(list(dims))], axis=0)
        if len(dims) > 1:
            value = self._op("ReduceProd", [value], keepdims=1)
        if divide_by != 1:
            value = self._op("Div", [value, self._const([divide_by])])
        self.pieces.append(value)

    def build(self):
        """The shape tensor: a constant when no piece is live."""
        if not self.live:
            return self._const(self.pieces)
        parts, run = [], []
        for p in self.pieces + [None]:
            if isinstance(p, int):
                run.append(p)
                continue
            if run:
                parts.append(self._const(run))
                run = []
            if p is not None:
                parts.append(p)
        return parts[0] if len(parts) == 1 else self._op("Concat", parts, axis=0)


def _changed(kept, probe, *tensors) -> bool:
    """Whether any dim of ``tensors`` loses positions."""
    return any(kept((t.name, d)) is not None for t in tensors for d in range(len(probe.shapes[t.name])))


def rw_reshape(node, info, kept, new_size, probe, new):
    """A new target from the rule's pieces (``rules.rule_reshape``): new static sizes, products of
    the input's sizes at run time, or the original target's elements."""
    x, y, target = node.inputs[0], node.outputs[0], node.inputs[1]
    if isinstance(target, gs.Constant) and not _changed(kept, probe, x, y):
        return
    b = _Sizes(node, "shape", new)
    for piece in info["pieces"]:
        if piece[0] == "static":
            b.const(new_size(y.name, piece[1]))
        elif piece[0] == "x":
            _, xd, static = piece
            b.product_of_dims(x, xd, int(np.prod([new_size(y.name, d) for d in static])) if static else 1)
        else:
            b.element(target, piece[1])
    node.inputs[1] = b.build()


def rw_expand(node, info, kept, new_size, probe, new):
    """Dims x carries get 1 (x's own size flows); broadcast dims get their new size, or the
    original target's element where they follow a dynamic dim."""
    x, y, target = node.inputs[0], node.outputs[0], node.inputs[1]
    if isinstance(target, gs.Constant) and not _changed(kept, probe, x, y):
        return
    r = len(info["kinds"])
    b = _Sizes(node, "shape", new)
    n_target = len(np.ravel(target.values)) if isinstance(target, gs.Constant) else int(np.prod(probe.shapes[target.name]))
    for d, kind in enumerate(info["kinds"]):
        if kind == "x":
            b.const(1)
        elif kind == "static":
            b.const(new_size(y.name, d))
        else:
            b.element(target, n_target - r + d)
    node.inputs[1] = b.build()


def rw_split(node, info, kept, new_size, probe, new):
    axis = info["axis"]
    sizes = [new_size(o.name, axis) for o in node.outputs]
    if "split" in node.attrs:
        node.attrs["split"] = sizes
    else:
        node.attrs.pop("num_outputs", None)
        while len(node.inputs) < 2:
            node.inputs.append(gs.Variable.empty())
        node.inputs[1] = new.const(node, "split", sizes)


def rw_slice(node, info, kept, new_size, probe, new):
    """New bounds for the sliced axes that lose channels; every other axis keeps the original's
    bounds (written from the probe's sizes, ``[0:1e9]`` over a dynamic batch would become ``[0:1]``,
    a frozen batch)."""
    x, y = node.inputs[0].name, node.outputs[0].name
    rank = len(probe.shapes[x])
    changed = {}
    for a, ok in info["sliced"].items():
        kx = kept((x, a))
        if not ok or (kx is None and kept((y, a)) is None):
            continue
        n = probe.shapes[x][a]
        first = _bounds(node, rank).get(a, (0, n, 1))[0]   # the first position read in the original input
        first = int(np.clip(first + n if first < 0 else first, 0, n))
        new_first = first if kx is None else int(np.searchsorted(kx, first))
        changed[a] = (new_first, new_first + new_size(y, a), 1)
    if not changed:
        return
    bounds = {**_bounds(node, rank), **changed}
    axes = sorted(bounds)
    starts, ends, steps = ([int(bounds[a][i]) for a in axes] for i in range(3))
    if len(node.inputs) == 1:
        node.attrs.update(starts=starts, ends=ends, axes=axes)
        return
    while len(node.inputs) < 5:
        node.inputs.append(gs.Variable.empty())
    node.inputs[1] = new.const(node, "starts", starts)
    node.inputs[2] = new.const(node, "ends", ends)
    node.inputs[3] = new.const(node, "axes", axes)
    node.inputs[4] = new.const(node, "steps", steps)


def _bounds(node, rank) -> dict:
    """{axis: (start, end, step)} of a Slice with constant bounds, as the original gives them."""
    if len(node.inputs) == 1:
        starts, ends = node.attrs["starts"], node.attrs["ends"]
        axes = node.attrs.get("axes", list(range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = list(np.ravel(node.inputs[1].values)), list(np.ravel(node.inputs[2].values))
        given = [len(node.inputs) > i and isinstance(node.inputs[i], gs.Constant) for i in (3, 4)]
        axes = list(np.ravel(node.inputs[3].values)) if given[0] else list(range(len(starts)))
        steps = list(np.ravel(node.inputs[4].values)) if given[1] else [1] * len(starts)
    return {int(a) + rank if int(a) < 0 else int(a): (int(s), int(e), int(st))
            for s, e, a, st in zip(starts, ends, axes, steps)}


def rw_gather(node, info, kept, new_size, probe, new):
    data = node.inputs[0].name
    axis = info["axis"]
    k = kept((data, axis))
    if k is None:
        return
    n = probe.shapes[data][axis]
    idx = np.asarray(node.inputs[1].values).astype(np.int64)
    idx = np.where(idx < 0, idx + n, idx)
    new_pos = np.full(n, -1, np.int64)
    new_pos[k] = np.arange(len(k))
    mapped = new_pos[idx]
    if mapped.ndim == 1:
        mapped = mapped[mapped >= 0]
    elif (mapped < 0).any():
        raise SpaError(f"internal: Gather '{node.name}' reads a removed position")
    node.inputs[1] = new.const(node, "indices", mapped, node.inputs[1].values.dtype)


def rw_sizes(node, info, kept, new_size, probe, new):
    y = node.outputs[0].name
    if not isinstance(node.inputs[3], gs.Constant):
        return
    node.inputs[3] = new.const(node, "sizes", [new_size(y, d) for d in range(len(probe.shapes[y]))])


def rw_attr(node, info, kept, new_size, probe, new):
    """An integer attribute that counts the positions of an axis (a virtual one too): LSTM's
    ``hidden_size``, Attention's ``num_heads``; ``per``: positions per counted unit."""
    axis = info["axis"]
    k = kept(axis)
    if k is not None:
        node.attrs[info["attr"]] = int(len(k)) // int(info.get("per", 1))


def rw_attr_list(node, info, kept, new_size, probe, new):
    """An integer-list attribute whose entries count the positions of axes (``qkv_hidden_sizes``)."""
    values = list(node.attrs.get(info["attr"], []))
    for i, axis in enumerate(info["axes"]):
        k = kept(axis)
        if k is not None and i < len(values):
            values[i] = int(len(k))
    if values:
        node.attrs[info["attr"]] = values


_REWRITE = {"attr": rw_attr, "attr_list": rw_attr_list, "group": rw_group, "reshape": rw_reshape, "split": rw_split, "slice": rw_slice,
            "gather": rw_gather, "sizes": rw_sizes, "expand": rw_expand}

_REWRITE.update(FAMILY_REWRITES)  # the operator families with a module of their own (spa.ops.registry)

