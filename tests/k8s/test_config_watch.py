"""AgentConfigWatcher through the real client: live changes, refusals, status, events."""

from __future__ import annotations

import threading

import pytest

from xdpml.kube.agentconfig import AgentConfig
from xdpml.kube.config_watch import AgentConfigWatcher
from xdpml.kube.reflector import Backoff

from .conftest import agentconfig_object, make_client, wait_for
from .fakeapi import FakeKubeAPI

pytestmark = pytest.mark.timeout(60)

NS, NODE = "xdpml", "node-a"


BASE = {"interfaces": [{"names": ["physical"], "hooks": "xdp"}], "timeouts": {"idleSeconds": 60, "activeSeconds": 600}}


class Recorder:
    def __init__(self, fail_on: set[int] = frozenset()):
        self.calls: list[tuple[AgentConfig | None, AgentConfig]] = []
        self.fail_on = fail_on
        self.lock = threading.Lock()

    def __call__(self, old, new):
        if new.generation in self.fail_on:
            raise RuntimeError(f"cannot attach for generation {new.generation}")
        with self.lock:
            self.calls.append((old, new))


def watcher(api_client, recorder, **kw) -> AgentConfigWatcher:
    kw.setdefault("node_labels", {"kubernetes.io/hostname": NODE})
    return AgentConfigWatcher(
        api_client,
        namespace=NS,
        node_name=NODE,
        on_change=recorder,
        watch_timeout_s=5,
        backoff_factory=lambda: Backoff(base_s=0.05, cap_s=0.2),
        **kw,
    )


def status(api, name="main") -> dict:
    return (api.get("agentconfigs", NS, name) or {}).get("status") or {}


def accepted(api, name="main") -> dict:
    return next((c for c in status(api, name).get("conditions", []) if c["type"] == "Accepted"), {})


def events(api, reason=None) -> list[dict]:
    return [e for e in api.list("events") if reason is None or e["reason"] == reason]


def test_config_applied_live_and_status_reported(fake_api, api_client):
    fake_api.create("agentconfigs", agentconfig_object(BASE))
    rec = Recorder()
    with watcher(api_client, rec) as w:
        wait_for(lambda: len(rec.calls) == 1, what="first config applied")
        old, new = rec.calls[0]
        assert old is None and new.generation == 1 and new.settings.harvest.idle_timeout_s == 60
        wait_for(lambda: status(fake_api).get("observedGeneration") == 1, what="status written")
        assert accepted(fake_api)["status"] == "True" and accepted(fake_api)["reason"] == "Valid"
        node = status(fake_api)["nodes"][NODE]
        assert (node["ready"], node["appliedGeneration"], node["observedGeneration"]) == (True, 1, 1)
        wait_for(lambda: events(fake_api, "Applied"), what="Applied event")

        # Change timeouts and interfaces: applied live, the callback sees old and new.
        def edit(o):
            o["spec"]["timeouts"]["idleSeconds"] = 30
            o["spec"]["interfaces"].append({"names": ["pod-veths"], "hooks": "tc"})

        fake_api.update("agentconfigs", NS, "main", edit)
        wait_for(lambda: len(rec.calls) == 2, what="change applied")
        old, new = rec.calls[1]
        assert old.generation == 1 and new.generation == 2
        assert new.changed_sections(old) == {"interfaces", "harvest"}
        assert new.settings.harvest.idle_timeout_s == 30 and len(new.interface_rules) == 2
        assert w.current is new
        wait_for(lambda: status(fake_api)["nodes"][NODE]["appliedGeneration"] == 2)
        assert status(fake_api)["observedGeneration"] == 2

        # A status-only write (another node's entry) is no new generation: no callback.
        fake_api.update(
            "agentconfigs",
            NS,
            "main",
            lambda o: o.setdefault("status", {}).setdefault("nodes", {}).update({"node-z": {"ready": True}}),
            subresource="status",
        )
        fake_api.update("agentconfigs", NS, "main", lambda o: o["metadata"].setdefault("labels", {}).update(a="b"))
        assert len(rec.calls) == 2
    # Both nodes' entries survive: each agent merge-patches only its own key.
    assert set(status(fake_api)["nodes"]) == {NODE, "node-z"}
    patches = [r for r in fake_api.requests if r.method == "PATCH"]
    assert patches and all(
        r.path.endswith("/agentconfigs/main/status") and "merge-patch" in r.content_type for r in patches
    )


def test_invalid_config_rejected_last_good_kept(fake_api, api_client):
    fake_api.create("agentconfigs", agentconfig_object(BASE))
    rec = Recorder()
    with watcher(api_client, rec) as w:
        wait_for(lambda: len(rec.calls) == 1)
        # Overlapping rules: passes the CRD, refused by the agent.
        fake_api.update(
            "agentconfigs",
            NS,
            "main",
            lambda o: o["spec"].update(interfaces=[{"names": ["eth*"]}, {"names": ["eth0"], "hooks": "tc"}]),
        )
        wait_for(lambda: accepted(fake_api).get("status") == "False", what="refusal in status")
        cond = accepted(fake_api)
        assert cond["reason"] == "InvalidSpec" and "rules 0 and 1 overlap" in cond["message"]
        assert cond["observedGeneration"] == 2 and status(fake_api)["observedGeneration"] == 2
        node = status(fake_api)["nodes"][NODE]
        assert (node["ready"], node["appliedGeneration"], node["observedGeneration"], node["reason"]) == (
            True,
            1,
            2,
            "InvalidSpec",
        )
        assert "keeping generation 1" in node["message"]
        wait_for(lambda: events(fake_api, "InvalidSpec"), what="Warning event")
        (ev,) = events(fake_api, "InvalidSpec")
        assert ev["type"] == "Warning" and "overlap" in ev["message"]
        assert ev["involvedObject"]["kind"] == "AgentConfig" and ev["involvedObject"]["name"] == "main"
        assert ev["involvedObject"]["uid"] == fake_api.get("agentconfigs", NS, "main")["metadata"]["uid"]
        assert ev["source"] == {"component": "xdpml-agent", "host": NODE}
        assert len(rec.calls) == 1 and w.current.generation == 1
        assert "overlap" in w.last_error

        # Fixed: applied, with the last good config as "old".
        fake_api.update(
            "agentconfigs", NS, "main", lambda o: o["spec"].update(interfaces=[{"names": ["eth*"], "hooks": "tc"}])
        )
        wait_for(lambda: len(rec.calls) == 2)
        old, new = rec.calls[1]
        assert (old.generation, new.generation) == (1, 3)
        wait_for(lambda: accepted(fake_api).get("status") == "True")
        assert status(fake_api)["nodes"][NODE]["reason"] == "Applied"


def test_invalid_first_config_means_not_ready(fake_api, api_client):
    fake_api.create(
        "agentconfigs", agentconfig_object({"interfaces": [{"names": ["eth0"], "hooks": "tc", "xdpMode": "native"}]})
    )
    rec = Recorder()
    with watcher(api_client, rec) as w:
        wait_for(lambda: status(fake_api).get("nodes"), what="node status")
        node = status(fake_api)["nodes"][NODE]
        assert node["ready"] is False and node["reason"] == "InvalidSpec" and "appliedGeneration" not in node
        assert "xdpMode has no effect" in accepted(fake_api)["message"]
        assert rec.calls == [] and w.current is None


def test_callback_failure_keeps_old_config(fake_api, api_client):
    fake_api.create("agentconfigs", agentconfig_object(BASE))
    rec = Recorder(fail_on={2})
    with watcher(api_client, rec) as w:
        wait_for(lambda: len(rec.calls) == 1)
        fake_api.update("agentconfigs", NS, "main", lambda o: o["spec"]["timeouts"].update(idleSeconds=10))
        wait_for(lambda: events(fake_api, "ApplyFailed"), what="ApplyFailed event")
        assert w.current.generation == 1
        wait_for(lambda: status(fake_api)["nodes"][NODE]["reason"] == "ApplyFailed")
        assert accepted(fake_api)["status"] == "True"  # the spec is fine; this node could not apply it
        assert "cannot attach for generation 2" in status(fake_api)["nodes"][NODE]["message"]


def test_node_selector_and_oldest_match_wins(fake_api, api_client):
    fake_api.create("nodes", {"metadata": {"name": NODE, "labels": {"pool": "edge", "zone": "a"}}})
    fake_api.create("agentconfigs", agentconfig_object(dict(BASE, nodeSelector={"pool": "core"}), "other-pool"))
    # Both select the node; "edge" is older, "a-zone" comes first by name: age decides.
    for name, sel, ts in (
        ("edge", {"pool": "edge"}, "2026-01-01T00:00:00Z"),
        ("a-zone", {"zone": "a"}, "2026-01-02T00:00:00Z"),
    ):
        obj = agentconfig_object(dict(BASE, nodeSelector=sel), name)
        obj["metadata"]["creationTimestamp"] = ts
        fake_api.create("agentconfigs", obj)
    rec = Recorder()
    with watcher(api_client, rec, node_labels=None):  # labels read from the Node object
        wait_for(lambda: len(rec.calls) == 1)
        assert rec.calls[0][1].name == "edge"
        wait_for(lambda: status(fake_api, "a-zone").get("nodes"), what="superseded entry")
        node = status(fake_api, "a-zone")["nodes"][NODE]
        assert (node["ready"], node["reason"]) == (False, "Superseded") and "edge" in node["message"]
        assert status(fake_api, "other-pool") == {}  # not for this node: untouched
        # The winner goes away: the next oldest match is applied.
        fake_api.delete("agentconfigs", NS, "edge")
        wait_for(lambda: len(rec.calls) == 2, what="fallback to the other matching config")
        assert (rec.calls[1][0].name, rec.calls[1][1].name) == ("edge", "a-zone")
        wait_for(lambda: status(fake_api, "a-zone")["nodes"][NODE]["ready"] is True)
    assert any(r.path == f"/api/v1/nodes/{NODE}" for r in fake_api.requests)


def test_set_ready_is_reported(fake_api, api_client):
    fake_api.create("agentconfigs", agentconfig_object(BASE))
    rec = Recorder()
    with watcher(api_client, rec) as w:
        wait_for(lambda: status(fake_api).get("nodes", {}).get(NODE, {}).get("ready") is True)
        w.set_ready(False, "AttachFailed", "eth0: another XDP program is attached")
        wait_for(lambda: status(fake_api)["nodes"][NODE]["ready"] is False)
        assert status(fake_api)["nodes"][NODE]["reason"] == "AttachFailed"
        w.set_ready(True, "Attached")
        wait_for(lambda: status(fake_api)["nodes"][NODE]["ready"] is True)


def test_status_write_retried_and_api_outage_survived():
    with FakeKubeAPI() as api, make_client(api) as c:
        api.create("agentconfigs", agentconfig_object(BASE))
        api.fail_rules[("PATCH", "/status")] = [500, 3]
        rec = Recorder()
        with watcher(c, rec) as w:
            wait_for(lambda: len(rec.calls) == 1)
            wait_for(lambda: status(api).get("observedGeneration") == 1, what="status after retries")
            assert api.fail_rules[("PATCH", "/status")][1] == 0
            # API server down; the config changes meanwhile (etcd keeps it); back up.
            api.stop()
            api.update("agentconfigs", NS, "main", lambda o: o["spec"]["timeouts"].update(activeSeconds=900))
            wait_for(lambda: w.reflector.stats.errors >= 1, what="watch notices the outage")
            api.start()
            wait_for(lambda: len(rec.calls) == 2, what="change applied after the outage")
            assert rec.calls[1][1].settings.harvest.active_timeout_s == 900
            wait_for(lambda: status(api).get("observedGeneration") == 2)


def test_missing_identity_is_a_clear_error(api_client):
    with pytest.raises(ValueError, match="node_name"):
        AgentConfigWatcher(api_client, namespace=NS, node_name="", on_change=Recorder())
