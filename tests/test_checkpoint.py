"""Checkpoint I/O: atomic writes survive crashes, bad files give one-line errors, strict loading explains
mismatches (and names the fitting arch YAML), resume discovery takes the newest complete set."""

from __future__ import annotations

import inspect
import json
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from guided_diffusion import logger
from guided_diffusion.infra.atomic_io import atomic_write
from guided_diffusion.infra.checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    atomic_torch_save,
    atomic_write_bytes,
    find_resume_set,
    load_state_dict_strict,
    parse_step,
    safe_torch_load,
    suggest_arch,
    verify_checkpoint_file,
    write_latest,
)
from guided_diffusion.script_util import create_model, model_and_diffusion_defaults


class _ExplodingPickle:
    """Pickling this raises, so torch.save fails after part of the archive is written."""

    def __reduce__(self):
        raise RuntimeError("serialization failed mid-way")


def test_atomic_writes_round_trip(tmp_path: Path) -> None:
    atomic_write_bytes(b"abc", tmp_path / "sub" / "f.bin")
    assert (tmp_path / "sub" / "f.bin").read_bytes() == b"abc"
    atomic_torch_save({"w": torch.arange(5.0)}, tmp_path / "m.pt")
    assert torch.equal(safe_torch_load(tmp_path / "m.pt")["w"], torch.arange(5.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "sub"]


def test_failed_serialization_leaves_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "model000010.pt"
    big = torch.zeros(200_000)
    with pytest.raises(RuntimeError, match="mid-way"):
        atomic_torch_save({"w": big, "bad": _ExplodingPickle()}, target)
    assert not target.exists()
    atomic_torch_save({"w": torch.ones(3)}, target)
    with pytest.raises(RuntimeError, match="mid-way"):
        atomic_torch_save({"w": big, "bad": _ExplodingPickle()}, target)
    assert torch.equal(safe_torch_load(target)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["model000010.pt"]


_WRITER = textwrap.dedent(
    """
    import sys, torch
    from guided_diffusion.infra.checkpoint import atomic_torch_save
    i = 0
    while True:
        i += 1
        atomic_torch_save({"i": i, "w": torch.full((3_000_000,), float(i))}, sys.argv[1])
        if i == 1:
            print("saved", flush=True)
    """
)


def test_disk_full_is_named_in_one_line_and_the_old_file_kept(tmp_path: Path) -> None:
    """Issue 19: torch.save on a full disk ended in an inline_container error, ENOSPC only in the chain."""
    import errno

    target = tmp_path / "model000002.pt"
    atomic_torch_save({"w": torch.ones(2)}, target)

    def full_disk(handle):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:
            raise RuntimeError("[enforce fail at inline_container.cc] PytorchStreamWriter failed") from exc

    with pytest.raises(OSError) as info:
        atomic_write(target, full_disk)
    assert info.value.errno == errno.ENOSPC
    assert str(info.value).endswith(f"disk full: no space left to write {target}; the previous file is kept")
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["model000002.pt"]


@pytest.mark.timeout(60)
def test_sigkill_during_save_never_leaves_partial_target(tmp_path: Path) -> None:
    target = tmp_path / "big.pt"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "saved"
    time.sleep(random.Random(0).uniform(0.2, 0.6))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    obj = safe_torch_load(target)
    assert obj["i"] >= 1 and obj["w"].shape == (3_000_000,) and bool((obj["w"] == float(obj["i"])).all())
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".tmp")] == ["big.pt"]


def test_truncated_or_missing_checkpoint_gives_one_line_error(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save({"w": torch.randn(1000)}, good)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good.read_bytes()[:700])
    with pytest.raises(CheckpointError) as info:
        safe_torch_load(bad)
    msg = str(info.value)
    assert "\n" not in msg and str(bad) in msg and "700 bytes" in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__
    with pytest.raises(CheckpointError, match="not found"):
        safe_torch_load(tmp_path / "absent.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.pt"):
        safe_torch_load(tmp_path / "junk.pt")


def test_safe_load_refuses_arbitrary_objects(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"obj": _Plain()}, path)
    with pytest.raises(CheckpointError, match="evil.pt"):
        safe_torch_load(path)


class _Plain:
    """A non-allowlisted class that weights_only loading must reject."""


def test_verify_detects_flipped_byte_and_truncated_pickle(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.save({"w": torch.randn(5000)}, path)
    verify_checkpoint_file(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="CRC"):
        verify_checkpoint_file(path)
    cache = tmp_path / "teacher-state-000001.cache"
    blob = pickle.dumps({"total_t": list(range(100))}, protocol=4)
    cache.write_bytes(blob)
    verify_checkpoint_file(cache)
    cache.write_bytes(blob[:-5])
    with pytest.raises(CheckpointError, match="truncated"):
        verify_checkpoint_file(cache)


def _tiny() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


def test_strict_load_unwraps_and_strips_module_prefix(tmp_path: Path) -> None:
    src = _tiny()
    logger.configure(dir=str(tmp_path), format_strs=["log"])
    try:
        for wrapped in (
            src.state_dict(),
            {"state_dict": src.state_dict(), "epoch": 3},
            {"model": {f"module.{k}": v for k, v in src.state_dict().items()}},
        ):
            dst = _tiny()
            load_state_dict_strict(dst, wrapped, "ckpt.pt")
            assert all(torch.equal(a, b) for a, b in zip(src.parameters(), dst.parameters(), strict=True))
    finally:
        logger.reset()
    text = (tmp_path / "log.txt").read_text()
    assert "under key 'state_dict'" in text and "'module.' prefix" in text


def test_strict_load_reports_missing_unexpected_misshaped(tmp_path: Path) -> None:
    sd = _tiny().state_dict()
    sd["extra.weight"] = sd.pop("1.bias")
    sd["0.weight"] = torch.zeros(5, 4)
    model = _tiny()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(CheckpointMismatchError) as info:
        load_state_dict_strict(model, sd, "student.pt", arch_dir=tmp_path)
    msg = str(info.value)
    head = "student.pt: state dict does not fit the model (1 missing, 1 unexpected, 1 mis-shaped keys)"
    assert msg.splitlines()[0] == head
    assert "missing (1): 1.bias" in msg and "unexpected (1): extra.weight" in msg
    assert "0.weight: checkpoint [5, 4] vs model [3, 4]" in msg and "fits none" in msg
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_student_profiled_by_thop_loads_with_its_counter_buffers_dropped(tmp_path: Path) -> None:
    """The authors' image_kd.py runs thop.profile on the student, which leaves total_ops/total_params
    buffers in its checkpoints; those keys (and only those) are dropped with one log line."""
    import thop

    from guided_diffusion.run_setup import load_model_weights

    kwargs = model_and_diffusion_defaults()
    kwargs.update(
        image_size=16,
        num_channels=32,
        num_res_blocks=1,
        attention_resolutions="8",
        num_head_channels=16,
        channel_mult="1,2",
        learn_sigma=True,
    )
    names = inspect.signature(create_model).parameters
    src = create_model(**{k: v for k, v in kwargs.items() if k in names})
    clean = set(src.state_dict())
    thop.profile(src, inputs=(torch.randn(1, 3, 16, 16), torch.tensor([3])), verbose=False)
    profiled = src.state_dict()
    extra = [k for k in profiled if k not in clean]
    assert extra and all(k.rsplit(".", 1)[-1] in ("total_ops", "total_params") for k in extra)
    path = tmp_path / "model010000.pt"
    torch.save(profiled, path)
    dst = create_model(**{k: v for k, v in kwargs.items() if k in names})
    logger.configure(dir=str(tmp_path), format_strs=["log"])
    try:
        load_model_weights(dst, str(path))
    finally:
        logger.reset()
    assert all(torch.equal(a, b) for a, b in zip(src.parameters(), dst.parameters(), strict=True))
    lines = [ln for ln in (tmp_path / "log.txt").read_text().splitlines() if "thop counter" in ln]
    assert lines == [f"note: {path}: dropped {len(extra)} thop counter buffers (total_ops/total_params)"]
    profiled["out.2.scale"] = torch.ones(1)
    torch.save(profiled, path)
    with pytest.raises(CheckpointMismatchError, match="unexpected.*out.2.scale"):
        load_model_weights(dst, str(path))


def _meta_model(repo_root: Path, arch: str, learn_sigma: bool = True) -> torch.nn.Module:
    kwargs = model_and_diffusion_defaults()
    kwargs.update(OmegaConf.to_container(OmegaConf.load(repo_root / "yaml" / "arch" / f"{arch}.yaml")))
    kwargs.update(learn_sigma=learn_sigma, use_fp16=False)
    names = inspect.signature(create_model).parameters
    with torch.device("meta"):
        return create_model(**{k: v for k, v in kwargs.items() if k in names})


def test_mismatch_names_the_arch_the_checkpoint_fits(repo_root: Path, reference_dir: Path) -> None:
    manifest = json.loads((reference_dir / "unet_manifest.json").read_text())
    ckpt = {k: torch.empty(shape, device="meta") for k, shape in manifest["57M-CNN"]["keys"]}
    model = _meta_model(repo_root, "14M-CNN")
    with pytest.raises(CheckpointMismatchError) as info:
        load_state_dict_strict(model, ckpt, "ADM_cifar10_baseline.pt")
    msg = str(info.value)
    assert "0 missing, 0 unexpected" in msg
    assert "input_blocks.0.0.weight: checkpoint [128, 3, 3, 3] vs model [64, 3, 3, 3]" in msg
    assert "more)" in msg
    assert "fits arch yaml/arch/57M-CNN.yaml (learn_sigma=True)" in msg
    no_sigma = {
        k: torch.empty(v.shape, device="meta")
        for k, v in _meta_model(repo_root, "24M-CNN", False).state_dict().items()
    }
    assert suggest_arch(no_sigma) == ["yaml/arch/24M-CNN.yaml (learn_sigma=False)"]
    # the data sets' own arch files are searched too: the shipped digits teacher is found (issue 19)
    digits = torch.load(repo_root / "model" / "digits16_teacher.pt", map_location="meta", weights_only=True)
    assert suggest_arch(digits) == ["yaml/digits_16/arch/teacher.yaml (learn_sigma=True)"]


def test_parse_step() -> None:
    assert parse_step("model000100.pt") == 100
    assert parse_step("/run/ema_0.9999_001200.pt") == 1200
    assert parse_step("teacher-state-000050.cache") == 50
    assert parse_step("opt1234567.pt") == 1234567
    with pytest.raises(ValueError, match="model.pt"):
        parse_step("model.pt")


def _write_set(run: Path, step: int, skip: tuple[str, ...] = ()) -> list[str]:
    files = {
        "model": f"model{step:06d}.pt",
        "opt": f"opt{step:06d}.pt",
        "ema": f"ema_0.9999_{step:06d}.pt",
        "pool": f"teacher-state-{step:06d}.cache",
    }
    for role, name in files.items():
        if role in skip:
            continue
        if role == "pool":
            atomic_write_bytes(pickle.dumps({"total_t": [step]}, protocol=4), run / name)
        else:
            atomic_torch_save({"step": step}, run / name)
    return [n for r, n in files.items() if r not in skip]


_ROLES = dict(
    required=("model", "opt", "ema", "pool"),
    ema_rates=[0.9999],
    extra_patterns={"pool": "teacher-state-{step:06d}.cache"},
)


@pytest.fixture
def log_file(tmp_path: Path):
    logdir = tmp_path / "logs"
    logger.configure(dir=str(logdir), format_strs=["log"])
    yield logdir / "log.txt"
    logger.reset()


def test_find_resume_set_skips_partial_and_corrupt_newer_sets(tmp_path: Path, log_file: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    assert find_resume_set(run, **_ROLES) is None
    _write_set(run, 100)
    _write_set(run, 200)
    _write_set(run, 300, skip=("opt",))
    _write_set(run, 400)
    model400 = run / "model000400.pt"
    model400.write_bytes(model400.read_bytes()[:200])
    (run / "samples_16x32x32x3.npz").write_bytes(b"x")
    found = find_resume_set(run, **_ROLES)
    assert found is not None and found.step == 200
    assert found.get("model") == str(run / "model000200.pt")
    assert found.ema_path(0.9999) == str(run / "ema_0.9999_000200.pt")
    assert found.get("pool") == str(run / "teacher-state-000200.cache")
    text = log_file.read_text()
    assert "step 400" in text and "model000400.pt" in text
    assert "step 300" in text and "missing opt000300.pt" in text
    assert text.count("skipping incomplete") == 2


def test_find_resume_set_trusts_valid_latest_and_falls_back(tmp_path: Path, log_file: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    write_latest(run, 100, _write_set(run, 100))
    _write_set(run, 200)
    assert json.loads((run / "latest").read_text()) == {
        "step": 100,
        "files": ["model000100.pt", "opt000100.pt", "ema_0.9999_000100.pt", "teacher-state-000100.cache"],
    }
    assert find_resume_set(run, **_ROLES).step == 100
    write_latest(run, 300, _write_set(run, 300, skip=("ema",)) + ["ema_0.9999_000300.pt"])
    assert find_resume_set(run, **_ROLES).step == 200
    assert "latest names step 300" in log_file.read_text()
    assert find_resume_set(run, required=("model",)).step == 300


def test_find_resume_set_from_model_file(tmp_path: Path, log_file: Path) -> None:
    _write_set(tmp_path, 100)
    _write_set(tmp_path, 200, skip=("opt",))
    found = find_resume_set(tmp_path / "model000100.pt", **_ROLES)
    assert found.step == 100 and found.get("opt") == str(tmp_path / "opt000100.pt")
    with pytest.raises(CheckpointError, match="missing opt000200.pt"):
        find_resume_set(tmp_path / "model000200.pt", **_ROLES)
    only_model = find_resume_set(tmp_path / "model000200.pt", required=("model",))
    assert only_model.get("opt") is None and only_model.get("model") == str(tmp_path / "model000200.pt")
    with pytest.raises(CheckpointError, match="not found"):
        find_resume_set(tmp_path / "model000900.pt")
