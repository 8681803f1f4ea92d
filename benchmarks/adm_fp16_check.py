"""`precision: adm_fp16` against the authors' own guided-diffusion fp16, run side by side on the CPU.

    python benchmarks/adm_fp16_check.py --authors DKDM_CHECKOUT/guided-diffusion [--steps 20]

Builds the tiny test UNet, copies its weights into the authors' `UNetModel(use_fp16=True)`, calls both
`convert_to_fp16()`, and compares the forward output and `--steps` training steps of their
`fp16_util.MixedPrecisionTrainer` (fp16 model, float32 master weights, lg_loss_scale) with this package's
`MixedPrecisionTrainer(precision="adm_fp16")`, both with the same AdamW: the largest weight difference and
the loss scale after every step. `--overflow_at K` forces an inf gradient at step K (the scale must drop
by 1 and the step be skipped on both sides). Prints one line per step; exit 1 if any differs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import guided_diffusion.distill  # noqa: E402, F401 (registers the methods' YAML sections)
from guided_diffusion.config import load_config, model_and_diffusion_kwargs  # noqa: E402
from guided_diffusion.infra.mixed_precision import MixedPrecisionTrainer  # noqa: E402
from guided_diffusion.script_util import create_model_and_diffusion  # noqa: E402


def import_authors(path: str) -> tuple[object, object]:
    """The authors' `guided_diffusion.unet` and `.fp16_util` from their checkout, imported beside ours
    (their package has our package's name, so ours is set aside while theirs loads)."""
    ours = {k: sys.modules.pop(k) for k in list(sys.modules) if k.startswith("guided_diffusion")}
    sys.path.insert(0, path)
    try:
        unet, fp16 = importlib.import_module("guided_diffusion.unet"), importlib.import_module(
            "guided_diffusion.fp16_util")
    finally:
        sys.path.remove(path)
        for k in [k for k in sys.modules if k.startswith("guided_diffusion")]:
            del sys.modules[k]
        sys.modules.update(ours)
    return unet, fp16


def main(argv: list[str] | None = None) -> int:
    """Build both, run both, print the differences."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--authors", required=True, help="their guided-diffusion folder (holds guided_diffusion/)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--overflow_at", type=int, default=-1)
    args = p.parse_args(argv)
    their_unet, their_fp16 = import_authors(args.authors)
    torch.manual_seed(0)
    kwargs = model_and_diffusion_kwargs(load_config(REPO / "tests/configs/tiny_baseline.yaml"))
    ours, _ = create_model_and_diffusion(**kwargs)
    for module in ours.modules():  # non-zero output layers, so that every path carries gradient
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.normal_(module.weight, std=0.05)
    theirs = their_unet.UNetModel(
        image_size=16, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
        attention_resolutions=(2,), dropout=0.0, channel_mult=(1, 2), num_classes=None, use_checkpoint=False,
        use_fp16=True, num_heads=4, num_head_channels=16, num_heads_upsample=-1, use_scale_shift_norm=True,
        resblock_updown=True, use_new_attention_order=True,
    )
    theirs.load_state_dict(ours.state_dict(), strict=True)
    theirs.convert_to_fp16()
    ours.convert_to_fp16()
    t = torch.tensor([1, 5, 9, 17])
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        same_forward = torch.equal(ours(x, t), theirs(x, t))
    print(f"forward: bitwise equal {same_forward}")
    trainer_t = their_fp16.MixedPrecisionTrainer(model=theirs, use_fp16=True, fp16_scale_growth=1e-3)
    opt_t = torch.optim.AdamW(trainer_t.master_params, lr=1e-3, weight_decay=0.0, foreach=False)
    trainer_o = MixedPrecisionTrainer(ours, "adm_fp16", fp16_scale_growth=1e-3)
    opt_o = torch.optim.AdamW(trainer_o.params, lr=1e-3, weight_decay=0.0, foreach=False)
    worst = 0.0 if same_forward else float("inf")
    for step in range(args.steps):
        xs = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(step))
        if step == args.overflow_at:
            xs[0, 0, 0, 0] = float("inf")
        for trainer, opt, model in ((trainer_t, opt_t, theirs), (trainer_o, opt_o, ours)):
            trainer.zero_grad()
            trainer.backward((model(xs, t) ** 2).mean())
            trainer.optimize(opt)
        master = their_fp16.master_params_to_state_dict(
            theirs, trainer_t.param_groups_and_shapes, trainer_t.master_params, True)
        diff = max((master[k].float() - v.float()).abs().max().item() for k, v in ours.state_dict().items())
        worst = max(worst, diff)
        print(f"step {step}: max weight difference {diff:.3e}, lg_loss_scale theirs "
              f"{trainer_t.lg_loss_scale:.4f} ours {float(trainer_o.lg_loss_scale):.4f}")
    print(f"largest difference over {args.steps} steps: {worst:.3e}")
    return 0 if worst == 0.0 else 1


if __name__ == "__main__":
    sys.exit(main())
