"""scikit-learn estimators -> integer tables the kernel walks (struct model_slot).

Supported, and how each is made exact or bounded:

* DecisionTreeClassifier: node arrays; each leaf holds its class (the argmax of its
  value, first class on ties, as ``predict``). Exact on integer features.
* RandomForestClassifier / ExtraTreesClassifier: per-leaf class probabilities in
  fixed point (2^-S), summed over trees, argmax (first on ties): scikit-learn
  averages probabilities, it does not count votes.
* GradientBoostingClassifier: learning_rate x leaf value in fixed point, plus the
  initial raw prediction; binary: class 1 when the sum is >= 0, else argmax.
* IsolationForest: per-leaf path length (depth + c(n) - 1, scikit-learn's) in
  fixed point; ``predict`` is 1 (inlier) when the summed length reaches the length
  its ``offset_`` implies, else -1.
* LogisticRegression, RidgeClassifier, LinearSVC, SGDClassifier (linear): weights
  and intercept in fixed point 2^-S, 64-bit sums; a StandardScaler in front (a
  Pipeline) is folded into the weights.
* MLPClassifier (ReLU), optionally behind a StandardScaler: int8 weights with one
  scale per layer, int16 activations (8 fractional bits), 64-bit accumulators.

Integer thresholds: scikit-learn compares ``float32(x) <= threshold``; the kernel
compares integers with :func:`int_threshold`, the largest integer whose float32 is
<= the threshold (``int()`` is wrong below zero and above 2^24).

S is the largest number of fractional bits (at most 56) for which no sum of the
model can leave 63 bits, given each feature's largest value (xdpml.models.features);
it is stated in the compile report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xdpml.errors import ModelError
from xdpml.models import features as F
from xdpml.models import layout as L
from xdpml.models.features import Feature, resolve

MAX_FRAC_BITS = 56
SUM_BOUND = 2**62
MLP_ACT_BITS = 8


def int_threshold(thr: float) -> int:
    """The largest integer t with float32(t) <= thr (monotone in t, found by bisection)."""
    thr = float(thr)
    if math.isnan(thr):
        raise ModelError("a tree threshold is NaN")
    thr = min(max(thr, -(2.0**62)), 2.0**62)

    def ok(t: int) -> bool:
        return float(np.float32(t)) <= thr

    lo = math.floor(thr)
    step = 1
    while not ok(lo):
        lo -= step
        step *= 2
    hi = lo + 1
    step = 1
    while ok(hi):
        lo = hi
        hi += step
        step *= 2
    while hi - lo > 1:  # ok(lo), not ok(hi)
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class CompiledModel:
    """A model as the kernel runs it: the same integers packed into a slot."""

    kind: int
    decision: int
    estimator: str
    features: list[Feature]
    classes: list  # class index (kernel output) -> label as scikit-learn predicts it
    n_outputs: int
    frac_bits: int = 0  # fixed-point scale 2^-frac_bits of sums (trees, linear)
    bias: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))
    # trees
    roots: np.ndarray | None = None
    node_feat: np.ndarray | None = None
    node_thr: np.ndarray | None = None
    node_left: np.ndarray | None = None
    node_leaf: np.ndarray | None = None
    leaf_values: np.ndarray | None = None

    @property
    def n_leaf_values(self) -> int:
        return 0 if self.leaf_values is None else len(self.leaf_values)

    depth: int = 0
    # linear
    weights: np.ndarray | None = None
    # mlp
    in_mul: np.ndarray | None = None
    in_add: np.ndarray | None = None
    in_shift: np.ndarray | None = None
    layers: list = field(default_factory=list)  # [(w int8 [in,out], bias int64 [out], mult)]
    notes: list[str] = field(default_factory=list)

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def n_trees(self) -> int:
        return 0 if self.roots is None else len(self.roots)

    @property
    def n_nodes(self) -> int:
        return 0 if self.node_feat is None else len(self.node_feat)

    @property
    def node_feat_ids(self) -> np.ndarray:
        """Each node's feature as the kernel reads it: the MF_* id of its input (bpf/model.h
        walks the per-packet feature array by id, so a tree needs no gather of its inputs)."""
        ids = np.array([f.id for f in self.features], dtype=np.int64)
        return ids[np.asarray(self.node_feat, dtype=np.int64)]

    def label(self, index):
        return np.asarray(self.classes, dtype=object)[np.asarray(index)]

    def margin(self, X=None):
        """Linear models: the largest |fixed-point - exact| of a decision value, in the
        model's units: for rows of X, (sum |x_i| + 1) / 2^(S+1) each (the rounding of every
        weight and of the intercept); without X, the worst case over every feature's range.
        A class can differ from scikit-learn's only where |decision| is within it."""
        if self.kind != L.KIND_LINEAR:
            return 0.0
        half = 0.5 * 2.0**-self.frac_bits
        if X is None:
            return (sum(f.max for f in self.features) + 1) * half
        return (np.abs(np.asarray(X, np.float64)).sum(axis=1) + 1) * half * 2  # x2: float error in sklearn

    def check(self, lim: L.Limits) -> None:
        """ModelError naming the first limit this model exceeds."""

        def need(what: str, have: int, limit: int, flag: str) -> None:
            if have > limit:
                raise ModelError(
                    f"model does not fit the datapath: {what} {have} > {limit} "
                    f"(-DXDPML_MODEL_MAX_{flag}, `--max-{flag.lower().replace('_', '-')}`)"
                )

        need("features", self.n_features, lim.features, "FEATURES")
        need("outputs (classes)", max(self.n_outputs, len(self.classes)), lim.outputs, "OUTPUTS")
        if self.kind == L.KIND_TREES:
            need("trees", self.n_trees, lim.trees, "TREES")
            need("tree depth", self.depth, lim.depth, "DEPTH")
            need("tree nodes", self.n_nodes, lim.nodes, "NODES")
            need("leaf values", self.n_leaf_values, lim.leaf_values, "LEAF_VALUES")
        if self.kind == L.KIND_MLP:
            need("MLP layers", len(self.layers), lim.layers, "LAYERS")
            need("MLP width", max(max(w.shape) for w, _, _ in self.layers), lim.width, "WIDTH")

    def actions_of(self, actions: dict | None) -> list[int]:
        """{class label (as predict gives it, or its str): "pass"|"alert"|"drop"|
        "rate-limit:PPS[:BURST]"} -> the per-class action codes; ModelError names an
        unknown class or action."""
        return [a for a, _, _ in self.actions_rates_of(actions)]

    def actions_rates_of(self, actions: dict | None) -> list[tuple[int, int, int]]:
        """As :meth:`actions_of`, per class (action code, packets/s, burst packets)."""
        from xdpml.config import parse_model_action
        from xdpml.errors import ConfigError

        out = [(0, 0, 0)] * self.n_outputs_classes
        labels = {str(c): i for i, c in enumerate(self.classes)}
        for label, act in (actions or {}).items():
            if str(label) not in labels:
                raise ModelError(f"action for class {label!r}: the model's classes are {', '.join(labels)}")
            try:
                name, pps, burst = parse_model_action(act)
            except ConfigError as exc:
                raise ModelError(f"action for class {label!r}: {exc}") from None
            out[labels[str(label)]] = (L.ACTIONS[name], pps, burst)
        return out

    @property
    def n_outputs_classes(self) -> int:
        return len(self.classes)

    def pack(self, lim: L.Limits, *, model_id: int = 0, actions: dict | None = None) -> np.ndarray:
        """The slot value (0-d structured array; ``.tobytes()`` is the map value).
        ``actions``: what each class does (see :meth:`actions_of`); default pass."""
        self.check(lim)
        rates = self.actions_rates_of(actions)
        acts = [a for a, _, _ in rates]
        if len(acts) > lim.outputs:
            raise ModelError(f"{len(acts)} classes > {lim.outputs} (-DXDPML_MODEL_MAX_OUTPUTS)")
        s = L.empty_slot(lim)
        s["kind"], s["decision"] = self.kind, self.decision
        s["n_features"], s["n_outputs"] = self.n_features, self.n_outputs
        s["model_id"] = model_id & 0xFFFF_FFFF
        s["feat_id"][: self.n_features] = [f.id for f in self.features]
        s["flow"] = int(any(f.flow for f in self.features))
        s["fskip"] = F.skip_groups(self.features)  # packet features no input reads: not computed
        s["action"][: len(acts)] = acts
        for i, (_, pps, burst) in enumerate(rates):
            if pps:  # GCRA in ns: one packet costs 1e9 / pps, the burst is burst packets' cost
                s["rl_ns"][i] = 1_000_000_000 // pps
                s["rl_burst_ns"][i] = burst * (1_000_000_000 // pps)
        s["bias"][: len(self.bias)] = self.bias
        if self.kind == L.KIND_TREES:
            s["n_trees"] = self.n_trees
            t = s["trees"]
            t["root"][: self.n_trees] = self.roots
            s["depth"] = self.depth
            feat = self.node_feat_ids
            thr, leaf = np.asarray(self.node_thr, np.int64), np.asarray(self.node_leaf, np.int64)
            left = np.asarray(self.node_left, np.int64)
            levels = heap_levels(self, lim)
            if levels is not None:  # one tree, walked in heap order (bpf/model.h MODEL_HEAP_STEP)
                src = heap_order(left, int(np.asarray(self.roots)[0]), levels)
                feat, thr, leaf = feat[src], thr[src], leaf[src]
                h = np.arange(len(src))
                left = np.where(left[src] == src, h, 2 * h + 1)  # as the kernel walks: a leaf stays a leaf
                t["root"][0] = 0
                s["heap"] = 1
            n = len(feat)
            for name, arr in (  # offsets in bytes, as bpf/model.h walks them
                ("feat_off", feat * L.PF_SIZE),
                ("thr", thr),
                ("left_off", left * L.NODE_SIZE),
                ("leaf", leaf),
            ):
                t["node"][name][:n] = arr
            t["leaf"][: self.n_leaf_values] = self.leaf_values
        elif self.kind == L.KIND_LINEAR:
            s["lin"]["w"][: self.n_outputs, : self.n_features] = self.weights
        elif self.kind == L.KIND_MLP:
            m = s["mlp"]
            s["n_layers"] = len(self.layers)
            m["in_mul"][: self.n_features] = self.in_mul
            m["in_add"][: self.n_features] = self.in_add
            m["in_shift"][: self.n_features] = self.in_shift
            for i, (w, b, mult) in enumerate(self.layers):
                m["w"][i, : w.shape[0], : w.shape[1]] = w
                m["bias"][i, : len(b)] = b
                m["mult"][i] = mult
                m["width"][i] = w.shape[1]
        return s

    def stats(self) -> dict:
        out: dict[str, Any] = {
            "estimator": self.estimator,
            "features": [f.name for f in self.features],
            "classes": [_plain(c) for c in self.classes],
        }
        if self.kind == L.KIND_TREES:
            out.update(
                {"trees": self.n_trees, "nodes": self.n_nodes, "depth": self.depth, "leaf_values": self.n_leaf_values}
            )
        if self.kind == L.KIND_MLP:
            out["layers"] = [list(w.shape) for w, _, _ in self.layers]
        if self.frac_bits:
            out["fixed_point"] = f"2^-{self.frac_bits}"
        if self.kind == L.KIND_LINEAR:
            out["margin"] = self.margin()
        return out


def _plain(v):
    return v.item() if isinstance(v, np.generic) else v


# ---------------------------------------------------------------------------


def compile_model(est, features, *, limits: L.Limits = L.DEFAULT_LIMITS) -> CompiledModel:
    """A fitted scikit-learn estimator (or Pipeline) over ``features`` (column names,
    in the model's input order) -> CompiledModel, checked against ``limits``."""
    feats = resolve(features)
    scaler, est = _unpipe(est)
    n_in = getattr(est, "n_features_in_", None)
    if n_in is None:
        raise ModelError(f"{type(est).__name__} is not fitted (no n_features_in_)")
    if n_in != len(feats):
        raise ModelError(
            f"the model takes {n_in} features but {len(feats)} were named ({', '.join(f.name for f in feats)})"
        )
    names = getattr(est, "feature_names_in_", None)
    if names is not None and list(names) != [f.name for f in feats]:
        raise ModelError(f"the model was trained on columns {list(names)}, not the features named")
    name = type(est).__name__
    from xdpml.models.onnx_trees import OnnxTreeModel

    if isinstance(est, OnnxTreeModel):  # an ONNX TreeEnsembleClassifier (onnx_trees.py)
        m = _trees(est.name, feats, est.trees, est.classes_, mode="leaf" if est.single else "proba")
        m.check(limits)
        return m
    if scaler is not None and name != "MLPClassifier" and not _is_linear(est):
        raise ModelError(f"a StandardScaler in front of {name} is not supported (trees need none)")
    if name == "DecisionTreeClassifier":
        m = _trees(name, feats, [est], est.classes_, mode="leaf")
    elif name in ("RandomForestClassifier", "ExtraTreesClassifier"):
        m = _trees(name, feats, est.estimators_, est.classes_, mode="proba")
    elif name == "GradientBoostingClassifier":
        m = _gradient_boosting(est, feats)
    elif name == "IsolationForest":
        m = _isolation_forest(est, feats)
    elif _is_linear(est):
        m = _linear(est, feats, scaler)
    elif name == "MLPClassifier":
        m = _mlp(est, feats, scaler)
    else:
        raise ModelError(
            f"{name} is not supported in the kernel; supported: decision tree, random "
            "forest, extra trees, gradient boosting, isolation forest, logistic "
            "regression, ridge, linear SVM, MLP (docs/models.md)"
        )
    m.check(limits)
    return m


def _unpipe(est):
    steps = getattr(est, "steps", None)
    if steps is None:
        return None, est
    models = [s for _, s in steps if s is not None and s != "passthrough"]
    if len(models) == 1:
        return None, models[0]
    if len(models) == 2 and type(models[0]).__name__ == "StandardScaler":
        return models[0], models[1]
    raise ModelError("a Pipeline must be one estimator, or a StandardScaler and one estimator")


def _is_linear(est) -> bool:
    return type(est).__name__ in ("LogisticRegression", "RidgeClassifier", "LinearSVC", "SGDClassifier")


def _frac_bits(bound: float) -> int:
    """Largest S <= 56 with bound * 2^S < 2^62."""
    if bound <= 0:
        return MAX_FRAC_BITS
    s = math.floor(math.log2(SUM_BOUND / bound))
    if s < 0:
        raise ModelError(f"model values too large for 64-bit fixed point (bound {bound:.3g})")
    return min(MAX_FRAC_BITS, s)


def heap_levels(m: CompiledModel, lim: L.Limits) -> int | None:
    """The levels the kernel walks ``m`` in heap order (model_slot.heap), or None when it
    is walked in pairs: heap order holds one tree in 2^(levels+1) - 1 positions (a level
    ~0.9 ns instead of ~1.5, docs/benchmarks.md), so only one tree whose depth, rounded up
    to the kernel's step of 2, fits in ``lim.nodes``."""
    if m.kind != L.KIND_TREES or m.n_trees != 1:
        return None
    levels = -(-m.depth // 2) * 2
    return levels if 2 ** (levels + 1) - 1 <= lim.nodes else None


def heap_order(left, root: int, levels: int) -> np.ndarray:
    """One tree's nodes (node arrays: right = left + 1, a leaf its own left) in heap order
    for a walk of ``levels`` levels: position h's children are at 2h+1 and 2h+2, and a
    leaf is copied to its left child's position (the walk goes left from a leaf), so
    every walk ends on a copy of its leaf. Returns each position's node."""
    left = np.asarray(left, np.int64)
    cur = np.array([root], np.int64)
    out = [cur]
    for _ in range(levels):
        c = left[cur]
        right = np.where(c == cur, c, c + 1)
        if (right >= len(left)).any():
            raise ModelError("a tree's right child is out of range")
        cur = np.empty(2 * len(cur), np.int64)
        cur[0::2], cur[1::2] = c, right
        out.append(cur)
    return np.concatenate(out)


def _tree_arrays(tree, node_base: int, feat_map, leaf_of, scales=None):
    """One sklearn tree_ -> node arrays in the kernel's layout, and its depth.

    Nodes are renumbered breadth-first so that the two children of a node are
    adjacent (right = left + 1); a leaf points to itself with threshold 2^62, so a
    walk of the tree's depth ends on it whatever the inputs. leaf_of(node) -> leaf field."""
    t = tree.tree_
    if t.n_outputs != 1:
        raise ModelError("multi-output trees are not supported")
    cl, cr = t.children_left, t.children_right
    n = t.node_count
    order = [0]  # new index -> old index
    new = {0: 0}
    depth = {0: 0}
    k = 0
    while k < len(order):
        old = order[k]
        if cl[old] != -1:
            for child in (cl[old], cr[old]):
                new[child] = len(order)
                order.append(child)
                depth[child] = depth[old] + 1
        k += 1
    if len(order) != n:
        raise ModelError("a tree has unreachable nodes")
    feat = np.zeros(n, np.int64)
    thr = np.zeros(n, np.int64)
    lft = np.zeros(n, np.int64)
    leaf = np.zeros(n, np.int64)
    for ni, old in enumerate(order):
        if cl[old] == -1:
            thr[ni] = L.LEAF_THR
            lft[ni] = ni + node_base
            leaf[ni] = leaf_of(old)
        else:
            feat[ni] = feat_map[t.feature[old]]
            # fixed-point features hold floor(x * scale), scale a power of two: exact
            sc = 1 if scales is None else scales[feat[ni]]
            thr[ni] = int_threshold(float(t.threshold[old]) * sc)
            lft[ni] = new[cl[old]] + node_base
    return feat, thr, lft, leaf, max(depth.values())


def _assemble(name, feats, classes, n_out, decision, trees, feat_maps, leaf_vals, bias, frac, mode):
    """trees + per-tree leaf value functions -> CompiledModel (kind trees)."""
    parts, roots, values, depth = [], [], [], 0
    base = 0
    for tree, fmap, vals in zip(trees, feat_maps, leaf_vals):
        roots.append(base)

        def leaf_of(i, vals=vals):
            if mode == "leaf":
                return int(vals(i))
            start = len(values)
            values.extend(vals(i))
            return start

        f, th, lf, lv, d = _tree_arrays(tree, base, fmap, leaf_of, [x.scale for x in feats])
        parts.append((f, th, lf, lv))
        depth = max(depth, d)
        base += len(f)
    cat = [np.concatenate([p[k] for p in parts]) for k in range(4)]
    return CompiledModel(
        kind=L.KIND_TREES,
        decision=decision,
        estimator=name,
        features=feats,
        classes=list(classes),
        n_outputs=n_out,
        frac_bits=frac,
        bias=np.asarray(bias, np.int64),
        roots=np.asarray(roots, np.int64),
        node_feat=cat[0],
        node_thr=cat[1],
        node_left=cat[2],
        node_leaf=cat[3],
        leaf_values=np.asarray(values, np.int64),
        depth=depth,
    )


def _trees(name, feats, trees, classes, *, mode):
    ident = list(range(len(feats)))
    k = len(classes)
    if mode == "leaf":
        (tree,) = trees
        val = tree.tree_.value[:, 0, :]
        return _assemble(
            name,
            feats,
            classes,
            k,
            L.DEC_LEAF,
            trees,
            [ident],
            [lambda i: int(np.argmax(val[i]))],
            np.zeros(k),
            0,
            "leaf",
        )
    frac = _frac_bits(len(trees) * 1.0)
    binary = k == 2  # class 1 iff sum(p1 - p0) > 0: one sum instead of two, same ties

    def proba_of(tree):
        v = tree.tree_.value[:, 0, :k].astype(np.float64)
        s = v.sum(axis=1, keepdims=True)
        s[s == 0] = 1.0
        q = np.rint(v / s * 2.0**frac).astype(np.int64)
        if binary:
            q = q[:, 1:2] - q[:, 0:1]
        else:
            # every class less the last (its score is then 0, not summed): the same order and
            # ties as the sums of the k probabilities, exactly (integers), one sum fewer
            q = q[:, :-1] - q[:, -1:]
        return lambda i: list(q[i])

    if binary:
        return _assemble(
            name,
            feats,
            classes,
            1,
            L.DEC_BINARY,
            trees,
            [ident] * len(trees),
            [proba_of(t) for t in trees],
            [-1],
            frac,
            "proba",
        )
    return _assemble(
        name,
        feats,
        classes,
        k - 1,
        L.DEC_ARGMAX_LAST0,
        trees,
        [ident] * len(trees),
        [proba_of(t) for t in trees],
        np.zeros(k - 1),
        frac,
        "proba",
    )


def _gradient_boosting(est, feats):
    init = est.init_
    if init is not None and init != "zero" and type(init).__name__ != "DummyClassifier":
        raise ModelError("GradientBoostingClassifier with a custom init estimator is not supported")
    stages = est.estimators_  # (n_stages, K)
    n_stages, K = stages.shape
    raw0 = np.asarray(est._raw_predict_init(np.zeros((1, len(feats)), np.float32))[0], np.float64)
    lr = float(est.learning_rate)
    trees, outs = [], []
    bound = float(np.abs(raw0).max())
    for s in range(n_stages):
        for k in range(K):
            trees.append(stages[s, k])
            outs.append(k)
            bound += lr * float(np.abs(stages[s, k].tree_.value).max())
    frac = _frac_bits(bound)
    scale = 2.0**frac
    classes = list(est.classes_)
    n_out = K
    decision = L.DEC_BINARY if K == 1 else L.DEC_ARGMAX

    def vals_of(tree, k):
        v = np.rint(tree.tree_.value[:, 0, 0].astype(np.float64) * lr * scale).astype(np.int64)
        return lambda i: [int(v[i]) if o == k else 0 for o in range(n_out)]

    bias = np.rint(raw0 * scale).astype(np.int64)  # binary: class 1 when raw >= 0, as predict
    m = _assemble(
        "GradientBoostingClassifier",
        feats,
        classes,
        n_out,
        decision,
        trees,
        [list(range(len(feats)))] * len(trees),
        [vals_of(t, k) for t, k in zip(trees, outs)],
        bias,
        frac,
        "sum",
    )
    return m


def _avg_path_length(n):
    n = np.asarray(n, np.float64)
    out = np.zeros_like(n)
    out[n == 2] = 1.0
    big = n > 2
    out[big] = 2.0 * (np.log(n[big] - 1.0) + np.euler_gamma) - 2.0 * (n[big] - 1.0) / n[big]
    return out


def _isolation_forest(est, feats):
    offset = float(est.offset_)
    if not -1.0 < offset < 0.0:
        raise ModelError(f"IsolationForest offset_ {offset} outside (-1, 0): every sample would get the same label")
    trees = est.estimators_
    den = len(trees) * float(_avg_path_length([est._max_samples])[0])
    d_thr = -den * math.log2(-offset)  # inlier iff summed path length >= d_thr
    per_tree = []
    bound = 0.0
    for t in trees:
        depths = _node_depths(t.tree_)
        v = depths + _avg_path_length(t.tree_.n_node_samples) - 1.0
        per_tree.append(v)
        bound += float(np.abs(v).max())
    frac = _frac_bits(bound + abs(d_thr))
    scale = 2.0**frac
    vals = [(lambda q: lambda i: [int(q[i])])(np.rint(v * scale).astype(np.int64)) for v in per_tree]
    bias = [-int(math.ceil(d_thr * scale))]  # Dq >= ceil(d_thr * 2^S)  <=>  Dq + bias >= 0
    fmaps = [list(f) for f in est.estimators_features_]
    return _assemble("IsolationForest", feats, [-1, 1], 1, L.DEC_BINARY, trees, fmaps, vals, bias, frac, "sum")


def _node_depths(t) -> np.ndarray:
    """Depth of every node counting the root as 1 (scikit-learn's decision path length)."""
    d = np.zeros(t.node_count, np.float64)
    d[0] = 1.0
    for i in range(t.node_count):
        if t.children_left[i] != -1:
            d[t.children_left[i]] = d[t.children_right[i]] = d[i] + 1.0
    return d


def _fold_scaler(scaler, n):
    if scaler is None:
        return np.zeros(n), np.ones(n)
    mu = scaler.mean_ if scaler.with_mean and scaler.mean_ is not None else np.zeros(n)
    sd = scaler.scale_ if scaler.with_std and scaler.scale_ is not None else np.ones(n)
    return np.asarray(mu, np.float64), np.asarray(sd, np.float64)


def _scaled(feats, mu, sd):
    """The kernel holds x * scale for fixed-point features: (x - mu) / sd = (xk - mu*s) / (sd*s)."""
    sc = np.array([f.scale for f in feats], np.float64)
    return mu * sc, sd * sc


def _linear(est, feats, scaler):
    coef = np.atleast_2d(np.asarray(est.coef_, np.float64))
    icpt = np.atleast_1d(np.asarray(est.intercept_, np.float64))
    mu, sd = _scaled(feats, *_fold_scaler(scaler, len(feats)))
    w = coef / sd
    b = icpt - (coef * mu / sd).sum(axis=1)
    xmax = np.array([f.max for f in feats], np.float64)
    bound = float(((np.abs(w) * xmax).sum(axis=1) + np.abs(b)).max()) + 1
    frac = _frac_bits(bound)
    wq = np.rint(w * 2.0**frac).astype(np.int64)
    bq = np.rint(b * 2.0**frac).astype(np.int64)
    classes = list(est.classes_)
    if wq.shape[0] == 1:
        decision = L.DEC_BINARY
        bq = bq - 1  # predict: class 1 when the score is > 0, i.e. >= 1 in integers
    else:
        decision = L.DEC_ARGMAX
    m = CompiledModel(
        kind=L.KIND_LINEAR,
        decision=decision,
        estimator=type(est).__name__,
        features=feats,
        classes=classes,
        n_outputs=wq.shape[0],
        frac_bits=frac,
        bias=bq,
        weights=wq,
    )
    m.notes.append(f"decision values in fixed point 2^-{frac}; worst-case error {m.margin():.3g}")
    return m


def _mlp(est, feats, scaler):
    if est.activation != "relu":
        raise ModelError(f"MLPClassifier activation {est.activation!r}: only 'relu' runs in the kernel")
    n = len(feats)
    mu, sd = _scaled(feats, *_fold_scaler(scaler, n))
    # input j: (x * in_mul + in_add) >> in_shift = (x - mu) / sd in 8 fractional bits; the
    # shift is the largest that keeps x * in_mul + in_add inside 63 bits for this feature
    xmax = np.array([f.max for f in feats], np.float64)
    in_mul, in_add, in_shift = [], [], []
    for j in range(n):
        per_unit = 2.0**MLP_ACT_BITS / sd[j]
        mag = per_unit * xmax[j] + abs(mu[j]) * per_unit
        sh = min(62, math.floor(math.log2(SUM_BOUND / max(mag, 1e-300))))
        if sh < 0:
            raise ModelError(f"feature {feats[j].name}: scale too fine for 64-bit input quantisation")
        in_mul.append(int(round(per_unit * 2.0**sh)))
        in_add.append(int(round(-mu[j] * per_unit * 2.0**sh)))
        in_shift.append(sh)
    in_mul, in_add, in_shift = (np.asarray(v, np.int64) for v in (in_mul, in_add, in_shift))
    layers = []
    n_layers = len(est.coefs_)
    for li, (W, B) in enumerate(zip(est.coefs_, est.intercepts_)):
        W = np.asarray(W, np.float64)
        s = float(np.abs(W).max()) / 127.0 or 1.0
        wq = np.clip(np.rint(W / s), -127, 127).astype(np.int8)
        bq = np.rint(np.asarray(B, np.float64) / s * 2**MLP_ACT_BITS).astype(np.int64)
        mult = int(round(s * 2**L.MLP_REQ_SHIFT))
        if li < n_layers - 1 and mult < 1:
            raise ModelError(f"MLP layer {li}: weights too small to requantise (scale {s:.3g})")
        if li == n_layers - 1 and wq.shape[1] == 1:
            bq = bq - 1  # binary: class 1 when the logit is > 0
        layers.append((wq, bq, mult))
    k = layers[-1][0].shape[1]
    return CompiledModel(
        kind=L.KIND_MLP,
        decision=L.DEC_BINARY if k == 1 else L.DEC_ARGMAX,
        estimator="MLPClassifier",
        features=feats,
        classes=list(est.classes_),
        n_outputs=k,
        in_mul=in_mul,
        in_add=in_add,
        in_shift=in_shift,
        layers=layers,
        bias=np.zeros(k, np.int64),
    )
