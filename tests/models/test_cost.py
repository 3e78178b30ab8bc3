"""`xdpml model compile`'s estimated cost (xdpml/models/cost.py) against what
bench/bench_models.py measured (section split / cost, floors, 2026-12-04, a VM whose
no-model flow program takes 173 ns; docs/benchmarks.md "Current figures")."""

import warnings

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.tree import DecisionTreeClassifier

from bench import model_zoo as zoo
from bench.bench_models import goal_models
from xdpml.models import layout as L
from xdpml.models.compiler import compile_model
from xdpml.models.cost import estimate_ns

LIM = L.Limits(depth=12, trees=16, nodes=8192, leaf_values=8192)  # the benchmark's (flow pointer)
MEASURED = {  # ns added per classified packet (floors of two runs' ranges, after the heap-order walk)
    "decision tree depth 10": (30.3, 31.1),
    "random forest 10 x depth 8": (143.9, 144.4),
    "logistic regression, 16 features": (29.5, 30.0),
    "int8 MLP 16-16-2": (215.0, 219.6),
}


@pytest.fixture(scope="module")
def goals():
    return {n: compile_model(m, zoo.NAMES, limits=LIM) for n, m in goal_models()}


def test_estimates_are_within_15_percent_of_the_measured(goals):
    for name, (lo, hi) in MEASURED.items():
        est = estimate_ns(goals[name], LIM)
        assert not est["second_lookup"] and est["over_baseline_ns"] == 173
        assert 0.85 * lo <= est["added_ns"] <= 1.15 * hi, (name, est, (lo, hi))


def test_estimates_grow_with_the_model_and_the_second_lookup(goals):
    _, X = zoo.dataset(3000, seed=1)
    noise = np.random.default_rng(0).integers(0, 2, len(X))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trees = [
            compile_model(DecisionTreeClassifier(max_depth=d, random_state=0).fit(X, noise), zoo.NAMES, limits=LIM)
            for d in (2, 6, 10)
        ]
        lr1 = compile_model(LogisticRegression().fit(X[:, :1], noise), zoo.NAMES[:1], limits=LIM)
    costs = [estimate_ns(t, LIM)["added_ns"] for t in trees]
    assert costs == sorted(costs) and costs[0] < costs[-1]
    assert estimate_ns(lr1, LIM)["added_ns"] < estimate_ns(goals["logistic regression, 16 features"], LIM)["added_ns"]
    big = L.DEFAULT_LIMITS  # past FLOW_PTR_MAX_TREE_LEVELS: the class stored by a second lookup
    tree = goals["decision tree depth 10"]
    assert not big.flow_ptr and estimate_ns(tree, big)["second_lookup"]
    assert estimate_ns(tree, big)["added_ns"] == estimate_ns(tree, LIM)["added_ns"] + 37


def test_a_tree_too_deep_for_heap_order_is_estimated_as_walked_in_pairs():
    """One depth-12 tree: in heap order with 8192 nodes (12 levels at TREE_LEVEL_NS), in
    pairs with 4096 (bpf/model.h walks it twice, 12 levels each, at FOREST_LEVEL_NS)."""
    from xdpml.models import cost
    from xdpml.models.compiler import heap_levels

    _, X = zoo.dataset(6000, seed=1)
    noise = np.random.default_rng(12).integers(0, 3, len(X))
    tree = DecisionTreeClassifier(max_depth=12, random_state=0).fit(X.astype(float), noise)
    small = L.Limits(depth=12, trees=16, nodes=4096, leaf_values=8192)
    heap, pairs = compile_model(tree, zoo.NAMES, limits=LIM), compile_model(tree, zoo.NAMES, limits=small)
    assert heap.depth == 12 and heap_levels(heap, LIM) == 12 and heap_levels(pairs, small) is None
    d = estimate_ns(pairs, small)["added_ns"] - estimate_ns(heap, LIM)["added_ns"]
    assert abs(d - (2 * 12 * cost.FOREST_LEVEL_NS - 12 * cost.TREE_LEVEL_NS)) <= 1
