"""AgentConfig change -> enrichment follows, live: the wiring the agent pipeline uses."""

from __future__ import annotations

import numpy as np
import pytest
from xdpml.agent.enrich.manager import EnrichmentManager

from xdpml.kube.config_watch import AgentConfigWatcher
from xdpml.kube.reflector import Backoff
from xdpml.wire.columns import ColumnBatch, ip_from_str

from .conftest import agentconfig_object, pod, wait_for

pytestmark = pytest.mark.timeout(60)


def batch() -> ColumnBatch:
    src = np.array([ip_from_str("10.1.0.1")] * 2, dtype="S16")
    dst = np.array([ip_from_str("10.2.0.1"), ip_from_str("10.1.0.1")], dtype="S16")
    return ColumnBatch("flow", {"src_ip": src, "dst_ip": dst})


def test_enrichment_follows_the_agentconfig(fake_api, api_client):
    fake_api.create("pods", pod("local", ip="10.1.0.1", labels={"app": "web", "team": "a"}))
    fake_api.create("pods", pod("remote", ip="10.2.0.1", node="node-b", namespace="db", labels={"app": "pg"}))
    fake_api.create(
        "agentconfigs",
        agentconfig_object({"interfaces": [{"names": ["physical"]}], "enrichment": {"labels": ["app"]}}),
    )
    backoff = lambda: Backoff(base_s=0.05, cap_s=0.2)  # noqa: E731
    with EnrichmentManager(api_client, node_name="node-a", watch_timeout_s=5, backoff_factory=backoff) as enrich:
        applied = []

        def on_change(old, new):
            enrich.apply(new.enrichment)
            applied.append(new.generation)

        with AgentConfigWatcher(
            api_client,
            namespace="xdpml",
            node_name="node-a",
            on_change=on_change,
            node_labels={},
            watch_timeout_s=5,
            backoff_factory=backoff,
        ):
            wait_for(lambda: applied == [1] and enrich.synced(), what="first config and cache sync")
            out = enrich.enrich(batch())
            assert out["src_label_app"].tolist() == ["web", "web"]
            assert out["dst_pod"].tolist() == ["", "local"]  # remote pod unknown: node-local watch only
            assert "src_label_team" not in out.columns
            first_cache = enrich.cache

            # Labels only: same cache, new columns.
            fake_api.update(
                "agentconfigs", "xdpml", "main", lambda o: o["spec"]["enrichment"].update(labels=["app", "team"])
            )
            wait_for(lambda: applied == [1, 2])
            out = enrich.enrich(batch())
            assert out["src_label_team"].tolist() == ["a", "a"] and enrich.cache is first_cache

            # Cluster-wide: a new cache; the remote pod becomes known once it has synced.
            fake_api.update("agentconfigs", "xdpml", "main", lambda o: o["spec"]["enrichment"].update(clusterWide=True))
            wait_for(lambda: applied == [1, 2, 3])
            wait_for(
                lambda: enrich.enrich(batch())["dst_pod"].tolist() == ["remote", "local"],
                what="cluster-wide cache in use",
            )
            out = enrich.enrich(batch())
            assert out["dst_namespace"].tolist() == ["db", "default"]
            assert out["dst_label_app"].tolist() == ["pg", "web"]
            assert enrich.cache is not first_cache
            assert all(r._thread is None for r in first_cache.reflectors)  # the old cache stopped


def test_enrich_before_apply_is_a_clear_error(api_client):
    with EnrichmentManager(api_client, node_name="node-a") as enrich, pytest.raises(RuntimeError, match="apply"):
        enrich.enrich(batch())
