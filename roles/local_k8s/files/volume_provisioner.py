"""The local cluster's volume provisioner: a directory on this machine per PersistentVolumeClaim.

The external-provisioner protocol, on the Kubernetes client's public API. A claim whose
StorageClass names this provisioner (the PV controller then sets the claim's
``volume.kubernetes.io/storage-provisioner``) and whose pod is scheduled
(``volume.kubernetes.io/selected-node``, WaitForFirstConsumer) gets a hostPath
PersistentVolume pre-bound to it; a volume of ours whose claim is gone (phase Released,
reclaim policy Delete) loses its directory, then its object. Level-triggered: every pass
lists both kinds and acts on what differs, so a restart or a missed event costs one pass.

Run by the cluster's supervisord (roles/local_k8s), as root, with its own client certificate.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException

PROVISIONER = "volume.kubernetes.io/storage-provisioner"
SELECTED_NODE = "volume.kubernetes.io/selected-node"
PROVISIONED_BY = "pv.kubernetes.io/provisioned-by"
log = logging.getLogger("volume-provisioner")


def volume_dir(root: Path, claim: Any) -> Path:
    """The directory of a claim's volume: one per claim uid, so a re-created claim starts empty."""
    return root / f"{claim.metadata.namespace}-{claim.metadata.name}-{claim.metadata.uid}"


def volume_for(
    claim: Any, storage_class: Any, path: Path, node: str, name: str
) -> client.V1PersistentVolume:
    """The hostPath volume pre-bound to ``claim``, pinned to ``node``, as the claim asked."""
    return client.V1PersistentVolume(
        metadata=client.V1ObjectMeta(
            name=f"pvc-{claim.metadata.uid}", annotations={PROVISIONED_BY: name}
        ),
        spec=client.V1PersistentVolumeSpec(
            capacity={"storage": claim.spec.resources.requests["storage"]},
            access_modes=claim.spec.access_modes,
            persistent_volume_reclaim_policy=storage_class.reclaim_policy or "Delete",
            storage_class_name=storage_class.metadata.name,
            volume_mode=claim.spec.volume_mode or "Filesystem",
            claim_ref=client.V1ObjectReference(
                kind="PersistentVolumeClaim",
                namespace=claim.metadata.namespace,
                name=claim.metadata.name,
                uid=claim.metadata.uid,
            ),
            host_path=client.V1HostPathVolumeSource(path=str(path), type="Directory"),
            node_affinity=client.V1VolumeNodeAffinity(
                required=client.V1NodeSelector(
                    node_selector_terms=[
                        client.V1NodeSelectorTerm(
                            match_expressions=[
                                client.V1NodeSelectorRequirement(
                                    key="kubernetes.io/hostname", operator="In", values=[node]
                                )
                            ]
                        )
                    ]
                )
            ),
        ),
    )


def provision(
    core: client.CoreV1Api, storage: client.StorageV1Api, root: Path, node: str, name: str
) -> None:
    """Give every pending claim of ours whose pod has a node its volume (idempotent)."""
    classes = {
        c.metadata.name: c for c in storage.list_storage_class().items if c.provisioner == name
    }
    for claim in core.list_persistent_volume_claim_for_all_namespaces().items:
        notes = claim.metadata.annotations or {}
        if claim.status.phase != "Pending" or notes.get(PROVISIONER) != name:
            continue
        storage_class = classes.get(claim.spec.storage_class_name or "")
        if storage_class is None or (
            storage_class.volume_binding_mode == "WaitForFirstConsumer"
            and notes.get(SELECTED_NODE) != node
        ):
            continue
        path = volume_dir(root, claim)
        path.mkdir(parents=True, exist_ok=True)
        # the pod's non-root user owns nothing here, and fsGroup does not apply to hostPath
        path.chmod(0o777)
        try:
            core.create_persistent_volume(volume_for(claim, storage_class, path, node, name))
        except ApiException as exc:
            if exc.status != 409:  # 409: made by the pass before
                raise
            continue
        log.info("provisioned %s/%s at %s", claim.metadata.namespace, claim.metadata.name, path)


def reclaim(core: client.CoreV1Api, root: Path, name: str) -> None:
    """Remove the directory, then the object, of every released volume of ours set to Delete."""
    for volume in core.list_persistent_volume().items:
        if (volume.metadata.annotations or {}).get(PROVISIONED_BY) != name:
            continue
        if (
            volume.status.phase != "Released"
            or volume.spec.persistent_volume_reclaim_policy != "Delete"
        ):
            continue
        path = Path(volume.spec.host_path.path)
        if path.parent != root:
            log.error("not removing %s: outside %s", path, root)
            continue
        shutil.rmtree(path, ignore_errors=True)
        try:
            core.delete_persistent_volume(volume.metadata.name)
        except ApiException as exc:
            if exc.status != 404:
                raise
        log.info("reclaimed %s (%s)", volume.metadata.name, path)


def main(argv: list[str] | None = None) -> int:
    """Provision and reclaim every ``--interval`` seconds until stopped."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--root", required=True, type=Path, help="one directory per volume in it")
    parser.add_argument("--node", required=True, help="the node every volume is pinned to")
    parser.add_argument("--name", required=True, help="the provisioner name StorageClasses give")
    parser.add_argument("--interval", type=float, default=1.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    config.load_kube_config(config_file=args.kubeconfig)
    core, storage = client.CoreV1Api(), client.StorageV1Api()
    root = args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            provision(core, storage, root, args.node, args.name)
            reclaim(core, root, args.name)
        # the API server restarting (urllib3's errors too), a directory in the way: next pass
        except Exception as exc:  # noqa: BLE001
            log.warning("pass failed, retrying: %s", exc)
        time.sleep(args.interval)


if __name__ == "__main__":
    raise SystemExit(main())
