"""HTTP liveness and readiness for the agent (kubelet probes).

    with HealthServer(port=8081, conditions=("programs_attached", "pod_cache_synced")) as h:
        ...attach programs...
        h.set("programs_attached")
        ...pod cache synced...
        h.set("pod_cache_synced")
        while running:
            h.beat()          # from the main loop: proves it is not stuck
            ...

GET /livez   200 "ok" while the process serves and (when ``stall_after_s`` is set) the
             main loop has called ``beat()`` recently; 503 otherwise, so the kubelet
             restarts a wedged agent.
GET /readyz  200 when every required condition is set; 503 with one line per condition
             ("[+]name ok" / "[-]name not ready: reason"), as the Kubernetes API server
             does, so `kubectl describe pod` shows what is missing.
A condition can be cleared again (``clear(name, reason)``), e.g. when the pod cache
loses its watch, and readiness drops until it is set again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PROGRAMS_ATTACHED = "programs_attached"
POD_CACHE_SYNCED = "pod_cache_synced"
CONFIG_LOADED = "config_loaded"


class HealthState:
    """Thread-safe readiness conditions and liveness heartbeat; no I/O."""

    def __init__(
        self, conditions: Iterable[str] = (), *, stall_after_s: float | None = None, clock=time.monotonic
    ) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        # name -> (ok, reason); insertion order is the order the report lists them.
        self._conds: dict[str, tuple[bool, str]] = {}
        for name in conditions:
            self.require(name)
        if stall_after_s is not None and stall_after_s <= 0:
            raise ValueError("stall_after_s must be > 0 seconds (or None to disable)")
        self._stall_after_s = stall_after_s
        self._last_beat = clock()

    def require(self, name: str, reason: str = "not yet reported") -> None:
        """Add a condition readiness waits for (no-op if already known)."""
        if not name or any(c.isspace() for c in name):
            raise ValueError(f"condition name must be a non-empty word, not {name!r}")
        with self._lock:
            self._conds.setdefault(name, (False, reason))

    def set(self, name: str) -> None:
        self._put(name, True, "")

    def clear(self, name: str, reason: str = "") -> None:
        self._put(name, False, reason or "cleared")

    def _put(self, name: str, ok: bool, reason: str) -> None:
        with self._lock:
            if name not in self._conds:
                raise KeyError(f"unknown readiness condition {name!r}; known: {', '.join(self._conds)}")
            self._conds[name] = (ok, reason)

    def beat(self) -> None:
        with self._lock:
            self._last_beat = self._clock()

    def missing(self) -> list[str]:
        with self._lock:
            return [n for n, (ok, _) in self._conds.items() if not ok]

    @property
    def ready(self) -> bool:
        return not self.missing()

    def readiness_report(self) -> tuple[bool, str]:
        with self._lock:
            items = list(self._conds.items())
        lines = [f"[+]{n} ok" if ok else f"[-]{n} not ready: {why}" for n, (ok, why) in items]
        ok = all(ok for _, (ok, _) in items)
        lines.append("readyz check passed" if ok else "readyz check failed")
        return ok, "\n".join(lines) + "\n"

    def liveness_report(self) -> tuple[bool, str]:
        if self._stall_after_s is None:
            return True, "ok\n"
        with self._lock:
            age = self._clock() - self._last_beat
        if age > self._stall_after_s:
            return False, (f"main loop stalled: no heartbeat for {age:.1f}s (limit {self._stall_after_s:g}s)\n")
        return True, "ok\n"


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        state = self.server.state
        if path == "/livez":
            ok, body = state.liveness_report()
        elif path == "/readyz":
            ok, body = state.readiness_report()
        else:
            self._send(404, "not found: use /livez or /readyz\n")
            return
        self._send(200 if ok else 503, body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def _send(self, code: int, body: str) -> None:
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        # Probes every few seconds would flood `kubectl logs`; stay quiet.
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: HealthState


class HealthServer(HealthState):
    """HealthState plus a threaded HTTP server; a context manager that stops it."""

    def __init__(
        self,
        *,
        host: str = "0.0.0.0",
        port: int = 8081,
        conditions: Iterable[str] = (PROGRAMS_ATTACHED, POD_CACHE_SYNCED),
        stall_after_s: float | None = None,
    ) -> None:
        super().__init__(conditions, stall_after_s=stall_after_s)
        if not 0 <= port <= 65535:
            raise ValueError(f"health port must be 0..65535, not {port}")
        try:
            self._httpd = _Server((host, port), _Handler)
        except OSError as e:
            raise OSError(
                e.errno, f"cannot serve health probes on {host}:{port}: {e.strerror}; choose another --health-port"
            ) from None
        self._httpd.state = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="xdpml-health", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def close(self) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(timeout=5)
        self._httpd.server_close()

    def __enter__(self) -> HealthServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
