"""--push-model: a signed model (`xdpml model sign`) for every agent's Export stream.

The collector holds no key and checks no signature: it reads the manifest's name and
version to send each version once per stream, and forwards the envelope as it is; the
agents verify it against the keys they trust. The file is re-read when it changes (a
retrain job replaces it), at most once a second."""

from __future__ import annotations

import logging
import os
import threading
import time

from xdpml.errors import ModelError
from xdpml.models import signing
from xdpml.wire.v1 import collector_pb2 as cpb

log = logging.getLogger(__name__)
MAX_SIGNED_BYTES = 3 << 20  # under the 4 MiB gRPC message default, with room for the framing


class ModelPush:
    def __init__(self, path: str, *, check_every_s: float = 1.0) -> None:
        self.path = path
        self._every = check_every_s
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._checked = 0.0
        self._update: cpb.ModelUpdate | None = None
        self.current()

    def _read(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            if self._stamp != "missing":
                log.warning("--push-model %s: %s (nothing pushed until it appears)", self.path, exc.strerror)
            self._stamp = "missing"
            return
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            if st.st_size > MAX_SIGNED_BYTES:
                raise ModelError(f"{st.st_size} bytes > {MAX_SIGNED_BYTES}")
            with open(self.path, "rb") as f:
                data = f.read(MAX_SIGNED_BYTES + 1)
            m = signing.peek(data)[0]
        except (OSError, ModelError) as exc:
            log.error("--push-model %s not pushed (agents keep what they have): %s", self.path, exc)
            return
        self._update = cpb.ModelUpdate(signed=data, name=m.name, version=m.version)
        log.info("pushing model %s v%d (key %s) to every agent", m.name, m.version, m.key_id)

    def current(self) -> cpb.ModelUpdate | None:
        """The model to push (the file's latest well-formed envelope), or None."""
        with self._lock:
            now = time.monotonic()
            if now - self._checked >= self._every:
                self._checked = now
                self._read()
            return self._update
