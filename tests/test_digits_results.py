"""benchmarks/digits_results.py: the digits benchmark runner end to end on CPU (tiny), its tables, guards."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


dr = _load("digits_results")

TINY = ["--steps", "2", "--eval_every", "1", "--num_samples", "8", "--respacing", "5", "--batch_size", "4",
        "--baseline_samples", "8", "--device", "cpu", "--seed", "3"]


def test_runner_end_to_end_writes_json_markdown_plot_and_grids(tmp_path):
    out = tmp_path / "bench"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO_ROOT / "benchmarks" / "digits_results.py"), "--out", str(out),
           "--methods", "reference,dkdm,baseline", *TINY]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["steps"] == 2 and results["settings"]["seed"] == 3
    assert results["settings"]["ema_rate"] == "0.9"  # auto: 2 steps are too few for any slower EMA
    rows = results["rows"]
    assert set(rows) == {"real_train", "noise", "untrained", "dkdm", "baseline"}
    for name, row in rows.items():
        assert row["status"] == "done", (name, row.get("error"))
        assert row["fid"] is not None and row["fid"] >= 0, name
        assert 0.0 <= row["precision"] <= 1.0 and 0.0 <= row["recall"] <= 1.0, name
        assert (out / row["grid"]).is_file(), name
    # real digits are far closer to the reference split than noise or an untrained model
    assert rows["real_train"]["fid"] < min(rows["noise"]["fid"], rows["untrained"]["fid"])
    for name in ("dkdm", "baseline"):
        row = rows[name]
        assert row["steps"] == 2 and [p["step"] for p in row["curve"]] == [1, 2]
        assert row["params"] == rows["dkdm"]["params"] < rows["untrained"]["params"]  # same student arch
        assert row["train_wall_s"] > 0 and row["total_wall_s"] >= row["train_wall_s"]
        assert row["curve"][-1]["fid"] == row["fid"]
    kd_cmds, base_cmds = rows["dkdm"]["commands"], rows["baseline"]["commands"]
    assert kd_cmds[0].startswith("python scripts/dynamic_prepare.py --config ")
    assert kd_cmds[1].startswith("python scripts/image_kd.py ") and "--max_steps 2" in kd_cmds[1]
    assert "--seed 3" in kd_cmds[1] and "--seed 3" in base_cmds[1]
    assert base_cmds[0].startswith("python scripts/image_sample.py --config yaml/digits_16/teacher.yaml")
    assert "--num_samples 8" in base_cmds[0] and "--data_dir " in base_cmds[1]
    assert rows["dkdm"]["config_edits"]["student.timestep_respacing"] == "5"
    assert (out / "configs" / "dkdm.yaml").is_file() and (out / "pools" / "dkdm.cache").is_file()

    md = (out / "results.md").read_text()
    assert "## Equal steps from the same teacher" in md and "| DKDM (data-free) | done | 2 |" in md
    assert "## TCCD vs DKDM (equal steps)" in md and "python scripts/image_kd.py" in md
    assert (out / "fid_over_steps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a later call with other settings must not mix its rows into this table
    assert dr.main(["--out", str(out), "--methods", "reference", *TINY[:-2], "--seed", "4"]) == 2


def test_markdown_says_which_of_tccd_and_dkdm_is_better_and_by_how_much():
    base = {"table": "main", "status": "done", "steps": 100, "params": 10, "precision": 0.5, "recall": 0.4,
            "train_wall_s": 1.0, "total_wall_s": 2.0, "commands": ["python scripts/image_kd.py --config x"]}
    results = {
        "settings": {"seed": 0, "steps": 100, "batch_size": None, "ema_rate": "0.99", "num_samples": 50,
                     "respacing": "50", "device": "cpu"},
        "invocations": ["python benchmarks/digits_results.py --out d --steps 100"],
        "rows": {
            "dkdm": {**base, "name": "dkdm", "label": "DKDM", "fid": 20.0},
            "tccd": {**base, "name": "tccd", "label": "TCCD", "fid": 15.0, "precision": 0.6},
            "pd": {**base, "name": "pd", "label": "PD", "table": "rdd", "fid": 30.0},
        },
    }
    md = dr.render_markdown(results)
    assert "**TCCD is better** by 5.00 digits-FID (25.0% of DKDM's FID)." in md
    assert "| digits-FID | 20.00 | 15.00 | -5.00 |" in md and "| precision | 0.500 | 0.600 | +0.100 |" in md
    assert "| PD | done | 100 | 30.00 |" in md and "RDD 8->4 steps vs PD: not both evaluated yet." in md
    assert dr.compare(results["rows"], "dkdm", "pd")["better"] == "dkdm"


def test_ema_eval_order_and_rdd_config_discovery(tmp_path):
    assert dr.auto_ema_rate(100000) == "0.9999"
    assert dr.auto_ema_rate(20000) == "0.999" and dr.auto_ema_rate(2000) == "0.995"
    assert dr.eval_order([5, 2, 4, 6, 3], 2) == [6, 2, 4]
    assert dr.eval_order([7, 3], 0) == [7]
    for name in ("Digits-PD-8to4.yaml", "Digits-RDD-8to4.yaml", "notes.txt"):
        (tmp_path / name).write_text("a: 1\n")
    assert dr.find_rdd_config("pd", tmp_path).name == "Digits-PD-8to4.yaml"
    assert dr.find_rdd_config("rdd", tmp_path).name == "Digits-RDD-8to4.yaml"
    (tmp_path / "Digits-RDD-other.yaml").write_text("a: 1\n")
    with pytest.raises(FileNotFoundError, match="expected one rdd config"):
        dr.find_rdd_config("rdd", tmp_path)


def test_derived_config_applies_dotted_edits_and_names_missing_sections(tmp_path):
    src = tmp_path / "kd.yaml"
    src.write_text("teacher:\n  tempfile: a.cache\nstudent:\n  ema_rate: '0.9999'\n")
    dst = tmp_path / "out" / "kd.yaml"
    dst.parent.mkdir()
    dr.derive_config(src, dst, {"teacher.tempfile": "b.cache", "student.ema_rate": "0.99"}, "test")
    text = dst.read_text()
    assert "tempfile: b.cache" in text and "ema_rate: '0.99'" in text
    with pytest.raises(ValueError, match="no 'tccd:' section"):
        dr.derive_config(src, dst, {"tccd.weight": 1.0}, "test")


def test_bad_method_name_is_one_line_error(tmp_path, capsys):
    assert dr.main(["--out", str(tmp_path), "--steps", "1", "--methods", "dkdm,foo"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown method(s) ['foo']") and "\n" not in err


def test_merge_takes_side_by_side_runners_rows_and_grids_and_renders_the_architecture_table(tmp_path):
    """Runners run beside each other on one GPU write their own dirs; --merge joins rows made with the same
    settings (grids copied) into one table and refuses a dir made with other settings."""

    def runner_dir(name: str, lr: float, rows: dict) -> Path:
        folder = tmp_path / name
        (folder / "grids").mkdir(parents=True)
        settings = {"steps": 2, "num_samples": 8, "seed": 3, "respacing": "5", "ema_rate": "0.9",
                    "batch_size": 4, "lr": lr}
        for row_name, row in rows.items():
            (folder / "grids" / f"{row_name}.png").write_bytes(b"png")
            row.update(grid=f"grids/{row_name}.png", table=row.get("table", "arch"), status="done")
        results = {"settings": settings, "invocations": [f"call {name}"], "artifacts": {}, "rows": rows}
        (folder / "results.json").write_text(json.dumps(results))
        return folder

    cnn = runner_dir("cnn", 1e-3, {"dkdm": {"name": "dkdm", "label": "DKDM (data-free)", "fid": 3.0,
                                            "table": "main"}})
    dit = runner_dir("dit", 1e-3, {"dkdm_cnn_dit": {"name": "dkdm_cnn_dit", "label": "DKDM CNN -> DiT",
                                                    "fid": 4.5}})
    other = runner_dir("other", 5e-4, {"dkdm_dit_dit": {"name": "dkdm_dit_dit", "label": "x", "fid": 9.0}})
    args = dr.parse_args(["--out", str(tmp_path / "table"), "--methods", "", "--merge", "x", *TINY, "--lr",
                          "1e-3"])
    bench = dr.DigitsBenchmark(args, [])
    bench.merge([str(cnn), str(dit)])
    assert set(bench.results["rows"]) == {"dkdm", "dkdm_cnn_dit"}
    assert (tmp_path / "table" / "grids" / "dkdm_cnn_dit.png").read_bytes() == b"png"
    assert bench.results["invocations"][-2:] == ["call cnn", "call dit"]
    table = dr.render_markdown(bench.results).split("## Any architecture")[1].split("\n## ")[0]
    assert "| DKDM CNN -> CNN | done |" in table and "| DKDM CNN -> DiT | done |" in table
    assert table.index("CNN -> CNN") < table.index("CNN -> DiT")
    with pytest.raises(dr.BenchError, match=r"other.*other settings \(lr\)"):
        bench.merge([str(other)])


def test_set_edits_tag_and_next_stage_config(tmp_path):
    """--set reads values as YAML would, --tag names the rows, and a 4->2 stage takes the finished 8->4
    row's final EMA student as its teacher on grids half the source config's."""
    assert dr.parse_edits(["step_distill.teacher_clip=false", "step_distill.student_prediction=x0",
                           "student.lr=0.5"]) == {"step_distill.teacher_clip": False,
                                                  "step_distill.student_prediction": "x0", "student.lr": 0.5}
    for bad in ("teacher_clip", "=1", "a..b=1"):
        with pytest.raises(dr.BenchError, match="--set expects KEY=VALUE"):
            dr.parse_edits([bad])
    with pytest.raises(dr.BenchError, match="--tag"):
        dr.parse_args(["--out", str(tmp_path), "--methods", "pd", "--tag", "a b", *TINY])
    args = dr.parse_args(["--out", str(tmp_path / "o"), "--methods", "pd,pd_4to2", "--tag", "eps_clipoff",
                          "--set", "step_distill.teacher_clip=false", *TINY])
    bench = dr.DigitsBenchmark(args, [])
    assert bench.row_name("pd") == "pd@eps_clipoff"
    raw = {"teacher": {"timestep_respacing": "trailing8"}, "student": {"timestep_respacing": "trailing4"}}
    with pytest.raises(RuntimeError, match="needs a finished pd@eps_clipoff row"):
        bench.next_stage_edits(raw, "pd")
    run = tmp_path / "o" / "runs" / "pd@eps_clipoff"
    run.mkdir(parents=True)
    for step in (1, 2):
        (run / f"ema_0.9_{step:06d}.pt").write_bytes(b"")
    bench.results["rows"]["pd@eps_clipoff"] = {"status": "done"}
    edits = bench.next_stage_edits(raw, "pd")
    assert edits == {"teacher.model_path": str(run / "ema_0.9_000002.pt"),
                     "teacher.timestep_respacing": "trailing4", "student.timestep_respacing": "trailing2"}
    stage = bench.config_edits(dr.TRAINED["pd_4to2"], dr.find_rdd_config("pd"), "data.npz")
    assert stage["teacher.timestep_respacing"] == "trailing4" and stage["student.data_dir"] == "data.npz"
    assert stage["step_distill.teacher_clip"] is False
