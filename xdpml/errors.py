"""One exception type per kind of user-facing failure.

Libraries raise these and never exit; the CLI catches ``XdpmlError`` once, prints the
message as one line (``xdpml: ...``) and exits with the type's ``exit_code``.
"""

from __future__ import annotations

import os


class XdpmlError(Exception):
    """Base of every error a user can cause or fix; the message says what and how."""

    exit_code = 1


class ConfigError(XdpmlError, ValueError):
    """A setting or input is invalid; the message names it and what is allowed."""

    exit_code = 2


class EnvironmentNotReady(XdpmlError):
    """The host lacks something needed (privileges, kernel headers, a library)."""

    exit_code = 3


class AttachError(XdpmlError):
    """An interface could not be attached; the message says why and what to do."""

    exit_code = 4


class OutputError(XdpmlError):
    """An output (file, socket, directory) cannot be opened or is unsafe to use."""

    exit_code = 5


class ServiceError(XdpmlError):
    """A network service could not start or a peer is unusable (bind, TLS, Kubernetes API)."""

    exit_code = 6


class ModelError(XdpmlError):
    """A model cannot be loaded or does not fit the data or the datapath's limits."""

    exit_code = 7


class DataLoss(XdpmlError):
    """The run ended but lost data (rows dropped, never delivered); the message counts it."""

    exit_code = 8


def describe_os_error(exc: OSError, what: str) -> str:
    """``what``: the reason in words (e.g. "no such directory"), never a raw errno tuple."""
    reason = exc.strerror or (os.strerror(exc.errno) if exc.errno else str(exc))
    return f"{what}: {reason[0].lower() + reason[1:] if reason else 'unknown error'}"
