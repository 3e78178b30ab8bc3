"""Wiring only: datapath -> harvest/events -> features -> sinks.

Shutdown order is fixed: detach (no new packets), drain (every flow left in the
table, every record left in the ring buffers), flush (windows still open),
close (sinks).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from agent.bpf.abi import PktEvent, WinEvent
from agent.bpf.loader import Datapath
from agent.bpf.maps import FlowMap
from agent.columns import ColumnBatch
from agent.config import AgentSettings
from agent.events import RecordBuffer
from agent.export.sinks import Sink
from agent.features import WindowAccumulator, expand_segments, packet_columns, window_batch
from agent.harvest import Harvester, mono_to_unix_offset_ns

log = logging.getLogger("xdpml.agent")

LOSS_COUNTERS = ("flow_full", "flow_busy", "rb_win_full", "rb_pkt_full")
ERROR_COUNTERS = ("err_trunc_eth", "err_trunc_vlan", "err_trunc_ip", "err_bad_ihl",
                  "err_bad_ip_len", "err_trunc_l4", "err_ipv6_ext")


@dataclass
class AgentTotals:
    flows: int = 0
    windows: int = 0
    packets_sampled: int = 0
    kernel: dict = field(default_factory=dict)


class Agent:
    def __init__(self, settings: AgentSettings, *, interfaces: list[str], sinks: list[Sink],
                 flows: bool = True, on_attached=None):
        self.settings = settings.validate()
        self.interfaces = interfaces
        self.sinks = sinks
        self.flows_enabled = flows
        self.totals = AgentTotals()
        self.on_attached = on_attached  # called once every interface is attached
        self.stop_event = threading.Event()
        self.datapath: Datapath | None = None

    # -- helpers ---------------------------------------------------------------
    def _emit(self, batch: ColumnBatch | None) -> None:
        if batch is None or not len(batch):
            return
        for sink in self.sinks:
            try:
                sink.write(batch)
            except Exception as exc:  # noqa: BLE001 - one broken sink must not stop the others
                log.error("sink %s failed: %s", type(sink).__name__, exc)

    def _events(self, wins: RecordBuffer | None, pkts: RecordBuffer | None,
                acc: WindowAccumulator | None, offset: int, ifnames: dict) -> None:
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
                self._emit(packet_columns(ev, mono_to_unix_ns=offset, ifnames=ifnames))

    # -- run -----------------------------------------------------------------------
    def run(self, *, duration_s: float | None = None) -> AgentTotals:
        s = self.settings
        with Datapath(s) as dp:
            self.datapath = dp
            ifnames: dict[int, str] = {}
            for name in self.interfaces:
                att = dp.attach(name, hooks=s.interfaces.hooks, xdp_mode=s.interfaces.xdp_mode)
                ifnames[att.ifindex] = name
            offset = mono_to_unix_offset_ns()
            table = FlowMap(dp.flow_map_fd(), key_dtype=dp.types.key_dtype, value_dtype=dp.types.value_dtype)
            harvester = Harvester(table, settings=s.harvest, first_n=s.datapath.first_n,
                                  mono_to_unix_ns=offset, ifnames=ifnames)
            wins = RecordBuffer(dp.bpf, "win_events", WinEvent) if dp.window else None
            pkts = RecordBuffer(dp.bpf, "pkt_events", PktEvent) if dp.sample_rate else None
            acc = (WindowAccumulator(packets=s.window.packets, seconds=s.window.seconds,
                                     mono_to_unix_ns=offset, ifnames=ifnames) if wins else None)
            if self.on_attached:
                self.on_attached(dp)
            deadline = time.monotonic() + duration_s if duration_s else None
            next_summary = time.monotonic() + s.summary_interval_s if s.summary_interval_s else None
            last_counts = dp.counters()
            try:
                while not self.stop_event.is_set():
                    if deadline and time.monotonic() >= deadline:
                        break
                    self.stop_event.wait(s.harvest.interval_s)
                    self._events(wins, pkts, acc, offset, ifnames)
                    if self.flows_enabled:
                        batch = harvester.scan()
                        if batch is not None:
                            self.totals.flows += len(batch)
                            self._emit(batch)
                    if next_summary and time.monotonic() >= next_summary:
                        last_counts = self._summary(dp, harvester, last_counts)
                        next_summary = time.monotonic() + s.summary_interval_s
            finally:
                # detach, drain, flush, close
                dp.detach_all()
                self._events(wins, pkts, acc, offset, ifnames)
                if self.flows_enabled:
                    batch = harvester.drain()
                    if batch is not None:
                        self.totals.flows += len(batch)
                        self._emit(batch)
                else:
                    harvester.drain()
                if acc is not None:
                    rows = acc.flush()
                    if rows:
                        self.totals.windows += len(rows)
                        self._emit(window_batch(rows))
                self.totals.kernel = dp.counters()
                self._summary(dp, harvester, last_counts, final=True)
                for sink in self.sinks:
                    try:
                        sink.close()
                    except Exception as exc:  # noqa: BLE001
                        log.error("closing sink %s: %s", type(sink).__name__, exc)
                self.datapath = None
        return self.totals

    def _summary(self, dp: Datapath, harvester: Harvester, last: dict, *, final: bool = False) -> dict:
        now = dp.counters() if not final else self.totals.kernel
        pk = sum(now[k] for k in ("pkt_xdp", "pkt_tc_ingress", "pkt_tc_egress"))
        pk_last = sum(last[k] for k in ("pkt_xdp", "pkt_tc_ingress", "pkt_tc_egress"))
        lost = sum(now[k] for k in LOSS_COUNTERS) + sum(getattr(sk, "dropped", 0) for sk in self.sinks)
        errors = sum(now[k] for k in ERROR_COUNTERS)
        msg = (f"{'final: ' if final else ''}interfaces {len(self.interfaces)} | packets {pk} "
               f"(+{pk - pk_last}) | flows active {harvester.stats.active} exported {self.totals.flows} "
               f"| windows {self.totals.windows} | samples {self.totals.packets_sampled} "
               f"| parse errors {errors} | lost {lost}")
        log.info(msg)
        return now


def install_signal_handlers(agent: Agent) -> None:
    import signal

    def stop(signum, _frame):
        log.info("received %s: detaching and draining", signal.Signals(signum).name)
        agent.stop_event.set()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)

