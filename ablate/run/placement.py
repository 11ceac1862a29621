"""Where runs go on a Ray cluster: the one bundle of a run, the pre-flight check, the concurrency.

    from ablate.run.placement import run_bundle, check_cluster, concurrency_limit
    bundle = run_bundle(spec.resources, ray.nodes())     # {"CPU": 4.0, "GPU": 8.0, "gpu_node": 1.0}
    note = check_cluster(spec, ray.nodes(), autoscale=True)   # SpecError, or a warning text, or None
    limit = concurrency_limit(spec, ray.nodes(), autoscale=False)   # Tune's max_concurrent_trials

Pure functions of the spec and `ray.nodes()` data (a list of dicts with "Alive" and "Resources"),
so the placement policy is tested without a cluster (tests/ablate/test_placement.py). The policy
(docs/cluster.md, "Placement"):

* A run's resources are ONE bundle: its CPUs and all its GPUs. A bundle never spans nodes, so
  torchrun's ranks always share one node (and its NVLink). Never split GPUs over bundles: Tune
  gives the trial function only the first bundle's GPUs.
* An 8-GPU run also asks for one unit of the custom resource `gpu_node` when an alive node of the
  cluster advertises it (cluster.yaml gives each 8-GPU node exactly one), so it is the only run on
  its node. Where no alive node has it (a plain `ray start` box, or an autoscaling pool that has
  not started yet) the bundle is CPU + GPU alone, which an 8-GPU node can hold once.
* Runs with fewer GPUs pack: Ray places as many bundles per node as fit (8 one-GPU proxies on an
  8-GPU node), so at most sum over nodes of min(have / need) runs at once.
* Plain cluster: a run no alive node can ever hold fails at once (SpecError, exit 2) instead of
  waiting forever. Autoscaling cluster (`ablate run --autoscale`): a warning, and the runs wait
  PENDING; Ray's autoscaler sees the pending placement groups and adds nodes. Concurrency is then
  not capped by ablate (the autoscaler's max_workers is the bound).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ablate.errors import SpecError

if TYPE_CHECKING:
    from ablate.spec.model import Resources, Spec

GPU_NODE_RESOURCE = "gpu_node"  # one unit per 8-GPU node (cluster.yaml); an 8-GPU run takes it
WHOLE_NODE_GPUS = 8  # gpus_per_run that means "a whole node"


def alive_nodes(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [n for n in nodes if n.get("Alive", n.get("alive", False))]


def advertises(nodes: list[dict[str, Any]], resource: str) -> bool:
    """Whether some alive node offers at least one unit of `resource`."""
    return any(n.get("Resources", {}).get(resource, 0.0) >= 1.0 for n in alive_nodes(nodes))


def run_bundle(resources: "Resources", nodes: list[dict[str, Any]]) -> dict[str, float]:
    """The single Ray bundle of one run on this cluster (zero entries left out)."""
    bundle = {"CPU": float(resources.cpus)}
    if resources.gpus_per_run:
        bundle["GPU"] = float(resources.gpus_per_run)
        if resources.gpus_per_run == WHOLE_NODE_GPUS and advertises(nodes, GPU_NODE_RESOURCE):
            bundle[GPU_NODE_RESOURCE] = 1.0
    return bundle


def bundles_on(node: dict[str, Any], bundle: dict[str, float]) -> int:
    """How many copies of `bundle` the node's total resources hold."""
    have = node.get("Resources", {})
    return int(min(math.floor(have.get(k, 0.0) / v + 1e-9) for k, v in bundle.items() if v > 0))


def max_concurrency(spec: "Spec", nodes: list[dict[str, Any]]) -> int:
    """Runs that fit on the alive nodes at once (whole bundles per node; at least 1)."""
    bundle = run_bundle(spec.resources, nodes)
    return max(1, sum(bundles_on(n, bundle) for n in alive_nodes(nodes)))


def concurrency_limit(spec: "Spec", nodes: list[dict[str, Any]], autoscale: bool = False) -> int | None:
    """Tune's max_concurrent_trials: what fits now on a fixed cluster (keeps the seed-major launch
    order); None (no cap) when the cluster autoscales, so every queued run becomes a pending
    placement group the autoscaler can act on."""
    return None if autoscale else max_concurrency(spec, nodes)


def _describe(nodes: list[dict[str, Any]]) -> str:
    parts = []
    for n in alive_nodes(nodes):
        res = n.get("Resources", {})
        extra = f", {GPU_NODE_RESOURCE}" if res.get(GPU_NODE_RESOURCE) else ""
        parts.append(f"{n.get('NodeManagerAddress', '?')}: {int(res.get('CPU', 0))} CPU, "
                     f"{int(res.get('GPU', 0))} GPU{extra}")
    return "; ".join(parts) or "no alive nodes"


def check_cluster(spec: "Spec", nodes: list[dict[str, Any]], autoscale: bool = False) -> str | None:
    """Pre-flight check that some alive node (`ray.nodes()`) can hold one run.

    None when one can. Otherwise a plain cluster raises SpecError (runs would stay PENDING
    forever); with `autoscale` the problem is returned as a warning text and the caller lets
    Tune wait for the autoscaler."""
    bundle = run_bundle(spec.resources, nodes)
    alive = alive_nodes(nodes)
    if any(bundles_on(n, bundle) >= 1 for n in alive):
        return None
    r = spec.resources
    if bundle.get("GPU", 0.0) > max((n.get("Resources", {}).get("GPU", 0.0) for n in alive), default=0.0):
        field, val = "resources.gpus_per_run", r.gpus_per_run
    else:
        field, val = ("resources.cpus_per_run", r.cpus) if r.cpus_per_run else ("resources.cpu_ranks_per_run", r.ranks)
    need = f"{int(bundle['CPU'])} CPU + {int(bundle.get('GPU', 0))} GPU"
    need += f" + 1 {GPU_NODE_RESOURCE}" if GPU_NODE_RESOURCE in bundle else ""
    what = (f"{field}={val}: no node of the connected Ray cluster can hold one run ({need} on one node); "
            f"the cluster has {_describe(nodes)}.")
    if autoscale:
        return (f"{what} --autoscale: the runs wait PENDING until the autoscaler adds a node that can hold "
                "them (`ray status` lists pending and infeasible demands; a request no node type can "
                "hold waits forever: stop with Ctrl-C)")
    raise SpecError(f"{what} Runs would stay PENDING forever; fix: lower the request, connect to a larger "
                    "cluster (--address), or pass --autoscale if the cluster's autoscaler will add such "
                    "a node", spec.source)
