"""Move finished flows out of the kernel table.

Each scan reads the whole table with one batched lookup (into numpy), decides
which flows are done, and removes exactly those with atomic lookup-and-delete,
so a packet that lands between the read and the removal is still exported.
A flow is done when it has been idle for idle_timeout, has lasted
active_timeout, or TCP ended it (RST, or FIN both ways) and it has been quiet
for end_grace (so the last ACK lands in the same flow).

Table pressure: when the table is fuller than ``high_water`` (say, under a SYN
flood that leaves thousands of one-packet flows idle for two minutes), flows quiet
for ``pressure_idle`` (idle_timeout / 16, at least 1 s) are exported early as idle,
so new flows keep finding room; each such scan is logged (with backoff) and counted.

Observation points (``record_per`` "conversation", the default): the records of one
conversation on several interfaces leave the table together, when the first of them is
done, and become one row (xdpml.agent.observations states the rules).

Early export (expiration id 3): a snapshot of a flow that is still in the table, once
per entry, so a flood can be judged within a second. Two triggers, neither scanning
the table more often: the kernel sends a flow's key on the early_events ring buffer
when it reaches ``early_packets`` packets or gets a packet ``early_ms`` after its
first (and marks the entry, so it sends one notice at most; :meth:`Harvester.early`
looks those keys up); the regular scan takes a snapshot of the flows that became
``early_ms`` old since the previous scan and got no notice (quiet flows). Keys the
scan exported early are remembered until the flow leaves the table, so a notice that
follows does not export the flow twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from xdpml.agent.features import EXPIRATION, flow_columns
from xdpml.agent.observations import TUNNEL_FIELDS, due_with_siblings, merge

from xdpml.config import HarvestSettings
from xdpml.datapath.abi import EARLY_SENT, END_FIN_INIT, END_FIN_RESP, END_RST
from xdpml.wire.columns import ColumnBatch

log = logging.getLogger(__name__)


class FlowTable(Protocol):
    """What the harvester needs from the kernel flow map (xdpml.datapath.maps.FlowMap)."""

    def read_all(self) -> tuple[np.ndarray, np.ndarray]: ...
    def take(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...
    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...
    def drain(self) -> tuple[np.ndarray, np.ndarray]: ...


def mono_to_unix_offset_ns() -> int:
    """Unix ns minus CLOCK_MONOTONIC ns (bpf_ktime_get_ns), sampled tightly."""
    best = None
    for _ in range(5):
        a = time.monotonic_ns()
        u = time.time_ns()
        b = time.monotonic_ns()
        if best is None or b - a < best[0]:
            best = (b - a, u - (a + b) // 2)
    return best[1]


@dataclass
class HarvestStats:
    scans: int = 0
    active: int = 0  # flows in the table at the last scan
    exported: int = 0  # final rows (early snapshots are counted in by_reason["early"] only)
    records_merged: int = 0  # kernel records folded into another interface's row (seen_on)
    by_reason: dict | None = None

    def __post_init__(self):
        self.by_reason = {k: 0 for k in EXPIRATION}


class Harvester:
    def __init__(
        self,
        table: FlowTable,
        *,
        settings: HarvestSettings,
        first_n: int,
        mono_to_unix_ns: int,
        ifnames: Mapping[int, str] | None = None,
        ifkinds: Mapping[int, str] | None = None,
        end_grace_s: float = 1.0,
        clock=time.monotonic_ns,
        capacity: int = 0,
        high_water: float = 0.9,
    ):
        self.table = table
        self.settings = settings
        self.first_n = first_n
        self.mono_to_unix_ns = mono_to_unix_ns
        self.ifnames = ifnames if ifnames is not None else {}
        self.ifkinds = ifkinds if ifkinds is not None else {}  # ifindex -> physical | veth | virtual
        self.end_grace_ns = int(end_grace_s * 1e9)
        self.clock = clock
        self.capacity = capacity  # flow table entries; 0 = unknown (no pressure handling)
        self.high_water = high_water
        self.stats = HarvestStats()
        self.pressure_scans = 0
        self._pressure_logged = 0.0
        self._last_scan_ns = 0  # the previous scan's clock: flows turning early_ms old since then
        self._early_by_scan: set[bytes] = set()  # keys the scan exported early, until they leave
        self._early_pending: ColumnBatch | None = None
        # pass rules that keep their flows out of the export: () -> {rule slot: rule
        # generation}; a flow whose cached decision (enf_slot/enf_gen, bpf/rules.h) names
        # such a rule, taken at or after the rule's generation, is not exported
        self.no_export: Callable[[], dict[int, int]] | None = None
        self.stats_not_exported = 0

    def _reasons(self, values: np.ndarray, now: int) -> np.ndarray:
        """-2 keep, else the expiration id."""
        last = values["last_ns"].astype(np.int64)
        first = values["first_ns"].astype(np.int64)
        ends = values["end_flags"]
        fin_both = (ends & (END_FIN_INIT | END_FIN_RESP)) == (END_FIN_INIT | END_FIN_RESP)
        tcp_end = ((ends & END_RST) != 0) | fin_both
        quiet = now - last
        reason = np.full(len(values), -2, dtype=np.int8)
        reason[quiet >= int(self.settings.idle_timeout_s * 1e9)] = EXPIRATION["idle"]
        reason[now - first >= int(self.settings.active_timeout_s * 1e9)] = EXPIRATION["active"]
        reason[tcp_end & (quiet >= self.end_grace_ns)] = EXPIRATION["tcp_end"]
        if self.capacity and len(values) > self.high_water * self.capacity:
            early_ns = int(max(1.0, self.settings.idle_timeout_s / 16) * 1e9)
            early = (reason == -2) & (quiet >= early_ns)
            reason[early] = EXPIRATION["idle"]
            self.pressure_scans += 1
            if time.monotonic() - self._pressure_logged > 60:
                self._pressure_logged = time.monotonic()
                log.warning(
                    "flow table %d%% full (%d of %d): exporting %d flows quiet for %.0fs early; "
                    "raise --flow-table-size if this persists",
                    100 * len(values) // self.capacity,
                    len(values),
                    self.capacity,
                    int(early.sum()),
                    early_ns / 1e9,
                )
        return reason

    def scan(self, now_ns: int | None = None) -> ColumnBatch | None:
        """Take the finished flows out (their final records). Snapshots of flows that
        became early_ms old since the last scan wait in :meth:`take_early`."""
        now = self.clock() if now_ns is None else now_ns
        keys, values = self.table.read_all()
        self.stats.scans += 1
        self.stats.active = len(keys)
        since, self._last_scan_ns = self._last_scan_ns, now
        if not len(keys):
            return None
        reason = self._reasons(values, now)
        conv = None
        if self.settings.record_per == "conversation":
            reason, conv = due_with_siblings(keys, reason)
        early_ns = int(round(self.settings.early_ms)) * 1_000_000
        if early_ns > 0:
            first = values["first_ns"].astype(np.int64)
            due = (
                (reason == -2)
                & ((values["end_flags"] & EARLY_SENT) == 0)
                & (first + early_ns <= now)
                & (first + early_ns > since)
            )
            if due.any():
                ek, ev = keys[due].copy(), values[due].copy()
                self._early_by_scan.update(k.tobytes() for k in ek)
                self._add_early(self._columns(ek, ev, np.full(len(ek), EXPIRATION["early"], np.int8)))
        done = reason >= -1
        if not done.any():
            return None
        want_keys, want_reason = keys[done], reason[done]
        want_conv = conv[done] if conv is not None else None
        got_keys, got_values = self.table.take(want_keys)
        if len(got_keys) != len(want_keys):
            # a key vanished between read and take (another consumer): keep reasons aligned
            pos = {k.tobytes(): i for i, k in enumerate(want_keys)}
            idx = np.array([pos[k.tobytes()] for k in got_keys], dtype=np.int64)
            want_reason = want_reason[idx]
            want_conv = want_conv[idx] if want_conv is not None else None
        self.stats.active -= len(got_keys)
        if self._early_by_scan:
            for k in got_keys:
                self._early_by_scan.discard(k.tobytes())
        return self._columns(got_keys, got_values, want_reason, conv=want_conv)

    def _add_early(self, batch: ColumnBatch) -> None:
        if self._early_pending is None:
            self._early_pending = batch
        else:
            self._early_pending = ColumnBatch.concat([self._early_pending, batch])

    def take_early(self) -> ColumnBatch | None:
        """The early snapshots the last scan took (None if none)."""
        batch, self._early_pending = self._early_pending, None
        return batch

    def early(self, keys: np.ndarray) -> ColumnBatch | None:
        """Snapshots (expiration id 3) of the flows the kernel's early notices name,
        still in the table (a flow that ended meanwhile went out with its final record)."""
        if not len(keys):
            return None
        keep, seen = [], set()
        for i, k in enumerate(keys):
            kb = k.tobytes()
            if kb in seen:
                continue
            seen.add(kb)
            if kb in self._early_by_scan:  # the scan sent this one's snapshot already
                self._early_by_scan.discard(kb)
                continue
            keep.append(i)
        if not keep:
            return None
        got_keys, got_values = self.table.lookup(np.ascontiguousarray(keys[keep]))
        if not len(got_keys):
            return None
        return self._columns(got_keys, got_values, np.full(len(got_keys), EXPIRATION["early"], np.int8))

    def drain(self) -> ColumnBatch | None:
        """Everything left (agent stop): expiration id -1."""
        keys, values = self.table.drain()
        self._early_by_scan.clear()
        if not len(keys):
            return None
        return self._columns(keys, values, np.full(len(keys), EXPIRATION["agent_stop"], np.int8))

    def _excluded(self, values: np.ndarray) -> np.ndarray | None:
        """Rows a no-export pass rule matched (None: none)."""
        if self.no_export is None or not len(values):
            return None
        try:
            slots = self.no_export()
        except OSError as exc:
            log.warning("reading the no-export rules failed: %s", exc)
            return None
        if not slots:
            return None
        out = np.zeros(len(values), dtype=bool)
        for d in (0, 1):
            s, g = values["enf_slot"][:, d], values["enf_gen"][:, d]
            for slot, gen in slots.items():
                out |= (s == slot) & (g >= gen)
        return out if out.any() else None

    def _columns(self, keys, values, reason, conv=None) -> ColumnBatch:
        reason = np.asarray(reason)
        drop = self._excluded(values)
        if drop is not None:
            self.stats_not_exported += int(drop.sum())
            keys, values, reason = keys[~drop], values[~drop], reason[~drop]
            if conv is not None:
                conv = conv[~drop]
        final = reason != EXPIRATION["early"]  # a batch is all early snapshots or all final
        seen_on = points = None
        if self.settings.record_per == "conversation":
            before = int(final.sum())
            m = merge(keys, values, ifnames=self.ifnames, kinds=self.ifkinds, conv=conv)
            seen_on, points = m.seen_on, m.points
            tunnels = values[m.tunnel]
            keys, values, reason = keys[m.reported], values[m.reported], reason[m.reported]
            for name in TUNNEL_FIELDS:
                values[name] = tunnels[name]
            final = final[m.reported]
            self.stats.records_merged += before - int(final.sum())
        self.stats.exported += int(final.sum())
        for name, rid in EXPIRATION.items():
            self.stats.by_reason[name] += int(np.sum(reason == rid))
        return flow_columns(
            keys,
            values,
            expiration=reason,
            mono_to_unix_ns=self.mono_to_unix_ns,
            ifnames=self.ifnames,
            first_n=self.first_n,
            seen_on=seen_on,
            observation_points=points,
        )
