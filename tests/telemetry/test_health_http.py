"""xdpml/obs/health.py: a real HTTP server on loopback answers the kubelet's probes."""

from __future__ import annotations

import http.client
import socket

import pytest

from xdpml.obs.health import HealthServer, HealthState


def get(port: int, path: str, method: str = "GET") -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path)
        r = conn.getresponse()
        return r.status, r.read().decode()
    finally:
        conn.close()


def test_readiness_follows_conditions():
    with HealthServer(host="127.0.0.1", port=0) as h:
        assert get(h.port, "/livez") == (200, "ok\n")
        code, body = get(h.port, "/readyz")
        assert code == 503
        assert body == (
            "[-]programs_attached not ready: not yet reported\n"
            "[-]pod_cache_synced not ready: not yet reported\n"
            "readyz check failed\n"
        )
        h.set("programs_attached")
        code, body = get(h.port, "/readyz")
        assert code == 503 and h.missing() == ["pod_cache_synced"]
        assert body.splitlines()[:2] == ["[+]programs_attached ok", "[-]pod_cache_synced not ready: not yet reported"]
        h.set("pod_cache_synced")
        assert get(h.port, "/readyz") == (200, "[+]programs_attached ok\n[+]pod_cache_synced ok\nreadyz check passed\n")
        assert h.ready
        # losing the watch makes the agent unready again, with the reason shown
        h.clear("pod_cache_synced", "watch failed: 403 Forbidden")
        code, body = get(h.port, "/readyz?verbose")
        assert code == 503 and "[-]pod_cache_synced not ready: watch failed: 403 Forbidden" in body


def test_head_unknown_path_and_extra_conditions():
    with HealthServer(host="127.0.0.1", port=0, conditions=("config_loaded",)) as h:
        assert get(h.port, "/readyz", "HEAD") == (503, "")
        assert get(h.port, "/metrics")[0] == 404
        h.require("programs_attached")
        h.set("config_loaded")
        assert get(h.port, "/readyz")[0] == 503
        h.set("programs_attached")
        assert get(h.port, "/readyz")[0] == 200
        with pytest.raises(KeyError, match="unknown readiness condition 'typo'"):
            h.set("typo")


def test_liveness_fails_when_main_loop_stalls():
    now = [100.0]
    state = HealthState(stall_after_s=30, clock=lambda: now[0])
    assert state.liveness_report() == (True, "ok\n")
    now[0] = 131.0
    ok, body = state.liveness_report()
    assert not ok and body == "main loop stalled: no heartbeat for 31.0s (limit 30s)\n"
    state.beat()
    assert state.liveness_report()[0]


def test_livez_over_http_reports_stall():
    with HealthServer(host="127.0.0.1", port=0, stall_after_s=0.05) as h:
        import time

        time.sleep(0.1)
        code, body = get(h.port, "/livez")
        assert code == 503 and body.startswith("main loop stalled")
        h.beat()
        assert get(h.port, "/livez") == (200, "ok\n")


def test_port_in_use_and_bad_arguments():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot serve health probes on 127.0.0.1:{port}.*--health-port"):
            HealthServer(host="127.0.0.1", port=port)
    with pytest.raises(ValueError, match="stall_after_s"):
        HealthState(stall_after_s=0)
    with pytest.raises(ValueError, match="condition name"):
        HealthState(["two words"])


def test_close_frees_the_port():
    h = HealthServer(host="127.0.0.1", port=0)
    port = h.port
    h.close()
    with pytest.raises(OSError):
        get(port, "/livez")
