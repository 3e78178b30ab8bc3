"""``xdpml score FILE``: score exported flows offline and show the rules they would make.

FILE holds flow records as JSON lines (the agent's ``-o`` output, the collector's
``--jsonl``) or Parquet (the collector's ``--parquet``). The model and the verdict
policy take the collector's options (``--model``, ``--threshold``, ``--policy``,
``--action``...). Every flagged flow whose action is drop or rate-limit becomes one
rule (one per 5-tuple, the highest score first). ``--apply`` installs them into the
pinned maps (``--pin-dir``) through the agent's own checks: the allowlist of this host
plus ``--allow``, the limits, the maps' mode. What is refused is shown with its reason.
Early snapshots (expiration id 3) are scored like the final records.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

KEY_COLUMNS = ("src_ip", "dst_ip", "src_port", "dst_port", "protocol")
DEFAULT_ACTION = "drop"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from xdpml.cli.collector import add_model_arguments
    from xdpml.config import EnforceSettings

    d = EnforceSettings()
    p.add_argument("file", metavar="FILE", help="flow records: JSON lines, or Parquet (.parquet)")
    add_model_arguments(p.add_argument_group("model (as `xdpml collector`)"), live_learning=False)
    g = p.add_argument_group("verdict policy (as `xdpml collector`)")
    g.add_argument("--policy", metavar="FILE", help="YAML policy file")
    g.add_argument(
        "--action",
        choices=("allow", "alert", "rate-limit", "drop"),
        default=None,
        help=f"action of the default rule (default {DEFAULT_ACTION} here: these are rules to make)",
    )
    g.add_argument("--verdict-ttl", type=int, default=None, metavar="S", help="TTL of the default rule's rules")
    g = p.add_argument_group("output and --apply")
    g.add_argument("--json", action="store_true", help="one JSON object per rule instead of a table")
    g.add_argument("--apply", action="store_true", help="install the rules into the pinned maps (root)")
    g.add_argument("--pin-dir", default=d.pin_dir, help="pinned rule maps (default %(default)s)")
    g.add_argument("--allow", action="append", default=[], metavar="CIDR", help="also allowlist this (repeatable)")
    g.add_argument("--max-rules", type=int, default=d.max_rules, help="limit (default %(default)s)")
    g.add_argument(
        "--max-rule-ttl", type=float, default=d.max_ttl_s, help="longer TTLs are clamped (default %(default)s)"
    )
    g.add_argument(
        "--max-installs-per-s", type=float, default=d.max_installs_per_s, help="install rate (default %(default)s)"
    )


def _fail(msg: str):
    from xdpml.errors import ConfigError

    raise ConfigError(msg)


def read_flows(path: str, features: list[str]):
    """The flow records of FILE as a ColumnBatch (16-byte addresses, numeric features)."""
    from xdpml.cli.collector import flow_lines, read_flow_table
    from xdpml.wire.columns import ColumnBatch, ip_from_str

    rows: dict[str, list] = {}
    need = list(dict.fromkeys(KEY_COLUMNS + tuple(features)))
    if path.endswith(".parquet"):
        t = read_flow_table(path, need)
        for n in need + (["expiration_id"] if "expiration_id" in t.column_names else []):
            rows[n] = t.column(n).to_pylist()
    else:
        for lineno, row in flow_lines(path):
            missing = [n for n in need if n not in row]
            if missing:
                _fail(f"{path}:{lineno}: no {', '.join(missing)}: not a flow record")
            for n in need:
                rows.setdefault(n, []).append(row[n])
    if not rows or not rows[need[0]]:
        _fail(f"{path} holds no flow records")
    cols: dict[str, np.ndarray] = {}
    for n in ("src_ip", "dst_ip"):
        try:
            cols[n] = np.array([ip_from_str(str(v)) for v in rows[n]], dtype="S16")
        except ValueError as e:
            _fail(f"{path}: {n}: {e}")
    for n, dt in (("src_port", np.uint16), ("dst_port", np.uint16), ("protocol", np.uint8)):
        try:
            cols[n] = np.array(rows[n], dtype=np.int64).astype(dt)
        except (TypeError, ValueError):
            _fail(f"{path}: {n} holds a value that is not an integer")
    for n in features:
        if n in cols:
            continue
        try:
            cols[n] = np.array([np.nan if v is None else v for v in rows[n]], dtype=np.float64)
        except (TypeError, ValueError):
            _fail(f"{path}: {n} holds a value that is not a number")
    return ColumnBatch("flow", cols)


def make_rules(batch, score, decision) -> list[dict]:
    """One rule per flagged 5-tuple whose action makes a rule, highest score first."""
    from xdpml.collector.policy import ACTION_NAMES
    from xdpml.wire.columns import ip_to_str

    out: dict[tuple, dict] = {}
    for i in np.flatnonzero(decision.flagged):
        action = ACTION_NAMES[int(decision.action[i])]
        if action not in ("drop", "rate-limit"):
            continue
        key = tuple(batch[n][i].item() if n not in ("src_ip", "dst_ip") else bytes(batch[n][i]) for n in KEY_COLUMNS)
        r = {
            "src": ip_to_str(key[0]),
            "dst": ip_to_str(key[1]),
            "sport": int(key[2]),
            "dport": int(key[3]),
            "proto": int(key[4]),
            "action": action,
            "ttl_s": int(decision.ttl_seconds[i]),
            "score": round(float(score[i]), 6),
            "_key": key,
            "_action": int(decision.action[i]),
        }
        if key not in out or r["score"] > out[key]["score"]:
            out[key] = r
    return sorted(out.values(), key=lambda r: -r["score"])


def apply_rules(rules: list[dict], a) -> None:
    """Through the agent's RuleManager: allowlist, limits, mode of the pinned maps."""
    from xdpml.agent.enforce.manager import Channel, RecentFlows, RuleManager
    from xdpml.agent.enforce.setup import host_allowlist
    from xdpml.config import EnforceSettings
    from xdpml.datapath.pins import open_pinned
    from xdpml.datapath.rules import RuleTable
    from xdpml.wire.v1 import collector_pb2 as cpb

    settings = EnforceSettings(
        pin_dir=a.pin_dir,
        max_rules=a.max_rules,
        max_ttl_s=a.max_rule_ttl,
        default_ttl_s=min(EnforceSettings().default_ttl_s, a.max_rule_ttl),
        max_installs_per_s=a.max_installs_per_s,
    )
    settings.validate()
    allow = host_allowlist(operator=a.allow)
    recent = RecentFlows(capacity=max(1, len(rules)), ttl_s=3600)
    for r in rules:
        recent.add(*r["_key"])  # the flows of FILE are the ones these rules may name
    table = RuleTable(open_pinned(a.pin_dir), lock_path=a.pin_dir)
    # the operator runs this as root on the pinned maps, as `xdpml rules add`: trusted
    man = RuleManager(
        settings, channel=Channel(authenticated=True, description="xdpml score --apply"), allowlist=allow, recent=recent
    )
    man.table = table  # the kernel's allowlist stays the agent's; this one is checked at install
    man.adopt_live_rules()  # a rule for the same flow already there: duplicate
    mode = table.mode()
    for r in rules:
        before = dict(man.stats.refused)
        k = cpb.FlowKey(
            src_ip=r["_key"][0],
            dst_ip=r["_key"][1],
            src_port=r["_key"][2],
            dst_port=r["_key"][3],
            protocol=r["_key"][4],
        )
        slot = man.consider(cpb.Verdict(key=k, action=r["_action"], ttl_seconds=r["ttl_s"]), mode=mode)
        if slot:
            r["result"] = f"installed (slot {slot}, mode {mode})"
        else:
            reason = next((k for k, v in man.stats.refused.items() if v > before.get(k, 0)), "refused")
            r["result"] = f"refused: {reason}"


def run(a) -> int:
    from xdpml.collector.models import load_model
    from xdpml.collector.policy import Policy, load_policy, with_overrides

    features = [f.strip() for f in a.features.split(",") if f.strip()] if a.features else None
    policy = with_overrides(
        load_policy(a.policy) if a.policy else Policy(),
        action=a.action or (None if a.policy else DEFAULT_ACTION),
        threshold=a.threshold,
        ttl_seconds=a.verdict_ttl,
        dry_run=False,
    )
    model = load_model(
        a.model, state_dir=a.state_dir, baseline_rows=5000, features=features, trees=a.trees, baseline_file=a.baseline
    )
    try:
        batch = read_flows(a.file, list(model.feature_names))
        out = model.score(batch)
    finally:
        model.close()
    score = np.asarray(out.score, dtype=np.float64)
    if np.isnan(score).all():
        _fail(f"the {model.name} model scored none of the {len(batch)} flows (no baseline yet? see --baseline)")
    base = a.threshold if a.threshold is not None else model.default_threshold
    decision = policy.decide(model.name, score, out.label, base)
    rules = make_rules(batch, score, decision)
    if a.apply and rules:
        apply_rules(rules, a)
    show(rules, a.json, flows=len(batch), flagged=int(decision.flagged.sum()))
    return 0


def show(rules: list[dict], as_json: bool, *, flows: int, flagged: int) -> None:
    print(f"{flows} flows scored, {flagged} flagged, {len(rules)} rules", file=sys.stderr)
    if as_json:
        for r in rules:
            print(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}))
        return
    cols = ["SRC", "DST", "SPORT", "DPORT", "PROTO", "ACTION", "TTL", "SCORE"]
    applied = any("result" in r for r in rules)
    if applied:
        cols.append("RESULT")
    lines = [cols]
    for r in rules:
        row = [r["src"], r["dst"], str(r["sport"]), str(r["dport"]), str(r["proto"]), r["action"], str(r["ttl_s"])]
        row.append(f"{r['score']:.3f}")
        if applied:
            row.append(r.get("result", ""))
        lines.append(row)
    widths = [max(len(line[i]) for line in lines) for i in range(len(cols))]
    for line in lines:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())
