"""Wiring only: datapath -> harvest/events -> features -> enrich -> sinks.

Shutdown order is fixed: detach (no new packets), drain (every flow left in the
table, every record left in the ring buffers), flush (windows still open),
close (sinks).

Live changes (AgentConfig) arrive through :meth:`Agent.request` and are applied by
the agent's own loop between scans, so the datapath is only touched by one thread:
interfaces are attached/detached by difference, harvest timeouts and sinks swapped.

Interfaces come and go under the agent: a :class:`LinkWatcher` follows the kernel's
link events (netlink); after one, the loop forgets attachments whose interface was
deleted (their programs went with it) and attaches again every planned interface
that exists and is not attached. The summary line says what is attached now.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from xdpml.agent.events import RecordBuffer
from xdpml.agent.export.sinks import Sink
from xdpml.agent.features import EXPIRATION, WindowAccumulator, expand_segments, packet_columns, window_batch
from xdpml.agent.harvest import Harvester, mono_to_unix_offset_ns

from xdpml import __version__
from xdpml.config import AgentSettings, HarvestSettings
from xdpml.datapath.abi import EarlyEvent, PktEvent, WinEvent
from xdpml.datapath.loader import Datapath
from xdpml.datapath.maps import FlowMap
from xdpml.errors import XdpmlError
from xdpml.wire.columns import ColumnBatch

log = logging.getLogger("xdpml.agent")

LOSS_COUNTERS = ("flow_full", "flow_busy", "rb_win_full", "rb_pkt_full")
# xdpml.agent.lost sources: kernel counters whose events reach no record
LOST_SOURCES = {"flow_table": ("flow_full", "flow_busy"), "ringbuf": ("rb_win_full", "rb_pkt_full")}
ERROR_COUNTERS = (
    "err_trunc_eth",
    "err_trunc_vlan",
    "err_trunc_ip",
    "err_bad_ihl",
    "err_bad_ip_len",
    "err_trunc_l4",
    "err_ipv6_ext",
    "err_tcp_doff",
)
PACKET_COUNTERS = ("pkt_xdp", "pkt_tc_ingress", "pkt_tc_egress")
REASON_NAMES = {v: k for k, v in EXPIRATION.items()}

# name -> (hooks, xdp_mode)
AttachPlan = dict[str, tuple[str, str]]


@dataclass(frozen=True)
class ModelBytes:
    """A model handed over as bytes (live change "model_bytes"): loaded with the features and
    actions of the model settings in force; ``done(ok, error, model_id)`` is called from the
    agent loop with the outcome."""

    data: bytes
    suffix: str  # the format: ".onnx", ".xdpml" (AgentModel.load_bytes)
    source: str  # names it in logs
    done: Callable[[bool, str, int], None] | None = None


@dataclass
class AgentTotals:
    flows: int = 0  # final flow records
    early: int = 0  # early snapshots (expiration id 3), sent to the sinks that take them
    windows: int = 0
    packets_sampled: int = 0
    enrich_errors: int = 0
    dropped: int = 0  # rows a sink refused or failed on (xdpml.agent.dropped)
    kernel: dict = field(default_factory=dict)
    # per sink, after close: name -> (rows given, rows delivered); see Agent.deliveries()
    deliveries: dict = field(default_factory=dict)


class LinkWatcher:
    """Sets ``changed`` on every kernel link event (RTM_NEWLINK/RTM_DELLINK), from a
    thread reading a netlink socket bound to the link multicast group."""

    def __init__(self) -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.rtnl import RTMGRP_LINK

        self.changed = threading.Event()
        self._stop = threading.Event()
        self._ipr = IPRoute()
        self._ipr.bind(groups=RTMGRP_LINK)
        self._thread = threading.Thread(target=self._run, name="xdpml-links", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import select

        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self._ipr], [], [], 0.5)
                if ready:
                    for msg in self._ipr.get():
                        if msg.get("event") in ("RTM_NEWLINK", "RTM_DELLINK"):
                            self.changed.set()
            except Exception as exc:
                if self._stop.is_set():
                    return
                log.warning("link events unavailable (%s): checking interfaces every scan instead", exc)
                while not self._stop.wait(1.0):
                    self.changed.set()
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._ipr.close()


class Agent:
    def __init__(
        self,
        settings: AgentSettings,
        *,
        interfaces: list[str] | AttachPlan,
        sinks: list[Sink],
        flows: bool = True,
        on_attached: Callable[[Datapath], None] | None = None,
        transform: Callable[[ColumnBatch], ColumnBatch] | None = None,
        telemetry=None,
    ):
        self.settings = settings.validate()
        if isinstance(interfaces, dict):
            self.plan: AttachPlan = dict(interfaces)
        else:
            self.plan = {n: (settings.interfaces.hooks, settings.interfaces.xdp_mode) for n in interfaces}
        self.sinks = list(sinks)
        self.flows_enabled = flows
        self.totals = AgentTotals()
        self.on_attached = on_attached  # called once every interface is attached
        self.transform = transform  # enrichment: flow batch -> flow batch with pod columns
        self.telemetry = telemetry
        self.stop_event = threading.Event()
        self.datapath: Datapath | None = None
        self._requests: queue.Queue = queue.Queue()
        self._ifnames: dict[int, str] = {}
        self._ifkinds: dict[int, str] = {}  # ifindex -> physical | veth | virtual (observation preference)
        self._harvester: Harvester | None = None
        self._lost_seen: dict[str, int] = {}
        self._links: LinkWatcher | None = None
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None  # why a background run() ended, if it failed
        self.model = None  # AgentModel (xdpml/agent/model.py) when the model slots are compiled in
        self.model_updates: dict[str, int] = {}  # pushed models by outcome (on_model)
        self._updates_lock = threading.Lock()

    @property
    def interfaces(self) -> list[str]:
        return list(self.plan)

    # -- live changes ------------------------------------------------------------------
    def request(self, kind: str, payload) -> None:
        """Queue a live change: ("interfaces", AttachPlan), ("harvest", HarvestSettings),
        ("sinks", list[Sink]), ("model", ModelSettings), ("model_bytes", ModelBytes). Applied by the
        agent loop within one scan interval."""
        self._requests.put((kind, payload))

    def _load_model_bytes(self, mb: ModelBytes) -> None:
        s = self.model.settings
        try:
            ok = self.model.load_bytes(mb.data, mb.suffix, mb.source, s.features, s.actions)
        except Exception as exc:  # a bug in a model reader: refused and reported like a bad model
            log.error("model %s not loaded (the running model stays): %s: %s", mb.source, type(exc).__name__, exc)
            ok, self.model.last_error = False, f"{type(exc).__name__}: {exc}"
        if mb.done is not None:
            slot = self.model.slots.active()
            mid = int(self.model.slots.read_slot(slot)["model_id"]) if ok else 0
            mb.done(ok, "" if ok else self.model.last_error, mid)

    def _apply_requests(self) -> None:
        while True:
            try:
                kind, payload = self._requests.get_nowait()
            except queue.Empty:
                return
            try:
                if kind == "interfaces":
                    self._reconcile(payload)
                elif kind == "harvest":
                    self.settings.harvest = payload
                    if self._harvester is not None:
                        self._harvester.settings = payload
                    log.info(
                        "harvest settings now idle %.0fs, active %.0fs, scan every %.2fs",
                        payload.idle_timeout_s,
                        payload.active_timeout_s,
                        payload.interval_s,
                    )
                elif kind == "model":
                    if self.model is None:
                        log.error("the model slots are not compiled in: restart with a model to load one")
                    else:
                        self.model.apply(payload)
                    self.settings.model = payload
                elif kind == "model_bytes":
                    if self.model is None:
                        log.error("the model slots are not compiled in: restart with a model to load one")
                    else:
                        self._load_model_bytes(payload)
                elif kind == "sinks":
                    old, self.sinks = self.sinks, list(payload)
                    for sink in old:
                        if sink not in self.sinks:
                            sink.close()
                else:
                    log.error("unknown live change %r", kind)
            except Exception as exc:
                log.error("live change %s failed: %s", kind, exc)

    def _follow_links(self) -> None:
        """After link events: forget attachments of deleted interfaces, attach the planned
        ones that exist again (or for the first time)."""
        import socket

        dp = self.datapath
        for att in list(dp.attachments):
            try:
                index = socket.if_nametoindex(att.ifname)
            except OSError:
                index = 0
            if index != att.ifindex:
                dp.forget(att)
                log.warning(
                    "%s was deleted (ifindex %d): its programs went with it; it is attached again if it comes back",
                    att.ifname,
                    att.ifindex,
                )
        attached = {a.ifname for a in dp.attachments}
        for name, (hooks, mode) in self.plan.items():
            if name in attached or not os.path.exists(f"/sys/class/net/{name}"):
                continue
            try:
                att = dp.attach(name, hooks=hooks, xdp_mode=mode)
            except XdpmlError as exc:
                log.error("%s is back but cannot be attached: %s", name, exc)
                continue
            self._remember(att)
            log.info("%s is back (ifindex %d): attached again", name, att.ifindex)

    def _reconcile(self, plan: AttachPlan) -> None:
        dp = self.datapath
        current = {a.ifname: a for a in dp.attachments}
        for name, att in current.items():
            if name not in plan or plan[name] != self.plan.get(name):
                dp.detach(att)
                self._ifnames.pop(att.ifindex, None)
                self._ifkinds.pop(att.ifindex, None)
        for name, (hooks, mode) in plan.items():
            if name not in current or plan[name] != self.plan.get(name):
                att = dp.attach(name, hooks=hooks, xdp_mode=mode)
                self._remember(att)
        self.plan = dict(plan)

    # -- helpers ---------------------------------------------------------------
    def _remember(self, att) -> None:
        self._ifnames[att.ifindex] = att.ifname
        self._ifkinds[att.ifindex] = att.kind

    def _emit(self, batch: ColumnBatch | None, *, early: bool = False) -> None:
        """To every sink that takes the batch's kind; early snapshots only to sinks that
        ask for them (``sink.early``: the collector, which judges them and does not
        count them as flows), so no other output holds a flow twice."""
        if batch is None or not len(batch):
            return
        if self.transform is not None and batch.kind == "flow":
            try:
                batch = self.transform(batch)
            except Exception as exc:
                self.totals.enrich_errors += 1
                log.error("enrichment failed, exporting without pod metadata: %s", exc)
        for sink in self.sinks:
            name = getattr(sink, "name", type(sink).__name__)
            kinds = getattr(sink, "kinds", None)
            if kinds is not None and batch.kind not in kinds:
                continue  # e.g. the collector scores flows only
            if kinds is None and batch.kind == "decision":
                continue  # the kernel model's sampled decisions: only to a sink that names them (the collector)
            if early and not getattr(sink, "early", False):
                continue
            try:
                accepted = sink.write(batch)
            except Exception as exc:
                self.totals.dropped += len(batch)
                self._count("xdpml.agent.dropped", len(batch), kind=batch.kind, reason="sink_error")
                log.error("sink %s failed: %s", name, exc)
                continue
            if accepted is False:  # a bounded queue was full or no consumer listens (the sink logs it)
                self.totals.dropped += len(batch)
                self._count(
                    "xdpml.agent.dropped",
                    len(batch),
                    kind=batch.kind,
                    reason=getattr(sink, "drop_reason", "queue_full"),
                )
            else:
                self._count("xdpml.agent.exported", len(batch), kind=batch.kind, sink=name)

    def _count_lost(self, counters: dict[str, int]) -> None:
        """xdpml.agent.lost by source, up to ``counters``: the same figure the summary says."""
        for source, names in LOST_SOURCES.items():
            lost = sum(counters[k] for k in names)
            self._count("xdpml.agent.lost", lost - self._lost_seen.get(source, 0), source=source)
            self._lost_seen[source] = lost

    def on_model(self, update) -> str:
        """Exporter callback (ExportResponse.model, a signed model the collector pushes):
        AgentModel.push, counted as xdpml.agent.model.updates by outcome."""
        model = self.model
        if model is None:
            log.warning("pushed model %s v%d refused: the model slots are not compiled in", update.name, update.version)
            result = "disabled"
        else:
            result = model.push(update.signed)
        with self._updates_lock:
            self.model_updates[result] = self.model_updates.get(result, 0) + 1
        self._count("xdpml.agent.model.updates", 1, result=result)
        return result

    def _count(self, name: str, value: int, **attrs) -> None:
        if self.telemetry is not None and value:
            self.telemetry.counter(name).add(value, attrs)

    def _flows(self, batch: ColumnBatch | None) -> None:
        if batch is None:
            return
        self.totals.flows += len(batch)
        if self.telemetry is not None:
            import numpy as np

            for rid in np.unique(batch["expiration_id"]):
                self._count(
                    "xdpml.agent.flows",
                    int(np.sum(batch["expiration_id"] == rid)),
                    reason=REASON_NAMES.get(int(rid), str(rid)),
                )
            for iface in np.unique(batch["interface"]):
                m = batch["interface"] == iface
                for d in ("src2dst", "dst2src"):
                    self._count(
                        "xdpml.agent.packets", int(batch[f"{d}_packets"][m].sum()), interface=str(iface), direction=d
                    )
                    self._count(
                        "xdpml.agent.bytes", int(batch[f"{d}_bytes"][m].sum()), interface=str(iface), direction=d
                    )
        if self.flows_enabled:
            self._emit(batch)

    def _early_flows(self, batch: ColumnBatch | None) -> None:
        if batch is None or not len(batch):
            return
        if not any(getattr(s, "early", False) for s in self.sinks):
            return  # no sink takes snapshots (no collector): they are not exported, nor counted
        self.totals.early += len(batch)
        self._count("xdpml.agent.flows", len(batch), reason="early")
        if self.flows_enabled:
            self._emit(batch, early=True)

    def _wait(self, interval_s: float, early: RecordBuffer | None, harvester: Harvester) -> None:
        """Until the next scan; with early export on, wake on the kernel's early notices
        (ring buffer poll) and export those flows' snapshots at once."""
        if early is None:
            self.stop_event.wait(interval_s)
            return
        end = time.monotonic() + interval_s
        while not self.stop_event.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return
            self.datapath.bpf.ring_buffer_poll(max(1, int(min(left, 0.1) * 1000)))
            ev = early.take()
            if len(ev):
                self._early_flows(harvester.early(ev["key"]))

    def _events(
        self, wins: RecordBuffer | None, pkts: RecordBuffer | None, acc: WindowAccumulator | None, offset: int
    ) -> None:
        dp = self.datapath
        if wins is None and pkts is None:
            return
        dp.bpf.ring_buffer_consume()
        if wins is not None and acc is not None:
            ev = wins.take()
            rows = acc.add(expand_segments(ev)) if len(ev) else []
            rows += acc.expire(time.monotonic_ns())
            if rows:
                self.totals.windows += len(rows)
                self._emit(window_batch(rows))
        if pkts is not None:
            ev = pkts.take()
            if len(ev):
                self.totals.packets_sampled += len(ev)
                self._emit(packet_columns(ev, mono_to_unix_ns=offset, ifnames=self._ifnames))

    # -- background run ----------------------------------------------------------
    def start(self, *, attach_timeout_s: float = 120.0, on_error=None) -> Agent:
        """run() in a thread; returns once every interface is attached, or raises
        what stopped it (or TimeoutError). ``on_error`` is called if run() fails later."""
        attached = threading.Event()
        user_hook = self.on_attached

        def hook(dp):
            if user_hook:
                user_hook(dp)
            attached.set()

        def run():
            try:
                self.run()
            except BaseException as exc:
                self.error = exc
                attached.set()
                if on_error is not None:
                    on_error(exc)

        self.on_attached = hook
        self._thread = threading.Thread(target=run, name="xdpml-datapath", daemon=True)
        self._thread.start()
        if not attached.wait(attach_timeout_s):
            self.stop()
            raise TimeoutError(f"the datapath did not attach within {attach_timeout_s:.0f}s")
        if self.error is not None:
            self._thread.join(30)
            raise self.error
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop a start()ed agent: detach, drain, flush, close; wait for it."""
        self.stop_event.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- run -----------------------------------------------------------------------
    def run(self, *, duration_s: float | None = None) -> AgentTotals:
        from xdpml.agent.model import AgentModel, model_limits

        s = self.settings
        with Datapath(s, model_limits=model_limits(s.model)) as dp:
            self.datapath = dp
            offset = mono_to_unix_offset_ns()
            if dp.model_limits is not None:
                self.model = AgentModel(dp, s.model, pin_dir=dp.pin_dir, emit=self._emit, mono_to_unix_ns=offset)
            for name, (hooks, mode) in self.plan.items():
                att = dp.attach(name, hooks=hooks, xdp_mode=mode)
                self._remember(att)
            log.info(
                "xdpml %s agent: attached to %s",
                __version__,
                ", ".join(f"{a.ifname} ({' '.join(a.hooks)})" for a in dp.attachments) or "no interface",
            )
            table = FlowMap(dp.flow_map_fd(), key_dtype=dp.types.key_dtype, value_dtype=dp.types.value_dtype)
            harvester = self._harvester = Harvester(
                table,
                settings=s.harvest,
                first_n=s.datapath.first_n,
                mono_to_unix_ns=offset,
                ifnames=self._ifnames,
                ifkinds=self._ifkinds,
                capacity=s.datapath.flow_table_size,
            )
            try:
                rules = dp.rule_table()
                harvester.no_export = rules.no_export_slots
            except Exception as exc:  # flows matter more than the no-export rules
                log.warning("no-export pass rules are not applied (%s)", exc)
            wins = RecordBuffer(dp.bpf, "win_events", WinEvent) if dp.window else None
            pkts = RecordBuffer(dp.bpf, "pkt_events", PktEvent) if dp.sample_rate else None
            early = RecordBuffer(dp.bpf, "early_events", EarlyEvent, capacity=8192) if dp.early else None
            acc = (
                WindowAccumulator(
                    packets=s.window.packets, seconds=s.window.seconds, mono_to_unix_ns=offset, ifnames=self._ifnames
                )
                if wins
                else None
            )
            try:
                self._links = LinkWatcher()
            except Exception as exc:
                log.warning("not following link events (%s): a deleted and re-added interface stays detached", exc)
            if self.on_attached:
                self.on_attached(dp)
            deadline = time.monotonic() + duration_s if duration_s else None
            next_summary = time.monotonic() + s.summary_interval_s if s.summary_interval_s else None
            last_counts = dp.counters()
            try:
                while not self.stop_event.is_set():
                    if deadline and time.monotonic() >= deadline:
                        break
                    self._wait(harvester.settings.interval_s, early, harvester)
                    self._apply_requests()
                    if self.model is not None:
                        self.model.poll()
                    self._events(wins, pkts, acc, offset)
                    if self._links is not None and self._links.changed.is_set():
                        self._links.changed.clear()
                        self._follow_links()
                    self._flows(harvester.scan())
                    self._early_flows(harvester.take_early())
                    self._count_lost(dp.counters())
                    if next_summary and time.monotonic() >= next_summary:
                        last_counts = self._summary(dp, harvester, last_counts)
                        next_summary = time.monotonic() + s.summary_interval_s
            finally:
                # detach, drain, flush, close
                if self._links is not None:
                    self._links.close()
                    self._links = None
                attached_at_end = [a.ifname for a in dp.attachments]
                dp.detach_all()
                if self.model is not None:
                    self.model.close()
                    self.model = None
                self._events(wins, pkts, acc, offset)
                self._flows(harvester.drain())
                if acc is not None:
                    rows = acc.flush()
                    if rows:
                        self.totals.windows += len(rows)
                        self._emit(window_batch(rows))
                self.totals.kernel = dp.counters()
                self._count_lost(self.totals.kernel)
                for sink in self.sinks:
                    try:
                        sink.close()
                    except Exception as exc:
                        log.error("closing sink %s: %s", type(sink).__name__, exc)
                    delivery = getattr(sink, "delivery", None)
                    if delivery is not None:
                        self.totals.deliveries[getattr(sink, "name", type(sink).__name__)] = delivery()
                self._summary(dp, harvester, last_counts, final=True, attached=attached_at_end)
                self.datapath = None
        return self.totals

    def _summary(
        self, dp: Datapath, harvester: Harvester, last: dict, *, final: bool = False, attached: list[str] | None = None
    ) -> dict:
        """One line: what is attached now (of the plan), packets, flows, records, and the
        losses: ``lost`` = kernel events that reach no record (flow table full or busy,
        ring buffer full; the xdpml.agent.lost metric), ``dropped`` = rows the sinks did
        not deliver (each sink's own count)."""
        now = dp.counters() if not final else self.totals.kernel
        pk = sum(now[k] for k in PACKET_COUNTERS)
        pk_last = sum(last[k] for k in PACKET_COUNTERS)
        lost = sum(now[k] for k in LOSS_COUNTERS)
        dropped = sum(getattr(sk, "dropped", 0) for sk in self.sinks)
        errors = sum(now[k] for k in ERROR_COUNTERS)
        names = attached if attached is not None else [a.ifname for a in dp.attachments]
        missing = [n for n in self.plan if n not in names]
        log.info(
            "%sattached %d of %d interfaces (%s%s) | packets %d (+%d) | flows active %d exported %d | "
            "windows %d | samples %d | parse errors %d | lost %d | dropped %d",
            "final: " if final else "",
            len(names),
            len(self.plan),
            ", ".join(names) or "none",
            f"; not attached: {', '.join(missing)}" if missing else "",
            pk,
            pk - pk_last,
            harvester.stats.active,
            self.totals.flows,
            self.totals.windows,
            self.totals.packets_sampled,
            errors,
            lost,
            dropped,
        )
        return now

    def deliveries(self) -> dict[str, tuple[int, int]]:
        """After run(): per sink that reports it, (rows given, rows delivered)."""
        return dict(self.totals.deliveries)


def register_observables(telemetry, current: Callable[[], Agent | None]) -> None:
    """Metrics read at each collection from whatever agent runs now (once per process:
    the Kubernetes supervisor replaces the Agent when the datapath restarts)."""
    if telemetry is None:
        return

    def kernel():
        a = current()
        return a.datapath.counters() if a is not None and a.datapath is not None else {}

    def attached():
        a = current()
        out: dict[tuple[str, str], int] = {}
        for att in a.datapath.attachments if a is not None and a.datapath is not None else []:
            for hook in att.hooks:
                kind, _, mode = hook.partition(":")
                out[(kind, mode)] = out.get((kind, mode), 0) + 1
        return [(n, {"hook": h, "mode": m}) for (h, m), n in out.items()]

    def queue_depth():
        a = current()
        return {"grpc": sum(getattr(s, "queue_depth", 0) for s in (a.sinks if a is not None else []))}

    telemetry.observe_counter("xdpml.agent.kernel.events", kernel)
    telemetry.observe_gauge("xdpml.agent.attached", attached)
    telemetry.observe_gauge("xdpml.agent.queue.depth", queue_depth)


def loss_counters(current: Callable[[], Agent | None]) -> Callable[[], dict[str, int]]:
    """For the exporter: the kernel's loss and parse-error counters of the running agent,
    carried in every batch so the collector sees what the features do not cover."""

    def read() -> dict[str, int]:
        a = current()
        if a is None or a.datapath is None:
            return {}
        c = a.datapath.counters()
        return {k: c[k] for k in LOSS_COUNTERS + ERROR_COUNTERS + ("frag_nonfirst", "l4_trunc_ip_len")}

    return read


def install_signal_handlers(stop_event: threading.Event) -> None:
    import signal

    def stop(signum, _frame):
        log.info("received %s: detaching and draining", signal.Signals(signum).name)
        stop_event.set()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


__all__ = [
    "Agent",
    "AgentTotals",
    "AttachPlan",
    "HarvestSettings",
    "install_signal_handlers",
    "loss_counters",
    "register_observables",
]
