"""The agent's model slots: set up once the datapath is compiled, pinned for
`xdpml model`, loaded from the configured file and reloaded when it changes.

Compiled in only when ``ModelSettings.enabled`` (--model-slots / --model FILE, or the
AgentConfig's ``spec.model``). The slots are pinned under ``<pin dir>/model`` so the
CLI reaches a running agent without recompiling or re-attaching; the pins go when
the agent stops (the maps die with the program). A model file that fails to compile
is logged and the running model stays.
"""

from __future__ import annotations

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
        if settings.file:
            self.load(settings.file, settings.features, settings.actions)

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
        if settings.file:
            if settings.file != old.file or settings.features != old.features or settings.actions != old.actions:
                self.load(settings.file, settings.features, settings.actions)
        elif old.file:
            self.slots.unload()
            log.info("model unloaded (no model file configured)")

    def poll(self) -> None:
        """Reload the configured file when it changed (a ConfigMap volume is updated in place)."""
        if self.settings.file:
            stamp = self._file_stamp(self.settings.file)
            if stamp is not None and stamp != self._stamp:
                self.load(self.settings.file, self.settings.features, self.settings.actions)

    def close(self) -> None:
        if self.pin_dir:
            try:
                kernel.unpin(self.slots, self.pin_dir)
            except OSError as exc:
                log.warning("model pins under %s not removed: %s", self.pin_dir, exc)
