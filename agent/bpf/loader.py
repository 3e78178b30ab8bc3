"""Compile the datapath with BCC and attach it to interfaces.

Rules this module keeps (DESIGN.md):
  * tunables are -D flags built from settings, never edits of the C text;
  * never replace another tool's program: XDP is attached with
    XDP_FLAGS_UPDATE_IF_NOEXIST after checking the interface, and TC filters are
    added beside existing ones (own priority, TC_ACT_UNSPEC so others still run);
  * everything attached is detached on close(), and ``cleanup()`` removes what a
    killed agent left behind, recognising ours by program name.
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

from agent.config import AgentSettings, ConfigError
from xdpml.errors import AttachError, XdpmlError
from agent.bpf.abi import flow_types
from agent.bpf.source import program_text

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

_libc = C.CDLL(None, use_errno=True)
_libc.syscall.restype = C.c_long
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15


def prog_name(prog_id: int) -> str:
    class GetFd(C.Structure):
        _fields_ = [("id", C.c_uint32), ("next_id", C.c_uint32), ("open_flags", C.c_uint32)]

    class InfoAttr(C.Structure):
        _fields_ = [("fd", C.c_uint32), ("info_len", C.c_uint32), ("info", C.c_uint64)]

    a = GetFd(id=prog_id)
    fd = _libc.syscall(321, BPF_PROG_GET_FD_BY_ID, C.byref(a), C.sizeof(a))
    if fd < 0:
        return ""
    try:
        buf = (C.c_uint8 * 256)()
        ia = InfoAttr(fd=fd, info_len=256, info=C.addressof(buf))
        if _libc.syscall(321, BPF_OBJ_GET_INFO_BY_FD, C.byref(ia), C.sizeof(ia)) < 0:
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
    for key, name in (("generic", "generic"), ("skb", "generic"), ("drv", "native"),
                      ("native", "native"), ("hw", "offload"), ("offload", "offload"), ("multi", "multi")):
        if key in text:
            return name
    return text


def _tc_filters(ipr, ifindex: int, parent: int) -> list:
    try:
        return list(ipr.get_filters(index=ifindex, parent=parent))
    except Exception:  # noqa: BLE001 - no clsact qdisc: no filters
        return []


def _filter_name(msg) -> str:
    opts = msg.get_attr("TCA_OPTIONS")
    if not opts:
        return ""
    return opts.get_attr("TCA_BPF_NAME") or ""


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
        self.types = flow_types(dp.first_n)
        pages = max(1, dp.ringbuf_kib // 4)
        cflags = [
            f"-DXDPML_FLOW_TABLE_SIZE={dp.flow_table_size}",
            f"-DXDPML_FIRST_N={dp.first_n}",
            f"-DXDPML_SAMPLE_RATE={dp.sample_rate}",
            f"-DXDPML_WINDOW={1 if self.window else 0}",
            f"-DXDPML_FLOW_LOCK={1 if dp.flow_lock else 0}",
            f"-DXDPML_RINGBUF_PAGES={pages}",
            "-Wno-unused-function",
        ]
        self.model_limits = model_limits
        if model_limits is not None:
            cflags += ["-DXDPML_MODEL=1", *model_limits.cflags()]
        check_environment()
        t0 = time.monotonic()
        try:
            self.bpf = BPF(text=program_text().encode(), cflags=cflags)
        except Exception as exc:  # BCC raises bare Exception with the compiler output on stderr
            raise AttachError(f"compiling or loading the BPF programs failed ({exc}); the compiler "
                              "or verifier output is above") from exc
        self.progs = {
            XDP_PROG: self.bpf.load_func(XDP_PROG.encode(), BPF.XDP),
            TC_INGRESS_PROG: self.bpf.load_func(TC_INGRESS_PROG.encode(), BPF.SCHED_CLS),
            TC_EGRESS_PROG: self.bpf.load_func(TC_EGRESS_PROG.encode(), BPF.SCHED_CLS),
        }
        log.info("compiled datapath in %.1fs (flow table %d, first-N %d, sample 1/%s, windows %s)",
                 time.monotonic() - t0, dp.flow_table_size, dp.first_n,
                 dp.sample_rate or "off", "on" if self.window else "off")
        self.attachments: list[Attachment] = []

    # -- maps ---------------------------------------------------------------
    def flow_map_fd(self) -> int:
        return self.bpf[b"flows"].map_fd

    def counters(self) -> dict[str, int]:
        from agent.bpf.abi import COUNTERS

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
        att = Attachment(ifname, ifindex, kind)
        try:
            for hook in plan:
                if hook.startswith("xdp:"):
                    mode = hook.split(":", 1)[1]
                    pid, cur_mode = xdp_state(ifname)
                    if pid:
                        raise AttachError(
                            f"{ifname} already has an XDP program (id {pid}, {prog_name(pid) or '?'}, "
                            f"{cur_mode}); xdpml never replaces another program. Remove it, run "
                            "`xdpml cleanup` if it is a stale xdpml one, or use --hooks tc")
                    flags = XDP_FLAGS_UPDATE_IF_NOEXIST | (
                        XDP_FLAGS_DRV_MODE if mode == "native" else XDP_FLAGS_SKB_MODE)
                    try:
                        BPF.attach_xdp(ifname.encode(), self.progs[XDP_PROG], flags)
                    except Exception as exc:
                        raise AttachError(f"attaching XDP ({mode}) to {ifname} failed: {exc}. "
                                          "Try --xdp-mode generic or --hooks tc") from exc
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
                                    f"{ifname} already has an xdpml TC {direction} filter: another "
                                    "agent runs here, or one was killed (run `xdpml cleanup`)")
                        ipr.tc("add-filter", "bpf", ifindex, ":1", fd=prog.fd, name=prog.name.decode(),
                               parent=parent, prio=TC_PRIO, classid=1, direct_action=True)
                    att.hooks.append(hook)
        except BaseException:
            self._detach_hooks(att)
            raise
        self.attachments.append(att)
        log.info("attached %s (%s): %s", ifname, kind, ", ".join(att.hooks))
        return att

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
                        _remove_our_filters(ipr, att.ifindex, parent)
                att.hooks.remove(hook)
            except Exception as exc:  # noqa: BLE001 - keep detaching the rest
                log.warning("detaching %s from %s: %s", hook, att.ifname, exc)
        if att.created_clsact:
            with IPRoute() as ipr:
                _drop_clsact_if_empty(ipr, att.ifindex)

    def detach_all(self) -> None:
        for att in list(reversed(self.attachments)):
            self.detach(att)

    def close(self) -> None:
        self.detach_all()
        self.bpf.cleanup()

    def __enter__(self) -> "Datapath":
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
        raise AttachError("the agent needs root, or the capabilities CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN "
                          "(the Helm chart grants them)")
    build = Path("/lib/modules") / os.uname().release / "build"
    if not build.exists():
        raise AttachError(f"no kernel headers at {build}: BCC compiles at run time. Install your "
                          "distribution's headers for this kernel, or run scripts/kernel-headers.sh "
                          "(links Debian's packaged headers)")


def socket_ifindex(ifname: str) -> int:
    import socket

    try:
        return socket.if_nametoindex(ifname)
    except OSError as exc:
        raise AttachError(f"interface {ifname!r} does not exist") from exc


def _remove_our_filters(ipr, ifindex: int, parent: int) -> int:
    removed = 0
    for f in _tc_filters(ipr, ifindex, parent):
        if not _filter_name(f).startswith(PROG_PREFIX):
            continue
        info = f["info"]
        prio = (info >> 16) & 0xFFFF
        proto = info & 0xFFFF
        try:
            ipr.tc("del-filter", "bpf", ifindex, handle=f["handle"], parent=parent, prio=prio,
                   protocol=_ntohs(proto))
            removed += 1
        except Exception as exc:  # noqa: BLE001
            log.warning("removing TC filter on ifindex %d: %s", ifindex, exc)
    return removed


def _drop_clsact_if_empty(ipr, ifindex: int) -> None:
    if _tc_filters(ipr, ifindex, CLSACT_INGRESS) or _tc_filters(ipr, ifindex, CLSACT_EGRESS):
        return
    try:
        ipr.tc("del", "clsact", ifindex)
    except Exception:  # noqa: BLE001 - already gone
        pass


def _ntohs(v: int) -> int:
    return ((v & 0xFF) << 8) | (v >> 8)


def live_holders() -> dict[int, list[str]]:
    """Processes (other than this one) holding xdpml BPF programs open: pid -> names.
    A running agent holds its programs; a killed one holds nothing."""
    out: dict[int, list[str]] = {}
    me = os.getpid()
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit() or int(pid_dir.name) == me:
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
                    name = prog_name(int(line.split()[1]))
                    if name.startswith(PROG_PREFIX):
                        out.setdefault(int(pid_dir.name), []).append(name)
    return out


class AgentRunning(XdpmlError):
    """cleanup() found a live agent: removing its programs would blind it."""


def cleanup(*, force: bool = False) -> list[str]:
    """Remove every xdpml program left attached (e.g. after kill -9). Returns what was removed.
    Refuses (AgentRunning) while a live process holds xdpml programs, unless ``force``."""
    from bcc import BPF
    from pyroute2 import IPRoute

    holders = live_holders()
    if holders and not force:
        pids = ", ".join(str(p) for p in sorted(holders))
        raise AgentRunning(f"an xdpml agent is running (pid {pids}) and holds its programs; stop it "
                           "first (SIGTERM detaches cleanly), or use --force")

    done = []
    for ifname in sorted(os.listdir("/sys/class/net")):
        pid, mode = xdp_state(ifname)
        if pid and prog_name(pid).startswith(PROG_PREFIX):
            flags = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}.get(mode, 0)
            BPF.remove_xdp(ifname.encode(), flags)
            done.append(f"{ifname}: xdp ({mode}) program {pid}")
        try:
            ifindex = socket_ifindex(ifname)
        except AttachError:
            continue
        with IPRoute() as ipr:
            for parent, name in ((CLSACT_INGRESS, "ingress"), (CLSACT_EGRESS, "egress")):
                if _remove_our_filters(ipr, ifindex, parent):
                    done.append(f"{ifname}: tc {name} filter")
            if any(d.startswith(f"{ifname}: tc") for d in done):
                _drop_clsact_if_empty(ipr, ifindex)
    return done
