"""Resume exactness and soak of a real `image_kd` run: uninterrupted controls beside one run SIGKILLed at
random moments and resumed from its run dir each time, per determinism mode, then the final weights compared.

    python benchmarks/resume_soak.py --config yaml/digits_16/exp/Digits-DKDM.yaml --out OUT --steps 6000 \
        --save_interval 250 --kills 5 --modes on,off
    python benchmarks/resume_soak.py --config yaml/cifar10_32/exp/CIFAR10-14M-Dynamic-0.4.yaml --out OUT \
        --steps 40 --save_interval 20 --kills 1 --random_teacher --random_pool

Each mode (`on`: `deterministic: true`, `off`: the default kernels) runs `--controls` uninterrupted runs and
one killed run, both modes side by side on one device, all from one pool cache prepared first.
OUT/summary.json and summary.md hold, per mode, the max |difference| of the model, EMA and optimizer
files at the last step between the controls (the nondeterminism floor) and between a control and the
killed run, whether they are bit-equal, every kill (step logged before it, step resumed from), and the
memory trace of the first control (host RSS and the CUDA allocator, `memory_log_interval` lines of its
log) with its growth after warm-up.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import guided_diffusion.distill  # noqa: E402, F401 (registers the methods' YAML sections)
from benchmarks.digits_results import display_command, parse_edits  # noqa: E402
from benchmarks.end_to_end import write_random_pool  # noqa: E402
from guided_diffusion.config import load_config, model_and_diffusion_kwargs  # noqa: E402
from guided_diffusion.infra.atomic_io import atomic_write_text  # noqa: E402
from guided_diffusion.infra.checkpoint import (  # noqa: E402
    atomic_torch_save,
    find_resume_set,
    read_latest,
    safe_torch_load,
)
from guided_diffusion.script_util import create_any_model_and_diffusion  # noqa: E402
from guided_diffusion.tables.plan import derive_config  # noqa: E402
from guided_diffusion.train_util import parse_ema_rates  # noqa: E402

MEMORY_LINE = re.compile(
    r"memory step (\d+): host_rss_mib ([0-9.]+)(?: cuda_allocated_mib ([0-9.]+) cuda_reserved_mib ([0-9.]+))?"
)
MODES = {"on": True, "off": False}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="a KD YAML (teacher: and student: sections)")
    p.add_argument("--out", required=True, help="output folder (run dirs, logs, summary)")
    p.add_argument("--steps", type=int, required=True, help="student steps of every run")
    p.add_argument("--save_interval", type=int, required=True, help="checkpoint every K steps")
    p.add_argument("--kills", type=int, default=5, help="SIGKILLs of the killed run (at random steps)")
    p.add_argument("--controls", type=int, default=2, help="uninterrupted runs per mode")
    p.add_argument("--modes", default="on,off", help="comma-separated determinism modes: on, off")
    p.add_argument("--memory_log_interval", type=int, default=500)
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    p.add_argument("--random_teacher", action="store_true", help="random teacher weights (speed checks)")
    p.add_argument(
        "--random_pool", action="store_true",
        help="a pool of random states at random steps instead of dynamic_prepare's (resume checks need no "
        "real pool; preparing one costs ~T/2 teacher steps per item)",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted-key YAML edit")
    p.add_argument("--timeout_s", type=float, default=3000.0, help="give up on a run after this long")
    args = p.parse_args(argv)
    bad = [m for m in args.modes.split(",") if m not in MODES]
    if bad or args.kills < 0 or args.controls < 1 or args.steps <= args.save_interval:
        p.error(f"need modes in {sorted(MODES)} (got {bad}), kills >= 0, controls >= 1, "
                "steps > save_interval")
    return args


def random_teacher(config: Path, out: Path) -> Path:
    """A checkpoint of the config's teacher architecture with random weights (seed 0)."""
    section = load_config(config, overrides=None).teacher
    torch.manual_seed(0)
    model, _ = create_any_model_and_diffusion(**model_and_diffusion_kwargs(section))
    path = out / "random_teacher.pt"
    atomic_torch_save(model.state_dict(), str(path))
    return path


def last_logged_step(run: Path) -> int:
    """The newest `step` row of run/progress.csv (0 before the first)."""
    path = run / "progress.csv"
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    if len(lines) < 2:
        return 0
    column = lines[0].split(",").index("step")
    for line in reversed(lines[1:]):
        cells = line.split(",")
        if len(cells) > column and cells[column]:
            try:
                return int(float(cells[column]))
            except ValueError:
                continue
    return 0


def saved_step(run: Path) -> int:
    found = read_latest(run) if run.is_dir() else None
    return found[0] if found else 0


def launch(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)


def killed_run(cmd: list[str], run: Path, log: Path, targets: list[int], deadline: float) -> list[dict]:
    """Run `cmd`, SIGKILL it once the log passes each target step (and a set is saved), then resume it from
    `run`; returns the kills. The last launch runs to the end."""
    rng = random.Random(sum(targets))
    kills = []
    proc = launch(cmd, log)
    for target in targets:
        while proc.poll() is None and not (last_logged_step(run) >= target and saved_step(run) > 0):
            if time.monotonic() > deadline:
                proc.kill()
                raise SystemExit(f"error: {run} did not reach step {target} in time")
            time.sleep(0.05)
        if proc.poll() is not None:
            break
        time.sleep(rng.uniform(0.0, 0.5))  # a moment inside a step, or inside a checkpoint write
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills.append({"logged_step": last_logged_step(run), "resumed_from": saved_step(run)})
        proc = launch([*cmd, "--resume_checkpoint", str(run)], log)
    if proc.wait(timeout=max(1.0, deadline - time.monotonic())) != 0:
        raise SystemExit(f"error: the killed run's last launch failed; see {log}")
    return kills


def final_files(run: Path, step: int, ema_rates: list[float]) -> dict[str, Path]:
    """role -> file of the run's newest complete checkpoint set ("model", "opt", "ema_<rate>"), which must
    be the one of `step`."""
    found = find_resume_set(run, required=("model", "opt", "ema"), ema_rates=ema_rates)
    if found is None or found.step != step:
        raise SystemExit(f"error: {run} ended at {found and found.step}, not at step {step}")
    return {role: Path(path) for role, path in found.paths.items()}


def tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor inside a (nested) checkpoint, by path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return {}
    found = {}
    for key, value in items:
        found.update(tensors(value, f"{prefix}/{key}"))
    return found


def compare(a: dict[str, Path], b: dict[str, Path]) -> dict[str, Any]:
    """Per role: bit-equal or not, and the max |a - b| over its tensors."""
    result = {}
    for role in sorted(a):
        ta, tb = tensors(safe_torch_load(a[role])), tensors(safe_torch_load(b[role]))
        if set(ta) != set(tb):
            result[role] = {"equal": False, "max_abs": None, "note": "different tensors"}
            continue
        diffs = [(x.double() - y.double()).abs().max().item() if x.numel() and x.is_floating_point()
                 else float(not torch.equal(x, y)) for x, y in ((ta[k], tb[k]) for k in ta)]
        equal = all(torch.equal(ta[k], tb[k]) for k in ta)
        result[role] = {"equal": equal, "max_abs": max(diffs, default=0.0)}
    return result


def memory_trace(log: Path) -> list[dict[str, float]]:
    rows = []
    for match in MEMORY_LINE.finditer(log.read_text() if log.is_file() else ""):
        step, host, alloc, reserved = match.groups()
        rows.append({"step": int(step), "host_rss_mib": float(host),
                     "cuda_allocated_mib": float(alloc) if alloc else None,
                     "cuda_reserved_mib": float(reserved) if reserved else None})
    return rows


def growth(trace: list[dict[str, float]], key: str) -> float | None:
    """Relative growth of `key` from the second sample (after warm-up) to the largest later one."""
    values = [row[key] for row in trace[1:] if row[key] is not None]
    if len(values) < 2 or values[0] <= 0:
        return None
    return (max(values) - values[0]) / values[0]


def run_mode(args: argparse.Namespace, mode: str, base: Path, out: Path) -> dict[str, Any]:
    folder = out / mode
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "config.yaml"
    derive_config(base, config, {"student.deterministic": MODES[mode]}, f"resume_soak.py, mode {mode}")
    cmd = [sys.executable, "scripts/image_kd.py", "--config", str(config)]
    deadline = time.monotonic() + args.timeout_s
    controls = []
    for i in range(args.controls):
        run = folder / f"control{i}"
        controls.append((run, launch([*cmd, "--exp_dir", str(run)], folder / f"control{i}.log")))
    targets = sorted(random.Random(args.seed).sample(range(args.save_interval + 1, args.steps), args.kills))
    killed = folder / "killed"
    started = time.monotonic()
    kills = killed_run([*cmd, "--exp_dir", str(killed)], killed, folder / "killed.log", targets, deadline)
    for run, proc in controls:
        if proc.wait(timeout=max(1.0, deadline - time.monotonic())) != 0:
            raise SystemExit(f"error: {run} failed; see {run}.log")
    rates = parse_ema_rates(load_config(config).student.ema_rate)
    finals = [final_files(run, args.steps, rates) for run, _ in controls]
    result = {
        "deterministic": MODES[mode],
        "command": display_command(cmd),
        "kill_targets": targets,
        "kills": kills,
        "wall_s": round(time.monotonic() - started, 1),
        "control_vs_killed": compare(finals[0], final_files(killed, args.steps, rates)),
        "control_vs_control": compare(finals[0], finals[1]) if len(finals) > 1 else None,
        "memory": memory_trace(controls[0][0] / "log.txt"),
    }
    result["memory_growth"] = {k: growth(result["memory"], k)
                               for k in ("host_rss_mib", "cuda_allocated_mib", "cuda_reserved_mib")}
    return result


def render(summary: dict[str, Any]) -> str:
    lines = [f"# Resume and soak: {summary['config']}", "", f"`{summary['command']}`", "",
             "| mode | kills (logged step -> resumed from) | control vs killed | control vs control | "
             "memory growth after warm-up (host / CUDA reserved) |", "| --- | --- | --- | --- | --- |"]

    def cell(pair: dict[str, Any] | None) -> str:
        if pair is None:
            return "-"
        return "; ".join(f"{role} {'bit-equal' if v['equal'] else 'max ' + format(v['max_abs'], '.2e')}"
                         for role, v in pair.items())

    for mode, r in summary["modes"].items():
        if "error" in r:
            lines.append(f"| {mode} | {r['error']} | | | |")
            continue
        kills = ", ".join(f"{k['logged_step']}->{k['resumed_from']}" for k in r["kills"]) or "none"
        g = r["memory_growth"]
        mem = " / ".join("-" if g[k] is None else f"{100 * g[k]:+.2f}%" for k in ("host_rss_mib",
                                                                                  "cuda_reserved_mib"))
        lines.append(f"| {mode} | {kills} | {cell(r['control_vs_killed'])} | {cell(r['control_vs_control'])} "
                     f"| {mem} |")
    return "\n".join(lines) + "\n"


def plot_memory(summary: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for mode, r in summary["modes"].items():
        if "error" in r:
            continue
        steps = [row["step"] for row in r["memory"]]
        ax.plot(steps, [row["host_rss_mib"] for row in r["memory"]], marker="o", label=f"{mode}: host RSS")
        if any(row["cuda_reserved_mib"] for row in r["memory"]):
            ax.plot(steps, [row["cuda_reserved_mib"] for row in r["memory"]], marker="s",
                    label=f"{mode}: CUDA reserved")
    ax.set_xlabel("step")
    ax.set_ylabel("MiB")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    edits = parse_edits(args.set)
    edits.update({"student.max_steps": args.steps, "student.save_interval": args.save_interval,
                  "student.memory_log_interval": args.memory_log_interval,
                  "teacher.tempfile": str(out / "pool.cache")})
    if args.random_teacher:
        edits["teacher.model_path"] = str(random_teacher(Path(args.config), out))
    base = out / "base.yaml"
    derive_config(Path(args.config), base, edits, "resume_soak.py")
    if args.random_pool:
        write_random_pool(base, out / "pool.cache")  # end_to_end.py's, the one random-pool writer
    else:
        prepare = [sys.executable, "scripts/dynamic_prepare.py", "--config", str(base)]
        with open(out / "prepare.log", "wb") as log:
            failed = subprocess.run(prepare, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
        if failed:
            raise SystemExit(f"error: preparing the pool failed; see {out / 'prepare.log'}")
    summary: dict[str, Any] = {"config": args.config, "command": display_command([sys.executable, *sys.argv]),
                               "steps": args.steps, "modes": {}}
    modes = args.modes.split(",")
    with ThreadPoolExecutor(len(modes)) as pool:  # the modes' runs share the device side by side
        futures = {mode: pool.submit(run_mode, args, mode, base, out) for mode in modes}
        for mode, future in futures.items():
            try:
                summary["modes"][mode] = future.result()
            except (SystemExit, Exception) as exc:  # one mode's failure keeps the other's result
                summary["modes"][mode] = {"error": str(exc)}
            atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    atomic_write_text(out / "summary.md", render(summary))
    plot_memory(summary, out / "memory.png")
    print(render(summary))
    return summary


if __name__ == "__main__":
    main()
