"""The exporter's verdict handling: check what the collector sends back, count it, pass it on.

A verdict whose ``action`` is not a value of the ``Action`` enum this agent knows (a
newer collector, or a hostile one) is counted in ``verdicts_unknown_action`` and
left out; the rest of its batch is still applied. Consumers therefore only ever see
known actions, and a consumer that fails costs its batch, never the stream.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from xdpml.agent.export.accounting import LogBackoff

from xdpml.wire.v1 import collector_pb2 as cpb

log = logging.getLogger("xdpml.agent.export.grpc_client")

KNOWN_ACTIONS = frozenset(cpb.Action.values())


def known_verdicts(vb: cpb.VerdictBatch) -> tuple[cpb.VerdictBatch, int]:
    """``vb`` without the verdicts whose action is unknown, and how many those were."""
    bad = [i for i, v in enumerate(vb.verdicts) if v.action not in KNOWN_ACTIONS]
    if not bad:
        return vb, 0
    clean = cpb.VerdictBatch()
    clean.CopyFrom(vb)
    for i in reversed(bad):
        del clean.verdicts[i]
    return clean, len(bad)


class VerdictHandler:
    """Counts verdict batches into the exporter's counters (caller holds its lock for
    :meth:`count_locked`) and hands the known verdicts to ``callback``."""

    def __init__(self, callback: Callable[[cpb.VerdictBatch], None] | None) -> None:
        self.callback = callback
        self._log = LogBackoff("verdict batches from the collector", level=logging.INFO)
        self._unknown_log = LogBackoff("verdicts with an unknown action skipped")

    def check(self, vb: cpb.VerdictBatch) -> tuple[cpb.VerdictBatch, int]:
        return known_verdicts(vb)

    @staticmethod
    def count_locked(counters, vb: cpb.VerdictBatch, unknown: int) -> None:
        counters["verdict_batches"] += 1
        counters["verdicts_received"] += len(vb.verdicts)
        counters["verdicts_unknown_action"] += unknown

    def deliver(self, vb: cpb.VerdictBatch, unknown: int) -> None:
        if unknown:
            self._unknown_log.event(
                f"{unknown} in batch {vb.sequence} (model {vb.model.name}); {len(vb.verdicts)} applied"
            )
        self._log.event(
            f"latest: {len(vb.verdicts)} flagged flows in batch {vb.sequence}, model "
            f"{vb.model.name} {vb.model.version}, threshold {vb.threshold:g}"
        )
        if self.callback is not None:
            try:
                self.callback(vb)
            except Exception as exc:
                log.error("verdict callback failed on batch %d: %s: %s", vb.sequence, type(exc).__name__, exc)


def verdict_counter(telemetry):
    """A verdict callback: flagged flows logged, every verdict counted by label and action
    (``xdpml.agent.verdicts``). Acting on them (drop rules) is not done yet."""

    def on_verdicts(vb: cpb.VerdictBatch) -> None:
        counts: dict[tuple[str, str], int] = {}
        for v in vb.verdicts:
            action = cpb.Action.Name(v.action).lower() if v.action in KNOWN_ACTIONS else "unknown"
            key = (v.label or "unknown", action)
            counts[key] = counts.get(key, 0) + 1
        flagged = sum(n for (label, _), n in counts.items() if label not in ("normal", "unknown"))
        if flagged:
            log.info("collector flagged %d of %d flows (model %s)", flagged, len(vb.verdicts), vb.model.name)
        if telemetry is not None:
            c = telemetry.counter("xdpml.agent.verdicts")
            for (label, action), n in counts.items():
                c.add(n, {"label": label, "action": action})

    return on_verdicts
