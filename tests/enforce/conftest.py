"""Shared fixtures: a private BPF filesystem per session (rules pinned there, never in
the host's /sys/fs/bpf/xdpml) and one compiled datapath for the kernel tests."""

import os
import subprocess
import tempfile

import pytest

from xdpml.config import AgentSettings, EnforceSettings
from xdpml.datapath.loader import Datapath


@pytest.fixture(scope="session")
def bpffs():
    d = tempfile.mkdtemp(prefix="xdpml-enf-bpffs-")
    subprocess.run(["mount", "-t", "bpf", "bpf", d], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", d], check=False)
        os.rmdir(d)


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
