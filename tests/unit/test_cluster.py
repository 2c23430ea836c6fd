"""Local paths on a multi-node cluster: the decision, and the one call that asks Ray."""

from __future__ import annotations

import pytest

from bert4rec import cluster
from bert4rec.config import NightlyConfig, StorageConfig
from bert4rec.io import InputError

HINT = (
    "use shared storage (s3://), or set storage.local_is_shared if local paths are a filesystem "
    "mounted at the same path on every node (NFS, EFS)"
)


def test_a_local_path_on_two_nodes_is_refused_naming_the_setting():
    with pytest.raises(InputError) as e:
        cluster.check_shared_storage({"data": "s3://b/prepared", "out": "/mnt/run"}, nodes=2, local_is_shared=False)
    assert str(e.value) == f"out is a local path (/mnt/run) on a Ray cluster of 2 nodes, where it exists on one node only: {HINT}"


def test_the_first_local_setting_is_named():
    with pytest.raises(InputError, match=r"^interactions is a local path \(data/x\) on a Ray cluster of 3 nodes"):
        cluster.check_shared_storage({"interactions": "data/x", "out": "/y", "work": None}, nodes=3, local_is_shared=False)


def test_file_urls_are_local_too():
    with pytest.raises(InputError, match=r"^checkpoint is a local path \(file:///ckpt\)"):
        cluster.check_shared_storage({"checkpoint": "file:///ckpt"}, nodes=2, local_is_shared=False)


@pytest.mark.parametrize(
    "paths, nodes, shared",
    [
        ({"out": "/mnt/run"}, 1, False),  # one node: local is where everything runs
        ({"out": "/mnt/run"}, 0, False),  # no node reported alive: nothing to refuse against
        ({"out": "/mnt/nfs/run", "data": "/mnt/nfs/prepared"}, 4, True),  # NFS/EFS on every node
        ({"out": "s3://b/run", "data": "s3a://b/prepared", "init_from": None}, 4, False),
    ],
)
def test_allowed(paths, nodes, shared):
    assert cluster.check_shared_storage(paths, nodes, shared) is None


def test_the_escape_is_a_storage_setting_off_by_default():
    assert StorageConfig().local_is_shared is False
    cfg = NightlyConfig.model_validate({"interactions": "/nfs/in", "out": "/nfs/out", "storage": {"local_is_shared": True}})
    assert cfg.storage.local_is_shared is True


class FakeRay:
    def __init__(self, initialized: bool, nodes: list[dict]):
        self.initialized, self.listed, self.calls = initialized, nodes, 0

    def is_initialized(self) -> bool:
        return self.initialized

    def nodes(self) -> list[dict]:
        self.calls += 1
        return self.listed


@pytest.fixture
def fake_ray(monkeypatch):
    import ray

    def install(initialized: bool, nodes: list[dict]) -> FakeRay:
        fake = FakeRay(initialized, nodes)
        monkeypatch.setattr(ray, "is_initialized", fake.is_initialized)
        monkeypatch.setattr(ray, "nodes", fake.nodes)
        return fake

    return install


def test_alive_nodes_counts_the_alive_ones(fake_ray):
    fake_ray(True, [{"Alive": True}, {"Alive": False}, {"Alive": True}, {"Alive": True}])
    assert cluster.alive_nodes() == 3


def test_alive_nodes_without_ray_is_one_and_starts_nothing(fake_ray):
    fake = fake_ray(False, [{"Alive": True}, {"Alive": True}])
    assert cluster.alive_nodes() == 1
    assert fake.calls == 0


def test_require_refuses_on_the_connected_cluster(fake_ray):
    fake_ray(True, [{"Alive": True}, {"Alive": True}])
    with pytest.raises(InputError, match=r"^work is a local path \(/w\) on a Ray cluster of 2 nodes"):
        cluster.require_shared_storage({"out": "s3://b/o", "work": "/w"}, StorageConfig())


def test_require_asks_ray_nothing_for_s3_paths_or_shared_local(fake_ray):
    fake = fake_ray(True, [{"Alive": True}, {"Alive": True}])
    cluster.require_shared_storage({"out": "s3://b/o", "work": None}, StorageConfig())
    cluster.require_shared_storage({"out": "/nfs/o"}, StorageConfig(local_is_shared=True))
    assert fake.calls == 0


def test_train_score_and_nightly_refuse_before_any_work(fake_ray, tmp_path):
    """Each entry point checks first: nothing is read (the inputs do not exist) or written."""
    from bert4rec.config import ScoreConfig, TrainConfig
    from bert4rec.nightly import nightly
    from bert4rec.score import score
    from bert4rec.train import train

    fake_ray(True, [{"Alive": True}, {"Alive": True}])
    missing, out = str(tmp_path / "missing"), str(tmp_path / "out")
    with pytest.raises(InputError, match=r"^data is a local path"):
        train(TrainConfig(data=missing, out=out))
    with pytest.raises(InputError, match=r"^checkpoint is a local path"):
        score(ScoreConfig(checkpoint=missing, histories=missing, out=out))
    with pytest.raises(InputError, match=r"^out is a local path"):
        nightly(NightlyConfig(interactions="s3://b/in", out=out))
    assert list(tmp_path.iterdir()) == []


def test_score_refuses_a_local_exclude_that_tasks_would_read(fake_ray, tmp_path, monkeypatch):
    """A per-user --exclude too large for the driver is read by tasks on any node: a local path
    is refused before anything else is read (the S3 inputs here do not exist)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bert4rec import score as score_mod
    from bert4rec.config import ScoreConfig

    fake_ray(True, [{"Alive": True}, {"Alive": True}])
    exclude = str(tmp_path / "exclude.parquet")
    pq.write_table(pa.table({"user_id": pa.array([1, 2], pa.int64()), "item_id": pa.array([3, 4], pa.int64())}), exclude)
    cfg = ScoreConfig(checkpoint="s3://b/ckpt", histories="s3://b/hist", out="s3://b/out", exclude=exclude)
    monkeypatch.setattr(score_mod, "DRIVER_EXCLUDE_MAX_ROWS", 1)
    with pytest.raises(InputError, match=rf"^exclude is a local path \({exclude}\) on a Ray cluster of 2 nodes"):
        score_mod.score(cfg)
