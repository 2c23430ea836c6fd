"""A real Ray cluster for job tests: ``ray start --head`` on loopback, and ``ray job submit``.

``ray_head`` (module): starts a head node with its own ``--temp-dir`` (a short dir under
/tmp: Ray's socket paths must stay under 108 bytes) and its own free ports for every Ray
service, so it never meets another cluster on this machine -- the in-process ``ray.init``
cluster of the other tiers (``ray_session``), or anyone else's. ``ray start`` records its
address in ``<temp-dir>/ray_current_cluster``, so a plain ``ray.init()`` elsewhere does not
find this cluster either. Nothing sets ``RAY_ADDRESS`` in the test process.

Teardown never runs ``ray stop`` (it stops every Ray on the machine): every process of this
cluster -- GCS, raylet, dashboard, workers, job drivers -- inherits a unique marker variable
from ``ray start``'s environment, and exactly those processes are terminated, by pid.

The ``ray`` CLI and the job drivers (``python jobs/...``) are the test interpreter's
virtualenv's: its ``bin`` goes first on the cluster's ``PATH``.

Ray >= 2.52 turns token authentication on for a new local cluster when ``~/.ray/auth_token``
exists (and the job API then answers 401 without it). The test cluster keeps authentication
on, with a token of its own (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN``) that the ``ray`` CLI
calls inherit and the REST calls send as ``Authorization: Bearer``; the user's token file is
neither read nor written.
"""

from __future__ import annotations

import json
import os
import secrets
import re
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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MARKER = "BERT4REC_JOB_TESTS_CLUSTER"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# every job gets these; unbuffered so that `ray job logs` shows the driver's lines as they happen
JOB_ENV = {"PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0"}


def _free_ports(n: int) -> list[int]:
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


def _ray_cli() -> str:
    here = Path(sys.executable).parent / "ray"
    found = str(here) if here.exists() else shutil.which("ray")
    if not found:
        pytest.skip("the ray CLI is not installed next to this interpreter")
    return found


def _our_pids(token: str) -> list[int]:
    """Processes whose environment carries this cluster's marker (never this process)."""
    needle = f"{MARKER}={token}".encode()
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


def _terminate(token: str, grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL what is left after ``grace_s``: gcs_server and the autoscaler
    monitor catch SIGTERM and can linger for a long while in a throwaway cluster."""
    pids = _our_pids(token)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace_s
    while time.time() < deadline and _our_pids(token):
        time.sleep(0.5)
    for pid in _our_pids(token):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass
class RayHead:
    """A running head node: its dashboard/job API address and helpers around `ray job`."""

    address: str  # http://127.0.0.1:<dashboard port>, what `ray job submit --address` takes
    gcs_address: str
    temp_dir: str
    env: dict[str, str]  # environment for `ray` CLI calls (with the cluster's auth token)
    ray: str  # the ray CLI
    auth_token: str
    submitted: list[str] = field(default_factory=list)

    # -- the ray CLI, as an operator would run it (from the repository root)

    def submit(self, args: list[str], *, wait: bool = True, submission_id: str | None = None, timeout: float = 540) -> tuple[str, subprocess.CompletedProcess]:
        """``ray job submit --address ... --working-dir . -- python <args>``; returns (id, result)."""
        sid = submission_id or f"b4r-{uuid.uuid4().hex[:12]}"
        cmd = [
            self.ray, "job", "submit", "--address", self.address, "--submission-id", sid,
            "--working-dir", ".", "--runtime-env-json", json.dumps({"env_vars": JOB_ENV}),
            *([] if wait else ["--no-wait"]), "--", "python", *args,
        ]
        self.submitted.append(sid)
        result = subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout)
        return sid, result

    def stop(self, sid: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """``ray job stop`` (waits until the job has exited)."""
        return subprocess.run([self.ray, "job", "stop", "--address", self.address, sid], cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout)

    # -- the job REST API (what the CLI calls; milliseconds instead of a CLI start-up)

    def _get(self, path: str) -> dict:
        request = urllib.request.Request(f"{self.address}{path}", headers={"Authorization": f"Bearer {self.auth_token}"})
        with urllib.request.urlopen(request, timeout=30) as r:
            return json.loads(r.read())

    def info(self, sid: str) -> dict:
        return self._get(f"/api/jobs/{sid}")

    def logs(self, sid: str) -> str:
        return self._get(f"/api/jobs/{sid}/logs").get("logs", "")

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


def _wait_for_dashboard(address: str, auth_token: str, timeout: float) -> None:
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


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    ray = _ray_cli()
    token = uuid.uuid4().hex
    auth_token = secrets.token_hex(32)
    temp_dir = tempfile.mkdtemp(prefix="b4r-jobs-", dir="/tmp")
    (gcs, dashboard, client, agent_http, agent_grpc, runtime_env_agent, metrics, node_manager, object_manager) = _free_ports(9)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH_")) and k != "RAY_API_SERVER_ADDRESS"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update({MARKER: token, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": auth_token, **JOB_ENV})
    cmd = [
        ray, "start", "--head",
        "--node-ip-address=127.0.0.1", f"--port={gcs}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        "--num-cpus=2", "--num-gpus=0", f"--object-store-memory={1024**3}",
        f"--temp-dir={temp_dir}",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env_agent}", f"--metrics-export-port={metrics}",
        f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
        "--disable-usage-stats",
    ]
    address = f"http://127.0.0.1:{dashboard}"
    head = RayHead(address=address, gcs_address=f"127.0.0.1:{gcs}", temp_dir=temp_dir, env=env, ray=ray, auth_token=auth_token)
    try:
        # its own session: a Ctrl-C of pytest does not reach the cluster's daemons
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, start_new_session=True)
        if started.returncode != 0:
            raise RuntimeError(f"ray start failed ({started.returncode}):\n{started.stdout[-3000:]}\n{started.stderr[-3000:]}")
        _wait_for_dashboard(address, auth_token, timeout=120)
        yield head
    finally:
        for sid in head.submitted:  # still running only if a test failed half-way
            try:
                if head.info(sid)["status"] not in TERMINAL:
                    head.stop(sid, timeout=60)
            except Exception:  # noqa: BLE001 - tearing down anyway
                pass
        _terminate(token)
        shutil.rmtree(temp_dir, ignore_errors=True)
