"""The RDD README's command lines as written: absl-style flag files and flags, read into this project's
flag names before argparse sees them.

What the authors' scripts accept and this module turns into plain `--flag value` pairs:
  * `--flagfile PATH` (or `=PATH`): the file's lines (`--flag=value`, `--noflag`, blank lines, `#`
    comments) in place, so later command-line flags override them, as absl does;
  * boolean flags bare (`--feature`) or negated (`--noconditional`);
  * repeated multi-valued flags (`--ch_mult=1 --ch_mult=2 ...`) joined into one comma list;
  * the launcher's and the GPU flags: `--local-rank`/`--local_rank` (torch.distributed.launch) sets
    LOCAL_RANK, `--gpu_id 0,1,2,3` sets CUDA_VISIBLE_DEVICES (unless already set), `--num_gpus`,
    `--distributed` and `--dataset` are accepted (the launcher's world size is what counts).
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..config import ConfigError

LAUNCH_FLAGS = ("local-rank", "local_rank", "gpu_id", "num_gpus", "distributed", "dataset")
OURS = ("method",)  # YAML keys the authors' flag files do not carry (the stage is this project's flag)


def read_flagfile(path: str) -> list[str]:
    """The flags of an absl flag file, one per non-blank, non-comment line (nested --flagfile expanded)."""
    if not os.path.isfile(path):
        raise ConfigError(f"--flagfile {path}: no such file")
    argv = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "//")):
            argv.extend(shlex.split(line))
    return expand_flagfiles(argv)


def expand_flagfiles(argv: Sequence[str]) -> list[str]:
    """`argv` with every `--flagfile PATH` replaced by the file's flags."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--flagfile", "-flagfile"):
            if i + 1 >= len(argv):
                raise ConfigError("--flagfile needs a path")
            out.extend(read_flagfile(argv[i + 1]))
            i += 2
            continue
        if arg.startswith(("--flagfile=", "-flagfile=")):
            out.extend(read_flagfile(arg.split("=", 1)[1]))
        else:
            out.append(arg)
        i += 1
    return out


def has_flagfile(argv: Sequence[str]) -> bool:
    """True when the command line names an absl flag file."""
    return any(a in ("--flagfile", "-flagfile") or a.startswith(("--flagfile=", "-flagfile=")) for a in argv)


def to_flagfile(flags: Mapping[str, Any]) -> str:
    """Flags (a flag YAML's mapping) as an absl flag file: `--flag=value` lines, booleans as `--flag` or
    `--noflag`, lists as one line per value; this project's own keys left out."""
    lines = []
    for key, value in flags.items():
        if key in OURS:
            continue
        if isinstance(value, bool):
            lines.append(f"--{key}" if value else f"--no{key}")
        elif isinstance(value, list):
            lines += [f"--{key}={v}" for v in value]
        else:
            lines.append(f"--{key}={value}")
    return "\n".join(lines) + "\n"


def absl_to_argparse(argv: Sequence[str], defaults: Mapping[str, Any]) -> tuple[list[str], dict[str, str]]:
    """Authors'-style `argv` (flag files expanded) as argparse-ready `--flag value` pairs over the flags in
    `defaults`, plus the launcher/GPU flags found (name -> value); other arguments pass through."""
    argv = expand_flagfiles(argv)
    singles: dict[str, str] = {}
    multi: dict[str, list[str]] = {}
    launch: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--") or arg == "--":
            rest.append(arg)
            continue
        key, has_value, value = arg[2:].partition("=")
        if key in LAUNCH_FLAGS:
            if key == "distributed" and not has_value:  # absl's bare boolean
                value = "true"
            elif not has_value and i < len(argv) and not argv[i].startswith("--"):
                value, i = argv[i], i + 1
            launch[key.replace("-", "_")] = value
            continue
        if key not in defaults and key.startswith("no") and isinstance(defaults.get(key[2:]), bool):
            singles[key[2:]] = "false"
            continue
        if key not in defaults:
            rest.append(arg)
            continue
        if not has_value:
            if isinstance(defaults[key], bool) and (i >= len(argv) or argv[i].startswith("--")):
                value = "true"
            elif i < len(argv):
                value, i = argv[i], i + 1
            else:
                raise ConfigError(f"--{key} needs a value")
        if isinstance(defaults[key], list):
            multi.setdefault(key, []).append(value)
        else:
            singles[key] = value
    out = list(rest)
    for key, value in singles.items():
        out += [f"--{key}", value]
    for key, values in multi.items():
        out += [f"--{key}", ",".join(values)]
    return out, launch


def apply_launch_flags(launch: Mapping[str, str]) -> None:
    """Honour the launcher's local rank and `--gpu_id` (before CUDA starts): LOCAL_RANK and
    CUDA_VISIBLE_DEVICES, each only when the environment does not already set it."""
    if "local_rank" in launch:
        os.environ.setdefault("LOCAL_RANK", launch["local_rank"])
    if launch.get("gpu_id"):
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", launch["gpu_id"])
