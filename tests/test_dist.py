"""dist_util: collectives under `mpiexec -n 2` and `torchrun` on CPU (gloo), failure aborts the job,
single-process use with and without mpi4py."""

from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from guided_diffusion import dist_util
from guided_diffusion.infra.checkpoint import CheckpointError

SCRIPT = Path(__file__).resolve().parent / "mpi_scripts" / "dist_check.py"
BIN = Path(sys.executable).parent


def _launcher(name: str) -> str:
    path = BIN / name
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found next to {sys.executable} or on PATH")
    return found


def _clean_env() -> dict[str, str]:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PMI_RANK", "PMI_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _check_ok_run(proc: subprocess.CompletedProcess, log_dir: Path) -> None:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rank 0 OK" in proc.stdout and "rank 1 OK" in proc.stdout
    with open(log_dir / "progress.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["loss", "only_rank0", "only_rank1", "step"] and len(rows) == 2
    assert sorted(p.name for p in log_dir.iterdir()) == ["log.txt", "progress.csv"]


@pytest.mark.mpi
@pytest.mark.timeout(150)
def test_mpiexec_two_ranks_collectives(tmp_path: Path) -> None:
    cmd = [_launcher("mpiexec"), "-n", "2", sys.executable, str(SCRIPT), "ok", str(tmp_path / "logs")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_clean_env())
    _check_ok_run(proc, tmp_path / "logs")


@pytest.mark.mpi
@pytest.mark.timeout(150)
def test_mpiexec_failing_rank_aborts_job(tmp_path: Path) -> None:
    start = time.monotonic()
    cmd = [_launcher("mpiexec"), "-n", "2", sys.executable, str(SCRIPT), "fail"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_clean_env())
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "[rank 1] uncaught RuntimeError: deliberate failure on rank 1" in proc.stderr
    assert elapsed < 45, f"job took {elapsed:.0f}s: the abort did not end rank 0's wait (timeout is 60 s)"


@pytest.mark.timeout(150)
def test_torchrun_style_env_two_ranks_collectives(tmp_path: Path) -> None:
    """The RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* variables torchrun sets, without torchrun's agent."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = _clean_env()
        env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        cmd = [sys.executable, str(SCRIPT), "ok", str(tmp_path / "logs")]
        pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(subprocess.Popen(cmd, env=env, **pipes))
    outs = [p.communicate(timeout=120) for p in procs]
    merged = subprocess.CompletedProcess(
        [], max(p.returncode for p in procs), "".join(o for o, _ in outs), "".join(e for _, e in outs)
    )
    _check_ok_run(merged, tmp_path / "logs")


def test_single_process_setup_and_helpers(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK"):
        monkeypatch.delenv(var, raising=False)
    x = torch.tensor([[1, 2], [3, 4]])
    assert dist_util.get_world_size() == 1 and dist_util.is_main_process()
    assert torch.equal(dist_util.all_reduce_mean(x), x.float())
    dist_util.setup_dist(timeout_s=30)
    try:
        assert torch.distributed.is_initialized() and torch.distributed.get_backend() == "gloo"
        assert dist_util.get_rank() == 0 and dist_util.get_world_size() == 1
        assert dist_util.dev() == torch.device("cpu")
        assert [t.tolist() for t in dist_util.all_gather_tensors(x)] == [x.tolist()]
        assert dist_util.broadcast_object({"a": 1}) == {"a": 1}
        p = torch.ones(3)
        dist_util.sync_params([p])
        dist_util.barrier()
        assert torch.equal(p, torch.ones(3))
    finally:
        dist_util.cleanup()
    assert not torch.distributed.is_initialized()


def test_plain_process_without_mpi4py() -> None:
    code = (
        "import sys; sys.modules['mpi4py'] = None\n"
        "from guided_diffusion import dist_util\n"
        "dist_util.setup_dist()\n"
        "import torch\n"
        "assert dist_util.all_reduce_mean(torch.tensor([2.0])).item() == 2.0\n"
        "dist_util.cleanup(); print('fine')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=_clean_env())
    assert proc.returncode == 0 and proc.stdout.strip() == "fine", proc.stderr


def test_timeout_from_env_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GD_DIST_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="GD_DIST_TIMEOUT.*'soon'"):
        dist_util.setup_dist()
    monkeypatch.setenv("GD_DIST_TIMEOUT", "-5")
    with pytest.raises(ValueError, match="positive"):
        dist_util.setup_dist()
    assert not torch.distributed.is_initialized()


def test_load_state_dict_reads_safely(tmp_path: Path) -> None:
    path = tmp_path / "model000001.pt"
    torch.save({"w": torch.arange(3.0)}, path)
    assert torch.equal(dist_util.load_state_dict(str(path))["w"], torch.arange(3.0))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model000001.pt"):
        dist_util.load_state_dict(str(path))
