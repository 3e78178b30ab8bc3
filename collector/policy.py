"""The verdict policy: from a model's scores to the actions the collector suggests.

A policy is a default rule and optional rules per model and/or class (label). Each
rule has a ``threshold`` (a row is flagged when ``score >= threshold``), a
``min_confidence`` (below it a flagged row only gets ALERT, whatever the rule's
action), an ``action`` (allow, alert, rate-limit, drop) and a ``ttl_seconds`` for the
rule an agent makes of the verdict. The most specific rule wins: model and class,
then class, then model, then the default.

Safe by default: the default rule is ``alert``; DROP and RATE_LIMIT appear only where
the operator wrote them. In dry-run (``dry_run: true`` or ``--dry-run``) every DROP and
RATE_LIMIT is sent as ALERT, with the policy's choice in ``Verdict.policy_action`` and
``VerdictBatch.dry_run`` set, so what enforcement would do is visible without it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from xdpml.errors import ConfigError
from xdpml.wire.v1 import collector_pb2 as cpb

ACTIONS = {
    "allow": cpb.ACTION_ALLOW,
    "alert": cpb.ACTION_ALERT,
    "rate-limit": cpb.ACTION_RATE_LIMIT,
    "drop": cpb.ACTION_DROP,
}
ACTION_NAMES = {v: k for k, v in ACTIONS.items()}
DEFAULT_TTL_S = 300
MAX_TTL_S = 86400  # a verdict is a suggestion about a flow, not a standing rule
# The class a row is matched as when the model gives no labels (a score-only model).
ANOMALY = "anomaly"
RULE_KEYS = {"model", "class", "threshold", "min_confidence", "action", "ttl_seconds"}
MAX_POLICY_BYTES = 1 << 20


@dataclass(frozen=True)
class Rule:
    action: str = "alert"
    threshold: float | None = None  # None: --threshold, else the model's default
    min_confidence: float | None = None  # None: the rule's action from the threshold on
    ttl_seconds: int = DEFAULT_TTL_S
    model: str | None = None  # None: any model
    cls: str | None = None  # None: any class

    def __post_init__(self) -> None:
        where = self.describe()
        if self.action not in ACTIONS:
            raise ConfigError(f"{where}: action {self.action!r} is not one of {', '.join(ACTIONS)}")
        for name in ("threshold", "min_confidence"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise ConfigError(f"{where}: {name} must be a finite number, not {v!r}")
        if self.threshold is not None and self.min_confidence is not None and self.min_confidence < self.threshold:
            raise ConfigError(
                f"{where}: min_confidence {self.min_confidence:g} is below the threshold "
                f"{self.threshold:g} (it would never apply)"
            )
        t = self.ttl_seconds
        if isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= MAX_TTL_S:
            raise ConfigError(
                f"{where}: ttl_seconds must be a whole number of seconds from 1 to {MAX_TTL_S}, not {t!r}"
            )

    def describe(self) -> str:
        if self.model is None and self.cls is None:
            return "default rule"
        parts = ([f"model {self.model}"] if self.model else []) + ([f"class {self.cls}"] if self.cls else [])
        return "rule for " + ", ".join(parts)


@dataclass
class Decision:
    """Per row of a batch: flagged, and for flagged rows the actions and TTL."""

    flagged: np.ndarray  # bool
    threshold: np.ndarray  # float64, the threshold applied to the row
    policy_action: np.ndarray  # int32, Action values (what the policy chose)
    action: np.ndarray  # int32, what the verdict asks (ALERT instead of DROP/RATE_LIMIT in dry-run)
    ttl_seconds: np.ndarray  # uint32


@dataclass(frozen=True)
class Policy:
    default: Rule = Rule()
    rules: tuple[Rule, ...] = ()
    dry_run: bool = False

    def rule_for(self, model: str, cls: str | None) -> Rule:
        best, rank = self.default, 0
        for r in self.rules:
            if (r.model is not None and r.model != model) or (r.cls is not None and r.cls != cls):
                continue
            k = 3 if r.model and r.cls else 2 if r.cls else 1
            if k > rank:
                best, rank = r, k
        return best

    def decide(self, model: str, score: np.ndarray, labels: np.ndarray | None, base_threshold: float) -> Decision:
        """Apply the policy to one batch's scores. ``labels``: the model's class per row,
        or None (every row is class ``anomaly``). NaN scores are never flagged."""
        n = len(score)
        thr = np.empty(n, dtype=np.float64)
        conf = np.empty(n, dtype=np.float64)
        act = np.empty(n, dtype=np.int32)
        ttl = np.empty(n, dtype=np.uint32)
        classes = np.full(n, ANOMALY, dtype=object) if labels is None else np.asarray(labels, dtype=object).astype(str)
        for cls in np.unique(classes):
            rows = classes == cls
            r = self.rule_for(model, str(cls))
            t = base_threshold if r.threshold is None else r.threshold
            thr[rows] = t
            conf[rows] = t if r.min_confidence is None else max(t, r.min_confidence)
            act[rows] = ACTIONS[r.action]
            ttl[rows] = r.ttl_seconds
        with np.errstate(invalid="ignore"):
            flagged = score >= thr  # NaN compares False
            confident = score >= conf
        chosen = np.where(confident, act, cpb.ACTION_ALERT).astype(np.int32)
        sent = chosen
        if self.dry_run:
            sent = np.where(np.isin(chosen, (cpb.ACTION_DROP, cpb.ACTION_RATE_LIMIT)), cpb.ACTION_ALERT, chosen).astype(
                np.int32
            )
        return Decision(flagged, thr, chosen, sent, ttl)

    def summary(self) -> str:
        """One log line."""
        d = self.default
        out = f"default {d.action}" + (f" at >= {d.threshold:g}" if d.threshold is not None else "")
        out += f", ttl {d.ttl_seconds} s, {len(self.rules)} more rule(s)"
        writes = sorted({r.action for r in (d, *self.rules)} & {"drop", "rate-limit"})
        if writes:
            out += f", may suggest {' and '.join(writes)}"
        return out + (" (DRY RUN: sent as alert)" if self.dry_run and writes else "")


def _rule(raw, where: str, *, default: bool) -> Rule:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of {', '.join(sorted(RULE_KEYS))}")
    allowed = RULE_KEYS - ({"model", "class"} if default else set())
    unknown = sorted(str(k) for k in raw if k not in allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")
    if not default and raw.get("model") is None and raw.get("class") is None:
        raise ConfigError(f"{where}: a rule needs a model or a class (or both); the default rule is 'default:'")
    for k in ("model", "class", "action"):
        if k in raw and raw[k] is not None and not isinstance(raw[k], str):
            raise ConfigError(f"{where}: {k} must be a string, not {raw[k]!r}")
    if "action" not in raw and not default:
        raise ConfigError(f"{where}: action is required ({', '.join(ACTIONS)})")
    try:
        r = Rule(
            action=raw.get("action", "alert"),
            threshold=raw.get("threshold"),
            min_confidence=raw.get("min_confidence"),
            ttl_seconds=raw.get("ttl_seconds", DEFAULT_TTL_S),
            model=raw.get("model"),
            cls=raw.get("class"),
        )
    except ConfigError as e:
        raise ConfigError(f"{where}: {str(e).split(': ', 1)[1]}") from None
    return r


def parse_policy(data, source: str = "policy") -> Policy:
    """A Policy from the parsed YAML/JSON document; ConfigError (one line) otherwise."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with dry_run, default and rules")
    unknown = sorted(str(k) for k in data if k not in ("dry_run", "default", "rules"))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)} (allowed: default, dry_run, rules)")
    dry = data.get("dry_run", False)
    if not isinstance(dry, bool):
        raise ConfigError(f"{source}: dry_run must be true or false, not {dry!r}")
    default = _rule(data.get("default") or {}, f"{source}: default", default=True)
    raw_rules = data.get("rules") or []
    if not isinstance(raw_rules, list):
        raise ConfigError(f"{source}: rules must be a list")
    rules, seen = [], {}
    for i, raw in enumerate(raw_rules):
        r = _rule(raw, f"{source}: rules[{i}]", default=False)
        key = (r.model, r.cls)
        if key in seen:
            raise ConfigError(f"{source}: rules[{i}] has the same model and class as rules[{seen[key]}]")
        seen[key] = i
        rules.append(r)
    return Policy(default, tuple(rules), dry)


def load_policy(path: str) -> Policy:
    """Read a policy file (YAML; JSON is YAML too)."""
    import yaml

    try:
        with open(path, "rb") as f:
            text = f.read(MAX_POLICY_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read policy file {path}: {e.strerror or e}") from None
    if len(text) > MAX_POLICY_BYTES:
        raise ConfigError(f"policy file {path} is larger than {MAX_POLICY_BYTES >> 20} MiB")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"policy file {path} is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    return parse_policy(data, os.path.basename(path))


def with_overrides(
    policy: Policy,
    *,
    action: str | None = None,
    threshold: float | None = None,
    ttl_seconds: int | None = None,
    dry_run: bool | None = None,
) -> Policy:
    """The policy with its default rule's fields (and dry-run) replaced by the flags given."""
    d = policy.default
    default = Rule(
        action=d.action if action is None else action,
        threshold=d.threshold if threshold is None else threshold,
        min_confidence=d.min_confidence,
        ttl_seconds=d.ttl_seconds if ttl_seconds is None else ttl_seconds,
    )
    return Policy(default, policy.rules, policy.dry_run if dry_run is None else dry_run)
