"""Offline checks of cluster.yaml, the Ray cluster launcher config for AWS.

Nothing here contacts AWS: the config is validated against the JSON schema that
ships inside the installed ray package (the same one `ray up` uses before it
talks to the cloud), then against the project's own rules: no credentials in
the file, GPU workers scale from zero, the dashboard stays on the head's
loopback, and the nodes install the package from the mounted working tree.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import re
import shlex
from pathlib import Path

import jsonschema  # a core dependency of ray (Requires-Dist: jsonschema)
import pytest
import yaml
from packaging.requirements import Requirement  # also a dependency of ray

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "cluster.yaml"
MOUNT = "~/bert4rec"


@pytest.fixture(scope="module")
def raw() -> str:
    return CLUSTER_YAML.read_text()


@pytest.fixture(scope="module")
def config(raw: str) -> dict:
    cfg = yaml.safe_load(raw)
    assert isinstance(cfg, dict)
    return cfg


@pytest.fixture(scope="module")
def schema() -> dict:
    # ray/autoscaler/ray-schema.json inside the installed ray wheel.
    ref = importlib.resources.files("ray.autoscaler").joinpath("ray-schema.json")
    return json.loads(ref.read_text())


def _schema_errors(cfg: dict, schema: dict) -> list[str]:
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    validator = validator_cls(schema)
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in validator.iter_errors(cfg)
    ]


def _strings(node):
    """Every string (keys and values) in a parsed YAML tree."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)


def _worker_types(cfg: dict) -> dict:
    return {
        name: nt
        for name, nt in cfg["available_node_types"].items()
        if name != cfg["head_node_type"]
    }


def _pyproject_requirement(name: str) -> Requirement:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(Requirement(d) for d in deps if Requirement(d).name == name)


def _ray_start_argv(commands: list[str]) -> list[str]:
    """argv of the `ray start` in a list of start commands (after `ulimit ...;`)."""
    for command in commands:
        for part in command.split(";"):
            argv = shlex.split(part)
            if argv[:2] == ["ray", "start"]:
                return argv
    raise AssertionError(f"no `ray start` in {commands!r}")


# --- schema -------------------------------------------------------------------


def test_matches_ray_autoscaler_schema(config, schema):
    errors = _schema_errors(config, schema)
    assert not errors, "cluster.yaml does not match ray-schema.json:\n" + "\n".join(errors)


@pytest.mark.parametrize(
    "breakage",
    [
        lambda c: c.update(idle_timeout="10m"),  # unknown top-level key (typo)
        lambda c: c["available_node_types"]["gpu_g5"].update(min_workers="zero"),
        lambda c: c["available_node_types"]["gpu_g5"]["resources"].update(GPU=-1),
        lambda c: c["available_node_types"]["gpu_g5"].pop("node_config"),
        lambda c: c.update(head_start_ray_commands="ray start --head"),  # not a list
    ],
    ids=["unknown-key", "min-workers-type", "negative-gpu", "no-node-config", "commands-type"],
)
def test_schema_check_catches_broken_configs(config, schema, breakage):
    # Guards the guard: if the schema file were empty or not enforced, the
    # test above would pass for anything.
    broken = copy.deepcopy(config)
    breakage(broken)
    assert _schema_errors(broken, schema)


def test_passes_rays_own_offline_validation(config):
    # What `ray up` does before touching AWS: merge aws/defaults.yaml, then
    # validate (schema + head_node_type / min_workers consistency).
    util = pytest.importorskip("ray.autoscaler._private.util")
    prepared = util.prepare_config(copy.deepcopy(config))
    util.validate_config(prepared)
    # Our head_setup_commands replace Ray's default ones (which install boto3),
    # so ours must install boto3 for the autoscaler on the head.
    assert any("boto3" in c for c in prepared["head_setup_commands"])


def test_basic_shape(config):
    assert config["cluster_name"] == "bert4rec"
    provider = config["provider"]
    # provider allows unknown keys in the schema, so a misspelt key here would
    # pass it silently; check the ones that matter by name.
    assert provider["type"] == "aws"
    assert provider["region"] == "us-west-2"
    assert provider["cache_stopped_nodes"] is True
    assert config["head_node_type"] in config["available_node_types"]
    assert config["max_workers"] >= sum(
        nt.get("max_workers", 0) for nt in _worker_types(config).values()
    )
    assert config["idle_timeout_minutes"] > 0


# --- credentials --------------------------------------------------------------


def test_no_credentials_in_file(raw):
    lowered = raw.lower()
    for needle in ("aws_access_key_id", "aws_secret_access_key", "aws_session_token"):
        assert needle not in lowered, f"{needle} found in cluster.yaml"
    assert "AKIA" not in raw  # long-term access key id prefix
    assert not re.search(r"\bASIA[0-9A-Z]{16}\b", raw)  # temporary key id


def test_s3_access_via_instance_profile(config):
    arn = re.compile(r"^arn:aws:iam::[^:]+:instance-profile/bert4rec-ray$")
    for name, nt in config["available_node_types"].items():
        profile = nt["node_config"].get("IamInstanceProfile")
        assert profile and arn.match(profile.get("Arn", "")), name


# --- node types ---------------------------------------------------------------


def test_gpu_worker_group_scales_from_zero(config):
    g5 = config["available_node_types"]["gpu_g5"]
    assert g5["min_workers"] == 0
    assert g5["max_workers"] >= 1
    assert g5["resources"]["GPU"] >= 1
    gpu_types = {n: nt for n, nt in _worker_types(config).items() if nt["resources"].get("GPU")}
    assert "gpu_g5" in gpu_types
    for name, nt in gpu_types.items():
        assert nt.get("min_workers", 0) == 0, f"{name} would keep GPUs running"


def test_head_has_cpus_but_no_gpu(config):
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("CPU", 0) > 0
    assert head["resources"].get("GPU", 0) == 0


def test_every_node_uses_the_same_image(config):
    images = {nt["node_config"].get("ImageId") for nt in config["available_node_types"].values()}
    assert len(images) == 1 and None not in images


# --- network exposure ---------------------------------------------------------


def test_dashboard_bound_to_loopback(config):
    argv = _ray_start_argv(config["head_start_ray_commands"])
    assert "--head" in argv
    assert "--dashboard-host=127.0.0.1" in argv
    assert not any(a.startswith("--dashboard-host") and a != "--dashboard-host=127.0.0.1" for a in argv)


def test_workers_join_the_head(config):
    argv = _ray_start_argv(config["worker_start_ray_commands"])
    assert "--address=$RAY_HEAD_IP:6379" in argv
    assert "--head" not in argv


def test_nothing_opened_to_the_world(config):
    for s in _strings(config):
        assert "0.0.0.0" not in s and "::/0" not in s, s
    # Ray-created security groups always allow SSH from 0.0.0.0/0; every node
    # type names a pre-created group instead.
    for name, nt in config["available_node_types"].items():
        assert nt["node_config"].get("SecurityGroupIds"), name
    for rule in config["provider"].get("security_group", {}).get("IpPermissions", []):
        assert not (rule.get("FromPort", 0) <= 8265 <= rule.get("ToPort", 65535)), rule


# --- setup --------------------------------------------------------------------


def test_working_tree_is_mounted(config):
    assert config["file_mounts"].get(MOUNT) == "."
    assert ".venv" in config.get("rsync_exclude", [])  # never ship the local venv


def test_setup_installs_package_from_mounted_tree(config):
    commands = config["setup_commands"]
    install = [i for i, c in enumerate(commands) if re.search(r"pip install .*-e ~/bert4rec(\s|$)", c)]
    assert install, f"no `pip install -e {MOUNT}` in setup_commands"
    torch = [i for i, c in enumerate(commands) if re.search(r"pip install .*[\"']?torch[<>=]", c)]
    assert torch and torch[0] < install[0], "torch must be installed before the package"


def test_setup_pins_match_pyproject(config):
    text = "\n".join(config["setup_commands"])
    torch_spec = re.search(r"[\"'](torch[^\"']*)[\"']", text)
    assert torch_spec, "torch requirement not found in setup_commands"
    assert Requirement(torch_spec.group(1)).specifier == _pyproject_requirement("torch").specifier

    ray_spec = re.search(r"[\"'](ray\[[^\"']*)[\"']", text)
    assert ray_spec, "ray requirement not found in setup_commands"
    pinned = Requirement(ray_spec.group(1))
    (spec,) = pinned.specifier
    assert spec.operator == "==", "pin Ray exactly so late-starting workers match the head"
    assert _pyproject_requirement("ray").specifier.contains(spec.version)


def test_header_documents_operator_commands(raw):
    header = raw.split("\ncluster_name:", 1)[0]
    for command in (
        "ray up cluster.yaml",
        "ray dashboard cluster.yaml",
        "ray job submit --address http://127.0.0.1:8265 --working-dir . -- "
        "python jobs/nightly.py --config configs/nightly-cluster.yaml",
        "ray down cluster.yaml",
    ):
        assert command in header, command
