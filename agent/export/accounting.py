"""The exporter's acknowledgement accounting: where every produced row is.

    produced_rows == sent_rows + dropped_rows + pending_rows      (at all times)

"sent" means acknowledged by the collector; "pending" is queued, being encoded, encoded
and waiting (``ready``) or sent on the current stream and not yet acknowledged
(``unacked``). The ledger also knows how long the collector has gone without
acknowledging what it was sent, for the exporter's acknowledgement deadline.

All methods expect the exporter's condition lock to be held.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass

log = logging.getLogger("xdpml.agent.export.grpc_client")

COUNTERS = (
    "produced_batches",
    "produced_rows",
    "sent_batches",
    "sent_rows",
    "dropped_batches",
    "dropped_rows",
    "rejected_batches",
    "reconnects",
    "verdict_batches",
    "verdicts_received",
    "verdicts_unknown_action",
    "stream_failures",
    "ack_timeouts",
)


class LogBackoff:
    """Log the first event, then at most once per period; the period doubles to 5 min."""

    def __init__(
        self, what: str, *, initial_s: float = 5.0, max_s: float = 300.0, level: int = logging.WARNING
    ) -> None:
        self.what, self.period, self.max_s, self.level = what, initial_s, max_s, level
        self.next_at = 0.0
        self.unlogged = 0

    def event(self, detail: str) -> None:
        self.unlogged += 1
        now = time.monotonic()
        if now >= self.next_at:
            log.log(self.level, "%s (%d since last report): %s", self.what, self.unlogged, detail)
            self.unlogged = 0
            self.next_at = now + self.period
            self.period = min(self.max_s, self.period * 2)


@dataclass
class Pending:
    sequence: int
    rows: int
    payload: bytes  # a serialized ExportRequest (codec.encode_split_requests)
    sent_at: float = 0.0  # monotonic time it was handed to the stream


class AckLedger:
    """Encoded messages waiting to be sent, sent ones waiting for their ack, and the counters."""

    def __init__(self) -> None:
        self.counters: collections.Counter = collections.Counter({k: 0 for k in COUNTERS})
        self.ready: collections.deque[Pending] = collections.deque()  # encoded, not yet sent
        self.unacked: dict[int, Pending] = {}  # sent on the current stream, ordered by sequence
        self.last_ack_at = time.monotonic()

    # -- rows in, rows out ---------------------------------------------------------
    def produced(self, rows: int) -> None:
        self.counters["produced_batches"] += 1
        self.counters["produced_rows"] += rows

    def dropped(self, rows: int, batches: int = 1) -> None:
        self.counters["dropped_batches"] += batches
        self.counters["dropped_rows"] += rows

    def pending_rows(self) -> int:
        """Rows encoded or in flight (the queue adds its own)."""
        return sum(p.rows for p in self.ready) + sum(p.rows for p in self.unacked.values())

    # -- the stream ------------------------------------------------------------------
    def stream_started(self) -> None:
        self.last_ack_at = time.monotonic()

    def next_to_send(self, max_in_flight: int) -> Pending | None:
        if self.ready and len(self.unacked) < max_in_flight:
            p = self.ready.popleft()
            p.sent_at = time.monotonic()
            self.unacked[p.sequence] = p
            return p
        return None

    def ack(self, sequence: int, error: str) -> bool:
        """Settle one message; True when it was accepted (an ack for an unknown sequence, False)."""
        p = self.unacked.pop(sequence, None)
        if p is None:
            return False
        self.last_ack_at = time.monotonic()
        if error:
            self.counters["rejected_batches"] += 1
            self.dropped(p.rows)
            log.error("collector rejected batch %d (%d rows): %s", sequence, p.rows, error)
            return False
        self.counters["sent_batches"] += 1
        self.counters["sent_rows"] += p.rows
        return True

    def unacknowledged_for(self, now: float) -> float:
        """Seconds the collector has sat on a sent message without acknowledging anything
        (0 while nothing is in flight)."""
        if not self.unacked:
            return 0.0
        oldest = min(p.sent_at for p in self.unacked.values())
        return max(0.0, now - max(oldest, self.last_ack_at))

    def stream_ended(self, *, resend: bool) -> tuple[int, int]:
        """The stream is gone: its unacknowledged messages are sent again on the next one
        (``resend``, before anything newer) or dropped. Returns (messages, rows) affected."""
        unacked = list(self.unacked.values())
        self.unacked.clear()
        rows = sum(p.rows for p in unacked)
        if resend:
            self.ready.extendleft(reversed(unacked))
        else:
            self.dropped(rows, len(unacked))
        return len(unacked), rows

    def clear(self) -> tuple[int, int]:
        """Forget every encoded message (close()); returns (rows, messages) forgotten."""
        rows, n = self.pending_rows(), len(self.ready) + len(self.unacked)
        self.ready.clear()
        self.unacked.clear()
        return rows, n
