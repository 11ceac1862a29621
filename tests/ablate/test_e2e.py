"""End to end through real Ray Tune + real torchrun on CPU (2 cores is enough).

    python -m pytest tests/ablate/test_e2e.py -q -m e2e          # ~4 min on 2 cores

In-process tests share one embedded Ray cluster (class-scoped fixture); the smoke, resume and
`ray job submit` tests start their own, as a user would.
"""
from __future__ import annotations

import hashlib
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ablate.store.parquet import Store
from tests.ablate.raycluster import RayCluster, client_env, procs_with, wait_for_dashboard

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "experiments" / "smoke.yaml"


def spec_file(tmp_path: Path, name: str, arms: dict, seeds=1, retries: int = 0, **extra) -> Path:
    """A spec with smoke.yaml's fast trainer settings."""
    spec = yaml.safe_load(SMOKE.read_text())
    spec.update(name=name, arms=arms, seeds=seeds, retries=retries, **extra)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def ablate(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    # env=os.environ explicitly: pytest's process has COLUMNS=80 at C level (not in os.environ),
    # which a plain subprocess would inherit and rich would honour
    return subprocess.run([sys.executable, "-m", "ablate", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ))


_procs_with = procs_with  # pids whose command line contains text (run ids are in config file names)


# ---------------------------------------------------------------------------------------------
# One shared embedded cluster for the in-process tests
# ---------------------------------------------------------------------------------------------
class TestInProcess:
    @pytest.fixture(scope="class", autouse=True)
    @classmethod
    def local_ray(cls):
        import ray

        from ablate.run.driver import init_embedded_ray

        init_embedded_ray()  # as `ablate run` starts it (loopback only)
        yield
        ray.shutdown()

    def test_embedded_ray_listens_on_loopback_only(self, tmp_path: Path) -> None:
        """Every listening socket of the driver and its Ray processes (GCS, raylet, workers, agents,
        Prometheus endpoints), taken while a trial runs, is on a loopback address. The trainer's own
        process tree (under ablate/run/launch.py: torchrun's rendezvous store) is torch's, not Ray's,
        and is left out."""
        import ipaddress

        import psutil  # ray[default] brings it

        from ablate.run.driver import LaunchOptions, run_experiment
        from ablate.run.progress import NullProgress
        from ablate.spec.model import load_spec

        seen: list[tuple[int, str, str, int]] = []

        class Snapshot(NullProgress):
            def update(self, run_id: str, metrics: dict) -> None:  # a trial is alive now
                if seen:
                    return
                me = psutil.Process()
                procs = [me, *me.children(recursive=True)]
                trainer = set()
                for proc in procs:
                    try:
                        if any(a.endswith("ablate/run/launch.py") for a in proc.cmdline()):
                            trainer |= {proc.pid, *(c.pid for c in proc.children(recursive=True))}
                    except psutil.Error:
                        continue
                for proc in procs:
                    if proc.pid in trainer:
                        continue
                    try:
                        conns = proc.net_connections(kind="inet")
                        name = proc.name()
                    except psutil.Error:
                        continue
                    seen.extend((proc.pid, name, c.laddr.ip, c.laddr.port) for c in conns
                                if c.status == psutil.CONN_LISTEN)

        path = spec_file(tmp_path, "sockets", {"baseline": {}}, resources={"gpus_per_run": 0, "cpu_ranks_per_run": 1})
        run_experiment(load_spec(path), Store(str(tmp_path / "store")), progress=Snapshot(),
                       options=LaunchOptions(module="tests.ablate.fake_trainer"))
        assert len(seen) >= 5, seen  # GCS, raylet, workers, agents: the snapshot saw the cluster

        def loopback(ip: str) -> bool:
            addr = ipaddress.ip_address(ip.split("%")[0])
            if getattr(addr, "ipv4_mapped", None) is not None:
                addr = addr.ipv4_mapped
            return addr.is_loopback

        exposed = [s for s in seen if not loopback(s[2])]
        assert exposed == [], f"listening beyond loopback (pid, process, address, port): {exposed}"
        import ray

        assert ray.util.get_node_ip_address() == "127.0.0.1"

    def test_first_failed_store_write_stops_the_experiment(self, tmp_path: Path) -> None:
        """Disk full at the second run: the error names the path and the cause, the run in flight is
        cancelled, and nothing after it starts (the old driver ran all 8 and failed at the end)."""
        from ablate.errors import StoreError
        from ablate.run.driver import LaunchOptions, run_experiment
        from ablate.run.progress import NullProgress
        from ablate.spec.model import load_spec

        path = spec_file(tmp_path, "diskfull", {"baseline": {}, "lr": {"optim.muon.lr": 0.05}}, seeds=4,
                         resources={"gpus_per_run": 0, "cpu_ranks_per_run": 1})
        store = Store(str(tmp_path / "store"))
        real_put, written = store._put, []

        def put(p: str, data: bytes) -> None:
            if "/runs/" in p and written:
                raise StoreError(f"cannot write {p!r} in store {store.uri!r}: [Errno 28] No space left on device")
            real_put(p, data)
            if "/runs/" in p:
                written.append(p)

        store._put = put
        events: list[tuple[str, str]] = []

        class Record(NullProgress):
            def started(self, run_id: str, arm: str, seed: int) -> None:
                events.append(("start", run_id))

            def finished(self, run_id: str, status: str, *a, **kw) -> None:
                events.append((status, run_id))

        with pytest.raises(StoreError) as info:
            run_experiment(load_spec(path), store, progress=Record(),
                           options=LaunchOptions(module="tests.ablate.fake_trainer"))
        msg = str(info.value)
        assert "stopped at the first failed store write" in msg and "No space left on device" in msg
        assert "/diskfull/runs/" in msg and "not started" in msg
        assert len(store.runs("diskfull")) == 1
        starts = [e for e in events if e[0] == "start"]
        assert len(starts) <= 3, events  # 2 slots: the one that failed to write, one in flight (+1 at most)
        assert len([e for e in events if e[0] == "ok"]) <= 2, events

    def test_lost_lock_stops_the_experiment(self, tmp_path: Path) -> None:
        from ablate.errors import LockLost
        from ablate.store.lock import LOCK_FILE, acquire
        from ablate.run.driver import LaunchOptions, run_experiment
        from ablate.run.progress import NullProgress
        from ablate.spec.model import load_spec

        path = spec_file(tmp_path, "stolen", {"baseline": {}}, seeds=6,
                         resources={"gpus_per_run": 0, "cpu_ranks_per_run": 1})
        store = Store(str(tmp_path / "store"))
        lock = acquire(store, "stolen", heartbeat_s=0.3)

        class Steal(NullProgress):
            def started(self, run_id: str, arm: str, seed: int) -> None:  # another driver takes over
                store.write_bytes("stolen", LOCK_FILE, b'{"token": "thief", "host": "elsewhere", "pid": 7, '
                                  b'"heartbeat_at": 1e12}')

        with pytest.raises(LockLost, match="taken over by host elsewhere, pid 7"):
            run_experiment(load_spec(path), store, progress=Steal(), lock=lock,
                           options=LaunchOptions(module="tests.ablate.fake_trainer"))
        lock.release()
        assert len(store.runs("stolen")) < 6
        assert b"thief" in store.read_bytes("stolen", LOCK_FILE)  # the new holder's lock is kept

    def test_input_error_is_not_retried_and_its_reason_is_on_the_run_line(self, tmp_path: Path) -> None:
        """A missing data directory (trainer exit 2, DataError) fails once, not 1 + retries times."""
        from ablate.cli.main import app

        path = spec_file(tmp_path, "nodata", {"baseline": {"data.synthetic": False, "data.data_dir": "/nonexistent/x"}},
                         retries=2)
        res = CliRunner().invoke(app, ["run", str(path), "--store", str(tmp_path / "store")])
        assert res.exit_code == 1, res.output
        runs = Store(str(tmp_path / "store")).runs("nodata")
        assert len(runs) == 1 and runs["status"].iloc[0] == "failed"
        assert runs["error"].iloc[0].startswith("input error (not retried): DataError: no training shards")
        line = next(ln for ln in res.output.splitlines() if ln.lstrip().startswith(("failed", "[")) and "-a1" in ln
                    and "failed " in ln)
        assert "DataError: no training shards matching" in line, res.output

    def test_order_resume_and_changed_arm_with_fake_trainer(self, tmp_path: Path) -> None:
        """Seed-major interleaved launch order, provenance, skip-on-rerun, rerun of a changed arm."""
        from ablate.run.driver import LaunchOptions, run_experiment
        from ablate.spec.model import load_spec

        fake = LaunchOptions(module="tests.ablate.fake_trainer")
        arms = {"baseline": {}, "lr": {"optim.muon.lr": 0.05}}
        path = spec_file(tmp_path, "fake", arms, seeds=2, resources={"gpus_per_run": 0, "cpu_ranks_per_run": 1})
        store = Store(str(tmp_path / "store"))
        results = run_experiment(load_spec(path), store, options=fake)
        assert [(r.request.arm, r.request.seed, r.status) for r in results] == [
            ("baseline", 0, "ok"), ("lr", 0, "ok"), ("baseline", 1, "ok"), ("lr", 1, "ok")]
        runs = store.runs("fake")
        assert list(zip(runs["order"], runs["arm"], runs["seed"])) == [
            (0, "baseline", 0), (1, "lr", 0), (2, "baseline", 1), (3, "lr", 1)]
        # 2 CPUs, 1 per run: seed-1 runs can only start once a seed-0 run has ended (order kept)
        assert runs["started_at"].iloc[2:].min() >= runs["ended_at"].iloc[:2].min()
        assert runs["final_val_loss"].iloc[1] < runs["final_val_loss"].iloc[0]  # fake: higher lr → lower loss
        assert runs["node_id"].notna().all() and runs["node_ip"].notna().all()
        assert (runs["launch_s"] > 0).all() and (runs["world_size"] == 1).all()
        curves = store.curves("fake")
        assert curves.groupby("run_id").size().tolist() == [4, 4, 4, 4]  # val at steps 0, 2, 4, 5
        assert store.inflight("fake") == []
        assert store.read_bytes("fake", "spec.yaml") == path.read_bytes()

        again = run_experiment(load_spec(path), store, options=fake)  # resume: nothing to do
        assert all(r.reused and r.ok for r in again) and len(store.runs("fake")) == 4

        arms["lr"] = {"optim.muon.lr": 0.06}  # changed overrides → new hash → lr runs again
        path = spec_file(tmp_path, "fake", arms, seeds=2, resources={"gpus_per_run": 0, "cpu_ranks_per_run": 1})
        third = run_experiment(load_spec(path), store, options=fake)
        assert [r.reused for r in third] == [True, False, True, False]
        runs = store.runs("fake")
        assert len(runs) == 6 and runs["order"].tolist() == [0, 1, 2, 3, 4, 5]
        assert runs[runs["arm"] == "lr"]["config_hash"].nunique() == 2

    def test_crashing_trainer_is_recorded_retried_and_experiment_continues(self, tmp_path: Path) -> None:
        from ablate.cli.main import app

        path = spec_file(tmp_path, "crash", {"crash": {"debug.fail_at_step": 2}, "baseline": {}}, retries=1)
        res = CliRunner().invoke(app, ["run", str(path), "--store", str(tmp_path / "store")])
        assert res.exit_code == 1, res.output
        assert "1 of 2 runs have no ok result after 1 retries" in res.output
        assert "baseline" in res.output  # the table is still printed
        runs = Store(str(tmp_path / "store")).runs("crash")
        # one run at a time (2 ranks on 2 cores): the retry goes first, as soon as the attempt failed
        assert list(zip(runs["arm"], runs["attempt"], runs["status"])) == [
            ("crash", 1, "failed"), ("crash", 2, "failed"), ("baseline", 1, "ok")]
        crash = runs[runs["arm"] == "crash"]
        assert crash["error"].str.contains("debug.fail_at_step").all()
        assert crash["run_id"].str.endswith(("-a1", "-a2")).all()
        assert runs["final_val_loss"].iloc[2] > 0
        # running it again does not retry past the budget (2 failed attempts = 1 + retries)
        res = CliRunner().invoke(app, ["run", str(path), "--store", str(tmp_path / "store")])
        assert res.exit_code == 1 and len(Store(str(tmp_path / "store")).runs("crash")) == 3

    def test_failed_attempt_is_relaunched_while_the_other_runs_go_on(self, tmp_path: Path) -> None:
        """Two slots: `flaky` fails at step 0, `slow` takes ~8 s. flaky's second attempt starts in
        the slot flaky freed while slow still runs (the old driver started retries only after the
        whole Tune batch had ended), with its own row, run id and launch order."""
        from ablate.run.driver import LaunchOptions, run_experiment
        from ablate.run.progress import NullProgress
        from ablate.spec.model import load_spec

        events: list[tuple[str, str, int]] = []

        class Events(NullProgress):
            def started(self, run_id: str, arm: str, seed: int) -> None:
                events.append(("start", run_id, 0))

            def finished(self, run_id, status, final_val_loss=None, wall_s=None, retries_left=0, error=None):
                events.append((status, run_id, retries_left))

        arms = {"flaky": {"debug.fail_at_step": 0}, "slow": {"runtime.warmup_steps_per_stage": 80}}  # fake: 8 s
        path = spec_file(tmp_path, "soon", arms, retries=1, baseline="slow",
                         resources={"gpus_per_run": 0, "cpu_ranks_per_run": 1})  # 1 CPU each: 2 at once
        store = Store(str(tmp_path / "store"))
        results = run_experiment(load_spec(path), store, progress=Events(),
                                 options=LaunchOptions(module="tests.ablate.fake_trainer"))
        assert [(r.request.arm, r.status, r.attempts, r.run_id[-3:]) for r in results] == [
            ("flaky", "failed", 2, "-a2"), ("slow", "ok", 1, "-a1")]
        runs = store.runs("soon")
        assert list(zip(runs["arm"], runs["attempt"], runs["order"], runs["status"])) == [
            ("flaky", 1, 0, "failed"), ("slow", 1, 1, "ok"), ("flaky", 2, 2, "failed")]
        assert runs["run_id"].is_unique
        first, slow, second = (runs.iloc[i] for i in range(3))
        assert first["ended_at"] <= second["started_at"] < slow["ended_at"], runs[["run_id", "started_at", "ended_at"]]
        flaky2 = results[0].run_id
        at = {(kind, rid): i for i, (kind, rid, _) in enumerate(events)}
        assert ("failed", first["run_id"], 1) in events  # the progress line says "(retrying, 1 attempt(s) left)"
        assert at[("start", flaky2)] < at[("ok", slow["run_id"])], events

    def test_diverged_run_is_recorded_once_and_counted(self, tmp_path: Path) -> None:
        """A NaN loss is `diverged`: not retried (even with retries left), not run again on resume,
        counted in the table's verdict."""
        from ablate.cli.main import app
        from ablate.run.driver import LaunchOptions, run_experiment
        from ablate.spec.model import load_spec

        fake = LaunchOptions(module="tests.ablate.fake_trainer")   # lr ≥ 1 diverges at step 2
        arms = {"baseline": {}, "boom": {"optim.muon.lr": 5.0}}
        path = spec_file(tmp_path, "nan", arms, seeds=2, retries=2,
                         resources={"gpus_per_run": 0, "cpu_ranks_per_run": 1})
        store = Store(str(tmp_path / "store"))
        results = run_experiment(load_spec(path), store, options=fake)
        assert [(r.request.arm, r.status, r.attempts) for r in results] == [
            ("baseline", "ok", 1), ("boom", "diverged", 1), ("baseline", "ok", 1), ("boom", "diverged", 1)]
        runs = store.runs("nan")
        boom = runs[runs["arm"] == "boom"]
        assert len(boom) == 2 and (boom["status"] == "diverged").all() and boom["final_val_loss"].isna().all()
        assert boom["error"].str.startswith("diverged: val_loss is not finite at step 2").all()
        again = run_experiment(load_spec(path), store, options=fake)
        assert all(r.reused for r in again) and len(store.runs("nan")) == 4
        res = CliRunner().invoke(app, ["table", "nan", "--store", store.uri, "--format", "md"])
        assert res.exit_code == 0, res.output
        assert "| boom | 0 (+2 diverged) |" in res.stdout and "diverged 2/2" in res.stdout

    def test_reuse_workers_one_worker_serves_every_run(self, tmp_path: Path) -> None:
        """resources.reuse_workers: Tune reuses the trial actor and the actor its trainer worker;
        the worker is gone once Tune lets go of the actor."""
        from ablate.run.driver import run_experiment
        from ablate.spec.model import load_spec

        arms = {"baseline": {}, "lr": {"optim.muon.lr": 0.05}}
        res = {"gpus_per_run": 0, "cpu_ranks_per_run": 2, "cpus_per_run": os.cpu_count(), "reuse_workers": True}
        path = spec_file(tmp_path, "warm", arms, seeds=2, resources=res)  # one slot: every run in one worker
        store = Store(str(tmp_path / "store"))
        results = run_experiment(load_spec(path), store)
        assert [r.status for r in results] == ["ok"] * 4
        runs = store.runs("warm")
        assert runs["worker_runs_before"].tolist() == [0, 1, 2, 3]
        assert (runs["launch_s"].iloc[1:] < runs["launch_s"].iloc[0] / 2).all()  # no new processes
        assert runs["final_val_loss"].notna().all()
        end = time.time() + 30
        while _procs_with("trainer.serve") and time.time() < end:
            time.sleep(0.2)
        assert _procs_with("trainer.serve") == []

    def test_script_arms_run_through_ray_and_torchrun(self, tmp_path: Path) -> None:
        """Script arms (a fake record script, tests/ablate/fixtures/script/train_gpt.py): each run in a
        working directory of its own on the real Ray + torchrun path, progress as the log comes, the
        log parsed into rows, curves and step times; a crash, a NaN and a truncated log; resume, an
        edited patch is planned again; table, report and status as for trainer runs."""
        from ablate.cli.main import app
        from ablate.spec.matrix import expand, plan
        from ablate.run.driver import run_experiment
        from ablate.run.progress import NullProgress
        from ablate.spec.model import load_spec

        shutil.copytree(ROOT / "tests" / "ablate" / "fixtures" / "script", tmp_path / "fork")
        (tmp_path / "shards" / "fineweb10B").mkdir(parents=True)  # data_root: $DATA_PATH/data in each run
        diff = "--- a/train_gpt.py\n+++ b/train_gpt.py\n@@ -25,3 +25,3 @@\n \n-LR = 0.02\n+LR = {lr}\n steps = int("
        script = (tmp_path / "fork" / "train_gpt.py").read_text().splitlines(keepends=True)
        assert script[25:27] == ["LR = 0.02\n", 'steps = int(os.environ.get("FAKE_STEPS", "6"))\n']
        diff += script[26][len("steps = int("):]
        (tmp_path / "lr.diff").write_text(diff.format(lr="0.03"))
        path = tmp_path / "fork.yaml"
        path.write_text(textwrap.dedent(f"""\
            name: fork
            trainer: {{script: fork/train_gpt.py, files: [fork/fake_kernels.py]}}
            data_root: {tmp_path / "shards"}
            arms:
              baseline: {{}}
              lr: {{patch: lr.diff}}
              nan: {{env: {{FAKE_NAN_AT: "4"}}}}
              crash: {{env: {{FAKE_CRASH_AT: "3"}}}}
              truncated: {{env: {{FAKE_TRUNCATE_AT: "5"}}}}
            seeds: [1]
            resources: {{gpus_per_run: 0, cpu_ranks_per_run: 1}}
            """))

        class Live(NullProgress):
            def __init__(self) -> None:
                self.val_updates: dict[str, list] = {}
                self.finished_ids: list[str] = []

            def update(self, run_id: str, metrics: dict) -> None:
                if metrics.get("val_loss") is not None and run_id not in self.finished_ids:
                    self.val_updates.setdefault(run_id, []).append(metrics["step"])

            def finished(self, run_id: str, *a, **kw) -> None:
                self.finished_ids.append(run_id)

        store, live = Store(str(tmp_path / "store")), Live()
        results = run_experiment(load_spec(path), store, progress=live)
        assert [(r.request.arm, r.status) for r in results] == [
            ("baseline", "ok"), ("lr", "ok"), ("nan", "diverged"), ("crash", "failed"), ("truncated", "failed")]
        runs = store.runs("fork").set_index("run_id", drop=False)
        by = {(r["arm"], r["seed"]): r for r in runs.to_dict("records")}
        base, lr = by[("baseline", 1)], by[("lr", 1)]
        assert (runs["source"] == "script").all() and (runs["world_size"] == 1).all() and (runs["launch_s"] > 0).all()
        assert base["final_val_loss"] == pytest.approx(3.41) and lr["final_val_loss"] == pytest.approx(3.31)
        assert base["steps"] == 6 and base["train_time_ms"] == 660.0 and base["peak_mem_mib"] == 12.0
        assert base["torch_version"].startswith("2.") and base["python_version"] == platform.python_version()
        sha = hashlib.sha256((tmp_path / "fork" / "train_gpt.py").read_bytes()).hexdigest()
        assert {by[(a, 1)]["script_sha256"] for a in ("baseline", "nan", "crash", "truncated")} == {sha}
        assert lr["script_sha256"] != sha and runs["config_hash"].nunique() == 5  # env is part of the identity
        assert store.read_bytes("fork", f"scripts/{sha}.py") == (tmp_path / "fork" / "train_gpt.py").read_bytes()
        log = store.read_bytes("fork", f"logs/{base['run_id']}.txt").decode()
        assert log.startswith("=" * 100) and "SEED=1 WORLD_SIZE=1 allreduce=0 data=['fineweb10B']" in log
        assert "step:6/6 val_loss:3.4100" in log
        nan, crash, trunc = by[("nan", 1)], by[("crash", 1)], by[("truncated", 1)]
        assert nan["error"].startswith("diverged: val_loss is nan at step 4/6") and math.isnan(nan["final_val_loss"])
        assert crash["error"].startswith("exit code 1\nits log ends at step 3/6") and "fake crash at step 3" in crash["error"]
        assert trunc["error"].startswith("the script exited 0 but its log ends at step 5/6")
        curves, steps = store.curves("fork"), store.steps("fork")
        assert curves[curves["run_id"] == base["run_id"]]["step"].tolist() == [0, 2, 4, 6]
        assert steps[steps["run_id"] == base["run_id"]]["step_ms"].tolist() == [100, 110, 120, 100, 110, 120]
        assert live.val_updates[base["run_id"]][-1] == 6  # val loss reached the progress as the log came

        again = run_experiment(load_spec(path), store)  # resume: every identity has its outcome
        assert all(r.reused for r in again) and len(store.runs("fork")) == 5
        (tmp_path / "lr.diff").write_text(diff.format(lr="0.04"))  # an edited patch: that arm runs again
        planned = plan(expand(load_spec(path)), store.runs("fork"), retries=0)
        assert [(p.request.arm, p.state) for p in planned] == [
            ("baseline", "done"), ("lr", "todo"), ("nan", "done"), ("crash", "exhausted"), ("truncated", "exhausted")]

        res = CliRunner().invoke(app, ["table", "fork", "--store", store.uri, "--format", "md"])
        assert res.exit_code == 0, res.output
        rows = {line.split("|")[1].strip(): line for line in res.stdout.splitlines() if line.startswith("| ")}
        assert rows["lr"].split("|")[2].strip() == "1" and "3.3100" in rows["lr"]
        assert rows["baseline"].split("|")[2].strip() == "1" and "3.4100" in rows["baseline"]
        assert "diverged 1/1" in rows["nan"] and rows["crash"].split("|")[2].strip().startswith("0")
        res = CliRunner().invoke(app, ["report", "fork", "--store", store.uri])
        assert res.exit_code == 0, res.output
        report = store.read_bytes("fork", "report.md").decode()
        assert "Training script `fork/train_gpt.py`" in report and f"`{sha}` (" in report
        res = CliRunner().invoke(app, ["status", "fork", "--store", store.uri])
        assert res.exit_code == 0 and "no longer validates" not in res.output, res.output
        assert re.search(r"total\W+2\W+1\W+2\W+0\W+0\W+2\W", res.output), res.output  # ok, diverged, failed, ...

    def test_resource_request_no_node_can_hold_fails_fast(self, tmp_path: Path) -> None:
        from ablate.cli.main import app

        path = spec_file(tmp_path, "toobig", {"baseline": {}}, resources={"gpus_per_run": 2})
        t0 = time.time()
        res = CliRunner().invoke(app, ["run", str(path), "--store", str(tmp_path / "store")])
        assert res.exit_code == 2, res.output
        assert "resources.gpus_per_run=2: no node of the connected Ray cluster can hold one run" in res.output
        assert "0 GPU" in res.output and time.time() - t0 < 30
        assert "finished: 0/0" not in res.output  # no progress summary before a pre-flight error


# ---------------------------------------------------------------------------------------------
# The CLI as users run it (own embedded cluster per command)
# ---------------------------------------------------------------------------------------------
def test_smoke_experiment(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    res = ablate("run", str(SMOKE.relative_to(ROOT)), "--store", str(store_dir))
    assert res.returncode == 0, res.stdout + res.stderr
    store = Store(str(store_dir))
    runs = store.runs("smoke")
    assert len(runs) == 4 and (runs["status"] == "ok").all()
    assert sorted(zip(runs["arm"], runs["seed"])) == [("baseline", 0), ("baseline", 1),
                                                      ("muon-lr-0.05", 0), ("muon-lr-0.05", 1)]
    assert (runs["final_val_loss"] < 6.0).all() and (runs["steps"] == 12).all()
    assert runs["config_json"].str.contains(str(ROOT / "data")).all()  # data_dir made absolute
    assert runs["data_synthetic"].tolist() == [True] * 4 and runs["data_hash"].nunique() == 1  # start.data
    curves = store.curves("smoke")
    assert set(curves["run_id"]) == set(runs["run_id"])
    assert curves.groupby("run_id")["step"].apply(list).map(lambda s: s[0] == 0 and s[-1] == 12).all()
    assert len(store.steps("smoke")) == 4 * 12
    assert "baseline" in res.stdout and "muon-lr-0.05" in res.stdout  # the table
    assert "4/4 runs, 0 failed" in res.stderr  # the progress (plain lines off a terminal)
    from ablate.cli.main import app

    status = CliRunner().invoke(app, ["status", "smoke", "--store", str(store_dir)])
    assert status.exit_code == 0
    assert re.search(r"total\W+4\W+0\W+0\W+0\W+0\W", status.output), status.output  # ok, failed, ..., missing


def test_resume_after_driver_is_killed(tmp_path: Path) -> None:
    from ablate.spec.model import load_spec

    path = spec_file(tmp_path, "resume", {"baseline": {}, "muon-lr-0.05": {"optim.muon.lr": 0.05}})
    hashes = {arm: load_spec(path).config_hash(arm) for arm in ("baseline", "muon-lr-0.05")}
    store_dir = tmp_path / "store"
    runs_dir = store_dir / "resume" / "runs"
    driver = subprocess.Popen([sys.executable, "-m", "ablate", "run", str(path), "--store", str(store_dir)],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (runs_dir.exists() and any(runs_dir.glob("*.parquet"))):
            assert driver.poll() is None and time.time() < deadline, "driver ended before the first run landed"
            time.sleep(0.2)
        deadline = time.time() + 30  # kill while the second run's trainer is up
        while not _procs_with(f"-{hashes['muon-lr-0.05']}-a1-") and time.time() < deadline:
            time.sleep(0.2)
        assert _procs_with(f"-{hashes['muon-lr-0.05']}-a1-"), "second run never started"
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and its embedded Ray, no cleanup
        driver.wait()
    first = Store(str(store_dir)).runs("resume")
    assert len(first) == 1 and first["status"].iloc[0] == "ok"
    assert first["arm"].iloc[0] == "baseline"
    # no trainer of this experiment survives its killed driver (run ids are in the config file names)
    deadline = time.time() + 30
    while any(_procs_with(f"-{h}-a") for h in hashes.values()):
        assert time.time() < deadline, "orphaned trainer processes"
        time.sleep(0.5)

    import tempfile

    left = list(Path(tempfile.gettempdir()).glob(f"ablate-tune-{driver.pid}-*"))
    assert left and (store_dir / "resume" / "lock.json").exists()  # what the killed driver left behind
    res = ablate("run", str(path), "--store", str(store_dir))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 runs already in the store, skipped" in res.stderr
    # its stale lock was taken over, its marker and its Tune scratch dir cleaned up
    assert f"took over the lock of host {os.uname().nodename}, pid {driver.pid}" in res.stderr
    assert "its driver (pid" in res.stderr and "is no longer running" in res.stderr
    assert "cleaned up after a driver that was killed: 1 in-flight marker(s)" in res.stderr
    assert not any(p.exists() for p in left)
    assert not (store_dir / "resume" / "lock.json").exists()  # released at the end
    runs = Store(str(store_dir)).runs("resume")
    assert len(runs) == 2 and (runs["status"] == "ok").all()
    assert runs.groupby(["arm", "seed"]).size().tolist() == [1, 1]  # no duplicate ok rows
    assert runs["run_id"].iloc[0] == first["run_id"].iloc[0]  # the finished run was not redone
    assert Store(str(store_dir)).inflight("resume") == []


def test_sigterm_cancels_the_run_in_flight(tmp_path: Path) -> None:
    """SIGTERM to the driver: Tune stops, the in-flight run is killed and recorded `cancelled`, exit 130."""
    from ablate.spec.model import load_spec

    path = spec_file(tmp_path, "sigterm", {"baseline": {}}, seeds=2)
    in_flight = f"-{load_spec(path).config_hash('baseline')}-a1-"
    store_dir = tmp_path / "store"
    driver = subprocess.Popen([sys.executable, "-m", "ablate", "run", str(path), "--store", str(store_dir)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        deadline = time.time() + 120
        while not _procs_with(in_flight):  # a trainer is up
            assert driver.poll() is None and time.time() < deadline
            time.sleep(0.2)
        driver.send_signal(signal.SIGTERM)
        _, err = driver.communicate(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 130, err
    assert "recorded as cancelled" in err
    runs = Store(str(store_dir)).runs("sigterm")
    assert "cancelled" in set(runs["status"]) and runs["error"].str.contains("interrupted").any()
    deadline = time.time() + 20
    while _procs_with(in_flight):
        assert time.time() < deadline, "orphaned trainer processes"
        time.sleep(0.2)


def test_ray_job_submit_against_a_started_cluster(tmp_path: Path) -> None:
    """`ray start --head` + `ray job submit --working-dir . -- python -m ablate run ...`.

    The head (tests/ablate/raycluster.py) runs with --block in a session of its own and is stopped
    by signalling that session, without touching any other Ray on the machine; its private
    --temp-dir keeps `ray_current_cluster` away from /tmp/ray, so no later `ray.init()` attaches to it."""
    with RayCluster(num_cpus=2, dashboard=True) as cluster:
        wait_for_dashboard(cluster)
        spec = spec_file(tmp_path, "jobcheck", {"baseline": {}})
        store_dir = tmp_path / "store"  # absolute: the job runs in an uploaded copy of the working dir
        env = client_env()  # clients of a `ray start` cluster (token auth)
        job = subprocess.run(["ray", "job", "submit", f"--address={cluster.dashboard_url}", "--working-dir=.", "--",
                              "python", "-m", "ablate", "run", str(spec), "--store", str(store_dir)],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout + job.stderr
        runs = Store(str(store_dir)).runs("jobcheck")
        assert len(runs) == 1 and runs["status"].iloc[0] == "ok"
        assert "/_ray_pkg_" in runs["config_json"].iloc[0] or "runtime_resources" in runs["config_json"].iloc[0]
        # the same cluster through --address from a driver outside it: one new arm runs, the old is kept
        spec = spec_file(tmp_path, "jobcheck", {"baseline": {}, "lr": {"optim.muon.lr": 0.05}})
        direct = subprocess.run([sys.executable, "-m", "ablate", "run", str(spec), "--address", cluster.address,
                                 "--store", str(store_dir)], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=240)
        assert direct.returncode == 0, direct.stdout[-3000:] + direct.stderr[-3000:]
        runs = Store(str(store_dir)).runs("jobcheck")
        assert list(zip(runs["arm"], runs["status"])) == [("baseline", "ok"), ("lr", "ok")]
        assert runs["node_id"].nunique() == 1  # both on the one node of that cluster
