"""PodCache through the real kubernetes client against the fake API server."""

from __future__ import annotations

import random

import pytest

from xdpml.kube.podcache import PodCache
from xdpml.kube.reflector import Backoff
from xdpml.wire.columns import ip_from_str

from .conftest import make_client, pod, wait_for
from .fakeapi import FakeKubeAPI

pytestmark = pytest.mark.timeout(60)


def fast_backoff() -> Backoff:
    return Backoff(base_s=0.05, cap_s=0.2)


def cache_for(api_client, **kw) -> PodCache:
    kw.setdefault("node_name", "node-a")
    return PodCache(api_client, watch_timeout_s=kw.pop("watch_timeout_s", 5), backoff_factory=fast_backoff, **kw)


def who(cache: PodCache, ip: str) -> str | None:
    info = cache.resolve(ip_from_str(ip))
    return None if info is None else (f"{info.namespace}/{info.pod}" if info.pod else f"node:{info.node}")


def test_field_selector_is_honoured_for_list_and_watch(fake_api, api_client):
    fake_api.create("pods", pod("here", ip="10.1.0.5", node="node-a"))
    fake_api.create("pods", pod("there", ip="10.2.0.5", node="node-b"))
    with cache_for(api_client) as cache:
        assert cache.wait_synced(5)
        fake_api.create("pods", pod("later-there", ip="10.2.0.6", node="node-b"))
        fake_api.create("pods", pod("later-here", ip="10.1.0.6", node="node-a"))
        wait_for(lambda: who(cache, "10.1.0.6") == "default/later-here", what="local pod via watch")
        assert who(cache, "10.1.0.5") == "default/here"
        assert who(cache, "10.2.0.5") is None and who(cache, "10.2.0.6") is None
        assert {p.name for p in cache.local_pods.pods()} == {"here", "later-here"}
    pod_requests = [r for r in fake_api.requests if r.path == "/api/v1/pods"]
    assert any(r.query.get("watch") == "true" for r in pod_requests)
    assert any("watch" not in r.query for r in pod_requests)
    assert all(r.query.get("fieldSelector") == "spec.nodeName=node-a" for r in pod_requests)


def test_cluster_wide_pods_resolve_remote_ends(fake_api, api_client):
    fake_api.create("pods", pod("there", ip="10.2.0.5", node="node-b", namespace="shop"))
    with cache_for(api_client, cluster_wide=True) as cache:
        assert cache.wait_synced(5)
        info = cache.resolve(ip_from_str("10.2.0.5"))
        assert (info.namespace, info.pod, info.node) == ("shop", "there", "node-b")
        assert len(cache.local_pods) == 0


def test_ip_reuse_never_keeps_the_old_name(fake_api, api_client):
    with cache_for(api_client) as cache:
        assert cache.wait_synced(5)
        fake_api.create("pods", pod("old", ip="10.1.0.9"))
        wait_for(lambda: who(cache, "10.1.0.9") == "default/old")
        # The new pod gets the IP before the old pod's deletion is seen (the old one is
        # still terminating): the newer resourceVersion wins...
        fake_api.create("pods", pod("new", ip="10.1.0.9"))
        wait_for(lambda: who(cache, "10.1.0.9") == "default/new", what="newer claim wins")
        # ...and deleting the old pod afterwards must not remove the new pod's entry.
        fake_api.delete("pods", "default", "old")
        wait_for(lambda: len(cache.local_pods) == 1)
        assert who(cache, "10.1.0.9") == "default/new"
        # A pod that ended (Succeeded) releases its IP even before it is deleted.
        fake_api.update("pods", "default", "new", lambda o: o["status"].update(phase="Succeeded"))
        wait_for(lambda: who(cache, "10.1.0.9") is None, what="ended pod releases its IP")
        fake_api.create("pods", pod("third", ip="10.1.0.9"))
        wait_for(lambda: who(cache, "10.1.0.9") == "default/third")


def test_random_churn_matches_an_independent_model(fake_api, api_client):
    """Random creates/deletes/reuses over a small IP pool; the cache ends equal to a
    model kept by the test: for every IP, the live pod created last with it."""
    rng = random.Random(7)
    pool = [f"10.1.3.{i}" for i in range(1, 6)]
    live: dict[str, str] = {}  # pod name -> ip, in creation order
    with cache_for(api_client) as cache:
        assert cache.wait_synced(5)
        for step in range(80):
            if live and rng.random() < 0.35:
                name = rng.choice(sorted(live))
                fake_api.delete("pods", "default", name)
                del live[name]
            else:
                name, ip = f"p{step}", rng.choice(pool)
                fake_api.create("pods", pod(name, ip=ip))
                live[name] = ip
        # The run must leave IPs claimed by several live pods, or it tests nothing.
        assert len(live) > len(pool)
        expected = {ip: None for ip in pool}
        for name, ip in live.items():  # dict order = creation order: last writer wins
            expected[ip] = f"default/{name}"
        wait_for(lambda: cache.reflectors[0].resource_version == str(fake_api.resource_version), what="cache caught up")
        assert {ip: who(cache, ip) for ip in pool} == expected


@pytest.mark.parametrize("gone_mode", ["event", "http"])
def test_watch_expiry_relists_and_sees_deletions(gone_mode):
    with FakeKubeAPI(gone_mode=gone_mode) as api, make_client(api) as c, cache_for(c) as cache:
        api.create("pods", pod("a", ip="10.1.0.1"))
        api.create("pods", pod("b", ip="10.1.0.2"))
        assert cache.wait_synced(5)
        wait_for(lambda: who(cache, "10.1.0.2") == "default/b")
        refl = cache.reflectors[0]
        assert (refl.stats.lists, refl.stats.relists_410) == (1, 0)
        # The watcher falls behind, history is compacted, its watch breaks: the resume
        # from the old version answers 410 and only a relist can see these changes.
        api.pause_watches()
        api.delete("pods", "default", "a")
        api.create("pods", pod("c", ip="10.1.0.3"))
        api.compact()
        api.drop_watches()
        api.resume_watches()
        wait_for(lambda: refl.stats.lists == 2, what="relist")
        assert refl.stats.relists_410 == 1
        assert who(cache, "10.1.0.1") is None  # deletion seen through the relist
        assert who(cache, "10.1.0.3") == "default/c"
        # And the watch goes on from the relist's version.
        api.create("pods", pod("d", ip="10.1.0.4"))
        wait_for(lambda: who(cache, "10.1.0.4") == "default/d")
        assert refl.stats.lists == 2


def test_api_server_down_then_back():
    with FakeKubeAPI() as api, make_client(api) as c, cache_for(c) as cache:
        api.create("pods", pod("a", ip="10.1.0.1"))
        assert cache.wait_synced(5)
        wait_for(lambda: who(cache, "10.1.0.1") == "default/a")
        refl = cache.reflectors[0]
        api.stop()
        api.delete("pods", "default", "a")  # changes made while we cannot see them
        api.create("pods", pod("b", ip="10.1.0.1"))
        wait_for(lambda: refl.stats.errors >= 2, what="failed reconnects while down")
        assert who(cache, "10.1.0.1") == "default/a"  # last known state kept meanwhile
        api.start()
        wait_for(lambda: who(cache, "10.1.0.1") == "default/b", what="catch-up after restart")
        # History survived the restart (etcd did): a resumed watch, no relist needed.
        assert (refl.stats.lists, refl.stats.relists_410) == (1, 0)
        # Down again, and this time the history is gone when it comes back: relist.
        api.stop()
        api.delete("pods", "default", "b")
        api.compact()
        api.start()
        wait_for(lambda: refl.stats.lists == 2, what="relist after restart with compaction")
        assert who(cache, "10.1.0.1") is None


@pytest.mark.parametrize("bookmarks", [True, False])
def test_bookmarks_let_a_quiet_watch_resume_without_relist(bookmarks):
    """Changes to pods of other nodes move the cluster's version while our filtered watch
    sends nothing. With bookmarks our resume point moves too, so after a compaction the
    watch resumes; without them (the control case) it must relist."""
    with (
        FakeKubeAPI(bookmark_interval_s=0.1 if bookmarks else None) as api,
        make_client(api) as c,
        cache_for(c) as cache,
    ):
        api.create("pods", pod("mine", ip="10.1.0.1"))
        assert cache.wait_synced(5)
        refl = cache.reflectors[0]
        for i in range(5):
            api.create("pods", pod(f"other{i}", ip=f"10.2.0.{i + 1}", node="node-b"))
        target = str(api.resource_version)
        if bookmarks:
            wait_for(lambda: refl.resource_version == target, what="bookmark moves the resume point")
            assert refl.stats.bookmarks >= 1
        else:
            import time

            time.sleep(0.5)
            assert refl.resource_version != target
        api.compact()
        api.drop_watches()
        api.create("pods", pod("mine2", ip="10.1.0.2"))
        wait_for(lambda: who(cache, "10.1.0.2") == "default/mine2")
        assert refl.stats.relists_410 == (0 if bookmarks else 1)


def test_paged_list(fake_api, api_client):
    for i in range(7):
        fake_api.create("pods", pod(f"p{i}", ip=f"10.1.0.{i + 1}"))
    cache = PodCache(api_client, node_name="node-a", page_size=3, backoff_factory=fast_backoff)
    with cache:
        assert cache.wait_synced(5)
        assert len(cache.local_pods) == 7
    lists = [r for r in fake_api.requests if r.path == "/api/v1/pods" and "watch" not in r.query]
    assert [r.query.get("limit") for r in lists] == ["3", "3", "3"]
    assert ["continue" in r.query for r in lists] == [False, True, True]


def test_transient_500_backs_off_and_recovers(fake_api, api_client):
    fake_api.create("pods", pod("a", ip="10.1.0.1"))
    fake_api.fail_next.extend([500, 503])
    with cache_for(api_client) as cache:
        assert cache.wait_synced(5)
        assert cache.reflectors[0].stats.errors == 2
        assert "500" in cache.reflectors[0].stats.last_error or "503" in cache.reflectors[0].stats.last_error
        assert who(cache, "10.1.0.1") == "default/a"


def test_stop_is_prompt(fake_api, api_client):
    import time

    cache = cache_for(api_client, watch_timeout_s=300).start()
    assert cache.wait_synced(5)
    time.sleep(0.2)
    t0 = time.monotonic()
    cache.stop()
    assert time.monotonic() - t0 < 2.0
    assert all(r._thread is None for r in cache.reflectors)
