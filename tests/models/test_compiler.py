"""Compiler and Python table walk against scikit-learn (no kernel): 100,000 random
packets' feature vectors per model kind, the traps of the prior art, and refusals."""

import math

import numpy as np
import pytest
from sklearn.tree import DecisionTreeClassifier

from bench import model_zoo as zoo
from xdpml.errors import ConfigError, ModelError
from xdpml.models import layout as L
from xdpml.models.compiler import compile_model, int_threshold
from xdpml.models.reference import predict_index

LIM = L.Limits(trees=32, depth=12, nodes=4096, leaf_values=8192)
N_TEST = 100_000


@pytest.fixture(scope="module")
def data():
    _, X = zoo.dataset(6000, seed=1)
    _, Xt = zoo.dataset(N_TEST, seed=2)
    return X, zoo.labels(X), Xt


@pytest.mark.parametrize("kind", zoo.KINDS)
def test_table_walk_matches_sklearn(data, kind):
    X, y, Xt = data
    model = zoo.train(kind, X, y)
    c = compile_model(model, zoo.NAMES, limits=LIM)
    got = c.label(predict_index(c.pack(LIM), Xt, LIM))
    want = model.predict(Xt.astype(np.float64))
    agree = got == want
    if kind in zoo.EXACT:
        assert agree.all(), np.flatnonzero(~agree)[:20]
    elif kind in zoo.SUMS:
        bad = np.flatnonzero(~agree)
        assert agree.mean() >= 0.9999, [(int(i), got[i], want[i]) for i in bad]
    elif kind in zoo.LINEAR:
        # outside the stated margin every class agrees; inside it is reported, never hidden
        outside = zoo.decision_values(model, Xt) > c.margin(Xt)
        assert agree[outside].all(), np.flatnonzero(~agree & outside)[:20]
        assert outside.mean() > 0.95, outside.mean()  # the margin is small: most rows are outside it
    else:  # int8 MLP against the float model
        assert agree.mean() >= 0.99, agree.mean()
    assert len(set(want)) > 1  # the test data reaches more than one class


def test_float32_thresholds():
    f32 = lambda t: float(np.float32(t))  # noqa: E731
    # negative: int() truncates towards zero, one too high
    assert int_threshold(-0.5) == -1 and int(-0.5) == 0
    assert int_threshold(-3.0) == -3
    # above 2^24 float32 cannot hold every integer: 2^24+1 rounds to 2^24 <= 16777216.5
    assert f32(2**24 + 1) == 2**24
    assert int_threshold(16777216.5) == 2**24 + 1
    for thr in [3e9 + 0.5, 4294967040.5, 123456789.25, -2.5e9 + 0.75, 0.5, 7.0]:
        t = int_threshold(thr)
        assert f32(t) <= thr < f32(t + 1) or f32(t + 1) > thr
        assert f32(t + 1) > thr and f32(t) <= thr


def test_wide_integer_thresholds_exact(monkeypatch):
    """A tree over integers spanning +-2^31 (negative thresholds, thresholds far above 2^24)
    walks exactly as scikit-learn on its float32 view, including the values next to
    every threshold, where int() truncation would go the wrong way."""
    rng = np.random.default_rng(5)
    X = rng.integers(-(2**31), 2**31, size=(4000, 3))
    y = ((X[:, 0] > 40_000_001) ^ (X[:, 1] < -12_345_677)).astype(int) + (X[:, 2] % 3 == 0)
    model = DecisionTreeClassifier(max_depth=12, random_state=0).fit(X.astype(np.float64), y)
    c = compile_model(model, ["tcp_sequence_num", "tcp_ack_num", "src_port"], limits=LIM)
    thr = model.tree_.threshold[model.tree_.children_left != -1]
    assert (thr < 0).any() and (np.abs(thr) > 2**24).any()
    near = np.concatenate([np.floor(thr)[:, None] + d for d in (-1, 0, 1, 2)]).astype(np.int64)
    probe = np.repeat(rng.integers(-(2**31), 2**31, size=(len(near), 3)), 1, axis=0)
    rows = [probe.copy() for _ in range(3)]
    for j in range(3):
        rows[j][:, j] = near[:, 0]
    P = np.concatenate(rows + [rng.integers(-(2**31), 2**31, size=(20000, 3))])
    got = c.label(predict_index(c.pack(LIM), P, LIM))
    assert (got == model.predict(P.astype(np.float32).astype(np.float64))).all()
    assert (got == model.predict(P.astype(np.float64))).all()
    # the same tree with int()-truncated thresholds goes the wrong way on these probes
    import xdpml.models.compiler as compiler

    monkeypatch.setattr(compiler, "int_threshold", lambda t: int(t))
    wrong = compile_model(model, ["tcp_sequence_num", "tcp_ack_num", "src_port"], limits=LIM)
    assert (wrong.label(predict_index(wrong.pack(LIM), P, LIM)) != got).any()


def test_limits_refused_with_the_limit_named(data):
    X, y, _ = data
    noise = np.random.default_rng(3).integers(0, 2, len(y))
    deep = DecisionTreeClassifier(random_state=0).fit(X.astype(np.float64), noise)
    assert deep.get_depth() > LIM.depth
    with pytest.raises(ModelError, match=r"tree depth \d+ > 12 .*XDPML_MODEL_MAX_DEPTH"):
        compile_model(deep, zoo.NAMES, limits=LIM)
    forest = zoo.train("forest", X, y)
    with pytest.raises(ModelError, match=r"trees 10 > 8 .*XDPML_MODEL_MAX_TREES"):
        compile_model(forest, zoo.NAMES, limits=L.Limits(trees=8))
    with pytest.raises(ModelError, match=r"tree nodes \d+ > 256 .*XDPML_MODEL_MAX_NODES"):
        compile_model(forest, zoo.NAMES, limits=L.Limits(nodes=256))
    with pytest.raises(ConfigError, match=r"features=2: must be at least 4"):
        L.Limits(features=2, width=8)
    with pytest.raises(ModelError, match=r"features 16 > 8 .*XDPML_MODEL_MAX_FEATURES"):
        compile_model(zoo.train("logistic", X, y), zoo.NAMES, limits=L.Limits(features=8, width=8))


def test_bad_inputs_are_model_errors(data):
    X, y, _ = data
    tree = zoo.train("tree", X, y)
    with pytest.raises(ModelError, match="unknown model feature.*bogus"):
        compile_model(tree, zoo.NAMES[:-1] + ["bogus"], limits=LIM)
    with pytest.raises(ModelError, match="takes 16 features but 3"):
        compile_model(tree, zoo.NAMES[:3], limits=LIM)
    with pytest.raises(ModelError, match="not supported in the kernel"):
        from sklearn.neighbors import KNeighborsClassifier

        compile_model(KNeighborsClassifier().fit(X[:100], y[:100]), zoo.NAMES, limits=LIM)


def test_fixed_point_sums_stay_inside_64_bits(data):
    """Every partial sum the kernel forms is bounded below 2^62 by the chosen scale:
    checked on the worst case (every feature at its largest value) for linear models,
    and on the largest leaf sum for tree sums."""
    X, y, _ = data
    for kind in ("logistic", "ridge", "boosting", "forest"):
        c = compile_model(zoo.train(kind, X, y), zoo.NAMES, limits=LIM)
        if c.kind == L.KIND_LINEAR:
            xmax = np.array([f.max for f in c.features], dtype=object)
            worst = max(
                sum(abs(int(w)) * int(m) for w, m in zip(row, xmax)) + abs(int(b)) for row, b in zip(c.weights, c.bias)
            )
        else:
            per_tree = [max(abs(int(v)) for v in c.leaf_values)] * c.n_trees
            worst = sum(per_tree) + max(abs(int(b)) for b in c.bias)
        assert worst < 2**62, kind
        assert c.frac_bits >= 20  # and the scale is not thrown away to get there
        assert math.isfinite(c.margin())


@pytest.mark.parametrize(
    ("depth", "nodes", "heap"),
    [(0, 4096, 1), (1, 4096, 1), (7, 4096, 1), (10, 4096, 1), (11, 4096, 0), (6, 128, 1), (7, 128, 0)],
)
def test_one_tree_in_heap_order_or_in_pairs(data, depth, nodes, heap):
    """One tree is packed in heap order (bpf/model.h MODEL_HEAP_STEP) when its walk's
    2^(levels+1) - 1 positions fit the node limit (levels: the depth rounded up to 2),
    else as nodes walked in pairs; either way the walk of the packed slot is predict's."""
    X, _, Xt = data
    noise = np.random.default_rng(depth).integers(0, 3, len(X))  # grows the tree to its max depth
    y = noise if depth else np.zeros(len(X), np.int64)
    model = DecisionTreeClassifier(max_depth=max(depth, 1), random_state=0).fit(X.astype(float), y)
    lim = L.Limits(trees=4, depth=12, nodes=nodes, leaf_values=nodes)
    c = compile_model(model, zoo.NAMES, limits=lim)
    assert c.depth == depth
    packed = c.pack(lim)
    assert int(packed["heap"]) == heap
    if heap:
        levels = -(-depth // 2) * 2
        assert int(packed["trees"]["root"][0]) == 0 and c.n_nodes <= 2 ** (levels + 1) - 1
        pos = np.arange(2 ** (levels + 1) - 1)  # internal positions' children are 2h+1, 2h+2
        inner = packed["trees"]["node"]["thr"][: len(pos)] != L.LEAF_THR
        assert (packed["trees"]["node"]["left_off"][: len(pos)][inner] == (2 * pos[inner] + 1) * L.NODE_SIZE).all()
    got = c.label(predict_index(packed, Xt, lim))
    assert (got == model.predict(Xt.astype(np.float64))).all()


def test_heap_order_refuses_a_right_child_out_of_range():
    """A damaged tree (a bundle's node_left of the last node): a one-line ModelError, not an IndexError."""
    from xdpml.models.compiler import heap_order

    with pytest.raises(ModelError, match="right child is out of range"):
        heap_order(np.array([1, 2, 2]), 0, 2)
