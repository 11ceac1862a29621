"""Spec validation: every bad input → its message (field, value, fix) and exit code 2 via the CLI.

    python -m pytest tests/ablate/test_spec.py -q
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ablate.cli.main import app
from ablate.errors import SpecError
from ablate.run.placement import check_cluster
from ablate.spec.model import SequentialSeeds, flatten, load_spec, parse_spec_text

GOOD = """\
name: demo
trainer: {preset: tiny, set: {schedule.cooldown_frac: 0.5}}
arms:
  baseline: {}
  lr-0.05: {optim.muon.lr: 0.05}
seeds: 2
resources: {gpus_per_run: 0, cpu_ranks_per_run: 2}
"""


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "spec.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def _replace(old: str, new: str) -> str:
    assert old in GOOD, old
    return GOOD.replace(old, new)


# (case id, spec text, substrings the message must contain)
BAD = [
    ("unknown-top-key", GOOD + "seed: 3\n", ["unknown key 'seed' at the top level", "did you mean seeds"]),
    ("unknown-nested-key", _replace("gpus_per_run: 0", "gpu_per_run: 0"),
     ["unknown key 'resources.gpu_per_run'", "did you mean gpus_per_run"]),
    ("unknown-arm-override", _replace("optim.muon.lr: 0.05", "optim.muon.lrr: 0.05"),
     ["arms.lr-0.05", "unknown config key 'optim.muon.lrr'", "did you mean: optim.muon.lr"]),
    ("unknown-base-override", _replace("schedule.cooldown_frac", "schedule.cooldown_fraction"),
     ["trainer.set", "unknown config key 'schedule.cooldown_fraction'", "schedule.cooldown_frac"]),
    ("override-wrong-type", _replace("optim.muon.lr: 0.05", "optim.muon.lr: fast"),
     ["arms.lr-0.05", "optim.muon.lr='fast'", "expected a number"]),
    ("wrong-type-int", _replace("gpus_per_run: 0", "gpus_per_run: '0'"),
     ["resources.gpus_per_run='0'", "valid integer", "fix: resources: {gpus_per_run: 1}"]),
    ("wrong-type-seeds", _replace("seeds: 2", "seeds: two"),
     ["seeds='two'", "expected a number of seeds", "fix: seeds: 8"]),
    ("no-arms", _replace("arms:\n  baseline: {}\n  lr-0.05: {optim.muon.lr: 0.05}\n", "arms: {}\n"),
     ["arms={}", "no arms", "fix: arms: {baseline: {}"]),
    ("duplicate-arms", _replace("  lr-0.05: {optim.muon.lr: 0.05}\n",
                                "  lr-0.05: {optim.muon.lr: 0.05}\n  lr-0.05: {optim.muon.lr: 0.07}\n"),
     ["duplicate key 'lr-0.05' on line 6 (first on line 5)", "rename or remove one"]),
    ("no-baseline", _replace("  baseline: {}\n", "  base: {}\n"),
     ["baseline='baseline' is not an arm", "base, lr-0.05", "add `baseline: {}`"]),
    ("seeds-zero", _replace("seeds: 2", "seeds: 0"), ["seeds=0", "need at least 1 seed"]),
    ("seeds-empty-list", _replace("seeds: 2", "seeds: []"), ["seeds=[]", "need at least 1 seed"]),
    ("seeds-sequential-bad", _replace("seeds: 2", "seeds: {min: 0, max: 4, alpha: 0.01}"),
     ["seeds", "min", "must be ≥ 1"]),
    ("gpus-not-allowed", _replace("gpus_per_run: 0, cpu_ranks_per_run: 2", "gpus_per_run: 3"),
     ["resources.gpus_per_run=3", "must be one of 0, 1, 2, 4, 8"]),
    ("ranks-not-dividing", _replace("cpu_ranks_per_run: 2", "cpu_ranks_per_run: 4"),
     ["resources.cpu_ranks_per_run=4", "do not divide runtime.reference_world_size=2", "fix: use one of 1, 2"]),
    ("cpu-ranks-with-gpus", _replace("gpus_per_run: 0", "gpus_per_run: 1"),
     ["cpu_ranks_per_run=2 only applies to CPU runs"]),
    ("cache-dir-relative", _replace("cpu_ranks_per_run: 2}", "cpu_ranks_per_run: 2, compile_cache_dir: cache}"),
     ["resources.compile_cache_dir='cache'", "must be an absolute path", "fix: resources: {gpus_per_run: 8, "
      "compile_cache_dir: /opt/ablate-cache}"]),
    ("cache-dir-twice", _replace("cpu_ranks_per_run: 2}", "cpu_ranks_per_run: 2, compile_cache_dir: /c}")
     .replace("schedule.cooldown_frac: 0.5}", "schedule.cooldown_frac: 0.5, runtime.inductor_cache_dir: /d}"),
     ["trainer.set: 'runtime.inductor_cache_dir' and resources.compile_cache_dir='/c' both set",
      "keep only resources.compile_cache_dir"]),
    ("reserved-key", _replace("optim.muon.lr: 0.05", "seed: 5"), ["arms.lr-0.05", "'seed' cannot be overridden", "seeds:"]),
    ("bad-name", _replace("name: demo", "name: Demo Experiment"), ["name='Demo Experiment'", "must match"]),
    ("bad-preset", _replace("preset: tiny", "preset: tinyy"), ["trainer.preset", "tinyy", "speedrun, speedrun-1027, small, tiny"]),
    ("missing-field", _replace("seeds: 2\n", ""), ["seeds: missing (required)"]),
    ("bad-analysis", GOOD + "analysis: {correction: bonferroni}\n", ["analysis.correction='bonferroni'", "holm"]),
    ("invalid-yaml", GOOD + "arms: [unclosed\n", ["not valid YAML at line"]),
    ("not-a-mapping", "- just\n- a list\n", ["must be a YAML mapping"]),
]


@pytest.mark.parametrize("case,text,needles", BAD, ids=[c[0] for c in BAD])
def test_bad_spec_message_and_exit_code(tmp_path: Path, case: str, text: str, needles: list[str]) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    for needle in needles:
        assert needle in str(info.value), f"{case}: {needle!r} not in:\n{info.value}"
    res = CliRunner().invoke(app, ["validate", str(path)])
    assert res.exit_code == 2, res.output
    assert needles[0] in res.output


def test_run_with_bad_spec_exits_2_before_ray(tmp_path: Path) -> None:
    path = _write(tmp_path, _replace("optim.muon.lr: 0.05", "optim.muon.lrr: 0.05"))
    res = CliRunner().invoke(app, ["run", str(path), "--store", str(tmp_path / "s")])
    assert res.exit_code == 2
    assert "did you mean: optim.muon.lr" in res.output
    assert not (tmp_path / "s").exists()


def test_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    res = CliRunner().invoke(app, ["validate", str(missing)])
    assert res.exit_code == 2
    assert "cannot be read" in res.output and "nope.yaml" in res.output
    res = CliRunner().invoke(app, ["run", str(missing)])
    assert res.exit_code == 2


def test_every_problem_reported_at_once(tmp_path: Path) -> None:
    text = GOOD.replace("seeds: 2", "seeds: 0").replace("gpus_per_run: 0, cpu_ranks_per_run: 2", "gpus_per_run: 5")
    with pytest.raises(SpecError) as info:
        parse_spec_text(text + "retries: -1\nfoo: 1\n")
    assert len(info.value.problems) == 4, info.value.problems
    assert "4 problems" in str(info.value)


def test_validate_several_files_exit_code(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("seeds: 2", "seeds: 0"))
    assert CliRunner().invoke(app, ["validate", str(good)]).exit_code == 0
    res = CliRunner().invoke(app, ["validate", str(good), str(bad)])
    assert res.exit_code == 2
    assert "ok" in res.output and "seeds=0" in res.output


def test_overrides_merge_and_hash() -> None:
    spec = parse_spec_text(GOOD.replace("lr-0.05: {optim.muon.lr: 0.05}",
                                        "lr-0.05: {optim: {muon: {lr: 0.05}}, schedule.cooldown_frac: 0.6}"))
    base = spec.overrides("baseline")
    arm = spec.overrides("lr-0.05")
    assert base == {"schedule.cooldown_frac": 0.5, "runtime.device": "cpu"}
    assert arm == {"schedule.cooldown_frac": 0.6, "optim.muon.lr": 0.05, "runtime.device": "cpu"}
    assert spec.resolve("lr-0.05").optim.muon.lr == 0.05
    assert spec.resolve("lr-0.05").schedule.cooldown_frac == 0.6
    assert spec.config_hash("baseline") != spec.config_hash("lr-0.05")
    # the hash is the trainer's hash of the arm's config: same overrides → same hash
    from trainer.config import config_hash

    assert spec.config_hash("baseline") == config_hash(spec.resolve("baseline"))
    assert len(spec.config_hash("baseline")) == 12


def test_seed_forms() -> None:
    assert parse_spec_text(GOOD).seeds == [0, 1]
    assert parse_spec_text(GOOD.replace("seeds: 2", "seeds: [3, 7]")).max_seeds == [3, 7]
    seq = parse_spec_text(GOOD.replace("seeds: 2", "seeds: {min: 3, max: 6, alpha: 0.01}"))
    assert seq.sequential and isinstance(seq.seeds, SequentialSeeds)
    assert seq.max_seeds == [0, 1, 2, 3, 4, 5]
    with pytest.raises(SpecError, match=r"min \(5\) must be ≤ max \(4\)"):
        parse_spec_text(GOOD.replace("seeds: 2", "seeds: {min: 5, max: 4}"))


def test_search_is_passed_through() -> None:
    spec = parse_spec_text(GOOD + "search: {trials: 4, space: {optim.muon.lr: {type: float, low: 0.01, high: 0.1}}}\n")
    assert spec.search == {"trials": 4, "space": {"optim.muon.lr": {"type": "float", "low": 0.01, "high": 0.1}}}


def test_flatten() -> None:
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3, "f": {}}) == {"a.b": 1, "a.c.d": 2, "e": 3}


def _node(cpu: float, gpu: float = 0.0, alive: bool = True) -> dict:
    res = {"CPU": cpu, "memory": 1e9}
    if gpu:
        res["GPU"] = gpu
    return {"Alive": alive, "NodeManagerAddress": "10.0.0.1", "Resources": res}


def test_check_cluster() -> None:
    spec = parse_spec_text(GOOD)  # 2 CPU, 0 GPU per run
    check_cluster(spec, [_node(2)])
    with pytest.raises(SpecError, match=r"resources.cpu_ranks_per_run=2: no node .* 1 CPU, 0 GPU"):
        check_cluster(spec, [_node(1), _node(1)])  # 2 CPUs in total, but not on one node
    gpu = parse_spec_text(GOOD.replace("gpus_per_run: 0, cpu_ranks_per_run: 2", "gpus_per_run: 2"))
    check_cluster(gpu, [_node(64, 2)])
    with pytest.raises(SpecError) as info:
        check_cluster(gpu, [_node(16, 1), _node(16, 8, alive=False)])
    msg = str(info.value)
    assert "resources.gpus_per_run=2" in msg and "16 CPU, 1 GPU" in msg and "PENDING" in msg


def test_bad_store_uri_is_bad_input(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD)
    res = CliRunner().invoke(app, ["run", str(path), "--dry-run", "--store", "nosuchscheme-xyz://b/x"])
    assert res.exit_code == 2 and "not usable" in res.output


def test_dry_run_prints_matrix_and_plan_without_ray(tmp_path: Path) -> None:
    import sys

    path = _write(tmp_path, GOOD)
    res = CliRunner().invoke(app, ["run", str(path), "--dry-run", "--store", str(tmp_path / "s")], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("│")]
    assert [line.split("│")[2].strip() for line in lines] == ["baseline", "lr-0.05", "baseline", "lr-0.05"]
    assert "2 CPU rank(s) (gloo), Ray bundle {CPU: 2, GPU: 0}, OMP_NUM_THREADS=1" in res.output
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_data_root() -> None:
    from ablate.spec.model import data_root_path

    root = Path("/project")
    assert data_root_path(None, root) == root
    assert data_root_path("shared/data", root) == root / "shared/data"
    assert data_root_path("/mnt/data", root) == Path("/mnt/data")
    assert parse_spec_text(GOOD + "data_root: /mnt/data\n").data_root == "/mnt/data"


def test_validate_checks_the_search_space_too() -> None:
    text = """
name: bad-search
trainer: {preset: tiny}
arms: {baseline: {}}
seeds: 1
resources: {gpus_per_run: 0, cpu_ranks_per_run: 2}
search:
  trials: 2
  seeds_per_trial: 1
  space:
    optim.muon.lrr: {type: float, low: 0.01, high: 0.1, log: true}
"""
    with pytest.raises(SpecError) as e:
        parse_spec_text(text, "bad.yaml")
    assert "optim.muon.lrr" in str(e.value) and "optim.muon.lr" in str(e.value)


def test_reuse_workers_field(tmp_path: Path) -> None:
    """resources.reuse_workers: off by default, shown by --dry-run, a bool (a typo is a spec error),
    and outside the runs' identity (the same config hashes either way)."""
    from ablate.spec.matrix import expand

    off = parse_spec_text(GOOD)
    on = parse_spec_text(_replace("cpu_ranks_per_run: 2}", "cpu_ranks_per_run: 2, reuse_workers: true}"))
    assert off.resources.reuse_workers is False and on.resources.reuse_workers is True
    assert [r.config_hash for r in expand(off)] == [r.config_hash for r in expand(on)]
    bad = _write(tmp_path, _replace("cpu_ranks_per_run: 2}", "cpu_ranks_per_run: 2, reuse_workers: maybe}"))
    with pytest.raises(SpecError, match="reuse_workers"):
        load_spec(bad)
    path = _write(tmp_path, _replace("cpu_ranks_per_run: 2}", "cpu_ranks_per_run: 2, reuse_workers: true}"))
    res = CliRunner().invoke(app, ["run", str(path), "--dry-run", "--store", str(tmp_path / "s")], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "long-lived workers (reuse_workers)" in res.output
