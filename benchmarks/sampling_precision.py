"""Sample one checkpoint under fp32 or half-precision autocast, on a GPU or the CPU, and score the samples.

Half-precision sampling is normally CUDA-only (`image_sample.py --precision`); this script also runs bf16
autocast on the CPU, so the effect of half-precision arithmetic on a sampler can be measured without a GPU.

    python benchmarks/sampling_precision.py --config RUN/kd.yaml --model_path RUN/kd/ema_0.995_001000.pt \
        --timestep_respacing 100 --precision bf16 --device cpu --num_samples 1000 --output_dir bf16
    python evaluations/evaluator.py --features digits experiments/data/digits/digits16_ref.npz \
        bf16/samples_1000x16x16x3.npz
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import guided_diffusion.distill  # noqa: E402, F401 (registers the methods' YAML sections)
from guided_diffusion.config import load_config, primary_section  # noqa: E402
from guided_diffusion.infra.mixed_precision import autocast_context  # noqa: E402
from guided_diffusion.run_setup import build_model_and_diffusion, load_model_weights  # noqa: E402
from guided_diffusion.sampling import sample_images, save_samples  # noqa: E402


def main(argv: list[str] | None = None) -> str:
    """Sample and save; returns the path of the samples file."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="the run's YAML (a KD run's student section is used)")
    p.add_argument("--model_path", required=True)
    p.add_argument("--timestep_respacing", default=None, help="sampling steps (default: the config's)")
    p.add_argument("--precision", default="bf16", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num_samples", type=int, default=1000)
    p.add_argument("--batch_size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", required=True, help="gets samples_<N>x<H>x<W>x3.npz, as image_sample.py")
    args = p.parse_args(argv)

    section = primary_section(load_config(args.config))
    if args.timestep_respacing is not None:
        section.timestep_respacing = str(args.timestep_respacing)
    device = torch.device(args.device)
    model, diffusion = build_model_and_diffusion(section, device)
    load_model_weights(model, args.model_path)
    model.eval()
    start = time.perf_counter()
    # the autocast region is opened here, on any device; sample_images, told fp32, opens none of its own
    with autocast_context(args.precision, device, cuda_only=False):
        images = sample_images(
            model,
            diffusion,
            num_samples=args.num_samples,
            batch_size=args.batch_size,
            image_size=section.image_size,
            seed=args.seed,
            precision="fp32",
            progress=True,
        )
    path = save_samples(images, args.output_dir)
    wall = time.perf_counter() - start
    print(f"{args.num_samples} samples, {args.precision} on {device}, {wall:.1f}s -> {path}")
    return path


if __name__ == "__main__":
    main()
