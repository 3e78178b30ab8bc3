"""Scored-row sinks: JSON lines, Parquet, the flagged-flow table."""

import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from xdpml.collector.sinks import FlaggedPrinter, JsonlSink, ParquetSink, ScoredBatch, format_flagged_table

from xdpml.errors import OutputError
from xdpml.wire.columns import ColumnBatch, ColumnSpec, ip_from_str


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
    return ScoredBatch(
        ColumnBatch(kind, cols, specs),
        score=np.array([0.7, np.nan]),
        label=np.array(["anomaly", "learning"], dtype=object),
        flagged=np.array([True, False]),
        node_name="node-1",
        agent_id="a1",
        sequence=5,
        model="m",
        model_version="v",
        received_unix_ms=123,
    )


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
    (flows,) = tmp_path.glob("flows-*.parquet")
    (windows,) = tmp_path.glob("flows.window-*.parquet")
    assert sorted(sink.files) == sorted([str(flows), str(windows)])
    t = pq.read_table(flows)
    assert t.num_rows == 4
    assert t.column("src_ip").to_pylist()[:2] == ["10.0.0.0", "2001:db8::1"]
    assert t.column("splt_ps").to_pylist()[1] == [80, 90, 100]
    assert t.column("score").to_pylist()[:2] == [0.7, None]
    assert t.column("interface").to_pylist()[:2] == ["eth0", "eth1"]
    assert str(t.schema.field("dst_port").type) == "uint16"
    assert t.schema.field("bidirectional_duration_ms").metadata[b"unit"] == b"ms"
    assert t.column("bidirectional_min_ps").null_count == 4  # a v1 column the batch lacks
    from xdpml.agent.features import WINDOW_SPECS

    # The window batch carries flow columns: not in the window schema, so not stored.
    assert sink.dropped_columns == {n: 1 for n in _scored().batch.columns if n not in WINDOW_SPECS}
    assert pq.read_table(windows).num_rows == 2
    assert flows.stat().st_mode & 0o777 == 0o600


def test_parquet_schema_is_the_wire_schema_not_the_first_batch(tmp_path):
    """Before: the first batch from anyone fixed the file's schema; later columns it
    lacked were dropped for good."""
    from xdpml.agent.export.synthetic import flow_batch
    from xdpml.agent.features import FLOW_SPECS
    from xdpml.collector.sinks import parquet_schema

    sink = ParquetSink(str(tmp_path / "f.parquet"))
    evil = ColumnBatch(
        "flow",
        {
            "src_port": np.array([1], dtype=np.uint16),
            "evil": np.array([7], dtype=np.uint8),
            "src_label_app": np.array(["web"], dtype=object),
        },
    )
    one = dict(
        score=np.array([np.nan]),
        label=np.array(["x"], dtype=object),
        flagged=np.array([False]),
        node_name="n",
        agent_id="a",
        sequence=1,
        model="m",
        model_version="v",
        received_unix_ms=1,
    )
    sink.write(ScoredBatch(evil, **one))
    good = flow_batch(5, seed=1)
    sink.write(
        ScoredBatch(
            good,
            **{
                **one,
                "score": np.zeros(5),
                "label": np.array(["normal"] * 5, dtype=object),
                "flagged": np.zeros(5, bool),
            },
        )
    )
    sink.close()
    t = pq.read_table(sink.files[0])
    want = parquet_schema("flow")
    assert t.schema.equals(want) and t.schema.metadata[b"xdpml.schema"] == b"xdpml.wire.v1"
    assert [f.metadata for f in t.schema] == [f.metadata for f in want]
    assert set(FLOW_SPECS) <= set(t.column_names) and "evil" not in t.column_names
    np.testing.assert_array_equal(t.column("bidirectional_packets").to_numpy()[1:], good["bidirectional_packets"])
    assert t.column("src_port").to_pylist()[0] == 1 and sink.dropped_columns == {"evil": 1}
    assert t.column("extra_meta").to_pylist()[:2] == [[("src_label_app", "web")], None]


def test_parquet_files_are_complete_while_the_sink_runs_and_rotate(tmp_path):
    # Row groups on every write (flush_s=0) and rotation at every tick (age 0): each
    # write leaves one complete, readable file, and nothing half-written is visible.
    sink = ParquetSink(str(tmp_path / "f.parquet"), max_file_age_s=0, flush_s=0)
    for i in range(3):
        sink.write(_scored())
        assert len(sink.files) == i + 1
        assert pq.read_table(sink.files[-1]).num_rows == 2  # readable while the sink is open
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(os.path.basename(f) for f in sink.files)
    # Size bound: one file per 2-row batch, whatever its age.
    big = ParquetSink(str(tmp_path / "g.parquet"), max_file_bytes=1, flush_s=0)
    big.write(_scored())
    big.write(_scored())
    assert len(big.files) == 2
    big.close()
    sink.close()
    assert len(sink.files) == 3


def test_output_files_are_private_and_unsafe_directories_refused(tmp_path):
    pub = tmp_path / "pub"
    pub.mkdir()
    pub.chmod(0o777)
    for make in (lambda p: JsonlSink(p), lambda p: ParquetSink(p)):
        with pytest.raises(OutputError, match="writable by every user"):
            make(str(pub / "x.out"))
    (tmp_path / "target").write_text("")
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "target")
    with pytest.raises(OutputError, match="symbolic link"):
        JsonlSink(str(tmp_path / "link.jsonl"))
    JsonlSink(str(tmp_path / "new" / "x.jsonl")).close()  # a missing directory is made, 0700
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o700
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="not a directory"):
        JsonlSink(str(tmp_path / "file" / "x.jsonl"))
    old = tmp_path / "old.jsonl"
    old.write_text("")
    old.chmod(0o644)
    JsonlSink(str(old)).close()
    assert old.stat().st_mode & 0o777 == 0o600


def test_flagged_table():
    out = io.StringIO()
    p = FlaggedPrinter(out)
    p.write(_scored())
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["node", "src", "dst", "proto", "pkts", "bytes", "dur_ms", "flags", "score", "label"]
    assert lines[2].split() == [
        "node-1",
        "10.0.0.0:40000",
        "10.0.0.2:22",
        "tcp",
        "2",
        "112",
        "0.2",
        "SAR",
        "0.700",
        "anomaly",
    ]
    assert len(lines) == 3 and p.total == 1
    # Rows from the JSON lines file render the same way (what the demo does).
    text = format_flagged_table(
        [
            {
                "node_name": "n",
                "src_ip": "2001:db8::1",
                "src_port": 1,
                "dst_ip": "::2",
                "dst_port": 2,
                "protocol": 17,
                "score": 0.91,
                "label": "anomaly",
            }
        ],
        header=False,
    )
    assert text.split()[:4] == ["n", "[2001:db8::1]:1", "[::2]:2", "udp"]


def test_wire_schema_table_matches_the_agents_column_specs():
    """collector/wire_schema.py (the collector does not import the agent) stays in step."""
    from xdpml.agent.enrich import metadata_column_names
    from xdpml.agent.features import FLOW_SPECS, PACKET_SPECS, WINDOW_SPECS
    from xdpml.agent.model import DECISION_SPECS
    from xdpml.collector import wire_schema

    for kind, specs, extra in (
        ("flow", FLOW_SPECS, metadata_column_names()),
        ("window", WINDOW_SPECS, ()),
        ("packet", PACKET_SPECS, ()),
        ("decision", DECISION_SPECS, ()),
    ):
        table = wire_schema.V1[kind]
        assert list(table) == list(specs) + list(extra)
        for name, spec in specs.items():
            assert (table[name].dtype, table[name].unit, table[name].role, table[name].doc) == (
                spec.dtype,
                spec.unit,
                spec.role,
                spec.doc,
            )
