"""Run a table's stages as fresh processes, resumably: one at a time in plan order, or with `jobs` > 1 up to
that many side by side once their inputs are done (small digits models leave a GPU mostly idle).

`state.json` in the table dir records every finished stage (command, exit code, wall time) and every row's
metrics; a rerun of the same command skips what is done, resumes an interrupted training stage from its run
dir (`--resume_checkpoint`, RCFD's `--resume`) and redoes an interrupted prepare or sampling stage (their
files are written atomically, so a cut one left nothing half-written). One runner writes a table dir at a
time. SIGTERM is passed to the running stage (a training script saves its step) and the runner stops;
if the runner itself dies, the stage gets SIGTERM from the kernel (parent-death signal).
"""

from __future__ import annotations

import ctypes
import glob
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from guided_diffusion.infra.atomic_io import atomic_write_text
from guided_diffusion.infra.run_lock import claim_run_dir, holds_checkpoints
from guided_diffusion.tables.plan import Plan, Stage
from guided_diffusion.tables.report import write_reports
from guided_diffusion.tables.spec import REPO_ROOT, TableError

STATE_FILE = "state.json"
RCFD_STATE = "train_state.pt"
PRODUCTS = ("data", "prepare", "synthetic", "mix")  # stages whose product, once there, need not be made again
_PR_SET_PDEATHSIG = 1


def launcher_words(stage: Stage, launcher: str, display: bool) -> list[str]:
    """The words before the script: `mpiexec -n N python`, `torchrun --nproc_per_node N` or `python`."""
    python = "python" if display else sys.executable
    if stage.ranks == 0:
        return [python]
    if launcher == "torchrun":
        return [python, "-m", "torch.distributed.run", "--nproc_per_node", str(stage.ranks)]
    mpiexec = "mpiexec" if display else find_mpiexec()
    return [mpiexec, "-n", str(stage.ranks), python]


def find_mpiexec() -> str:
    """mpiexec beside this Python (a venv's `pip install mpich`) or on PATH; TableError when neither."""
    beside = Path(sys.executable).parent / "mpiexec"
    found = str(beside) if beside.is_file() else shutil.which("mpiexec")
    if not found:
        raise TableError("mpiexec not found (pip install mpich mpi4py, or put it on PATH)")
    return found


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the runner dies, so a training stage saves its step and stops."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


@dataclass
class _Running:
    """A started stage: its process, open log and start time."""

    stage: Stage
    proc: subprocess.Popen
    handle: IO[str]
    log: Path
    begin: float
    resume: bool


class TableRunner:
    """Runs a `Plan`'s stages into its table dir and rewrites table.md / table.json after each one."""

    def __init__(self, plan: Plan, env: Mapping[str, str] | None = None,
                 echo: Callable[[str], None] = print, jobs: int = 1) -> None:
        self.plan, self.out, self.echo = plan, plan.out, echo
        self.env = dict(os.environ if env is None else env)
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.state: dict[str, Any] = {"settings": plan.settings, "stages": {}, "rows": {},
                                      "row_info": dict(plan.rows)}
        self.jobs = max(1, jobs)
        self.running: dict[str, _Running] = {}
        self.stop_signal = 0

    # ---- commands

    def command(self, stage: Stage, display: bool = False, resume: bool = False) -> list[str]:
        """The stage's full command; sample globs resolved when running, shown as written when displayed."""
        args = list(stage.args) + (list(stage.resume) if resume else [])
        if not display:
            args = [self._resolve(a) for a in args]
            script = str(REPO_ROOT / stage.script)
        else:
            script = stage.script
        return [*launcher_words(stage, self.plan.table.launcher, display), script, *args]

    @staticmethod
    def _resolve(arg: str) -> str:
        if "*" not in arg:
            return arg
        found = sorted(glob.glob(str(REPO_ROOT / arg) if not os.path.isabs(arg) else arg))
        if len(found) != 1:
            raise TableError(f"expected one file matching {arg}, found {len(found)}")
        return found[0]

    def display(self, stage: Stage) -> str:
        return shlex.join(self.command(stage, display=True))

    def dry_run(self) -> None:
        """Print every stage's command in order, with the row it belongs to."""
        self.echo(f"# table {self.plan.table.name} ({self.plan.mode}), {len(self.plan.stages)} stages, "
                  f"out {self.out}")
        for name, info in self.plan.rows.items():
            if "pool" in info:
                self.echo(f"# {name}: pool of {info['pool']:,} teacher states")
        for stage in self.plan.stages:
            self.echo(f"[{stage.kind}{' ' + stage.row if stage.row else ''}] {self.display(stage)}")

    # ---- state

    def load_state(self) -> None:
        path = self.out / STATE_FILE
        if not path.is_file():
            return
        try:
            previous = json.loads(path.read_text())
        except ValueError as exc:
            raise TableError(f"{path}: unreadable state ({exc})") from None
        old = previous.get("settings", {})
        differ = [k for k in self.plan.settings if k != "ranks" and old.get(k) != self.plan.settings[k]]
        if differ:
            pairs = ", ".join(f"{k} {old.get(k)!r} -> {self.plan.settings[k]!r}" for k in differ)
            raise TableError(f"{self.out} holds a table run with other settings ({pairs}); use another --out")
        self.state["stages"] = previous.get("stages", {})
        self.state["rows"] = previous.get("rows", {})
        self.state["row_info"] = {**previous.get("row_info", {}), **self.plan.rows}

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / STATE_FILE, json.dumps(self.state, indent=2) + "\n")
        write_reports(self.plan, self.state, self.commands())

    def commands(self) -> list[str]:
        return [self.display(s) for s in self.plan.stages]

    # ---- running

    def run(self) -> int:
        """Run what is not done yet, up to `jobs` stages at a time once their inputs are done; 0 when every
        stage finished, 1 when one failed, 128 + N when stopped by signal N."""
        refusal = claim_run_dir(str(self.out), allow_checkpoints=True)
        if refusal:
            raise TableError(refusal)
        self.load_state()
        if self.plan.table.launcher == "mpiexec" and any(s.ranks for s in self.plan.stages):
            find_mpiexec()
        previous = signal.signal(signal.SIGTERM, self._on_signal)
        try:
            self._schedule()
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.save()
        if self.stop_signal:
            self.echo(f"[table] stopped by signal {self.stop_signal}; run the same command to resume")
            return 128 + self.stop_signal
        failed = [k for k, v in self.state["stages"].items() if v["status"] != "done"]
        self.echo(f"[table] {self.out / 'table.md'}" + (f"; {len(failed)} stage(s) not done" * bool(failed)))
        return 1 if failed else 0

    def _schedule(self) -> None:
        pending = [s for s in self.plan.stages if self.state["stages"].get(s.key, {}).get("status") != "done"]
        while (pending or self.running) and not self.stop_signal:
            for stage in list(pending):
                if len(self.running) >= self.jobs:
                    break
                readiness = self._readiness(stage)
                if readiness == "wait":
                    continue
                pending.remove(stage)
                if readiness == "go":
                    self.start(stage)
            if self.running:
                self._reap(block=True)
            elif pending and all(self._readiness(s) == "wait" for s in pending):
                raise TableError(f"stages wait on stages that never run: {[s.key for s in pending]}")
        while self.running:  # stopped: the stages got the signal; keep what they save
            self._reap(block=True)

    def _readiness(self, stage: Stage) -> str:
        """go (inputs done), skip (an input failed; recorded), wait (an input still to run)."""
        statuses = [self.state["stages"].get(k, {}).get("status") for k in stage.after]
        if all(status == "done" for status in statuses):
            return "go"
        if any(status in ("failed", "skipped", "stopped") for status in statuses):
            blocked = [k for k, st in zip(stage.after, statuses, strict=True) if st != "done"]
            self.record(stage, "skipped", error=f"needs {', '.join(blocked)}")
            return "skip"
        return "wait"

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.stop_signal = signum
        for child in self.running.values():
            if child.proc.poll() is None:
                child.proc.send_signal(signum)

    def start(self, stage: Stage) -> None:
        """Start a stage's process (or record its product as found)."""
        if stage.kind in PRODUCTS and stage.exists and Path(stage.exists).exists():
            self.record(stage, "done", note=f"found {stage.exists}")
            return
        resume = stage.kind == "train" and self._resumable(stage)
        try:
            argv = self.command(stage, resume=resume)
        except TableError as exc:
            self.record(stage, "failed", error=str(exc))
            return
        log = self.out / "logs" / f"{stage.key.replace(':', '_').replace('/', '_')}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        self.echo(f"[table] {'resume ' if resume else ''}{stage.key}: {self.display(stage)}")
        handle = open(log, "a")
        handle.write(f"$ {shlex.join(argv)}\n")
        handle.flush()
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=self.env, stdout=handle, stderr=subprocess.STDOUT,
                                preexec_fn=_die_with_parent)
        self.running[stage.key] = _Running(stage, proc, handle, log, time.perf_counter(), resume)

    def _reap(self, block: bool) -> None:
        """Record every finished stage; with `block`, wait until at least one has finished."""
        while True:
            finished = [r for r in self.running.values() if r.proc.poll() is not None]
            if finished or not block:
                break
            time.sleep(0.1)
        for run in finished:
            del self.running[run.stage.key]
            run.handle.close()
            self.finish(run)

    def finish(self, run: _Running) -> None:
        stage, rc = run.stage, run.proc.returncode
        earlier = self.state["stages"].get(stage.key, {})
        wall = time.perf_counter() - run.begin + float(earlier.get("wall_s", 0.0))
        if self.stop_signal:
            self.record(stage, "stopped", rc=rc, wall_s=wall, resumed=run.resume)
        elif rc != 0:
            tail = " | ".join(run.log.read_text(errors="replace").strip().splitlines()[-3:])
            self.record(stage, "failed", rc=rc, wall_s=wall, error=f"exit {rc}: {tail}", log=str(run.log))
        else:
            if stage.kind == "evaluate":
                self.collect(stage, wall)
            resumed = run.resume or earlier.get("resumed", False)
            self.record(stage, "done", rc=rc, wall_s=wall, resumed=resumed)

    def _resumable(self, stage: Stage) -> bool:
        run_dir = stage.run_dir
        if not run_dir or not os.path.isdir(run_dir):
            return False
        if "--resume" in stage.resume:
            return os.path.isfile(os.path.join(run_dir, RCFD_STATE))
        return holds_checkpoints(run_dir)

    def record(self, stage: Stage, status: str, **fields: Any) -> None:
        entry = {"status": status, "kind": stage.kind, "row": stage.row, "command": self.display(stage)}
        entry.update({k: v for k, v in fields.items() if v is not None})
        self.state["stages"][stage.key] = entry
        if status != "done":
            self.echo(f"[table] {stage.key}: {status}{': ' + fields['error'] if fields.get('error') else ''}")
        self.save()

    def collect(self, stage: Stage, wall: float) -> None:
        """Read the evaluator's metrics (and the student's parameter count) into the row; its wall time is
        its stages' (this evaluation's `wall` included, recorded right after)."""
        metrics = json.loads(Path(stage.metrics).read_text())
        info = self.plan.rows[stage.row]
        row = {k: metrics.get(k) for k in ("fid", "sfid", "inception_score", "precision", "recall",
                                            "class_histogram")}
        checkpoint = info.get("checkpoint")
        if checkpoint and (REPO_ROOT / checkpoint).is_file():
            row["params"] = count_parameters(REPO_ROOT / checkpoint)
        row["wall_s"] = wall + sum(v.get("wall_s", 0.0) for k, v in self.state["stages"].items()
                                   if v["row"] == stage.row and k != stage.key)
        self.state["rows"][stage.row] = row


def count_parameters(path: Path) -> int:
    """Elements of every tensor in a state-dict checkpoint (the model's parameter count)."""
    from guided_diffusion.infra.checkpoint import safe_torch_load

    state = safe_torch_load(path)
    return int(sum(v.numel() for v in state.values() if hasattr(v, "numel")))
