"""ColumnBatch <-> xdpml.v1.FeatureBatch, one numpy buffer per column.

Encoding copies each column's memory once into its protobuf ``bytes`` field (raw
little-endian, row-major); decoding wraps each field with :func:`numpy.frombuffer`.
Nothing loops over rows in Python: a batch of 100k flows costs about as much as a
memcpy of its columns. Wire format: docs/wire-format.md.

Decoding trusts nothing: every length, shape, type and dictionary code is checked
against the batch's row count before a column is built, and any violation raises
:class:`MalformedBatch` (the collector turns it into an INVALID_ARGUMENT ack).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from xdpml.wire.columns import ColumnBatch, ColumnSpec
from xdpml.wire.v1 import feature_batch_pb2 as pb

# gRPC's default maximum receive size; every message we send stays below it.
GRPC_DEFAULT_MAX_MESSAGE = 4 * 1024 * 1024
# Headroom for the ExportRequest wrapper and HTTP/2 framing decisions we do not see.
DEFAULT_MAX_MESSAGE_BYTES = GRPC_DEFAULT_MAX_MESSAGE - 64 * 1024
# A batch claiming more rows than this is rejected before any allocation.
MAX_ROWS = 10_000_000
MAX_SEQUENCE_WIDTH = 4096

KINDS = {
    "flow": pb.RECORD_KIND_FLOW,
    "window": pb.RECORD_KIND_WINDOW,
    "packet": pb.RECORD_KIND_PACKET,
    "decision": pb.RECORD_KIND_DECISION,
}
KIND_NAMES = {v: k for k, v in KINDS.items()}

# Fixed-width element types; "<" pins little-endian on any host.
_NUMERIC: dict[pb.DataType, np.dtype] = {
    pb.DATA_TYPE_BOOL: np.dtype("?"),
    pb.DATA_TYPE_UINT8: np.dtype("<u1"),
    pb.DATA_TYPE_UINT16: np.dtype("<u2"),
    pb.DATA_TYPE_UINT32: np.dtype("<u4"),
    pb.DATA_TYPE_UINT64: np.dtype("<u8"),
    pb.DATA_TYPE_INT8: np.dtype("<i1"),
    pb.DATA_TYPE_INT16: np.dtype("<i2"),
    pb.DATA_TYPE_INT32: np.dtype("<i4"),
    pb.DATA_TYPE_INT64: np.dtype("<i8"),
    pb.DATA_TYPE_FP32: np.dtype("<f4"),
    pb.DATA_TYPE_FP64: np.dtype("<f8"),
}
_BY_NUMPY = {(dt.kind, dt.itemsize): code for code, dt in _NUMERIC.items()}
_CODES = np.dtype("<i4")


class MalformedBatch(ValueError):
    """A FeatureBatch violates the wire format; the message names the column and why."""


class UnsupportedColumn(TypeError):
    """A ColumnBatch column has a dtype the wire format cannot carry (e.g. float16)."""


@dataclass(frozen=True)
class NodeIdentity:
    node_name: str = ""
    agent_id: str = ""
    agent_version: str = ""


@dataclass
class DecodedBatch:
    """A decoded FeatureBatch: the rows plus what the envelope says about them."""

    batch: ColumnBatch
    sequence: int
    node: NodeIdentity
    loss_counters: dict[str, int] = field(default_factory=dict)
    created_unix_ns: int = 0
    start_unix_ms: int = 0
    end_unix_ms: int = 0


def wire_dtype(col: np.ndarray) -> pb.DataType:
    """The DataType a numpy column travels as."""
    dt = col.dtype
    if dt.kind == "b":
        return pb.DATA_TYPE_BOOL
    if dt.kind in "uif":
        code = _BY_NUMPY.get((dt.kind, dt.itemsize))
        if code is None:
            raise UnsupportedColumn(f"dtype {dt} has no wire type (use float32/float64 or 8..64-bit ints)")
        return code
    if dt.kind in "SV":
        return pb.DATA_TYPE_BYTES
    if dt.kind in "OU":
        return pb.DATA_TYPE_STRING
    raise UnsupportedColumn(f"dtype {dt} has no wire type")


def _encode_column(name: str, col: np.ndarray, out: pb.Column) -> None:
    if col.ndim not in (1, 2):
        raise UnsupportedColumn(f"column {name!r} has {col.ndim} dimensions; only rows or rows x N travel")
    out.name = name
    code = wire_dtype(col)
    out.dtype = code
    out.shape.extend(col.shape)
    if code == pb.DATA_TYPE_STRING:
        # Vectorized dictionary encoding: np.unique sorts fixed-width unicode in C.
        text = col.astype("U") if col.dtype.kind == "O" else col
        values, codes = np.unique(text.reshape(-1), return_inverse=True)
        out.dictionary.extend(values.tolist())
        out.data = codes.astype(_CODES, copy=False).tobytes()
    elif code == pb.DATA_TYPE_BYTES:
        out.width = col.dtype.itemsize
        out.data = np.ascontiguousarray(col).tobytes()
    else:
        out.data = np.ascontiguousarray(col, dtype=_NUMERIC[code]).tobytes()


def _schema_entry(name: str, code: pb.DataType, spec: ColumnSpec | None, out: pb.ColumnSchema) -> None:
    out.name = name
    out.dtype = code
    if spec is not None:
        out.unit = spec.unit
        out.doc = spec.doc
        out.role = spec.role
        if spec.fill is not None:
            out.fill = float(spec.fill)


def encode_batch(
    batch: ColumnBatch,
    *,
    sequence: int,
    node: NodeIdentity | None = None,
    loss_counters: Mapping[str, int] | None = None,
    include_schema: bool = True,
    created_unix_ns: int | None = None,
    out: pb.FeatureBatch | None = None,
) -> pb.FeatureBatch:
    """One FeatureBatch holding every row of ``batch`` (see :func:`encode_split` for size limits).

    ``out``: an empty FeatureBatch to fill in place, e.g. the ``batch`` field of an
    ExportRequest; copying a finished multi-megabyte message into an envelope costs
    as much as encoding it.
    """
    kind = KINDS.get(batch.kind)
    if kind is None:
        raise UnsupportedColumn(f"record kind {batch.kind!r} is not one of {', '.join(KINDS)}")
    msg = pb.FeatureBatch() if out is None else out
    msg.sequence, msg.kind, msg.rows = sequence, kind, len(batch)
    if node is not None:
        msg.node.node_name = node.node_name
        msg.node.agent_id = node.agent_id
        msg.node.agent_version = node.agent_version
    for name, col in batch.columns.items():
        c = msg.columns.add()
        _encode_column(name, col, c)
        if include_schema:
            _schema_entry(name, c.dtype, batch.specs.get(name), msg.schema.add())
    if loss_counters:
        for k, v in loss_counters.items():
            msg.loss_counters[k] = int(v)
    msg.created_unix_ns = time.time_ns() if created_unix_ns is None else created_unix_ns
    start, end = _time_span(batch)
    msg.start_unix_ms, msg.end_unix_ms = start, end
    return msg


def _time_span(batch: ColumnBatch) -> tuple[int, int]:
    first = batch.columns.get("bidirectional_first_seen_ms")
    last = batch.columns.get("bidirectional_last_seen_ms")
    if first is None or last is None or len(first) == 0:
        return 0, 0
    return int(first.min()), int(last.max())


def encode_split(
    batch: ColumnBatch,
    *,
    next_sequence,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    node: NodeIdentity | None = None,
    loss_counters: Mapping[str, int] | None = None,
    include_schema: bool = True,
    envelope=None,
) -> Iterator:
    """Encode ``batch`` as as many FeatureBatch messages as needed to keep each under
    ``max_message_bytes``; ``next_sequence()`` numbers them.

    With ``envelope`` (a message class with a FeatureBatch field ``batch``, such as
    ExportRequest) it yields envelopes, each filled in place, and the size limit
    applies to the envelope.

    The first guess comes from the fixed bytes per row; a chunk that still comes out
    too large (long strings) is halved until it fits. A single row that cannot fit
    raises UnsupportedColumn rather than sending a message the server must refuse.
    """
    n = len(batch)
    # 1/8 slack for dictionaries, names and schema.
    step = rows_per_message(batch, max_message_bytes)
    start = 0
    while start < n or (n == 0 and start == 0):
        stop = min(n, start + step)
        part = batch if (start == 0 and stop == n) else batch.select(slice(start, stop))
        env = envelope() if envelope is not None else None
        msg = encode_batch(
            part,
            sequence=0,
            node=node,
            loss_counters=loss_counters,
            include_schema=include_schema,
            out=env.batch if env is not None else None,
        )
        size = (env or msg).ByteSize()
        if size > max_message_bytes:
            if stop - start <= 1:
                raise UnsupportedColumn(
                    f"one {batch.kind} row encodes to {size} bytes, over the {max_message_bytes}-byte message limit"
                )
            step = max(1, (stop - start) // 2)
            continue
        msg.sequence = next_sequence()
        yield env if env is not None else msg
        if n == 0:
            return
        start = stop


def rows_per_message(batch: ColumnBatch, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> int:
    """First guess of how many rows of ``batch`` fit one message."""
    return max(1, int(max_message_bytes * 0.875) // max(1, _row_bytes(batch)))


def _row_bytes(batch: ColumnBatch) -> int:
    total = 0
    for col in batch.columns.values():
        width = int(np.prod(col.shape[1:])) if col.ndim > 1 else 1
        total += width * (4 if col.dtype.kind in "OU" else col.dtype.itemsize)
    return total


def _fail(column: str, why: str) -> MalformedBatch:
    return MalformedBatch(f"column {column!r}: {why}")


def decode_column(c: pb.Column, rows: int) -> np.ndarray:
    """One column as a numpy array, validated against the batch's row count."""
    name = c.name or "<unnamed>"
    shape = tuple(c.shape)
    if len(shape) not in (1, 2):
        raise _fail(name, f"shape {list(shape)} must be [rows] or [rows, N]")
    if shape[0] != rows:
        raise _fail(name, f"has {shape[0]} rows, the batch has {rows}")
    if len(shape) == 2 and not 0 <= shape[1] <= MAX_SEQUENCE_WIDTH:
        raise _fail(name, f"sequence width {shape[1]} outside 0..{MAX_SEQUENCE_WIDTH}")
    count = math.prod(shape)
    data = c.data
    if c.dtype in _NUMERIC:
        dt = _NUMERIC[c.dtype]
        if len(data) != count * dt.itemsize:
            raise _fail(
                name,
                f"{len(data)} bytes of data, shape {list(shape)} of "
                f"{pb.DataType.Name(c.dtype)} needs {count * dt.itemsize}",
            )
        if c.dtype == pb.DATA_TYPE_BOOL:
            raw = np.frombuffer(data, dtype=np.uint8)
            if raw.size and raw.max() > 1:
                raise _fail(name, "BOOL elements must be 0 or 1")
            return raw.view(np.bool_).reshape(shape)
        return np.frombuffer(data, dtype=dt).reshape(shape)
    if c.dtype == pb.DATA_TYPE_BYTES:
        if not 1 <= c.width <= 4096:
            raise _fail(name, f"BYTES width {c.width} outside 1..4096")
        if len(data) != count * c.width:
            raise _fail(
                name, f"{len(data)} bytes of data, shape {list(shape)} x width {c.width} needs {count * c.width}"
            )
        return np.frombuffer(data, dtype=f"S{c.width}").reshape(shape)
    if c.dtype == pb.DATA_TYPE_STRING:
        if len(data) != count * 4:
            raise _fail(name, f"{len(data)} bytes of codes, shape {list(shape)} needs {count * 4}")
        codes = np.frombuffer(data, dtype=_CODES)
        if codes.size and (codes.min() < 0 or codes.max() >= len(c.dictionary)):
            raise _fail(name, f"dictionary code outside 0..{len(c.dictionary) - 1}")
        values = np.empty(len(c.dictionary), dtype=object)
        values[:] = list(c.dictionary)
        return values[codes].reshape(shape)
    known = ", ".join(pb.DataType.Name(v) for v in pb.DataType.values() if v)
    raise _fail(name, f"unknown dtype {c.dtype} (known: {known})")


def _numpy_dtype_str(code: pb.DataType, c: pb.Column | None) -> str:
    if code in _NUMERIC:
        return _NUMERIC[code].str.lstrip("<|=")
    if code == pb.DATA_TYPE_BYTES:
        return f"S{c.width if c is not None else 0}"
    return "O"


def decode_batch(msg: pb.FeatureBatch) -> DecodedBatch:
    """Validate and decode; raises MalformedBatch on anything inconsistent."""
    kind = KIND_NAMES.get(msg.kind)
    if kind is None:
        raise MalformedBatch(f"unknown record kind {msg.kind}")
    rows = msg.rows
    if rows > MAX_ROWS:
        raise MalformedBatch(f"{rows} rows is over the limit of {MAX_ROWS}")
    if rows and not msg.columns:
        raise MalformedBatch(f"{rows} rows but no columns")
    columns: dict[str, np.ndarray] = {}
    by_name: dict[str, pb.Column] = {}
    for c in msg.columns:
        if not c.name:
            raise MalformedBatch("a column has no name")
        if c.name in columns:
            raise _fail(c.name, "appears twice")
        columns[c.name] = decode_column(c, rows)
        by_name[c.name] = c
    specs: dict[str, ColumnSpec] = {}
    for s in msg.schema:
        col = by_name.get(s.name)
        specs[s.name] = ColumnSpec(
            name=s.name,
            dtype=_numpy_dtype_str(s.dtype, col),
            unit=s.unit,
            doc=s.doc,
            role=s.role or "feature",
            fill=s.fill if s.HasField("fill") else None,
        )
    node = NodeIdentity(msg.node.node_name, msg.node.agent_id, msg.node.agent_version)
    return DecodedBatch(
        batch=ColumnBatch(kind, columns, specs),
        sequence=msg.sequence,
        node=node,
        loss_counters=dict(msg.loss_counters),
        created_unix_ns=msg.created_unix_ns,
        start_unix_ms=msg.start_unix_ms,
        end_unix_ms=msg.end_unix_ms,
    )


# ---- fast path: ExportRequest wire bytes without intermediate copies ---------------------
#
# encode_batch() copies every column twice (numpy -> bytes -> protobuf field) and
# gRPC serializes the message once more. The exporter instead writes the protobuf wire
# format itself: one b"".join over the envelope, the small fields (serialized by
# protobuf), the column headers and memoryviews of the numpy columns, so each column
# byte is copied once. Protobuf parsers accept fields in any order, so the columns
# (field 5) follow the other fields. tests/export/test_codec.py checks that parsing
# the result gives exactly the message encode_batch() builds.

_LEN, _VARINT = 2, 0


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _tag(field_no: int, wire: int) -> bytes:
    return _varint((field_no << 3) | wire)


_COLUMN_TAG = _tag(5, _LEN)


def _bytes_view(arr: np.ndarray) -> memoryview:
    """The array's memory as flat bytes, no copy (arr must be C-contiguous)."""
    return arr.reshape(-1).view(np.uint8).data


def _column_parts(name: str, col: np.ndarray) -> tuple[list[bytes | memoryview], int]:
    """Wire parts of one Column (without the field-5 tag and length) and their size."""
    if col.ndim not in (1, 2):
        raise UnsupportedColumn(f"column {name!r} has {col.ndim} dimensions; only rows or rows x N travel")
    code = wire_dtype(col)
    head: list[bytes | memoryview] = [
        _tag(1, _LEN),
        _varint(len(name.encode())),
        name.encode(),
        _tag(2, _VARINT),
        _varint(code),
    ]
    shape = b"".join(_varint(int(d)) for d in col.shape)
    head += [_tag(3, _LEN), _varint(len(shape)), shape]
    if code == pb.DATA_TYPE_STRING:
        text = col.astype("U") if col.dtype.kind == "O" else col
        values, codes = np.unique(text.reshape(-1), return_inverse=True)
        data = _bytes_view(codes.astype(_CODES, copy=False))
        for v in values.tolist():
            raw = v.encode()
            head += [_tag(6, _LEN), _varint(len(raw)), raw]
    elif code == pb.DATA_TYPE_BYTES:
        head += [_tag(5, _VARINT), _varint(col.dtype.itemsize)]
        data = _bytes_view(np.ascontiguousarray(col))
    else:
        data = _bytes_view(np.ascontiguousarray(col, dtype=_NUMERIC[code]))
    parts = head
    if data.nbytes:  # proto3 leaves empty bytes out
        parts = head + [_tag(4, _LEN), _varint(data.nbytes), data]
    size = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
    return parts, size


def encode_request_bytes(
    batch: ColumnBatch,
    *,
    sequence: int,
    node: NodeIdentity | None = None,
    loss_counters: Mapping[str, int] | None = None,
    include_schema: bool = True,
    created_unix_ns: int | None = None,
) -> bytes:
    """A serialized xdpml.v1.ExportRequest carrying ``batch``: the same message as
    ``ExportRequest(batch=encode_batch(...))`` with a single copy of the column data."""
    empty = ColumnBatch(batch.kind, {}, {})
    head = encode_batch(
        empty,
        sequence=sequence,
        node=node,
        loss_counters=loss_counters,
        include_schema=False,
        created_unix_ns=created_unix_ns,
    )
    head.rows = len(batch)
    head.start_unix_ms, head.end_unix_ms = _time_span(batch)
    if include_schema:
        for name, col in batch.columns.items():
            _schema_entry(name, wire_dtype(col), batch.specs.get(name), head.schema.add())
    parts = [head.SerializeToString()]
    for name, col in batch.columns.items():
        cparts, size = _column_parts(name, col)
        parts += [_COLUMN_TAG, _varint(size), *cparts]
    total = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
    return b"".join([_tag(1, _LEN), _varint(total), *parts])


def encode_split_requests(
    batch: ColumnBatch,
    *,
    next_sequence,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    node: NodeIdentity | None = None,
    loss_counters: Mapping[str, int] | None = None,
    include_schema: bool = True,
) -> Iterator[tuple[int, int, bytes]]:
    """Like :func:`encode_split` with ExportRequest envelopes, as serialized bytes:
    yields ``(sequence, rows, payload)`` with every payload under ``max_message_bytes``."""
    n = len(batch)
    step = rows_per_message(batch, max_message_bytes)
    start = 0
    while start < n:
        stop = min(n, start + step)
        part = batch if (start == 0 and stop == n) else batch.select(slice(start, stop))
        # Sequence numbers are varints: 10 bytes at most, so measure with the largest.
        payload = encode_request_bytes(
            part, sequence=2**64 - 1, node=node, loss_counters=loss_counters, include_schema=include_schema
        )
        if len(payload) > max_message_bytes:
            if stop - start <= 1:
                raise UnsupportedColumn(
                    f"one {batch.kind} row encodes to {len(payload)} bytes, over the "
                    f"{max_message_bytes}-byte message limit"
                )
            step = max(1, (stop - start) // 2)
            continue
        seq = next_sequence()
        yield (
            seq,
            stop - start,
            encode_request_bytes(
                part, sequence=seq, node=node, loss_counters=loss_counters, include_schema=include_schema
            ),
        )
        start = stop
