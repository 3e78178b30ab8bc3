"""ONNX input (xdpml/models/onnx_trees.py): sklearn-onnx TreeEnsembleClassifier files
compile to the same kernel tables, and the packed slot's walk (the kernel's arithmetic,
xdpml.models.reference; tests/models/test_kernel.py ties it to the kernel) gives the
class onnxruntime gives, on 20,000 integer feature vectors per model: decision trees
and random forests, binary and multiclass, thresholds stored as float32 in the file."""

import numpy as np
import pytest
from sklearn.ensemble import ExtraTreesClassifier, RandomForestClassifier
from sklearn.tree import DecisionTreeClassifier

from xdpml.errors import ModelError
from xdpml.models import layout as L
from xdpml.models.cli_commands import compile_file
from xdpml.models.reference import predict_index

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
skl2onnx = pytest.importorskip("skl2onnx")

NAMES = ["dst_port", "ip_ttl", "tcp_window_size", "ip_total_length"]
HIGH = [65535, 255, 65535, 65535]
LIM = L.Limits(trees=16, depth=12, nodes=4096, leaf_values=8192)


def data(n, seed):
    rng = np.random.default_rng(seed)
    X = np.stack([rng.integers(0, h + 1, n) for h in HIGH], axis=1).astype(np.int64)
    # labels with structure the trees can learn, plus noise
    y = (X[:, 0] > 30000).astype(int) + (X[:, 1] < 64) + ((X[:, 2] % 1000) > 700)
    flip = rng.random(n) < 0.1
    y[flip] = rng.integers(0, 4, flip.sum())
    return X, y


def to_file(est, path, n_features):
    from skl2onnx import to_onnx

    m = to_onnx(est, np.zeros((1, n_features), np.float32), options={id(est): {"zipmap": False}})
    path.write_bytes(m.SerializeToString())
    return str(path)


def ort_labels(path, X):
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: X.astype(np.float32)})[0]


@pytest.mark.parametrize(
    "make,classes",
    [
        (lambda: DecisionTreeClassifier(max_depth=10, random_state=0), 4),
        (lambda: DecisionTreeClassifier(max_depth=8, random_state=0), 2),
        (lambda: RandomForestClassifier(n_estimators=8, max_depth=6, random_state=0), 4),
        (lambda: RandomForestClassifier(n_estimators=10, max_depth=6, random_state=0), 2),
        (lambda: ExtraTreesClassifier(n_estimators=6, max_depth=7, random_state=0), 3),
    ],
)
def test_onnx_trees_classify_as_onnxruntime(tmp_path, make, classes):
    X, y = data(4000, 1)
    y = np.minimum(y, classes - 1)
    est = make().fit(X.astype(np.float32), y)
    path = to_file(est, tmp_path / "m.onnx", len(NAMES))
    c = compile_file(path, NAMES, LIM)
    Xt, _ = data(20000, 2)
    want = ort_labels(path, Xt)
    got = c.label(predict_index(c.pack(LIM), Xt, LIM))
    bad = np.flatnonzero(np.asarray(got) != want)
    assert len(bad) == 0, f"{len(bad)} of {len(Xt)} differ: {[(Xt[i].tolist(), got[i], want[i]) for i in bad[:5]]}"
    assert len(set(want.tolist())) == classes
    assert c.n_trees == len(getattr(est, "estimators_", [est]))


def test_onnx_refusals(tmp_path):
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression

    X, y = data(500, 3)
    lr = to_file(LogisticRegression(max_iter=200).fit(X.astype(np.float32), y), tmp_path / "lr.onnx", len(NAMES))
    with pytest.raises(ModelError, match="TreeEnsembleClassifier"):
        compile_file(lr, NAMES, LIM)
    gb = GradientBoostingClassifier(n_estimators=3, max_depth=2).fit(X.astype(np.float32), (y > 1).astype(int))
    with pytest.raises(ModelError, match="post_transform|base_values"):
        compile_file(to_file(gb, tmp_path / "gb.onnx", len(NAMES)), NAMES, LIM)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelError, match="cannot read"):
        compile_file(str(tmp_path / "junk.onnx"), NAMES, LIM)
    dt = to_file(DecisionTreeClassifier(max_depth=3).fit(X.astype(np.float32), y), tmp_path / "dt.onnx", len(NAMES))
    with pytest.raises(ModelError, match="takes 4 features"):
        compile_file(dt, NAMES[:2], LIM)
