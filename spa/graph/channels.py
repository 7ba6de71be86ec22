"""The channel model: axes -> atoms -> union-find -> factor units -> groups.

Every axis ``(tensor, dim)`` gets one *atom* per position.  Operator rules (``spa.ops.rules``) tie
atoms together (identity, offset and index maps) and declare *products*: an axis that is the
row-major product of other axes (a flattened C*H*W, a hidden 768 split into 12 heads x 64 dims, a
grouped convolution's G x C).  Union-find over the ties gives atom classes; a class that is a
product of other classes is *composite*, every other class is a *unit* — the thing spa removes.
An atom is removed when any unit it is made of is removed, so removing one head unit removes 64
positions of the hidden axis, and removing one head-dim unit removes one position in every head.

Units that touch the same set of axes form a *group*.  A group is prunable when none of its units
is fixed (a graph input/output, an operator without a rule, a dim an operator cannot shrink).
"""
from __future__ import annotations

import re

from dataclasses import dataclass, field

import numpy as np
import onnx

from ..io import graph_refs, tensor_array
from ..runtime.probing import fold_candidates
from ..ops.registry import rule_for
from ..runtime.shapes import all_reads, shape_reads

# reasons a unit cannot shrink, most informative first; R_SPATIAL marks positions that are not
# channels at all (spatial and kernel dims): groups made of them are not reported
R_SPATIAL, R_UNSUPPORTED, R_OUTPUT, R_INPUT, R_RULE = 0, 1, 2, 3, 4
NO_REASON = 1 << 30


@dataclass
class Group:
    """A set of coupled channels that must be removed together."""
    id: int
    units: np.ndarray                 # unit ids
    axes: list                        # axis keys the group's channels run through
    prunable: bool
    reason: str = ""
    approximate: bool = False         # reaches LayerNorm / mean / softmax over its axis
    nodes: list = field(default_factory=list)
    params: int = 0
    macs: int = 0

    @property
    def channels(self) -> int:
        return int(len(self.units))

    def summary(self) -> dict:
        ops = sorted({op for _, op in self.nodes})
        return {"id": self.id, "channels": self.channels, "prunable": self.prunable,
                "reason": self.reason, "approximate": self.approximate,
                "ops": ops, "nodes": [n for n, _ in self.nodes][:12], "n_nodes": len(self.nodes),
                "params": int(self.params), "macs": int(self.macs)}


class RuleContext:
    """What a rule sees of one node, and where it writes its declarations."""

    def __init__(self, builder, node):
        self.b = builder
        self.node = node

    # facts
    def shape(self, name):
        return self.b.shapes.get(name)

    def rank(self, name):
        s = self.b.shapes.get(name)
        return None if s is None else len(s)

    def size(self, axis):
        return self.b.axis_size(axis)

    def is_const(self, name):
        return name in self.b.consts

    def const(self, name):
        return self.b.consts.get(name)

    def value(self, name):
        v = self.b.consts.get(name)
        return v if v is not None else self.b.values.get(name)

    def dynamic(self, name):
        return self.b.dynamic.get(name)

    def other_shapes(self, *names):
        """Shapes of ``names`` in the probe's runs at other sizes (tuples, one per run)."""
        return self.b.other_shapes(names)

    def reads(self, name):
        """Sizes read by the value of a shape computation, per element (None: reads none)."""
        return self.b.reads.get(name)

    # declarations
    def tie(self, a, b):
        self.b.tie(a, b)

    def tie_map(self, out, inp, idx, out_offset=0):
        self.b.tie_map(out, inp, np.asarray(idx, np.int64), out_offset)

    def product(self, whole, parts):
        self.b.product(whole, parts)

    def virtual(self, tag, size):
        return self.b.virtual(f"{self.node.name}#{tag}", size)

    def fix(self, axis, positions=None):
        self.b.fix(axis, R_RULE, f"{self.node.op_type} '{self.node.name}' cannot shrink {axis[0]}[{axis[1]}]", positions)

    def spatial(self, axis):
        self.b.fix(axis, R_SPATIAL, "spatial or kernel position")

    def fix_tensor(self, name):
        for d in range(self.rank(name) or 0):
            self.fix((name, d))

    def fix_all(self):
        self.b.fix_node(self.node, R_RULE, f"{self.node.op_type} '{self.node.name}': rule cannot handle this form")

    def sink(self, axis, kind, input_index):
        self.b.sinks.append((axis, kind, self.node.name, input_index))

    def qsink(self, axis, input_index, zero_point_index=None):
        """A contraction over a quantized input: cutting a channel there means setting it to its
        zero point (the real value 0), not to the integer 0."""
        zp = self.node.input[zero_point_index] if zero_point_index is not None and \
            len(self.node.input) > zero_point_index else ""
        self.b.sinks.append((axis, "qcontract", self.node.name, input_index))
        self.b.zero_points[(self.node.name, input_index)] = zp

    def rewrite(self, kind, **info):
        self.b.rewrites.setdefault(self.node.name, []).append((kind, info))

    def stat(self, input_index):
        if len(self.node.input) > input_index:
            self.b.stats.add(self.node.input[input_index])

    def dequantized(self, weight, scale, zero_point, axis):
        """``weight`` (quantized integers) means ``(weight - zero_point) * scale`` along ``axis``
        (None: per tensor): scorers read that, not the integers."""
        self.b.dequant[weight] = (scale, zero_point or "", axis)


class Builder:
    """Collects atoms, ties, products and fixes from every node's rule."""

    def __init__(self, proto, probe):
        self.proto = proto
        self.shapes = probe.shapes
        self.values = probe.values
        self.dynamic = probe.dynamic
        self.dtypes = probe.dtypes
        self.consts = _consts(proto, probe)
        self.axis_index = {}          # axis -> (offset, size)
        self.virtual_sizes = {}
        self.n_atoms = 0
        self.pairs_a, self.pairs_b = [], []
        self.products = []
        self.fixed = []               # (atoms, reason code, text)
        self.sinks = []
        self.rewrites = {}
        self.stats = set()
        self.dequant = {}
        self.zero_points = {}
        self.other_runs_shapes = getattr(probe, "other_shapes", None) or []
        self.derived = fold_candidates(proto)
        self.reads = shape_reads(proto, self.shapes, self.consts, self.values, self.derived)

    # axes and atoms
    def axis_size(self, axis):
        if axis in self.virtual_sizes:
            return self.virtual_sizes[axis]
        s = self.shapes.get(axis[0])
        if s is None or axis[1] >= len(s):
            return None
        return int(s[axis[1]])

    def atoms(self, axis):
        got = self.axis_index.get(axis)
        if got is None:
            size = self.axis_size(axis)
            if size is None:
                return None
            got = (self.n_atoms, size)
            self.axis_index[axis] = got
            self.n_atoms += size
        return np.arange(got[0], got[0] + got[1])

    def virtual(self, key, size):
        axis = (key, 0)
        self.virtual_sizes[axis] = int(size)
        self.atoms(axis)
        return axis

    def tie(self, a, b):
        ta, tb = self.atoms(a), self.atoms(b)
        if ta is None or tb is None or len(ta) != len(tb):
            for ax, t in ((a, ta), (b, tb)):
                if t is not None:
                    self.fix(ax, R_RULE, f"size of {a[0]}[{a[1]}] and {b[0]}[{b[1]}] disagree or is unknown")
            return
        self.pairs_a.append(ta)
        self.pairs_b.append(tb)

    def tie_map(self, out, inp, idx, out_offset):
        to, ti = self.atoms(out), self.atoms(inp)
        if to is None or ti is None:
            for ax, t in ((out, to), (inp, ti)):
                if t is not None:
                    self.fix(ax, R_RULE, f"unknown size next to {ax[0]}[{ax[1]}]")
            return
        self.pairs_a.append(to[out_offset:out_offset + len(idx)])
        self.pairs_b.append(ti[idx])

    def product(self, whole, parts):
        parts = [p for p in parts if self.axis_size(p) != 1]
        if not parts:
            return
        if len(parts) == 1:
            return self.tie(whole, parts[0])
        sizes = [self.axis_size(p) for p in parts]
        if None in sizes or self.axis_size(whole) != int(np.prod(sizes)):
            for ax in [whole] + parts:
                self.fix(ax, R_RULE, "product of sizes does not match")
            return
        for ax in [whole] + parts:
            self.atoms(ax)
        self.products.append((whole, parts))

    def fix(self, axis, code, text, positions=None):
        t = self.atoms(axis)
        if t is None:
            return
        if positions is not None:
            t = t[np.asarray(positions, np.int64)]
        self.fixed.append((t, code, text))

    def fix_node(self, node, code, text):
        for name in list(node.input) + list(node.output):
            if name:
                for d in range(len(self.shapes.get(name, ()))):
                    self.fix((name, d), code, text)

    def other_shapes(self, names):
        fixed = {n: tuple(self.consts[n].shape) for n in names if n in self.consts}
        return [tuple(fixed[n] if n in fixed else run[n] for n in names) for run in self.other_runs_shapes
                if all(n in run or n in fixed for n in names)]

    def fix_shape_reads(self):
        """Fix every size read by a shape computation whose result is used by something that
        surgery does not rebuild (a Reshape's target is rebuilt from sizes; an Expand's rule fixes
        what it reuses); reading a size that never changes (batch, sequence) blocks nothing."""
        outputs = {o.name for o in self.proto.graph.output}
        for name in self.reads:  # shape vectors are sizes, not channels (nor are the constants concatenated in)
            dtype, shape = self.dtypes.get(name), self.shapes.get(name, ())
            if dtype is not None and np.issubdtype(dtype, np.integer) and len(shape) == 1:
                self.fix((name, 0), R_SPATIAL, "a shape value")
        for node in self.proto.graph.node:
            if all((not o) or o in self.derived for o in node.output):
                continue  # a step of the shape computation itself
            for i, name in enumerate(node.input):
                got = self.reads.get(name)
                if got is None or (node.op_type in ("Reshape", "Expand") and i == 1):
                    continue
                text = f"{node.op_type} '{node.name}' uses a size computed from this dim"
                for axis in all_reads(got):
                    self.fix(axis, R_RULE, text)
        for name in outputs:
            for axis in all_reads(self.reads.get(name)):
                self.fix(axis, R_OUTPUT, f"graph output '{name}' is computed from this size")


def _consts(proto, probe) -> dict:
    """The initializers as arrays: the probe's own (one copy of the weights) where they match."""
    have = getattr(probe, "consts", None) or {}
    out = {}
    for t in proto.graph.initializer:
        a = have.get(t.name)
        out[t.name] = a if a is not None and a.shape == tuple(t.dims) else tensor_array(t)
    return out


def _components(n, a, b):
    """Connected components over atom pairs: vectorised union-find (hooking + pointer jumping)."""
    parent = np.arange(n, dtype=np.int64)
    if len(a) == 0:
        return parent
    while True:
        ra, rb = parent[a], parent[b]
        lo, hi = np.minimum(ra, rb), np.maximum(ra, rb)
        moved = lo != hi
        if not moved.any():
            return parent
        np.minimum.at(parent, hi[moved], lo[moved])
        while True:
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                break
            parent = nxt


@dataclass
class ChannelModel:
    """Everything later stages need: which atoms each unit removes, and the groups."""
    axis_index: dict                  # axis -> (offset, size)
    n_atoms: int
    pair_atom: np.ndarray             # atom -> unit incidence (an atom may be made of several units)
    pair_unit: np.ndarray
    n_units: int
    groups: list
    rewrites: dict
    sinks: list
    stats: set
    consts: dict
    dequant: dict = field(default_factory=dict)  # quantized weight -> (scale, zero point or '', axis)
    zero_points: dict = field(default_factory=dict)  # (node, input index) of a qcontract sink -> zero point

    def removed_atoms(self, units) -> np.ndarray:
        """Boolean mask over atoms removed when ``units`` go."""
        gone = np.zeros(self.n_units, bool)
        gone[np.asarray(units, np.int64)] = True
        mask = np.zeros(self.n_atoms, bool)
        mask[self.pair_atom[gone[self.pair_unit]]] = True
        return mask

    def keep(self, mask, axis):
        """Indices kept on ``axis`` under an atom mask (None when the axis is untouched)."""
        got = self.axis_index.get(axis)
        if got is None:
            return None
        part = mask[got[0]:got[0] + got[1]]
        if not part.any():
            return None
        return np.flatnonzero(~part)


def build(proto, probe, prune_io=None) -> ChannelModel:
    """Run every rule, resolve atoms into units and units into groups.  Graph inputs and outputs
    keep every dim, except the static dims of those whose name matches the regular expression
    ``prune_io`` (a KV cache's heads and head dims: the caller then feeds a smaller cache)."""
    b = Builder(proto, probe)
    for node in proto.graph.node:
        rule = rule_for(node)
        has_sub = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)
        if rule is None or has_sub:
            b.fix_node(node, R_UNSUPPORTED, f"no rule for operator {node.op_type or '?'} ('{node.name}')")
            if has_sub:
                for a in node.attribute:
                    for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                        for ref in graph_refs(g):
                            for d in range(len(b.shapes.get(ref, ()))):
                                b.fix((ref, d), R_UNSUPPORTED, f"read inside the subgraph of {node.op_type} '{node.name}'")
            continue
        rule(RuleContext(b, node))
    b.fix_shape_reads()
    for vi, code, what in [(vi, R_INPUT, "graph input") for vi in proto.graph.input] + \
            [(vi, R_OUTPUT, "graph output") for vi in proto.graph.output]:
        free = _io_dims_free(vi, probe, prune_io)
        for d in range(len(b.shapes.get(vi.name, ()))):
            if free is None or d not in free:
                b.fix((vi.name, d), code, f"{what} '{vi.name}'" + (" (a dim that follows the inputs' sizes)"
                                                                    if prune_io and free is not None else ""))
    return _resolve(b, proto)


def _io_dims_free(vi, probe, prune_io):
    """The dims of graph input/output ``vi`` that may shrink: with ``prune_io`` matching its name,
    those declared static that the probe saw never move (None: the name does not match)."""
    if not prune_io or not re.search(prune_io, vi.name):
        return None
    declared = vi.type.tensor_type.shape.dim
    moving = probe.dynamic.get(vi.name)
    if moving is None:
        return set()
    if not declared:  # no declared shape: what the probe saw
        return {d for d, m in enumerate(moving) if not m}
    return {d for d, dim in enumerate(declared) if dim.HasField("dim_value") and d < len(moving) and not moving[d]}


def _unique(x):
    """Sorted unique values (numpy's hash-based ``np.unique`` is far slower on large int arrays)."""
    s = np.sort(x)
    return s[np.r_[True, s[1:] != s[:-1]]] if len(s) else s


def _decompositions(b: Builder, root):
    """Every product's whole atoms with their factor classes: (whole class, factors padded with -1,
    number of factors), rows in declaration order."""
    cws, facs, lens = [], [], []
    width = max((len(parts) for _, parts in b.products), default=0)
    for whole, parts in b.products:
        sizes = [b.axis_size(p) for p in parts]
        w = root[b.atoms(whole)]
        coords = np.unravel_index(np.arange(len(w)), sizes)
        f = np.full((len(w), width), -1, np.int64)
        for j, (p, c) in enumerate(zip(parts, coords)):
            f[:, j] = root[b.atoms(p)][c]
        cws.append(w)
        facs.append(f)
        lens.append(np.full(len(w), len(parts), np.int64))
    if not cws:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.int64), np.zeros(0, np.int64)
    return np.concatenate(cws), np.concatenate(facs), np.concatenate(lens)


def _resolve(b: Builder, proto) -> ChannelModel:
    n = b.n_atoms
    pa = np.concatenate(b.pairs_a) if b.pairs_a else np.zeros(0, np.int64)
    pb = np.concatenate(b.pairs_b) if b.pairs_b else np.zeros(0, np.int64)
    conflicts = []
    # products: a composite class must decompose the same way everywhere; equal-shaped
    # decompositions are unified factor by factor (with the first one seen), others block.
    for _ in range(20):
        root = _components(n, pa, pb)
        cw, fac, ln = _decompositions(b, root)
        order = np.argsort(cw, kind="stable")
        starts = np.flatnonzero(np.r_[True, cw[order][1:] != cw[order][:-1]]) if len(cw) else np.zeros(0, np.int64)
        first = np.empty(len(cw), np.int64)   # row of each class's first decomposition
        if len(cw):
            first[order] = np.repeat(order[starts], np.diff(np.r_[starts, len(cw)]))
        ref, ref_len = fac[first], ln[first]
        differ = fac != ref
        bad = ln != ref_len
        conflicts.append(cw[bad])
        tie = differ & ~bad[:, None]
        if not tie.any():
            break
        pa = np.concatenate([pa, ref[tie]])
        pb = np.concatenate([pb, fac[tie]])
    conflicts = _unique(np.concatenate(conflicts)) if conflicts else np.zeros(0, np.int64)
    firsts = order[starts] if len(cw) else np.zeros(0, np.int64)
    # the decomposition of each composite class (sorted by class), expanded into leaf classes
    dc, dfac, dln = cw[firsts], fac[firsts], ln[firsts]
    is_comp = np.zeros(n, bool)
    is_comp[dc] = True
    valid = np.arange(dfac.shape[1]) < dln[:, None]
    nested = (is_comp[np.where(valid, dfac, 0)] & valid).any(axis=1)  # a factor is itself composite
    row_of = dict(zip(dc.tolist(), range(len(dc))))
    leaves_of = {}

    def leaves(c, depth=0):
        got = leaves_of.get(c)
        if got is not None:
            return got
        r = row_of.get(c)
        if r is None or depth > 50:
            return (c,)
        out = tuple(x for f in dfac[r, :dln[r]].tolist() for x in leaves(f, depth + 1))
        leaves_of[c] = out
        return out

    ulens = dln.copy()
    deep = {int(r): leaves(int(dc[r])) for r in np.flatnonzero(nested)}
    for r, e in deep.items():
        ulens[r] = len(e)
    ustart = np.cumsum(ulens) - ulens
    uflat = np.empty(int(ulens.sum()), np.int64)
    rs, js = np.nonzero(valid & ~nested[:, None])
    uflat[ustart[rs] + js] = dfac[rs, js]
    for r, e in deep.items():
        uflat[ustart[r]:ustart[r] + len(e)] = e
    atom_cls = root
    comp_atoms = np.flatnonzero(is_comp[atom_cls])
    leaf_atoms = np.flatnonzero(~is_comp[atom_cls])
    pair_atom = [leaf_atoms]
    pair_cls = [atom_cls[leaf_atoms]]
    if len(comp_atoms):
        inv = np.searchsorted(dc, atom_cls[comp_atoms])
        lens = ulens[inv]
        total = int(lens.sum())
        idx = np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens) + np.repeat(ustart[inv], lens)
        pair_atom.append(np.repeat(comp_atoms, lens))
        pair_cls.append(uflat[idx])
    pair_atom = np.concatenate(pair_atom)
    pair_cls = np.concatenate(pair_cls)
    unit_cls, pair_unit = np.unique(pair_cls, return_inverse=True)
    n_units = len(unit_cls)
    # fixedness: any unit making up a fixed atom cannot shrink
    atom_reason = np.full(n, NO_REASON, np.int64)
    texts = []
    for atoms, code, text in b.fixed:
        texts.append(text)
        key = code * (1 << 20) + len(texts) - 1
        np.minimum.at(atom_reason, atoms, key)
    if len(conflicts):
        texts.append("reshapes disagree on how to split this axis")
        hit = np.isin(atom_cls, conflicts)
        atom_reason[hit] = np.minimum(atom_reason[hit], R_RULE * (1 << 20) + len(texts) - 1)
    unit_reason = np.full(n_units, NO_REASON, np.int64)
    np.minimum.at(unit_reason, pair_unit, atom_reason[pair_atom])
    # axis membership -> groups
    axes = list(b.axis_index)
    atom_axis = np.empty(n, np.int64)
    for i, ax in enumerate(axes):
        off, size = b.axis_index[ax]
        atom_axis[off:off + size] = i
    n_axes = max(len(axes), 1)
    ua_key = _unique(pair_unit.astype(np.int64) * n_axes + atom_axis[pair_atom])
    ua_unit, ua_axis = ua_key // n_axes, ua_key % n_axes
    rng = np.random.default_rng(12345)
    axis_hash = rng.integers(1, 2 ** 62, len(axes), dtype=np.int64).astype(np.uint64)
    unit_hash = np.zeros(n_units, np.uint64)
    np.add.at(unit_hash, ua_unit, axis_hash[ua_axis])
    fixed_flag = (unit_reason != NO_REASON).astype(np.uint64)
    key = unit_hash * np.uint64(2) + fixed_flag
    _, group_of_unit = np.unique(key, return_inverse=True)
    order = np.argsort(group_of_unit, kind="stable")
    bounds = np.flatnonzero(np.diff(group_of_unit[order])) + 1
    weight_axes = {i for i, ax in enumerate(axes) if ax[0] in b.consts}
    approx_axes = {ax for ax, kind, _, _ in b.sinks if kind == "approx"}

    def unit_axes(u):
        lo, hi = np.searchsorted(ua_unit, u), np.searchsorted(ua_unit, u, side="right")
        return ua_axis[lo:hi].tolist()
    node_order = {node.name: i for i, node in enumerate(proto.graph.node)}
    tensor_nodes = {}
    for node in proto.graph.node:
        for name in list(node.input) + list(node.output):
            if name:
                tensor_nodes.setdefault(name, []).append((node.name, node.op_type))
    groups = []
    for units in np.split(order, bounds):
        ax_ids = unit_axes(int(units[0]))
        if not any(a in weight_axes for a in ax_ids):
            continue   # spatial, batch or sequence positions: not channels
        group_axes = [axes[a] for a in ax_ids]
        reason_code = int(unit_reason[units].min())
        if reason_code != NO_REASON and reason_code >> 20 == R_SPATIAL:
            continue
        prunable = reason_code == NO_REASON and len(units) > 1
        reason = "" if prunable else ("a single channel" if reason_code == NO_REASON else texts[reason_code % (1 << 20)])
        seen, nodes = set(), []
        for ax in group_axes:
            for nn in tensor_nodes.get(ax[0], []):
                if nn not in seen:
                    seen.add(nn)
                    nodes.append(nn)
        groups.append(Group(id=len(groups), units=np.sort(units), axes=group_axes, prunable=prunable,
                            reason=reason, approximate=any(ax in approx_axes for ax in group_axes),
                            nodes=sorted(nodes, key=lambda nn: node_order[nn[0]])))
    # number groups in graph order (by their first node), so ids read top to bottom
    groups.sort(key=lambda g: (node_order[g.nodes[0][0]] if g.nodes else -1, -g.channels))
    for i, g in enumerate(groups):
        g.id = i
    return ChannelModel(axis_index=b.axis_index, n_atoms=n, pair_atom=pair_atom, pair_unit=pair_unit,
                        n_units=n_units, groups=groups, rewrites=b.rewrites, sinks=b.sinks,
                        stats=b.stats, consts=b.consts, dequant=b.dequant,
                        zero_points=b.zero_points)
