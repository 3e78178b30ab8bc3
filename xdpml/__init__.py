"""xdpml: live network traffic in, machine-learning features out, verdicts back in.

Layers, bottom to top (an import contract in the tests keeps them): ``xdpml.errors`` and
``xdpml.config``; ``xdpml.wire`` (schema, codec, TLS: what agent and collector share);
``xdpml.obs`` (logs, metrics, health); ``xdpml.datapath`` (BPF programs and maps) and
``xdpml.kube`` (Kubernetes API); ``xdpml.agent`` and ``xdpml.collector`` side by side;
``xdpml.cli`` on top.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("xdpml")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
