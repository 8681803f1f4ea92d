"""The digits benchmark behind docs/RESULTS.md: DKDM vs baselines vs TCCD vs RDD at equal steps, one teacher.

    python benchmarks/digits_results.py --out DIR --steps N [--methods reference,teacher,dkdm,baseline,real,
        tccd,pd,rdd] [--eval_every K] [--num_samples M] [--device cuda|cpu] [--seed S] [--budget_s SEC]

Every trained method runs through the real scripts (dynamic_prepare, image_kd, image_sample, image_train) as
subprocesses with one seed and the same number of steps; each exact command is logged. EMA checkpoints saved
every K steps are sampled (M images) and scored with the digits feature network (digits-FID, precision,
recall against the reference split). After every method DIR/results.json (merged over calls), results.md
(tables for docs/RESULTS.md), fid_over_steps.png and grids/<row>.png are rewritten atomically, so a call cut
off by a time limit still leaves the numbers of the methods it finished.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import guided_diffusion.distill  # noqa: E402, F401 (registers the methods' YAML sections)
from benchmarks.plot_results import plot_fid_over_steps  # noqa: E402
from evaluations import metrics  # noqa: E402
from guided_diffusion.config import ConfigError, load_config, primary_section  # noqa: E402
from guided_diffusion.infra.checkpoint import atomic_write_bytes, parse_step  # noqa: E402
from guided_diffusion.run_setup import build_model_and_diffusion, load_model_weights  # noqa: E402
from guided_diffusion.sampling import sample_images, save_grid  # noqa: E402
from guided_diffusion.tables.plan import auto_ema_rate, derive_config  # noqa: E402

ALL_METHODS = (
    "reference", "teacher", "dkdm", "baseline", "real", "tccd", "pd", "rdd", "pd_4to2", "rdd_4to2",
    "dit_teacher", "dkdm_cnn_dit", "dkdm_dit_cnn", "dkdm_dit_dit",
)
TEACHER_YAML = "yaml/digits_16/teacher.yaml"
DIT_TEACHER_YAML = "yaml/digits_16/dit_teacher.yaml"  # the DiT teacher of the architecture table
TEACHER_ARCH = "yaml/digits_16/arch/teacher.yaml"
DIFFUSION_YAML = "yaml/digits_16/diffusion.yaml"
TEACHER_CKPT = "model/digits16_teacher.pt"
DDIM_GRIDS = ("ddim", "trailing")  # respacings sampled with DDIM (eta 0)
RDD_CONFIG_DIR = "yaml/digits_16/exp/rdd"
TEACHER_DDIM_ROWS = {"teacher_ddim8": "trailing8", "teacher_ddim4": "trailing4", "teacher_ddim2": "trailing2"}
# settings that must agree across calls writing into the same DIR (rows are compared with each other)
SHARED_SETTINGS = ("steps", "num_samples", "seed", "respacing", "ema_rate", "batch_size", "lr")


@dataclass(frozen=True)
class TrainedMethod:
    """A method trained by a real script: its YAML, how its data or pool is made, which table it joins."""

    name: str
    label: str
    script: str
    config: str  # repo-relative YAML, or "" when found in RDD_CONFIG_DIR by name
    table: str  # "main" or "rdd"
    needs_pool: bool = False  # DKDM-style: prepare the dynamic batch first
    data: str = ""  # "" (data-free, no data), "teacher_samples" or "real"
    own_grid: bool = False  # sample on the config's own DDIM grid (trailingN) instead of --respacing
    stage_of: str = ""  # a next halving stage: the named row's final EMA student is this one's teacher


TRAINED: dict[str, TrainedMethod] = {
    m.name: m
    for m in (
        TrainedMethod(
            "dkdm",
            "DKDM (data-free)",
            "scripts/image_kd.py",
            "yaml/digits_16/exp/Digits-DKDM.yaml",
            "main",
            needs_pool=True,
        ),
        TrainedMethod(
            "baseline",
            "Baseline (teacher samples)",
            "scripts/image_train.py",
            "yaml/digits_16/exp/Digits-Baseline.yaml",
            "main",
            data="teacher_samples",
        ),
        TrainedMethod(
            "real",
            "Real data (train split)",
            "scripts/image_train.py",
            "yaml/digits_16/exp/Digits-Real.yaml",
            "main",
            data="real",
        ),
        TrainedMethod(
            "tccd",
            "TCCD (data-free)",
            "scripts/image_kd.py",
            "yaml/digits_16/exp/Digits-TCCD.yaml",
            "main",
            needs_pool=True,
        ),
        TrainedMethod(
            "dkdm_cnn_dit", "DKDM CNN -> DiT", "scripts/image_kd.py",
            "yaml/digits_16/exp/Digits-DKDM-CNN-to-DiT.yaml", "arch", needs_pool=True,
        ),
        TrainedMethod(
            "dkdm_dit_cnn", "DKDM DiT -> CNN", "scripts/image_kd.py",
            "yaml/digits_16/exp/Digits-DKDM-DiT-to-CNN.yaml", "arch", needs_pool=True,
        ),
        TrainedMethod(
            "dkdm_dit_dit", "DKDM DiT -> DiT", "scripts/image_kd.py",
            "yaml/digits_16/exp/Digits-DKDM-DiT-to-DiT.yaml", "arch", needs_pool=True,
        ),
        TrainedMethod(
            "pd", "PD 8->4 steps", "scripts/step_distill.py", "", "rdd", data="teacher_samples", own_grid=True
        ),
        TrainedMethod(
            "rdd", "RDD 8->4 steps", "scripts/step_distill.py", "", "rdd", data="teacher_samples",
            own_grid=True,
        ),
        TrainedMethod(
            "pd_4to2", "PD 4->2 steps", "scripts/step_distill.py", "", "rdd", data="teacher_samples",
            own_grid=True, stage_of="pd",
        ),
        TrainedMethod(
            "rdd_4to2", "RDD 4->2 steps", "scripts/step_distill.py", "", "rdd", data="teacher_samples",
            own_grid=True, stage_of="rdd",
        ),
    )
}


class BenchError(ValueError):
    """Bad arguments or an output dir made with other settings; the message is one line."""


# ----------------------------------------------------------------------------------------------- helpers


def find_rdd_config(method: str, config_dir: Path = REPO_ROOT / RDD_CONFIG_DIR) -> Path:
    """The one YAML in `config_dir` for `method` ('pd': name has 'pd' but not 'rdd'; 'rdd': has 'rdd')."""
    names = sorted(Path(p) for p in glob.glob(str(config_dir / "*.yaml")))
    if method == "rdd":
        found = [p for p in names if "rdd" in p.name.lower()]
    else:
        found = [p for p in names if "pd" in p.name.lower() and "rdd" not in p.name.lower()]
    if len(found) != 1:
        raise FileNotFoundError(
            f"expected one {method} config in {config_dir}, found {[p.name for p in found]}; "
            f"pass --{method}_config"
        )
    return found[0]


def parse_edits(items: Sequence[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings as {dotted key: YAML value}; BenchError names a malformed one."""
    edits = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
            raise BenchError(f"--set expects KEY=VALUE with a dotted key, got {item!r}")
        edits[key.strip()] = OmegaConf.select(OmegaConf.from_dotlist([item.strip()]), key.strip())
    return edits


def display_command(argv: Sequence[str]) -> str:
    """A command as RESULTS.md quotes it: `python` for this interpreter, repo paths relative to the repo."""
    shown = ["python" if a == sys.executable else a for a in argv]
    prefix = str(REPO_ROOT) + os.sep
    return shlex.join(a[len(prefix) :] if a.startswith(prefix) else a for a in shown)


def json_ready(obj: Any) -> Any:
    """`obj` with non-finite floats as None and numpy scalars as Python numbers (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def checkpoint_steps(run_dir: Path) -> dict[int, Path]:
    """EMA checkpoints `ema_<rate>_NNNNNN.pt` of a run dir by step."""
    return {parse_step(p): Path(p) for p in glob.glob(str(run_dir / "ema_*_*.pt"))}


def eval_order(steps: Sequence[int], every: int) -> list[int]:
    """The final step first (the table's number), then every K-th step ascending (the curve)."""
    if not steps:
        return []
    final = max(steps)
    rest = sorted(s for s in steps if s != final and every > 0 and s % every == 0)
    return [final, *rest]


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


# ------------------------------------------------------------------------------------------------ report


def _main_row(row: Mapping[str, Any]) -> str:
    return (
        f"| {row.get('label', row['name'])} | {row.get('status', '')} | {_fmt(row.get('steps'), 'd')} "
        f"| {_fmt(row.get('fid'), '.2f')} | {_fmt(row.get('precision'), '.3f')} "
        f"| {_fmt(row.get('recall'), '.3f')} | {_fmt(row.get('params'), ',d')} "
        f"| {_fmt(row.get('train_wall_s'), '.1f')} | {_fmt(row.get('total_wall_s'), '.1f')} |"
    )


MAIN_HEADER = (
    "| method | status | steps | digits-FID | precision | recall | params | train wall s | total wall s |\n"
    "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
)


def compare(rows: Mapping[str, Any], a: str, b: str) -> dict[str, Any] | None:
    """`b` against `a` by digits-FID (lower is better): difference, relative change, the better one."""
    ra, rb = rows.get(a, {}), rows.get(b, {})
    if ra.get("fid") is None or rb.get("fid") is None:
        return None
    diff = rb["fid"] - ra["fid"]
    better = "tie" if diff == 0 else (b if diff < 0 else a)
    return {
        "fid_a": ra["fid"],
        "fid_b": rb["fid"],
        "diff": diff,
        "relative": diff / ra["fid"] if ra["fid"] else None,
        "better": better,
    }


def _comparison_lines(rows: Mapping[str, Any], a: str, b: str) -> list[str]:
    cmp = compare(rows, a, b)
    la, lb = (rows.get(n, {}).get("label", TRAINED[n].label if n in TRAINED else n) for n in (a, b))
    if cmp is None:
        return [f"{lb} vs {la}: not both evaluated yet."]
    lines = [
        "| | " + la + " | " + lb + " | difference (" + b + " - " + a + ") |",
        "| --- | ---: | ---: | ---: |",
    ]
    for key, spec in (("fid", ".2f"), ("precision", ".3f"), ("recall", ".3f")):
        va, vb = rows[a].get(key), rows[b].get(key)
        diff = _fmt(vb - va, "+" + spec) if va is not None and vb is not None else "n/a"
        lines.append(
            f"| {'digits-FID' if key == 'fid' else key} | {_fmt(va, spec)} | {_fmt(vb, spec)} | {diff} |"
        )
    if cmp["better"] == "tie":
        verdict = f"{lb} and {la} tie on digits-FID."
    else:
        winner = rows[cmp["better"]].get("label", cmp["better"])
        rel = f" ({abs(cmp['relative']) * 100:.1f}% of {la}'s FID)" if cmp["relative"] is not None else ""
        verdict = f"**{winner} is better** by {abs(cmp['diff']):.2f} digits-FID{rel}."
    return [*lines, "", verdict]


def render_markdown(results: Mapping[str, Any]) -> str:
    """Markdown for docs/RESULTS.md: reference rows, main table, TCCD vs DKDM, RDD table, curve, commands."""
    s = results["settings"]
    rows = results.get("rows", {})
    out = [
        "# Digits benchmark results",
        "",
        f"Device: {s.get('device_name', s.get('device'))}. Seed {s['seed']}, {s['steps']} training steps per "
        f"method, batch {s['batch_size'] or 'as in the YAML'}, lr {s.get('lr') or 'as in the YAML'}, "
        f"EMA {s['ema_rate']}, {s['num_samples']} "
        f"samples per evaluation, {s['respacing']} sampling steps unless noted; digits-FID, precision, recall"
        " against the reference split in the feature space of model/digits32_features.pt.",
        "",
        "Runner calls that made these numbers:",
        "",
        *[f"    {c}" for c in results.get("invocations", [])],
        "",
        "## Reference points",
        "",
        "| row | sampler | digits-FID | precision | recall | params | wall s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows.values():
        if row.get("table") == "reference":
            out.append(
                f"| {row['label']} | {row.get('sampler', '')} | {_fmt(row.get('fid'), '.2f')} "
                f"| {_fmt(row.get('precision'), '.3f')} | {_fmt(row.get('recall'), '.3f')} "
                f"| {_fmt(row.get('params'), ',d')} | {_fmt(row.get('total_wall_s'), '.1f')} |"
            )
    out += ["", "## Equal steps from the same teacher", "", MAIN_HEADER]
    out += [_main_row(row) for row in rows.values() if row.get("table") == "main"]
    out += ["", "## TCCD vs DKDM (equal steps)", "", *_comparison_lines(rows, "dkdm", "tccd")]
    if any(row.get("table") == "arch" for row in rows.values()):
        out += ["", "## Any architecture: CNN and DiT teachers and students (equal steps)", "", MAIN_HEADER]
        out += [_main_row({**rows[n], "steps": None}) for n in ("teacher", "dit_teacher") if n in rows]
        out += [_main_row({**rows[n], "label": "DKDM CNN -> CNN"}) for n in ("dkdm",) if n in rows]
        out += [_main_row(row) for row in rows.values() if row.get("table") == "arch"]
    out += ["", "## RDD: 8-step teacher, 4-step PD and RDD students (equal steps)", "", MAIN_HEADER]
    out += [_main_row({**rows[n], "steps": None}) for n in TEACHER_DDIM_ROWS if n in rows]
    out += [_main_row(row) for row in rows.values() if row.get("table") == "rdd"]
    out += ["", *_comparison_lines(rows, "pd", "rdd")]
    curves = {n: r for n, r in rows.items() if r.get("curve")}
    if curves:
        steps = sorted({p["step"] for r in curves.values() for p in r["curve"]})
        out += [
            "",
            "## digits-FID over training steps",
            "",
            "![FID over steps](fid_over_steps.png)",
            "",
            "| step | " + " | ".join(r["label"] for r in curves.values()) + " |",
            "| ---: |" + " ---: |" * len(curves),
        ]
        for step in steps:
            cells = [
                _fmt(next((p["fid"] for p in r["curve"] if p["step"] == step), None), ".2f")
                for r in curves.values()
            ]
            out.append(f"| {step} | " + " | ".join(cells) + " |")
    out += ["", "## Commands", ""]
    for row in rows.values():
        if row.get("commands"):
            out.append(f"{row['label']}:")
            out.append("")
            out += [f"    {c}" for c in row["commands"]]
            if row.get("config_edits"):
                edits = ", ".join(f"{k}={v}" for k, v in row["config_edits"].items())
                out.append(f"    # {row['config']} = {row['source_config']} with {edits}")
            out.append("")
    failures = [r for r in rows.values() if r.get("error")]
    if failures:
        out += ["## Not finished", ""] + [f"- {r['label']}: {r['status']}: {r['error']}" for r in failures]
    return "\n".join(out).rstrip() + "\n"


# ------------------------------------------------------------------------------------------------ runner


class DigitsBenchmark:
    """One runner call: shared data and feature network, the merged results, the time budget."""

    def __init__(self, args: argparse.Namespace, argv: Sequence[str]) -> None:
        from datasets.digits import write_digits
        from evaluations.feature_extractors import get_feature_extractor

        self.args = args
        self.start = time.perf_counter()
        self.deadline = self.start + args.budget_s if args.budget_s else math.inf
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = torch.device(args.device)
        self.env = dict(os.environ)
        if self.device.type == "cpu":
            self.env["CUDA_VISIBLE_DEVICES"] = ""
        self.settings = {
            "steps": args.steps,
            "num_samples": args.num_samples,
            "seed": args.seed,
            "respacing": args.respacing,
            "ema_rate": args.ema_rate,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "eval_every": args.eval_every,
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "CPU",
        }
        self.results = self._load_previous()
        self.results["invocations"].append(display_command(["python", "benchmarks/digits_results.py", *argv]))
        self.data_paths = write_digits(Path(args.data_dir).resolve())
        with np.load(self.data_paths["ref"]) as ref, np.load(self.data_paths["train"]) as train:
            ref_images, self.train_images = ref["arr_0"], train["arr_0"]
        self.extractor = get_feature_extractor("digits", self.device)
        self.ref_feats = self.extractor.features(ref_images)["pool"]

    def _load_previous(self) -> dict[str, Any]:
        path = self.out / "results.json"
        if not path.is_file():
            return {"settings": self.settings, "invocations": [], "artifacts": {}, "rows": {}}
        try:
            previous = json.loads(path.read_text())
        except ValueError as exc:
            raise BenchError(f"{path}: unreadable results file ({exc})") from exc
        old = previous.get("settings", {})
        differ = self.differing_settings(old)
        if differ:
            pairs = ", ".join(f"{k} {old.get(k)!r} -> {self.settings[k]!r}" for k in differ)
            raise BenchError(f"{path} was made with other settings ({pairs}); use another --out")
        previous["settings"] = self.settings
        return previous

    def differing_settings(self, other: Mapping[str, Any]) -> list[str]:
        """The SHARED_SETTINGS in which `other` (another call's settings) differs from this call's."""
        return [k for k in SHARED_SETTINGS if other.get(k) != self.settings[k]]

    def merge(self, dirs: Sequence[str]) -> None:
        """Take the rows, invocations and grids of other runners' output dirs made with the same settings
        (runners run side by side on one GPU each write their own dir)."""
        for folder in map(Path, dirs):
            path = folder / "results.json"
            try:
                other = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise BenchError(f"{path}: cannot merge ({exc})") from exc
            differ = self.differing_settings(other.get("settings", {}))
            if differ:
                raise BenchError(f"{path} was made with other settings ({', '.join(differ)}); not merging it")
            for name, row in other.get("rows", {}).items():
                if row.get("grid") and (folder / row["grid"]).is_file():
                    (self.out / "grids").mkdir(exist_ok=True)
                    shutil.copyfile(folder / row["grid"], self.out / row["grid"])
                self.results["rows"][name] = row
            self.results["invocations"] += other.get("invocations", [])

    # ---- bookkeeping

    def time_left(self) -> float:
        """Seconds left of --budget_s (inf without a budget)."""
        return self.deadline - time.perf_counter()

    def save(self) -> None:
        """Rewrite results.json, results.md and the FID-over-steps PNG atomically."""
        atomic_write_bytes(
            json.dumps(json_ready(self.results), indent=2).encode(), str(self.out / "results.json")
        )
        atomic_write_bytes(render_markdown(self.results).encode(), str(self.out / "results.md"))
        plot_fid_over_steps(self.results, self.out / "fid_over_steps.png")

    def put_row(self, row: dict[str, Any]) -> None:
        """Record a finished (or failed) row and write every output at once."""
        self.results["rows"][row["name"]] = json_ready(row)
        self.save()
        print(
            f"[digits results] {row['name']}: {row['status']} fid={_fmt(row.get('fid'), '.2f')}", flush=True
        )

    def score_row(self, row: dict[str, Any], images: np.ndarray) -> dict[str, Any]:
        """Add digits-FID / precision / recall of `images` to `row` and save its grid."""
        row.update(metrics.fid_precision_recall(self.ref_feats, self.extractor.features(images)["pool"]))
        row["grid"] = str(Path("grids") / f"{row['name']}.png")
        save_grid(images, str(self.out / row["grid"]))
        return row

    def run_command(self, argv: list[str], log_name: str, timeout: float) -> tuple[int, float, bool]:
        """Run a script (cwd: the repo) logging to logs/<log_name>.log; (exit code, wall s, timed out)."""
        log_path = self.out / "logs" / f"{log_name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        print(f"[digits results] $ {display_command(argv)}", flush=True)
        begin = time.perf_counter()
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                argv,
                cwd=REPO_ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                rc = proc.wait(timeout=max(timeout, 1.0) if math.isfinite(timeout) else None)
                timed_out = False
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                rc, timed_out = -1, True
        return rc, time.perf_counter() - begin, timed_out

    def log_tail(self, log_name: str, lines: int = 3) -> str:
        """The last lines of a command's log, joined on one line (for the row's error)."""
        text = (self.out / "logs" / f"{log_name}.log").read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:])

    def sample(self, model: torch.nn.Module, diffusion: Any, use_ddim: bool) -> np.ndarray:
        """M images from `model` with the run's seed (fp32)."""
        return sample_images(
            model,
            diffusion,
            num_samples=self.args.num_samples,
            batch_size=min(self.args.num_samples, self.args.sample_batch_size),
            image_size=16,
            use_ddim=use_ddim,
            clip_denoised=True,
            seed=self.args.seed,
            progress=False,
        )

    def build(self, config: str | Path, respacing: str) -> tuple[torch.nn.Module, Any]:
        """Model and diffusion of a config's primary section, resampled on `respacing`, in eval mode."""
        section = primary_section(load_config(REPO_ROOT / config))
        section.timestep_respacing = respacing
        model, diffusion = build_model_and_diffusion(section, self.device)
        return model.eval(), diffusion

    # ---- reference rows

    def run_reference(self) -> None:
        """Floors and ceilings: real train vs ref, uniform noise, an untrained teacher-arch model."""
        m, rng = self.args.num_samples, np.random.default_rng(self.args.seed)
        begin = time.perf_counter()
        pick = rng.choice(len(self.train_images), size=min(m, len(self.train_images)), replace=False)
        row = {
            "name": "real_train",
            "label": "real digits, train split (floor)",
            "table": "reference",
            "sampler": "data",
            "status": "done",
        }
        self.score_row(row, self.train_images[np.sort(pick)])
        self.put_row({**row, "total_wall_s": time.perf_counter() - begin})
        begin = time.perf_counter()
        row = {
            "name": "noise",
            "label": "uniform noise images",
            "table": "reference",
            "sampler": "noise",
            "status": "done",
        }
        self.score_row(row, rng.integers(0, 256, size=(m, 16, 16, 3), dtype=np.uint8))
        self.put_row({**row, "total_wall_s": time.perf_counter() - begin})
        begin = time.perf_counter()
        torch.manual_seed(self.args.seed)
        model, diffusion = self.build(TEACHER_YAML, self.args.respacing)
        row = {
            "name": "untrained",
            "label": "untrained teacher arch (random init)",
            "table": "reference",
            "sampler": f"{self.args.respacing} steps",
            "status": "done",
            "params": sum(p.numel() for p in model.parameters()),
        }
        self.score_row(row, self.sample(model, diffusion, use_ddim=False))
        self.put_row({**row, "total_wall_s": time.perf_counter() - begin})

    def run_teacher(self) -> None:
        """The shipped teacher on the benchmark's grid and on the 8-, 4- and 2-step DDIM grids (the step
        distillation stages' teacher and what their students are compared with at equal steps)."""
        for name, respacing in (("teacher", self.args.respacing), *TEACHER_DDIM_ROWS.items()):
            self.score_teacher(name, "shipped teacher", TEACHER_YAML, respacing)

    def run_dit_teacher(self) -> None:
        """The DiT teacher (its config's model_path) on the benchmark's grid: the architecture table's
        reference for the rows it teaches."""
        self.score_teacher("dit_teacher", "DiT teacher", DIT_TEACHER_YAML, self.args.respacing)

    def score_teacher(self, name: str, label: str, config: str, respacing: str) -> None:
        """Sample the checkpoint `config` names on `respacing` and score it as a reference row."""
        begin = time.perf_counter()
        checkpoint = str(REPO_ROOT / primary_section(load_config(REPO_ROOT / config)).model_path)
        if not Path(checkpoint).is_file():
            self.put_row({"name": name, "label": label, "table": "reference", "status": "unavailable",
                          "error": f"no checkpoint at {checkpoint}", "curve": []})
            return
        model, diffusion = self.build(config, respacing)
        load_model_weights(model, checkpoint)
        use_ddim = respacing.startswith(DDIM_GRIDS)
        row = {
            "name": name,
            "label": f"{label} ({respacing}{'' if use_ddim else ' steps'})",
            "table": "reference",
            "sampler": respacing if use_ddim else f"{respacing} steps",
            "status": "done",
            "params": sum(p.numel() for p in model.parameters()),
        }
        self.score_row(row, self.sample(model, diffusion, use_ddim))
        self.put_row({**row, "total_wall_s": time.perf_counter() - begin})

    # ---- trained methods

    def teacher_samples(self, row: dict[str, Any]) -> str:
        """The baseline's synthetic set (teacher samples via image_sample.py), made once per DIR."""
        known = self.results["artifacts"].get("teacher_samples")
        if known and Path(known["path"]).is_file():
            row["commands"].append(known["command"])
            row["data_wall_s"] = known["wall_s"]
            return known["path"]
        count = self.args.baseline_samples or len(self.train_images)
        out_dir = self.out / "teacher_samples"
        shutil.rmtree(out_dir, ignore_errors=True)
        argv = [
            sys.executable,
            str(REPO_ROOT / "scripts" / "image_sample.py"),
            "--config",
            TEACHER_YAML,
            "--model_path",
            TEACHER_CKPT,
            "--num_samples",
            str(count),
            "--batch_size",
            str(min(count, self.args.sample_batch_size)),
            "--timestep_respacing",
            self.args.respacing,
            "--use_ddim",
            "False",
            "--seed",
            str(self.args.seed),
            "--output_dir",
            str(out_dir),
        ]
        rc, wall, timed_out = self.run_command(argv, "teacher_samples", self.time_left())
        found = sorted(glob.glob(str(out_dir / "samples_*.npz")))
        if rc != 0 or not found:
            raise RuntimeError(
                f"teacher sampling {'timed out' if timed_out else 'failed'}: "
                f"{self.log_tail('teacher_samples')}"
            )
        self.results["artifacts"]["teacher_samples"] = {
            "path": found[0],
            "count": count,
            "wall_s": wall,
            "command": display_command(argv),
        }
        row["commands"].append(display_command(argv))
        row["data_wall_s"] = wall
        return found[0]

    def method_config(self, spec: TrainedMethod) -> Path:
        """The method's source YAML (pd/rdd: --pd_config / --rdd_config or found in RDD_CONFIG_DIR)."""
        given = getattr(self.args, f"{spec.stage_of or spec.name}_config", None)
        if given:
            path = Path(given)
        elif spec.config:
            path = REPO_ROOT / spec.config
        else:
            path = find_rdd_config(spec.stage_of or spec.name)
        path = path if path.is_absolute() else (REPO_ROOT / path)
        if not path.is_file():
            raise FileNotFoundError(f"{spec.name} config not found: {path}")
        return path

    def config_edits(self, spec: TrainedMethod, src: Path, data_path: str | None) -> dict[str, Any]:
        """What the derived YAML changes: EMA (all), grid and pool path (DKDM/TCCD), x_0 data (PD/RDD)."""
        raw = OmegaConf.to_container(OmegaConf.load(src), resolve=False)
        kd = isinstance(raw, dict) and "student" in raw
        edits: dict[str, Any] = {("student.ema_rate" if kd else "ema_rate"): self.args.ema_rate}
        if spec.needs_pool:
            edits["teacher.tempfile"] = str(self.out / "pools" / f"{self.row_name(spec.name)}.cache")
            edits["teacher.timestep_respacing"] = self.args.respacing
            edits["student.timestep_respacing"] = self.args.respacing
        if spec.own_grid and data_path:
            edits["student.data_dir"] = data_path
            if isinstance(raw.get("step_distill"), dict) and "data_dir" in raw["step_distill"]:
                edits["step_distill.data_dir"] = data_path
        if spec.stage_of:
            edits.update(self.next_stage_edits(raw, spec.stage_of))
        edits.update(self.args.set)
        return edits

    def next_stage_edits(self, raw: Mapping[str, Any], previous: str) -> dict[str, Any]:
        """Point a stage config at the row `previous`'s final EMA student, on grids half its own."""
        prev = self.results["rows"].get(self.row_name(previous), {})
        found = checkpoint_steps(self.out / "runs" / self.row_name(previous))
        if prev.get("status") != "done" or not found:
            raise RuntimeError(f"the next stage needs a finished {self.row_name(previous)} row first")
        steps = {}
        for section in ("teacher", "student"):
            grid = str(raw[section]["timestep_respacing"])
            if not grid.startswith("trailing"):
                raise RuntimeError(f"stage {previous}: {section}.timestep_respacing {grid} is not trailingN")
            steps[section] = int(grid[len("trailing"):]) // 2
        return {
            "teacher.model_path": str(found[max(found)]),
            "teacher.timestep_respacing": f"trailing{steps['teacher']}",
            "student.timestep_respacing": f"trailing{steps['student']}",
        }

    def row_name(self, method: str) -> str:
        """A trained method's row name: the method, tagged with --tag when given."""
        return f"{method}@{self.args.tag}" if self.args.tag else method

    def run_trained(self, spec: TrainedMethod) -> None:
        """Prepare (pool or data), train through the real script, then evaluate its EMA checkpoints."""
        begin = time.perf_counter()
        row: dict[str, Any] = {
            "name": self.row_name(spec.name),
            "label": f"{spec.label} [{self.args.tag}]" if self.args.tag else spec.label,
            "table": spec.table,
            "commands": [],
            "status": "running",
            "curve": [],
        }
        try:
            src = self.method_config(spec)
        except FileNotFoundError as exc:
            self.put_row({**row, "status": "unavailable", "error": str(exc), "curve": []})
            return
        try:
            self._train_and_evaluate(spec, src, row)
        except (RuntimeError, ConfigError, OSError, ValueError) as exc:
            row.update(status="failed", error=str(exc).splitlines()[0])
        row["total_wall_s"] = time.perf_counter() - begin
        self.put_row(row)

    def _train_and_evaluate(self, spec: TrainedMethod, src: Path, row: dict[str, Any]) -> None:
        args = self.args
        name = row["name"]
        data_path = None
        if spec.data == "teacher_samples":
            data_path = self.teacher_samples(row)
        elif spec.data == "real":
            data_path = self.data_paths["train"]
        cfg_path = self.out / "configs" / f"{name}.yaml"
        edits = derive_config(src, cfg_path, self.config_edits(spec, src, data_path),
                              "derived by benchmarks/digits_results.py")
        row.update(
            config=display_command([str(cfg_path)]),
            source_config=display_command([str(src)]),
            config_edits=edits,
        )
        common = ["--config", str(cfg_path), "--seed", str(args.seed)]
        if args.batch_size:
            common += ["--batch_size", str(args.batch_size)]
        if spec.needs_pool:
            Path(edits["teacher.tempfile"]).unlink(missing_ok=True)
            argv = [
                sys.executable,
                str(REPO_ROOT / "scripts" / "dynamic_prepare.py"),
                *common,
                "--exp_dir",
                str(self.out / "runs" / f"{name}_prepare"),
            ]
            rc, row["prepare_wall_s"], timed_out = self.run_command(
                argv, f"{name}_prepare", self.time_left()
            )
            row["commands"].append(display_command(argv))
            if rc != 0:
                raise RuntimeError(
                    f"pool preparation {'timed out' if timed_out else 'failed'}: "
                    f"{self.log_tail(name + '_prepare')}"
                )
        run_dir = self.out / "runs" / name
        shutil.rmtree(run_dir, ignore_errors=True)
        argv = [
            sys.executable,
            str(REPO_ROOT / spec.script),
            *common,
            "--exp_dir",
            str(run_dir),
            "--max_steps",
            str(args.steps),
            "--save_interval",
            str(args.eval_every or args.steps),
            "--log_interval",
            str(max(1, min(100, args.steps // 20))),
            *(["--lr", str(args.lr)] if args.lr else []),
        ]
        if spec.data and not spec.own_grid:
            argv += ["--data_dir", data_path]
        rc, row["train_wall_s"], timed_out = self.run_command(
            argv, name, self.time_left() - args.eval_reserve_s
        )
        row["commands"].append(display_command(argv))
        row["run_dir"] = display_command([str(run_dir)])
        if rc != 0 and not timed_out:
            raise RuntimeError(f"training failed (exit {rc}): {self.log_tail(name)}")
        self._evaluate_run(spec, cfg_path, run_dir, row)
        row["status"] = "partial (time limit)" if timed_out else "done"
        if timed_out:
            row["error"] = f"training stopped by the time budget at step {row.get('steps')}"

    def _evaluate_run(self, spec: TrainedMethod, cfg_path: Path, run_dir: Path, row: dict[str, Any]) -> None:
        found = checkpoint_steps(run_dir)
        if not found:
            raise RuntimeError(f"no EMA checkpoint in {run_dir}")
        own = primary_section(load_config(cfg_path)).timestep_respacing
        respacing = own if spec.own_grid else self.args.respacing
        model, diffusion = self.build(cfg_path, respacing)
        use_ddim = respacing.startswith(DDIM_GRIDS)
        row.update(
            sampler=respacing if use_ddim else f"{respacing} steps",
            params=sum(p.numel() for p in model.parameters()),
        )
        last_eval = 0.0
        for i, step in enumerate(eval_order(list(found), self.args.eval_every)):
            if i > 0 and self.time_left() < last_eval:
                row["curve_note"] = f"curve cut at step {step} by the time budget"
                break
            begin = time.perf_counter()
            load_model_weights(model, str(found[step]))
            images = self.sample(model, diffusion, use_ddim)
            point = metrics.fid_precision_recall(self.ref_feats, self.extractor.features(images)["pool"])
            row["curve"].append({"step": step, **point})
            if i == 0:
                row.update(steps=step, **point)
                row["grid"] = str(Path("grids") / f"{row['name']}.png")
                save_grid(images, str(self.out / row["grid"]))
            last_eval = time.perf_counter() - begin
            row["eval_wall_s"] = row.get("eval_wall_s", 0.0) + last_eval
        row["curve"].sort(key=lambda p: p["step"])

    def run(self, methods: Sequence[str]) -> dict[str, Any]:
        """Run `methods` in order, skipping the rest once the budget is spent; returns the merged results."""
        for name in methods:
            if self.time_left() <= self.args.eval_reserve_s and name in TRAINED:
                self.put_row(
                    {
                        "name": self.row_name(name),
                        "label": TRAINED[name].label,
                        "table": TRAINED[name].table,
                        "status": "skipped",
                        "error": "no time left in --budget_s",
                        "curve": [],
                    }
                )
                continue
            if name == "reference":
                self.run_reference()
            elif name == "teacher":
                self.run_teacher()
            elif name == "dit_teacher":
                self.run_dit_teacher()
            else:
                self.run_trained(TRAINED[name])
        self.save()
        return self.results


# ------------------------------------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
    """The runner's flags."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output dir (results.json is merged across calls)")
    p.add_argument("--steps", type=int, required=True, help="training steps of every trained method")
    p.add_argument(
        "--methods", default=",".join(ALL_METHODS), help="comma-separated subset of " + ",".join(ALL_METHODS)
    )
    p.add_argument(
        "--eval_every", type=int, default=0, help="checkpoint and evaluate every K steps (0: end only)"
    )
    p.add_argument("--num_samples", type=int, default=1000, help="images sampled per evaluation")
    p.add_argument("--sample_batch_size", type=int, default=500)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--respacing", default="50", help="DKDM/TCCD steps and sampling grid of every 50-step row")
    p.add_argument(
        "--ema_rate", default=None, help="EMA of every student (default: from --steps, see auto_ema_rate)"
    )
    p.add_argument(
        "--batch_size", type=int, default=None, help="student batch of every method (default: YAML's)"
    )
    p.add_argument("--lr", type=float, default=None, help="learning rate of every method (default: YAML's)")
    p.add_argument(
        "--baseline_samples",
        type=int,
        default=None,
        help="teacher samples for the baseline (default: the real train split's size)",
    )
    p.add_argument("--data_dir", default="experiments/data/digits", help="where the digits npz files go")
    p.add_argument("--pd_config", default=None, help=f"PD YAML (default: found in {RDD_CONFIG_DIR})")
    p.add_argument("--rdd_config", default=None, help=f"RDD YAML (default: found in {RDD_CONFIG_DIR})")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="dotted-key YAML edit of every trained method's config (repeatable), e.g. "
        "step_distill.student_prediction=x0: an ablation's variant",
    )
    p.add_argument(
        "--tag", default="", help="suffix of this call's trained row names (name@TAG), so variants run with "
        "--set side by side merge into one table",
    )
    p.add_argument("--budget_s", type=float, default=0.0, help="wall-time budget of this call (0: none)")
    p.add_argument(
        "--merge", default="", help="comma-separated output dirs of runners run beside this one (same "
        "settings) whose rows and grids join this one's tables; --methods may then be empty"
    )
    p.add_argument(
        "--eval_reserve_s",
        type=float,
        default=60.0,
        help="seconds of the budget kept for evaluation after a training run",
    )
    return p


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse and check the flags; BenchError names the bad value."""
    args = build_parser().parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown or not (methods or args.merge):
        raise BenchError(f"unknown method(s) {unknown} in --methods; choose from {','.join(ALL_METHODS)}")
    for flag in ("steps", "num_samples", "sample_batch_size"):
        if getattr(args, flag) < 1:
            raise BenchError(f"--{flag} must be positive, got {getattr(args, flag)}")
    if args.eval_every < 0 or args.num_samples < 2:
        raise BenchError(
            f"--eval_every must be >= 0 and --num_samples >= 2, got {args.eval_every}, {args.num_samples}"
        )
    args.methods = methods
    args.set = parse_edits(args.set)
    if args.tag and not args.tag.replace("_", "").replace("-", "").isalnum():
        raise BenchError(f"--tag must be letters, digits, '-' or '_', got {args.tag!r}")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device.split(":")[0] not in ("cuda", "cpu"):
        raise BenchError(f"--device must be cuda or cpu, got {args.device!r}")
    args.ema_rate = args.ema_rate or auto_ema_rate(args.steps)
    args.respacing = str(args.respacing)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: exit 2 with a one-line message on bad arguments or a mismatching output dir."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
        bench = DigitsBenchmark(args, argv)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        bench.merge([d for d in args.merge.split(",") if d.strip()])
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    bench.run(args.methods)
    print(f"[digits results] wrote {bench.out / 'results.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
