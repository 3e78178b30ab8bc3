"""Test hosts for the tests: see xdpml.lab (shared with the benchmarks)."""

from xdpml.lab import (
    SLOT,
    TestHost,
    _teardown,
    create_host,
    is_root,
    make_hosts,
    route_between,
    sh,
    udp_conversation,
    wait_port,
)

__all__ = [
    "SLOT",
    "TestHost",
    "_teardown",
    "create_host",
    "is_root",
    "make_hosts",
    "route_between",
    "sh",
    "udp_conversation",
    "wait_port",
]
