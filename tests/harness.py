"""Run the real agent (compiled BPF, attached to test-host veths) in a thread."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import numpy as np
from xdpml.agent.pipeline import Agent

from xdpml.config import AgentSettings, DatapathSettings, HarvestSettings, InterfaceSettings, WindowSettings
from xdpml.wire.columns import ColumnBatch


class MemorySink:
    def __init__(self):
        self.batches: list[ColumnBatch] = []
        self.lock = threading.Lock()
        self.closed = False

    def write(self, batch: ColumnBatch) -> None:
        with self.lock:
            self.batches.append(batch)

    def close(self) -> None:
        self.closed = True

    def rows(self, kind: str) -> list[dict]:
        with self.lock:
            return [r for b in self.batches if b.kind == kind for r in b.rows()]

    def wait_rows(self, kind: str, pred, *, count: int = 1, timeout: float = 15.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            got = [r for r in self.rows(kind) if pred(r)]
            if len(got) >= count or time.monotonic() > deadline:
                return got
            time.sleep(0.1)


@contextmanager
def running_agent(
    interfaces: list[str],
    *,
    hooks: str = "auto",
    xdp_mode: str = "auto",
    idle_timeout_s: float = 1.0,
    first_n: int = 10,
    window_packets: int = 0,
    window_seconds: float = 0.0,
    sample_rate: int = 0,
    interval_s: float = 0.2,
    record_per: str = "conversation",
):
    settings = AgentSettings(
        interfaces=InterfaceSettings(names=interfaces, hooks=hooks, xdp_mode=xdp_mode),
        datapath=DatapathSettings(first_n=first_n, sample_rate=sample_rate),
        harvest=HarvestSettings(idle_timeout_s=idle_timeout_s, interval_s=interval_s, record_per=record_per),
        window=WindowSettings(packets=window_packets, seconds=window_seconds),
        summary_interval_s=0,
    )
    sink = MemorySink()
    agent = Agent(settings, interfaces=interfaces, sinks=[sink]).start(attach_timeout_s=90)
    try:
        yield agent, sink
    finally:
        agent.stop()
        assert not agent.running, "agent did not stop"
        if agent.error is not None:
            raise agent.error


def flow_between(a_ip: str, b_ip: str, proto: int, port: int | None = None):
    def pred(r):
        ips = {r["src_ip"], r["dst_ip"]}
        return (
            ips == {a_ip, b_ip} and r["protocol"] == proto and (port is None or port in (r["src_port"], r["dst_port"]))
        )

    return pred


def sample_std(values) -> float:
    v = np.asarray(values, dtype=float)
    return float(v.std(ddof=1)) if len(v) > 1 else 0.0
