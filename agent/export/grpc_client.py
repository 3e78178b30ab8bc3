"""Stream feature batches to the xdpml collector over gRPC.

    harvester ──put()──► bounded queue ──► sender (batch by size/age, split < 4 MiB)
                          (drops whole        │ one long-lived Export stream
                           batches when full) ▼
                                   collector ──► acks, verdicts ──► counters, on_verdicts()

One job per module, sharing the exporter's one condition lock:
``batching`` (the bounded queue, flushes, message-sized groups, encoding),
``accounting`` (what is waiting, in flight, acknowledged or dropped: the identity
below), ``verdicts`` (checking and counting what comes back), and this module:
the connection, its retries and the acknowledgement deadline.

``put()`` never blocks: when the queue (bounded in bytes and batches) is full the
batch is dropped, counted, and logged with backoff. Every row is accounted for:
``produced_rows == sent_rows + dropped_rows + pending_rows`` at all times, where
"sent" means acknowledged by the collector.

A broken stream is re-opened with jittered exponential backoff. Messages not yet
acknowledged are sent again after a retryable failure (UNAVAILABLE, a collector
restart...), so delivery is at least once across collector restarts; after a
non-retryable status (bad credentials, unimplemented) they are dropped and counted.

A collector that takes the stream but stops acknowledging (it never reads, or is
wedged) would hold the in-flight window forever while the queue overflows: when
nothing has been acknowledged for ``ack_timeout_s`` although messages are in
flight, the stream is cancelled (counted in ``ack_timeouts``, logged with the rows
dropped so far) and re-opened, and the unacknowledged messages are sent again.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
from xdpml.agent.export.accounting import AckLedger, LogBackoff, Pending
from xdpml.agent.export.batching import BatchQueue, encode
from xdpml.agent.export.verdicts import VerdictHandler

from xdpml.errors import ConfigError
from xdpml.wire import codec
from xdpml.wire.columns import ColumnBatch
from xdpml.wire.tls import ClientTls
from xdpml.wire.v1 import collector_pb2 as cpb

log = logging.getLogger(__name__)

EXPORT_METHOD = "/xdpml.v1.Collector/Export"

# host:port or [ipv6]:port, as the AgentConfig CRD accepts for spec.collector.address
_TARGET = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?):([0-9]{1,5})$")


def check_target(target: str) -> str:
    """A collector address as host:port or [ipv6]:port with a port 1..65535, else ConfigError."""
    m = _TARGET.match(target)
    if not m:
        raise ConfigError(f"collector address {target!r} is not host:port or [ipv6]:port")
    if not 1 <= int(m.group(3)) <= 65535:
        raise ConfigError(f"collector address {target!r}: port {m.group(3)} is not 1..65535")
    return target


# The retryable codes of OpenTelemetry's OTLP exporter: transient by definition.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


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
    # Messages in flight and nothing acknowledged for this long: reconnect (see above).
    ack_timeout_s: float = 30.0
    include_schema: bool = True

    def __post_init__(self) -> None:
        check_target(self.target)
        if self.flush_rows < 1 or self.flush_age_s <= 0:
            raise ConfigError("flush_rows must be >= 1 and flush_age_s > 0")
        if self.max_message_bytes > codec.GRPC_DEFAULT_MAX_MESSAGE:
            raise ConfigError("max_message_bytes must stay under gRPC's 4 MiB default")
        if self.keepalive_s < 10:
            raise ConfigError("keepalive_s below 10 s would be refused by the collector (too_many_pings)")
        if self.ack_timeout_s <= 0:
            raise ConfigError("ack_timeout_s must be > 0 seconds")


class GrpcExporter:
    """Bounded, non-blocking batch exporter with reconnects. Use as a context manager."""

    def __init__(
        self,
        settings: ExporterSettings,
        *,
        on_verdicts: Callable[[cpb.VerdictBatch], None] | None = None,
        loss_counters: Callable[[], dict[str, int]] | None = None,
        on_model: Callable[[cpb.ModelUpdate], object] | None = None,
    ) -> None:
        s = self.settings = settings
        # a signed model the collector pushes (ExportResponse.model): the agent verifies it
        self.on_model = on_model
        self._loss_counters = loss_counters
        self._node = codec.NodeIdentity(s.node_name, s.agent_id, s.agent_version)
        self._cond = threading.Condition()
        self._queue = BatchQueue(
            max_bytes=s.queue_max_bytes,
            max_batches=s.queue_max_batches,
            flush_rows=s.flush_rows,
            flush_age_s=s.flush_age_s,
        )
        self._ledger = AckLedger()
        self.counters = self._ledger.counters
        self._verdicts = VerdictHandler(on_verdicts)
        self._seq = 0
        self._generation = 0
        self._closing = False
        self._stopped = False
        self._call = None
        self._drop_log = LogBackoff("export queue full, dropped batches")
        self._fail_log = LogBackoff("collector stream failed", initial_s=1.0)
        self.last_error = ""
        self._thread = threading.Thread(target=self._run, name="xdpml-export", daemon=True)
        self._thread.start()

    @property
    def on_verdicts(self) -> Callable[[cpb.VerdictBatch], None] | None:
        return self._verdicts.callback

    @on_verdicts.setter
    def on_verdicts(self, callback: Callable[[cpb.VerdictBatch], None] | None) -> None:
        self._verdicts.callback = callback

    # ---- harvester side -------------------------------------------------------------
    def put(self, batch: ColumnBatch, *, urgent: bool = False) -> bool:
        """Queue a batch for export; returns False (and counts it) when it was dropped.
        ``urgent``: flush it (and what waits before it) now, not after flush_age_s."""
        rows = len(batch)
        with self._cond:
            self._ledger.produced(rows)
            if self._closing or not self._queue.offer_locked(batch, urgent=urgent):
                self._ledger.dropped(rows)
                self._drop_log.event(f"{rows} rows; collector {self.settings.target} ({self.last_error or 'slow'})")
                return False
            self._cond.notify_all()
        return True

    def stats(self) -> dict[str, int]:
        with self._cond:
            out = dict(self.counters)
            out["queue_batches"] = len(self._queue)
            out["queue_bytes"] = self._queue.bytes
            out["pending_rows"] = self._pending_rows_locked()
            return out

    def _pending_rows_locked(self) -> int:
        return self._queue.rows_locked() + self._ledger.pending_rows()

    def _has_work_locked(self) -> bool:
        return bool(len(self._queue) or self._queue.encoding_rows or self._ledger.ready or self._ledger.unacked)

    # ---- shutdown ------------------------------------------------------------------
    def close(self, timeout_s: float = 5.0) -> dict[str, int]:
        """Flush what is queued, wait for acknowledgements up to ``timeout_s``, stop.

        Rows still unacknowledged at the deadline are counted as dropped.
        """
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            while self._has_work_locked() and time.monotonic() < deadline:
                self._cond.wait(min(0.05, max(0.0, deadline - time.monotonic())))
            self._stopped = True
            qrows, qbatches = self._queue.clear_locked()
            lrows, lmsgs = self._ledger.clear()
            if qrows + lrows or qbatches + lmsgs:
                self._ledger.dropped(qrows + lrows, qbatches + lmsgs)
                log.warning("export closed with %d rows unacknowledged (counted as dropped)", qrows + lrows)
            self._generation += 1
            self._cond.notify_all()
            call = self._call
        if call is not None:
            call.cancel()
        self._thread.join(timeout=max(1.0, deadline - time.monotonic()))
        return self.stats()

    def __enter__(self) -> GrpcExporter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- connection and retry --------------------------------------------------------
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
                while not (len(self._queue) or self._ledger.ready) and not self._stopped:
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
            delay = min(self.settings.backoff_max_s, self.settings.backoff_initial_s * (2**attempt))
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
            export = channel.stream_stream(
                EXPORT_METHOD, request_serializer=None, response_deserializer=cpb.ExportResponse.FromString
            )
            with self._cond:
                self._ledger.stream_started()
            call = export(self._requests(gen))
            self._call = call
            done = threading.Event()
            timed_out: list[str] = []
            threading.Thread(
                target=self._watch, args=(call, done, timed_out), name="xdpml-export-watch", daemon=True
            ).start()
            try:
                for resp in call:
                    if resp.HasField("ack"):
                        acked_any |= self._on_ack(resp.ack)
                    elif resp.HasField("verdicts"):
                        self._on_verdicts(resp.verdicts)
                    elif resp.HasField("model"):
                        self._on_model(resp.model)
                code, detail = call.code(), call.details()
            except grpc.RpcError as e:
                code, detail = e.code(), e.details()
            finally:
                done.set()
            if timed_out:
                code, detail = grpc.StatusCode.DEADLINE_EXCEEDED, timed_out[0]
            self._on_stream_end(gen, code, detail)
        finally:
            channel.close()
        return acked_any

    def _watch(self, call, done: threading.Event, timed_out: list[str]) -> None:
        """While the stream lives: the acknowledgement deadline, and TLS file rotation."""
        s = self.settings
        tls = s.tls
        period = min(1.0, s.ack_timeout_s / 4)
        next_tls = time.monotonic() + s.tls_check_interval_s
        while not done.wait(period):
            now = time.monotonic()
            with self._cond:
                silent = self._ledger.unacknowledged_for(now)
                in_flight = len(self._ledger.unacked)
                dropped = self.counters["dropped_rows"]
            if silent >= s.ack_timeout_s:
                with self._cond:
                    self.counters["ack_timeouts"] += 1
                reason = (
                    f"no acknowledgement for {silent:.0f} s with {in_flight} messages in flight "
                    "(the collector accepts but does not read)"
                )
                timed_out.append(reason)
                log.warning(
                    "collector %s: %s; reconnecting, will resend them (%d rows dropped so far)",
                    s.target,
                    reason,
                    dropped,
                )
                call.cancel()
                return
            if tls is not None and now >= next_tls:
                next_tls = now + s.tls_check_interval_s
                if tls.changed():
                    log.info("TLS files changed: reconnecting with the new ones")
                    call.cancel()
                    return

    def _on_stream_end(self, gen: int, code: grpc.StatusCode | None, detail: str | None) -> None:
        with self._cond:
            if self._stopped:
                return
            if gen == self._generation:
                self._generation += 1  # ends _requests() of this stream
            # Retryable: resend in the original order before anything newer; otherwise drop.
            self._ledger.stream_ended(resend=code is None or code == grpc.StatusCode.OK or code in RETRYABLE)
            self.counters["stream_failures"] += 1
            self.last_error = f"{code.name if code else 'ended'}: {detail or ''}".strip()
            self._cond.notify_all()
        self._fail_log.event(f"{self.settings.target}: {self.last_error}")

    # ---- sending (runs on a gRPC thread) ----------------------------------------------
    def _requests(self, gen: int) -> Iterator[bytes]:
        """Yields messages while this stream is current."""
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
                    self._queue.encoding_rows = 0
                    self._ledger.ready.extendleft(reversed(msgs))
                    self._cond.notify_all()
                continue
            yield pending.payload

    def _next_locked(self, gen: int) -> Pending | list[ColumnBatch] | None:
        while True:
            if gen != self._generation or self._stopped:
                return None
            p = self._ledger.next_to_send(self.settings.max_in_flight)
            if p is not None:
                return p
            if len(self._queue) and not self._ledger.ready:
                wait = self._queue.wait_s_locked(closing=self._closing)
                if not wait:
                    return self._queue.take_locked()
                self._cond.wait(wait)
                continue
            self._cond.wait(0.25)

    def _encode(self, batches: list[ColumnBatch]) -> list[Pending]:
        def next_seq() -> int:
            with self._cond:
                self._seq += 1
                return self._seq

        def failed(merged: ColumnBatch, nbatches: int, e: Exception) -> None:
            log.error("cannot encode a %s batch of %d rows, dropped: %s", merged.kind, len(merged), e)
            with self._cond:
                if not self._stopped:
                    self._ledger.dropped(len(merged), nbatches)
                    self._queue.encoding_rows -= len(merged)

        s = self.settings
        return encode(
            batches,
            next_sequence=next_seq,
            max_message_bytes=s.max_message_bytes,
            node=self._node,
            loss_counters=self._loss_counters() if self._loss_counters else None,
            include_schema=s.include_schema,
            on_failure=failed,
        )

    # ---- what comes back ----------------------------------------------------------------
    def _on_ack(self, ack: cpb.Ack) -> bool:
        with self._cond:
            ok = self._ledger.ack(ack.sequence, ack.error)
            self._cond.notify_all()
        return ok

    def _on_model(self, update: cpb.ModelUpdate) -> None:
        if self.on_model is None:
            log.warning("collector pushed model %s v%d: no model here to load it into", update.name, update.version)
            return
        try:
            self.on_model(update)
        except Exception as exc:  # a callback bug must not end the stream
            log.error(
                "model push callback failed on %s v%d: %s: %s", update.name, update.version, type(exc).__name__, exc
            )

    def _on_verdicts(self, vb: cpb.VerdictBatch) -> None:
        vb, unknown = self._verdicts.check(vb)
        with self._cond:
            self._verdicts.count_locked(self.counters, vb, unknown)
        self._verdicts.deliver(vb, unknown)
