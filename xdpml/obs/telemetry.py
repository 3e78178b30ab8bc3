"""OpenTelemetry metrics for the agent and the collector.

One small facade over the OpenTelemetry SDK so that the rest of the code never touches
meter providers, readers or exporters:

    settings = TelemetrySettings(service_name="xdpml-agent", prometheus_port=9464,
                                 otlp_endpoint="otel-collector:4317")
    with Telemetry.from_settings(settings) as tel:
        packets = tel.counter("xdpml.agent.packets")
        packets.add(120, {"interface": "eth0", "direction": "src2dst"})
        tel.observe_gauge("xdpml.agent.queue.depth", lambda: exporter.queue_depth)

Every metric the project emits is declared once in ``METRICS`` (name, kind, unit,
description, attribute keys). Asking for an undeclared name, or for a declared name as
the wrong kind, raises ``TelemetryError``: this keeps docs/metrics.md, the dashboards and
the code in step (a test checks that the document lists exactly these names).

Two exporters, each optional and selected by settings:
  * OTLP over gRPC (a periodic reader pushes every ``otlp_interval_s``);
  * a Prometheus scrape endpoint (prometheus_client's HTTP server on its own registry,
    so several Telemetry objects can live in one process, as the tests need).
With neither enabled, ``from_settings`` returns a no-op Telemetry whose instruments accept
calls and do nothing, so callers never branch on "are metrics on?".
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import metrics as otel_metrics
from opentelemetry.metrics import CallbackOptions, Observation

from xdpml import __version__
from xdpml.errors import ConfigError

log = logging.getLogger(__name__)

COUNTER = "counter"
UP_DOWN_COUNTER = "up_down_counter"
HISTOGRAM = "histogram"
OBSERVABLE_GAUGE = "observable_gauge"
OBSERVABLE_COUNTER = "observable_counter"
KINDS = (COUNTER, UP_DOWN_COUNTER, HISTOGRAM, OBSERVABLE_GAUGE, OBSERVABLE_COUNTER)

# Latency buckets in seconds: 0.5 ms .. 10 s. The SDK's default buckets assume
# milliseconds (0, 5, 10, ... 10000), which would put every batch in the first bucket.
LATENCY_BUCKETS_S = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class TelemetryError(ConfigError):
    """Bad telemetry settings or a metric used the wrong way; the message says which."""


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str
    unit: str
    description: str
    attributes: tuple[str, ...] = ()


def _m(name: str, kind: str, unit: str, description: str, *attributes: str) -> MetricSpec:
    return MetricSpec(name, kind, unit, description, tuple(attributes))


# The catalogue. Names follow OpenTelemetry conventions (dotted, unit in the `unit`
# field, not in the name); the Prometheus exporter turns `xdpml.agent.packets` into
# `xdpml_agent_packets_total` and unit "s" into a `_seconds` suffix.
METRICS: dict[str, MetricSpec] = {
    s.name: s
    for s in (
        # ---- agent ---------------------------------------------------------
        _m(
            "xdpml.agent.packets",
            COUNTER,
            "{packet}",
            "Packets counted in flows harvested from the kernel flow table.",
            "interface",
            "direction",
        ),
        _m(
            "xdpml.agent.bytes",
            COUNTER,
            "By",
            "Bytes (L2 frame length) counted in harvested flows.",
            "interface",
            "direction",
        ),
        _m("xdpml.agent.flows", COUNTER, "{flow}", "Flows harvested from the kernel, by why they ended.", "reason"),
        _m("xdpml.agent.exported", COUNTER, "{row}", "Feature rows handed to a sink successfully.", "kind", "sink"),
        _m(
            "xdpml.agent.dropped",
            COUNTER,
            "{row}",
            "Feature rows dropped in user space (bounded queue full, sink error, no socket consumer).",
            "kind",
            "reason",
        ),
        _m(
            "xdpml.agent.lost",
            COUNTER,
            "{event}",
            "Kernel events that reach no record (flow table full or busy, ring buffer full).",
            "source",
        ),
        _m(
            "xdpml.agent.kernel.events",
            OBSERVABLE_COUNTER,
            "{event}",
            "The BPF programs' own per-CPU counters, summed over CPUs, by counter kind.",
            "kind",
        ),
        _m(
            "xdpml.agent.queue.depth",
            OBSERVABLE_GAUGE,
            "{batch}",
            "Batches waiting in the exporter's bounded queue.",
            "queue",
        ),
        _m(
            "xdpml.agent.reconnects",
            COUNTER,
            "{reconnect}",
            "gRPC stream reconnect attempts to the collector, by status code.",
            "code",
        ),
        _m(
            "xdpml.agent.batch.latency",
            HISTOGRAM,
            "s",
            "Time from a batch being sealed to the collector's acknowledgement.",
            "sink",
        ),
        _m("xdpml.agent.verdicts", COUNTER, "{verdict}", "Verdicts received from the collector.", "label", "action"),
        _m(
            "xdpml.agent.model.updates",
            COUNTER,
            "{update}",
            "Signed models the collector pushed, by outcome.",
            "result",
        ),
        _m(
            "xdpml.agent.enforce.verdicts_refused",
            COUNTER,
            "{verdict}",
            "Verdicts that made no rule, by reason (docs/enforcement.md).",
            "reason",
        ),
        _m(
            "xdpml.agent.enforce.rules_installed",
            COUNTER,
            "{rule}",
            "Rules installed from verdicts, by action.",
            "action",
        ),
        _m(
            "xdpml.agent.enforce.rules_expired",
            COUNTER,
            "{rule}",
            "Expired rules removed from the kernel maps by the agent.",
        ),
        _m(
            "xdpml.agent.enforce.install_latency",
            HISTOGRAM,
            "s",
            "Time from a verdict's arrival to its rule being in the kernel maps.",
        ),
        _m(
            "xdpml.agent.enforce.rules_active",
            OBSERVABLE_GAUGE,
            "{rule}",
            "Rules live in the kernel maps (not expired), by action.",
            "action",
        ),
        _m(
            "xdpml.agent.enforce.packets",
            OBSERVABLE_COUNTER,
            "{packet}",
            "Packets rules dropped (enforce mode) or would have dropped (dry-run), from the kernel's counters.",
            "result",
        ),
        _m(
            "xdpml.agent.enforce.bytes",
            OBSERVABLE_COUNTER,
            "By",
            "Frame bytes of those packets, by the same result.",
            "result",
        ),
        _m(
            "xdpml.agent.attached",
            OBSERVABLE_GAUGE,
            "{program}",
            "BPF programs currently attached, by hook and mode.",
            "hook",
            "mode",
        ),
        # ---- collector -----------------------------------------------------
        _m(
            "xdpml.collector.early_rows",
            COUNTER,
            "{row}",
            "Early flow snapshots received: scored for verdicts, not stored, learned or counted as rows scored.",
            "model",
            "flagged",
        ),
        _m("xdpml.collector.batches", COUNTER, "{batch}", "Feature batches received from agents.", "kind"),
        _m("xdpml.collector.rows", COUNTER, "{row}", "Feature rows received from agents.", "kind"),
        _m("xdpml.collector.scored", COUNTER, "{row}", "Rows scored by a model.", "model"),
        _m(
            "xdpml.collector.flagged",
            COUNTER,
            "{row}",
            "Rows the model flagged (verdict label other than normal).",
            "model",
            "label",
        ),
        _m(
            "xdpml.collector.verdicts",
            COUNTER,
            "{verdict}",
            "Verdicts sent to agents, by the action they ask for (alert instead of drop and rate-limit in dry-run).",
            "model",
            "action",
            "dry_run",
        ),
        _m(
            "xdpml.collector.model.latency",
            HISTOGRAM,
            "s",
            "Time to score one batch, including a remote model server round trip.",
            "model",
        ),
        _m(
            "xdpml.collector.errors",
            COUNTER,
            "{error}",
            "Errors by kind: malformed batch, model failure, sink failure.",
            "kind",
        ),
        _m("xdpml.collector.agents", UP_DOWN_COUNTER, "{agent}", "Agent streams currently connected."),
        _m(
            "xdpml.collector.streams.closed",
            COUNTER,
            "{stream}",
            "Streams the collector refused or ended itself, by reason.",
            "reason",
        ),
        _m(
            "xdpml.collector.agents.evicted",
            COUNTER,
            "{agent}",
            "Agent ids dropped from the bounded table of known agents (least recently seen first).",
        ),
        _m(
            "xdpml.collector.nonfinite",
            COUNTER,
            "{value}",
            "NaN or infinite feature values replaced by 0 before scoring, by column.",
            "column",
        ),
        _m(
            "xdpml.collector.baseline.rows",
            OBSERVABLE_GAUGE,
            "{row}",
            "Rows the embedded model's baseline was learned from (0: no baseline), by where it came from.",
            "source",
        ),
    )
}


@dataclass
class TelemetrySettings:
    """Which exporters run. Both off (the default) means no-op telemetry."""

    service_name: str = "xdpml"  # OpenTelemetry resource service.name
    # OTLP gRPC endpoint "host:port", "http://host:port" (plaintext) or
    # "https://host:port" (TLS, server verified with otlp_ca_file or system roots).
    otlp_endpoint: str = ""
    otlp_ca_file: str = ""  # PEM CA bundle for an https:// endpoint; "" = system roots
    otlp_interval_s: float = 15.0  # seconds between OTLP pushes
    otlp_timeout_s: float = 10.0  # seconds before one OTLP push gives up
    # Prometheus scrape endpoint port; None = off, 0 = any free port (tests).
    prometheus_port: int | None = None
    prometheus_host: str = "0.0.0.0"  # address the scrape endpoint binds
    # Extra resource attributes, e.g. {"k8s.node.name": "node-1"}.
    resource_attributes: dict[str, str] = field(default_factory=dict)

    def validate(self) -> TelemetrySettings:
        if self.otlp_endpoint:
            _split_endpoint(self.otlp_endpoint)
        if self.prometheus_port is not None and not 0 <= self.prometheus_port <= 65535:
            raise TelemetryError(f"metrics port must be 0..65535, not {self.prometheus_port}")
        if not 0.1 <= self.otlp_interval_s <= 3600:
            raise TelemetryError(f"OTLP export interval must be 0.1..3600 seconds, not {self.otlp_interval_s}")
        if self.otlp_timeout_s <= 0:
            raise TelemetryError("OTLP export timeout must be > 0 seconds")
        if not self.service_name:
            raise TelemetryError("service name must not be empty")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.otlp_endpoint) or self.prometheus_port is not None


_HOSTPORT = re.compile(r"^(?:\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


def _split_endpoint(endpoint: str) -> tuple[str, bool]:
    """'https://h:p' -> ('h:p', secure). Raises TelemetryError with a usable message."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        scheme, rest = "http", endpoint
    if scheme not in ("http", "https"):
        raise TelemetryError(f"OTLP endpoint {endpoint!r}: scheme must be http:// or https://, not {scheme}://")
    rest = rest.rstrip("/")
    m = _HOSTPORT.match(rest)
    if not m or not 0 < int(m.group(1)) <= 65535:
        raise TelemetryError(f"OTLP endpoint {endpoint!r} is not HOST:PORT (e.g. otel-collector:4317)")
    return rest, scheme == "https"


# What an observable callback may return: one number (no attributes), a list of
# (value, attributes) pairs, or {attribute value: number} for a one-attribute metric.
GaugeValue = int | float | Iterable[tuple[float, Mapping[str, Any]]] | Mapping[str, float]
GaugeCallback = Callable[[], GaugeValue]


class Telemetry:
    """Instruments for one process (agent or collector). Use as a context manager,
    or call ``shutdown()``: it flushes OTLP and stops the scrape endpoint."""

    def __init__(
        self, *, meter_provider: Any, readers: list[Any] | None = None, http_server: Any = None, noop: bool = False
    ) -> None:
        self._provider = meter_provider
        self._meter = meter_provider.get_meter("xdpml")
        self._readers = readers or []
        self._http_server = http_server
        self._instruments: dict[str, Any] = {}
        self.noop = noop
        self._closed = False

    # ---- construction ------------------------------------------------------
    @classmethod
    def noop_instance(cls) -> Telemetry:
        """Instruments that accept every call and record nothing."""
        return cls(meter_provider=otel_metrics.NoOpMeterProvider(), noop=True)

    @classmethod
    def from_settings(cls, settings: TelemetrySettings) -> Telemetry:
        settings.validate()
        if not settings.enabled:
            return cls.noop_instance()
        # Imported here so that no-op users (tests, `xdpml agent` without metrics) do
        # not pay for the exporters' imports.
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.resources import Resource

        readers: list[Any] = []
        http_server = None
        try:
            if settings.prometheus_port is not None:
                from opentelemetry.exporter.prometheus import PrometheusMetricReader
                from prometheus_client import CollectorRegistry, start_http_server

                # A private registry: the process-global one would refuse a second
                # reader in the same process and would mix in Python runtime metrics.
                registry = CollectorRegistry(auto_describe=True)
                # Scope labels (otel_scope_*) would repeat "xdpml" on every series.
                readers.append(PrometheusMetricReader(registry=registry, scope_info_enabled=False))
                try:
                    http_server, _thread = start_http_server(
                        settings.prometheus_port, addr=settings.prometheus_host, registry=registry
                    )
                except OSError as e:
                    raise TelemetryError(
                        f"cannot serve metrics on {settings.prometheus_host}:"
                        f"{settings.prometheus_port}: {e.strerror or e}; choose another "
                        "--metrics-port"
                    ) from None
            if settings.otlp_endpoint:
                readers.append(_otlp_reader(settings))
        except BaseException:
            if http_server is not None:
                http_server.shutdown()
                http_server.server_close()
            raise
        attrs = {"service.name": settings.service_name, "service.version": __version__, **settings.resource_attributes}
        provider = MeterProvider(metric_readers=readers, resource=Resource.create(attrs))
        return cls(meter_provider=provider, readers=readers, http_server=http_server)

    # ---- instruments -------------------------------------------------------
    def _spec(self, name: str, kinds: tuple[str, ...]) -> MetricSpec:
        spec = METRICS.get(name)
        if spec is None:
            raise TelemetryError(
                f"unknown metric {name!r}: declare it in xdpml.obs.telemetry.METRICS and docs/metrics.md first"
            )
        if spec.kind not in kinds:
            raise TelemetryError(f"metric {name!r} is a {spec.kind}, not a {'/'.join(kinds)}")
        return spec

    def _get(self, name: str, kinds: tuple[str, ...], make: Callable[[MetricSpec], Any]) -> Any:
        inst = self._instruments.get(name)
        if inst is None:
            spec = self._spec(name, kinds)
            inst = self._instruments[name] = make(spec)
        else:
            self._spec(name, kinds)
        return inst

    def counter(self, name: str) -> Any:
        """A monotonic counter: ``.add(n, attributes)``; the same object every call."""
        return self._get(
            name, (COUNTER,), lambda s: self._meter.create_counter(s.name, unit=s.unit, description=s.description)
        )

    def up_down_counter(self, name: str) -> Any:
        """A counter that can go down (``.add(-1)``), e.g. connected agents."""
        return self._get(
            name,
            (UP_DOWN_COUNTER,),
            lambda s: self._meter.create_up_down_counter(s.name, unit=s.unit, description=s.description),
        )

    def histogram(self, name: str) -> Any:
        """A histogram: ``.record(value, attributes)``; latency buckets in seconds."""
        return self._get(
            name,
            (HISTOGRAM,),
            lambda s: self._meter.create_histogram(
                s.name,
                unit=s.unit,
                description=s.description,
                explicit_bucket_boundaries_advisory=list(LATENCY_BUCKETS_S),
            ),
        )

    def observe_gauge(self, name: str, callback: GaugeCallback) -> None:
        """Register ``callback`` to be read at each collection (scrape or OTLP push).

        The callback returns a number, a list of ``(value, attributes)`` pairs, or, for a
        metric with exactly one attribute key, a mapping ``{attribute value: number}``
        (e.g. ``{"err_bad_ihl": 3, "flow_full": 0}`` for kernel counters).
        Exceptions in the callback are logged and that collection skips the metric.
        """
        self._observe(name, callback, (OBSERVABLE_GAUGE,))

    def observe_counter(self, name: str, callback: GaugeCallback) -> None:
        """Like ``observe_gauge`` for cumulative values that only grow (kernel counters),
        so Prometheus gets a ``_total`` counter and ``rate()`` works."""
        self._observe(name, callback, (OBSERVABLE_COUNTER,))

    def _observe(self, name: str, callback: GaugeCallback, kinds: tuple[str, ...]) -> None:
        spec = self._spec(name, kinds)
        if name in self._instruments:
            raise TelemetryError(f"metric {name!r} already has a callback")

        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            try:
                return _observations(spec, callback())
            except Exception:  # a broken callback must not break every other metric
                log.exception("metric callback for %s failed", name)
                return []

        create = (
            self._meter.create_observable_gauge
            if spec.kind == OBSERVABLE_GAUGE
            else self._meter.create_observable_counter
        )
        self._instruments[name] = create(spec.name, callbacks=[observe], unit=spec.unit, description=spec.description)

    # ---- life cycle --------------------------------------------------------
    @property
    def prometheus_port(self) -> int | None:
        """The bound scrape port (useful with port 0), or None when not serving."""
        return None if self._http_server is None else self._http_server.server_port

    def force_flush(self, timeout_s: float = 10.0) -> bool:
        """Push OTLP now (e.g. before exit); True when every reader succeeded."""
        if self.noop:
            return True
        return bool(self._provider.force_flush(timeout_millis=int(timeout_s * 1000)))

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server.server_close()
        if not self.noop:
            # Flushes the periodic OTLP reader one last time.
            self._provider.shutdown()

    def __enter__(self) -> Telemetry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _observations(spec: MetricSpec, value: GaugeValue) -> list[Observation]:
    if isinstance(value, (int, float)):
        return [Observation(value)]
    if isinstance(value, Mapping):
        if len(spec.attributes) != 1:
            raise TelemetryError(
                f"{spec.name}: a mapping result needs exactly one attribute key, the metric has {spec.attributes}"
            )
        key = spec.attributes[0]
        return [Observation(v, {key: str(k)}) for k, v in value.items()]
    return [Observation(v, dict(a)) for v, a in value]


def _otlp_reader(settings: TelemetrySettings) -> Any:
    import grpc
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    target, secure = _split_endpoint(settings.otlp_endpoint)
    credentials = None
    if secure:
        ca = None
        if settings.otlp_ca_file:
            try:
                with open(settings.otlp_ca_file, "rb") as f:
                    ca = f.read()
            except OSError as e:
                raise TelemetryError(f"cannot read OTLP CA file {settings.otlp_ca_file}: {e.strerror}") from None
        credentials = grpc.ssl_channel_credentials(root_certificates=ca)
    exporter = OTLPMetricExporter(
        endpoint=target, insecure=not secure, credentials=credentials, timeout=settings.otlp_timeout_s
    )
    return PeriodicExportingMetricReader(
        exporter,
        export_interval_millis=settings.otlp_interval_s * 1000,
        export_timeout_millis=settings.otlp_timeout_s * 1000,
    )
