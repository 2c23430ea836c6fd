"""A real Ray cluster for job tests: ``ray start --head`` on loopback, and ``ray job submit``.

``ray_head`` (module): a head node of 2 CPUs on its own temp dir, ports and auth token, stopped
by pid at the end (never ``ray stop``): see ``tests/raycluster.py``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.raycluster import RayCluster, start_cluster, stop_cluster


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayCluster]:
    cluster = start_cluster(head_cpus=2, head_object_store=1024**3, prefix="b4r-jobs-")
    try:
        yield cluster
    finally:
        stop_cluster(cluster)
