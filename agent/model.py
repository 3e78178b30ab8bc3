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

from xdpml.config import ModelSettings
from xdpml.errors import XdpmlError
from xdpml.models import kernel
from xdpml.models import layout as L

log = logging.getLogger(__name__)

LIMITS = L.DEFAULT_LIMITS  # what the agent compiles the slots with (docs/models.md)


def model_limits(settings: ModelSettings) -> L.Limits | None:
    return LIMITS if settings.enabled else None


def _ip(raw: bytes) -> str:
    import ipaddress

    a = ipaddress.IPv6Address(raw)
    return str(a.ipv4_mapped or a)  # the flow key holds IPv4 as ::ffff:a.b.c.d


class AgentModel:
    def __init__(self, dp, settings: ModelSettings, *, pin_dir: str):
        self.slots = kernel.ModelSlots.of(dp.bpf, dp.model_limits)
        self.pin_dir = pin_dir
        self.settings = settings
        self._stamp: tuple | None = None  # (mtime, size) of the file last loaded
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
        self.decisions = 0  # decision records written
        self._set_decisions(settings)
        if settings.file:
            self.load(settings.file, settings.features, settings.actions)

    def _set_decisions(self, settings: ModelSettings) -> None:
        """Sampled decisions to ``decisions_file`` at 1 in ``sample_every`` (live: a new
        file is opened, an empty one turns the sampling off)."""
        if self._out is not None and settings.decisions_file != self._out_path:
            self._write_decisions()
            self._out.close()
            self._out, self._out_path = None, ""
        if not settings.decisions_file:
            if self._events is not None:
                self.slots.set_sampling(0)
            return
        if self._events is None:
            from xdpml.agent.events import RecordBuffer

            self._events = RecordBuffer(self._bpf, "model_events", kernel.event_type(self.slots.limits))
        if self._out is None:
            self._out = open(settings.decisions_file, "a", buffering=1)
            self._out_path = settings.decisions_file
        self.slots.set_sampling(settings.sample_every)
        log.info(
            "model decisions: 1 in %d to %s (class, action, inputs)", settings.sample_every, settings.decisions_file
        )

    def _file_stamp(self, path: str) -> tuple | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def load(self, path: str, features: list[str], actions: dict[str, str] | None = None) -> bool:
        from xdpml.models.cli_commands import compile_file

        stamp = self._file_stamp(path)
        try:
            m = compile_file(path, features, self.slots.limits)
            slot = self.slots.swap(m.pack(self.slots.limits, actions=actions))
        except XdpmlError as exc:
            log.error("model %s not loaded (the running model stays): %s", path, exc)
            self._stamp = stamp  # do not retry the same file every scan
            return False
        self._stamp = stamp
        log.info(
            "model %s (%s, %d features) loaded into slot %d, model %d",
            path,
            m.estimator,
            m.n_features,
            slot,
            int(self.slots.read_slot(slot)["model_id"]),
        )
        return True

    def apply(self, settings: ModelSettings) -> None:
        """A live change of the configured model (the slots stay compiled in)."""
        old, self.settings = self.settings, settings
        if (settings.decisions_file, settings.sample_every) != (old.decisions_file, old.sample_every):
            self._set_decisions(settings)
        if settings.file:
            if settings.file != old.file or settings.features != old.features or settings.actions != old.actions:
                self.load(settings.file, settings.features, settings.actions)
        elif old.file:
            self.slots.unload()
            log.info("model unloaded (no model file configured)")

    def _write_decisions(self) -> None:
        from xdpml.models.features import FEATURES
        from xdpml.models.layout import ACTIONS

        self._bpf.ring_buffer_consume()
        ev = self._events.take()
        if not len(ev) or self._out is None:
            return
        names_of: dict[int, list[str]] = {}
        acts = {v: k for k, v in ACTIONS.items()}
        for e in ev:
            mid = int(e["model_id"])
            if mid not in names_of:  # the inputs of the slot holding that model (if still loaded)
                names_of[mid] = []
                for i in (0, 1):
                    v = self.slots.read_slot(i)
                    if int(v["model_id"]) == mid and v["kind"]:
                        names_of[mid] = [FEATURES[int(f)].name for f in v["feat_id"][: int(v["n_features"])]]
            k = e["key"]
            names = names_of[mid] or [f"x{i}" for i in range(int(e["n_features"]))]
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
        self.decisions += len(ev)

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
