"""Building the agent's enforcement from its options: the allowlist from this host,
the verdict channel's authentication, the manager and its recent-exports sink."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from xdpml.agent.enforce.manager import (
    Channel,
    RecentFlows,
    RuleManager,
    build_allowlist,
    default_gateways,
    node_addresses,
    resolve_host,
)

from xdpml.config import EnforceSettings

log = logging.getLogger("xdpml.enforce")


def dns_servers(path: str = "/etc/resolv.conf") -> list[str]:
    out = []
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    out.append(parts[1])
    except OSError:
        pass
    return out


def api_servers() -> list[str]:
    """In a pod: the API service address. Under --kubernetes, the addresses of the
    default/kubernetes Endpoints are added and followed (agent/enforce/kube.py)."""
    host = os.environ.get("KUBERNETES_SERVICE_HOST", "")
    return [host] if host else []


def host_allowlist(*, collector: str = "", operator: Iterable[str] = (), extra_api_servers: Iterable[str] = ()) -> list:
    """The allowlist of this host: its own addresses, its default gateways, the API
    servers (plus ``extra_api_servers``), its DNS servers, the collector's addresses
    (``collector`` as host:port, resolved) and the operator's entries."""
    return build_allowlist(
        node=node_addresses(),
        gateways=default_gateways(),
        api_servers=[*api_servers(), *extra_api_servers],
        dns=dns_servers(),
        collector=resolve_host(collector) if collector else [],
        operator=operator,
    )


@dataclass
class EnforceOptions:
    collector: str = ""  # host:port of the verdict source
    mutual_tls: bool = False  # CA + client certificate + key given
    operator_allow: list[str] = field(default_factory=list)
    mode: str = ""  # "" = keep what the pinned maps say (fresh maps: dry-run)


def channel_for(opts: EnforceOptions) -> Channel:
    if opts.mutual_tls:
        return Channel(authenticated=True, description=f"mutual TLS to {opts.collector}")
    return Channel(authenticated=False, description=f"an unauthenticated channel to {opts.collector or '(none)'}")


def build_manager(settings: EnforceSettings, opts: EnforceOptions, *, telemetry=None) -> RuleManager:
    allow = host_allowlist(collector=opts.collector, operator=opts.operator_allow)
    recent = RecentFlows(capacity=settings.recent_flows, ttl_s=settings.recent_ttl_s)
    return RuleManager(settings, channel=channel_for(opts), allowlist=allow, recent=recent, telemetry=telemetry)
