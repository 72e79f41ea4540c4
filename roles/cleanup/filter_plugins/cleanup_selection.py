"""The cleanup role's selection of Kubernetes objects: the project's (by labels) and the rest."""

from __future__ import annotations

from typing import Any


def cleanup_k8s_selection(
    objects: list[dict[str, Any]],
    labels: dict[str, str],
    scope: str,
    purge: bool,
    purge_kinds: list[str],
) -> dict[str, list[dict[str, str]]]:
    """{"delete": [ref...], "keep": [ref...]}, a ref being {api_version, kind, name}.

    An object is the project's when it carries every one of `labels`. Of those, the scope
    picks: workers (component worker), backend (component broker, its data and secrets kept)
    or all (the data and secrets only with purge). Objects not the project's are listed as
    kept; a Namespace is never an object of the selection (purge deletes it on its own).
    """
    out: dict[str, list[dict[str, str]]] = {"delete": [], "keep": []}
    for o in objects:
        if o.get("kind") == "Namespace":
            continue
        meta = o.get("metadata") or {}
        own = meta.get("labels") or {}
        ref = {"api_version": o.get("apiVersion"), "kind": o.get("kind"), "name": meta.get("name")}
        if any(own.get(k) != v for k, v in labels.items()):
            out["keep"].append(ref)
            continue
        component = own.get("app.kubernetes.io/component", "")
        data = o.get("kind") in purge_kinds
        if (
            (scope == "workers" and component == "worker")
            or (scope == "backend" and component == "broker" and not data)
            or (scope == "all" and (purge or not data))
        ):
            out["delete"].append(ref)
    return out


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"cleanup_k8s_selection": cleanup_k8s_selection}
