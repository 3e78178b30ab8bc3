"""Malformed and oversized batches get an error status; the collector keeps serving."""

import grpc
import numpy as np
import pytest
from conftest import batch_with_ids

from xdpml.wire import codec
from xdpml.wire.v1 import collector_pb2 as cpb
from xdpml.wire.v1 import collector_pb2_grpc as cgrpc
from xdpml.wire.v1 import feature_batch_pb2 as pb


def _good(seq: int, n: int = 10) -> cpb.ExportRequest:
    return cpb.ExportRequest(batch=codec.encode_batch(batch_with_ids(n, seq * 1000), sequence=seq))


def _bad_length(seq):
    r = _good(seq)
    r.batch.columns[0].data = r.batch.columns[0].data[:-1]
    return r


def _bad_type(seq):
    r = _good(seq)
    r.batch.columns[3].dtype = 77
    return r


def _bad_shape(seq):
    r = _good(seq)
    r.batch.columns[5].shape[:] = [10, 2, 2]
    return r


def _no_kind(seq):
    r = _good(seq)
    r.batch.kind = pb.RECORD_KIND_UNSPECIFIED
    return r


def test_each_bad_batch_gets_an_error_ack_and_the_stream_goes_on(collector):
    srv = collector()
    with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        stub = cgrpc.CollectorStub(ch)
        reqs = [_good(1), _bad_length(2), _bad_type(3), _bad_shape(4), _no_kind(5), _good(6)]
        acks = [r.ack for r in stub.Export(iter(reqs), timeout=10) if r.HasField("ack")]
    assert [a.sequence for a in acks] == [1, 2, 3, 4, 5, 6]
    assert [a.rows_accepted for a in acks] == [10, 0, 0, 0, 0, 10]
    assert [a.error_code for a in acks] == [0, 3, 3, 3, 3, 0]  # INVALID_ARGUMENT
    assert "bytes of data" in acks[1].error and "unknown dtype 77" in acks[2].error
    assert "shape [10, 2, 2]" in acks[3].error and "record kind" in acks[4].error
    assert srv.stats()["batches_rejected"] == 4 and srv.stats()["rows_received"] == 20


def test_missing_model_features_get_failed_precondition(collector):
    srv = collector()
    b = batch_with_ids(5, 0)
    del b.columns["bidirectional_packets"]
    with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        (resp,) = list(
            cgrpc.CollectorStub(ch).Export(
                iter([cpb.ExportRequest(batch=codec.encode_batch(b, sequence=9))]), timeout=10
            )
        )
    assert resp.ack.error_code == 9 and "bidirectional_packets" in resp.ack.error


def test_oversized_message_is_refused_with_a_status(collector):
    srv = collector(max_message_bytes=200_000)
    big = _good(1, n=2000)
    assert big.ByteSize() > 200_000
    with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        with pytest.raises(grpc.RpcError) as e:
            list(cgrpc.CollectorStub(ch).Export(iter([big]), timeout=10))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Still alive and serving the next stream.
        acks = list(cgrpc.CollectorStub(ch).Export(iter([_good(2)]), timeout=10))
    assert acks[0].ack.rows_accepted == 10


def test_garbage_bytes_are_refused_with_a_status(collector):
    srv = collector()
    with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        raw = ch.stream_stream(
            "/xdpml.v1.Collector/Export",
            request_serializer=lambda b: b,
            response_deserializer=cpb.ExportResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as e:
            list(raw(iter([b"\xff\xff\xff\xff not a protobuf"]), timeout=10))
        assert e.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT)
        acks = list(cgrpc.CollectorStub(ch).Export(iter([_good(3)]), timeout=10))
    assert acks[0].ack.rows_accepted == 10


class BrokenModel:
    name, version, default_threshold, feature_names = "broken", "0", 0.5, ()

    def score(self, batch):
        raise ZeroDivisionError("bug in the model")

    def close(self):
        pass


def test_a_failing_model_costs_the_batch_not_the_stream(collector):
    srv = collector(model=BrokenModel())
    with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        acks = [r.ack for r in cgrpc.CollectorStub(ch).Export(iter([_good(1), _good(2)]), timeout=10)]
    assert [(a.sequence, a.error_code) for a in acks] == [(1, 13), (2, 13)]
    assert "ZeroDivisionError" in acks[0].error


def test_verdict_keys_keep_every_address_byte(collector):
    from xdpml.wire.columns import ip_from_str

    b = batch_with_ids(3, 0)
    b.columns["src_ip"] = np.array([ip_from_str(a) for a in ("10.0.0.0", "2001:db8::", "10.1.2.3")], dtype="S16")
    b.columns["bidirectional_packets"] = np.array([99, 99, 1], dtype=np.uint64)  # rows 0, 1 flagged
    srv = collector()
    with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        resp = list(
            cgrpc.CollectorStub(ch).Export(
                iter([cpb.ExportRequest(batch=codec.encode_batch(b, sequence=1))]), timeout=10
            )
        )
    (vb,) = [r.verdicts for r in resp if r.HasField("verdicts")]
    assert [v.row for v in vb.verdicts] == [0, 1]
    assert [v.key.src_ip for v in vb.verdicts] == [ip_from_str("10.0.0.0"), ip_from_str("2001:db8::")]
    assert all(len(v.key.dst_ip) == 16 for v in vb.verdicts)
    assert [v.key.dst_port for v in vb.verdicts] == b["dst_port"][:2].tolist()
    assert [round(v.score, 6) for v in vb.verdicts] == [0.99, 0.99] and vb.threshold == 0.5
