"""The fake API server behaves like the real one where the agent depends on it
(checked through the real client, so the client's own expectations are tested too)."""

from __future__ import annotations

import threading
import time

import pytest
from kubernetes import client as k8s_client
from kubernetes import watch as k8s_watch

from .conftest import pod

pytestmark = pytest.mark.timeout(60)

G, V, P = "xdpml.io", "v1alpha1", "agentconfigs"


def ac(name="c", spec=None) -> dict:
    return {
        "apiVersion": f"{G}/{V}",
        "kind": "AgentConfig",
        "metadata": {"name": name},
        "spec": spec or {"interfaces": [{"names": ["eth0"]}]},
    }


def test_generation_and_status_subresource(fake_api, api_client):
    co = k8s_client.CustomObjectsApi(api_client)
    obj = co.create_namespaced_custom_object(G, V, "ns", P, dict(ac(), status={"x": 1}))
    assert obj["metadata"]["generation"] == 1 and "status" not in obj  # status ignored on create
    obj = co.patch_namespaced_custom_object_status(
        G, V, "ns", P, "c", {"status": {"observedGeneration": 1}, "spec": {"ignored": True}}
    )
    assert obj["status"] == {"observedGeneration": 1} and obj["spec"] == ac()["spec"]
    assert obj["metadata"]["generation"] == 1  # status writes never bump generation
    obj = co.patch_namespaced_custom_object(
        G, V, "ns", P, "c", {"spec": {"features": {"firstN": 4}}, "status": {"observedGeneration": 99}}
    )
    assert obj["metadata"]["generation"] == 2 and obj["status"] == {"observedGeneration": 1}
    # PUT on status with a stale resourceVersion: 409 Conflict, as the real server.
    stale = dict(obj, status={"observedGeneration": 2})
    stale["metadata"] = dict(obj["metadata"], resourceVersion="1")
    with pytest.raises(k8s_client.ApiException) as err:
        co.replace_namespaced_custom_object_status(G, V, "ns", P, "c", stale)
    assert err.value.status == 409
    fresh = dict(obj, status={"observedGeneration": 2})
    assert co.replace_namespaced_custom_object_status(G, V, "ns", P, "c", fresh)["status"] == {"observedGeneration": 2}
    with pytest.raises(k8s_client.ApiException) as err:
        co.get_namespaced_custom_object(G, V, "ns", P, "missing")
    assert err.value.status == 404


def test_resource_versions_grow_across_lists_and_objects(fake_api, api_client):
    v1 = k8s_client.CoreV1Api(api_client)
    fake_api.create("pods", pod("a", ip="10.0.0.1"))
    first = v1.list_pod_for_all_namespaces()
    fake_api.create("pods", pod("b", ip="10.0.0.2"))
    second = v1.list_pod_for_all_namespaces()
    assert int(second.metadata.resource_version) > int(first.metadata.resource_version)
    assert [int(p.metadata.resource_version) for p in second.items] == sorted(
        int(p.metadata.resource_version) for p in second.items
    )
    assert all(p.metadata.uid for p in second.items)


def test_watch_selector_transitions_and_initial_state(fake_api, api_client):
    """A pod leaving the field selector is a DELETED event for that watch, one entering
    it is ADDED; a watch without resourceVersion starts with the current objects."""
    v1 = k8s_client.CoreV1Api(api_client)
    fake_api.create("pods", pod("stay", ip="10.0.0.1", node="n1"))
    fake_api.create("pods", pod("move", ip="10.0.0.2", node="n1"))
    seen = []

    def changes():
        time.sleep(0.2)
        fake_api.update("pods", "default", "move", lambda o: o["spec"].update(nodeName="n2"))
        fake_api.update("pods", "default", "move", lambda o: o["spec"].update(nodeName="n1"))
        fake_api.update("pods", "default", "stay", lambda o: o["metadata"]["labels"].update(v="2"))

    threading.Thread(target=changes, daemon=True).start()
    w = k8s_watch.Watch(return_type=object)
    for ev in w.stream(v1.list_pod_for_all_namespaces, field_selector="spec.nodeName=n1", timeout_seconds=1):
        seen.append((ev["type"], ev["raw_object"]["metadata"]["name"]))
    assert seen == [("ADDED", "move"), ("ADDED", "stay"), ("DELETED", "move"), ("ADDED", "move"), ("MODIFIED", "stay")]


def test_json_patch_and_unknown_media_type(fake_api, api_client):
    co = k8s_client.CustomObjectsApi(api_client)
    co.create_namespaced_custom_object(G, V, "ns", P, ac())
    obj = co.patch_namespaced_custom_object_status(
        G,
        V,
        "ns",
        P,
        "c",
        [{"op": "add", "path": "/status", "value": {"nodes": {"n1": {"ready": True}}}}],
        _content_type="application/json-patch+json",
    )
    assert obj["status"] == {"nodes": {"n1": {"ready": True}}}
    with pytest.raises(k8s_client.ApiException) as err:
        co.patch_namespaced_custom_object_status(
            G, V, "ns", P, "c", {"status": {}}, _content_type="application/strategic-merge-patch+json"
        )
    assert err.value.status == 415  # as for custom resources on the real server


def test_continue_token_expires_with_compaction(fake_api, api_client):
    v1 = k8s_client.CoreV1Api(api_client)
    for i in range(3):
        fake_api.create("pods", pod(f"p{i}", ip=f"10.0.0.{i + 1}"))
    page = v1.list_pod_for_all_namespaces(limit=2)
    assert page.metadata._continue and page.metadata.remaining_item_count == 1
    fake_api.compact()
    with pytest.raises(k8s_client.ApiException) as err:
        v1.list_pod_for_all_namespaces(limit=2, _continue=page.metadata._continue)
    assert err.value.status == 410
