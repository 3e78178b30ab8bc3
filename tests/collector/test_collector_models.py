"""Model adapters: embedded Isolation Forest, scikit-learn and ONNX files, errors."""

import pickle
import time

import joblib
import numpy as np
import pytest
from sklearn.ensemble import IsolationForest, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from xdpml.agent.export.synthetic import flow_batch
from xdpml.collector.models import EMBEDDED_FEATURES, EmbeddedIsolationForest, ModelError, feature_matrix, load_model

from xdpml.wire.columns import ColumnBatch

FEATS = ["bidirectional_packets", "bidirectional_bytes", "bps", "dst2src_packets"]


def _training():
    normal, scan = flow_batch(600, seed=1), flow_batch(200, kind="portscan", seed=2)
    x = np.vstack([feature_matrix(normal, FEATS), feature_matrix(scan, FEATS)])
    y = np.r_[np.zeros(600), np.ones(200)]
    return x, y


def test_embedded_learns_a_baseline_then_flags_scans_and_floods(tmp_path):
    m = EmbeddedIsolationForest(state_dir=str(tmp_path), baseline_rows=3000)
    assert m.version == "no-baseline"
    first = m.score(flow_batch(2000, seed=1), learn_from="agent-a")
    assert np.isnan(first.score).all() and set(first.label) == {"learning"}  # still learning
    second = m.score(flow_batch(2000, seed=2), learn_from="agent-b")
    assert np.isnan(second.score[:1000]).all() and not np.isnan(second.score[1000:]).any()
    assert m.trained and (tmp_path / "embedded-iforest.joblib").exists()
    assert m.provenance["agents"] == {"agent-a": 2000, "agent-b": 1000} and m.provenance["rows"] == 3000
    t = m.default_threshold
    normal = m.score(flow_batch(3000, seed=3)).score
    scan = m.score(flow_batch(500, kind="portscan", seed=4)).score
    flood = m.score(flow_batch(500, kind="synflood", seed=5)).score
    assert (scan >= t).mean() > 0.95 and (flood >= t).mean() > 0.95
    assert (normal >= t).mean() < 0.02
    # The same forest the embedded model uses, rebuilt independently: identical scores.
    x = np.log1p(feature_matrix(flow_batch(3000, seed=3), EMBEDDED_FEATURES, np.float32))
    state = joblib.load(tmp_path / "embedded-iforest.joblib")
    forest = -state["model"].score_samples(x)
    # range novelty: distance outside the baseline's per-feature [min, max], over (range + 1)
    lo, hi = (np.asarray(r) for r in state["ranges"])
    base = np.log1p(
        np.concatenate(
            [
                feature_matrix(flow_batch(2000, seed=1), EMBEDDED_FEATURES, np.float32),
                feature_matrix(flow_batch(2000, seed=2), EMBEDDED_FEATURES, np.float32)[:1000],
            ]
        )
    )
    np.testing.assert_allclose(lo, base.min(axis=0), rtol=1e-6)
    np.testing.assert_allclose(hi, base.max(axis=0), rtol=1e-6)
    excess = ((np.maximum(x - hi, 0) + np.maximum(lo - x, 0)) / (hi - lo + 1)).max(axis=1)
    np.testing.assert_allclose(
        normal, np.where(excess > 0, np.maximum(forest, np.minimum(1, 0.5 + excess)), forest), rtol=1e-6
    )
    # A restart loads the baseline instead of learning again.
    again = EmbeddedIsolationForest(state_dir=str(tmp_path), baseline_rows=3000)
    assert again.trained and again.version == m.version
    assert again.provenance["agents"] == {"agent-a": 2000, "agent-b": 1000}
    np.testing.assert_array_equal(again.score(flow_batch(3000, seed=3).select(slice(0, 100))).score, normal[:100])


def test_embedded_refuses_a_corrupt_or_foreign_state_file_instead_of_replacing_it(tmp_path):
    # A learned baseline is never silently replaced: an unusable one stops the start.
    (tmp_path / "embedded-iforest.joblib").write_bytes(b"garbage")
    with pytest.raises(ModelError, match="cannot load baseline .* move it away"):
        EmbeddedIsolationForest(state_dir=str(tmp_path), baseline_rows=100)
    joblib.dump({"model": None, "feature_names": ["other"], "version": "x"}, tmp_path / "embedded-iforest.joblib")
    with pytest.raises(ModelError, match="trained on other features"):
        EmbeddedIsolationForest(state_dir=str(tmp_path), baseline_rows=100)
    assert (tmp_path / "embedded-iforest.joblib").exists()


def test_sklearn_dict_file_scores_with_predict_proba(tmp_path):
    x, y = _training()
    clf = make_pipeline(StandardScaler(), LogisticRegression()).fit(x, y)
    joblib.dump({"model": clf, "feature_names": FEATS}, tmp_path / "m.joblib")
    m = load_model(f"sklearn:{tmp_path / 'm.joblib'}")
    b = flow_batch(300, kind="portscan", seed=9)
    np.testing.assert_allclose(m.score(b).score, clf.predict_proba(feature_matrix(b, FEATS))[:, 1])
    assert m.feature_names == FEATS


def test_sklearn_pickle_with_feature_names_in(tmp_path):
    import pandas as pd

    x, y = _training()
    clf = RandomForestClassifier(n_estimators=10, random_state=0).fit(pd.DataFrame(x, columns=FEATS), y)
    with open(tmp_path / "m.pkl", "wb") as f:
        pickle.dump(clf, f)
    m = load_model(f"sklearn:{tmp_path / 'm.pkl'}")
    b = flow_batch(200, seed=10)
    np.testing.assert_allclose(
        m.score(b).score, clf.predict_proba(pd.DataFrame(feature_matrix(b, FEATS), columns=FEATS))[:, 1]
    )


def test_sklearn_outlier_detector_scores_negated(tmp_path):
    x, _ = _training()
    iso = IsolationForest(n_estimators=20, random_state=0).fit(x)
    joblib.dump({"model": iso, "feature_names": FEATS}, tmp_path / "iso.joblib")
    b = flow_batch(100, seed=11)
    np.testing.assert_allclose(
        load_model(f"sklearn:{tmp_path / 'iso.joblib'}").score(b).score, -iso.score_samples(feature_matrix(b, FEATS))
    )


def test_sklearn_file_errors(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(f"sklearn:{tmp_path / 'nope.joblib'}")
    (tmp_path / "junk.joblib").write_bytes(b"not a model at all")
    with pytest.raises(ModelError, match="cannot load scikit-learn model"):
        load_model(f"sklearn:{tmp_path / 'junk.joblib'}")
    x, y = _training()
    joblib.dump(LogisticRegression().fit(x, y), tmp_path / "nonames.joblib")
    with pytest.raises(ModelError, match="no feature names"):
        load_model(f"sklearn:{tmp_path / 'nonames.joblib'}")
    joblib.dump(
        {"model": LogisticRegression().fit(x, y), "feature_names": FEATS + ["pod_cpu"]}, tmp_path / "extra.joblib"
    )
    m = load_model(f"sklearn:{tmp_path / 'extra.joblib'}")
    with pytest.raises(ModelError, match="pod_cpu"):
        m.score(flow_batch(10))


def test_onnx_model_matches_sklearn(tmp_path):
    from skl2onnx import to_onnx

    x, y = _training()
    clf = LogisticRegression().fit(x, y)
    onx = to_onnx(clf, x[:1].astype(np.float32), options={id(clf): {"zipmap": False}})
    onx.metadata_props.add(key="feature_names", value=",".join(FEATS))
    (tmp_path / "m.onnx").write_bytes(onx.SerializeToString())
    m = load_model(f"onnx:{tmp_path / 'm.onnx'}")
    b = flow_batch(300, kind="portscan", seed=12)
    expect = clf.predict_proba(feature_matrix(b, FEATS).astype(np.float32))[:, 1]
    np.testing.assert_allclose(m.score(b).score, expect, rtol=1e-5, atol=1e-6)
    # Without feature names in the metadata the model cannot be mapped to columns.
    onx2 = to_onnx(clf, x[:1].astype(np.float32), options={id(clf): {"zipmap": False}})
    (tmp_path / "anon.onnx").write_bytes(onx2.SerializeToString())
    with pytest.raises(ModelError, match="feature_names"):
        load_model(f"onnx:{tmp_path / 'anon.onnx'}")
    (tmp_path / "bad.onnx").write_bytes(b"\x00garbage")
    with pytest.raises(ModelError, match="cannot load ONNX model"):
        load_model(f"onnx:{tmp_path / 'bad.onnx'}")


def test_bad_model_specs():
    for spec in ("tensorflow:x", "sklearn:", "v2:localhost/m", "v2:127.0.0.1:1"):
        with pytest.raises(ModelError, match="expected"):
            load_model(spec)
    with pytest.raises(ModelError, match="unknown option"):
        load_model("v2:127.0.0.1:1/m?colour=red")


def test_unreachable_model_server_is_a_clear_error():
    from conftest import free_port

    t = time.monotonic()
    with pytest.raises(ModelError, match="unreachable|did not answer"):
        load_model(f"v2:127.0.0.1:{free_port()}/flows?timeout=1")
    assert time.monotonic() - t < 5


def test_feature_matrix_rejects_non_numeric_columns():
    b = ColumnBatch("flow", {"interface": np.array(["a"], dtype=object)})
    with pytest.raises(ModelError, match="numeric"):
        feature_matrix(b, ["interface"])


def test_embedded_scores_even_when_the_state_dir_is_unwritable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    m = EmbeddedIsolationForest(state_dir=str(blocker / "state"), baseline_rows=500)
    assert np.isnan(m.score(flow_batch(500, seed=1), learn_from="a").score).all()
    assert m.trained and not np.isnan(m.score(flow_batch(50, seed=2)).score).any()
