"""The AgentConfig names a model and changes it live: the Kubernetes agent's real
datapath on a test veth, configured through the fake API server. The model file
changes (a new path, as a ConfigMap volume would be re-pointed) and the kernel
classifies with the new model in the same datapath: no restart, no re-attach."""

from __future__ import annotations

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

from .conftest import wait_for

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
