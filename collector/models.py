"""Models the collector can score flows with, all behind one small interface.

``--model`` chooses one:

=========================  ==========================================================
``embedded`` (default)     Isolation Forest on a baseline the operator chose
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

import contextlib
import logging
import os
import pickle
import threading
import time
import urllib.parse
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from xdpml.errors import ModelError
from xdpml.wire.columns import ColumnBatch

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
        raise ModelError(f"the model needs feature columns the {batch.kind} batch does not have: {', '.join(missing)}")
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
        self.features = [
            None if len(f) == nfeat and np.array_equal(f, np.arange(nfeat)) else np.asarray(f)
            for f in forest.estimators_features_
        ]
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
    """Unsupervised baseline: an Isolation Forest fitted on flows the operator chose.

    Where the baseline comes from (never from whoever connects first):

    * ``baseline_file``: a pinned file (made by ``xdpml collector learn``), loaded
      read-only; the model never learns and never writes.
    * ``state_dir``: ``embedded-iforest.joblib`` there, if present (written by
      ``collector learn`` or by an earlier live learning run). A file that cannot be
      used is an error, never silently replaced by a new baseline.
    * live learning: only rows :meth:`score` receives with ``learn_from`` set (the
      collector sets it for streams of the agents ``--learn-from`` allows) are kept,
      until ``baseline_rows`` of them; then the forest is fitted and saved. Rows from
      other agents, before a baseline exists, are not scored (label ``unscored``).

    Every baseline carries its provenance (who taught it how many rows, when): in the
    state file, in ``embedded-iforest.json`` beside it, in the log and in
    :attr:`provenance`.

    Scores are the anomaly score of Liu et al. (2008), ``2 ** (-E[h(x)] / c(n))`` =
    ``-IsolationForest.score_samples``: about 0.5 or below for ordinary rows, towards
    1 for rows isolated in few splits. Features go through log1p first, because
    packet and byte counts span six orders of magnitude and the forest draws split
    points uniformly between the minimum and maximum. Non-finite feature values
    (NaN, inf) count as 0, so they can neither enter a baseline nor its ranges.

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
    learns = True  # the collector passes learn_from= to score()

    def __init__(
        self,
        *,
        state_dir: str | None,
        baseline_rows: int = 5000,
        features: Sequence[str] = EMBEDDED_FEATURES,
        n_estimators: int = 50,
        seed: int = 0,
        baseline_file: str | None = None,
    ) -> None:
        if baseline_rows < 16:
            raise ModelError("--baseline-rows must be at least 16")
        if not 1 <= n_estimators <= 1000:
            raise ModelError("--trees must be 1..1000")
        self.feature_names = tuple(features)
        self.baseline_rows = baseline_rows
        self.n_estimators = n_estimators
        self.seed = seed
        self.state_dir = None if baseline_file else state_dir
        self.pinned = baseline_file
        self._lock = threading.Lock()
        self._parts: list[np.ndarray] = []
        self._have = 0
        self._teachers: dict[str, int] = {}  # learn_from -> rows taken into the baseline so far
        self._forest = None
        self._ranges: tuple[np.ndarray, np.ndarray] | None = None  # baseline min, max (log1p space)
        self._compiled = None
        self._pool = None
        self.provenance: dict | None = None
        self.version = "no-baseline"
        if baseline_file:
            if not os.path.isfile(baseline_file):
                raise ModelError(
                    f"baseline file {baseline_file!r} does not exist (make one with `xdpml collector learn`)"
                )
            self._load(baseline_file)
        elif state_dir and os.path.exists(self._path()):
            self._load(self._path())

    @property
    def trained(self) -> bool:
        return self._forest is not None

    def _path(self) -> str | None:
        return os.path.join(self.state_dir, EMBEDDED_FILE) if self.state_dir else None

    def _load(self, path: str) -> None:
        import joblib

        hint = "move it away to learn a new baseline" if not self.pinned else "pin another one"
        try:
            state = joblib.load(path)
            feats, forest, version = tuple(state["feature_names"]), state["model"], state["version"]
        except Exception as e:
            raise ModelError(f"cannot load baseline {path!r} ({type(e).__name__}); {hint}") from None
        if feats != self.feature_names:
            raise ModelError(f"baseline {path!r} was trained on other features ({', '.join(feats)}); {hint}")
        if not hasattr(forest, "estimators_"):
            raise ModelError(f"baseline {path!r} holds no fitted forest; {hint}")
        ranges = state.get("ranges")
        if ranges is not None:
            ranges = tuple(np.asarray(r, dtype=np.float32) for r in ranges)
            if not all(np.isfinite(r).all() for r in ranges):
                raise ModelError(f"baseline {path!r} has non-finite feature ranges; {hint}")
        self._forest, self.version, self._ranges = forest, version, ranges
        self.provenance = dict(state.get("provenance") or {"source": "unknown (saved before provenance was kept)"})
        self.provenance["file"] = path
        log.info("loaded baseline %s: %s", path, describe_provenance(self.provenance))

    def fit(self, x: np.ndarray, provenance: dict) -> None:
        """Fit the forest on ``x`` (rows x features, already through :meth:`features_of`)
        and save it with ``provenance``. Refuses when a baseline exists."""
        from sklearn.ensemble import IsolationForest

        if self._forest is not None:
            raise ModelError("this model already has a baseline; it is never replaced in place")
        if len(x) < 16:
            raise ModelError(f"a baseline needs at least 16 rows, got {len(x)}")
        forest = IsolationForest(n_estimators=self.n_estimators, random_state=self.seed).fit(x)
        self.version = f"baseline-{len(x)}-rows"
        self._ranges = (x.min(axis=0), x.max(axis=0))
        self.provenance = {
            **provenance,
            "rows": len(x),
            "features": list(self.feature_names),
            "trees": self.n_estimators,
            "learned_unix": int(time.time()),
            "learned_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        self._forest = forest
        log.info("baseline learned: %s", describe_provenance(self.provenance))
        if self.state_dir:
            try:
                save_baseline(self._path(), forest, self.feature_names, self.version, self._ranges, self.provenance)
                self.provenance["file"] = self._path()
                log.info("baseline saved to %s", self._path())
            except OSError as e:  # scoring goes on; only the restart would have no baseline
                log.warning("baseline learned but not saved to %s: %s", self.state_dir, e)

    def features_of(self, batch: ColumnBatch) -> np.ndarray:
        """The model's input: feature columns, non-finite values as 0, negatives as 0, log1p."""
        x = feature_matrix(batch, self.feature_names, np.float32)
        x[~np.isfinite(x)] = 0
        np.maximum(x, 0, out=x)
        return np.log1p(x, out=x)

    _x = features_of

    def score(self, batch: ColumnBatch, learn_from: str | None = None) -> Scores:
        """Scores; before a baseline exists, rows with ``learn_from`` set (who sent them)
        become the baseline (label ``learning``), others are not scored (``unscored``)."""
        x = self._x(batch)
        forest = self._forest
        if forest is None:
            with self._lock:
                if self._forest is None:
                    if not learn_from or self.pinned:
                        return Scores(np.full(len(x), np.nan), np.full(len(x), "unscored", dtype=object))
                    need = self.baseline_rows - self._have
                    self._parts.append(x[:need])
                    took = min(need, len(x))
                    self._have += took
                    self._teachers[learn_from] = self._teachers.get(learn_from, 0) + took
                    if self._have < self.baseline_rows:
                        return Scores(np.full(len(x), np.nan), np.full(len(x), "learning", dtype=object))
                    self.fit(np.concatenate(self._parts), {"source": "live", "agents": dict(self._teachers)})
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


def describe_provenance(p: dict) -> str:
    """One log line about where a baseline came from."""
    agents = p.get("agents") or {}
    who = ", ".join(f"{k} ({v} rows)" for k, v in sorted(agents.items())) or ", ".join(p.get("nodes") or []) or "-"
    files = p.get("inputs")
    src = p.get("source", "?") + (f" from {', '.join(files)}" if files else "")
    return f"{p.get('rows', '?')} rows, {src}, agents: {who}, at {p.get('learned_at', '?')}"


def save_baseline(path: str, forest, feature_names, version: str, ranges, provenance: dict) -> None:
    """Write the baseline (joblib) and its provenance (JSON beside it), mode 0600,
    atomically: a crash never leaves half a file."""
    import json

    import joblib

    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    state = {
        "model": forest,
        "feature_names": list(feature_names),
        "version": version,
        "ranges": [r.tolist() for r in ranges],
        "provenance": provenance,
    }
    sidecar = os.path.splitext(path)[0] + ".json"
    for target, write in (
        (path, lambda f: joblib.dump(state, f)),
        (sidecar, lambda f: f.write(json.dumps(provenance, indent=1, sort_keys=True).encode())),
    ):
        tmp = f"{target}.tmp.{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # a stale one of ours; O_EXCL below refuses anything put there meanwhile
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


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
            raise ModelError(
                f"{path!r}: no feature names; save {{'model': m, 'feature_names': [...]}} "
                "or fit the model on a DataFrame"
            )
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
        if len(inputs) == 1 and ((len(inputs[0].shape) == 2 and inputs[0].shape[1] != 1) or "feature_names" in meta):
            names = meta.get("feature_names")
            if not names:
                raise ModelError(
                    f"{path!r} has one matrix input; store the column names in its metadata as feature_names=a,b,c"
                )
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


def load_model(
    spec: str,
    *,
    state_dir: str | None = None,
    baseline_rows: int = 5000,
    features: Sequence[str] | None = None,
    trees: int = 50,
    baseline_file: str | None = None,
) -> Model:
    """Build the model named by a ``--model`` value (see the module docstring)."""
    if spec in ("", "embedded"):
        return EmbeddedIsolationForest(
            state_dir=state_dir,
            baseline_rows=baseline_rows,
            features=features or EMBEDDED_FEATURES,
            n_estimators=trees,
            baseline_file=baseline_file,
        )
    if baseline_file:
        raise ModelError("--baseline is for the embedded model only")
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
        return V2Model(
            addr,
            model,
            version=opts.get("version", ""),
            output=opts.get("output", ""),
            features=feats,
            timeout_s=float(opts.get("timeout", 10)),
        )
    raise ModelError(f"--model {spec!r}: expected embedded, sklearn:PATH, onnx:PATH or v2:HOST:PORT/MODEL")
