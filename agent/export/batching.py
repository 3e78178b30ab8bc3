"""The exporter's batching job: a bounded queue of column batches, flushed by size or
age into groups that each fit one gRPC message, and encoded outside the lock.

Thread use: the harvester calls :meth:`BatchQueue.offer_locked`, the sender the rest,
both holding the exporter's one condition lock (the ``_locked`` suffix); only
:func:`encode` runs without it.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator

from xdpml.agent.export.accounting import Pending

from xdpml.wire import codec
from xdpml.wire.columns import ColumnBatch


class BatchQueue:
    """Batches waiting to be encoded, bounded in bytes and in batches."""

    def __init__(self, *, max_bytes: int, max_batches: int, flush_rows: int, flush_age_s: float) -> None:
        self.max_bytes, self.max_batches = max_bytes, max_batches
        self.flush_rows, self.flush_age_s = flush_rows, flush_age_s
        self._items: collections.deque[tuple[float, ColumnBatch, int]] = collections.deque()
        self.bytes = 0
        self.urgent = 0  # urgent batches queued (early snapshots): flushed at once
        self.encoding_rows = 0  # taken by take_locked(), being encoded outside the lock

    def __len__(self) -> int:
        return len(self._items)

    def offer_locked(self, batch: ColumnBatch, *, urgent: bool = False) -> bool:
        """Queue a batch unless that would pass a bound; False = the caller drops it.
        ``urgent``: flush now, with whatever waits (early snapshots, for verdicts)."""
        size = sum(c.nbytes for c in batch.columns.values())
        if len(self._items) >= self.max_batches or self.bytes + size > self.max_bytes:
            return False
        if len(batch):
            # a negative time marks the item urgent: its age is always past flush_age_s
            self._items.append((-1.0 if urgent else time.monotonic(), batch, size))
            self.bytes += size
            self.urgent += urgent
        return True

    def rows_locked(self) -> int:
        """Rows queued or being encoded."""
        return sum(len(b) for _, b, _ in self._items) + self.encoding_rows

    def wait_s_locked(self, *, closing: bool) -> float:
        """0 when a flush is due now (enough rows, old enough, or closing), else how long until it is."""
        rows = sum(len(b) for _, b, _ in self._items)
        age = time.monotonic() - self._items[0][0]
        if rows >= self.flush_rows or age >= self.flush_age_s or closing or self.urgent:
            return 0.0
        return max(0.001, self.flush_age_s - age)

    def take_locked(self) -> list[ColumnBatch]:
        """The leading run of batches of one kind and column set (they merge into one flush)."""
        _, first, _ = self._items[0]
        key = (first.kind, tuple(first.columns))
        out = []
        while self._items and (self._items[0][1].kind, tuple(self._items[0][1].columns)) == key:
            t, b, size = self._items.popleft()
            self.bytes -= size
            self.urgent -= t < 0
            out.append(b)
        self.encoding_rows = sum(len(b) for b in out)
        return out

    def clear_locked(self) -> tuple[int, int]:
        """Forget everything (close()); returns (rows, batches) forgotten."""
        rows, batches = self.rows_locked(), len(self._items)
        self._items.clear()
        self.bytes = 0
        self.urgent = 0
        self.encoding_rows = 0
        return rows, batches


def groups(batches: list[ColumnBatch], max_message_bytes: int) -> Iterator[list[ColumnBatch]]:
    """Merge small batches up to one message's worth; a big batch goes alone, uncopied."""
    cap = codec.rows_per_message(batches[0], max_message_bytes)
    small: list[ColumnBatch] = []
    rows = 0
    for b in batches:
        if len(b) >= cap // 2:
            if small:
                yield small
                small, rows = [], 0
            yield [b]
            continue
        small.append(b)
        rows += len(b)
        if rows >= cap:
            yield small
            small, rows = [], 0
    if small:
        yield small


def encode(
    batches: list[ColumnBatch],
    *,
    next_sequence: Callable[[], int],
    max_message_bytes: int,
    node: codec.NodeIdentity,
    loss_counters: dict[str, int] | None,
    include_schema: bool,
    on_failure: Callable[[ColumnBatch, int, Exception], None],
) -> list[Pending]:
    """Encode into ExportRequest messages under ``max_message_bytes``. A group that cannot
    be encoded is reported once to ``on_failure(merged, batches_in_group, error)``."""
    out: list[Pending] = []
    for group in groups(batches, max_message_bytes):
        merged = group[0] if len(group) == 1 else ColumnBatch.concat(group)
        try:
            # All or nothing per group, so a failure is counted once.
            out.extend(
                [
                    Pending(seq, rows, payload)
                    for seq, rows, payload in codec.encode_split_requests(
                        merged,
                        next_sequence=next_sequence,
                        max_message_bytes=max_message_bytes,
                        node=node,
                        loss_counters=loss_counters,
                        include_schema=include_schema,
                    )
                ]
            )
        except (codec.UnsupportedColumn, ValueError) as e:
            on_failure(merged, len(group), e)
    return out
