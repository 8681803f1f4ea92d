"""Where a distilled student's eps differs from its teacher's, per timestep and per colour component.

    python benchmarks/student_eps_error.py --config RUN/kd.yaml --student RUN/kd/ema_0.995_001000.pt \
        --pool RUN/kd/teacher-state-001000.cache --json eps_error.json

Both nets are queried on the pool's own states (teacher trajectories at every timestep of the KD grid, each
at the timestep of its next teacher call). The
per-element squared error of the student's eps splits exactly into a grey part (the mean over the colour
channels), a colour-cast part (the channel differences' mean over the image: a spatially constant tint) and
the remaining colour detail; on grey data the teacher's channel differences are an exact passthrough of x_t's,
so the last two measure how well the student learned it. Seconds on a CPU, against minutes for sampling and
scoring, which makes it a quick check of student architectures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guided_diffusion.config import load_config  # noqa: E402
from guided_diffusion.distill.dkdm.cache import load_cache  # noqa: E402
from guided_diffusion.run_setup import build_model_and_diffusion, load_model_weights  # noqa: E402

PARTS = ("total", "grey", "colour_cast", "colour_detail")


def load_net(section: Any, path: str) -> tuple[torch.nn.Module, Any]:
    """The UNet and diffusion of a config section with the weights of `path` (loaded as the scripts load
    them: strictly, refusing settings the run recorded otherwise), in eval mode."""
    model, diffusion = build_model_and_diffusion(section, "cpu")
    load_model_weights(model, path, section)
    return model.eval(), diffusion


def predicted_eps(model: torch.nn.Module, diffusion: Any, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The eps implied by the net's unclipped x0 at (x_t, t)."""
    with torch.no_grad():
        x0 = diffusion.p_mean_variance(model, x, t, clip_denoised=False)["pred_xstart"]
    return diffusion._predict_eps_from_xstart(x, t, x0)


def split_error(err: torch.Tensor) -> dict[str, float]:
    """Per-element mean squared error and its exact split: grey + colour cast + colour detail = total."""
    grey = err.mean(dim=1, keepdim=True)
    colour = err - grey
    cast = colour.mean(dim=(2, 3), keepdim=True)
    return {
        "total": float(err.pow(2).mean()),
        "grey": float(grey.pow(2).mean()),
        "colour_cast": float(cast.pow(2).mean()),
        "colour_detail": float((colour - cast).pow(2).mean()),
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="the KD run's config (teacher: and student: sections)")
    p.add_argument("--student", required=True, help="student checkpoint (model or EMA file)")
    p.add_argument("--pool", required=True, help="a teacher-state cache of that run (the states queried)")
    p.add_argument("--per-t", type=int, default=64, help="states per timestep (at most)")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    teacher, teacher_diffusion = load_net(cfg.teacher, cfg.teacher.model_path)
    student, student_diffusion = load_net(cfg.student, args.student)
    pool = load_cache(args.pool, T=student_diffusion.num_timesteps)
    steps, states = torch.from_numpy(pool["total_t"]).long(), torch.from_numpy(pool["total_x_t_1"]).float()
    rows = []
    print("t  total  grey  colour_cast  colour_detail  (per-element squared eps error)")
    # an item at step k holds the state its next teacher call denoises at t = k - 1; k = 0 is a finished x_0
    for t in sorted(set((steps - 1).tolist()) - {-1}):
        x = states[steps == t + 1][: args.per_t]
        ts = torch.full((x.shape[0],), t, dtype=torch.long)
        err = predicted_eps(student, student_diffusion, x, ts)
        err -= predicted_eps(teacher, teacher_diffusion, x, ts)
        row = {"t": t, "n": int(x.shape[0]), **split_error(err)}
        rows.append(row)
        print(f"{t:3d}  " + "  ".join(f"{row[k]:.5f}" for k in PARTS))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
