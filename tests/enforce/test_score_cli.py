"""`xdpml score FILE` in a separate process: a known scikit-learn model over flow records
in JSON lines and Parquet, the rules it would make (table and JSON), `--apply` into the
session's pinned maps through the agent's checks, and one-line errors for bad input."""

import json
import subprocess
import sys
from pathlib import Path

import joblib
import numpy as np
import pytest
from sklearn.tree import DecisionTreeClassifier

pytestmark = pytest.mark.root
XDPML = str(Path(sys.executable).with_name("xdpml"))

# (src, dst, sport, dport, packets, expiration_id); the model flags 50 packets or more
FLOWS = [
    ("10.9.8.1", "10.9.8.99", 4000, 9, 100, 3),  # a flood's early snapshot ...
    ("10.9.8.1", "10.9.8.99", 4000, 9, 140, 0),  # ... and its final record: one rule
    ("10.9.8.1", "10.9.8.98", 4001, 9, 3, 0),  # normal
    ("10.9.8.2", "10.9.8.97", 4002, 53, 70, 0),  # another flood
    ("10.9.8.3", "127.0.0.1", 4003, 80, 90, 0),  # to this host: allowlisted
]


def records():
    for src, dst, sp, dp, pk, exp in FLOWS:
        yield {
            "record": "flow",
            "src_ip": src,
            "dst_ip": dst,
            "src_port": sp,
            "dst_port": dp,
            "protocol": 17,
            "bidirectional_packets": pk,
            "expiration_id": exp,
        }


@pytest.fixture()
def model(tmp_path):
    x = np.array([[1], [2], [3], [10], [49], [50], [60], [100], [1000]], dtype=float)
    y = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1])
    path = tmp_path / "m.joblib"
    joblib.dump(
        {"model": DecisionTreeClassifier(random_state=0).fit(x, y), "feature_names": ["bidirectional_packets"]}, path
    )
    return f"sklearn:{path}"


@pytest.fixture()
def jsonl(tmp_path):
    p = tmp_path / "flows.jsonl"
    lines = [json.dumps(r) for r in records()] + [json.dumps({"record": "window", "packets": 5})]
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def score(*args):
    return subprocess.run([XDPML, "score", *args], capture_output=True, text=True)


EXPECTED = [  # highest score first; equal scores keep file order
    {"src": "10.9.8.1", "dst": "10.9.8.99", "sport": 4000, "dport": 9, "proto": 17, "action": "drop"},
    {"src": "10.9.8.2", "dst": "10.9.8.97", "sport": 4002, "dport": 53, "proto": 17, "action": "drop"},
    {"src": "10.9.8.3", "dst": "127.0.0.1", "sport": 4003, "dport": 80, "proto": 17, "action": "drop"},
]


def test_rules_from_jsonl_as_json_and_table(jsonl, model):
    r = score(jsonl, "--model", model, "--json")
    assert r.returncode == 0, r.stderr
    got = [json.loads(line) for line in r.stdout.splitlines()]
    assert [{k: g[k] for k in EXPECTED[0]} for g in got] == EXPECTED
    assert {g["score"] for g in got} == {1.0} and {g["ttl_s"] for g in got} == {300}
    assert "5 flows scored, 4 flagged, 3 rules" in r.stderr
    t = score(jsonl, "--model", model)
    assert t.returncode == 0, t.stderr
    lines = t.stdout.splitlines()
    assert lines[0].split() == ["SRC", "DST", "SPORT", "DPORT", "PROTO", "ACTION", "TTL", "SCORE"]
    assert [line.split()[:6] for line in lines[1:]] == [
        [e["src"], e["dst"], str(e["sport"]), str(e["dport"]), "17", "drop"] for e in EXPECTED
    ]


def test_parquet_gives_the_same_rules(tmp_path, model):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = list(records())
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "flows.parquet")
    r = score(str(tmp_path / "flows.parquet"), "--model", model, "--json", "--action", "rate-limit")
    assert r.returncode == 0, r.stderr
    got = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(g["src"], g["dst"], g["action"]) for g in got] == [(e["src"], e["dst"], "rate-limit") for e in EXPECTED]


def test_apply_installs_through_the_agents_checks(jsonl, model, enf_dp, table):
    r = score(jsonl, "--model", model, "--apply", "--pin-dir", enf_dp.pin_dir, "--max-rule-ttl", "30")
    assert r.returncode == 0, r.stderr
    result = {tuple(line.split()[:2]): " ".join(line.split()[8:]) for line in r.stdout.splitlines()[1:]}
    assert result[("10.9.8.3", "127.0.0.1")] == "refused: allowlisted"
    assert result[("10.9.8.1", "10.9.8.99")].startswith("installed (slot ")
    assert result[("10.9.8.2", "10.9.8.97")].endswith("mode dry-run)")
    rows = sorted(table.rows(), key=lambda x: x.src)
    assert [(x.src, x.dst, x.src_port, x.dst_port, x.proto, x.action) for x in rows] == [
        ("10.9.8.1", "10.9.8.99", 4000, 9, 17, "drop"),
        ("10.9.8.2", "10.9.8.97", 4002, 53, 17, "drop"),
    ]
    assert all(0 < x.expires_in_s <= 30 for x in rows)  # the policy's 300 s clamped
    # again: both are live already (the rules of the pinned maps are adopted)
    again = score(jsonl, "--model", model, "--apply", "--pin-dir", enf_dp.pin_dir)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("refused: duplicate") == 2 and "installed" not in again.stdout
    assert len(table.rows()) == 2


@pytest.mark.parametrize(
    "content, text",
    [
        ("not json\n", "flows.jsonl:1: not a JSON line"),
        ('{"record": "flow", "src_ip": "10.0.0.1"}\n', "flows.jsonl:1: no dst_ip"),
        ('{"record": "window"}\n', "holds no flow records"),
        (
            '{"src_ip":"10.0.0.300","dst_ip":"10.0.0.2","src_port":1,"dst_port":2,"protocol":6,'
            '"bidirectional_packets":1}\n',
            "src_ip",
        ),
    ],
)
def test_bad_input_is_one_line(tmp_path, model, content, text):
    p = tmp_path / "flows.jsonl"
    p.write_text(content)
    r = score(str(p), "--model", model)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and text in r.stderr, r.stderr


def test_missing_file_and_model_are_one_line(tmp_path, model, jsonl):
    r = score(str(tmp_path / "nope.jsonl"), "--model", model)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "nope.jsonl" in r.stderr
    r = score(jsonl, "--model", f"sklearn:{tmp_path / 'none.joblib'}")
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
