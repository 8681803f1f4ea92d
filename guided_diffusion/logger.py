"""ADM-style logger: free-text messages (`log`) and per-iteration key/values (`logkv`, `logkv_mean`,
`dumpkvs`) written to stdout, `log.txt` and `progress.csv` of a run dir; optional Weights & Biases.

Only rank 0 writes; `dumpkvs` averages values across ranks through torch.distributed, so every rank
must call it at the same points."""

from __future__ import annotations

import abc
import datetime
import json
import netrc
import os
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Mapping
from numbers import Number
from typing import Any, TextIO

import torch
import torch.distributed as dist

from .infra.atomic_io import atomic_write_text

DEBUG = 10
INFO = 20
WARN = 30
ERROR = 40
DISABLED = 50

_KEY_WIDTH = 30


class KVWriter(abc.ABC):
    """Something that records one dict of key/values per `dumpkvs`."""

    @abc.abstractmethod
    def writekvs(self, kvs: Mapping[str, Any]) -> None:
        """Record one dump."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the underlying file, if any."""


class SeqWriter(abc.ABC):
    """Something that records free-text messages."""

    @abc.abstractmethod
    def writeseq(self, seq: Iterable[Any]) -> None:
        """Record one message made of the items of `seq`."""


def _fmt(val: Any) -> str:
    return f"{val:<8.3g}" if isinstance(val, float) else str(val)


def _truncate(s: str) -> str:
    return s[: _KEY_WIDTH - 3] + "..." if len(s) > _KEY_WIDTH else s


class HumanOutputFormat(KVWriter, SeqWriter):
    """Key/value tables and messages as text, to a file (appended) or to the current `sys.stdout`."""

    def __init__(self, path: str | None) -> None:
        self._file: TextIO | None = open(path, "a", encoding="utf-8") if path else None

    @property
    def _out(self) -> TextIO:
        return self._file if self._file is not None else sys.stdout

    def writekvs(self, kvs: Mapping[str, Any]) -> None:
        rows = [(_truncate(str(k)), _truncate(_fmt(v))) for k, v in sorted(kvs.items())]
        if not rows:
            return
        kw = max(len(k) for k, _ in rows)
        vw = max(len(v) for _, v in rows)
        rule = "-" * (kw + vw + 7)
        lines = [rule] + [f"| {k:<{kw}} | {v:<{vw}} |" for k, v in rows] + [rule]
        self._out.write("\n".join(lines) + "\n")
        self._out.flush()

    def writeseq(self, seq: Iterable[Any]) -> None:
        self._out.write(" ".join(str(x) for x in seq) + "\n")
        self._out.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class JSONOutputFormat(KVWriter):
    """One JSON object per dump, one line each (`progress.json`)."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "a", encoding="utf-8")

    def writekvs(self, kvs: Mapping[str, Any]) -> None:
        row = {k: (v.item() if hasattr(v, "item") else v) for k, v in sorted(kvs.items())}
        self._file.write(json.dumps(row, default=str) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class CSVOutputFormat(KVWriter):
    """`progress.csv`: a header plus one row per dump. When new keys appear the file is rewritten
    (atomically) with the wider header and earlier rows padded; an existing file is continued."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.keys: list[str] = []
        if os.path.isfile(path) and os.path.getsize(path) > 0:
            with open(path, encoding="utf-8") as f:
                self.keys = f.readline().rstrip("\n").split(",")
        self._file = open(path, "a", encoding="utf-8")

    def _widen(self, new_keys: list[str]) -> None:
        self._file.close()
        with open(self.path, encoding="utf-8") as f:
            old_rows = f.read().splitlines()[1:]
        self.keys.extend(new_keys)
        pad = "," * len(new_keys)
        text = ",".join(self.keys) + "\n" + "".join(row + pad + "\n" for row in old_rows)
        atomic_write_text(self.path, text)
        self._file = open(self.path, "a", encoding="utf-8")

    def writekvs(self, kvs: Mapping[str, Any]) -> None:
        new_keys = sorted(k for k in kvs if k not in self.keys)
        if new_keys:
            self._widen(new_keys)
        self._file.write(",".join("" if kvs.get(k) is None else str(kvs[k]) for k in self.keys) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def make_output_format(fmt: str, ev_dir: str, log_suffix: str = "") -> KVWriter:
    """Writer for one format name: "stdout", "log", "csv" or "json"."""
    if fmt == "stdout":
        return HumanOutputFormat(None)
    if fmt == "log":
        return HumanOutputFormat(os.path.join(ev_dir, f"log{log_suffix}.txt"))
    if fmt == "csv":
        return CSVOutputFormat(os.path.join(ev_dir, f"progress{log_suffix}.csv"))
    if fmt == "json":
        return JSONOutputFormat(os.path.join(ev_dir, f"progress{log_suffix}.json"))
    raise ValueError(f"unknown log format {fmt!r} (expected stdout, log, csv or json)")


def _rank(comm: Any = None) -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group=comm)
    return 0


def _reduce_across_ranks(name2val: dict[str, Any], name2cnt: Mapping[str, int], comm: Any) -> dict[str, Any]:
    """`logkv_mean` keys: count-weighted mean over all ranks; `logkv` keys: the value of the lowest rank
    that logged it (ranks may log different keys)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group=comm) == 1:
        return dict(name2val)
    local = {k: (v, name2cnt.get(k, 0)) for k, v in name2val.items()}
    gathered: list[Any] = [None] * dist.get_world_size(group=comm)
    dist.all_gather_object(gathered, local, group=comm)
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    result: dict[str, Any] = {}
    for part in gathered:
        for k, (v, c) in part.items():
            if c > 0:
                sums[k] += float(v) * c
                counts[k] += c
            elif k not in result:
                result[k] = v
    result.update({k: sums[k] / counts[k] for k in sums})
    return result


class Logger:
    """Holds the run dir, the writers and the key/values accumulated since the last dump."""

    def __init__(self, dir: str | None, output_formats: list[KVWriter], comm: Any = None) -> None:
        self.name2val: dict[str, Any] = {}
        self.name2cnt: dict[str, int] = defaultdict(int)
        self.level = INFO
        self.dir = dir
        self.output_formats = output_formats
        self.comm = comm
        self._wandb: Any = None
        self._wandb_failed = False

    def logkv(self, key: str, val: Any) -> None:
        self.name2val[key] = val.item() if torch.is_tensor(val) else val

    def logkv_mean(self, key: str, val: Any) -> None:
        if torch.is_tensor(val):
            val = val.item()
        if not isinstance(val, Number) or isinstance(val, bool):
            raise TypeError(f"logkv_mean({key!r}): value must be a number, got {type(val).__name__}")
        old, cnt = self.name2val.get(key, 0.0), self.name2cnt[key]
        self.name2val[key] = old * cnt / (cnt + 1) + float(val) / (cnt + 1)
        self.name2cnt[key] = cnt + 1

    def dumpkvs(self) -> dict[str, Any]:
        d = _reduce_across_ranks(self.name2val, self.name2cnt, self.comm)
        if _rank(self.comm) == 0 and d:
            for fmt in self.output_formats:
                fmt.writekvs(d)
            self._log_wandb(d)
        self.name2val.clear()
        self.name2cnt.clear()
        return d

    def log(self, *args: Any, level: int = INFO) -> None:
        if self.level <= level:
            for fmt in self.output_formats:
                if isinstance(fmt, SeqWriter):
                    fmt.writeseq(args)

    def set_level(self, level: int) -> None:
        self.level = level

    def get_dir(self) -> str | None:
        return self.dir

    def init_wandb(self, project: str, config: Mapping[str, Any] | None) -> None:
        """Start a wandb run (offline when no credentials are found); on failure warn once and go on."""
        try:
            import wandb

            mode = os.environ.get("WANDB_MODE") or (None if _has_wandb_credentials() else "offline")
            if mode == "offline" and "WANDB_MODE" not in os.environ:
                self.log("wandb: no credentials found, logging offline", level=WARN)
            self._wandb = wandb.init(project=project, config=_plain(config), dir=self.dir, mode=mode)
        except Exception as exc:  # wandb raises many error types (network, auth, settings)
            self._wandb_disable(f"wandb could not start ({type(exc).__name__}: {exc}); continuing without")

    def _wandb_disable(self, message: str) -> None:
        if not self._wandb_failed:
            self.log(f"WARNING: {message}", level=WARN)
        self._wandb_failed = True
        self._wandb = None

    def _log_wandb(self, d: Mapping[str, Any]) -> None:
        if self._wandb is None:
            return
        step = d.get("step")
        try:
            self._wandb.log(dict(d), step=int(step) if isinstance(step, Number) else None)
        except Exception as exc:  # never let the tracker stop training
            self._wandb_disable(f"wandb.log failed ({type(exc).__name__}: {exc}); continuing without")

    def close(self) -> None:
        for fmt in self.output_formats:
            fmt.close()
        if self._wandb is not None:
            try:
                self._wandb.finish()
            except Exception as exc:  # finishing an offline/broken run must not crash shutdown
                self.log(f"WARNING: wandb.finish failed: {exc}", level=WARN)
            self._wandb = None


def _plain(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """A plain dict of `config` (OmegaConf containers resolved) that wandb can serialize."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True)
    return {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
            for k, v in (config or {}).items()}


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


_current: Logger | None = None


def get_current() -> Logger:
    """The active logger; before `configure` a stdout-only logger (no files are created)."""
    global _current
    if _current is None:
        _current = Logger(None, [HumanOutputFormat(None)])
    return _current


def configure(
    dir: str | None = None,
    format_strs: list[str] | None = None,
    comm: Any = None,
    log_suffix: str = "",
    wandb_project: str | None = None,
    wandb_config: Mapping[str, Any] | None = None,
) -> Logger:
    """Make `dir` the run dir (default: $OPENAI_LOGDIR or a fresh temp dir) and open its writers
    (default stdout, log.txt, progress.csv); ranks other than 0 write nothing."""
    global _current
    if dir is None:
        dir = os.environ.get("OPENAI_LOGDIR") or os.path.join(
            tempfile.gettempdir(), datetime.datetime.now().strftime("gd-%Y-%m-%d-%H-%M-%S-%f")
        )
    dir = os.path.expanduser(dir)
    rank = _rank(comm)
    if format_strs is None:
        env = os.environ.get("OPENAI_LOG_FORMAT")
        format_strs = env.split(",") if env else ["stdout", "log", "csv"]
    os.makedirs(dir, exist_ok=True)
    if rank != 0:
        format_strs = []
    formats = [make_output_format(f, dir, log_suffix) for f in format_strs if f]
    if _current is not None:
        _current.close()
    _current = Logger(dir, formats, comm=comm)
    if wandb_project and rank == 0:
        _current.init_wandb(wandb_project, wandb_config)
    if formats:
        log(f"Logging to {dir}")
    return _current


def reset() -> None:
    """Close the active logger's files; later calls go to stdout until `configure` again."""
    global _current
    if _current is not None:
        _current.close()
        _current = None


def logkv(key: str, val: Any) -> None:
    """Record `val` for `key` in this iteration (the last value wins)."""
    get_current().logkv(key, val)


def logkv_mean(key: str, val: Any) -> None:
    """Accumulate `val` for `key`; the dump reports the mean (across calls and ranks)."""
    get_current().logkv_mean(key, val)


def logkvs(d: Mapping[str, Any]) -> None:
    """`logkv` for every item of `d`."""
    for k, v in d.items():
        logkv(k, v)


def getkvs() -> dict[str, Any]:
    """The key/values accumulated since the last dump (this rank only)."""
    return get_current().name2val


def dumpkvs() -> dict[str, Any]:
    """Write the accumulated key/values (averaged across ranks) and clear them; call it on every rank."""
    return get_current().dumpkvs()


def log(*args: Any, level: int = INFO) -> None:
    """Write a message to stdout and log.txt if `level` passes the threshold."""
    get_current().log(*args, level=level)


def debug(*args: Any) -> None:
    """`log` at DEBUG level."""
    log(*args, level=DEBUG)


def info(*args: Any) -> None:
    """`log` at INFO level."""
    log(*args, level=INFO)


def warn(*args: Any) -> None:
    """`log` at WARN level."""
    log("WARNING:", *args, level=WARN)


def error(*args: Any) -> None:
    """`log` at ERROR level."""
    log("ERROR:", *args, level=ERROR)


def set_level(level: int) -> None:
    """Drop messages below `level` (DEBUG, INFO, WARN, ERROR, DISABLED)."""
    get_current().set_level(level)


def get_dir() -> str | None:
    """The run dir of the active logger (None before `configure`)."""
    return get_current().get_dir()
