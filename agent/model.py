"""The agent's model slots: set up once the datapath is compiled, pinned for
`xdpml model`, loaded from the configured file and reloaded when it changes.

Compiled in only when ``ModelSettings.enabled`` (--model-slots / --model FILE, or the
AgentConfig's ``spec.model``). The slots are pinned under ``<pin dir>/model`` so the
CLI reaches a running agent without recompiling or re-attaching; the pins go when
the agent stops (the maps die with the program). A model file that fails to compile
is logged and the running model stays.
"""

from __future__ import annotations

import json
import logging
import os
import threading

import numpy as np

from xdpml.config import ModelSettings
from xdpml.errors import XdpmlError
from xdpml.models import kernel
from xdpml.models import layout as L
from xdpml.wire.columns import ColumnBatch, ColumnSpec

log = logging.getLogger(__name__)

LIMITS = L.DEFAULT_LIMITS  # what the agent compiles the slots with (docs/models.md)


def model_limits(settings: ModelSettings) -> L.Limits | None:
    return LIMITS if settings.enabled else None


# Record kind "decision" (collector/wire_schema.py DECISION, docs/wire-format.md): one
# sampled decision of the kernel's model; its inputs follow as x_<feature> int64 columns.
DECISION_SPECS = {
    c.name: c
    for c in [
        ColumnSpec("timestamp_ns", "u8", "ns", "Unix time of the decision", "time"),
        ColumnSpec("lo_ip", "S16", "", "the flow key's lower address (IPv4 mapped)", "key"),
        ColumnSpec("hi_ip", "S16", "", "the flow key's higher address", "key"),
        ColumnSpec("lo_port", "u2", "", "port of lo_ip", "key"),
        ColumnSpec("hi_port", "u2", "", "port of hi_ip", "key"),
        ColumnSpec("protocol", "u1", "", "IP protocol number", "key"),
        ColumnSpec("ifindex", "u4", "", "interface index the packet was classified on", "key"),
        ColumnSpec("model_id", "u4", "", "the model's id (xdpml model show)", "meta"),
        ColumnSpec("class", "i4", "", "the class index the kernel chose", "meta"),
        ColumnSpec("action", "O", "", "the class's action: pass, alert, drop or rate-limit", "meta"),
        ColumnSpec("dropped", "?", "", "the packet was dropped", "meta"),
    ]
}


def decision_batch(ev: np.ndarray, names: list[str], mono_to_unix_ns: int) -> ColumnBatch:
    """Model events of one model -> a "decision" ColumnBatch (inputs as x_<name>, int64)."""
    from xdpml.models.layout import ACTIONS

    acts = {v: k for k, v in ACTIONS.items()}
    key = ev["key"]
    cols: dict[str, np.ndarray] = {
        "timestamp_ns": (ev["ts_ns"].astype(np.int64) + mono_to_unix_ns).astype(np.uint64),
        "lo_ip": np.ascontiguousarray(key["lo_ip"]).view("S16").reshape(-1).copy(),
        "hi_ip": np.ascontiguousarray(key["hi_ip"]).view("S16").reshape(-1).copy(),
        "lo_port": key["lo_port"].astype(np.uint16),
        "hi_port": key["hi_port"].astype(np.uint16),
        "protocol": key["proto"].astype(np.uint8),
        "ifindex": key["ifindex"].astype(np.uint32),
        "model_id": ev["model_id"].astype(np.uint32),
        "class": ev["cls"].astype(np.int32),
        "action": np.array([acts.get(int(a), str(int(a))) for a in ev["action"]], dtype=object),
        "dropped": ev["dropped"].astype(bool),
    }
    specs = dict(DECISION_SPECS)
    x = ev["x"]
    for i, n in enumerate(names):
        cols[f"x_{n}"] = x[:, i].astype(np.int64)
        specs[f"x_{n}"] = ColumnSpec(f"x_{n}", "i8", "", f"model input {n} as the kernel computed it")
    return ColumnBatch("decision", cols, specs)


def _ip(raw: bytes) -> str:
    import ipaddress

    a = ipaddress.IPv6Address(raw)
    return str(a.ipv4_mapped or a)  # the flow key holds IPv4 as ::ffff:a.b.c.d


class AgentModel:
    def __init__(self, dp, settings: ModelSettings, *, pin_dir: str, emit=None, mono_to_unix_ns: int = 0):
        self.slots = kernel.ModelSlots.of(dp.bpf, dp.model_limits)
        self.pin_dir = pin_dir
        self.settings = settings
        self._stamp: tuple | None = None  # (mtime, size) of the file last loaded
        self.last_error = ""  # why the last load failed, "" if it did not
        if pin_dir:
            d = kernel.pin(self.slots, pin_dir)
            self.slots.lock_dir = d
            log.info("model slots pinned at %s (`xdpml model load|show|swap|unload`)", d)
        else:
            log.warning("no --pin-dir: the model slots are not pinned, `xdpml model` cannot reach them")
        self._events = None
        self._out = None
        self._out_path = ""
        self._bpf = dp.bpf
        self._emit = emit  # the pipeline's sinks: "decision" batches to the collector (decisions_to_collector)
        self._offset_ns = mono_to_unix_ns
        self.decisions = 0  # decision records taken from the kernel (written to the file and/or emitted)
        # the version of the last model the collector pushed and this node loaded: in the
        # datapath's model_push map, pinned with the rules (so it outlives a restart)
        self._push_map = dp.bpf[b"model_push"]
        self._pushed_here = 0  # ... and the version this agent process loaded (0: none yet)
        self._push_lock = threading.Lock()
        self._set_decisions(settings)
        if settings.file:
            self.load(settings.file, settings.features, settings.actions)

    def _set_decisions(self, settings: ModelSettings) -> None:
        """Sampled decisions at 1 in ``sample_every`` to ``decisions_file`` and/or, with
        ``decisions_to_collector``, to the collector as "decision" records (live: a new
        file is opened; with neither, the sampling is off)."""
        if self._out is not None and settings.decisions_file != self._out_path:
            self._write_decisions()
            self._out.close()
            self._out, self._out_path = None, ""
        if not settings.sampling:
            if self._events is not None:
                self._write_decisions()  # what was sampled before the change still goes out
                self.slots.set_sampling(0)
            return
        if self._events is None:
            from xdpml.agent.events import RecordBuffer

            self._events = RecordBuffer(self._bpf, "model_events", kernel.event_type(self.slots.limits))
        if self._out is None and settings.decisions_file:
            self._out = open(settings.decisions_file, "a", buffering=1)
            self._out_path = settings.decisions_file
        self.slots.set_sampling(settings.sample_every)
        where = [
            w
            for w, on in (
                (settings.decisions_file, bool(settings.decisions_file)),
                ("the collector", settings.decisions_to_collector),
            )
            if on
        ]
        log.info("model decisions: 1 in %d to %s (class, action, inputs)", settings.sample_every, " and ".join(where))

    def _file_stamp(self, path: str) -> tuple | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def load(self, path: str, features: list[str], actions: dict[str, str] | None = None, *, source: str = "") -> bool:
        from xdpml.models.cli_commands import compile_file

        name = source or path
        stamp = self._file_stamp(path)
        try:
            m = compile_file(path, features, self.slots.limits)
            slot = self.slots.swap(m.pack(self.slots.limits, actions=actions))
        except XdpmlError as exc:
            log.error("model %s not loaded (the running model stays): %s", name, exc)
            self._stamp = stamp  # do not retry the same file every scan
            self.last_error = str(exc)
            return False
        self._stamp = stamp
        self.last_error = ""
        log.info(
            "model %s (%s, %d features) loaded into slot %d, model %d",
            name,
            m.estimator,
            m.n_features,
            slot,
            int(self.slots.read_slot(slot)["model_id"]),
        )
        return True

    def load_bytes(
        self, data: bytes, suffix: str, source: str, features: list[str], actions: dict[str, str] | None = None
    ) -> bool:
        """A model handed over as bytes (a ConfigMap's key, a pushed model): written to a
        private temporary file named ``*<suffix>`` and loaded like a file; ``source``
        names it in the logs. False (logged, the running model stays) if it does not load."""
        import tempfile

        fd, path = tempfile.mkstemp(prefix="xdpml-model-", suffix=suffix)
        watched = self._stamp
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            ok = self.load(path, features, actions, source=source)
        finally:
            os.unlink(path)
        # not a watched file: the configured file (if any) is reloaded only when it changes
        self._stamp = watched
        return ok

    @property
    def pushed_version(self) -> int:
        """The newest pushed version this node loaded (0: none), kept in the pinned
        model_push map: a restarted agent with the same --pin-dir still refuses older ones
        (and loads that version itself again, as the collector pushes it on reconnecting)."""
        import ctypes as C

        return int(self._push_map[C.c_uint32(0)].value)

    def _set_pushed_version(self, version: int) -> None:
        import ctypes as C

        self._push_map[C.c_uint32(0)] = C.c_uint64(version)

    def push(self, signed: bytes) -> str:
        """A signed model from the collector (ExportResponse.model): verified against the
        trusted keys, refused unless newer than the last pushed version, then loaded with
        the configured actions. Returns the outcome (xdpml.agent.model.updates ``result``):
        loaded, bad_signature, untrusted, stale, invalid or disabled; on anything but
        loaded the running model stays."""
        from xdpml.models import signing

        with self._push_lock:
            s = self.settings
            if not s.trusted_keys:
                log.warning("pushed model refused: no trusted keys (--model-trusted-key / spec.model.trustedKeys)")
                return "disabled"
            try:
                m, body = signing.verify(signed, [signing.load_public_key(k) for k in s.trusted_keys])
            except signing.SignatureRefused as exc:
                log.warning("pushed model refused (the running model stays): %s", exc)
                return exc.reason
            except XdpmlError as exc:
                log.warning("pushed model refused (the running model stays): %s", exc)
                return "invalid"
            # versions only go up: older than the node's newest is a rollback (or a replay
            # after a restart); the node's newest itself loads again once after a restart
            newest = self.pushed_version
            if m.version < newest or m.version <= self._pushed_here:
                log.info(
                    "pushed model %s v%d refused: this node loaded v%d already (versions only go up)",
                    m.name,
                    m.version,
                    max(newest, self._pushed_here),
                )
                return "stale"
            if not self.load_bytes(body, ".xdpml", f"collector push {m.name} v{m.version}", [], s.actions):
                return "invalid"
            self._set_pushed_version(m.version)
            self._pushed_here = m.version
            return "loaded"

    def apply(self, settings: ModelSettings) -> None:
        """A live change of the configured model (the slots stay compiled in)."""
        old, self.settings = self.settings, settings
        if (settings.decisions_file, settings.sample_every, settings.decisions_to_collector) != (
            old.decisions_file,
            old.sample_every,
            old.decisions_to_collector,
        ):
            self._set_decisions(settings)
        if settings.file:
            if settings.file != old.file or settings.features != old.features or settings.actions != old.actions:
                self.load(settings.file, settings.features, settings.actions)
        elif settings.config_map:
            pass  # the bytes come from the ConfigMap's watch (KubernetesAgent), loaded with load_bytes
        elif old.file or old.config_map:
            self.slots.unload()
            log.info("model unloaded (no model file or ConfigMap configured)")

    def _inputs_of(self, mid: int, n: int) -> list[str]:
        """The input names of the slot holding model ``mid`` (x0.. if it is gone)."""
        from xdpml.models.features import FEATURES

        for i in (0, 1):
            v = self.slots.read_slot(i)
            if int(v["model_id"]) == mid and v["kind"]:
                return [FEATURES[int(f)].name for f in v["feat_id"][: int(v["n_features"])]]
        return [f"x{i}" for i in range(n)]

    def _write_decisions(self) -> None:
        self._bpf.ring_buffer_consume()
        ev = self._events.take()
        if not len(ev):
            return
        names_of: dict[int, list[str]] = {}
        for mid in np.unique(ev["model_id"]):
            sel = ev[ev["model_id"] == mid]
            names_of[int(mid)] = self._inputs_of(int(mid), int(sel["n_features"].max()))
        if self._out is not None:
            self._write_jsonl(ev, names_of)
        if self.settings.decisions_to_collector and self._emit is not None:
            for mid, names in names_of.items():
                self._emit(decision_batch(ev[ev["model_id"] == mid], names, self._offset_ns))
        self.decisions += len(ev)

    def _write_jsonl(self, ev, names_of: dict[int, list[str]]) -> None:
        from xdpml.models.layout import ACTIONS

        acts = {v: k for k, v in ACTIONS.items()}
        for e in ev:
            mid = int(e["model_id"])
            k = e["key"]
            names = names_of[mid]
            rec = {
                "ts_ns": int(e["ts_ns"]),
                "lo_ip": _ip(bytes(k["lo_ip"])),
                "hi_ip": _ip(bytes(k["hi_ip"])),
                "lo_port": int(k["lo_port"]),
                "hi_port": int(k["hi_port"]),
                "protocol": int(k["proto"]),
                "ifindex": int(k["ifindex"]),
                "model_id": mid,
                "class": int(e["cls"]),
                "action": acts.get(int(e["action"]), str(int(e["action"]))),
                "dropped": bool(e["dropped"]),
                "features": {n: int(x) for n, x in zip(names, e["x"][: len(names)])},
            }
            self._out.write(json.dumps(rec, separators=(",", ":")) + "\n")

    def poll(self) -> None:
        """Write sampled decisions; reload the configured file when it changed (a
        ConfigMap volume is updated in place)."""
        if self._events is not None:
            self._write_decisions()
        if self.settings.file:
            stamp = self._file_stamp(self.settings.file)
            if stamp is not None and stamp != self._stamp:
                self.load(self.settings.file, self.settings.features, self.settings.actions)

    def close(self) -> None:
        if self._events is not None:
            self._write_decisions()
            if self._out is not None:
                self._out.close()
                self._out = None
            self._events = None
        if self.pin_dir:
            try:
                kernel.unpin(self.slots, self.pin_dir)
            except OSError as exc:
                log.warning("model pins under %s not removed: %s", self.pin_dir, exc)
