"""ColumnBatch <-> FeatureBatch: exact round trips, the wire layout, and validation."""

import struct

import numpy as np
import pytest
from xdpml.agent.export.synthetic import flow_batch

from xdpml.wire import codec
from xdpml.wire.columns import ColumnBatch, ColumnSpec, ip_from_str
from xdpml.wire.v1 import feature_batch_pb2 as pb


def _small() -> ColumnBatch:
    cols = {
        "src_ip": np.array([ip_from_str("10.0.0.1"), ip_from_str("2001:db8::7")], dtype="S16"),
        "dst_port": np.array([443, 65535], dtype=np.uint16),
        "protocol": np.array([6, 17], dtype=np.uint8),
        "bidirectional_bytes": np.array([2**40 + 3, 7], dtype=np.uint64),
        "expiration_id": np.array([-1, 2], dtype=np.int8),
        "bps": np.array([1.5, np.nan]),
        "ratio": np.array([0.25, -3.0], dtype=np.float32),
        "src_port_low": np.array([True, False]),
        "interface": np.array(["eth0", "veth1"], dtype=object),
        "splt_ps": np.array([[60, -1, -1], [1500, 40, -1]], dtype=np.int32),
    }
    specs = {
        "bps": ColumnSpec("bps", "f8", unit="bytes/packet", doc="bytes per packet"),
        "splt_ps": ColumnSpec("splt_ps", "i4", unit="bytes", role="sequence", fill=-1),
    }
    return ColumnBatch("flow", cols, specs)


def test_wire_layout_is_raw_little_endian():
    msg = codec.encode_batch(
        _small(),
        sequence=7,
        node=codec.NodeIdentity("node-a", "agent-1", "0.1"),
        loss_counters={"ringbuf_full": 3},
        created_unix_ns=123,
    )
    assert (msg.sequence, msg.rows, msg.kind, msg.node.node_name, msg.created_unix_ns) == (
        7,
        2,
        pb.RECORD_KIND_FLOW,
        "node-a",
        123,
    )
    assert dict(msg.loss_counters) == {"ringbuf_full": 3}
    c = {col.name: col for col in msg.columns}
    assert c["dst_port"].dtype == pb.DATA_TYPE_UINT16 and c["dst_port"].data == struct.pack("<HH", 443, 65535)
    assert c["bidirectional_bytes"].data == struct.pack("<QQ", 2**40 + 3, 7)
    assert c["expiration_id"].data == struct.pack("<bb", -1, 2)
    assert c["ratio"].dtype == pb.DATA_TYPE_FP32 and c["ratio"].data == struct.pack("<ff", 0.25, -3.0)
    assert c["src_port_low"].dtype == pb.DATA_TYPE_BOOL and c["src_port_low"].data == b"\x01\x00"
    assert c["src_ip"].dtype == pb.DATA_TYPE_BYTES and c["src_ip"].width == 16
    assert c["src_ip"].data[:16] == b"\0" * 10 + b"\xff\xff" + bytes([10, 0, 0, 1])
    assert c["interface"].dtype == pb.DATA_TYPE_STRING
    assert list(c["interface"].dictionary) == ["eth0", "veth1"] and c["interface"].data == struct.pack("<ii", 0, 1)
    assert list(c["splt_ps"].shape) == [2, 3]
    assert c["splt_ps"].data == struct.pack("<6i", 60, -1, -1, 1500, 40, -1)
    sch = {s.name: s for s in msg.schema}
    assert sch["bps"].unit == "bytes/packet" and sch["splt_ps"].fill == -1 and not sch["dst_port"].HasField("fill")


def test_round_trip_is_exact():
    b = _small()
    raw = codec.encode_batch(b, sequence=1).SerializeToString()
    d = codec.decode_batch(pb.FeatureBatch.FromString(raw))
    assert d.batch.kind == "flow" and list(d.batch.columns) == list(b.columns)
    for name, col in b.columns.items():
        got = d.batch[name]
        assert got.dtype.kind == col.dtype.kind and got.shape == col.shape, name
        np.testing.assert_array_equal(got, col)
    assert d.batch.specs["splt_ps"].fill == -1 and d.batch.specs["bps"].unit == "bytes/packet"


def test_full_flow_schema_round_trip_and_split_under_limit():
    b = flow_batch(3000, seed=5)
    seq = iter(range(100, 10**6))
    msgs = list(codec.encode_split(b, next_sequence=lambda: next(seq), max_message_bytes=256 * 1024))
    assert len(msgs) > 4
    assert all(m.ByteSize() <= 256 * 1024 for m in msgs)
    assert [m.sequence for m in msgs] == list(range(100, 100 + len(msgs)))
    back = ColumnBatch.concat(
        [codec.decode_batch(pb.FeatureBatch.FromString(m.SerializeToString())).batch for m in msgs]
    )
    assert len(back) == 3000
    for name, col in b.columns.items():
        np.testing.assert_array_equal(back[name], col, err_msg=name)


def test_long_strings_force_smaller_messages():
    n = 40
    names = np.array([f"{i:04d}" + "x" * 20000 for i in range(n)], dtype=object)
    b = ColumnBatch("flow", {"pod": names, "id": np.arange(n, dtype=np.uint32)})
    seq = iter(range(1, 1000))
    msgs = list(codec.encode_split(b, next_sequence=lambda: next(seq), max_message_bytes=100_000))
    assert all(m.ByteSize() <= 100_000 for m in msgs)
    ids = np.concatenate([codec.decode_batch(m).batch["id"] for m in msgs])
    np.testing.assert_array_equal(ids, np.arange(n))


def test_unsupported_column_types():
    with pytest.raises(codec.UnsupportedColumn, match="float16"):
        codec.encode_batch(ColumnBatch("flow", {"x": np.zeros(2, dtype=np.float16)}), sequence=1)
    with pytest.raises(codec.UnsupportedColumn, match="record kind"):
        codec.encode_batch(ColumnBatch("bogus", {"x": np.zeros(2)}), sequence=1)


def _msg() -> pb.FeatureBatch:
    return codec.encode_batch(_small(), sequence=3)


def _col(msg, name):
    return next(c for c in msg.columns if c.name == name)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda m: setattr(_col(m, "dst_port"), "data", b"\x01\x02\x03"), "'dst_port'.*3 bytes"),
        (lambda m: _col(m, "bps").shape.__setitem__(0, 3), "'bps': has 3 rows"),
        (lambda m: setattr(m, "rows", 5), "has 2 rows, the batch has 5"),
        (lambda m: setattr(_col(m, "protocol"), "dtype", 99), "unknown dtype 99"),
        (lambda m: setattr(_col(m, "protocol"), "dtype", 0), "unknown dtype 0"),
        (lambda m: _col(m, "splt_ps").shape.append(2), r"shape \[2, 3, 2\]"),
        (lambda m: setattr(_col(m, "interface"), "data", struct.pack("<ii", 0, 9)), "dictionary code"),
        (lambda m: setattr(_col(m, "src_port_low"), "data", b"\x01\x07"), "BOOL"),
        (lambda m: setattr(_col(m, "src_ip"), "width", 0), "width 0"),
        (lambda m: m.columns.add().CopyFrom(_col(m, "bps")), "appears twice"),
        (lambda m: setattr(m, "kind", 42), "record kind"),
        (lambda m: setattr(m, "rows", codec.MAX_ROWS + 1), "over the limit"),
    ],
)
def test_malformed_batches_raise_clear_errors(mutate, match):
    m = _msg()
    mutate(m)
    with pytest.raises(codec.MalformedBatch, match=match):
        codec.decode_batch(m)


@pytest.mark.parametrize(
    "make",
    [
        _small,
        lambda: flow_batch(700, seed=3),
        lambda: flow_batch(0, seed=1),
        lambda: ColumnBatch("packet", {"x": np.zeros(3, dtype=np.float32)}),
    ],
)
def test_fast_request_bytes_parse_to_the_same_message(make):
    from xdpml.wire.v1 import collector_pb2 as cpb

    b = make()
    kw = dict(
        sequence=300, node=codec.NodeIdentity("n", "a", "1"), loss_counters={"x": 5, "y": 2**40}, created_unix_ns=42
    )
    fast = codec.encode_request_bytes(b, **kw)
    want = cpb.ExportRequest(batch=codec.encode_batch(b, **kw))
    got = cpb.ExportRequest.FromString(fast)
    assert got == want
    assert len(fast) == want.ByteSize()
    back = codec.decode_batch(got.batch).batch
    for name, col in b.columns.items():
        np.testing.assert_array_equal(back[name], col)


def test_split_request_bytes_stay_under_the_limit_and_cover_every_row():
    from xdpml.wire.v1 import collector_pb2 as cpb

    b = flow_batch(2000, seed=8)
    seq = iter(range(7, 10**6))
    parts = list(codec.encode_split_requests(b, next_sequence=lambda: next(seq), max_message_bytes=200_000))
    assert len(parts) > 5 and all(len(p) <= 200_000 for _, _, p in parts)
    msgs = [cpb.ExportRequest.FromString(p).batch for _, _, p in parts]
    assert [m.sequence for m in msgs] == [s for s, _, _ in parts] == list(range(7, 7 + len(parts)))
    assert [m.rows for m in msgs] == [r for _, r, _ in parts]
    back = ColumnBatch.concat([codec.decode_batch(m).batch for m in msgs])
    for name, col in b.columns.items():
        np.testing.assert_array_equal(back[name], col, err_msg=name)
