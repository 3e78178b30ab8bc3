"""Reference models, one of each supported kind, that the parity tests and the benchmark
train on feature vectors of random packets, labelled by a rule that needs the traps
(sequence numbers above 2^24, the CWR bit, a mostly-zero first feature)."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.ensemble import ExtraTreesClassifier, GradientBoostingClassifier, IsolationForest, RandomForestClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, RidgeClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC
from sklearn.tree import DecisionTreeClassifier

from bench.model_packets import feature_matrix, random_fields

# tcp_urgent_pointer first: zero for most packets, and the first feature (index 0)
NAMES = [
    "tcp_urgent_pointer",
    "ip_version",
    "ip_ihl",
    "ip_dscp",
    "ip_ecn",
    "ip_total_length",
    "ip_flags",
    "ip_ttl",
    "protocol",
    "dst_port",
    "src_port",
    "tcp_sequence_num",
    "tcp_window_size",
    "tcp_syn",
    "tcp_cwr",
    "pkt_len",
]


def labels(X: np.ndarray) -> np.ndarray:
    c = {n: X[:, i] for i, n in enumerate(NAMES)}
    y = np.zeros(len(X), np.int64)
    y[(c["dst_port"] < 1024) & (c["tcp_syn"] == 1)] = 1
    y[c["tcp_sequence_num"] > 3_000_000_000] = 2
    y[(c["tcp_cwr"] == 1) & (c["ip_ttl"] < 128)] = 3
    y[(c["tcp_urgent_pointer"] > 0) & (c["tcp_urgent_pointer"] < 20000)] = 1
    return y


def dataset(n: int, seed: int) -> tuple[dict, np.ndarray]:
    f = random_fields(n, np.random.default_rng(seed))
    return f, feature_matrix(f, NAMES)


def train(kind: str, X: np.ndarray, y: np.ndarray):
    binary = (y > 1).astype(np.int64)
    Xf = X.astype(np.float64)
    scaled = lambda m: make_pipeline(StandardScaler(), m)  # noqa: E731
    makers = {
        "tree": lambda: DecisionTreeClassifier(max_depth=10, random_state=0).fit(Xf, y),
        "forest": lambda: RandomForestClassifier(n_estimators=10, max_depth=8, random_state=0).fit(Xf, y),
        "forest_binary": lambda: RandomForestClassifier(n_estimators=10, max_depth=8, random_state=1).fit(Xf, binary),
        "extra_trees": lambda: ExtraTreesClassifier(n_estimators=10, max_depth=8, random_state=0).fit(Xf, y),
        "boosting": lambda: GradientBoostingClassifier(n_estimators=8, max_depth=3, random_state=0).fit(Xf, y),
        "boosting_binary": lambda: GradientBoostingClassifier(n_estimators=20, max_depth=3, random_state=0).fit(
            Xf, binary
        ),
        "isolation": lambda: IsolationForest(n_estimators=30, max_samples=64, random_state=0).fit(Xf),
        "logistic": lambda: scaled(LogisticRegression(max_iter=1000)).fit(Xf, y),
        "logistic_binary": lambda: scaled(LogisticRegression(max_iter=1000)).fit(Xf, binary),
        "ridge": lambda: scaled(RidgeClassifier()).fit(Xf, y),
        "linear_svm": lambda: scaled(LinearSVC()).fit(Xf, binary),
        "mlp": lambda: scaled(MLPClassifier(hidden_layer_sizes=(16,), max_iter=400, random_state=0)).fit(Xf, y),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return makers[kind]()


KINDS = (
    "tree",
    "forest",
    "forest_binary",
    "extra_trees",
    "boosting",
    "boosting_binary",
    "isolation",
    "logistic",
    "logistic_binary",
    "ridge",
    "linear_svm",
    "mlp",
)
EXACT = {"tree", "extra_trees", "isolation"}  # 100% on integer features
SUMS = {"forest", "forest_binary", "boosting", "boosting_binary"}  # >= 99.99%, disagreements listed
LINEAR = {"logistic", "logistic_binary", "ridge", "linear_svm"}  # 100% outside the margin


def decision_values(model, X: np.ndarray) -> np.ndarray:
    """|distance to the decision boundary| of a linear model, per row."""
    d = model.decision_function(X.astype(np.float64))
    if d.ndim == 1:
        return np.abs(d)
    s = np.sort(d, axis=1)
    return s[:, -1] - s[:, -2]
