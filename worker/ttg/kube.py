"""A minimal Kubernetes API client for `ttg chaos` running in a pod of the cluster.

Five REST calls (list pods, delete a pod, create a pod, read and patch a Deployment's scale)
with the pod's service account token: the standard library is enough, and the worker image
stays free of the `kubernetes` package and its dependency tree. Credentials and the API
address are the in-cluster ones every pod gets (`KUBERNETES_SERVICE_HOST`/`_PORT` and the
projected token, CA and namespace under /var/run/secrets/kubernetes.io/serviceaccount);
`KubeApi(base_url=..., token=...)` is the same client pointed elsewhere (tests, a proxy).
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from ttg.errors import ConfigError

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class KubeError(Exception):
    """An API call failed: the HTTP status and the API's own message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"Kubernetes API {status}: {message}")
        self.status = status


class KubeApi:
    def __init__(self, base_url: str, token: str | None = None, namespace: str = "default",
                 ca_file: str | None = None, timeout_s: float = 15.0) -> None:
        self.base = base_url.rstrip("/")
        self.token = token
        self.namespace = namespace
        self.timeout_s = timeout_s
        self.ctx = ssl.create_default_context(cafile=ca_file) if base_url.startswith(
            "https") else None

    @classmethod
    def in_cluster(cls, namespace: str | None = None) -> KubeApi:
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        token_file = SA_DIR / "token"
        if not host or not token_file.exists():
            raise ConfigError(
                "not in a Kubernetes pod with a service account token (KUBERNETES_SERVICE_HOST "
                f"and {token_file}): chaos on Kubernetes runs in-cluster, as the ttg-chaos Job")
        ns = namespace or (SA_DIR / "namespace").read_text().strip()
        host = f"[{host}]" if ":" in host else host
        return cls(f"https://{host}:{port}", token_file.read_text().strip(), ns,
                   ca_file=str(SA_DIR / "ca.crt"))

    # ---- transport ---------------------------------------------------------------------
    def request(self, method: str, path: str, body: object | None = None,
                content_type: str = "application/json", query: dict | None = None) -> Any:
        url = self.base + path + ("?" + urllib.parse.urlencode(query) if query else "")
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s, context=self.ctx) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            try:
                detail = json.loads(detail).get("message", detail)
            except ValueError:
                pass
            raise KubeError(exc.code, detail) from None
        return json.loads(raw) if raw else {}

    def _ns(self, namespace: str | None) -> str:
        return urllib.parse.quote(namespace or self.namespace, safe="")

    # ---- the calls chaos makes ---------------------------------------------------------
    def list_pods(self, selector: str, namespace: str | None = None) -> list[dict]:
        out = self.request("GET", f"/api/v1/namespaces/{self._ns(namespace)}/pods",
                           query={"labelSelector": selector})
        return list(out.get("items", []))

    def delete_pod(self, name: str, grace_period_s: int | None,
                   namespace: str | None = None) -> None:
        """Delete a pod; `grace_period_s=0` is `kubectl delete --grace-period=0 --force`."""
        body: dict = {"apiVersion": "v1", "kind": "DeleteOptions"}
        if grace_period_s is not None:
            body["gracePeriodSeconds"] = grace_period_s
        try:
            self.request("DELETE", f"/api/v1/namespaces/{self._ns(namespace)}/pods/"
                         f"{urllib.parse.quote(name, safe='')}", body)
        except KubeError as exc:
            if exc.status != 404:  # already gone: the fault happened anyway
                raise

    def create_pod(self, pod: dict, namespace: str | None = None) -> dict:
        return self.request("POST", f"/api/v1/namespaces/{self._ns(namespace)}/pods", pod)

    def read_pod(self, name: str, namespace: str | None = None) -> dict | None:
        try:
            return self.request("GET", f"/api/v1/namespaces/{self._ns(namespace)}/pods/"
                                f"{urllib.parse.quote(name, safe='')}")
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    def read_deployment(self, name: str, namespace: str | None = None) -> dict:
        return self.request("GET", f"/apis/apps/v1/namespaces/{self._ns(namespace)}/"
                            f"deployments/{urllib.parse.quote(name, safe='')}")

    def scale_deployment(self, name: str, replicas: int, namespace: str | None = None) -> None:
        self.request("PATCH", f"/apis/apps/v1/namespaces/{self._ns(namespace)}/deployments/"
                     f"{urllib.parse.quote(name, safe='')}/scale",
                     {"spec": {"replicas": replicas}},
                     content_type="application/merge-patch+json")
