"""Columnar feature batches: the contract between feature computation and every sink.

A :class:`ColumnBatch` is a set of equally long, typed numpy columns, one row per
record (a flow, a window or a sampled packet). Sinks encode it however they need:
JSON lines render one object per row, the gRPC exporter ships each column as raw
little-endian bytes (as the Open Inference Protocol carries tensors).

Column conventions
  * 1-D numeric columns: uint8..uint64, int8..int64, float32, float64, bool.
  * 2-D numeric columns (rows x N): fixed-length sequences, e.g. the first N packet
    sizes of a flow (``splt_ps``); unused slots hold the column's ``fill`` value.
  * IP addresses: dtype ``S16``, 16 raw bytes, IPv4 as IPv4-mapped IPv6
    (``::ffff:a.b.c.d``), so v4 and v6 share one column. :func:`ip_to_str` renders them.
  * Strings (interface names, pod names...): numpy ``object`` arrays of ``str``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

V4_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"


@dataclass(frozen=True)
class ColumnSpec:
    """What a column means: documented once, carried in every batch's schema."""

    name: str
    dtype: str  # numpy dtype string: "u8", "f8", "S16", "O" ...
    unit: str = ""
    doc: str = ""
    role: str = "feature"  # key | time | feature | sequence | meta
    fill: float | int | None = None  # value of unused sequence slots


@dataclass
class ColumnBatch:
    """Rows of one record kind (``flow``, ``window`` or ``packet``)."""

    kind: str
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    specs: Mapping[str, ColumnSpec] = field(default_factory=dict)

    def __post_init__(self) -> None:
        lengths = {name: len(col) for name, col in self.columns.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"columns of unequal length in {self.kind} batch: {lengths}")

    def __len__(self) -> int:
        for col in self.columns.values():
            return len(col)
        return 0

    def __iter__(self) -> Iterator[str]:
        return iter(self.columns)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    def select(self, mask_or_index: np.ndarray | slice) -> ColumnBatch:
        return ColumnBatch(self.kind, {k: v[mask_or_index] for k, v in self.columns.items()}, self.specs)

    def rows(self) -> Iterator[dict]:
        """One plain-Python dict per row, IPs as text, sequences as lists (for JSON)."""
        n = len(self)
        converted = {name: to_python_list(col) for name, col in self.columns.items()}
        for i in range(n):
            yield {name: vals[i] for name, vals in converted.items()}

    @staticmethod
    def concat(batches: list[ColumnBatch]) -> ColumnBatch:
        if not batches:
            raise ValueError("nothing to concatenate")
        first = batches[0]
        cols = {name: np.concatenate([b.columns[name] for b in batches]) for name in first.columns}
        return ColumnBatch(first.kind, cols, first.specs)


def ip_to_str(raw: bytes) -> str:
    raw = bytes(raw).ljust(16, b"\x00")
    if raw[:12] == V4_MAPPED_PREFIX:
        return str(ipaddress.IPv4Address(raw[12:]))
    return str(ipaddress.IPv6Address(raw))


def ip_from_str(text: str) -> bytes:
    addr = ipaddress.ip_address(text)
    if addr.version == 4:
        return V4_MAPPED_PREFIX + addr.packed
    return addr.packed


def to_python_list(col: np.ndarray) -> list:
    if col.dtype.kind == "S" and col.dtype.itemsize == 16:
        return [ip_to_str(v) for v in col]
    if col.dtype.kind == "S":
        return [v.decode(errors="replace") for v in col]
    if col.dtype.kind == "f":
        # JSON has no NaN: undefined statistics (std of one value...) become null.
        out = col.astype(object)
        out[np.isnan(col)] = None
        return out.tolist()
    return col.tolist()
