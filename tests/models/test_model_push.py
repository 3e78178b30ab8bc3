"""The collector pushes a signed model (--push-model) and the agent loads it live
(--model-trusted-key): a real collector gRPC server, the agent's real pipeline on a test
veth, the model slots in the kernel. A signed v1 lands in the active slot and classifies
the traffic sent; an unknown key, a tampered bundle, a junk bundle, an old version and a
push with no trusted key are refused and counted while v1 stays active; a v2 replaces it.

Expected classes come from scikit-learn's predict of the trees pushed, not from the agent."""

import sys
import time

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
from xdpml.models import bundle, signing
from xdpml.models.compiler import compile_model

pytestmark = pytest.mark.root
LOW, HIGH, SPORT = 1600, 2600, 4483


def tree_bundle(cut: int) -> tuple[bytes, DecisionTreeClassifier]:
    """A tree on dst_port: class 1 at or above ``cut``."""
    xs = np.array([[p] for p in range(1000, 3200, 25)])
    est = DecisionTreeClassifier(random_state=0).fit(xs, (xs[:, 0] >= cut).astype(int))
    return bundle.dumps(compile_model(est, ["dst_port"])), est


def test_collector_pushes_signed_models_the_agent_verifies(tmp_path):
    good = signing.keygen(str(tmp_path / "trainer"))
    other = signing.keygen(str(tmp_path / "intruder"))
    key, bad_key = signing.load_private_key(good[0]), signing.load_private_key(other[0])
    v1, est1 = tree_bundle(2000)  # LOW -> 0, HIGH -> 1
    v2, est2 = tree_bundle(1200)  # both -> 1
    assert [int(est1.predict([[p]])[0]) for p in (LOW, HIGH)] == [0, 1]
    assert [int(est2.predict([[p]])[0]) for p in (LOW, HIGH)] == [1, 1]
    pushed = tmp_path / "model.signed"

    def publish(data: bytes) -> None:  # as a retrain job would: a new file renamed over the old
        tmp = tmp_path / "model.signed.tmp"
        tmp.write_bytes(data)
        tmp.replace(pushed)

    publish(signing.sign(v1, key, name="tree", version=1))
    srv = CollectorServer(
        PacketsModel(), [], CollectorSettings(listen="127.0.0.1:0", push_model=str(pushed), send_verdicts=False)
    ).start()
    try:
        with private_bpffs("xdpml-push-bpffs-") as bpffs, make_hosts(75, ipv6=False) as (h,):
            settings = AgentSettings(
                interfaces=InterfaceSettings(names=[h.host_if], hooks="tc"),
                harvest=HarvestSettings(idle_timeout_s=1, interval_s=0.1),
                enforce=EnforceSettings(pin_dir=f"{bpffs}/agent"),
                model=ModelSettings(slots=True, actions={"1": "alert"}, trusted_keys=[good[1]]),
                summary_interval_s=0,
            )
            exporter = GrpcExporter(ExporterSettings(target=f"127.0.0.1:{srv.port}", node_name="push-node"))
            agent = Agent(settings, interfaces=[h.host_if], sinks=[CollectorSink(exporter), MemorySink()])
            exporter.on_model = agent.on_model
            agent.start(attach_timeout_s=240)
            rx = [Receiver(h.host_ip, p) for p in (LOW, HIGH)]  # no ICMP port unreachable to classify
            try:
                # the exporter connects once it has records to send: some traffic first
                send(h, [LOW])

                def outcome(result: str, n: int, timeout: float = 60.0) -> None:
                    deadline = time.monotonic() + timeout
                    while agent.model_updates.get(result, 0) < n and time.monotonic() < deadline:
                        time.sleep(0.05)
                    assert agent.model_updates.get(result, 0) == n, agent.model_updates

                outcome("loaded", 1)
                slots = agent.model.slots
                v1_id = int(slots.read_slot(slots.active())["model_id"])
                assert agent.model.pushed_version == 1
                assert counts_after(h, slots, {LOW: 5, HIGH: 3}) == {0: 5, 1: 3}  # est1's classes

                refusals = [
                    ("untrusted", signing.sign(v2, bad_key, name="tree", version=5)),
                    ("bad_signature", tamper(signing.sign(v2, key, name="tree", version=6))),
                    ("invalid", signing.sign(b"XDPMLMOD junk", key, name="tree", version=7)),
                ]
                for result, data in refusals:
                    publish(data)
                    send(h, [LOW])
                    outcome(result, 1)
                    assert int(slots.read_slot(slots.active())["model_id"]) == v1_id, result
                publish(signing.sign(v2, key, name="tree", version=2))
                send(h, [LOW])
                outcome("loaded", 2)
                assert agent.model.pushed_version == 2
                v2_id = int(slots.read_slot(slots.active())["model_id"])
                assert v2_id != v1_id
                assert counts_after(h, slots, {LOW: 4, HIGH: 2}) == {1: 6}  # est2's classes
                publish(signing.sign(v1, key, name="tree", version=1))  # a rollback
                send(h, [LOW])
                outcome("stale", 1)
                agent.model.settings.trusted_keys = []
                publish(signing.sign(v1, key, name="tree", version=9))
                send(h, [LOW])
                outcome("disabled", 1)
                assert int(slots.read_slot(slots.active())["model_id"]) == v2_id
                assert agent.model.pushed_version == 2
                assert agent.model_updates == {
                    "loaded": 2,
                    "untrusted": 1,
                    "bad_signature": 1,
                    "invalid": 1,
                    "stale": 1,
                    "disabled": 1,
                }
            finally:
                agent.stop()
                for r in rx:
                    r.close()
        assert srv.stats()["models_pushed"] == 7  # each version once on the one stream
    finally:
        srv.stop(0)


def tamper(env: bytes) -> bytes:
    return env[:-1] + bytes([env[-1] ^ 1])


_SENT = {"n": 0}


def send(h, ports, counts=None) -> None:
    """UDP datagrams from a fresh source port each call (a new flow, classified anew)."""
    _SENT["n"] += 1
    sport = SPORT + _SENT["n"]
    lines = "".join(f"for i in range({(counts or {}).get(p, 1)}): s.sendto(b'x',('{h.host_ip}',{p}))\n" for p in ports)
    code = f"import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('{h.ns_ip}',{sport}))\n" + lines
    h.run(f'{sys.executable} -c "{code}"')


def counts_after(h, slots, counts: dict) -> dict:
    """Packets per class the active slot counted for the datagrams sent now."""
    slot = slots.active()
    before = slots.class_counts(slot).copy()
    send(h, list(counts), counts)
    want = sum(counts.values())
    deadline = time.monotonic() + 30
    while (slots.class_counts(slot) - before)[:-1].sum() < want and time.monotonic() < deadline:
        time.sleep(0.05)
    diff = slots.class_counts(slot) - before
    return {k: int(c) for k, c in enumerate(diff[:-1]) if c}


def test_the_pushed_version_outlives_an_agent_restart(tmp_path):
    """The newest pushed version is kept in the model_push map, pinned beside the rules:
    an agent restarted on the same pin directory (a new datapath, new, empty model slots)
    loads that version again (the collector pushes its current model on reconnecting) but
    refuses an older signed model, a replay, and loads a newer one; the pins' removal
    (`xdpml rules unpin`) takes it away with the rule maps."""
    from xdpml.agent.model import AgentModel

    from xdpml.datapath.loader import Datapath
    from xdpml.datapath.pins import unpin
    from xdpml.models import layout as L

    good = signing.keygen(str(tmp_path / "trainer"))
    key = signing.load_private_key(good[0])
    data, _ = tree_bundle(2000)
    lim = L.Limits(trees=4, depth=12, nodes=1024, leaf_values=1024)
    with private_bpffs("xdpml-pushv-bpffs-") as bpffs:
        pin = f"{bpffs}/agent"
        settings = AgentSettings(
            enforce=EnforceSettings(pin_dir=pin), model=ModelSettings(slots=True, trusted_keys=[good[1]])
        )

        def model_ids(am) -> list[int]:
            return [int(am.slots.read_slot(i)["model_id"]) for i in (0, 1) if am.slots.read_slot(i)["kind"]]

        with Datapath(settings, model_limits=lim) as dp:
            am = AgentModel(dp, settings.model, pin_dir=pin)
            assert am.pushed_version == 0
            assert am.push(signing.sign(data, key, name="tree", version=3)) == "loaded"
            assert am.pushed_version == 3
            assert am.push(signing.sign(data, key, name="tree", version=3)) == "stale"
        with Datapath(settings, model_limits=lim) as dp:  # the agent restarted
            am = AgentModel(dp, settings.model, pin_dir=pin)
            assert am.pushed_version == 3 and model_ids(am) == []  # new, empty slots
            assert am.push(signing.sign(data, key, name="tree", version=2)) == "stale"
            assert model_ids(am) == []
            assert am.push(signing.sign(data, key, name="tree", version=3)) == "loaded"
            assert len(model_ids(am)) == 1
            assert am.push(signing.sign(data, key, name="tree", version=3)) == "stale"
            assert am.push(signing.sign(data, key, name="tree", version=4)) == "loaded"
            assert am.pushed_version == 4 and len(model_ids(am)) == 2
        assert f"{pin}/model_push" in unpin(pin)
        with Datapath(settings, model_limits=lim) as dp:  # pins removed: the version is gone too
            assert AgentModel(dp, settings.model, pin_dir=pin).pushed_version == 0
