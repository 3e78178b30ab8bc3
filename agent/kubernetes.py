"""The agent in Kubernetes: AgentConfig-driven, enriched with pod metadata.

Holds the pieces together and applies each accepted AgentConfig with the least
disruption: enrichment and exporter settings, interface sets and harvest
timeouts change live; only datapath sizing, window and feature-set changes
(which change the compiled BPF program) restart the datapath, after draining it.

Collector address and TLS: the command-line flags (set by the Helm chart) are the
defaults; an AgentConfig that names a collector address overrides them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from xdpml.agent.export.sinks import CollectorSink, Sink
from xdpml.agent.export.verdicts import verdict_counter
from xdpml.agent.pipeline import Agent, AttachPlan, loss_counters, register_observables

from xdpml.datapath.loader import AttachError, resolve_interfaces

if TYPE_CHECKING:
    from xdpml.kube.config_watch import AgentConfigWatcher

log = logging.getLogger("xdpml.agent.kubernetes")

RESTART_SECTIONS = {"datapath", "window", "features"}


@dataclass
class KubeAgentOptions:
    namespace: str
    node_name: str
    config_name: str = ""  # follow only the AgentConfig of this name ("" = oldest matching)
    collector: str = ""  # flag default for the collector address
    collector_tls: object = None  # xdpml.wire.tls.ClientTls from flags, or None
    extra_sinks: list[Sink] = field(default_factory=list)  # e.g. -o FILE, tests
    pin_dir: str = "/sys/fs/bpf/xdpml"  # rule maps (a bpffs hostPath in the chart: rules survive restarts)
    attach_timeout_s: float = 120.0
    pin_dir: str | None = None  # --pin-dir: rule maps and model slots (None = the default)


def plan_from_rules(rules, *, pod_veths: Callable[[], list[str] | None] | None = None) -> AttachPlan:
    """AgentConfig interface rules -> {interface: (hooks, xdp_mode)}; the first rule
    naming an interface wins (the config parser already refuses overlapping rules).
    ``pod_veths`` returns the host-side veths that lead to known pods (VethMap), or
    None when unknown, in which case 'pod-veths' means every host-namespace veth."""
    plan: AttachPlan = {}
    for rule in rules:
        names = list(rule.names)
        found: list[str] = []
        if "pod-veths" in names and pod_veths is not None:
            known = pod_veths()
            if known is not None:
                names.remove("pod-veths")
                found = list(known)
        for name in found + (resolve_interfaces(names) if names else []):
            plan.setdefault(name, (rule.hooks, rule.xdp_mode))
    return plan


class KubernetesAgent:
    def __init__(
        self,
        api_client,
        options: KubeAgentOptions,
        *,
        health=None,
        telemetry=None,
        enrich_factory: Callable | None = None,
        watcher_kwargs: dict | None = None,
        model_source_kwargs: dict | None = None,
    ):
        from xdpml.agent.enrich.manager import EnrichmentManager

        self.api = api_client
        self.opts = options
        self.health = health
        self.telemetry = telemetry
        factory = enrich_factory or (lambda api: EnrichmentManager(api, node_name=options.node_name))
        self.enrich = factory(api_client)
        self.agent: Agent | None = None
        self._exporter_sink: CollectorSink | None = None
        self._export_key: tuple | None = None
        self.stop_event = threading.Event()
        self.restarts = 0
        self._count_verdicts = verdict_counter(telemetry)
        self.watcher_kwargs = watcher_kwargs or {}
        self.watcher: AgentConfigWatcher | None = None
        self.enforcement = None  # agent.enforce.kube.KubeEnforcement, made with the first config
        self._model_source = None  # xdpml.kube.model_source.ConfigMapModel while spec.model.configMap names one
        self.model_source_kwargs = model_source_kwargs or {}  # e.g. max_bytes, watch_timeout_s (tests)
        register_observables(telemetry, lambda: self.agent)

    # ---- applying configs -----------------------------------------------------------
    def on_change(self, old, new) -> None:
        """AgentConfigWatcher callback: raise to refuse (the node keeps the old config)."""
        plan = plan_from_rules(new.interface_rules, pod_veths=self._pod_veths)
        if not plan:
            raise AttachError("no interface on this node matches the AgentConfig's interface rules")
        sections = new.changed_sections(old)
        # enforcement first: a spec this node cannot enforce is refused before anything changes
        if self.enforcement is None:
            from xdpml.agent.enforce.kube import KubeEnforcement

            collector, authenticated = self._verdict_source(new)
            self.enforcement = KubeEnforcement(
                new,
                api_client=self.api,
                node_name=self.opts.node_name,
                collector=collector,
                authenticated=authenticated,
                pod_for_ip=self._pod_for_ip,
                telemetry=self.telemetry,
            )
        elif "enforcement" in sections or "export" in sections:
            self.enforcement.set_channel(*self._verdict_source(new))
            self.enforcement.apply(new)
        if "enrichment" in sections:
            self.enrich.apply(new.enrichment)
        slots_changed = old is not None and old.settings.model.enabled != new.settings.model.enabled
        if self.agent is None or sections & RESTART_SECTIONS or slots_changed:
            self._stop_agent()
            try:
                self._start_agent(new, plan)
            except BaseException:
                if old is not None:
                    log.error("new config failed to start; restoring generation %d", old.generation)
                    self._start_agent(old, plan_from_rules(old.interface_rules, pod_veths=self._pod_veths))
                raise
            self._follow_model(old, new, restarted=True)
            return
        if "interfaces" in sections or plan != self.agent.plan:
            self.agent.request("interfaces", plan)
        if "harvest" in sections:
            self.agent.request("harvest", new.settings.harvest)
        if "export" in sections:
            self.agent.request("sinks", self._sinks(new))
        if "model" in sections:  # the slots stay: the new model goes into the idle one, live
            self.agent.request("model", new.settings.model)
            self._follow_model(old, new, restarted=False)

    # ---- the model from a ConfigMap ---------------------------------------------------
    def _follow_model(self, old, new, *, restarted: bool) -> None:
        """Watch the ConfigMap ``spec.model.configMap`` names (another one: a new watch; none:
        the watch stops and the agent unloads). A restarted datapath gets the last good bytes
        again; new features or actions reload them."""
        from xdpml.kube.model_source import ConfigMapModel

        m, om = new.settings.model, old.settings.model if old is not None else None
        want = (m.config_map, m.config_map_key) if m.config_map else None
        src = self._model_source
        if src is not None and (src.name, src.key) != want:
            src.stop()
            self._model_source = src = None
            if self.watcher is not None:
                self.watcher.set_model(None)
        if want is None:
            return
        if src is None:
            self._model_source = ConfigMapModel(
                self.api,
                namespace=self.opts.namespace,
                name=want[0],
                key=want[1],
                on_model=self._on_model_bytes,
                **self.model_source_kwargs,
            ).start()
        elif restarted or (om is not None and (m.features, m.actions) != (om.features, om.actions)):
            if src.data is not None:
                self._load_model_bytes(src, src.data, src.version)

    def _on_model_bytes(self, src, data: bytes | None, problem: str, version: str) -> None:
        """ConfigMapModel callback (its watch thread): new bytes, or why there are none."""
        if src is not self._model_source:
            return  # a watch being stopped: the AgentConfig names another ConfigMap now
        if data is None:
            self._model_report(src, version, False, f"{problem}; the running model stays")
            return
        self._load_model_bytes(src, data, version)

    def _load_model_bytes(self, src, data: bytes, version: str) -> None:
        import os

        from xdpml.agent.pipeline import ModelBytes

        agent = self.agent
        if agent is None:  # between datapaths: the next one gets src.data (_follow_model)
            return

        def done(ok: bool, error: str, model_id: int) -> None:
            if ok:
                self._model_report(src, version, True, f"model {model_id} loaded", event="ModelLoaded")
            else:
                self._model_report(src, version, False, f"not loaded (the running model stays): {error}")

        suffix = os.path.splitext(src.key)[1]
        agent.request("model_bytes", ModelBytes(data, suffix, f"{src.source} (version {version})", done))

    def _model_report(self, src, version: str, loaded: bool, message: str, *, event: str = "ModelRefused") -> None:
        if not loaded:
            log.error("model from %s (version %s): %s", src.source, version or "-", message)
        if self.watcher is None:
            return
        summary = {"configMap": src.name, "key": src.key, "resourceVersion": version, "loaded": loaded}
        self.watcher.set_model({**summary, "message": message[:4096]})
        self.watcher.report("Normal" if loaded else "Warning", event, f"{src.source} version {version}: {message}")

    def _verdict_source(self, cfg) -> tuple[str, bool]:
        """(collector address, verdicts authenticated by mutual TLS) of this config."""
        if cfg.export.collector_address:
            return cfg.export.collector_address, cfg.export.tls_mode == "mtls" and bool(
                cfg.export.cert_file and cfg.export.key_file
            )
        tls = self.opts.collector_tls
        mtls = bool(tls is not None and getattr(tls, "cert_file", None) and getattr(tls, "key_file", None))
        return self.opts.collector, bool(self.opts.collector) and mtls

    def _pod_for_ip(self, ip16: bytes):
        try:
            cache = self.enrich.cache
        except RuntimeError:
            return None
        return cache.pod_for_ip(ip16) if cache is not None else None

    def _on_verdicts(self, vb) -> None:
        if self._count_verdicts is not None:
            self._count_verdicts(vb)
        if self.enforcement is not None:
            self.enforcement.on_verdicts(vb)

    def _on_pushed_model(self, update) -> None:
        """ExportResponse.model (a signed model the collector pushes): to the running agent,
        which verifies it against spec.model.trustedKeys (Agent.on_model)."""
        agent = self.agent
        if agent is None:
            log.warning("pushed model %s v%d refused: no datapath running", update.name, update.version)
            return
        agent.on_model(update)

    def _sinks(self, cfg) -> list[Sink]:
        from xdpml.agent.export.grpc_client import ExporterSettings, GrpcExporter

        if cfg.export.collector_address:
            kw = cfg.export.exporter_kwargs()
        elif self.opts.collector:
            kw = {"target": self.opts.collector, "tls": self.opts.collector_tls}
        else:
            kw = None
        key = (kw["target"], repr(kw["tls"])) if kw else None
        if key != self._export_key:
            old = self._exporter_sink
            if old is not None:
                # the agent swaps sinks within one scan; then the old exporter flushes and closes
                threading.Timer(5.0, old.close).start()
            self._exporter_sink = (
                CollectorSink(
                    GrpcExporter(
                        ExporterSettings(node_name=self.opts.node_name, **kw),
                        on_verdicts=self._on_verdicts,
                        loss_counters=loss_counters(lambda: self.agent),
                        on_model=self._on_pushed_model,
                    )
                )
                if kw
                else None
            )
            self._export_key = key
        sinks: list[Sink] = [_Shared(s) for s in self.opts.extra_sinks]
        if self._exporter_sink is not None:
            # verdicts must name a flow this agent exported: remember what goes out
            exporter = self._exporter_sink
            sinks.append(_Shared(self.enforcement.wrap(exporter) if self.enforcement is not None else exporter))
        return sinks

    def _start_agent(self, cfg, plan: AttachPlan) -> None:
        import dataclasses

        settings = dataclasses.replace(
            cfg.settings, enforce=dataclasses.replace(cfg.settings.enforce, pin_dir=self.opts.pin_dir)
        )
        settings.interfaces.names = list(plan)
        if self.opts.pin_dir is not None:
            settings.enforce.pin_dir = self.opts.pin_dir
        agent = Agent(
            settings,
            interfaces=plan,
            sinks=self._sinks(cfg),
            flows=cfg.features.flows,
            transform=self._enrich,
            telemetry=self.telemetry,
            on_attached=self.enforcement.on_attached if self.enforcement is not None else None,
        )

        def failed(exc: BaseException) -> None:
            log.error("datapath stopped: %s", exc)
            if self.health is not None:
                self.health.clear("programs_attached", str(exc))

        try:
            agent.start(attach_timeout_s=self.opts.attach_timeout_s, on_error=failed)
        except TimeoutError as exc:
            raise AttachError(str(exc)) from None
        self.agent = agent
        self.restarts += 1
        if self.health is not None:
            self.health.set("programs_attached")
        if self.watcher is not None:
            self.watcher.set_ready(True, "Attached", f"{len(plan)} interfaces: {', '.join(plan)}")

    def _stop_agent(self) -> None:
        if self.agent is None:
            return
        log.info("restarting the datapath for the new config (draining first)")
        if self.enforcement is not None:
            self.enforcement.on_detached()
        self.agent.stop()
        self.agent = None
        if self.health is not None:
            self.health.clear("programs_attached", "restarting the datapath")

    def _pod_veths(self) -> list[str] | None:
        """Host-side veths routed to pods the cache knows (agent/enrich/veth.py)."""
        import socket

        from xdpml.agent.enrich.veth import IpRouteSource, VethMap

        try:
            cache = self.enrich.cache
        except RuntimeError:
            cache = None
        if cache is None:
            return None
        vm = VethMap(IpRouteSource(), cache)
        try:
            vm.refresh()
        except Exception as exc:
            log.warning("reading host routes for pod veths failed (%s); using every veth", exc)
            return None
        names = []
        for ifindex in vm.pod_veths():
            try:
                names.append(socket.if_indextoname(ifindex))
            except OSError:
                continue
        return names

    def _enrich(self, batch):
        return self.enrich.enrich(batch) if self.enrich.synced() or self._enrich_ready() else batch

    def _enrich_ready(self) -> bool:
        try:
            return self.enrich.cache is not None
        except RuntimeError:
            return False

    # ---- life cycle -------------------------------------------------------------------
    def run(self) -> int:
        from xdpml.kube.config_watch import AgentConfigWatcher

        watcher = self.watcher = AgentConfigWatcher(
            self.api,
            namespace=self.opts.namespace,
            node_name=self.opts.node_name,
            on_change=self.on_change,
            config_name=self.opts.config_name or None,
            **self.watcher_kwargs,
        )
        log.info("waiting for an AgentConfig in namespace %s for node %s", self.opts.namespace, self.opts.node_name)
        with watcher:
            synced = False
            while not self.stop_event.wait(1.0):
                if self.enforcement is not None:
                    try:
                        self.enforcement.tick(watcher)
                    except Exception as exc:  # status and Events are best effort; rules live on
                        log.warning("enforcement housekeeping failed: %s", exc)
                if self.health is not None:
                    self.health.beat()
                    try:
                        now_synced = self.enrich.synced()
                    except RuntimeError:
                        now_synced = False
                    if now_synced != synced:
                        (
                            self.health.set("pod_cache_synced")
                            if now_synced
                            else self.health.clear("pod_cache_synced", "pod watch not synced")
                        )
                        synced = now_synced
        failed = self.agent is not None and self.agent.error is not None
        self.close()
        return 1 if failed else 0

    def close(self) -> None:
        if self._model_source is not None:
            self._model_source.stop()
            self._model_source = None
        if self.enforcement is not None:
            self.enforcement.close()
        if self.agent is not None:
            self.agent.stop()
            self.agent = None
        if self._exporter_sink is not None:
            self._exporter_sink.close()
        for sink in self.opts.extra_sinks:
            sink.close()
        self.enrich.close()


class _Shared:
    """A sink that outlives datapath restarts: the agent writes to it, the supervisor
    closes it (once, at the end or when the export settings change)."""

    def __init__(self, sink):
        self.sink = sink
        self.name = getattr(sink, "name", type(sink).__name__)
        self.kinds = getattr(sink, "kinds", None)
        self.early = getattr(sink, "early", False)  # early snapshots (the collector sink)
        self.drop_reason = getattr(sink, "drop_reason", "queue_full")

    def write(self, batch):
        return self.sink.write(batch)

    @property
    def dropped(self) -> int:
        return getattr(self.sink, "dropped", 0)

    @property
    def queue_depth(self) -> int:
        return getattr(self.sink, "queue_depth", 0)

    def close(self) -> None:
        pass
