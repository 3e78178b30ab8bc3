"""The collector's gRPC server: receive FeatureBatches, score, store, answer.

One Export stream per agent. Each stream has a reader thread that parses the next
message while the handler thread scores the current one (scikit-learn's tree code
releases the GIL, so the two overlap on two cores). A stream answers every batch
with an Ack, and flagged rows with a VerdictBatch on the same stream, so verdicts go
back to the agent that sent the flows.

Shutdown drains: health turns NOT_SERVING, each stream finishes the batches it has
already received, acknowledges them and ends with UNAVAILABLE ("collector shutting
down"), so agents re-send anything unacknowledged to the next collector.
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Iterator, Sequence

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from xdpml.wire import codec
from xdpml.wire.tls import ServerTls
from xdpml.collector.models import Model, ModelError
from xdpml.errors import ServiceError
from xdpml.collector.sinks import ScoredBatch, Sink, now_ms
from xdpml.wire.v1 import collector_pb2 as cpb
from xdpml.wire.v1 import collector_pb2_grpc as cgrpc

log = logging.getLogger(__name__)

SERVICE = cpb.DESCRIPTOR.services_by_name["Collector"].full_name
ACTIONS = {"alert": cpb.ACTION_ALERT, "drop": cpb.ACTION_DROP, "rate-limit": cpb.ACTION_RATE_LIMIT}
# google.rpc.Code values used in Ack.error_code.
INVALID_ARGUMENT, FAILED_PRECONDITION, INTERNAL = 3, 9, 13
MAX_VERDICTS_PER_BATCH = 10_000


@dataclass
class CollectorSettings:
    listen: str = "0.0.0.0:50051"
    tls: ServerTls | None = None
    threshold: float | None = None  # None: the model's default
    send_verdicts: bool = True
    action: str = "alert"  # suggested action for flagged rows
    max_message_bytes: int = codec.GRPC_DEFAULT_MAX_MESSAGE
    max_agents: int = 256  # concurrent Export streams; more are refused (RESOURCE_EXHAUSTED)
    # Shortest keepalive ping interval accepted from agents; their default is 30 s.
    min_ping_interval_s: float = 10.0

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"action must be one of {', '.join(ACTIONS)}")


_END = object()


@dataclass
class _Decoded:
    sequence: int
    decoded: codec.DecodedBatch | None  # None: malformed, see error
    error: str = ""
    sender: str = ""


def _decode(req: cpb.ExportRequest) -> _Decoded:
    msg = req.batch
    try:
        return _Decoded(msg.sequence, codec.decode_batch(msg))
    except codec.MalformedBatch as e:
        return _Decoded(msg.sequence, None, str(e), msg.node.node_name or msg.node.agent_id or "?")


class CollectorServicer(cgrpc.CollectorServicer):
    def __init__(self, model: Model, sinks: Sequence[Sink], settings: CollectorSettings, telemetry=None) -> None:
        self.model = model
        self.sinks = list(sinks)
        self.telemetry = telemetry  # xdpml.obs.telemetry.Telemetry or None
        self.settings = settings
        self.threshold = settings.threshold if settings.threshold is not None else model.default_threshold
        self.draining = threading.Event()
        self._lock = threading.Lock()
        self._sink_lock = threading.Lock()
        self.counters = collections.Counter({k: 0 for k in (
            "streams_total", "streams_active", "batches_received", "rows_received", "rows_scored",
            "rows_flagged", "batches_rejected", "verdicts_sent")})
        self.agents: dict[str, str] = {}  # agent_id -> node name, for logs

    def _count(self, **kw: int) -> None:
        with self._lock:
            self.counters.update(kw)

    def _metric(self, name: str, value: float, **attrs) -> None:
        if self.telemetry is None:
            return
        if name.endswith("latency"):
            self.telemetry.histogram(name).record(value, attrs)
        elif name == "xdpml.collector.agents":
            self.telemetry.up_down_counter(name).add(value, attrs)
        elif value:
            self.telemetry.counter(name).add(value, attrs)

    def Export(self, request_iterator, context) -> Iterator[cpb.ExportResponse]:
        self._count(streams_total=1, streams_active=1)
        self._metric("xdpml.collector.agents", 1)
        inbox: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()

        def read() -> None:
            try:
                for req in request_iterator:
                    # Decode here, so the handler scores batch k while this thread
                    # decodes batch k+1 (tree walking releases the GIL).
                    item = _decode(req)
                    while not stop.is_set():
                        try:
                            inbox.put(item, timeout=0.2)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
            except Exception:  # the RPC ended (cancelled, peer gone, message too large)
                pass
            finally:
                while not stop.is_set():
                    try:
                        inbox.put(_END, timeout=0.2)
                        return
                    except queue.Full:
                        continue

        reader = threading.Thread(target=read, name="xdpml-collector-read", daemon=True)
        reader.start()
        try:
            while True:
                if self.draining.is_set():
                    # Finish what this stream has already received, then hand the agent back.
                    stop.set()
                    while True:
                        try:
                            req = inbox.get_nowait()
                        except queue.Empty:
                            break
                        if req is not _END:
                            yield from self._handle(req)
                    context.set_code(grpc.StatusCode.UNAVAILABLE)
                    context.set_details("collector shutting down; re-send unacknowledged batches")
                    return
                try:
                    req = inbox.get(timeout=0.2)
                except queue.Empty:
                    if not context.is_active():
                        return
                    continue
                if req is _END:
                    return
                yield from self._handle(req)
        finally:
            stop.set()
            self._count(streams_active=-1)
            self._metric("xdpml.collector.agents", -1)

    def _handle(self, item: "_Decoded") -> Iterator[cpb.ExportResponse]:
        seq, dec = item.sequence, item.decoded
        if dec is None:
            self._count(batches_rejected=1)
            self._metric("xdpml.collector.errors", 1, kind="malformed_batch")
            log.warning("rejected batch %d from %s: %s", seq, item.sender, item.error)
            yield cpb.ExportResponse(ack=cpb.Ack(sequence=seq, error=item.error, error_code=INVALID_ARGUMENT))
            return
        n = len(dec.batch)
        self._count(batches_received=1, rows_received=n)
        self._metric("xdpml.collector.batches", 1, kind=dec.batch.kind)
        self._metric("xdpml.collector.rows", n, kind=dec.batch.kind)
        t0 = time.perf_counter()
        if dec.node.agent_id and dec.node.agent_id not in self.agents:
            self.agents[dec.node.agent_id] = dec.node.node_name
            log.info("agent %s on node %s connected", dec.node.agent_id, dec.node.node_name or "?")
        try:
            out = self.model.score(dec.batch)
        except ModelError as e:
            self._count(batches_rejected=1)
            self._metric("xdpml.collector.errors", 1, kind="model_input")
            log.warning("cannot score batch %d from %s: %s", seq, dec.node.node_name or "?", e)
            yield cpb.ExportResponse(ack=cpb.Ack(sequence=seq, error=str(e), error_code=FAILED_PRECONDITION))
            return
        except Exception as e:  # a model bug costs this batch, never the stream or the server
            self._count(batches_rejected=1)
            self._metric("xdpml.collector.errors", 1, kind="model_failure")
            log.exception("model %s failed on batch %d", self.model.name, seq)
            yield cpb.ExportResponse(ack=cpb.Ack(sequence=seq, error=f"model error: {type(e).__name__}: {e}",
                                                 error_code=INTERNAL))
            return
        score = np.asarray(out.score, dtype=np.float64)
        flagged = score >= self.threshold  # NaN (not scored) compares False
        if out.label is not None:
            label = np.asarray(out.label, dtype=object)
        else:
            label = np.where(np.isnan(score), "learning", np.where(flagged, "anomaly", "normal")).astype(object)
        nflag = int(flagged.sum())
        nscored = int(n - np.isnan(score).sum())
        self._count(rows_scored=nscored, rows_flagged=nflag)
        self._metric("xdpml.collector.model.latency", time.perf_counter() - t0, model=self.model.name)
        self._metric("xdpml.collector.scored", nscored, model=self.model.name)
        if nflag:
            for lab, cnt in zip(*np.unique(label[flagged].astype(str), return_counts=True)):
                self._metric("xdpml.collector.flagged", int(cnt), model=self.model.name, label=str(lab))
        if self.sinks:
            scored = ScoredBatch(dec.batch, score, label, flagged, dec.node.node_name, dec.node.agent_id, seq,
                                 self.model.name, self.model.version, now_ms())
            with self._sink_lock:
                for sink in self.sinks:
                    try:
                        sink.write(scored)
                    except Exception:
                        self._metric("xdpml.collector.errors", 1, kind="sink_failure")
                        log.exception("sink %s failed", type(sink).__name__)
        yield cpb.ExportResponse(ack=cpb.Ack(sequence=seq, rows_accepted=n))
        if nflag and self.settings.send_verdicts:
            yield cpb.ExportResponse(verdicts=self._verdicts(dec, seq, score, label, flagged))

    def _verdicts(self, dec: codec.DecodedBatch, seq: int, score, label, flagged) -> cpb.VerdictBatch:
        cols = dec.batch.columns
        idx = np.flatnonzero(flagged)[:MAX_VERDICTS_PER_BATCH]
        vb = cpb.VerdictBatch(sequence=seq, threshold=self.threshold)
        vb.model.name, vb.model.version = self.model.name, self.model.version
        keys = {}
        for name in ("src_ip", "dst_ip", "src_port", "dst_port", "protocol", "vlan_id"):
            c = cols.get(name)
            if c is None or c.ndim != 1:
                keys[name] = [None] * len(idx)
            elif c.dtype.kind == "S":
                # Not tolist(): numpy strips trailing NUL bytes (10.0.0.0 would lose a byte).
                raw, w = np.ascontiguousarray(c[idx]).tobytes(), c.dtype.itemsize
                keys[name] = [raw[k:k + w] for k in range(0, len(raw), w)]
            else:
                keys[name] = c[idx].tolist()
        action = ACTIONS[self.settings.action]
        for j, i in enumerate(idx.tolist()):
            v = vb.verdicts.add(row=i, score=float(score[i]), label=str(label[i]), action=action)
            k = v.key
            if isinstance(keys["src_ip"][j], bytes):
                k.src_ip = keys["src_ip"][j]
            if isinstance(keys["dst_ip"][j], bytes):
                k.dst_ip = keys["dst_ip"][j]
            for name in ("src_port", "dst_port", "protocol", "vlan_id"):
                if isinstance(keys[name][j], int):
                    setattr(k, name, keys[name][j])
        self._count(verdicts_sent=len(vb.verdicts))
        return vb


class ListenError(ServiceError):
    """The server cannot bind its address."""


class CollectorServer:
    """gRPC server with the Collector, health and reflection services.

    ``with CollectorServer(model, sinks, settings) as srv:`` starts it (``srv.port``
    is the bound port, useful with ``:0``) and drains and stops it on exit.
    """

    def __init__(self, model: Model, sinks: Sequence[Sink], settings: CollectorSettings, telemetry=None) -> None:
        self.settings = settings
        self.servicer = CollectorServicer(model, sinks, settings, telemetry)
        s = settings
        options = [
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", codec.GRPC_DEFAULT_MAX_MESSAGE),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", int(s.min_ping_interval_s * 1000)),
            ("grpc.http2.max_ping_strikes", 2),
            ("grpc.so_reuseport", 0),  # a second collector on the same port is an error, not a silent split
        ]
        # Each stream holds a handler thread (plus its reader thread) for its lifetime.
        self._pool = futures.ThreadPoolExecutor(max_workers=s.max_agents + 8, thread_name_prefix="xdpml-collector")
        self.server = grpc.server(self._pool, options=options, maximum_concurrent_rpcs=s.max_agents + 8)
        cgrpc.add_CollectorServicer_to_server(self.servicer, self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), self.server)
        try:
            if s.tls is not None:
                self.port = self.server.add_secure_port(s.listen, s.tls.credentials())
            else:
                self.port = self.server.add_insecure_port(s.listen)
        except RuntimeError as e:
            raise ListenError(f"cannot listen on {s.listen}: {e}") from None
        if not self.port:
            raise ListenError(f"cannot listen on {s.listen} (address in use or not local?)")
        self._stopped = False

    def start(self) -> "CollectorServer":
        self.server.start()
        for name in ("", SERVICE):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("collector listening on %s (port %d, %s)", self.settings.listen, self.port,
                 "TLS" if self.settings.tls else "plaintext")
        return self

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop taking batches, finish the ones received, then close the sinks."""
        if self._stopped:
            return
        self._stopped = True
        self.health.enter_graceful_shutdown()
        self.servicer.draining.set()
        # Bounded: a handler stuck in a model call must not hang the process on exit.
        if not self.server.stop(grace_s).wait(grace_s + 5):
            log.warning("gRPC server did not stop within %.0f s; exiting anyway", grace_s + 5)
        self._pool.shutdown(wait=False)
        for sink in self.servicer.sinks:
            try:
                sink.close()
            except Exception:
                log.exception("closing sink %s failed", type(sink).__name__)
        self.servicer.model.close()

    def stats(self) -> dict[str, int]:
        with self.servicer._lock:
            return dict(self.servicer.counters)

    def __enter__(self) -> "CollectorServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
