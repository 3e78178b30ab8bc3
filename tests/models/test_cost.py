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
MEASURED = {  # ns added per classified packet (floors of two runs' ranges)
    "decision tree depth 10": (31.5, 34.6),
    "random forest 10 x depth 8": (141.6, 143.6),
    "logistic regression, 16 features": (27.5, 28.9),
    "int8 MLP 16-16-2": (210.7, 215.1),
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
