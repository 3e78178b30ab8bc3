"""Where scored rows go: JSON lines, Parquet, a readable table of flagged flows.

Every sink receives a :class:`ScoredBatch` (the decoded rows plus score, label and
flag per row) and is called under the collector's sink lock, one batch at a time,
so sinks need no locking of their own.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Protocol, TextIO

import numpy as np

from xdpml.wire.columns import ColumnBatch, ip_to_str, to_python_list


@dataclass
class ScoredBatch:
    batch: ColumnBatch
    score: np.ndarray  # float64; NaN = not scored (embedded model still learning)
    label: np.ndarray  # object array of str
    flagged: np.ndarray  # bool
    node_name: str
    agent_id: str
    sequence: int
    model: str
    model_version: str
    received_unix_ms: int


class Sink(Protocol):
    def write(self, scored: ScoredBatch) -> None: ...

    def close(self) -> None: ...


EXTRA_FIELDS = ("score", "label", "flagged", "node_name", "agent_id", "batch_sequence", "model",
                "model_version", "received_unix_ms")


def _extra(scored: ScoredBatch) -> dict[str, list]:
    n = len(scored.batch)
    score = scored.score.astype(object)
    score[np.isnan(scored.score)] = None
    return {
        "score": score.tolist(),
        "label": scored.label.tolist(),
        "flagged": scored.flagged.tolist(),
        "node_name": [scored.node_name] * n,
        "agent_id": [scored.agent_id] * n,
        "batch_sequence": [scored.sequence] * n,
        "model": [scored.model] * n,
        "model_version": [scored.model_version] * n,
        "received_unix_ms": [scored.received_unix_ms] * n,
    }


def _finite(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


class JsonlSink:
    """One JSON object per row: every column (IPs as text, sequences as lists) plus
    score, label, flagged, node_name, agent_id, batch_sequence, model, model_version,
    received_unix_ms. ``path`` "-" writes to stdout."""

    def __init__(self, path: str) -> None:
        self._own = path != "-"
        self._f: TextIO = open(path, "a", encoding="utf-8") if self._own else sys.stdout

    def write(self, scored: ScoredBatch) -> None:
        extra = _extra(scored)
        lines = []
        for i, row in enumerate(scored.batch.rows()):
            for k, v in extra.items():
                row[k] = v[i]
            try:
                lines.append(json.dumps(row, separators=(",", ":"), allow_nan=False))
            except ValueError:  # an infinite statistic: JSON has no Infinity, write null
                lines.append(json.dumps(_finite(row), separators=(",", ":"), allow_nan=False))
        if lines:
            self._f.write("\n".join(lines) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._own:
            self._f.close()


class ParquetSink:
    """Scored rows as Parquet, one file per record kind (flows to ``path``, other kinds
    to ``<stem>.<kind>.parquet``). Column types follow the wire types; IP columns
    become text, sequences fixed-size lists; units and docs go into field metadata.
    The file's schema is set by the first batch: later columns it lacks are dropped,
    columns missing from a later batch are written as nulls. A Parquet file is only
    readable once closed: the collector closes it on shutdown."""

    def __init__(self, path: str) -> None:
        import pyarrow  # noqa: F401  (fail at start-up, not at the first batch)

        self.path = path
        self._writers: dict[str, tuple] = {}

    def _path_for(self, kind: str) -> str:
        if kind == "flow":
            return self.path
        stem, ext = os.path.splitext(self.path)
        return f"{stem}.{kind}{ext or '.parquet'}"

    @staticmethod
    def _array(name: str, col: np.ndarray):
        import pyarrow as pa

        if col.dtype.kind == "S" and col.dtype.itemsize == 16 and name.endswith("_ip"):
            return pa.array([ip_to_str(v) for v in col], pa.string())
        if col.dtype.kind == "S":
            return pa.array(col.tolist(), pa.binary(col.dtype.itemsize))
        if col.dtype.kind in "OU":
            return pa.array(col.tolist(), pa.string())
        if col.ndim == 2:
            return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(col).reshape(-1)), col.shape[1])
        return pa.array(col)

    def write(self, scored: ScoredBatch) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        b = scored.batch
        arrays = {name: self._array(name, col) for name, col in b.columns.items()}
        extra = _extra(scored)
        arrays["score"] = pa.array(scored.score, pa.float64(), mask=np.isnan(scored.score))
        arrays["label"] = pa.array(extra["label"], pa.string())
        arrays["flagged"] = pa.array(scored.flagged)
        for k in ("node_name", "agent_id", "model", "model_version"):
            arrays[k] = pa.array(extra[k], pa.string())
        arrays["batch_sequence"] = pa.array(extra["batch_sequence"], pa.uint64())
        arrays["received_unix_ms"] = pa.array(extra["received_unix_ms"], pa.uint64())
        entry = self._writers.get(b.kind)
        if entry is None:
            fields = []
            for name, arr in arrays.items():
                spec = b.specs.get(name)
                meta = {"unit": spec.unit, "doc": spec.doc, "role": spec.role} if spec else None
                fields.append(pa.field(name, arr.type, metadata=meta))
            schema = pa.schema(fields)
            entry = (pq.ParquetWriter(self._path_for(b.kind), schema), schema)
            self._writers[b.kind] = entry
        writer, schema = entry
        cols = [arrays[f.name] if f.name in arrays and arrays[f.name].type == f.type
                else pa.nulls(len(b), f.type) for f in schema]
        writer.write_table(pa.Table.from_arrays(cols, schema=schema))

    def close(self) -> None:
        for writer, _ in self._writers.values():
            writer.close()
        self._writers.clear()


# ---- readable table of flagged flows ---------------------------------------------------

TABLE_COLUMNS = (("node", 12), ("src", 22), ("dst", 22), ("proto", 5), ("pkts", 6), ("bytes", 8),
                 ("dur_ms", 8), ("flags", 8), ("score", 6), ("label", 8))
_PROTO = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmp6"}
_FLAG_NAMES = (("S", 0x02), ("A", 0x10), ("F", 0x01), ("R", 0x04), ("P", 0x08), ("U", 0x20), ("E", 0x40), ("C", 0x80))


def _endpoint(ip, port) -> str:
    text = ip_to_str(ip) if isinstance(ip, (bytes, np.bytes_)) else str(ip)
    if ":" in text:
        text = f"[{text}]"
    return f"{text}:{port}" if port not in (None, "") else text


def flagged_rows(scored: ScoredBatch) -> list[dict]:
    """The flagged rows of a batch as plain dicts with the fields the table shows."""
    idx = np.flatnonzero(scored.flagged)
    if len(idx) == 0:
        return []
    b = scored.batch

    def col(name, default=None):
        c = b.columns.get(name)
        return to_python_list(c[idx]) if c is not None else [default] * len(idx)

    fields = {k: col(k) for k in ("src_ip", "dst_ip", "src_port", "dst_port", "protocol", "bidirectional_packets",
                                  "bidirectional_bytes", "bidirectional_duration_ms", "tcp_flags")}
    out = []
    for j, i in enumerate(idx):
        row = {k: v[j] for k, v in fields.items()}
        row.update(node=scored.node_name, score=float(scored.score[i]), label=str(scored.label[i]))
        out.append(row)
    return out


def format_flagged_table(rows: list[dict], *, header: bool = True) -> str:
    """Fixed-width text table of flagged flows (as :func:`flagged_rows` returns them)."""
    lines = []
    if header:
        lines.append(" ".join(name.ljust(w) for name, w in TABLE_COLUMNS).rstrip())
        lines.append(" ".join("-" * w for _, w in TABLE_COLUMNS))
    for r in rows:
        flags = r.get("tcp_flags")
        flag_text = "".join(c for c, bit in _FLAG_NAMES if flags and int(flags) & bit) if flags is not None else ""
        dur = r.get("bidirectional_duration_ms")
        cells = [
            str(r.get("node", r.get("node_name", "")))[:12],
            _endpoint(r.get("src_ip", ""), r.get("src_port")),
            _endpoint(r.get("dst_ip", ""), r.get("dst_port")),
            _PROTO.get(r.get("protocol"), str(r.get("protocol", ""))),
            str(r.get("bidirectional_packets", "")),
            str(r.get("bidirectional_bytes", "")),
            "" if dur is None or (isinstance(dur, float) and math.isnan(dur)) else f"{dur:.1f}",
            flag_text,
            f"{r['score']:.3f}",
            str(r.get("label", "")),
        ]
        lines.append(" ".join(c.ljust(w) for c, (_, w) in zip(cells, TABLE_COLUMNS)).rstrip())
    return "\n".join(lines)


class FlaggedPrinter:
    """Prints flagged rows as a table while the collector runs (``--print-flagged``)."""

    def __init__(self, out: TextIO | None = None, *, max_rows_per_batch: int = 20) -> None:
        self.out = out or sys.stdout
        self.max_rows = max_rows_per_batch
        self._header = True
        self.total = 0

    def write(self, scored: ScoredBatch) -> None:
        rows = flagged_rows(scored)
        if not rows:
            return
        self.total += len(rows)
        shown = rows[: self.max_rows]
        text = format_flagged_table(shown, header=self._header)
        self._header = False
        if len(rows) > len(shown):
            text += f"\n... and {len(rows) - len(shown)} more flagged rows in batch {scored.sequence}"
        self.out.write(text + "\n")
        self.out.flush()

    def close(self) -> None:
        pass


def now_ms() -> int:
    return time.time_ns() // 1_000_000
