"""The design card's graph view: operators as nodes, tensors as edges, each edge carrying the
channel groups that run through its dims, so that coupled groups can be looked at in a graph viewer
(``spa inspect MODEL --graph FILE.graphml|.dot``)."""
from __future__ import annotations

import networkx as nx

from ..errors import SpaError
from ..io import write_atomic


def graph_view(an) -> nx.MultiDiGraph:
    """A ``networkx.MultiDiGraph`` of ``an`` (a ``spa.Analysis``): one node per operator (``op``,
    ``kind='op'``), per graph input and output (``kind='input'/'output'``); one edge per tensor use
    (producer -> consumer) with ``tensor``, ``shape``, ``groups`` (ids of the groups whose channels run
    through the tensor's dims, 'dim:id' joined by commas), ``prunable_groups`` (the same for prunable
    groups only) and ``prunable`` (1 when any group on it is prunable).  Attributes are strings and
    ints so that the graph writes as GraphML."""
    model, shapes = an.model, an.probe.shapes
    on_axis = {}
    for g in an.groups:
        for tensor, dim in g.axes:
            on_axis.setdefault(tensor, []).append((dim, g))
    G = nx.MultiDiGraph(name=model.graph.name or "model")
    producer = {}
    for inp in model.graph.input:
        G.add_node(f"input:{inp.name}", kind="input", op="Input")
        producer[inp.name] = f"input:{inp.name}"
    for node in model.graph.node:
        name = node.name or f"{node.op_type}:{node.output[0]}"
        G.add_node(name, kind="op", op=node.op_type)
        for out in node.output:
            if out:
                producer[out] = name
    for out in model.graph.output:
        G.add_node(f"output:{out.name}", kind="output", op="Output")

    def edge(tensor, dst):
        src = producer.get(tensor)
        if src is None:
            return  # an initializer: weights are edge data of their consumer, not nodes
        groups = sorted(on_axis.get(tensor, []), key=lambda x: (x[0], x[1].id))
        G.add_edge(src, dst, key=tensor, tensor=tensor, shape="x".join(map(str, shapes.get(tensor, ()))),
                   groups=",".join(f"{d}:{g.id}" for d, g in groups),
                   prunable_groups=",".join(f"{d}:{g.id}" for d, g in groups if g.prunable),
                   prunable=int(any(g.prunable for _, g in groups)))

    for node in model.graph.node:
        name = node.name or f"{node.op_type}:{node.output[0]}"
        for tensor in node.input:
            if tensor:
                edge(tensor, name)
    for out in model.graph.output:
        edge(out.name, f"output:{out.name}")
    return G


def write_graph(G: nx.MultiDiGraph, path, inputs=()) -> None:
    """GraphML (``.graphml``) or Graphviz DOT (``.dot``/``.gv``), through spa's safe writer;
    prunable tensors are drawn in colour in DOT."""
    suffix = str(path).rsplit(".", 1)[-1].lower()
    if suffix == "graphml":
        write_atomic(path, lambda tmp: nx.write_graphml(G, tmp), inputs=inputs, what="--graph")
    elif suffix in ("dot", "gv"):
        write_atomic(path, lambda tmp: open(tmp, "w", encoding="utf-8").write(_dot(G)), inputs=inputs, what="--graph")
    else:
        raise SpaError(f"--graph {path}: write .graphml (networkx, yEd, Gephi) or .dot/.gv (Graphviz)")


def _dot(G) -> str:
    def q(s):  # a quoted DOT string; labels use DOT's own \n escape for line breaks
        return '"' + str(s).replace('"', '\\"') + '"'
    lines = ["digraph spa {", "  node [shape=box, fontsize=10];"]
    for n, d in G.nodes(data=True):
        label = d["op"] + "\\n" + n
        lines.append(f"  {q(n)} [label={q(label)}];")
    for u, v, d in G.edges(data=True):
        label = d["tensor"] + (f"\\n[{d['shape']}]" if d["shape"] else "") + \
            (f"\\ngroups {d['prunable_groups']}" if d["prunable_groups"] else "")
        colour = ", color=blue, fontcolor=blue" if d["prunable"] else ""
        lines.append(f"  {q(u)} -> {q(v)} [label={q(label)}{colour}];")
    lines.append("}")
    return "\n".join(lines) + "\n"
