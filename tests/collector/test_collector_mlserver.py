"""A real MLServer (its own venv, made by scripts/install.sh --test) serving a model
trained here: the collector's scores equal scikit-learn's predictions."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import grpc
import joblib
import numpy as np
import pandas as pd
import pytest
import xdpml.collector.v2
from conftest import free_port
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from xdpml.agent.export.grpc_client import ExporterSettings, GrpcExporter
from xdpml.agent.export.synthetic import flow_batch
from xdpml.collector.models import ModelError, load_model
from xdpml.collector.server import CollectorServer, CollectorSettings

from xdpml.wire.v1 import open_inference_pb2 as ipb
from xdpml.wire.v1 import open_inference_pb2_grpc as igrpc

ROOT = Path(__file__).resolve().parents[2]
MLSERVER = Path(os.environ.get("XDPML_MLSERVER_VENV", ROOT / ".venv-mlserver")) / "bin" / "mlserver"
FEATS = ["bidirectional_packets", "dst2src_packets", "bidirectional_bytes", "bps", "bidirectional_rst_packets"]
V2_TYPES = {"u8": "UINT64", "u4": "UINT32", "f8": "FP64"}


def _frame(batch):
    return pd.DataFrame({f: batch[f] for f in FEATS})


@pytest.fixture(scope="module")
def mlserver(tmp_path_factory):
    assert MLSERVER.exists(), f"{MLSERVER} missing: run scripts/install.sh --test"
    d = tmp_path_factory.mktemp("mlserver")
    normal, scan = flow_batch(800, seed=1), flow_batch(300, kind="portscan", seed=2)
    x = pd.concat([_frame(normal), _frame(scan)], ignore_index=True)
    y = np.r_[np.zeros(800), np.ones(300)]
    clf = make_pipeline(StandardScaler(), LogisticRegression()).fit(x, y)
    joblib.dump(clf, d / "model.joblib")
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    (d / "settings.json").write_text(
        json.dumps(
            {
                "host": "127.0.0.1",
                "http_port": http_port,
                "grpc_port": grpc_port,
                "metrics_port": metrics_port,
                "parallel_workers": 0,
                "debug": False,
            }
        )
    )
    (d / "model-settings.json").write_text(
        json.dumps(
            {
                "name": "flows",
                "implementation": "mlserver_sklearn.SKLearnModel",
                "parameters": {"uri": "./model.joblib", "version": "v1"},
                "inputs": [{"name": f, "datatype": V2_TYPES[normal[f].dtype.str[1:]], "shape": [-1]} for f in FEATS],
            }
        )
    )
    log = open(d / "mlserver.log", "w")
    proc = subprocess.Popen(
        [str(MLSERVER), "start", str(d)], cwd=d, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
            stub = igrpc.GRPCInferenceServiceStub(ch)
            end = time.monotonic() + 90
            while True:
                assert proc.poll() is None, (d / "mlserver.log").read_text()[-3000:]
                try:
                    if stub.ModelReady(ipb.ModelReadyRequest(name="flows"), timeout=1).ready:
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < end, (
                    "MLServer not ready in 90 s:\n" + (d / "mlserver.log").read_text()[-3000:]
                )
                time.sleep(0.3)
        yield f"127.0.0.1:{grpc_port}", clf
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


class ScoreSink:
    def __init__(self):
        self.parts = []

    def write(self, scored):
        self.parts.append((scored.batch["row_id"].copy(), scored.score.copy()))

    def close(self):
        pass


def test_collector_scores_equal_sklearn_predictions(mlserver, monkeypatch):
    addr, clf = mlserver
    # Small requests, so one batch is forwarded as several concurrent ModelInfer calls.
    monkeypatch.setattr(xdpml.collector.v2, "MAX_REQUEST_BYTES", 20_000)
    model = load_model(f"v2:{addr}/flows?output=predict_proba")
    assert model.feature_names == FEATS  # from the server's model metadata
    batches = [
        flow_batch(1500, seed=21),
        flow_batch(400, kind="portscan", seed=22),
        flow_batch(400, kind="synflood", seed=23),
    ]
    ids = 0
    for b in batches:
        b.columns["row_id"] = np.arange(ids, ids + len(b), dtype=np.uint64)
        ids += len(b)
    sink = ScoreSink()
    with CollectorServer(model, [sink], CollectorSettings(listen="127.0.0.1:0")) as srv:
        with GrpcExporter(ExporterSettings(target=f"127.0.0.1:{srv.port}", flush_rows=10**6, flush_age_s=0.05)) as ex:
            for b in batches:
                ex.put(b)
            end = time.monotonic() + 30
            while ex.stats()["sent_rows"] + ex.stats()["dropped_rows"] < ids and time.monotonic() < end:
                time.sleep(0.05)
        assert ex.stats()["sent_rows"] == ids, ex.stats()
    got = np.empty(ids)
    for rid, score in sink.parts:
        got[rid.astype(np.int64)] = score
    want = np.concatenate([clf.predict_proba(_frame(b))[:, 1] for b in batches])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert (want[1500:] > 0.5).all() or (want[1500:1900] > 0.5).all()


def test_predict_output_and_missing_model(mlserver):
    addr, clf = mlserver
    m = load_model(f"v2:{addr}/flows?output=predict")
    b = flow_batch(200, kind="portscan", seed=31)
    np.testing.assert_array_equal(m.score(b).score, clf.predict(_frame(b)))
    with pytest.raises(ModelError, match="no model|not ready"):
        load_model(f"v2:{addr}/no-such-model?timeout=5")
    del b.columns["bps"]
    with pytest.raises(ModelError, match="bps"):
        m.score(b)
    m.close()
