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
import re
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from xdpml.collector import wire_schema
from xdpml.collector.models import Model, ModelError
from xdpml.collector.policy import ACTION_NAMES, ACTIONS, Policy, Rule
from xdpml.collector.sinks import ScoredBatch, Sink, now_ms

from xdpml.errors import ConfigError, ServiceError
from xdpml.wire import codec
from xdpml.wire.columns import ColumnBatch
from xdpml.wire.tls import ServerTls
from xdpml.wire.v1 import collector_pb2 as cpb
from xdpml.wire.v1 import collector_pb2_grpc as cgrpc

log = logging.getLogger(__name__)

SERVICE = cpb.DESCRIPTOR.services_by_name["Collector"].full_name
# google.rpc.Code values used in Ack.error_code.
INVALID_ARGUMENT, FAILED_PRECONDITION, INTERNAL = 3, 9, 13
MAX_VERDICTS_PER_BATCH = 10_000
# Identity fields a client sends: bounded, so they can key a table and go into logs.
AGENT_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
NODE_NAME_RE = re.compile(r"[\x21-\x7e]{1,253}")  # printable ASCII, no spaces (DNS names fit)
# Pool threads no Export stream can take: health checks and refusals always find one.
RESERVED_WORKERS = 8


def printable(text: str, limit: int = 120) -> str:
    """A client-supplied string made safe for one log line: control and non-ASCII
    characters escaped (a newline cannot start a forged line), long text cut."""
    out = text.encode("ascii", "backslashreplace").decode("ascii")
    out = "".join(c if " " <= c <= "~" else f"\\x{ord(c):02x}" for c in out)
    return out if len(out) <= limit else f"{out[:limit]}...({len(text)} chars)"


class _Throttled:
    """Log a warning at most once per ``every_s`` (then how many were not logged): a
    flood of bad input must not flood the logs."""

    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s, self._next, self._skipped = every_s, 0.0, 0
        self._lock = threading.Lock()

    def warning(self, msg: str, *args) -> None:
        with self._lock:
            now = time.monotonic()
            if now < self._next:
                self._skipped += 1
                return
            skipped, self._skipped, self._next = self._skipped, 0, now + self.every_s
        log.warning(msg + (f" (and {skipped} more like it since the last report)" if skipped else ""), *args)


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT``, port 0-65535 (0: the system picks one); else ConfigError.

    gRPC itself would serve ``127.0.0.1`` (no port) on 443 and bind some other port for
    ``:99999``; both are refused here."""
    text = listen.strip()
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or (host.count(":") and not (host.startswith("[") and host.endswith("]"))):
        raise ConfigError(f"--listen {listen!r}: expected HOST:PORT (e.g. 127.0.0.1:50051, [::1]:50051, 0.0.0.0:50051)")
    if not host or host == "[]":
        raise ConfigError(
            f"--listen {listen!r}: give the address to listen on (127.0.0.1 for this host only, "
            "0.0.0.0 for every interface)"
        )
    value = int(port)
    if value > 65535:
        raise ConfigError(f"--listen {listen!r}: port {value} is out of range (0-65535; 0 picks a free port)")
    return host, value


@dataclass
class CollectorSettings:
    listen: str = "127.0.0.1:50051"
    tls: ServerTls | None = None
    threshold: float | None = None  # None: the model's default
    send_verdicts: bool = True
    action: str = "alert"  # suggested action for flagged rows (the default rule when no policy is given)
    policy: Policy | None = None  # None: every flagged row gets `action`, TTL 300 s, no dry-run
    max_message_bytes: int = codec.GRPC_DEFAULT_MAX_MESSAGE
    max_agents: int = 256  # concurrent Export streams; more are refused (RESOURCE_EXHAUSTED)
    max_streams_per_peer: int = 16  # concurrent Export streams from one address
    max_tracked_agents: int = 4096  # agent ids remembered for logs (least recently seen go first)
    idle_timeout_s: float = 300.0  # a stream without a complete message for this long is ended
    max_stream_age_s: float = 3600.0  # then the stream is drained and ended; the agent reconnects (0: never)
    reflection: bool = False  # gRPC server reflection (lists the services to anyone who asks)
    # Who may teach the embedded model its baseline: () nobody (default), ("any",),
    # ("authenticated",) any verified client certificate, or certificate names.
    learn_from: tuple[str, ...] = ()
    # Shortest keepalive ping interval accepted from agents; their default is 30 s.
    min_ping_interval_s: float = 10.0
    # The server pings connections silent for this long and closes those that do not answer.
    keepalive_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    # a signed model envelope (`xdpml model sign`) sent to every agent once per version; "" = none
    push_model: str = ""

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ConfigError(f"action must be one of {', '.join(ACTIONS)}")
        if self.policy is None:
            self.policy = Policy(Rule(action=self.action))
        parse_listen(self.listen)
        for name in ("max_agents", "max_streams_per_peer", "max_tracked_agents"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be at least 1")
        if self.idle_timeout_s <= 0 or self.max_stream_age_s < 0:
            raise ConfigError("idle timeout must be > 0 s and the stream age limit >= 0 s")
        self.learn_from = tuple(self.learn_from)
        if self.learn_from:
            if self.tls is None and self.learn_from != ("any",):
                raise ConfigError(
                    "--learn-from authenticated agents needs mutual TLS (--tls-cert, --tls-key, "
                    "--tls-client-ca); '--learn-from any' lets every peer teach the baseline"
                )
            if self.tls is not None and not self.tls.client_ca_file and self.learn_from != ("any",):
                raise ConfigError(
                    "--learn-from needs --tls-client-ca: without client certificates no agent is authenticated"
                )
            if "any" in self.learn_from and len(self.learn_from) > 1:
                raise ConfigError("--learn-from any cannot be combined with names")


_END = object()


class _BadMessage:
    """The stream sent bytes that are not an ExportRequest: it ends with INVALID_ARGUMENT."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


@dataclass
class _Decoded:
    sequence: int
    decoded: codec.DecodedBatch | None  # None: malformed, see error
    error: str = ""
    sender: str = ""
    schema: bool = False  # rejected for not fitting wire schema v1


def _decode(raw: bytes | cpb.ExportRequest) -> _Decoded | _BadMessage:
    # Parsed here rather than by grpcio's deserializer: its failure path leaks the
    # message and answers INTERNAL; this answers INVALID_ARGUMENT and frees everything.
    # (A servicer mounted with the generated add_CollectorServicer_to_server gets
    # messages grpcio already parsed: those are taken as they are.)
    try:
        req = raw if isinstance(raw, cpb.ExportRequest) else cpb.ExportRequest.FromString(raw)
    except Exception as e:  # google.protobuf.message.DecodeError, or a C++ parse error
        return _BadMessage(f"request is not an xdpml.v1.ExportRequest ({type(e).__name__})")
    msg = req.batch
    node = msg.node
    sender = printable(node.node_name or node.agent_id or "?", 64)
    if node.agent_id and not AGENT_ID_RE.fullmatch(node.agent_id):
        return _Decoded(msg.sequence, None, "node.agent_id must be 1-64 characters of A-Z a-z 0-9 . _ : -", sender)
    if node.node_name and not NODE_NAME_RE.fullmatch(node.node_name):
        return _Decoded(
            msg.sequence, None, "node.node_name must be 1-253 printable ASCII characters without spaces", sender
        )
    if len(node.agent_version) > 64:
        return _Decoded(msg.sequence, None, "node.agent_version must be at most 64 characters", sender)
    try:
        dec = codec.decode_batch(msg)
    except codec.MalformedBatch as e:
        return _Decoded(msg.sequence, None, printable(str(e), 200), sender)
    why = schema_mismatch(dec.batch)
    if why:
        return _Decoded(msg.sequence, None, why, sender, schema=True)
    return _Decoded(msg.sequence, dec)


EXPIRATION_EARLY = 3  # expiration_id of an early snapshot (docs/features.md)


def early_rows(batch: ColumnBatch) -> np.ndarray | None:
    """Mask of the early snapshots in a flow batch (None when there are none)."""
    col = batch.columns.get("expiration_id") if batch.kind == "flow" else None
    if col is None or col.ndim != 1:
        return None
    mask = np.asarray(col) == EXPIRATION_EARLY
    return mask if mask.any() else None


def schema_mismatch(batch: ColumnBatch) -> str:
    """'' when every column wire schema v1 knows has its v1 type and shape, else why not.
    Columns v1 does not know are allowed (the sinks decide what to keep)."""
    table = wire_schema.V1.get(batch.kind, {})
    for name, col in batch.columns.items():
        spec = table.get(name)
        if spec is None:
            continue
        want = np.dtype(spec.dtype)
        ndim = 2 if spec.role == "sequence" else 1
        if (col.dtype.kind, col.dtype.itemsize) != (want.kind, want.itemsize) and not (
            want.kind == "O" and col.dtype.kind in "OU"
        ):
            return (
                f"column {name} is {col.dtype.name}; wire schema {wire_schema.SCHEMA_VERSION} says "
                f"{'text' if want.kind == 'O' else want.name}"
            )
        if col.ndim != ndim:
            return f"column {name} has {col.ndim} dimension(s); wire schema {wire_schema.SCHEMA_VERSION} says {ndim}"
    return ""


def _peer_address(peer: str) -> str:
    """``ipv4:10.0.0.1:5555`` -> ``ipv4:10.0.0.1``: streams are capped per address."""
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rpartition(":")[0]
    return peer


def _identities(context) -> list[str]:
    """Names in the peer's verified client certificate (empty without mTLS)."""
    auth = context.auth_context() or {}
    names = []
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        names += [v.decode("utf-8", "replace") for v in auth.get(key, [])]
    return names


def sanitize_features(batch: ColumnBatch, names: Sequence[str]) -> tuple[ColumnBatch, dict[str, int]]:
    """The batch with NaN and +-inf in the float feature columns ``names`` replaced by 0,
    and how many were replaced per column. Other columns (and the rows stored by the
    sinks) are untouched; a model never sees a non-finite value."""
    fixed, counts = {}, {}
    for name in names:
        col = batch.columns.get(name)
        if col is None or col.dtype.kind != "f":
            continue
        bad = ~np.isfinite(col)
        n = int(bad.sum())
        if n:
            counts[name] = n
            fixed[name] = np.where(bad, 0, col).astype(col.dtype)
    if not fixed:
        return batch, counts
    return ColumnBatch(batch.kind, {**batch.columns, **fixed}, batch.specs), counts


class CollectorServicer(cgrpc.CollectorServicer):
    def __init__(self, model: Model, sinks: Sequence[Sink], settings: CollectorSettings, telemetry=None) -> None:
        self.model = model
        self.sinks = list(sinks)
        self.telemetry = telemetry  # xdpml.obs.telemetry.Telemetry or None
        self.settings = settings
        self.policy: Policy = settings.policy
        # The threshold of rules that name none: --threshold, else the model's default.
        self.base_threshold = settings.threshold if settings.threshold is not None else model.default_threshold
        # The default rule's threshold (reported in VerdictBatch.threshold).
        self.threshold = (
            self.policy.default.threshold if self.policy.default.threshold is not None else self.base_threshold
        )
        self.draining = threading.Event()
        self._lock = threading.Lock()
        self._sink_lock = threading.Lock()
        self.push = None
        if settings.push_model:
            from xdpml.collector.push import ModelPush

            self.push = ModelPush(settings.push_model)
        self.counters = collections.Counter(
            {
                k: 0
                for k in (
                    "streams_total",
                    "streams_active",
                    "streams_refused",
                    "streams_idle_closed",
                    "streams_aged_out",
                    "batches_received",
                    "rows_received",
                    "rows_scored",
                    "rows_flagged",
                    "rows_unscored",
                    "rows_early",
                    "early_flagged",
                    "decision_rows",
                    "batches_rejected",
                    "schema_mismatches",
                    "bad_messages",
                    "verdicts_sent",
                    "models_pushed",
                    "agents_evicted",
                    "nonfinite_values",
                    *(f"verdicts_{a.replace('-', '_')}" for a in ACTIONS),
                )
            }
        )
        self.nonfinite: collections.Counter = collections.Counter()  # column -> values replaced
        # agent_id -> node name, for logs; least recently seen first, at most max_tracked_agents.
        self.agents: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._per_peer: collections.Counter = collections.Counter()
        self._learns = bool(getattr(model, "learns", False))
        self._bad_log, self._reject_log = _Throttled(), _Throttled()

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

    def _learn_source(self, context) -> str | None:
        """Who this stream's rows may be learned as (None: they may not teach the baseline)."""
        allowed = self.settings.learn_from
        if not self._learns or not allowed:
            return None
        names = _identities(context)
        if allowed == ("any",):
            return names[0] if names else _peer_address(context.peer())
        if allowed == ("authenticated",):
            return names[0] if names else None
        return next((n for n in names if n in allowed), None)

    def _admit(self, peer: str) -> str:
        """'' when the stream may run, else why it is refused."""
        with self._lock:
            if self.counters["streams_active"] >= self.settings.max_agents:
                return f"collector at its limit of {self.settings.max_agents} streams"
            if self._per_peer[peer] >= self.settings.max_streams_per_peer:
                return f"{self.settings.max_streams_per_peer} streams from this address already"
            self._per_peer[peer] += 1
            self.counters.update(streams_total=1, streams_active=1)
        return ""

    def _release(self, peer: str) -> None:
        with self._lock:
            self._per_peer[peer] -= 1
            if self._per_peer[peer] <= 0:
                del self._per_peer[peer]
            self.counters.update(streams_active=-1)

    def Export(self, request_iterator, context) -> Iterator[cpb.ExportResponse]:
        peer = _peer_address(context.peer())
        why = self._admit(peer)
        if why:
            self._count(streams_refused=1)
            self._metric("xdpml.collector.streams.closed", 1, reason="limit")
            context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
            context.set_details(why)
            return
        self._metric("xdpml.collector.agents", 1)
        try:
            yield from self._stream(request_iterator, context, self._learn_source(context))
        finally:
            self._release(peer)
            self._metric("xdpml.collector.agents", -1)

    def _stream(self, request_iterator, context, learn: str | None) -> Iterator[cpb.ExportResponse]:
        s = self.settings
        inbox: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()
        started = last = time.monotonic()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    inbox.put(item, timeout=0.2)
                    return True
                except queue.Full:
                    continue
            return False

        def read() -> None:
            nonlocal last
            try:
                for raw in request_iterator:
                    last = time.monotonic()
                    # Decode here, so the handler scores batch k while this thread
                    # decodes batch k+1 (tree walking releases the GIL).
                    item = _decode(raw)
                    if not put(item) or isinstance(item, _BadMessage):
                        return
            except Exception:  # the RPC ended (cancelled, peer gone, message too large)
                pass
            put(_END)

        reader = threading.Thread(target=read, name="xdpml-collector-read", daemon=True)
        reader.start()
        pushed = None  # the version of the model this stream was sent
        try:
            while True:
                update = self.push.current() if self.push is not None else None
                if update is not None and update.version != pushed:
                    pushed = update.version
                    self._count(models_pushed=1)
                    yield cpb.ExportResponse(model=update)
                ending = None
                if self.draining.is_set():
                    ending = "collector shutting down; re-send unacknowledged batches"
                elif s.max_stream_age_s and time.monotonic() - started > s.max_stream_age_s:
                    self._count(streams_aged_out=1)
                    self._metric("xdpml.collector.streams.closed", 1, reason="max_age")
                    ending = f"stream older than {s.max_stream_age_s:g} s; reconnect and re-send unacknowledged batches"
                if ending:
                    # Finish what this stream has already received, then hand the agent back.
                    stop.set()
                    while True:
                        try:
                            req = inbox.get_nowait()
                        except queue.Empty:
                            break
                        if isinstance(req, _Decoded):
                            yield from self._handle(req, learn)
                    context.set_code(grpc.StatusCode.UNAVAILABLE)
                    context.set_details(ending)
                    return
                try:
                    req = inbox.get(timeout=0.2)
                except queue.Empty:
                    if not context.is_active():
                        return
                    if time.monotonic() - last > s.idle_timeout_s:
                        self._count(streams_idle_closed=1)
                        self._metric("xdpml.collector.streams.closed", 1, reason="idle")
                        context.set_code(grpc.StatusCode.UNAVAILABLE)
                        context.set_details(f"no message for {s.idle_timeout_s:g} s; reconnect when there is data")
                        return
                    continue
                if req is _END:
                    return
                if isinstance(req, _BadMessage):
                    self._count(bad_messages=1)
                    self._metric("xdpml.collector.errors", 1, kind="bad_message")
                    self._bad_log.warning("ended a stream from %s: %s", printable(context.peer()), req.reason)
                    context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
                    context.set_details(req.reason)
                    return
                yield from self._handle(req, learn)
        finally:
            stop.set()

    def _remember(self, node: codec.NodeIdentity) -> None:
        with self._lock:
            if node.agent_id in self.agents:
                self.agents.move_to_end(node.agent_id)
                return
            self.agents[node.agent_id] = node.node_name
            evicted = 0
            while len(self.agents) > self.settings.max_tracked_agents:
                self.agents.popitem(last=False)
                evicted += 1
            self.counters.update(agents_evicted=evicted)
        self._metric("xdpml.collector.agents.evicted", evicted)
        log.info("agent %s on node %s connected", node.agent_id, node.node_name or "?")

    def _to_sinks(self, scored: ScoredBatch) -> None:
        """One batch to every sink, under the sink lock; a failing sink is counted and logged."""
        with self._sink_lock:
            for sink in self.sinks:
                try:
                    sink.write(scored)
                except Exception:
                    self._metric("xdpml.collector.errors", 1, kind="sink_failure")
                    log.exception("sink %s failed", type(sink).__name__)

    def _decisions(self, dec, seq: int, n: int) -> Iterator[cpb.ExportResponse]:
        """Sampled decisions of a model running in an agent's kernel: not scored, no
        verdicts; counted per model and action and stored by the sinks (label = the
        kernel's class, score NaN, never flagged) for audit and retraining."""
        b = dec.batch
        self._count(decision_rows=n)
        if self.telemetry is not None and "action" in b.columns and "model_id" in b.columns:
            pairs = np.stack([b["model_id"].astype(np.int64).astype(str), b["action"].astype(str)], axis=1)
            for (mid, act), cnt in zip(*np.unique(pairs, axis=0, return_counts=True)):
                self._metric("xdpml.collector.kernel_decisions", int(cnt), model_id=str(mid), action=str(act))
        if self.sinks and n:
            cls = b.columns.get("class")
            label = (
                np.array([f"class {int(c)}" for c in cls], dtype=object) if cls is not None else np.full(n, "", object)
            )
            scored = ScoredBatch(
                b,
                np.full(n, np.nan),
                label,
                np.zeros(n, dtype=bool),
                dec.node.node_name,
                dec.node.agent_id,
                seq,
                "kernel",
                "",
                now_ms(),
            )
            self._to_sinks(scored)
        yield cpb.ExportResponse(ack=cpb.Ack(sequence=seq, rows_accepted=n))

    def _handle(self, item: _Decoded, learn: str | None = None) -> Iterator[cpb.ExportResponse]:
        seq, dec = item.sequence, item.decoded
        if dec is None:
            self._count(batches_rejected=1, schema_mismatches=int(item.schema))
            self._metric("xdpml.collector.errors", 1, kind="schema_mismatch" if item.schema else "malformed_batch")
            self._reject_log.warning("rejected batch %d from %s: %s", seq, item.sender, item.error)
            yield cpb.ExportResponse(ack=cpb.Ack(sequence=seq, error=item.error, error_code=INVALID_ARGUMENT))
            return
        n = len(dec.batch)
        self._count(batches_received=1, rows_received=n)
        self._metric("xdpml.collector.batches", 1, kind=dec.batch.kind)
        self._metric("xdpml.collector.rows", n, kind=dec.batch.kind)
        t0 = time.perf_counter()
        if dec.node.agent_id:
            self._remember(dec.node)
        if dec.batch.kind == "decision":
            yield from self._decisions(dec, seq, n)
            return
        batch, nonfinite = sanitize_features(dec.batch, self.model.feature_names)
        if nonfinite:
            with self._lock:
                self.nonfinite.update(nonfinite)
                self.counters.update(nonfinite_values=sum(nonfinite.values()))
            for col, cnt in nonfinite.items():
                self._metric("xdpml.collector.nonfinite", cnt, column=col)
        early = early_rows(dec.batch)
        try:
            score, out_label = self._score(batch, learn, early)
        except ModelError as e:
            self._count(batches_rejected=1)
            self._metric("xdpml.collector.errors", 1, kind="model_input")
            log.warning("cannot score batch %d from %s: %s", seq, printable(dec.node.node_name or "?"), e)
            yield cpb.ExportResponse(ack=cpb.Ack(sequence=seq, error=str(e), error_code=FAILED_PRECONDITION))
            return
        except Exception as e:  # a model bug costs this batch, never the stream or the server
            self._count(batches_rejected=1)
            self._metric("xdpml.collector.errors", 1, kind="model_failure")
            log.exception("model %s failed on batch %d", self.model.name, seq)
            yield cpb.ExportResponse(
                ack=cpb.Ack(sequence=seq, error=f"model error: {type(e).__name__}: {e}", error_code=INTERNAL)
            )
            return
        decision = self.policy.decide(self.model.name, score, out_label, self.base_threshold)
        flagged = decision.flagged  # NaN (not scored) is never flagged
        if out_label is not None:
            label = np.asarray(out_label, dtype=object)
        else:
            label = np.where(np.isnan(score), "learning", np.where(flagged, "anomaly", "normal")).astype(object)
        nflag = int(flagged.sum())
        self._metric("xdpml.collector.model.latency", time.perf_counter() - t0, model=self.model.name)
        final = None
        if early is not None:
            # early snapshots are judged (verdicts) but counted apart and never stored or
            # learned: the flow's final record comes later, and counts it once
            ne, eflag = int(early.sum()), int((flagged & early).sum())
            self._count(rows_early=ne, early_flagged=eflag)
            self._metric("xdpml.collector.early_rows", ne - eflag, model=self.model.name, flagged="false")
            self._metric("xdpml.collector.early_rows", eflag, model=self.model.name, flagged="true")
            final = ~early
        fscore, fflag, flabel = score, flagged, label
        if final is not None:
            fscore, fflag, flabel = score[final], flagged[final], label[final]
        nf = len(fscore)
        nfflag = int(fflag.sum())
        nscored = int(nf - np.isnan(fscore).sum())
        self._count(rows_scored=nscored, rows_flagged=nfflag, rows_unscored=nf - nscored)
        self._metric("xdpml.collector.scored", nscored, model=self.model.name)
        if nfflag:
            for lab, cnt in zip(*np.unique(flabel[fflag].astype(str), return_counts=True)):
                self._metric("xdpml.collector.flagged", int(cnt), model=self.model.name, label=str(lab))
        if self.sinks and nf:
            scored = ScoredBatch(
                dec.batch if final is None else dec.batch.select(final),
                fscore,
                flabel,
                fflag,
                dec.node.node_name,
                dec.node.agent_id,
                seq,
                self.model.name,
                self.model.version,
                now_ms(),
            )
            self._to_sinks(scored)
        yield cpb.ExportResponse(ack=cpb.Ack(sequence=seq, rows_accepted=n))
        if nflag and self.settings.send_verdicts:
            yield cpb.ExportResponse(verdicts=self._verdicts(dec, seq, score, label, decision))

    def _score(self, batch: ColumnBatch, learn: str | None, early: np.ndarray | None):
        """(score, label or None) for every row; early snapshots never teach the baseline."""

        def run(part: ColumnBatch, learn_from: str | None):
            if self._learns:
                out = self.model.score(part, learn_from=learn_from)
            else:
                out = self.model.score(part)
            return np.asarray(out.score, dtype=np.float64), out.label

        if early is None:
            return run(batch, learn)
        if early.all():
            return run(batch, None)
        s_final, l_final = run(batch.select(~early), learn)
        s_early, l_early = run(batch.select(early), None)
        score = np.empty(len(batch), dtype=np.float64)
        score[~early], score[early] = s_final, s_early
        label = None
        if l_final is not None or l_early is not None:
            label = np.empty(len(batch), dtype=object)
            label[~early] = l_final if l_final is not None else ""
            label[early] = l_early if l_early is not None else ""
        return score, label

    def _verdicts(self, dec: codec.DecodedBatch, seq: int, score, label, decision) -> cpb.VerdictBatch:
        cols = dec.batch.columns
        idx = np.flatnonzero(decision.flagged)[:MAX_VERDICTS_PER_BATCH]
        vb = cpb.VerdictBatch(sequence=seq, threshold=self.threshold, dry_run=self.policy.dry_run)
        vb.model.name, vb.model.version = self.model.name, self.model.version
        keys = {}
        for name in ("src_ip", "dst_ip", "src_port", "dst_port", "protocol", "vlan_id"):
            c = cols.get(name)
            if c is None or c.ndim != 1:
                keys[name] = [None] * len(idx)
            elif c.dtype.kind == "S":
                # Not tolist(): numpy strips trailing NUL bytes (10.0.0.0 would lose a byte).
                raw, w = np.ascontiguousarray(c[idx]).tobytes(), c.dtype.itemsize
                keys[name] = [raw[k : k + w] for k in range(0, len(raw), w)]
            else:
                keys[name] = c[idx].tolist()
        sent, chosen, ttl = (
            decision.action[idx].tolist(),
            decision.policy_action[idx].tolist(),
            decision.ttl_seconds[idx].tolist(),
        )
        for j, i in enumerate(idx.tolist()):
            v = vb.verdicts.add(
                row=i,
                score=float(score[i]),
                label=str(label[i]),
                action=sent[j],
                policy_action=chosen[j],
                ttl_seconds=ttl[j],
            )
            k = v.key
            if isinstance(keys["src_ip"][j], bytes):
                k.src_ip = keys["src_ip"][j]
            if isinstance(keys["dst_ip"][j], bytes):
                k.dst_ip = keys["dst_ip"][j]
            for name in ("src_port", "dst_port", "protocol", "vlan_id"):
                if isinstance(keys[name][j], int):
                    setattr(k, name, keys[name][j])
        self._count(verdicts_sent=len(vb.verdicts))
        dry = "true" if self.policy.dry_run else "false"
        for code, cnt in zip(*np.unique(np.asarray(sent, dtype=np.int32), return_counts=True), strict=True):
            name = ACTION_NAMES[int(code)]
            self._count(**{f"verdicts_{name.replace('-', '_')}": int(cnt)})
            self._metric("xdpml.collector.verdicts", int(cnt), model=self.model.name, action=name, dry_run=dry)
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
            # Ping silent connections, close those that do not answer: a vanished peer's
            # streams are freed instead of holding workers until the idle timeout.
            ("grpc.keepalive_time_ms", int(s.keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(s.keepalive_timeout_s * 1000)),
            ("grpc.http2.ping_timeout_ms", int(s.keepalive_timeout_s * 1000)),  # newer gRPC cores use this one
            # Keep pinging an idle stream (the default stops after 2 pings without data).
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.so_reuseport", 0),  # a second collector on the same port is an error, not a silent split
        ]
        # Each stream holds a handler thread (plus its own reader thread) for its
        # lifetime; the servicer admits at most max_agents of them, so RESERVED_WORKERS
        # threads are always left for health checks and for refusing streams.
        workers = s.max_agents + RESERVED_WORKERS
        self._pool = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="xdpml-collector")
        self.server = grpc.server(self._pool, options=options, maximum_concurrent_rpcs=workers + 4 * RESERVED_WORKERS)
        # Request bytes reach the handler unparsed (no request_deserializer): see _decode.
        export = grpc.stream_stream_rpc_method_handler(
            self.servicer.Export, request_deserializer=None, response_serializer=cpb.ExportResponse.SerializeToString
        )
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Export": export}),))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if s.reflection:
            reflection.enable_server_reflection(
                (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
                self.server,
            )
        try:
            if s.tls is not None:
                self.port = self.server.add_secure_port(s.listen, s.tls.credentials())
            else:
                self.port = self.server.add_insecure_port(s.listen)
        except RuntimeError as e:
            raise ListenError(f"cannot listen on {s.listen}: {e}") from None
        if not self.port:
            raise ListenError(f"cannot listen on {s.listen} (address in use or not local?)")
        if telemetry is not None and getattr(model, "learns", False):

            def baseline_rows():
                p = model.provenance
                return {p.get("source", "?"): p.get("rows", 0)} if p else {"none": 0}

            telemetry.observe_gauge("xdpml.collector.baseline.rows", baseline_rows)
        self._stopped = False
        self._ticker_stop = threading.Event()
        self._ticker = None

    def _tick(self) -> None:
        # Time-bound sink work (Parquet row groups and file rotation) for quiet periods.
        while not self._ticker_stop.wait(1.0):
            with self.servicer._sink_lock:
                for sink in self.servicer.sinks:
                    tick = getattr(sink, "tick", None)
                    if tick is None:
                        continue
                    try:
                        tick()
                    except Exception:
                        self.servicer._metric("xdpml.collector.errors", 1, kind="sink_failure")
                        log.exception("sink %s failed", type(sink).__name__)

    def start(self) -> CollectorServer:
        self._ticker = threading.Thread(target=self._tick, name="xdpml-collector-tick", daemon=True)
        self._ticker.start()
        self.server.start()
        for name in ("", SERVICE):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "collector listening on %s (port %d, %s)",
            self.settings.listen,
            self.port,
            "TLS" if self.settings.tls else "plaintext",
        )
        return self

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop taking batches, finish the ones received, then close the sinks.

        Takes at most about ``grace_s`` + 1 s: streams still open then are cancelled."""
        if self._stopped:
            return
        self._stopped = True
        self.health.enter_graceful_shutdown()
        self.servicer.draining.set()
        # Bounded: a handler stuck in a model call must not hang the process on exit.
        if not self.server.stop(grace_s).wait(grace_s + 1):
            log.warning("gRPC server did not stop within %.0f s; exiting anyway", grace_s + 1)
        self._pool.shutdown(wait=False)
        self._ticker_stop.set()
        if self._ticker is not None:
            self._ticker.join(2.0)
        # A handler still writing (a cancelled stream) finishes its batch first, within bounds.
        locked = self.servicer._sink_lock.acquire(timeout=2.0)
        try:
            for sink in self.servicer.sinks:
                try:
                    sink.close()
                except Exception:
                    log.exception("closing sink %s failed", type(sink).__name__)
        finally:
            if locked:
                self.servicer._sink_lock.release()
        self.servicer.model.close()

    def stats(self) -> dict[str, int]:
        with self.servicer._lock:
            return dict(self.servicer.counters)

    def __enter__(self) -> CollectorServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
