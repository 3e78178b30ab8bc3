"""ONNX input for `xdpml model compile|load`: an ``ai.onnx.ml`` TreeEnsembleClassifier
(as sklearn-onnx writes decision trees and random / extra-trees forests) read into the
node arrays the compiler takes from a scikit-learn tree.

The kernel then decides as onnxruntime does on integer inputs: a branch is
``float32(x) <= threshold`` with the threshold stored as float32 in the file (the
compiler's ``int_threshold`` gives the largest integer that passes); one tree: the
leaf's class is the argmax of its class weights (first on ties; binary with one weight
column: class 1 iff the weight > 0.5); several trees: the weights are averaged class
probabilities (sklearn-onnx divides each tree's probabilities by the number of trees),
so the per-leaf weights are turned back into probabilities and the forest votes as
scikit-learn does. Anything else (other branch modes, a post transform, base values, a
regressor, weights that are not probabilities) is refused with a ModelError naming it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xdpml.errors import ModelError


class _TreeArrays:
    """The part of scikit-learn's ``tree_`` that the compiler reads."""

    def __init__(self, left, right, feature, threshold, value):
        self.children_left = np.asarray(left, np.int64)
        self.children_right = np.asarray(right, np.int64)
        self.feature = np.asarray(feature, np.int64)
        self.threshold = np.asarray(threshold, np.float64)
        self.value = np.asarray(value, np.float64)  # (nodes, 1, classes)
        self.node_count = len(self.children_left)
        self.n_outputs = 1


@dataclass
class _Tree:
    tree_: _TreeArrays


@dataclass
class OnnxTreeModel:
    """Trees read from an ONNX file, in the shape compile_model() takes."""

    name: str  # "DecisionTreeClassifier (ONNX)" or "RandomForestClassifier (ONNX)"
    trees: list
    classes_: np.ndarray
    n_features_in_: int

    @property
    def single(self) -> bool:
        return len(self.trees) == 1


def _attrs(node) -> dict:
    from onnx import helper

    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        if isinstance(v, list) and v and isinstance(v[0], bytes):
            v = [x.decode() for x in v]
        elif isinstance(v, bytes):
            v = v.decode()
        out[a.name] = v
    return out


def load_onnx(path: str) -> OnnxTreeModel:
    try:
        import onnx
    except ImportError:
        raise ModelError("ONNX input needs the onnx package (pip install onnx)") from None
    try:
        model = onnx.load(path)
    except Exception as exc:
        raise ModelError(f"{path}: cannot read the ONNX model ({type(exc).__name__}: {exc})") from exc
    ops = [n for n in model.graph.node if n.domain == "ai.onnx.ml" and n.op_type.startswith("TreeEnsemble")]
    if len(ops) != 1 or ops[0].op_type != "TreeEnsembleClassifier":
        kinds = ", ".join(sorted({n.op_type for n in model.graph.node})) or "none"
        raise ModelError(
            f"{path}: the kernel takes an ONNX model with one ai.onnx.ml TreeEnsembleClassifier "
            f"(a decision tree or random forest from sklearn-onnx); this one has: {kinds}"
        )
    node = ops[0]
    a = _attrs(node)
    if a.get("post_transform", "NONE") != "NONE":
        raise ModelError(f"{path}: post_transform {a['post_transform']} is not supported (gradient boosting?)")
    if any(float(b) != 0.0 for b in a.get("base_values", [])):
        raise ModelError(f"{path}: base_values are not supported (gradient boosting?)")
    if "nodes_values_as_tensor" in a or "class_weights_as_tensor" in a:
        raise ModelError(f"{path}: tensor-valued tree attributes are not supported; thresholds as floats only")
    labels = a.get("classlabels_int64s") or a.get("classlabels_strings")
    if not labels:
        raise ModelError(f"{path}: the TreeEnsembleClassifier names no class labels")
    classes = np.asarray(labels)
    k = len(classes)
    modes = a["nodes_modes"]
    bad = sorted(set(modes) - {"BRANCH_LEQ", "LEAF"})
    if bad:
        raise ModelError(f"{path}: branch modes {', '.join(bad)} are not supported (only BRANCH_LEQ)")
    tids = np.asarray(a["nodes_treeids"], np.int64)
    nids = np.asarray(a["nodes_nodeids"], np.int64)
    feat_ids = np.asarray(a["nodes_featureids"], np.int64)
    thr = np.asarray(a["nodes_values"], np.float32).astype(np.float64)
    tnode = np.asarray(a["nodes_truenodeids"], np.int64)
    fnode = np.asarray(a["nodes_falsenodeids"], np.int64)
    ctree = np.asarray(a["class_treeids"], np.int64)
    cnode = np.asarray(a["class_nodeids"], np.int64)
    cid = np.asarray(a["class_ids"], np.int64)
    cw = np.asarray(a["class_weights"], np.float64)
    one_column = k == 2 and set(cid.tolist()) <= {0}  # binary, one weight: p(class 1)
    tree_ids = sorted(set(tids.tolist()))
    n_trees = len(tree_ids)
    trees = []
    for t in tree_ids:
        sel = np.flatnonzero(tids == t)
        ids = nids[sel]
        n = len(sel)
        if sorted(ids.tolist()) != list(range(n)):
            raise ModelError(f"{path}: tree {t}: node ids are not 0..{n - 1}")
        order = np.argsort(ids)
        sel = sel[order]
        leaf = np.array([modes[i] == "LEAF" for i in sel])
        left = np.where(leaf, -1, tnode[sel])
        right = np.where(leaf, -1, fnode[sel])
        value = np.zeros((n, 1, k))
        m = ctree == t
        for node_id, c, w in zip(cnode[m], cid[m], cw[m]):
            if not 0 <= c < k or not 0 <= node_id < n:
                raise ModelError(f"{path}: tree {t}: a class weight names class {c} or node {node_id}")
            value[node_id, 0, 1 if one_column else c] += w
        if one_column:  # weights are p1 / n_trees: back to probabilities
            p1 = value[:, 0, 1] * n_trees
            if (p1[leaf] < -1e-6).any() or (p1[leaf] > 1 + 1e-6).any():
                raise ModelError(f"{path}: tree {t}: binary leaf weights are not probabilities / trees")
            p1 = np.clip(p1, 0.0, 1.0)  # float32 weights x trees can pass 1 by an ulp
            value[:, 0, 1] = p1
            value[:, 0, 0] = 1.0 - p1
        if (value[leaf] < 0).any():
            raise ModelError(f"{path}: tree {t}: negative class weights are not supported")
        if n_trees > 1 and not one_column:
            sums = value[leaf, 0, :].sum(axis=1)
            if not np.allclose(sums, 1.0 / n_trees, rtol=1e-4, atol=1e-7):
                raise ModelError(
                    f"{path}: tree {t}: leaf weights are not class probabilities / trees "
                    "(a forest as sklearn-onnx writes it)"
                )
        trees.append(_Tree(_TreeArrays(left, right, feat_ids[sel], thr[sel], value)))
    n_features = _n_inputs(model, int(feat_ids.max()) + 1 if len(feat_ids) else 0)
    name = "DecisionTreeClassifier (ONNX)" if n_trees == 1 else "RandomForestClassifier (ONNX)"
    return OnnxTreeModel(name=name, trees=trees, classes_=classes, n_features_in_=n_features)


def _n_inputs(model, used: int) -> int:
    """The input's feature count from its shape (N, F), else the features the trees use."""
    try:
        dims = model.graph.input[0].type.tensor_type.shape.dim
        if len(dims) == 2 and dims[1].dim_value > 0:
            return int(dims[1].dim_value)
    except (IndexError, AttributeError):
        pass
    return used
