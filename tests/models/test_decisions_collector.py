"""The kernel model's sampled decisions reach the collector (--model-decisions-to-collector):
the agent's real pipeline on a test veth with a tree on dst_port loaded from its file,
every decision sampled (1 in 1), exported over gRPC as record kind "decision" to a real
collector, which stores them (not scored, no verdicts) and counts them.

Expected values come from the traffic sent and from scikit-learn's predict of the
same tree, not from the agent."""

import sys
import threading
import time

import joblib
import numpy as np
import pytest
from enforce.traffic import Receiver
from grpc_fixtures import PacketsModel
from harness import MemorySink
from netns import make_hosts
from sklearn.tree import DecisionTreeClassifier
from xdpml.agent.export.grpc_client import ExporterSettings, GrpcExporter
from xdpml.agent.export.sinks import CollectorSink
from xdpml.agent.pipeline import Agent
from xdpml.collector.server import CollectorServer, CollectorSettings

from xdpml.config import AgentSettings, EnforceSettings, HarvestSettings, InterfaceSettings, ModelSettings
from xdpml.lab import private_bpffs

pytestmark = pytest.mark.root
LOW, HIGH, SPORT = 1600, 2600, 4481
N_LOW, N_HIGH = 10, 6


class Keeping:
    """A collector sink keeping every ScoredBatch it is given."""

    def __init__(self):
        self.batches = []
        self.lock = threading.Lock()

    def write(self, scored):
        with self.lock:
            self.batches.append(scored)

    def of(self, kind):
        with self.lock:
            return [s for s in self.batches if s.batch.kind == kind]

    def close(self):
        pass


def test_sampled_decisions_go_to_the_collector_unscored(tmp_path):
    xs = np.array([[p] for p in range(1000, 3200, 25)])
    est = DecisionTreeClassifier(random_state=0).fit(xs, (xs[:, 0] >= 2000).astype(int))
    path = str(tmp_path / "tree.joblib")
    joblib.dump(est, path)
    want = {LOW: int(est.predict([[LOW]])[0]), HIGH: int(est.predict([[HIGH]])[0])}
    assert want == {LOW: 0, HIGH: 1}

    keep = Keeping()
    srv = CollectorServer(PacketsModel(), [keep], CollectorSettings(listen="127.0.0.1:0")).start()
    local = MemorySink()
    try:
        with private_bpffs("xdpml-dec-bpffs-") as bpffs, make_hosts(74, ipv6=False) as (h,):
            settings = AgentSettings(
                interfaces=InterfaceSettings(names=[h.host_if], hooks="tc"),
                harvest=HarvestSettings(idle_timeout_s=1, interval_s=0.1),
                enforce=EnforceSettings(pin_dir=f"{bpffs}/agent"),
                model=ModelSettings(
                    file=path,
                    features=["dst_port"],
                    actions={"1": "alert"},
                    sample_every=1,
                    decisions_to_collector=True,
                ),
                summary_interval_s=0,
            )
            exporter = GrpcExporter(ExporterSettings(target=f"127.0.0.1:{srv.port}", node_name="dec-node"))
            agent = Agent(settings, interfaces=[h.host_if], sinks=[CollectorSink(exporter), local])
            agent.start(attach_timeout_s=240)
            rx = {p: Receiver(h.host_ip, p) for p in (LOW, HIGH)}
            try:
                code = (
                    "import socket\n"
                    "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
                    f"s.bind(('{h.ns_ip}',{SPORT}))\n"
                    f"for i in range({N_LOW}): s.sendto(b'x',('{h.host_ip}',{LOW}))\n"
                    f"for i in range({N_HIGH}): s.sendto(b'y',('{h.host_ip}',{HIGH}))\n"
                )
                h.run(f'{sys.executable} -c "{code}"')

                def mine():
                    rows = []
                    for s in keep.of("decision"):
                        for i, r in enumerate(s.batch.rows()):
                            if SPORT in (r["lo_port"], r["hi_port"]):
                                rows.append((r, s.label[i], bool(s.flagged[i]), s.score[i], s.model))
                    return rows

                deadline = time.monotonic() + 30
                while len(mine()) < N_LOW + N_HIGH and time.monotonic() < deadline:
                    time.sleep(0.05)
                got = mine()
            finally:
                agent.stop()
                for r in rx.values():
                    r.close()
        assert len(got) == N_LOW + N_HIGH, got[:3]
        by_port = {LOW: [], HIGH: []}
        for r, label, flagged, score, model in got:
            port = r["x_dst_port"]
            by_port[port].append(r)
            assert r["class"] == want[port] and label == f"class {want[port]}"
            assert r["action"] == ("alert" if want[port] == 1 else "pass") and r["dropped"] is False
            assert {r["lo_ip"], r["hi_ip"]} == {h.ns_ip, h.host_ip} and r["protocol"] == 17
            assert (flagged, np.isnan(score), model) == (False, True, "kernel")
        assert (len(by_port[LOW]), len(by_port[HIGH])) == (N_LOW, N_HIGH)
        st = srv.stats()
        assert st["decision_rows"] == sum(len(s.batch) for s in keep.of("decision"))
        # decisions are not scored: only flow rows are
        assert st["rows_scored"] + st["rows_unscored"] == sum(len(s.batch) for s in keep.of("flow"))
        # the agent's local sinks never get decision records
        assert all(b.kind != "decision" for b in local.batches)
    finally:
        srv.stop(0)
