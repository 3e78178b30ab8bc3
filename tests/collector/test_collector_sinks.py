"""Scored-row sinks: JSON lines, Parquet, the flagged-flow table."""
import io
import json

import numpy as np
import pyarrow.parquet as pq

from xdpml.wire.columns import ColumnBatch, ColumnSpec, ip_from_str
from xdpml.collector.sinks import FlaggedPrinter, JsonlSink, ParquetSink, ScoredBatch, format_flagged_table


def _scored(kind="flow"):
    cols = {
        "src_ip": np.array([ip_from_str("10.0.0.0"), ip_from_str("2001:db8::1")], dtype="S16"),
        "dst_ip": np.array([ip_from_str("10.0.0.2"), ip_from_str("2001:db8::2")], dtype="S16"),
        "src_port": np.array([40000, 5353], dtype=np.uint16),
        "dst_port": np.array([22, 53], dtype=np.uint16),
        "protocol": np.array([6, 17], dtype=np.uint8),
        "bidirectional_packets": np.array([2, 7], dtype=np.uint64),
        "bidirectional_bytes": np.array([112, 900], dtype=np.uint64),
        "bidirectional_duration_ms": np.array([0.25, np.nan]),
        "pps": np.array([np.inf, 3.0]),
        "tcp_flags": np.array([0x16, 0], dtype=np.uint8),
        "interface": np.array(["eth0", "eth1"], dtype=object),
        "splt_ps": np.array([[60, 54, -1], [80, 90, 100]], dtype=np.int32),
    }
    specs = {"bidirectional_duration_ms": ColumnSpec("bidirectional_duration_ms", "f8", unit="ms", doc="duration")}
    return ScoredBatch(ColumnBatch(kind, cols, specs), score=np.array([0.7, np.nan]),
                       label=np.array(["anomaly", "learning"], dtype=object), flagged=np.array([True, False]),
                       node_name="node-1", agent_id="a1", sequence=5, model="m", model_version="v",
                       received_unix_ms=123)


def test_jsonl_rows(tmp_path):
    sink = JsonlSink(str(tmp_path / "x.jsonl"))
    sink.write(_scored())
    sink.close()
    rows = [json.loads(line) for line in (tmp_path / "x.jsonl").read_text().splitlines()]
    assert rows[0]["src_ip"] == "10.0.0.0" and rows[1]["src_ip"] == "2001:db8::1"
    assert rows[0]["pps"] is None and rows[1]["bidirectional_duration_ms"] is None  # inf and NaN -> null
    assert rows[0]["score"] == 0.7 and rows[1]["score"] is None and rows[1]["label"] == "learning"
    assert rows[0]["splt_ps"] == [60, 54, -1] and rows[0]["flagged"] is True
    assert (rows[0]["node_name"], rows[0]["batch_sequence"], rows[0]["model_version"]) == ("node-1", 5, "v")


def test_parquet_types_metadata_and_kinds(tmp_path):
    sink = ParquetSink(str(tmp_path / "flows.parquet"))
    sink.write(_scored())
    sink.write(_scored())
    sink.write(_scored("window"))
    sink.close()
    t = pq.read_table(tmp_path / "flows.parquet")
    assert t.num_rows == 4
    assert t.column("src_ip").to_pylist()[:2] == ["10.0.0.0", "2001:db8::1"]
    assert t.column("splt_ps").to_pylist()[1] == [80, 90, 100]
    assert t.column("score").to_pylist()[:2] == [0.7, None]
    assert str(t.schema.field("dst_port").type) == "uint16"
    assert t.schema.field("bidirectional_duration_ms").metadata[b"unit"] == b"ms"
    assert pq.read_table(tmp_path / "flows.window.parquet").num_rows == 2


def test_flagged_table():
    out = io.StringIO()
    p = FlaggedPrinter(out)
    p.write(_scored())
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["node", "src", "dst", "proto", "pkts", "bytes", "dur_ms", "flags", "score", "label"]
    assert lines[2].split() == ["node-1", "10.0.0.0:40000", "10.0.0.2:22", "tcp", "2", "112", "0.2", "SAR",
                                "0.700", "anomaly"]
    assert len(lines) == 3 and p.total == 1
    # Rows from the JSON lines file render the same way (what the demo does).
    text = format_flagged_table([{"node_name": "n", "src_ip": "2001:db8::1", "src_port": 1, "dst_ip": "::2",
                                  "dst_port": 2, "protocol": 17, "score": 0.91, "label": "anomaly"}], header=False)
    assert text.split()[:4] == ["n", "[2001:db8::1]:1", "[::2]:2", "udp"]
