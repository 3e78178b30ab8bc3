"""Host-side pod veth interfaces -> pods.

How: routed CNIs (Calico, Cilium in its default routing, kindnet, AWS VPC CNI, most
others) give every pod a host route ``<pod IP>/32 dev <host-side veth>`` (``/128`` for
IPv6). So the host's routing table maps each pod veth's ifindex to a pod IP, and the
pod cache maps that IP to the pod. The table is read with ``ip -j route`` (iproute2,
in the agent image) and refreshed when asked (the agent refreshes on its interface
rescan; a pod veth appears when its pod starts).

Limits: bridge CNIs (flannel's cni0, the plain "bridge" plugin) route the pod subnet to
the bridge, not per pod, so their veths have no host route and map to nothing here.
The alternative for them, reading the peer ifindex (``/sys/class/net/<veth>/iflink``)
and matching it inside each pod's network namespace, needs the pods' netns mounted
into the agent and is not implemented.

The route source is injectable (:class:`RouteSource`) so this is testable without
touching the host's routes.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import subprocess
import threading
from collections.abc import Iterable
from typing import Protocol

from xdpml.kube.podcache import EndpointInfo, EndpointResolver
from xdpml.wire.columns import ip_from_str

log = logging.getLogger(__name__)


class RouteSource(Protocol):
    """Host routes to single addresses: (output ifindex, destination IP text)."""

    def host_routes(self) -> Iterable[tuple[int, str]]: ...


class IpRouteSource:
    """Reads ``ip -j route`` and ``ip -j -6 route`` (all tables)."""

    def __init__(self, *, ip_binary: str = "ip"):
        self.ip_binary = ip_binary

    def host_routes(self) -> list[tuple[int, str]]:
        out: list[tuple[int, str]] = []
        for family, full in (("-4", 32), ("-6", 128)):
            try:
                text = subprocess.run(
                    [self.ip_binary, "-j", family, "route", "show", "table", "all"],
                    capture_output=True,
                    text=True,
                    check=True,
                    timeout=10,
                ).stdout
                routes = json.loads(text or "[]")
            except (OSError, subprocess.SubprocessError, ValueError) as err:
                log.warning(
                    "cannot read %s routes with %r (%s): pod veths will not map to pods", family, self.ip_binary, err
                )
                continue
            for route in routes:
                dst, dev = route.get("dst", ""), route.get("dev", "")
                if not dst or not dev or dst == "default" or route.get("type", "unicast") != "unicast":
                    continue
                try:
                    net = ipaddress.ip_network(dst, strict=False)
                except ValueError:
                    continue
                if net.prefixlen != full:
                    continue
                try:
                    out.append((socket.if_nametoindex(dev), str(net.network_address)))
                except OSError:
                    continue  # the interface went away between the two reads
        return out


class VethMap:
    """ifindex of a host-side veth -> the pod behind it."""

    def __init__(self, routes: RouteSource, resolver: EndpointResolver):
        self._routes = routes
        self._resolver = resolver
        self._lock = threading.Lock()
        self._ips: dict[int, list[bytes]] = {}

    def refresh(self) -> None:
        table: dict[int, list[bytes]] = {}
        for ifindex, ip in self._routes.host_routes():
            try:
                table.setdefault(int(ifindex), []).append(ip_from_str(ip))
            except ValueError:
                continue
        with self._lock:
            self._ips = table

    def pod_for_ifindex(self, ifindex: int) -> EndpointInfo | None:
        """The pod whose IP is routed through this interface, or None."""
        with self._lock:
            ips = list(self._ips.get(int(ifindex), ()))
        for ip in ips:
            info = self._resolver.resolve(ip)
            if info is not None and info.pod:
                return info
        return None

    def pod_veths(self) -> dict[int, EndpointInfo]:
        """Every interface that leads to a known pod (what the 'pod-veths' rule attaches to)."""
        with self._lock:
            indexes = list(self._ips)
        found = {}
        for ifindex in indexes:
            info = self.pod_for_ifindex(ifindex)
            if info is not None:
                found[ifindex] = info
        return found
