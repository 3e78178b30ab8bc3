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
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from xdpml.agent.features import EXPIRATION, flow_columns
from xdpml.agent.observations import TUNNEL_FIELDS, due_with_siblings, merge

from xdpml.config import HarvestSettings
from xdpml.datapath.abi import END_FIN_INIT, END_FIN_RESP, END_RST
from xdpml.wire.columns import ColumnBatch

log = logging.getLogger(__name__)


class FlowTable(Protocol):
    """What the harvester needs from the kernel flow map (xdpml.datapath.maps.FlowMap)."""

    def read_all(self) -> tuple[np.ndarray, np.ndarray]: ...
    def take(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...
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
    exported: int = 0  # rows
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
        now = self.clock() if now_ns is None else now_ns
        keys, values = self.table.read_all()
        self.stats.scans += 1
        self.stats.active = len(keys)
        if not len(keys):
            return None
        reason = self._reasons(values, now)
        conv = None
        if self.settings.record_per == "conversation":
            reason, conv = due_with_siblings(keys, reason)
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
        return self._columns(got_keys, got_values, want_reason, conv=want_conv)

    def drain(self) -> ColumnBatch | None:
        """Everything left (agent stop): expiration id -1."""
        keys, values = self.table.drain()
        if not len(keys):
            return None
        return self._columns(keys, values, np.full(len(keys), EXPIRATION["agent_stop"], np.int8))

    def _columns(self, keys, values, reason, conv=None) -> ColumnBatch:
        seen_on = points = None
        if self.settings.record_per == "conversation":
            self.stats.records_merged += len(keys)
            m = merge(keys, values, ifnames=self.ifnames, kinds=self.ifkinds, conv=conv)
            seen_on, points = m.seen_on, m.points
            tunnels = values[m.tunnel]
            keys, values, reason = keys[m.reported], values[m.reported], reason[m.reported]
            for name in TUNNEL_FIELDS:
                values[name] = tunnels[name]
            self.stats.records_merged -= len(keys)
        self.stats.exported += len(keys)
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
