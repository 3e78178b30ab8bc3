"""The AgentConfig names a model and changes it live: the Kubernetes agent's real
datapath on a test veth, configured through the fake API server. The model file
changes (a new path, as a ConfigMap volume would be re-pointed) and the kernel
classifies with the new model in the same datapath: no restart, no re-attach."""

from __future__ import annotations

import base64
import json
import os
import socket
import sys
import threading

import joblib
import numpy as np
import pytest
from netns import make_hosts
from sklearn.tree import DecisionTreeClassifier
from xdpml.agent.enrich.manager import EnrichmentManager
from xdpml.agent.kubernetes import KubeAgentOptions, KubernetesAgent

from xdpml.kube.reflector import Backoff

from .conftest import agentconfig_object, kube_agent, wait_for

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(300)]
PORT = 7101


def tree_file(path: str, cls: int) -> None:
    """A model on dst_port whose class for PORT is ``cls`` (3 classes known)."""
    x = np.array([[p] for p in (10, 20, PORT - 1, PORT, PORT + 1, 9000, 9001)])
    y = np.array([0, 1, cls, cls, cls, 2, 2])
    joblib.dump(DecisionTreeClassifier(random_state=0).fit(x, y), path)


def send(h, n: int) -> None:
    h.run(
        f'{sys.executable} -c "import socket; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n'
        f"for i in range({n}): s.sendto(b'x', ('{h.host_ip}', {PORT}))\""
    )


def test_agentconfig_model_changed_live(fake_api, api_client, bpffs, tmp_path):
    m1, m2 = str(tmp_path / "m1.joblib"), str(tmp_path / "m2.joblib")
    tree_file(m1, 0)
    tree_file(m2, 1)
    backoff = lambda: Backoff(base_s=0.05, cap_s=0.2)  # noqa: E731
    with make_hosts(73, ipv6=False) as (h,), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
        rx.bind((h.host_ip, PORT))  # a listener: no ICMP port-unreachable replies to classify
        fake_api.create(
            "agentconfigs",
            {
                "apiVersion": "xdpml.io/v1alpha1",
                "kind": "AgentConfig",
                "metadata": {"name": "main", "namespace": "xdpml"},
                "spec": {
                    "interfaces": [{"names": [h.host_if], "hooks": "tc"}],
                    "timeouts": {"scanIntervalSeconds": 0.2},
                    "model": {"slots": True, "file": m1, "features": ["dst_port"]},
                },
            },
        )
        sup = KubernetesAgent(
            api_client,
            KubeAgentOptions(namespace="xdpml", node_name="node-a", pin_dir=os.path.join(bpffs, "p")),
            enrich_factory=lambda api: EnrichmentManager(
                api, node_name="node-a", watch_timeout_s=5, backoff_factory=backoff
            ),
            watcher_kwargs={"node_labels": {}, "watch_timeout_s": 5, "backoff_factory": backoff},
        )
        runner = threading.Thread(target=sup.run, daemon=True)
        runner.start()
        try:
            wait_for(lambda: sup.agent is not None and sup.agent.model is not None, 240, "agent with model slots")
            slots = sup.agent.model.slots
            dp = sup.agent.datapath
            wait_for(lambda: slots.read_slot(slots.active())["kind"] == 1, 10, "model 1 loaded")
            slots.clear_stats()
            send(h, 50)
            wait_for(lambda: slots.class_counts()[0] == 50, 10, "50 packets in class 0 under model 1")

            fake_api.update("agentconfigs", "xdpml", "main", lambda o: o["spec"]["model"].update(file=m2))
            wait_for(lambda: int(slots.ctl().seq) == 2, 30, "model 2 loaded live")
            assert sup.agent.datapath is dp, "the datapath was restarted for a model change"
            send(h, 30)
            wait_for(lambda: slots.class_counts()[1] == 30, 10, "30 packets in class 1 under model 2")
            c = slots.class_counts()
            assert (c[0], c[1], c[2], c[-1]) == (50, 30, 0, 0)

            # the file rewritten in place (a ConfigMap volume update): reloaded
            tree_file(m2, 2)
            wait_for(lambda: int(slots.ctl().seq) == 3, 30, "rewritten file reloaded")
            send(h, 20)
            wait_for(lambda: slots.class_counts()[2] == 20, 10, "20 packets in class 2")

            # per-class actions and sampled decisions to a file, live
            dec = tmp_path / "decisions.jsonl"

            def live_model(o):
                o["spec"]["model"].update(actions={"2": "alert"}, decisionsFile=str(dec), decisionSampleEvery=1)

            fake_api.update("agentconfigs", "xdpml", "main", live_model)
            wait_for(lambda: int(slots.ctl().seq) == 4 and slots.ctl().sample_every == 1, 30, "actions applied")
            slots.clear_stats()
            send(h, 20)
            wait_for(lambda: slots.action_counts()["alert"] == 20, 10, "20 packets of the alert class")

            def records():
                return [json.loads(ln) for ln in dec.read_text().splitlines()] if dec.exists() else []

            wait_for(lambda: len(records()) == 20, 10, "20 decision records")
            assert {(r["class"], r["action"], r["features"]["dst_port"]) for r in records()} == {(2, "alert", PORT)}
            fake_api.update("agentconfigs", "xdpml", "main", lambda o: o["spec"]["model"].update(decisionsFile=""))
            wait_for(lambda: slots.ctl().sample_every == 0, 30, "decision sampling off")
            assert sup.agent.datapath is dp, "the datapath was restarted for a live model change"

            # no file any more (the slots stay on): unloaded live
            fake_api.update("agentconfigs", "xdpml", "main", lambda o: o["spec"]["model"].update(file=""))
            wait_for(lambda: slots.read_slot(slots.active())["kind"] == 0, 30, "model unloaded")
            assert sup.agent.datapath is dp
        finally:
            sup.stop_event.set()
            runner.join(60)
        assert not runner.is_alive()


# ---- spec.model.configMap: the model read through the API --------------------------------


def onnx_tree(cls: int) -> bytes:
    """tree_file's model as an ONNX tree ensemble (what the API may carry: no pickle)."""
    from skl2onnx import to_onnx

    x = np.array([[p] for p in (10, 20, PORT - 1, PORT, PORT + 1, 9000, 9001)], dtype=np.float32)
    y = np.array([0, 1, cls, cls, cls, 2, 2])
    est = DecisionTreeClassifier(random_state=0).fit(x, y)
    return to_onnx(est, x[:1], options={id(est): {"zipmap": False}}).SerializeToString()


def configmap(name: str, key: str, data: bytes, **labels) -> dict:
    return {
        "metadata": {"name": name, "namespace": "xdpml", "labels": labels},
        "binaryData": {key: base64.b64encode(data).decode()},
    }


def cm_agentconfig(h, model: dict) -> dict:
    return agentconfig_object(
        {
            "interfaces": [{"names": [h.host_if], "hooks": "tc"}],
            "timeouts": {"scanIntervalSeconds": 0.2},
            "model": {"features": ["dst_port"], **model},
        }
    )


def cm_agent(api_client, bpffs, **source):
    backoff = lambda: Backoff(base_s=0.05, cap_s=0.2)  # noqa: E731
    return kube_agent(
        api_client,
        KubeAgentOptions(namespace="xdpml", node_name="node-a", pin_dir=os.path.join(bpffs, "p")),
        model_source_kwargs={"watch_timeout_s": 5, "backoff_factory": backoff, **source},
    )


def events(fake_api, reason: str) -> list[str]:
    return [e["message"] for e in fake_api.list("events") if e.get("reason") == reason]


def model_status(fake_api) -> dict:
    obj = fake_api.get("agentconfigs", "xdpml", "main") or {}
    return ((obj.get("status") or {}).get("nodes") or {}).get("node-a", {}).get("model") or {}


def test_configmap_model_loaded_and_changed_live(fake_api, api_client, bpffs):
    m0, m1, m2 = onnx_tree(0), onnx_tree(1), onnx_tree(2)
    with make_hosts(74, ipv6=False) as (h,), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
        rx.bind((h.host_ip, PORT))
        cm = fake_api.create("configmaps", configmap("tree", "tree.onnx", m0))
        fake_api.create("agentconfigs", cm_agentconfig(h, {"configMap": {"name": "tree", "key": "tree.onnx"}}))
        sup = cm_agent(api_client, bpffs)
        runner = threading.Thread(target=sup.run, daemon=True)
        runner.start()
        try:
            wait_for(lambda: sup.agent is not None and sup.agent.model is not None, 240, "agent with model slots")
            slots, dp = sup.agent.model.slots, sup.agent.datapath
            wait_for(lambda: int(slots.ctl().seq) == 1, 30, "the ConfigMap's model loaded")
            assert slots.read_slot(slots.active())["kind"] == 1
            wait_for(lambda: model_status(fake_api).get("loaded") is True, 10, "status: model loaded")
            st = model_status(fake_api)
            mid = int(slots.read_slot(slots.active())["model_id"])
            assert st == {
                "configMap": "tree",
                "key": "tree.onnx",
                "resourceVersion": cm["metadata"]["resourceVersion"],
                "loaded": True,
                "message": f"model {mid} loaded",
            }
            wait_for(lambda: len(events(fake_api, "ModelLoaded")) == 1, 10, "ModelLoaded event")
            slots.clear_stats()
            send(h, 50)
            wait_for(lambda: slots.class_counts()[0] == 50, 10, "50 packets in class 0 under model 1")

            # new bytes in the ConfigMap: loaded live, same datapath
            fake_api.update("configmaps", "xdpml", "tree", lambda o: o.update(configmap("tree", "tree.onnx", m1)))
            wait_for(lambda: int(slots.ctl().seq) == 2, 30, "the updated ConfigMap's model loaded live")
            assert sup.agent.datapath is dp, "the datapath was restarted for a model change"
            assert int(slots.read_slot(slots.active())["model_id"]) != mid
            send(h, 30)
            wait_for(lambda: slots.class_counts()[1] == 30, 10, "30 packets in class 1 under model 2")

            # a new version with the same bytes (a label changed): not reloaded
            same = fake_api.update("configmaps", "xdpml", "tree", lambda o: o["metadata"].update(labels={"a": "b"}))
            wait_for(lambda: sup._model_source.seen == same["metadata"]["resourceVersion"], 10, "version seen")

            # a model that does not compile: refused, reported, the running model stays
            bad = fake_api.update(
                "configmaps", "xdpml", "tree", lambda o: o.update(configmap("tree", "tree.onnx", b"not a model"))
            )
            wait_for(lambda: len(events(fake_api, "ModelRefused")) == 1, 30, "ModelRefused event")
            assert int(slots.ctl().seq) == 2, "the same bytes were reloaded, or the bad model replaced the good"
            (msg,) = events(fake_api, "ModelRefused")
            assert "ConfigMap xdpml/tree key tree.onnx" in msg and "the running model stays" in msg
            wait_for(lambda: model_status(fake_api).get("loaded") is False, 10, "status: refused")
            assert model_status(fake_api)["resourceVersion"] == bad["metadata"]["resourceVersion"]
            send(h, 10)
            wait_for(lambda: slots.class_counts()[1] == 40, 10, "10 more packets in class 1: model 2 stays")

            # the key gone, then the ConfigMap gone: reported, the model stays
            fake_api.update("configmaps", "xdpml", "tree", lambda o: o.update(binaryData={"other.onnx": ""}))
            wait_for(lambda: len(events(fake_api, "ModelRefused")) == 2, 30, "missing key reported")
            assert "no such key (keys: other.onnx)" in events(fake_api, "ModelRefused")[-1]
            fake_api.delete("configmaps", "xdpml", "tree")
            wait_for(lambda: len(events(fake_api, "ModelRefused")) == 3, 30, "missing ConfigMap reported")
            assert "ConfigMap xdpml/tree not found" in events(fake_api, "ModelRefused")[-1]
            assert int(slots.ctl().seq) == 2 and slots.read_slot(slots.active())["kind"] == 1

            # created again: loaded
            fake_api.create("configmaps", configmap("tree", "tree.onnx", m2))
            wait_for(lambda: int(slots.ctl().seq) == 3, 30, "the re-created ConfigMap's model loaded")
            send(h, 20)
            wait_for(lambda: slots.class_counts()[2] == 20, 10, "20 packets in class 2 under model 3")

            # the AgentConfig names another ConfigMap and key: switched live
            fake_api.create("configmaps", configmap("tree2", "m.onnx", m0))
            fake_api.update(
                "agentconfigs",
                "xdpml",
                "main",
                lambda o: o["spec"]["model"].update(configMap={"name": "tree2", "key": "m.onnx"}),
            )
            wait_for(lambda: int(slots.ctl().seq) == 4, 30, "the other ConfigMap's model loaded")
            slots.clear_stats()
            send(h, 15)
            wait_for(lambda: slots.class_counts()[0] == 15, 10, "15 packets in class 0 under model 4")
            c = slots.class_counts()
            assert (c[0], c[1], c[2], c[-1]) == (15, 0, 0, 0)
            # the old ConfigMap is not followed any more
            fake_api.update("configmaps", "xdpml", "tree", lambda o: o.update(configmap("tree", "tree.onnx", m1)))

            # no configMap any more (the slots stay on): unloaded live
            def no_configmap(o):
                del o["spec"]["model"]["configMap"]
                o["spec"]["model"]["slots"] = True

            fake_api.update("agentconfigs", "xdpml", "main", no_configmap)
            wait_for(lambda: slots.read_slot(slots.active())["kind"] == 0, 30, "model unloaded")
            assert int(slots.ctl().seq) == 5, "the old ConfigMap's change was loaded"
            wait_for(lambda: model_status(fake_api) == {}, 10, "status: no model entry")
            assert sup.agent.datapath is dp
        finally:
            sup.stop_event.set()
            runner.join(60)
        assert not runner.is_alive()


def test_configmap_model_refused_until_it_fits(fake_api, api_client, bpffs):
    m0 = onnx_tree(0)
    with make_hosts(75, ipv6=False) as (h,), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
        rx.bind((h.host_ip, PORT))
        # a pickle named from the API: the spec is refused, nothing runs
        fake_api.create("agentconfigs", cm_agentconfig(h, {"configMap": {"name": "tree", "key": "tree.joblib"}}))
        sup = cm_agent(api_client, bpffs, max_bytes=len(m0))
        runner = threading.Thread(target=sup.run, daemon=True)
        runner.start()
        try:
            wait_for(lambda: bool(events(fake_api, "InvalidSpec")), 30, "InvalidSpec event")
            (msg,) = events(fake_api, "InvalidSpec")
            assert "a .joblib or .pkl model is not read from the API" in msg and "--out MODEL.xdpml" in msg
            assert sup.agent is None

            # a valid key, but no such ConfigMap yet: the datapath runs, no model, reported
            fake_api.update(
                "agentconfigs",
                "xdpml",
                "main",
                lambda o: o["spec"]["model"].update(configMap={"name": "tree", "key": "tree.onnx"}),
            )
            wait_for(lambda: sup.agent is not None and sup.agent.model is not None, 240, "agent with model slots")
            slots = sup.agent.model.slots
            wait_for(lambda: bool(events(fake_api, "ModelRefused")), 30, "missing ConfigMap reported")
            (msg,) = events(fake_api, "ModelRefused")
            assert "ConfigMap xdpml/tree not found; the running model stays" in msg
            wait_for(lambda: model_status(fake_api).get("loaded") is False, 10, "status: not loaded")
            assert int(slots.ctl().seq) == 0 and slots.read_slot(slots.active())["kind"] == 0

            # too big: refused before it reaches the compiler
            fake_api.create("configmaps", configmap("tree", "tree.onnx", m0 + b"\0"))
            wait_for(lambda: len(events(fake_api, "ModelRefused")) == 2, 30, "too big reported")
            assert (
                f"{len(m0) + 1} bytes, more than the {len(m0)} a model may have" in events(fake_api, "ModelRefused")[-1]
            )
            assert int(slots.ctl().seq) == 0

            # fixed: loaded and classifying
            fake_api.update("configmaps", "xdpml", "tree", lambda o: o.update(configmap("tree", "tree.onnx", m0)))
            wait_for(lambda: int(slots.ctl().seq) == 1, 30, "the fixed ConfigMap's model loaded")
            wait_for(lambda: model_status(fake_api).get("loaded") is True, 10, "status: loaded")
            slots.clear_stats()
            send(h, 25)
            wait_for(lambda: slots.class_counts()[0] == 25, 10, "25 packets in class 0")
        finally:
            sup.stop_event.set()
            runner.join(60)
        assert not runner.is_alive()


def bundle_tree(cls: int) -> bytes:
    """tree_file's model compiled into an .xdpml bundle (data, not a pickle)."""
    from xdpml.models import bundle
    from xdpml.models.compiler import compile_model

    x = np.array([[p] for p in (10, 20, PORT - 1, PORT, PORT + 1, 9000, 9001)])
    y = np.array([0, 1, cls, cls, cls, 2, 2])
    return bundle.dumps(compile_model(DecisionTreeClassifier(random_state=0).fit(x, y), ["dst_port"]))


def test_bundle_from_a_configmap_then_a_model_the_collector_pushes(fake_api, api_client, bpffs, tmp_path):
    """The Kubernetes agent: an .xdpml bundle from a ConfigMap, then a signed model pushed by a
    real collector over the Export stream, verified against spec.model.trustedKeys; the
    same model signed by an untrusted key is refused and the pushed model stays."""
    from grpc_fixtures import PacketsModel
    from xdpml.collector.server import CollectorServer, CollectorSettings

    from xdpml.models import signing

    trainer, intruder = signing.keygen(str(tmp_path / "trainer")), signing.keygen(str(tmp_path / "intruder"))
    pushed = tmp_path / "model.signed"

    def publish(data: bytes) -> None:  # a retrain job renames a new file over the old
        (tmp_path / "tmp.signed").write_bytes(data)
        (tmp_path / "tmp.signed").replace(pushed)

    publish(signing.sign(bundle_tree(1), signing.load_private_key(trainer[0]), name="tree", version=1))
    settings = CollectorSettings(listen="127.0.0.1:0", push_model=str(pushed), send_verdicts=False)
    with (
        make_hosts(76, ipv6=False) as (h,),
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx,
        CollectorServer(PacketsModel(), [], settings) as srv,
    ):
        rx.bind((h.host_ip, PORT))
        fake_api.create("configmaps", configmap("tree", "tree.xdpml", bundle_tree(0)))
        spec = cm_agentconfig(h, {"configMap": {"name": "tree", "key": "tree.xdpml"}, "trustedKeys": [trainer[1]]})
        spec["spec"]["timeouts"]["idleSeconds"] = 1  # flows end (and go to the collector) quickly
        fake_api.create("agentconfigs", spec)
        backoff = lambda: Backoff(base_s=0.05, cap_s=0.2)  # noqa: E731
        sup = kube_agent(
            api_client,
            KubeAgentOptions(
                namespace="xdpml",
                node_name="node-a",
                pin_dir=os.path.join(bpffs, "p"),
                collector=f"127.0.0.1:{srv.port}",
            ),
            model_source_kwargs={"watch_timeout_s": 5, "backoff_factory": backoff},
        )
        runner = threading.Thread(target=sup.run, daemon=True)
        runner.start()
        try:
            wait_for(lambda: sup.agent is not None and sup.agent.model is not None, 240, "agent with model slots")
            slots = sup.agent.model.slots
            wait_for(lambda: model_status(fake_api).get("loaded") is True, 30, "the ConfigMap's bundle loaded")
            cm_id = int(slots.read_slot(slots.active())["model_id"])
            # the first packets are classified by the ConfigMap's model; their flow, once
            # exported, opens the Export stream on which the collector pushes v1
            send(h, 12)
            wait_for(lambda: sup.agent.model_updates.get("loaded") == 1, 60, "the pushed model loaded")
            assert slots.class_counts()[0] == 12
            assert sup.agent.model.pushed_version == 1
            assert int(slots.read_slot(slots.active())["model_id"]) != cm_id
            slots.clear_stats()
            send(h, 20)
            wait_for(lambda: slots.class_counts()[1] == 20, 10, "20 packets in class 1 under the pushed model")
            pushed_id = int(slots.read_slot(slots.active())["model_id"])

            # signed by a key the AgentConfig does not trust: refused, counted, the model stays
            publish(signing.sign(bundle_tree(2), signing.load_private_key(intruder[0]), name="tree", version=2))
            send(h, 3)  # a flow to export: the stream is there, the collector re-reads the file
            wait_for(lambda: sup.agent.model_updates.get("untrusted") == 1, 60, "the untrusted push refused")
            assert int(slots.read_slot(slots.active())["model_id"]) == pushed_id
            assert sup.agent.model_updates == {"loaded": 1, "untrusted": 1}
        finally:
            sup.stop_event.set()
            runner.join(60)
        assert not runner.is_alive()
        assert srv.stats()["models_pushed"] == 2
