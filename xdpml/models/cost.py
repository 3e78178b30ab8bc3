"""The estimated added cost of a model per classified packet, for `xdpml model compile`.

A linear fit of what bench/bench_models.py measures (section ``split``: one build, only
the slot's data differ between rows; docs/benchmarks.md, "Current figures"): on the
2-vCPU development VM where the TC flow program without a model takes 173 ns, with
limits that store the class through the flow pointer (``Limits.flow_ptr``). A build of
larger limits (the defaults) looks the flow up again after the walk: about 37 ns more.
Scale by your machine's own no-model figure (``bench_datapath``). A flow model pays this
once per flow, at its k-th packet.
"""

from __future__ import annotations

from xdpml.models import layout as L
from xdpml.models.compiler import heap_levels
from xdpml.models.features import GROUPS, skip_groups

BASELINE_NS = 173  # the no-model flow program these figures were measured over
FIXED_NS = 15.0  # a classified packet: lookups, copy, the always-computed features, decision, counters
GROUP_FEATURE_NS = 0.26  # each feature of a feature group the model reads (features.GROUPS)
TREE_LEVEL_NS = 0.9  # one level of a single tree in heap order (compiler.heap_levels)
FOREST_LEVEL_NS = 1.28  # one level of one tree of a forest (trees walked two at a time)
LEAF_VALUE_NS = 0.68  # one leaf value summed (per tree, per output)
LINEAR_INPUT_NS = 0.65  # one input of one output of a linear model
MLP_SLOT_NS = 0.72  # one input slot of one neuron (every slot of the layer is read)
SECOND_LOOKUP_NS = 37.0  # limits past layout.FLOW_PTR_MAX_TREE_LEVELS: the flow looked up again


def estimate_ns(m, lim: L.Limits) -> dict:
    """{"added_ns": estimated ns per classified packet over the no-model flow program,
    "over_baseline_ns": BASELINE_NS, "second_lookup": bool} for CompiledModel ``m`` in a
    datapath built with ``lim``."""
    skip = skip_groups(m.features)  # the groups the kernel does not compute for this model
    ns = FIXED_NS + GROUP_FEATURE_NS * sum(len(g) for bit, g in GROUPS.items() if not skip & bit)
    if m.kind == L.KIND_TREES:
        levels = heap_levels(m, lim)
        if levels is not None:
            ns += TREE_LEVEL_NS * levels
        else:  # in pairs (a single tree too deep for heap order: walked twice, summed once)
            ns += FOREST_LEVEL_NS * max(m.n_trees, 2) * (-(-m.depth // 4) * 4)
        if m.decision != L.DEC_LEAF:
            ns += LEAF_VALUE_NS * m.n_trees * m.n_outputs
    elif m.kind == L.KIND_LINEAR:
        ns += LINEAR_INPUT_NS * m.n_outputs * (-(-m.n_features // 4) * 4)
    elif m.kind == L.KIND_MLP:
        ns += MLP_SLOT_NS * lim.width * sum(w.shape[1] for w, _, _ in m.layers)
    second = not lim.flow_ptr
    if second:
        ns += SECOND_LOOKUP_NS
    return {"added_ns": round(ns), "over_baseline_ns": BASELINE_NS, "second_lookup": second}
