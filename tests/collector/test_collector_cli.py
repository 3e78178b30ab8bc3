"""`python -m xdpml collector` (what `xdpml collector` runs) as a process: health, reflection,
sinks, the flagged-flow table, graceful shutdown and clear start-up errors."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pyarrow.parquet as pq
from conftest import free_port
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from xdpml.agent.export.grpc_client import ExporterSettings, GrpcExporter
from xdpml.agent.export.synthetic import flow_batch

from xdpml.wire.columns import ip_to_str

ROOT = Path(__file__).resolve().parents[2]


def _run(args, timeout=30):
    return subprocess.run(
        [sys.executable, "-m", "xdpml", "collector", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def _start(args, log: Path):
    f = open(log, "w")
    err = open(str(log) + ".err", "w")
    proc = subprocess.Popen([sys.executable, "-m", "xdpml", "collector", *args], cwd=ROOT, stdout=f, stderr=err)
    f.close()
    err.close()
    end = time.monotonic() + 30
    while "listening on port" not in Path(str(log) + ".err").read_text():
        assert proc.poll() is None and time.monotonic() < end, Path(str(log) + ".err").read_text()
        time.sleep(0.05)
    return proc


def test_full_run_with_embedded_model(tmp_path):
    port = free_port()
    jsonl, parquet, out = tmp_path / "scored.jsonl", tmp_path / "scored.parquet", tmp_path / "out.txt"
    # --learn-from any: live learning from an unauthenticated peer is an explicit choice
    # (the default learns from nobody); --reflection is off by default.
    mport = free_port()
    proc = _start(
        [
            "--listen",
            f"127.0.0.1:{port}",
            "--learn-from",
            "any",
            "--reflection",
            "--metrics-port",
            str(mport),
            "--baseline-rows",
            "2000",
            "--state-dir",
            str(tmp_path / "st"),
            "--jsonl",
            str(jsonl),
            "--parquet",
            str(parquet),
            "--print-flagged",
        ],
        out,
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            h = health_pb2_grpc.HealthStub(ch)
            for service in ("", "xdpml.v1.Collector"):
                assert (
                    h.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
                    == health_pb2.HealthCheckResponse.SERVING
                )
            r = reflection_pb2_grpc.ServerReflectionStub(ch)
            (resp,) = list(
                r.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
            )
            names = {s.name for s in resp.list_services_response.service}
            assert {"xdpml.v1.Collector", "grpc.health.v1.Health"} <= names
        # Metrics bind where gRPC does (loopback here), not every interface: the one
        # listening socket on that port (/proc/net/tcp: address hex, state 0A) is 127.0.0.1.
        rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
        assert [(r[1], r[3]) for r in rows if int(r[1].split(":")[1], 16) == mport and r[3] == "0A"] == [
            (f"0100007F:{mport:04X}", "0A")
        ]
        verdicts = []
        batches = [
            flow_batch(2500, seed=1),
            flow_batch(1000, seed=2),
            flow_batch(50, kind="portscan", seed=3),
            flow_batch(40, kind="synflood", seed=4),
        ]
        with GrpcExporter(
            ExporterSettings(target=f"127.0.0.1:{port}", node_name="node-7", flush_age_s=0.05),
            on_verdicts=verdicts.append,
        ) as ex:
            for b in batches:
                ex.put(b)
                time.sleep(0.2)  # separate messages: the attack rows get their own verdict batch
            end = time.monotonic() + 20
            while ex.stats()["sent_rows"] < 3590 and time.monotonic() < end:
                time.sleep(0.05)
            while ex.stats()["verdicts_received"] < 90 and time.monotonic() < end:
                time.sleep(0.05)
        st = ex.stats()
        assert st["sent_rows"] == 3590
        keys = {(ip_to_str(v.key.src_ip), v.key.dst_port) for vb in verdicts for v in vb.verdicts}
        scan_dst = {(ip_to_str(s), int(p)) for s, p in zip(batches[2]["src_ip"], batches[2]["dst_port"])}
        assert scan_dst <= keys  # every probe of the scan came back as a verdict
        assert all(vb.model.name == "embedded-iforest" for vb in verdicts)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(rows) == 3590
    assert sum(r["label"] == "learning" for r in rows) == 2000 and rows[0]["score"] is None
    assert rows[0]["node_name"] == "node-7" and rows[0]["src_ip"].startswith("10.0.1.")
    attack = [r for r in rows if r["src_ip"].startswith("10.0.9.")]
    assert len(attack) == 90 and all(r["flagged"] and r["label"] == "anomaly" for r in attack)
    parts = sorted(tmp_path.glob("scored-*.parquet"))  # complete files only, renamed into place
    assert parts and not list(tmp_path.glob(".*.tmp"))
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in parts + [jsonl])
    t = pq.read_table(parts)
    assert t.num_rows == 3590
    assert {len(v) for v in t.column("splt_ps").to_pylist()} == {10}
    assert t.schema.field("bidirectional_duration_ms").metadata[b"unit"] == b"ms"
    np.testing.assert_array_equal(t.column("dst_port").to_numpy(), np.concatenate([b["dst_port"] for b in batches]))
    table = out.read_text()
    assert table.splitlines()[0].split()[:4] == ["node", "src", "dst", "proto"]
    assert "10.0.9.66:40000" in table or "10.0.9.66:4000" in table
    assert "anomaly" in table
    assert (tmp_path / "st" / "embedded-iforest.joblib").exists()


def test_start_up_errors_are_clear(tmp_path):
    r = _run(["--model", f"sklearn:{tmp_path / 'missing.joblib'}", "--listen", "127.0.0.1:0"])
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = _run(["--model", "v2:127.0.0.1:1/m?timeout=0.5", "--listen", "127.0.0.1:0"])
    assert r.returncode == 2 and "unreachable" in r.stderr and "Traceback" not in r.stderr
    r = _run(
        ["--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", str(tmp_path / "nope.key"), "--listen", "127.0.0.1:0"]
    )
    assert r.returncode == 2 and "cannot read server certificate" in r.stderr
    r = _run(["--tls-cert", "x.pem"])
    assert r.returncode == 2 and "go together" in r.stderr
    r = _run(["--baseline", str(tmp_path / "nope.joblib"), "--listen", "127.0.0.1:0"])  # pinned, missing
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = _run(["--listen", "256.1.2.3:5000"])
    assert r.returncode == 2 and "cannot listen" in r.stderr and "Traceback" not in r.stderr
    assert "examples:" in _run(["--help"]).stdout


def test_collector_learn_makes_a_baseline_with_provenance_and_never_replaces_it_silently(tmp_path, capsys):
    from sklearn.ensemble import IsolationForest
    from xdpml.agent.export.sinks import JsonLinesSink
    from xdpml.collector.models import EMBEDDED_FEATURES, feature_matrix, load_model

    from xdpml.cli.collector import main as collector_main

    normal = flow_batch(1500, seed=11)
    normal.columns["bps"] = normal["bps"].copy()
    normal.columns["bps"][0] = np.nan  # written as null: learned as 0, never as NaN
    rec = tmp_path / "flows.jsonl"
    sink = JsonLinesSink(str(rec))
    sink.write(normal)
    sink.close()
    first = json.loads(rec.read_text().splitlines()[0])
    with open(rec, "a") as f:  # a row a collector flagged: never learned as normal
        f.write(json.dumps({**first, "bidirectional_packets": 10**9, "flagged": True}) + "\n")
    state = tmp_path / "state"
    assert collector_main(["learn", str(rec), "--state-dir", str(state)]) == 0  # in-process: fast
    path = state / "embedded-iforest.joblib"
    assert path.stat().st_mode & 0o777 == 0o600
    prov = json.loads((state / "embedded-iforest.json").read_text())
    assert prov["rows"] == 1500 and prov["source"] == "collector learn" and prov["inputs"] == [str(rec)]
    assert prov["nonfinite_values_as_zero"] == 1 and prov["skipped_flagged_rows"] == 1
    # The collector loads it; its scores are scikit-learn's on the same rows, fitted independently.
    model = load_model("embedded", state_dir=str(state))
    x = feature_matrix(normal, EMBEDDED_FEATURES, np.float32)
    x[~np.isfinite(x)] = 0
    x = np.log1p(x)
    forest = IsolationForest(n_estimators=50, random_state=0).fit(x)
    probe = flow_batch(200, seed=13)
    xp = np.log1p(feature_matrix(probe, EMBEDDED_FEATURES, np.float32))
    lo, hi = x.min(axis=0), x.max(axis=0)
    excess = ((np.maximum(xp - hi, 0) + np.maximum(lo - xp, 0)) / (hi - lo + 1)).max(axis=1)
    want = -forest.score_samples(xp)
    want = np.where(excess > 0, np.maximum(want, np.minimum(1, 0.5 + excess)), want)
    np.testing.assert_allclose(model.score(probe).score, want, rtol=1e-6)
    assert model.provenance["rows"] == 1500
    # A second run does not replace it without --replace.
    before = path.read_bytes()
    capsys.readouterr()
    assert collector_main(["learn", str(rec), "--state-dir", str(state)]) == 2
    err = capsys.readouterr().err
    assert "holds a baseline already (1500 rows" in err and "--replace" in err
    assert path.read_bytes() == before
    assert collector_main(["learn", str(tmp_path / "missing.jsonl"), "--state-dir", str(tmp_path / "s2")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_careless_listen_addresses_are_refused_in_one_line():
    for listen, why in (
        ("127.0.0.1", "expected HOST:PORT"),
        (":99999", "give the address"),
        ("127.0.0.1:99999", "out of range"),
    ):
        r = _run(["--listen", listen])
        assert r.returncode == 2 and why in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = _run(["--learn-from", "authenticated", "--listen", "127.0.0.1:0"])
    assert r.returncode == 2 and "needs mutual TLS" in r.stderr


def test_learn_from_is_refused_for_a_model_that_does_not_learn(tmp_path, capsys):
    from sklearn.linear_model import LogisticRegression

    from xdpml.cli.collector import main as collector_main

    x = np.array([[0.0], [1.0], [2.0], [3.0]])
    joblib_path = tmp_path / "m.joblib"
    import joblib

    joblib.dump({"model": LogisticRegression().fit(x, [0, 0, 1, 1]), "feature_names": ["bps"]}, joblib_path)
    assert collector_main(["--model", f"sklearn:{joblib_path}", "--learn-from", "any", "--listen", "127.0.0.1:0"]) == 2
    assert "--learn-from is for the embedded model" in capsys.readouterr().err
