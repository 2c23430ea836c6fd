"""Refusing local paths on a multi-node Ray cluster.

A local path (``/data/x``) names a directory on one machine. On a Ray cluster of more than
one node, the training workers, the scoring actors and the Ray Data read tasks run on any
node, and the job's driver too where entrypoint resources place it: a local ``out`` would be
written partly on one node and partly on another, a local input read on one node only. So
train, score and nightly refuse a local path there before any work, unless
``storage.local_is_shared`` says local paths are a filesystem mounted at the same path on
every node (NFS, EFS). On a single node (a laptop, the test tiers) local paths are fine.
"""

from __future__ import annotations

from bert4rec.config import StorageConfig
from bert4rec.io import InputError, is_s3


def check_shared_storage(paths: dict[str, str | None], nodes: int, local_is_shared: bool) -> None:
    """Raises an ``InputError`` naming the first setting of ``paths`` (setting name -> URI;
    None: not set) that is a local path while the cluster has more than one node."""
    if nodes <= 1 or local_is_shared:
        return
    for name, uri in paths.items():
        if uri is not None and not is_s3(uri):
            raise InputError(
                f"{name} is a local path ({uri}) on a Ray cluster of {nodes} nodes, where it exists on one node only: "
                "use shared storage (s3://), or set storage.local_is_shared if local paths are a filesystem "
                "mounted at the same path on every node (NFS, EFS)"
            )


def alive_nodes() -> int:
    """How many nodes of the cluster this process is connected to are alive. A process not
    connected to Ray counts one when ``RAY_ADDRESS`` is unset (Ray Data and Ray Train then
    start a local Ray of one node); with it set (every Ray job), it connects first."""
    import os

    import ray

    if not ray.is_initialized():
        if not os.environ.get("RAY_ADDRESS"):
            return 1
        # a Ray job (the job supervisor sets RAY_ADDRESS) or a cluster named by the user
        from bert4rec import console

        console.ensure_ray()
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def require_shared_storage(paths: dict[str, str | None], storage: StorageConfig) -> None:
    """``check_shared_storage`` on the cluster this process is connected to."""
    if storage.local_is_shared or all(uri is None or is_s3(uri) for uri in paths.values()):
        return  # nothing to ask Ray
    check_shared_storage(paths, alive_nodes(), storage.local_is_shared)
