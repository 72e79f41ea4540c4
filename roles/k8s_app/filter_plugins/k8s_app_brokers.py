"""The k8s_app role's broker users: the cluster's Redis ACL lines and RabbitMQ definitions,
made from the same user lists as the local platform's (roles/redis `redis_acl_users`,
roles/rabbitmq `rabbitmq_users`), each user with its own client's generated password."""

from __future__ import annotations

from typing import Any

from ansible.errors import AnsibleFilterError


def _client_of(clients: dict[str, str]) -> dict[str, str]:
    return {str(name): client for client, name in clients.items()}


def _password(passwords: dict[str, str], client_of: dict[str, str], name: str) -> str:
    if name not in client_of:
        raise AnsibleFilterError(
            f"broker user {name!r} belongs to no client (clients: {sorted(client_of)})")
    return str(passwords[client_of[name]])


def k8s_app_redis_acl(users: list[dict[str, Any]], clients: dict[str, str],
                      passwords: dict[str, str]) -> str:
    """redis.conf `user` lines, one per user: `user NAME reset on >PASSWORD RULES`."""
    client_of = _client_of(clients)
    return "".join(
        f"user {u['name']} reset on >{_password(passwords, client_of, str(u['name']))} "
        f"{' '.join(str(u['rules']).split())}\n" for u in users)


def k8s_app_rabbitmq_definitions(users: list[dict[str, Any]], clients: dict[str, str],
                                 vhost: str, passwords: dict[str, str]) -> dict[str, Any]:
    """RabbitMQ's definitions (imported at boot): the vhost, the users (the first of the list
    is the controller's, named `clients['controller']` here), their permissions there only."""
    client_of = _client_of(clients)
    out: dict[str, Any] = {"vhosts": [{"name": vhost}], "users": [], "permissions": []}
    for i, u in enumerate(users):
        name = str(clients["controller"]) if i == 0 else str(u["name"])
        out["users"].append({"name": name, "password": _password(passwords, client_of, name),
                             "tags": ",".join(str(t) for t in u["tags"])})
        out["permissions"].append({"user": name, "vhost": vhost,
                                   "configure": str(u["configure"]), "write": str(u["write"]),
                                   "read": str(u["read"])})
    return out


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"k8s_app_redis_acl": k8s_app_redis_acl,
                "k8s_app_rabbitmq_definitions": k8s_app_rabbitmq_definitions}
