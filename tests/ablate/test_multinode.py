"""Multi-node behaviour on one machine: a CPU-only head and `ray start` nodes with FAKE GPUs.

    python -m pytest tests/ablate/test_multinode.py -q -m e2e        # ~1.5 min on 2 cores

The cluster (tests/ablate/raycluster.py) is a head with 2 CPUs and no GPU, like cluster.yaml's
head, plus nodes that declare 2 GPUs Ray only counts. Drivers are separate processes
(`python -m tests.ablate.raycluster drive ...`: ablate.run.driver.run_experiment with
tests/ablate/fake_trainer.py), connected with --address like a driver on the head. Checked:

* without --autoscale, a GPU spec fails fast while no node can hold a run; with it, the driver
  warns and waits, and the runs start once a GPU node joins (what the autoscaler would add);
* every run ran on the GPU node, saw the GPU id Ray gave it in CUDA_VISIBLE_DEVICES (two runs
  in flight together never share one), node_id/node_ip are recorded, rows are in the driver's store;
* a node SIGKILLed while its runs are in flight: the lost attempts are recorded `failed`, retried
  on a replacement node, and every (arm, seed) ends with exactly one `ok` row; no trainer survives.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ablate.store.parquet import Store
from tests.ablate.raycluster import ROOT, RayCluster, RayNode, client_env, procs_with

pytestmark = pytest.mark.e2e
GPU_NODE = {"num_cpus": 2, "num_gpus": 2, "resources": {"fake_node": 1}}
STEP_SLEEP_S = "0.5"  # the fake trainer's step sleep on the GPU nodes: runs of ~2.5 s + launch


@pytest.fixture(scope="module")
def cluster():
    c = RayCluster(num_cpus=2, num_gpus=0, env={"PYTHONPATH": str(ROOT)})
    try:
        yield c
    finally:
        c.shutdown()


def gpu_node(cluster: RayCluster) -> RayNode:
    return cluster.add_node(**GPU_NODE, env={"FAKE_TRAINER_SLEEP_S": STEP_SLEEP_S})


def write_spec(tmp_path: Path, name: str, retries: int = 0, **resources) -> Path:
    spec = {"name": name, "trainer": {"preset": "tiny"},
            "arms": {"baseline": {}, "lr": {"optim.muon.lr": 0.05}}, "seeds": 2, "retries": retries,
            "resources": {"gpus_per_run": 1, **resources}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def driver(cluster: RayCluster, spec: Path, store: Path, *flags: str, out: Path) -> subprocess.Popen:
    """A driver process; stdout + stderr go to `out`."""
    with open(out, "wb") as f:
        return subprocess.Popen([sys.executable, "-m", "tests.ablate.raycluster", "drive", str(spec), str(store),
                                 cluster.address, *flags], cwd=ROOT, env=client_env(), stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, out: Path, timeout: float) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        pytest.fail(f"driver did not finish in {timeout:.0f} s:\n{out.read_text()[-4000:]}")
    return out.read_text()


def node_ids(nodes_json: Path) -> dict[str, set[str]]:
    """Node ids by kind: 'gpu' (the fake_node resource), 'head'."""
    nodes = json.loads(nodes_json.read_text())
    kinds: dict[str, set[str]] = {"gpu": set(), "head": set()}
    for n in nodes:
        res = n.get("Resources") or {}
        if res.get("fake_node") or n.get("Alive") is False:  # dead nodes lose their resources
            kinds["gpu"].add(n["NodeID"])
        elif "node:__internal_head__" in res:
            kinds["head"].add(n["NodeID"])
    return kinds


def gpu_id(row) -> str:
    observed = json.loads(row["config_json"])["fake_observed"]
    return observed["cuda_visible_devices"]


def test_autoscale_waits_for_a_gpu_node_then_runs_there(cluster: RayCluster, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "mn-place", compile_cache_dir="/tmp/ablate-test-cache")
    store_dir = tmp_path / "store"
    # plain cluster semantics: no node can hold a 1-GPU run → exit 2 at once, nothing written
    t0 = time.time()
    plain = driver(cluster, spec, store_dir, out=tmp_path / "plain.log")
    text = finish(plain, tmp_path / "plain.log", 60)
    assert plain.returncode == 2, text[-3000:]
    assert "resources.gpus_per_run=1: no node of the connected Ray cluster can hold one run" in text
    assert time.time() - t0 < 45 and Store(str(store_dir)).runs("mn-place").empty

    # --autoscale: a warning, then the runs wait PENDING until a GPU node joins
    log = tmp_path / "auto.log"
    auto = driver(cluster, spec, store_dir, "--autoscale", "--nodes-out", str(tmp_path / "nodes.json"), out=log)
    try:
        deadline = time.time() + 60
        while "wait PENDING until the autoscaler adds a node" not in log.read_text():
            assert auto.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(2.0)
        assert auto.poll() is None, "the driver must wait, not fail"
        node = gpu_node(cluster)  # what the autoscaler would launch
        text = finish(auto, log, 120)
    finally:
        if auto.poll() is None:
            os.killpg(auto.pid, 9)
    assert auto.returncode == 0, text[-4000:]

    runs = Store(str(store_dir)).runs("mn-place")
    assert len(runs) == 4 and (runs["status"] == "ok").all()
    assert sorted(zip(runs["arm"], runs["seed"])) == [("baseline", 0), ("baseline", 1), ("lr", 0), ("lr", 1)]
    kinds = node_ids(tmp_path / "nodes.json")
    assert len(kinds["gpu"]) == 1 and len(kinds["head"]) == 1
    assert set(runs["node_id"]) == kinds["gpu"], "every run on the GPU node, none on the head"
    assert runs["node_ip"].notna().all()
    # each run saw exactly the one GPU Ray gave it, as CUDA_VISIBLE_DEVICES and as its GPU ids
    ids = [gpu_id(r) for _, r in runs.iterrows()]
    assert set(ids) <= {"0", "1"}, ids
    assert (runs["gpu_count"] == 1).all() and list(runs["gpu_uuids"]) == [f"fake-GPU-{i}" for i in ids]
    # the trial's worker was started by the GPU node's raylet (a process of that node's session)
    for _, r in runs.iterrows():
        raylet = int(json.loads(r["config_json"])["fake_observed"]["ray_raylet_pid"])
        assert os.getpgid(raylet) == node.proc.pid
    # two runs in flight together hold different GPUs (and 2 GPUs allow 2 at once)
    rows = list(runs.itertuples())
    overlaps = [(a, b) for i, a in enumerate(rows) for b in rows[i + 1:]
                if a.started_at < b.ended_at and b.started_at < a.ended_at]
    assert overlaps, "2 GPUs on the node: runs should have overlapped"
    assert all(gpu_id(runs.loc[a.Index]) != gpu_id(runs.loc[b.Index]) for a, b in overlaps)
    # the compile cache setting reached every run as the trainer override, outside the config hash
    configs = [json.loads(c) for c in runs["config_json"]]
    assert all(c["runtime.inductor_cache_dir"] == "/tmp/ablate-test-cache" for c in configs)
    assert all("inductor" not in o for o in runs["overrides_json"])


def test_node_killed_mid_run_is_retried_on_a_replacement(cluster: RayCluster, tmp_path: Path) -> None:
    alive = [n for n in cluster.nodes if not n.head and n.alive]
    node = alive[0] if alive else gpu_node(cluster)
    spec = write_spec(tmp_path, "mn-kill", retries=1)
    from ablate.spec.model import load_spec

    ours = [f"-{load_spec(spec).config_hash(arm)}-a" for arm in ("baseline", "lr")]  # in the run ids
    store_dir = tmp_path / "store"
    log = tmp_path / "kill.log"
    drv = driver(cluster, spec, store_dir, "--nodes-out", str(tmp_path / "nodes.json"), out=log)
    seen: list[int] = []
    try:
        deadline = time.time() + 90
        while not seen:  # a fake trainer rank of this experiment is running on the node
            seen = [p for p in procs_with("tests.ablate.fake_trainer") if _is_rank(p, ours)]
            assert drv.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        time.sleep(0.3)
        assert all(_exists(p) for p in seen), "the run ended before the kill; raise STEP_SLEEP_S"
        cluster.kill(node)  # the machine is gone: raylet, workers' parent, everything in its session
        killed_at = time.time()
        replacement = gpu_node(cluster)
        text = finish(drv, log, 150)
    finally:
        if drv.poll() is None:
            os.killpg(drv.pid, 9)
    assert drv.returncode == 0, text[-4000:]

    runs = Store(str(store_dir)).runs("mn-kill")
    assert runs["run_id"].is_unique
    ok = runs[runs["status"] == "ok"]
    lost = runs[runs["status"] != "ok"]
    # exactly one ok row per (arm, seed): nothing lost, nothing run twice to success
    assert sorted(zip(ok["arm"], ok["seed"])) == [("baseline", 0), ("baseline", 1), ("lr", 0), ("lr", 1)]
    assert 1 <= len(lost) <= 2 and (lost["status"] == "failed").all()  # ≤ 2 runs fit on the killed node
    lost_node = _node_id_of(tmp_path / "nodes.json", node)
    # Ray 2.60 words a node's death three ways ("...its node has died", "...node was terminated
    # unexpectedly", "...temporarily unavailable: ... Socket closed"), depending on what reaches the
    # driver first; the row leads with the cause in ablate's words and names the node either way.
    for err in lost["error"]:
        assert err.startswith(f"Ray trial failed: the run's node {lost_node} ("), err
        assert " died. Ray: " in err, err
    assert (lost["attempt"] == 1).all()
    for _, r in lost.iterrows():  # each lost (arm, seed) was retried as attempt 2 and finished
        retry = ok[(ok["arm"] == r["arm"]) & (ok["seed"] == r["seed"])]
        assert list(retry["attempt"]) == [2], runs[["run_id", "status"]]
        assert retry["started_at"].iloc[0].timestamp() > killed_at - 1
    kinds = node_ids(tmp_path / "nodes.json")
    assert set(lost["node_id"]) == {lost_node}  # reported by the trial when it started
    assert set(runs["node_id"]) <= kinds["gpu"] and not set(runs["node_id"]) & kinds["head"]
    new_id = _node_id_of(tmp_path / "nodes.json", replacement)
    assert set(ok[ok["attempt"] == 2]["node_id"]) == {new_id}, "retries ran on the replacement node"
    assert Store(str(store_dir)).inflight("mn-kill") == []
    # the killed node's trainers did not survive it (their worker's guard killed them)
    deadline = time.time() + 30
    while any(_exists(p) for p in seen) or [p for p in procs_with("tests.ablate.fake_trainer") if _is_rank(p, ours)]:
        assert time.time() < deadline, "orphaned fake trainer processes"
        time.sleep(0.5)


def _exists(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _is_rank(pid: int, run_id_parts: list[str]) -> bool:
    """A fake trainer rank (not torchrun, not the guard) of an attempt of this test: its --config
    file name carries the run id."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
    except OSError:
        return False
    return "torch.distributed.run" not in argv and "-m" in argv and "tests.ablate.fake_trainer" in argv \
        and not any("launch.py" in a for a in argv) and any(part in a for a in argv for part in run_id_parts)


def _node_id_of(nodes_json: Path, node: RayNode) -> str:
    for n in json.loads(nodes_json.read_text()):
        if n.get("NodeManagerPort") == node.node_manager_port:
            return n["NodeID"]
    raise AssertionError(f"no node with NodeManagerPort {node.node_manager_port} in {nodes_json}")
