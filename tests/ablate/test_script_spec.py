"""Script arms in specs (ablate.spec.script): validation before any run, patching, identity (config hash).

    python -m pytest tests/ablate/test_script_spec.py -q
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ablate.cli.main import app
from ablate.errors import SpecError
from ablate.spec.matrix import expand, make_request
from ablate.spec.model import load_spec, parse_spec_text

SCRIPT = """\
import os
import sys

wd = float(os.environ.get("MUON_WD", "0.01"))
smear = True
print("step:1/1 val_loss:3.3 train_time:1ms step_avg:1.00ms")
"""
NO_SMEAR = """\
--- a/train_gpt.py
+++ b/train_gpt.py
@@ -3,4 +3,4 @@
 
 wd = float(os.environ.get("MUON_WD", "0.01"))
-smear = True
+smear = False
 print("step:1/1 val_loss:3.3 train_time:1ms step_avg:1.00ms")
"""
SPEC = """\
name: premul-o
trainer: {script: records/train_gpt.py, nproc_per_node: 2}
arms:
  baseline: {}
  premul-o: {script: my/train_gpt.py}
  no-smear: {patch: my/no_smear.diff}
  wd-0.02: {env: {MUON_WD: "0.02"}}
seeds: 3
resources: {gpus_per_run: 2}
"""


def make(tmp_path: Path, spec: str = SPEC, **files: str) -> Path:
    """A spec folder: the spec, the base script, a fork of it and a patch (plus `files`)."""
    base = {"records/train_gpt.py": SCRIPT, "my/train_gpt.py": SCRIPT.replace("smear = True", "smear = 'premul'"),
            "my/no_smear.diff": NO_SMEAR, **{k.replace("__", "/"): v for k, v in files.items()}}
    for rel, text in base.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    path = tmp_path / "spec.yaml"
    path.write_text(textwrap.dedent(spec))
    return path


def problems(path: Path) -> str:
    with pytest.raises(SpecError) as e:
        load_spec(path)
    return str(e.value)


def test_script_experiment_resolves_each_arm_and_hashes_its_code(tmp_path: Path) -> None:
    spec = load_spec(make(tmp_path))
    assert spec.trainer_label == "script records/train_gpt.py"
    assert all(spec.is_script_arm(a) for a in spec.arms)
    hashes = {a: spec.config_hash(a) for a in spec.arms}
    assert len(set(hashes.values())) == 4
    assert spec.overrides("no-smear") == {"script": "records/train_gpt.py", "patch": ["my/no_smear.diff"]}
    assert spec.overrides("wd-0.02") == {"script": "records/train_gpt.py", "env": {"MUON_WD": "0.02"}}
    patched = spec._scripts["no-smear"].script
    assert "smear = False" in patched.text and "smear = True" not in patched.text
    assert patched.name == "train_gpt.py" and patched.path == str(tmp_path / "records" / "train_gpt.py")
    reqs = expand(spec)
    assert [(r.arm, r.seed, r.source) for r in reqs[:4]] == [
        ("baseline", 0, "script"), ("premul-o", 0, "script"), ("no-smear", 0, "script"), ("wd-0.02", 0, "script")]
    assert {r.config_hash for r in reqs if r.arm == "baseline"} == {hashes["baseline"]}  # the seed is apart
    assert make_request(spec, "wd-0.02", 5).overrides == {"script": "records/train_gpt.py",
                                                          "env": {"MUON_WD": "0.02"}}
    with pytest.raises(SpecError, match="runs a script"):
        spec.resolve("baseline")

    # the same files from another working directory: the same identities (paths start at the spec)
    assert {a: load_spec(str(tmp_path / "spec.yaml")).config_hash(a) for a in spec.arms} == hashes
    # an edited patch reruns only its arm; an edited base script every arm built on it
    (tmp_path / "my" / "no_smear.diff").write_text(NO_SMEAR.replace("smear = False", "smear = None"))
    again = {a: load_spec(tmp_path / "spec.yaml").config_hash(a) for a in spec.arms}
    assert [a for a in spec.arms if again[a] != hashes[a]] == ["no-smear"]
    with pytest.raises(SpecError, match="hunk 1 of 1 does not apply"):  # the line the patch changes was edited
        load_spec(make(tmp_path, **{"records__train_gpt.py": SCRIPT.replace("smear = True", "smear = 1")}))
    path = make(tmp_path, **{"records__train_gpt.py": SCRIPT + "# edited\n"})
    edited = {a: load_spec(path).config_hash(a) for a in spec.arms}
    assert [a for a in spec.arms if edited[a] == hashes[a]] == ["premul-o"]


def test_env_and_args_are_part_of_the_identity(tmp_path: Path) -> None:
    base = load_spec(make(tmp_path))
    other = load_spec(make(tmp_path, SPEC.replace('MUON_WD: "0.02"', 'MUON_WD: "0.03"')))
    assert other.config_hash("wd-0.02") != base.config_hash("wd-0.02")
    assert other.config_hash("baseline") == base.config_hash("baseline")
    with_args = load_spec(make(tmp_path, SPEC.replace("nproc_per_node: 2}", "nproc_per_node: 2, args: [--x, '1']}")))
    assert all(with_args.config_hash(a) != base.config_hash(a) for a in base.arms)
    assert with_args.overrides("baseline")["args"] == ["--x", "1"]


def test_missing_script_names_the_path_and_how_to_obtain_it(tmp_path: Path) -> None:
    path = make(tmp_path, SPEC.replace("nproc_per_node: 2}", "nproc_per_node: 2, obtain: 'git show b72cabd2:train_gpt.py "
                                                           "> records/train_gpt.py'}"))
    (tmp_path / "records" / "train_gpt.py").unlink()
    msg = problems(path)
    assert f"trainer.script='records/train_gpt.py': no such file ({tmp_path / 'records' / 'train_gpt.py'})" in msg
    assert "fix: obtain it first: git show b72cabd2:train_gpt.py > records/train_gpt.py (trainer.obtain)" in msg
    assert msg.count("no such file") == 1  # once, not once per arm built on it
    assert "premul-o" not in msg  # the arm with its own script is fine


BAD = [
    ("env-not-string", SPEC.replace('MUON_WD: "0.02"', "MUON_WD: 0.02"), {},
     ["arms.wd-0.02.env.MUON_WD=0.02 (float): environment values are strings", 'fix: quote it: MUON_WD: "0.02"']),
    ("env-reserved", SPEC.replace('MUON_WD: "0.02"', 'SEED: "3"'), {},
     ["arms.wd-0.02.env.SEED: cannot be set here (ablate sets it to the run's seed"]),
    ("args-not-strings", SPEC.replace("{env: {MUON_WD: \"0.02\"}}", "{args: [--lr, 0.03]}"), {},
     ["arms.wd-0.02.args[1]=0.03 (float): arguments are strings"]),
    ("trainer-override-in-script-arm", SPEC.replace('{env: {MUON_WD: "0.02"}}', "{optim.muon.lr: 0.03}"), {},
     ["arms.wd-0.02: 'optim.muon.lr' is not a field of a script arm (script, patch, files, env, args)",
      "fix: pass the value as env:"]),
    ("misspelt-field", SPEC.replace("{env: {", "{envs: {"), {}, ["'envs' is not a field", "did you mean env?"]),
    ("patch-does-not-apply", SPEC, {"my__no_smear.diff": NO_SMEAR.replace("-smear = True", "-smear = Maybe")},
     ["arms.no-smear.patch: my/no_smear.diff: hunk 1 of 1 does not apply to train_gpt.py",
      "at line 5 the hunk expects 'smear = Maybe' but the file has 'smear = True'", "@@ -3,4 +3,4 @@"]),
    ("patch-other-file", SPEC, {"my__no_smear.diff": NO_SMEAR.replace("train_gpt.py", "model.py")},
     ["the diff of 'model.py' names none of the arm's files (train_gpt.py)"]),
    ("patch-breaks-python", SPEC, {"my__no_smear.diff": NO_SMEAR.replace("+smear = False", "+smear = (")},
     ["arms.no-smear: the script after its patches is not valid Python (train_gpt.py, line 5"]),
    ("patch-missing", SPEC.replace("my/no_smear.diff", "my/nope.diff"), {},
     ["arms.no-smear.patch: 'my/nope.diff': no such file"]),
    ("preset-and-script", SPEC.replace("{script: records/train_gpt.py", "{preset: tiny, script: records/train_gpt.py"),
     {}, ["trainer: preset='tiny' and script='records/train_gpt.py' are both set"]),
    ("neither", SPEC.replace("script: records/train_gpt.py, ", ""), {},
     ["trainer: needs `preset:` (the built-in trainer) or `script:` (your train_gpt.py)"]),
    ("trainer-set", SPEC.replace("nproc_per_node: 2}", "nproc_per_node: 2, set: {optim.muon.lr: 0.03}}"), {},
     ["trainer.set={'optim.muon.lr': 0.03}: overrides of the built-in trainer's config"]),
    ("nproc-mismatch", SPEC.replace("gpus_per_run: 2", "gpus_per_run: 8"), {},
     ["trainer.nproc_per_node=2 but resources.gpus_per_run gives 8 rank(s) per run",
      "fix: resources: {gpus_per_run: 2}"]),
    ("reuse-workers", SPEC.replace("gpus_per_run: 2}", "gpus_per_run: 2, reuse_workers: true}"), {},
     ["resources.reuse_workers=True: a script runs as a fresh torchrun per run"]),
    ("sibling-import", SPEC, {"records__train_gpt.py": "import kernels_x\n" + SCRIPT, "records__kernels_x.py": "x = 1\n",
                              "my__no_smear.diff": NO_SMEAR.replace("@@ -3,4 +3,4 @@", "@@ -4,4 +4,4 @@")},
     ["trainer.script: the script imports kernels_x from its own folder", "fix: files: [kernels_x.py]"]),
    ("trainer-files-not-paths", SPEC.replace("nproc_per_node: 2}", "nproc_per_node: 2, files: [3], env: {A: 1}}"), {},
     ["trainer.files=[3]: expected a path or a list of paths", "trainer.env.A=1 (int): environment values are strings"]),
    ("file-in-data", SPEC.replace("nproc_per_node: 2}", "nproc_per_node: 2, files: [records/data/x.py]}"),
     {"records__data__x.py": "x = 1\n"}, ["trainer.files: 'records/data/x.py': data/ in a run's folder is the link"]),
    ("file-outside", SPEC.replace("nproc_per_node: 2}", "nproc_per_node: 2, files: [my/helper.py]}"),
     {"my__helper.py": "x = 1\n"}, ["trainer.files: 'my/helper.py'", "is not in the script's folder"]),
]


@pytest.mark.parametrize("case, text, files, wants", BAD, ids=[c[0] for c in BAD])
def test_script_spec_problems(tmp_path: Path, case: str, text: str, files: dict, wants: list[str]) -> None:
    msg = problems(make(tmp_path, text, **files))
    for want in wants:
        assert want in msg, f"{case}: {want!r} not in:\n{msg}"


MIXED = """\
name: mixed
trainer: {preset: tiny}
arms:
  baseline: {}
  lr: {optim.muon.lr: 0.05}
  mine: {script: my/train_gpt.py, env: {X: "1"}}
seeds: 2
resources: {gpus_per_run: 0, cpu_ranks_per_run: 2}
"""


def test_script_arms_next_to_preset_arms_need_allow_mixed(tmp_path: Path) -> None:
    msg = problems(make(tmp_path, MIXED))
    assert "arms mine: script arms in a preset experiment (trainer.preset='tiny') would be compared with runs of " \
           "the built-in trainer" in msg and "fix: set trainer.allow_mixed: true" in msg
    spec = load_spec(make(tmp_path, MIXED.replace("{preset: tiny}", "{preset: tiny, allow_mixed: true}")))
    assert [spec.is_script_arm(a) for a in spec.arms] == [False, False, True]
    assert spec.trainer_label == "preset tiny (+ 1 script arm)"
    assert make_request(spec, "lr", 0).overrides == {"optim.muon.lr": 0.05, "runtime.device": "cpu"}
    mine = make_request(spec, "mine", 0)
    assert mine.source == "script" and mine.overrides == {"script": "my/train_gpt.py", "env": {"X": "1"}}
    # an arm with script fields but no script in a preset experiment
    msg = problems(make(tmp_path, MIXED.replace("{preset: tiny}", "{preset: tiny, allow_mixed: true}")
                        .replace("{script: my/train_gpt.py, env", "{env")))
    assert "arms.mine: env need(s) a script, but this is a preset experiment" in msg


def test_stored_spec_needs_no_files(tmp_path: Path) -> None:
    """A spec read back from the store (tables, status) takes each script arm's identity from
    script_arms.json; the files may be gone."""
    from ablate.spec.script import stored_records

    path = make(tmp_path)
    spec = load_spec(path)
    records = stored_records(spec)
    assert records["no-smear"]["config_hash"] == spec.config_hash("no-smear")
    assert records["no-smear"]["script_sha256"] == spec._scripts["no-smear"].script.sha256
    back = parse_spec_text(path.read_text(), source="store/premul-o/spec.yaml", stored_scripts=records)
    assert {a: back.config_hash(a) for a in back.arms} == {a: spec.config_hash(a) for a in spec.arms}
    assert back.overrides("wd-0.02") == spec.overrides("wd-0.02")
    with pytest.raises(SpecError, match="records/train_gpt.py"):  # without the record the files are needed
        parse_spec_text(path.read_text(), source="store/premul-o/spec.yaml")
    with pytest.raises(SpecError, match="arms.wd-0.02: no valid record in the store's script_arms.json"):
        parse_spec_text(path.read_text(), stored_scripts={k: v for k, v in records.items() if k != "wd-0.02"})


def test_cli_validate_names_the_script_and_fails_with_exit_2(tmp_path: Path) -> None:
    path = make(tmp_path)
    res = CliRunner().invoke(app, ["validate", str(path)])
    assert res.exit_code == 0, res.output
    assert "premul-o, script records/train_gpt.py, 4 arms" in res.output
    sa = load_spec(path)._scripts["no-smear"]
    res = CliRunner().invoke(app, ["run", str(path), "--dry-run", "--store", str(tmp_path / "store")],
                             env={"COLUMNS": "200"})
    assert res.exit_code == 0 and not (tmp_path / "store").exists(), res.output
    assert f"no-smear: {sa.script.path} → sha256 {sa.script.sha256[:16]}… (1 patch(es))" in res.output
    assert "data/ → <project root>/data" in res.output
    (tmp_path / "my" / "no_smear.diff").write_text("not a diff\n")
    res = CliRunner().invoke(app, ["validate", str(path)])
    assert res.exit_code == 2 and "arms.no-smear.patch: my/no_smear.diff: not a unified diff" in res.output


def test_a_script_this_python_cannot_parse_is_not_judged(tmp_path: Path) -> None:
    """The driver's Python may be older than the nodes' (a record ran 3.12 f-string syntax): a base
    script that does not parse here is run as it is; only a patch that breaks a parsing script is an error."""
    newer = SCRIPT.replace("wd = float(", "wd = f'{\"nested \" f\"{1}\"}' and float(") + "match = (\n"
    spec = load_spec(make(tmp_path, **{"records__train_gpt.py": newer,
                                       "my__no_smear.diff": NO_SMEAR.replace(
                                           ' wd = float(os.environ.get("MUON_WD", "0.01"))',
                                           " wd = f'{\"nested \" f\"{1}\"}' and float(os.environ.get(\"MUON_WD\", \"0.01\"))")}))
    assert "smear = False" in spec._scripts["no-smear"].script.text


def test_oversized_code_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ablate.spec.script

    monkeypatch.setattr(ablate.spec.script, "MAX_CODE_BYTES", 100)
    msg = problems(make(tmp_path))
    assert "trainer.script='records/train_gpt.py': " in msg and "MiB; scripts, patches and files up to 0 MiB" in msg
