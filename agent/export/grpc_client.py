"""Stream feature batches to the xdpml collector over gRPC.

    harvester ──put()──► bounded queue ──► sender (batch by size/age, split < 4 MiB)
                          (drops whole        │ one long-lived Export stream
                           batches when full) ▼
                                   collector ──► acks, verdicts ──► counters, on_verdicts()

``put()`` never blocks: when the queue (bounded in bytes and batches) is full the
batch is dropped, counted, and logged with backoff. Every row is accounted for:
``produced_rows == sent_rows + dropped_rows + pending_rows`` at all times, where
"sent" means acknowledged by the collector.

A broken stream is re-opened with jittered exponential backoff. Messages not yet
acknowledged are sent again after a retryable failure (UNAVAILABLE, a collector
restart...), so delivery is at least once across collector restarts; after a
non-retryable status (bad credentials, unimplemented) they are dropped and counted.
"""
from __future__ import annotations

import collections
import logging
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterator

import grpc

from xdpml.wire.columns import ColumnBatch
from xdpml.wire import codec
from xdpml.wire.tls import ClientTls
from xdpml.wire.v1 import collector_pb2 as cpb

log = logging.getLogger(__name__)

EXPORT_METHOD = "/xdpml.v1.Collector/Export"

# The retryable codes of OpenTelemetry's OTLP exporter: transient by definition.
RETRYABLE = frozenset({
    grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DATA_LOSS,
})


@dataclass
class ExporterSettings:
    """How the exporter batches, bounds memory and reconnects; units in the names."""

    target: str = "127.0.0.1:50051"  # collector host:port
    tls: ClientTls | None = None  # None = plaintext
    node_name: str = ""
    agent_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    agent_version: str = ""
    queue_max_bytes: int = 64 * 1024 * 1024  # column bytes held before put() drops
    queue_max_batches: int = 1024
    flush_rows: int = 4096  # send as soon as this many rows wait...
    flush_age_s: float = 1.0  # ...or the oldest waiting row is this old
    max_message_bytes: int = codec.DEFAULT_MAX_MESSAGE_BYTES
    max_in_flight: int = 8  # messages sent but not yet acknowledged
    backoff_initial_s: float = 0.25
    backoff_max_s: float = 15.0
    # Client keepalive ping period. The xdpml collector allows pings every 10 s
    # (grpc.http2.min_ping_interval_without_data_ms); a stock gRPC server allows
    # one per 5 minutes, so stay well above the former.
    keepalive_s: float = 30.0
    keepalive_timeout_s: float = 10.0
    tls_check_interval_s: float = 5.0
    include_schema: bool = True

    def __post_init__(self) -> None:
        if self.flush_rows < 1 or self.flush_age_s <= 0:
            raise ValueError("flush_rows must be >= 1 and flush_age_s > 0")
        if self.max_message_bytes > codec.GRPC_DEFAULT_MAX_MESSAGE:
            raise ValueError("max_message_bytes must stay under gRPC's 4 MiB default")
        if self.keepalive_s < 10:
            raise ValueError("keepalive_s below 10 s would be refused by the collector (too_many_pings)")


class _LogBackoff:
    """Log the first event, then at most once per period; the period doubles to 5 min."""

    def __init__(self, what: str, *, initial_s: float = 5.0, max_s: float = 300.0,
                 level: int = logging.WARNING) -> None:
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
class _Pending:
    sequence: int
    rows: int
    payload: bytes  # a serialized ExportRequest (codec.encode_request_bytes)


class GrpcExporter:
    """Bounded, non-blocking batch exporter with reconnects. Use as a context manager."""

    def __init__(self, settings: ExporterSettings, *, on_verdicts: Callable[[cpb.VerdictBatch], None] | None = None,
                 loss_counters: Callable[[], dict[str, int]] | None = None) -> None:
        self.settings = settings
        self.on_verdicts = on_verdicts
        self._loss_counters = loss_counters
        self._node = codec.NodeIdentity(settings.node_name, settings.agent_id, settings.agent_version)
        self._cond = threading.Condition()
        self._queue: collections.deque[tuple[float, ColumnBatch, int]] = collections.deque()
        self._queue_bytes = 0
        self._ready: collections.deque[_Pending] = collections.deque()  # encoded, not yet sent
        self._unacked: dict[int, _Pending] = {}  # sent on the current stream, ordered by seq
        self._encoding_rows = 0  # taken from the queue, being encoded outside the lock
        self._seq = 0
        self._generation = 0
        self._closing = False
        self._stopped = False
        self._drop_log = _LogBackoff("export queue full, dropped batches")
        self._fail_log = _LogBackoff("collector stream failed", initial_s=1.0)
        self._verdict_log = _LogBackoff("verdict batches from the collector", level=logging.INFO)
        self.counters = collections.Counter({k: 0 for k in (
            "produced_batches", "produced_rows", "sent_batches", "sent_rows", "dropped_batches",
            "dropped_rows", "rejected_batches", "reconnects", "verdict_batches", "verdicts_received",
            "stream_failures")})
        self.last_error = ""
        self._thread = threading.Thread(target=self._run, name="xdpml-export", daemon=True)
        self._thread.start()

    # ---- harvester side -------------------------------------------------------------
    def put(self, batch: ColumnBatch) -> bool:
        """Queue a batch for export; returns False (and counts it) when it was dropped."""
        rows = len(batch)
        size = sum(c.nbytes for c in batch.columns.values())
        with self._cond:
            self.counters["produced_batches"] += 1
            self.counters["produced_rows"] += rows
            s = self.settings
            if (self._closing or len(self._queue) >= s.queue_max_batches
                    or self._queue_bytes + size > s.queue_max_bytes):
                self.counters["dropped_batches"] += 1
                self.counters["dropped_rows"] += rows
                self._drop_log.event(f"{rows} rows; collector {s.target} ({self.last_error or 'slow'})")
                return False
            if rows == 0:
                return True
            self._queue.append((time.monotonic(), batch, size))
            self._queue_bytes += size
            self._cond.notify_all()
        return True

    def stats(self) -> dict[str, int]:
        with self._cond:
            out = dict(self.counters)
            out["queue_batches"] = len(self._queue)
            out["queue_bytes"] = self._queue_bytes
            out["pending_rows"] = self._pending_rows_locked()
            return out

    def _pending_rows_locked(self) -> int:
        return (sum(len(b) for _, b, _ in self._queue) + self._encoding_rows + sum(p.rows for p in self._ready)
                + sum(p.rows for p in self._unacked.values()))

    # ---- shutdown ------------------------------------------------------------------
    def close(self, timeout_s: float = 5.0) -> dict[str, int]:
        """Flush what is queued, wait for acknowledgements up to ``timeout_s``, stop.

        Rows still unacknowledged at the deadline are counted as dropped.
        """
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            while (self._queue or self._encoding_rows or self._ready or self._unacked) and time.monotonic() < deadline:
                self._cond.wait(min(0.05, max(0.0, deadline - time.monotonic())))
            self._stopped = True
            left = self._pending_rows_locked()
            nbatches = len(self._queue) + len(self._ready) + len(self._unacked)
            if left or nbatches:
                self.counters["dropped_rows"] += left
                self.counters["dropped_batches"] += nbatches
                log.warning("export closed with %d rows unacknowledged (counted as dropped)", left)
            self._queue.clear()
            self._queue_bytes = 0
            self._encoding_rows = 0
            self._ready.clear()
            self._unacked.clear()
            self._generation += 1
            self._cond.notify_all()
            call = getattr(self, "_call", None)
        if call is not None:
            call.cancel()
        self._thread.join(timeout=max(1.0, deadline - time.monotonic()))
        return self.stats()

    def __enter__(self) -> "GrpcExporter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- network side --------------------------------------------------------------
    def _channel(self) -> grpc.Channel:
        s = self.settings
        opts = [
            ("grpc.keepalive_time_ms", int(s.keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(s.keepalive_timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 0),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.enable_retries", 0),  # retries are ours, with our accounting
            ("grpc.max_receive_message_length", codec.GRPC_DEFAULT_MAX_MESSAGE),
        ]
        if s.tls is None:
            return grpc.insecure_channel(s.target, options=opts)
        return grpc.secure_channel(s.target, s.tls.credentials(), options=opts + s.tls.channel_options())

    def _run(self) -> None:
        attempt = 0
        first = True
        while True:
            with self._cond:
                if self._stopped:
                    return
                # Connect lazily: no stream while there is nothing to send.
                while not (self._queue or self._ready) and not self._stopped:
                    self._cond.wait(0.5)
                if self._stopped:
                    return
                self._generation += 1
                gen = self._generation
            if not first:
                self.counters["reconnects"] += 1
            first = False
            acked_any = self._stream_once(gen)
            with self._cond:
                if self._stopped:
                    return
            if acked_any:
                attempt = 0
            delay = min(self.settings.backoff_max_s, self.settings.backoff_initial_s * (2 ** attempt))
            attempt = min(attempt + 1, 30)
            # "Equal jitter": at least half the delay, so many agents restarted together spread out.
            delay = delay / 2 + random.uniform(0, delay / 2)
            with self._cond:
                self._cond.wait_for(lambda: self._stopped, timeout=delay)

    def _stream_once(self, gen: int) -> bool:
        """One Export stream until it fails or the exporter stops; True if anything was acknowledged."""
        acked_any = False
        channel = self._channel()
        try:
            # Requests are already serialized: no request_serializer, bytes go out as they are.
            export = channel.stream_stream(EXPORT_METHOD, request_serializer=None,
                                           response_deserializer=cpb.ExportResponse.FromString)
            call = export(self._requests(gen))
            self._call = call
            done = threading.Event()
            tls = self.settings.tls

            def watch_tls() -> None:
                while not done.wait(self.settings.tls_check_interval_s):
                    if tls.changed():
                        log.info("TLS files changed: reconnecting with the new ones")
                        call.cancel()
                        return

            if tls is not None:
                threading.Thread(target=watch_tls, name="xdpml-export-tls", daemon=True).start()
            try:
                for resp in call:
                    if resp.HasField("ack"):
                        acked_any |= self._on_ack(resp.ack)
                    elif resp.HasField("verdicts"):
                        self._on_verdicts(resp.verdicts)
                code, detail = call.code(), call.details()
            except grpc.RpcError as e:
                code, detail = e.code(), e.details()
            finally:
                done.set()
            self._on_stream_end(gen, code, detail)
        finally:
            channel.close()
        return acked_any

    def _requests(self, gen: int) -> Iterator[bytes]:
        """Runs on a gRPC thread: yields messages while this stream is current."""
        while True:
            with self._cond:
                pending = self._next_locked(gen)
                if pending is None:
                    return
            if isinstance(pending, list):  # a flush to encode outside the lock
                msgs = self._encode(pending)
                with self._cond:
                    if self._stopped:  # close() gave up meanwhile and counted these rows
                        return
                    self._encoding_rows = 0
                    self._ready.extendleft(reversed(msgs))
                    self._cond.notify_all()
                continue
            yield pending.payload

    def _next_locked(self, gen: int):
        s = self.settings
        while True:
            if gen != self._generation or self._stopped:
                return None
            if self._ready and len(self._unacked) < s.max_in_flight:
                p = self._ready.popleft()
                self._unacked[p.sequence] = p
                return p
            if self._queue and not self._ready:
                rows = sum(len(b) for _, b, _ in self._queue)
                age = time.monotonic() - self._queue[0][0]
                if rows >= s.flush_rows or age >= s.flush_age_s or self._closing:
                    return self._take_locked()
                self._cond.wait(max(0.001, s.flush_age_s - age))
                continue
            self._cond.wait(0.25)

    def _take_locked(self) -> list[ColumnBatch]:
        # Consecutive batches with the same kind and columns are merged into one flush.
        _, first, _ = self._queue[0]
        key = (first.kind, tuple(first.columns))
        out = []
        while self._queue and (self._queue[0][1].kind, tuple(self._queue[0][1].columns)) == key:
            _, b, size = self._queue.popleft()
            self._queue_bytes -= size
            out.append(b)
        self._encoding_rows = sum(len(b) for b in out)
        return out

    def _groups(self, batches: list[ColumnBatch]):
        """Merge small batches up to one message's worth; a big batch goes alone, uncopied."""
        cap = codec.rows_per_message(batches[0], self.settings.max_message_bytes)
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

    def _encode(self, batches: list[ColumnBatch]) -> list[_Pending]:
        loss = self._loss_counters() if self._loss_counters else None
        out = []

        def next_seq() -> int:
            with self._cond:
                self._seq += 1
                return self._seq

        for group in self._groups(batches):
            merged = group[0] if len(group) == 1 else ColumnBatch.concat(group)
            try:
                # All or nothing per group, so a failure is counted once.
                out.extend([_Pending(seq, rows, payload) for seq, rows, payload in codec.encode_split_requests(
                    merged, next_sequence=next_seq, max_message_bytes=self.settings.max_message_bytes,
                    node=self._node, loss_counters=loss, include_schema=self.settings.include_schema)])
            except (codec.UnsupportedColumn, ValueError) as e:
                log.error("cannot encode a %s batch of %d rows, dropped: %s", merged.kind, len(merged), e)
                with self._cond:
                    if not self._stopped:
                        self.counters["dropped_batches"] += len(group)
                        self.counters["dropped_rows"] += len(merged)
                        self._encoding_rows -= len(merged)
        return out

    def _on_ack(self, ack: cpb.Ack) -> bool:
        with self._cond:
            p = self._unacked.pop(ack.sequence, None)
            if p is None:
                return False
            if ack.error:
                self.counters["rejected_batches"] += 1
                self.counters["dropped_batches"] += 1
                self.counters["dropped_rows"] += p.rows
                log.error("collector rejected batch %d (%d rows): %s", ack.sequence, p.rows, ack.error)
            else:
                self.counters["sent_batches"] += 1
                self.counters["sent_rows"] += p.rows
            self._cond.notify_all()
        return not ack.error

    def _on_verdicts(self, vb: cpb.VerdictBatch) -> None:
        with self._cond:
            self.counters["verdict_batches"] += 1
            self.counters["verdicts_received"] += len(vb.verdicts)
        self._verdict_log.event(f"latest: {len(vb.verdicts)} flagged flows in batch {vb.sequence}, model "
                                f"{vb.model.name} {vb.model.version}, threshold {vb.threshold:g}")
        if self.on_verdicts is not None:
            try:
                self.on_verdicts(vb)
            except Exception:  # a consumer bug must not break the stream
                log.exception("verdict callback failed")

    def _on_stream_end(self, gen: int, code: grpc.StatusCode | None, detail: str | None) -> None:
        with self._cond:
            if self._stopped:
                return
            if gen == self._generation:
                self._generation += 1  # ends _requests() of this stream
            unacked = list(self._unacked.values())
            self._unacked.clear()
            if code is None or code == grpc.StatusCode.OK or code in RETRYABLE:
                # Resend in the original order before anything newer.
                self._ready.extendleft(reversed(unacked))
            else:
                rows = sum(p.rows for p in unacked)
                self.counters["dropped_batches"] += len(unacked)
                self.counters["dropped_rows"] += rows
            self.counters["stream_failures"] += 1
            self.last_error = f"{code.name if code else 'ended'}: {detail or ''}".strip()
            self._cond.notify_all()
        self._fail_log.event(f"{self.settings.target}: {self.last_error}")
