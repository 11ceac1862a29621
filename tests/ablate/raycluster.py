"""Private `ray start` clusters for tests: a head and extra nodes on this one machine.

    from tests.ablate.raycluster import RayCluster
    with RayCluster(num_cpus=2) as c:                       # head: its own session, ports, temp dir
        gpu = c.add_node(num_cpus=2, num_gpus=2, resources={"fake_node": 1})   # fake GPUs
        ... c.address ...                                   # "127.0.0.1:<gcs port>" for ray.init / --address
        c.kill(gpu)                                         # SIGKILL that node's whole session

    python -m tests.ablate.raycluster drive SPEC STORE ADDRESS [--autoscale] [--nodes-out F]
        # a driver process: ablate.run.driver.run_experiment with tests/ablate/fake_trainer.py

Every node is `ray start --block` in a session of its own (start_new_session), with a private
--temp-dir and free ports, so it never touches another Ray on the machine: stopping a node means
signalling its session (SIGTERM, then SIGKILL), never `ray stop`, which would stop every cluster
of the user. The private temp dir also keeps `ray_current_cluster` away from /tmp/ray, so no later
plain `ray.init()` attaches to these clusters.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Node death noticed in ~3 s instead of Ray's default ~30 s (GCS health checks of each raylet).
FAST_HEALTH_CHECK = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
                     "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3"}


_HANDED_OUT: set[int] = set()  # every port free_ports has returned in this process


def free_ports(n: int) -> list[int]:
    """n ports that were free a moment ago and that no earlier call in this process returned: the ports of
    one `ray start` come from several calls, and the kernel readily hands a just-closed port out again
    (a head once got the same port for its GCS and its dashboard agent, and did not start)."""
    socks: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < n:
            s = socket.socket()
            socks.append(s)  # held until all n are chosen: the kernel gives each a different port
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if port not in _HANDED_OUT:
                ports.append(port)
    finally:
        for s in socks:
            s.close()
    _HANDED_OUT.update(ports)
    return ports


def client_env(**extra: str) -> dict[str, str]:
    """Environment of a client process of these clusters (token auth, no inherited RAY_ADDRESS)."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", **extra}
    env.pop("RAY_ADDRESS", None)
    return env


@dataclass
class RayNode:
    proc: subprocess.Popen
    temp_dir: str
    log: Path  # stdout + stderr of `ray start`
    node_manager_port: int
    head: bool = False
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


def _signal_session(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class RayCluster:
    """A head node (CPU only unless told) plus nodes added with `add_node`; see module docstring."""

    def __init__(self, num_cpus: int = 2, num_gpus: int = 0, dashboard: bool = False,
                 env: dict[str, str] | None = None, start_timeout_s: float = 90.0) -> None:
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", **FAST_HEALTH_CHECK, **(env or {})}
        self.env.pop("RAY_ADDRESS", None)
        self.start_timeout_s = start_timeout_s
        self.nodes: list[RayNode] = []
        self.gcs_port, self.dashboard_port = free_ports(2)
        self.dashboard = dashboard
        self.head = self._start([f"--port={self.gcs_port}", "--head", f"--dashboard-port={self.dashboard_port}",
                                 "--dashboard-host=127.0.0.1", f"--include-dashboard={str(dashboard).lower()}",
                                 f"--ray-client-server-port={free_ports(1)[0]}"],
                                num_cpus, num_gpus, None, head=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def __enter__(self) -> "RayCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---- nodes ---------------------------------------------------------------------------
    def add_node(self, num_cpus: int = 2, num_gpus: int = 0, resources: dict[str, float] | None = None,
                 env: dict[str, str] | None = None) -> RayNode:
        """Start another node of this cluster (fake GPUs: Ray only counts them) and wait until it runs."""
        return self._start([f"--address={self.address}"], num_cpus, num_gpus, resources, env=env)

    def _start(self, args: list[str], num_cpus: int, num_gpus: int, resources: dict[str, float] | None,
               head: bool = False, env: dict[str, str] | None = None) -> RayNode:
        nm, om, metrics, agent_http, agent_grpc, env_agent = free_ports(6)
        temp = tempfile.mkdtemp(prefix="ablray-")  # short: Ray's socket paths live under it
        log = Path(temp) / "ray-start.log"
        cmd = ["ray", "start", "--block", *args, "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
               f"--num-gpus={num_gpus}", f"--node-manager-port={nm}", f"--object-manager-port={om}",
               f"--metrics-export-port={metrics}", f"--dashboard-agent-listen-port={agent_http}",
               f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={env_agent}",
               "--object-store-memory=80000000", "--disable-usage-stats", f"--temp-dir={temp}"]
        if resources:
            cmd.append(f"--resources={json.dumps(resources)}")
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**self.env, **(env or {})}, cwd=str(ROOT))
        node = RayNode(proc, temp, log, nm, head=head, ports={"object_manager": om})
        self.nodes.append(node)
        deadline = time.time() + self.start_timeout_s
        while "Ray runtime started" not in node.output():
            if not node.alive or time.time() > deadline:
                text = node.output()[-3000:]
                self.shutdown()
                raise RuntimeError(f"`{' '.join(cmd)}` did not start:\n{text}")
            time.sleep(0.2)
        return node

    def kill(self, node: RayNode) -> None:
        """SIGKILL the node's whole session: what a machine that disappears looks like to Ray."""
        _signal_session(node.proc, signal.SIGKILL)
        node.proc.wait()

    def stop(self, node: RayNode, grace_s: float = 20.0) -> None:
        """SIGTERM (`ray start --block` stops everything it started), then SIGKILL what is left."""
        if node.alive:
            _signal_session(node.proc, signal.SIGTERM)
            try:
                node.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        _signal_session(node.proc, signal.SIGKILL)
        node.proc.wait()
        shutil.rmtree(node.temp_dir, ignore_errors=True)

    def shutdown(self) -> None:
        """Stop every node, workers first, the head last; never raises."""
        for node in reversed(self.nodes):
            try:
                self.stop(node, grace_s=3.0)  # a head drains for 30 s on SIGTERM: not worth it here
            except Exception:  # noqa: BLE001 (teardown must go on)
                _signal_session(node.proc, signal.SIGKILL)
        self.nodes.clear()


def wait_for_dashboard(cluster: RayCluster, timeout_s: float = 90.0) -> None:
    """Until the head's dashboard answers HTTP (401 without the token counts as up)."""
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout_s
    while True:
        try:
            urllib.request.urlopen(f"{cluster.dashboard_url}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if not cluster.head.alive or time.time() > deadline:
                raise RuntimeError("the Ray dashboard did not come up:\n" + cluster.head.output()[-3000:])
            time.sleep(0.5)


def procs_with(text: str) -> list[int]:
    """pids whose command line contains `text` (a run's temp config file carries its run id)."""
    out = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    out.append(int(pid))
        except (OSError, ValueError):
            continue
    return out


# ---------------------------------------------------------------------------------------------
# A driver process (run by the multi-node tests): the experiment with the fake trainer
# ---------------------------------------------------------------------------------------------
def drive(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m tests.ablate.raycluster drive")
    ap.add_argument("spec")
    ap.add_argument("store")
    ap.add_argument("address")
    ap.add_argument("--autoscale", action="store_true")
    ap.add_argument("--nodes-out", help="write ray.nodes() here (JSON) when done")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import ray

    from ablate.errors import AblateError
    from ablate.run.driver import LaunchOptions, ray_session, run_experiment
    from ablate.spec.model import load_spec
    from ablate.store.parquet import Store

    opts = LaunchOptions(module="tests.ablate.fake_trainer", autoscale=a.autoscale, grace_s=2.0)
    code = 0
    with ray_session(a.address):
        try:
            results = run_experiment(load_spec(a.spec), Store(a.store), options=opts)
            print(json.dumps([[r.request.arm, r.request.seed, r.status] for r in results]), flush=True)
        except AblateError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            code = e.exit_code
        if a.nodes_out:
            Path(a.nodes_out).write_text(json.dumps(ray.nodes(), default=str))
    return code


if __name__ == "__main__":
    if sys.argv[1:2] != ["drive"]:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(drive(sys.argv[2:]))
