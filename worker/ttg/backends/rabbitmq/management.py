"""RabbitMQ backend: the broker's memory from the management HTTP API (for `make bench`)."""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import pika


def broker_memory_bytes(params: pika.ConnectionParameters, options: dict) -> int:
    """The node's memory (`mem_used` of /api/nodes, management API), or, for a user without
    the `monitoring` tag, the memory of the vhost's queues (a lower bound); 0 if the
    management API cannot be reached. Its URL: options["management_url"] or
    TTG_RABBITMQ_MANAGEMENT_URL, else http://<AMQP host>:<AMQP port + 10000>."""
    base = options.get("management_url") or os.environ.get("TTG_RABBITMQ_MANAGEMENT_URL")
    if not base:
        base = f"http://{params.host}:{(params.port or 5672) + 10000}"
    base = base.rstrip("/")
    if not base.startswith(("http://", "https://")):
        return 0
    creds = params.credentials
    auth = base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()

    def get(path: str) -> Any:
        req = urllib.request.Request(base + path, headers={"Authorization": f"Basic {auth}"})
        with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 - http(s) only
            return json.load(resp)

    try:
        nodes = get("/api/nodes?columns=name,mem_used")
        return int(sum(int(n.get("mem_used") or 0) for n in nodes))
    except urllib.error.HTTPError as exc:
        if exc.code not in (401, 403):
            return 0
    except (OSError, ValueError):
        return 0
    try:  # a `management` user may not read the nodes: its vhost's queues instead
        vhost = urllib.parse.quote(params.virtual_host, safe="")
        queues = get(f"/api/queues/{vhost}?columns=name,memory")
        return int(sum(int(q.get("memory") or 0) for q in queues))
    except (OSError, ValueError):
        return 0
