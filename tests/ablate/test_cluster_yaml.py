"""cluster.yaml is a valid Ray 2.60 cluster-launcher config and keeps ablate's invariants.

    python -m pytest tests/ablate/test_cluster_yaml.py -q

No cloud access: the config is validated against the JSON schema shipped inside the installed
ray package (ray/autoscaler/ray-schema.json), then through the launcher's own
prepare_config + validate_config (what `ray up` runs before it talks to the cloud). The commented
GCP variant is uncommented and checked the same way.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster.yaml"
GPU_RESOURCE = "gpu_node"  # one unit per 8-GPU node; ablate puts it in a gpus_per_run=8 bundle
TORCH_PIN = re.compile(r"torch==(\d+\.\d+\.\d+)")


def _schema() -> dict[str, Any]:
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text())


def _aws() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER.read_text())


def _gcp() -> dict[str, Any]:
    """cluster.yaml with the commented `# >>> gcp` … `# <<< gcp` block swapped in."""
    text = CLUSTER.read_text()
    m = re.search(r"^# >>> gcp\n(.*?)^# <<< gcp$", text, re.S | re.M)
    assert m, "cluster.yaml lost its `# >>> gcp` … `# <<< gcp` block"
    block = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in m.group(1).splitlines())
    cfg = _aws()
    cfg.update(yaml.safe_load(block))
    return cfg


VARIANTS = {"aws": _aws, "gcp": _gcp}


@pytest.fixture(params=list(VARIANTS))
def cfg(request: pytest.FixtureRequest) -> dict[str, Any]:
    return VARIANTS[request.param]()


def _gpu_types(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: t for n, t in cfg["available_node_types"].items() if t["resources"].get("GPU", 0) > 0}


def test_schema_validates(cfg: dict[str, Any]) -> None:
    jsonschema.validate(cfg, _schema())


def test_schema_check_is_live() -> None:
    """The validator must reject what Ray would reject (a typo'd key, a fractional resource)."""
    schema = _schema()
    bad = _aws()
    bad["idle_timeout_minute"] = 5
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    bad = _aws()
    next(iter(_gpu_types(bad).values()))["resources"][GPU_RESOURCE] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_ray_launcher_accepts_it(cfg: dict[str, Any]) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    # Node-type max_workers must fit under the global bound, or the autoscaler clips silently.
    for name, t in prepared["available_node_types"].items():
        assert t["max_workers"] <= prepared["max_workers"], name


def test_head_is_cpu_only(cfg: dict[str, Any]) -> None:
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"].get("GPU") == 0
    assert head["resources"].get("CPU") == 0, "no trial may be scheduled on the head"
    assert GPU_RESOURCE not in head["resources"]


def test_gpu_worker_type_is_one_8_gpu_node(cfg: dict[str, Any]) -> None:
    gpu = _gpu_types(cfg)
    assert len(gpu) == 1, f"expected one GPU worker type, got {sorted(gpu)}"
    (name, t), = gpu.items()
    assert name != cfg["head_node_type"]
    assert t["resources"]["GPU"] == 8
    assert t["resources"][GPU_RESOURCE] == 1, "one gpu_node unit per 8-GPU node"
    assert t["resources"]["CPU"] >= 8 * 8, "8 one-GPU proxies need CPUs each"
    assert t.get("min_workers", 0) == 0 and t["max_workers"] >= 1, "the GPU pool autoscales from 0"
    machine = t["node_config"].get("InstanceType") or t["node_config"].get("machineType")
    assert machine in ("p5.48xlarge", "a3-highgpu-8g"), machine
    assert cfg["idle_timeout_minutes"] > 0


def test_torch_is_pinned_cpu_on_head_cuda_on_workers() -> None:
    cfg = _aws()
    head = " ".join(cfg["head_setup_commands"])
    work = " ".join(cfg["worker_setup_commands"])
    assert TORCH_PIN.search(head) and TORCH_PIN.search(work), "setup must pin torch==X.Y.Z"
    assert TORCH_PIN.search(head).group(1) == TORCH_PIN.search(work).group(1), "one torch version"
    assert "download.pytorch.org/whl/cpu" in head
    assert "whl/cpu" not in work, "GPU nodes need the CUDA build"
    assert "torch.cuda.is_available()" in work, "setup must fail on a GPU node whose torch sees no GPU"
    # The project installs after torch, so its unpinned torch>=... keeps the pinned build.
    for cmds in (cfg["head_setup_commands"], cfg["worker_setup_commands"]):
        joined = "\n".join(cmds)
        assert joined.index("torch==") < joined.index('-e "$HOME/ablate[cluster,report]"')
        assert "-c ~/ablate/constraints.txt" in joined, "nodes install the versions CI passed with"


def test_ray_version_matches_the_installed_one() -> None:
    import ray

    common = " ".join(_aws()["setup_commands"])
    m = re.search(r"ray\[default\]==([\w.]+)", common)
    assert m and m.group(1) == ray.__version__


def _option(cmd: str, name: str) -> str:
    m = re.search(rf"{name}[ =](\S+)", cmd)
    assert m, f"{name} missing from: {cmd}"
    return m.group(1)


def test_project_data_and_cache_on_nodes() -> None:
    cfg = _aws()
    assert cfg["file_mounts"]["~/ablate"] == "."
    work = cfg["worker_setup_commands"]
    fineweb = [c for c in work if "python -m trainer.data fineweb" in c]
    synth = [c for c in work if "python -m trainer.data synth" in c]
    assert len(fineweb) == 1 and len(synth) == 1
    assert _option(fineweb[0], "--out") == "/opt/ablate-data/fineweb10B"
    assert int(_option(fineweb[0], "--train-shards")) >= 7, "12-11 trains on ~0.57B tokens"
    assert "/opt/ablate-cache" in " ".join(work) and "inductor" in " ".join(work)


def test_compile_cache_dir_is_prepared_on_gpu_nodes() -> None:
    """The cache root docs/cluster.md tells specs to use (resources.compile_cache_dir) is a valid
    spec value, and every GPU node's setup creates it with the trainer's two subfolders."""
    from ablate.spec.model import parse_spec_text

    docs = (ROOT / "docs" / "cluster.md").read_text()
    documented = set(re.findall(r"compile_cache_dir: (/[\w./-]+)", docs))
    assert len(documented) == 1, documented
    cache = documented.pop()
    spec = parse_spec_text("name: c\ntrainer: {preset: tiny, set: {runtime.reference_world_size: 8}}\n"
                           f"arms: {{baseline: {{}}}}\nseeds: 1\nresources: {{gpus_per_run: 8, compile_cache_dir: {cache}}}\n")
    assert spec.resources.compile_cache_dir == cache
    work = " ".join(_aws()["worker_setup_commands"])
    m = re.search(r"sudo ln -sfn (\S+) " + re.escape(cache) + r"(?:\s|$)", work)
    assert m, f"worker setup must link {cache} to the node's NVMe"
    target = m.group(1)
    for sub in ("inductor", "triton"):  # trainer: <dir>/inductor, <dir>/triton
        assert f"{target}/{sub}" in work, f"{target}/{sub} is not created"
    assert re.search(r"chown -R \$USER [^&]*" + re.escape(target) + r"(\s|&)", work), "runs must write it"
    assert f"compile_cache_dir: {cache}" in CLUSTER.read_text(), "cluster.yaml's layout comment names it"


def test_synthetic_shards_match_the_small_preset() -> None:
    """The trainer rejects synthetic shards whose manifest differs from the run's data.synth."""
    from trainer.config import SynthConfig
    from trainer.presets import get_preset

    cmd = next(c for c in _aws()["worker_setup_commands"] if "python -m trainer.data synth" in c)
    small = get_preset("small")
    assert _option(cmd, "--out").endswith("/" + Path(small.data.data_dir).name)
    assert int(_option(cmd, "--train-tokens")) == small.data.synth.train_tokens
    assert int(_option(cmd, "--val-tokens")) == small.data.synth.val_tokens
    # Everything else is left at the CLI's defaults (SynthConfig's; vocab 50257, BOS vocab - 1),
    # which must equal the preset's.
    for flag in ("--vocab", "--bos", "--seed", "--mean-doc-len", "--zipf-a", "--shard-tokens"):
        assert flag not in cmd, f"{flag}: keep it at the preset's value by not passing it"
    for field in ("seed", "mean_doc_len", "zipf_a", "shard_tokens"):
        assert getattr(SynthConfig(), field) == getattr(small.data.synth, field), field
    assert small.model.vocab_size == 50257 and small.data.bos_id == small.model.vocab_size - 1


def test_token_auth_stays_on() -> None:
    cfg = _aws()
    assert "~/.ray/auth_token" in cfg["file_mounts"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in cfg[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), key


def test_no_credentials_in_file() -> None:
    text = CLUSTER.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text), "an AWS access key id"
    assert not re.search(r"(?i)(secret_access_key|aws_session_token|private_key_id)\s*[:=]", text)
    assert "BEGIN " not in text, "a PEM block"
