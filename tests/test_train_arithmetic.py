"""The training step's arithmetic against hand-computed values: gradient clipping and the logged norm,
the EMA update, and fp16 loss scaling (halving on overflow, growth after a clean interval)."""

from __future__ import annotations

import types

import torch

from guided_diffusion.infra.mixed_precision import MixedPrecisionTrainer
from guided_diffusion.train_util import TrainLoop


def _linear_with_grads(grads: list[float]) -> torch.nn.Linear:
    model = torch.nn.Linear(len(grads), 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    model.weight.grad = torch.tensor([grads])
    return model


def test_grad_clip_scales_the_gradient_to_the_limit_and_logs_the_norm_before_clipping():
    model = _linear_with_grads([3.0, 4.0])  # norm 5
    trainer = MixedPrecisionTrainer(model, grad_clip=0.5)
    trainer.optimize(torch.optim.SGD(model.parameters(), lr=1.0))
    assert float(trainer.grad_norm) == 5.0
    torch.testing.assert_close(model.weight, torch.tensor([[1.0 - 0.3, 1.0 - 0.4]]), rtol=0, atol=1e-6)
    unclipped = _linear_with_grads([3.0, 4.0])
    MixedPrecisionTrainer(unclipped, grad_clip=0.0).optimize(torch.optim.SGD(unclipped.parameters(), lr=1.0))
    torch.testing.assert_close(unclipped.weight, torch.tensor([[-2.0, -3.0]]))
    small = _linear_with_grads([0.3, 0.4])  # under the limit: untouched
    MixedPrecisionTrainer(small, grad_clip=0.5).optimize(torch.optim.SGD(small.parameters(), lr=1.0))
    torch.testing.assert_close(small.weight, torch.tensor([[0.7, 0.6]]))


def test_ema_moves_one_minus_rate_of_the_way_and_not_after_a_skipped_step():
    """ema <- rate * ema + (1 - rate) * param, for every rate; a skipped step leaves it."""
    param = torch.nn.Parameter(torch.tensor([10.0, -2.0]))
    loop = types.SimpleNamespace(
        ema_rate=[0.9, 0.5], model_params=[param],
        ema_params=[[torch.tensor([0.0, 0.0])], [torch.tensor([4.0, 4.0])]],
        mp_trainer=types.SimpleNamespace(step_taken=torch.tensor(1.0)),
    )
    TrainLoop._update_ema(loop)
    torch.testing.assert_close(loop.ema_params[0][0], torch.tensor([1.0, -0.2]))
    torch.testing.assert_close(loop.ema_params[1][0], torch.tensor([7.0, 1.0]))
    loop.mp_trainer.step_taken = torch.tensor(0.0)
    TrainLoop._update_ema(loop)
    torch.testing.assert_close(loop.ema_params[1][0], torch.tensor([7.0, 1.0]))


def test_fp16_loss_scale_halves_on_overflow_and_doubles_after_a_clean_interval():
    """The scaler's arithmetic, run on a CPU parameter (the update itself runs only where fp16 does):
    an inf gradient skips the step and halves the scale; `growth_interval` clean steps double it."""
    model = _linear_with_grads([1.0, 1.0])
    trainer = MixedPrecisionTrainer(model, fp16_scale_growth=0.5, initial_lg_loss_scale=4.0)
    trainer.precision = "fp16"  # the CPU falls back to fp32; exercise the fp16 scaler path directly
    trainer.scale.fill_(16.0)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model.weight.grad = torch.tensor([[float("inf"), 1.0]])
    trainer.optimize(opt)
    assert float(trainer.scale) == 8.0 and float(trainer.step_taken) == 0.0
    torch.testing.assert_close(model.weight, torch.ones(1, 2))  # skipped
    for _ in range(2):  # growth_interval = round(1 / 0.5) = 2
        model.weight.grad = torch.tensor([[8.0, 8.0]])  # scaled by 8: unscaled 1.0
        trainer.optimize(opt)
    assert float(trainer.scale) == 16.0
    torch.testing.assert_close(model.weight, torch.full((1, 2), -1.0))


def test_adm_fp16_loss_scale_is_guided_diffusions():
    """precision adm_fp16: lg_loss_scale starts at 20, grows by fp16_scale_growth every clean step and drops
    by 1 on an overflow, whose step is skipped; gradients are unscaled by 1 / 2**lg."""
    model = _linear_with_grads([1.0, 1.0])
    trainer = MixedPrecisionTrainer(model, precision="adm_fp16", fp16_scale_growth=0.25)
    assert trainer.precision == "adm_fp16" and float(trainer.lg_loss_scale) == 20.0  # kept on the CPU
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model.weight.grad = torch.full((1, 2), 2.0**20)  # a scaled gradient of 1.0
    trainer.optimize(opt)
    torch.testing.assert_close(model.weight, torch.zeros(1, 2))
    assert float(trainer.lg_loss_scale) == 20.25
    model.weight.grad = torch.tensor([[float("nan"), 1.0]])
    trainer.optimize(opt)
    assert float(trainer.lg_loss_scale) == 19.25 and float(trainer.step_taken) == 0.0
    torch.testing.assert_close(model.weight, torch.zeros(1, 2))


def test_image_train_runs_guided_diffusions_fp16_and_a_dit_is_refused(tmp_path):
    """`--precision adm_fp16` end to end on the CPU (half convolutions run there): the loss scale of
    guided-diffusion in progress.csv; a DiT config asking for it stops at load in one line."""
    import csv
    import subprocess

    from script_env import ENV, PY, REPO

    from datasets.digits import write_digits
    from guided_diffusion.config import ConfigError, load_config

    data = write_digits(tmp_path / "digits")["train"]
    cmd = [PY, "scripts/image_train.py", "--config", "tests/configs/tiny_baseline.yaml", "--data_dir", data,
           "--exp_dir", str(tmp_path / "run"), "--precision", "adm_fp16", "--max_steps", "3",
           "--save_interval", "3"]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(tmp_path / "run" / "progress.csv") as f:
        scales = [round(float(r["lg_loss_scale"]), 4) for r in csv.DictReader(f)]
    assert scales == [20.001, 20.002, 20.003]
    try:
        load_config(REPO / "yaml/digits_16/dit_teacher.yaml", {"precision": "adm_fp16"})
    except ConfigError as exc:
        assert "adm_fp16" in str(exc) and "\n" not in str(exc)
    else:
        raise AssertionError("a DiT with adm_fp16 loaded")


def test_keep_checkpoints_keeps_the_newest_complete_sets_and_resumes(tmp_path):
    """keep_checkpoints: 2 with a checkpoint every step: after 5 steps only the sets of steps 4 and 5 stay
    (model, EMA, opt, written before the older set goes), and the run resumes from them."""
    import subprocess

    from script_env import ENV, PY, REPO

    from datasets.digits import write_digits

    data = write_digits(tmp_path / "digits")["train"]
    run = tmp_path / "run"
    cmd = [PY, "scripts/image_train.py", "--config", "tests/configs/tiny_baseline.yaml", "--data_dir", data,
           "--exp_dir", str(run), "--max_steps", "5", "--save_interval", "1", "--keep_checkpoints", "2"]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = sorted({int(p.stem[-6:]) for p in run.glob("*.pt")})
    assert steps == [4, 5] and {p.name for p in run.glob("*000005.pt")} == {
        "model000005.pt", "ema_0.9999_000005.pt", "opt000005.pt"}
    more = [*cmd[:-6], "--max_steps", "6", "--save_interval", "1", "--keep_checkpoints", "2",
            "--resume_checkpoint", str(run)]
    proc = subprocess.run(more, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted({int(p.stem[-6:]) for p in run.glob("*.pt")}) == [5, 6]


def test_deterministic_switch_sets_every_layer_and_the_run_logs_it_and_its_memory(tmp_path):
    """`deterministic: true` turns on PyTorch's deterministic algorithms, cuDNN without autotuning, a fixed
    cuBLAS workspace and Inductor's deterministic mode (also in the environment its compile workers
    inherit); the run's log says so, and `memory_log_interval` writes one memory line per K steps."""
    import re
    import subprocess

    from script_env import ENV, PY, REPO

    from datasets.digits import write_digits

    probe = ("from guided_diffusion.run_setup import use_deterministic; import os, torch; "
             "import torch._inductor.config as c; use_deterministic({on}); "
             "print(torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark, "
             "os.environ.get('CUBLAS_WORKSPACE_CONFIG'), os.environ.get('TORCHINDUCTOR_DETERMINISTIC'), "
             "c.deterministic)")
    unset = ("CUBLAS_WORKSPACE_CONFIG", "TORCHINDUCTOR_DETERMINISTIC")
    env = {k: v for k, v in ENV.items() if k not in unset}
    outs = [subprocess.run([PY, "-c", probe.format(on=on)], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=120) for on in (True, False)]
    assert [o.stdout.split() for o in outs] == [["True", "False", ":4096:8", "1", "True"],
                                                ["False", "False", "None", "None", "False"]], outs[0].stderr
    from omegaconf import OmegaConf

    from guided_diffusion.infra.compile_util import FastPath

    switches = {"compile": True, "cuda_graphs": True, "half_norm": True, "compile_background": True}
    for on in (True, False):  # a background compile takes over at a wall-clock step
        fast = FastPath.from_section(OmegaConf.create({**switches, "deterministic": on}))
        assert (fast.compile, fast.compile_background) == (True, not on)

    config = tmp_path / "tiny.yaml"
    config.write_text((REPO / "tests/configs/tiny_baseline.yaml").read_text().replace(
        "tests/configs/", str(REPO / "tests/configs") + "/") + "memory_log_interval: 2\n")
    data = write_digits(tmp_path / "digits")["train"]
    run = tmp_path / "run"
    proc = subprocess.run([PY, "scripts/image_train.py", "--config", str(config), "--data_dir", data,
                           "--exp_dir", str(run), "--max_steps", "5", "--deterministic", "true"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = (run / "log.txt").read_text()
    assert "1 rank(s), device cpu, deterministic kernels" in log
    memory = re.findall(r"memory step (\d+): host_rss_mib ([0-9.]+)", log)
    assert [int(step) for step, _ in memory] == [2, 4] and all(float(mib) > 50 for _, mib in memory)
