"""A model changed on a running agent: the agent's real pipeline attached by TC to a
test veth, UDP traffic from the test namespace counted as it is sent and received,
and models swapped while it flows, through `xdpml model ...` (a separate process on
the pinned slots) and the same slots opened in this process.

No packet lost, none scored by a mix of two models: model A puts the packets to
port LOW in class 0 and those to HIGH in class 1; model B puts them in classes 2
and 3. Every packet, whichever model it met, is counted once in one slot's class
counters, so over both slots c0 + c2 == packets sent to LOW and c1 + c3 == to HIGH,
with nothing counted as unclassified or as a walk error."""

import os
import subprocess
import sys
import tempfile
import threading

import joblib
import numpy as np
import pytest
from enforce.traffic import Receiver
from netns import make_hosts
from sklearn.tree import DecisionTreeClassifier
from xdpml.agent.pipeline import Agent

from xdpml.config import AgentSettings, EnforceSettings, HarvestSettings, InterfaceSettings, ModelSettings
from xdpml.lab import private_bpffs
from xdpml.models.cli_commands import compile_file
from xdpml.models.kernel import ModelSlots

pytestmark = pytest.mark.root
LOW, HIGH, SPORT = 1500, 2500, 4470


def _tree(path, edges_labels):
    """A tree on dst_port: port ranges [edge_i, edge_i+1) -> label_i (labels are class indices)."""
    xs, ys = [], []
    for (lo, hi), label in edges_labels:
        for p in np.linspace(lo, hi - 1, 40).astype(int):
            xs.append([p])
            ys.append(label)
    est = DecisionTreeClassifier(random_state=0).fit(np.array(xs), np.array(ys))
    joblib.dump(est, path)
    return est


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("live-models")
    a, b = str(d / "a.joblib"), str(d / "b.joblib")
    ea = _tree(a, [((0, 2000), 0), ((2000, 65536), 1)])
    eb = _tree(b, [((0, 1000), 0), ((1000, 2000), 2), ((2000, 3000), 3), ((3000, 65536), 1)])
    assert list(ea.predict([[LOW], [HIGH]])) == [0, 1]
    assert list(eb.predict([[LOW], [HIGH]])) == [2, 3]
    return a, b


@pytest.fixture(scope="module")
def bpffs():
    with private_bpffs("xdpml-model-bpffs-") as d:
        yield d


def decisions_path(pin):
    return os.path.join(tempfile.gettempdir(), f"xdpml-decisions-{os.path.basename(os.path.dirname(pin))}.jsonl")


@pytest.fixture(scope="module")
def live(models, bpffs):
    """The agent, started with model A from its file, on a silent veth (no IPv6)."""
    a, _ = models
    pin = os.path.join(bpffs, "agent")
    with make_hosts(71, ipv6=False) as (h,):
        settings = AgentSettings(
            interfaces=InterfaceSettings(names=[h.host_if], hooks="tc"),
            harvest=HarvestSettings(idle_timeout_s=1, interval_s=0.1),
            enforce=EnforceSettings(pin_dir=pin),
            model=ModelSettings(file=a, features=["dst_port"], decisions_file=str(decisions_path(pin)), sample_every=1),
            summary_interval_s=0,
        )
        from harness import MemorySink

        sink = MemorySink()
        agent = Agent(settings, interfaces=[h.host_if], sinks=[sink]).start(attach_timeout_s=240)
        agent.sink = sink
        rx = {p: Receiver(h.host_ip, p) for p in (LOW, HIGH)}
        try:
            yield h, agent, pin, rx
        finally:
            agent.stop()
            for r in rx.values():
                r.close()
            if os.path.exists(decisions_path(pin)):
                os.unlink(decisions_path(pin))
    assert not os.path.exists(os.path.join(pin, "model", "model_slots")), "the agent left its model pins"


def cli(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "xdpml", "model", *args], capture_output=True, text=True, timeout=120)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def send(h, n, rate_pps=4000):
    """n datagrams from the namespace, alternating LOW and HIGH (LOW first), paced."""
    code = (
        "import socket,time\n"
        f"s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.bind(('{h.ns_ip}',{SPORT}))\n"
        f"t0=time.monotonic()\n"
        f"for i in range({n}):\n"
        f"    s.sendto(b'x', ('{h.host_ip}', ({LOW},{HIGH})[i%2]))\n"
        f"    d=t0+(i+1)/{rate_pps}-time.monotonic()\n"
        "    d>0 and time.sleep(d)\n"
    )
    h.run(f'{sys.executable} -c "{code}"')


def send_until(h, stop_path, rate_pps=4000):
    """Datagrams alternating LOW and HIGH (LOW first), paced, until stop_path exists (an
    even number: it stops after a HIGH); returns how many were sent (counted by the sender)."""
    code = (
        "import os,socket,time\n"
        f"s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.bind(('{h.ns_ip}',{SPORT}))\n"
        "t0=time.monotonic(); i=0\n"
        f"while i % 2 or not (i % 200 == 0 and os.path.exists('{stop_path}')):\n"
        f"    s.sendto(b'x', ('{h.host_ip}', ({LOW},{HIGH})[i%2])); i+=1\n"
        f"    d=t0+i/{rate_pps}-time.monotonic()\n"
        "    d>0 and time.sleep(d)\n"
        "print(i)\n"
    )
    return int(h.run(f'{sys.executable} -c "{code}"', capture=True).strip())


def test_cli_reaches_the_running_agent(live, models):
    h, agent, pin, _ = live
    a, b = models
    show = cli("show", "--json", "--pin-dir", pin)
    import json

    st = json.loads(show.stdout)
    act = st["slots"][st["active"]]
    assert act["kind"] == "trees" and act["features"] == ["dst_port"]
    r = cli("load", b, "--features", "dst_port", "--pin-dir", pin)
    assert "loaded into slot" in r.stdout
    st2 = json.loads(cli("show", "--json", "--pin-dir", pin).stdout)
    assert st2["active"] == st["active"] ^ 1 and st2["models_loaded"] == st["models_loaded"] + 1
    cli("swap", "--pin-dir", pin)  # back to A
    assert json.loads(cli("show", "--json", "--pin-dir", pin).stdout)["active"] == st["active"]
    r = cli("load", str(a) + ".missing", "--pin-dir", pin, check=False)
    assert r.returncode != 0 and "no such file" in r.stderr and "Traceback" not in r.stderr
    r = cli("show", "--pin-dir", pin + "-nothing", check=False)
    assert r.returncode != 0 and "no model slots pinned" in r.stderr and "Traceback" not in r.stderr


def test_swaps_under_traffic_lose_nothing_and_never_mix(live, models):
    h, agent, pin, rx = live
    a, b = models
    stop = os.path.join(tempfile.mkdtemp(prefix="xdpml-swap-"), "stop")
    slots = ModelSlots.pinned(pin)
    try:
        packed = [compile_file(p, ["dst_port"], slots.limits).pack(slots.limits) for p in (a, b)]
        slots.swap(packed[0])
        c_before = agent.datapath.counters()
        slots.clear_stats()
        sent = []
        received = {}
        # the receivers read all along (a full socket buffer would drop datagrams)
        readers = [
            threading.Thread(target=lambda p=p, r=r: received.__setitem__(p, len(r.take_until_marker(120))))
            for p, r in rx.items()
        ]
        for t in readers:
            t.start()
        sender = threading.Thread(target=lambda: sent.append(send_until(h, stop)))
        sender.start()
        swaps = cli_swaps = 0
        # traffic goes on until 300 swaps were made, two of them by `xdpml model load`
        # processes, however slow the machine
        while swaps < 300 or cli_swaps < 2:
            if swaps in (5, 150):  # as an operator would, from another process
                cli("load", (a, b)[swaps % 2], "--features", "dst_port", "--pin-dir", pin)
                cli_swaps += 1
            else:
                slots.swap(packed[swaps % 2])
            swaps += 1
        alive = sender.is_alive()  # the traffic outlasted every swap
        open(stop, "w").close()
        sender.join()
        n = sent[0]
        # a marker after the traffic on each port: once it is received, the TC hook has
        # seen every packet sent before it on that path
        for port in rx:
            h.run(
                f'{sys.executable} -c "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)'
                f".sendto(b'M', ('{h.host_ip}', {port}))\""
            )
        for t in readers:
            t.join(150)
        counts = slots.class_counts()
        c_after = agent.datapath.counters()
    finally:
        slots.close()
    assert alive and n >= 1000, f"the sender stopped early ({n} packets)"
    assert received == {LOW: n // 2, HIGH: n // 2}, "packets lost"
    assert c_after["pkt_tc_ingress"] - c_before["pkt_tc_ingress"] == n + 2
    assert c_after["model_err"] == c_before["model_err"]
    assert counts[-1] == 0, "packets met an empty slot"
    assert counts[4:-1].sum() == 0
    # each packet counted once, in the class of the one model it met (markers included)
    assert counts[0] + counts[2] == n // 2 + 1, counts
    assert counts[1] + counts[3] == n // 2 + 1, counts
    assert counts[0] + counts[1] > 0 and counts[2] + counts[3] > 0, f"one model saw everything: {counts}"


def test_class_is_stored_in_the_flow_and_exported(live, models):
    """model_class / model_id columns: the kernel's class for the flow's packets."""
    from harness import flow_between

    h, agent, pin, rx = live
    a, b = models
    slots = ModelSlots.pinned(pin)
    try:
        slot = slots.swap(compile_file(b, ["dst_port"], slots.limits).pack(slots.limits))
        mid = int(slots.read_slot(slot)["model_id"])
    finally:
        slots.close()
    for port, sport in ((LOW, 4490), (HIGH, 4491)):
        h.run(
            f'{sys.executable} -c "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); '
            f"s.bind(('{h.ns_ip}', {sport}))\n"
            f"for i in range(3): s.sendto(b'x', ('{h.host_ip}', {port}))\""
        )
    got = {}
    for port, sport in ((LOW, 4490), (HIGH, 4491)):
        pred = flow_between(h.ns_ip, h.host_ip, 17, port)
        rows = agent.sink.wait_rows("flow", lambda r, pred=pred, sport=sport: pred(r) and sport == r["src_port"])
        assert len(rows) == 1, rows
        got[port] = (rows[0]["model_class"], rows[0]["model_id"], rows[0]["bidirectional_packets"])
    assert got == {LOW: (2, mid, 3), HIGH: (3, mid, 3)}


def _recv(r, n, timeout=20.0):
    """Up to n datagrams within the timeout (bounded polling), then whatever else is queued."""
    import time

    got, deadline = [], time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        r.s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            got.append(r.s.recv(2048))
        except TimeoutError:
            break
    r.s.setblocking(False)
    try:
        while True:
            got.append(r.s.recv(2048))
    except BlockingIOError:
        pass
    finally:
        r.s.setblocking(True)
    return got


def test_drop_class_goes_through_mode_allowlist_and_kill_switch(live, models):
    """Model A with class 1 (port HIGH) = drop: dry-run counts, enforce drops (the
    clsact qdisc counts the drops: the kernel's own count), the kill switch and the
    allowlist pass; the alert class is counted."""
    from enforce.traffic import qdisc_drops

    h, agent, pin, rx = live
    a, _ = models
    table = agent.datapath.rule_table()
    slots = ModelSlots.pinned(pin)
    n = 100  # 50 to LOW, 50 to HIGH
    try:
        c = compile_file(a, ["dst_port"], slots.limits)
        slots.swap(c.pack(slots.limits, actions={"0": "alert", "1": "drop"}))
        for r in rx.values():
            _recv(r, 0, timeout=0.01)  # nothing left from earlier tests

        def phase():
            slots.clear_stats()
            d0 = qdisc_drops(h.host_if)
            send(h, n)
            low = _recv(rx[LOW], n // 2)
            high = _recv(rx[HIGH], n // 2, timeout=5.0)
            return len(low), len(high), qdisc_drops(h.host_if) - d0, slots.action_counts()

        table.set_kill(False)
        table.set_allowlist([])
        table.set_mode("dry-run")
        low, high, drops, ac = phase()
        assert (low, high, drops) == (50, 50, 0)
        assert (ac["alert"], ac["would_drop"], ac["dropped"]) == (50, 50, 0), ac

        table.set_mode("enforce")
        low, high, drops, ac = phase()
        assert (low, high, drops) == (50, 0, 50)
        assert (ac["alert"], ac["would_drop"], ac["dropped"]) == (50, 0, 50), ac

        table.set_kill(True)
        low, high, drops, ac = phase()
        assert (low, high, drops) == (50, 50, 0)
        assert (ac["kill_passed"], ac["dropped"]) == (50, 0), ac
        table.set_kill(False)

        table.set_allowlist([f"{h.ns_ip}/32"])
        low, high, drops, ac = phase()
        assert (low, high, drops) == (50, 50, 0)
        assert (ac["allowlisted"], ac["dropped"]) == (50, 0), ac
    finally:
        table.set_allowlist([])
        table.set_kill(False)
        table.set_mode("dry-run")
        table.maps.close()
        slots.unload()
        slots.close()


def test_rate_limit_class_on_a_veth(live, models):
    """Model A with class 1 (port HIGH) = rate-limit:1:20. Over real time what passes is
    bounded, not exact (GCRA: passed <= burst + rate x elapsed, and >= burst): every
    HIGH packet is either received or dropped by the kernel (the clsact qdisc's count),
    the model's counters agree with both, and dry-run drops nothing while counting the
    same split. LOW (class 0, pass) is untouched."""
    import time

    from enforce.traffic import qdisc_drops

    h, agent, pin, rx = live
    a, _ = models
    table = agent.datapath.rule_table()
    slots = ModelSlots.pinned(pin)
    n, burst = 200, 20  # 100 to LOW, 100 to HIGH
    try:
        packed = compile_file(a, ["dst_port"], slots.limits).pack(slots.limits, actions={"1": "rate-limit:1:20"})
        for r in rx.values():
            _recv(r, 0, timeout=0.01)

        def phase():
            slots.swap(packed)  # fresh buckets
            slots.clear_stats()
            d0 = qdisc_drops(h.host_if)
            t0 = time.monotonic()
            send(h, n)
            low = _recv(rx[LOW], n // 2)
            high = _recv(rx[HIGH], n // 2, timeout=3.0)
            elapsed = time.monotonic() - t0
            return len(low), len(high), qdisc_drops(h.host_if) - d0, slots.action_counts(), elapsed

        table.set_kill(False)
        table.set_allowlist([])
        table.set_mode("enforce")
        low, high, drops, ac, elapsed = phase()
        assert low == n // 2
        assert high + drops == n // 2, (high, drops)
        assert burst <= high <= burst + int(elapsed), (high, elapsed)
        assert (ac["rate_passed"], ac["dropped"], ac["would_drop"]) == (high, drops, 0), ac

        table.set_mode("dry-run")
        low, high, drops, ac, elapsed = phase()
        assert (low, high, drops) == (n // 2, n // 2, 0)
        assert ac["rate_passed"] + ac["would_drop"] == n // 2 and ac["dropped"] == 0, ac
        assert burst <= ac["rate_passed"] <= burst + int(elapsed), (ac, elapsed)
    finally:
        table.set_allowlist([])
        table.set_kill(False)
        table.set_mode("dry-run")
        table.maps.close()
        slots.unload()
        slots.close()


def test_sampled_decisions_with_their_inputs(live, models):
    """--model-decisions: every classified packet (1 in 1 here) as a JSON line with the
    flow key, class, action and the model's inputs by name."""
    import json
    import time

    h, agent, pin, rx = live
    _, b = models
    path = decisions_path(pin)
    slots = ModelSlots.pinned(pin)
    try:
        slot = slots.swap(compile_file(b, ["dst_port"], slots.limits).pack(slots.limits, actions={"2": "alert"}))
        mid = int(slots.read_slot(slot)["model_id"])
    finally:
        slots.close()
    sport = 4495
    h.run(
        f'{sys.executable} -c "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); '
        f"s.bind(('{h.ns_ip}', {sport}))\n"
        f"for i in range(10): s.sendto(b'x', ('{h.host_ip}', {LOW}))\""
    )

    def mine():
        if not os.path.exists(path):
            return []
        rows = [json.loads(line) for line in open(path) if line.strip()]
        return [r for r in rows if r["model_id"] == mid and sport in (r["lo_port"], r["hi_port"])]

    deadline = time.monotonic() + 20
    while len(mine()) < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    rows = mine()
    assert len(rows) == 10, rows[:3]
    for r in rows:
        assert (r["class"], r["action"], r["dropped"], r["features"]) == (2, "alert", False, {"dst_port": LOW})
        assert {r["lo_ip"], r["hi_ip"]} == {h.ns_ip, h.host_ip} and r["protocol"] == 17
