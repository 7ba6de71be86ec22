"""A model has many sizes: dynamic input dims as symbols, the sizes spa runs a model at, and which
tensor dims each shape computation reads.

Exports declare dynamic dims by name (``dim_param``): dims that share a name are one symbol, and a
name that is an expression of other names (``past_sequence_length + sequence_length``, dynamo's
``s0 + s1``) is computed from them.  A :class:`SizePlan` gives every symbol a size for the probe
(batch 1, token dims 16, image dims 224, or what the user gave for any input that uses it), the
other points the model is run at (every symbol moved at once, by different amounts, so that a value
that does not move does not depend on any of them; a short point: batch 2, one token), and the
input feed at any point: integer inputs span what the model can read (an embedding's rows),
attention masks are ones.

:func:`shape_reads` says, for each live tensor computed from ``Shape``/``Size`` results, which
``(tensor, dim)`` sizes its value reads (per element for 1-D shape vectors).  The channel model
fixes a dim only where its size is read by something that surgery does not rebuild, so that
``Gather(Shape(x), 1)`` (the sequence length) no longer blocks the channels of ``x``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..errors import SpaError
from .feeds import CUT_OUT, unfeedable

#: default sizes: the batch (a symbol used as dim 0), token dims (used by an integer input), others
BATCH_SIZE, TOKEN_SIZE, OTHER_SIZE = 1, 16, 224
#: smaller sizes tried, in order, when the model refuses the defaults (a position table of 128 rows)
FALLBACK_SIZES = (64, 16, 8)

# ----------------------------------------------------------------------------------------------
# dim_param expressions: a tiny parser (never eval a string read from a model file)

_TOKEN = re.compile(r"\s*(?:(\d+)|([A-Za-z_][A-Za-z0-9_.]*)|(//|[-+*/()]))")


def parse_dim(text: str):
    """A dim_param as an expression tree: ('sym', name) | ('num', n) | (op, a, b) | ('neg', a).
    Anything that is not a sum/product of names and integers is one opaque symbol."""
    tokens, pos = [], 0
    text = text.strip()
    if re.search(r"\w-\w", text):  # 'batch-size', 'seq-len': a name, not a subtraction
        return ("sym", text)
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            return ("sym", text)
        num, name, op = m.groups()
        tokens.append(("num", int(num)) if num else ("sym", name) if name else ("op", op))
        pos = m.end()
    try:
        tree, rest = _expr(tokens)
    except (IndexError, ValueError):
        return ("sym", text)
    return tree if not rest else ("sym", text)


def _expr(toks):
    left, toks = _term(toks)
    while toks and toks[0] in (("op", "+"), ("op", "-")):
        op, (right, toks) = toks[0][1], _term(toks[1:])
        left = (op, left, right)
    return left, toks


def _term(toks):
    left, toks = _factor(toks)
    while toks and toks[0] in (("op", "*"), ("op", "/"), ("op", "//")):
        op, (right, toks) = toks[0][1], _factor(toks[1:])
        left = ("//" if op == "/" else op, left, right)
    return left, toks


def _factor(toks):
    t = toks[0]
    if t[0] in ("num", "sym"):
        return t, toks[1:]
    if t == ("op", "-"):
        inner, rest = _factor(toks[1:])
        return ("neg", inner), rest
    if t == ("op", "("):
        inner, rest = _expr(toks[1:])
        if not rest or rest[0] != ("op", ")"):
            raise ValueError("unbalanced")
        return inner, rest[1:]
    raise ValueError("unexpected token")


def symbols_of(tree) -> list:
    if tree[0] == "sym":
        return [tree[1]]
    if tree[0] == "num":
        return []
    return [s for sub in tree[1:] for s in symbols_of(sub)]


def evaluate(tree, values: dict):
    kind = tree[0]
    if kind == "sym":
        return values.get(tree[1])
    if kind == "num":
        return tree[1]
    args = [evaluate(t, values) for t in tree[1:]]
    if any(a is None for a in args):
        return None
    if kind == "neg":
        return -args[0]
    a, b = args
    return a + b if kind == "+" else a - b if kind == "-" else a * b if kind == "*" else (a // b if b else None)


# ----------------------------------------------------------------------------------------------
# size plans

_INT_TYPES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT16, onnx.TensorProto.INT8,
              onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64}


#: dim_params that name nothing (paddle2onnx writes '?' for every unknown dim): each such dim is its own symbol
_ANONYMOUS = re.compile(r"^\s*(\?+|-1|None|unk|unknown|dynamic)\s*$", re.I)
#: inputs whose dynamic dims count tokens though they are float (a KV cache)
_CACHE_NAME = re.compile(r"past|cache|present|(^|\.)(key|value)(\.|$)", re.I)


@dataclass
class SizePlan:
    """The dynamic dims of a model's inputs as symbols, and the sizes to run it at."""
    dims: dict                       # (input, dim) -> int (static) or expression tree
    ranks: dict                      # input -> rank
    symbols: list                    # free symbol names, first use first
    batch: set = field(default_factory=set)     # symbols used as dim 0 only
    tokens: set = field(default_factory=set)    # symbols used by an integer input or a KV cache
    steps: set = field(default_factory=set)     # token symbols that size an integer input alone
    caches: set = field(default_factory=set)    # token symbols that size a KV cache (a past)
    base: dict = field(default_factory=dict)    # symbol -> size of the probe run
    given: set = field(default_factory=set)     # symbols the user's input_shapes fixed

    def shapes(self, values: dict) -> dict:
        """{input: [sizes]} at the symbol values ``values``."""
        out = {}
        for name, rank in self.ranks.items():
            dims = []
            for d in range(rank):
                v = self.dims[(name, d)]
                n = v if isinstance(v, int) else evaluate(v, values)
                if n is None or n < 1:
                    raise SpaError(f"input '{name}' dim {d}: cannot size '{_show(v)}'; give it with --input-shapes")
                dims.append(int(n))
            out[name] = dims
        return out

    def bumped(self, how: str = "up") -> dict:
        """Every symbol moved at once, each by a different amount (so values that stay put depend
        on none of them): ``up`` (batch 3, others +32, +64, ...), ``short`` (batch 2, a decode
        step: the tokens an integer input holds 1, a past 8 longer; others halved to a multiple
        of 32) or ``odd`` (every symbol +1, +3, ...: a value such as ``H % 32`` that the other points
        all agree on moves here, where the model accepts such sizes)."""
        out, k = {}, 0
        for s in self.symbols:
            v = self.base[s]
            if s in self.batch:
                out[s] = (v + 2) if how == "up" else (v + 1) if how == "odd" else (2 if v != 2 else 3)
                continue
            k += 1
            if how == "up":
                out[s] = v + 32 * k
            elif how == "odd":
                out[s] = v + 2 * k - 1           # +1, +3, ...: what '% 32' hides from the others
            elif s in self.steps:
                out[s] = 1 if v != 1 else 2      # one new token: a decode step
            elif s in self.tokens:
                out[s] = v + 8                   # ... after a longer past
            else:
                out[s] = max(32, (v // 2) // 32 * 32) if v >= 64 else max(1, v // 2)
        return out

    def decode_point(self, points) -> dict | None:
        """For a decoder with a KV cache (a symbol sizes a past): the ``short`` point (one token
        after a longer past, another batch) where ``points`` hold no decode step (every token
        symbol of an integer input 1; a past is never 0) or no second batch; else None."""
        if not self.caches:
            return None
        decode = any(all(p[s] == 1 for s in self.steps) for p in points)
        batch = not self.batch or any(p[s] != points[0][s] for p in points for s in self.batch)
        return None if decode and batch else self.bumped("short")

    def fix_batch(self, batch: int) -> "SizePlan":
        """Every symbol used as a first dim sized ``batch``, as if the user gave it (``spa bench --batch``)."""
        for (_, d), v in self.dims.items():
            if d == 0 and not isinstance(v, int) and v[0] == "sym":
                self.base[v[1]] = int(batch)
                self.given.add(v[1])
        return self

    def describe(self, values: dict) -> str:
        return ", ".join(f"{s}={values[s]}" for s in self.symbols) or "static"


def _show(v):
    if isinstance(v, int):
        return str(v)
    if v[0] == "sym":
        return v[1]
    if v[0] == "num":
        return str(v[1])
    if v[0] == "neg":
        return f"-{_show(v[1])}"
    return f"({_show(v[1])} {v[0]} {_show(v[2])})"


def size_plan(inputs, input_shapes=None) -> SizePlan:
    """The symbols of the graph inputs ``inputs`` (ValueInfoProtos) and their probe sizes.

    A dim without a name (or named '?', as paddle2onnx writes) is a symbol of its own; ``input_shapes`` ({input: [sizes]}) binds the
    symbols of the dims it sizes (so sizing ``input_ids`` also sizes ``attention_mask``)."""
    dims, ranks, symbols, uses = {}, {}, [], {}
    for inp in inputs:
        if not inp.type.HasField("tensor_type"):
            raise SpaError(f"input '{inp.name}' is {unfeedable(inp)}: {CUT_OUT}; cut out the numeric part "
                           "with onnx.utils.extract_model and prune that")
        tt = inp.type.tensor_type
        ranks[inp.name] = len(tt.shape.dim)
        for d, dim in enumerate(tt.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                dims[(inp.name, d)] = int(dim.dim_value)
                continue
            named = dim.dim_param and not _ANONYMOUS.match(dim.dim_param)
            tree = parse_dim(dim.dim_param) if named else ("sym", f"{inp.name}[{d}]")
            dims[(inp.name, d)] = tree
            for s in symbols_of(tree):
                if s not in uses:
                    symbols.append(s)
                uses.setdefault(s, []).append((inp.name, d, tt.elem_type in _INT_TYPES))
    plan = SizePlan(dims=dims, ranks=ranks, symbols=symbols)
    for s, used in uses.items():
        if all(d == 0 for _, d, _ in used):
            plan.batch.add(s)
        elif any(is_int or _CACHE_NAME.search(name) for name, _, is_int in used):
            plan.tokens.add(s)
            if any(is_int and dims[(name, d)] == ("sym", s) for name, d, is_int in used):
                plan.steps.add(s)
            if any(not is_int and _CACHE_NAME.search(name) for name, _, is_int in used):
                plan.caches.add(s)
    given = input_shapes or {}
    unknown = sorted(set(given) - set(ranks))
    if unknown:
        raise SpaError(f"--input-shapes names {', '.join(unknown)}, not a model input "
                       f"(inputs: {', '.join(ranks) or 'none'})")
    for name, shape in given.items():
        if len(shape) != ranks[name]:
            raise SpaError(f"--input-shapes {name}: rank {len(shape)}, the model's input has rank {ranks[name]}")
        for d, n in enumerate(shape):
            if int(n) < 1:
                raise SpaError(f"--input-shapes {name}: dim {d} is {n}; sizes must be >= 1")
            tree = dims[(name, d)]
            if isinstance(tree, int):
                if int(n) != tree:
                    raise SpaError(f"--input-shapes {name}: dim {d} is {tree} in the model, not {n}")
            elif tree[0] == "sym":
                plan.base[tree[1]] = int(n)
                plan.given.add(tree[1])
    for s in symbols:
        plan.base.setdefault(s, BATCH_SIZE if s in plan.batch else TOKEN_SIZE if s in plan.tokens else OTHER_SIZE)
    # a given input whose dims are expressions: check them (an inconsistent request is the user's)
    for name, shape in given.items():
        if name in ranks:
            got = plan.shapes(plan.base)[name]
            if [int(n) for n in shape] != got:
                raise SpaError(f"--input-shapes {name}: {list(shape)} disagrees with the sizes of its named dims ({got})")
    return plan


def _substitute(tree, name, expr):
    if isinstance(tree, int) or tree[0] == "num":
        return tree
    if tree[0] == "sym":
        return expr if tree[1] == name else tree
    return (tree[0],) + tuple(_substitute(t, name, expr) for t in tree[1:])


def related_plans(plan: SizePlan) -> list:
    """Plans in which one token symbol is the sum of two others (an attention mask's
    ``total_sequence_length = past + sequence`` under names that do not say so), most likely
    first: tried when the model refuses independent sizes.  A symbol the user sized is the sum
    only where the sizes the user gave agree (a mask of 24 after a past of 8 and 16 tokens): the
    user's sizes never hide a relation the model has, nor make one they contradict."""
    out = []
    names = [s for s in plan.symbols if s in plan.tokens]
    hint = re.compile(r"total|all|full|kv|mask", re.I)
    for t in sorted(names, key=lambda n: not hint.search(n)):
        others = [s for s in plan.symbols if s != t and s not in plan.batch]
        for i, a in enumerate(others):
            for b in others[i + 1:]:
                if t in plan.given and plan.base[t] != plan.base[a] + plan.base[b]:
                    continue
                expr = ("+", ("sym", a), ("sym", b))
                dims = {k: v if isinstance(v, int) else _substitute(v, t, expr) for k, v in plan.dims.items()}
                base = {k: v for k, v in plan.base.items() if k != t}
                out.append(SizePlan(dims=dims, ranks=plan.ranks, symbols=[s for s in plan.symbols if s != t],
                                    batch=set(plan.batch), tokens=plan.tokens - {t}, steps=plan.steps - {t},
                                    caches=plan.caches - {t}, base=base, given=plan.given - {t}))
    return out


def fitting_plans(plan: SizePlan) -> list:
    """The ``related_plans`` that size every input as ``plan`` does at its base: the relations the
    sizes a model ran at satisfy (tried when it refuses every symbol moved at once)."""
    sizes = plan.shapes(plan.base)
    return [p for p in related_plans(plan) if p.shapes(p.base) == sizes]


def fallback_bases(plan: SizePlan) -> list:
    """Smaller probe sizes to try when the model refuses the defaults (symbols the user gave and
    the batch stay), then the same with one new token (a decode-step export)."""
    out = []
    free = [s for s in plan.symbols if s not in plan.given and s not in plan.batch]
    for n in FALLBACK_SIZES:
        b = dict(plan.base)
        for s in free:
            b[s] = min(b[s], n)
        if b != plan.base and b not in out:
            out.append(b)
    steps = {s: 1 for s in free if s in plan.steps}
    if steps:  # an export for one new token at a time (a mask of past + 1)
        out += [{**b, **steps} for b in [plan.base] + out[:]]
    return out


# ----------------------------------------------------------------------------------------------
# realistic inputs


def integer_ranges(proto) -> dict:
    """{integer input: (low, high)} that the model can read: an input used as the indices of a
    constant table (an embedding ``Gather``, through Cast/Unsqueeze/Reshape) spans the table's rows;
    an attention mask is all ones."""
    inits = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    consumers = {}
    for node in proto.graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))
    out = {}
    for inp in proto.graph.input:
        tt = inp.type.tensor_type
        if inp.name in inits or tt.elem_type not in _INT_TYPES:
            continue
        if "mask" in inp.name.lower():
            out[inp.name] = (1, 2)
            continue
        rows, todo, seen = [], [inp.name], set()
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            for node, i in consumers.get(name, []):
                if node.op_type in ("Cast", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Identity") and i == 0:
                    todo.extend(node.output)
                elif node.op_type == "Gather" and i == 1 and node.input[0] in inits:
                    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                    table = inits[node.input[0]]
                    rows.append(table[axis if axis >= 0 else axis + len(table)])
        out[inp.name] = (0, int(min(rows))) if rows else (0, 4)
    return out


# ----------------------------------------------------------------------------------------------
# text recognisers: the line sizes they are probed at (their synthetic lines: spa.runtime.synthetic)


def recogniser_characters(model) -> list | None:
    """The characters of a text recogniser that lists them in its metadata (PaddleOCR's
    ``character``, one per line), or None."""
    meta = {p.key: p.value for p in model.metadata_props}
    text = meta.get("character")
    if not text:
        return None
    chars = [c for c in text.split("\n") if c]
    return chars or None


# ----------------------------------------------------------------------------------------------
# what reads tensor shapes

#: ops through which a shape vector's elements keep their identity (positionally)
_POSITIONAL = {"Cast", "Identity", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Neg", "Abs", "Ceil", "Floor",
               "Sqrt", "Reciprocal"}
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Mod", "Max", "Min", "Equal", "Less", "Greater", "Where",
                "LessOrEqual", "GreaterOrEqual", "And", "Or", "Not", "Pow", "CastLike"}


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def shape_reads(proto, shapes: dict, consts: dict, values: dict, derived: set) -> dict:
    """{tensor: list of frozensets of (tensor, dim)}: for every tensor of ``derived`` (computed only
    from constants and ``Shape``/``Size`` results) that reads sizes, the sizes each of its elements
    reads (one entry holding the union for tensors that are not small vectors)."""
    reads = {}

    def get(name):
        if not name:
            return None
        return reads.get(name)

    def union(parts):
        out = frozenset()
        for p in parts:
            for s in p:
                out |= s
        return out

    def ival(name):
        v = consts.get(name)
        if v is None:
            v = values.get(name)
        return None if v is None else [int(x) for x in np.ravel(v)]

    for node in proto.graph.node:
        op = node.op_type
        if op in ("Shape", "Size") and node.input and node.input[0] in shapes:
            x = node.input[0]
            r = len(shapes[x])
            if op == "Size":
                reads[node.output[0]] = [frozenset((x, d) for d in range(r))]
                continue
            start, end = _attr(node, "start", 0), _attr(node, "end", r)
            start, end = (start + r if start < 0 else start), (end + r if end < 0 else end)
            reads[node.output[0]] = [frozenset({(x, d)}) for d in range(max(0, start), min(r, end))]
            continue
        outs = [o for o in node.output if o]
        if not outs or not all(o in derived for o in outs):
            continue
        ins = [get(i) for i in node.input]
        if op in ("Reshape", "Expand"):
            ins = ins[:1]  # surgery rebuilds the target from sizes (see rules.rule_reshape, rule_expand)
        if not any(p is not None for p in ins):
            continue
        n_out = [int(np.prod(shapes[o])) if o in shapes else None for o in outs]
        got = None
        first = ins[0] if ins else None
        if op in _POSITIONAL and first is not None and len(first) == (n_out[0] or -1):
            got = list(first)
        elif op == "Gather" and first is not None and len(first) > 1 and ins[1] is None:
            idx = ival(node.input[1])
            if idx is not None:
                n = len(first)
                got = [first[i + n if i < 0 else i] for i in idx if -n <= i < n] if all(-n <= i < n for i in idx) else None
        elif op == "Slice" and first is not None and len(first) > 1 and all(p is None for p in ins[1:]):
            bounds = [ival(n) if n else None for n in list(node.input[1:5]) + [""] * (5 - len(node.input))]
            if bounds[0] is not None and bounds[1] is not None and len(bounds[0]) == 1:
                step = bounds[3][0] if bounds[3] else 1
                got = list(first)[slice(bounds[0][0], bounds[1][0], step)]
        elif op == "Concat" and all(p is None or len(p) == (int(np.prod(shapes.get(n, (0,)))) or -1)
                                    for p, n in zip(ins, node.input)):
            parts = []
            for p, n in zip(ins, node.input):
                size = int(np.prod(shapes.get(n, (0,))))
                parts.extend(p if p is not None else [frozenset()] * size)
            got = parts if len(parts) == n_out[0] else None
        elif op in _ELEMENTWISE and n_out[0] is not None and n_out[0] > 0:
            per = []
            for p, n in zip(ins, node.input):
                if p is None:
                    continue
                size = int(np.prod(shapes.get(n, (0,))))
                if len(p) == n_out[0] and size == n_out[0]:
                    per.append(p)
                else:
                    per.append([union([p])] * n_out[0])
            got = [union([q[i]] for q in per) for i in range(n_out[0])] if n_out[0] <= 64 else None
        if got is None:
            got = [union(p for p in ins if p is not None)]
        for o in outs:
            reads[o] = got
    return reads


def all_reads(entry) -> frozenset:
    out = frozenset()
    for s in entry or ():
        out |= s
    return out
