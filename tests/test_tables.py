"""scripts/run_table.py and guided_diffusion/tables: the papers' tables as data, their commands, the digits
mapping, a smoke table killed mid-row and resumed to the same table."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from guided_diffusion.tables.plan import Plan, Stage, build_plan, digits_student_size
from guided_diffusion.tables.report import judge_claims, summarize
from guided_diffusion.tables.runner import TableRunner
from guided_diffusion.tables.spec import TableError, load_table, table_names

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO_ROOT / "scripts" / "run_table.py")
ISSUE_TABLES = {"dkdm-main", "dkdm-sizes", "dkdm-rho", "dkdm-iteration", "dkdm-baselines", "tccd-main",
                "tccd-sizes", "rdd-cifar10"}


def _commands(plan) -> list[str]:
    return TableRunner(plan, echo=lambda _: None).commands()


def test_every_paper_table_loads_and_plans_the_seed_readmes_commands(tmp_path):
    assert ISSUE_TABLES <= set(table_names())
    for name in ISSUE_TABLES:
        table = load_table(name)
        plan = build_plan(table, "full", tmp_path / name)
        commands = _commands(plan)
        launcher = "python -m torch.distributed.run --nproc_per_node 1 " if table.launcher == "torchrun" \
            else "mpiexec -n 1 python "
        trained = [c for c in commands if "image_kd.py" in c or "image_train.py" in c or "rcfd_train.py" in c]
        assert len(trained) == sum(r.method != "teacher" for r in table.rows), name
        assert all(c.startswith(launcher) for c in trained), name
        evaluations = [c for c in commands if c.startswith("python evaluations/evaluator.py ")]
        assert len(evaluations) == len(table.rows), name


def test_shared_stages_run_once_per_product(tmp_path):
    rho = build_plan(load_table("dkdm-rho"), "full", tmp_path / "rho")
    prepares = [s for s in rho.stages if s.kind == "prepare"]
    assert len(prepares) == 8 and len({s.key for s in prepares}) == 8  # one pool cache per rho
    iteration = build_plan(load_table("dkdm-iteration"), "full", tmp_path / "it")
    # the shuffled mode reads the rho 0.4 pool: one preparation serves it and the dynamic row; iterative: none
    assert [s.key for s in iteration.stages if s.kind == "prepare"] == \
        ["prepare:experiments/cache/CIFAR10-Dynamic-0.4.cache"]
    baselines = build_plan(load_table("dkdm-baselines"), "full", tmp_path / "b", seeds=(0, 1))
    assert len([s for s in baselines.stages if s.kind == "synthetic"]) == 2  # one teacher set per seed
    mixes = [s for s in baselines.stages if s.kind == "mix"]
    ratios = {s.args[s.args.index("--ratio") + 1] for s in mixes}
    assert len(mixes) == 10 and ratios == {"0.05", "0.1", "0.15", "0.2", "1"}
    main = build_plan(load_table("dkdm-main"), "full", tmp_path / "m")
    synthetic = [s for s in main.stages if s.kind == "synthetic"]
    assert [s.args[s.args.index("--model_path") + 1] for s in synthetic] == [
        "model/32x32_diffusion_cifar10.pt", "model/DDPM_IP_celeba64.pt", "model/DDPM_IP_imageNet32.pt"]


def test_digits_mapping_keeps_rho_mode_and_relative_size(tmp_path):
    plan = build_plan(load_table("dkdm-rho"), "digits", tmp_path / "rho", rows=["rho-0.01", "rho-0.4"])
    for name, rho in (("rho-0.01", 0.01), ("rho-0.4", 0.4)):
        assert plan.rows[name]["pool"] == round(rho * 1000) * 64  # the digits batch over 1000 steps
        edits = plan.rows[name]["edits"]
        assert edits["teacher.BATCH"] == rho
        assert edits["teacher.timestep_respacing"] == edits["student.timestep_respacing"] == "1000"
    from guided_diffusion.config import load_config
    from guided_diffusion.distill.dkdm.setup import student_diffusion_of

    cfg = load_config(tmp_path / "rho" / "configs" / "rho-0.01.yaml")
    assert student_diffusion_of(cfg.student).num_timesteps == 1000  # round(0.01 x 1000) x B: the paper's
    it = build_plan(load_table("dkdm-iteration"), "digits", tmp_path / "it", steps=7)
    assert all("--max_steps 7 " in c for c in _commands(it) if "image_kd.py" in c)
    assert {n: r["edits"]["teacher.iter_choice"] for n, r in it.rows.items()} == {
        "iterative": "iterative_distillation", "shuffled": "shuffled_iterative_distillation",
        "dynamic": "dynamic_iterative_distillation"}
    sizes = {s: digits_student_size(f"yaml/cifar10_32/exp/CIFAR10-{s}-Dynamic-0.4.yaml")
             for s in ("57M", "44M", "32M", "24M", "14M")}
    assert [(v["num_channels"], v["num_res_blocks"]) for v in sizes.values()] == [
        (32, 2), (32, 1), (24, 2), (24, 1), (16, 2)]
    assert all(v["num_channels"] % v["num_head_channels"] == 0 for v in sizes.values())


def test_bad_tables_are_one_line_errors(tmp_path):
    with pytest.raises(TableError, match="no table 'nope'"):
        load_table("nope")
    bad = tmp_path / "bad.yaml"
    text = (REPO_ROOT / "yaml" / "tables" / "tccd-main.yaml").read_text()
    bad.write_text(text.replace("CIFAR10-14M-TCCD-0.4.yaml", "CIFAR10-14M-TCCD-9.yaml"))
    with pytest.raises(TableError, match=r"rows\[2\] \(tccd\): config .*TCCD-9.yaml does not exist"):
        load_table(str(bad))
    bad.write_text(text.replace("better: tccd", "better: tcd"))
    with pytest.raises(TableError, match=r"claims\[0\].better names no row \('tcd'\)"):
        load_table(str(bad))
    bad.write_text(text + "colour: blue\n")
    with pytest.raises(TableError, match="unknown key.*colour"):
        load_table(str(bad))
    proc = subprocess.run([sys.executable, SCRIPT, "tccd-main", "--rows", "dkdm,nope", "--dry_run"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no row 'nope'" in proc.stderr


def test_seed_rows_run_every_seed_and_the_other_rows_the_first_only(tmp_path):
    plan = build_plan(load_table("dkdm-iteration"), "digits", tmp_path, seeds=(3, 5), seed_rows=["dynamic"])
    assert sorted(plan.rows) == ["dynamic@s3", "dynamic@s5", "iterative@s3", "shuffled@s3"]
    trains = sorted(s.row for s in plan.stages if s.kind == "train")
    assert trains == ["dynamic@s3", "dynamic@s5", "iterative@s3", "shuffled@s3"]
    with pytest.raises(TableError, match="no row 'nope'"):
        build_plan(load_table("dkdm-iteration"), "digits", tmp_path, seeds=(0, 1), seed_rows=["nope"])


def test_claims_hold_only_beyond_the_measured_spread(tmp_path):
    plan = build_plan(load_table("tccd-main"), "smoke", tmp_path, seeds=(0, 1), rows=["dkdm", "tccd"])
    fids = {"baseline@s0": 9.0, "baseline@s1": 9.4, "dkdm@s0": 8.0, "dkdm@s1": 8.2, "tccd@s0": 7.9,
            "tccd@s1": 8.1}
    earlier = {f"baseline@s{s}": {"row": "baseline", "seed": s} for s in (0, 1)}  # an earlier --rows call
    state = {"rows": {k: {"fid": v} for k, v in fids.items()}, "stages": {}, "row_info": earlier}
    rows = summarize(plan, state)
    assert rows["baseline"]["fid_spread"] == pytest.approx(0.4) and rows["dkdm"]["fid"] == pytest.approx(8.1)
    verdicts = {(v["better"], v["worse"]): v["verdict"] for v in judge_claims(plan, rows)}
    assert verdicts[("dkdm", "baseline")] == "holds"  # gap 1.1 > spread 0.4
    assert verdicts[("tccd", "dkdm")] == "within the spread"  # gap 0.1


def test_an_interrupted_training_stage_resumes_from_its_run_dir(tmp_path):
    plan = build_plan(load_table("tccd-main"), "smoke", tmp_path, rows=["dkdm"])
    runner = TableRunner(plan, echo=lambda _: None)
    train = next(s for s in plan.stages if s.kind == "train")
    assert not runner._resumable(train)
    Path(train.run_dir).mkdir(parents=True)
    (Path(train.run_dir) / "latest").write_text("{}")
    assert runner._resumable(train)
    assert runner.command(train, resume=True)[-2:] == ["--resume_checkpoint", train.resume[1]]
    assert Path(train.resume[1]).resolve() == Path(train.run_dir).resolve()
    assert "--resume_checkpoint" not in runner.command(train)


def _table_rows(out: Path) -> dict:
    rows = json.loads((out / "table.json").read_text())["rows"]
    return {name: {k: row[k] for k in ("fid", "precision", "recall", "class_histogram", "params")}
            for name, row in rows.items()}


def test_smoke_table_killed_mid_row_resumes_to_the_same_table(tmp_path):
    """The whole TCCD table, run two stages at a time, killed with SIGKILL once the DKDM row's training is
    done and resumed: the numbers of an uninterrupted one-at-a-time run, and nothing finished before the kill
    runs again."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    base = [sys.executable, SCRIPT, "tccd-main", "--smoke"]
    control = subprocess.run([*base, "--out", str(tmp_path / "control")], env=env, capture_output=True,
                             text=True, timeout=300)
    assert control.returncode == 0, control.stdout[-2000:] + control.stderr[-2000:]
    out = tmp_path / "killed"
    base += ["--jobs", "2"]
    proc = subprocess.Popen([*base, "--out", str(out)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        state = out / "state.json"
        stages = json.loads(state.read_text())["stages"] if state.is_file() else {}
        if stages.get("train:dkdm", {}).get("status") == "done":
            os.killpg(proc.pid, signal.SIGKILL)  # the runner and the stage it started, mid-row
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the table finished before it could be killed mid-row"
    before = json.loads((out / "state.json").read_text())["stages"]
    assert "evaluate:dkdm" not in before
    resumed = subprocess.run([*base, "--out", str(out)], env=env, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    after = json.loads((out / "state.json").read_text())["stages"]
    for key in (k for k, v in before.items() if v["status"] == "done"):  # finished before the kill: kept
        log = out / "logs" / f"{key.replace(':', '_').replace('/', '_')}.log"
        assert log.read_text().count("\n$ ") + log.read_text().startswith("$ ") == 1, key
        assert after[key] == before[key]
    rows = _table_rows(out)
    assert set(rows) == {"baseline", "dkdm", "tccd"} and rows == _table_rows(tmp_path / "control")
    assert all(len(r["class_histogram"]) == 10 and sum(r["class_histogram"]) == 8 for r in rows.values())
    assert all(v["status"] == "done" for v in after.values())
    assert "DKDM" in (out / "table.md").read_text()


def test_jobs_run_independent_stages_side_by_side_and_dependents_after(tmp_path):
    """With --jobs 2 two stages without mutual inputs overlap; a stage that needs both starts after both."""
    script = tmp_path / "stage.py"
    line = "open(sys.argv[1], 'a').write(f'{sys.argv[2]} %s {time.time()}\\n')\n"
    script.write_text("import sys, time\n" + line % "start" + "time.sleep(0.6)\n" + line % "end")
    events = tmp_path / "events.txt"
    stages = [Stage(name, "data", str(script), [str(events), name], 0, after=after)
              for name, after in (("a", []), ("b", []), ("c", ["a", "b"]))]
    table = load_table("tccd-main")
    settings = {"table": table.name, "mode": "smoke", "steps": 1, "seeds": [0], "ranks": 1,
                "sample": {"num_samples": 1, "timestep_respacing": "1"}}
    plan = Plan(table, "smoke", tmp_path / "out", (0,), 1, stages, settings, {})
    assert TableRunner(plan, echo=lambda _: None, jobs=2).run() == 0
    times = {}
    for line in events.read_text().split("\n")[:-1]:
        name, what, when = line.split()
        times[(name, what)] = float(when)
    assert times[("b", "start")] < times[("a", "end")] and times[("a", "start")] < times[("b", "end")]
    assert times[("c", "start")] >= max(times[("a", "end")], times[("b", "end")])
