"""Shared fixtures: a private BPF filesystem per session (rules pinned there, never in
the host's /sys/fs/bpf/xdpml) and one compiled datapath for the kernel tests."""

import os

import pytest

from xdpml.config import AgentSettings, EnforceSettings
from xdpml.datapath.loader import Datapath
from xdpml.lab import private_bpffs


@pytest.fixture(scope="session")
def bpffs():
    with private_bpffs("xdpml-enf-bpffs-") as d:
        yield d


@pytest.fixture(scope="session")
def enf_dp(bpffs):
    settings = AgentSettings(enforce=EnforceSettings(pin_dir=os.path.join(bpffs, "dp")))
    with Datapath(settings) as dp:
        yield dp


@pytest.fixture()
def table(enf_dp):
    t = enf_dp.rule_table()
    t.flush()
    t.set_kill(False)
    t.set_mode("dry-run")
    t.set_allowlist([])
    yield t
    t.flush()
    t.set_kill(False)
    t.set_mode("dry-run")
    t.set_allowlist([])
    t.maps.close()
