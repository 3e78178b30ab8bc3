"""Enforcement under the Kubernetes supervisor (agent/kubernetes.py).

One :class:`KubeEnforcement` per agent process, kept across datapath restarts: it owns
the :class:`RuleManager`, applies ``spec.enforcement`` of each AgentConfig live (mode,
limits, allowlist, namespace policy), follows the API server's endpoints, reports the
node's enforcement in the AgentConfig status, and posts one Warning Event on a pod when
a rule starts dropping its traffic (in enforce mode: the rule's dropped count leaves 0).

Namespaces come from the pod cache (address -> pod), so the namespace policy (by
default: nothing dropped in kube-system) holds for pods on any node the cache knows.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

from xdpml.agent.enforce.manager import DEFAULT_NAMESPACE_POLICY, Channel, RecentFlows, RuleManager
from xdpml.agent.enforce.setup import host_allowlist

from xdpml.errors import ConfigError

log = logging.getLogger("xdpml.enforce")

API_REFRESH_S = 30.0
STATUS_EVERY_S = 5.0
EVENT_REASON = "XdpmlDropping"


def namespace_policy(entries) -> dict[str, frozenset]:
    """spec.enforcement.namespacePolicy over the default: kube-system stays protected
    unless the spec names it."""
    out = dict(DEFAULT_NAMESPACE_POLICY)
    for ns, actions in entries:
        out[ns] = frozenset(actions)
    return out


def api_endpoints(api_client) -> list[str] | None:
    """Addresses of the default/kubernetes Endpoints (the API servers); None if unreadable."""
    from kubernetes import client as k8s_client

    try:
        ep = k8s_client.CoreV1Api(api_client).read_namespaced_endpoints("kubernetes", "default", _request_timeout=5)
    except Exception as exc:
        log.warning("cannot read the API server endpoints (%s); allowlisting the service address only", exc)
        return None
    out = []
    for subset in ep.subsets or []:
        for addr in subset.addresses or []:
            if addr.ip:
                out.append(addr.ip)
    return out


class KubeEnforcement:
    def __init__(
        self,
        cfg,
        *,
        api_client,
        node_name: str,
        collector: str,
        authenticated: bool,
        pod_for_ip: Callable[[bytes], object | None],
        telemetry=None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.api = api_client
        self.node_name = node_name
        self.collector = collector
        self.pod_for_ip = pod_for_ip
        self.clock = clock
        self.channel = Channel(
            authenticated=authenticated,
            description=f"{'mutual TLS' if authenticated else 'an unauthenticated channel'} to {collector or '(none)'}",
        )
        self.cfg = cfg.enforcement
        s = cfg.settings.enforce
        self.manager = RuleManager(
            s,
            channel=self.channel,
            recent=RecentFlows(capacity=s.recent_flows, ttl_s=s.recent_ttl_s),
            namespace_of=self._namespace_of,
            namespace_policy=namespace_policy(self.cfg.namespace_policy),
            telemetry=telemetry,
        )
        self._api_ips: list[str] = []
        self._api_read_at = -1e18
        self._evented: dict[tuple, float] = {}  # rule identity -> when its Event went out
        self._status_at = -1e18
        self._last_status: dict | None = None
        self.check(cfg)
        self._refresh_allowlist(force=True)

    # ---- config -----------------------------------------------------------------------
    def set_channel(self, collector: str, authenticated: bool) -> None:
        """The verdict source changed (spec.collector): enforce mode needs it authenticated."""
        self.collector = collector
        self.channel.authenticated = authenticated
        self.channel.description = (
            f"{'mutual TLS' if authenticated else 'an unauthenticated channel'} to {collector or '(none)'}"
        )

    def check(self, cfg) -> None:
        """Raise ConfigError for what this node cannot run (the watcher refuses the config)."""
        if cfg.enforcement.mode == "enforce" and not self.channel.authenticated:
            raise ConfigError(
                "spec.enforcement.mode enforce needs mutual TLS to the collector "
                "(spec.collector.tls.mode mtls, or the chart's collector TLS): verdicts that "
                f"drop traffic must be authenticated; the channel is {self.channel.description}"
            )

    def apply(self, cfg) -> None:
        """A new AgentConfig: everything in spec.enforcement changes live."""
        self.check(cfg)
        old, self.cfg = self.cfg, cfg.enforcement
        self.manager.set_limits(cfg.settings.enforce)
        self.manager.set_namespace_policy(namespace_policy(self.cfg.namespace_policy))
        if (old.allow, old.follow_api_server) != (self.cfg.allow, self.cfg.follow_api_server):
            self._refresh_allowlist(force=True)
        if self.manager.table is not None and self.manager.table.mode() != self.cfg.mode:
            self.manager.set_mode(self.cfg.mode)
            log.info("enforcement mode now %s", self.cfg.mode)

    def _allowlist(self) -> list:
        return host_allowlist(
            collector=self.collector,
            operator=self.cfg.allow,
            extra_api_servers=self._api_ips if self.cfg.follow_api_server else (),
        )

    def _refresh_allowlist(self, *, force: bool = False) -> None:
        now = self.clock()
        changed = False
        if self.cfg.follow_api_server and now - self._api_read_at >= API_REFRESH_S:
            self._api_read_at = now
            ips = api_endpoints(self.api)
            if ips is not None and sorted(ips) != sorted(self._api_ips):
                log.info("API server endpoints: %s (allowlisted)", ", ".join(ips) or "none")
                self._api_ips = ips
                changed = True
        if changed or force:
            self.manager.set_allowlist(self._allowlist())

    def _namespace_of(self, ip16: bytes) -> str | None:
        rec = self.pod_for_ip(ip16)
        return getattr(rec, "namespace", None) or None

    # ---- datapath -------------------------------------------------------------------------
    def wrap(self, sink):
        return self.manager.recent.wrap(sink)

    def on_verdicts(self, vb) -> None:
        self.manager.on_verdicts(vb)

    def on_attached(self, dp) -> None:
        self.manager.detach()
        self.manager.attach(dp.rule_table(), mode=self.cfg.mode, counters=dp.counters)

    def on_detached(self) -> None:
        self.manager.detach()

    def close(self) -> None:
        self.manager.close()

    # ---- once a second, from the supervisor ---------------------------------------------
    def tick(self, watcher=None) -> None:
        self._refresh_allowlist()
        table = self.manager.table
        if table is None:
            return
        try:
            rows = table.rows()
            mode = table.mode()
        except OSError as exc:
            log.warning("reading the rules failed: %s", exc)
            return
        if watcher is not None:
            self._events(rows, watcher)
            now = self.clock()
            if now - self._status_at >= STATUS_EVERY_S:
                self._status_at = now
                status = self.status(rows, mode)
                if status != self._last_status:
                    self._last_status = status
                    watcher.set_enforcement(status)

    def status(self, rows, mode: str) -> dict:
        st = self.manager.stats
        return {
            "mode": mode,
            "rules": sum(1 for r in rows if r.expires_in_s > 0),
            "installed": st.installed,
            "refused": sum(st.refused.values()),
            "dropped": sum(r.dropped for r in rows),
            "wouldDrop": sum(r.hits for r in rows if r.action == "drop" and (r.dry_run or mode == "dry-run")),
        }

    def _events(self, rows, watcher) -> None:
        from xdpml.datapath.rules import _ip16

        live = set()
        for r in rows:
            ident = (r.slot, r.src, r.dst, r.src_port, r.dst_port, r.proto, r.action)
            live.add(ident)
            if r.dropped == 0 or ident in self._evented:
                continue
            self._evented[ident] = self.clock()
            for addr in {r.src, r.dst}:
                if not addr or ("/" in addr and not addr.endswith(("/32", "/128"))):
                    continue  # a prefix rule: no single pod to tell
                try:
                    rec = self.pod_for_ip(_ip16(addr.split("/")[0]))
                except ValueError:
                    rec = None
                if rec is None:
                    continue
                watcher.post_event(
                    pod_event(
                        rec,
                        node=self.node_name,
                        message=(
                            f"xdpml on node {self.node_name} drops traffic of this pod: rule {r.slot} "
                            f"{r.action} {r.src}:{r.src_port} -> {r.dst}:{r.dst_port} proto {r.proto}, "
                            f"{r.dropped} packets so far, expires in {max(0.0, r.expires_in_s):.0f} s"
                        ),
                    )
                )
        for ident in [k for k in self._evented if k not in live]:
            del self._evented[ident]  # the rule is gone: a new one gets its own Event


def pod_event(rec, *, node: str, message: str) -> dict:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{rec.name}.{uuid.uuid4().hex[:16]}", "namespace": rec.namespace},
        "involvedObject": {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": rec.name,
            "namespace": rec.namespace,
            "uid": rec.uid,
        },
        "reason": EVENT_REASON,
        "message": message[:1024],
        "type": "Warning",
        "source": {"component": "xdpml-agent", "host": node},
        "reportingComponent": "xdpml.io/agent",
        "reportingInstance": node,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
