"""Factories and argparse helpers with guided-diffusion's public names and defaults."""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .dit import DiT
    from .respace import SpacedDiffusion
    from .unet import UNetModel

NUM_CLASSES = 1000

# Channel multipliers used when `channel_mult` is empty. 32 px follows DDPM-IP (the published teachers).
DEFAULT_CHANNEL_MULT: dict[int, tuple[float, ...]] = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
}


def diffusion_defaults() -> dict[str, Any]:
    """Default diffusion settings (guided-diffusion's values) for image training and sampling."""
    return dict(
        learn_sigma=False,
        diffusion_steps=1000,
        noise_schedule="linear",
        timestep_respacing="",
        use_kl=False,
        predict_xstart=False,
        rescale_timesteps=False,
        rescale_learned_sigmas=False,
    )


def model_and_diffusion_defaults() -> dict[str, Any]:
    """Default UNet plus diffusion settings: exactly the keys `create_model_and_diffusion` takes."""
    res = dict(
        image_size=64,
        num_channels=128,
        num_res_blocks=2,
        num_heads=4,
        num_heads_upsample=-1,
        num_head_channels=-1,
        attention_resolutions="16,8",
        channel_mult="",
        dropout=0.0,
        class_cond=False,
        use_checkpoint=False,
        use_scale_shift_norm=True,
        resblock_updown=False,
        use_fp16=False,
        use_new_attention_order=False,
        norm_groups=32,  # ours: GroupNorm groups (ADM's 32); fewer keep colour offsets at narrow levels
    )
    res.update(diffusion_defaults())
    return res


def create_model_and_diffusion(
    *,
    image_size: int,
    class_cond: bool,
    learn_sigma: bool,
    num_channels: int,
    num_res_blocks: int,
    channel_mult: str | Sequence[float],
    num_heads: int,
    num_head_channels: int,
    num_heads_upsample: int,
    attention_resolutions: str | int | Sequence[int],
    dropout: float,
    diffusion_steps: int,
    noise_schedule: str,
    timestep_respacing: str | Sequence[int],
    use_kl: bool,
    predict_xstart: bool,
    rescale_timesteps: bool,
    rescale_learned_sigmas: bool,
    use_checkpoint: bool,
    use_scale_shift_norm: bool,
    resblock_updown: bool,
    use_fp16: bool,
    use_new_attention_order: bool,
    norm_groups: int = 32,
) -> tuple[UNetModel, SpacedDiffusion]:
    """Build (UNetModel, SpacedDiffusion); takes exactly the keys of `model_and_diffusion_defaults()`."""
    model = create_model(
        image_size,
        num_channels,
        num_res_blocks,
        channel_mult=channel_mult,
        learn_sigma=learn_sigma,
        class_cond=class_cond,
        use_checkpoint=use_checkpoint,
        attention_resolutions=attention_resolutions,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        dropout=dropout,
        resblock_updown=resblock_updown,
        use_fp16=use_fp16,
        use_new_attention_order=use_new_attention_order,
        norm_groups=norm_groups,
    )
    diffusion = create_gaussian_diffusion(
        steps=diffusion_steps,
        learn_sigma=learn_sigma,
        noise_schedule=noise_schedule,
        use_kl=use_kl,
        predict_xstart=predict_xstart,
        rescale_timesteps=rescale_timesteps,
        rescale_learned_sigmas=rescale_learned_sigmas,
        timestep_respacing=timestep_respacing,
    )
    return model, diffusion


def dit_model_and_diffusion_defaults() -> dict[str, Any]:
    """The DKDM authors' DiT plus diffusion defaults: latent-space sizes (in_channels 4, DiT-XL widths), so
    pixel-space configs set in_channels 3. As theirs, the diffusion defaults come last (learn_sigma False)."""
    res = dict(
        image_size=64,
        class_cond=False,
        model_name="DiT-S/2",
        patch_size=2,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        in_channels=4,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        num_classes=1000,
        learn_sigma=True,
        use_fp16=False,
    )
    res.update(diffusion_defaults())
    return res


def create_dit_model_and_diffusion(
    image_size: int,
    class_cond: bool,
    diffusion_steps: int,
    noise_schedule: str,
    use_kl: bool,
    predict_xstart: bool,
    rescale_timesteps: bool,
    rescale_learned_sigmas: bool,
    timestep_respacing: str | Sequence[int],
    model_name: str = "DiT-S/2",
    patch_size: int = 2,
    hidden_size: int = 1152,
    depth: int = 28,
    num_heads: int = 16,
    in_channels: int = 4,
    mlp_ratio: float = 4.0,
    class_dropout_prob: float = 0.1,
    num_classes: int = 1000,
    learn_sigma: bool = True,
    use_fp16: bool = False,
    use_class: bool = False,
    kd: bool = False,
    **unet_keys: Any,
) -> tuple[DiT, SpacedDiffusion]:
    """(DiT, SpacedDiffusion) with the DKDM authors' signature. As in theirs, `class_cond` (not `use_class`)
    decides the label embedding, and `kd` and the UNet keys (`num_channels`, `dropout`, ...) are accepted and
    ignored: every diffusion here has the KD objective."""
    del use_class, kd, unet_keys
    model = create_dit_model(
        model_name=model_name, patch_size=patch_size, hidden_size=hidden_size, depth=depth,
        num_heads=num_heads, input_size=image_size, in_channels=in_channels, mlp_ratio=mlp_ratio,
        class_dropout_prob=class_dropout_prob, num_classes=num_classes, learn_sigma=learn_sigma,
        use_class=class_cond, use_fp16=use_fp16,
    )
    diffusion = create_gaussian_diffusion(
        steps=diffusion_steps, learn_sigma=learn_sigma, noise_schedule=noise_schedule, use_kl=use_kl,
        predict_xstart=predict_xstart, rescale_timesteps=rescale_timesteps,
        rescale_learned_sigmas=rescale_learned_sigmas, timestep_respacing=timestep_respacing,
    )
    return model, diffusion


def create_dit_model(
    model_name: str = "DiT-S/2",
    patch_size: int = 2,
    hidden_size: int = 1152,
    depth: int = 28,
    num_heads: int = 16,
    input_size: int = 32,
    in_channels: int = 4,
    mlp_ratio: float = 4.0,
    class_dropout_prob: float = 0.1,
    num_classes: int = 1000,
    learn_sigma: bool = True,
    use_class: bool = False,
    use_fp16: bool = False,
) -> DiT:
    """A DiT of the paper's grid ("DiT-S/2" ... "DiT-XL/8", whose sizes override the four size arguments)
    or, for any other `model_name` (the authors write "custom"), of the given patch/width/depth/heads."""
    from .dit import DIT_CONFIGS, DiT

    sizes = DIT_CONFIGS.get(
        model_name, dict(depth=depth, hidden_size=hidden_size, patch_size=patch_size, num_heads=num_heads)
    )
    return DiT(
        input_size=input_size, in_channels=in_channels, mlp_ratio=mlp_ratio,
        class_dropout_prob=class_dropout_prob, num_classes=num_classes, learn_sigma=learn_sigma,
        use_class=use_class, use_fp16=use_fp16, **sizes,
    )


def is_dit_section(section: Mapping[str, Any]) -> bool:
    """True when a config section (or factory kwargs) describes a DiT: it has a non-empty `model_name`."""
    return bool(section.get("model_name"))


def architecture_defaults(section: Mapping[str, Any]) -> dict[str, Any]:
    """The factory keys and defaults of the section's family: the DiT's when it names `model_name`."""
    return dit_model_and_diffusion_defaults() if is_dit_section(section) else model_and_diffusion_defaults()


def create_any_model_and_diffusion(**kwargs: Any) -> tuple[Any, SpacedDiffusion]:
    """`create_dit_model_and_diffusion` for DiT kwargs (a `model_name`), else `create_model_and_diffusion`."""
    if is_dit_section(kwargs):
        return create_dit_model_and_diffusion(**kwargs)
    return create_model_and_diffusion(**kwargs)


def parse_channel_mult(channel_mult: str | Sequence[float], image_size: int) -> tuple[float, ...]:
    """Turn "1,2,2,2" (or a sequence, or "" for the size's default) into a tuple of multipliers."""
    if isinstance(channel_mult, str):
        text = channel_mult.strip()
        if not text:
            if image_size not in DEFAULT_CHANNEL_MULT:
                raise ValueError(
                    f"no default channel_mult for image_size={image_size}; "
                    f"set channel_mult explicitly (defaults exist for {sorted(DEFAULT_CHANNEL_MULT)})"
                )
            return DEFAULT_CHANNEL_MULT[image_size]
        try:
            return tuple(_number(part) for part in text.split(","))
        except ValueError as exc:
            raise ValueError(f"channel_mult={channel_mult!r} is not a comma-separated number list") from exc
    mult = tuple(channel_mult)
    if not mult:
        return parse_channel_mult("", image_size)
    return mult


def parse_attention_resolutions(
    attention_resolutions: str | int | Sequence[int], image_size: int
) -> tuple[int, ...]:
    """Turn resolutions like "16,8" into downsample rates (image_size // res), as the UNet expects."""
    if isinstance(attention_resolutions, int):
        resolutions: Iterable[Any] = [attention_resolutions]
    elif isinstance(attention_resolutions, str):
        resolutions = [part for part in attention_resolutions.split(",") if part.strip()]
    else:
        resolutions = attention_resolutions
    rates = []
    for res in resolutions:
        try:
            value = int(res)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"attention_resolutions={attention_resolutions!r}: {res!r} not an int") from exc
        if value <= 0 or image_size % value:
            raise ValueError(
                f"attention_resolutions={attention_resolutions!r}: {value} must divide {image_size}"
            )
        rates.append(image_size // value)
    return tuple(rates)


def _number(text: str) -> float:
    """Parse "2" as int 2 and "0.5" as float 0.5."""
    value = float(text)
    return int(value) if value.is_integer() else value


def create_model(
    image_size: int,
    num_channels: int,
    num_res_blocks: int,
    channel_mult: str | Sequence[float] = "",
    learn_sigma: bool = False,
    class_cond: bool = False,
    use_checkpoint: bool = False,
    attention_resolutions: str | int | Sequence[int] = "16",
    num_heads: int = 1,
    num_head_channels: int = -1,
    num_heads_upsample: int = -1,
    use_scale_shift_norm: bool = False,
    dropout: float = 0.0,
    resblock_updown: bool = False,
    use_fp16: bool = False,
    use_new_attention_order: bool = False,
    norm_groups: int = 32,
) -> UNetModel:
    """Build the ADM `UNetModel` for RGB images from script-level (string) arguments."""
    from .unet import UNetModel

    return UNetModel(
        image_size=image_size,
        in_channels=3,
        model_channels=num_channels,
        out_channels=(3 if not learn_sigma else 6),
        num_res_blocks=num_res_blocks,
        attention_resolutions=parse_attention_resolutions(attention_resolutions, image_size),
        dropout=dropout,
        channel_mult=parse_channel_mult(channel_mult, image_size),
        num_classes=(NUM_CLASSES if class_cond else None),
        use_checkpoint=use_checkpoint,
        use_fp16=use_fp16,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order,
        norm_groups=norm_groups,
    )


def create_gaussian_diffusion(
    *,
    steps: int = 1000,
    learn_sigma: bool = False,
    sigma_small: bool = False,
    noise_schedule: str = "linear",
    use_kl: bool = False,
    predict_xstart: bool = False,
    rescale_timesteps: bool = False,
    rescale_learned_sigmas: bool = False,
    timestep_respacing: str | Sequence[int] = "",
) -> SpacedDiffusion:
    """Build a `SpacedDiffusion` (all `steps` kept when `timestep_respacing` is empty)."""
    from . import gaussian_diffusion as gd
    from .respace import SpacedDiffusion, space_timesteps

    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if learn_sigma:
        model_var_type = gd.ModelVarType.LEARNED_RANGE
    elif sigma_small:
        model_var_type = gd.ModelVarType.FIXED_SMALL
    else:
        model_var_type = gd.ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, timestep_respacing or [steps]),
        betas=gd.get_named_beta_schedule(noise_schedule, steps),
        model_mean_type=(gd.ModelMeanType.START_X if predict_xstart else gd.ModelMeanType.EPSILON),
        model_var_type=model_var_type,
        loss_type=loss_type,
        rescale_timesteps=rescale_timesteps,
    )


def add_dict_to_argparser(parser: argparse.ArgumentParser, default_dict: Mapping[str, Any]) -> None:
    """Add one `--key` option per entry, typed after its default (bools parsed with `str2bool`)."""
    for key, value in default_dict.items():
        value_type: Any = type(value)
        if value is None:
            value_type = str
        elif isinstance(value, bool):
            value_type = str2bool
        parser.add_argument(f"--{key}", default=value, type=value_type)


def args_to_dict(args: Any, keys: Iterable[str]) -> dict[str, Any]:
    """Pick `keys` from an argparse namespace (or any attribute holder) into a dict."""
    return {key: getattr(args, key) for key in keys}


def str2bool(value: str | bool) -> bool:
    """Parse yes/no style strings for argparse; bools pass through."""
    if isinstance(value, bool):
        return value
    lowered = value.lower()
    if lowered in ("yes", "true", "t", "y", "1"):
        return True
    if lowered in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {value!r}")
