"""Block-wise calibration: the calibration set flows through the captured graph one segment (a run of nodes, e.g.
a transformer layer or a residual block) at a time, and each group's Gram matrices are handed on, and freed, as
soon as the segment of its last source has run.

A segment runs on every calibration chunk before the next one starts; per chunk only the values a later segment
reads (the tensors crossing the cut: a residual stream, rotary tables, a mask) are kept. So what is alive is one
segment's boundary for all samples, one chunk's activations inside the segment, and the Grams of the groups whose
sources are still running. Two extremes of the same runner: the whole graph as one segment (one chunk's
activations, every group's Grams at once: best for CNNs with few channels and many images) and a segment per
layer (a transformer's Grams one layer at a time: best when Grams are big, as in a language model's MLPs).
``plan_segments`` estimates both from the graph's shapes and takes the smaller.

Results do not depend on the segmentation: each chunk runs the same ops on the same inputs, and every Gram is
summed over the chunks in the same order (then over processes, in graph order).

Example::

    for g, by_src in group_grams(an, chunks, groups, decisions):
        G = by_src["relu_3"]             # float64 Z^T Z of group g's channels in relu_3, over every chunk
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch

from . import distributed
from .calibrate import as_rows, group_columns
from .console import progress_bar
from .console import progress_bar
from .gram import GramAccumulator
from .reference import consumer_hooks, hooked_args
from .rewrite import Plan

ROUTE = "auto"   # how group_grams cuts the graph by default: "auto", "one" or "layer" (see plan_segments)


def example_batch(gm) -> int:
    """The batch size the graph was captured with (1 when it is symbolic: then shapes count it as 1)."""
    return max((n.meta["val"].shape[0] for n in gm.graph.nodes if n.op == "placeholder"
                and isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dim() > 0
                and isinstance(n.meta["val"].shape[0], int)), default=1)


def _tensor_bytes(node, batch: int) -> float:
    """Bytes per sample of a node's value (from its captured shape; symbolic sizes count 1)."""
    val = node.meta.get("val")
    vals = val if isinstance(val, (tuple, list)) else [val]
    total = 0
    for v in vals:
        if isinstance(v, torch.Tensor):
            total += math.prod(s if isinstance(s, int) else 1 for s in v.shape) * v.element_size()
    return total / max(batch, 1)


class Segments:
    """A cut of the graph's nodes (up to ``stop``) into segments, with each node's last use."""

    def __init__(self, nodes: list, cuts: list[int]):
        self.nodes = nodes
        bounds = [-1, *sorted(set(cuts))]
        self.spans = [(a + 1, b) for a, b in zip(bounds, bounds[1:]) if b > a]
        index = {n: i for i, n in enumerate(nodes)}
        self.last_use = {n: max((index.get(u, len(nodes)) for u in n.users), default=index[n]) for n in nodes}


def plan_segments(gm, stop: int, samples: int, gram_bytes: dict[int, tuple[int, int, int]], batch: int,
                  how: str = "auto") -> Segments:
    """Segments for a pass over ``samples`` samples that needs nodes 0..stop. ``gram_bytes``: group -> (first
    source index, last source index, bytes of its Grams). "layer": a cut after each node where no more bytes cross
    than at the median node; "one": the whole graph; "auto": the one whose estimated peak is smaller."""
    nodes = list(gm.graph.nodes)[:stop + 1]
    one = Segments(nodes, [stop])
    live = live_after(nodes, one.last_use, batch)
    threshold = float(np.median(live)) if live else 0.0
    layered = Segments(nodes, [i for i, b in enumerate(live) if b <= threshold] + [stop])
    if how != "auto":
        return one if how == "one" else layered
    per_chunk = max(live, default=0.0) * batch  # a chunk's activations (one example batch's worth)
    open_grams = max((sum(b for f, l, b in gram_bytes.values() if f <= e and l >= s) for s, e in layered.spans),
                     default=0)
    boundary = max((live[e] for _, e in layered.spans), default=0.0) * samples
    whole = sum(b for _, _, b in gram_bytes.values())
    return layered if boundary + open_grams < whole else one


def live_after(nodes: list, last_use: dict, batch: int) -> list[float]:
    """Bytes per sample of the input-dependent values alive after each node (parameters are not counted)."""
    live, out, alive = 0.0, [], {}
    for i, n in enumerate(nodes):
        if n.op in ("placeholder", "call_function", "call_module"):
            alive[n] = _tensor_bytes(n, batch)
            live += alive[n]
        for a in [a for a in alive if last_use[a] <= i]:
            live -= alive.pop(a)
        out.append(live)
    return out


class Stream:
    """Values of one segment-major run of the graph: per node, a list with one entry per chunk (None once freed).
    ``hook(node)`` may return a function that rewrites the node's positional args (a consumer reading its
    reconstruction, a BatchNorm taking new statistics); it is asked once per node and segment."""

    def __init__(self, gm, chunks: list[tuple], hook=lambda node: None):
        self.gm, self.chunks, self.hook = gm, chunks, hook
        self.placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.vals: dict = {}

    def value(self, node) -> list:
        return self.vals[node]

    def segment(self, seg: Segments, span: tuple[int, int], on_value=None):
        """Run nodes span[0]..span[1] on every chunk; ``on_value(node, chunk, value)`` sees each value once.
        Afterwards only the values a later node reads are kept (all chunks)."""
        a, b = span
        nodes = [(j, n, self.hook(n)) for j, n in enumerate(seg.nodes[a:b + 1], start=a) if n.op != "output"]
        for c in range(len(self.chunks)):
            for j, node, hook in nodes:
                v = self._run(node, c, hook)
                self.vals.setdefault(node, [None] * len(self.chunks))[c] = v
                if on_value is not None:
                    on_value(node, c, v)
                for inp in node.all_input_nodes:  # this chunk's inputs read for the last time
                    if seg.last_use[inp] == j and inp in self.vals:
                        self.vals[inp][c] = None
                if seg.last_use[node] <= j:  # unused
                    self.vals[node][c] = None
        for n in [n for n, vs in self.vals.items() if all(v is None for v in vs)]:
            del self.vals[n]

    def _run(self, node, c: int, hook):
        if node.op == "placeholder":
            return self.chunks[c][self.placeholders.index(node)]
        if node.op == "get_attr":
            return fetch_attr(self.gm, node.target)
        fn = node.target if node.op == "call_function" else self.gm.get_submodule(node.target)
        pick = lambda n: self.vals[n][c]  # noqa: E731
        args = tuple(torch.fx.node.map_arg(node.args, pick))
        kwargs = torch.fx.node.map_arg(node.kwargs, pick)
        if hook is not None:
            args = hook(args)
        return fn(*args, **kwargs)


def plan_hook(plan: Plan):
    """Stream hook: consumers of decided groups read Z_j[:, keep] @ T_j (T as the plan holds it when run)."""
    hooks = consumer_hooks(plan)

    def hook(node):
        entries = hooks.get(node.name)
        return None if entries is None else lambda args: hooked_args(plan, node, entries, args)
    return hook


def fetch_attr(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


@torch.no_grad()
def group_grams(an, chunks: list[tuple], groups, decisions: dict | None = None, *, progress: bool = False,
                desc: str = "calibrating", segments: str | None = None) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Yield (group, {source node: float64 Gram Z_j^T Z_j}) for every source of the given groups, measured on the
    model as the ``decisions`` prune it (consumers read Z_j[:, keep] @ T_j), each group as soon as its last source
    has run on every chunk (sources in ``Group.sources`` order); summed over processes under torch.distributed.
    ``segments``: "auto" (plan_segments), "one" (the whole graph at once) or "layer" (the per-layer cut);
    default ROUTE."""
    gm = an.gm
    nodes = list(gm.graph.nodes)
    index = {n.name: i for i, n in enumerate(nodes)}
    where: dict[str, list] = {}
    order: dict[int, list[str]] = {}
    for g in groups:
        for src in an.groups[g].sources:
            cols = group_columns(an, src, g)
            if cols is not None:
                where.setdefault(src, []).append((g, *cols))
                order.setdefault(g, []).append(src)
    if not order:
        return
    done_at: dict[int, list[int]] = {}
    for g, srcs in order.items():
        done_at.setdefault(max(index[s] for s in srcs), []).append(g)
    stop = max(done_at)
    batch = example_batch(gm)
    spans = {g: (min(index[s] for s in srcs), max(index[s] for s in srcs),
                 8 * an.groups[g].width ** 2 * len(srcs)) for g, srcs in order.items()}
    samples = sum(c[0].shape[0] for c in chunks)
    seg = plan_segments(gm, stop, samples, spans, batch, segments or ROUTE)
    run = Stream(gm, chunks, plan_hook(Plan(an, decisions or {})))
    accs: dict[tuple[int, str], GramAccumulator] = {}
    grams: dict[int, dict[str, np.ndarray]] = {}

    def on_value(node, c, v):
        for g, dim, P in where.get(node.name, ()):
            if (g, node.name) not in accs:
                accs[(g, node.name)] = GramAccumulator(an.groups[g].width)
            accs[(g, node.name)].update(as_rows(v, dim, P), channel_dim=-1)

    for a, b in progress_bar(seg.spans, desc=desc, disable=not progress, leave=False, unit="block"):
        run.segment(seg, (a, b), on_value)
        for i in range(a, b + 1):  # Grams complete: reduce in graph order, hand on finished groups
            for g, _, _ in where.get(nodes[i].name, ()):
                G = torch.from_numpy(accs.pop((g, nodes[i].name)).G)
                grams.setdefault(g, {})[nodes[i].name] = distributed.allreduce_sum(G).numpy()
            for g in done_at.get(i, ()):
                by_src = grams.pop(g)
                yield g, {s: by_src[s] for s in order[g]}
