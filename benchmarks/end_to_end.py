"""End-to-end timing of a paper KD config through the scripts users run: `dynamic_prepare.py`, then N steps of
`image_kd.py` (and optionally `image_train.py` and `image_sample.py`), each a fresh process, as a user
launches them.

    python benchmarks/end_to_end.py --config yaml/cifar10_32/exp/ablation/dynamic-iterative-distillation/\
CIFAR10-57M-Dynamic-0.01.yaml --set student.model=yaml/arch/14M-CNN.yaml --kd-steps 300 --out e2e

The teacher is a random-weight checkpoint of the config's teacher arch in the DDPM-IP/ADM layout (the files
users bring cannot be downloaded here; weights do not change the speed). For each stage it reports the wall
time of the process, the time from launch to the first progress-bar update (the first teacher call of
the preparation, the first training step, the first sampling step) and the steady rate over the second
half of the bar's updates. A stage given a time limit (`--prepare-limit`) is stopped there and its total is
extrapolated from its steady rate; the report says so. Results: `<out>/end_to_end.json`, rewritten after
each stage.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# tqdm's line: "<desc>:  12%|#####     | 79104/661248 [00:18<02:13, 4352.11it/s]"
BAR = re.compile(r"^\s*(?P<desc>[^:\r\n]+):\s+\d+%\|.*?\|\s*(?P<n>\d+)/(?P<total>\d+)\s*\[")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a KD YAML of the papers (teacher: and student: sections)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a key of the config (repeatable), e.g. student.model=yaml/arch/14M-CNN.yaml",
    )
    p.add_argument("--kd-steps", type=int, default=300, help="image_kd steps to run (0: prepare only)")
    p.add_argument(
        "--prepare-limit",
        type=float,
        default=0.0,
        help="stop dynamic_prepare after this many seconds and extrapolate (0: run it to the end)",
    )
    p.add_argument("--kd-limit", type=float, default=0.0, help="time limit of image_kd in seconds (0: none)")
    p.add_argument(
        "--random-pool",
        action="store_true",
        help="write a pool of random states (the config's size, the authors' layout) instead of running "
        "dynamic_prepare: times image_kd alone, e.g. for students whose speed does not depend on the pool",
    )
    p.add_argument("--launcher", default="", help='prefix of each script, e.g. "mpiexec -n 1"')
    p.add_argument("--out", required=True, help="working and results dir")
    p.add_argument(
        "--repeat-kd",
        action="store_true",
        help="run image_kd a second time on the same pool (a warm compile cache)",
    )
    p.add_argument("--train-config", default="", help="also time image_train of this config on random images")
    p.add_argument("--train-steps", type=int, default=100)
    p.add_argument(
        "--sample-config", default="", help="also time image_sample of this config (random teacher)"
    )
    p.add_argument("--sample-num", type=int, default=5000)
    p.add_argument("--sample-batch", type=int, default=2500)
    p.add_argument("--sample-respacing", default="100")
    return p.parse_args(argv)


def write_inputs(args: argparse.Namespace, out: Path) -> Path:
    """A random teacher checkpoint of the config's teacher arch and the config pointed at it and at `out`."""
    import torch
    from omegaconf import OmegaConf

    import guided_diffusion.distill  # noqa: F401 (registers the methods' YAML sections)
    from guided_diffusion.config import check_input_files, load_config, model_and_diffusion_kwargs
    from guided_diffusion.script_util import create_any_model_and_diffusion

    raw = OmegaConf.load(args.config)
    for item in args.set:
        key, _, value = item.partition("=")
        OmegaConf.update(raw, key, yaml.safe_load(value), force_add=True)
    raw.teacher.tempfile = str(out / "pool.cache")
    raw.teacher.model_path = str(out / "teacher.pt")
    config = out / "config.yaml"
    OmegaConf.save(raw, config)
    cfg = load_config(config)
    teacher_pt = out / "teacher.pt"
    if not teacher_pt.exists():
        torch.manual_seed(0)
        model, _ = create_any_model_and_diffusion(**model_and_diffusion_kwargs(cfg.teacher))
        torch.save(model.state_dict(), teacher_pt)
    check_input_files(cfg)  # the scripts' own checks, before any timing
    return config


def write_random_pool(config: Path, path: Path) -> None:
    """A one-rank pool of the config's size (round(rho T) x batch) with random states at random steps."""
    import numpy as np

    from guided_diffusion.config import load_config
    from guided_diffusion.distill.dkdm.cache import save_cache
    from guided_diffusion.distill.dkdm.pool import pool_size
    from guided_diffusion.distill.dkdm.setup import student_diffusion_of

    cfg = load_config(config)
    student = cfg.student
    steps = student_diffusion_of(student).num_timesteps
    n = pool_size(cfg.teacher.iter_choice, cfg.teacher.BATCH, steps, student.batch_size)
    rng = np.random.default_rng(0)
    states = rng.standard_normal((n, 3, student.image_size, student.image_size), dtype=np.float32)
    save_cache(str(path), rng.integers(1, steps, n), states)


def run_stage(name: str, cmd: list[str], limit: float, log_path: Path) -> dict[str, Any]:
    """Run `cmd`, timestamp every progress-bar update it prints, stop it after `limit` seconds (0: never)."""
    updates: list[tuple[float, str, int, int]] = []
    start = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    assert proc.stdout is not None
    with open(log_path, "wb") as log:

        def pump() -> None:
            buf = b""
            while True:
                chunk = proc.stdout.read1(65536)
                if not chunk:
                    break
                log.write(chunk)
                log.flush()
                buf += chunk
                *lines, buf = re.split(rb"[\r\n]", buf)
                now = time.perf_counter() - start
                for line in lines:
                    m = BAR.match(line.decode("utf-8", "replace"))
                    if m:
                        updates.append((now, m["desc"].strip(), int(m["n"]), int(m["total"])))

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        stopped = False
        try:
            proc.wait(timeout=limit or None)
        except subprocess.TimeoutExpired:
            stopped = True
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        reader.join(timeout=10)
    wall = time.perf_counter() - start
    return summarize(name, updates, wall, proc.returncode, stopped, cmd)


def summarize(
    name: str,
    updates: list[tuple[float, str, int, int]],
    wall: float,
    rc: int | None,
    stopped: bool,
    cmd: list[str],
) -> dict[str, Any]:
    """Time to the first update of the stage's main bar, steady rate over its second half, extrapolation."""
    desc = max({u[1] for u in updates}, key=lambda d: max(u[3] for u in updates if u[1] == d), default=None)
    bar = [u for u in updates if u[1] == desc and u[2] > 0]
    result: dict[str, Any] = {
        "stage": name,
        "cmd": shlex.join(cmd),
        "wall_s": wall,
        "exit": rc,
        "stopped_at_limit": stopped,
        "bar": desc,
    }
    if not bar:
        return result
    total = bar[-1][3]
    first_t, first_n = bar[0][0], bar[0][2]
    half = [u for u in bar if u[0] >= (bar[0][0] + bar[-1][0]) / 2] or bar[-1:]
    t0, n0 = half[0][0], half[0][2]
    t1, n1 = bar[-1][0], bar[-1][2]
    rate = (n1 - n0) / (t1 - t0) if t1 > t0 else float("nan")
    result.update(
        {
            "first_update_s": first_t,
            "first_update_n": first_n,
            "done": n1,
            "total": total,
            "steady_per_s": rate,
        }
    )
    if n1 < total and rate == rate and rate > 0:
        result["extrapolated_wall_s"] = t1 + (total - n1) / rate
    return result


def write_images(folder: Path, n: int, size: int) -> Path:
    """`n` random RGB PNGs of `size` x `size` for image_train (its speed does not depend on the pixels)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            folder / f"img_{i:05d}.png"
        )
    return folder


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    config = write_inputs(args, out)
    launcher = [*shlex.split(args.launcher), sys.executable]
    report: dict[str, Any] = {"config": args.config, "overrides": args.set, "stages": []}
    path = out / "end_to_end.json"

    def stage(name: str, script: str, flags: list[str], limit: float, log: str) -> None:
        result = run_stage(name, [*launcher, script, *flags], limit, out / log)
        report["stages"].append(result)
        path.write_text(json.dumps(report, indent=2))
        print(json.dumps(result), flush=True)

    if args.random_pool:
        write_random_pool(config, out / "pool.cache")
    else:
        stage(
            "dynamic_prepare",
            "scripts/dynamic_prepare.py",
            ["--config", str(config), "--exp_dir", str(out / "prepare")],
            args.prepare_limit,
            "prepare.log",
        )
    if args.kd_steps and (out / "pool.cache").exists():
        for i in range(2 if args.repeat_kd else 1):
            name = "image_kd" if i == 0 else "image_kd (warm compile cache)"
            stage(
                name,
                "scripts/image_kd.py",
                [
                    "--config",
                    str(config),
                    "--exp_dir",
                    str(out / f"kd{i}"),
                    "--max_steps",
                    str(args.kd_steps),
                    "--save_interval",
                    str(10 * args.kd_steps),
                ],
                args.kd_limit,
                f"kd{i}.log",
            )
    if args.train_config:
        from guided_diffusion.config import load_config  # write_inputs registered the methods' sections

        size = int(load_config(args.train_config).image_size)
        data = write_images(out / "images", 512, size)
        stage(
            "image_train",
            "scripts/image_train.py",
            [
                "--config",
                args.train_config,
                "--data_dir",
                str(data),
                "--exp_dir",
                str(out / "train"),
                "--max_steps",
                str(args.train_steps),
                "--save_interval",
                str(10 * args.train_steps),
            ],
            0.0,
            "train.log",
        )
    if args.sample_config:
        stage(
            "image_sample",
            "scripts/image_sample.py",
            [
                "--config",
                args.sample_config,
                "--model_path",
                str(out / "teacher.pt"),
                "--num_samples",
                str(args.sample_num),
                "--batch_size",
                str(args.sample_batch),
                "--timestep_respacing",
                str(args.sample_respacing),
                "--use_ddim",
                "False",
                "--exp_dir",
                str(out / "sample"),
            ],
            0.0,
            "sample.log",
        )
    return report


if __name__ == "__main__":
    main()
