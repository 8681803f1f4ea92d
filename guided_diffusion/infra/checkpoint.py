"""Checkpoint I/O: atomic writes, safe loads, strict state-dict loading with a readable mismatch report,
and discovery of the newest complete checkpoint set for resuming a run."""

from __future__ import annotations

import functools
import json
import os
import re
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import logger
from .atomic_io import FAULT_SLEEP_ENV as FAULT_SLEEP_ENV  # re-exported for fault tests
from .atomic_io import atomic_write

PathLike = str | os.PathLike

ARCH_DIR = Path(__file__).resolve().parents[2] / "yaml" / "arch"
LATEST_NAME = "latest"
# The teachers the DKDM and TCCD READMEs tell users to download, by the path the YAMLs and commands use.
PUBLISHED_TEACHERS = {
    "model/32x32_diffusion_cifar10.pt": "ADM_cifar10_baseline.pt",
    "model/DDPM_IP_celeba64.pt": "DDPM_IP_celeba64.pt",
    "model/DDPM_IP_imageNet32.pt": "DDPM_IP_imageNet32.pt",
}
TEACHER_SOURCE = "DDPM-IP (https://github.com/forever208/DDPM-IP)"

# temp-file names of atomic_io.atomic_write (".<name>.<random>.tmp")
_TEMP_RE = re.compile(r"^\..+\.[^.]+\.tmp$")
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")
_LIST_LIMIT = 10


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or otherwise unusable."""


class CheckpointMismatchError(CheckpointError):
    """A state dict's keys or shapes do not match the model it is loaded into."""


def remove_stale_temp_files(run_dir: PathLike, target: str = "") -> list[str]:
    """Delete temp files a killed writer left in `run_dir`; return the names removed. In a run dir (only
    its owner writes there) every temp file is stale. In a folder other runs share (the pool caches),
    pass the file about to be written as `target`: only its temp files go, and only its writer lock's
    holder may call this (run_lock.shared_file_writer), so no write in progress is deleted."""
    run_dir = os.fspath(run_dir)
    prefix = f".{os.path.basename(target)}." if target else ""
    removed = []
    for name in sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []:
        full = os.path.join(run_dir, name)
        if not (_TEMP_RE.match(name) and name.startswith(prefix) and os.path.isfile(full)):
            continue
        os.unlink(full)
        removed.append(name)
    if removed:
        logger.warn(f"removed {len(removed)} partial file(s) of an interrupted save in {run_dir}: "
                    f"{_head(removed)}")
    return removed


def atomic_write_bytes(data: bytes, path: PathLike) -> None:
    """Write `data` to `path` atomically: readers see either the old file (or none) or all of `data`."""
    atomic_write(path, lambda f: f.write(data))


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """`torch.save(obj, path)` done atomically, so a crash never leaves a partial checkpoint at `path`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def _size_str(path: str) -> str:
    try:
        return f"{os.path.getsize(path)} bytes"
    except OSError:
        return "size unknown"


def published_teacher_hint(path: PathLike) -> str:
    """'; download FILE from SOURCE and save it as PATH (README)' when PATH is where the READMEs put a
    published teacher, else ''."""
    path = os.fspath(path)
    for where, published in PUBLISHED_TEACHERS.items():
        if Path(path).as_posix().endswith(where):
            return f"; download {published} from {TEACHER_SOURCE} and save it as {path} (README)"
    return ""


def safe_torch_load(path: PathLike, map_location: Any = "cpu") -> Any:
    """`torch.load(weights_only=True)` that turns any read failure into a one-line `CheckpointError`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}{published_teacher_hint(path)}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # the zip reader and unpickler raise many types; report them uniformly
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [""]
        # torch's weights_only refusal opens with generic advice; the offending global is on the next line
        first = lines[1] if lines[0].startswith("Weights only load failed") and len(lines) > 1 else lines[0]
        first = first[:200]
        raise CheckpointError(
            f"cannot load checkpoint {path} ({_size_str(path)}): {type(exc).__name__}: {first}"
        ) from None


def verify_checkpoint_file(path: PathLike) -> None:
    """Cheaply check that a file is complete: zip CRCs for torch files, the STOP opcode for pickles."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"checkpoint is empty: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(-1, os.SEEK_END)
        tail = f.read(1)
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as zf:
                bad = zf.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise CheckpointError(f"corrupt checkpoint {path} ({size} bytes): {exc}") from None
        if bad is not None:
            raise CheckpointError(f"corrupt checkpoint {path} ({size} bytes): bad CRC in member {bad}")
    elif head.startswith(b"\x80") and tail != b".":
        raise CheckpointError(f"truncated pickle {path} ({size} bytes): no STOP opcode at the end")


# ---------------------------------------------------------------------------------------------------------
# Strict state-dict loading with a mismatch report


_PROFILER_BUFFERS = ("total_ops", "total_params")


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


def unwrap_state_dict(obj: Any, source: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Return the state dict inside a checkpoint object (plain, `{"state_dict": ...}`-style wrapped, or
    with a `module.` prefix) and notes describing any unwrapping done."""
    notes: list[str] = []
    for _ in range(3):
        if _is_tensor_dict(obj) or not isinstance(obj, Mapping):
            break
        key = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        notes.append(f"{source}: using the state dict stored under key {key!r}")
        obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise CheckpointError(f"{source}: not a state dict (got {type(obj).__name__})")
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        notes.append(f"{source}: stripped the 'module.' prefix from {len(state)} keys")
        state = {k[len("module."):]: v for k, v in state.items()}
    return state, notes


def _shapes(state: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}


def _head(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_LIST_LIMIT])
    more = f", ... (+{len(items) - _LIST_LIMIT} more)" if len(items) > _LIST_LIMIT else ""
    return shown + more


@functools.lru_cache(maxsize=64)
def _arch_shapes(arch_file: str, mtime: float, learn_sigma: bool) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Key/shape signature of the network (UNet, or DiT for a `model_name`) an arch YAML describes, built on
    the meta device (no memory)."""
    from omegaconf import OmegaConf

    from ..script_util import architecture_defaults, create_any_model_and_diffusion

    values = OmegaConf.to_container(OmegaConf.load(arch_file), resolve=True)
    if not isinstance(values, dict):
        raise CheckpointError(f"arch file {arch_file} does not hold a mapping")
    kwargs = architecture_defaults(values)
    kwargs.update({k: v for k, v in values.items() if k in kwargs}, learn_sigma=learn_sigma, use_fp16=False)
    with torch.device("meta"):
        model, _ = create_any_model_and_diffusion(**kwargs)
    return tuple(_shapes(model.state_dict()).items())


def suggest_arch(state_dict: Mapping[str, Any], arch_dir: PathLike | None = None) -> list[str]:
    """Arch files (with the learn_sigma setting) whose network (UNet or DiT) has exactly the keys and shapes
    of `state_dict`: `yaml/arch/*.yaml` and the data sets' own `yaml/*/arch/*.yaml` (e.g. the shipped digits
    teacher's), or the YAMLs in `arch_dir`; archs that cannot be built are skipped."""
    if arch_dir is not None:
        files = sorted(Path(arch_dir).glob("*.yaml"))
    else:
        files = sorted(ARCH_DIR.glob("*.yaml")) + sorted(ARCH_DIR.parent.glob("*/arch/*.yaml"))
    target = _shapes(state_dict)
    found: list[str] = []
    for arch_file in files:
        for learn_sigma in (True, False):
            try:
                sig = _arch_shapes(str(arch_file), arch_file.stat().st_mtime, learn_sigma)
            except Exception as exc:  # an arch another module cannot build should not hide the report
                logger.warn(f"could not build arch {arch_file} for comparison: {type(exc).__name__}: {exc}")
                break
            if dict(sig) == target:
                name = arch_file.relative_to(ARCH_DIR.parent.parent) if arch_dir is None else arch_file.name
                found.append(f"{name} (learn_sigma={learn_sigma})")
    return found


def mismatch_report(
    model_shapes: Mapping[str, tuple[int, ...]],
    ckpt_shapes: Mapping[str, tuple[int, ...]],
) -> tuple[list[str], list[str], list[str]]:
    """Missing keys, unexpected keys and mis-shaped keys ("name: checkpoint (..) vs model (..)")."""
    missing = [k for k in model_shapes if k not in ckpt_shapes]
    unexpected = [k for k in ckpt_shapes if k not in model_shapes]
    misshaped = [
        f"{k}: checkpoint {list(ckpt_shapes[k])} vs model {list(s)}"
        for k, s in model_shapes.items()
        if k in ckpt_shapes and ckpt_shapes[k] != s
    ]
    return missing, unexpected, misshaped


def drop_profiler_buffers(
    state: Mapping[str, Any], model_keys: Mapping[str, Any]
) -> tuple[dict[str, Any], int]:
    """Remove the `total_ops`/`total_params` buffers thop leaves on modules (the DKDM authors' image_kd.py
    profiles its student before training, so their checkpoints carry them); returns (state, count)."""
    kept = {
        k: v
        for k, v in state.items()
        if k in model_keys or k.rsplit(".", 1)[-1] not in _PROFILER_BUFFERS
    }
    return kept, len(state) - len(kept)


def load_state_dict_strict(
    model: torch.nn.Module,
    state_dict: Mapping[str, Any],
    source: str,
    arch_dir: PathLike | None = None,
) -> None:
    """Load `state_dict` into `model` strictly; on any key/shape difference raise
    `CheckpointMismatchError` listing the differences and the arch YAML(s) the checkpoint fits."""
    state, notes = unwrap_state_dict(state_dict, source)
    model_shapes = _shapes(model.state_dict())
    state, dropped = drop_profiler_buffers(state, model_shapes)
    if dropped:
        notes.append(f"{source}: dropped {dropped} thop counter buffers (total_ops/total_params)")
    for note in notes:
        logger.log(f"note: {note}")
    missing, unexpected, misshaped = mismatch_report(model_shapes, _shapes(state))
    if missing or unexpected or misshaped:
        lines = [
            f"{source}: state dict does not fit the model ({len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(misshaped)} mis-shaped keys)"
        ]
        if missing:
            lines.append(f"  missing ({len(missing)}): {_head(missing)}")
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): {_head(unexpected)}")
        if misshaped:
            lines.append(f"  mis-shaped ({len(misshaped)}): {_head(misshaped)}")
        fits = suggest_arch(state, arch_dir)
        if fits:
            lines.append(f"  the checkpoint fits arch {', '.join(fits)}")
        else:
            lines.append("  the checkpoint fits none of the arch files in yaml/arch/ and yaml/*/arch/")
        raise CheckpointMismatchError("\n".join(lines))
    model.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------------------------------------------
# Checkpoint sets for resume

_STEP_SENTINEL = 987654321  # stands in for the step when turning file-name patterns into regexes
_STEP_RE = re.compile(r"(?:^|\D)(\d+)\.[A-Za-z0-9]+$")


def parse_step(filename: PathLike) -> int:
    """Training step encoded in a checkpoint name: `model000100.pt`, `ema_0.9999_000100.pt` -> 100."""
    name = os.path.basename(os.fspath(filename))
    match = _STEP_RE.search(name)
    if match is None:
        raise ValueError(f"no step number in checkpoint file name: {name}")
    return int(match.group(1))


def role_file_names(
    step: int,
    roles: Iterable[str],
    ema_rates: Sequence[float | str] = (),
    extra_patterns: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """File names (guided-diffusion's) for each role at `step`; role "ema" expands to `ema_<rate>`."""
    extra = dict(extra_patterns or {})
    names: dict[str, str] = {}
    for role in roles:
        if role == "model":
            names["model"] = f"model{step:06d}.pt"
        elif role == "opt":
            names["opt"] = f"opt{step:06d}.pt"
        elif role == "ema":
            for rate in ema_rates:
                names[f"ema_{rate}"] = f"ema_{rate}_{step:06d}.pt"
        elif role in extra:
            names[role] = extra[role].format(step=step)
        else:
            raise ValueError(f"unknown checkpoint role {role!r} (no pattern given in extra_patterns)")
    return names


_EMA_FILE = re.compile(r"ema_(.+)_\d+\.pt$")


def saved_ema_rates(run_dir: PathLike) -> set[str]:
    """The EMA rates a run dir holds files for (`ema_<rate>_NNNNNN.pt`), as written in the names."""
    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        return set()
    return {m.group(1) for name in os.listdir(run_dir) if (m := _EMA_FILE.match(name))}


@dataclass(frozen=True)
class ResumeSet:
    """A complete checkpoint set: the step and the file path of each role ("model", "opt", "ema_<rate>",
    and caller-defined extras such as "pool")."""

    step: int
    run_dir: str
    paths: dict[str, str] = field(default_factory=dict)

    def get(self, role: str) -> str | None:
        """Path for `role`, or None when the set has no such file."""
        return self.paths.get(role)

    def ema_path(self, rate: float | str) -> str | None:
        """Path of the EMA weights for `rate`, or None."""
        return self.paths.get(f"ema_{rate}")


_SET_FILE = re.compile(r"^(?:model|opt|ema_.+_|teacher-state-)(\d{6,})\.(?:pt|cache)$")


def prune_checkpoint_sets(run_dir: PathLike, keep: int) -> list[int]:
    """Delete the checkpoint files (model, EMA, opt, teacher-state) of every step but the `keep` newest that
    `latest` and the model files name; call it after `write_latest`, so the newest set is complete before
    anything goes. Returns the steps removed."""
    run_dir = os.fspath(run_dir)
    latest = read_latest(run_dir)
    by_step: dict[int, list[str]] = {}
    for name in os.listdir(run_dir):
        match = _SET_FILE.match(name)
        if match:
            by_step.setdefault(int(match.group(1)), []).append(name)
    complete = sorted(step for step, names in by_step.items() if f"model{step:06d}.pt" in names)
    kept = set(complete[-keep:]) | ({latest[0]} if latest else set())
    removed = sorted(step for step in by_step if step not in kept and step < max(kept, default=0))
    for step in removed:
        for name in by_step[step]:
            os.remove(os.path.join(run_dir, name))
    return removed


def write_latest(run_dir: PathLike, step: int, files: Sequence[str]) -> None:
    """Atomically write `latest` (JSON {step, files}); call it after every file of the set is written."""
    payload = json.dumps({"step": int(step), "files": [os.path.basename(f) for f in files]}, indent=1)
    atomic_write_bytes(payload.encode() + b"\n", os.path.join(os.fspath(run_dir), LATEST_NAME))


def read_latest(run_dir: PathLike) -> tuple[int, list[str]] | None:
    """The (step, files) recorded in `run_dir/latest`, or None if absent; malformed raises CheckpointError."""
    path = os.path.join(os.fspath(run_dir), LATEST_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return int(data["step"]), [str(x) for x in data["files"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"malformed {path}: {type(exc).__name__}: {exc}") from None


def _check_set(
    run_dir: str,
    names: Mapping[str, str],
    required: Sequence[str],
    validators: Mapping[str, Callable[[str], Any]],
) -> tuple[dict[str, str], list[str]]:
    """Paths of the roles present (and readable) and the problems that make the required set incomplete."""
    paths: dict[str, str] = {}
    problems: list[str] = []
    for role, name in names.items():
        path = os.path.join(run_dir, name)
        base_role = "ema" if role.startswith("ema_") else role
        if not os.path.isfile(path):
            if base_role in required:
                problems.append(f"missing {name}")
            continue
        try:
            validators.get(role, verify_checkpoint_file)(path)
        except Exception as exc:
            if base_role in required:
                problems.append(f"unreadable {name} ({exc})")
            continue
        paths[role] = path
    return paths, problems


def is_plain_optimizer_state(payload: Any) -> bool:
    """True for a bare `optimizer.state_dict()`, the opt file the authors' guided-diffusion loops write
    (this project's opt file wraps it with the step, RNG, scaler and extras)."""
    return isinstance(payload, dict) and set(payload) == {"state", "param_groups"}


def find_resume_set(
    path: PathLike,
    required: Sequence[str] = ("model",),
    ema_rates: Sequence[float | str] = (),
    extra_patterns: Mapping[str, str] | None = None,
    validators: Mapping[str, Callable[[str], Any]] | None = None,
) -> ResumeSet | None:
    """Newest complete checkpoint set in a run dir (trusting `latest` when it is valid), or the set of a
    given `modelNNNNNN.pt`; None if a run dir holds no complete set. Skipped newer sets are warned about.

    `validators` maps a role to a callable that raises on an unreadable file (default: zip/pickle check)."""
    path = os.fspath(path)
    extra = dict(extra_patterns or {})
    roles = list(dict.fromkeys(["model", "opt", "ema", *extra, *required]))
    if "ema" in required and not ema_rates:
        raise ValueError("required role 'ema' needs at least one rate in ema_rates")
    checks = dict(validators or {})

    def attempt(run_dir: str, step: int) -> tuple[ResumeSet | None, list[str]]:
        names = role_file_names(step, roles, ema_rates, extra)
        paths, problems = _check_set(run_dir, names, required, checks)
        return (None, problems) if problems else (ResumeSet(step, run_dir, paths), [])

    if os.path.isfile(path) or path.endswith(".pt"):
        run_dir = os.path.dirname(os.path.abspath(path))
        step = parse_step(path)
        if not os.path.isfile(path):
            raise CheckpointError(f"resume checkpoint not found: {path}")
        found, problems = attempt(run_dir, step)
        if found is None:
            raise CheckpointError(f"incomplete checkpoint set for {path}: {'; '.join(problems)}")
        return found
    if not os.path.isdir(path):
        raise CheckpointError(f"resume path is neither a run dir nor a checkpoint file: {path}")

    try:
        latest = read_latest(path)
    except CheckpointError as exc:
        logger.warn(f"ignoring {exc}")
        latest = None
    if latest is not None:
        latest_step, listed = latest
        role_of = {n: r for r, n in role_file_names(latest_step, roles, ema_rates, extra).items()}
        bad = []
        for name in listed:
            try:
                checks.get(role_of.get(name, ""), verify_checkpoint_file)(os.path.join(path, name))
            except Exception as exc:
                bad.append(str(exc))
        found, problems = attempt(path, latest_step)
        if found is not None and not bad:
            return found
        logger.warn(f"{path}/latest names step {latest_step} but its set is unusable: "
                    f"{'; '.join(bad + problems)}; scanning for the newest complete set")

    patterns = [
        re.compile(re.escape(name).replace(str(_STEP_SENTINEL), r"(\d+)") + "$")
        for name in role_file_names(_STEP_SENTINEL, roles, ema_rates, extra).values()
    ]
    steps = {
        int(m.group(1)) for name in os.listdir(path) for pat in patterns if (m := pat.match(name))
    }
    for step in sorted(steps, reverse=True):
        found, problems = attempt(path, step)
        if found is not None:
            return found
        logger.warn(f"skipping incomplete checkpoint set at step {step} in {path}: {'; '.join(problems)}")
    return None
