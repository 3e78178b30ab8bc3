"""Models the collector can score flows with, all behind one small interface.

``--model`` chooses one:

=========================  ==========================================================
``embedded`` (default)     Isolation Forest learning a baseline from the first rows
``sklearn:PATH``           joblib/pickle of a scikit-learn estimator or pipeline
``onnx:PATH``              an ONNX model run by onnxruntime
``v2:HOST:PORT/MODEL``     a V2 / Open Inference Protocol gRPC server (MLServer, Triton,
                           KServe); options after ``?``: ``version``, ``output``,
                           ``features`` (comma list), ``timeout``
=========================  ==========================================================

Every model returns one float score per row; a row is flagged when its score is at
or above the threshold. Models raise :class:`ModelError` with a message meant for
the operator (missing feature columns, unreadable files, unreachable servers).
"""
from __future__ import annotations

import logging
import os
import pickle
import threading
import urllib.parse
import warnings
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from xdpml.wire.columns import ColumnBatch
from xdpml.errors import ModelError

log = logging.getLogger(__name__)


@dataclass
class Scores:
    """Model output for one batch. ``score`` is NaN for rows not scored (baseline phase)."""

    score: np.ndarray  # float64, one per row
    label: np.ndarray | None = None  # object array of str, or None (derived from the threshold)


class Model(Protocol):
    """What the collector needs from a model."""

    name: str
    version: str
    feature_names: Sequence[str]
    default_threshold: float

    def score(self, batch: ColumnBatch) -> Scores: ...

    def close(self) -> None: ...


def feature_matrix(batch: ColumnBatch, names: Sequence[str], dtype=np.float64) -> np.ndarray:
    """Rows x features, in ``names`` order; ModelError naming every missing column."""
    missing = [n for n in names if n not in batch.columns]
    if missing:
        raise ModelError(f"the model needs feature columns the {batch.kind} batch does not have: "
                         f"{', '.join(missing)}")
    bad = [n for n in names if batch.columns[n].ndim != 1 or batch.columns[n].dtype.kind not in "biuf"]
    if bad:
        raise ModelError(f"feature columns must be numeric scalars; not: {', '.join(bad)}")
    out = np.empty((len(batch), len(names)), dtype=dtype)
    for j, n in enumerate(names):
        out[:, j] = batch.columns[n]
    return out


# ---- embedded Isolation Forest --------------------------------------------------------

# Why these: a SYN flood flow is one SYN with no answer (1 packet, no dst2src packets,
# no ACK); a port-scan probe is a SYN answered by RST (2 packets, no PSH/FIN, ~0 ms);
# normal TCP carries a handshake, data (PSH) and a FIN close over many packets, and
# UDP/ICMP pairs carry no TCP flags at all. Packet/byte counts per direction, the
# flag counts and bytes-per-packet separate those shapes; ports, addresses and times
# are left out because they identify hosts rather than behaviour.
EMBEDDED_FEATURES = (
    "bidirectional_packets",
    "bidirectional_bytes",
    "bidirectional_duration_ms",
    "src2dst_packets",
    "dst2src_packets",
    "dst2src_bytes",
    "bidirectional_syn_packets",
    "bidirectional_ack_packets",
    "bidirectional_psh_packets",
    "bidirectional_rst_packets",
    "bidirectional_fin_packets",
    "bps",
)
EMBEDDED_FILE = "embedded-iforest.joblib"
PARALLEL_MIN_ROWS = 2048  # below this, threads cost more than they save


def _average_path_length(n: np.ndarray) -> np.ndarray:
    """c(n) of Liu et al.: the mean path length of an unsuccessful BST search in n points."""
    n = np.asarray(n, dtype=np.float64)
    out = np.zeros_like(n)
    out[n == 2] = 1.0
    big = n > 2
    out[big] = 2.0 * (np.log(n[big] - 1.0) + np.euler_gamma) - 2.0 * (n[big] - 1.0) / n[big]
    return out


class _CompiledForest:
    """Scores a fitted IsolationForest with the same arithmetic as ``-score_samples``,
    minus scikit-learn's per-call machinery (input checks, a joblib task per tree,
    a lock per tree), which costs ~1 us per row on batches of a few thousand rows.

    Per tree it precomputes, for every node, ``edges from the root + c(samples in the
    node)``: the path length a row ending in that leaf contributes. Scoring is then
    ``tree_.apply`` (scikit-learn's compiled traversal, which releases the GIL) and one
    table lookup per tree; trees are shared out over threads.
    """

    def __init__(self, forest) -> None:
        self.trees = [e.tree_ for e in forest.estimators_]
        nfeat = forest.n_features_in_
        self.features = [None if len(f) == nfeat and np.array_equal(f, np.arange(nfeat)) else np.asarray(f)
                         for f in forest.estimators_features_]
        self.values = [self._leaf_values(t) for t in self.trees]
        self.denominator = len(self.trees) * float(_average_path_length([forest.max_samples_])[0])

    @staticmethod
    def _leaf_values(tree) -> np.ndarray:
        depth = np.zeros(tree.node_count, dtype=np.float64)
        left, right = tree.children_left, tree.children_right
        for node in range(tree.node_count):  # parents come before children in sklearn's arrays
            if left[node] >= 0:
                depth[left[node]] = depth[right[node]] = depth[node] + 1
        return depth + _average_path_length(tree.n_node_samples)

    def _depths(self, x: np.ndarray, lo: int, hi: int) -> np.ndarray:
        total = np.zeros(len(x), dtype=np.float64)
        for t in range(lo, hi):
            xs = x if self.features[t] is None else np.ascontiguousarray(x[:, self.features[t]])
            total += self.values[t][self.trees[t].apply(xs)]
        return total

    def score(self, x: np.ndarray, pool=None, workers: int = 1) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        n = len(self.trees)
        if pool is None or workers <= 1:
            depths = self._depths(x, 0, n)
        else:
            bounds = np.linspace(0, n, workers + 1).astype(int)
            depths = sum(pool.map(lambda b: self._depths(x, *b), zip(bounds[:-1], bounds[1:])))
        return 2.0 ** (-depths / self.denominator)


def range_excess(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Per row, the largest distance outside [lo, hi] over the features, in units of
    (hi - lo + 1): 0 for rows inside every range."""
    span = (hi - lo + 1.0).astype(np.float32)
    out = np.maximum(x - hi, 0) + np.maximum(lo - x, 0)
    return (out / span).max(axis=1).astype(np.float64) if x.shape[1] else np.zeros(len(x))


class EmbeddedIsolationForest:
    """Unsupervised baseline: the first ``baseline_rows`` flows train an Isolation Forest.

    Scores are the anomaly score of Liu et al. (2008), ``2 ** (-E[h(x)] / c(n))`` =
    ``-IsolationForest.score_samples``: about 0.5 or below for ordinary rows, towards
    1 for rows isolated in few splits. Features go through log1p first, because
    packet and byte counts span six orders of magnitude and the forest draws split
    points uniformly between the minimum and maximum. The fitted model is saved in
    ``state_dir`` and loaded on the next start, so a restart does not re-learn.

    Range novelty: a forest never splits on a feature that was constant in the
    baseline (say, RST counts when no connection was ever refused), so it cannot
    see behaviour the baseline never showed. The score is therefore
    ``max(forest score, 0.5 + excess)`` (capped at 1) for rows with ``excess > 0``,
    where ``excess`` is how far the row lies
    outside the baseline's [min, max] of any feature, in log1p units divided by
    (range + 1). Rows inside every baseline range score as the forest says; a count
    of 1 where the baseline only ever had 0 scores ~1.19 (capped at 1).
    """

    name = "embedded-iforest"
    default_threshold = 0.65

    def __init__(self, *, state_dir: str | None, baseline_rows: int = 5000, features: Sequence[str] = EMBEDDED_FEATURES,
                 n_estimators: int = 50, seed: int = 0) -> None:
        if baseline_rows < 16:
            raise ModelError("--baseline-rows must be at least 16")
        if not 1 <= n_estimators <= 1000:
            raise ModelError("--trees must be 1..1000")
        self.feature_names = tuple(features)
        self.baseline_rows = baseline_rows
        self.n_estimators = n_estimators
        self.seed = seed
        self.state_dir = state_dir
        self._lock = threading.Lock()
        self._parts: list[np.ndarray] = []
        self._have = 0
        self._forest = None
        self._ranges: tuple[np.ndarray, np.ndarray] | None = None  # baseline min, max (log1p space)
        self._compiled = None
        self._pool = None
        self.version = "learning"
        if state_dir:
            self._load()

    @property
    def trained(self) -> bool:
        return self._forest is not None

    def _path(self) -> str | None:
        return os.path.join(self.state_dir, EMBEDDED_FILE) if self.state_dir else None

    def _load(self) -> None:
        import joblib

        path = self._path()
        if not os.path.exists(path):
            return
        try:
            state = joblib.load(path)
            if tuple(state["feature_names"]) != self.feature_names:
                log.warning("baseline %s was trained on other features; learning a new one", path)
                return
            self._forest, self.version = state["model"], state["version"]
            if "ranges" in state:
                self._ranges = tuple(np.asarray(r, dtype=np.float32) for r in state["ranges"])
            log.info("loaded baseline %s (%s)", path, self.version)
        except Exception as e:  # a corrupt state file must not stop the collector
            log.warning("cannot load baseline %s (%s); learning a new one", path, e)

    def _fit(self, x: np.ndarray) -> None:
        from sklearn.ensemble import IsolationForest

        forest = IsolationForest(n_estimators=self.n_estimators, random_state=self.seed).fit(x)
        self.version = f"baseline-{len(x)}-rows"
        self._ranges = (x.min(axis=0), x.max(axis=0))
        self._forest = forest
        if self.state_dir:
            import joblib

            try:
                os.makedirs(self.state_dir, exist_ok=True)
                tmp = self._path() + ".tmp"
                joblib.dump({"model": forest, "feature_names": list(self.feature_names), "version": self.version,
                             "ranges": [r.tolist() for r in self._ranges]}, tmp)
                os.replace(tmp, self._path())  # atomic: a crash never leaves half a file
                log.info("baseline learned from %d rows, saved to %s", len(x), self._path())
            except OSError as e:  # scoring goes on; only the restart would re-learn
                log.warning("baseline learned from %d rows but not saved to %s: %s", len(x), self.state_dir, e)

    def _x(self, batch: ColumnBatch) -> np.ndarray:
        x = feature_matrix(batch, self.feature_names, np.float32)
        np.maximum(x, 0, out=x)
        return np.log1p(x, out=x)

    def score(self, batch: ColumnBatch) -> Scores:
        x = self._x(batch)
        forest = self._forest
        if forest is None:
            with self._lock:
                if self._forest is None:
                    need = self.baseline_rows - self._have
                    self._parts.append(x[:need])
                    self._have += min(need, len(x))
                    if self._have < self.baseline_rows:
                        return Scores(np.full(len(x), np.nan))
                    self._fit(np.concatenate(self._parts))
                    self._parts = []
                    # Rows of this batch that completed the baseline are not scored:
                    # they are the baseline.
                    out = np.full(len(x), np.nan)
                    if need < len(x):
                        out[need:] = self._score_rows(self._forest, x[need:])
                    return Scores(out)
                forest = self._forest
        return Scores(self._score_rows(forest, x))

    def _score_rows(self, forest, x: np.ndarray) -> np.ndarray:
        if self._compiled is None or self._compiled[0] is not forest:
            self._compiled = (forest, _CompiledForest(forest))
        # Trees are walked without the GIL: big batches use all cores (one agent
        # stream would otherwise use only one).
        workers = min(os.cpu_count() or 1, len(x) // PARALLEL_MIN_ROWS)
        if workers > 1 and self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(os.cpu_count(), thread_name_prefix="xdpml-score")
        score = self._compiled[1].score(x, self._pool, workers)
        if self._ranges is not None:
            excess = range_excess(x, *self._ranges)
            np.maximum(score, np.where(excess > 0, np.minimum(1.0, 0.5 + excess), 0.0), out=score)
        return score

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)


# ---- scikit-learn file ----------------------------------------------------------------

def _score_estimator(est, x) -> np.ndarray:
    """Higher = more suspicious: P(last class), else -score_samples, else predict()."""
    if hasattr(est, "predict_proba"):
        return np.asarray(est.predict_proba(x), dtype=np.float64)[:, -1]
    if hasattr(est, "score_samples"):
        return -np.asarray(est.score_samples(x), dtype=np.float64)
    return np.asarray(est.predict(x), dtype=np.float64).reshape(len(x), -1)[:, -1]


class SklearnFileModel:
    """A fitted estimator saved with joblib or pickle.

    The file holds either ``{"model": estimator, "feature_names": [...]}`` (what seeds
    002 and 004 save) or an estimator fitted on a DataFrame (``feature_names_in_``).
    Scores: the probability of the last class for classifiers (class 1 of a binary
    one), ``-score_samples`` for outlier detectors, else ``predict()``.
    """

    default_threshold = 0.5

    def __init__(self, path: str) -> None:
        import joblib

        if not os.path.isfile(path):
            raise ModelError(f"scikit-learn model file {path!r} does not exist")
        try:
            obj = joblib.load(path)
        except Exception as e:
            try:
                with open(path, "rb") as f:
                    obj = pickle.load(f)
            except Exception:
                raise ModelError(f"cannot load scikit-learn model {path!r}: {type(e).__name__}: {e}") from None
        names = None
        if isinstance(obj, dict):
            if "model" not in obj:
                raise ModelError(f"{path!r} holds a dict without a 'model' key")
            est, names = obj["model"], obj.get("feature_names")
        else:
            est = obj
        if names is None:
            names = getattr(est, "feature_names_in_", None)
        if names is None:
            raise ModelError(f"{path!r}: no feature names; save {{'model': m, 'feature_names': [...]}} "
                             "or fit the model on a DataFrame")
        if not (hasattr(est, "predict") or hasattr(est, "score_samples")):
            raise ModelError(f"{path!r} holds a {type(est).__name__}, not a fitted estimator")
        self._est = est
        self.feature_names = [str(n) for n in names]
        self.name = os.path.basename(path)
        self.version = f"{type(est).__name__}@{int(os.path.getmtime(path))}"
        self._frame = hasattr(est, "feature_names_in_")

    def score(self, batch: ColumnBatch) -> Scores:
        x = feature_matrix(batch, self.feature_names)
        try:
            if self._frame:
                try:
                    import pandas as pd
                except ImportError:  # not a dependency: numpy works unless the pipeline selects by name
                    pd = None
                if pd is not None:
                    # Fitted on a DataFrame: hand it one, so sklearn's column checks pass.
                    x = pd.DataFrame(x, columns=self.feature_names)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="X does not have valid feature names")
                return Scores(_score_estimator(self._est, x))
        except Exception as e:
            raise ModelError(f"model {self.name} failed to score: {type(e).__name__}: {e}") from None

    def close(self) -> None:
        pass


# ---- ONNX -----------------------------------------------------------------------------

class OnnxModel:
    """An ONNX model: one float input [rows, features] whose feature names are in the
    model's metadata (``feature_names``, comma separated), or one [rows, 1] input per
    feature, named after it. Score: the last column of a ``probabilities`` output
    when present (classifiers), else the first output."""

    default_threshold = 0.5

    def __init__(self, path: str) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise ModelError("ONNX models need onnxruntime: pip install 'xdpml[onnx]'") from None
        if not os.path.isfile(path):
            raise ModelError(f"ONNX model file {path!r} does not exist")
        try:
            self._sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ModelError(f"cannot load ONNX model {path!r}: {e}") from None
        inputs = self._sess.get_inputs()
        meta = self._sess.get_modelmeta().custom_metadata_map
        self._inputs = inputs
        if len(inputs) == 1 and (len(inputs[0].shape) == 2 and inputs[0].shape[1] != 1 or "feature_names" in meta):
            names = meta.get("feature_names")
            if not names:
                raise ModelError(f"{path!r} has one matrix input; store the column names in its metadata "
                                 "as feature_names=a,b,c")
            self.feature_names = [n.strip() for n in names.split(",")]
            self._matrix = True
        else:
            self.feature_names = [i.name for i in inputs]
            self._matrix = False
        self._in_types = {i.name: ("float64" if "double" in i.type else "float32") for i in inputs}
        outs = [o.name for o in self._sess.get_outputs()]
        self._out = "probabilities" if "probabilities" in outs else outs[0]
        self.name = os.path.basename(path)
        self.version = meta.get("version", "") or str(self._sess.get_modelmeta().version)

    def score(self, batch: ColumnBatch) -> Scores:
        try:
            if self._matrix:
                name = self._inputs[0].name
                feeds = {name: feature_matrix(batch, self.feature_names, self._in_types[name])}
            else:
                x = feature_matrix(batch, self.feature_names)
                feeds = {n: x[:, [j]].astype(self._in_types[n]) for j, n in enumerate(self.feature_names)}
            (y,) = self._sess.run([self._out], feeds)
        except ModelError:
            raise
        except Exception as e:
            raise ModelError(f"ONNX model {self.name} failed: {e}") from None
        y = np.asarray(y, dtype=np.float64).reshape(len(batch), -1)
        return Scores(y[:, -1])

    def close(self) -> None:
        pass


# ---- model spec -------------------------------------------------------------------------

def load_model(spec: str, *, state_dir: str | None = None, baseline_rows: int = 5000,
               features: Sequence[str] | None = None, trees: int = 50) -> Model:
    """Build the model named by a ``--model`` value (see the module docstring)."""
    if spec in ("", "embedded"):
        return EmbeddedIsolationForest(state_dir=state_dir, baseline_rows=baseline_rows,
                                       features=features or EMBEDDED_FEATURES, n_estimators=trees)
    kind, _, rest = spec.partition(":")
    if kind == "sklearn" and rest:
        return SklearnFileModel(rest)
    if kind == "onnx" and rest:
        return OnnxModel(rest)
    if kind == "v2" and rest:
        from xdpml.collector.v2 import V2Model

        hostport, _, query = rest.partition("?")
        addr, _, model = hostport.partition("/")
        if not model or ":" not in addr:
            raise ModelError(f"--model {spec!r}: expected v2:HOST:PORT/MODEL")
        opts = {k: v[-1] for k, v in urllib.parse.parse_qs(query).items()}
        unknown = set(opts) - {"version", "output", "features", "timeout"}
        if unknown:
            raise ModelError(f"--model {spec!r}: unknown option(s) {', '.join(sorted(unknown))}")
        feats = opts["features"].split(",") if "features" in opts else features
        return V2Model(addr, model, version=opts.get("version", ""), output=opts.get("output", ""),
                       features=feats, timeout_s=float(opts.get("timeout", 10)))
    raise ModelError(f"--model {spec!r}: expected embedded, sklearn:PATH, onnx:PATH or v2:HOST:PORT/MODEL")
