"""`xdpml rules ...`: the operator's hands on the pinned rule maps.

Works on the maps an agent pinned (default /sys/fs/bpf/xdpml), whether that agent
is running or was killed; compiles nothing. Argument parsing and printing only: the
work is in xdpml/datapath/rules.py. Errors are XdpmlError (one line from the CLI).
"""

from __future__ import annotations

import argparse
import json
import sys

from xdpml.config import EnforceSettings
from xdpml.errors import ConfigError

RULES_EXAMPLES = """\
examples:
  xdpml rules list                                    every rule, hit counters, time left
  xdpml rules add --src 203.0.113.0/24 --action drop --ttl 300
  xdpml rules add --src 10.0.0.5 --dst 10.0.0.9 --proto tcp --sport 4444 --dport 22 --action drop
  xdpml rules add --dst 10.0.0.9 --dport 80 --proto tcp --action rate-limit --pps 100 --burst 200
  xdpml rules mode enforce                            act on rules (the default is dry-run: count only)
  xdpml rules kill                                    every action becomes pass, from the next packet
  xdpml rules kill --off                              back to the rules
"""


def _proto(text: str) -> int:
    from xdpml.datapath.rules import PROTOS

    if text.lower() in PROTOS:
        return PROTOS[text.lower()]
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"protocol must be tcp, udp, icmp, icmpv6 or 0..255, not {text!r}") from None
    if not 0 <= v <= 255:
        raise argparse.ArgumentTypeError(f"protocol must be 0..255, not {v}")
    return v


def _port(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port: {text!r}") from None
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0..65535, not {v}")
    return v


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return v


def add_rules_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "rules",
        help="list, add and remove enforcement rules; mode; kill switch",
        description="Enforcement rules in the pinned kernel maps (docs/enforcement.md).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=RULES_EXAMPLES,
    )
    p.add_argument(
        "--pin-dir",
        default=EnforceSettings().pin_dir,
        help="where the agent pinned the rule maps (default: %(default)s)",
    )
    sub = p.add_subparsers(dest="rules_command", metavar="ACTION", required=True)

    ls = sub.add_parser("list", help="rules with SRC DST SPORT DPORT PROTO ACTION HITS BYTES EXPIRES MODE")
    ls.add_argument("--json", action="store_true", help="one JSON object per rule, one per line")
    ls.set_defaults(func=run_list)

    ad = sub.add_parser(
        "add",
        help="install one rule (every rule expires)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=RULES_EXAMPLES,
    )
    ad.add_argument("--src", default="", help="source address (exact rule) or CIDR (prefix rule)")
    ad.add_argument("--dst", default="", help="destination address (exact rule) or CIDR (prefix rule)")
    ad.add_argument("--sport", type=_port, default=0, help="source port (exact rules)")
    ad.add_argument("--dport", type=_port, default=0, help="destination port; 0 = any on prefix rules")
    ad.add_argument("--proto", type=_proto, default=0, help="tcp, udp, icmp, icmpv6 or a number; 0 = any")
    ad.add_argument("--action", choices=("drop", "pass", "rate-limit"), required=True)
    ad.add_argument(
        "--ttl",
        type=_positive,
        default=300.0,
        metavar="S",
        help="seconds until the rule expires (default: %(default)s)",
    )
    ad.add_argument("--one-way", action="store_true", help="exact rules: do not match the reverse direction")
    ad.add_argument("--pps", type=_positive, default=None, help="rate-limit: packets per second")
    ad.add_argument("--bps", type=_positive, default=None, help="rate-limit: bytes per second")
    ad.add_argument(
        "--burst",
        type=int,
        default=0,
        metavar="N",
        help="rate-limit: packets (with --pps) or bytes (with --bps) allowed at once",
    )
    ad.add_argument("--dry-run", action="store_true", help="this rule only counts, even in enforce mode")
    ad.add_argument(
        "--no-export",
        action="store_true",
        help="pass rules: the flows the rule matches are not exported either (a trusted backup stream, say)",
    )
    ad.set_defaults(func=run_add)

    de = sub.add_parser("del", help="remove rules by slot (the SLOT column of list)")
    de.add_argument("slots", nargs="+", type=int, metavar="SLOT")
    de.set_defaults(func=run_del)

    fl = sub.add_parser("flush", help="remove every rule")
    fl.set_defaults(func=run_flush)

    mo = sub.add_parser("mode", help="show or set the mode: off, dry-run (default), enforce")
    mo.add_argument("mode", nargs="?", choices=("off", "dry-run", "enforce"))
    mo.set_defaults(func=run_mode)

    ki = sub.add_parser("kill", help="kill switch: every action becomes pass from the next packet")
    ki.add_argument("--off", action="store_true", help="release the kill switch")
    ki.set_defaults(func=run_kill)

    up = sub.add_parser("unpin", help="remove the pinned maps (rules die with the last agent using them)")
    up.set_defaults(func=run_unpin)


def _table(a):
    from xdpml.datapath.pins import open_pinned
    from xdpml.datapath.rules import RuleTable

    return RuleTable(open_pinned(a.pin_dir), lock_path=a.pin_dir)


def _fmt_expires(s: float) -> str:
    if s <= 0:
        return "expired"
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.0f}m"
    return f"{s / 3600:.1f}h"


def run_list(a) -> int:
    from xdpml.datapath.rules import PROTO_NAMES

    t = _table(a)
    try:
        mode, killed, rows = t.mode(), t.killed(), t.rows()
    finally:
        t.maps.close()
    if a.json:
        for r in rows:
            d = r.as_dict()
            d["mode"] = "dry-run" if r.dry_run else mode
            d["killed"] = killed
            print(json.dumps(d, separators=(",", ":")))
        return 0
    head = ("SLOT", "SRC", "DST", "SPORT", "DPORT", "PROTO", "ACTION", "HITS", "BYTES", "DROPPED", "EXPIRES", "MODE")
    body = []
    for r in rows:
        body.append(
            (
                str(r.slot),
                r.src,
                r.dst,
                str(r.src_port or "*"),
                str(r.dst_port or "*"),
                PROTO_NAMES.get(r.proto, str(r.proto)) if r.proto else "*",
                r.action + ("" if r.both_ways or r.kind != "exact" else " (one-way)"),
                str(r.hits),
                str(r.bytes),
                str(r.dropped),
                _fmt_expires(r.expires_in_s),
                "dry-run" if r.dry_run else mode,
            )
        )
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    for line in (head, *body):
        print("  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip())
    print(
        f"# mode {mode}{', KILL SWITCH ON: every action is pass' if killed else ''}; {len(rows)} rules", file=sys.stderr
    )
    return 0


def run_add(a) -> int:
    from xdpml.datapath.rules import Rule

    if a.src and a.dst and "/" not in a.src + a.dst:
        kind = "exact"
    elif a.src and not a.dst:
        kind = "src"
    elif a.dst and not a.src:
        kind = "dst"
    else:
        raise ConfigError(
            "give --src and --dst addresses (an exact 5-tuple rule), or one of --src/--dst "
            "as an address or CIDR (a prefix rule)"
        )
    if kind == "exact" and (a.sport == 0 or a.dport == 0) and a.proto in (6, 17):
        raise ConfigError("an exact TCP/UDP rule needs --sport and --dport")
    if a.action == "rate-limit" and a.pps is None and a.bps is None:
        raise ConfigError("--action rate-limit needs --pps or --bps")
    rule = Rule(
        kind=kind,
        action=a.action,
        ttl_s=a.ttl,
        src=a.src,
        dst=a.dst,
        src_port=a.sport,
        dst_port=a.dport,
        proto=a.proto,
        both_ways=not a.one_way,
        pps=a.pps or 0.0,
        bps=a.bps or 0.0,
        burst_packets=a.burst if a.pps else 0,
        burst_bytes=a.burst if a.bps and not a.pps else 0,
        dry_run=a.dry_run,
        no_export=a.no_export,
    )
    t = _table(a)
    try:
        slot = t.add(rule)
        mode = t.mode()
    finally:
        t.maps.close()
    print(f"rule {slot} added ({a.action}, expires in {a.ttl:g}s, mode {mode})")
    return 0


def run_del(a) -> int:
    t = _table(a)
    missing = []
    try:
        for slot in a.slots:
            if not t.delete(slot):
                missing.append(slot)
    finally:
        t.maps.close()
    if missing:
        raise ConfigError(f"no rule in slot {', '.join(map(str, missing))} (see `xdpml rules list`)")
    print(f"deleted {len(a.slots)} rule(s)")
    return 0


def run_flush(a) -> int:
    t = _table(a)
    try:
        n = t.flush()
    finally:
        t.maps.close()
    print(f"deleted {n} rule(s)")
    return 0


def run_mode(a) -> int:
    t = _table(a)
    try:
        if a.mode:
            t.set_mode(a.mode)
        print(t.mode())
    finally:
        t.maps.close()
    return 0


def run_kill(a) -> int:
    t = _table(a)
    try:
        t.set_kill(not a.off)
    finally:
        t.maps.close()
    print("kill switch off: rules act again" if a.off else "kill switch on: every action is pass")
    return 0


def run_unpin(a) -> int:
    from xdpml.datapath.pins import unpin

    removed = unpin(a.pin_dir)
    print(f"removed {len(removed)} pinned map(s) from {a.pin_dir}")
    return 0


# ---------------------------------------------------------------------------
# `xdpml agent` options and wiring


def add_enforce_arguments(p: argparse.ArgumentParser) -> None:
    d = EnforceSettings()
    g = p.add_argument_group("enforcement (docs/enforcement.md)")
    g.add_argument(
        "--pin-dir",
        default=d.pin_dir,
        help="bpffs directory for the rule maps, so rules outlive a restart until they expire; "
        "'' = not pinned (default: %(default)s)",
    )
    g.add_argument(
        "--enforce-mode",
        choices=("off", "dry-run", "enforce"),
        default="",
        help="set the mode at start; enforce needs mutual TLS to the collector "
        "(default: keep the pinned maps' mode; fresh maps are dry-run)",
    )
    g.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="CIDR",
        help="operator allowlist entry no rule may touch (repeatable); node addresses, gateway, "
        "DNS, API server, collector and link-local are always in it",
    )
    g.add_argument(
        "--max-rules",
        type=int,
        default=d.max_rules,
        metavar="N",
        help="rules made from verdicts at most (default: %(default)s)",
    )
    g.add_argument(
        "--max-rule-ttl",
        type=_positive,
        default=d.max_ttl_s,
        metavar="S",
        help="longer verdict TTLs are clamped to this (default: %(default)s)",
    )
    g.add_argument(
        "--rule-ttl",
        type=_positive,
        default=d.default_ttl_s,
        metavar="S",
        help="TTL of a rule whose verdict gives none (default: %(default)s)",
    )
    g.add_argument(
        "--max-installs-per-s",
        type=_positive,
        default=d.max_installs_per_s,
        metavar="N",
        help="rules installed from verdicts per second at most (default: %(default)s)",
    )


def enforce_settings_from_args(a) -> EnforceSettings:
    return EnforceSettings(
        pin_dir=a.pin_dir,
        max_rules=a.max_rules,
        max_ttl_s=a.max_rule_ttl,
        default_ttl_s=min(a.rule_ttl, a.max_rule_ttl),
        max_installs_per_s=a.max_installs_per_s,
    )


class AgentEnforcement:
    """What `xdpml agent` adds for enforcement: a recent-exports sink, the verdict
    callback, and the manager, started once the datapath is attached."""

    def __init__(self, a, settings: EnforceSettings, telemetry=None):
        from xdpml.agent.enforce.setup import EnforceOptions, build_manager

        self.mode = a.enforce_mode
        mtls = bool(getattr(a, "tls_ca", None) and getattr(a, "tls_cert", None) and getattr(a, "tls_key", None))
        self.opts = EnforceOptions(
            collector=a.collector or "", mutual_tls=mtls, operator_allow=a.allow, mode=a.enforce_mode
        )
        if self.mode == "enforce" and not mtls:
            raise ConfigError(
                "--enforce-mode enforce needs mutual TLS to the collector (--tls-ca, --tls-cert, "
                "--tls-key): verdicts that can drop traffic must be authenticated"
            )
        self.manager = build_manager(settings, self.opts, telemetry=telemetry)

    def wrap(self, sink):
        """The collector sink, remembering what it exported (verdicts must name such a flow)."""
        return self.manager.recent.wrap(sink)

    def on_verdicts(self, vb) -> None:
        self.manager.on_verdicts(vb)

    def on_attached(self, dp) -> None:
        self.manager.attach(dp.rule_table(), mode=self.mode, counters=dp.counters)

    def close(self) -> None:
        self.manager.close()
