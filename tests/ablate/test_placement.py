"""Placement policy and compile cache, on fake `ray.nodes()` data (no cluster).

    python -m pytest tests/ablate/test_placement.py -q

A run is ONE bundle (never split across nodes); an 8-GPU run takes the `gpu_node` unit where the
cluster advertises it; smaller runs pack; a plain cluster fails fast, an autoscaling one waits.
The multi-node behaviour on a real `ray start` cluster is tests/ablate/test_multinode.py.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from ablate.errors import Interrupted, SpecError
from ablate.run.placement import (GPU_NODE_RESOURCE, check_cluster, concurrency_limit, max_concurrency,
                              run_bundle)
from ablate.spec.model import parse_spec_text

SPEC = """\
name: place
trainer: {preset: tiny, set: {runtime.reference_world_size: 8}}
arms: {baseline: {}, lr: {optim.muon.lr: 0.05}}
seeds: 2
resources: {RES}
"""


def spec(resources: str, extra: str = ""):
    return parse_spec_text(SPEC.replace("{RES}", resources) + extra)


def node(cpu: float, gpu: float = 0.0, alive: bool = True, **custom: float) -> dict[str, Any]:
    """One entry of ray.nodes() as Ray 2.60 returns it (the keys ablate reads)."""
    res: dict[str, float] = {"CPU": cpu, "memory": 1e12, "object_store_memory": 1e10, "node:10.0.0.9": 1.0, **custom}
    if gpu:
        res["GPU"] = gpu
    return {"NodeID": f"n{cpu}-{gpu}", "Alive": alive, "NodeManagerAddress": "10.0.0.9", "Resources": res}


HEAD = node(0, **{"node:__internal_head__": 1.0})  # cluster.yaml's head: no CPU, no GPU for Ray
P5 = node(192, 8, gpu_node=1.0)  # cluster.yaml's gpu8 worker type
BOX = node(64, 8)  # a plain `ray start` on one 8-GPU machine


# ---- one bundle, gpu_node -------------------------------------------------------------------
@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
@pytest.mark.parametrize("cluster", [[HEAD, P5, P5], [BOX], [HEAD]], ids=["cluster.yaml", "plain-box", "empty-pool"])
def test_all_gpus_of_a_run_are_in_one_bundle(gpus: int, cluster: list[dict]) -> None:
    r = spec(f"{{gpus_per_run: {gpus}, cpus_per_run: 16}}").resources
    bundle = run_bundle(r, cluster)
    assert isinstance(bundle, dict)  # ONE bundle: CPUs and every GPU together, so one node
    assert bundle["GPU"] == gpus and bundle["CPU"] == 16


def test_8_gpu_run_takes_the_gpu_node_unit_only_where_advertised() -> None:
    eight = spec("{gpus_per_run: 8}").resources
    assert run_bundle(eight, [HEAD, P5]) == {"CPU": 8.0, "GPU": 8.0, GPU_NODE_RESOURCE: 1.0}
    assert run_bundle(eight, [BOX]) == {"CPU": 8.0, "GPU": 8.0}  # plain box: no such resource
    assert run_bundle(eight, [HEAD]) == {"CPU": 8.0, "GPU": 8.0}  # autoscaling pool not started yet
    dead_p5 = node(192, 8, alive=False, gpu_node=1.0)
    assert GPU_NODE_RESOURCE not in run_bundle(eight, [HEAD, dead_p5, BOX])  # only alive nodes count
    for gpus in (1, 2, 4):  # proxies never take it: they pack
        assert GPU_NODE_RESOURCE not in run_bundle(spec(f"{{gpus_per_run: {gpus}}}").resources, [HEAD, P5])
    cpu = spec("{gpus_per_run: 0, cpu_ranks_per_run: 2}").resources
    assert run_bundle(cpu, [HEAD, P5]) == {"CPU": 2.0}  # no zero-GPU entry in the bundle


def test_concurrency_8_gpu_runs_one_per_node_proxies_pack_8_per_node() -> None:
    cluster = [HEAD, P5, P5, node(192, 8, alive=False, gpu_node=1.0)]
    assert max_concurrency(spec("{gpus_per_run: 8}"), cluster) == 2
    assert max_concurrency(spec("{gpus_per_run: 1}"), cluster) == 16  # 8 per node
    assert max_concurrency(spec("{gpus_per_run: 1, cpus_per_run: 24}"), cluster) == 16  # 192 / 24 = 8
    assert max_concurrency(spec("{gpus_per_run: 1, cpus_per_run: 32}"), cluster) == 12  # CPU-bound: 6 per node
    assert max_concurrency(spec("{gpus_per_run: 2}"), cluster) == 8
    # a 16-GPU node with one gpu_node unit still takes one 8-GPU run; without the unit, two
    big = node(256, 16, gpu_node=1.0)
    assert max_concurrency(spec("{gpus_per_run: 8}"), [big]) == 1
    assert max_concurrency(spec("{gpus_per_run: 8}"), [node(256, 16)]) == 2
    assert max_concurrency(spec("{gpus_per_run: 8}"), [HEAD]) == 1  # never 0 (Tune needs ≥ 1)


def test_concurrency_limit_is_uncapped_when_autoscaling() -> None:
    s = spec("{gpus_per_run: 1}")
    assert concurrency_limit(s, [HEAD, P5]) == 8
    assert concurrency_limit(s, [HEAD, P5], autoscale=True) is None
    assert concurrency_limit(s, [HEAD], autoscale=True) is None


# ---- pre-flight check -------------------------------------------------------------------
def test_plain_cluster_fails_fast_autoscaling_cluster_warns() -> None:
    eight = spec("{gpus_per_run: 8}")
    with pytest.raises(SpecError) as info:
        check_cluster(eight, [HEAD, node(32, 4)])
    msg = str(info.value)
    assert "resources.gpus_per_run=8: no node of the connected Ray cluster can hold one run" in msg
    assert "8 CPU + 8 GPU on one node" in msg and "32 CPU, 4 GPU" in msg and "--autoscale" in msg
    note = check_cluster(eight, [HEAD], autoscale=True)
    assert note is not None and "resources.gpus_per_run=8" in note and "wait PENDING" in note
    assert check_cluster(eight, [HEAD, P5], autoscale=True) is None  # fits now: nothing to say
    assert check_cluster(eight, [HEAD, P5]) is None
    assert check_cluster(eight, [BOX]) is None
    # a dead node never counts, on either path
    with pytest.raises(SpecError):
        check_cluster(eight, [HEAD, node(192, 8, alive=False, gpu_node=1.0)])
    cpu = spec("{gpus_per_run: 0, cpu_ranks_per_run: 4}")
    with pytest.raises(SpecError, match="resources.cpu_ranks_per_run=4"):
        check_cluster(cpu, [node(2), node(2)])


def test_run_requests_warns_and_goes_on_when_autoscaling(monkeypatch: pytest.MonkeyPatch, store,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """The driver path: plain → SpecError before any Tune run; autoscale → warning, then Tune."""
    import contextlib

    from ablate.run import driver as orchestrate
    from ablate.spec.matrix import expand

    s = spec("{gpus_per_run: 8}")
    monkeypatch.setattr(orchestrate, "ray_session", lambda address=None: contextlib.nullcontext())
    monkeypatch.setattr(orchestrate.ray, "nodes", lambda: [HEAD])
    batches: list[int] = []

    def fake_run(spec_, todo, store_, progress, opts, lock=None, first_order=0):
        batches.append(len(todo))
        return [orchestrate.RunResult(p.request, "ok") for p in todo]

    monkeypatch.setattr(orchestrate, "_run_tune", fake_run)
    with pytest.raises(SpecError, match="no node of the connected Ray cluster"):
        orchestrate.run_requests(s, expand(s), store)
    assert batches == []
    with caplog.at_level(logging.WARNING, logger="ablate"):
        out = orchestrate.run_requests(s, expand(s), store, options=orchestrate.LaunchOptions(autoscale=True))
    assert batches == [4] and [r.status for r in out] == ["ok"] * 4
    assert "wait PENDING until the autoscaler adds a node" in caplog.text


class _FakeTuner:
    seen: dict[str, Any] = {}

    def __init__(self, trainable, tune_config, run_config) -> None:
        _FakeTuner.seen = {"resources": trainable._resources, "limit": tune_config.max_concurrent_trials,
                           "n": tune_config.num_samples}

    def fit(self) -> None:
        return None


@pytest.mark.parametrize("autoscale", [False, True])
def test_tune_gets_one_placement_group_bundle_and_the_limit(monkeypatch: pytest.MonkeyPatch, store,
                                                           autoscale: bool) -> None:
    from ablate.run import driver as orchestrate
    from ablate.spec.matrix import PlannedRun, expand
    from ablate.run.progress import NullProgress

    s = spec("{gpus_per_run: 8, cpus_per_run: 96}")
    monkeypatch.setattr(orchestrate.ray, "nodes", lambda: [HEAD, P5, P5])
    monkeypatch.setattr(orchestrate.tune, "Tuner", _FakeTuner)
    todo = [PlannedRun(r, "todo", 1, 2 if i == 0 else 1) for i, r in enumerate(expand(s))]
    with pytest.raises(Interrupted):  # the fake Tune ran nothing: the runs have no outcome
        orchestrate._run_tune(s, todo, store, NullProgress(), orchestrate.LaunchOptions(autoscale=autoscale))
    pgf = _FakeTuner.seen["resources"]
    assert pgf.bundles == [{"CPU": 96.0, "GPU": 8.0, GPU_NODE_RESOURCE: 1.0}]  # one bundle, whole node
    # autoscaling: no cap (each of the 4 runs may wait as a pending placement group); n: every attempt allowed
    assert _FakeTuner.seen["limit"] == (4 if autoscale else 2) and _FakeTuner.seen["n"] == 5


def test_cli_autoscale_needs_a_cluster_address(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ablate.cli.main import app

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    path = tmp_path / "s.yaml"
    path.write_text(SPEC.replace("{RES}", "{gpus_per_run: 1}"))
    res = CliRunner().invoke(app, ["run", str(path), "--autoscale", "--store", str(tmp_path / "st")])
    assert res.exit_code == 2 and "--autoscale needs a cluster" in res.output
    dry = CliRunner().invoke(app, ["run", str(path), "--autoscale", "--dry-run"], env={"COLUMNS": "200"})
    assert dry.exit_code == 0 and "compile cache torch defaults" in dry.output


# ---- compile cache ---------------------------------------------------------------------
def test_compile_cache_dir_reaches_the_run_but_not_its_identity() -> None:
    """Two specs differing only in resources.compile_cache_dir: the same config hashes and run
    ids (so a run resumes on any node), while each run gets its own runtime.inductor_cache_dir."""
    from trainer.config import config_hash
    from trainer.presets import load_config

    from ablate.spec.matrix import expand
    from ablate.run.driver import LaunchOptions, make_job

    plain = spec("{gpus_per_run: 1}")
    cached = spec("{gpus_per_run: 1, compile_cache_dir: /opt/ablate-cache}")
    assert cached.resources.compile_cache_dir == "/opt/ablate-cache" and plain.resources.compile_cache_dir == ""
    reqs_plain, reqs_cached = expand(plain), expand(cached)
    assert [r.config_hash for r in reqs_plain] == [r.config_hash for r in reqs_cached]
    assert [r.run_id(1) for r in reqs_plain] == [r.run_id(1) for r in reqs_cached]
    assert all(plain.config_hash(a) == cached.config_hash(a) for a in plain.arms)
    for rp, rc in zip(reqs_plain, reqs_cached):
        jp = make_job(plain, rp, rp.run_id(1), LaunchOptions())
        jc = make_job(cached, rc, rc.run_id(1), LaunchOptions())
        assert "runtime.inductor_cache_dir" not in jp["overrides"]
        assert jc["overrides"] == {**jp["overrides"], "runtime.inductor_cache_dir": "/opt/ablate-cache"}
        assert "runtime.inductor_cache_dir" not in rc.overrides  # overrides_json: the arm, not the node
        # what the trainer resolves and hashes (trainer.config.config_hash leaves the cache out)
        cfg_p, cfg_c = load_config("tiny", jp["overrides"]), load_config("tiny", jc["overrides"])
        assert cfg_c.runtime.inductor_cache_dir == "/opt/ablate-cache" and cfg_p.runtime.inductor_cache_dir == ""
        assert config_hash(cfg_p) == config_hash(cfg_c) == rc.config_hash, (
            "trainer.config.config_hash must exclude runtime.inductor_cache_dir")


# ---- node failures ------------------------------------------------------------------------
def test_lost_node_error_text_puts_the_cause_first(tmp_path: Path) -> None:
    """What Tune wrote for a trial whose node died becomes the row's error, cause first."""
    from ablate.run.driver import trial_error

    err = tmp_path / "error.txt"
    err.write_text("Failure # 1 (occurred at 2026-11-22_16-41-11)\nThe actor died unexpectedly before finishing "
                   "this task.\n\tip: 10.0.0.9\nThe actor died because its node has died. Node Id: abc123\n")

    class Trial:
        error_file = str(err)

        def get_error(self):
            return None

    text = trial_error(Trial())
    assert text.splitlines()[0] == "The actor died because its node has died. Node Id: abc123"
    assert "Failure #" not in text and "ip: 10.0.0.9" in text
    Trial.error_file = str(tmp_path / "missing.txt")  # not written yet: Tune's storage copy, or a default
    assert trial_error(Trial()) == "Ray trial error"


def test_lost_actor_on_a_dead_node_is_named_as_the_cause() -> None:
    """Ray may report a node's loss as an unreachable actor before its GCS declares the node dead:
    the row names the node once Ray's node table says it is dead (polled), and only then."""
    from ablate.run.driver import node_death

    node = {"node_id": "abc", "node_ip": "10.0.0.9", "hostname": "gpu-3"}
    unavailable = "The actor is temporarily unavailable: RpcError: RPC error: Socket closed rpc_code: 14."
    polls = []

    def table(alive_for: int):
        def nodes():
            polls.append(1)
            return [{"NodeID": "head", "Alive": True}, {"NodeID": "abc", "Alive": len(polls) <= alive_for}]
        return nodes

    assert node_death(node, unavailable, wait_s=5, nodes=table(2)) == "the run's node abc (gpu-3, 10.0.0.9) died"
    assert len(polls) == 3  # alive, alive, dead
    polls.clear()
    assert node_death(node, unavailable, wait_s=0, nodes=table(99)) is None  # still alive: no claim
    assert node_death(node, "RuntimeError: trainer exited 1", wait_s=5, nodes=table(0)) is None  # not a lost actor
    assert node_death({}, unavailable, wait_s=5, nodes=table(0)) is None  # the trial never said where it ran
    assert node_death(node, unavailable, wait_s=5, nodes=lambda: []) is None  # unknown node: no claim

    def no_gcs():
        raise RuntimeError("Ray has not been started yet")

    assert node_death(node, unavailable, wait_s=5, nodes=no_gcs) is None
