"""Real Ray clusters for the tests: ``ray start --head`` (and ``ray start --address`` worker
nodes) on loopback, ``ray job submit`` against them, and a teardown that stops exactly them.

``start_cluster`` starts a head node and any worker nodes, each with its own ``--temp-dir``
(a short dir under /tmp: Ray's socket paths must stay under 108 bytes) and its OWN free ports
for every Ray service (node manager, object manager, dashboard agent, runtime-env agent,
metrics; workers bind random ports) -- a second raylet on one machine dies binding the agent
port of the first otherwise. So it never meets another cluster on this machine: the
in-process ``ray.init`` cluster of the other tiers (``ray_session``), or anyone else's.
``ray start`` records its address in ``<temp-dir>/ray_current_cluster``, so a plain
``ray.init()`` elsewhere does not find this cluster either. Nothing sets ``RAY_ADDRESS`` in
the test process.

``stop_cluster`` never runs ``ray stop`` (it stops every Ray on the machine): every process
of the cluster -- GCS, raylets, dashboard, workers, job drivers -- inherits a unique marker
variable from ``ray start``'s environment, and exactly those processes are terminated, by pid.

The ``ray`` CLI and the job drivers (``python jobs/...``) are the test interpreter's
virtualenv's: its ``bin`` goes first on the cluster's ``PATH``.

Ray >= 2.52 turns token authentication on for a new local cluster when ``~/.ray/auth_token``
exists (and the job API then answers 401 without it). The test cluster keeps authentication
on, with a token of its own (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN``) that the ``ray`` CLI
calls and the worker nodes inherit and the REST calls send as ``Authorization: Bearer``; the
user's token file is neither read nor written.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MARKER = "BERT4REC_TEST_RAY_CLUSTER"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# every job gets these; unbuffered so that `ray job logs` shows the driver's lines as they happen
JOB_ENV = {"PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0"}


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that were free on 127.0.0.1 a moment ago."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ray_cli() -> str:
    """The ``ray`` CLI next to this interpreter (skips the test without one)."""
    here = Path(sys.executable).parent / "ray"
    found = str(here) if here.exists() else shutil.which("ray")
    if not found:
        pytest.skip("the ray CLI is not installed next to this interpreter")
    return found


def cluster_pids(token: str, marker: str = MARKER) -> list[int]:
    """Processes whose environment carries ``marker=token`` (never this process)."""
    needle = f"{marker}={token}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    pids.append(int(entry))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return pids


def terminate(token: str, grace_s: float = 5.0, marker: str = MARKER) -> None:
    """SIGTERM, then SIGKILL what is left after ``grace_s``: gcs_server and the autoscaler
    monitor catch SIGTERM and can linger for a long while in a throwaway cluster."""
    for pid in cluster_pids(token, marker):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace_s
    while time.time() < deadline and cluster_pids(token, marker):
        time.sleep(0.5)
    for pid in cluster_pids(token, marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def node_ports() -> list[str]:
    """The ``ray start`` flags that give one node its own ports (every node, head or not)."""
    agent_http, agent_grpc, runtime_env_agent, metrics, node_manager, object_manager = free_ports(6)
    return [
        f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env_agent}", f"--metrics-export-port={metrics}",
        f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
        # 0: every worker process binds a port the kernel picks, never one of another node's
        "--min-worker-port=0", "--max-worker-port=0",
    ]


@dataclass
class RayCluster:
    """A running cluster: its dashboard/job API address and helpers around `ray job`."""

    address: str  # http://127.0.0.1:<dashboard port>, what `ray job submit --address` takes
    gcs_address: str
    temp_dirs: list[str]  # the head's first
    env: dict[str, str]  # environment for `ray` CLI calls (with the cluster's auth token and marker)
    ray: str  # the ray CLI
    auth_token: str
    token: str  # the marker's value
    submitted: list[str] = field(default_factory=list)

    @property
    def temp_dir(self) -> str:
        return self.temp_dirs[0]

    # -- the ray CLI, as an operator would run it (from the repository root)

    def submit(self, args: list[str], *, wait: bool = True, submission_id: str | None = None, timeout: float = 540, env_vars: dict[str, str] | None = None) -> tuple[str, subprocess.CompletedProcess]:
        """``ray job submit --address ... --working-dir . -- python <args>``; returns (id, result)."""
        sid = submission_id or f"b4r-{uuid.uuid4().hex[:12]}"
        cmd = [
            self.ray, "job", "submit", "--address", self.address, "--submission-id", sid,
            "--working-dir", ".", "--runtime-env-json", json.dumps({"env_vars": {**JOB_ENV, **(env_vars or {})}}),
            *([] if wait else ["--no-wait"]), "--", "python", *args,
        ]
        self.submitted.append(sid)
        result = subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout)
        return sid, result

    def stop(self, sid: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """``ray job stop`` (waits until the job has exited)."""
        return subprocess.run([self.ray, "job", "stop", "--address", self.address, sid], cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout)

    # -- the dashboard's REST API (what the CLI calls; milliseconds instead of a CLI start-up)

    def get(self, path: str) -> dict:
        """GET ``path`` of the dashboard (job API, state API) with the cluster's token."""
        request = urllib.request.Request(f"{self.address}{path}", headers={"Authorization": f"Bearer {self.auth_token}"})
        with urllib.request.urlopen(request, timeout=30) as r:
            return json.loads(r.read())

    def info(self, sid: str) -> dict:
        return self.get(f"/api/jobs/{sid}")

    def logs(self, sid: str) -> str:
        return self.get(f"/api/jobs/{sid}/logs").get("logs", "")

    def nodes(self) -> list[dict]:
        """The state API's nodes (``node_id``, ``state``, ``resources_total``, ...)."""
        return self.get("/api/v0/nodes?limit=1000&detail=1")["data"]["result"]["result"]

    def actors(self) -> list[dict]:
        """The state API's actors, dead ones included (``class_name``, ``node_id``, ``state``, ...)."""
        return self.get("/api/v0/actors?limit=10000&detail=1")["data"]["result"]["result"]

    def tasks(self, **filters: str) -> list[dict]:
        """The state API's tasks whose fields equal ``filters`` (``actor_id``, ``state``, ...),
        each with ``name``, ``node_id``, ``actor_id``, ``state``, ..."""
        query = "".join(f"&filter_keys={k}&filter_predicates=%3D&filter_values={v}" for k, v in filters.items())
        return self.get(f"/api/v0/tasks?limit=10000&detail=1{query}")["data"]["result"]["result"]

    def wait(self, sid: str, timeout: float = 540) -> dict:
        deadline = time.time() + timeout
        while True:
            info = self.info(sid)
            if info["status"] in TERMINAL or time.time() > deadline:
                return info
            time.sleep(0.5)

    def wait_for_log(self, sid: str, pattern: str, timeout: float = 540) -> re.Match:
        """Polls the job's log until ``pattern`` shows up; fails if the job ends first."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            logs = self.logs(sid)
            m = re.search(pattern, logs)
            if m:
                return m
            status = self.info(sid)["status"]
            if status in TERMINAL:
                pytest.fail(f"job {sid} ended ({status}) before its log showed {pattern!r}:\n{self.logs(sid)[-6000:]}")
            time.sleep(0.2)
        pytest.fail(f"job {sid}: no {pattern!r} in its log after {timeout:.0f} s:\n{self.logs(sid)[-6000:]}")


def wait_for_dashboard(address: str, auth_token: str, timeout: float) -> None:
    deadline = time.time() + timeout
    last: Exception | None = None
    while time.time() < deadline:
        try:
            request = urllib.request.Request(f"{address}/api/version", headers={"Authorization": f"Bearer {auth_token}"})
            with urllib.request.urlopen(request, timeout=5) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                raise RuntimeError(f"the job API at {address} refused our token: {e}") from e
            last = e
        except (urllib.error.URLError, OSError) as e:
            last = e
        time.sleep(0.5)
    raise RuntimeError(f"the job API at {address} did not come up in {timeout:.0f} s: {last}")


NODE_MARKER = "BERT4REC_TEST_RAY_NODE"


def _ray_start(cluster: RayCluster, flags: list[str], node: str) -> None:
    """``ray start <flags>``; its processes carry ``NODE_MARKER=node`` besides the cluster's
    marker. A failure reports the tail of the node's raylet log."""
    env = {**cluster.env, NODE_MARKER: node}
    # its own session: a Ctrl-C of pytest does not reach the cluster's daemons
    started = subprocess.run([cluster.ray, "start", *flags, "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=180, start_new_session=True)
    if started.returncode != 0:
        raylet = sorted(Path(cluster.temp_dirs[-1]).glob("session_*/logs/raylet.out"))
        log = raylet[-1].read_text(errors="replace") if raylet else ""
        # the first fatal line says why; the stack trace after it does not
        fatal = [line for line in log.splitlines() if "Check failed" in line or " F " in line[:40]]
        tail = "\n".join(fatal[:3]) or log[-2000:] or "(no raylet log)"
        raise RuntimeError(f"ray start {flags[0]} failed ({started.returncode}):\n{started.stderr[-2000:]}\n--- raylet.out\n{tail}")


def _start_worker(cluster: RayCluster, worker: dict, prefix: str) -> None:
    """One worker node, tried twice: on a loaded machine a raylet can miss ``ray start``'s
    fixed 30 s registration window. The failed try's processes are stopped first (by their
    node marker), so that a late registration does not leave a fourth node behind."""
    for attempt in (1, 2):
        node = uuid.uuid4().hex
        cluster.temp_dirs.append(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        try:
            _ray_start(cluster, [
                f"--address={cluster.gcs_address}", "--node-ip-address=127.0.0.1",
                f"--num-cpus={worker['num_cpus']}", "--num-gpus=0", f"--object-store-memory={worker['object_store']}",
                f"--resources={json.dumps(worker.get('resources', {}))}", f"--temp-dir={cluster.temp_dirs[-1]}", *node_ports(),
            ], node)
            return
        except RuntimeError as e:
            terminate(node, marker=NODE_MARKER)
            if attempt == 2:
                raise
            print(f"worker node failed to start, stopped; trying again: {e}", file=sys.stderr)


def start_cluster(*, head_cpus: float, head_object_store: int, workers: list[dict] = (), env_vars: dict[str, str] | None = None, prefix: str = "b4r-ray-") -> RayCluster:
    """A head node with ``head_cpus`` CPUs, then one worker node per entry of ``workers``
    (``{"num_cpus": 1, "object_store": bytes, "resources": {"node_a": 1}}``); returns when
    the job API answers and every node is alive. ``env_vars`` join every node's environment
    (the cluster's processes inherit them). Each node is tried twice: on a loaded machine a
    raylet can miss ``ray start``'s fixed 30 s registration window. On failure, what was
    started is stopped."""
    for attempt in (1, 2):
        cluster = _start_head(head_cpus, head_object_store, env_vars, prefix)
        if cluster is not None:
            break
    else:
        raise RuntimeError("the head node did not start twice; see the log lines above")
    try:
        for worker in workers:
            _start_worker(cluster, worker, prefix)
        wait_for_nodes(cluster, 1 + len(workers), timeout=120)
        return cluster
    except BaseException:
        stop_cluster(cluster)
        raise


def _start_head(cpus: float, object_store: int, env_vars: dict[str, str] | None, prefix: str) -> RayCluster | None:
    """A new cluster's head node (its own token, ports, temp dir), or None (stopped) if it failed."""
    token = uuid.uuid4().hex
    auth_token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH_")) and k != "RAY_API_SERVER_ADDRESS"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update({MARKER: token, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": auth_token, **JOB_ENV, **(env_vars or {})})
    gcs, dashboard, client = free_ports(3)
    cluster = RayCluster(
        address=f"http://127.0.0.1:{dashboard}", gcs_address=f"127.0.0.1:{gcs}", temp_dirs=[tempfile.mkdtemp(prefix=prefix, dir="/tmp")],
        env=env, ray=ray_cli(), auth_token=auth_token, token=token,
    )
    try:
        _ray_start(cluster, [
            "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
            f"--num-cpus={cpus}", "--num-gpus=0", f"--object-store-memory={object_store}",
            f"--temp-dir={cluster.temp_dir}", f"--ray-client-server-port={client}", *node_ports(),
        ], "head")
        wait_for_dashboard(cluster.address, auth_token, timeout=120)
        return cluster
    except RuntimeError as e:
        print(f"head node failed to start, stopped: {e}", file=sys.stderr)
        stop_cluster(cluster)
        return None
    except BaseException:
        stop_cluster(cluster)
        raise


def wait_for_nodes(cluster: RayCluster, n: int, timeout: float) -> None:
    deadline = time.time() + timeout
    alive = 0
    while time.time() < deadline:
        alive = sum(1 for node in cluster.nodes() if node["state"] == "ALIVE")
        if alive >= n:
            return
        time.sleep(0.5)
    raise RuntimeError(f"{alive} of {n} nodes alive after {timeout:.0f} s")


def stop_cluster(cluster: RayCluster) -> None:
    """Stops jobs still running (a test failed half-way), then exactly this cluster's processes."""
    for sid in cluster.submitted:
        try:
            if cluster.info(sid)["status"] not in TERMINAL:
                cluster.stop(sid, timeout=60)
        except Exception:  # noqa: BLE001 - tearing down anyway
            pass
    terminate(cluster.token)
    for temp_dir in cluster.temp_dirs:
        shutil.rmtree(temp_dir, ignore_errors=True)
