"""Paper tables as data: `yaml/tables/<name>.yaml` read into a `Table` of `Row`s, checked before any work.

A table names its paper source, the launcher its README uses, the full-scale settings (training steps,
sample count, reference batch, teacher) and one row per configuration with the paper's numbers beside it.
`--digits` maps every row onto the shipped digits teacher (`digits_mapping`): the same method, rho,
iteration mode and relative student size, on a 16x16 scale.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[2]
TABLE_DIR = REPO_ROOT / "yaml" / "tables"
METHODS = ("teacher", "dkdm", "tccd", "baseline", "pd", "rdd")
LAUNCHERS = ("mpiexec", "torchrun")
METRICS = ("fid", "sfid", "inception_score", "precision", "recall")
TABLE_KEYS = {
    "name", "title", "source", "launcher", "steps", "ref_batch", "real_batch", "teacher", "sample",
    "synthetic", "rows", "plot", "claims", "digits", "note",
}
ROW_KEYS = {"name", "label", "method", "config", "x", "mix_ratio", "paper", "respacing", "args", "dataset"}
DATASET_KEYS = {"ref_batch", "real_batch", "teacher", "synthetic"}
SAMPLE_KEYS = {"num_samples", "batch_size", "timestep_respacing"}


class TableError(ValueError):
    """A table file or a row that cannot run; the message is one line naming the file and the key."""


@dataclass(frozen=True)
class Row:
    """One row of a paper table: a method on one config, and the paper's numbers for it."""

    name: str
    label: str
    method: str
    config: str  # repo-relative YAML of the full-scale run ("" for the teacher row)
    x: float | None = None  # the plotted value (rho, student size in M parameters)
    mix_ratio: float = 0.0  # baselines: fraction of real images mixed into the synthetic set
    paper: Mapping[str, float | None] = field(default_factory=dict)
    respacing: str = ""  # sampling grid of this row when it is not the table's (PD/RDD: their DDIM grid)
    args: tuple[str, ...] = ()  # extra flags of the row's training command (RCFD stages: --base_ckpt ...)
    dataset: Mapping[str, Any] = field(default_factory=dict)  # the row's own teacher / reference / sets


@dataclass(frozen=True)
class Claim:
    """An ordering the paper reports: `better` has a lower FID than `worse`."""

    better: str
    worse: str


@dataclass(frozen=True)
class Table:
    """A paper table: where its numbers come from, how its rows run at full scale and in digits."""

    name: str
    title: str
    source: str
    path: Path
    launcher: str
    steps: int
    ref_batch: str
    real_batch: str
    teacher_config: str
    teacher_model: str
    sample: Mapping[str, Any]
    synthetic: Mapping[str, Any]
    rows: tuple[Row, ...]
    plot: Mapping[str, Any]
    claims: tuple[Claim, ...]
    digits: Mapping[str, Any]
    note: str = ""

    def row(self, name: str) -> Row:
        """The row called `name` (TableError naming the table otherwise)."""
        for row in self.rows:
            if row.name == name:
                return row
        raise TableError(f"{self.path}: no row {name!r} (rows: {', '.join(r.name for r in self.rows)})")


def table_names() -> list[str]:
    """Names of the shipped tables (`yaml/tables/*.yaml`), sorted."""
    return sorted(p.stem for p in TABLE_DIR.glob("*.yaml"))


def _need(raw: Mapping[str, Any], key: str, where: str, kind: type | tuple[type, ...]) -> Any:
    if key not in raw:
        raise TableError(f"{where}: missing key {key!r}")
    value = raw[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise TableError(f"{where}: {key} must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _unknown(raw: Mapping[str, Any], allowed: set[str], where: str) -> None:
    extra = sorted(set(raw) - allowed)
    if extra:
        allowed_keys = ", ".join(sorted(allowed))
        raise TableError(f"{where}: unknown key(s) {', '.join(extra)} (allowed: {allowed_keys})")


def _sample_settings(raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise TableError(f"{where}: must be a mapping of {', '.join(sorted(SAMPLE_KEYS))}")
    _unknown(raw, SAMPLE_KEYS, where)
    out = {"num_samples": _need(raw, "num_samples", where, int),
           "batch_size": _need(raw, "batch_size", where, int),
           "timestep_respacing": str(_need(raw, "timestep_respacing", where, (str, int)))}
    if out["num_samples"] < 1 or out["batch_size"] < 1:
        raise TableError(f"{where}: num_samples and batch_size must be positive")
    return out


def _row(raw: Any, where: str) -> Row:
    if not isinstance(raw, dict):
        raise TableError(f"{where}: a row must be a mapping")
    _unknown(raw, ROW_KEYS, where)
    name = _need(raw, "name", where, str)
    where = f"{where} ({name})"
    method = _need(raw, "method", where, str)
    if method not in METHODS:
        raise TableError(f"{where}: method {method!r} is not one of {', '.join(METHODS)}")
    config = str(raw.get("config", ""))
    if method != "teacher":
        if not config:
            raise TableError(f"{where}: missing key 'config'")
        if not (REPO_ROOT / config).is_file():
            raise TableError(f"{where}: config {config} does not exist")
    paper = raw.get("paper") or {}
    if not isinstance(paper, dict) or any(k not in METRICS for k in paper):
        raise TableError(f"{where}: paper must map metric names ({', '.join(METRICS)}) to numbers")
    mix = float(raw.get("mix_ratio", 0.0))
    if not 0.0 <= mix <= 1.0:
        raise TableError(f"{where}: mix_ratio {mix} must lie in [0, 1]")
    args = raw.get("args") or []
    if not isinstance(args, list):
        raise TableError(f"{where}: args must be a list of command-line words")
    dataset = raw.get("dataset") or {}
    if not isinstance(dataset, dict):
        raise TableError(f"{where}: dataset must be a mapping")
    _unknown(dataset, DATASET_KEYS, f"{where}: dataset")
    if "teacher" in dataset:
        teacher = _need(dataset, "teacher", f"{where}: dataset", dict)
        dataset["teacher"] = {"config": _need(teacher, "config", f"{where}: dataset.teacher", str),
                              "model_path": _need(teacher, "model_path", f"{where}: dataset.teacher", str)}
    if "synthetic" in dataset:
        dataset["synthetic"] = _sample_settings(dataset["synthetic"], f"{where}: dataset.synthetic")
    x = raw.get("x")
    return Row(name=name, label=str(raw.get("label", name)), method=method, config=config,
               x=None if x is None else float(x), mix_ratio=mix, paper=dict(paper),
               respacing=str(raw.get("respacing", "")), args=tuple(str(a) for a in args), dataset=dataset)


def load_table(name_or_path: str) -> Table:
    """Read and check a table: a shipped name (`dkdm-rho`) or a YAML path. Raises TableError (one line)."""
    path = Path(name_or_path)
    if not path.suffix:
        path = TABLE_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise TableError(f"no table {name_or_path!r}; tables: {', '.join(table_names())}")
    if not path.is_file():
        raise TableError(f"{path}: no such table file")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as exc:  # omegaconf/yaml parse errors have many types
        raise TableError(f"{path}: not readable YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise TableError(f"{path}: not a YAML mapping")
    where = str(path)
    _unknown(raw, TABLE_KEYS, where)
    launcher = raw.get("launcher", "mpiexec")
    if launcher not in LAUNCHERS:
        raise TableError(f"{where}: launcher {launcher!r} is not one of {', '.join(LAUNCHERS)}")
    teacher = _need(raw, "teacher", where, dict)
    rows_raw = _need(raw, "rows", where, list)
    rows = tuple(_row(r, f"{where}: rows[{i}]") for i, r in enumerate(rows_raw))
    names = [r.name for r in rows]
    if len(set(names)) != len(names) or not rows:
        raise TableError(f"{where}: rows need unique names (got {names})")
    claims = []
    for i, claim in enumerate(raw.get("claims") or []):
        if not isinstance(claim, dict) or set(claim) != {"better", "worse"}:
            raise TableError(f"{where}: claims[{i}] must be {{better: ROW, worse: ROW}}")
        for key in ("better", "worse"):
            if claim[key] not in names:
                raise TableError(f"{where}: claims[{i}].{key} names no row ({claim[key]!r})")
        claims.append(Claim(claim["better"], claim["worse"]))
    digits = raw.get("digits") or {}
    if not isinstance(digits, dict):
        raise TableError(f"{where}: digits must be a mapping")
    return Table(
        name=_need(raw, "name", where, str), title=_need(raw, "title", where, str),
        source=_need(raw, "source", where, str), path=path, launcher=launcher,
        steps=_need(raw, "steps", where, int), ref_batch=_need(raw, "ref_batch", where, str),
        real_batch=str(raw.get("real_batch", "")),
        teacher_config=_need(teacher, "config", where + ": teacher", str),
        teacher_model=_need(teacher, "model_path", where + ": teacher", str),
        sample=_sample_settings(_need(raw, "sample", where, dict), where + ": sample"),
        synthetic=_sample_settings(raw.get("synthetic", raw["sample"]), where + ": synthetic"),
        rows=rows, plot=dict(raw.get("plot") or {}), claims=tuple(claims), digits=dict(digits),
        note=str(raw.get("note", "")),
    )


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A config file as plain containers, unresolved (what the table reads off a row's config)."""
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    if not isinstance(raw, dict):
        raise TableError(f"{path}: not a YAML mapping")
    return raw
