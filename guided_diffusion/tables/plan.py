"""A table's runs as stages: the seed READMEs' commands for every row, shared stages planned once.

Full scale, a DKDM/TCCD row is `dynamic_prepare` (once per pool cache; skipped when the cache is there, e.g.
the authors' download), `image_kd`, `image_sample` of the table's sample count and `evaluations/evaluator.py`;
a baseline row samples the teacher's synthetic set (once per table), mixes real images in when the row has
a `mix_ratio` (`datasets/mix.py`), then `image_train`; RCFD rows (configs under `yaml/*/rcfd/`) train with
`scripts/rcfd_train.py` and sample with `scripts/rcfd_eval.py`. With `digits` the same rows run on the shipped
digits teacher (`digits_row_edits` says how each row is mapped), `smoke` shrinks that to seconds on a CPU.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guided_diffusion.tables.spec import REPO_ROOT, Row, Table, TableError, read_yaml

MODES = ("full", "digits", "smoke")
SAMPLES_GLOB = "samples_*.npz"  # what image_sample / rcfd_eval write into --output_dir, found at run time
DIGITS_TEACHER_CONFIG = "yaml/digits_16/teacher.yaml"
DIGITS_TEACHER_MODEL = "model/digits16_teacher.pt"
DIGITS_CONFIGS = {
    "dkdm": "yaml/digits_16/exp/Digits-DKDM.yaml",
    "tccd": "yaml/digits_16/exp/Digits-TCCD.yaml",
    "baseline": "yaml/digits_16/exp/Digits-Baseline.yaml",
    "pd": "yaml/digits_16/exp/rdd/Digits-PD-8to4.yaml",
    "rdd": "yaml/digits_16/exp/rdd/Digits-RDD-8to4.yaml",
}
DIGITS_STUDENT_ARCH = "yaml/digits_16/arch/student.yaml"
# The paper's 57M student (128 channels, 3 res blocks) maps to the digits student's width with 2 res blocks;
# the other sizes scale that width as the paper does (96/128, 64/128) and drop a block where it does (3 -> 2).
FULL_WIDTH, FULL_BLOCKS = 128, 3
# Digits and smoke scales: steps, samples, grids. The pool schedule is the paper's 1000 steps in digits (so
# round(rho x 1000) x B items, as the paper's), 100 in smoke (still one distinct pool per rho >= 0.01). The
# digits batch is half the paper's 128: the rho 0.4 pool is then 25,600 states, ~12.8M teacher calls of
# one image to prepare, so that a whole digits table fits a 10-minute GPU call.
SCALES: dict[str, dict[str, Any]] = {
    "digits": {"steps": 4000, "num_samples": 1000, "sample_batch_size": 500, "respacing": "50",
               "schedule": "1000", "synthetic_samples": 1437, "batch_size": 64, "save_interval": 0,
               "prepare_batch_size": 4096},
    "smoke": {"steps": 2, "num_samples": 8, "sample_batch_size": 8, "respacing": "5", "schedule": "100",
              "synthetic_samples": 8, "batch_size": 1, "save_interval": 1, "prepare_batch_size": 256},
}


@dataclass
class Stage:
    """One command of a table run: a script with its arguments, the ranks it launches on, what it writes."""

    key: str  # unique in the table; shared stages are keyed by what they make (the pool cache, the set)
    kind: str  # data | prepare | synthetic | mix | train | sample | evaluate
    script: str  # repo-relative
    args: list[str]
    ranks: int  # 0: plain `python`, else the table's launcher with this many processes
    row: str = ""  # the (seeded) row it belongs to; "" for shared stages
    run_dir: str = ""  # train: the dir it resumes from after an interruption
    resume: list[str] = field(default_factory=list)  # flags added when resuming
    exists: str = ""  # a file whose presence means the stage's product is there already
    metrics: str = ""  # evaluate: the metrics JSON it writes
    after: list[str] = field(default_factory=list)  # keys of the stages it needs


@dataclass
class Plan:
    """Every stage of a table run in dependency order, and the settings a resumed run must share."""

    table: Table
    mode: str
    out: Path
    seeds: tuple[int, ...]
    ranks: int
    stages: list[Stage]
    settings: dict[str, Any]
    rows: dict[str, dict[str, Any]]  # seeded row name -> {row, seed, config, params_from}


def seeded(name: str, seed: int, seeds: Sequence[int]) -> str:
    """A row's name in a run of several seeds (`rho-0.4@s1`); the bare name with one seed."""
    return name if len(seeds) == 1 else f"{name}@s{seed}"


def _rel(path: Path | str) -> str:
    """`path` relative to the repo when inside it (commands read as the README's)."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def is_rcfd_config(config: str) -> bool:
    """RCFD's own path (their UNet, schedule and flag names): configs under a `rcfd/` folder."""
    return "rcfd" in Path(config).parts


def _student_arch(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A KD config's student arch (its `model:` file merged under its own keys) or a flat config's."""
    section = raw.get("student", raw)
    arch: dict[str, Any] = {}
    if isinstance(section.get("model"), str) and (REPO_ROOT / section["model"]).is_file():
        arch.update(read_yaml(REPO_ROOT / section["model"]))
    arch.update({k: v for k, v in section.items() if k in ("num_channels", "num_res_blocks")})
    return arch


def digits_student_size(full_config: str) -> dict[str, int]:
    """The digits student's width and depth for a full-scale student: the digits student's width x (C / 128),
    in whole norm groups, and one res block fewer than the paper's (3 -> 2, 2 -> 1)."""
    base = read_yaml(REPO_ROOT / DIGITS_STUDENT_ARCH)
    arch = _student_arch(read_yaml(REPO_ROOT / full_config))
    width = int(arch.get("num_channels", FULL_WIDTH))
    blocks = int(arch.get("num_res_blocks", FULL_BLOCKS))
    groups = int(base.get("norm_groups", 8))
    channels = max(groups, round(base["num_channels"] * width / FULL_WIDTH / groups) * groups)
    heads = math.gcd(channels, int(base.get("num_head_channels", 32)))  # attention needs C % head width == 0
    return {"num_channels": channels, "num_res_blocks": max(1, blocks - 1), "num_head_channels": heads}


def digits_row_edits(row: Row, scale: Mapping[str, Any], pool_file: str, seed: int) -> dict[str, Any]:
    """Dotted-key edits of the row's digits config: the full config's rho and iteration mode, the pool on the
    scale's schedule, the student sized as the paper's, the seed; PD/RDD keep their digits stage as it is."""
    edits: dict[str, Any] = {}
    full = read_yaml(REPO_ROOT / row.config)
    if row.method in ("dkdm", "tccd"):
        teacher = full.get("teacher", {})
        for key in ("BATCH", "iter_choice"):
            if key in teacher:
                edits[f"teacher.{key}"] = teacher[key]
        edits["teacher.tempfile"] = pool_file
        edits["teacher.timestep_respacing"] = scale["schedule"]
        edits["student.timestep_respacing"] = scale["schedule"]
        edits.update({f"student.{k}": v for k, v in digits_student_size(row.config).items()})
        edits["student.seed"] = seed
    elif row.method == "baseline":
        edits.update(digits_student_size(row.config))
        edits["seed"] = seed
    else:
        edits["student.seed"] = seed
    return edits


def derive_config(src: Path, dst: Path, edits: Mapping[str, Any], header: str) -> dict[str, Any]:
    """Write `src` to `dst` with dotted-key `edits` applied (a missing section is a TableError)."""
    from omegaconf import OmegaConf

    from guided_diffusion.infra.atomic_io import atomic_write_text

    raw = read_yaml(src)
    for dotted, value in edits.items():
        node = raw
        *parents, key = dotted.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise TableError(f"{src}: no '{part}:' section for {dotted}")
            node = node[part]
        node[key] = value
    dst.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(dst, f"# {header} from {_rel(src)}\n" + OmegaConf.to_yaml(OmegaConf.create(raw)))
    return dict(edits)


EMA_CHOICES = (0.9999, 0.999, 0.995, 0.99, 0.9)


def auto_ema_rate(steps: int) -> str:
    """The slowest EMA in EMA_CHOICES whose weight on the initialization after `steps` is below e^-5 (a
    short digits run would otherwise be scored on a near-initial EMA)."""
    for rate in EMA_CHOICES:
        if steps * -math.log(rate) >= 5.0:
            return str(rate)
    return str(EMA_CHOICES[-1])


def pool_items(config: Path, ranks: int) -> int:
    """States in a DKDM config's pool over all ranks: round(rho x T) x B for the dynamic mode (T the student's
    schedule), B for the iterative and shuffled ones."""
    import guided_diffusion.distill  # noqa: F401 (the teacher: section's schema)
    from guided_diffusion.config import load_config
    from guided_diffusion.distill.dkdm.pool import pool_size
    from guided_diffusion.distill.dkdm.setup import student_diffusion_of

    cfg = load_config(config)
    timesteps = student_diffusion_of(cfg.student).num_timesteps
    batch = cfg.student.batch_size // ranks
    return ranks * pool_size(cfg.teacher.iter_choice, cfg.teacher.BATCH, timesteps, batch)


class Planner:
    """Builds a `Plan`: the table's rows at one scale, for each seed, with shared stages once."""

    def __init__(self, table: Table, mode: str, out: Path, seeds: Sequence[int], ranks: int,
                 rows: Sequence[str] = (), steps: int = 0, seed_rows: Sequence[str] = ()) -> None:
        if mode not in MODES:
            raise TableError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        if ranks < 1:
            raise TableError(f"--ranks must be at least 1, got {ranks}")
        self.table, self.mode, self.out, self.ranks = table, mode, out.resolve(), ranks
        self.seeds = tuple(seeds) or (0,)
        self.selected = [table.row(name) for name in rows] if rows else list(table.rows)
        self.seed_rows = {table.row(name).name for name in seed_rows}
        self.scale = {**SCALES.get(mode, {}), **(table.digits.get("scale", {}) if mode == "digits" else {})}
        if steps < 0:
            raise TableError(f"--steps must be positive, got {steps}")
        self.steps_override = steps
        self.stages: list[Stage] = []
        self.by_key: dict[str, Stage] = {}
        self.rows: dict[str, dict[str, Any]] = {}

    # ---- helpers

    def add(self, stage: Stage) -> Stage:
        """Plan `stage` once: a stage with a planned key is the planned one (shared stages)."""
        if stage.key not in self.by_key:
            self.by_key[stage.key] = stage
            self.stages.append(stage)
        return self.by_key[stage.key]

    @property
    def digits(self) -> bool:
        return self.mode != "full"

    def steps(self) -> int:
        """Training steps of every row: --steps, else the scale's (digits, smoke) or the table's."""
        if self.steps_override:
            return self.steps_override
        return int(self.scale["steps"]) if self.digits else self.table.steps

    def sample_settings(self) -> dict[str, Any]:
        """Sample count, batch and grid of every evaluated row at this scale."""
        if self.digits:
            return {"num_samples": self.scale["num_samples"], "batch_size": self.scale["sample_batch_size"],
                    "timestep_respacing": self.scale["respacing"]}
        return dict(self.table.sample)

    def data_stage(self) -> Stage | None:
        """Digits: the train/ref splits written once into the table dir."""
        if not self.digits:
            return None
        data = self.out / "data" / "digits"
        return self.add(Stage("data:digits", "data", "datasets/digits.py",
                              ["--image_size", "16", "--output_dir", _rel(data)], 0,
                              exists=str(data / "digits16_ref.npz")))

    def ref_batch(self, row: Row) -> str:
        """The evaluator's reference batch: the digits ref split, the row's own or the table's."""
        if self.digits:
            return _rel(self.out / "data" / "digits" / "digits16_ref.npz")
        return str(row.dataset.get("ref_batch", self.table.ref_batch))

    def real_batch(self, row: Row) -> str:
        """Real images mixed into data-limited sets (and RCFD's training data)."""
        if self.digits:
            return _rel(self.out / "data" / "digits" / "digits16_train.npz")
        return str(row.dataset.get("real_batch", self.table.real_batch))

    def teacher(self, row: Row) -> tuple[str, str]:
        """(config, checkpoint) of the row's teacher: the digits one, the row's own or the table's."""
        if self.digits:
            return DIGITS_TEACHER_CONFIG, DIGITS_TEACHER_MODEL
        own = row.dataset.get("teacher")
        if own:
            return own["config"], own["model_path"]
        return self.table.teacher_config, self.table.teacher_model

    def synthetic_stage(self, row: Row, seed: int) -> Stage:
        """The teacher's synthetic set for the data-free baseline and the PD/RDD data (once per teacher and
        seed)."""
        config, model = self.teacher(row)
        if self.digits:
            count = int(self.scale["synthetic_samples"])
            settings = {"num_samples": count, "batch_size": min(count, int(self.scale["sample_batch_size"])),
                        "timestep_respacing": self.scale["respacing"]}
        else:
            settings = dict(row.dataset.get("synthetic", self.table.synthetic))
        out = self.out / "synthetic" / f"{Path(model).stem}-s{seed}"
        name = f"samples_{settings['num_samples']}x{{}}.npz"
        stage = Stage(f"synthetic:{model}:s{seed}", "synthetic", "scripts/image_sample.py",
                      ["--config", config, "--model_path", model, "--batch_size", str(settings["batch_size"]),
                       "--num_samples", str(settings["num_samples"]), "--timestep_respacing",
                       str(settings["timestep_respacing"]), "--use_ddim", "False", "--seed", str(seed),
                       "--output_dir", _rel(out)], self.ranks, after=self._after(self.data_stage()))
        stage.exists = str(out / name)
        return self.add(stage)

    @staticmethod
    def _after(*stages: Stage | None) -> list[str]:
        return [s.key for s in stages if s is not None]

    # ---- rows

    def plan(self) -> Plan:
        for seed in self.seeds:
            for row in self.selected:
                if seed == self.seeds[0] or not self.seed_rows or row.name in self.seed_rows:
                    self.plan_row(row, seed)
        settings = {"table": self.table.name, "mode": self.mode, "steps": self.steps(),
                    "seeds": list(self.seeds), "ranks": self.ranks, "sample": self.sample_settings()}
        return Plan(self.table, self.mode, self.out, self.seeds, self.ranks, self.stages, settings, self.rows)

    def plan_row(self, row: Row, seed: int) -> None:
        name = seeded(row.name, seed, self.seeds)
        info: dict[str, Any] = {"row": row.name, "seed": seed, "label": row.label, "method": row.method,
                                "x": row.x}
        self.rows[name] = info
        data = self.data_stage()
        if row.method == "teacher":
            last = self.sample_teacher(row, name, seed, data)
        elif not self.digits and is_rcfd_config(row.config):
            last = self.rcfd_row(row, name, seed)
        else:
            last = self.train_row(row, name, seed, data, info)
        samples = Path(last.args[last.args.index("--output_dir") + 1])
        info["samples"] = str(samples)
        self.evaluate(row, name, samples, last)

    def sample_teacher(self, row: Row, name: str, seed: int, data: Stage | None) -> Stage:
        """The teacher row: its samples on the row's grid (digits: the table's `teacher_respacing`)."""
        if not self.digits and is_rcfd_config(row.config or ""):
            return self.rcfd_sample(row.config, name, seed, row.args)
        config, model = self.teacher(row)
        settings = self.sample_settings()
        own = self.table.digits.get("teacher_respacing", "") if self.digits else row.respacing
        grid = own or settings["timestep_respacing"]
        return self.add(Stage(
            f"sample:{name}", "sample", "scripts/image_sample.py",
            ["--config", config, "--model_path", model, "--batch_size", str(settings["batch_size"]),
             "--num_samples", str(settings["num_samples"]), "--timestep_respacing", str(grid), "--use_ddim",
             str(str(grid).startswith(("ddim", "trailing"))), "--seed", str(seed),
             "--output_dir", _rel(self.out / "samples" / name)],
            self.ranks, row=name, after=self._after(data)))

    def row_config(self, row: Row, name: str, seed: int) -> tuple[str, dict[str, Any]]:
        """The config the row's commands read: the full one as written, or its digits/smoke derivation."""
        if not self.digits:
            return row.config, {}
        full = read_yaml(REPO_ROOT / row.config)
        tempfile = str(full.get("teacher", {}).get("tempfile", "pool.cache"))
        pool = _rel(self.out / "pools" / f"{Path(tempfile).stem}-s{seed}.cache")
        edits = digits_row_edits(row, self.scale, pool, seed)
        base = read_yaml(REPO_ROOT / DIGITS_CONFIGS[row.method])
        kd = "student" in base
        edits["student.ema_rate" if kd else "ema_rate"] = auto_ema_rate(self.steps())
        if self.scale.get("batch_size"):
            edits["student.batch_size" if kd else "batch_size"] = int(self.scale["batch_size"])
        if row.method in ("dkdm", "tccd"):  # teacher states per call while the pool is prepared
            edits["teacher.batch_size"] = int(self.scale["prepare_batch_size"])
        dst = self.out / "configs" / f"{name}.yaml"
        derive_config(REPO_ROOT / DIGITS_CONFIGS[row.method], dst, edits, f"{self.mode} row {row.name}")
        return _rel(dst), edits

    def train_row(self, row: Row, name: str, seed: int, data: Stage | None, info: dict[str, Any]) -> Stage:
        config, edits = self.row_config(row, name, seed)
        info["config"], info["edits"] = config, edits
        raw = read_yaml(REPO_ROOT / config)
        run_dir = self.out / "runs" / name
        steps = self.steps()
        seed_args = ["--seed", str(seed)] if self.digits or len(self.seeds) > 1 else []
        common = ["--config", config, "--exp_dir", _rel(run_dir), "--max_steps", str(steps), *seed_args]
        if self.digits:
            common += ["--save_interval", str(self.scale.get("save_interval") or steps),
                       "--log_interval", str(max(1, min(100, steps // 20)))]
        needs: list[Stage | None] = [data]
        if row.method in ("dkdm", "tccd"):
            teacher = raw["teacher"]
            info["pool"] = pool_items(REPO_ROOT / config, self.ranks)
            if teacher.get("iter_choice", "dynamic_iterative_distillation") != "iterative_distillation":
                cache = str(teacher["tempfile"])
                needs.append(self.add(Stage(
                    f"prepare:{cache}", "prepare", "scripts/dynamic_prepare.py",
                    ["--config", config, *seed_args], self.ranks, after=self._after(data),
                    exists=str(REPO_ROOT / cache))))
            script = "scripts/image_kd.py"
        elif row.method == "baseline":
            source = self.synthetic_stage(row, seed)
            needs.append(source)
            data_path = self.synthetic_npz(source, row)
            if row.mix_ratio > 0:
                ratio = f"{row.mix_ratio:g}"
                mixed = self.out / "data" / f"mix-{ratio}-s{seed}"
                needs.append(self.add(Stage(
                    f"mix:{ratio}:s{seed}", "mix", "datasets/mix.py",
                    ["--dataset", self.real_batch(row), "--synthetic", data_path, "--ratio", ratio,
                     "--output_dir", _rel(mixed), "--format", "npz", "--seed", str(seed)], 0,
                    after=self._after(data, source), exists=str(mixed / "mixed.npz"))))
                data_path = _rel(mixed / "mixed.npz")
            common += ["--data_dir", data_path]
            script = "scripts/image_train.py"
        else:  # pd / rdd on an ADM teacher: data-free, on the teacher's synthetic set
            source = self.synthetic_stage(row, seed)
            needs.append(source)
            common += ["--data_dir", self.synthetic_npz(source, row)]
            script = "scripts/step_distill.py"
        extra = [] if self.digits else list(row.args)  # full-scale flags (RCFD checkpoints) stay there
        train = self.add(Stage(f"train:{name}", "train", script, [*common, *extra], self.ranks, row=name,
                               run_dir=str(run_dir), resume=["--resume_checkpoint", _rel(run_dir)],
                               after=self._after(*needs)))
        from guided_diffusion.config import TRAINING_DEFAULTS
        from guided_diffusion.train_util import parse_ema_rates

        section = raw.get("student", raw)
        rate = parse_ema_rates(section.get("ema_rate", TRAINING_DEFAULTS["ema_rate"]))[0]  # TrainLoop's name
        checkpoint = _rel(run_dir / f"ema_{rate}_{steps:06d}.pt")
        info["checkpoint"] = checkpoint
        grid = section.get("timestep_respacing") if row.method in ("pd", "rdd") else None
        grid = str(grid or row.respacing or self.sample_settings()["timestep_respacing"])
        settings = self.sample_settings()
        return self.add(Stage(
            f"sample:{name}", "sample", "scripts/image_sample.py",
            ["--config", config, "--model_path", checkpoint, "--batch_size", str(settings["batch_size"]),
             "--num_samples", str(settings["num_samples"]), "--timestep_respacing", grid, "--use_ddim",
             str(grid.startswith(("ddim", "trailing"))), "--seed", str(seed),
             "--output_dir", _rel(self.out / "samples" / name)],
            self.ranks, row=name, after=[train.key]))

    def synthetic_npz(self, stage: Stage, row: Row) -> str:
        """The synthetic set's npz path (image_sample names it by count and the teacher's image shape)."""
        if "{}" in stage.exists:
            config = read_yaml(REPO_ROOT / self.teacher(row)[0])
            arch = read_yaml(REPO_ROOT / config["model"]) if isinstance(config.get("model"), str) else config
            size = int(config.get("image_size", arch.get("image_size", 32)))
            stage.exists = stage.exists.format(f"{size}x{size}x3")
        return _rel(stage.exists)

    def rcfd_row(self, row: Row, name: str, seed: int) -> Stage:
        """RCFD's stage commands (`rcfd_train.py`, resumed with `--resume`), then its DDIM sampler."""
        run_dir = self.out / "runs" / name
        train = self.add(Stage(
            f"train:{name}", "train", "scripts/rcfd_train.py",
            ["--config", row.config, "--logdir", _rel(run_dir), "--data_dir", self.real_batch(row),
             *row.args], self.ranks, row=name, run_dir=str(run_dir), resume=["--resume"]))
        eval_config = Path(row.config).with_name(f"{Path(row.config).stem.split('_')[0]}_EVAL.yaml")
        return self.rcfd_sample(str(eval_config), name, seed, ["--logdir", _rel(run_dir)], after=[train.key])

    def rcfd_sample(self, eval_config: str, name: str, seed: int, logdir_args: Sequence[str],
                    after: Sequence[str] = ()) -> Stage:
        """RCFD's DDIM sampler (`rcfd_eval.py`, their ddim_eval.py) on a logdir's checkpoint."""
        return self.add(Stage(
            f"sample:{name}", "sample", "scripts/rcfd_eval.py",
            ["--config", eval_config, *logdir_args, "--seed", str(seed),
             "--output_dir", _rel(self.out / "samples" / name)], self.ranks, row=name, after=list(after)))

    def evaluate(self, row: Row, name: str, samples: Path, last: Stage) -> None:
        metrics = self.out / "metrics" / f"{name}.json"
        args = [self.ref_batch(row), _rel(samples / SAMPLES_GLOB), "--json", _rel(metrics)]
        if self.digits:
            args += ["--features", "digits", "--class_histogram"]
            if self.mode == "smoke":
                args += ["--device", "cpu"]
        self.add(Stage(f"evaluate:{name}", "evaluate", "evaluations/evaluator.py", args, 0, row=name,
                       metrics=str(metrics), after=[last.key]))


def build_plan(table: Table, mode: str, out: str | os.PathLike, seeds: Sequence[int] = (0,), ranks: int = 1,
               rows: Sequence[str] = (), steps: int = 0, seed_rows: Sequence[str] = ()) -> Plan:
    """Every stage of `table` at `mode` ("full", "digits" or "smoke") into the table dir `out`; `steps`
    (> 0) replaces every row's training steps; with `seed_rows`, only those rows run every seed (the
    spread) and the others the first seed alone."""
    return Planner(table, mode, Path(out), seeds, ranks, rows, steps, seed_rows).plan()
