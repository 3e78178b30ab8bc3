"""Attach and detach: never replace another program, nothing left after SIGTERM,
`xdpml cleanup` after kill -9."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from netns import make_hosts, sh

from xdpml.config import AgentSettings
from xdpml.datapath.loader import AttachError, Datapath, prog_name, xdp_state

pytestmark = [pytest.mark.root, pytest.mark.slow]
XDPML = str(Path(sys.executable).parent / "xdpml")


def tc_filters(dev: str, direction: str) -> str:
    return sh(f"tc filter show dev {dev} {direction}", capture=True, check=False)


def start_agent(*args) -> subprocess.Popen:
    """Start `xdpml agent` and wait (bounded) for its 'attached' log lines."""
    import queue
    import threading

    # with a file output, logs go to stdout (docs: `kubectl logs`)
    p = subprocess.Popen(
        [XDPML, "agent", *args, "-o", "/dev/null", "--summary-interval", "0"], stdout=subprocess.PIPE, text=True
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in p.stdout], daemon=True).start()
    want = sum(1 for a in args if a == "-i")
    seen, attached = [], 0
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and attached < want:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            if p.poll() is not None:
                break
            continue
        seen.append(line)
        attached += " attached " in line
    if attached < want:
        p.kill()
        raise AssertionError("agent did not attach: " + "".join(seen))
    return p


@pytest.fixture(scope="module")
def foreign_xdp():
    """Another tool's XDP program (a plain XDP_PASS, named other_xdp)."""
    from bcc import BPF

    b = BPF(
        text=b"int other_xdp(struct xdp_md *ctx) { return XDP_PASS; }\n"
        b"int other_tc(struct __sk_buff *skb) { return -1; }"
    )
    fn = b.load_func(b"other_xdp", BPF.XDP)
    yield b, fn
    b.cleanup()


def add_foreign_tc(b, dev: str, direction: str) -> None:
    """Another tool's TC filter (clsact + a bpf filter named other_tc, prio 1)."""
    from bcc import BPF
    from pyroute2 import IPRoute

    fn = b.load_func(b"other_tc", BPF.SCHED_CLS)
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=dev)[0]
        try:
            ipr.tc("add", "clsact", idx)
        except Exception:
            pass
        ipr.tc(
            "add-filter",
            "bpf",
            idx,
            ":1",
            fd=fn.fd,
            name="other_tc",
            prio=1,
            classid=1,
            direct_action=True,
            parent=0xFFFFFFF3 if direction == "egress" else 0xFFFFFFF2,
        )


def test_other_xdp_program_is_left_alone(foreign_xdp):
    from bcc import BPF

    b, fn = foreign_xdp
    with make_hosts(21) as (h,):
        BPF.attach_xdp(h.host_if.encode(), fn, 1 << 1)  # generic mode
        pid_before, _ = xdp_state(h.host_if)
        assert prog_name(pid_before) == "other_xdp"
        with Datapath(AgentSettings()) as dp:
            with pytest.raises(AttachError, match="never replaces another program"):
                dp.attach(h.host_if, hooks="xdp", xdp_mode="generic")
            assert dp.attachments == []
        pid_after, _ = xdp_state(h.host_if)
        assert pid_after == pid_before
        assert "xdpml" not in tc_filters(h.host_if, "egress")
        BPF.remove_xdp(h.host_if.encode(), 1 << 1)


def test_sigterm_detaches_everything_and_keeps_foreign_tc_filters(foreign_xdp):
    with make_hosts(22) as (h,):
        add_foreign_tc(foreign_xdp[0], h.host_if, "egress")
        p = start_agent("-i", h.host_if, "--hooks", "xdp+tc", "--xdp-mode", "generic")
        assert xdp_state(h.host_if)[1] == "generic" and "xdpml_tc_egress" in tc_filters(h.host_if, "egress")
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 0
        assert xdp_state(h.host_if) == (0, "")
        egress = tc_filters(h.host_if, "egress")
        assert "xdpml" not in egress and "other_tc" in egress  # theirs stays, so does clsact
        assert "xdpml" not in tc_filters(h.host_if, "ingress")


def test_cleanup_refuses_while_an_agent_runs():
    with make_hosts(25) as (h,):
        p = start_agent("-i", h.host_if)
        try:
            r = subprocess.run([XDPML, "cleanup", "--interface", h.host_if], capture_output=True, text=True)
            assert r.returncode == 1 and f"pid {p.pid}" in r.stderr
            assert "xdpml_tc_egress" in tc_filters(h.host_if, "egress")  # left alone
        finally:
            p.send_signal(signal.SIGTERM)
            assert p.wait(60) == 0


def test_cleanup_after_kill_9(foreign_xdp):
    with make_hosts(23, 24) as (h, other):
        add_foreign_tc(foreign_xdp[0], other.host_if, "ingress")
        p = start_agent("-i", h.host_if, "-i", other.host_if, "--hooks", "xdp+tc", "--xdp-mode", "generic")
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
        # BCC's programs stay attached after the process dies
        assert prog_name(xdp_state(h.host_if)[0]) == "xdpml_xdp"
        assert "xdpml_tc_egress" in tc_filters(h.host_if, "egress")
        mine = ["--interface", h.host_if, "--interface", other.host_if]  # other tests' agents may run
        out = subprocess.run([XDPML, "cleanup", *mine], capture_output=True, text=True, check=True).stdout
        assert f"{h.host_if}: xdp" in out and f"{h.host_if}: tc egress" in out
        for dev in (h.host_if, other.host_if):
            assert xdp_state(dev) == (0, "")
            assert "xdpml" not in tc_filters(dev, "egress") + tc_filters(dev, "ingress")
        assert "other_tc" in tc_filters(other.host_if, "ingress")
        again = subprocess.run([XDPML, "cleanup", *mine], capture_output=True, text=True, check=True).stdout
        assert "nothing of xdpml's was attached" in again


def test_bad_interface_is_a_clear_error():
    r = subprocess.run([XDPML, "agent", "-i", "no-such-if0", "--duration", "1"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr
