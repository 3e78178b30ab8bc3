"""The verdict policy over real gRPC: exact verdicts for crafted scores across
thresholds and classes, the dry-run switch, safe defaults, bad policy files."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import PacketsModel, batch_with_ids
from test_collector_metrics import scrape
from xdpml.collector.models import Scores, feature_matrix
from xdpml.collector.policy import Policy, Rule, load_policy

from xdpml.errors import ConfigError
from xdpml.obs.telemetry import Telemetry, TelemetrySettings
from xdpml.wire import codec
from xdpml.wire.v1 import collector_pb2 as cpb
from xdpml.wire.v1 import collector_pb2_grpc as cgrpc

ROOT = Path(__file__).resolve().parents[2]
A = cpb  # Action values: A.ACTION_ALERT, ...


class ClassModel:
    """A known classifier: score = bidirectional_packets / 100, class 'flood' for odd
    source ports, 'scan' for even ones."""

    name, version, default_threshold = "cls", "1", 0.5
    feature_names = ("bidirectional_packets", "src_port")

    def score(self, batch):
        x = feature_matrix(batch, self.feature_names)
        return Scores(x[:, 0] / 100.0, np.where(x[:, 1] % 2 == 1, "flood", "scan").astype(object))

    def close(self):
        pass


def crafted(packets, src_ports):
    b = batch_with_ids(len(packets), 0)
    b.columns["bidirectional_packets"] = np.asarray(packets, dtype=np.uint64)
    b.columns["src_port"] = np.asarray(src_ports, dtype=np.uint16)
    return b


def export(srv, batch):
    """One batch over a real Export stream: (ack, VerdictBatch or None)."""
    with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        resp = list(
            cgrpc.CollectorStub(ch).Export(
                iter([cpb.ExportRequest(batch=codec.encode_batch(batch, sequence=7))]), timeout=10
            )
        )
    acks = [r.ack for r in resp if r.HasField("ack")]
    vbs = [r.verdicts for r in resp if r.HasField("verdicts")]
    assert len(acks) == 1 and acks[0].error == "" and len(vbs) <= 1
    return acks[0], (vbs[0] if vbs else None)


def table(vb):
    return [(v.row, round(v.score, 9), v.label, v.action, v.policy_action, v.ttl_seconds) for v in vb.verdicts]


POLICY = """
default: {action: alert, ttl_seconds: 300}
rules:
  - {class: flood, threshold: 0.3, min_confidence: 0.8, action: drop, ttl_seconds: 60}
  - {model: cls, class: scan, threshold: 0.6, action: rate-limit, ttl_seconds: 120}
  - {model: other-model, class: scan, action: drop}
"""


def test_exact_verdicts_across_thresholds_and_classes(collector, tmp_path):
    (tmp_path / "p.yaml").write_text(POLICY)
    policy = load_policy(str(tmp_path / "p.yaml"))
    srv = collector(model=ClassModel(), policy=policy)
    # rows 0-5 flood (odd ports), 6-9 scan (even ports)
    packets = [20, 30, 50, 79, 80, 95, 50, 59, 60, 90]
    ports = [1, 3, 5, 7, 9, 11, 2, 4, 6, 8]
    ack, vb = export(srv, crafted(packets, ports))
    assert ack.rows_accepted == 10
    # Worked out by hand from POLICY: flood flags from 0.3, drops from 0.8, else alerts;
    # scan (model cls) flags and rate-limits from 0.6; the other-model rule never applies.
    assert table(vb) == [
        (1, 0.3, "flood", A.ACTION_ALERT, A.ACTION_ALERT, 60),
        (2, 0.5, "flood", A.ACTION_ALERT, A.ACTION_ALERT, 60),
        (3, 0.79, "flood", A.ACTION_ALERT, A.ACTION_ALERT, 60),
        (4, 0.8, "flood", A.ACTION_DROP, A.ACTION_DROP, 60),
        (5, 0.95, "flood", A.ACTION_DROP, A.ACTION_DROP, 60),
        (8, 0.6, "scan", A.ACTION_RATE_LIMIT, A.ACTION_RATE_LIMIT, 120),
        (9, 0.9, "scan", A.ACTION_RATE_LIMIT, A.ACTION_RATE_LIMIT, 120),
    ]
    assert vb.model.name == "cls" and vb.model.version == "1" and not vb.dry_run
    st = srv.stats()
    assert (st["verdicts_alert"], st["verdicts_drop"], st["verdicts_rate_limit"], st["verdicts_allow"]) == (3, 2, 2, 0)
    assert st["rows_flagged"] == 7


def test_default_policy_only_alerts(collector):
    srv = collector()  # PacketsModel, no policy, no --action: threshold 0.5, ALERT, 300 s
    _, vb = export(srv, crafted([10, 49, 50, 100], [1, 2, 3, 4]))
    assert table(vb) == [
        (2, 0.5, "anomaly", A.ACTION_ALERT, A.ACTION_ALERT, 300),
        (3, 1.0, "anomaly", A.ACTION_ALERT, A.ACTION_ALERT, 300),
    ]
    assert vb.threshold == 0.5 and not vb.dry_run


@pytest.mark.parametrize("dry_run", [False, True])
def test_dry_run_sends_drops_as_alerts_and_counts_by_action(collector, dry_run):
    tel = Telemetry.from_settings(
        TelemetrySettings(service_name="xdpml-collector", prometheus_port=0, prometheus_host="127.0.0.1")
    )
    try:
        policy = Policy(
            Rule(action="drop", threshold=0.4, ttl_seconds=30),
            (Rule(action="rate-limit", cls="anomaly", model="packets", min_confidence=0.9),),
            dry_run,
        )
        from xdpml.collector.server import CollectorServer, CollectorSettings

        srv = CollectorServer(PacketsModel(), [], CollectorSettings(listen="127.0.0.1:0", policy=policy), tel).start()
        try:
            # The model/class rule has no threshold: --threshold / the model's 0.5 applies;
            # rate-limit from 0.9, alert between 0.5 and 0.9.
            _, vb = export(srv, crafted([40, 50, 89, 90, 99], [1, 2, 3, 4, 5]))
        finally:
            srv.stop(1)
        m = scrape(tel.prometheus_port)
    finally:
        tel.shutdown()
    sent_rl = A.ACTION_ALERT if dry_run else A.ACTION_RATE_LIMIT
    assert table(vb) == [
        (1, 0.5, "anomaly", A.ACTION_ALERT, A.ACTION_ALERT, 300),
        (2, 0.89, "anomaly", A.ACTION_ALERT, A.ACTION_ALERT, 300),
        (3, 0.9, "anomaly", sent_rl, A.ACTION_RATE_LIMIT, 300),
        (4, 0.99, "anomaly", sent_rl, A.ACTION_RATE_LIMIT, 300),
    ]
    assert vb.dry_run is dry_run
    dry = "true" if dry_run else "false"
    got = {k[1]: v for k, v in m.items() if k[0] == "xdpml_collector_verdicts_total"}
    want = {"alert": 4} if dry_run else {"alert": 2, "rate-limit": 2}
    assert got == {(("action", a), ("dry_run", dry), ("model", "packets")): float(n) for a, n in want.items()}


BAD = {
    "action: [": "not valid YAML at line 1",
    "- 1\n- 2": "expected a mapping",
    "dry_run: yes please": "dry_run must be true or false",
    "drop_everything: true": "unknown key(s) drop_everything",
    "default: {action: block}": "default: action 'block' is not one of allow, alert, rate-limit, drop",
    "default: {threshold: .nan}": "default: threshold must be a finite number",
    "default: {ttl_seconds: 31536000}": "default: ttl_seconds must be a whole number of seconds from 1 to 86400",
    "default: {ttl_seconds: 0}": "ttl_seconds must be a whole number",
    "default: {model: x}": "default: unknown key(s) model",
    "rules: {class: a}": "rules must be a list",
    "rules: [{action: drop}]": "rules[0]: a rule needs a model or a class",
    "rules: [{class: a}]": "rules[0]: action is required",
    "rules: [{class: a, action: drop, threshold: 0.8, min_confidence: 0.5}]": "min_confidence 0.5 is below",
    "rules: [{class: a, action: drop, ttl: 5}]": "rules[0]: unknown key(s) ttl",
    "rules: [{class: a, action: drop}, {class: a, action: alert}]": "rules[1] has the same model and class",
    "rules: [{class: 7, action: drop}]": "rules[0]: class must be a string",
}


@pytest.mark.parametrize("text", list(BAD))
def test_bad_policy_files_are_one_line_config_errors(tmp_path, text):
    (tmp_path / "p.yaml").write_text(text)
    with pytest.raises(ConfigError) as e:
        load_policy(str(tmp_path / "p.yaml"))
    assert BAD[text] in str(e.value) and "\n" not in str(e.value)


def test_cli_refuses_a_bad_policy_in_one_line(tmp_path):
    (tmp_path / "p.yaml").write_text("rules: [{class: flood, action: nuke}]")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "xdpml",
            "collector",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            str(tmp_path),
            "--policy",
            str(tmp_path / "p.yaml"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert r.stderr == (
        "xdpml collector: p.yaml: rules[0]: action 'nuke' is not one of allow, alert, rate-limit, drop\n"
    )
    r = subprocess.run(
        [sys.executable, "-m", "xdpml", "collector", "--policy", str(tmp_path / "missing.yaml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "cannot read policy file" in r.stderr


def test_flags_override_the_files_default_rule_and_dry_run(tmp_path):
    from xdpml.collector.policy import with_overrides

    (tmp_path / "p.yaml").write_text(
        "dry_run: true\ndefault: {action: drop, ttl_seconds: 30}\nrules: [{class: scan, action: rate-limit}]\n"
    )
    p = load_policy(str(tmp_path / "p.yaml"))
    assert p == Policy(Rule("drop", ttl_seconds=30), (Rule("rate-limit", cls="scan"),), True)
    assert with_overrides(p) == p
    q = with_overrides(p, action="alert", threshold=0.7, ttl_seconds=10, dry_run=False)
    assert q == Policy(Rule("alert", threshold=0.7, ttl_seconds=10), p.rules, False)
    with pytest.raises(ConfigError, match="default rule: ttl_seconds must be"):
        with_overrides(p, ttl_seconds=86401)


def test_cli_runs_a_policy_file_in_dry_run(tmp_path):
    (tmp_path / "p.yaml").write_text("default: {action: drop}\n")
    err = tmp_path / "err"
    with open(err, "w") as f:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "xdpml",
                "collector",
                "--listen",
                "127.0.0.1:0",
                "--state-dir",
                str(tmp_path),
                "--policy",
                str(tmp_path / "p.yaml"),
                "--dry-run",
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=f,
        )
    try:
        # The start line comes after the policy was loaded: wait for it, not for a time.
        for _ in range(600):
            if "listening on port" in err.read_text() or proc.poll() is not None:
                break
            time.sleep(0.05)
        text = err.read_text()
        assert "policy: default drop, ttl 300 s, 0 more rule(s), may suggest drop (DRY RUN: sent as alert)" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
