"""An ApiClient for the agent: in-cluster service account first, else a kubeconfig."""

from __future__ import annotations

import os

from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.config.config_exception import ConfigException

from xdpml.errors import ServiceError


class KubeUnavailable(ServiceError):
    """No way to reach the API server; the message says what was tried."""


def api_client(*, kubeconfig: str | None = None, context: str | None = None) -> k8s_client.ApiClient:
    """In a pod: the mounted service account token. Elsewhere: ``kubeconfig`` (or
    $KUBECONFIG, ~/.kube/config). urllib3's own retries are turned off: every caller
    (reflector, status writer) has its own backoff, and stacked retries only delay
    noticing an outage."""
    cfg = k8s_client.Configuration()
    tried = []
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        try:
            k8s_config.load_incluster_config(client_configuration=cfg)
            cfg.retries = False
            return k8s_client.ApiClient(cfg)
        except ConfigException as err:
            tried.append(f"in-cluster service account: {err}")
    try:
        k8s_config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=cfg)
    except (ConfigException, OSError, TypeError) as err:
        tried.append(f"kubeconfig {kubeconfig or os.environ.get('KUBECONFIG') or '~/.kube/config'}: {err}")
        raise KubeUnavailable(
            "cannot configure a Kubernetes client; tried "
            + "; ".join(tried)
            + ". Run the agent in a pod with its ServiceAccount, or pass --kubeconfig."
        ) from None
    cfg.retries = False
    return k8s_client.ApiClient(cfg)
