"""Compile the datapath with BCC and attach it to interfaces.

Rules this module keeps (DESIGN.md):
  * tunables are -D flags built from settings, never edits of the C text;
  * never replace another tool's program: XDP is attached with
    XDP_FLAGS_UPDATE_IF_NOEXIST after checking the interface, and TC filters are
    added beside existing ones (own priority, TC_ACT_UNSPEC so others still run);
  * everything attached is detached on close(), and ``cleanup()`` removes what a
    killed agent left behind.

Which agent owns an attachment, per interface: xdpml's programs and TC filters are
recognised by name (``xdpml_*``); the owner is the Datapath whose id (its XDP
program's id) is the XDP program's id or follows the ``@`` in the TC filter's name
(``xdpml_tc_egress@<id>``), and it runs while the abstract socket
``@xdpml.datapath.<id>`` is held (see OwnerToken). An xdpml attachment whose owner is
gone (kill -9, OOM) is *stale*: a starting agent takes it over (removes it and
attaches its own, logged) and ``cleanup()`` removes it, on the interfaces asked for,
while other agents keep running; an attachment of a live agent is left alone.
"""

from __future__ import annotations

import ctypes as C
import errno
import fnmatch
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from xdpml.config import AgentSettings, ConfigError
from xdpml.datapath import syscalls
from xdpml.datapath.abi import flow_types
from xdpml.datapath.source import program_text
from xdpml.errors import AttachError

log = logging.getLogger(__name__)

PROG_PREFIX = "xdpml_"
XDP_PROG = "xdpml_xdp"
TC_INGRESS_PROG = "xdpml_tc_ingress"
TC_EGRESS_PROG = "xdpml_tc_egress"
TC_PRIO = 0xC0DE & 0x7FFF  # our filter priority on clsact hooks
CLSACT_INGRESS = 0xFFFFFFF2
CLSACT_EGRESS = 0xFFFFFFF3
XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_ATTACHED_MODE = {1: "native", 2: "generic", 3: "offload", 4: "multi"}


@dataclass
class Attachment:
    ifname: str
    ifindex: int
    kind: str  # physical | veth | virtual
    hooks: list[str] = field(default_factory=list)  # e.g. ["xdp:native", "tc:egress"]
    created_clsact: bool = False


# ---------------------------------------------------------------------------
# Interfaces


def interface_kind(ifname: str) -> str:
    """physical (has a device driver), veth, or virtual (lo, bridges, tunnels...)."""
    base = Path("/sys/class/net") / ifname
    if not base.exists():
        raise AttachError(f"interface {ifname!r} does not exist (see `ip link show`)")
    if (base / "device").exists():
        return "physical"
    return "veth" if _link_kind(ifname) == "veth" else "virtual"


def _link_kind(ifname: str) -> str:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        links = ipr.get_links(ifname=ifname)
        if not links:
            return ""
        info = links[0].get_attr("IFLA_LINKINFO")
        return info.get_attr("IFLA_INFO_KIND") if info else ""


def resolve_interfaces(patterns: list[str]) -> list[str]:
    """Names, globs and the words 'physical' / 'pod-veths' -> existing interface names."""
    present = sorted(os.listdir("/sys/class/net"))
    out: list[str] = []
    for pat in patterns:
        if pat == "physical":
            matched = [n for n in present if interface_kind(n) == "physical"]
        elif pat == "pod-veths":
            # host side of pod veths: veth devices in the host namespace, as CNIs create them
            matched = [n for n in present if n != "lo" and interface_kind(n) == "veth"]
        elif any(ch in pat for ch in "*?["):
            matched = fnmatch.filter(present, pat)
        else:
            if pat not in present:
                raise AttachError(f"interface {pat!r} does not exist; present: {', '.join(present)}")
            matched = [pat]
        out.extend(n for n in matched if n not in out)
    return out


def plan_hooks(kind: str, hooks: str, xdp_mode: str) -> list[str]:
    """Which hooks an interface of this kind gets. See DESIGN.md measurements:
    native XDP on a veth disables TSO on its peer, generic XDP sees GRO-merged
    super-packets; TC sees skb->gso_segs and counts wire packets right."""
    if hooks == "auto":
        hooks = "xdp+tc" if kind == "physical" else "tc"
    mode = xdp_mode
    if mode == "auto":
        mode = "native" if kind == "physical" else "generic"
    if hooks == "xdp":
        return [f"xdp:{mode}"]
    if hooks == "tc":
        return ["tc:ingress", "tc:egress"]
    if hooks == "xdp+tc":
        return [f"xdp:{mode}", "tc:egress"]
    raise ConfigError(f"unknown hooks {hooks!r}")


# ---------------------------------------------------------------------------
# Program identity (by id -> name), so cleanup and checks recognise ours

BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15


def prog_name(prog_id: int) -> str:
    class GetFd(C.Structure):
        _fields_ = [("id", C.c_uint32), ("next_id", C.c_uint32), ("open_flags", C.c_uint32)]

    class InfoAttr(C.Structure):
        _fields_ = [("fd", C.c_uint32), ("info_len", C.c_uint32), ("info", C.c_uint64)]

    a = GetFd(id=prog_id)
    fd = syscalls.bpf(BPF_PROG_GET_FD_BY_ID, a)
    if fd < 0:
        return ""
    try:
        buf = (C.c_uint8 * 256)()
        ia = InfoAttr(fd=fd, info_len=256, info=C.addressof(buf))
        if syscalls.bpf(BPF_OBJ_GET_INFO_BY_FD, ia) < 0:
            return ""
        return bytes(buf[64:80]).split(b"\0", 1)[0].decode(errors="replace")
    finally:
        os.close(fd)


def xdp_state(ifname: str) -> tuple[int, str]:
    """(program id, mode) of the XDP program on the interface, (0, '') if none."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        links = ipr.get_links(ifname=ifname)
        if not links:
            return 0, ""
        xdp = links[0].get_attr("IFLA_XDP")
        if not xdp:
            return 0, ""
        attached = xdp.get_attr("IFLA_XDP_ATTACHED") or 0
        pid = xdp.get_attr("IFLA_XDP_PROG_ID") or 0
        if not attached or attached in ("none", "xdp_none"):
            return 0, ""
        return pid, _xdp_mode_name(attached)


def _xdp_mode_name(attached) -> str:
    """pyroute2 reports IFLA_XDP_ATTACHED as a number or as a name ('xdpgeneric')."""
    if isinstance(attached, int):
        return XDP_ATTACHED_MODE.get(attached, str(attached))
    text = str(attached).lower()
    for key, name in (
        ("generic", "generic"),
        ("skb", "generic"),
        ("drv", "native"),
        ("native", "native"),
        ("hw", "offload"),
        ("offload", "offload"),
        ("multi", "multi"),
    ):
        if key in text:
            return name
    return text


def _tc_filters(ipr, ifindex: int, parent: int) -> list:
    try:
        return list(ipr.get_filters(index=ifindex, parent=parent))
    except Exception:
        return []


def _filter_name(msg) -> str:
    opts = msg.get_attr("TCA_OPTIONS")
    if not opts:
        return ""
    return opts.get_attr("TCA_BPF_NAME") or ""


# ---------------------------------------------------------------------------
# Ownership: which agent an xdpml attachment belongs to, and whether it still runs
#
# Each Datapath has an owner id: the id of its XDP program (unique in the kernel while
# the program exists). While the Datapath is open it listens on the abstract Unix
# socket "@xdpml.datapath.<id>": abstract names live in the network namespace, so
# every process that can see the interfaces can see them, whatever its PID namespace
# (a pod without hostPID sees another pod's agent), and the kernel frees the name
# when the process dies, kill -9 included. Its TC filters are named
# "<program>@<id>"; its XDP program's id is the id itself.

OWNER_SOCKET = "xdpml.datapath.{}"
_local_owners: set[int] = set()  # owner ids of the Datapaths open in this process


def prog_id_of_fd(fd: int) -> int:
    class InfoAttr(C.Structure):
        _fields_ = [("fd", C.c_uint32), ("info_len", C.c_uint32), ("info", C.c_uint64)]

    buf = (C.c_uint8 * 256)()
    ia = InfoAttr(fd=fd, info_len=256, info=C.addressof(buf))
    rc = syscalls.bpf(BPF_OBJ_GET_INFO_BY_FD, ia)
    if rc < 0:
        raise AttachError(f"cannot read the id of a loaded BPF program: {os.strerror(-rc)}")
    return int.from_bytes(bytes(buf[4:8]), "little")


class OwnerToken:
    """Listens on @xdpml.datapath.<id> while this Datapath is open; answers each
    connection by closing it (the peer reads our pid with SO_PEERCRED)."""

    def __init__(self, owner_id: int) -> None:
        import socket
        import threading

        self.owner_id = owner_id
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.bind("\0" + OWNER_SOCKET.format(owner_id))
        except OSError as exc:
            self._sock.close()
            raise AttachError(f"cannot register datapath {owner_id} (abstract socket): {exc.strerror}") from None
        self._sock.listen(64)
        self._sock.settimeout(0.5)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="xdpml-owner", daemon=True)
        self._thread.start()
        _local_owners.add(owner_id)

    def _serve(self) -> None:

        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            conn.close()

    def close(self) -> None:
        _local_owners.discard(self.owner_id)
        self._stop.set()
        self._thread.join(2)
        self._sock.close()


def owner_alive(owner_id: int) -> tuple[bool, int]:
    """(alive, pid) of the agent with this owner id; pid 0 when it runs in a PID
    namespace this process cannot see."""
    import socket
    import struct

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        s.connect("\0" + OWNER_SOCKET.format(owner_id))
    except BlockingIOError:  # its backlog is full: it is there
        return True, 0
    except OSError:  # ECONNREFUSED: nobody listens on that name
        return False, 0
    else:
        pid, _uid, _gid = struct.unpack(
            "3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        )
        return True, pid
    finally:
        s.close()


def tc_filter_name(prog: str, owner_id: int) -> str:
    """The name our TC filters carry: program name @ owner id."""
    return f"{prog}@{owner_id}"


def filter_owner(name: str) -> int | None:
    """The owner id in an xdpml TC filter's name; None for a name without one (older agents)."""
    _, sep, tag = name.partition("@")
    return int(tag) if sep and tag.isdigit() else None


def prog_holders() -> dict[int, set[int]]:
    """xdpml program id -> pids of the visible processes (this one included) holding it
    open: how agents that predate owner sockets are recognised."""
    out: dict[int, set[int]] = {}
    names: dict[int, str] = {}
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            fdinfos = list((pid_dir / "fdinfo").iterdir())
        except OSError:
            continue
        for fi in fdinfos:
            try:
                text = fi.read_text()
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith("prog_id:"):
                    pid = int(line.split()[1])
                    if pid not in names:
                        names[pid] = prog_name(pid)
                    if names[pid].startswith(PROG_PREFIX):
                        out.setdefault(pid, set()).add(int(pid_dir.name))
    return out


@dataclass
class Owned:
    """One xdpml attachment found on an interface, and who owns it."""

    ifname: str
    hook: str  # "xdp" | "tc ingress" | "tc egress"
    what: str  # program id or filter name, for messages
    live: bool  # its agent runs (in another process)
    pids: set[int] = field(default_factory=set)  # that agent's pid(s) when visible
    mine: bool = False  # a Datapath of this process owns it

    @property
    def stale(self) -> bool:
        return not self.live and not self.mine

    def owner_text(self) -> str:
        pids = ", ".join(f"pid {p}" for p in sorted(self.pids))
        return pids or "in a PID namespace not visible here"


def _owner_state(owner_id: int | None, holders: dict[int, set[int]], prog_id: int = 0) -> tuple[bool, set[int], bool]:
    """(live, pids, mine) of an attachment with this owner id (None: an older agent's)
    and, for XDP, this program id."""
    me = os.getpid()
    if owner_id is not None and owner_id in _local_owners:
        return False, set(), True
    live, pids = False, set()
    if owner_id is not None:
        alive, pid = owner_alive(owner_id)
        live = alive
        if pid:
            pids.add(pid)
    if prog_id or owner_id is None:  # processes holding the program (or, for an old filter, any xdpml one)
        held = holders.get(prog_id, set()) if prog_id else {p for ps in holders.values() for p in ps}
        held -= {me}
        if held:
            live, pids = True, pids | held
    return live, pids, False


def owned_attachments(ifname: str, holders: dict[int, set[int]] | None = None) -> list[Owned]:
    """The xdpml XDP program and TC filters on ``ifname``, with their owners."""
    from pyroute2 import IPRoute

    holders = prog_holders() if holders is None else holders
    out: list[Owned] = []
    pid, mode = xdp_state(ifname)
    if pid and prog_name(pid).startswith(PROG_PREFIX):
        live, pids, mine = _owner_state(pid, holders, prog_id=pid)
        out.append(Owned(ifname, "xdp", f"xdp ({mode}) program {pid}", live, pids, mine))
    ifindex = socket_ifindex(ifname)
    with IPRoute() as ipr:
        for parent, direction in ((CLSACT_INGRESS, "ingress"), (CLSACT_EGRESS, "egress")):
            for f in _tc_filters(ipr, ifindex, parent):
                name = _filter_name(f)
                if not name.startswith(PROG_PREFIX):
                    continue
                live, pids, mine = _owner_state(filter_owner(name), holders)
                out.append(Owned(ifname, f"tc {direction}", f"tc {direction} filter {name}", live, pids, mine))
    return out


# ---------------------------------------------------------------------------


class Datapath:
    """The compiled programs and maps, and what they are attached to."""

    def __init__(self, settings: AgentSettings, *, model_limits=None):
        """``model_limits`` (xdpml.models.layout.Limits): compile the model table walk
        in (-DXDPML_MODEL=1, bpf/model.h) with these limits; None: no model code."""
        from bcc import BPF

        self.settings = settings
        dp = settings.datapath
        self.window = settings.window.enabled
        self.sample_rate = dp.sample_rate
        self.first_n = dp.first_n
        self.early = settings.harvest.early_packets > 0 or int(settings.harvest.early_ms) > 0
        self.types = flow_types(dp.first_n)
        pages = max(1, dp.ringbuf_kib // 4)
        cflags = [
            f"-DXDPML_FLOW_TABLE_SIZE={dp.flow_table_size}",
            f"-DXDPML_FIRST_N={dp.first_n}",
            f"-DXDPML_SAMPLE_RATE={dp.sample_rate}",
            f"-DXDPML_WINDOW={1 if self.window else 0}",
            f"-DXDPML_FLOW_LOCK={1 if dp.flow_lock else 0}",
            f"-DXDPML_RINGBUF_PAGES={pages}",
            f"-DXDPML_EARLY_PACKETS={settings.harvest.early_packets}",
            f"-DXDPML_EARLY_MS={int(settings.harvest.early_ms)}",
            f"-DXDPML_ENF_MAX_RULES={settings.enforce.map_rules}",
            f"-DXDPML_ENF_MAX_ALLOW={settings.enforce.map_allow}",
            *settings.tunnels.cflags(),
            "-Wno-unused-function",
        ]
        self.model_limits = model_limits
        if model_limits is not None:
            cflags += ["-DXDPML_MODEL=1", *model_limits.cflags(), f"-DXDPML_MODEL_FLOW_K={settings.model.flow_k}"]
        check_environment()
        self.pin_dir = settings.enforce.pin_dir
        if self.pin_dir:
            from xdpml.datapath.pins import prepare_pin_dir
            from xdpml.errors import EnvironmentNotReady

            try:
                prepare_pin_dir(
                    self.pin_dir, map_rules=settings.enforce.map_rules, map_allow=settings.enforce.map_allow
                )
            except EnvironmentNotReady as exc:
                # flows matter more than rules surviving a restart: go on unpinned
                log.warning("%s; the rule maps are not pinned (rules end with this agent)", exc)
                self.pin_dir = ""
        if self.pin_dir:
            cflags.append(f'-DXDPML_PIN_DIR="{self.pin_dir}"')
        t0 = time.monotonic()
        try:
            self.bpf = BPF(text=program_text().encode(), cflags=cflags)
        except Exception as exc:  # BCC raises bare Exception with the compiler output on stderr
            raise AttachError(
                f"compiling or loading the BPF programs failed ({exc}); the compiler or verifier output is above"
            ) from exc
        self.progs = {
            XDP_PROG: self.bpf.load_func(XDP_PROG.encode(), BPF.XDP),
            TC_INGRESS_PROG: self.bpf.load_func(TC_INGRESS_PROG.encode(), BPF.SCHED_CLS),
            TC_EGRESS_PROG: self.bpf.load_func(TC_EGRESS_PROG.encode(), BPF.SCHED_CLS),
        }
        if model_limits is not None:
            # a drop class's decision (bpf/model.h model_drop_decide), tail-called per hook type
            for fn, kind, arr in (
                ("xdpml_xdp_model_drop", BPF.XDP, b"model_drop_xdp"),
                ("xdpml_tc_model_drop", BPF.SCHED_CLS, b"model_drop_tc"),
            ):
                f = self.bpf.load_func(fn.encode(), kind)
                self.bpf[arr][C.c_int(0)] = C.c_int(f.fd)
        # Registered before anything is attached, so no other agent ever sees ours as stale.
        self.owner = OwnerToken(prog_id_of_fd(self.progs[XDP_PROG].fd))
        log.info(
            "compiled datapath in %.1fs (flow table %d, first-N %d, sample 1/%s, windows %s)",
            time.monotonic() - t0,
            dp.flow_table_size,
            dp.first_n,
            dp.sample_rate or "off",
            "on" if self.window else "off",
        )
        self.attachments: list[Attachment] = []

    # -- maps ---------------------------------------------------------------
    def flow_map_fd(self) -> int:
        return self.bpf[b"flows"].map_fd

    def rule_table(self):
        """The enforcement maps (xdpml/datapath/rules.py), pinned ones when pinning is on."""
        from xdpml.datapath.pins import from_bcc, open_pinned
        from xdpml.datapath.rules import RuleTable

        if self.pin_dir:
            return RuleTable(open_pinned(self.pin_dir), lock_path=self.pin_dir)
        return RuleTable(from_bcc(self.bpf, self.settings.enforce.map_rules))

    def counters(self) -> dict[str, int]:
        from xdpml.datapath.abi import COUNTERS

        table = self.bpf[b"counters"]
        out = {}
        for i, name in enumerate(COUNTERS):
            out[name] = int(sum(table[C.c_uint32(i)]))
        return out

    # -- attach ---------------------------------------------------------------
    def attach(self, ifname: str, *, hooks: str, xdp_mode: str) -> Attachment:
        from bcc import BPF
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        kind = interface_kind(ifname)
        plan = plan_hooks(kind, hooks, xdp_mode)
        ifindex = socket_ifindex(ifname)
        self._take_over_stale(ifname)
        att = Attachment(ifname, ifindex, kind)
        try:
            for hook in plan:
                if hook.startswith("xdp:"):
                    mode = hook.split(":", 1)[1]
                    if mode == "generic" and kind != "physical":
                        log.warning(
                            "%s is a %s interface: XDP runs there in generic mode, after GRO, so "
                            "it sees merged super-packets (packet counts and sizes are not the "
                            "wire's); --hooks tc counts every packet",
                            ifname,
                            kind,
                        )
                    pid, cur_mode = xdp_state(ifname)
                    if pid:
                        raise AttachError(
                            f"{ifname} already has an XDP program (id {pid}, {prog_name(pid) or '?'}, "
                            f"{cur_mode}); xdpml never replaces another program. Remove it, run "
                            "`xdpml cleanup` if it is a stale xdpml one, or use --hooks tc"
                        )
                    flags = XDP_FLAGS_UPDATE_IF_NOEXIST | (
                        XDP_FLAGS_DRV_MODE if mode == "native" else XDP_FLAGS_SKB_MODE
                    )
                    try:
                        BPF.attach_xdp(ifname.encode(), self.progs[XDP_PROG], flags)
                    except Exception as exc:
                        raise AttachError(
                            f"attaching XDP ({mode}) to {ifname} failed: {exc}. Try --xdp-mode generic or --hooks tc"
                        ) from exc
                    att.hooks.append(hook)
                else:
                    direction = hook.split(":", 1)[1]
                    prog = self.progs[TC_INGRESS_PROG if direction == "ingress" else TC_EGRESS_PROG]
                    parent = CLSACT_INGRESS if direction == "ingress" else CLSACT_EGRESS
                    with IPRoute() as ipr:
                        try:
                            ipr.tc("add", "clsact", ifindex)
                            att.created_clsact = True
                        except NetlinkError as exc:
                            if exc.code != errno.EEXIST:
                                raise AttachError(f"adding clsact qdisc to {ifname}: {exc}") from exc
                        for f in _tc_filters(ipr, ifindex, parent):
                            if _filter_name(f).startswith(PROG_PREFIX):
                                raise AttachError(
                                    f"{ifname} already has an xdpml TC {direction} filter "
                                    f"({_filter_name(f)}) of a running agent"
                                )
                        ipr.tc(
                            "add-filter",
                            "bpf",
                            ifindex,
                            ":1",
                            fd=prog.fd,
                            name=tc_filter_name(prog.name.decode(), self.owner.owner_id),
                            parent=parent,
                            prio=TC_PRIO,
                            classid=1,
                            direct_action=True,
                        )
                    att.hooks.append(hook)
        except BaseException:
            self._detach_hooks(att)
            raise
        self.attachments.append(att)
        log.info("attached %s (%s): %s", ifname, kind, ", ".join(att.hooks))
        return att

    def _take_over_stale(self, ifname: str) -> None:
        """Remove xdpml attachments a dead agent left on ``ifname``; refuse a live agent's."""
        found = owned_attachments(ifname)
        live = [o for o in found if o.live]
        if live:
            raise AttachError(
                f"{ifname} is attached by another running xdpml agent ({live[0].owner_text()}): "
                f"{', '.join(o.what for o in live)}; stop it first, or choose other interfaces"
            )
        stale = [o for o in found if o.stale]
        if stale:
            removed = _remove_owned(stale)
            log.warning("%s: took over from a stopped xdpml agent: removed its %s", ifname, ", ".join(removed))

    def forget(self, att: Attachment) -> None:
        """The interface is gone (deleted): its programs went with it; only forget it."""
        if att in self.attachments:
            self.attachments.remove(att)

    def detach(self, att: Attachment) -> None:
        """Detach one interface (live reconfiguration)."""
        self._detach_hooks(att)
        if att in self.attachments:
            self.attachments.remove(att)
        log.info("detached %s", att.ifname)

    def _detach_hooks(self, att: Attachment) -> None:
        from bcc import BPF
        from pyroute2 import IPRoute

        for hook in list(att.hooks):
            try:
                if hook.startswith("xdp:"):
                    mode = hook.split(":", 1)[1]
                    BPF.remove_xdp(att.ifname.encode(), XDP_FLAGS_DRV_MODE if mode == "native" else XDP_FLAGS_SKB_MODE)
                else:
                    parent = CLSACT_INGRESS if hook.endswith("ingress") else CLSACT_EGRESS
                    with IPRoute() as ipr:
                        _remove_our_filters(
                            ipr, att.ifindex, parent, only=lambda name: filter_owner(name) == self.owner.owner_id
                        )
                att.hooks.remove(hook)
            except Exception as exc:
                log.warning("detaching %s from %s: %s", hook, att.ifname, exc)
        if att.created_clsact:
            with IPRoute() as ipr:
                _drop_clsact_if_empty(ipr, att.ifindex)

    def detach_all(self) -> None:
        for att in list(reversed(self.attachments)):
            self.detach(att)

    def close(self) -> None:
        self.detach_all()
        self.owner.close()
        self.bpf.cleanup()

    def __enter__(self) -> Datapath:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 12, 21, 38, 39


def check_environment() -> None:
    """Fail early, with what to do, when BPF cannot work here."""
    caps = 0
    try:
        for line in open("/proc/self/status"):
            if line.startswith("CapEff:"):
                caps = int(line.split()[1], 16)
    except OSError:
        caps = -1
    has = lambda c: caps == -1 or bool(caps & (1 << c))  # noqa: E731
    if not (has(CAP_SYS_ADMIN) or (has(CAP_BPF) and has(CAP_PERFMON))) or not has(CAP_NET_ADMIN):
        raise AttachError(
            "the agent needs root, or the capabilities CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN "
            "(the Helm chart grants them)"
        )
    build = Path("/lib/modules") / os.uname().release / "build"
    if not build.exists():
        raise AttachError(
            f"no kernel headers at {build}: BCC compiles at run time. Install your "
            "distribution's headers for this kernel, or run scripts/kernel-headers.sh "
            "(links Debian's packaged headers)"
        )


def socket_ifindex(ifname: str) -> int:
    import socket

    try:
        return socket.if_nametoindex(ifname)
    except OSError as exc:
        raise AttachError(f"interface {ifname!r} does not exist") from exc


def _remove_our_filters(ipr, ifindex: int, parent: int, only=lambda name: True) -> int:
    """Remove the xdpml TC filters (for which ``only(name)``) from one hook; returns how many."""
    removed = 0
    for f in _tc_filters(ipr, ifindex, parent):
        name = _filter_name(f)
        if not name.startswith(PROG_PREFIX) or not only(name):
            continue
        info = f["info"]
        prio = (info >> 16) & 0xFFFF
        proto = info & 0xFFFF
        try:
            ipr.tc("del-filter", "bpf", ifindex, handle=f["handle"], parent=parent, prio=prio, protocol=_ntohs(proto))
            removed += 1
        except Exception as exc:
            log.warning("removing TC filter on ifindex %d: %s", ifindex, exc)
    return removed


def _drop_clsact_if_empty(ipr, ifindex: int) -> None:
    if _tc_filters(ipr, ifindex, CLSACT_INGRESS) or _tc_filters(ipr, ifindex, CLSACT_EGRESS):
        return
    try:
        ipr.tc("del", "clsact", ifindex)
    except Exception:
        pass


def _ntohs(v: int) -> int:
    return ((v & 0xFF) << 8) | (v >> 8)


def _remove_owned(items: list[Owned]) -> list[str]:
    """Remove these xdpml attachments (one interface's); returns what was removed, in words."""
    from bcc import BPF
    from pyroute2 import IPRoute

    done: list = []
    if not items:
        return done
    ifname = items[0].ifname
    for o in items:
        if o.hook == "xdp":
            _pid, mode = xdp_state(ifname)
            BPF.remove_xdp(ifname.encode(), {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}.get(mode, 0))
            done.append(f"{ifname}: {o.what}")
    stale_tc = {(o.hook.split()[1], o.what.rsplit(" ", 1)[1]) for o in items if o.hook.startswith("tc ")}
    if stale_tc:
        ifindex = socket_ifindex(ifname)
        with IPRoute() as ipr:
            for parent, direction in ((CLSACT_INGRESS, "ingress"), (CLSACT_EGRESS, "egress")):
                names = {n for d, n in stale_tc if d == direction}
                if names and _remove_our_filters(ipr, ifindex, parent, only=names.__contains__):
                    done.append(f"{ifname}: tc {direction} filter")
            _drop_clsact_if_empty(ipr, ifindex)
    return done


@dataclass
class CleanupResult:
    removed: list[str] = field(default_factory=list)  # "<if>: what" removed
    left: list[Owned] = field(default_factory=list)  # a live agent's, left alone

    def left_message(self) -> str:
        owners = ", ".join(sorted({o.owner_text() for o in self.left}))
        where = ", ".join(sorted({o.ifname for o in self.left}))
        return (
            f"left what a running xdpml agent ({owners}) holds on {where}; stop it first (SIGTERM "
            "detaches cleanly), or use --force"
        )


def cleanup(*, interfaces: list[str] | None = None, force: bool = False) -> CleanupResult:
    """Remove xdpml attachments whose agent is gone (e.g. after kill -9) from ``interfaces``
    (default: every interface). A live agent's are left (``left``) unless ``force``."""
    from bcc import BPF
    from pyroute2 import IPRoute

    names = sorted(os.listdir("/sys/class/net")) if not interfaces else list(interfaces)
    for n in names:
        if not (Path("/sys/class/net") / n).exists():
            raise AttachError(f"interface {n!r} does not exist (see `ip link show`)")
    holders = prog_holders()
    out = CleanupResult()
    for ifname in names:
        try:
            found = owned_attachments(ifname, holders)
        except AttachError:  # gone meanwhile
            continue
        if force:
            for o in found:
                if o.hook == "xdp":
                    _pid, mode = xdp_state(ifname)
                    BPF.remove_xdp(
                        ifname.encode(), {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}.get(mode, 0)
                    )
                    out.removed.append(f"{ifname}: {o.what}")
            if any(o.hook.startswith("tc ") for o in found):
                ifindex = socket_ifindex(ifname)
                with IPRoute() as ipr:
                    for parent, direction in ((CLSACT_INGRESS, "ingress"), (CLSACT_EGRESS, "egress")):
                        if _remove_our_filters(ipr, ifindex, parent):
                            out.removed.append(f"{ifname}: tc {direction} filter")
                    _drop_clsact_if_empty(ipr, ifindex)
            continue
        out.left.extend(o for o in found if o.live)
        out.removed.extend(_remove_owned([o for o in found if o.stale]))
    return out
