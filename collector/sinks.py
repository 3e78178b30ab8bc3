"""Where scored rows go: JSON lines, Parquet, a readable table of flagged flows.

Every sink receives a :class:`ScoredBatch` (the decoded rows plus score, label and
flag per row) and is called under the collector's sink lock, one batch at a time,
so sinks need no locking of their own.
"""

from __future__ import annotations

import json
import math
import os
import stat
import sys
import time
from dataclasses import dataclass
from typing import Protocol, TextIO

import numpy as np

from xdpml.errors import OutputError, describe_os_error
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


EXTRA_FIELDS = (
    "score",
    "label",
    "flagged",
    "node_name",
    "agent_id",
    "batch_sequence",
    "model",
    "model_version",
    "received_unix_ms",
)


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


def check_output_path(path: str) -> None:
    """Refuse an output file another local user could replace or read: its directory
    (created 0700 when missing) must not be writable by others (no /tmp), and the file
    must not be a symlink."""
    d = os.path.dirname(os.path.abspath(path))
    try:
        if not os.path.lexists(d):
            os.makedirs(d, mode=0o700)
        st = os.stat(d)
    except OSError as e:
        raise OutputError(describe_os_error(e, f"output directory {d}")) from None
    if not stat.S_ISDIR(st.st_mode):
        raise OutputError(f"output directory {d} is not a directory")
    if st.st_mode & stat.S_IWOTH:
        raise OutputError(
            f"refusing to write {path}: its directory {d} is writable by every user (any of them "
            "could replace the file); use a directory only you can write to"
        )
    if os.path.islink(path):
        raise OutputError(f"refusing to write {path}: it is a symbolic link")


def open_private(path: str, flags: int) -> int:
    """os.open with mode 0600, no symlink following; an existing file we own becomes 0600."""
    check_output_path(path)
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise OutputError(describe_os_error(e, f"cannot open {path}")) from None
    try:
        if os.fstat(fd).st_uid == os.geteuid():
            os.fchmod(fd, 0o600)
    except OSError:
        os.close(fd)
        raise
    return fd


class JsonlSink:
    """One JSON object per row: every column (IPs as text, sequences as lists) plus
    score, label, flagged, node_name, agent_id, batch_sequence, model, model_version,
    received_unix_ms. ``path`` "-" writes to stdout. The file is mode 0600."""

    def __init__(self, path: str) -> None:
        self._own = path != "-"
        if self._own:
            fd = open_private(path, os.O_WRONLY | os.O_APPEND)
            self._f: TextIO = os.fdopen(fd, "a", encoding="utf-8")
        else:
            self._f = sys.stdout

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


def _arrow_type(spec):
    import pyarrow as pa

    if spec.dtype == "S16" or spec.dtype == "O":  # addresses
        base = pa.string()
    elif spec.dtype.startswith("S"):
        base = pa.binary(int(spec.dtype[1:]))
    else:
        base = pa.from_numpy_dtype(np.dtype(spec.dtype))
    return pa.list_(base) if spec.role == "sequence" else base


def parquet_schema(kind: str):
    """The Parquet schema of a record kind: wire schema v1's columns (units, docs and
    roles in the field metadata) plus the scoring columns. Fixed by the schema version,
    so every file of a kind has the same schema whoever sent the rows."""
    import pyarrow as pa
    from xdpml.collector import wire_schema

    fields = [
        pa.field(name, _arrow_type(spec), metadata={"unit": spec.unit, "doc": spec.doc, "role": spec.role})
        for name, spec in wire_schema.V1[kind].items()
    ]
    fields.append(
        pa.field(
            "extra_meta",
            pa.map_(pa.string(), pa.string()),
            metadata={
                "unit": "",
                "role": "meta",
                "doc": "text columns wire schema v1 does not name (e.g. pod label columns)",
            },
        )
    )
    fields += [
        pa.field("score", pa.float64()),
        pa.field("label", pa.string()),
        pa.field("flagged", pa.bool_()),
        pa.field("node_name", pa.string()),
        pa.field("agent_id", pa.string()),
        pa.field("model", pa.string()),
        pa.field("model_version", pa.string()),
        pa.field("batch_sequence", pa.uint64()),
        pa.field("received_unix_ms", pa.uint64()),
    ]
    return pa.schema(fields, metadata={"xdpml.schema": wire_schema.SCHEMA_VERSION, "xdpml.kind": kind})


class _Part:
    """One Parquet file being written: ``.NAME.tmp`` beside its final name, renamed
    (atomically) when complete, so readers only ever see whole files."""

    def __init__(self, final: str, schema) -> None:
        import pyarrow.parquet as pq

        self.final = final
        self.tmp = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.tmp")
        self._fh = os.fdopen(open_private(self.tmp, os.O_WRONLY | os.O_TRUNC), "wb")
        self.writer = pq.ParquetWriter(self._fh, schema)
        self.opened = time.monotonic()
        self.rows = 0

    def size(self) -> int:
        return self._fh.tell()

    def close(self) -> str:
        self.writer.close()
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self.tmp, self.final)
        return self.final


class ParquetSink:
    """Scored rows as Parquet files, one series per record kind.

    ``flows.parquet`` names the series: flow rows go to ``flows-<UTC time>-<n>.parquet``,
    other kinds to ``flows.window-...parquet`` and ``flows.packet-...parquet``. A file
    is written under a hidden ``.<name>.tmp`` name and renamed when complete: when it
    reaches ``max_file_bytes`` or ``max_file_age_s``, and on close. Rows are buffered
    and written as a row group every ``row_group_rows`` rows or ``flush_s`` seconds.
    The schema is :func:`parquet_schema` (wire schema v1): v1 columns a batch lacks are
    null; text columns v1 does not name (pod label columns) go into the ``extra_meta``
    map; other columns v1 does not know are not stored (counted in ``dropped_columns``).
    Files are mode 0600; a directory writable by others is refused."""

    def __init__(
        self,
        path: str,
        *,
        max_file_bytes: int = 256 * 1024 * 1024,
        max_file_age_s: float = 300.0,
        row_group_rows: int = 65536,
        flush_s: float = 10.0,
    ) -> None:
        import pyarrow  # noqa: F401  (fail at start-up, not at the first batch)

        check_output_path(path)
        self.path = path
        self.max_file_bytes, self.max_file_age_s = max_file_bytes, max_file_age_s
        self.row_group_rows, self.flush_s = row_group_rows, flush_s
        self._schemas: dict[str, object] = {}
        self._parts: dict[str, _Part] = {}
        self._pending: dict[str, list] = {}
        self._pending_rows: dict[str, int] = {}
        self._first_pending: dict[str, float] = {}
        self._seq = 0
        self.files: list[str] = []  # completed files, oldest first
        self.dropped_columns: dict[str, int] = {}  # column v1 does not know -> batches it was left out of

    def _name(self, kind: str) -> str:
        stem, ext = os.path.splitext(self.path)
        ext = ext or ".parquet"
        if kind != "flow":
            stem = f"{stem}.{kind}"
        self._seq += 1
        return f"{stem}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{self._seq:04d}{ext}"

    @staticmethod
    def _array(name: str, col: np.ndarray, typ):
        import pyarrow as pa

        if col.dtype.kind == "S" and pa.types.is_string(typ):
            return pa.array([ip_to_str(v) for v in col], pa.string())
        if col.dtype.kind == "S":
            return pa.array(col.tolist(), typ)
        if col.dtype.kind in "OU":
            return pa.array([None if v is None else str(v) for v in col.tolist()], pa.string())
        if col.ndim == 2:
            flat = pa.array(np.ascontiguousarray(col).reshape(-1), typ.value_type)
            offsets = pa.array(np.arange(0, col.size + 1, col.shape[1], dtype=np.int32))
            return pa.ListArray.from_arrays(offsets, flat)
        return pa.array(col, typ)

    def write(self, scored: ScoredBatch) -> None:
        import pyarrow as pa

        b = scored.batch
        schema = self._schemas.get(b.kind)
        if schema is None:
            schema = self._schemas[b.kind] = parquet_schema(b.kind)
        text = []  # unknown text columns: kept in extra_meta
        for name, col in b.columns.items():
            if schema.get_field_index(name) >= 0:
                continue
            if col.dtype.kind in "OU" and col.ndim == 1:
                text.append(name)
            else:
                self.dropped_columns[name] = self.dropped_columns.get(name, 0) + 1
        extra = _extra(scored)
        n = len(b)
        cols = []
        for f in schema:
            if f.name == "extra_meta":
                values = [b.columns[name].tolist() for name in text]
                cols.append(
                    pa.array(
                        [[(k, None if v[i] is None else str(v[i])) for k, v in zip(text, values)] for i in range(n)]
                        if text
                        else [None] * n,
                        f.type,
                    )
                )
            elif f.name == "score":
                cols.append(pa.array(scored.score, pa.float64(), mask=np.isnan(scored.score)))
            elif f.name == "flagged":
                cols.append(pa.array(scored.flagged, pa.bool_()))
            elif f.name in extra:
                cols.append(pa.array(extra[f.name], f.type))
            elif f.name in b.columns:
                cols.append(self._array(f.name, b.columns[f.name], f.type))
            else:
                cols.append(pa.nulls(n, f.type))
        self._pending.setdefault(b.kind, []).append(pa.Table.from_arrays(cols, schema=schema))
        self._pending_rows[b.kind] = self._pending_rows.get(b.kind, 0) + n
        self._first_pending.setdefault(b.kind, time.monotonic())
        self.tick()

    def tick(self) -> None:
        """Write due row groups and rotate due files (also called by the collector
        every second, so a quiet collector still completes its files in time)."""
        now = time.monotonic()
        for kind in list(self._pending):
            if (
                self._pending_rows.get(kind, 0) >= self.row_group_rows
                or now - self._first_pending.get(kind, now) >= self.flush_s
            ):
                self._flush(kind)
        now = time.monotonic()
        for kind, part in list(self._parts.items()):
            if part.size() >= self.max_file_bytes or now - part.opened >= self.max_file_age_s:
                self._flush(kind)
                self.files.append(self._parts.pop(kind).close())

    def _flush(self, kind: str) -> None:
        import pyarrow as pa

        tables = self._pending.pop(kind, [])
        self._pending_rows.pop(kind, None)
        self._first_pending.pop(kind, None)
        if not tables:
            return
        part = self._parts.get(kind)
        if part is None:
            part = self._parts[kind] = _Part(self._name(kind), self._schemas[kind])
        table = pa.concat_tables(tables)
        part.writer.write_table(table, row_group_size=max(1, len(table)))
        part.rows += len(table)

    def close(self) -> None:
        for kind in list(self._pending):
            self._flush(kind)
        for kind in list(self._parts):
            self.files.append(self._parts.pop(kind).close())


# ---- readable table of flagged flows ---------------------------------------------------

TABLE_COLUMNS = (
    ("node", 12),
    ("src", 22),
    ("dst", 22),
    ("proto", 5),
    ("pkts", 6),
    ("bytes", 8),
    ("dur_ms", 8),
    ("flags", 8),
    ("score", 6),
    ("label", 8),
)
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

    fields = {
        k: col(k)
        for k in (
            "src_ip",
            "dst_ip",
            "src_port",
            "dst_port",
            "protocol",
            "bidirectional_packets",
            "bidirectional_bytes",
            "bidirectional_duration_ms",
            "tcp_flags",
        )
    }
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
