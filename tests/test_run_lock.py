"""One writer per run dir: a second live process, or a fresh run over a finished one, is refused."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

from script_env import ENV, PY, REPO, write_kd_yaml, write_tiny_checkpoints

from guided_diffusion.infra.run_lock import claim_run_dir, release_run_dir
from guided_diffusion.run_setup import choose_run_dir

HOLDER = textwrap.dedent(
    """
    import sys, time
    from guided_diffusion.infra.run_lock import claim_run_dir
    assert claim_run_dir(sys.argv[1], allow_checkpoints=True) is None
    print("locked", flush=True)
    time.sleep(120)
    """
)


@contextlib.contextmanager
def _held_by_another_process(run_dir: Path) -> Iterator[subprocess.Popen]:
    """A live process that holds `run_dir`'s lock until the block ends, then is SIGKILLed."""
    holder = subprocess.Popen(
        [PY, "-c", HOLDER, str(run_dir)], cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_a_live_owner_blocks_and_a_dead_one_does_not(tmp_path):
    run_dir = tmp_path / "run"
    with _held_by_another_process(run_dir) as holder:
        refusal = claim_run_dir(str(run_dir), allow_checkpoints=True)
        assert refusal is not None and "\n" not in refusal
        assert f"in use by pid {holder.pid}" in refusal and str(run_dir) in refusal
    # the OS released the killed owner's lock
    assert claim_run_dir(str(run_dir), allow_checkpoints=True) is None
    release_run_dir(str(run_dir))


def test_fresh_run_into_a_dir_with_checkpoints_is_refused(tmp_path):
    run_dir = tmp_path / "done"
    run_dir.mkdir()
    (run_dir / "model000004.pt").write_bytes(b"weights")
    (run_dir / "latest").write_text("4\n")
    refusal = claim_run_dir(str(run_dir), allow_checkpoints=False)
    assert refusal is not None and "already holds a run's checkpoints" in refusal
    assert "--resume_checkpoint" in refusal
    assert claim_run_dir(str(run_dir), allow_checkpoints=True) is None
    release_run_dir(str(run_dir))


def test_default_run_dirs_of_one_second_differ():
    cfg = {"config": "yaml/x/CIFAR10-57M-Dynamic-0.4.yaml"}
    names = {choose_run_dir("kd", cfg, None, None) for _ in range(3)}
    assert len(names) == 3
    assert all(Path(name).name.startswith("CIFAR10-57M-Dynamic-0.4-") for name in names)
    assert all(name.endswith(f"-{os.getpid()}") for name in names)


def test_image_kd_refuses_a_second_writer_and_a_fresh_run_over_a_finished_one(tmp_path):
    teacher = write_tiny_checkpoints(tmp_path)["teacher"]
    config = write_kd_yaml(tmp_path / "kd.yaml", teacher, tmp_path / "pool.cache")
    run_dir = tmp_path / "run"
    cmd = [
        PY,
        "scripts/image_kd.py",
        "--config",
        str(config),
        "--max_steps",
        "2",
        "--save_interval",
        "2",
        "--exp_dir",
        str(run_dir),
    ]
    first = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=180)
    assert first.returncode == 0, first.stderr[-2000:]
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.suffix == ".pt"}
    again = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=180)
    assert again.returncode != 0
    assert again.stderr.strip().splitlines()[-1].startswith(f"error: run dir {run_dir} already holds")
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.suffix == ".pt"} == before
    with _held_by_another_process(run_dir):
        resume = subprocess.run(
            [*cmd, "--resume_checkpoint", str(run_dir), "--max_steps", "4"],
            cwd=REPO,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert resume.returncode != 0 and "is in use by pid" in resume.stderr.strip().splitlines()[-1]
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.suffix == ".pt"} == before


def test_claiming_a_dir_removes_a_killed_writers_temp_files(tmp_path):
    """Issue 19: a kill before the first checkpoint left temp files that nothing removed."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".model000002.pt.abc123.tmp").write_bytes(b"partial")
    (run_dir / "notes.txt").write_text("kept")
    assert claim_run_dir(str(run_dir), allow_checkpoints=False) is None
    assert sorted(p.name for p in run_dir.iterdir()) == [".run.lock", "notes.txt"]
    release_run_dir(str(run_dir))


def _small_pool():
    import numpy as np

    from guided_diffusion.distill.dkdm.pool import DynamicBatch
    from guided_diffusion.script_util import create_gaussian_diffusion

    diffusion = create_gaussian_diffusion(steps=4, noise_schedule="cosine")
    pool = DynamicBatch(None, diffusion, batch_size=2, image_shape=(3, 4, 4), rho=0.5, device="cpu")
    pool.load_arrays(np.ones(pool.size, dtype=np.int64), np.zeros((pool.size, 3, 4, 4), dtype=np.float32))
    return pool


def test_writing_a_pool_cache_removes_its_dead_writers_temp_files_at_once(tmp_path):
    """Issue 19/32: a kill during a pool write left `.X.cache.*.tmp` in the shared cache folder. The next
    writer of that cache holds `X.cache.lock`; with the lock free no one else is writing X, so X's temp
    files go at once, however fresh; other files' temp files stay."""
    cache = tmp_path / "cache"
    cache.mkdir()
    dead = cache / ".pool.cache.dead01.tmp"
    other = cache / ".other.cache.dead03.tmp"
    for path in (dead, other):
        path.write_bytes(b"partial")
    _small_pool().save(str(cache / "pool.cache"))
    assert sorted(p.name for p in cache.iterdir()) == sorted([other.name, "pool.cache", "pool.cache.lock"])
    assert (cache / "pool.cache.lock").read_text() == ""  # released: no owner recorded


def test_a_live_writers_temp_file_is_kept_and_waited_for(tmp_path):
    """While another process holds the cache's writer lock (its pid recorded), its temp file is in use: the
    second writer neither deletes it nor writes the cache until the lock is free."""
    import fcntl
    import threading
    import time

    cache = tmp_path / "cache"
    cache.mkdir()
    live = cache / ".pool.cache.live02.tmp"
    live.write_bytes(b"being written")
    holder = open(cache / "pool.cache.lock", "a+")  # another open file: flock conflicts as between processes
    fcntl.flock(holder, fcntl.LOCK_EX)
    holder.write("pid 4242 on elsewhere\n")
    holder.flush()
    writer = threading.Thread(target=_small_pool().save, args=(str(cache / "pool.cache"),))
    writer.start()
    time.sleep(1.0)
    assert live.exists() and not (cache / "pool.cache").exists() and writer.is_alive()
    live.rename(cache / "pool.cache")  # the live writer finishes its write as atomic_write does
    fcntl.flock(holder, fcntl.LOCK_UN)
    holder.close()
    writer.join(timeout=30)
    assert not writer.is_alive()
    assert sorted(p.name for p in cache.iterdir()) == ["pool.cache", "pool.cache.lock"]
